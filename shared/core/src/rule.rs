//! Automation rules: which playbooks run when a new alert or recommendation arrives.
//!
//! Guarantee: evaluation is deterministic. Rules are taken in `order`, ties broken by id; a
//! terminal rule that matches stops later rules; and every rule leaves a line in the
//! [`Evaluation`] saying whether it matched and, if not, why.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::expr::{Expr, Scope};
use crate::model::{Alert, AlertKind, Millis};
use crate::playbook::{Problem, Problems, valid_id};

/// A rule as written (YAML file or JSON over the API).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub order: i64,
    /// `alert` or `recommendation`.
    pub trigger: AlertKind,
    /// CEL over `alert`, e.g. `alert.severity in ["High", "Critical"] && alert.title.contains("SQL")`.
    pub condition: String,
    pub playbooks: Vec<String>,
    /// When it matches, evaluate no later rule.
    #[serde(default)]
    pub terminal: bool,
    /// RFC 3339; after it the rule no longer matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Millis>,
}

fn yes() -> bool {
    true
}

/// A validated rule, ready to evaluate.
#[derive(Clone, Debug)]
pub struct CompiledRule {
    pub rule: Rule,
    pub condition: Expr,
    pub expires_at: Option<Millis>,
}

/// Parses an RFC 3339 time into milliseconds.
pub fn parse_time(text: &str) -> Result<Millis, String> {
    chrono::DateTime::parse_from_rfc3339(text.trim())
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("`{text}` is not an RFC 3339 time: {e}"))
}

impl Rule {
    /// Parses a YAML or JSON rule source.
    pub fn parse(source: &str, file: Option<&str>) -> Result<Rule, Problems> {
        if source.len() > 64 * 1024 {
            return Err(Problems::one(
                file,
                "",
                "a rule source is limited to 64 KiB",
            ));
        }
        serde_yaml_ng::from_str(source).map_err(|e| Problems::one(file, "", e.to_string()))
    }

    /// Checks the rule; `playbook_exists` says whether a playbook id is known.
    pub fn compile(self, playbook_exists: &dyn Fn(&str) -> bool) -> Result<CompiledRule, Problems> {
        let mut problems = Vec::new();
        let mut p = |field: &str, message: String| {
            problems.push(Problem {
                file: None,
                step: None,
                field: field.into(),
                message,
            })
        };
        if !valid_id(&self.id) {
            p("id", format!("`{}` is not a valid id", self.id));
        }
        if self.name.trim().is_empty() {
            p("name", "must not be empty".into());
        }
        if self.playbooks.is_empty() {
            p("playbooks", "a rule runs at least one playbook".into());
        }
        for id in &self.playbooks {
            if !playbook_exists(id) {
                p("playbooks", format!("unknown playbook `{id}`"));
            }
        }
        let condition = match Expr::parse(&self.condition) {
            Ok(e) => {
                for v in e.free_variables() {
                    if v != "alert" {
                        p(
                            "condition",
                            format!("`{v}` is not known here; a rule condition reads `alert`"),
                        );
                    }
                }
                Some(e)
            }
            Err(m) => {
                p("condition", m);
                None
            }
        };
        let expires_at = match &self.expires {
            Some(t) => match parse_time(t) {
                Ok(ms) => Some(ms),
                Err(m) => {
                    p("expires", m);
                    None
                }
            },
            None => None,
        };
        match (problems.is_empty(), condition) {
            (true, Some(condition)) => Ok(CompiledRule {
                rule: self,
                condition,
                expires_at,
            }),
            _ => Err(Problems(problems)),
        }
    }
}

/// What happened to one rule for one alert.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "detail", rename_all = "snake_case")]
pub enum Verdict {
    Matched,
    ConditionFalse,
    ConditionError(String),
    Disabled,
    Expired,
    OtherTrigger,
    AfterTerminal(String),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Matched => write!(f, "matched"),
            Verdict::ConditionFalse => write!(f, "condition is false"),
            Verdict::ConditionError(e) => write!(f, "condition could not be evaluated: {e}"),
            Verdict::Disabled => write!(f, "disabled"),
            Verdict::Expired => write!(f, "expired"),
            Verdict::OtherTrigger => write!(f, "rule is for the other trigger kind"),
            Verdict::AfterTerminal(r) => {
                write!(f, "not evaluated: terminal rule `{r}` matched first")
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuleLine {
    pub rule_id: Arc<str>,
    pub name: Arc<str>,
    pub verdict: Verdict,
}

/// Which rules matched an alert and why the others did not.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub lines: Vec<RuleLine>,
}

impl Evaluation {
    /// (rule id, playbook id) for every match, in evaluation order.
    pub fn runs(&self, rules: &[CompiledRule]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for line in self.lines.iter().filter(|l| l.verdict == Verdict::Matched) {
            if let Some(r) = rules.iter().find(|r| *r.rule.id == *line.rule_id) {
                out.extend(
                    r.rule
                        .playbooks
                        .iter()
                        .map(|p| (r.rule.id.clone(), p.clone())),
                );
            }
        }
        out
    }
}

/// Sorts rules into evaluation order: `order`, then id.
pub fn sort(rules: &mut [CompiledRule]) {
    rules.sort_by(|a, b| (a.rule.order, &a.rule.id).cmp(&(b.rule.order, &b.rule.id)));
}

/// Evaluates rules (already in [`sort`] order) against an alert, every condition in turn.
pub fn evaluate(rules: &[CompiledRule], alert: &Alert, now: Millis) -> Evaluation {
    RuleSet::new(rules.to_vec()).evaluate_with(alert, now, false)
}

fn field_value<'a>(alert: &'a Alert, field: &str) -> &'a str {
    match field {
        "source" => &alert.source,
        "type" => &alert.r#type,
        "kind" => alert.kind.as_str(),
        "severity" => alert.severity.as_str(),
        "title" => &alert.title,
        _ => &alert.id,
    }
}

