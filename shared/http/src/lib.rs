//! Riposte's HTTP action: the one place an outbound request is built and sent.
//!
//! Guarantee: every outbound request goes through [`ReqwestSender`], which only sends to a
//! connection's declared `base_url`, under an [`EgressPolicy`] enforced on the address actually
//! connected, with credentials resolved through the [`riposte_core::ports::Secrets`] port (or,
//! for AWS SigV4, an [`AwsCredentialSource`]) at call time and never shown in an error;
//! [`redact_request`] is what shows a request.

mod aws;
mod egress;
mod redact;
mod secrets;
mod sender;

pub use aws::{
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AwsCredentialSource,
    AwsCredentials, EnvAwsCredentials, StaticAwsCredentials,
};
pub use egress::{EgressPolicy, EgressRefused, EgressResolver, non_public_reason};
pub use redact::{REDACTED, redact_request};
pub use secrets::{ENV_PREFIX, EnvSecrets, StaticSecrets};
pub use sender::ReqwestSender;
