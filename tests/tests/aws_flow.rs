//! The Block/Ignore playbook end to end through the Lambda handlers, over the real AWS SDK and an
//! AWS API emulator (moto) on 127.0.0.1: EventBridge event to the alert function, SQS, the step
//! worker, the approval link through the HTTP function's router, SQS again, to completion; the
//! vendors are the same stand-ins as the local tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use aws_lambda_events::event::sqs::SqsEvent;
use axum::body::Body;
use axum::http::Request;
use serde_json::json;
use tower::ServiceExt;

use riposte_aws::{AwsConfig, DynamoStore};
use riposte_core::connector::Connections;
use riposte_core::model::AlertKind;
use riposte_core::run::{Run, RunStatus, StepStatus};
use riposte_core::service::Service;
use riposte_core::store::{Store, StoreError};
use riposte_tests::faults::{Hook, Op, Wrapped};
use riposte_tests::moto::{Moto, acknowledge, receive_batch};
use riposte_tests::vendors::{SECRETS, SLACK_CHANNEL, SLACK_TS_ASK, Vendors, connections, vendors};
use riposte_tests::{OffsetClock, event, repo, secrets_from, sender, test_connections};

struct Aws {
    _moto: Moto,
    store: Arc<DynamoStore>,
    service: Arc<Service>,
    sqs: aws_sdk_sqs::Client,
    queue: String,
    clock: Arc<OffsetClock>,
}

async fn aws(v: &Vendors) -> Aws {
    aws_over(v, |store| store).await
}

/// [`aws`], with the functions' store wrapped by `wrap` (the test's view of the table is not).
async fn aws_over(v: &Vendors, wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>) -> Aws {
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
    let clock = Arc::new(OffsetClock::default());
    let config = AwsConfig {
        table: "riposte".into(),
        queue_url: queue.clone(),
        retention_days: 90,
    };
    let store = Arc::new(DynamoStore::new(dynamo, sqs.clone(), config, clock.clone()));
    let service = riposte_lambda::service_with(
        wrap(store.clone()),
        "test-approval-key-0123456789abcdef",
        test_connections(Connections::parse(&connections(v), None).unwrap()),
        riposte_core::connector::ConnectorCatalog::shipped(),
        "https://riposte.example.com".into(),
        sender(secrets_from(SECRETS)),
        clock.clone(),
    )
    .unwrap();
    // What `riposte sync` does at deploy time, through an admin service over the same table.
    let admin = riposte::sync::admin_service(store.clone(), &repo().join("infra/connections.yaml"))
        .unwrap();
    riposte::runtime::load_infra(&admin, &repo().join("infra"), "deploy")
        .await
        .unwrap();
    Aws {
        _moto: moto,
        store,
        service,
        sqs,
        queue,
        clock,
    }
}

impl Aws {
    /// Receives what SQS has ready and hands it to the step worker as Lambda's SQS integration
    /// would: deletes what succeeded, leaves failures. Returns the bodies delivered.
    async fn deliver_ready(&self) -> Vec<String> {
        let (messages, event) = receive_batch(&self.sqs, &self.queue).await;
        if messages.is_empty() {
            return vec![];
        }
        let response = riposte_lambda::on_messages(&self.service, event, 5, None).await;
        acknowledge(&self.sqs, &self.queue, &messages, &response).await;
        messages.into_iter().filter_map(|m| m.body).collect()
    }

    async fn run(&self, id: &str) -> Run {
        self.store.load_run(id).await.unwrap().unwrap().0
    }