/// Rules in evaluation order with an index: a rule whose condition requires
/// `alert.source == '...'` (or `type`, `kind`, `severity`) of another value is decided false
/// without evaluating it. The verdicts are exactly those of evaluating every condition.
#[derive(Clone, Debug)]
pub struct RuleSet {
    rules: Vec<CompiledRule>,
    ids: Vec<(Arc<str>, Arc<str>)>,
    required: Vec<Vec<(String, String)>>,
}

impl RuleSet {
    pub fn new(mut rules: Vec<CompiledRule>) -> RuleSet {
        sort(&mut rules);
        let ids = rules
            .iter()
            .map(|r| {
                (
                    Arc::from(r.rule.id.as_str()),
                    Arc::from(r.rule.name.as_str()),
                )
            })
            .collect();
        let required = rules
            .iter()
            .map(|r| {
                r.condition
                    .required_equalities("alert")
                    .into_iter()
                    .filter(|(f, _)| always_present_field(f))
                    .collect()
            })
            .collect();
        RuleSet {
            rules,
            ids,
            required,
        }
    }

    pub fn rules(&self) -> &[CompiledRule] {
        &self.rules
    }

    pub fn evaluate(&self, alert: &Alert, now: Millis) -> Evaluation {
        self.evaluate_with(alert, now, true)
    }

    fn evaluate_with(&self, alert: &Alert, now: Millis, indexed: bool) -> Evaluation {
        let mut scope: Option<Scope> = None;
        let mut lines = Vec::with_capacity(self.rules.len());
        let mut stopped_by: Option<String> = None;
        for (i, r) in self.rules.iter().enumerate() {
            let verdict = if let Some(t) = &stopped_by {
                Verdict::AfterTerminal(t.clone())
            } else if r.rule.trigger != alert.kind {
                Verdict::OtherTrigger
            } else if !r.rule.enabled {
                Verdict::Disabled
            } else if r.expires_at.is_some_and(|e| e <= now) {
                Verdict::Expired
            } else if indexed
                && self.required[i]
                    .iter()
                    .any(|(f, v)| field_value(alert, f) != v)
            {
                Verdict::ConditionFalse
            } else {
                let scope = scope.get_or_insert_with(|| {
                    let mut s = Scope::new();
                    s.set("alert", &serde_json::to_value(alert).unwrap_or(Value::Null));
                    s
                });
                match r.condition.eval_bool(scope) {
                    Ok(true) => Verdict::Matched,
                    Ok(false) => Verdict::ConditionFalse,
                    Err(e) => Verdict::ConditionError(e.message),
                }
            };
            if verdict == Verdict::Matched && r.rule.terminal {
                stopped_by = Some(r.rule.id.clone());
            }
            lines.push(RuleLine {
                rule_id: self.ids[i].0.clone(),
                name: self.ids[i].1.clone(),
                verdict,
            });
        }
        Evaluation { lines }
    }
}

