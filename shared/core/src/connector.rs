//! The built-in connector operations and how a step's inputs become a request.
//!
//! Guarantee: the connection (and so the scheme, host and credentials) of a call is written
//! literally in the playbook; the path's interpolated parts are percent-encoded as path segments;
//! bodies are serialized from the value tree. An alert field can fill a value, never a shape.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::expr::{Encoding, EvalError, Scope, Template, text_of};
use crate::http::{Body, HttpRequest};
use crate::playbook::{Catalog, OperationSchema};

/// The operations every Riposte build knows.
#[derive(Clone, Copy, Debug, Default)]
pub struct Builtins;

/// `http.request`: one call through a declared connection.
pub const HTTP_REQUEST: &str = "http.request";
/// `core.noop`: does nothing and returns its inputs (handy for tests and benchmarks).
pub const NOOP: &str = "core.noop";

impl Catalog for Builtins {
    fn operation(&self, name: &str) -> Result<OperationSchema, String> {
        match name {
            HTTP_REQUEST => Ok(OperationSchema {
                required: vec!["connection", "method", "path"],
                optional: vec![
                    "query",
                    "headers",
                    "json",
                    "form",
                    "text",
                    "content_type",
                    "timeout",
                ],
                literal: vec!["connection", "method"],
            }),
            NOOP => Ok(OperationSchema {
                required: vec![],
                optional: vec!["value"],
                literal: vec![],
            }),
            other => Err(format!(
                "unknown operation `{other}` (known: {HTTP_REQUEST}, {NOOP})"
            )),
        }
    }
}

/// Renders the inputs of an `http.request` into a request.
pub fn render_http(
    inputs: &Template,
    scope: &Scope,
    idempotency_key: Option<String>,
) -> Result<HttpRequest, EvalError> {
    let bad = |message: String| EvalError {
        expr: "with".into(),
        message,
    };
    let mut fields: BTreeMap<&str, Value> = BTreeMap::new();
    match inputs {
        Template::Map(entries) => {
            for (k, t) in entries {
                let enc = if k == "path" {
                    Encoding::PathSegment
                } else {
                    Encoding::Text
                };
                fields.insert(k.as_str(), t.render_with(scope, enc)?);
            }
        }
        Template::Literal(Value::Object(m)) => {
            for (k, v) in m {
                fields.insert(k.as_str(), v.clone());
            }
        }
        _ => return Err(bad("inputs must be a map".into())),
    }
    let text = |k: &str| -> Result<Option<String>, EvalError> {
        match fields.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(bad(format!("`{k}` must be a string, got {other}"))),
        }
    };
    let map = |k: &str| -> Result<Vec<(String, String)>, EvalError> {
        match fields.get(k) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Object(m)) => Ok(m
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), text_of(v)))
                .collect()),
            Some(_) => Err(bad(format!("`{k}` must be a map"))),
        }
    };
    let connection = text("connection")?.ok_or_else(|| bad("`connection` is required".into()))?;
    let method = text("method")?
        .ok_or_else(|| bad("`method` is required".into()))?
        .to_ascii_uppercase();
    let path = text("path")?.ok_or_else(|| bad("`path` is required".into()))?;
    let body = if let Some(v) = fields.get("json") {
        Some(Body::Json(v.clone()))
    } else if fields.contains_key("form") {
        Some(Body::Form(map("form")?.into_iter().collect()))
    } else if let Some(t) = text("text")? {
        Some(Body::Text {
            content_type: text("content_type")?.unwrap_or_else(|| "text/plain".into()),
            text: t,
        })
    } else {
        None
    };
    let timeout_ms = match text("timeout")? {
        Some(t) => Some(crate::expr::parse_duration_ms(&t).map_err(bad)?),
        None => None,
    };
    Ok(HttpRequest {
        connection,
        method,
        path,
        query: map("query")?,
        headers: map("headers")?.into_iter().collect(),
        body,
        idempotency_key,
        timeout_ms,
    })
}

/// The declared connections of a deployment, by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Connections {
    map: BTreeMap<String, crate::http::Connection>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionsFile {
    connections: BTreeMap<String, crate::http::Connection>,
}

impl Connections {
    /// Parses `connections: { NAME: { base_url, auth, ... } }` (YAML or JSON).
    pub fn parse(
        source: &str,
        file: Option<&str>,
    ) -> Result<Connections, crate::playbook::Problems> {
        let f: ConnectionsFile = serde_yaml_ng::from_str(source)
            .map_err(|e| crate::playbook::Problems::one(file, "connections", e.to_string()))?;
        let mut map = BTreeMap::new();
        let mut problems = Vec::new();
        for (name, mut c) in f.connections {
            c.name = name.clone();
            match url::Url::parse(&c.base_url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => problems.push(crate::playbook::Problem {
                    file: file.map(str::to_string),
                    step: None,
                    field: format!("connections.{name}.base_url"),
                    message: format!("`{}` is not an http(s) URL with a host", c.base_url),
                }),
            }
            map.insert(name, c);
        }
        if problems.is_empty() {
            Ok(Connections { map })
        } else {
            Err(crate::playbook::Problems(problems))
        }
    }

    pub fn from_list(list: Vec<crate::http::Connection>) -> Connections {
        Connections {
            map: list.into_iter().map(|c| (c.name.clone(), c)).collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&crate::http::Connection> {
        self.map.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }
}

/// The connections a playbook's actions name: (step id, connection name).
pub fn connections_used(pb: &crate::playbook::Playbook) -> Vec<(String, String)> {
    use crate::playbook::StepKind;
    let mut out = Vec::new();
    let mut visit = |step: &str, op: &str, t: &Template| {
        if op != HTTP_REQUEST {
            return;
        }
        let name = match t {
            Template::Literal(Value::Object(m)) => m
                .get("connection")
                .and_then(Value::as_str)
                .map(str::to_string),
            Template::Map(entries) => {
                entries
                    .iter()
                    .find(|(k, _)| k == "connection")
                    .and_then(|(_, t)| match t {
                        Template::Literal(Value::String(s)) => Some(s.clone()),
                        _ => None,
                    })
            }
            _ => None,
        };
        if let Some(n) = name {
            out.push((step.to_string(), n));
        }
    };
    for s in &pb.steps {
        match &s.kind {
            StepKind::Action { operation, inputs } => visit(&s.id, operation, inputs),
            StepKind::Approval(a) => a.notify.iter().for_each(|(op, t)| visit(&s.id, op, t)),
            _ => {}
        }
    }
    out
}
