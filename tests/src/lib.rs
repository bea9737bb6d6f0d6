//! The test kit: vendor stand-ins on 127.0.0.1 that record the exact requests they receive and
//! answer as the vendor documents, and a whole local Riposte (SQLite store, worker, HTTP routes)
//! started in this process on a random port.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::watch;

use riposte::runtime::{SystemClock, build, load_connections, run_worker, seed};
use riposte_api::{ApiKeys, AppState, Role};
use riposte_core::model::Millis;
use riposte_core::ports::Clock;
use riposte_core::run::Run;
use riposte_core::store::Store;
pub mod faults;
pub mod moto;
pub mod vendors;

use riposte_http::{
    AwsCredentials, EgressPolicy, ReqwestSender, StaticAwsCredentials, StaticSecrets,
};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `riposte` binary of this build (the README's test command builds it before the tests).
pub fn riposte_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("riposte"))
        .unwrap_or_default();
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p riposte`; the README's test command does)",
        bin.display()
    );
    bin
}

/// Waits (at most 10 s) until a server answers `GET /healthz`.
pub async fn wait_ready(http: &reqwest::Client, url: &str) {
    for _ in 0..500 {
        if http
            .get(format!("{url}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no server came up at {url}");
}

/// How many rules `infra/rules` ships.
pub fn example_rules() -> usize {
    riposte::runtime::yaml_files(&repo().join("infra/rules"))
        .map(|f| f.len())
        .unwrap_or(0)
}

/// A file from `events/`, parsed.
pub fn event(name: &str) -> Value {
    let p = repo().join("events").join(name);
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The signing secret of the test Riposte's `edr` alert webhook (`POST /webhooks/edr`).
pub const WEBHOOK_SECRET: &str = "edr-webhook-test-secret";

/// The Slack signing secret of the test Riposte (`Riposte::start`).
pub const SLACK_SIGNING_SECRET: &str = "slack-test-signing-secret";

/// Connections pointed at stand-ins on 127.0.0.1: any host is allowed.
pub fn test_connections(
    mut c: riposte_core::connector::Connections,
) -> riposte_core::connector::Connections {
    c.allow_any_host = true;
    c
}

/// One request as a vendor received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Recorded {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} {}: body is not JSON ({e}): {}",
                self.method, self.path, self.body
            )
        })
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
    pub fn form(&self) -> BTreeMap<String, String> {
        url::form_urlencoded::parse(self.body.as_bytes())
            .into_owned()
            .collect()
    }
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        url::form_urlencoded::parse(self.query.as_deref().unwrap_or("").as_bytes())
            .into_owned()
            .collect()
    }
}

/// The member a [`text_body`] answer is marked with.
const TEXT_BODY: &str = "$riposte_tests_text_body";

/// An answer sent as text with a content type instead of JSON (PAN-OS answers XML), e.g.
/// `(200, text_body("application/xml; charset=UTF-8", "<response status=\"success\"/>"))`.
pub fn text_body(content_type: &str, text: &str) -> Value {
    serde_json::json!({ TEXT_BODY: [content_type, text] })
}

/// How a vendor answers a request: status and JSON body (`Value::Null` for an empty body; a
/// [`text_body`] for text).
pub type Responder = Arc<dyn Fn(&Recorded, &[Recorded]) -> (u16, Value) + Send + Sync>;

/// How long a vendor holds a request's answer: a future per request, awaited after the request
/// is recorded and before it is answered.
pub type Hold =
    Arc<dyn Fn(&Recorded) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

/// A vendor API stand-in on 127.0.0.1.
pub struct Vendor {
    pub name: String,
    pub url: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

#[derive(Clone)]
struct VendorState {
    requests: Arc<Mutex<Vec<Recorded>>>,
    respond: Responder,
    hold: Hold,
}

async fn record(State(st): State<VendorState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes: Bytes = axum::body::to_bytes(body, 4 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let rec = Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: String::from_utf8_lossy(&bytes).into_owned(),
    };
    let hold = (st.hold)(&rec);
    let (status, body) = {
        // The vendor's state is what it received before: a stateful stand-in reads it.
        let mut requests = st.requests.lock().unwrap();
        let answer = (st.respond)(&rec, &requests);
        requests.push(rec);
        answer
    };
    hold.await;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some([ct, text]) = body
        .get(TEXT_BODY)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
    {
        let header = [(
            CONTENT_TYPE,
            ct.as_str().unwrap_or("text/plain").to_string(),
        )];
        return (status, header, text.as_str().unwrap_or("").to_string()).into_response();
    }
    if body.is_null() {
        status.into_response()
    } else {
        (status, axum::Json(body)).into_response()
    }
}

impl Vendor {
    pub async fn start(
        name: &str,
        respond: impl Fn(&Recorded) -> (u16, Value) + Send + Sync + 'static,
    ) -> Vendor {
        Self::start_slow(name, Duration::ZERO, respond).await
    }

    /// A vendor that takes `delay` to answer each request (after recording it).
    pub async fn start_slow(
        name: &str,
        delay: Duration,
        respond: impl Fn(&Recorded) -> (u16, Value) + Send + Sync + 'static,
    ) -> Vendor {
        let hold: Hold = Arc::new(move |_| {
            if delay.is_zero() {
                Box::pin(async {})
            } else {
                Box::pin(tokio::time::sleep(delay))
            }
        });
        Self::serve(name, hold, Arc::new(move |r, _| respond(r))).await
    }

    /// A vendor that holds each request's answer (after recording it) until `hold`'s future for
    /// that request ends.
    pub async fn start_held(
        name: &str,
        hold: impl Fn(&Recorded) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync + 'static,
        respond: impl Fn(&Recorded) -> (u16, Value) + Send + Sync + 'static,
    ) -> Vendor {
        Self::serve(name, Arc::new(hold), Arc::new(move |r, _| respond(r))).await
    }

    /// A vendor whose answer depends on what it received before (`earlier`, in arrival order).
    pub async fn start_with_history(
        name: &str,
        respond: impl Fn(&Recorded, &[Recorded]) -> (u16, Value) + Send + Sync + 'static,
    ) -> Vendor {
        Self::serve(name, Arc::new(|_| Box::pin(async {})), Arc::new(respond)).await
    }

    async fn serve(name: &str, hold: Hold, respond: Responder) -> Vendor {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let state = VendorState {
            requests: requests.clone(),
            respond,
            hold,
        };
        let app = axum::Router::new().fallback(record).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Vendor {
            name: name.into(),
            url,
            requests,
        }
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

/// The HTTP sender tests use: the given secrets, test AWS credentials, private targets allowed.
pub fn sender(secrets: StaticSecrets) -> Arc<ReqwestSender> {
    let aws = AwsCredentials::new("AKIDEXAMPLE", "test-aws-secret-key", None);
    Arc::new(
        ReqwestSender::new(Arc::new(secrets), EgressPolicy::permissive_for_tests())
            .with_aws_credentials(Arc::new(StaticAwsCredentials::new(aws))),
    )
}

/// Static secrets from pairs.
pub fn secrets_from(pairs: &[(&str, &str)]) -> StaticSecrets {
    StaticSecrets(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
    )
}

/// The wall clock plus an offset a test can move forward.
#[derive(Default)]
pub struct OffsetClock(pub AtomicI64);

impl OffsetClock {
    pub fn advance(&self, ms: Millis) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> Millis {
        SystemClock.now() + self.0.load(Ordering::SeqCst)
    }

    fn sleep(&self, ms: Millis) -> futures_util::future::BoxFuture<'static, ()> {
        SystemClock.sleep(ms)
    }
}

pub const OPERATOR_KEY: &str = "test-operator-key-0123456789";
pub const CONTRIBUTOR_KEY: &str = "test-contributor-key-0123456789";

/// A whole local Riposte in this process.
pub struct Riposte {
    pub url: String,
    pub local: riposte::runtime::Local,
    pub clock: Arc<OffsetClock>,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    stop: watch::Sender<bool>,
}

impl Drop for Riposte {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl Riposte {
    /// Starts with the examples in `infra/` and the given connections YAML and secrets.
    pub async fn start(connections_yaml: &str, secrets: &[(&str, &str)]) -> Riposte {
        Self::start_with(connections_yaml, secrets, true).await
    }

    /// Starts with no playbooks or rules, and the given secrets.
    pub async fn start_with_secrets(connections_yaml: &str, secrets: &[(&str, &str)]) -> Riposte {
        Self::start_with(connections_yaml, secrets, false).await
    }

    /// Starts with no playbooks or rules.
    pub async fn start_empty(connections_yaml: &str) -> Riposte {
        Self::start_with(connections_yaml, &[], false).await
    }

    async fn start_with(
        connections_yaml: &str,
        secrets: &[(&str, &str)],
        examples: bool,
    ) -> Riposte {
        let dir = tempfile::tempdir().unwrap();
        let conn_path = dir.path().join("connections.yaml");
        std::fs::write(&conn_path, connections_yaml).unwrap();
        let sender = sender(secrets_from(secrets));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let clock = Arc::new(OffsetClock::default());
        let local = build(
            &dir.path().join("riposte.db"),
            {
                let mut c = load_connections(&conn_path).unwrap();
                c.allow_any_host = true;
                c
            },
            riposte_core::connector::ConnectorCatalog::shipped(),
            url.clone(),
            sender,
            clock.clone(),
        )
        .unwrap();
        if examples {
            seed(&local, &repo().join("infra")).await.unwrap();
        }
        let keys = ApiKeys::new()
            .with(OPERATOR_KEY, "olivia", Role::Operator)
            .with(CONTRIBUTOR_KEY, "carl", Role::Contributor);
        let app = riposte_api::router(AppState {
            service: local.service.clone(),
            auth: Arc::new(keys),
            slack: Some(Arc::new(riposte_core::slack::SlackVerifier::new(
                SLACK_SIGNING_SECRET,
            ))),
            webhooks: Arc::new(
                [(
                    "edr".to_string(),
                    riposte_core::callback::CallbackVerifier::new(
                        riposte_core::callback::Scheme::Riposte,
                        WEBHOOK_SECRET,
                    ),
                )]
                .into(),
            ),
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(run_worker(
            local.store.clone(),
            local.service.clone(),
            16,
            stop_rx,
        ));
        Riposte {
            url,
            local,
            clock,
            dir,
            http: reqwest::Client::new(),
            stop,
        }
    }

    /// Moves the clock forward and wakes the worker, as the passing of that time would.
    pub fn advance(&self, ms: Millis) {
        self.clock.advance(ms);
        self.local.store.enqueued.notify_one();
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.url));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Waits for a run to end and checks it succeeded (showing its timeline if not).
    pub async fn succeeded(&self, id: &str) -> Run {
        let run = self
            .wait_run(id, "finished", |run| run.status.is_terminal())
            .await;
        assert_eq!(
            run.status,
            riposte_core::run::RunStatus::Succeeded,
            "{}",
            riposte::timeline::render(&run)
        );
        run
    }

    /// Polls a run until `done` says so (at most 10 s).
    pub async fn wait_run(&self, id: &str, what: &str, done: impl Fn(&Run) -> bool) -> Run {
        for _ in 0..1000 {
            if let Some((run, _)) = self.local.store.load_run(id).await.ok().flatten()
                && done(&run)
            {
                return run;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let run = self
            .local
            .store
            .load_run(id)
            .await
            .ok()
            .flatten()
            .map(|(r, _)| r);
        panic!(
            "run {id} never became {what}: {}",
            run.map(|r| riposte::timeline::render(&r))
                .unwrap_or_default()
        );
    }
}
