//! Canary secrets: every credential of a whole Block run (and of calls to a vendor that echoes
//! what it receives, in a success and in an error) is a unique marker; afterwards the marker
//! appears nowhere anyone could read it: logs, run history, errors, event records, approval pages,
//! dry-run output.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use riposte_core::playbook::spec_from_value;
use riposte_tests::vendors::{connections, vendors};
use riposte_tests::{OPERATOR_KEY, Riposte, Vendor, event, repo, riposte_bin};

const CANARIES: &[(&str, &str)] = &[
    ("servicenow-password", "CANARY-sn-4b1e9d"),
    ("slack-bot-token", "CANARY-slack-0c7a52"),
    ("panos-api-key", "CANARY-panos-93d1fe"),
    ("entra-client-secret", "CANARY-entra-6a2c08"),
    ("echo-token", "CANARY-echo-d5f317"),
];

/// Everything the process logs, at debug level.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const ECHO: &str = r#"
id: echo
name: Call a careless vendor
steps:
  - id: ok
    action: http.request
    with: { connection: echo, method: POST, path: /ok, json: { hello: world } }
  - id: fails
    needs: [ok]
    action: http.request
    retry: { max_attempts: 2, delay: 1s }
    with: { connection: echo, method: POST, path: /fail }
"#;

fn assert_clean(what: &str, text: &str) {
    for (name, canary) in CANARIES {
        assert!(
            !text.contains(canary),
            "{what} shows the secret `{name}`:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_ever_shown() {
    let logs = Logs::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .init();

    // A vendor that echoes the credentials it receives, in the body and a header.
    let echo = Vendor::start("echo", |r| {
        let auth = r.header("authorization").unwrap_or("").to_string();
        let status = if r.path == "/fail" { 500 } else { 200 };
        (status, json!({"you_sent": auth, "headers": r.headers}))
    })
    .await;
    let v = vendors().await;
    let conns = format!(
        "{}  echo:\n    base_url: {}\n    auth: {{ type: bearer, token: {{ secret: echo-token }} }}\n",
        connections(&v),
        echo.url
    );
    let r = Riposte::start(&conns, CANARIES).await;

    // The whole Block flow, answered through the approval page.
    let (status, out) = r
        .call(
            "POST",
            "/events",
            Some(OPERATOR_KEY),
            Some(event("guardduty-malicious-ip-caller.json")),
        )
        .await;
    assert!(status < 300, "{out}");
    let run_id = out["alerts"][0]["runs"][0].as_str().unwrap().to_string();
    r.wait_run(&run_id, "waiting", |run| {
        run.status == riposte_core::run::RunStatus::Waiting
    })
    .await;
    let mail = v.email.requests()[0].json();
    let text = mail["Content"]["Simple"]["Body"]["Text"]["Data"]
        .as_str()
        .unwrap()
        .to_string();
    let link = text
        .lines()
        .find_map(|l| l.strip_prefix("Block: "))
        .unwrap()
        .to_string();
    let http = reqwest::Client::new();
    let page = http.get(&link).send().await.unwrap().text().await.unwrap();
    let decided = http
        .post(&link)
        .form(&[("approver", "netadmin@example.com")])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    r.succeeded(&run_id).await;

    // The careless vendor: its echo lands in a step's output and in a step's error.
    let spec = spec_from_value(serde_yaml_ng::from_str(ECHO).unwrap(), None).unwrap();
    r.local.service.put_playbook(spec, "carl").await.unwrap();
    let echo_run = r
        .local
        .service
        .start_run("echo", json!({}), "olivia")
        .await
        .unwrap();
    let failed = r
        .wait_run(&echo_run.id, "finished", |run| run.status.is_terminal())
        .await;
    assert_eq!(failed.status, riposte_core::run::RunStatus::Failed);
    // The vendor did receive the secret: the canary is live.
    assert_eq!(
        echo.requests()[0].header("authorization"),
        Some("Bearer CANARY-echo-d5f317")
    );

    // Everything a person can read afterwards.
    let mut shown = vec![
        ("the approval page", page),
        ("the decision page", decided),
        ("the ingest answer", out.to_string()),
    ];
    for id in [&run_id, &echo_run.id] {
        let (_, run) = r
            .call("GET", &format!("/runs/{id}"), Some(OPERATOR_KEY), None)
            .await;
        shown.push(("a run's history", run.to_string()));
    }
    let (_, runs) = r.call("GET", "/runs", Some(OPERATOR_KEY), None).await;
    shown.push(("the run list", runs.to_string()));
    let event_id = out["event_id"].as_str().unwrap();
    let (_, record) = r
        .call(
            "GET",
            &format!("/events/{event_id}"),
            Some(OPERATOR_KEY),
            None,
        )
        .await;
    shown.push(("the event record", record.to_string()));
    shown.push(("the step error", failed.error.clone().unwrap_or_default()));
    let output = failed.step("ok").unwrap().iterations[0]
        .output
        .clone()
        .unwrap_or(Value::Null);
    assert!(output.to_string().contains("[REDACTED]"), "{output}");
    shown.push(("a step output", output.to_string()));

    // A dry run with the secrets in the environment prints their names only.
    let dry = std::process::Command::new(riposte_bin())
        .current_dir(repo())
        .args([
            "test",
            "infra/playbooks/block-or-ignore-malicious-ip.yaml",
            "--event",
            "events/guardduty-malicious-ip-caller.json",
            "--responses",
            "events/responses/block-or-ignore.json",
            "--choice",
            "block",
        ])
        .envs(CANARIES.iter().map(|(name, value)| {
            (
                format!("RIPOSTE_SECRET_{}", name.to_uppercase().replace('-', "_")),
                *value,
            )
        }))
        .output()
        .unwrap();
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    shown.push((
        "dry-run output",
        String::from_utf8_lossy(&dry.stdout).into(),
    ));
    shown.push((
        "dry-run errors",
        String::from_utf8_lossy(&dry.stderr).into(),
    ));

    let logged = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        logged.contains("Approval answered"),
        "the logs were captured"
    );
    shown.push(("the logs", logged));
    for (what, text) in &shown {
        assert_clean(what, text);
    }
}
