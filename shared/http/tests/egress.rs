//! The egress policy end to end: refused destinations are refused before any connection is made,
//! whether the host is an IP literal or a name that resolves to a non-public address.
//!
//! Guarantee kept by these tests: the only real server is on 127.0.0.1 and must see no
//! connection when the policy refuses; refused metadata addresses are never connected to.

mod common;

use common::{Reply, TestServer, connection, request, secret, sender, sender_with};
use riposte_core::http::{Auth, HttpError, HttpResponse};
use riposte_core::ports::HttpSender;
use riposte_http::EgressPolicy;

fn terminal(result: Result<HttpResponse, HttpError>) -> String {
    match result {
        Err(HttpError::Terminal(m)) => m,
        other => panic!("expected Terminal, got {other:?}"),
    }
}

#[tokio::test]
async fn strict_refuses_plain_http() {
    let server = TestServer::start(|_, _| Reply::text(200, "ok")).await;
    let conn = connection(&format!("http://127.0.0.1:{}", server.port()), Auth::None);
    let e = terminal(
        sender_with(&[], EgressPolicy::strict())
            .send(&conn, &request("GET", "/x"))
            .await,
    );
    assert!(
        e.contains("egress policy") && e.contains("scheme http"),
        "{e}"
    );
    assert_eq!(server.connections(), 0);
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn strict_refuses_loopback_literal() {
    let server = TestServer::start(|_, _| Reply::text(200, "ok")).await;
    let sender = sender_with(&[], EgressPolicy::strict());
    for base in [
        format!("https://127.0.0.1:{}", server.port()),
        format!("https://[::ffff:127.0.0.1]:{}", server.port()),
        format!("https://2130706433:{}", server.port()),
    ] {
        let e = terminal(
            sender
                .send(&connection(&base, Auth::None), &request("GET", "/x"))
                .await,
        );
        assert!(e.contains("egress policy"), "{base}: {e}");
    }
    assert_eq!(server.connections(), 0);
}

#[tokio::test]
async fn strict_refuses_metadata_addresses() {
    let sender = sender_with(&[], EgressPolicy::strict());
    let e = terminal(
        sender
            .send(
                &connection("https://169.254.169.254/", Auth::None),
                &request("GET", "/latest/meta-data/iam/security-credentials/"),
            )
            .await,
    );
    assert!(
        e.contains("169.254.169.254") && e.contains("metadata"),
        "{e}"
    );
    let e = terminal(
        sender
            .send(
                &connection("https://[fd00:ec2::254]", Auth::None),
                &request("GET", "/latest/meta-data/"),
            )
            .await,
    );
    assert!(e.contains("metadata"), "{e}");
}

#[tokio::test]
async fn strict_refuses_localhost_after_resolution() {
    let server = TestServer::start(|_, _| Reply::text(200, "ok")).await;
    let conn = connection(&format!("https://localhost:{}", server.port()), Auth::None);
    let e = terminal(
        sender_with(&[], EgressPolicy::strict())
            .send(&conn, &request("GET", "/x"))
            .await,
    );
    assert!(
        e.contains("\"localhost\" resolved to") && e.contains("loopback"),
        "{e}"
    );
    assert_eq!(server.connections(), 0);
}

#[tokio::test]
async fn resolver_check_applies_when_http_is_allowed() {
    // http allowed but private addresses not: only the resolver stands between the name and the
    // loopback server, and it must refuse before any connection.
    let server = TestServer::start(|_, _| Reply::text(200, "ok")).await;
    let policy = EgressPolicy {
        allow_http: true,
        allow_private: false,
    };
    let conn = connection(&format!("http://localhost:{}", server.port()), Auth::None);
    let e = terminal(
        sender_with(&[], policy)
            .send(&conn, &request("GET", "/x"))
            .await,
    );
    assert!(e.contains("loopback"), "{e}");
    assert_eq!(server.connections(), 0);

    // The same name under the permissive policy goes through the same resolver and connects.
    let ok = sender(&[])
        .send(&conn, &request("GET", "/x"))
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn oauth2_token_url_must_pass_the_policy() {
    let server = TestServer::start(|_, _| Reply::json(200, serde_json::json!({}))).await;
    let sender = sender_with(&[("s", "v")], EgressPolicy::strict());
    for token_url in [
        format!("http://127.0.0.1:{}/token", server.port()),
        format!("https://127.0.0.1:{}/token", server.port()),
        "https://169.254.169.254/token".to_string(),
    ] {
        let conn = connection(
            "https://api.example.com",
            Auth::Oauth2ClientCredentials {
                token_url: token_url.clone(),
                client_id: "c".into(),
                client_secret: secret("s"),
                scope: None,
            },
        );
        let e = terminal(sender.send(&conn, &request("GET", "/x")).await);
        assert!(
            e.contains("OAuth2 token request") && e.contains("egress policy"),
            "{token_url}: {e}"
        );
    }
    assert_eq!(server.connections(), 0);
}

#[tokio::test]
async fn only_http_and_https_schemes() {
    let sender = sender(&[]);
    for base in ["ftp://127.0.0.1", "file:///etc", "unix:/run/x.sock"] {
        terminal(
            sender
                .send(&connection(base, Auth::None), &request("GET", "/x"))
                .await,
        );
    }
}
