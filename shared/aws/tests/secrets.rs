//! Secrets Manager through the real SDK against the emulator: by name under the prefix, cached,
//! and a missing one named without any value.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use riposte_aws::SecretsManagerSecrets;
use riposte_core::model::Millis;
use riposte_core::ports::{Clock, SecretError, Secrets};

struct TestClock(AtomicI64);
impl Clock for TestClock {
    fn now(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn secrets_resolve_under_the_prefix_and_are_cached_for_five_minutes() {
    let moto = support::moto();
    let sdk = support::sdk_config(&moto.endpoint).await;
    let client = aws_sdk_secretsmanager::Client::new(&sdk);
    client
        .create_secret()
        .name("riposte/servicenow-password")
        .secret_string("first-value")
        .send()
        .await
        .unwrap();
    client
        .create_secret()
        .name("other/servicenow-password")
        .secret_string("not-ours")
        .send()
        .await
        .unwrap();
    let clock = Arc::new(TestClock(AtomicI64::new(1_000_000)));
    let secrets = SecretsManagerSecrets::new(client.clone(), "riposte/", clock.clone());
    assert_eq!(
        secrets.get("servicenow-password").await.unwrap(),
        "first-value"
    );

    client
        .put_secret_value()
        .secret_id("riposte/servicenow-password")
        .secret_string("rotated")
        .send()
        .await
        .unwrap();
    assert_eq!(
        secrets.get("servicenow-password").await.unwrap(),
        "first-value",
        "cached"
    );
    clock
        .0
        .fetch_add(riposte_aws::secrets::CACHE_MS, Ordering::SeqCst);
    assert_eq!(
        secrets.get("servicenow-password").await.unwrap(),
        "rotated",
        "re-read after five minutes"
    );

    assert_eq!(
        secrets.get("missing").await,
        Err(SecretError::Missing("missing".into()))
    );
    assert_eq!(
        secrets.get("../other/x").await,
        Err(SecretError::Missing("../other/x".into()))
    );
}