/// The fields of an alert that are always present, so an equality on them is false (never an
/// error) when it does not hold.
fn always_present_field(f: &str) -> bool {
    matches!(f, "source" | "type" | "kind" | "severity" | "title" | "id")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Entities, Severity};

    fn alert(title: &str, severity: Severity) -> Alert {
        Alert {
            id: "a1".into(),
            source: "guardduty".into(),
            kind: AlertKind::Alert,
            r#type: "UnauthorizedAccess:EC2/MaliciousIPCaller.Custom".into(),
            title: title.into(),
            description: String::new(),
            severity,
            account: None,
            region: None,
            resources: vec![],
            entities: Entities {
                ips: vec!["198.51.100.7".into()],
                ..Default::default()
            },
            first_seen: None,
            last_seen: None,
            created_at: None,
            updated_at: None,
            raw: Value::Null,
        }
    }

    fn rule(id: &str, order: i64, condition: &str) -> Rule {
        Rule {
            id: id.into(),
            name: id.into(),
            description: String::new(),
            enabled: true,
            order,
            trigger: AlertKind::Alert,
            condition: condition.into(),
            playbooks: vec![format!("pb-{id}")],
            terminal: false,
            expires: None,
            updated_by: None,
            updated_at: None,
        }
    }

    fn compiled(rules: Vec<Rule>) -> Vec<CompiledRule> {
        let mut c: Vec<_> = rules
            .into_iter()
            .map(|r| r.compile(&|_| true).unwrap())
            .collect();
        sort(&mut c);
        c
    }

    #[test]
    fn rules_match_in_order_with_ties_broken_by_id_and_say_why_not() {
        let mut expired = rule("old", 0, "true");
        expired.expires = Some("2020-01-01T00:00:00Z".into());
        let mut off = rule("off", 0, "true");
        off.enabled = false;
        let mut reco = rule("reco", 0, "true");
        reco.trigger = AlertKind::Recommendation;
        let rules = compiled(vec![
            rule("sql", 5, "alert.title.contains('SQL')"),
            rule("b-high", 1, "alert.severity in ['High', 'Critical']"),
            rule("a-high", 1, "alert.severity in ['High', 'Critical']"),
            rule("broken", 9, "alert.nope == 1"),
            expired,
            off,
            reco,
        ]);
        let ev = evaluate(
            &rules,
            &alert("SQL injection attempt", Severity::High),
            1_700_000_000_000,
        );
        let order: Vec<&str> = ev.lines.iter().map(|l| &*l.rule_id).collect();
        assert_eq!(
            order,
            ["off", "old", "reco", "a-high", "b-high", "sql", "broken"]
        );
        let verdicts: Vec<String> = ev.lines.iter().map(|l| l.verdict.to_string()).collect();
        assert_eq!(
            verdicts[..6],
            [
                "disabled",
                "expired",
                "rule is for the other trigger kind",
                "matched",
                "matched",
                "matched"
            ]
        );
        assert!(
            verdicts[6].starts_with("condition could not be evaluated"),
            "{verdicts:?}"
        );
        assert_eq!(ev.runs(&rules).len(), 3);
        let low = evaluate(
            &rules,
            &alert("port probe", Severity::Low),
            1_700_000_000_000,
        );
        assert!(low.runs(&rules).is_empty());
    }

    #[test]
    fn the_index_decides_exactly_what_evaluating_every_rule_decides() {
        let sources = ["guardduty", "securityhub", "config"];
        let severities = [Severity::Low, Severity::High, Severity::Critical];
        let mut rules = Vec::new();
        for i in 0..60 {
            let cond = match i % 5 {
                0 => format!(
                    "alert.source == '{}' && alert.severity == 'High'",
                    sources[i % 3]
                ),
                1 => format!("'{}' == alert.source && alert.nope == 1", sources[i % 3]),
                2 => "alert.severity in ['High'] || alert.source == 'config'".to_string(),
                3 => format!("alert.type == 'T{}' && alert.title.contains('SQL')", i % 4),
                _ => format!("alert.account == '{i}'"),
            };
            let mut r = rule(&format!("r{i:02}"), (i % 7) as i64, &cond);
            r.terminal = i == 41;
            rules.push(r.compile(&|_| true).unwrap());
        }
        let set = RuleSet::new(rules.clone());
        for (k, src) in sources.iter().enumerate() {
            for sev in severities {
                for t in 0..4 {
                    let mut a = alert(if t % 2 == 0 { "SQL injection" } else { "probe" }, sev);
                    a.source = src.to_string();
                    a.r#type = format!("T{t}");
                    a.account = (k == 1).then(|| "5".to_string());
                    assert_eq!(
                        set.evaluate(&a, 0),
                        set.evaluate_with(&a, 0, false),
                        "{src} {sev:?} T{t}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_terminal_match_stops_later_rules() {
        let mut first = rule("first", 1, "alert.severity == 'High'");
        first.terminal = true;
        let rules = compiled(vec![first, rule("second", 2, "true")]);
        let ev = evaluate(&rules, &alert("x", Severity::High), 0);
        assert_eq!(
            ev.runs(&rules),
            vec![("first".to_string(), "pb-first".to_string())]
        );
        assert_eq!(ev.lines[1].verdict, Verdict::AfterTerminal("first".into()));
    }

    #[test]
    fn invalid_rules_name_each_problem() {
        let mut r = rule("Bad id!", 0, "alert.title.contains(");
        r.expires = Some("tomorrow".into());
        r.playbooks = vec!["ghost".into()];
        let p = r.compile(&|id| id != "ghost").unwrap_err().to_string();
        for needle in [
            "id: `Bad id!`",
            "unknown playbook `ghost`",
            "condition: cannot parse",
            "expires: `tomorrow`",
        ] {
            assert!(p.contains(needle), "{needle} in {p}");
        }
        let p = Rule::parse(
            "id: x\nname: y\ntrigger: alert\ncondition: 'true'\nplaybooks: [a]\nordr: 3",
            Some("r.yaml"),
        )
        .unwrap_err();
        assert!(
            p.to_string().starts_with("r.yaml: unknown field `ordr`"),
            "{p}"
        );
    }
}
