//! Normalizing AWS EventBridge events into [`Alert`]s.
//!
//! [`normalize`] dispatches on the envelope's `source` and `detail-type`:
//!
//! | `source`          | `detail-type`                                                               | alerts                  |
//! |-------------------|-----------------------------------------------------------------------------|-------------------------|
//! | `aws.securityhub` | `Security Hub Findings - Imported`, `Security Hub Findings - Custom Action` | one per finding         |
//! | `aws.guardduty`   | `GuardDuty Finding`                                                         | one                     |
//! | `aws.config`      | `Config Rules Compliance Change`                                            | one (a recommendation)  |
//! | `webhook.<name>`  | `Riposte Alert` (a signed `POST /webhooks/<name>`, see [`webhook`])          | one                     |
//!
//! Anything else is [`Error::Unsupported`]. The normalizers are total over well-formed events:
//! fields they do not know are ignored (the raw JSON is kept whole in [`Alert::raw`]), optional
//! fields that are missing stay `None` or empty, and fields they do read must have the right JSON
//! type, or the event is rejected with an [`Error::Invalid`] naming the path, e.g.
//! `event.detail.findings[2].Severity: expected an object, found a string`. Entities (IPs, users,
//! hosts, URLs, hashes) are gathered leniently: a value of the wrong shape is skipped, IPs must
//! parse as IP addresses and hashes must be hex digests. Nothing here panics, whatever the input.

use std::fmt;
use std::net::IpAddr;

use serde_json::{Map, Value};

use crate::model::{Alert, Entities};

mod config;
mod guardduty;
mod securityhub;
pub mod webhook;

/// The largest event body [`normalize_bytes`] accepts (EventBridge's own limit).
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

/// Why an event could not be normalized.
///
/// `Display` and `std::error::Error` are implemented by hand rather than derived with
/// `thiserror`: the derive treats any field named `source` as the error's cause, which a
/// `String` cannot be.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// The body is larger than [`MAX_EVENT_BYTES`].
    TooLarge { size: usize, max: usize },
    /// The body is not valid JSON; the message names line and column.
    Malformed(String),
    /// A well-formed event from a source or detail-type Riposte does not normalize.
    Unsupported { source: String, detail_type: String },
    /// A field is missing or has the wrong type. `path` is relative to the event, e.g.
    /// `detail.findings[1].Id` (empty for the event itself).
    Invalid { path: String, reason: String },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::TooLarge { size, max } => {
                write!(
                    f,
                    "event is too large: {size} bytes, the limit is {max} bytes"
                )
            }
            Error::Malformed(message) => write!(f, "event is not valid JSON: {message}"),
            Error::Unsupported {
                source,
                detail_type,
            } => write!(
                f,
                "unsupported event: source {source:?} with detail-type {detail_type:?}"
            ),
            Error::Invalid { path, reason } if path.is_empty() => {
                write!(f, "invalid event: event: {reason}")
            }
            Error::Invalid { path, reason } => write!(f, "invalid event: event.{path}: {reason}"),
        }
    }
}

impl std::error::Error for Error {}

/// Normalizes one EventBridge event. Security Hub "Findings - Imported" and "Findings - Custom
/// Action" events carry several findings and yield one Alert each.
pub fn normalize(event: &Value) -> Result<Vec<Alert>, Error> {
    let envelope = Node::new(event, String::new())?;
    let source = envelope.req_str("source")?;
    let detail_type = envelope.req_str("detail-type")?;
    let detail = envelope.req_obj("detail")?;
    match (source, detail_type) {
        (
            "aws.securityhub",
            "Security Hub Findings - Imported" | "Security Hub Findings - Custom Action",
        ) => securityhub::normalize(&envelope, &detail),
        ("aws.guardduty", "GuardDuty Finding") => guardduty::normalize(event, &detail),
        ("aws.config", "Config Rules Compliance Change") => config::normalize(event, &detail),
        (s, "Riposte Alert") if s.starts_with("webhook.") && valid_webhook_name(&s[8..]) => {
            webhook::normalize(&s[8..], event, &detail)
        }
        _ => Err(Error::Unsupported {
            source: source.to_string(),
            detail_type: detail_type.to_string(),
        }),
    }
}

