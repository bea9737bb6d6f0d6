//! Riposte's HTTP routes as one axum [`Router`]: API Gateway serves it through lambda_http on AWS,
//! `riposte serve` serves it on localhost. Two hosts, one behaviour.
//!
//! Guarantee: every route that starts or reads runs needs the operator role; every route that
//! changes rules or playbooks needs the contributor role; approval links need only their signed
//! token, and `GET` on one only shows a confirm page: only `POST` decides.

mod html;

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use riposte_core::callback::{CallbackVerifier, Scheme};
use riposte_core::playbook::{self, Problems};
use riposte_core::rule::Rule;
use riposte_core::run::RunStatus;
use riposte_core::service::{Error, Service};
use riposte_core::slack::{SlackVerifier, presses};

/// The largest request body accepted on any route.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Start runs and read them.
    Operator,
    /// Also create, change, enable, disable and delete rules and playbooks.
    Contributor,
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
}

/// Decides who a request comes from: API keys locally, the IAM/JWT context on AWS.
pub trait Authenticator: Send + Sync {
    fn principal(&self, headers: &HeaderMap) -> Option<Principal>;
}

/// API keys mapped to principals (the local runtime).
#[derive(Default)]
pub struct ApiKeys {
    keys: HashMap<String, Principal>,
}

impl ApiKeys {
    pub fn new() -> ApiKeys {
        ApiKeys::default()
    }

    pub fn with(mut self, key: &str, name: &str, role: Role) -> ApiKeys {
        self.keys.insert(
            key.to_string(),
            Principal {
                name: name.into(),
                role,
            },
        );
        self
    }

    /// Parses `KEY:NAME:ROLE[,KEY:NAME:ROLE...]` (ROLE is `operator` or `contributor`).
    pub fn parse(spec: &str) -> Result<ApiKeys, String> {
        let mut keys = ApiKeys::new();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let parts: Vec<&str> = entry.split(':').collect();
            let [key, name, role] = parts.as_slice() else {
                return Err("each API key entry is KEY:NAME:ROLE".into());
            };
            let role = match *role {
                "operator" => Role::Operator,
                "contributor" => Role::Contributor,
                other => return Err(format!("unknown role `{other}` (operator or contributor)")),
            };
            if key.len() < 16 {
                return Err(format!(
                    "the API key for {name} is shorter than 16 characters"
                ));
            }
            keys = keys.with(key, name, role);
        }
        Ok(keys)
    }
}

impl Authenticator for ApiKeys {
    fn principal(&self, headers: &HeaderMap) -> Option<Principal> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))?;
        // Compare against every key in constant time per key.
        use subtle::ConstantTimeEq;
        let mut found = None;
        for (k, p) in &self.keys {
            if k.len() == presented.len() && bool::from(k.as_bytes().ct_eq(presented.as_bytes())) {
                found = Some(p.clone());
            }
        }
        found
    }
}

#[derive(Clone)]
pub struct AppState {
    pub service: Arc<Service>,
    pub auth: Arc<dyn Authenticator>,
    /// Verifies Slack's interactivity callbacks; `None` when no signing secret is configured.
    pub slack: Option<Arc<SlackVerifier>>,
    /// Signed alert webhooks, by name (`POST /webhooks/{name}`).
    pub webhooks: Arc<HashMap<String, CallbackVerifier>>,
}

/// An error answered as JSON: `{"error": "...", "problems": [...]}` with its status.
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut body = json!({"error": self.0.to_string()});
        if let Error::Invalid(p) = &self.0 {
            body["problems"] = serde_json::to_value(&p.0).unwrap_or(Value::Null);
        }
        (status, Json(body)).into_response()
    }
}

fn require(state: &AppState, headers: &HeaderMap, role: Role) -> Result<Principal, ApiError> {
    let p = state.auth.principal(headers).ok_or_else(|| {
        ApiError(Error::Forbidden(
            "missing or unknown API key (send `Authorization: Bearer KEY`)".into(),
        ))
    })?;
    if p.role < role {
        return Err(ApiError(Error::Forbidden(format!(
            "{} has the operator role; this needs the contributor role",
            p.name
        ))));
    }
    Ok(p)
}

/// The Slack verifier from `RIPOSTE_SLACK_SIGNING_SECRET` (the Slack app's signing secret), if set.
pub fn slack_from_env() -> Option<Arc<SlackVerifier>> {
    std::env::var("RIPOSTE_SLACK_SIGNING_SECRET")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .map(|s| Arc::new(SlackVerifier::new(s.trim())))
}

