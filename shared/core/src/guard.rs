//! Blast-radius guards: what Riposte refuses to do however a playbook is written.
//!
//! - **Never-touch list**: per operation and input, values no call may act on (break-glass
//!   accounts, the firewall's own management network). Patterns are exact (case-insensitive),
//!   `*` globs, or CIDR blocks matched against IP inputs.
//! - **Rate caps**: at most `max` calls of an operation per window (e.g. 20 `entra.disable_user`
//!   per hour), counted in the store, so every worker shares the count.
//! - **Kill switch** (kept in the store, see [`crate::service::Service::set_kill_switch`]): no
//!   automatic run starts, and running ones stop at their next step.
//!
//! Guarantee: a refused call is never sent; the step fails with the reason, visible in the run.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::expr::parse_duration_ms;
use crate::playbook::{Catalog, Problem, Problems};

/// A rate cap: `max` calls per `per` (a duration such as `1h`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateCap {
    pub max: u32,
    pub per: String,
}

/// The guards of a deployment (`infra/guards.yaml`, or `RIPOSTE_GUARDS` on AWS).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guards {
    /// operation -> input -> patterns.
    #[serde(default)]
    pub never_touch: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    /// operation -> cap.
    #[serde(default)]
    pub rate_caps: BTreeMap<String, RateCap>,
}

/// Why a call is refused before it is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal(pub String);

impl Guards {
    /// Parses and checks guards against the catalog: every operation and input must exist.
    pub fn parse(
        source: &str,
        file: Option<&str>,
        catalog: &dyn Catalog,
    ) -> Result<Guards, Problems> {
        let g: Guards =
            serde_yaml_ng::from_str(source).map_err(|e| Problems::one(file, "", e.to_string()))?;
        let mut problems = Vec::new();
        let mut problem = |field: String, message: String| {
            problems.push(Problem {
                file: file.map(str::to_string),
                step: None,
                field,
                message,
            })
        };
        for (op, inputs) in &g.never_touch {
            match catalog.operation(op) {
                Err(m) => problem(format!("never_touch.{op}"), m),
                Ok(schema) => {
                    for (input, patterns) in inputs {
                        if !schema.required.contains(input) && !schema.optional.contains(input) {
                            problem(
                                format!("never_touch.{op}.{input}"),
                                format!("`{op}` has no input `{input}`"),
                            );
                        }
                        for p in patterns {
                            if p.contains('/') && cidr(p).is_none() {
                                problem(
                                    format!("never_touch.{op}.{input}"),
                                    format!("`{p}` is not a CIDR block"),
                                );
                            }
                        }
                    }
                }
            }
        }
        for (op, cap) in &g.rate_caps {
            if let Err(m) = catalog.operation(op) {
                problem(format!("rate_caps.{op}"), m);
            }
            match parse_duration_ms(&cap.per) {
                Ok(ms) if ms >= 1000 => {}
                Ok(_) => problem(format!("rate_caps.{op}.per"), "at least 1s".into()),
                Err(m) => problem(format!("rate_caps.{op}.per"), m),
            }
            if cap.max == 0 {
                problem(
                    format!("rate_caps.{op}.max"),
                    "0 would refuse every call: remove the operation from playbooks instead".into(),
                );
            }
        }
        if problems.is_empty() {
            Ok(g)
        } else {
            Err(Problems(problems))
        }
    }

