//! Approval links: signed, single-use, expiring tokens.
//!
//! A token is `base64url(claims) "." base64url(HMAC-SHA256(key, claims))`. The claims name the run,
//! step, iteration, choice, approvers, expiry and a random nonce; the run keeps only a SHA-256 of
//! the nonce. Guarantee: a token whose bytes were altered fails [`Signer::verify`] (compared in
//! constant time); a valid token for another run, step or issuance does not match the stored hash;
//! whether it is expired or already used is decided by the run, not by the token.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::Millis;

/// What an approval link says. Signed; never trusted before [`Signer::verify`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Run id.
    pub r: String,
    /// Step id.
    pub s: String,
    /// Iteration.
    pub i: u32,
    /// Choice this link answers.
    pub c: String,
    /// Expiry, ms since the epoch.
    pub e: Millis,
    /// Approvers, as issued.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub a: Vec<String>,
    /// Nonce (hex).
    pub n: String,
}

/// Why a token is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the approval link is malformed")]
    Malformed,
    #[error("the approval link's signature is not valid")]
    BadSignature,
}

/// The longest token accepted.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Signs and verifies approval tokens with one secret key.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer([REDACTED])")
    }
}

type HmacSha256 = Hmac<Sha256>;

impl Signer {
    /// `key` should be at least 32 random bytes.
    pub fn new(key: &[u8]) -> Signer {
        Signer { key: key.to_vec() }
    }

    fn mac(&self) -> HmacSha256 {
        <HmacSha256 as KeyInit>::new_from_slice(&self.key).expect("HMAC takes any key length")
    }

    /// The nonce of one issuance of an approval (`run/step/iteration/attempt`): unguessable
    /// without the key, and the same when a lost worker's notification is sent again, so the
    /// links of both messages stay valid. A retry (a new attempt) gets a new nonce.
    pub fn nonce_for(&self, issuance: &str) -> String {
        let mut mac = self.mac();
        mac.update(b"approval-nonce:");
        mac.update(issuance.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let body = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        let sig = B64.encode(mac.finalize().into_bytes());
        format!("{body}.{sig}")
    }

    /// Checks the signature (in constant time) and returns the claims.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (body, sig) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let sig = B64.decode(sig).map_err(|_| TokenError::Malformed)?;
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        mac.verify_slice(&sig)
            .map_err(|_| TokenError::BadSignature)?;
        let bytes = B64.decode(body).map_err(|_| TokenError::Malformed)?;
        serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
    }
}

/// The hash of a nonce, as stored in the run.
pub fn nonce_hash(nonce: &str) -> String {
    hex::encode(Sha256::digest(nonce.as_bytes()))
}

/// Constant-time equality of two hashes.
pub fn same_hash(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            r: "run1".into(),
            s: "ask".into(),
            i: 0,
            c: "block".into(),
            e: 10_000,
            a: vec!["soc@example.com".into()],
            n: "00ff".into(),
        }
    }

    #[test]
    fn a_signed_token_verifies_and_any_change_is_refused() {
        let signer = Signer::new(b"k".repeat(32).as_slice());
        let token = signer.sign(&claims());
        assert_eq!(signer.verify(&token).unwrap(), claims());
        // Flip each character of the token in turn: none verifies as the same claims.
        for i in 0..token.len() {
            let mut bytes = token.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let altered = String::from_utf8(bytes).unwrap();
            if altered == token {
                continue;
            }
            assert!(
                signer
                    .verify(&altered)
                    .map(|c| c != claims())
                    .unwrap_or(true),
                "position {i}"
            );
        }
        // A token signed with another key, or with claims swapped in, is refused.
        let other = Signer::new(b"other-key-other-key-other-key-00".as_slice()).sign(&claims());
        assert_eq!(signer.verify(&other), Err(TokenError::BadSignature));
        let mut forged = claims();
        forged.c = "ignore".into();
        let forged_body = other.split('.').next().unwrap().to_string();
        let swapped = format!(
            "{}.{}",
            B64.encode(serde_json::to_vec(&forged).unwrap()),
            token.split('.').nth(1).unwrap()
        );
        assert_eq!(signer.verify(&swapped), Err(TokenError::BadSignature));
        assert!(!forged_body.is_empty());
        assert_eq!(signer.verify("no-dot"), Err(TokenError::Malformed));
        assert_eq!(
            signer.verify(&"a".repeat(MAX_TOKEN_LEN + 1)),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn nonce_hashes_compare_exactly() {
        assert!(same_hash(&nonce_hash("n1"), &nonce_hash("n1")));
        assert!(!same_hash(&nonce_hash("n1"), &nonce_hash("n2")));
        assert!(!format!("{:?}", Signer::new(b"secret")).contains("secret"));
    }
}