    /// Delivers messages until the run satisfies `done` (bounded).
    async fn until(&self, id: &str, what: &str, done: impl Fn(&Run) -> bool) -> Run {
        for _ in 0..300 {
            let run = self.run(id).await;
            if done(&run) {
                return run;
            }
            if self.deliver_ready().await.is_empty() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        panic!(
            "run {id} never became {what}: {}",
            riposte::timeline::render(&self.run(id).await)
        );
    }

    /// Delivers messages until the run waits for the admins' decision (the SOC told).
    async fn asking(&self, id: &str) -> Run {
        self.until(id, "waiting", |r| {
            r.status == RunStatus::Waiting && r.step("tell_soc").unwrap().status.is_terminal()
        })
        .await
    }

    /// Delivers messages until the run ends, and checks that it succeeded.
    async fn succeeded(&self, id: &str) -> Run {
        let run = self.until(id, "finished", |r| r.status.is_terminal()).await;
        assert_eq!(
            run.status,
            RunStatus::Succeeded,
            "{}",
            riposte::timeline::render(&run)
        );
        run
    }

    async fn post_link(&self, link: &str) -> (u16, String) {
        let path = link
            .strip_prefix("https://riposte.example.com")
            .unwrap()
            .to_string();
        let app = riposte_lambda::http_app(self.service.clone());
        let req = Request::post(path)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from("approver=netadmin%40example.com"))
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

async fn started(a: &Aws) -> String {
    let out = riposte_lambda::on_event(
        &a.service,
        &event("guardduty-malicious-ip-caller.json"),
        AlertKind::Alert,
    )
    .await
    .unwrap();
    let runs = out["alerts"][0]["runs"].as_array().unwrap().clone();
    assert_eq!(runs.len(), 1, "{out}");
    // The recommendation function ignores this alert.
    let other = riposte_lambda::on_event(
        &a.service,
        &event("guardduty-malicious-ip-caller.json"),
        AlertKind::Recommendation,
    )
    .await
    .unwrap();
    assert_eq!(other["alerts"], json!([]));
    runs[0].as_str().unwrap().to_string()
}

fn link(v: &Vendors, choice: &str) -> String {
    let mail = v.email.requests();
    assert_eq!(mail.len(), 1);
    assert_eq!(mail[0].path, "/v2/email/outbound-emails");
    let text = mail[0].json()["Content"]["Simple"]["Body"]["Text"]["Data"]
        .as_str()
        .unwrap()
        .to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{choice}: ")))
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_through_the_lambda_handlers_and_a_duplicate_message_changes_nothing() {
    let v = vendors().await;
    let a = aws(&v).await;
    let id = started(&a).await;
    a.asking(&id).await;
    assert_eq!(v.servicenow.requests().len(), 1);
    let block = link(&v, "Block");
    assert!(block.starts_with("https://riposte.example.com/approvals/"));
    let (status, html) = a.post_link(&block).await;
    assert_eq!(status, 200, "{html}");
    assert_eq!(a.post_link(&link(&v, "Ignore")).await.0, 409);
    a.succeeded(&id).await;
    // The Slack question is updated in place with who decided (the Announce message, via SQS).
    for _ in 0..100 {
        if v.slack.requests().len() >= 3 {
            break;
        }
        if a.deliver_ready().await.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let slack = v.slack.requests();
    assert_eq!(slack.len(), 3, "post, ask, update: {slack:#?}");
    assert_eq!(slack[2].path, "/api/chat.update");
    let update = slack[2].json();
    assert_eq!(
        (&update["channel"], &update["ts"]),
        (&json!(SLACK_CHANNEL), &json!(SLACK_TS_ASK))
    );
    assert!(
        update["text"]
            .as_str()
            .unwrap()
            .starts_with("block by netadmin@example.com at 20"),
        "{update}"
    );
    let run = a.run(&id).await;
    let fw = v.panos.requests();
    assert_eq!(fw.len(), 1);
    assert_eq!(
        (fw[0].method.as_str(), fw[0].path.as_str()),
        ("POST", "/api/")
    );
    assert_eq!(
        fw[0].form().get("cmd").map(String::as_str),
        Some(
            r#"<uid-message><version>1.0</version><type>update</type><payload><register><entry ip="198.51.100.23"><tag><member timeout="0">riposte-blocked</member></tag></entry></register></payload></uid-message>"#
        )
    );
    let entra: Vec<String> = v
        .entra
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        entra,
        [
            "POST /00000000-0000-0000-0000-000000000000/oauth2/v2.0/token",
            "PATCH /v1.0/users/alice%40example.com",
            "POST /v1.0/users/alice%40example.com/revokeSignInSessions"
        ]
    );
    assert_eq!(v.servicenow.requests().len(), 2);
    assert!(v.securityhub.requests().is_empty());

    // Every message of the run delivered again, as SQS may: nothing happens twice.
    let msg =
        json!({"run_id": id, "step": "block_ip", "iteration": 0, "attempt": 1, "kind": "execute"});
    let again: SqsEvent = serde_json::from_value(json!({"Records": [{"messageId": "dup", "body": msg.to_string(), "attributes": {"ApproximateReceiveCount": "2"}}]})).unwrap();
    let response = riposte_lambda::on_messages(&a.service, again, 5, None).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(v.panos.requests().len(), 1, "the firewall was called once");
    assert_eq!(a.run(&id).await, run);

    // The custom action button in Security Hub starts the playbook its rule maps it to.
    let out = riposte_lambda::on_event(
        &a.service,
        &event("securityhub-custom-action.json"),
        AlertKind::Alert,
    )
    .await
    .unwrap();
    let lines = out["alerts"][0]["evaluation"]["lines"].as_array().unwrap();
    let action = lines
        .iter()
        .find(|l| l["rule_id"] == "securityhub-run-playbook-action")
        .unwrap();
    assert_eq!(action["verdict"]["outcome"], "matched", "{out}");
    assert_eq!(out["alerts"][0]["runs"].as_array().unwrap().len(), 1);

    // Events that can never be ingested are rejected with the reason, not retried by EventBridge.
    let out = riposte_lambda::on_event(&a.service, &event("unknown-source.json"), AlertKind::Alert)
        .await
        .unwrap();
    assert!(
        out["rejected"].as_str().unwrap().contains("aws.ec2"),
        "{out}"
    );
    let out = riposte_lambda::on_event(
        &a.service,
        &json!({"source": "aws.guardduty"}),
        AlertKind::Alert,
    )
    .await
    .unwrap();
    assert!(
        out["rejected"].as_str().unwrap().contains("detail-type"),
        "{out}"
    );

    // EventBridge delivering the event again starts nothing.
    let out = riposte_lambda::on_event(
        &a.service,
        &event("guardduty-malicious-ip-caller.json"),
        AlertKind::Alert,
    )
    .await
    .unwrap();
    assert_eq!(out["alerts"][0]["runs"], json!([id]));
    assert_eq!(
        a.store.list_runs(10, None).await.unwrap().len(),
        2,
        "the block run and the custom action's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_function_trusts_only_api_gateways_caller() {
    let v = vendors().await;
    let a = aws(&v).await;
    let app = riposte_lambda::http_app(a.service.clone());
    // No IAM caller in the request context: refused, even with a forged caller header.
    for forged in [None, Some("arn:aws:iam::123456789012:user/admin")] {
        let mut req = Request::get("/runs");
        if let Some(arn) = forged {
            req = req.header(riposte_lambda::CALLER_HEADER, arn);
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 403, "forged caller {forged:?}");
    }
    // An oversized body is refused before anything reads it.
    let resp = app
        .clone()
        .oneshot(
            Request::post("/runs")
                .body(Body::from(vec![b'x'; 2 << 20]))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    // The public approval route answers a forged token with 403.
    let resp = app
        .oneshot(
            Request::post("/approvals/forged.token")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_through_the_lambda_handlers() {
    let v = vendors().await;
    let a = aws(&v).await;
    let id = started(&a).await;
    a.asking(&id).await;
    assert_eq!(a.post_link(&link(&v, "Ignore")).await.0, 200);
    a.succeeded(&id).await;
    let sh = v.securityhub.requests();
    assert_eq!(sh.len(), 1);
    assert_eq!(
        (sh[0].method.as_str(), sh[0].path.as_str()),
        ("PATCH", "/findings/batchupdate")
    );
    let auth = sh[0].header("authorization").unwrap();
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
            && auth.contains("/us-east-1/securityhub/aws4_request,"),
        "{auth}"
    );
    assert_eq!(sh[0].json()["Workflow"], json!({"Status": "SUPPRESSED"}));
    assert_eq!(v.servicenow.requests()[1].json()["state"], "7");
    assert!(v.panos.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_approval_expires_through_the_timer_function() {
    let v = vendors().await;
    let a = aws(&v).await;
    let id = started(&a).await;
    a.asking(&id).await;
    use riposte_core::ports::Clock;
    // Four hours is past SQS's 15-minute delay: the expiry waits with the run (its wake index),
    // not as a queued message or a timer item.
    assert_eq!(
        a.store.fire_due_wakes(a.clock.now()).await.unwrap(),
        0,
        "not due yet"
    );
    assert_eq!(a.store.fire_due_timers(a.clock.now()).await.unwrap(), 0);
    a.clock.advance(4 * 3_600_000 + 10_000);
    assert_eq!(a.store.fire_due_timers(a.clock.now()).await.unwrap(), 0);
    assert_eq!(a.store.fire_due_wakes(a.clock.now()).await.unwrap(), 1);
    let run = a.succeeded(&id).await;
    assert_eq!(
        run.step("ask_admins").unwrap().output.as_ref().unwrap()["expired"],
        true
    );
    assert_eq!(v.securityhub.requests().len(), 1);
    assert_eq!(a.post_link(&link(&v, "Block")).await.0, 410);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_failing_on_its_last_receive_fails_its_run_and_spares_its_neighbours() {
    let v = vendors().await;
    let a = aws(&v).await;
    let id = started(&a).await;
    let good = a.deliver_ready().await;
    assert!(!good.is_empty());
    // A run whose pinned playbook version is gone: its message can never be handled.
    let spec = riposte_core::playbook::parse_spec(
        "id: lost\nname: Lost\nsteps:\n  - id: only\n    set: { x: 1 }\n",
        None,
    )
    .unwrap();
    let pb = riposte_core::playbook::compile(
        spec,
        3,
        &riposte_core::connector::ConnectorCatalog::shipped(),
    )
    .unwrap();
    let (run, fx) = riposte_core::engine::Engine::new(&pb).start(
        "lost-run".into(),
        riposte_core::run::Trigger::Manual { by: "o".into() },
        json!({}),
        0,
    );
    let bad = fx.messages[0].0.clone();
    a.store
        .create_run(&run, &riposte_core::engine::Effects::default())
        .await
        .unwrap();
    let neighbour =
        json!({"run_id": id, "step": "tell_soc", "iteration": 0, "attempt": 1, "kind": "execute"});
    let batch: SqsEvent = serde_json::from_value(json!({"Records": [
        {"messageId": "bad", "body": serde_json::to_string(&bad).unwrap(), "attributes": {"ApproximateReceiveCount": "5"}},
        {"messageId": "neighbour", "body": neighbour.to_string(), "attributes": {"ApproximateReceiveCount": "1"}},
        {"messageId": "garbage", "body": "{not json", "attributes": {"ApproximateReceiveCount": "1"}},
    ]}))
    .unwrap();
    let response = riposte_lambda::on_messages(&a.service, batch, 5, None).await;
    let failed: Vec<&str> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect();
    assert_eq!(
        failed,
        ["bad"],
        "only the failing message is redelivered (to the dead-letter queue)"
    );
    let lost = a.run("lost-run").await;
    assert_eq!(lost.status, RunStatus::Failed);
    assert!(lost.error.unwrap().contains("failed on all 5 deliveries"));
}

/// The steps a step makes ready are carried by the same invocation only while their timeouts fit
/// in the time it has left: near its deadline they go out as messages, for another invocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_near_its_deadline_hands_the_next_steps_to_the_queue() {
    let v = vendors().await;
    let a = aws(&v).await;
    let id = started(&a).await;
    let (messages, event) = receive_batch(&a.sqs, &a.queue).await;
    assert_eq!(messages.len(), 1, "the run's first step");
    // One second left: `open_ticket` runs (a delivered step always does), but neither of the two
    // steps it makes ready (30 s timeouts) is started here.
    let response = riposte_lambda::on_messages(
        &a.service,
        event,
        5,
        Some(std::time::Duration::from_secs(1)),
    )
    .await;
    assert!(response.batch_item_failures.is_empty());
    acknowledge(&a.sqs, &a.queue, &messages, &response).await;
    let run = a.run(&id).await;
    assert_eq!(
        run.step("open_ticket").unwrap().status,
        StepStatus::Succeeded
    );
    for step in ["tell_soc", "ask_admins"] {
        assert_eq!(run.step(step).unwrap().status, StepStatus::Queued, "{step}");
    }
    assert!(v.slack.requests().is_empty(), "nothing posted yet");
    let (next, _) = receive_batch(&a.sqs, &a.queue).await;
    assert_eq!(steps_in(&next), ["ask_admins", "tell_soc"]);
}

/// The steps the step messages of a batch name, sorted.
fn steps_in(messages: &[aws_sdk_sqs::types::Message]) -> Vec<String> {
    let mut steps: Vec<String> = messages
        .iter()
        .flat_map(|m| riposte_aws::parse_sent(m.body.as_deref().unwrap()).unwrap())
        .map(|(m, _)| m.step)
        .collect();
    steps.sort();
    steps
}

/// Counts the run writes that landed and those refused, and fails (once, as if the worker were
/// lost before it) the first write that would record `revoke_sessions` as succeeded.
#[derive(Default)]
struct Writes {
    landed: AtomicUsize,
    refused: AtomicUsize,
    lose_group: AtomicBool,
    /// Whether `disable_user`'s handler reads its run in 300 ms (see [`decide_block_in_one_batch`]).
    slow_disable_user: AtomicBool,
    /// Run reads counted from the batch on.
    loads: AtomicUsize,
    /// Which of them (1-based; 0: none) takes 300 ms.
    slow_load: AtomicUsize,
    /// For each write that landed: the status it recorded of `tell_soc` and of `ask_admins`.
    asked: std::sync::Mutex<Vec<(StepStatus, StepStatus)>>,
    /// Whether to fail (once, as if the table were unavailable) the write that would record
    /// `tell_soc` as done while `ask_admins` still runs.
    fail_tell_alone: AtomicBool,
}

struct CountWrites(Arc<Writes>);

impl Hook for CountWrites {
    async fn around<T: Send>(
        &self,
        op: Op<'_>,
        call: futures_util::future::BoxFuture<'_, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let w = &self.0;
        if let Op::LoadRun { .. } = op
            && w.loads.fetch_add(1, Ordering::SeqCst) + 1 == w.slow_load.load(Ordering::SeqCst)
        {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        let Op::SaveRun { run, .. } = op else {
            return call.await;
        };
        let records_revoke = run.step("revoke_sessions").unwrap().status == StepStatus::Succeeded;
        let asked = (
            run.step("tell_soc").unwrap().status,
            run.step("ask_admins").unwrap().status,
        );
        if asked == (StepStatus::Succeeded, StepStatus::Running)
            && w.fail_tell_alone.swap(false, Ordering::SeqCst)
        {
            return Err(StoreError::Unavailable("the table is unavailable".into()));
        }
        if records_revoke && w.lose_group.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Unavailable("the worker was lost".into()));
        }
        let result = call.await;
        if result.is_ok() {
            w.asked.lock().unwrap().push(asked);
        }
        match &result {
            Ok(_) => w.landed.fetch_add(1, Ordering::SeqCst),
            Err(StoreError::Conflict(_)) => w.refused.fetch_add(1, Ordering::SeqCst),
            Err(_) => 0,
        };
        result
    }
}

/// The decision's branches: `block_ip` on the firewall, and `disable_user`, which makes
/// `revoke_sessions` ready, which (with `block_ip`) makes `resolve_ticket` ready; all four
/// repeat-safe, and delivered in one batch. Returns the run's id and how many run writes that
/// batch made.
async fn decide_block_in_one_batch(v: &Vendors, writes: &Arc<Writes>, a: &Aws) -> (String, usize) {
    let id = started(a).await;
    a.asking(&id).await;
    assert_eq!(a.post_link(&link(v, "Block")).await.0, 200);
    let (messages, event) = receive_batch(&a.sqs, &a.queue).await;
    assert_eq!(
        steps_in(&messages),
        ["ask_admins", "block_ip", "disable_user"]
    );
    assert_eq!(
        messages.len(),
        1,
        "the decision's three step messages travel as one SQS message"
    );
    let before = writes.landed.load(Ordering::SeqCst);
    // The batch's handlers are polled in turn, so they read the run in the order of the bundle.
    writes.loads.store(0, Ordering::SeqCst);
    if writes.slow_disable_user.load(Ordering::SeqCst) {
        let bundle = riposte_aws::parse_sent(messages[0].body.as_deref().unwrap()).unwrap();
        let at = bundle
            .iter()
            .position(|(m, _)| m.step == "disable_user")
            .unwrap();
        writes.slow_load.store(at + 1, Ordering::SeqCst);
    }
    let response = riposte_lambda::on_messages(&a.service, event, 5, None).await;
    acknowledge(&a.sqs, &a.queue, &messages, &response).await;
    // A message handed back is seen again once its visibility timeout ends: now, here.
    for m in &messages {
        if response
            .batch_item_failures
            .iter()
            .any(|f| Some(f.item_identifier.as_str()) == m.message_id.as_deref())
        {
            a.sqs
                .change_message_visibility()
                .queue_url(&a.queue)
                .receipt_handle(m.receipt_handle.clone().unwrap())
                .visibility_timeout(0)
                .send()
                .await
                .unwrap();
        }
    }
    (id, writes.landed.load(Ordering::SeqCst) - before)
}

/// A Block run through functions whose store counts writes into `writes`, decided and its
/// branches handled in one batch ([`decide_block_in_one_batch`]): the counts, the functions,
/// the run's id and how many run writes that batch made.
async fn branches_decided(v: &Vendors, writes: Writes) -> (Arc<Writes>, Aws, String, usize) {
    let (writes, a) = counted(v, writes).await;
    let (id, landed) = decide_block_in_one_batch(v, &writes, &a).await;
    (writes, a, id, landed)
}

/// Functions whose store counts writes into `writes` (and fails those it is told to).
async fn counted(v: &Vendors, writes: Writes) -> (Arc<Writes>, Aws) {
    let writes = Arc::new(writes);
    let hook = writes.clone();
    let a = aws_over(v, move |s| Arc::new(Wrapped::new(s, CountWrites(hook)))).await;
    (writes, a)
}

/// A vendor stand-in answering as `respond` does, after `ms` milliseconds.
async fn slow(
    name: &str,
    ms: u64,
    respond: impl Fn(&riposte_tests::Recorded) -> (u16, serde_json::Value) + Send + Sync + 'static,
) -> riposte_tests::Vendor {
    riposte_tests::Vendor::start_slow(name, std::time::Duration::from_millis(ms), respond).await
}

/// A repeat-safe step that makes only repeat-safe steps ready is recorded by their write, and
/// the other branch's repeat-safe outcome, known meanwhile in the same process, by that write
/// too: the four steps after the decision take one run write, not four, none refused, and the
/// run's history still shows each step start and succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeat_safe_steps_of_both_branches_are_recorded_by_one_write() {
    let v = vendors().await;
    let (writes, a, id, landed) = branches_decided(&v, Writes::default()).await;
    let run = a.succeeded(&id).await;
    assert_eq!(
        landed, 1,
        "block_ip, disable_user, revoke_sessions and resolve_ticket by one write"
    );
    assert_eq!(writes.refused.load(Ordering::SeqCst), 0, "no write refused");
    for step in [
        "block_ip",
        "disable_user",
        "revoke_sessions",
        "resolve_ticket",
    ] {
        let events: Vec<&str> = run
            .history
            .iter()
            .filter(|h| h.step.as_deref() == Some(step) && h.iteration.is_some())
            .map(|h| h.event.as_str())
            .collect();
        assert_eq!(events, ["started", "succeeded"], "{step}");
    }
}

/// A handler counts as performing from the moment it starts, not only once its step runs: when
/// `disable_user`'s handler is slow to read its run, `block_ip` (whose firewall answers at
/// once) still leaves its outcome to it, and the four steps take one write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_slow_to_start_still_records_the_other_branch_with_its_own() {
    let v = vendors().await;
    let (writes, a, id, landed) = branches_decided(
        &v,
        Writes {
            slow_disable_user: AtomicBool::new(true),
            ..Writes::default()
        },
    )
    .await;
    a.succeeded(&id).await;
    assert_eq!(
        landed, 1,
        "block_ip's outcome waited for disable_user's write"
    );
    assert_eq!(writes.refused.load(Ordering::SeqCst), 0, "no write refused");
}

/// Only a handler that may record steps takes the others' outcomes: the chat update delivered
/// with the decision's branches never does, so no outcome waits on it. With the firewall slow
/// (400 ms) and Slack slower (1 s), `disable_user` and `revoke_sessions` are left to `block_ip`'s
/// write, which records them with its own and `resolve_ticket`'s: one write, however long the
/// chat update takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_outcome_waits_on_the_chat_update_delivered_with_the_branches() {
    let mut v = vendors().await;
    v.panos = slow("panos", 400, riposte_tests::vendors::panos).await;
    v.slack = slow("slack", 1_000, riposte_tests::vendors::slack).await;
    let (writes, a, id, landed) = branches_decided(&v, Writes::default()).await;
    a.succeeded(&id).await;
    assert_eq!(landed, 1, "the four steps by block_ip's write");
    assert_eq!(writes.refused.load(Ordering::SeqCst), 0, "no write refused");
    assert!(
        v.slack
            .requests()
            .iter()
            .any(|r| r.path.ends_with("/chat.update")),
        "the chat update was sent"
    );
}

/// A worker lost before the write that would have recorded a group of repeat-safe steps loses
/// only their outcomes: its message comes back, they are done again, and the run succeeds. The
/// user directory answers in 300 ms, so the firewall's `block_ip` ends first and the group's
/// write is `disable_user`'s handler's. (Were `block_ip` last, the write lost would be its own,
/// and `disable_user`'s handler, whose outcomes it took, would write them itself: nothing lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_lost_before_recording_grouped_steps_has_them_done_again() {
    let mut v = vendors().await;
    v.entra = slow("entra", 300, riposte_tests::vendors::entra).await;
    let (writes, a, id, _) = branches_decided(
        &v,
        Writes {
            lose_group: AtomicBool::new(true),
            ..Writes::default()
        },
    )
    .await;
    assert!(
        !writes.lose_group.load(Ordering::SeqCst),
        "the group's write was lost"
    );
    let lost = a.run(&id).await;
    assert_eq!(
        lost.step("revoke_sessions").unwrap().status,
        StepStatus::Pending,
        "nothing of the lost group was recorded"
    );
    let run = a.succeeded(&id).await;
    assert_eq!(
        run.step("resolve_ticket").unwrap().status,
        StepStatus::Succeeded
    );
    let revokes = v
        .entra
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/revokeSignInSessions"))
        .count();
    assert_eq!(
        revokes, 2,
        "revoke_sessions was done again, as repeat-safe work may be"
    );
    // The SQS message came back whole, block_ip's step message with it: its outcome was
    // recorded the first time, so the firewall is not called again.
    assert_eq!(v.panos.requests().len(), 1, "the firewall was called once");
}

/// Outcomes are held only briefly: with a user directory taking over two seconds a call, what is
/// known when `disable_user` ends (it, and `block_ip`, done two seconds before) is recorded
/// then, not held on through `revoke_sessions` and `resolve_ticket`, so the run's record never
/// lags far behind what was done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_are_not_held_past_two_seconds() {
    let mut v = vendors().await;
    v.entra = slow("entra", 2_200, riposte_tests::vendors::entra).await;
    let (_, a, id, landed) = branches_decided(&v, Writes::default()).await;
    a.succeeded(&id).await;
    assert_eq!(
        landed, 2,
        "block_ip with disable_user; then revoke_sessions with resolve_ticket"
    );
}

/// Functions whose store counts writes into `writes`, and a Block/Ignore run they started,
/// handled until it waits for the admins (the SOC told): the run's id, and the statuses of
/// `tell_soc` and `ask_admins` each run write recorded from the ticket's on.
async fn asked(v: &Vendors) -> (Aws, String, Vec<(StepStatus, StepStatus)>) {
    let (writes, a) = counted(v, Writes::default()).await;
    let id = started(&a).await;
    a.asking(&id).await;
    let asked = writes.asked.lock().unwrap().clone();
    let from_ticket = asked
        .iter()
        .position(|(tell, _)| *tell != StepStatus::Pending)
        .unwrap();
    (a, id, asked[from_ticket..].to_vec())
}

/// Whether `r` is the Slack post that tells the SOC (not the admins' question).
fn tells_soc(r: &riposte_tests::Recorded) -> bool {
    r.path.ends_with("/chat.postMessage") && !r.json().to_string().contains("Block or ignore?")
}

/// The SOC's message and the admins' question are ready at once, once the ticket is open: both
/// go out at once, and their outcomes are recorded by one write. Slack answers the SOC's message
/// only once the admins' email has gone out (holding it up to 10 s otherwise), which steps done
/// one after the other would never do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soc_message_and_the_admins_question_go_out_at_once_and_are_recorded_together() {
    let mut v = vendors().await;
    let emailed = Arc::new(AtomicBool::new(false));
    let seen = emailed.clone();
    v.email = riposte_tests::Vendor::start("email", move |r| {
        seen.store(true, Ordering::SeqCst);
        riposte_tests::vendors::ses(r)
    })
    .await;
    let released = Arc::new(AtomicBool::new(false));
    let (wait, told) = (emailed.clone(), released.clone());
    v.slack = riposte_tests::Vendor::start_held(
        "slack",
        move |r| {
            let (emailed, released, soc) = (wait.clone(), told.clone(), tells_soc(r));
            Box::pin(async move {
                for _ in 0..1_000 {
                    if !soc || emailed.load(Ordering::SeqCst) {
                        released.fetch_or(soc, Ordering::SeqCst);
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            })
        },
        riposte_tests::vendors::slack,
    )
    .await;
    let (_, _, asked) = asked(&v).await;
    assert!(
        released.load(Ordering::SeqCst),
        "the admins' email went out while Slack held the SOC's message"
    );
    use StepStatus::{Running, Succeeded, Waiting};
    assert_eq!(
        asked,
        [(Running, Running), (Succeeded, Waiting)],
        "the ticket's write claims both; one write records both"
    );
}

/// Steps that run at once wait for each other at most two seconds: with Slack taking 2.5 s to
/// answer the SOC's message, the admins' question (asked at once) is recorded alone, as soon as
/// those two seconds are up, and the SOC's message by a write of its own when Slack answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_step_holds_the_outcome_of_one_run_with_it_two_seconds_at_most() {
    let mut v = vendors().await;
    v.slack = riposte_tests::Vendor::start_held(
        "slack",
        |r| {
            let soc = tells_soc(r);
            Box::pin(async move {
                if soc {
                    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
                }
            })
        },
        riposte_tests::vendors::slack,
    )
    .await;
    let (_, _, asked) = asked(&v).await;
    use StepStatus::{Running, Succeeded, Waiting};
    assert_eq!(
        asked,
        [(Running, Running), (Running, Waiting), (Succeeded, Waiting)],
        "the question recorded first, alone; then the SOC's message"
    );
}

/// A write failing while a step still runs does not cut its call short: with the admins' email
/// taking 3 s and the write of the SOC's message (alone, 2 s after it ended) refused by the
/// table, the step worker hands its message back only once the email has been answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_lets_the_calls_still_running_finish() {
    let mut v = vendors().await;
    let answered = Arc::new(AtomicBool::new(false));
    let done = answered.clone();
    v.email = riposte_tests::Vendor::start_held(
        "email",
        move |_| {
            let done = done.clone();
            Box::pin(async move {
                tokio::time::sleep(std::time::Duration::from_millis(3_000)).await;
                done.store(true, Ordering::SeqCst);
            })
        },
        riposte_tests::vendors::ses,
    )
    .await;
    let (writes, a) = counted(
        &v,
        Writes {
            fail_tell_alone: AtomicBool::new(true),
            ..Writes::default()
        },
    )
    .await;
    let id = started(&a).await;
    let (messages, event) = receive_batch(&a.sqs, &a.queue).await;
    assert_eq!(steps_in(&messages), ["open_ticket"]);
    let response = riposte_lambda::on_messages(&a.service, event, 5, None).await;
    assert!(
        !writes.fail_tell_alone.load(Ordering::SeqCst),
        "the SOC's message's write was refused"
    );
    assert_eq!(
        response.batch_item_failures.len(),
        1,
        "the message is handed back"
    );
    assert!(
        answered.load(Ordering::SeqCst),
        "the email's call ran to its answer before the message was handed back"
    );
    let run = a.run(&id).await;
    assert_eq!(
        run.step("tell_soc").unwrap().status,
        StepStatus::Running,
        "nothing recorded the SOC's message"
    );
}

/// The SQS event Lambda would hand the step worker for one message with this body, on its
/// `receives`-th receive.
fn delivery(body: &str, receives: u32) -> SqsEvent {
    serde_json::from_value(json!({"Records": [{
        "messageId": "m-1",
        "receiptHandle": "rh-1",
        "body": body,
        "attributes": {"ApproximateReceiveCount": receives.to_string()},
        "eventSource": "aws:sqs",
    }]}))
    .unwrap()
}

/// The run's first step message, as the alert function sent it: ahead of the run's creation.
async fn first_message(a: &Aws) -> String {
    let (messages, _) = receive_batch(&a.sqs, &a.queue).await;
    assert_eq!(messages.len(), 1);
    let body = messages[0].body.clone().unwrap();
    assert_eq!(riposte_aws::sent_ahead_of(&body), Some(1), "{body}");
    acknowledge(
        &a.sqs,
        &a.queue,
        &messages,
        &aws_lambda_events::event::sqs::SqsBatchResponse::default(),
    )
    .await;
    body
}

/// Every write's messages are sent before the write. One that reaches the worker before its
/// write has landed is not taken as stale: the worker waits for the write, then does the step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_arrives_before_its_write_waits_for_it() {
    let v = vendors().await;
    let a = aws(&v).await;
    let id = started(&a).await;
    a.asking(&id).await;
    let (_, version) = a.store.load_run(&id).await.unwrap().unwrap();
    // What the decision's write sends ahead of itself, delivered before the decision is written
    // (the admin clicks 300 ms later). At the version the worker first reads, block_ip is not
    // ready: taken as stale, it would be dropped and the firewall never called here.
    let block_ip = json!({
        "run_id": id, "step": "block_ip", "iteration": 0, "attempt": 1, "kind": "execute",
        "after": version + 1,
    })
    .to_string();
    let click = link(&v, "Block");
    let (response, (status, _)) = tokio::join!(
        riposte_lambda::on_messages(&a.service, delivery(&block_ip, 1), 5, None),
        async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            a.post_link(&click).await
        }
    );
    assert_eq!(status, 200);
    assert!(
        response.batch_item_failures.is_empty(),
        "handled, not handed back"
    );
    assert_eq!(
        v.panos.requests().len(),
        1,
        "the IP was blocked by that message"
    );
    assert_eq!(
        a.run(&id).await.step("block_ip").unwrap().status,
        StepStatus::Succeeded
    );
}