    /// Whether `inputs` of `operation` touch a never-touch value.
    pub fn check_never_touch(&self, operation: &str, inputs: &Value) -> Result<(), Refusal> {
        let Some(rules) = self.never_touch.get(operation) else {
            return Ok(());
        };
        for (input, patterns) in rules {
            let mut values = Vec::new();
            strings(inputs.get(input).unwrap_or(&Value::Null), &mut values);
            for v in values {
                if let Some(p) = patterns.iter().find(|p| matches(p, v)) {
                    return Err(Refusal(format!(
                        "refused: `{operation}` on {input} `{v}`, which the never-touch list protects (`{p}`)"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The cap on an operation and its window in milliseconds.
    pub fn cap(&self, operation: &str) -> Option<(u32, u64)> {
        let c = self.rate_caps.get(operation)?;
        Some((c.max, parse_duration_ms(&c.per).ok()?))
    }
}

fn strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|i| strings(i, out)),
        Value::Object(m) => m.values().for_each(|i| strings(i, out)),
        _ => {}
    }
}

/// A network and its prefix length, as a 128-bit address (IPv4 mapped).
fn cidr(p: &str) -> Option<(u128, u32)> {
    let (addr, len) = p.split_once('/')?;
    let ip: IpAddr = addr.trim().parse().ok()?;
    let len: u32 = len.trim().parse().ok()?;
    let (bits, len) = match ip {
        IpAddr::V4(v4) if len <= 32 => (u128::from(v4.to_ipv6_mapped()), len + 96),
        IpAddr::V6(v6) if len <= 128 => (u128::from(v6), len),
        _ => return None,
    };
    Some((bits, len))
}

fn ip_bits(v: &str) -> Option<u128> {
    // A value may itself be a host in CIDR form (`203.0.113.9/32`).
    let addr = v.split('/').next()?.trim();
    match addr.parse::<IpAddr>().ok()? {
        IpAddr::V4(v4) => Some(u128::from(v4.to_ipv6_mapped())),
        IpAddr::V6(v6) => Some(u128::from(v6)),
    }
}

fn matches(pattern: &str, value: &str) -> bool {
    if let Some((net, len)) = cidr(pattern) {
        let Some(ip) = ip_bits(value) else {
            return false;
        };
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        return ip & mask == net & mask;
    }
    let (p, v) = (pattern.to_ascii_lowercase(), value.to_ascii_lowercase());
    match p.split_once('*') {
        None => p == v,
        Some((pre, post)) => {
            v.len() >= pre.len() + post.len() && v.starts_with(pre) && v.ends_with(post)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::connector::ConnectorCatalog;

    const GUARDS: &str = r#"
never_touch:
  entra.disable_user: { user: [breakglass@example.com, "*@admins.example.com"] }
  panos.block_ip: { ip: [10.0.0.0/8, "2001:db8::/32", 192.0.2.1] }
rate_caps:
  entra.disable_user: { max: 20, per: 1h }
"#;

    #[test]
    fn protected_values_are_refused_by_exact_glob_and_cidr() {
        let g = Guards::parse(GUARDS, None, &ConnectorCatalog::shipped()).unwrap();
        let refused = |op: &str, v: Value| g.check_never_touch(op, &v).is_err();
        assert!(refused(
            "entra.disable_user",
            json!({"user": "BreakGlass@example.com"})
        ));
        assert!(refused(
            "entra.disable_user",
            json!({"user": "root@admins.example.com"})
        ));
        assert!(!refused(
            "entra.disable_user",
            json!({"user": "alice@example.com"})
        ));
        assert!(refused("panos.block_ip", json!({"ip": "10.20.30.40"})));
        assert!(refused("panos.block_ip", json!({"ip": "10.0.0.1/32"})));
        assert!(refused("panos.block_ip", json!({"ip": "2001:db8::1"})));
        assert!(refused("panos.block_ip", json!({"ip": "192.0.2.1"})));
        assert!(!refused("panos.block_ip", json!({"ip": "203.0.113.9"})));
        assert!(!refused("panos.block_ip", json!({"ip": "11.0.0.1"})));
        // Other operations are not covered by these entries.
        assert!(!refused(
            "okta.suspend_user",
            json!({"user": "breakglass@example.com"})
        ));
        let why = g
            .check_never_touch(
                "entra.disable_user",
                &json!({"user": "breakglass@example.com"}),
            )
            .unwrap_err()
            .0;
        assert!(why.contains("never-touch"), "{why}");
        assert_eq!(g.cap("entra.disable_user"), Some((20, 3_600_000)));
    }

    #[test]
    fn guards_naming_unknown_operations_or_inputs_are_refused_at_load() {
        let e = Guards::parse(
            "never_touch:\n  entra.disable: { user: [x] }\n  panos.block_ip: { address: [x], ip: [10.0.0.0/99] }\nrate_caps:\n  okta.suspend_user: { max: 0, per: soon }\n",
            Some("guards.yaml"),
            &ConnectorCatalog::shipped(),
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "unknown operation `entra.disable`",
            "`panos.block_ip` has no input `address`",
            "`10.0.0.0/99` is not a CIDR block",
            "rate_caps.okta.suspend_user.max",
            "rate_caps.okta.suspend_user.per",
        ] {
            assert!(e.contains(needle), "missing {needle} in {e}");
        }
    }
}
