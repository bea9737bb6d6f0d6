//! Slack interactivity callbacks: the Block and Ignore buttons of a Slack approval message.
//!
//! Guarantee: a callback decides nothing unless it carries a valid `X-Slack-Signature` (HMAC-SHA256
//! with the app's signing secret over `v0:<timestamp>:<body>`, compared in constant time), its
//! timestamp is within 300 seconds of now, and this process has not seen the same signature
//! before. The button's value is the approval link's signed token, so the decision then goes
//! through the same checks as a link (approvers, expiry, single use).

use serde_json::Value;

use crate::model::Millis;

use crate::callback::{CallbackVerifier, Scheme};
pub use crate::callback::{Refused, WINDOW_SECS};

/// One button press: who pressed it and the token its value carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Press {
    /// `slack:<user id>`, as approvers name Slack users.
    pub user: String,
    pub token: String,
}

/// Checks Slack's request signatures (`v0=` HMAC-SHA256 of `v0:<timestamp>:<body>`).
#[derive(Debug)]
pub struct SlackVerifier(CallbackVerifier);

impl SlackVerifier {
    pub fn new(signing_secret: &str) -> SlackVerifier {
        SlackVerifier(CallbackVerifier::new(Scheme::Slack, signing_secret))
    }

    /// Verifies one callback (headers' values and the raw body) at `now`.
    pub fn verify(
        &self,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
        now: Millis,
    ) -> Result<(), Refused> {
        self.0.verify(timestamp, signature, body, now)
    }
}

/// The Riposte button presses in an interactivity payload (`payload=<json>`, form-encoded);
/// other actions are ignored.
pub fn presses(body: &[u8]) -> Result<Vec<Press>, String> {
    let payload = url::form_urlencoded::parse(body)
        .find(|(k, _)| k == "payload")
        .map(|(_, v)| v.into_owned())
        .ok_or("the body has no `payload` field")?;
    let p: Value =
        serde_json::from_str(&payload).map_err(|e| format!("`payload` is not JSON: {e}"))?;
    let user = p
        .pointer("/user/id")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or("`payload.user.id` is missing")?;
    Ok(p.get("actions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|a| {
            a.get("action_id")
                .and_then(Value::as_str)
                .is_some_and(|id| id.starts_with("riposte_approval_"))
        })
        .filter_map(|a| a.get("value").and_then(Value::as_str))
        .map(|token| Press {
            user: format!("slack:{user}"),
            token: token.to_string(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use hmac::{Hmac, KeyInit, Mac};
    use sha2::Sha256;

    use super::*;

    fn sign(secret: &str, ts: &str, body: &str) -> String {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("v0:{ts}:{body}").as_bytes());
        format!("v0={}", hex::encode(mac.finalize().into_bytes()))
    }

    // Slack's documented example: secret, timestamp, body and the signature they give.
    const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
    const TS: &str = "1531420618";
    const BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const SIG: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    #[test]
    fn slacks_documented_example_verifies_once() {
        let v = SlackVerifier::new(SECRET);
        let now = 1_531_420_618_000 + 60_000;
        assert_eq!(sign(SECRET, TS, BODY), SIG);
        assert_eq!(v.verify(Some(TS), Some(SIG), BODY.as_bytes(), now), Ok(()));
        assert_eq!(
            v.verify(Some(TS), Some(SIG), BODY.as_bytes(), now),
            Err(Refused::Replayed)
        );
    }

    #[test]
    fn tampered_stale_or_unsigned_callbacks_are_refused() {
        let v = SlackVerifier::new(SECRET);
        let now = 1_531_420_618_000;
        let tampered = BODY.replace("roadrunner", "coyote");
        assert_eq!(
            v.verify(Some(TS), Some(SIG), tampered.as_bytes(), now),
            Err(Refused::BadSignature)
        );
        assert_eq!(
            v.verify(Some(TS), Some(SIG), BODY.as_bytes(), now + 301_000),
            Err(Refused::Stale)
        );
        assert_eq!(
            v.verify(Some(TS), None, BODY.as_bytes(), now),
            Err(Refused::Missing("X-Slack-Signature"))
        );
        assert_eq!(
            v.verify(Some(TS), Some("v0=zz"), BODY.as_bytes(), now),
            Err(Refused::BadSignature)
        );
        let other = SlackVerifier::new("another-secret");
        assert_eq!(
            other.verify(Some(TS), Some(SIG), BODY.as_bytes(), now),
            Err(Refused::BadSignature)
        );
    }

    #[test]
    fn only_riposte_buttons_are_read_from_a_payload() {
        let payload = serde_json::json!({
            "type": "block_actions",
            "user": {"id": "U0SECADMIN", "username": "secadmin"},
            "actions": [
                {"action_id": "riposte_approval_block", "value": "tok-block", "type": "button"},
                {"action_id": "something_else", "value": "x", "type": "button"}
            ]
        });
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("payload", &payload.to_string())
            .finish();
        assert_eq!(
            presses(body.as_bytes()).unwrap(),
            vec![Press {
                user: "slack:U0SECADMIN".into(),
                token: "tok-block".into()
            }]
        );
        assert!(presses(b"payload=%7B%7D").unwrap_err().contains("user.id"));
        assert!(presses(b"nothing=1").unwrap_err().contains("payload"));
    }
}
