//! [`ReqwestSender`]: the one place an outbound HTTP request is built and sent.
//!
//! Guarantees:
//! - the scheme, host and port come only from the connection's `base_url` (the request path cannot
//!   change them) and every destination, the OAuth2 token endpoint included, passes the
//!   [`EgressPolicy`] for the address actually connected;
//! - redirects are never followed: a 3xx is returned as a response;
//! - no header with CR/LF or otherwise invalid is ever sent, and an invalid request sends nothing;
//! - the whole call, token fetch included, is bounded by `min(connection.timeout_ms,
//!   request.timeout_ms)` and the response body by `connection.max_response_bytes`;
//! - error messages name the connection, method, path and status and never contain a secret
//!   value: every value resolved for the call (and its encoded forms, the Basic credential, the
//!   OAuth2 access token, the AWS secret access key and session token) is replaced by
//!   `[REDACTED]`, and request URLs (which may carry an API key) are never quoted;
//! - an `aws_sigv4` request is signed last, over exactly what is sent: method, URL with its query
//!   (re-encoded in SigV4's canonical form), `Host` and every header the connection and request
//!   set (the client's own `User-Agent`, `Accept` and `Content-Length` are left unsigned), and the
//!   body bytes.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use base64::Engine as _;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use riposte_core::http::{
    Auth, Body, Connection, HttpError, HttpRequest, HttpResponse, SecretRef, is_sensitive_header,
};
use riposte_core::ports::{HttpSender, SecretError, Secrets};
use tokio::sync::Mutex;
use url::Url;

use crate::aws::{
    AwsCredentialSource, EnvAwsCredentials, check_scope_part, encode_query, signature_headers,
};
use crate::egress::{EgressPolicy, EgressResolver, find_refusal};
use crate::redact::{Scrubber, truncate_chars};

/// How long establishing a TCP (and TLS) connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A cached OAuth2 token is refreshed this long before it expires.
const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// Longest lifetime a token is cached for, whatever `expires_in` says.
const TOKEN_MAX_CACHE: Duration = Duration::from_secs(24 * 3600);
/// Most tokens cached at once (one per token endpoint, client and scope).
const TOKEN_CACHE_MAX_ENTRIES: usize = 1024;
/// Characters of a response body quoted in an error message.
const ERROR_BODY_CHARS: usize = 300;
/// Bytes of an error response read to quote from it.
const ERROR_BODY_READ_BYTES: usize = 16 * 1024;
/// Methods a request may use.
const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"];
/// Headers the HTTP client manages itself: a request may not set them.
const MANAGED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
];

/// Headers the SigV4 signature sets: a connection's or request's own are dropped before signing.
const SIGV4_HEADERS: &[&str] = &[
    "authorization",
    "x-amz-date",
    "x-amz-security-token",
    "x-amz-content-sha256",
];

/// Sends [`HttpRequest`]s with reqwest under an [`EgressPolicy`], resolving credentials through
/// the [`Secrets`] port (and, for `aws_sigv4`, an [`AwsCredentialSource`]) at call time.
pub struct ReqwestSender {
    client: reqwest::Client,
    secrets: Arc<dyn Secrets>,
    policy: EgressPolicy,
    tokens: Mutex<HashMap<TokenKey, CachedToken>>,
    aws_credentials: Arc<dyn AwsCredentialSource>,
    /// Signs as of this time instead of the system clock (tests only).
    signing_time: Option<SystemTime>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TokenKey {
    token_url: String,
    client_id: String,
    scope: Option<String>,
}

struct CachedToken {
    access_token: String,
    /// The secret the token was obtained with: a different (rotated) secret fetches anew.
    client_secret: String,
    refresh_at: Instant,
}

impl fmt::Debug for ReqwestSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReqwestSender")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl ReqwestSender {
    /// Builds the sender and its one HTTP client. `aws_sigv4` connections are signed with the
    /// credentials in the standard AWS environment variables ([`EnvAwsCredentials`]).
    ///
    /// # Panics
    /// When the TLS backend cannot be initialised (see [`ReqwestSender::try_new`]).
    pub fn new(secrets: Arc<dyn Secrets>, policy: EgressPolicy) -> ReqwestSender {
        match Self::try_new(secrets, policy) {
            Ok(sender) => sender,
            Err(e) => panic!("cannot build the HTTP client: {e}"),
        }
    }

