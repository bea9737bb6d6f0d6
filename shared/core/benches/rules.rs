//! Rule matching with 10,000 rules: time per alert. `cargo bench -p riposte-core --bench rules`
//!
//! The rules are a realistic mix: each names a source and a finding type (as rules written for a
//! detection catalog do), a severity set, and a title test; a few hundred are catch-alls without
//! a source. Target: at most 1 ms per alert.

use std::time::Instant;

use riposte_core::model::{Alert, AlertKind, Entities, Severity};
use riposte_core::rule::{self, CompiledRule, Rule};

const SOURCES: [&str; 3] = ["guardduty", "securityhub", "config"];

fn rules(n: usize) -> Vec<CompiledRule> {
    let mut out: Vec<CompiledRule> = (0..n)
        .map(|i| {
            let condition = if i % 50 == 0 {
                format!("alert.severity in ['High', 'Critical'] && alert.title.contains('marker-{i}')")
            } else {
                format!(
                    "alert.source == '{}' && alert.type == 'Type-{}' && alert.severity in ['Medium', 'High', 'Critical'] && alert.title.contains('SQL')",
                    SOURCES[i % 3],
                    i
                )
            };
            Rule {
                id: format!("rule-{i:05}"),
                name: format!("rule {i}"),
                description: String::new(),
                enabled: true,
                order: (i % 100) as i64,
                trigger: AlertKind::Alert,
                condition,
                playbooks: vec!["pb".into()],
                terminal: false,
                expires: None,
                updated_by: None,
                updated_at: None,
            }
            .compile(&|_| true)
            .expect("bench rules compile")
        })
        .collect();
    rule::sort(&mut out);
    out
}

fn alert(i: usize) -> Alert {
    Alert {
        id: format!("a{i}"),
        source: SOURCES[i % 3].into(),
        kind: AlertKind::Alert,
        r#type: format!("Type-{}", i * 7 % 10_000),
        title: "SQL injection attempt on the login form".into(),
        description: "desc".into(),
        severity: Severity::High,
        account: Some("123456789012".into()),
        region: Some("us-east-1".into()),
        resources: vec![],
        entities: Entities {
            ips: vec!["198.51.100.23".into()],
            ..Default::default()
        },
        first_seen: None,
        last_seen: None,
        created_at: None,
        updated_at: None,
        raw: serde_json::json!({"detail": {"id": i}}),
    }
}

fn main() {
    let set = rules(10_000);
    let index = rule::RuleSet::new(set.clone());
    let alerts: Vec<Alert> = (0..200).map(alert).collect();
    // Warm up.
    for a in alerts.iter().take(10) {
        let _ = index.evaluate(a, 0);
    }
    let mut matched = 0;
    let start = Instant::now();
    for a in &alerts {
        matched += index
            .evaluate(a, 0)
            .lines
            .iter()
            .filter(|l| l.verdict == rule::Verdict::Matched)
            .count();
    }
    let per = start.elapsed() / alerts.len() as u32;
    // The same through plain evaluation of every rule, for comparison and as a check.
    let start = Instant::now();
    let mut matched_plain = 0;
    for a in alerts.iter().take(20) {
        matched_plain += rule::evaluate(&set, a, 0)
            .lines
            .iter()
            .filter(|l| l.verdict == rule::Verdict::Matched)
            .count();
    }
    let per_plain = start.elapsed() / 20;
    let matched_first20: usize = alerts
        .iter()
        .take(20)
        .map(|a| {
            index
                .evaluate(a, 0)
                .lines
                .iter()
                .filter(|l| l.verdict == rule::Verdict::Matched)
                .count()
        })
        .sum();
    assert_eq!(
        matched_first20, matched_plain,
        "the index must decide exactly what plain evaluation decides"
    );
    println!("rules: 10000; alerts: {}; matches: {matched}", alerts.len());
    println!("indexed evaluation: {per:?} per alert (target <= 1 ms)");
    println!("plain evaluation:   {per_plain:?} per alert");
}
