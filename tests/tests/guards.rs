//! Blast-radius guards: whatever a playbook says, a break-glass account is never disabled, no
//! more than the cap of users is disabled per hour, and the kill switch stops automation at once.
//! Each refusal is visible in the run, and the refused call never reaches the vendor.

use serde_json::{Value, json};

use riposte_core::guard::Guards;
use riposte_core::playbook::spec_from_value;
use riposte_core::rule::Rule;
use riposte_core::run::RunStatus;
use riposte_tests::{CONTRIBUTOR_KEY, OPERATOR_KEY, Riposte, Vendor, event};

const DISABLE: &str = r#"
id: disable-users
name: Disable the alert's users
steps:
  - id: disable
    for_each: alert.entities.users
    action: entra.disable_user
    on_error: continue
    with: { user: "${{ item }}" }
  - id: done
    needs: [disable]
    set: { finished: true }
"#;

const GUARDS: &str = r#"
never_touch:
  entra.disable_user: { user: [breakglass@example.com, "*@admins.example.com"] }
rate_caps:
  entra.disable_user: { max: 3, per: 1h }
"#;

async fn entra() -> Vendor {
    Vendor::start("entra", |r| match r.method.as_str() {
        "POST" => (
            200,
            json!({"token_type": "Bearer", "expires_in": 3599, "access_token": "graph-token"}),
        ),
        _ => (204, Value::Null),
    })
    .await
}

fn connections(v: &Vendor) -> String {
    format!(
        r#"connections:
  entra:
    base_url: {url}
    auth:
      type: oauth2_client_credentials
      token_url: {url}/tenant/oauth2/v2.0/token
      client_id: riposte
      client_secret: {{ secret: entra-secret }}
      scope: https://graph.microsoft.com/.default
"#,
        url = v.url
    )
}

async fn riposte(v: &Vendor) -> Riposte {
    let r = Riposte::start_with_secrets(&connections(v), &[("entra-secret", "s3cret")]).await;
    let catalog = riposte_core::connector::ConnectorCatalog::shipped();
    r.local
        .service
        .set_guards(Guards::parse(GUARDS, Some("guards.yaml"), &catalog).unwrap());
    let spec = spec_from_value(serde_yaml_ng::from_str(DISABLE).unwrap(), None).unwrap();
    r.local.service.put_playbook(spec, "carl").await.unwrap();
    r
}

fn disabled(v: &Vendor) -> Vec<String> {
    v.requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.path.clone())
        .collect()
}

#[tokio::test]
async fn protected_accounts_are_never_disabled_and_the_hourly_cap_holds() {
    let v = entra().await;
    let r = riposte(&v).await;
    let users = json!([
        "alice@example.com",
        "breakglass@example.com",
        "root@admins.example.com",
        "bob@example.com",
        "carol@example.com",
        "dave@example.com"
    ]);
    let run = r
        .local
        .service
        .start_run(
            "disable-users",
            json!({"alert": {"entities": {"users": users}}}),
            "olivia",
        )
        .await
        .unwrap();
    let run = r.succeeded(&run.id).await;
    // Three ordinary users fit the cap of 3 per hour; the protected two were never sent.
    assert_eq!(
        disabled(&v),
        [
            "/v1.0/users/alice%40example.com",
            "/v1.0/users/bob%40example.com",
            "/v1.0/users/carol%40example.com"
        ]
    );
    let its = &run.step("disable").unwrap().iterations;
    let error = |i: usize| its[i].error.clone().unwrap_or_default();
    assert!(error(1).contains("never-touch"), "{}", error(1));
    assert!(error(2).contains("never-touch"), "{}", error(2));
    assert!(
        error(5).contains("rate cap of `entra.disable_user` (3 per 1h) is reached"),
        "{}",
        error(5)
    );
    // Refusals are not retried.
    assert_eq!(its[5].attempt, 1);
}