    /// Builds the sender, or says why the HTTP client could not be built.
    pub fn try_new(
        secrets: Arc<dyn Secrets>,
        policy: EgressPolicy,
    ) -> Result<ReqwestSender, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            // A proxy would resolve and connect on our behalf, out of the egress check's reach.
            .no_proxy()
            .dns_resolver(EgressResolver::new(policy))
            .user_agent(concat!("riposte/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(ReqwestSender {
            client,
            secrets,
            policy,
            tokens: Mutex::new(HashMap::new()),
            aws_credentials: Arc::new(EnvAwsCredentials),
            signing_time: None,
        })
    }

    /// Signs `aws_sigv4` connections with credentials from `source` instead of the environment.
    pub fn with_aws_credentials(mut self, source: Arc<dyn AwsCredentialSource>) -> Self {
        self.aws_credentials = source;
        self
    }

    /// Signs `aws_sigv4` requests as of `time` instead of the system clock, so that a test can
    /// check a signature against one computed for a known time. Not for production use: AWS
    /// refuses a signature more than 5 minutes off its clock.
    pub fn with_signing_time(mut self, time: SystemTime) -> Self {
        self.signing_time = Some(time);
        self
    }

    /// The egress policy every request is checked against.
    pub fn policy(&self) -> EgressPolicy {
        self.policy
    }

    async fn send_inner(
        &self,
        connection: &Connection,
        request: &HttpRequest,
        scrub: &mut Scrubber,
    ) -> Result<HttpResponse, HttpError> {
        let label = label(connection, request);
        let terminal = |msg: String| HttpError::Terminal(format!("{label}: {msg}"));

        if request.connection != connection.name {
            return Err(terminal(format!(
                "the request names connection {:?}",
                request.connection
            )));
        }
        let method = parse_method(&request.method).map_err(terminal)?;
        let mut url = build_url(&connection.base_url, &request.path).map_err(terminal)?;
        self.policy
            .check_url(&url)
            .map_err(|e| terminal(e.to_string()))?;

        let mut headers = HeaderMap::new();
        for (name, value) in connection.headers.iter().chain(request.headers.iter()) {
            let (name, value) = header_pair(name, value).map_err(terminal)?;
            headers.insert(name, value);
        }
        if let Some(key) = &request.idempotency_key {
            let (name, value) = header_pair("Idempotency-Key", key).map_err(terminal)?;
            headers.insert(name, value);
        }

        let with_key;
        let request_body = match (&connection.auth, &request.body) {
            (Auth::JsonBodyKey { member, key }, Some(Body::Json(serde_json::Value::Object(m)))) => {
                let secret = self.secret(&label, key, scrub).await?;
                let mut m = m.clone();
                m.insert(member.clone(), serde_json::Value::String(secret));
                with_key = Some(Body::Json(serde_json::Value::Object(m)));
                with_key.as_ref()
            }
            (Auth::JsonBodyKey { member, .. }, _) => {
                return Err(terminal(format!(
                    "json_body_key auth puts `{member}` in a JSON object body; this request has none"
                )));
            }
            (_, body) => body.as_ref(),
        };
        let body = match request_body {
            None => None,
            Some(Body::Json(value)) => {
                let bytes = serde_json::to_vec(value)
                    .map_err(|e| terminal(format!("cannot serialize the JSON body: {e}")))?;
                headers
                    .entry(header::CONTENT_TYPE)
                    .or_insert(HeaderValue::from_static("application/json"));
                Some(bytes)
            }
            Some(Body::Form(fields)) => {
                let text = url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(fields)
                    .finish();
                headers
                    .entry(header::CONTENT_TYPE)
                    .or_insert(HeaderValue::from_static(
                        "application/x-www-form-urlencoded",
                    ));
                Some(text.into_bytes())
            }
            Some(Body::Text { content_type, text }) => {
                let (name, value) = header_pair("Content-Type", content_type).map_err(terminal)?;
                headers.insert(name, value);
                Some(text.clone().into_bytes())
            }
        };

        let mut query = request.query.clone();
        let oauth = self
            .apply_auth(connection, &label, &mut headers, &mut query, scrub)
            .await?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(&query);
        }
        if let Auth::Hmac {
            secret,
            header,
            timestamp_header,
        } = &connection.auth
        {
            let key = self.secret(&label, secret, scrub).await?;
            let time = self.signing_time.unwrap_or_else(SystemTime::now);
            let (timestamp, signature) =
                hmac_signature(&key, time, body.as_deref().unwrap_or_default());
            set_header(&mut headers, timestamp_header, &timestamp).map_err(terminal)?;
            set_header(&mut headers, header, &signature).map_err(terminal)?;
        }
        if let Auth::AwsSigv4 { service, region } = &connection.auth {
            self.sign_aws(
                service,
                region,
                &label,
                &method,
                &mut url,
                &mut headers,
                body.as_deref().unwrap_or_default(),
                scrub,
            )
            .await?;
        }

        let mut builder = self.client.request(method, url).headers(headers);
        if let Some(body) = body {
            builder = builder.body(body);
        }
        let mut response = builder
            .send()
            .await
            .map_err(|e| transport_error(&label, e))?;
        let status = response.status();
        tracing::debug!(
            connection = %connection.name,
            method = %request.method,
            path = %request.path,
            status = status.as_u16(),
            "http call"
        );

        if status == StatusCode::UNAUTHORIZED
            && let Some((key, token)) = &oauth
        {
            self.invalidate_token(key, token).await;
        }

        if status.is_success() || status.is_redirection() || request.any_status {
            let cap = connection.max_response_bytes;
            let mut headers = response_headers(response.headers());
            if !scrub.is_empty() {
                for v in headers.values_mut() {
                    *v = scrub.scrub_at_least(v, MIN_SCRUBBED_IN_DATA);
                }
            }
            let bytes = read_capped(&mut response, cap)
                .await
                .map_err(|e| e.into_http_error(&label, cap))?;
            // A body may echo what was sent (an error quoting the request, an echo endpoint):
            // credentials are scrubbed before anyone reads it or it reaches the run history.
            let body = if scrub.is_empty() {
                parse_body(&bytes)
            } else if status.is_success() {
                let text = String::from_utf8_lossy(&bytes);
                parse_body(scrub.scrub_at_least(&text, MIN_SCRUBBED_IN_DATA).as_bytes())
            } else {
                parse_body(scrub.scrub(&String::from_utf8_lossy(&bytes)).as_bytes())
            };
            return Ok(HttpResponse {
                status: status.as_u16(),
                headers,
                body,
            });
        }
        Err(status_error(status, &label, &mut response, scrub).await)
    }

    /// Resolves the connection's credentials and puts them on the request. Returns the OAuth2
    /// cache key and token used, if any, so a 401 can invalidate it.
    async fn apply_auth(
        &self,
        connection: &Connection,
        label: &str,
        headers: &mut HeaderMap,
        query: &mut Vec<(String, String)>,
        scrub: &mut Scrubber,
    ) -> Result<Option<(TokenKey, String)>, HttpError> {
        let terminal = |msg: String| HttpError::Terminal(format!("{label}: {msg}"));
        match &connection.auth {
            Auth::None => Ok(None),
            // Signed last, once the URL, headers and body are final (see `sign_aws`).
            Auth::AwsSigv4 { .. } | Auth::Hmac { .. } | Auth::JsonBodyKey { .. } => Ok(None),
            Auth::Bearer { token } => {
                let token = self.secret(label, token, scrub).await?;
                set_header(headers, "Authorization", &format!("Bearer {token}"))
                    .map_err(terminal)?;
                Ok(None)
            }
            Auth::Basic { username, password } => {
                let password = self.secret(label, password, scrub).await?;
                let credential = base64::engine::general_purpose::STANDARD
                    .encode(format!("{username}:{password}"));
                scrub.add(&credential);
                set_header(headers, "Authorization", &format!("Basic {credential}"))
                    .map_err(terminal)?;
                Ok(None)
            }
            Auth::ApiKey {
                header,
                query: param,
                prefix,
                key,
            } => {
                if header.is_none() && param.is_none() {
                    return Err(terminal(
                        "api_key auth names neither a header nor a query parameter".to_owned(),
                    ));
                }
                let key = self.secret(label, key, scrub).await?;
                let value = format!("{prefix}{key}");
                if let Some(name) = header {
                    set_header(headers, name, &value).map_err(terminal)?;
                }
                if let Some(param) = param {
                    query.push((param.clone(), value));
                }
                Ok(None)
            }
            Auth::Oauth2ClientCredentials {
                token_url,
                client_id,
                client_secret,
                scope,
            } => {
                let key = TokenKey {
                    token_url: token_url.clone(),
                    client_id: client_id.clone(),
                    scope: scope.clone(),
                };
                let token = self
                    .oauth_token(connection, label, &key, client_secret, scrub)
                    .await?;
                set_header(headers, "Authorization", &format!("Bearer {token}"))
                    .map_err(terminal)?;
                Ok(Some((key, token)))
            }
        }
    }

    /// Signs the finished request with AWS SigV4 and adds the signature's headers (and `Host`, so
    /// that the host sent is the one signed). The query is re-encoded the way SigV4 canonicalizes
    /// it, so the query sent is the one signed.
    #[allow(clippy::too_many_arguments)]
    async fn sign_aws(
        &self,
        service: &str,
        region: &str,
        label: &str,
        method: &Method,
        url: &mut Url,
        headers: &mut HeaderMap,
        body: &[u8],
        scrub: &mut Scrubber,
    ) -> Result<(), HttpError> {
        let terminal = |msg: String| HttpError::Terminal(format!("{label}: {msg}"));
        check_scope_part("service", service).map_err(terminal)?;
        check_scope_part("region", region).map_err(terminal)?;
        let credentials = self.aws_credentials.credentials().await.map_err(|why| {
            terminal(format!(
                "AWS credentials are not configured ({why}); aws_sigv4 needs them"
            ))
        })?;
        scrub.add(&credentials.secret_access_key);
        if let Some(token) = &credentials.session_token {
            scrub.add(token);
        }
        if credentials.access_key_id.is_empty() || credentials.secret_access_key.is_empty() {
            return Err(terminal(
                "AWS credentials are not configured (the access key ID or secret access key is \
                 empty); aws_sigv4 needs them"
                    .to_owned(),
            ));
        }

        let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        if pairs.is_empty() {
            url.set_query(None);
        } else {
            url.set_query(Some(&encode_query(&pairs)));
        }

        for name in SIGV4_HEADERS {
            headers.remove(*name);
        }
        let host = match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => return Err(terminal("the URL has no host".to_owned())),
        };
        let host = HeaderValue::from_str(&host)
            .map_err(|_| terminal("the URL's host is not a valid header value".to_owned()))?;
        headers.insert(header::HOST, host);

        let mut signed: Vec<(&str, &str)> = Vec::with_capacity(headers.len());
        for (name, value) in headers.iter() {
            let value = std::str::from_utf8(value.as_bytes()).map_err(|_| {
                terminal(format!(
                    "header {:?} cannot be signed: its value is not UTF-8",
                    name.as_str()
                ))
            })?;
            signed.push((name.as_str(), value));
        }
        let time = self.signing_time.unwrap_or_else(SystemTime::now);
        let signature = signature_headers(
            service,
            region,
            &credentials,
            time,
            method.as_str(),
            url.as_str(),
            &signed,
            body,
        )
        .map_err(terminal)?;
        for added in signature {
            let (name, mut value) = header_pair(added.name, &added.value).map_err(terminal)?;
            value.set_sensitive(added.sensitive || is_sensitive_header(added.name));
            headers.insert(name, value);
        }
        Ok(())
    }

    /// Resolves one secret and remembers it for scrubbing.
    async fn secret(
        &self,
        label: &str,
        secret: &SecretRef,
        scrub: &mut Scrubber,
    ) -> Result<String, HttpError> {
        match self.secrets.get(&secret.secret).await {
            Ok(value) => {
                scrub.add(&value);
                Ok(value)
            }
            Err(SecretError::Missing(_)) => Err(HttpError::Terminal(format!(
                "{label}: secret {:?} is not defined",
                secret.secret
            ))),
            Err(SecretError::Unavailable(why)) => Err(HttpError::Retryable(format!(
                "{label}: secret {:?} is unavailable: {why}",
                secret.secret
            ))),
        }
    }

    /// A cached access token, or a fresh one from the token endpoint (client credentials grant).
    async fn oauth_token(
        &self,
        connection: &Connection,
        label: &str,
        key: &TokenKey,
        client_secret: &SecretRef,
        scrub: &mut Scrubber,
    ) -> Result<String, HttpError> {
        let secret = self.secret(label, client_secret, scrub).await?;
        {
            let cache = self.tokens.lock().await;
            if let Some(cached) = cache.get(key)
                && cached.client_secret == secret
                && Instant::now() < cached.refresh_at
            {
                scrub.add(&cached.access_token);
                return Ok(cached.access_token.clone());
            }
        }

        let context = format!("{label}: OAuth2 token request");
        let terminal = |msg: String| HttpError::Terminal(format!("{context}: {msg}"));
        let url =
            Url::parse(&key.token_url).map_err(|e| terminal(format!("bad token_url: {e}")))?;
        self.policy
            .check_url(&url)
            .map_err(|e| terminal(e.to_string()))?;

        let form = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "client_credentials")
                .append_pair("client_id", &key.client_id)
                .append_pair("client_secret", &secret);
            if let Some(scope) = &key.scope {
                form.append_pair("scope", scope);
            }
            form.finish()
        };
        let mut response = self
            .client
            .post(url)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(form)
            .send()
            .await
            .map_err(|e| transport_error(&context, e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(status_error(status, &context, &mut response, scrub).await);
        }
        let cap = connection.max_response_bytes;
        let bytes = read_capped(&mut response, cap)
            .await
            .map_err(|e| e.into_http_error(&context, cap))?;
        let body: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|_| terminal("the token response is not JSON".to_owned()))?;
        let token = body
            .get("access_token")
            .and_then(serde_json::Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| terminal("the token response has no access_token".to_owned()))?
            .to_owned();
        scrub.add(&token);

        if let Some(lifetime) = body.get("expires_in").and_then(seconds)
            && let Some(fresh_for) = lifetime
                .min(TOKEN_MAX_CACHE)
                .checked_sub(TOKEN_REFRESH_MARGIN)
            && !fresh_for.is_zero()
        {
            let mut cache = self.tokens.lock().await;
            if cache.len() >= TOKEN_CACHE_MAX_ENTRIES {
                let now = Instant::now();
                cache.retain(|_, t| t.refresh_at > now);
                if cache.len() >= TOKEN_CACHE_MAX_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(
                key.clone(),
                CachedToken {
                    access_token: token.clone(),
                    client_secret: secret,
                    refresh_at: Instant::now() + fresh_for,
                },
            );
        }
        Ok(token)
    }

    /// Forgets a cached token the API refused (only if it is still the cached one).
    async fn invalidate_token(&self, key: &TokenKey, token: &str) {
        let mut cache = self.tokens.lock().await;
        if cache.get(key).is_some_and(|c| c.access_token == token) {
            cache.remove(key);
        }
    }
}

