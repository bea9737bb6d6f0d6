//! `aws_sigv4` connections against a real local HTTP server: the signature that reaches the wire
//! is checked against one computed here independently (hmac/sha2, following the SigV4 spec:
//! canonical request → string to sign → signing key → signature), at a fixed signing time.
//!
//! Guarantee kept by these tests: every call targets only 127.0.0.1; the credentials are AWS's
//! published documentation examples or canaries, never real ones.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{Recorded, Reply, TestServer, connection, request};
use hmac::{Hmac, KeyInit, Mac};
use riposte_core::http::{Auth, Body, HttpError, HttpResponse};
use riposte_core::ports::HttpSender;
use riposte_http::{AwsCredentials, ReqwestSender, StaticAwsCredentials};
use serde_json::json;
use sha2::{Digest, Sha256};

/// AWS's documentation example credentials.
const ACCESS_KEY_ID: &str = "AKIDEXAMPLE";
const SECRET_ACCESS_KEY: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const AMZ_DATE: &str = "20150830T123600Z";
const DATE: &str = "20150830";

/// 2015-08-30T12:36:00Z, the time of AWS's SigV4 examples.
fn signing_time() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_440_938_160)
}

fn sigv4(service: &str, region: &str) -> Auth {
    Auth::AwsSigv4 {
        service: service.into(),
        region: region.into(),
    }
}

/// A sender with the given static credentials (or none), signing at the fixed time.
fn aws_sender(credentials: Option<AwsCredentials>) -> ReqwestSender {
    let source = match credentials {
        Some(c) => StaticAwsCredentials::new(c),
        None => StaticAwsCredentials::none(),
    };
    common::sender(&[])
        .with_aws_credentials(Arc::new(source))
        .with_signing_time(signing_time())
}

fn example_credentials(session_token: Option<&str>) -> AwsCredentials {
    AwsCredentials::new(
        ACCESS_KEY_ID,
        SECRET_ACCESS_KEY,
        session_token.map(str::to_owned),
    )
}

fn terminal(result: Result<HttpResponse, HttpError>) -> String {
    match result {
        Err(HttpError::Terminal(m)) => m,
        other => panic!("expected Terminal, got {other:?}"),
    }
}

fn hmac_sha256(key: &[u8], data: &str) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap();
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The `Authorization` header SigV4 gives for `canonical_request`, computed by the spec.
fn expected_authorization(
    service: &str,
    region: &str,
    signed_headers: &str,
    canonical_request: &str,
) -> String {
    let scope = format!("{DATE}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{AMZ_DATE}\n{scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    );
    let k_date = hmac_sha256(format!("AWS4{SECRET_ACCESS_KEY}").as_bytes(), DATE);
    let k_region = hmac_sha256(&k_date, region);
    let k_service = hmac_sha256(&k_region, service);
    let k_signing = hmac_sha256(&k_service, "aws4_request");
    let signature = hex::encode(hmac_sha256(&k_signing, &string_to_sign));
    format!(
        "AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/{scope}, SignedHeaders={signed_headers}, \
         Signature={signature}"
    )
}

fn only_request(server: &TestServer) -> Recorded {
    let requests = server.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    requests.into_iter().next().unwrap()
}

#[tokio::test]
async fn security_hub_batch_update_is_signed() {
    let server = TestServer::start(|_, _| Reply::json(200, json!({"ProcessedFindings": []}))).await;
    let conn = connection(&server.base_url(), sigv4("securityhub", "us-east-1"));
    let mut req = request("POST", "/findings/batchupdate");
    req.body = Some(Body::Json(json!({
        "FindingIdentifiers": [{
            "Id": "arn:aws:securityhub:us-east-1:123456789012:finding/abc",
            "ProductArn": "arn:aws:securityhub:us-east-1::product/aws/guardduty"
        }],
        "Workflow": {"Status": "RESOLVED"},
        "Note": {"Text": "Closed by Riposte", "UpdatedBy": "riposte"}
    })));

    let response = aws_sender(Some(example_credentials(None)))
        .send(&conn, &req)
        .await
        .unwrap();
    assert_eq!(response.body, json!({"ProcessedFindings": []}));

    let r = only_request(&server);
    let body = r#"{"FindingIdentifiers":[{"Id":"arn:aws:securityhub:us-east-1:123456789012:finding/abc","ProductArn":"arn:aws:securityhub:us-east-1::product/aws/guardduty"}],"Workflow":{"Status":"RESOLVED"},"Note":{"Text":"Closed by Riposte","UpdatedBy":"riposte"}}"#;
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/findings/batchupdate")
    );
    assert_eq!(r.query, None);
    assert_eq!(r.body_text(), body);
    assert_eq!(r.header("x-amz-date"), Some(AMZ_DATE));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let host = server.addr.to_string();
    assert_eq!(r.header("host"), Some(host.as_str()));
    assert_eq!(r.header("x-amz-security-token"), None);
    assert_eq!(r.header("x-amz-content-sha256"), None);

    let authorization = r.header("authorization").unwrap();
    assert!(
        authorization.starts_with(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/securityhub/aws4_request, \
             SignedHeaders="
        ),
        "{authorization}"
    );
    assert!(
        authorization.contains("SignedHeaders=content-type;host;x-amz-date, "),
        "{authorization}"
    );

    let canonical_request = format!(
        "POST\n/findings/batchupdate\n\ncontent-type:application/json\nhost:{host}\n\
         x-amz-date:{AMZ_DATE}\n\ncontent-type;host;x-amz-date\n{}",
        sha256_hex(body.as_bytes())
    );
    assert_eq!(
        authorization,
        expected_authorization(
            "securityhub",
            "us-east-1",
            "content-type;host;x-amz-date",
            &canonical_request
        )
    );
}