/// A message sent ahead of a write that never lands (its writer died in between) is handed back
/// to the queue while it may still land, then dropped: its run is not failed for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_write_never_lands_is_dropped_without_failing_its_run() {
    let v = vendors().await;
    let a = aws(&v).await;
    let id = started(&a).await;
    let orphan = first_message(&a)
        .await
        .replace("\"after\":1", "\"after\":7");
    let response = riposte_lambda::on_messages(&a.service, delivery(&orphan, 1), 5, None).await;
    assert_eq!(response.batch_item_failures.len(), 1, "handed back");
    let response = riposte_lambda::on_messages(&a.service, delivery(&orphan, 5), 5, None).await;
    assert!(
        response.batch_item_failures.is_empty(),
        "dropped on its last receive"
    );
    let (run, version) = a.store.load_run(&id).await.unwrap().unwrap();
    assert_eq!(
        (run.status, version),
        (RunStatus::Queued, 1),
        "the run is untouched"
    );
    assert!(v.servicenow.requests().is_empty());
}

/// Counts the playbook reads of the functions' store.
#[derive(Default)]
struct PlaybookReads(Arc<AtomicUsize>);

impl Hook for PlaybookReads {
    async fn around<T: Send>(
        &self,
        op: Op<'_>,
        call: futures_util::future::BoxFuture<'_, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if matches!(op, Op::GetPlaybook { .. }) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        call.await
    }
}

