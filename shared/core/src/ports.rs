//! The ports: everything the core needs from outside comes in through these traits.
//!
//! Time ([`Clock`]), ids ([`IdSource`]), secrets ([`Secrets`]), outbound HTTP ([`HttpSender`]) and
//! durable state with its outbox ([`crate::store::Store`]). The local runtime, the Lambda functions
//! and the simulator each plug in their own.

use async_trait::async_trait;

use crate::http::{Connection, HttpError, HttpRequest, HttpResponse};
use crate::model::Millis;

/// The current time, and a timer on it.
pub trait Clock: Send + Sync {
    fn now(&self) -> Millis;

    /// Resolves once `ms` of this clock's time have passed. Used only to bound a wait that
    /// otherwise ends by itself (steps performed together wait at most this long for each
    /// other before the first outcomes are recorded). The default never resolves: a clock with
    /// no timer of its own (a simulation's, a frozen one) leaves those waits to end by themselves.
    fn sleep(&self, ms: Millis) -> futures_util::future::BoxFuture<'static, ()> {
        let _ = ms;
        Box::pin(std::future::pending())
    }
}

/// Fresh unique ids (ULIDs in production) and random nonces.
pub trait IdSource: Send + Sync {
    fn new_id(&self) -> String;
    /// 16 unpredictable bytes, hex-encoded (approval link nonces).
    fn nonce(&self) -> String;
}

/// Secret values by name, resolved at call time. Implementations never log a value.
#[async_trait]
pub trait Secrets: Send + Sync {
    async fn get(&self, name: &str) -> Result<String, SecretError>;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("secret {0:?} is not defined")]
    Missing(String),
    #[error("secret store unavailable: {0}")]
    Unavailable(String),
}

/// Sends one rendered HTTP request through its declared connection.
#[async_trait]
pub trait HttpSender: Send + Sync {
    async fn send(
        &self,
        connection: &Connection,
        request: &HttpRequest,
    ) -> Result<HttpResponse, HttpError>;
}
