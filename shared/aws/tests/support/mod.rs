//! The emulator these tests run against: one `moto_server` per test binary on a free 127.0.0.1
//! port, started by the first test that needs it and killed when the last one holding it ends.
//! Each test gets its own table and queue, and a clock it sets.
//!
//! If `moto_server` is not installed the tests fail (they never skip): `pip install 'moto[server]'`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::config::Credentials;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, QueueAttributeName};
use serde_json::json;

use riposte_aws::{AwsConfig, DynamoStore, create_table};
use riposte_core::engine::Effects;
use riposte_core::model::Millis;
use riposte_core::ports::Clock;
use riposte_core::run::{MessageKind, Run, RunStatus, StepMessage, Trigger};

const INSTALL_HINT: &str = "pip install 'moto[server]'";

/// A running `moto_server`, killed on drop.
pub struct Moto {
    child: Child,
    pub endpoint: String,
    log: PathBuf,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    fn start() -> Moto {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port on 127.0.0.1")
            .port();
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("moto-{port}.log"));
        let log_file = std::fs::File::create(&log).expect("the moto log file");
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("the moto log file"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start moto_server ({e}); these tests need the AWS emulator: {INSTALL_HINT}"
                )
            });
        let mut moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            log,
        };
        moto.wait_ready(port);
        moto
    }

    /// Waits (at most 30 s) until `GET /moto-api/` answers 200.
    fn wait_ready(&mut self, port: u16) {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "moto_server exited ({status}) before answering; is it installed? {INSTALL_HINT}\n{}",
                    self.log_tail()
                );
            }
            if moto_api_answers(addr) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "moto_server did not answer on {addr} within 30 s ({INSTALL_HINT})\n{}",
            self.log_tail()
        );
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(2000);
        text.get(start..).unwrap_or_default().to_string()
    }
}

fn moto_api_answers(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < head.len() {
        match stream.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => got += k,
        }
    }
    let head = String::from_utf8_lossy(&head[..got]);
    head.starts_with("HTTP/1.") && head.get(9..12) == Some("200")
}

/// The emulator shared by the tests of this binary that are running.
pub fn moto() -> Arc<Moto> {
    static SHARED: Mutex<Weak<Moto>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(m) = shared.upgrade() {
        return m;
    }
    let m = Arc::new(Moto::start());
    *shared = Arc::downgrade(&m);
    m
}

/// A clock the test moves by hand.
pub struct TestClock(AtomicI64);

impl TestClock {
    pub fn set(&self, at: Millis) {
        self.0.store(at, Ordering::SeqCst);
    }
    pub fn advance(&self, ms: Millis) -> Millis {
        self.0.fetch_add(ms, Ordering::SeqCst) + ms
    }
}

