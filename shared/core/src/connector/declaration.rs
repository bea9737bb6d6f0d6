//! Connector declarations: `connectors/<id>/connector.yaml`, parsed and checked once at load.
//!
//! Guarantee: a declaration that loads has every template and expression compiled, every request
//! with a method and a path, at most one body, and ids that cannot collide; a playbook is then
//! checked against its operations' inputs. See `connectors/README.md` for the format.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::expr::{Expr, Template};
use crate::playbook::{Problem, Problems};

/// One connector: its operations and which connections fit it.
#[derive(Clone, Debug)]
pub struct Connector {
    pub id: String,
    pub name: String,
    pub description: String,
    pub docs: String,
    /// Host patterns a connection's base URL may name (`*` matches one or more DNS labels).
    pub hosts: Vec<String>,
    /// Auth types (`basic`, `aws_sigv4`, ...) a connection may use.
    pub auth: Vec<String>,
    pub operations: BTreeMap<String, Operation>,
    /// Built into the binary (as opposed to a user's file).
    pub shipped: bool,
}

/// One operation, e.g. `servicenow.create_incident`.
#[derive(Clone, Debug)]
pub struct Operation {
    /// The full name, `<connector>.<operation>`.
    pub name: String,
    pub connector: String,
    pub description: String,
    /// Whether repeating the call leaves the same state. A non-idempotent call whose outcome is
    /// unknown is never repeated without a human's say.
    pub idempotent: bool,
    pub inputs: BTreeMap<String, Input>,
    pub requests: Vec<RequestTemplate>,
    pub outputs: Vec<(String, Expr)>,
    /// How to find out whether a call whose worker was lost took effect (by its key).
    pub recover: Option<Recover>,
}

/// A lookup by the call's key: `found` says whether the call took effect, and `outputs` are then
/// what the call would have returned.
#[derive(Clone, Debug)]
pub struct Recover {
    pub request: RequestTemplate,
    pub found: Expr,
    pub outputs: Vec<(String, Expr)>,
}

/// One declared input.
#[derive(Clone, Debug, Default)]
pub struct Input {
    pub required: bool,
    pub default: Option<Value>,
    pub description: String,
}

/// A string-valued field: rendered as text, or with XML-escaped interpolations.
#[derive(Clone, Debug)]
pub enum Field {
    Text(Template),
    Xml(Template),
}

/// One HTTP call of an operation.
#[derive(Clone, Debug)]
pub struct RequestTemplate {
    pub id: Option<String>,
    pub method: String,
    pub path: Template,
    pub query: Vec<(String, Field)>,
    pub headers: Vec<(String, Field)>,
    pub body: BodyTemplate,
    /// CEL over `response`; default: a 2xx status.
    pub success: Option<Expr>,
    /// CEL over `response`; default: 429 or 5xx.
    pub retryable: Option<Expr>,
    /// CEL over `response`: the vendor's error, shown instead of the body when a call fails.
    pub error: Option<Expr>,
}