#[async_trait]
impl HttpSender for ReqwestSender {
    async fn send(
        &self,
        connection: &Connection,
        request: &HttpRequest,
    ) -> Result<HttpResponse, HttpError> {
        let timeout_ms = request
            .timeout_ms
            .map_or(connection.timeout_ms, |t| t.min(connection.timeout_ms))
            .min(riposte_core::http::MAX_HTTP_TIMEOUT_MS);
        let mut scrub = Scrubber::default();
        let outcome = tokio::time::timeout(
            Duration::from_millis(timeout_ms),
            self.send_inner(connection, request, &mut scrub),
        )
        .await;
        let result = match outcome {
            Ok(result) => result,
            Err(_) => Err(HttpError::Retryable(format!(
                "{}: timed out after {timeout_ms} ms",
                label(connection, request)
            ))),
        };
        result.map_err(|e| match e {
            HttpError::Retryable(m) => HttpError::Retryable(scrub.scrub(&m)),
            HttpError::Terminal(m) => HttpError::Terminal(scrub.scrub(&m)),
            HttpError::NotSent(m) => HttpError::NotSent(scrub.scrub(&m)),
        })
    }
}

/// Credentials at least this long are scrubbed from successful answers (the data steps read);
/// shorter ones only from errors, where a corrupted word costs nothing.
const MIN_SCRUBBED_IN_DATA: usize = 8;