/// A webhook's name: 1 to 64 of `[a-z0-9_-]`.
pub fn valid_webhook_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Same, from bytes (rejects bodies over [`MAX_EVENT_BYTES`] with [`Error::TooLarge`], invalid
/// JSON with [`Error::Malformed`] naming line/column).
pub fn normalize_bytes(bytes: &[u8]) -> Result<Vec<Alert>, Error> {
    if bytes.len() > MAX_EVENT_BYTES {
        return Err(Error::TooLarge {
            size: bytes.len(),
            max: MAX_EVENT_BYTES,
        });
    }
    // serde_json's messages end with "at line L column C"; its recursion limit keeps deeply
    // nested input from overflowing the stack.
    let event: Value =
        serde_json::from_slice(bytes).map_err(|e| Error::Malformed(e.to_string()))?;
    normalize(&event)
}

// ---------------------------------------------------------------------------------------------
// Strict reading: fields that become Alert fields. Wrong types are errors naming the path.
// ---------------------------------------------------------------------------------------------

pub(crate) fn invalid(path: String, reason: impl Into<String>) -> Error {
    Error::Invalid {
        path,
        reason: reason.into(),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn expected(what: &str, found: &Value) -> String {
    format!("expected {what}, found {}", type_name(found))
}

/// A JSON object being read, with its path from the event root for error messages.
pub(crate) struct Node<'a> {
    value: &'a Value,
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Node<'a> {
    /// `value` must be an object.
    pub(crate) fn new(value: &'a Value, path: String) -> Result<Self, Error> {
        match value {
            Value::Object(map) => Ok(Node { value, map, path }),
            other => Err(invalid(path, expected("an object", other))),
        }
    }

    pub(crate) fn map(&self) -> &'a Map<String, Value> {
        self.map
    }

    /// The object as a JSON value, for the lenient lookups.
    pub(crate) fn value(&self) -> &'a Value {
        self.value
    }

    /// This object's path from the event root (empty for the event itself).
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// The path of `key` under this object.
    pub(crate) fn at(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// The value of `key`; JSON `null` counts as absent.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn missing(&self, key: &str) -> Error {
        invalid(self.at(key), "missing required field")
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<&'a str>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(invalid(self.at(key), expected("a string", other))),
        }
    }

    /// A string that must be present and not blank.
    pub(crate) fn req_str(&self, key: &str) -> Result<&'a str, Error> {
        match self.opt_str(key)? {
            None => Err(self.missing(key)),
            Some(s) if s.trim().is_empty() => Err(invalid(self.at(key), "must not be empty")),
            Some(s) => Ok(s),
        }
    }

    pub(crate) fn opt_obj(&self, key: &str) -> Result<Option<Node<'a>>, Error> {
        self.get(key)
            .map(|value| Node::new(value, self.at(key)))
            .transpose()
    }

    pub(crate) fn req_obj(&self, key: &str) -> Result<Node<'a>, Error> {
        self.opt_obj(key)?.ok_or_else(|| self.missing(key))
    }

    pub(crate) fn opt_array(&self, key: &str) -> Result<Option<Items<'a>>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(values)) => Ok(Some(Items {
                values,
                path: self.at(key),
            })),
            Some(other) => Err(invalid(self.at(key), expected("an array", other))),
        }
    }

    pub(crate) fn req_array(&self, key: &str) -> Result<Items<'a>, Error> {
        self.opt_array(key)?.ok_or_else(|| self.missing(key))
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(f) if f.is_finite() => Ok(Some(f)),
                _ => Err(invalid(self.at(key), "expected a finite number")),
            },
            Some(other) => Err(invalid(self.at(key), expected("a number", other))),
        }
    }

    pub(crate) fn req_f64(&self, key: &str) -> Result<f64, Error> {
        self.opt_f64(key)?.ok_or_else(|| self.missing(key))
    }
}

/// A JSON array being read, with its path.
pub(crate) struct Items<'a> {
    values: &'a [Value],
    path: String,
}

impl<'a> Items<'a> {
    /// The elements with their paths (`path[i]`).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (String, &'a Value)> + '_ {
        self.values
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("{}[{i}]", self.path), v))
    }
}

// ---------------------------------------------------------------------------------------------
// Lenient reading: entities. A missing step or a value of the wrong type is simply nothing.
// ---------------------------------------------------------------------------------------------

/// The value at `keys` under `value`, if every step is an object holding the key.
pub(crate) fn lookup<'a>(value: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter()
        .try_fold(value, |current, key| current.as_object()?.get(*key))
}

/// The string at `keys`, if it is one.
pub(crate) fn str_at<'a>(value: &'a Value, keys: &[&str]) -> Option<&'a str> {
    lookup(value, keys)?.as_str()
}

/// The elements of the array at `keys`, or nothing.
pub(crate) fn list_at<'a>(value: &'a Value, keys: &[&str]) -> &'a [Value] {
    lookup(value, keys)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Adds `value` if it parses as an IPv4 or IPv6 address, in canonical form.
