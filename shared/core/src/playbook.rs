//! The playbook language: YAML files (JSON over the API), validated on load.
//!
//! Guarantee: a [`Playbook`] that exists has passed every static check: ids are unique and
//! well-formed, every reference names a step that exists, the steps form no cycle, every step can
//! be reached, every action names a known connector operation with its required inputs, and every
//! expression parses. Errors name the file, the step and the field, and all of them are reported
//! at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::expr::{Expr, Template, parse_duration_ms};

/// The largest playbook source accepted.
pub const MAX_PLAYBOOK_BYTES: usize = 512 * 1024;
/// The most steps a playbook may have.
pub const MAX_STEPS: usize = 200;

/// A playbook as written (YAML or JSON). Kept as the stored form of every version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaybookSpec {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Values computed when a run starts, readable as `vars.NAME`.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub vars: serde_json::Map<String, Value>,
    /// Forbid the person who started a manual run from answering its approvals.
    #[serde(default, skip_serializing_if = "is_false")]
    pub separate_approver: bool,
    pub steps: Vec<StepSpec>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One step as written. Exactly one of `action`, `approval`, `wait`, `set`, `playbook`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `connector.operation`, e.g. `http.request`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalSpec>,
    /// A duration: the step completes when it has elapsed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<String>,
    /// Values to compute; they become the step's output and are merged into `vars`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<serde_json::Map<String, Value>>,
    /// Id of a playbook to run as a child; the step's output is the child's final outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub playbook: Option<String>,
    /// Inputs of an action or a sub-playbook: a value tree with `${{ }}` expressions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with: Option<Value>,
    /// Steps that must finish first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// A CEL condition; when false the step is skipped.
    #[serde(default, rename = "if", skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// Chooses which steps run next from a value computed after this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<SwitchSpec>,
    /// A CEL expression giving a list; the step runs once per item (`item`, `index`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Per attempt, e.g. `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_error: Option<OnErrorSpec>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalSpec {
    /// Shown on the confirm page and available to notifications as `approval.message`.
    pub message: String,
    pub choices: Vec<String>,
    /// Taken when nobody answers before expiry; without it the step times out and fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// How long the links stay valid, e.g. `4h` (default 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<String>,
    /// Who may answer (informational locally; signed into the links).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvers: Vec<String>,
    /// Actions that deliver the links (chat, email, ticket); each sees `approval.links.CHOICE`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<NotifySpec>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    pub action: String,
    #[serde(default)]
    pub with: Value,
    /// Sent once the approval is decided (by anyone, on any channel), e.g. to update the chat
    /// message with who decided and when; sees `decision` (`choice`, `by`, `at`, `channel`) and
    /// `sent` (this notification's output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_decided: Option<NotifyUpdateSpec>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyUpdateSpec {
    pub action: String,
    #[serde(default)]
    pub with: Value,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchSpec {
    /// CEL over the scope plus `output` (this step's output).
    pub on: String,
    /// value -> the steps that run when the switch takes that value.
    pub cases: BTreeMap<String, Vec<String>>,
    /// Steps that run when no case matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub default: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts in all, including the first (default 3).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Delay before the second attempt (default 1s); doubles each time by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<String>,
    #[serde(default = "default_backoff")]
    pub backoff: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<String>,
}