/// `name (METHOD /path)`, escaped so it stays one line whatever the request holds.
fn label(connection: &Connection, request: &HttpRequest) -> String {
    format!(
        "{} ({} {})",
        connection.name.escape_debug(),
        truncate_chars(&request.method, 16).escape_debug(),
        truncate_chars(&request.path, 200).escape_debug()
    )
}

fn parse_method(method: &str) -> Result<Method, String> {
    let upper = method.to_ascii_uppercase();
    if !METHODS.contains(&upper.as_str()) {
        return Err(format!(
            "method {:?} is not one of {}",
            truncate_chars(method, 16),
            METHODS.join(" ")
        ));
    }
    Method::from_bytes(upper.as_bytes()).map_err(|_| format!("invalid method {method:?}"))
}

/// Refuses a path that could leave the connection's base URL or smuggle anything into it.
fn validate_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("path must start with '/'".to_owned());
    }
    if path.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("path contains whitespace or a control character".to_owned());
    }
    for forbidden in ["://", "@", "\\", "#"] {
        if path.contains(forbidden) {
            return Err(format!("path must not contain {forbidden:?}"));
        }
    }
    // Dot segments, also percent-encoded (the URL parser treats %2e as '.') or hidden behind an
    // encoded separator a server may decode.
    let path_part = path.split('?').next().unwrap_or_default();
    let decoded = path_part
        .to_ascii_lowercase()
        .replace("%2e", ".")
        .replace("%2f", "/")
        .replace("%5c", "/");
    if decoded.split('/').any(|segment| segment == "..") {
        return Err("path must not contain '..' segments".to_owned());
    }
    Ok(())
}

