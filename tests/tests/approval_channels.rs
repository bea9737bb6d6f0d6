//! One approval sent to Slack (buttons) and Teams (link card) at once: a Slack button press is
//! verified by the signing secret and decides as the Slack user; the first valid answer wins on
//! every channel; afterwards each channel is told who decided and when.

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{KeyInit, Mac};
use serde_json::{Value, json};

use riposte_core::playbook::spec_from_value;
use riposte_core::run::{RunStatus, StepStatus};
use riposte_tests::{Riposte, SLACK_SIGNING_SECRET, Vendor};

const PLAYBOOK: &str = r#"
id: contain-host
name: Contain a host, if a human agrees
steps:
  - id: ask
    approval:
      message: "Isolate ${{ alert.title }}?"
      choices: [isolate, ignore]
      default: ignore
      expires_in: 1h
      approvers: [slack:U0SECADMIN, alice@example.com]
      notify:
        - action: slack.ask
          with:
            channel: C0SOCALERTS
            text: "Isolate ${{ alert.title }}?"
            buttons: "${{ approval.buttons }}"
          on_decided:
            action: slack.update_message
            with:
              channel: "${{ sent.channel }}"
              ts: "${{ sent.ts }}"
              text: "${{ decision.choice }} by ${{ decision.by }} at ${{ decision.at_text }}"
        - action: teams.post_card
          with:
            title: "Isolate ${{ alert.title }}?"
            text: Answer in Slack or here.
            links: "${{ approval.links }}"
          on_decided:
            action: teams.post_card
            with:
              title: "Decided: ${{ decision.choice }}"
              text: "by ${{ decision.by }} at ${{ decision.at_text }}"
  - id: after
    needs: [ask]
    set: { decided: "${{ steps.ask.output.choice }}" }
"#;

fn connections(slack: &Vendor, teams: &Vendor) -> String {
    format!(
        r#"connections:
  slack:
    base_url: {}
    auth: {{ type: bearer, token: {{ secret: slack-bot-token }} }}
  teams:
    base_url: {}/workflows/abc/triggers/manual/paths
    auth: {{ type: api_key, query: sig, key: {{ secret: teams-sig }} }}
"#,
        slack.url, teams.url
    )
}

fn signed(body: &str, ts: u64, secret: &str) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("v0:{ts}:{body}").as_bytes());
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

fn press_body(user: &str, choice: &str, token: &str) -> String {
    let payload = json!({
        "type": "block_actions",
        "user": {"id": user, "username": "someone"},
        "channel": {"id": "C0SOCALERTS"},
        "actions": [{"type": "button", "action_id": format!("riposte_approval_{choice}"), "value": token}]
    });
    url::form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", &payload.to_string())
        .finish()
}