impl Clock for TestClock {
    fn now(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

/// 2026-11-01T00:00:00Z.
pub const T0: Millis = 1_793_491_200_000;

pub const RETENTION_DAYS: u32 = 30;

/// One test's store over its own table and queue.
pub struct Fixture {
    pub store: DynamoStore,
    pub dynamo: aws_sdk_dynamodb::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub table: String,
    pub queue_url: String,
    pub clock: Arc<TestClock>,
    _moto: Arc<Moto>,
}

/// SDK configuration for the emulator at `endpoint`, with explicit test credentials.
pub async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .load()
        .await
}

pub async fn fixture() -> Fixture {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let moto = moto();
    let sdk = sdk_config(&moto.endpoint).await;
    let dynamo = aws_sdk_dynamodb::Client::new(&sdk);
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let name = format!(
        "riposte-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    );
    create_table(&dynamo, &name)
        .await
        .expect("create the table");
    let queue_url = sqs
        .create_queue()
        .queue_name(&name)
        .send()
        .await
        .expect("create the queue")
        .queue_url
        .expect("a queue url");
    let clock = Arc::new(TestClock(AtomicI64::new(T0)));
    let store = DynamoStore::new(
        dynamo.clone(),
        sqs.clone(),
        AwsConfig {
            table: name.clone(),
            queue_url: queue_url.clone(),
            retention_days: RETENTION_DAYS,
        },
        clock.clone(),
    );
    Fixture {
        store,
        dynamo,
        sqs,
        table: name,
        queue_url,
        clock,
        _moto: moto,
    }
}

impl Fixture {
    /// The run's latest version item, as DynamoDB holds it.
    pub async fn raw_run(&self, id: &str) -> Option<HashMap<String, AttributeValue>> {
        self.raw_versions(id).await.pop()
    }

    /// The run's version items, oldest first.
    pub async fn raw_versions(&self, id: &str) -> Vec<HashMap<String, AttributeValue>> {
        self.dynamo
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk AND begins_with(sk, :v)")
            .expression_attribute_values(":pk", AttributeValue::S(format!("RUN#{id}")))
            .expression_attribute_values(":v", AttributeValue::S("V#".into()))
            .consistent_read(true)
            .send()
            .await
            .expect("query the run's versions")
            .items
            .unwrap_or_default()
    }

    pub async fn raw(&self, pk: &str, sk: &str) -> Option<HashMap<String, AttributeValue>> {
        self.dynamo
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(pk.into()))
            .key("sk", AttributeValue::S(sk.into()))
            .consistent_read(true)
            .send()
            .await
            .expect("get item")
            .item
    }

    /// Receives and deletes every message visible now.
    pub async fn drain(&self) -> Vec<StepMessage> {
        self.drain_sent().await.into_iter().map(|m| m.0).collect()
    }

    /// [`Self::drain`], each message with the run version it was sent ahead of, if it was.
    pub async fn drain_sent(&self) -> Vec<(StepMessage, Option<u64>)> {
        let mut out = Vec::new();
        for _ in 0..100 {
            let batch = self.receive_sent().await;
            if batch.is_empty() {
                break;
            }
            out.extend(batch);
        }
        out
    }

    async fn receive_once(&self) -> Vec<StepMessage> {
        self.receive_sent().await.into_iter().map(|m| m.0).collect()
    }

    async fn receive_sent(&self) -> Vec<(StepMessage, Option<u64>)> {
        let got = self
            .sqs
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(10)
            .send()
            .await
            .expect("receive");
        let mut out = Vec::new();
        let mut receipts = Vec::new();
        for (i, m) in got.messages().iter().enumerate() {
            let body = m.body().expect("a body");
            out.extend(riposte_aws::parse_sent(body).expect("step messages"));
            receipts.push(
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(m.receipt_handle().expect("a receipt handle"))
                    .build()
                    .expect("id and receipt handle"),
            );
        }
        if !receipts.is_empty() {
            let deleted = self
                .sqs
                .delete_message_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(receipts))
                .send()
                .await
                .expect("delete");
            assert!(deleted.failed().is_empty(), "{:?}", deleted.failed());
        }
        out
    }

    /// Receives (and deletes) until `count` messages arrived or `timeout` passed.
    pub async fn receive(&self, count: usize, timeout: Duration) -> Vec<StepMessage> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < count && Instant::now() < deadline {
            let batch = self.receive_once().await;
            if batch.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            out.extend(batch);
        }
        out
    }

    /// Messages in the queue: visible, in flight and delayed.
    pub async fn queued(&self) -> usize {
        let attrs = self
            .sqs
            .get_queue_attributes()
            .queue_url(&self.queue_url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await
            .expect("queue attributes")
            .attributes
            .unwrap_or_default();
        [
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
            QueueAttributeName::ApproximateNumberOfMessagesDelayed,
        ]
        .iter()
        .map(|k| {
            attrs
                .get(k)
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0)
        })
        .sum()
    }
}

/// A run as the engine would start it.
pub fn run(id: &str, created_at: Millis) -> Run {
    Run {
        id: id.into(),
        playbook_id: "block-ip".into(),
        playbook_version: 1,
        status: RunStatus::Queued,
        trigger: Trigger::Manual { by: "ann".into() },
        input: json!({"ip": "203.0.113.9"}),
        vars: Default::default(),
        steps: vec![],
        created_at,
        updated_at: created_at,
        finished_at: None,
        error: None,
        history: vec![],
    }
}

pub fn msg(run_id: &str, step: &str) -> StepMessage {
    StepMessage {
        run_id: run_id.into(),
        step: step.into(),
        iteration: 0,
        attempt: 1,
        kind: MessageKind::Execute,
    }
}

/// Effects sending these messages with these delays (ms).
pub fn sends(messages: &[(StepMessage, u64)]) -> Effects {
    Effects {
        messages: messages.to_vec(),
        new_runs: vec![],
    }
}

pub fn none() -> Effects {
    Effects::default()
}

pub fn attr_s<'a>(item: &'a HashMap<String, AttributeValue>, name: &str) -> Option<&'a str> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Some(v),
        _ => None,
    }
}

pub fn attr_n(item: &HashMap<String, AttributeValue>, name: &str) -> Option<i64> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => v.parse().ok(),
        _ => None,
    }
}

/// A deflated binary attribute of an item (a run version's `z` snapshot or `p` patch), as text;
/// `None` when the item has no such attribute.
pub fn inflated(item: &HashMap<String, AttributeValue>, name: &str) -> Option<String> {
    use std::io::Read;
    let AttributeValue::B(b) = item.get(name)? else {
        return None;
    };
    let mut text = String::new();
    flate2::read::DeflateDecoder::new(b.as_ref())
        .read_to_string(&mut text)
        .expect("deflated text");
    Some(text)
}
