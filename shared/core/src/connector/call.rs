//! Executing a declared operation: render each request from the inputs, send it through the
//! connection, judge the answer with the declaration's `success` and `retryable`, and extract
//! the outputs.
//!
//! Guarantee: every value that reaches a request comes from the step's inputs through the
//! declaration's templates, encoded for where it goes (path segment, XML, JSON, form); the scheme,
//! host and credentials come only from the connection.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::declaration::{BodyTemplate, Field, Operation, RequestTemplate};
use crate::engine::Outcome;
use crate::expr::{Encoding, EvalError, Scope, Template, text_of};
use crate::http::{Body, Connection, HttpError, HttpRequest, HttpResponse, is_sensitive_header};
use crate::ports::HttpSender;

/// The longest piece of a vendor's error body kept in a step's error.
const ERROR_EXCERPT_CHARS: usize = 300;

/// The inputs with defaults applied, or the first missing required input.
pub fn complete_inputs(op: &Operation, given: &Value) -> Result<Map<String, Value>, String> {
    let mut inputs = match given {
        Value::Object(m) => m.clone(),
        Value::Null => Map::new(),
        other => return Err(format!("inputs must be a map, got {other}")),
    };
    inputs.remove("connection");
    for (name, spec) in &op.inputs {
        let missing = inputs.get(name).is_none_or(Value::is_null);
        if missing {
            inputs.remove(name);
            if let Some(d) = &spec.default {
                inputs.insert(name.clone(), d.clone());
            } else if spec.required {
                return Err(format!("`{}` needs input `{name}`, which is null", op.name));
            }
        }
    }
    if let Some(unknown) = inputs.keys().find(|k| !op.inputs.contains_key(*k)) {
        return Err(format!("`{}` has no input `{unknown}`", op.name));
    }
    Ok(inputs)
}

fn fields(list: &[(String, Field)], scope: &Scope) -> Result<Vec<(String, String)>, EvalError> {
    let mut out = Vec::new();
    for (k, f) in list {
        let v = match f {
            Field::Text(t) => t.render(scope)?,
            Field::Xml(t) => t.render_with(scope, Encoding::Xml)?,
        };
        if !v.is_null() {
            out.push((k.clone(), text_of(&v)));
        }
    }
    Ok(out)
}

/// Renders a JSON body, leaving out object members whose expression gave null: an optional
/// input that was not given is not sent. A `null` written literally is sent.
fn render_json(t: &Template, scope: &Scope) -> Result<Value, EvalError> {
    Ok(match t {
        Template::Map(entries) => {
            let mut m = Map::new();
            for (k, t) in entries {
                let v = render_json(t, scope)?;
                if !v.is_null() || t.is_literal() {
                    m.insert(k.clone(), v);
                }
            }
            Value::Object(m)
        }
        Template::List(items) => Value::Array(
            items
                .iter()
                .map(|t| render_json(t, scope))
                .collect::<Result<_, _>>()?,
        ),
        t => t.render(scope)?,
    })
}

/// Renders one request of an operation.
pub fn render(
    r: &RequestTemplate,
    scope: &Scope,
    connection: &str,
) -> Result<HttpRequest, EvalError> {
    let body = match &r.body {
        BodyTemplate::None => None,
        BodyTemplate::Json(t) => Some(Body::Json(render_json(t, scope)?)),
        BodyTemplate::Form(f) => Some(Body::Form(fields(f, scope)?.into_iter().collect())),
        BodyTemplate::Xml {
            template,
            content_type,
        } => Some(Body::Text {
            content_type: content_type.clone(),
            text: text_of(&template.render_with(scope, Encoding::Xml)?),
        }),
        BodyTemplate::Text {
            template,
            content_type,
        } => Some(Body::Text {
            content_type: content_type.clone(),
            text: text_of(&template.render(scope)?),
        }),
    };
    Ok(HttpRequest {
        connection: connection.to_string(),
        method: r.method.clone(),
        path: text_of(&r.path.render_with(scope, Encoding::PathSegment)?),
        query: fields(&r.query, scope)?,
        headers: fields(&r.headers, scope)?.into_iter().collect(),
        body,
        idempotency_key: None,
        timeout_ms: None,
        any_status: true,
    })
}

/// A response as templates and expressions see it; credentials in headers are left out.
pub fn response_value(r: &HttpResponse) -> Value {
    let headers: Map<String, Value> = r
        .headers
        .iter()
        .filter(|(k, _)| !is_sensitive_header(k))
        .map(|(k, v)| (k.to_ascii_lowercase(), Value::String(v.clone())))
        .collect();
    json!({"status": r.status, "headers": headers, "body": r.body})
}