async fn post_interaction(r: &Riposte, body: &str, ts: u64, signature: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/slack/interactions", r.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-slack-request-timestamp", ts.to_string())
        .header("x-slack-signature", signature)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn a_slack_press_decides_once_for_every_channel_and_each_channel_is_told() {
    let slack = Vendor::start("slack", |r| match r.path.as_str() {
        "/api/chat.postMessage" => (
            200,
            json!({"ok": true, "channel": "C0SOCALERTS", "ts": "1767225600.000100"}),
        ),
        _ => (
            200,
            json!({"ok": true, "channel": "C0SOCALERTS", "ts": "1767225600.000100"}),
        ),
    })
    .await;
    let teams = Vendor::start("teams", |_| (202, Value::Null)).await;
    let r = Riposte::start_with_secrets(
        &connections(&slack, &teams),
        &[
            ("slack-bot-token", "slack-test-token"),
            ("teams-sig", "teams-test-sig"),
        ],
    )
    .await;
    let spec = spec_from_value(serde_yaml_ng::from_str(PLAYBOOK).unwrap(), None).unwrap();
    r.local
        .service
        .put_playbook(spec, "carl")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let run = r
        .local
        .service
        .start_run(
            "contain-host",
            json!({"alert": {"title": "i-0abc"}}),
            "olivia",
        )
        .await
        .unwrap();
    r.wait_run(&run.id, "waiting", |run| run.status == RunStatus::Waiting)
        .await;

    // Both channels got the question; Slack's buttons carry the signed tokens, Teams' the links.
    let ask = slack.requests()[0].json();
    let buttons = ask["blocks"][1]["elements"].as_array().unwrap().clone();
    let token = |choice: &str| {
        buttons
            .iter()
            .find(|b| b["action_id"] == format!("riposte_approval_{choice}"))
            .unwrap()["value"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let card = teams.requests()[0].json();
    let actions = &card["attachments"][0]["content"]["actions"];
    assert_eq!(actions.as_array().unwrap().len(), 2, "{card}");
    let ignore_link = actions
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["title"] == "ignore")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(ignore_link.ends_with(&token("ignore")), "{ignore_link}");

    // A forged signature, a stale timestamp and an unsigned press decide nothing.
    let body = press_body("U0SECADMIN", "isolate", &token("isolate"));
    let ts = now_secs();
    let (s, v) = post_interaction(&r, &body, ts, &signed(&body, ts, "not-the-secret")).await;
    assert_eq!(s, 401, "{v}");
    let old = ts - 301;
    let (s, v) = post_interaction(&r, &body, old, &signed(&body, old, SLACK_SIGNING_SECRET)).await;
    assert_eq!(s, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("300 seconds"), "{v}");
    // A Slack user who is not an approver is refused.
    let intruder = press_body("U0INTRUDER", "isolate", &token("isolate"));
    let (s, v) = post_interaction(
        &r,
        &intruder,
        ts,
        &signed(&intruder, ts, SLACK_SIGNING_SECRET),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["results"][0]["status"], 403, "{v}");
    let waiting = r.local.service.load(&run.id).await.unwrap().0;
    assert_eq!(waiting.step("ask").unwrap().status, StepStatus::Waiting);

    // The approver's press decides.
    let sig = signed(&body, ts, SLACK_SIGNING_SECRET);
    let (s, v) = post_interaction(&r, &body, ts, &sig).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["results"][0]["decided"], "isolate", "{v}");
    let done = r.succeeded(&run.id).await;
    let decided = done.step("ask").unwrap().iterations[0]
        .output
        .clone()
        .unwrap();
    assert_eq!(decided["decided_by"], "slack:U0SECADMIN");
    assert_eq!(
        done.step("after").unwrap().iterations[0].output,
        Some(json!({"decided": "isolate"}))
    );

    // The same press replayed is refused; the Teams link for the other choice is too late.
    let (s, v) = post_interaction(&r, &body, ts, &sig).await;
    assert_eq!(s, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("replayed"), "{v}");
    let late = reqwest::Client::new()
        .post(&ignore_link)
        .send()
        .await
        .unwrap();
    assert_eq!(late.status().as_u16(), 409);

    // Each channel is told who decided: Slack's question is updated in place, Teams gets a card.
    for _ in 0..500 {
        if slack.requests().len() >= 2 && teams.requests().len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let update = &slack.requests()[1];
    assert_eq!(update.path, "/api/chat.update");
    assert_eq!(
        update.header("authorization"),
        Some("Bearer slack-test-token")
    );
    let u = update.json();
    assert_eq!(u["channel"], "C0SOCALERTS");
    assert_eq!(u["ts"], "1767225600.000100");
    let text = u["text"].as_str().unwrap();
    assert!(
        text.starts_with("isolate by slack:U0SECADMIN at 20"),
        "{text}"
    );
    let told = teams.requests()[1].json();
    let body = &told["attachments"][0]["content"]["body"];
    assert_eq!(body[0]["text"], "Decided: isolate", "{told}");
    assert!(
        body[1]["text"]
            .as_str()
            .unwrap()
            .starts_with("by slack:U0SECADMIN at "),
        "{told}"
    );
    assert_eq!(slack.requests().len(), 2, "nothing else was sent to Slack");
    assert_eq!(teams.requests().len(), 2, "nothing else was sent to Teams");
}
