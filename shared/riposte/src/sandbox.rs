//! `riposte serve --demo`: vendor stand-ins inside the local server, so the example playbook runs
//! end to end on a laptop with no accounts and no network. Every declared connection is pointed
//! at `/sandbox/NAME` on this server (an OAuth2 token URL too) with demo credentials (see
//! [`sender`]); each request is printed and kept (GET `/sandbox` lists them: the demo's outbox,
//! where the approval links arrive) and answered as the vendor would: ServiceNow's Table API,
//! Slack's chat.postMessage / chat.update, SES v2 SendEmail, the PAN-OS XML API (an XML answer),
//! the Microsoft identity platform and Graph, Security Hub's BatchUpdateFindings, PagerDuty's
//! Events API. Anything else gets the connection's entry in
//! `events/responses/block-or-ignore.json`, else a 404.
//!
//! Only for demos: nothing in it is used by the tests that check the vendors' requests.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde_json::{Value, json};

use riposte_core::connector::Connections;
use riposte_core::http::{Auth, Connection};
use riposte_core::ports::{HttpSender, SecretError, Secrets};
use riposte_http::{AwsCredentials, EgressPolicy, ReqwestSender, StaticAwsCredentials};

/// The vendor answers the sandbox falls back on, by connection name.
const RESPONSES: &str = include_str!("../../../events/responses/block-or-ignore.json");

/// The value every secret has in the demo (the sandbox checks no credential).
pub const DEMO_SECRET: &str = "riposte-demo-secret";

#[derive(Clone, Default)]
pub struct Sandbox {
    seen: Arc<Mutex<Vec<Value>>>,
    responses: Arc<BTreeMap<String, Value>>,
    /// Numbers the answers (ServiceNow incidents, Slack ts, SES message ids).
    counter: Arc<AtomicU64>,
    /// ServiceNow incidents by sys_id: their number.
    incidents: Arc<Mutex<HashMap<String, String>>>,
}

/// Every connection of `connections`, pointed at the sandbox under `base`, its auth kept (the
/// connectors require their auth types) with an OAuth2 token URL pointed at the sandbox too.
pub fn redirect(connections: &Connections, base: &str) -> Connections {
    let base = base.trim_end_matches('/');
    Connections::from_list(
        connections
            .names()
            .filter_map(|n| connections.get(n))
            .map(|c| {
                let here = format!("{base}/sandbox/{}", c.name);
                let auth = match &c.auth {
                    Auth::Oauth2ClientCredentials {
                        client_id,
                        client_secret,
                        scope,
                        ..
                    } => Auth::Oauth2ClientCredentials {
                        token_url: format!("{here}/oauth2/v2.0/token"),
                        client_id: client_id.clone(),
                        client_secret: client_secret.clone(),
                        scope: scope.clone(),
                    },
                    other => other.clone(),
                };
                Connection {
                    base_url: here,
                    auth,
                    ..c.clone()
                }
            })
            .collect(),
    )
}

/// Every secret is [`DEMO_SECRET`].
struct DemoSecrets;

#[async_trait]
impl Secrets for DemoSecrets {
    async fn get(&self, _name: &str) -> Result<String, SecretError> {
        Ok(DEMO_SECRET.to_string())
    }
}

/// The sender of a demo server: demo secrets and AWS credentials (the sandbox checks none), and
/// loopback egress allowed (the sandbox is on this server).
pub fn sender() -> Arc<dyn HttpSender> {
    let aws = AwsCredentials::new("AKIDRIPOSTEDEMO", DEMO_SECRET, None);
    Arc::new(
        ReqwestSender::new(Arc::new(DemoSecrets), EgressPolicy::permissive_for_tests())
            .with_aws_credentials(Arc::new(StaticAwsCredentials::new(aws))),
    )
}

impl Sandbox {
    pub fn new() -> Sandbox {
        Sandbox {
            responses: Arc::new(serde_json::from_str(RESPONSES).unwrap_or_default()),
            ..Default::default()
        }
    }

    pub fn router(self) -> Router {
        Router::new()
            .route("/sandbox", get(list))
            .route("/sandbox/{name}/{*rest}", any(receive))
            .with_state(self)
    }

    fn next(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::SeqCst) + 1
    }
}

async fn list(State(s): State<Sandbox>) -> Json<Value> {
    Json(Value::Array(
        s.seen.lock().map(|v| v.clone()).unwrap_or_default(),
    ))
}

/// One vendor answer.
enum Answer {
    Json(u16, Value),
    Xml(String),
    Empty(u16),
}

async fn receive(
    State(s): State<Sandbox>,
    Path((name, rest)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) if form => Value::Object(
            url::form_urlencoded::parse(&body)
                .into_owned()
                .map(|(k, v)| match k.as_str() {
                    // Not shown, even a demo one.
                    "client_secret" => (k, Value::String("(redacted)".into())),
                    _ => (k, Value::String(v)),
                })
                .collect(),
        ),
        Err(_) if body.is_empty() => Value::Null,
        Err(_) => Value::String(String::from_utf8_lossy(&body).into_owned()),
    };
    let path = format!("/{rest}");
    println!(
        "[sandbox] {name}: {method} {path}{}\n{}",
        uri.query().map(|q| format!("?{q}")).unwrap_or_default(),
        serde_json::to_string_pretty(&body).unwrap_or_default()
    );
    if let Ok(mut seen) = s.seen.lock()
        && seen.len() < 10_000
    {
        seen.push(json!({"connection": name, "method": method.as_str(), "path": path, "query": uri.query(), "body": body}));
    }
    match answer(&s, &name, &method, &path, &body) {
        Answer::Json(status, v) => (status_code(status), Json(v)).into_response(),
        Answer::Xml(text) => (
            StatusCode::OK,
            [(CONTENT_TYPE, "application/xml; charset=UTF-8")],
            text,
        )
            .into_response(),
        Answer::Empty(status) => status_code(status).into_response(),
    }
}