#[tokio::test]
async fn session_token_is_sent_and_signed_and_query_is_canonical() {
    const TOKEN: &str = "IQoJb3JpZ2luX2VjEXAMPLE/session+token=";
    let server = TestServer::start(|_, _| Reply::json(200, json!({"Products": []}))).await;
    let conn = connection(&server.base_url(), sigv4("securityhub", "eu-west-3"));
    let mut req = request("GET", "/productSubscriptions");
    req.query = vec![
        ("NextToken".into(), "a b/c+d=é".into()),
        ("MaxResults".into(), "10".into()),
    ];

    aws_sender(Some(example_credentials(Some(TOKEN))))
        .send(&conn, &req)
        .await
        .unwrap();

    let r = only_request(&server);
    // Sent in SigV4's encoding (space as %20, '+' '/' '=' encoded), in the order given.
    assert_eq!(
        r.query.as_deref(),
        Some("NextToken=a%20b%2Fc%2Bd%3D%C3%A9&MaxResults=10")
    );
    assert_eq!(r.header("x-amz-security-token"), Some(TOKEN));
    assert_eq!(r.header("x-amz-date"), Some(AMZ_DATE));
    assert!(r.body.is_empty());
    let host = server.addr.to_string();
    let canonical_request = format!(
        "GET\n/productSubscriptions\nMaxResults=10&NextToken=a%20b%2Fc%2Bd%3D%C3%A9\n\
         host:{host}\nx-amz-date:{AMZ_DATE}\nx-amz-security-token:{TOKEN}\n\n\
         host;x-amz-date;x-amz-security-token\n{}",
        sha256_hex(b"")
    );
    assert_eq!(
        r.header("authorization"),
        Some(
            expected_authorization(
                "securityhub",
                "eu-west-3",
                "host;x-amz-date;x-amz-security-token",
                &canonical_request
            )
            .as_str()
        )
    );
}

#[tokio::test]
async fn waf_json_call_signs_every_header_and_replaces_stale_signature_headers() {
    let server = TestServer::start(|_, _| Reply::json(200, json!({"NextLockToken": "t"}))).await;
    let mut conn = connection(&server.base_url(), sigv4("wafv2", "us-east-1"));
    conn.headers
        .insert("X-Amz-Target".into(), "AWSWAF_20190729.UpdateIPSet".into());
    let mut req = request("POST", "/");
    // Set by a careless connector: the signature's own values replace them.
    req.headers.insert("Authorization".into(), "stale".into());
    req.headers
        .insert("X-Amz-Date".into(), "19700101T000000Z".into());
    let body = r#"{"Name":"riposte-block","Scope":"REGIONAL","Addresses":["203.0.113.7/32"]}"#;
    req.body = Some(Body::Text {
        content_type: "application/x-amz-json-1.1".into(),
        text: body.into(),
    });

    aws_sender(Some(example_credentials(None)))
        .send(&conn, &req)
        .await
        .unwrap();

    let r = only_request(&server);
    assert_eq!(r.body_text(), body);
    assert_eq!(r.header("x-amz-date"), Some(AMZ_DATE));
    let host = server.addr.to_string();
    let signed = "content-type;host;x-amz-date;x-amz-target";
    let canonical_request = format!(
        "POST\n/\n\ncontent-type:application/x-amz-json-1.1\nhost:{host}\n\
         x-amz-date:{AMZ_DATE}\nx-amz-target:AWSWAF_20190729.UpdateIPSet\n\n{signed}\n{}",
        sha256_hex(body.as_bytes())
    );
    assert_eq!(
        r.header("authorization"),
        Some(expected_authorization("wafv2", "us-east-1", signed, &canonical_request).as_str())
    );
}