fn default_attempts() -> u32 {
    3
}
fn default_backoff() -> f64 {
    2.0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OnErrorSpec {
    /// `fail` (the default) or `continue`.
    Mode(String),
    /// `{ goto: [steps] }`: run these steps instead of the normal successors.
    Goto { goto: Vec<String> },
}

/// What a step does.
#[derive(Clone, Debug, PartialEq)]
pub enum StepKind {
    Action {
        operation: String,
        inputs: Template,
        /// Repeating the call is harmless; when false, an unknown outcome goes to a human.
        idempotent: bool,
    },
    Approval(Approval),
    Wait {
        ms: u64,
    },
    Set {
        values: Template,
    },
    Playbook {
        id: String,
        inputs: Template,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Approval {
    pub message: Template,
    pub choices: Vec<String>,
    pub default: Option<String>,
    pub expires_in_ms: u64,
    pub approvers: Vec<String>,
    pub notify: Vec<Notify>,
}

/// One channel an approval is sent through.
#[derive(Clone, Debug, PartialEq)]
pub struct Notify {
    pub operation: String,
    pub inputs: Template,
    /// What to send once the approval is decided.
    pub on_decided: Option<(String, Template)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Switch {
    pub on: Expr,
    pub cases: BTreeMap<String, Vec<usize>>,
    pub default: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub delay_ms: u64,
    pub backoff: f64,
    pub max_delay_ms: u64,
}

impl RetryPolicy {
    pub const NONE: RetryPolicy = RetryPolicy {
        max_attempts: 1,
        delay_ms: 0,
        backoff: 1.0,
        max_delay_ms: 0,
    };
    pub const DEFAULT_ACTION: RetryPolicy = RetryPolicy {
        max_attempts: 3,
        delay_ms: 1_000,
        backoff: 2.0,
        max_delay_ms: 60_000,
    };

    /// The delay before attempt `next` (2 for the first retry).
    pub fn delay_before(&self, next: u32) -> u64 {
        let exp = next.saturating_sub(2).min(62) as i32;
        let d = self.delay_ms as f64 * self.backoff.powi(exp);
        (d.min(self.max_delay_ms as f64)).max(0.0) as u64
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum OnError {
    Fail,
    Continue,
    Goto(Vec<usize>),
}

/// When an edge into a step is live.
#[derive(Clone, Debug, PartialEq)]
pub enum Guard {
    /// The source finished (succeeded, or failed with `on_error: continue`).
    Done,
    /// The source's switch took this value.
    Case(String),
    /// The source's switch matched no case.
    Default,
    /// The source failed and its `on_error` goes here.
    Error,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Edge {
    pub from: usize,
    pub guard: Guard,
}

/// A validated step.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub id: String,
    pub name: Option<String>,
    pub kind: StepKind,
    pub condition: Option<Expr>,
    pub switch: Option<Switch>,
    pub for_each: Option<Expr>,
    pub retry: RetryPolicy,
    pub timeout_ms: Option<u64>,
    pub on_error: OnError,
    pub incoming: Vec<Edge>,
    pub outgoing: Vec<usize>,
    /// The variables this step's expressions read: only those are put in scope for it.
    pub reads: Vec<String>,
}

impl Step {
    fn compute_reads(&mut self) {
        let mut exprs: Vec<&Expr> = Vec::new();
        exprs.extend(self.condition.iter());
        exprs.extend(self.for_each.iter());
        exprs.extend(self.switch.iter().map(|s| &s.on));
        match &self.kind {
            StepKind::Action { inputs, .. } | StepKind::Playbook { inputs, .. } => {
                exprs.extend(inputs.exprs())
            }
            StepKind::Set { values } => exprs.extend(values.exprs()),
            StepKind::Approval(a) => {
                exprs.extend(a.message.exprs());
                for n in &a.notify {
                    exprs.extend(n.inputs.exprs());
                    if let Some((_, t)) = &n.on_decided {
                        exprs.extend(t.exprs());
                    }
                }
            }
            StepKind::Wait { .. } => {}
        }
        let mut reads: Vec<String> = exprs.iter().flat_map(|e| e.variables()).collect();
        reads.sort();
        reads.dedup();
        self.reads = reads;
    }
}

/// A validated playbook version.
#[derive(Clone, Debug, PartialEq)]
pub struct Playbook {
    pub spec: PlaybookSpec,
    pub version: u32,
    pub vars: Template,
    pub steps: Vec<Step>,
    pub index: HashMap<String, usize>,
}

impl Playbook {
    pub fn id(&self) -> &str {
        &self.spec.id
    }
    pub fn step(&self, id: &str) -> Option<(usize, &Step)> {
        self.index.get(id).map(|&i| (i, &self.steps[i]))
    }
}

/// One problem found in a playbook (or rule) source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}: ")?;
        }
        if let Some(step) = &self.step {
            write!(f, "step `{step}`: ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}", self.message)
    }
}

/// Every problem found, in source order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl Problems {
    pub fn one(file: Option<&str>, field: &str, message: impl Into<String>) -> Problems {
        Problems(vec![Problem {
            file: file.map(str::to_string),
            step: None,
            field: field.to_string(),
            message: message.into(),
        }])
    }
    pub fn with_file(mut self, file: &str) -> Problems {
        for p in &mut self.0 {
            p.file.get_or_insert_with(|| file.to_string());
        }
        self
    }
}

/// What the validator knows about connector operations: their inputs.
pub trait Catalog {
    /// `Ok(required inputs, optional inputs)` for a known operation, `Err(message)` otherwise.
    fn operation(&self, name: &str) -> Result<OperationSchema, String>;
}

/// The inputs an operation takes.
#[derive(Clone, Debug, Default)]
pub struct OperationSchema {
    pub required: Vec<String>,
    pub optional: Vec<String>,
    /// Inputs that must be written literally (no expression): they choose where a call goes.
    pub literal: Vec<String>,
    /// Whether repeating the call is harmless.
    pub idempotent: bool,
}

/// A valid id: 1 to 64 of `[A-Za-z0-9_-]`, starting with a letter.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.as_bytes()[0].is_ascii_alphabetic()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Parses a YAML (or JSON, which is YAML) source into the written form, with the file named.
pub fn parse_spec(source: &str, file: Option<&str>) -> Result<PlaybookSpec, Problems> {
    if source.len() > MAX_PLAYBOOK_BYTES {
        return Err(Problems::one(
            file,
            "",
            format!(
                "playbook is {} bytes; the limit is {MAX_PLAYBOOK_BYTES}",
                source.len()
            ),
        ));
    }
    let value: Value = serde_yaml_ng::from_str(source)
        .map_err(|e| Problems::one(file, "", format!("not valid YAML: {e}")))?;
    spec_from_value(value, file)
}

/// Reads the written form from a JSON value; unknown or mistyped fields are named with their step.
pub fn spec_from_value(value: Value, file: Option<&str>) -> Result<PlaybookSpec, Problems> {
    let Value::Object(mut top) = value else {
        return Err(Problems::one(
            file,
            "",
            "a playbook must be a map with id, name and steps",
        ));
    };
    let mut problems = Vec::new();
    let steps_value = top.remove("steps");
    top.insert("steps".into(), Value::Array(vec![]));
    let mut spec: PlaybookSpec = match serde_json::from_value(Value::Object(top)) {
        Ok(s) => s,
        Err(e) => return Err(Problems::one(file, "", e.to_string())),
    };
    match steps_value {
        Some(Value::Array(items)) => {
            for (i, item) in items.into_iter().enumerate() {
                let label = item
                    .get("id")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("#{}", i + 1));
                match serde_json::from_value::<StepSpec>(item) {
                    Ok(s) => spec.steps.push(s),
                    Err(e) => problems.push(Problem {
                        file: file.map(str::to_string),
                        step: Some(label),
                        field: format!("steps[{i}]"),
                        message: e.to_string(),
                    }),
                }
            }
        }
        Some(_) => problems.push(Problem {
            file: file.map(str::to_string),
            step: None,
            field: "steps".into(),
            message: "must be a list of steps".into(),
        }),
        None => problems.push(Problem {
            file: file.map(str::to_string),
            step: None,
            field: "steps".into(),
            message: "missing field `steps`".into(),
        }),
    }
    if problems.is_empty() {
        Ok(spec)
    } else {
        Err(Problems(problems))
    }
}

/// Parses and validates a playbook source.
pub fn load(source: &str, file: Option<&str>, catalog: &dyn Catalog) -> Result<Playbook, Problems> {
    let spec = parse_spec(source, file)?;
    compile(spec, 0, catalog).map_err(|p| match file {
        Some(f) => p.with_file(f),
        None => p,
    })
}

/// The variables a playbook expression may read.
pub const SCOPE_VARS: &[&str] = &[
    "input", "alert", "vars", "steps", "item", "index", "run", "output", "approval", "decision",
    "sent",
];

struct Checker<'a> {
    problems: Vec<Problem>,
    step: Option<String>,
    catalog: &'a dyn Catalog,
}

impl Checker<'_> {
    fn problem(&mut self, field: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            file: None,
            step: self.step.clone(),
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn expr(&mut self, field: &str, src: &str) -> Option<Expr> {
        match Expr::parse(src.trim().trim_start_matches("${{").trim_end_matches("}}")) {
            Ok(e) => {
                self.check_vars(field, &e);
                Some(e)
            }
            Err(m) => {
                self.problem(field, m);
                None
            }
        }
    }

    fn check_vars(&mut self, field: &str, e: &Expr) {
        for v in e.free_variables() {
            if !SCOPE_VARS.contains(&v.as_str()) {
                self.problem(
                    field,
                    format!(
                        "`{}` reads unknown variable `{v}` (known: {})",
                        e.source(),
                        SCOPE_VARS.join(", ")
                    ),
                );
            }
        }
    }

    fn template(&mut self, field: &str, value: &Value) -> Template {
        match Template::compile(value, field) {
            Ok(t) => {
                for e in t.exprs() {
                    self.check_vars(field, e);
                }
                t
            }
            Err(errors) => {
                for e in errors {
                    self.problem(&e.path, e.message);
                }
                Template::Literal(Value::Null)
            }
        }
    }

    fn duration(&mut self, field: &str, text: &str) -> u64 {
        parse_duration_ms(text).unwrap_or_else(|m| {
            self.problem(field, m);
            0
        })
    }

    fn action(&mut self, field: &str, operation: &str, with: &Value) -> (Template, bool) {
        let inputs = self.template(&format!("{field}.with"), with);
        let mut idempotent = true;
        match self.catalog.operation(operation) {
            Err(m) => self.problem(field, m),
            Ok(schema) => {
                idempotent = schema.idempotent;
                let given: Vec<&String> = match with {
                    Value::Object(m) => m.keys().collect(),
                    Value::Null => vec![],
                    _ => {
                        self.problem(&format!("{field}.with"), "must be a map of inputs");
                        vec![]
                    }
                };
                for req in &schema.required {
                    if !given.contains(&req) {
                        self.problem(
                            &format!("{field}.with"),
                            format!("`{operation}` needs input `{req}`"),
                        );
                    }
                }
                for g in &given {
                    if !schema.required.contains(g) && !schema.optional.contains(g) {
                        let known: Vec<&str> = schema
                            .required
                            .iter()
                            .chain(&schema.optional)
                            .map(String::as_str)
                            .collect();
                        self.problem(
                            &format!("{field}.with.{g}"),
                            format!(
                                "`{operation}` has no input `{g}` (inputs: {})",
                                known.join(", ")
                            ),
                        );
                    }
                }
                for lit in &schema.literal {
                    if let Some(v) = with.get(lit.as_str())
                        && Template::compile(v, "")
                            .map(|t| !t.is_literal())
                            .unwrap_or(false)
                    {
                        self.problem(
                            &format!("{field}.with.{lit}"),
                            "must be written literally: an expression may not choose where a call goes",
                        );
                    }
                }
            }
        }
        (inputs, idempotent)
    }
}

/// Validates the written form into a runnable playbook.
pub fn compile(
    spec: PlaybookSpec,
    version: u32,
    catalog: &dyn Catalog,
) -> Result<Playbook, Problems> {
    let mut c = Checker {
        problems: Vec::new(),
        step: None,
        catalog,
    };
    if !valid_id(&spec.id) {
        c.problem("id", format!("`{}` is not a valid id (letters, digits, _ and -, starting with a letter, at most 64)", spec.id));
    }
    if spec.name.trim().is_empty() {
        c.problem("name", "must not be empty");
    }
    if spec.steps.is_empty() {
        c.problem("steps", "a playbook needs at least one step");
    }
    if spec.steps.len() > MAX_STEPS {
        c.problem(
            "steps",
            format!("{} steps; the limit is {MAX_STEPS}", spec.steps.len()),
        );
    }
    let vars = c.template("vars", &Value::Object(spec.vars.clone()));

    let mut index = HashMap::new();
    for (i, s) in spec.steps.iter().enumerate() {
        c.step = Some(s.id.clone());
        if !valid_id(&s.id) {
            c.problem("id", format!("`{}` is not a valid step id", s.id));
        }
        if index.insert(s.id.clone(), i).is_some() {
            c.problem("id", "duplicate step id");
        }
    }

    let mut steps = Vec::with_capacity(spec.steps.len());
    for s in &spec.steps {
        c.step = Some(s.id.clone());
        let kinds = [
            s.action.is_some(),
            s.approval.is_some(),
            s.wait.is_some(),
            s.set.is_some(),
            s.playbook.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if kinds != 1 {
            c.problem(
                "",
                "a step needs exactly one of `action`, `approval`, `wait`, `set`, `playbook`",
            );
        }
        let with = s.with.clone().unwrap_or(Value::Null);
        if s.with.is_some() && s.action.is_none() && s.playbook.is_none() {
            c.problem("with", "only `action` and `playbook` steps take inputs");
        }
        let kind = if let Some(op) = &s.action {
            let (inputs, idempotent) = c.action("action", op, &with);
            StepKind::Action {
                operation: op.clone(),
                inputs,
                idempotent,
            }
        } else if let Some(a) = &s.approval {
            if a.choices.is_empty() {
                c.problem("approval.choices", "an approval needs at least one choice");
            }
            let mut seen = HashSet::new();
            for ch in &a.choices {
                if !valid_id(ch) {
                    c.problem(
                        "approval.choices",
                        format!("`{ch}` is not a valid choice name"),
                    );
                }
                if !seen.insert(ch) {
                    c.problem("approval.choices", format!("duplicate choice `{ch}`"));
                }
            }
            if let Some(d) = &a.default
                && !a.choices.contains(d)
            {
                c.problem(
                    "approval.default",
                    format!("`{d}` is not one of the choices"),
                );
            }
            let expires_in_ms = a
                .expires_in
                .as_deref()
                .map(|t| c.duration("approval.expires_in", t))
                .unwrap_or(86_400_000);
            let notify = a
                .notify
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let field = format!("approval.notify[{i}]");
                    let inputs = c.action(&field, &n.action, &n.with).0;
                    let on_decided = n.on_decided.as_ref().map(|u| {
                        let f = format!("{field}.on_decided");
                        (u.action.clone(), c.action(&f, &u.action, &u.with).0)
                    });
                    Notify {
                        operation: n.action.clone(),
                        inputs,
                        on_decided,
                    }
                })
                .collect();
            StepKind::Approval(Approval {
                message: c.template("approval.message", &Value::String(a.message.clone())),
                choices: a.choices.clone(),
                default: a.default.clone(),
                expires_in_ms,
                approvers: a.approvers.clone(),
                notify,
            })
        } else if let Some(w) = &s.wait {
            StepKind::Wait {
                ms: c.duration("wait", w),
            }
        } else if let Some(values) = &s.set {
            StepKind::Set {
                values: c.template("set", &Value::Object(values.clone())),
            }
        } else if let Some(id) = &s.playbook {
            if !valid_id(id) {
                c.problem("playbook", format!("`{id}` is not a valid playbook id"));
            }
            StepKind::Playbook {
                id: id.clone(),
                inputs: c.template("with", &with),
            }
        } else {
            StepKind::Set {
                values: Template::Literal(Value::Null),
            }
        };
        let condition = s.condition.as_deref().and_then(|t| c.expr("if", t));
        let for_each = s.for_each.as_deref().and_then(|t| c.expr("for_each", t));
        let retry = match &s.retry {
            None if matches!(kind, StepKind::Action { .. } | StepKind::Approval(_)) => {
                RetryPolicy::DEFAULT_ACTION
            }
            None => RetryPolicy::NONE,
            Some(r) => {
                if r.max_attempts == 0 || r.max_attempts > 20 {
                    c.problem("retry.max_attempts", "must be between 1 and 20");
                }
                if !(1.0..=10.0).contains(&r.backoff) {
                    c.problem("retry.backoff", "must be between 1 and 10");
                }
                RetryPolicy {
                    max_attempts: r.max_attempts.clamp(1, 20),
                    delay_ms: r
                        .delay
                        .as_deref()
                        .map(|d| c.duration("retry.delay", d))
                        .unwrap_or(1_000),
                    backoff: r.backoff,
                    max_delay_ms: r
                        .max_delay
                        .as_deref()
                        .map(|d| c.duration("retry.max_delay", d))
                        .unwrap_or(3_600_000),
                }
            }
        };
        let timeout_ms = s.timeout.as_deref().map(|t| c.duration("timeout", t));
        let resolve = |c: &mut Checker, field: &str, ids: &[String]| -> Vec<usize> {
            ids.iter()
                .filter_map(|id| match index.get(id) {
                    Some(&i) => Some(i),
                    None => {
                        c.problem(field, format!("unknown step `{id}`"));
                        None
                    }
                })
                .collect()
        };
        let on_error = match &s.on_error {
            None => OnError::Fail,
            Some(OnErrorSpec::Mode(m)) if m == "fail" => OnError::Fail,
            Some(OnErrorSpec::Mode(m)) if m == "continue" => OnError::Continue,
            Some(OnErrorSpec::Mode(m)) => {
                c.problem(
                    "on_error",
                    format!("`{m}` is not `fail`, `continue` or `{{goto: [steps]}}`"),
                );
                OnError::Fail
            }
            Some(OnErrorSpec::Goto { goto }) => {
                OnError::Goto(resolve(&mut c, "on_error.goto", goto))
            }
        };
        let switch = s.switch.as_ref().map(|sw| {
            let on = c.expr("switch.on", &sw.on);
            if sw.cases.is_empty() {
                c.problem("switch.cases", "a switch needs at least one case");
            }
            let cases = sw
                .cases
                .iter()
                .map(|(k, ids)| {
                    (
                        k.clone(),
                        resolve(&mut c, &format!("switch.cases.{k}"), ids),
                    )
                })
                .collect();
            let default = resolve(&mut c, "switch.default", &sw.default);
            Switch {
                on: on.unwrap_or_else(|| Expr::parse("null").expect("literal parses")),
                cases,
                default,
            }
        });
        let needs = resolve(&mut c, "needs", &s.needs);
        steps.push(Step {
            id: s.id.clone(),
            name: s.name.clone(),
            kind,
            condition,
            switch,
            for_each,
            retry,
            timeout_ms,
            on_error,
            incoming: needs
                .into_iter()
                .map(|from| Edge {
                    from,
                    guard: Guard::Done,
                })
                .collect(),
            outgoing: vec![],
            reads: vec![],
        });
    }

    // Edges from switches and error branches.
    for from in 0..steps.len() {
        let mut extra: Vec<(usize, Guard)> = Vec::new();
        if let Some(sw) = &steps[from].switch {
            for (value, targets) in &sw.cases {
                extra.extend(targets.iter().map(|&t| (t, Guard::Case(value.clone()))));
            }
            extra.extend(sw.default.iter().map(|&t| (t, Guard::Default)));
        }
        if let OnError::Goto(targets) = &steps[from].on_error {
            extra.extend(targets.iter().map(|&t| (t, Guard::Error)));
        }
        for (to, guard) in extra {
            steps[to].incoming.push(Edge { from, guard });
        }
    }
    for to in 0..steps.len() {
        let froms: Vec<usize> = steps[to].incoming.iter().map(|e| e.from).collect();
        for from in froms {
            if from == to {
                c.step = Some(steps[to].id.clone());
                c.problem("needs", "a step cannot depend on itself");
            } else if !steps[from].outgoing.contains(&to) {
                steps[from].outgoing.push(to);
            }
        }
    }

    if c.problems.is_empty() {
        check_graph(&steps, &mut c);
    }
    for s in &mut steps {
        s.compute_reads();
    }
    if c.problems.is_empty() {
        Ok(Playbook {
            spec,
            version,
            vars,
            steps,
            index,
        })
    } else {
        Err(Problems(c.problems))
    }
}