/// `base_url` + `path`, checked to stay at the base URL's scheme, host, port and path prefix.
fn build_url(base_url: &str, path: &str) -> Result<Url, String> {
    let base = Url::parse(base_url).map_err(|e| format!("invalid base_url: {e}"))?;
    if base.cannot_be_a_base() || base.host().is_none() {
        return Err("base_url has no host".to_owned());
    }
    if base.query().is_some() || base.fragment().is_some() {
        return Err("base_url must not have a query or fragment".to_owned());
    }
    if !base.username().is_empty() || base.password().is_some() {
        return Err("base_url must not contain credentials".to_owned());
    }
    validate_path(path)?;
    let base_path = base.path().trim_end_matches('/');
    let joined = format!("{}{}", base.as_str().trim_end_matches('/'), path);
    let url = Url::parse(&joined).map_err(|e| format!("invalid URL: {e}"))?;
    let same_place = url.scheme() == base.scheme()
        && url.host() == base.host()
        && url.port_or_known_default() == base.port_or_known_default()
        && url.username().is_empty()
        && url.password().is_none()
        && url.fragment().is_none()
        && url.path().starts_with(&format!("{base_path}/"));
    if !same_place {
        return Err("path leaves the connection's base_url".to_owned());
    }
    Ok(url)
}

