//! Signed callbacks: Slack's interactivity requests and the webhooks other tools post alerts to.
//!
//! Guarantee: a callback is accepted only with a valid HMAC-SHA256 signature of its timestamp and
//! exact body under the shared secret (compared in constant time), a timestamp within
//! [`WINDOW_SECS`] of now, and a signature this process has not accepted before (a replay cache
//! over twice the window).

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::model::Millis;

/// How far a callback's timestamp may be from now (Slack's recommendation).
pub const WINDOW_SECS: i64 = 300;
/// Signatures remembered for replay detection, at most (expired ones are dropped first).
const REPLAY_CACHE_MAX: usize = 100_000;

/// How a sender signs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// `X-Slack-Signature: v0=<hex>` over `v0:<ts>:<body>`, `X-Slack-Request-Timestamp`.
    Slack,
    /// `X-Riposte-Signature: sha256=<hex>` over `<ts>.<body>`, `X-Riposte-Timestamp` (the scheme
    /// the `webhook` connector signs with).
    Riposte,
}

impl Scheme {
    /// The (timestamp, signature) header names.
    pub fn headers(self) -> (&'static str, &'static str) {
        match self {
            Scheme::Slack => ("X-Slack-Request-Timestamp", "X-Slack-Signature"),
            Scheme::Riposte => ("X-Riposte-Timestamp", "X-Riposte-Signature"),
        }
    }
}

/// Why a callback was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("missing {0} header")]
    Missing(&'static str),
    #[error("the timestamp is not within {WINDOW_SECS} seconds of now")]
    Stale,
    #[error("the signature does not match the body")]
    BadSignature,
    #[error("this request was already received (replayed)")]
    Replayed,
}

/// Verifies one sender's callbacks. Holds the secret; never prints it.
pub struct CallbackVerifier {
    scheme: Scheme,
    secret: Vec<u8>,
    seen: Mutex<HashMap<String, Millis>>,
}

impl fmt::Debug for CallbackVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CallbackVerifier({:?}, [REDACTED])", self.scheme)
    }
}

impl CallbackVerifier {
    pub fn new(scheme: Scheme, secret: &str) -> CallbackVerifier {
        CallbackVerifier {
            scheme,
            secret: secret.as_bytes().to_vec(),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Verifies one callback (the two headers' values and the raw body) at `now`.
    pub fn verify(
        &self,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
        now: Millis,
    ) -> Result<(), Refused> {
        let (ts_header, sig_header) = self.scheme.headers();
        let ts = timestamp.ok_or(Refused::Missing(ts_header))?.trim();
        let sig = signature.ok_or(Refused::Missing(sig_header))?;
        let secs: i64 = ts.parse().map_err(|_| Refused::Stale)?;
        if (now.div_euclid(1000) - secs).abs() > WINDOW_SECS {
            return Err(Refused::Stale);
        }
        let (prefix, before, between) = match self.scheme {
            Scheme::Slack => ("v0=", "v0:", ":"),
            Scheme::Riposte => ("sha256=", "", "."),
        };
        let hex_sig = sig
            .trim()
            .strip_prefix(prefix)
            .ok_or(Refused::BadSignature)?;
        let given = hex::decode(hex_sig).map_err(|_| Refused::BadSignature)?;
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.secret).expect("HMAC takes any key");
        mac.update(before.as_bytes());
        mac.update(ts.as_bytes());
        mac.update(between.as_bytes());
        mac.update(body);
        // `verify_slice` compares in constant time.
        mac.verify_slice(&given)
            .map_err(|_| Refused::BadSignature)?;

        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let horizon = now - 2 * WINDOW_SECS * 1000;
        if seen.len() >= REPLAY_CACHE_MAX {
            seen.retain(|_, at| *at > horizon);
        }
        if seen.len() >= REPLAY_CACHE_MAX {
            // Still full of fresh entries: refuse rather than forget one.
            return Err(Refused::Replayed);
        }
        if seen.insert(hex_sig.to_ascii_lowercase(), now).is_some() {
            return Err(Refused::Replayed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, ts: &str, body: &str) -> String {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{ts}.{body}").as_bytes());
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn a_signed_webhook_verifies_once_and_nothing_else_does() {
        let v = CallbackVerifier::new(Scheme::Riposte, "edr-secret");
        let now = 1_767_225_600_000;
        let body = r#"{"id":"a1","title":"x","severity":"High"}"#;
        let sig = sign("edr-secret", "1767225600", body);
        assert_eq!(
            v.verify(Some("1767225600"), Some(&sig), body.as_bytes(), now),
            Ok(())
        );
        assert_eq!(
            v.verify(Some("1767225600"), Some(&sig), body.as_bytes(), now),
            Err(Refused::Replayed)
        );
        let other = sign("edr-secret", "1767225601", body);
        assert_eq!(
            v.verify(Some("1767225601"), Some(&other), b"{}", now),
            Err(Refused::BadSignature)
        );
        assert_eq!(
            v.verify(
                Some("1767225000"),
                Some(&sign("edr-secret", "1767225000", body)),
                body.as_bytes(),
                now
            ),
            Err(Refused::Stale)
        );
        assert_eq!(
            v.verify(None, Some(&sig), body.as_bytes(), now),
            Err(Refused::Missing("X-Riposte-Timestamp"))
        );
        let forged = sign("not-the-secret", "1767225602", body);
        assert_eq!(
            v.verify(Some("1767225602"), Some(&forged), body.as_bytes(), now),
            Err(Refused::BadSignature)
        );
    }
}
