//! Test support: a real axum HTTP server on 127.0.0.1 (random port) that records every request
//! exactly (method, path, raw query, headers in order, body bytes) and every accepted TCP
//! connection, and answers as each test scripts it.
//!
//! Guarantee: it only ever listens on 127.0.0.1, and the server task is aborted when the
//! [`TestServer`] is dropped.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::response::Response;
use axum::serve::ListenerExt;
use riposte_core::http::{Auth, Connection, HttpRequest, SecretRef};
use riposte_http::{EgressPolicy, ReqwestSender, StaticSecrets};

/// One request as the server received it.
#[derive(Clone, Debug, PartialEq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// The raw (still percent-encoded) query string.
    pub query: Option<String>,
    /// Lower-cased names, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    /// The only value of a header; panics when it appears more than once.
    pub fn header(&self, name: &str) -> Option<&str> {
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect();
        assert!(
            values.len() <= 1,
            "header {name} sent {} times",
            values.len()
        );
        values.first().copied()
    }

    /// Header names received, sorted.
    pub fn header_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        names
    }

    pub fn body_text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("UTF-8 body")
    }
}

/// How the server answers one request.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub delay: Duration,
    /// Sent with chunked transfer encoding, without a Content-Length.
    pub chunked: bool,
}

impl Reply {
    pub fn json(status: u16, value: serde_json::Value) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(&value).unwrap(),
            delay: Duration::ZERO,
            chunked: false,
        }
    }

    pub fn text(status: u16, text: &str) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: text.as_bytes().to_vec(),
            delay: Duration::ZERO,
            chunked: false,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn chunked(mut self) -> Self {
        self.chunked = true;
        self
    }

    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Responder = dyn Fn(&Recorded, usize) -> Reply + Send + Sync;

#[derive(Clone)]
struct Shared {
    requests: Arc<Mutex<Vec<Recorded>>>,
    responder: Arc<Responder>,
}

/// A running recording server.
pub struct TestServer {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// Starts a server on 127.0.0.1. The responder gets the request and how many requests to the
    /// same path the server has received, this one included (1 for the first).
    pub async fn start(
        responder: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let listener = listener.tap_io(move |_io| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let shared = Shared {
            requests: requests.clone(),
            responder: Arc::new(responder),
        };
        let app = Router::new().fallback(handle).with_state(shared);
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            addr,
            requests,
            connections,
            task,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub fn requests_to(&self, path: &str) -> usize {
        self.requests().iter().filter(|r| r.path == path).count()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(shared): State<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = to_bytes(body, 16 * 1024 * 1024).await.unwrap().to_vec();
    let recorded = Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    };
    let nth = {
        let mut requests = shared.requests.lock().unwrap();
        requests.push(recorded.clone());
        requests.iter().filter(|r| r.path == recorded.path).count()
    };
    let reply = (shared.responder)(&recorded, nth);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut response = Response::builder().status(reply.status);
    for (name, value) in &reply.headers {
        response = response.header(name, value);
    }
    let body = if reply.chunked {
        // A stream has no known length: hyper sends it chunked.
        Body::from_stream(Body::from(reply.body).into_data_stream())
    } else {
        Body::from(reply.body)
    };
    response.body(body).unwrap()
}

/// A connection to `base_url` with the given auth and defaults otherwise.
pub fn connection(base_url: &str, auth: Auth) -> Connection {
    Connection {
        name: "acme".into(),
        base_url: base_url.into(),
        auth,
        headers: BTreeMap::new(),
        timeout_ms: 10_000,
        max_response_bytes: 1024 * 1024,
    }
}

/// A bare request through the `acme` connection.
pub fn request(method: &str, path: &str) -> HttpRequest {
    HttpRequest {
        connection: "acme".into(),
        method: method.into(),
        path: path.into(),
        query: Vec::new(),
        headers: BTreeMap::new(),
        body: None,
        idempotency_key: None,
        timeout_ms: None,
        any_status: false,
    }
}

pub fn secret(name: &str) -> SecretRef {
    SecretRef {
        secret: name.into(),
    }
}

/// A sender allowed to reach the local test server, with the given secrets.
pub fn sender(secrets: &[(&str, &str)]) -> ReqwestSender {
    sender_with(secrets, EgressPolicy::permissive_for_tests())
}

pub fn sender_with(secrets: &[(&str, &str)], policy: EgressPolicy) -> ReqwestSender {
    let secrets = StaticSecrets::from_pairs(secrets.iter().copied());
    ReqwestSender::new(Arc::new(secrets), policy)
}
