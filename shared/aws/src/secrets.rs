//! Secrets from AWS Secrets Manager, resolved at call time and cached briefly.
//!
//! Guarantee: a secret is read only by name under this deployment's prefix (`riposte/` by default,
//! the only ARNs the step worker's role may read), values never reach a log or an error, and a
//! cached value is used for at most [`CACHE_MS`].

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Mutex;

use riposte_core::model::Millis;
use riposte_core::ports::{Clock, SecretError, Secrets};

/// How long a resolved secret is reused.
pub const CACHE_MS: Millis = 5 * 60_000;

pub struct SecretsManagerSecrets {
    client: aws_sdk_secretsmanager::Client,
    prefix: String,
    clock: Arc<dyn Clock>,
    cache: Mutex<HashMap<String, (Millis, String)>>,
}

impl SecretsManagerSecrets {
    /// `prefix` is put before every name: a playbook's `servicenow-password` is the secret
    /// `riposte/servicenow-password`.
    pub fn new(
        client: aws_sdk_secretsmanager::Client,
        prefix: &str,
        clock: Arc<dyn Clock>,
    ) -> SecretsManagerSecrets {
        SecretsManagerSecrets {
            client,
            prefix: prefix.to_string(),
            clock,
            cache: Mutex::new(HashMap::new()),
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && !name.contains("..")
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b'+' | b'=' | b'@')
        })
}

#[async_trait]
impl Secrets for SecretsManagerSecrets {
    async fn get(&self, name: &str) -> Result<String, SecretError> {
        if !valid_name(name) {
            return Err(SecretError::Missing(name.to_string()));
        }
        let now = self.clock.now();
        if let Some((at, value)) = self.cache.lock().await.get(name)
            && now - at < CACHE_MS
        {
            return Ok(value.clone());
        }
        let id = format!("{}{name}", self.prefix);
        let out = self
            .client
            .get_secret_value()
            .secret_id(&id)
            .send()
            .await
            .map_err(|e| {
                let service = e.as_service_error();
                if service.is_some_and(|s| s.is_resource_not_found_exception()) {
                    SecretError::Missing(name.to_string())
                } else {
                    // The SDK's error text names the request, never the value.
                    SecretError::Unavailable(format!(
                        "reading secret {name}: {}",
                        aws_sdk_secretsmanager::error::DisplayErrorContext(&e)
                    ))
                }
            })?;
        let value = out
            .secret_string()
            .ok_or_else(|| SecretError::Missing(name.to_string()))?
            .to_string();
        let mut cache = self.cache.lock().await;
        if cache.len() >= 1024 {
            cache.clear();
        }
        cache.insert(name.to_string(), (now, value.clone()));
        Ok(value)
    }
}