/// A warm alert function starts runs of a playbook it has read without reading it again; a new
/// version saved meanwhile (by another function: `riposte sync` at deploy, the admin API) is
/// what its runs start once its rules cache (5 s) has passed, as a rule change would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_alert_function_starts_a_new_playbook_version_after_its_rules_cache() {
    let v = vendors().await;
    let reads = Arc::new(AtomicUsize::new(0));
    let hook = PlaybookReads(reads.clone());
    let a = aws_over(&v, move |s| Arc::new(Wrapped::new(s, hook))).await;
    let start = |n: u32| {
        let mut e = event("guardduty-malicious-ip-caller.json");
        e["id"] = json!(format!("c8c4daa7-a20c-2f03-0070-{n:012}"));
        e["detail"]["id"] = json!(format!("finding-{n}"));
        let service = a.service.clone();
        async move {
            let out = riposte_lambda::on_event(&service, &e, AlertKind::Alert)
                .await
                .unwrap();
            out["alerts"][0]["runs"][0].as_str().unwrap().to_string()
        }
    };
    let first = start(1).await;
    assert_eq!(a.run(&first).await.playbook_version, 1);
    let cold = reads.load(Ordering::SeqCst);
    assert!(cold >= 1, "a cold function reads the playbook");
    let second = start(2).await;
    assert_ne!(second, first);
    assert_eq!(
        reads.load(Ordering::SeqCst),
        cold,
        "a warm function reads no playbook"
    );

    // Another function saves version 2.
    let admin =
        riposte::sync::admin_service(a.store.clone(), &repo().join("infra/connections.yaml"))
            .unwrap();
    let text =
        std::fs::read_to_string(repo().join("infra/playbooks/block-or-ignore-malicious-ip.yaml"))
            .unwrap();
    let mut spec = riposte_core::playbook::parse_spec(&text, None).unwrap();
    spec.description = "version 2".into();
    assert_eq!(admin.put_playbook(spec, "deploy").await.unwrap().version, 2);

    let third = start(3).await;
    assert_eq!(
        a.run(&third).await.playbook_version,
        1,
        "within the rules cache"
    );
    a.clock.advance(riposte_lambda::RULES_CACHE_MS);
    let fourth = start(4).await;
    assert_eq!(
        a.run(&fourth).await.playbook_version,
        2,
        "after the rules cache, the new version"
    );
    assert!(reads.load(Ordering::SeqCst) > cold);
}