/// A validated header; the error names the header, never its value.
fn header_pair(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let shown = truncate_chars(name, 64);
    if name.contains(['\r', '\n']) || value.contains(['\r', '\n']) {
        return Err(format!("header {shown:?} contains CR or LF"));
    }
    let header_name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("invalid header name {shown:?}"))?;
    if MANAGED_HEADERS.contains(&header_name.as_str()) {
        return Err(format!(
            "header {shown:?} is managed by the HTTP client and cannot be set"
        ));
    }
    let mut header_value =
        HeaderValue::from_str(value).map_err(|_| format!("invalid value for header {shown:?}"))?;
    if is_sensitive_header(name) {
        header_value.set_sensitive(true);
    }
    Ok((header_name, header_value))
}

/// Sets a credential header (always marked sensitive).
fn set_header(headers: &mut HeaderMap, name: &str, value: &str) -> Result<(), String> {
    let (name, mut value) = header_pair(name, value)?;
    value.set_sensitive(true);
    headers.insert(name, value);
    Ok(())
}

/// A duration in seconds from a JSON number or numeric string.
fn seconds(value: &serde_json::Value) -> Option<Duration> {
    let secs = match value {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    if !secs.is_finite() || secs <= 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(
        secs.min(TOKEN_MAX_CACHE.as_secs_f64()),
    ))
}