fn excerpt(body: &Value) -> String {
    let text = match body {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let clean = clean.trim();
    if clean.chars().count() > ERROR_EXCERPT_CHARS {
        let cut: String = clean.chars().take(ERROR_EXCERPT_CHARS).collect();
        format!("{cut}…")
    } else {
        clean.to_string()
    }
}

/// What the call did, for the engine: done with the outputs, or failed (retryable or not), or
/// unknown (the request may have reached the vendor but no answer came back).
#[derive(Clone, Debug, PartialEq)]
pub enum CallResult {
    Done(Value),
    Failed {
        message: String,
        retryable: bool,
    },
    /// A transport failure after the request may have been sent (timeout, reset).
    Unknown(String),
}

impl CallResult {
    /// As an engine outcome, given whether repeating the operation is harmless.
    pub fn into_outcome(self, idempotent: bool) -> Outcome {
        match self {
            CallResult::Done(v) => Outcome::Done(v),
            CallResult::Failed { message, retryable } => Outcome::Failed { message, retryable },
            CallResult::Unknown(message) if idempotent => Outcome::Failed {
                message,
                retryable: true,
            },
            CallResult::Unknown(message) => Outcome::Unknown(message),
        }
    }
}

/// Finds out, by the call's key, whether a call whose worker was lost took effect: `Done` with
/// the outputs when it did, a retryable failure when it did not (calling again is then safe: the
/// lost worker's request ended long ago), `Unknown` when the operation has no lookup or the lookup
/// itself failed.
pub async fn recover(
    op: &Operation,
    inputs: &Value,
    key: &str,
    connection: &Connection,
    http: &dyn HttpSender,
    timeout_ms: Option<u64>,
) -> CallResult {
    let lost = format!(
        "the worker was lost during `{}`, which must not be repeated blindly",
        op.name
    );
    let Some(rec) = &op.recover else {
        return CallResult::Unknown(format!("{lost}: check whether it took effect"));
    };
    let inputs = match complete_inputs(op, inputs) {
        Ok(i) => Value::Object(i),
        Err(message) => {
            return CallResult::Failed {
                message,
                retryable: false,
            };
        }
    };
    let mut scope = Scope::new();
    scope.set("inputs", &inputs);
    scope.set("key", &Value::String(key.to_string()));
    scope.set("responses", &json!({}));
    let (_, response, _, ok) = match exchange(
        &op.name,
        &rec.request,
        &mut scope,
        connection,
        http,
        timeout_ms,
    )
    .await
    {
        Ok(x) => x,
        Err(failed) => {
            return CallResult::Unknown(format!(
                "{lost}; its lookup failed: {}",
                failed.message().unwrap_or_default()
            ));
        }
    };
    if !ok {
        return CallResult::Unknown(format!(
            "{lost}; its lookup answered HTTP {}: {}",
            response.status,
            excerpt(&response.body)
        ));
    }
    match rec.found.eval_bool(&scope) {
        Ok(true) => CallResult::Done(outputs_of(&rec.outputs, &scope)),
        Ok(false) => CallResult::Failed {
            message: format!(
                "the worker was lost during `{}`, and a lookup by its key found it was not made: calling again",
                op.name
            ),
            retryable: true,
        },
        Err(e) => CallResult::Unknown(format!("{lost}; its lookup could not be read: {e}")),
    }
}

/// Runs one operation through `connection`. `key` is the idempotency key of this step iteration.
pub async fn call(
    op: &Operation,
    inputs: &Value,
    key: &str,
    connection: &Connection,
    http: &dyn HttpSender,
) -> CallResult {
    call_with_timeout(op, inputs, key, connection, http, None).await
}

/// [`call`] with each request's timeout capped at `timeout_ms` (a step's `timeout`).
pub async fn call_with_timeout(
    op: &Operation,
    inputs: &Value,
    key: &str,
    connection: &Connection,
    http: &dyn HttpSender,
    timeout_ms: Option<u64>,
) -> CallResult {
    let inputs = match complete_inputs(op, inputs) {
        Ok(i) => i,
        Err(message) => {
            return CallResult::Failed {
                message,
                retryable: false,
            };
        }
    };
    let inputs = Value::Object(inputs);
    let mut responses: BTreeMap<String, Value> = BTreeMap::new();
    let mut last = Value::Null;
    for r in &op.requests {
        let mut scope = Scope::new();
        scope.set("inputs", &inputs);
        scope.set("key", &Value::String(key.to_string()));
        scope.set("responses", &json!(responses));
        let (request, response, value, ok) =
            match exchange(&op.name, r, &mut scope, connection, http, timeout_ms).await {
                Ok(x) => x,
                Err(failed) => return failed,
            };
        if !ok {
            let retryable = match &r.retryable {
                Some(e) => e.eval_bool(&scope).unwrap_or(false),
                None => response.status == 429 || response.status >= 500,
            };
            let detail = r
                .error
                .as_ref()
                .and_then(|e| e.eval(&scope).ok())
                .filter(|v| !v.is_null())
                .unwrap_or_else(|| response.body.clone());
            return CallResult::Failed {
                message: format!(
                    "`{}`: {} {} answered HTTP {}: {}",
                    op.name,
                    request.method,
                    request.path,
                    response.status,
                    excerpt(&detail)
                ),
                retryable,
            };
        }
        if let Some(id) = &r.id {
            responses.insert(id.clone(), value.clone());
        }
        last = value;
    }
    let mut scope = Scope::new();
    scope.set("inputs", &inputs);
    scope.set("key", &Value::String(key.to_string()));
    scope.set("responses", &json!(responses));
    scope.set("response", &last);
    CallResult::Done(outputs_of(&op.outputs, &scope))
}

/// The declared outputs. The call happened: an answer missing a field gives null, not a failed
/// step that a retry would repeat.
fn outputs_of(outputs: &[(String, crate::expr::Expr)], scope: &Scope) -> Value {
    Value::Object(
        outputs
            .iter()
            .map(|(name, e)| (name.clone(), e.eval(scope).unwrap_or(Value::Null)))
            .collect(),
    )
}

/// Renders `r` in `scope` and sends it. On an answer, `scope` gains `response`, and the result
/// carries the request, the answer, the answer as expressions see it, and whether the
/// declaration judges it a success. A failure to render or send is reported as the call would
/// report it: a refusal is terminal, a connection never made is retryable, a lost answer is
/// unknown (the vendor may have acted).
async fn exchange(
    op_name: &str,
    r: &RequestTemplate,
    scope: &mut Scope,
    connection: &Connection,
    http: &dyn HttpSender,
    timeout_ms: Option<u64>,
) -> Result<(HttpRequest, HttpResponse, Value, bool), CallResult> {
    let mut request = render(r, scope, &connection.name).map_err(|e| CallResult::Failed {
        message: format!("`{op_name}`: {e}"),
        retryable: false,
    })?;
    request.timeout_ms = timeout_ms;
    let response = match http.send(connection, &request).await {
        Ok(r) => r,
        Err(HttpError::Terminal(message)) => {
            return Err(CallResult::Failed {
                message,
                retryable: false,
            });
        }
        Err(HttpError::NotSent(message)) => {
            return Err(CallResult::Failed {
                message,
                retryable: true,
            });
        }
        Err(HttpError::Retryable(m)) => return Err(CallResult::Unknown(m)),
    };
    let value = response_value(&response);
    scope.set("response", &value);
    let ok = match &r.success {
        Some(e) => e.eval_bool(scope).unwrap_or(false),
        None => (200..300).contains(&response.status),
    };
    Ok((request, response, value, ok))
}

impl CallResult {
    /// What went wrong, if anything.
    pub fn message(&self) -> Option<&str> {
        match self {
            CallResult::Done(_) => None,
            CallResult::Failed { message, .. } | CallResult::Unknown(message) => Some(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::connector::ConnectorCatalog;

    /// Payloads that make other automation tools evaluate or re-shape: template engines,
    /// expression languages, shells, XML and header injection.
    const PAYLOADS: &[&str] = &[
        "{{7*7}}",
        "${7*7}",
        "#{7*7}",
        "${{ 1 + 1 }}",
        "$(id)",
        "`id`",
        "<%= 7*7 %>",
        "</member></tag><tag><member>pwned",
        "\"/><entry ip=\"10.0.0.1",
        "a\r\nX-Injected: 1",
        "../../api/?type=op",
    ];

    fn rendered(op: &str, inputs: Value) -> Vec<HttpRequest> {
        let catalog = ConnectorCatalog::shipped();
        let op = catalog.operation_named(op).unwrap();
        let inputs = Value::Object(complete_inputs(op, &inputs).unwrap());
        let mut scope = Scope::new();
        scope.set("inputs", &inputs);
        scope.set("key", &json!("run:step:0"));
        scope.set("responses", &json!({}));
        op.requests
            .iter()
            .map(|r| render(r, &scope, "c").unwrap())
            .collect()
    }

    #[test]
    fn alert_text_is_data_in_every_format_a_connector_writes() {
        for p in PAYLOADS {
            // XML inside a form field (PAN-OS): escaped, so no element or attribute is added.
            let r = &rendered("panos.block_ip", json!({"ip": p, "tag": p}))[0];
            let Some(Body::Form(form)) = &r.body else {
                panic!("{r:?}")
            };
            let cmd = &form["cmd"];
            assert_eq!(cmd.matches("<member").count(), 1, "{p}: {cmd}");
            assert_eq!(cmd.matches("<entry ").count(), 1, "{p}: {cmd}");
            assert_eq!(cmd.matches("</member>").count(), 1, "{p}: {cmd}");
            assert_eq!(cmd.matches("<tag>").count(), 1, "{p}: {cmd}");
            // JSON (ServiceNow): the value is a string, whole, never evaluated.
            let r = &rendered(
                "servicenow.create_incident",
                json!({"short_description": p}),
            )[0];
            let Some(Body::Json(body)) = &r.body else {
                panic!("{r:?}")
            };
            assert_eq!(body["short_description"], json!(p), "{p}");
            assert!(!body.to_string().contains("49"), "{p}: evaluated");
            // A path segment (Entra): one segment, percent-encoded.
            let r = &rendered("entra.disable_user", json!({"user": p}))[0];
            let segment = r.path.strip_prefix("/v1.0/users/").unwrap();
            assert!(
                !segment.contains('/') && !segment.contains('\r'),
                "{p}: {}",
                r.path
            );
        }
    }
}
