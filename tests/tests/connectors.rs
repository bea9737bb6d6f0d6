//! Every shipped connector's operations against a vendor stand-in on 127.0.0.1: each case in
//! `connectors/<id>/tests.yaml` calls one operation through the real HTTP sender; the stand-in
//! fails the case unless it receives exactly the requests the vendor documents (method, path,
//! query, headers, body, auth), and answers as the vendor does, errors included. One test per
//! case: `cargo test -p riposte-tests --test connectors -- servicenow` runs one connector's.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{KeyInit, Mac};
use libtest_mimic::{Arguments, Failed, Trial};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use riposte_core::connector::call::{CallResult, call, recover};
use riposte_core::connector::{Connector, ConnectorCatalog};
use riposte_core::http::Connection;
use riposte_http::{
    AwsCredentials, EgressPolicy, ReqwestSender, StaticAwsCredentials, StaticSecrets,
};
use riposte_tests::repo;

/// The AWS test credentials and signing time every SigV4 case uses.
const AWS_KEY_ID: &str = "AKIDEXAMPLE";
const AWS_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const SIGNING_TIME_SECS: u64 = 1_767_225_600; // 2026-01-01T00:00:00Z

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestsFile {
    connection: Value,
    #[serde(default)]
    secrets: BTreeMap<String, String>,
    cases: Vec<Case>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    operation: String,
    #[serde(default)]
    inputs: Value,
    #[serde(default)]
    key: Option<String>,
    /// Run the operation's `recover` lookup (as after a lost worker) instead of the call.
    #[serde(default)]
    recover: bool,
    exchanges: Vec<Exchange>,
    expect: Expect,
}

#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
struct Exchange {
    request: ExpectedRequest,
    response: CannedResponse,
}

#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
struct ExpectedRequest {
    method: String,
    path: String,
    #[serde(default)]
    query: Option<BTreeMap<String, String>>,
    #[serde(default)]
    headers: BTreeMap<String, Value>,
    #[serde(default)]
    json: Option<Value>,
    #[serde(default)]
    form: Option<BTreeMap<String, String>>,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
struct CannedResponse {
    status: u16,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    json: Option<Value>,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Expect {
    outcome: String,
    #[serde(default)]
    outputs: Option<Value>,
    #[serde(default)]
    error_contains: Option<String>,
}

#[derive(Clone)]
struct StandIn {
    expected: Arc<Mutex<VecDeque<Exchange>>>,
    problems: Arc<Mutex<Vec<String>>>,
}

/// Compares one received request with the next expected one and answers with its response.
async fn answer(State(st): State<StandIn>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes: Bytes = axum::body::to_bytes(body, 4 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let body = String::from_utf8_lossy(&bytes).into_owned();
    let headers: BTreeMap<String, String> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                v.to_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let query = parts.uri.query().unwrap_or("").to_string();
    let seen = format!("{} {}?{query}", parts.method, parts.uri.path());
    let Some(ex) = st.expected.lock().unwrap().pop_front() else {
        st.problems
            .lock()
            .unwrap()
            .push(format!("unexpected request {seen}"));
        return StatusCode::IM_A_TEAPOT.into_response();
    };
    let mut p = Vec::new();
    let want = &ex.request;
    if !parts.method.as_str().eq_ignore_ascii_case(&want.method) || parts.uri.path() != want.path {
        p.push(format!(
            "request line: got {} {}, want {} {}",
            parts.method,
            parts.uri.path(),
            want.method,
            want.path
        ));
    }
    let got_query: BTreeMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let want_query = want.query.clone().unwrap_or_default();
    if got_query != want_query {
        p.push(format!("query: got {got_query:?}, want {want_query:?}"));
    }
    for (name, value) in &want.headers {
        let name = name.to_ascii_lowercase();
        let got = headers.get(&name);
        match (value, got) {
            (Value::String(w), Some(g)) if w == g => {}
            (Value::Object(m), Some(g)) if m.contains_key("sigv4") => {
                let s = &m["sigv4"];
                let service = s["service"].as_str().unwrap_or("");
                let region = s["region"].as_str().unwrap_or("");
                if let Err(why) = verify_sigv4(
                    parts.method.as_str(),
                    parts.uri.path(),
                    &query,
                    &headers,
                    &bytes,
                    service,
                    region,
                    g,
                ) {
                    p.push(format!("header {name}: not a valid SigV4 signature: {why}"));
                }
            }
            (Value::Object(m), Some(g)) if m.contains_key("prefix") => {
                if !g.starts_with(m["prefix"].as_str().unwrap_or("")) {
                    p.push(format!(
                        "header {name}: got {g:?}, want prefix {:?}",
                        m["prefix"]
                    ));
                }
            }
            (w, g) => p.push(format!("header {name}: got {g:?}, want {w}")),
        }
    }
    if let Some(w) = &want.json {
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(g) if &g == w => {}
            Ok(g) => p.push(format!("json body:\n  got  {g}\n  want {w}")),
            Err(e) => p.push(format!("body is not JSON ({e}): {body}")),
        }
    } else if let Some(w) = &want.form {
        let g: BTreeMap<String, String> =
            url::form_urlencoded::parse(&bytes).into_owned().collect();
        if &g != w {
            p.push(format!("form body:\n  got  {g:?}\n  want {w:?}"));
        }
    } else if let Some(w) = &want.text {
        if &body != w {
            p.push(format!("text body:\n  got  {body:?}\n  want {w:?}"));
        }
    } else if !bytes.is_empty() {
        p.push(format!("body: want none, got {body:?}"));
    }
    if !p.is_empty() {
        st.problems
            .lock()
            .unwrap()
            .push(format!("{seen}:\n    {}", p.join("\n    ")));
    }
    let r = &ex.response;
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (content_type, body) = match (&r.json, &r.text) {
        (Some(j), _) => ("application/json", j.to_string()),
        (None, Some(t)) => ("text/plain", t.clone()),
        (None, None) => ("", String::new()),
    };
    let mut resp = (status, body).into_response();
    if !content_type.is_empty() {
        resp.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static(content_type),
        );
    }
    for (k, v) in &r.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::try_from(v)) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}