fn retryable_status(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
}

/// The error for a non-2xx/3xx status, quoting the start of the (scrubbed) body.
async fn status_error(
    status: StatusCode,
    context: &str,
    response: &mut reqwest::Response,
    scrub: &Scrubber,
) -> HttpError {
    let snippet = match read_prefix(response, ERROR_BODY_READ_BYTES).await {
        Some(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            // Scrub before cutting, so a secret across the cut is still replaced whole.
            let clean: String = scrub
                .scrub(&text)
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            truncate_chars(clean.trim(), ERROR_BODY_CHARS)
        }
        None => "(body unreadable)".to_owned(),
    };
    let message = format!("HTTP {} from {context}: {snippet}", status.as_u16());
    if retryable_status(status) {
        HttpError::Retryable(message)
    } else {
        HttpError::Terminal(message)
    }
}

/// Why a transport-level failure happened; refused destinations are terminal, the rest retryable.
fn transport_error(context: &str, err: reqwest::Error) -> HttpError {
    if let Some(refused) = find_refusal(&err) {
        return HttpError::Terminal(format!("{context}: {refused}"));
    }
    let err = err.without_url();
    if err.is_builder() {
        return HttpError::Terminal(format!("{context}: {}", error_chain(&err)));
    }
    if err.is_connect() && !err.is_timeout() {
        return HttpError::NotSent(format!(
            "{context}: could not connect: {}",
            error_chain(&err)
        ));
    }
    let kind = if err.is_timeout() {
        "timed out"
    } else {
        "request failed"
    };
    HttpError::Retryable(format!("{context}: {kind}: {}", error_chain(&err)))
}

/// An error and its sources, `: `-separated (bounded).
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(err);
    for _ in 0..8 {
        let Some(e) = current else { break };
        let text = e.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
}

enum ReadError {
    TooLarge,
    Transport(reqwest::Error),
}

impl ReadError {
    fn into_http_error(self, context: &str, cap: u64) -> HttpError {
        match self {
            ReadError::TooLarge => {
                HttpError::Terminal(format!("{context}: response body exceeds {cap} bytes"))
            }
            ReadError::Transport(e) => transport_error(context, e),
        }
    }
}

