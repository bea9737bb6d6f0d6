//! Each Lambda function binary, run by cargo lambda's local emulator (`cargo lambda watch`) against
//! the AWS API emulator (moto) and the vendor stand-ins, answers its sample event: the real
//! `main.rs`, `from_env()` and lambda_runtime / lambda_http wiring, not just the handlers.
//!
//! Needs `cargo-lambda` (`pip install cargo-lambda`; `scripts/lambda-check.sh` installs it). The
//! emulator builds each function (debug) on its first invocation: minutes on a cold target
//! directory, seconds on a warm one.

use std::fs::File;
use std::io::Read;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::MessageSystemAttributeName;
use serde_json::{Value, json};

use riposte_aws::{AwsConfig, DynamoStore};
use riposte_core::connector::Connections;
use riposte_core::store::Store;
use riposte_tests::moto::Moto;
use riposte_tests::vendors::{SECRETS, connections, vendors};
use riposte_tests::{OffsetClock, event, repo, secrets_from, sender, test_connections};

const APPROVAL_KEY: &str = "test-approval-key-0123456789abcdef";
const PUBLIC_URL: &str = "https://riposte.example.com";
const SECRET_PREFIX: &str = "riposte/";
/// The first invocation builds the workspace's function binaries if the target directory is cold.
const FIRST_CALL: Duration = Duration::from_secs(420);
/// Any other function's first invocation builds only that binary.
const LATER_CALL: Duration = Duration::from_secs(180);

/// `cargo lambda watch` in its own process group; on drop, that group and the groups of the
/// functions it started are stopped.
struct Emulator {
    child: Child,
    url: String,
    log: tempfile::NamedTempFile,
}