/// How a request's body is made.
#[derive(Clone, Debug)]
pub enum BodyTemplate {
    None,
    Json(Template),
    Form(Vec<(String, Field)>),
    /// Text with XML-escaped interpolations.
    Xml {
        template: Template,
        content_type: String,
    },
    Text {
        template: Template,
        content_type: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectorFile {
    connector: String,
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    docs: String,
    hosts: Vec<String>,
    auth: Vec<String>,
    operations: BTreeMap<String, OperationFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OperationFile {
    #[serde(default)]
    description: String,
    idempotent: bool,
    #[serde(default)]
    inputs: BTreeMap<String, InputFile>,
    #[serde(default)]
    request: Option<RequestFile>,
    #[serde(default)]
    requests: Option<Vec<RequestFile>>,
    #[serde(default)]
    outputs: BTreeMap<String, String>,
    #[serde(default)]
    recover: Option<RecoverFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecoverFile {
    request: RequestFile,
    found: String,
    #[serde(default)]
    outputs: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputFile {
    #[serde(default)]
    required: bool,
    #[serde(default)]
    default: Option<Value>,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestFile {
    #[serde(default)]
    id: Option<String>,
    method: String,
    path: String,
    #[serde(default)]
    query: Option<Value>,
    #[serde(default)]
    headers: Option<Value>,
    #[serde(default)]
    json: Option<Value>,
    #[serde(default)]
    form: Option<Value>,
    #[serde(default)]
    xml: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    success: Option<String>,
    #[serde(default)]
    retryable: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

/// The auth types a connector may name (the `type` of [`crate::http::Auth`]).
pub const AUTH_TYPES: &[&str] = &[
    "none",
    "bearer",
    "basic",
    "api_key",
    "oauth2_client_credentials",
    "aws_sigv4",
    "hmac",
    "json_body_key",
];

const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"];
/// The variables request templates may read.
const REQUEST_VARS: &[&str] = &["inputs", "key", "responses"];
/// The variables `success`, `retryable` and `outputs` may read.
const RESPONSE_VARS: &[&str] = &["inputs", "key", "responses", "response"];

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.as_bytes()[0].is_ascii_lowercase()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

struct Checker<'a> {
    file: Option<&'a str>,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn problem(&mut self, field: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.map(str::to_string),
            step: None,
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn template(&mut self, field: &str, value: &Value, vars: &[&str]) -> Template {
        match Template::compile(value, field) {
            Ok(t) => {
                self.reads(field, t.exprs(), vars);
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

    fn expr(&mut self, field: &str, source: &str, vars: &[&str]) -> Option<Expr> {
        match Expr::parse(source) {
            Ok(e) => {
                self.reads(field, vec![&e], vars);
                Some(e)
            }
            Err(m) => {
                self.problem(field, m);
                None
            }
        }
    }

    fn reads(&mut self, field: &str, exprs: Vec<&Expr>, vars: &[&str]) {
        for e in exprs {
            for v in e.free_variables() {
                if !vars.contains(&v.as_str()) {
                    self.problem(
                        field,
                        format!(
                            "`{}` reads `{v}`; a connector can read only {}",
                            e.source(),
                            vars.join(", ")
                        ),
                    );
                }
            }
        }
    }

    fn fields(&mut self, field: &str, value: &Option<Value>) -> Vec<(String, Field)> {
        let mut out = Vec::new();
        match value {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    let f = format!("{field}.{k}");
                    match v {
                        Value::Object(inner) if inner.len() == 1 && inner.contains_key("xml") => {
                            match &inner["xml"] {
                                Value::String(_) => out.push((
                                    k.clone(),
                                    Field::Xml(self.template(&f, &inner["xml"], REQUEST_VARS)),
                                )),
                                _ => self.problem(&f, "`xml` must be a string"),
                            }
                        }
                        Value::Object(_) | Value::Array(_) => {
                            self.problem(&f, "must be a string (or `{ xml: \"...\" }`)")
                        }
                        v => out.push((k.clone(), Field::Text(self.template(&f, v, REQUEST_VARS)))),
                    }
                }
            }
            Some(_) => self.problem(field, "must be a map"),
        }
        out
    }

    fn request(&mut self, field: &str, r: &RequestFile) -> RequestTemplate {
        let method = r.method.to_ascii_uppercase();
        if !METHODS.contains(&method.as_str()) {
            self.problem(
                &format!("{field}.method"),
                format!("`{}` is not one of {}", r.method, METHODS.join(", ")),
            );
        }
        if !r.path.starts_with('/') {
            self.problem(&format!("{field}.path"), "must start with `/`");
        }
        let path = self.template(
            &format!("{field}.path"),
            &Value::String(r.path.clone()),
            REQUEST_VARS,
        );
        let bodies = [
            r.json.is_some(),
            r.form.is_some(),
            r.xml.is_some(),
            r.text.is_some(),
        ];
        if bodies.iter().filter(|b| **b).count() > 1 {
            self.problem(field, "at most one of json, form, xml, text");
        }
        let body = if let Some(v) = &r.json {
            BodyTemplate::Json(self.template(&format!("{field}.json"), v, REQUEST_VARS))
        } else if r.form.is_some() {
            BodyTemplate::Form(self.fields(&format!("{field}.form"), &r.form))
        } else if let Some(x) = &r.xml {
            BodyTemplate::Xml {
                template: self.template(
                    &format!("{field}.xml"),
                    &Value::String(x.clone()),
                    REQUEST_VARS,
                ),
                content_type: r
                    .content_type
                    .clone()
                    .unwrap_or_else(|| "application/xml".into()),
            }
        } else if let Some(t) = &r.text {
            BodyTemplate::Text {
                template: self.template(
                    &format!("{field}.text"),
                    &Value::String(t.clone()),
                    REQUEST_VARS,
                ),
                content_type: r
                    .content_type
                    .clone()
                    .unwrap_or_else(|| "text/plain".into()),
            }
        } else {
            BodyTemplate::None
        };
        RequestTemplate {
            id: r.id.clone(),
            method,
            path,
            query: self.fields(&format!("{field}.query"), &r.query),
            headers: self.fields(&format!("{field}.headers"), &r.headers),
            body,
            success: r
                .success
                .as_deref()
                .and_then(|s| self.expr(&format!("{field}.success"), s, RESPONSE_VARS)),
            retryable: r
                .retryable
                .as_deref()
                .and_then(|s| self.expr(&format!("{field}.retryable"), s, RESPONSE_VARS)),
            error: r
                .error
                .as_deref()
                .and_then(|s| self.expr(&format!("{field}.error"), s, RESPONSE_VARS)),
        }
    }
}

impl Connector {
    /// Parses and checks one `connector.yaml`; every problem is reported at once.
    pub fn parse(source: &str, file: Option<&str>, shipped: bool) -> Result<Connector, Problems> {
        let f: ConnectorFile =
            serde_yaml_ng::from_str(source).map_err(|e| Problems::one(file, "", e.to_string()))?;
        let mut c = Checker {
            file,
            problems: Vec::new(),
        };
        if !valid_name(&f.connector) {
            c.problem(
                "connector",
                format!(
                    "`{}` is not a connector id ([a-z][a-z0-9_]*, at most 64)",
                    f.connector
                ),
            );
        }
        if f.hosts.is_empty() {
            c.problem("hosts", "name at least one host pattern (`*` for any host)");
        }
        for (i, h) in f.hosts.iter().enumerate() {
            if h.is_empty() || h.contains('/') || h.contains(':') {
                c.problem(
                    &format!("hosts[{i}]"),
                    format!("`{h}` is not a host pattern"),
                );
            }
        }
        if f.auth.is_empty() {
            c.problem("auth", "name at least one auth type");
        }
        for a in &f.auth {
            if !AUTH_TYPES.contains(&a.as_str()) {
                c.problem(
                    "auth",
                    format!("unknown auth type `{a}` (known: {})", AUTH_TYPES.join(", ")),
                );
            }
        }
        if f.operations.is_empty() {
            c.problem("operations", "declare at least one operation");
        }
        let mut operations = BTreeMap::new();
        for (name, o) in &f.operations {
            let field = format!("operations.{name}");
            if !valid_name(name) {
                c.problem(&field, format!("`{name}` is not an operation name"));
            }
            let mut inputs = BTreeMap::new();
            for (iname, i) in &o.inputs {
                if !valid_name(iname) || iname == "connection" {
                    c.problem(
                        &format!("{field}.inputs.{iname}"),
                        "not an input name ([a-z][a-z0-9_]*; `connection` is reserved)",
                    );
                }
                if i.required && i.default.is_some() {
                    c.problem(
                        &format!("{field}.inputs.{iname}"),
                        "a required input has no default",
                    );
                }
                inputs.insert(
                    iname.clone(),
                    Input {
                        required: i.required,
                        default: i.default.clone(),
                        description: i.description.clone(),
                    },
                );
            }
            let list: Vec<&RequestFile> = match (&o.request, &o.requests) {
                (Some(r), None) => vec![r],
                (None, Some(rs)) if !rs.is_empty() => rs.iter().collect(),
                _ => {
                    c.problem(
                        &field,
                        "declare exactly one of `request` or `requests` (non-empty)",
                    );
                    vec![]
                }
            };
            let mut requests = Vec::new();
            let mut ids: Vec<&str> = Vec::new();
            for (i, r) in list.iter().enumerate() {
                let rfield = if o.request.is_some() {
                    format!("{field}.request")
                } else {
                    format!("{field}.requests[{i}]")
                };
                if o.requests.is_some() && i + 1 < list.len() {
                    match r.id.as_deref() {
                        Some(id) if valid_name(id) && !ids.contains(&id) => ids.push(id),
                        _ => c.problem(
                            &format!("{rfield}.id"),
                            "each request but the last needs a unique id, read as `responses.<id>`",
                        ),
                    }
                }
                requests.push(c.request(&rfield, r));
            }
            let outputs = o
                .outputs
                .iter()
                .filter_map(|(k, src)| {
                    c.expr(&format!("{field}.outputs.{k}"), src, RESPONSE_VARS)
                        .map(|e| (k.clone(), e))
                })
                .collect();
            let recover = o.recover.as_ref().and_then(|r| {
                let rfield = format!("{field}.recover");
                if o.idempotent {
                    c.problem(
                        &rfield,
                        "only an operation that is not repeat-safe needs a recover lookup",
                    );
                }
                let request = c.request(&format!("{rfield}.request"), &r.request);
                let found = c.expr(&format!("{rfield}.found"), &r.found, RESPONSE_VARS)?;
                let outputs = r
                    .outputs
                    .iter()
                    .filter_map(|(k, src)| {
                        c.expr(&format!("{rfield}.outputs.{k}"), src, RESPONSE_VARS)
                            .map(|e| (k.clone(), e))
                    })
                    .collect();
                Some(Recover {
                    request,
                    found,
                    outputs,
                })
            });
            operations.insert(
                name.clone(),
                Operation {
                    name: format!("{}.{name}", f.connector),
                    connector: f.connector.clone(),
                    description: o.description.clone(),
                    idempotent: o.idempotent,
                    inputs,
                    requests,
                    outputs,
                    recover,
                },
            );
        }
        if !c.problems.is_empty() {
            return Err(Problems(c.problems));
        }
        Ok(Connector {
            id: f.connector,
            name: f.name,
            description: f.description,
            docs: f.docs,
            hosts: f.hosts,
            auth: f.auth,
            operations,
            shipped,
        })
    }

    /// Whether a connection's host is one this connector may call.
    pub fn allows_host(&self, host: &str) -> bool {
        self.hosts.iter().any(|p| host_matches(p, host))
    }
}

/// `*` alone matches any host; otherwise each `*` matches one or more DNS labels.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    if pattern == "*" {
        return true;
    }
    fn go(p: &[&str], h: &[&str]) -> bool {
        match (p.first(), h.first()) {
            (None, None) => true,
            (Some(&"*"), Some(_)) => (1..=h.len()).any(|n| go(&p[1..], &h[n..])),
            (Some(a), Some(b)) if a.eq_ignore_ascii_case(b) => go(&p[1..], &h[1..]),
            _ => false,
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let h: Vec<&str> = host.split('.').collect();
    go(&p, &h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_match_whole_labels() {
        assert!(host_matches("*.service-now.com", "acme.service-now.com"));
        assert!(host_matches(
            "wafv2.*.amazonaws.com",
            "wafv2.eu-west-1.amazonaws.com"
        ));
        assert!(!host_matches("*.service-now.com", "service-now.com"));
        assert!(!host_matches(
            "*.service-now.com",
            "acme.service-now.com.evil.io"
        ));
        assert!(!host_matches("slack.com", "slack.com.evil.io"));
        assert!(host_matches("*", "firewall.corp"));
    }

    #[test]
    fn a_broken_declaration_reports_every_problem_with_its_place() {
        let src = r#"
connector: Bad-Id
name: Bad
hosts: []
auth: [telepathy]
operations:
  open:
    idempotent: true
    request:
      method: FETCH
      path: incident
      json: { a: "${{ alert.title }}" }
      text: hello
    outputs:
      id: "response.body.("
"#;
        let p = Connector::parse(src, Some("bad.yaml"), false)
            .unwrap_err()
            .to_string();
        for needle in [
            "connector",
            "hosts",
            "unknown auth type `telepathy`",
            "operations.open.request.method",
            "operations.open.request.path",
            "reads `alert`",
            "at most one of json, form, xml, text",
            "operations.open.outputs.id",
        ] {
            assert!(p.contains(needle), "missing `{needle}` in:\n{p}");
        }
    }
}