#[tokio::test]
async fn without_credentials_nothing_is_sent() {
    let server = TestServer::start(|_, _| Reply::json(200, json!({}))).await;
    let conn = connection(&server.base_url(), sigv4("securityhub", "us-east-1"));
    let e = terminal(
        aws_sender(None)
            .send(&conn, &request("POST", "/findings/batchupdate"))
            .await,
    );
    assert!(
        e.starts_with("acme (POST /findings/batchupdate): ")
            && e.contains("AWS credentials are not configured"),
        "{e}"
    );
    // Empty values count as missing too.
    let e = terminal(
        aws_sender(Some(AwsCredentials::new("AKIDEXAMPLE", "", None)))
            .send(&conn, &request("POST", "/findings/batchupdate"))
            .await,
    );
    assert!(e.contains("AWS credentials are not configured"), "{e}");
    assert_eq!(server.connections(), 0);
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn bad_service_or_region_is_refused_before_sending() {
    let server = TestServer::start(|_, _| Reply::json(200, json!({}))).await;
    for auth in [sigv4("security hub", "us-east-1"), sigv4("securityhub", "")] {
        let conn = connection(&server.base_url(), auth);
        let e = terminal(
            aws_sender(Some(example_credentials(None)))
                .send(&conn, &request("GET", "/x"))
                .await,
        );
        assert!(e.contains("aws_sigv4"), "{e}");
    }
    assert_eq!(server.connections(), 0);
}

#[tokio::test]
async fn canary_credentials_never_appear_in_errors() {
    const SECRET: &str = "CANARY-secret-9d1e5a";
    const TOKEN: &str = "CANARY-token-4b7f21";
    // Refuses and echoes the credentials it received, like a careless API.
    let server = TestServer::start(|r, _| {
        let echo = format!(
            "token={} note={} authorization={}",
            r.header("x-amz-security-token").unwrap_or(""),
            r.header("x-note").unwrap_or(""),
            r.header("authorization").unwrap_or("")
        );
        Reply::text(403, &echo).header("x-echo", r.header("x-amz-security-token").unwrap_or(""))
    })
    .await;
    let conn = connection(&server.base_url(), sigv4("securityhub", "us-east-1"));
    let sender = aws_sender(Some(AwsCredentials::new(
        "AKIDCANARY",
        SECRET,
        Some(TOKEN.to_owned()),
    )));
    let mut req = request("POST", "/findings/batchupdate");
    req.body = Some(Body::Json(json!({"FindingIdentifiers": []})));
    // A connector that wrongly sends the secret key itself: the echo of it is scrubbed too.
    req.headers.insert("X-Note".into(), SECRET.into());
    let e = terminal(sender.send(&conn, &req).await);
    assert!(
        e.starts_with("HTTP 403 from acme (POST /findings/batchupdate): "),
        "{e}"
    );
    assert!(e.contains("token=[REDACTED] note=[REDACTED] "), "{e}");
    assert!(e.contains("Credential=AKIDCANARY/"), "{e}");
    assert!(
        !e.contains("CANARY-") && !e.contains("9d1e5a") && !e.contains("4b7f21"),
        "{e}"
    );
    // The server really did receive (and echo) both.
    let seen = &server.requests()[0];
    assert_eq!(seen.header("x-amz-security-token"), Some(TOKEN));
    assert_eq!(seen.header("x-note"), Some(SECRET));

    // A token that cannot be a header value is refused without being shown, and nothing is sent.
    let bad = aws_sender(Some(AwsCredentials::new(
        "AKIDCANARY",
        SECRET,
        Some(format!("{TOKEN}\r\nX-Injected: 1")),
    )));
    let e = terminal(bad.send(&conn, &req).await);
    assert!(!e.contains("CANARY-") && !e.contains("Injected"), "{e}");
    assert_eq!(server.requests().len(), 1);

    // Neither shows in Debug.
    let shown = format!(
        "{sender:?} {:?}",
        AwsCredentials::new("A", SECRET, Some(TOKEN.into()))
    );
    assert!(!shown.contains("CANARY"), "{shown}");
}
