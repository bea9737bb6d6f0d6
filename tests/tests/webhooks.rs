//! An EDR posts alerts to `POST /webhooks/edr`, signed with the webhook's shared secret: a
//! signed alert starts the rule's playbook; an unsigned, forged, stale or replayed one is refused
//! and ingests nothing.

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{KeyInit, Mac};
use serde_json::{Value, json};

use riposte_core::playbook::spec_from_value;
use riposte_core::rule::Rule;
use riposte_core::run::RunStatus;
use riposte_tests::{Riposte, WEBHOOK_SECRET};

fn sign(secret: &str, ts: u64, body: &str) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{ts}.{body}").as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn post(r: &Riposte, name: &str, body: &str, ts: u64, sig: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/webhooks/{name}", r.url))
        .header("content-type", "application/json")
        .header("x-riposte-timestamp", ts.to_string())
        .body(body.to_string());
    if let Some(sig) = sig {
        req = req.header("x-riposte-signature", sig);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_signed_edr_alert_starts_its_playbook_and_nothing_else_gets_in() {
    let r = Riposte::start_with_secrets("connections: {}\n", &[]).await;
    let spec = spec_from_value(
        serde_yaml_ng::from_str(
            "id: note\nname: Note\nsteps:\n  - id: s\n    set: { host: \"${{ alert.entities.hosts[0] }}\", title: \"${{ alert.title }}\" }\n",
        )
        .unwrap(),
        None,
    )
    .unwrap();
    r.local.service.put_playbook(spec, "carl").await.unwrap();
    let rule = Rule::parse(
        "id: edr-critical\nname: EDR critical\norder: 1\ntrigger: alert\ncondition: alert.source == 'webhook.edr' && alert.severity == 'Critical'\nplaybooks: [note]\n",
        None,
    )
    .unwrap();
    r.local.service.put_rule(rule, "carl").await.unwrap();

    let alert = json!({
        "id": "edr-4711",
        "title": "Ransomware behaviour on HOST-7 ${{ 1 + 1 }}",
        "severity": "Critical",
        "entities": {"hosts": ["HOST-7"], "remote_ips": ["198.51.100.23"], "users": ["alice"]}
    })
    .to_string();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();

    // Unsigned, forged, stale: 401, and nothing is ingested.
    for (ts, sig) in [
        (now, None),
        (now, Some(sign("not-the-secret", now, &alert))),
        (now - 301, Some(sign(WEBHOOK_SECRET, now - 301, &alert))),
        (
            now,
            Some(sign(WEBHOOK_SECRET, now, "{\"other\": \"body\"}")),
        ),
    ] {
        let (s, v) = post(&r, "edr", &alert, ts, sig.as_deref()).await;
        assert_eq!(s, 401, "{v}");
    }
    let (s, _) = post(
        &r,
        "siem",
        &alert,
        now,
        Some(&sign(WEBHOOK_SECRET, now, &alert)),
    )
    .await;
    assert_eq!(s, 404, "an undeclared webhook");
    let (_, runs) = r
        .call("GET", "/runs", Some(riposte_tests::OPERATOR_KEY), None)
        .await;
    assert_eq!(runs.as_array().map(Vec::len), Some(0), "{runs}");

    // Signed: the rule matches and the playbook runs, with the alert's text as data.
    let sig = sign(WEBHOOK_SECRET, now, &alert);
    let (s, out) = post(&r, "edr", &alert, now, Some(&sig)).await;
    assert_eq!(s, 202, "{out}");
    assert_eq!(out["alerts"][0]["alert_id"], "edr/edr-4711");
    let run_id = out["alerts"][0]["runs"][0].as_str().unwrap().to_string();
    let run = r.succeeded(&run_id).await;
    assert_eq!(
        run.step("s").unwrap().iterations[0].output,
        Some(json!({"host": "HOST-7", "title": "Ransomware behaviour on HOST-7 ${{ 1 + 1 }}"}))
    );

    // The sample in events/ (what the README describes) is accepted as it is.
    let sample =
        std::fs::read_to_string(riposte_tests::repo().join("events/webhook-edr-alert.json"))
            .unwrap();
    let (s, out) = post(
        &r,
        "edr",
        &sample,
        now,
        Some(&sign(WEBHOOK_SECRET, now, &sample)),
    )
    .await;
    assert_eq!(s, 202, "{out}");
    assert_eq!(out["alerts"][0]["alert_id"], "edr/edr-0001");
    let sample_run = out["alerts"][0]["runs"][0].as_str().unwrap().to_string();
    assert_eq!(
        r.succeeded(&sample_run).await.step("s").unwrap().iterations[0].output,
        Some(json!({"host": "HOST-7", "title": "Ransomware behaviour on HOST-7"}))
    );

    // Replayed: refused; the run is not started twice.
    let (s, v) = post(&r, "edr", &alert, now, Some(&sig)).await;
    assert_eq!(s, 401, "{v}");

    // A signed but malformed alert names what is wrong.
    let bad = json!({"id": "edr-4712", "severity": "Catastrophic", "title": "x"}).to_string();
    let (s, v) = post(&r, "edr", &bad, now, Some(&sign(WEBHOOK_SECRET, now, &bad))).await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("detail.severity"),
        "{v}"
    );
    let waiting = r.local.service.load(&run_id).await.unwrap().0;
    assert_eq!(waiting.status, RunStatus::Succeeded);
}
