//! `ReqwestSender` against a real local HTTP server: the exact request that reaches the wire, the
//! credentials, the status mapping, the limits, and that no secret ever shows in an error.
//!
//! Guarantee kept by these tests: every call targets only 127.0.0.1 and every wait is bounded.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Reply, TestServer, connection, request, secret, sender};
use riposte_core::http::{Auth, Body, HttpError};
use riposte_core::ports::HttpSender;
use serde_json::json;

fn retryable(result: Result<riposte_core::http::HttpResponse, HttpError>) -> String {
    match result {
        Err(HttpError::Retryable(m)) => m,
        other => panic!("expected Retryable, got {other:?}"),
    }
}

/// Refused before anything was sent: always safe to retry.
fn not_sent(result: Result<riposte_core::http::HttpResponse, HttpError>) -> String {
    match result {
        Err(HttpError::NotSent(m)) => m,
        other => panic!("expected NotSent, got {other:?}"),
    }
}

fn terminal(result: Result<riposte_core::http::HttpResponse, HttpError>) -> String {
    match result {
        Err(HttpError::Terminal(m)) => m,
        other => panic!("expected Terminal, got {other:?}"),
    }
}

#[tokio::test]
async fn json_post_with_bearer_query_and_headers() {
    let server = TestServer::start(|_, _| {
        Reply::json(201, json!({"result": {"sys_id": "abc", "n": [1, 2]}}))
            .header("x-request-id", "r-1")
    })
    .await;
    let mut conn = connection(
        &server.base_url(),
        Auth::Bearer {
            token: secret("acme-token"),
        },
    );
    conn.headers
        .insert("X-Common".into(), "from-connection".into());
    conn.headers.insert("X-Shared".into(), "connection".into());
    let mut req = request("POST", "/api/now/table/incident");
    req.query = vec![
        ("sysparm_query".into(), "a b&c=d".into()),
        ("limit".into(), "10".into()),
    ];
    req.headers.insert("X-Shared".into(), "request".into());
    req.body = Some(Body::Json(
        json!({"short_description": "Block 203.0.113.7", "n": 1}),
    ));
    req.idempotency_key = Some("run1-step2-0".into());

    let response = sender(&[("acme-token", "tok-123")])
        .send(&conn, &req)
        .await
        .unwrap();

    assert_eq!(response.status, 201);
    assert_eq!(
        response.body,
        json!({"result": {"sys_id": "abc", "n": [1, 2]}})
    );
    assert_eq!(
        response.headers.get("x-request-id").map(String::as_str),
        Some("r-1")
    );
    assert_eq!(
        response.headers.get("content-type").map(String::as_str),
        Some("application/json")
    );

    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/api/now/table/incident");
    assert_eq!(
        r.query.as_deref(),
        Some("sysparm_query=a+b%26c%3Dd&limit=10")
    );
    assert_eq!(r.header("authorization"), Some("Bearer tok-123"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("idempotency-key"), Some("run1-step2-0"));
    assert_eq!(r.header("x-common"), Some("from-connection"));
    assert_eq!(r.header("x-shared"), Some("request"));
    let body = r#"{"short_description":"Block 203.0.113.7","n":1}"#;
    assert_eq!(r.body_text(), body);
    assert_eq!(
        r.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    assert_eq!(
        r.header_names(),
        vec![
            "accept",
            "authorization",
            "content-length",
            "content-type",
            "host",
            "idempotency-key",
            "user-agent",
            "x-common",
            "x-shared",
        ]
    );
    assert_eq!(r.header("host"), Some(server.addr.to_string().as_str()));
}

#[tokio::test]
async fn get_returns_text_body_as_json_string() {
    let server = TestServer::start(|_, _| Reply::text(200, "plain \u{e9}")).await;
    let conn = connection(&server.base_url(), Auth::None);
    let response = sender(&[])
        .send(&conn, &request("get", "/status"))
        .await
        .unwrap();
    assert_eq!(response.body, json!("plain \u{e9}"));
    let r = &server.requests()[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str(), r.query.as_deref()),
        ("GET", "/status", None)
    );
    assert!(r.body.is_empty());
    assert_eq!(r.header("authorization"), None);
}

#[tokio::test]
async fn base_url_path_prefix_is_kept() {
    let server = TestServer::start(|_, _| Reply::json(200, json!({}))).await;
    let conn = connection(&format!("{}/api/v1/", server.base_url()), Auth::None);
    sender(&[])
        .send(&conn, &request("DELETE", "/users/u%2F1"))
        .await
        .unwrap();
    let r = &server.requests()[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("DELETE", "/api/v1/users/u%2F1")
    );
}

#[tokio::test]
async fn basic_auth_exact_header() {
    let server = TestServer::start(|_, _| Reply::json(200, json!({"ok": true}))).await;
    let conn = connection(
        &server.base_url(),
        Auth::Basic {
            username: "svc-riposte".into(),
            password: secret("acme-password"),
        },
    );
    sender(&[("acme-password", "p@ss:w0rd")])
        .send(&conn, &request("GET", "/me"))
        .await
        .unwrap();
    // base64("svc-riposte:p@ss:w0rd")
    assert_eq!(
        server.requests()[0].header("authorization"),
        Some("Basic c3ZjLXJpcG9zdGU6cEBzczp3MHJk")
    );
}

#[tokio::test]
async fn api_key_header_with_prefix() {
    let server = TestServer::start(|_, _| Reply::json(200, json!([]))).await;
    let conn = connection(
        &server.base_url(),
        Auth::ApiKey {
            header: Some("Authorization".into()),
            query: None,
            prefix: "SSWS ".into(),
            key: secret("okta-key"),
        },
    );
    sender(&[("okta-key", "00abcXYZ")])
        .send(&conn, &request("GET", "/api/v1/users"))
        .await
        .unwrap();
    let r = &server.requests()[0];
    assert_eq!(r.header("authorization"), Some("SSWS 00abcXYZ"));
    assert_eq!(r.query, None);
}

#[tokio::test]
async fn api_key_in_query() {
    let server = TestServer::start(|_, _| Reply::json(200, json!({"ok": 1}))).await;
    let conn = connection(
        &server.base_url(),
        Auth::ApiKey {
            header: None,
            query: Some("key".into()),
            prefix: String::new(),
            key: secret("pan-key"),
        },
    );
    let mut req = request("GET", "/api/");
    req.query = vec![("type".into(), "op".into())];
    sender(&[("pan-key", "k+y/=1")])
        .send(&conn, &req)
        .await
        .unwrap();
    let r = &server.requests()[0];
    assert_eq!(r.path, "/api/");
    assert_eq!(r.query.as_deref(), Some("type=op&key=k%2By%2F%3D1"));
    assert_eq!(r.header("authorization"), None);
}

#[tokio::test]
async fn form_body_exact_bytes() {
    let server = TestServer::start(|_, _| Reply::json(200, json!({}))).await;
    let conn = connection(&server.base_url(), Auth::None);
    let mut req = request("PUT", "/form");
    req.body = Some(Body::Form(BTreeMap::from([
        ("b".to_string(), "x y&z".to_string()),
        ("a".to_string(), "1=2/é".to_string()),
    ])));
    sender(&[]).send(&conn, &req).await.unwrap();
    let r = &server.requests()[0];
    assert_eq!(r.body, b"a=1%3D2%2F%C3%A9&b=x+y%26z".to_vec());
    assert_eq!(
        r.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
}

#[tokio::test]
async fn text_body_with_its_content_type() {
    let server = TestServer::start(|_, _| Reply::text(200, "<ok/>")).await;
    let conn = connection(&server.base_url(), Auth::None);
    let mut req = request("PATCH", "/xml");
    req.body = Some(Body::Text {
        content_type: "application/xml; charset=utf-8".into(),
        text: "<block ip=\"203.0.113.7\"/>".into(),
    });
    let response = sender(&[]).send(&conn, &req).await.unwrap();
    assert_eq!(response.body, json!("<ok/>"));
    let r = &server.requests()[0];
    assert_eq!(r.method, "PATCH");
    assert_eq!(r.body_text(), "<block ip=\"203.0.113.7\"/>");
    assert_eq!(
        r.header("content-type"),
        Some("application/xml; charset=utf-8")
    );
}

fn oauth_server(expires_in: u64) -> impl Fn(&common::Recorded, usize) -> Reply {
    move |r, nth| match r.path.as_str() {
        "/oauth/token" => Reply::json(
            200,
            json!({"access_token": format!("tok-{nth}"), "token_type": "Bearer", "expires_in": expires_in}),
        ),
        // Which token arrived, by its number: the token itself is a credential, scrubbed from
        // any answer that echoes it.
        _ => Reply::json(200, json!({"seen": seen_token(r)})),
    }
}

fn seen_token(r: &common::Recorded) -> String {
    r.header("authorization")
        .unwrap_or("")
        .replace("Bearer tok-", "token #")
}

fn oauth_connection(server: &TestServer) -> riposte_core::http::Connection {
    connection(
        &server.base_url(),
        Auth::Oauth2ClientCredentials {
            token_url: format!("{}/oauth/token", server.base_url()),
            client_id: "riposte client".into(),
            client_secret: secret("oauth-secret"),
            scope: Some("read write".into()),
        },
    )
}

#[tokio::test]
async fn oauth2_client_credentials_exact_form_and_cached_token() {
    let server = TestServer::start(oauth_server(3600)).await;
    let conn = oauth_connection(&server);
    let sender = sender(&[("oauth-secret", "s3cr+t&x")]);

    let first = sender.send(&conn, &request("GET", "/api/a")).await.unwrap();
    let second = sender.send(&conn, &request("GET", "/api/b")).await.unwrap();
    assert_eq!(first.body, json!({"seen": "token #1"}));
    assert_eq!(second.body, json!({"seen": "token #1"}));

    let requests = server.requests();
    let paths: Vec<&str> = requests.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, vec!["/oauth/token", "/api/a", "/api/b"]);
    let token = &requests[0];
    assert_eq!(token.method, "POST");
    assert_eq!(
        token.body_text(),
        "grant_type=client_credentials&client_id=riposte+client&client_secret=s3cr%2Bt%26x&scope=read+write"
    );
    assert_eq!(
        token.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(token.header("accept"), Some("application/json"));
    assert_eq!(token.header("authorization"), None);
}

#[tokio::test]
async fn oauth2_token_near_expiry_is_refetched() {
    // expires_in under the 60 s margin: never reused.
    let server = TestServer::start(oauth_server(30)).await;
    let conn = oauth_connection(&server);
    let sender = sender(&[("oauth-secret", "s")]);
    let a = sender.send(&conn, &request("GET", "/api/a")).await.unwrap();
    let b = sender.send(&conn, &request("GET", "/api/b")).await.unwrap();
    assert_eq!(a.body, json!({"seen": "token #1"}));
    assert_eq!(b.body, json!({"seen": "token #2"}));
    assert_eq!(server.requests_to("/oauth/token"), 2);
}

#[tokio::test]
async fn oauth2_token_refetched_once_expired() {
    // expires_in 61 s: usable for 1 s (61 - 60 s margin).
    let server = TestServer::start(oauth_server(61)).await;
    let conn = oauth_connection(&server);
    let sender = sender(&[("oauth-secret", "s")]);
    sender.send(&conn, &request("GET", "/api/a")).await.unwrap();
    sender.send(&conn, &request("GET", "/api/b")).await.unwrap();
    assert_eq!(server.requests_to("/oauth/token"), 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let c = sender.send(&conn, &request("GET", "/api/c")).await.unwrap();
    assert_eq!(c.body, json!({"seen": "token #2"}));
    assert_eq!(server.requests_to("/oauth/token"), 2);
}

#[tokio::test]
async fn oauth2_401_invalidates_the_cached_token() {
    let server = TestServer::start(|r, nth| match r.path.as_str() {
        "/oauth/token" => Reply::json(
            200,
            json!({"access_token": format!("tok-{nth}"), "expires_in": 3600}),
        ),
        "/api/a" if nth == 1 => Reply::json(401, json!({"error": "invalid_token"})),
        _ => Reply::json(200, json!({"seen": seen_token(r)})),
    })
    .await;
    let conn = oauth_connection(&server);
    let sender = sender(&[("oauth-secret", "s")]);
    let err = terminal(sender.send(&conn, &request("GET", "/api/a")).await);
    assert!(err.contains("HTTP 401"), "{err}");
    assert!(!err.contains("tok-1"), "{err}");
    let again = sender.send(&conn, &request("GET", "/api/a")).await.unwrap();
    assert_eq!(again.body, json!({"seen": "token #2"}));
    assert_eq!(server.requests_to("/oauth/token"), 2);
}

#[tokio::test]
async fn oauth2_token_endpoint_errors_map_and_hide_the_secret() {
    let server = TestServer::start(|r, _| match r.path.as_str() {
        "/oauth/token" => Reply::text(401, &format!("bad client: {}", r.body_text())),
        _ => Reply::json(200, json!({})),
    })
    .await;
    let conn = oauth_connection(&server);
    let err = terminal(
        sender(&[("oauth-secret", "CANARY-0auth")])
            .send(&conn, &request("GET", "/api/a"))
            .await,
    );
    assert!(
        err.contains("OAuth2 token request") && err.contains("HTTP 401"),
        "{err}"
    );
    assert!(
        !err.contains("CANARY") && err.contains("[REDACTED]"),
        "{err}"
    );
    assert_eq!(server.requests_to("/api/a"), 0);
}

#[tokio::test]
async fn status_mapping() {
    let server = TestServer::start(|r, _| match r.path.as_str() {
        "/503" => Reply::text(503, "down for maintenance"),
        "/429" => Reply::json(429, json!({"error": "slow down"})).header("retry-after", "3"),
        "/408" => Reply::text(408, "timeout"),
        "/404" => Reply::json(404, json!({"error": "no such user"})),
        "/422" => Reply::text(422, &"x".repeat(1000)),
        _ => Reply::text(200, "ok"),
    })
    .await;
    let conn = connection(&server.base_url(), Auth::None);
    let sender = sender(&[]);

    let e = retryable(sender.send(&conn, &request("POST", "/503")).await);
    assert_eq!(e, "HTTP 503 from acme (POST /503): down for maintenance");
    let e = retryable(sender.send(&conn, &request("GET", "/429")).await);
    assert!(
        e.starts_with("HTTP 429 from acme (GET /429): ") && e.contains("slow down"),
        "{e}"
    );
    let e = retryable(sender.send(&conn, &request("GET", "/408")).await);
    assert!(e.starts_with("HTTP 408 from acme"), "{e}");
    let e = terminal(sender.send(&conn, &request("DELETE", "/404")).await);
    assert!(
        e.starts_with("HTTP 404 from acme (DELETE /404): ") && e.contains("no such user"),
        "{e}"
    );
    // At most 300 characters of the body are quoted.
    let e = terminal(sender.send(&conn, &request("GET", "/422")).await);
    assert!(
        e.contains(&"x".repeat(300)) && !e.contains(&"x".repeat(301)),
        "{e}"
    );
}

#[tokio::test]
async fn connection_refused_is_retryable() {
    let port = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let conn = connection(&format!("http://127.0.0.1:{port}"), Auth::None);
    let e = not_sent(sender(&[]).send(&conn, &request("GET", "/x")).await);
    assert!(
        e.contains("acme (GET /x)") && e.contains("could not connect"),
        "{e}"
    );
}

#[tokio::test]
async fn slow_server_times_out_quickly_and_retryably() {
    let server =
        TestServer::start(|_, _| Reply::text(200, "late").after(Duration::from_secs(10))).await;
    let conn = connection(&server.base_url(), Auth::None);
    let mut req = request("GET", "/slow");
    req.timeout_ms = Some(200);
    let started = Instant::now();
    let e = retryable(sender(&[]).send(&conn, &req).await);
    let elapsed = started.elapsed();
    assert!(e.contains("timed out after 200 ms"), "{e}");
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");

    // The connection's timeout applies when it is the smaller one.
    let mut conn = conn;
    conn.timeout_ms = 150;
    req.timeout_ms = Some(5_000);
    let started = Instant::now();
    let e = retryable(sender(&[]).send(&conn, &req).await);
    assert!(e.contains("timed out after 150 ms"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn response_over_the_cap_is_refused() {
    let server = TestServer::start(|r, _| match r.path.as_str() {
        "/big" => Reply::text(200, &"a".repeat(5000)),
        // No Content-Length: the cap is enforced while reading the chunks.
        "/chunked" => Reply::text(200, &"b".repeat(5000)).chunked(),
        "/chunked-ok" => Reply::text(200, &"d".repeat(1000)).chunked(),
        _ => Reply::text(200, &"c".repeat(1000)),
    })
    .await;
    let mut conn = connection(&server.base_url(), Auth::None);
    conn.max_response_bytes = 1000;
    let sender = sender(&[]);

    let e = terminal(sender.send(&conn, &request("GET", "/big")).await);
    assert!(e.ends_with("response body exceeds 1000 bytes"), "{e}");
    let e = terminal(sender.send(&conn, &request("GET", "/chunked")).await);
    assert!(e.ends_with("response body exceeds 1000 bytes"), "{e}");
    assert_eq!(server.requests().len(), 2);

    let ok = sender.send(&conn, &request("GET", "/exact")).await.unwrap();
    assert_eq!(ok.body, json!("c".repeat(1000)));
    let ok = sender
        .send(&conn, &request("GET", "/chunked-ok"))
        .await
        .unwrap();
    assert_eq!(ok.body, json!("d".repeat(1000)));
    assert_eq!(
        ok.headers.get("transfer-encoding").map(String::as_str),
        Some("chunked")
    );
    assert!(!ok.headers.contains_key("content-length"));
    // HEAD: the declared length of the body that is not sent does not count.
    let head = sender.send(&conn, &request("HEAD", "/big")).await.unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(
        head.headers.get("content-length").map(String::as_str),
        Some("5000")
    );
    assert_eq!(head.body, json!(""));
    assert_eq!(server.requests().len(), 5);
}

#[tokio::test]
async fn redirect_is_returned_not_followed() {
    let server = TestServer::start(|r, _| match r.path.as_str() {
        "/old" => Reply::text(302, "moved").header("location", "/new"),
        _ => Reply::text(200, "new"),
    })
    .await;
    let conn = connection(&server.base_url(), Auth::None);
    let response = sender(&[])
        .send(&conn, &request("GET", "/old"))
        .await
        .unwrap();
    assert_eq!(response.status, 302);
    assert_eq!(
        response.headers.get("location").map(String::as_str),
        Some("/new")
    );
    assert_eq!(server.requests_to("/new"), 0);
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn header_injection_refused_before_sending() {
    let server = TestServer::start(|_, _| Reply::text(200, "ok")).await;
    let conn = connection(&server.base_url(), Auth::None);
    let sender = sender(&[]);

    let mut req = request("POST", "/x");
    req.headers
        .insert("X-Note".into(), "a\r\nX-Injected: evil".into());
    let e = terminal(sender.send(&conn, &req).await);
    assert!(e.contains("X-Note") && e.contains("CR or LF"), "{e}");
    assert!(!e.contains("Injected") && !e.contains("evil"), "{e}");

    let mut bad_conn = conn.clone();
    bad_conn.headers.insert("X-Conn".into(), "v\nw".into());
    let e = terminal(sender.send(&bad_conn, &request("GET", "/x")).await);
    assert!(e.contains("X-Conn"), "{e}");

    let mut req = request("GET", "/x");
    req.idempotency_key = Some("k\r\n".into());
    terminal(sender.send(&conn, &req).await);

    let mut req = request("GET", "/x");
    req.headers.insert("Bad Name".into(), "v".into());
    terminal(sender.send(&conn, &req).await);

    let mut req = request("GET", "/x");
    req.headers.insert("Host".into(), "evil.example".into());
    terminal(sender.send(&conn, &req).await);

    // A secret with a line break cannot inject either, and is not shown.
    let bearer = common::connection(&server.base_url(), Auth::Bearer { token: secret("t") });
    let e = terminal(
        common::sender(&[("t", "CANARY-x\r\nX-Injected: 1")])
            .send(&bearer, &request("GET", "/x"))
            .await,
    );
    assert!(!e.contains("CANARY") && !e.contains("Injected"), "{e}");

    assert_eq!(server.connections(), 0);
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn bad_paths_methods_and_connections_refused_before_sending() {
    let server = TestServer::start(|_, _| Reply::text(200, "ok")).await;
    let conn = connection(&server.base_url(), Auth::None);
    let sender = sender(&[]);
    for path in [
        "x",
        "/../admin",
        "/a/%2e%2e/admin",
        "/a/..%2fadmin",
        "/http://evil.example/",
        "/@evil.example",
        "/a\\b",
        "/a#b",
        "/a b",
        "/a\nb",
    ] {
        let e = terminal(sender.send(&conn, &request("GET", path)).await);
        assert!(e.starts_with("acme (GET "), "{path:?}: {e}");
    }
    let e = terminal(sender.send(&conn, &request("TRACE", "/x")).await);
    assert!(e.contains("TRACE"), "{e}");
    let mut other = request("GET", "/x");
    other.connection = "other".into();
    terminal(sender.send(&conn, &other).await);
    assert_eq!(server.connections(), 0);
}

#[tokio::test]
async fn missing_secret_names_the_secret_only() {
    let server = TestServer::start(|_, _| Reply::text(200, "ok")).await;
    let conn = connection(
        &server.base_url(),
        Auth::Bearer {
            token: secret("not-there"),
        },
    );
    let e = terminal(
        sender(&[("other", "CANARY-other")])
            .send(&conn, &request("GET", "/x"))
            .await,
    );
    assert!(
        e.contains("\"not-there\"") && e.contains("not defined"),
        "{e}"
    );
    assert!(!e.contains("CANARY"), "{e}");
    assert_eq!(server.connections(), 0);
}

#[tokio::test]
async fn canary_secret_never_appears_in_errors() {
    const CANARY: &str = "CANARY-7f3a9c";
    // Echoes the credentials it received, in the body and a header, like a careless API.
    let server = TestServer::start(|r, _| {
        let echo = format!(
            "auth={:?} query={:?}",
            r.header("authorization").unwrap_or(""),
            r.query
        );
        Reply::text(500, &echo).header("x-echo", r.header("authorization").unwrap_or(""))
    })
    .await;
    let bearer = connection(
        &server.base_url(),
        Auth::Bearer {
            token: secret("canary"),
        },
    );
    let sender = sender(&[("canary", CANARY)]);
    let e = retryable(sender.send(&bearer, &request("POST", "/echo")).await);
    assert!(e.starts_with("HTTP 500 from acme (POST /echo): "), "{e}");
    assert!(!e.contains(CANARY), "{e}");
    assert!(e.contains("Bearer [REDACTED]"), "{e}");
    // The server really did receive (and echo) the canary.
    assert_eq!(
        server.requests()[0].header("authorization"),
        Some("Bearer CANARY-7f3a9c")
    );

    // Basic: the echoed base64 credential is scrubbed too.
    let basic = connection(
        &server.base_url(),
        Auth::Basic {
            username: "u".into(),
            password: secret("canary"),
        },
    );
    let e = retryable(sender.send(&basic, &request("GET", "/echo")).await);
    assert!(!e.contains(CANARY) && e.contains("Basic [REDACTED]"), "{e}");

    // API key in the query: echoed query is scrubbed, and transport errors never show the URL.
    let query_key = connection(
        &server.base_url(),
        Auth::ApiKey {
            header: None,
            query: Some("key".into()),
            prefix: String::new(),
            key: secret("canary"),
        },
    );
    let e = retryable(sender.send(&query_key, &request("GET", "/echo")).await);
    assert!(!e.contains(CANARY) && !e.contains("7f3a9c"), "{e}");
    let port = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let closed = connection(
        &format!("http://127.0.0.1:{port}"),
        Auth::ApiKey {
            header: None,
            query: Some("key".into()),
            prefix: String::new(),
            key: secret("canary"),
        },
    );
    let e = not_sent(sender.send(&closed, &request("GET", "/x")).await);
    assert!(!e.contains(CANARY) && !e.contains("7f3a9c"), "{e}");
    let e = format!("{:?}", sender.send(&closed, &request("GET", "/x")).await);
    assert!(!e.contains(CANARY), "{e}");
}

#[tokio::test]
async fn a_secret_placed_in_the_json_body_is_sent_there_and_never_shown() {
    const CANARY: &str = "CANARY-5b1d0e";
    let server = TestServer::start(|r, _| Reply::text(400, &r.body_text())).await;
    let conn = connection(
        &server.base_url(),
        Auth::JsonBodyKey {
            member: "routing_key".into(),
            key: secret("canary"),
        },
    );
    let sender = sender(&[("canary", CANARY)]);
    let mut req = request("POST", "/v2/enqueue");
    req.body = Some(Body::Json(json!({"event_action": "trigger"})));
    // As an error (the generic HTTP action) and as a response a connector judges.
    let e = terminal(sender.send(&conn, &req).await);
    assert!(!e.contains(CANARY) && e.contains("[REDACTED]"), "{e}");
    req.any_status = true;
    let answer = sender.send(&conn, &req).await.unwrap();
    assert_eq!(answer.status, 400);
    let shown = answer.body.to_string();
    assert!(
        !shown.contains(CANARY) && shown.contains("[REDACTED]"),
        "{shown}"
    );
    // The vendor did receive it, in the body member.
    let sent: serde_json::Value = serde_json::from_slice(&server.requests()[0].body).unwrap();
    assert_eq!(
        sent,
        json!({"event_action": "trigger", "routing_key": CANARY})
    );
    // A request with no JSON object body cannot carry it: refused before sending.
    req.body = None;
    let e = terminal(sender.send(&conn, &req).await);
    assert!(e.contains("routing_key"), "{e}");
    assert_eq!(server.requests().len(), 2);
}