/// Counts the functions' run reads, lagging and strong; while `lag` is set, a lagging read
/// fails as if it had not found the run's latest write.
#[derive(Default)]
struct RunReads {
    lag: AtomicBool,
    lagging: AtomicUsize,
    strong: AtomicUsize,
}

struct CountRunReads(Arc<RunReads>);

impl Hook for CountRunReads {
    async fn around<T: Send>(
        &self,
        op: Op<'_>,
        call: futures_util::future::BoxFuture<'_, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match op {
            Op::LoadRunLagging { .. } => {
                self.0.lagging.fetch_add(1, Ordering::SeqCst);
                if self.0.lag.load(Ordering::SeqCst) {
                    return Err(StoreError::Unavailable("not on this replica yet".into()));
                }
            }
            Op::LoadRun { .. } => {
                self.0.strong.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
        call.await
    }
}

/// The confirm page (GET, what mail scanners fetch too) reads the run with a read that may
/// lag (eventually consistent: half the price); the decision (POST) reads it strongly. A page
/// whose read lags behind the approval's write is read again, strongly, and still shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_confirm_page_reads_at_half_price_and_again_strongly_when_that_read_lags() {
    let v = vendors().await;
    let reads = Arc::new(RunReads::default());
    let hook = CountRunReads(reads.clone());
    let a = aws_over(&v, move |s| Arc::new(Wrapped::new(s, hook))).await;
    let id = started(&a).await;
    a.asking(&id).await;
    let path = link(&v, "Block")
        .strip_prefix("https://riposte.example.com")
        .unwrap()
        .to_string();
    let page = |a: &Aws| {
        let app = riposte_lambda::http_app(a.service.clone());
        let req = Request::get(path.clone()).body(Body::empty()).unwrap();
        async move {
            let resp = app.oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    let count = |r: &RunReads| {
        (
            r.lagging.swap(0, Ordering::SeqCst),
            r.strong.swap(0, Ordering::SeqCst),
        )
    };
    count(&reads);
    let (status, body) = page(&a).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Block"), "{body}");
    assert_eq!(count(&reads), (1, 0), "one lagging read, no strong one");

    reads.lag.store(true, Ordering::SeqCst);
    let (status, body) = page(&a).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(count(&reads), (1, 1), "the lagging read, then a strong one");
    reads.lag.store(false, Ordering::SeqCst);

    assert_eq!(a.post_link(&link(&v, "Block")).await.0, 200);
    let (lagging, strong) = count(&reads);
    assert_eq!(lagging, 0, "the decision never reads a lagging run");
    assert!(strong >= 1);
    a.succeeded(&id).await;
}
