//! `EnvSecrets`, `StaticSecrets` and `redact_request`.
//!
//! Guarantee kept by these tests: secret files are read only directly inside the configured
//! directory, and a shown request never carries a sensitive header value. Environment variables
//! are set only in a child process (setting them in this one would need `unsafe`).

use std::collections::BTreeMap;
use std::path::Path;

use riposte_core::http::{Body, HttpRequest};
use riposte_core::ports::{SecretError, Secrets};
use riposte_http::{EnvSecrets, StaticSecrets, redact_request};

const CHILD: &str = "RIPOSTE_HTTP_SECRETS_TEST_CHILD";

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn env_var_lookup() {
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "env_var_lookup_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("RIPOSTE_SECRET_OKTA_API_TOKEN", "from-env")
        .env("RIPOSTE_SECRET_SHARED", "env-wins")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("CHILD-CHECKED"),
        "child did not run:\n{stdout}"
    );
}

/// Runs only inside the child process started by `env_var_lookup`.
#[tokio::test]
async fn env_var_lookup_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("shared"), "from-file\n");
    let secrets = EnvSecrets::new(Some(dir.path().to_path_buf()));
    assert_eq!(secrets.get("okta-api.token").await.unwrap(), "from-env");
    assert_eq!(secrets.get("okta/api-token").await.unwrap(), "from-env");
    assert_eq!(secrets.get("OKTA_API_TOKEN").await.unwrap(), "from-env");
    assert_eq!(secrets.get("shared").await.unwrap(), "env-wins");
    assert_eq!(
        EnvSecrets::new(None).get("okta-api-token").await.unwrap(),
        "from-env"
    );
    println!("CHILD-CHECKED");
}

#[tokio::test]
async fn file_lookup_trims_trailing_newlines() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("okta-token"), "abc\n");
    write(&dir.path().join("crlf.key"), "v\r\n");
    write(&dir.path().join("multi"), "line1\nline2\n\n");
    let secrets = EnvSecrets::new(Some(dir.path().to_path_buf()));
    assert_eq!(secrets.get("okta-token").await.unwrap(), "abc");
    assert_eq!(secrets.get("crlf.key").await.unwrap(), "v");
    assert_eq!(secrets.get("multi").await.unwrap(), "line1\nline2");
    assert_eq!(
        secrets.get("absent").await,
        Err(SecretError::Missing("absent".into()))
    );
    assert_eq!(
        EnvSecrets::new(None).get("okta-token").await,
        Err(SecretError::Missing("okta-token".into()))
    );
}

#[tokio::test]
async fn path_traversal_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("secrets");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    write(&root.path().join("outside"), "TOP-SECRET");
    write(&dir.join("sub").join("inner"), "nested");
    write(&dir.join(".hidden"), "hidden");
    let outside = root.path().join("outside");
    let secrets = EnvSecrets::new(Some(dir.clone()));
    for name in [
        "../outside",
        "..",
        "sub/../../outside",
        "sub/inner",
        "sub\\inner",
        ".hidden",
        outside.to_str().unwrap(),
        "",
    ] {
        match secrets.get(name).await {
            Err(SecretError::Missing(n)) => assert_eq!(n, name),
            other => panic!("{name:?} gave {other:?}"),
        }
    }
}

#[tokio::test]
async fn static_secrets() {
    let secrets = StaticSecrets::from_pairs([("a", "1")]);
    assert_eq!(secrets.get("a").await.unwrap(), "1");
    assert_eq!(
        secrets.get("b").await,
        Err(SecretError::Missing("b".into()))
    );
    assert!(!format!("{secrets:?}").contains('1'));
}

#[test]
fn redact_request_hides_sensitive_headers_only() {
    let request = HttpRequest {
        connection: "acme".into(),
        method: "POST".into(),
        path: "/x".into(),
        query: vec![("q".into(), "v".into())],
        headers: BTreeMap::from([
            ("Authorization".to_string(), "Bearer CANARY-1".to_string()),
            ("X-API-Key".to_string(), "CANARY-2".to_string()),
            ("X-Refresh-Token".to_string(), "CANARY-3".to_string()),
            ("Cookie".to_string(), "sid=CANARY-4".to_string()),
            ("X-Client-Secret".to_string(), "CANARY-5".to_string()),
            ("Content-Type".to_string(), "application/json".to_string()),
            ("X-Request-Id".to_string(), "r-1".to_string()),
        ]),
        body: Some(Body::Json(serde_json::json!({"a": 1}))),
        idempotency_key: Some("k".into()),
        timeout_ms: Some(5),
        any_status: false,
    };
    let shown = redact_request(&request);
    assert!(!format!("{shown:?}").contains("CANARY"));
    assert_eq!(shown.headers["Authorization"], "[REDACTED]");
    assert_eq!(shown.headers["X-API-Key"], "[REDACTED]");
    assert_eq!(shown.headers["X-Refresh-Token"], "[REDACTED]");
    assert_eq!(shown.headers["Cookie"], "[REDACTED]");
    assert_eq!(shown.headers["X-Client-Secret"], "[REDACTED]");
    assert_eq!(shown.headers["Content-Type"], "application/json");
    assert_eq!(shown.headers["X-Request-Id"], "r-1");
    let mut expected = request.clone();
    expected.headers = shown.headers.clone();
    assert_eq!(shown, expected);
    // The original is untouched.
    assert_eq!(request.headers["Authorization"], "Bearer CANARY-1");
}