#[tokio::test]
async fn the_kill_switch_starts_nothing_and_stops_what_runs() {
    let v = entra().await;
    let r = riposte(&v).await;
    let rule = Rule::parse(
        "id: disable-on-guardduty\nname: Disable\norder: 1\ntrigger: alert\ncondition: alert.source == 'guardduty'\nplaybooks: [disable-users]\n",
        None,
    )
    .unwrap();
    r.local.service.put_rule(rule, "carl").await.unwrap();

    // Operators may read it; only contributors may throw it.
    let (s, _) = r
        .call(
            "PUT",
            "/kill-switch",
            Some(OPERATOR_KEY),
            Some(json!({"on": true})),
        )
        .await;
    assert_eq!(s, 403);
    let (s, v1) = r
        .call(
            "PUT",
            "/kill-switch",
            Some(CONTRIBUTOR_KEY),
            Some(json!({"on": true, "reason": "bad rule firing"})),
        )
        .await;
    assert_eq!(s, 200, "{v1}");
    let (s, state) = r
        .call("GET", "/kill-switch", Some(OPERATOR_KEY), None)
        .await;
    assert_eq!((s, &state["on"]), (200, &json!(true)), "{state}");

    // A matching alert starts nothing, and says why.
    let (s, out) = r
        .call(
            "POST",
            "/events",
            Some(OPERATOR_KEY),
            Some(event("guardduty-malicious-ip-caller.json")),
        )
        .await;
    assert_eq!(s, 202, "{out}");
    let alert = &out["alerts"][0];
    assert_eq!(alert["runs"], json!([]), "{out}");
    assert!(
        alert["refused"]
            .as_str()
            .unwrap()
            .contains("kill switch is on (by carl: bad rule firing)"),
        "{out}"
    );

    // Off again: the same alert starts its run.
    r.call(
        "PUT",
        "/kill-switch",
        Some(CONTRIBUTOR_KEY),
        Some(json!({"on": false})),
    )
    .await;
    let (_, out) = r
        .call(
            "POST",
            "/events",
            Some(OPERATOR_KEY),
            Some(event("guardduty-malicious-ip-caller.json")),
        )
        .await;
    assert_eq!(
        out["alerts"][0]["runs"].as_array().unwrap().len(),
        1,
        "{out}"
    );

    // The switch is recorded in the audit trail.
    let (_, audit) = r.call("GET", "/audit", Some(CONTRIBUTOR_KEY), None).await;
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(actions.contains(&"kill_switch.on") && actions.contains(&"kill_switch.off"));
}

#[tokio::test]
async fn a_running_automatic_run_stops_at_its_next_step() {
    let v = entra().await;
    let r = riposte(&v).await;
    // Started by a rule, waiting for a human before it disables anyone.
    let waiting = r#"
id: ask-then-disable
name: Ask, then disable
steps:
  - id: ask
    approval: { message: Disable?, choices: [yes, no], expires_in: 1h }
  - id: disable
    needs: [ask]
    action: entra.disable_user
    with: { user: alice@example.com }
"#;
    let spec = spec_from_value(serde_yaml_ng::from_str(waiting).unwrap(), None).unwrap();
    r.local.service.put_playbook(spec, "carl").await.unwrap();
    let rule = Rule::parse(
        "id: ask-on-guardduty\nname: Ask\norder: 1\ntrigger: alert\ncondition: alert.source == 'guardduty'\nplaybooks: [ask-then-disable]\n",
        None,
    )
    .unwrap();
    r.local.service.put_rule(rule, "carl").await.unwrap();
    let (_, out) = r
        .call(
            "POST",
            "/events",
            Some(OPERATOR_KEY),
            Some(event("guardduty-malicious-ip-caller.json")),
        )
        .await;
    let id = out["alerts"][0]["runs"][0].as_str().unwrap().to_string();
    r.wait_run(&id, "waiting", |run| run.status == RunStatus::Waiting)
        .await;

    r.local
        .service
        .set_kill_switch(true, "incident review", "carl")
        .await
        .unwrap();
    // Someone answers yes: the decision is recorded, but the disable step never runs.
    r.local
        .service
        .decide_as(&id, "ask", 0, "yes", "olivia")
        .await
        .unwrap();
    let run = r
        .wait_run(&id, "stopped", |run| run.status.is_terminal())
        .await;
    assert_eq!(run.status, RunStatus::Cancelled);
    assert!(
        run.error.as_deref().unwrap_or("").contains("kill switch"),
        "{:?}",
        run.error
    );
    assert!(disabled(&v).is_empty());
}
