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
                optional: vec!["query", "headers", "json", "form", "text", "content_type", "timeout"],
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