impl Emulator {
    fn start(env: &[(String, String)]) -> Emulator {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = Command::new("cargo");
        cmd.args(["lambda", "watch", "--ignore-changes", "-A", "127.0.0.1"])
            .args(["-P", &port.to_string()])
            .current_dir(repo())
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .process_group(0);
        // The functions inherit the emulator's environment (multi-line values included, which
        // `--env-var` would split at commas), less the variables cargo sets for this test.
        for (k, _) in std::env::vars() {
            if k.starts_with("CARGO_PKG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                ]
                .contains(&k.as_str())
            {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start `cargo lambda watch` ({e}): pip install cargo-lambda")
        });
        let emulator = Emulator {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "cargo lambda watch did not listen on 127.0.0.1:{port}:\n{}",
                emulator.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        emulator
    }

    /// The last lines the emulator (and the functions it runs) printed.
    fn log_tail(&self) -> String {
        let mut text = String::new();
        let _ = File::open(self.log.path()).and_then(|mut f| f.read_to_string(&mut text));
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Invokes a function as `cargo lambda invoke` does, through the emulator's Lambda API.
    async fn invoke(
        &self,
        http: &reqwest::Client,
        name: &str,
        payload: &Value,
        wait: Duration,
    ) -> Value {
        let url = format!("{}/2015-03-31/functions/{name}/invocations", self.url);
        let resp = http
            .post(url)
            .json(payload)
            .timeout(wait)
            .send()
            .await
            .unwrap_or_else(|e| panic!("invoking {name}: {e}\n{}", self.log_tail()));
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        assert!(
            status.is_success() && body.get("errorType").is_none(),
            "{name} answered {status}: {body}\n{}",
            self.log_tail()
        );
        body
    }

    /// A request to a function's URL (the lambda_http path).
    async fn url_get(
        &self,
        http: &reqwest::Client,
        name: &str,
        path: &str,
        wait: Duration,
    ) -> (u16, String) {
        let resp = http
            .get(format!("{}/lambda-url/{name}{path}", self.url))
            .timeout(wait)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} on {name}: {e}\n{}", self.log_tail()));
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        // cargo lambda starts each function (`cargo run`) in a process group of its own: note
        // them first. Stop politely, so it stops its functions itself; then make certain.
        let groups = descendant_groups(self.child.id());
        signal_group(self.child.id(), "-TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        signal_group(self.child.id(), "-KILL");
        for g in groups {
            signal_group(g, "-KILL");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal_group(pgid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// (ppid, process group) of a process, from `/proc/PID/stat`.
fn parent_and_group(pid: &str) -> Option<(u32, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some((fields.get(1)?.parse().ok()?, fields.get(2)?.parse().ok()?))
}

/// The process groups of `root`'s descendants, never this test's own group.
fn descendant_groups(root: u32) -> Vec<u32> {
    let procs: Vec<(u32, u32, u32)> = std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let pid = name.parse().ok()?;
                    let (ppid, pgid) = parent_and_group(&name)?;
                    Some((pid, ppid, pgid))
                })
                .collect()
        })
        .unwrap_or_default();
    let own = parent_and_group("self").map(|(_, g)| g);
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() && tree.len() < 10_000 {
        let parent = tree[i];
        tree.extend(procs.iter().filter(|p| p.1 == parent).map(|p| p.0));
        i += 1;
    }
    let mut groups: Vec<u32> = procs
        .iter()
        .filter(|p| tree[1..].contains(&p.0) && Some(p.2) != own && p.2 != root && p.2 > 1)
        .map(|p| p.2)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    groups
}

/// Fails (never skips) when cargo lambda is missing.
fn require_cargo_lambda() {
    let out = Command::new("cargo")
        .args(["lambda", "--version"])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "`cargo lambda --version` failed ({}): {}\ninstall it: pip install cargo-lambda (scripts/lambda-check.sh does)",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!(
            "`cargo lambda --version` could not run ({e})\ninstall it: pip install cargo-lambda (scripts/lambda-check.sh does)"
        ),
    }
}

/// Creates a Secrets Manager secret in moto (its JSON protocol; moto does not check signatures).
async fn create_secret(http: &reqwest::Client, endpoint: &str, name: &str, value: &str) {
    let resp = http
        .post(format!("{endpoint}/"))
        .header("x-amz-target", "secretsmanager.CreateSecret")
        .header("content-type", "application/x-amz-json-1.1")
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=testing/20240514/us-east-1/secretsmanager/aws4_request, \
             SignedHeaders=host, Signature=0",
        )
        .body(json!({"Name": name, "SecretString": value}).to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    assert!(
        status.is_success(),
        "CreateSecret {name}: {status} {}",
        resp.text().await.unwrap_or_default()
    );
}

/// An SQS event as Lambda's event source mapping delivers one received message.
fn sqs_event(m: &aws_sdk_sqs::types::Message) -> Value {
    let attr = |name: MessageSystemAttributeName, default: &str| -> String {
        m.attributes
            .as_ref()
            .and_then(|a| a.get(&name))
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    json!({"Records": [{
        "messageId": m.message_id,
        "receiptHandle": m.receipt_handle,
        "body": m.body,
        "attributes": {
            "ApproximateReceiveCount": attr(MessageSystemAttributeName::ApproximateReceiveCount, "1"),
            "SentTimestamp": attr(MessageSystemAttributeName::SentTimestamp, "0"),
            "SenderId": attr(MessageSystemAttributeName::SenderId, "AIDAIENQZJOLO23YVJ4VO"),
            "ApproximateFirstReceiveTimestamp": attr(MessageSystemAttributeName::ApproximateFirstReceiveTimestamp, "0"),
        },
        "messageAttributes": {},
        "md5OfBody": m.md5_of_body,
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:riposte-steps",
        "awsRegion": "us-east-1",
    }]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_function_binary_answers_its_sample_under_cargo_lambda_watch() {
    require_cargo_lambda();

    // The AWS side: table, queue, and the shipped rules and playbooks, seeded as a deploy would.
    let v = vendors().await;
    let moto = Moto::start().await;
    let sdk = moto.sdk().await;
    let dynamo = aws_sdk_dynamodb::Client::new(&sdk);
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    riposte_aws::create_table(&dynamo, "riposte").await.unwrap();
    let queue = sqs
        .create_queue()
        .queue_name("riposte-steps")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let store = Arc::new(DynamoStore::new(
        dynamo,
        sqs.clone(),
        AwsConfig {
            table: "riposte".into(),
            queue_url: queue.clone(),
            retention_days: 90,
        },
        Arc::new(OffsetClock::default()),
    ));
    let service = riposte_lambda::service_with(
        store.clone(),
        APPROVAL_KEY,
        test_connections(Connections::parse(&connections(&v), None).unwrap()),
        riposte_core::connector::ConnectorCatalog::shipped(),
        PUBLIC_URL.into(),
        sender(secrets_from(SECRETS)),
        Arc::new(OffsetClock::default()),
    )
    .unwrap();
    let (playbooks, rules) = riposte::runtime::read_infra(&repo().join("infra")).unwrap();
    for (_, p) in playbooks {
        service.put_playbook(p, "deploy").await.unwrap();
    }
    for (_, r) in rules {
        service.put_rule(r, "deploy").await.unwrap();
    }

    // The functions' environment, as template.yaml gives it on AWS (vendors on 127.0.0.1, so
    // private egress is allowed).
    let env: Vec<(String, String)> = [
        ("AWS_ENDPOINT_URL", moto.endpoint.as_str()),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("RIPOSTE_TABLE", "riposte"),
        ("RIPOSTE_QUEUE_URL", queue.as_str()),
        ("RIPOSTE_APPROVAL_KEY", APPROVAL_KEY),
        ("RIPOSTE_CONNECTIONS", connections(&v).as_str()),
        ("RIPOSTE_PUBLIC_URL", PUBLIC_URL),
        ("RIPOSTE_ALLOW_PRIVATE_EGRESS", "true"),
        ("RIPOSTE_SECRET_PREFIX", SECRET_PREFIX),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    // The connection secrets, in Secrets Manager under the deployment's prefix.
    let http = reqwest::Client::new();
    for (name, value) in SECRETS {
        create_secret(
            &http,
            &moto.endpoint,
            &format!("{SECRET_PREFIX}{name}"),
            value,
        )
        .await;
    }
    let emu = Emulator::start(&env);

    // alert-created: the GuardDuty finding starts the Block/Ignore run.
    let out = emu
        .invoke(
            &http,
            "alert-created",
            &event("guardduty-malicious-ip-caller.json"),
            FIRST_CALL,
        )
        .await;
    let runs = out["alerts"][0]["runs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(runs.len(), 1, "one run started: {out}");
    let run_id = runs[0].as_str().unwrap();
    assert!(
        store.load_run(run_id).await.unwrap().is_some(),
        "run {run_id} is in the table"
    );

    // recommendation-created: the Config rule change is evaluated against the rules.
    let out = emu
        .invoke(
            &http,
            "recommendation-created",
            &event("config-compliance-change.json"),
            LATER_CALL,
        )
        .await;
    let alert = &out["alerts"][0];
    assert_eq!(alert["kind"], "recommendation", "{out}");
    let lines = alert["evaluation"]["lines"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // Every rule has its line; the recommendation rule's verdict decides whether a run started
    // (this sample's severity is below its High/Critical condition).
    let verdict = lines
        .iter()
        .find(|l| l["rule_id"] == "recommendation-ticket")
        .map(|l| l["verdict"]["outcome"].clone())
        .unwrap_or_else(|| panic!("no evaluation line for recommendation-ticket: {out}"));
    assert!(
        verdict == "matched" || verdict == "condition_false",
        "{out}"
    );
    let expected_runs = usize::from(verdict == "matched");
    assert_eq!(
        alert["runs"].as_array().map(Vec::len),
        Some(expected_runs),
        "{out}"
    );

    // step-worker: one step message, received from the queue as the event source mapping does.
    let mut message = None;
    for _ in 0..10 {
        let got = sqs
            .receive_message()
            .queue_url(&queue)
            .max_number_of_messages(1)
            .wait_time_seconds(1)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .unwrap();
        if let Some(m) = got.messages.unwrap_or_default().into_iter().next() {
            message = Some(m);
            break;
        }
    }
    let message = message.expect("a step message on the queue");
    let step: Value = serde_json::from_str(message.body.as_deref().unwrap_or_default()).unwrap();
    let out = emu
        .invoke(&http, "step-worker", &sqs_event(&message), LATER_CALL)
        .await;
    assert_eq!(out, json!({"batchItemFailures": []}));
    assert_eq!(
        v.servicenow.requests().len(),
        1,
        "the step (open_ticket, the first of both playbooks) called ServiceNow once"
    );
    // With the password from Secrets Manager, correlated by the step's idempotency key.
    let open = &v.servicenow.requests()[0];
    assert_eq!(
        (open.method.as_str(), open.path.as_str()),
        ("POST", "/api/now/table/incident")
    );
    assert_eq!(
        open.header("authorization"),
        Some("Basic cmlwb3N0ZTpzbi10ZXN0LXBhc3N3b3Jk"),
        "riposte:sn-test-password"
    );
    assert_eq!(
        open.json()["correlation_id"],
        json!(format!(
            "{}:open_ticket:0",
            step["run_id"].as_str().unwrap()
        )),
        "{step}"
    );
    sqs.delete_message()
        .queue_url(&queue)
        .receipt_handle(message.receipt_handle.unwrap())
        .send()
        .await
        .unwrap();

    // timer: EventBridge's scheduled event; nothing is due yet.
    let out = emu
        .invoke(&http, "timer", &event("schedule-timer.json"), LATER_CALL)
        .await;
    assert_eq!(out["timers_fired"], 0, "{out}");
    assert_eq!(out["wakes_fired"], 0, "{out}");
    assert!(out["outboxes_flushed"].is_u64(), "{out}");

    // The HTTP functions, through their function URLs (lambda_http).
    let (status, page) = emu
        .url_get(
            &http,
            "approval-response",
            "/approvals/forged.token",
            LATER_CALL,
        )
        .await;
    assert_eq!(status, 403, "{page}\n{}", emu.log_tail());
    assert!(page.contains("Not recorded"), "{page}");
    let (status, body) = emu
        .url_get(&http, "manual-run", "/healthz", LATER_CALL)
        .await;
    assert_eq!(status, 200, "{body}\n{}", emu.log_tail());

    drop(emu);
}