/// Alert webhooks from `RIPOSTE_WEBHOOKS`: `name=secret` pairs (comma- or newline-separated),
/// each declaring `POST /webhooks/<name>` signed with that shared secret.
pub fn webhooks_from_env() -> Arc<HashMap<String, CallbackVerifier>> {
    Arc::new(parse_webhooks(
        &std::env::var("RIPOSTE_WEBHOOKS").unwrap_or_default(),
    ))
}

/// Parses `name=secret` pairs; pairs with an invalid name or an empty secret are skipped (and
/// logged, without the secret).
pub fn parse_webhooks(spec: &str) -> HashMap<String, CallbackVerifier> {
    spec.split([',', '\n'])
        .filter(|p| !p.trim().is_empty())
        .filter_map(|pair| {
            let (name, secret) = pair.split_once('=').unwrap_or((pair, ""));
            let name = name.trim();
            if !riposte_core::event::valid_webhook_name(name) || secret.trim().is_empty() {
                tracing::warn!(message = "RIPOSTE_WEBHOOKS entry skipped: expected name=secret with a name of [a-z0-9_-].", name = %name.chars().take(64).collect::<String>());
                return None;
            }
            Some((
                name.to_string(),
                CallbackVerifier::new(Scheme::Riposte, secret.trim()),
            ))
        })
        .collect()
}

/// The router every host serves.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"ok": true})) }))
        .route("/events", post(post_event))
        .route("/events/{id}", get(get_event))
        .route("/runs", post(start_run).get(list_runs))
        .route("/runs/{id}", get(get_run))
        .route("/runs/{id}/cancel", post(cancel_run))
        .route("/runs/{id}/approvals/{step}", post(answer_approval))
        .route(
            "/approvals/{token}",
            get(approval_page).post(approval_decide),
        )
        .route("/slack/interactions", post(slack_interaction))
        .route("/webhooks/{name}", post(post_webhook))
        .route("/playbooks", get(list_playbooks))
        .route(
            "/playbooks/{id}",
            get(get_playbook).put(put_playbook).delete(delete_playbook),
        )
        .route("/rules", get(list_rules))
        .route(
            "/rules/{id}",
            get(get_rule).put(put_rule).delete(delete_rule),
        )
        .route("/rules/{id}/enable", post(enable_rule))
        .route("/rules/{id}/disable", post(disable_rule))
        .route("/audit", get(audit))
        .route("/kill-switch", get(get_kill_switch).put(put_kill_switch))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

fn parse_json(body: &Bytes, what: &str) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError(Error::BadRequest(format!("{what} is not valid JSON: {e}"))))
}

async fn post_event(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    require(&s, &headers, Role::Operator)?;
    if body.len() > riposte_core::event::MAX_EVENT_BYTES {
        return Err(ApiError(Error::TooLarge(format!(
            "event is {} bytes; the limit is {}",
            body.len(),
            riposte_core::event::MAX_EVENT_BYTES
        ))));
    }
    let event = parse_json(&body, "the event")?;
    let out = s.service.ingest_event(&event).await?;
    Ok((StatusCode::ACCEPTED, Json(out)).into_response())
}

/// An alert another tool posts, signed with the webhook's secret (`X-Riposte-Timestamp`,
/// `X-Riposte-Signature: sha256=HMAC(secret, "<timestamp>.<body>")`): no API key, the signature
/// authorizes it (5-minute window, constant-time compare, replay cache).
async fn post_webhook(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(verifier) = s.webhooks.get(&name) else {
        return Err(ApiError(Error::NotFound(format!(
            "no webhook `{name}` (declare it in RIPOSTE_WEBHOOKS as {name}=SECRET)"
        ))));
    };
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let (ts, sig) = Scheme::Riposte.headers();
    if let Err(e) = verifier.verify(header(ts), header(sig), &body, s.service.deps().clock.now()) {
        tracing::warn!(message = "Webhook refused.", webhook = %name, reason = %e);
        return Ok((
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": format!("webhook `{name}`: {e}")})),
        )
            .into_response());
    }
    if body.len() > riposte_core::event::MAX_EVENT_BYTES {
        return Err(ApiError(Error::TooLarge(format!(
            "alert is {} bytes; the limit is {}",
            body.len(),
            riposte_core::event::MAX_EVENT_BYTES
        ))));
    }
    let alert = parse_json(&body, "the alert")?;
    let event = riposte_core::event::webhook::envelope(&name, alert);
    let out = s.service.ingest_event(&event).await?;
    Ok((StatusCode::ACCEPTED, Json(out)).into_response())
}