fn status_code(s: u16) -> StatusCode {
    StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// What the vendor answers, by its API path.
fn answer(s: &Sandbox, name: &str, method: &Method, path: &str, body: &Value) -> Answer {
    let m = method.as_str();
    // ServiceNow Table API.
    if path == "/api/now/table/incident" && m == "POST" {
        let n = s.next();
        let sys_id = format!(
            "{:032x}",
            0x9d38_5017_c611_2287_01d2_2104_cc95_c371_u128 + u128::from(n)
        );
        let number = format!("INC{:07}", 10_041 + n);
        if let Ok(mut inc) = s.incidents.lock() {
            inc.insert(sys_id.clone(), number.clone());
        }
        return Answer::Json(
            201,
            json!({"result": {"sys_id": sys_id, "number": number, "state": "1", "sys_created_on": servicenow_now()}}),
        );
    }
    if let Some(sys_id) = path.strip_prefix("/api/now/table/incident/")
        && m == "PATCH"
    {
        let Some(number) = s.incidents.lock().ok().and_then(|i| i.get(sys_id).cloned()) else {
            return Answer::Json(
                404,
                json!({"error": {"message": "No Record found", "detail": "Record doesn't exist or ACL restricts the record retrieval"}, "status": "failure"}),
            );
        };
        let now = servicenow_now();
        let mut result = json!({"sys_id": sys_id, "number": number, "state": body.get("state").cloned().unwrap_or(json!("2")), "sys_updated_on": now});
        match body.get("state").and_then(Value::as_str) {
            Some("6") => result["resolved_at"] = json!(now),
            Some("7") => result["closed_at"] = json!(now),
            _ => {}
        }
        return Answer::Json(200, json!({ "result": result }));
    }
    // Slack Web API: a channel id for a #name, a fresh ts per message.
    if path == "/api/chat.postMessage" {
        let channel = slack_channel(body.get("channel"));
        let ts = format!("{}.{:06}", unix_secs(), s.next() * 100);
        return Answer::Json(
            200,
            json!({"ok": true, "channel": channel, "ts": ts, "message": {"type": "message", "text": body.get("text"), "ts": ts}}),
        );
    }
    if path == "/api/chat.update" {
        return Answer::Json(
            200,
            json!({"ok": true, "channel": body.get("channel"), "ts": body.get("ts"), "text": body.get("text"), "message": {"type": "message", "text": body.get("text")}}),
        );
    }
    // Amazon SES v2 SendEmail.
    if path == "/v2/email/outbound-emails" && m == "POST" {
        let id = format!(
            "0100019b7a5e1c2d-{:08x}-2b6c-4d8e-9f01-23456789abcd-000000",
            s.next()
        );
        return Answer::Json(200, json!({ "MessageId": id }));
    }
    // PAN-OS XML API, User-ID register / unregister: an XML answer.
    if path == "/api/" && m == "POST" {
        let what = body
            .get("cmd")
            .and_then(Value::as_str)
            .filter(|c| c.contains("<unregister>"))
            .map_or("register", |_| "unregister");
        return Answer::Xml(format!(
            "<response status=\"success\"><result><uid-response><version>2.0</version><payload><{what}></{what}></payload></uid-response></result></response>"
        ));
    }
    // Microsoft identity platform (client credentials) and Graph v1.0 users.
    if path.ends_with("/oauth2/v2.0/token") && m == "POST" {
        return Answer::Json(
            200,
            json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": format!("riposte-demo-access-token-{}", s.next())}),
        );
    }
    if let Some(user) = path.strip_prefix("/v1.0/users/") {
        if m == "PATCH" && !user.contains('/') {
            return Answer::Empty(204);
        }
        if m == "POST" && user.ends_with("/revokeSignInSessions") {
            return Answer::Json(
                200,
                json!({"@odata.context": "https://graph.microsoft.com/v1.0/$metadata#Edm.Boolean", "value": true}),
            );
        }
    }
    // Security Hub BatchUpdateFindings: every finding processed.
    if path == "/findings/batchupdate" && m == "PATCH" {
        return Answer::Json(
            200,
            json!({"ProcessedFindings": body.get("FindingIdentifiers").cloned().unwrap_or(json!([])), "UnprocessedFindings": []}),
        );
    }
    // PagerDuty Events API v2.
    if path == "/v2/enqueue" && m == "POST" {
        return Answer::Json(
            202,
            json!({"status": "success", "message": "Event processed", "dedup_key": body.get("dedup_key")}),
        );
    }
    match s.responses.get(name) {
        Some(Value::String(xml)) => Answer::Xml(xml.clone()),
        Some(v) => Answer::Json(200, v.clone()),
        None => Answer::Json(
            404,
            json!({"error": format!("the sandbox does not know {m} {path}")}),
        ),
    }
}

/// Slack answers a channel's id: `#soc-alerts` is `C0SOCALERTS` here.
fn slack_channel(channel: Option<&Value>) -> String {
    let c = channel.and_then(Value::as_str).unwrap_or("general");
    match c.strip_prefix('#') {
        Some(name) => format!(
            "C0{}",
            name.chars()
                .filter(char::is_ascii_alphanumeric)
                .collect::<String>()
                .to_ascii_uppercase()
        ),
        None => c.to_string(),
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// ServiceNow's date-time format (UTC): `2026-01-01 00:00:00`.
fn servicenow_now() -> String {
    chrono::Utc::now().format("%Y-%m-%d %H:%M:%S").to_string()
}