/// Cycles (Kahn's algorithm) and steps that can never run.
fn check_graph(steps: &[Step], c: &mut Checker) {
    let n = steps.len();
    let mut indegree: Vec<usize> = steps.iter().map(|s| s.incoming.len()).collect();
    let mut queue: Vec<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut seen = 0;
    while let Some(i) = queue.pop() {
        seen += 1;
        for &to in &steps[i].outgoing {
            let count = steps[to].incoming.iter().filter(|e| e.from == i).count();
            indegree[to] -= count;
            if indegree[to] == 0 {
                queue.push(to);
            }
        }
    }
    if seen < n {
        let stuck: Vec<&str> = (0..n)
            .filter(|&i| indegree[i] > 0)
            .map(|i| steps[i].id.as_str())
            .collect();
        c.step = None;
        c.problem(
            "steps",
            format!("the steps form a cycle through: {}", stuck.join(", ")),
        );
        return;
    }
    // A switch case or error branch target whose every incoming edge is guarded by the same
    // source can run; a target reachable only through an error branch of a step that cannot fail
    // is still reachable. Unreachable: a step whose switch source has a case that is never a
    // choice of the approval it switches on.
    for (i, s) in steps.iter().enumerate() {
        if let (StepKind::Approval(a), Some(sw)) = (&s.kind, &s.switch)
            && sw.on.source().replace(' ', "") == "output.choice"
        {
            for value in sw.cases.keys() {
                if !a.choices.contains(value) {
                    c.step = Some(steps[i].id.clone());
                    c.problem(
                        &format!("switch.cases.{value}"),
                        format!(
                            "`{value}` is not a choice of this approval, so its steps are unreachable (choices: {})",
                            a.choices.join(", ")
                        ),
                    );
                }
            }
        }
        if s.incoming.len() > 1 {
            let from_same: HashSet<usize> = s.incoming.iter().map(|e| e.from).collect();
            if from_same.len() == 1 {
                let guards: Vec<&Guard> = s.incoming.iter().map(|e| &e.guard).collect();
                let cases = guards
                    .iter()
                    .filter(|g| matches!(g, Guard::Case(_)))
                    .count();
                if cases > 1 {
                    continue;
                }
                if guards.contains(&&Guard::Error)
                    && guards.iter().any(|g| !matches!(g, Guard::Error))
                {
                    c.step = Some(s.id.clone());
                    c.problem(
                        "needs",
                        format!(
                            "unreachable: it needs `{}` both to succeed and to fail",
                            steps[s.incoming[0].from].id
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) struct TestCatalog;
    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }
    impl Catalog for TestCatalog {
        fn operation(&self, name: &str) -> Result<OperationSchema, String> {
            match name {
                "http.request" => Ok(OperationSchema {
                    required: strings(&["connection", "method", "path"]),
                    optional: strings(&["query", "headers", "json", "form"]),
                    literal: strings(&["connection"]),
                    idempotent: true,
                }),
                other => Err(format!("unknown operation `{other}`")),
            }
        }
    }

    fn problems(src: &str) -> Vec<String> {
        match load(src, Some("pb.yaml"), &TestCatalog) {
            Ok(_) => vec![],
            Err(p) => p.0.iter().map(|p| p.to_string()).collect(),
        }
    }

    const OK: &str = r#"
id: demo
name: Demo
steps:
  - id: ask
    approval:
      message: "Block ${{ alert.title }}?"
      choices: [block, ignore]
      default: ignore
    switch:
      on: output.choice
      cases: { block: [block_ip], ignore: [close] }
  - id: block_ip
    for_each: alert.entities.ips
    action: http.request
    with: { connection: fw, method: POST, path: "/block/${{ item }}" }
  - id: close
    set: { closed: true }
  - id: done
    needs: [block_ip, close]
    set: { finished: true }
"#;

    #[test]
    fn a_valid_playbook_loads_with_its_edges() {
        let pb = load(OK, None, &TestCatalog).unwrap();
        let (_, done) = pb.step("done").unwrap();
        assert_eq!(done.incoming.len(), 2);
        let (_, block) = pb.step("block_ip").unwrap();
        assert_eq!(
            block.incoming,
            vec![Edge {
                from: 0,
                guard: Guard::Case("block".into())
            }]
        );
        assert_eq!(block.retry, RetryPolicy::DEFAULT_ACTION);
    }

    #[test]
    fn errors_name_file_step_and_field() {
        let src = OK
            .replace("default: ignore", "default: maybe")
            .replace("[block_ip, close]", "[block_ip, nope]");
        let p = problems(&src);
        assert!(
            p.contains(
                &"pb.yaml: step `ask`: approval.default: `maybe` is not one of the choices"
                    .to_string()
            ),
            "{p:?}"
        );
        assert!(
            p.contains(&"pb.yaml: step `done`: needs: unknown step `nope`".to_string()),
            "{p:?}"
        );
    }

    #[test]
    fn unknown_fields_and_operations_and_inputs_are_named() {
        let p = problems(&OK.replace("for_each:", "for_eahc:"));
        assert!(
            p[0].contains("step `block_ip`") && p[0].contains("unknown field `for_eahc`"),
            "{p:?}"
        );
        let p = problems(&OK.replace("http.request", "http.reqest"));
        assert!(
            p.iter()
                .any(|m| m.contains("unknown operation `http.reqest`")),
            "{p:?}"
        );
        let p = problems(&OK.replace("method: POST", "methd: POST"));
        assert!(
            p.iter()
                .any(|m| m.contains("action.with.methd") && m.contains("has no input")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|m| m.contains("needs input `method`")),
            "{p:?}"
        );
    }

    #[test]
    fn an_expression_may_not_choose_the_connection() {
        let p = problems(&OK.replace("connection: fw", "connection: \"${{ alert.title }}\""));
        assert!(
            p.iter()
                .any(|m| m.contains("with.connection") && m.contains("literally")),
            "{p:?}"
        );
    }

    #[test]
    fn cycles_self_loops_and_bad_expressions_are_caught() {
        let p = problems(&OK.replace("  - id: close\n", "  - id: close\n    needs: [done]\n"));
        assert!(p.iter().any(|m| m.contains("cycle")), "{p:?}");
        let p = problems(&OK.replace("alert.entities.ips", "alert.entities.ips +"));
        assert!(
            p.iter()
                .any(|m| m.contains("step `block_ip`: for_each: cannot parse")),
            "{p:?}"
        );
        let p = problems(&OK.replace("alert.entities.ips", "secrets.fw"));
        assert!(
            p.iter().any(|m| m.contains("unknown variable `secrets`")),
            "{p:?}"
        );
    }

    #[test]
    fn unreachable_cases_are_caught() {
        let p = problems(&OK.replace("cases: { block:", "cases: { blok:"));
        assert!(
            p.iter()
                .any(|m| m.contains("`blok` is not a choice") && m.contains("unreachable")),
            "{p:?}"
        );
    }

    #[test]
    fn malformed_sources_are_errors_not_panics() {
        for src in [
            "",
            "[]",
            "id: x",
            "{{{",
            "id: x\nname: y\nsteps: 3",
            "\u{0}",
        ] {
            assert!(!problems(src).is_empty(), "{src:?} should be rejected");
        }
        let big = "#".repeat(MAX_PLAYBOOK_BYTES + 1);
        assert!(problems(&big)[0].contains("limit"));
    }

    #[test]
    fn mangled_playbooks_are_refused_or_loaded_but_never_panic() {
        // A small deterministic generator: drop, duplicate, swap and truncate lines and
        // characters of a valid playbook, a few thousand times.
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n.max(1) as u64) as usize
        };
        let lines: Vec<&str> = OK.lines().collect();
        let (mut ok, mut refused) = (0, 0);
        for _ in 0..3_000 {
            let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
            for _ in 0..1 + next(3) {
                let i = next(l.len());
                match next(5) {
                    0 => {
                        l.remove(i);
                    }
                    1 => {
                        let dup = l[i].clone();
                        l.insert(next(l.len()), dup);
                    }
                    2 => {
                        let j = next(l.len());
                        l.swap(i, j);
                    }
                    3 => {
                        let cut = next(l[i].len() + 1);
                        let mut end = cut;
                        while !l[i].is_char_boundary(end) {
                            end -= 1;
                        }
                        l[i].truncate(end);
                    }
                    _ => {
                        let pos = next(l[i].len() + 1);
                        if l[i].is_char_boundary(pos) {
                            l[i].insert_str(
                                pos,
                                ["{", "]", "${{", "}}", ":", "- ", "'", "\\u0000"][next(8)],
                            );
                        }
                    }
                }
                if l.is_empty() {
                    break;
                }
            }
            match load(&l.join("\n"), Some("fuzz.yaml"), &TestCatalog) {
                Ok(_) => ok += 1,
                Err(p) => {
                    assert!(!p.0.is_empty());
                    refused += 1;
                }
            }
        }
        assert!(
            ok > 0 && refused > 0,
            "both outcomes occur: {ok} loaded, {refused} refused"
        );
    }

    #[test]
    fn retry_delay_grows_and_is_capped() {
        let r = RetryPolicy {
            max_attempts: 5,
            delay_ms: 1000,
            backoff: 2.0,
            max_delay_ms: 3000,
        };
        assert_eq!(
            [r.delay_before(2), r.delay_before(3), r.delay_before(4)],
            [1000, 2000, 3000]
        );
    }
}
