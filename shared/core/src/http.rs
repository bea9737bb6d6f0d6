//! What an HTTP action asks for, fully rendered, and what came back.
//!
//! The engine renders a step's inputs into an [`HttpRequest`]; an adapter (`riposte-http`) sends
//! it. The scheme and host come only from a declared [`Connection`], never from an expression, and
//! credentials only from the connection's [`Auth`], resolved through [`crate::ports::Secrets`] at
//! call time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A reference to a secret: its name in the secret store (Secrets Manager on AWS, the environment
/// or a file locally). The value never enters the model, the run or a log.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SecretRef {
    pub secret: String,
}

/// How a connection authenticates. Every credential is a [`SecretRef`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Auth {
    None,
    Bearer {
        token: SecretRef,
    },
    Basic {
        username: String,
        password: SecretRef,
    },
    /// A key sent in a header (e.g. `X-PAN-KEY`, `Authorization: SSWS ...`) or a query parameter.
    ApiKey {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        header: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        query: Option<String>,
        /// Text put before the key, e.g. `"SSWS "`.
        #[serde(default)]
        prefix: String,
        key: SecretRef,
    },
    /// OAuth2 client credentials grant (RFC 6749 §4.4); the token is cached until shortly before
    /// it expires.
    Oauth2ClientCredentials {
        token_url: String,
        client_id: String,
        client_secret: SecretRef,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scope: Option<String>,
    },
    /// AWS Signature Version 4 with the host's AWS credentials (the function's role on AWS; the
    /// standard AWS environment variables locally).
    AwsSigv4 {
        service: String,
        region: String,
    },
    /// A secret placed in a member of the JSON body (PagerDuty's `routing_key`); the member is
    /// never shown.
    JsonBodyKey {
        member: String,
        key: SecretRef,
    },
    /// A signed webhook: `header` carries `sha256=` and the hex HMAC-SHA256, keyed by the secret,
    /// of `<unix seconds>.<body>`; `timestamp_header` carries the seconds, so the receiver can
    /// refuse stale or replayed deliveries.
    Hmac {
        secret: SecretRef,
        #[serde(default = "default_hmac_header")]
        header: String,
        #[serde(default = "default_hmac_timestamp_header")]
        timestamp_header: String,
    },
}

fn default_hmac_header() -> String {
    "X-Riposte-Signature".into()
}
fn default_hmac_timestamp_header() -> String {
    "X-Riposte-Timestamp".into()
}

impl Auth {
    /// The `type` name, as connectors list it.
    pub fn kind(&self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Bearer { .. } => "bearer",
            Auth::Basic { .. } => "basic",
            Auth::ApiKey { .. } => "api_key",
            Auth::Oauth2ClientCredentials { .. } => "oauth2_client_credentials",
            Auth::AwsSigv4 { .. } => "aws_sigv4",
            Auth::Hmac { .. } => "hmac",
            Auth::JsonBodyKey { .. } => "json_body_key",
        }
    }
}

/// A named, declared endpoint: the only place a scheme, host and credentials come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connection {
    /// Filled from the key it is declared under.
    #[serde(default)]
    pub name: String,
    /// e.g. `https://acme.service-now.com`; requests go to `base_url` + the step's `path`.
    pub base_url: String,
    #[serde(default = "default_auth")]
    pub auth: Auth,
    /// Extra headers sent on every request (not secret).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Per-request timeout in milliseconds (default 10 s).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Responses larger than this are refused (default 1 MiB).
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u64,
}

fn default_auth() -> Auth {
    Auth::None
}
/// No HTTP call waits longer than this (token fetch included), whatever a connection or step
/// says: the step worker's Lambda timeout (60 s) must outlast an operation's requests.
pub const MAX_HTTP_TIMEOUT_MS: u64 = 15_000;

fn default_timeout_ms() -> u64 {
    10_000
}
fn default_max_response_bytes() -> u64 {
    1024 * 1024
}

/// A request body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Body {
    /// Serialized with serde_json from the value tree.
    Json(serde_json::Value),
    /// `application/x-www-form-urlencoded`, each value percent-encoded.
    Form(BTreeMap<String, String>),
    /// Sent as is with the given content type; the connector encoded it for its format.
    Text { content_type: String, text: String },
}

/// One fully rendered HTTP call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpRequest {
    /// Name of the [`Connection`] to send it through.
    pub connection: String,
    pub method: String,
    /// Path below the connection's `base_url`; dynamic segments are already percent-encoded.
    pub path: String,
    #[serde(default)]
    pub query: Vec<(String, String)>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Body>,
    /// Sent as `Idempotency-Key` where the remote accepts one; derived from (run, step, iteration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Overrides the connection's timeout (milliseconds) when smaller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Answer every status as a response (a connector's `success` decides), instead of turning
    /// non-2xx statuses into errors.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub any_status: bool,
}

/// What came back. `body` is JSON when the response parsed as JSON, else a string.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: serde_json::Value,
}

/// Why a call did not produce a response the step can use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum HttpError {
    /// Worth retrying, though the request may have reached the remote: reset, timeout, 429, 5xx.
    #[error("{0}")]
    Retryable(String),
    /// Retrying cannot help: 4xx, refused by egress policy, unknown connection, bad request.
    #[error("{0}")]
    Terminal(String),
    /// Nothing reached the remote (the connection was refused): retrying is always safe.
    #[error("{0}")]
    NotSent(String),
}

/// Header names whose values are never shown (dry runs, history, errors).
pub const REDACTED_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-pan-key",
    "x-auth-token",
];

/// Whether a header's value must be redacted wherever a request is shown.
pub fn is_sensitive_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    REDACTED_HEADERS.contains(&lower.as_str())
        || lower.contains("secret")
        || lower.contains("token")
}

/// A copy of `request` fit to show: sensitive header values replaced by `[REDACTED]`.
pub fn redacted(request: &HttpRequest) -> HttpRequest {
    let mut r = request.clone();
    for (name, value) in r.headers.iter_mut() {
        if is_sensitive_header(name) {
            *value = "[REDACTED]".into();
        }
    }
    r
}
