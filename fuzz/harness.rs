//! The four fuzz entry points, shared by the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`, via
//! the `riposte_fuzz` library) and the stable replay test (`tests/tests/fuzz_regressions.rs`,
//! via `#[path]`), so what CI replays is exactly what was fuzzed.
//!
//! Each function takes arbitrary bytes and drives only riposte-core's public API. Errors are
//! fine; a panic that escapes a public function (or an abort, stack overflow, OOM) is a bug.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use riposte_core::connector::ConnectorCatalog;
use riposte_core::event;
use riposte_core::expr::{Encoding, Expr, Scope, Template};
use riposte_core::model::Alert;
use riposte_core::rule::{self, Rule, RuleSet};
use serde_json::Value;

/// Sample EventBridge envelopes whose `detail` (and one other node) the normalize target
/// replaces with the fuzzer's JSON, to reach the Security Hub, GuardDuty and Config paths.
const ENVELOPES: &[&str] = &[
    include_str!("../events/securityhub-findings-imported.json"),
    include_str!("../events/securityhub-custom-action.json"),
    include_str!("../events/guardduty-malicious-ip-caller.json"),
    include_str!("../events/config-compliance-change.json"),
];

/// Every sample event, for sample alerts.
const EVENTS: &[&str] = &[
    include_str!("../events/config-compliance-change.json"),
    include_str!("../events/guardduty-iam-anomalous.json"),
    include_str!("../events/guardduty-malicious-ip-caller.json"),
    include_str!("../events/guardduty-recon-port-probe.json"),
    include_str!("../events/securityhub-control-failed.json"),
    include_str!("../events/securityhub-custom-action.json"),
    include_str!("../events/securityhub-findings-imported.json"),
];

fn envelopes() -> &'static [Value] {
    static E: std::sync::OnceLock<Vec<Value>> = std::sync::OnceLock::new();
    E.get_or_init(|| {
        ENVELOPES
            .iter()
            .map(|s| serde_json::from_str(s).expect("sample event is JSON"))
            .collect()
    })
}

/// One alert and one recommendation (at least) from the sample events.
fn sample_alerts() -> &'static [Alert] {
    static A: std::sync::OnceLock<Vec<Alert>> = std::sync::OnceLock::new();
    A.get_or_init(|| {
        let mut out = Vec::new();
        for s in EVENTS {
            let v: Value = serde_json::from_str(s).expect("sample event is JSON");
            if let Ok(alerts) = event::normalize(&v) {
                // One per event is enough: the findings of one event differ little.
                out.extend(alerts.into_iter().take(1));
            }
        }
        assert!(!out.is_empty(), "the sample events normalize");
        out
    })
}

fn sample_alert_json() -> &'static Value {
    static J: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    J.get_or_init(|| {
        serde_json::to_value(sample_alerts().last().expect("sample alerts"))
            .expect("an alert serializes")
    })
}

thread_local! {
    static CATALOG: ConnectorCatalog = ConnectorCatalog::shipped();
}

/// Warms the lazily built samples (so the fuzzer does not charge them to the first input).
pub fn init() {
    let _ = envelopes();
    let _ = sample_alerts();
    let _ = sample_alert_json();
    CATALOG.with(|_| ());
}

fn pick(data: &[u8], n: usize) -> usize {
    let mut h = DefaultHasher::new();
    data.len().hash(&mut h);
    data.first().hash(&mut h);
    data.last().hash(&mut h);
    (h.finish() as usize) % n.max(1)
}

/// JSON pointers to every object member and array element of `v` (not `v` itself).
fn positions(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                positions(c, p, out);
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                positions(c, p, out);
            }
        }
        _ => {}
    }
}

fn normalize_one(event: &Value) {
    if let Ok(alerts) = event::normalize(event) {
        for a in &alerts {
            let _ = serde_json::to_string(a);
        }
    }
}

/// Bytes -> JSON -> `event::normalize`; the JSON is also tried as each sample envelope's
/// `detail`, and in place of one (input-chosen) node of each sample envelope.
pub fn normalize(data: &[u8]) {
    let _ = event::normalize_bytes(data);
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    normalize_one(&v);
    for env in envelopes() {
        let mut e = env.clone();
        e["detail"] = v.clone();
        normalize_one(&e);

        let mut spots = Vec::new();
        positions(env, String::new(), &mut spots);
        if !spots.is_empty() {
            let mut e = env.clone();
            if let Some(slot) = e.pointer_mut(&spots[pick(data, spots.len())]) {
                *slot = v.clone();
                normalize_one(&e);
            }
        }
    }
}

/// UTF-8 -> `playbook::load` with the shipped connectors.
pub fn playbook(data: &[u8]) {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    CATALOG.with(|catalog| {
        let _ = riposte_core::playbook::load(src, None, catalog);
        let _ = riposte_core::playbook::load(src, Some("fuzz.yaml"), catalog);
    });
}

/// UTF-8 -> `Rule::parse` -> `compile` -> evaluation against the sample alerts.
pub fn rule(data: &[u8]) {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(r) = Rule::parse(src, None) else {
        return;
    };
    let _ = serde_json::to_string(&r);
    let Ok(c) = r.compile(&|id: &str| !id.is_empty()) else {
        return;
    };
    let rules = vec![c];
    let set = RuleSet::new(rules.clone());
    for alert in sample_alerts() {
        for now in [0, 1_715_000_000_000, i64::MAX] {
            let indexed = set.evaluate(alert, now);
            let _ = indexed.runs(set.rules());
            let full = rule::evaluate(set.rules(), alert, now);
            let _ = full.runs(&rules);
        }
    }
}

/// `EXPR` or `EXPR \0 JSON`: parses EXPR, evaluates it with `alert` (and the other playbook
/// variables) bound to JSON (or to a sample alert when JSON is missing or invalid), and compiles
/// and renders templates built from EXPR and from JSON.
pub fn expr(data: &[u8]) {
    let (e, j) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let Ok(src) = std::str::from_utf8(e) else {
        return;
    };
    let json = j
        .and_then(|j| serde_json::from_slice::<Value>(j).ok())
        .unwrap_or_else(|| sample_alert_json().clone());
    let mut scope = Scope::new();
    scope.set("alert", &json);
    for v in ["input", "vars", "steps", "item", "run", "output"] {
        scope.set(v, &json);
    }
    scope.set("index", &Value::from(0));

    if let Ok(x) = Expr::parse(src) {
        let _ = x.variables();
        let _ = x.free_variables();
        let _ = x.required_equalities("alert");
        let _ = x.eval(&scope);
        let _ = x.eval_bool(&scope);
    }

    let templates = [
        Value::String(format!("${{{{ {src} }}}}")),
        Value::String(format!("x ${{{{ {src} }}}} y ${{{{ {src} }}}}")),
        Value::String(src.to_string()),
        json.clone(),
    ];
    for t in &templates {
        if let Ok(t) = Template::compile(t, "with") {
            let _ = t.exprs();
            let _ = t.is_literal();
            for enc in [Encoding::Text, Encoding::PathSegment, Encoding::Xml] {
                let _ = t.render_with(&scope, enc);
            }
        }
    }
}