fn uri_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// Verifies an AWS Signature Version 4 `Authorization` header over the request as received,
/// computed here from the specification (not by the signer under test).
#[allow(clippy::too_many_arguments)]
fn verify_sigv4(
    method: &str,
    path: &str,
    query: &str,
    headers: &BTreeMap<String, String>,
    body: &[u8],
    service: &str,
    region: &str,
    authorization: &str,
) -> Result<(), String> {
    let rest = authorization
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("not AWS4-HMAC-SHA256")?;
    let mut fields = BTreeMap::new();
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=').ok_or("malformed")?;
        fields.insert(k, v);
    }
    let credential = fields.get("Credential").ok_or("no Credential")?;
    let signed = fields.get("SignedHeaders").ok_or("no SignedHeaders")?;
    let signature = fields.get("Signature").ok_or("no Signature")?;
    let date = headers.get("x-amz-date").ok_or("no x-amz-date header")?;
    let day = &date[..8.min(date.len())];
    let scope = format!("{day}/{region}/{service}/aws4_request");
    if *credential != format!("{AWS_KEY_ID}/{scope}") {
        return Err(format!(
            "credential {credential}, want {AWS_KEY_ID}/{scope}"
        ));
    }
    if !signed.split(';').any(|h| h == "host") {
        return Err("host is not signed".into());
    }
    let canonical_uri = path
        .split('/')
        .map(uri_encode)
        .collect::<Vec<_>>()
        .join("/");
    let mut pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .map(|(k, v)| (uri_encode(&k), uri_encode(&v)))
        .collect();
    pairs.sort();
    let canonical_query = pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut canonical_headers = String::new();
    for h in signed.split(';') {
        let v = headers.get(h).ok_or(format!("signed header {h} missing"))?;
        canonical_headers.push_str(&format!("{h}:{}\n", v.trim()));
    }
    let payload = hex::encode(Sha256::digest(body));
    if let Some(claimed) = headers.get("x-amz-content-sha256")
        && *claimed != payload
    {
        return Err("x-amz-content-sha256 does not match the body".into());
    }
    let canonical = format!(
        "{method}\n{canonical_uri}\n{canonical_query}\n{canonical_headers}\n{signed}\n{payload}"
    );
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let mut key = hmac_sha256(format!("AWS4{AWS_SECRET}").as_bytes(), day.as_bytes());
    for part in [region, service, "aws4_request"] {
        key = hmac_sha256(&key, part.as_bytes());
    }
    let want = hex::encode(hmac_sha256(&key, to_sign.as_bytes()));
    if *signature != want {
        return Err(format!("signature {signature}, want {want}"));
    }
    Ok(())
}

/// Replaces `{base_url}` in every string of the test connection.
fn substitute(v: &mut Value, base: &str) {
    match v {
        Value::String(s) => *s = s.replace("{base_url}", base),
        Value::Array(items) => items.iter_mut().for_each(|i| substitute(i, base)),
        Value::Object(m) => m.values_mut().for_each(|i| substitute(i, base)),
        _ => {}
    }
}

