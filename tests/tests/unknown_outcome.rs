//! A call that must not repeat (opening an incident) whose answer never comes: Riposte does not
//! call again on its own, it asks a human, and does what the human says.

use std::time::Duration;

use serde_json::json;

use riposte_core::playbook::spec_from_value;
use riposte_core::run::{RunStatus, StepStatus};
use riposte_tests::{OPERATOR_KEY, Riposte, Vendor};

const PLAYBOOK: &str = r#"
id: open-incident
name: Open an incident
steps:
  - id: open_ticket
    action: servicenow.create_incident
    timeout: 1s
    with: { short_description: "Malicious IP 203.0.113.9" }
  - id: after
    needs: [open_ticket]
    set: { opened: true }
"#;

fn connections(v: &Vendor) -> String {
    format!(
        "connections:\n  servicenow:\n    base_url: {}\n    auth: {{ type: basic, username: riposte, password: {{ secret: sn }} }}\n",
        v.url
    )
}

/// ServiceNow takes 3 s to answer; the step allows 1 s: did the incident get created? Returns
/// the stand-in, Riposte and the started run's id.
async fn started() -> (Vendor, Riposte, String) {
    let sn = Vendor::start_slow("servicenow", Duration::from_secs(3), |_| {
        (
            201,
            json!({"result": {"sys_id": "abc", "number": "INC0010042"}}),
        )
    })
    .await;
    let r = Riposte::start_with_secrets(&connections(&sn), &[("sn", "pw")]).await;
    let spec = spec_from_value(serde_yaml_ng::from_str(PLAYBOOK).unwrap(), None).unwrap();
    r.local.service.put_playbook(spec, "carl").await.unwrap();
    let id = r
        .local
        .service
        .start_run("open-incident", json!({}), "olivia")
        .await
        .unwrap()
        .id;
    (sn, r, id)
}

#[tokio::test]
async fn a_timed_out_incident_is_not_opened_twice_a_human_settles_it() {
    let (sn, r, id) = started().await;
    let run = r
        .wait_run(&id, "waiting for a human", |run| {
            run.status == RunStatus::Waiting
        })
        .await;
    let it = &run.step("open_ticket").unwrap().iterations[0];
    assert_eq!(it.status, StepStatus::Waiting);
    let ap = it.approval.as_ref().unwrap();
    assert_eq!(ap.choices, ["retry", "done", "fail"]);
    assert!(ap.message.contains("timed out"), "{}", ap.message);
    assert!(run.history.iter().any(|h| h.event == "outcome_unknown"));
    // Though the step may retry 3 times, the call went out once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sn.requests().len(), 1);

    // Someone checked ServiceNow: the incident exists. The run goes on without a second call.
    let (status, body) = r
        .call(
            "POST",
            &format!("/runs/{id}/approvals/open_ticket"),
            Some(OPERATOR_KEY),
            Some(json!({"choice": "done"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let run = r.succeeded(&id).await;
    assert_eq!(
        run.step("open_ticket").unwrap().iterations[0]
            .output
            .as_ref()
            .unwrap()["confirmed_by"],
        "olivia"
    );
    assert_eq!(sn.requests().len(), 1);
}

#[tokio::test]
async fn a_human_may_ask_for_the_call_again() {
    let (sn, r, id) = started().await;
    r.wait_run(&id, "waiting for a human", |run| {
        run.status == RunStatus::Waiting
    })
    .await;
    let (status, body) = r
        .call(
            "POST",
            &format!("/runs/{id}/approvals/open_ticket"),
            Some(OPERATOR_KEY),
            Some(json!({"choice": "retry"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // The second call also times out: a human is asked again, never a blind retry.
    let run = r
        .wait_run(&id, "asked again", |run| {
            run.step("open_ticket").unwrap().iterations[0].attempt == 2
                && run.status == RunStatus::Waiting
        })
        .await;
    assert_eq!(sn.requests().len(), 2, "{:#?}", run.history);
    let (status, _) = r
        .call(
            "POST",
            &format!("/runs/{id}/approvals/open_ticket"),
            Some(OPERATOR_KEY),
            Some(json!({"choice": "fail"})),
        )
        .await;
    assert_eq!(status, 200);
    let run = r
        .wait_run(&id, "failed", |run| run.status.is_terminal())
        .await;
    assert_eq!(run.status, RunStatus::Failed);
    assert!(
        run.error
            .as_deref()
            .unwrap_or("")
            .contains("marked failed by olivia"),
        "{:?}",
        run.error
    );
}
