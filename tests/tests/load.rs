//! A bounded burst: 10,000 distinct GuardDuty findings posted over loopback as fast as 32
//! senders can, then every one of them delivered again. Nothing is lost (every finding's run
//! succeeds) and nothing is duplicated (one run per finding, one side effect per run).
//! Throughput and memory are measured by `cargo bench -p riposte --bench serve`, not here.

use std::sync::Arc;

use serde_json::{Value, json};

use riposte_core::playbook::spec_from_value;
use riposte_core::rule::Rule;
use riposte_core::run::RunStatus;
use riposte_tests::{OPERATOR_KEY, Riposte, Vendor, event};

const FINDINGS: usize = 10_000;
const SENDERS: usize = 32;

const PLAYBOOK: &str = r#"
id: tag-ip
name: Tag the remote IP
steps:
  - id: tag
    action: http.request
    with: { connection: fw, method: POST, path: /tag, json: { ip: "${{ alert.entities.remote_ips[0] }}", finding: "${{ alert.id }}" } }
"#;

fn finding(i: usize) -> Value {
    let mut e = event("guardduty-malicious-ip-caller.json");
    e["id"] = json!(format!("burst-event-{i}"));
    e["detail"]["id"] = json!(format!("burst-finding-{i}"));
    e
}

async fn post_all(r: &Riposte, rounds: &str) {
    let http = reqwest::Client::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        let (http, next, url) = (http.clone(), next.clone(), format!("{}/events", r.url));
        senders.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= FINDINGS {
                    return;
                }
                let resp = http
                    .post(&url)
                    .bearer_auth(OPERATOR_KEY)
                    .json(&finding(i))
                    .send()
                    .await
                    .unwrap();
                assert!(resp.status().is_success(), "finding {i}: {}", resp.status());
            }
        }));
    }
    for s in senders {
        s.await.unwrap_or_else(|e| panic!("{rounds}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_10000_findings_loses_nothing_and_duplicates_nothing() {
    let fw = Vendor::start("fw", |_| (200, json!({"ok": true}))).await;
    let r = Riposte::start_with_secrets(
        &format!("connections:\n  fw:\n    base_url: {}\n", fw.url),
        &[],
    )
    .await;
    let spec = spec_from_value(serde_yaml_ng::from_str(PLAYBOOK).unwrap(), None).unwrap();
    r.local.service.put_playbook(spec, "carl").await.unwrap();
    let rule = Rule::parse(
        "id: burst\nname: Burst\norder: 1\ntrigger: alert\ncondition: alert.source == 'guardduty'\nplaybooks: [tag-ip]\n",
        None,
    )
    .unwrap();
    r.local.service.put_rule(rule, "carl").await.unwrap();

    post_all(&r, "first delivery").await;
    // EventBridge delivers at least once: the whole burst again.
    post_all(&r, "redelivery").await;

    // Every finding's run finishes (bounded wait: 10 minutes at most).
    let store = &r.local.store;
    let mut succeeded = 0;
    for _ in 0..6_000 {
        succeeded = riposte_core::store::Store::list_runs(
            store.as_ref(),
            FINDINGS * 2,
            Some(RunStatus::Succeeded),
        )
        .await
        .unwrap()
        .len();
        if succeeded >= FINDINGS {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(succeeded, FINDINGS, "every finding's run succeeds");
    let all = riposte_core::store::Store::list_runs(store.as_ref(), FINDINGS * 2, None)
        .await
        .unwrap();
    assert_eq!(
        all.len(),
        FINDINGS,
        "one run per finding, redelivery included"
    );

    // One side effect per finding: each finding tagged exactly once.
    let mut tagged: Vec<String> = fw
        .requests()
        .iter()
        .map(|q| q.json()["finding"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(tagged.len(), FINDINGS, "one call per run");
    tagged.sort();
    tagged.dedup();
    assert_eq!(tagged.len(), FINDINGS, "no finding tagged twice");
}