async fn get_event(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require(&s, &headers, Role::Operator)?;
    let rec = s
        .service
        .deps()
        .store
        .get_event(&id)
        .await
        .map_err(Error::from)?
        .ok_or_else(|| Error::NotFound(format!("event `{id}` not found")))?;
    Ok(Json(rec).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRun {
    playbook: String,
    #[serde(default)]
    input: Value,
}

async fn start_run(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let p = require(&s, &headers, Role::Operator)?;
    let req: StartRun = serde_json::from_value(parse_json(&body, "the request")?).map_err(|e| {
        Error::BadRequest(format!(
            "request: {e} (expected {{\"playbook\": ID, \"input\": {{...}}}})"
        ))
    })?;
    let run = s
        .service
        .start_run(&req.playbook, req.input, &p.name)
        .await?;
    Ok((StatusCode::CREATED, Json(run)).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

async fn list_runs(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    require(&s, &headers, Role::Operator)?;
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(st) => Some(
            serde_json::from_value::<RunStatus>(Value::String(st.into()))
                .map_err(|_| Error::BadRequest(format!("unknown status `{st}`")))?,
        ),
    };
    let runs = s
        .service
        .deps()
        .store
        .list_runs(q.limit.unwrap_or(50).min(1000), status)
        .await
        .map_err(Error::from)?;
    Ok(Json(runs).into_response())
}

async fn get_run(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require(&s, &headers, Role::Operator)?;
    let (run, _) = s.service.load(&id).await?;
    Ok(Json(run).into_response())
}

async fn cancel_run(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = require(&s, &headers, Role::Operator)?;
    Ok(Json(s.service.cancel_run(&id, &p.name).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    choice: String,
    #[serde(default)]
    iteration: u32,
}

async fn answer_approval(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((id, step)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let p = require(&s, &headers, Role::Operator)?;
    let a: Answer = serde_json::from_value(parse_json(&body, "the answer")?)
        .map_err(|e| Error::BadRequest(format!("answer: {e} (expected {{\"choice\": ..}})")))?;
    Ok(Json(
        s.service
            .decide_as(&id, &step, a.iteration, &a.choice, &p.name)
            .await?,
    )
    .into_response())
}

async fn approval_page(State(s): State<AppState>, Path(token): Path<String>) -> Response {
    match s.service.approval_view(&token).await {
        Ok(view) => html::page(StatusCode::OK, &html::confirm(&view)),
        Err(e) => html::page(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
            &html::refused(&e.to_string()),
        ),
    }
}

async fn approval_decide(
    State(s): State<AppState>,
    Path(token): Path<String>,
    body: Bytes,
) -> Response {
    let approver = url::form_urlencoded::parse(&body)
        .find(|(k, _)| k == "approver")
        .map(|(_, v)| v.into_owned());
    match s.service.decide(&token, approver.as_deref()).await {
        Ok(view) => html::page(StatusCode::OK, &html::decided(&view)),
        Err(e) => html::page(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
            &html::refused(&e.to_string()),
        ),
    }
}

/// Slack's interactivity Request URL: a Riposte button pressed in Slack. Verified by the signing
/// secret (5-minute window, constant-time compare, replay cache), then decided with the button's
/// signed token as `slack:<user id>`.
async fn slack_interaction(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(verifier) = &s.slack else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "Slack interactivity is not configured (set RIPOSTE_SLACK_SIGNING_SECRET)"})),
        )
            .into_response();
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now = s.service.deps().clock.now();
    if let Err(e) = verifier.verify(
        header("x-slack-request-timestamp"),
        header("x-slack-signature"),
        &body,
        now,
    ) {
        tracing::warn!(message = "Slack callback refused.", reason = %e);
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": e.to_string()})),
        )
            .into_response();
    }
    let presses = match presses(&body) {
        Ok(p) => p,
        Err(e) => return (StatusCode::BAD_REQUEST, Json(json!({"error": e}))).into_response(),
    };
    let mut results = Vec::new();
    for p in presses {
        // Slack shows nothing of this answer; the channels' `on_decided` updates tell everyone.
        match s.service.decide(&p.token, Some(&p.user)).await {
            Ok(view) => results.push(json!({"decided": view.choice, "by": p.user})),
            Err(e) => results.push(json!({"refused": e.to_string(), "status": e.status()})),
        }
    }
    Json(json!({"results": results})).into_response()
}

async fn get_kill_switch(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require(&s, &headers, Role::Operator)?;
    let k = s.service.kill_switch().await?;
    Ok(Json(json!({"on": k.as_ref().is_some_and(|k| k.on), "last_change": k})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KillSwitchChange {
    on: bool,
    #[serde(default)]
    reason: String,
}

/// Turns the kill switch on (no automatic run starts; running ones stop) or off: contributors.
async fn put_kill_switch(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let p = require(&s, &headers, Role::Contributor)?;
    let change: KillSwitchChange = serde_json::from_slice(&body).map_err(|e| {
        ApiError(Error::BadRequest(format!(
            "kill switch: {e} (expected {{\"on\": true|false, \"reason\": \"...\"}})"
        )))
    })?;
    let k = s
        .service
        .set_kill_switch(change.on, &change.reason, &p.name)
        .await?;
    Ok(Json(k).into_response())
}

async fn list_playbooks(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require(&s, &headers, Role::Operator)?;
    let list = s
        .service
        .deps()
        .store
        .list_playbooks()
        .await
        .map_err(Error::from)?;
    Ok(Json(list).into_response())
}

#[derive(Deserialize)]
struct VersionQuery {
    #[serde(default)]
    version: Option<u32>,
}

async fn get_playbook(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<VersionQuery>,
) -> Result<Response, ApiError> {
    require(&s, &headers, Role::Operator)?;
    let pb = s
        .service
        .deps()
        .store
        .get_playbook(&id, q.version)
        .await
        .map_err(Error::from)?
        .ok_or_else(|| Error::NotFound(format!("playbook `{id}` not found")))?;
    Ok(Json(pb).into_response())
}

/// A body that is JSON, or YAML when the content type says so.
fn parse_source(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    let yaml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("yaml"));
    if yaml {
        let text =
            std::str::from_utf8(body).map_err(|_| Error::BadRequest("body is not UTF-8".into()))?;
        serde_yaml_value(text)
    } else {
        parse_json(body, "the body")
    }
}

fn serde_yaml_value(text: &str) -> Result<Value, ApiError> {
    playbook::parse_spec(text, None)
        .map(|spec| serde_json::to_value(spec).unwrap_or(Value::Null))
        .map_err(|p| ApiError(Error::Invalid(p)))
}

async fn put_playbook(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let p = require(&s, &headers, Role::Contributor)?;
    let value = parse_source(&headers, &body)?;
    let spec = playbook::spec_from_value(value, None).map_err(Error::Invalid)?;
    if spec.id != id {
        return Err(ApiError(Error::BadRequest(format!(
            "the body's id `{}` is not the URL's `{id}`",
            spec.id
        ))));
    }
    let stored = s.service.put_playbook(spec, &p.name).await?;
    Ok((StatusCode::OK, Json(stored)).into_response())
}

async fn delete_playbook(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = require(&s, &headers, Role::Contributor)?;
    s.service.delete_playbook(&id, &p.name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_rules(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    require(&s, &headers, Role::Operator)?;
    Ok(Json(s.service.list_rules().await?).into_response())
}

async fn get_rule(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require(&s, &headers, Role::Operator)?;
    let r = s
        .service
        .deps()
        .store
        .get_rule(&id)
        .await
        .map_err(Error::from)?
        .ok_or_else(|| Error::NotFound(format!("rule `{id}` not found")))?;
    Ok(Json(r).into_response())
}

async fn put_rule(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let p = require(&s, &headers, Role::Contributor)?;
    let rule: Rule = if headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("yaml"))
    {
        Rule::parse(std::str::from_utf8(&body).unwrap_or(""), None).map_err(Error::Invalid)?
    } else {
        serde_json::from_value(parse_json(&body, "the rule")?)
            .map_err(|e| Error::Invalid(Problems::one(None, "", e.to_string())))?
    };
    if rule.id != id {
        return Err(ApiError(Error::BadRequest(format!(
            "the body's id `{}` is not the URL's `{id}`",
            rule.id
        ))));
    }
    Ok(Json(s.service.put_rule(rule, &p.name).await?).into_response())
}

async fn enable_rule(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = require(&s, &headers, Role::Contributor)?;
    Ok(Json(s.service.set_rule_enabled(&id, true, &p.name).await?).into_response())
}

async fn disable_rule(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = require(&s, &headers, Role::Contributor)?;
    Ok(Json(s.service.set_rule_enabled(&id, false, &p.name).await?).into_response())
}

async fn delete_rule(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = require(&s, &headers, Role::Contributor)?;
    s.service.delete_rule(&id, &p.name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn audit(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    require(&s, &headers, Role::Contributor)?;
    Ok(Json(
        s.service
            .deps()
            .store
            .list_audit(500)
            .await
            .map_err(Error::from)?,
    )
    .into_response())
}

/// JSON for a page that needs it (unused by the HTML routes).
pub fn html_response(status: StatusCode, body: String) -> Response {
    (status, Html(body)).into_response()
}