/// The whole body, refused as soon as it is known to exceed `cap` bytes (declared length first,
/// then while reading chunk by chunk).
async fn read_capped(response: &mut reqwest::Response, cap: u64) -> Result<Vec<u8>, ReadError> {
    if response.content_length().is_some_and(|n| n > cap) {
        return Err(ReadError::TooLarge);
    }
    let initial = response.content_length().unwrap_or(0).min(cap).min(1 << 20);
    let mut body = Vec::with_capacity(usize::try_from(initial).unwrap_or(0));
    // Bounded: every chunk grows `body`, which may not pass `cap`; the call's timeout bounds time.
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Transport)? {
        if (body.len() as u64).saturating_add(chunk.len() as u64) > cap {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// At most about `limit` bytes from the start of the body, or `None` when it cannot be read.
async fn read_prefix(response: &mut reqwest::Response, limit: usize) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk[..chunk.len().min(limit - body.len())])
            }
            Ok(None) => break,
            Err(_) if body.is_empty() => return None,
            Err(_) => break,
        }
    }
    Some(body)
}

fn response_headers(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        out.entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    out
}

/// JSON when the body parses as JSON, else the body as a (lossy UTF-8) string.
/// A signed webhook's `(timestamp, signature)`: the unix seconds, and `sha256=` with the hex
/// HMAC-SHA256 of `<seconds>.<body>`.
fn hmac_signature(key: &str, time: SystemTime, body: &[u8]) -> (String, String) {
    use hmac::{KeyInit, Mac};
    let seconds = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .to_string();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes())
        .expect("HMAC accepts a key of any length");
    mac.update(seconds.as_bytes());
    mac.update(b".");
    mac.update(body);
    let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    (seconds, signature)
}

fn parse_body(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        for ok in [
            "/",
            "/api/now/table/incident",
            "/a/b?x=1",
            "/users/a..b",
            "/%41",
        ] {
            assert_eq!(validate_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "api",
            "/../etc",
            "/a/..",
            "/a/%2e%2e/b",
            "/a/.%2E/b",
            "/a/..%2fb",
            "/a/..%5Cb",
            "/http://evil",
            "/a@evil",
            "/a\\b",
            "/a#frag",
            "/a b",
            "/a\tb",
            "/a\r\nb",
            "/a\u{0}b",
        ] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn urls_stay_under_the_base() {
        let u = build_url("https://acme.example/api/", "/v1/x").unwrap();
        assert_eq!(u.as_str(), "https://acme.example/api/v1/x");
        let u = build_url("https://acme.example", "/v1/x?a=1").unwrap();
        assert_eq!(u.as_str(), "https://acme.example/v1/x?a=1");
        assert!(build_url("https://acme.example?q=1", "/x").is_err());
        assert!(build_url("https://u:p@acme.example", "/x").is_err());
        assert!(build_url("not a url", "/x").is_err());
    }

    #[test]
    fn methods() {
        assert_eq!(parse_method("get").unwrap(), Method::GET);
        assert_eq!(parse_method("PATCH").unwrap(), Method::PATCH);
        assert!(parse_method("TRACE").is_err());
        assert!(parse_method("CONNECT").is_err());
    }

    #[test]
    fn headers_refused_without_showing_values() {
        let e = header_pair("X-Foo", "a\r\nX-Injected: 1").unwrap_err();
        assert!(e.contains("X-Foo") && !e.contains("Injected"), "{e}");
        assert!(header_pair("Bad Name", "v").is_err());
        assert!(header_pair("Host", "evil").is_err());
        assert!(header_pair("Content-Length", "1").is_err());
        let e = header_pair("X-Key", "secret\u{1}").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        assert!(header_pair("X-Ok", "fine value").is_ok());
    }

    #[test]
    fn token_lifetimes() {
        assert_eq!(
            seconds(&serde_json::json!(3600)),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            seconds(&serde_json::json!("120")),
            Some(Duration::from_secs(120))
        );
        assert_eq!(seconds(&serde_json::json!(-1)), None);
        assert_eq!(seconds(&serde_json::json!(null)), None);
        assert_eq!(seconds(&serde_json::json!(1e300)), Some(TOKEN_MAX_CACHE));
    }

    #[test]
    fn statuses() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(retryable_status(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 422] {
            assert!(!retryable_status(StatusCode::from_u16(s).unwrap()), "{s}");
        }
    }
}