async fn run_case(id: &str, file: &TestsFile, case: &Case) -> Result<(), String> {
    let catalog = ConnectorCatalog::shipped();
    let name = format!("{id}.{}", case.operation);
    let op = catalog
        .operation_named(&name)
        .ok_or(format!("no operation {name} in the shipped catalog"))?;
    let standin = StandIn {
        expected: Arc::new(Mutex::new(case.exchanges.iter().cloned().collect())),
        problems: Arc::new(Mutex::new(Vec::new())),
    };
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(standin.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let mut conn = file.connection.clone();
    substitute(&mut conn, &base);
    let path = conn
        .get("base_url")
        .and_then(Value::as_str)
        .and_then(|u| url::Url::parse(u).ok())
        .map(|u| u.path().trim_end_matches('/').to_string())
        .unwrap_or_default();
    conn["base_url"] = Value::String(format!("{base}{path}"));
    let mut connection: Connection =
        serde_json::from_value(conn).map_err(|e| format!("tests.yaml connection: {e}"))?;
    connection.name = id.to_string();

    let secrets = StaticSecrets(file.secrets.clone().into_iter().collect());
    let sender = ReqwestSender::new(Arc::new(secrets), EgressPolicy::permissive_for_tests())
        .with_aws_credentials(Arc::new(StaticAwsCredentials::new(AwsCredentials::new(
            AWS_KEY_ID, AWS_SECRET, None,
        ))))
        .with_signing_time(SystemTime::UNIX_EPOCH + Duration::from_secs(SIGNING_TIME_SECS));
    let key = case.key.clone().unwrap_or_else(|| "test-key".into());
    let result = if case.recover {
        recover(op, &case.inputs, &key, &connection, &sender, None).await
    } else {
        call(op, &case.inputs, &key, &connection, &sender).await
    };
    server.abort();

    let mut problems: Vec<String> = standin.problems.lock().unwrap().clone();
    let left = standin.expected.lock().unwrap().len();
    if left > 0 {
        problems.push(format!("{left} expected request(s) never arrived"));
    }
    let e = &case.expect;
    match (e.outcome.as_str(), &result) {
        ("succeeded", CallResult::Done(out)) => {
            if let Some(want) = &e.outputs
                && want != out
            {
                problems.push(format!("outputs:\n  got  {out}\n  want {want}"));
            }
        }
        (
            "failed",
            CallResult::Failed {
                retryable: false,
                message,
            },
        )
        | (
            "retryable",
            CallResult::Failed {
                retryable: true,
                message,
            },
        )
        | ("retryable" | "unknown", CallResult::Unknown(message)) => {
            if let Some(want) = &e.error_contains
                && !message.contains(want.as_str())
            {
                problems.push(format!("error {message:?} does not contain {want:?}"));
            }
        }
        (want, got) => problems.push(format!("outcome: want {want}, got {got:?}")),
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

fn trials() -> Vec<Trial> {
    let root = repo().join("connectors");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .expect("connectors/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("connector.yaml").is_file())
        .collect();
    dirs.sort();
    let mut out = Vec::new();
    for dir in dirs {
        let id = dir.file_name().unwrap().to_string_lossy().to_string();
        out.push(every_connector_has_tests(&dir, &id));
        let Ok(text) = std::fs::read_to_string(dir.join("tests.yaml")) else {
            continue;
        };
        let file: TestsFile = match serde_yaml_ng::from_str(&text) {
            Ok(f) => f,
            Err(e) => {
                let msg = format!("{id}/tests.yaml: {e}");
                out.push(Trial::test(format!("{id}::tests.yaml parses"), move || {
                    Err(Failed::from(msg))
                }));
                continue;
            }
        };
        let file = Arc::new(file);
        for case in file.cases.clone() {
            let (id, file) = (id.clone(), file.clone());
            out.push(Trial::test(format!("{id}::{}", case.name), move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(run_case(&id, &file, &case))
                    .map_err(Failed::from)
            }));
        }
    }
    out
}

/// Each connector's folder has tests, and each of its operations has at least one case.
fn every_connector_has_tests(dir: &Path, id: &str) -> Trial {
    let dir = dir.to_path_buf();
    let id = id.to_string();
    Trial::test(format!("{id}::every operation has a case"), move || {
        let file = format!("connectors/{id}/connector.yaml");
        let source = ConnectorCatalog::shipped_sources()
            .iter()
            .find(|(f, _)| *f == file)
            .ok_or(format!("{file} is not built in"))?
            .1;
        let c = Connector::parse(source, Some(&file), true).map_err(|p| p.to_string())?;
        let text = std::fs::read_to_string(dir.join("tests.yaml"))
            .map_err(|e| format!("{id}/tests.yaml: {e}"))?;
        let file: TestsFile =
            serde_yaml_ng::from_str(&text).map_err(|e| format!("{id}/tests.yaml: {e}"))?;
        let missing: Vec<&String> = c
            .operations
            .keys()
            .filter(|op| !file.cases.iter().any(|k| &k.operation == *op))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("operations without a test case: {missing:?}").into())
        }
    })
}

/// The README's connector reference is the catalog's, so it cannot drift.
fn readme_reference_is_current() -> Trial {
    Trial::test("readme::connector reference is the catalog's", || {
        let readme =
            std::fs::read_to_string(repo().join("README.md")).map_err(|e| e.to_string())?;
        let reference = riposte_core::connector::reference(&ConnectorCatalog::shipped());
        let want = riposte_core::connector::with_reference(&readme, &reference)
            .ok_or("README.md has no connector reference markers")?;
        if want == readme {
            Ok(())
        } else {
            Err("README.md's connector reference is out of date: run \
                 `cargo run -p riposte -- connectors --write README.md`"
                .into())
        }
    })
}

fn main() {
    let args = Arguments::from_args();
    let mut trials = trials();
    trials.push(readme_reference_is_current());
    libtest_mimic::run(&args, trials).exit();
}