pub(crate) fn push_ip(entities: &mut Entities, value: Option<&str>) {
    if let Some(ip) = value.and_then(|v| v.trim().parse::<IpAddr>().ok()) {
        entities.add_ip(&ip.to_string());
    }
}

pub(crate) fn push_user(entities: &mut Entities, value: Option<&str>) {
    if let Some(v) = value {
        entities.add_user(v);
    }
}

pub(crate) fn push_host(entities: &mut Entities, value: Option<&str>) {
    if let Some(v) = value {
        entities.add_host(v);
    }
}

pub(crate) fn push_url(entities: &mut Entities, value: Option<&str>) {
    if let Some(v) = value {
        entities.add_url(v);
    }
}

/// Adds `value`, lowercased, if it looks like an MD5, SHA-1, SHA-256 or SHA-512 hex digest.
pub(crate) fn push_hash(entities: &mut Entities, value: Option<&str>) {
    if let Some(v) = value.map(str::trim)
        && matches!(v.len(), 32 | 40 | 64 | 128)
        && v.bytes().all(|b| b.is_ascii_hexdigit())
    {
        entities.add_hash(&v.to_ascii_lowercase());
    }
}

/// The instance id in an EC2 instance ARN (`arn:aws:ec2:...:instance/i-...`) or a bare id.
pub(crate) fn ec2_instance_id(id: &str) -> Option<&str> {
    let last = id.rsplit('/').next().unwrap_or(id).trim();
    (last.starts_with("i-") && last.len() > 2).then_some(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLES: &[(&str, &str)] = &[
        (
            "guardduty-malicious-ip-caller",
            include_str!("../../../../events/guardduty-malicious-ip-caller.json"),
        ),
        (
            "guardduty-recon-port-probe",
            include_str!("../../../../events/guardduty-recon-port-probe.json"),
        ),
        (
            "guardduty-iam-anomalous",
            include_str!("../../../../events/guardduty-iam-anomalous.json"),
        ),
        (
            "securityhub-findings-imported",
            include_str!("../../../../events/securityhub-findings-imported.json"),
        ),
        (
            "securityhub-control-failed",
            include_str!("../../../../events/securityhub-control-failed.json"),
        ),
        (
            "securityhub-custom-action",
            include_str!("../../../../events/securityhub-custom-action.json"),
        ),
        (
            "config-compliance-change",
            include_str!("../../../../events/config-compliance-change.json"),
        ),
        (
            "unknown-source",
            include_str!("../../../../events/unknown-source.json"),
        ),
    ];

    fn sample(name: &str) -> Value {
        let (_, text) = SAMPLES.iter().find(|(n, _)| *n == name).unwrap();
        serde_json::from_str(text).unwrap()
    }

    fn invalid_path(result: Result<Vec<Alert>, Error>) -> String {
        match result {
            Err(Error::Invalid { path, .. }) => path,
            other => panic!("expected Error::Invalid, got {other:?}"),
        }
    }

    #[test]
    fn every_sample_has_the_eventbridge_envelope() {
        for (name, text) in SAMPLES {
            let event: Value = serde_json::from_str(text).unwrap();
            for key in [
                "version",
                "id",
                "detail-type",
                "source",
                "account",
                "time",
                "region",
                "resources",
                "detail",
            ] {
                assert!(event.get(key).is_some(), "{name} has no {key}");
            }
            assert_eq!(event["account"], "123456789012", "{name}");
        }
    }

    #[test]
    fn every_supported_sample_normalizes_from_bytes() {
        let expected = [
            ("guardduty-malicious-ip-caller", 1),
            ("guardduty-recon-port-probe", 1),
            ("guardduty-iam-anomalous", 1),
            ("securityhub-findings-imported", 3),
            ("securityhub-control-failed", 1),
            ("securityhub-custom-action", 1),
            ("config-compliance-change", 1),
        ];
        for (name, count) in expected {
            let (_, text) = SAMPLES.iter().find(|(n, _)| *n == name).unwrap();
            let alerts = normalize_bytes(text.as_bytes()).unwrap();
            assert_eq!(alerts.len(), count, "{name}");
            assert_eq!(alerts, normalize(&sample(name)).unwrap(), "{name}");
        }
    }

    #[test]
    fn unknown_source_is_unsupported() {
        let err = normalize(&sample("unknown-source")).unwrap_err();
        assert_eq!(
            err,
            Error::Unsupported {
                source: "aws.ec2".into(),
                detail_type: "EC2 Instance State-change Notification".into(),
            }
        );
        assert_eq!(
            err.to_string(),
            "unsupported event: source \"aws.ec2\" with detail-type \
             \"EC2 Instance State-change Notification\""
        );
    }

    #[test]
    fn known_source_with_another_detail_type_is_unsupported() {
        let mut event = sample("securityhub-control-failed");
        event["detail-type"] = "Security Hub Insight Results".into();
        assert!(matches!(
            normalize(&event),
            Err(Error::Unsupported { source, detail_type })
                if source == "aws.securityhub" && detail_type == "Security Hub Insight Results"
        ));
    }

    #[test]
    fn truncated_json_is_malformed_with_line_and_column() {
        let (_, text) = SAMPLES[0];
        let truncated = &text.as_bytes()[..text.len() / 2];
        let err = normalize_bytes(truncated).unwrap_err();
        let Error::Malformed(message) = &err else {
            panic!("expected Malformed, got {err:?}");
        };
        assert!(
            message.contains("line") && message.contains("column"),
            "{message}"
        );
        assert!(
            err.to_string().starts_with("event is not valid JSON: "),
            "{err}"
        );

        assert!(matches!(normalize_bytes(b""), Err(Error::Malformed(_))));
        assert!(matches!(
            normalize_bytes(b"{\"a\": 1} x"),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            normalize_bytes(b"\xff\xfe{}"),
            Err(Error::Malformed(_))
        ));
    }

    #[test]
    fn oversized_body_is_too_large() {
        let body = vec![b' '; 300 * 1024];
        let err = normalize_bytes(&body).unwrap_err();
        assert_eq!(
            err,
            Error::TooLarge {
                size: 300 * 1024,
                max: MAX_EVENT_BYTES
            }
        );
        assert_eq!(
            err.to_string(),
            "event is too large: 307200 bytes, the limit is 262144 bytes"
        );
        // Exactly at the limit is accepted (and then judged as JSON).
        let mut body = vec![b' '; MAX_EVENT_BYTES];
        body[0] = b'1';
        assert!(matches!(normalize_bytes(&body), Err(Error::Invalid { .. })));
    }

    #[test]
    fn envelope_fields_are_required() {
        let err = normalize(&serde_json::json!([1, 2])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid event: event: expected an object, found an array"
        );

        for key in ["source", "detail-type", "detail"] {
            let mut event = sample("guardduty-malicious-ip-caller");
            event.as_object_mut().unwrap().remove(key);
            let err = normalize(&event).unwrap_err();
            assert_eq!(
                err,
                Error::Invalid {
                    path: key.into(),
                    reason: "missing required field".into()
                }
            );
            assert_eq!(
                err.to_string(),
                format!("invalid event: event.{key}: missing required field")
            );
        }

        let mut event = sample("guardduty-malicious-ip-caller");
        event["detail"] = "nope".into();
        assert_eq!(
            normalize(&event).unwrap_err().to_string(),
            "invalid event: event.detail: expected an object, found a string"
        );
        let mut event = sample("guardduty-malicious-ip-caller");
        event["source"] = 7.into();
        assert_eq!(invalid_path(normalize(&event)), "source");
    }

    #[test]
    fn entity_helpers_validate() {
        let mut e = Entities::default();
        push_ip(&mut e, Some(" 198.51.100.7 "));
        push_ip(&mut e, Some("2001:DB8::1"));
        push_ip(&mut e, Some("2001:db8:0::1"));
        push_ip(&mut e, Some("not-an-ip"));
        push_ip(&mut e, Some(""));
        push_ip(&mut e, None);
        assert_eq!(e.ips, ["198.51.100.7", "2001:db8::1"]);

        push_hash(&mut e, Some("D41D8CD98F00B204E9800998ECF8427E"));
        push_hash(&mut e, Some("d41d8cd98f00b204e9800998ecf8427e"));
        push_hash(&mut e, Some("xyz"));
        push_hash(&mut e, Some("zz1d8cd98f00b204e9800998ecf8427e"));
        assert_eq!(e.hashes, ["d41d8cd98f00b204e9800998ecf8427e"]);

        assert_eq!(
            ec2_instance_id("arn:aws:ec2:us-east-1:123456789012:instance/i-0abc"),
            Some("i-0abc")
        );
        assert_eq!(ec2_instance_id("i-0abc"), Some("i-0abc"));
        assert_eq!(ec2_instance_id("arn:aws:s3:::bucket"), None);
        assert_eq!(ec2_instance_id("i-"), None);
        assert_eq!(ec2_instance_id(""), None);
    }

    #[test]
    fn lenient_lookups_never_fail() {
        let v = serde_json::json!({"a": {"b": [1, "x"], "c": "s"}, "n": null});
        assert_eq!(str_at(&v, &["a", "c"]), Some("s"));
        assert_eq!(str_at(&v, &["a", "b"]), None);
        assert_eq!(str_at(&v, &["a", "c", "d"]), None);
        assert_eq!(list_at(&v, &["a", "b"]).len(), 2);
        assert!(list_at(&v, &["n", "x"]).is_empty());
        assert!(list_at(&v, &[]).is_empty());
    }

    // --- property test: mutated samples never make the normalizers panic ---------------------

    /// Knuth's MMIX linear congruential generator: deterministic, no dependency.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }

        fn below(&mut self, n: usize) -> usize {
            if n == 0 {
                0
            } else {
                (self.next() % n as u64) as usize
            }
        }
    }

    /// JSON pointers to every node under `value` (the root is "").
    fn pointers(value: &Value, prefix: String, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    let escaped = key.replace('~', "~0").replace('/', "~1");
                    let pointer = format!("{prefix}/{escaped}");
                    out.push(pointer.clone());
                    pointers(child, pointer, out);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    let pointer = format!("{prefix}/{i}");
                    out.push(pointer.clone());
                    pointers(child, pointer, out);
                }
            }
            _ => {}
        }
    }

    fn wrong_value(rng: &mut Lcg) -> Value {
        match rng.below(12) {
            0 => Value::Null,
            1 => Value::Bool(rng.below(2) == 0),
            2 => serde_json::json!(-1),
            3 => serde_json::json!(1e300),
            4 => serde_json::json!(u64::MAX),
            5 => serde_json::json!(-3.5),
            6 => serde_json::json!(""),
            7 => serde_json::json!("   "),
            8 => serde_json::json!("ünïcødé \u{0}/[0]."),
            9 => serde_json::json!([]),
            10 => serde_json::json!({}),
            _ => serde_json::json!([{"x": [null, 1, "two"]}]),
        }
    }

    fn mutate(event: &mut Value, rng: &mut Lcg) {
        let mut all = Vec::new();
        pointers(event, String::new(), &mut all);
        if all.is_empty() {
            return;
        }
        let pointer = &all[rng.below(all.len())];
        if rng.below(2) == 0 {
            // Delete the node from its parent.
            let (parent, last) = pointer.rsplit_once('/').unwrap();
            let key = last.replace("~1", "/").replace("~0", "~");
            match event.pointer_mut(parent) {
                Some(Value::Object(map)) => {
                    map.shift_remove(&key);
                }
                Some(Value::Array(items)) => {
                    if let Ok(i) = key.parse::<usize>()
                        && i < items.len()
                    {
                        items.remove(i);
                    }
                }
                _ => {}
            }
        } else if let Some(node) = event.pointer_mut(pointer) {
            *node = wrong_value(rng);
        }
    }

    #[test]
    fn mutated_samples_never_panic() {
        let mut rng = Lcg(0x5EED_0F41_E7E7);
        let originals: Vec<Value> = SAMPLES
            .iter()
            .map(|(_, text)| serde_json::from_str(text).unwrap())
            .collect();
        let mut outcomes = [0usize; 2];
        for round in 0..600 {
            let mut event = originals[round % originals.len()].clone();
            for _ in 0..1 + rng.below(6) {
                mutate(&mut event, &mut rng);
            }
            let first = normalize(&event);
            // Deterministic, and every alert carries the required fields.
            assert_eq!(first, normalize(&event), "round {round}");
            match &first {
                Ok(alerts) => {
                    outcomes[0] += 1;
                    for alert in alerts {
                        assert!(!alert.id.trim().is_empty(), "round {round}");
                        assert!(!alert.title.trim().is_empty(), "round {round}");
                    }
                }
                Err(err) => {
                    outcomes[1] += 1;
                    assert!(!err.to_string().is_empty());
                }
            }
            // The byte path: whole, truncated, and with a flipped byte.
            let bytes = serde_json::to_vec(&event).unwrap();
            assert_eq!(normalize_bytes(&bytes), first, "round {round}");
            let _ = normalize_bytes(&bytes[..rng.below(bytes.len())]);
            let mut flipped = bytes.clone();
            let at = rng.below(flipped.len());
            if let Some(b) = flipped.get_mut(at) {
                *b ^= 1 << rng.below(8);
            }
            let _ = normalize_bytes(&flipped);
        }
        // The mutations exercise both outcomes.
        assert!(outcomes[0] > 50 && outcomes[1] > 50, "{outcomes:?}");
    }
}
