//! Connector operations: the built-in ones (`http.request`, `core.noop`) and the declared
//! catalog (`connectors/<id>/connector.yaml`, shipped in the binary or added as files), and how a
//! step's inputs become requests.
//!
//! Guarantee: the connection (and so the scheme, host and credentials) of a call is written
//! literally in the playbook; the path's interpolated parts are percent-encoded as path segments;
//! bodies are serialized from the value tree. An alert field can fill a value, never a shape.

pub mod call;
pub mod declaration;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

pub use declaration::{Connector, Operation, host_matches};

use crate::expr::{Encoding, EvalError, Scope, Template, text_of};
use crate::http::{Body, HttpRequest};
use crate::playbook::{Catalog, OperationSchema, Problem, Problems};

/// The operations every Riposte build knows.
#[derive(Clone, Copy, Debug, Default)]
pub struct Builtins;

/// `http.request`: one call through a declared connection.
pub const HTTP_REQUEST: &str = "http.request";
/// `core.noop`: does nothing and returns its inputs (handy for tests and benchmarks).
pub const NOOP: &str = "core.noop";

fn strings(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

impl Catalog for Builtins {
    fn operation(&self, name: &str) -> Result<OperationSchema, String> {
        match name {
            HTTP_REQUEST => Ok(OperationSchema {
                required: strings(&["connection", "method", "path"]),
                optional: strings(&[
                    "query",
                    "headers",
                    "json",
                    "form",
                    "text",
                    "content_type",
                    "timeout",
                ]),
                literal: strings(&["connection"]),
                // Sent with an `Idempotency-Key` header; the remote decides what a repeat does.
                idempotent: true,
            }),
            NOOP => Ok(OperationSchema {
                required: vec![],
                optional: strings(&["value"]),
                literal: vec![],
                idempotent: true,
            }),
            other => Err(format!(
                "unknown operation `{other}` (known: {HTTP_REQUEST}, {NOOP})"
            )),
        }
    }
}

mod shipped {
    // `SHIPPED: &[(&str, &str)]`: (file name, contents) of every `connectors/*/connector.yaml`,
    // listed by build.rs.
    include!(concat!(env!("OUT_DIR"), "/shipped_connectors.rs"));
}

/// Every operation a deployment can call: the built-ins, the shipped connectors and the user's.
#[derive(Clone, Debug, Default)]
pub struct ConnectorCatalog {
    connectors: BTreeMap<String, Arc<Connector>>,
}

impl ConnectorCatalog {
    /// The connectors built into this binary.
    pub fn shipped() -> ConnectorCatalog {
        let mut c = ConnectorCatalog::default();
        for (file, source) in shipped::SHIPPED {
            // Every shipped declaration parses: `tests::every_shipped_connector_loads` checks it.
            if let Ok(conn) = Connector::parse(source, Some(file), true) {
                c.connectors.insert(conn.id.clone(), Arc::new(conn));
            }
        }
        c
    }

    /// The shipped connectors' sources, by file name.
    pub fn shipped_sources() -> &'static [(&'static str, &'static str)] {
        shipped::SHIPPED
    }

    /// Adds a user's connector; its id may not be taken.
    pub fn add(&mut self, source: &str, file: Option<&str>) -> Result<(), Problems> {
        let c = Connector::parse(source, file, false)?;
        if let Some(old) = self.connectors.get(&c.id) {
            return Err(Problems::one(
                file,
                "connector",
                format!(
                    "connector `{}` is already {}",
                    c.id,
                    if old.shipped {
                        "shipped with Riposte; choose another id"
                    } else {
                        "declared by another file"
                    }
                ),
            ));
        }
        self.connectors.insert(c.id.clone(), Arc::new(c));
        Ok(())
    }

    pub fn connectors(&self) -> impl Iterator<Item = &Connector> {
        self.connectors.values().map(|c| c.as_ref())
    }

    pub fn connector(&self, id: &str) -> Option<&Connector> {
        self.connectors.get(id).map(|c| c.as_ref())
    }

    /// A declared operation by its full name (`servicenow.create_incident`).
    pub fn operation_named(&self, name: &str) -> Option<&Operation> {
        let (conn, op) = name.split_once('.')?;
        self.connectors.get(conn)?.operations.get(op)
    }

    /// Checks a playbook's calls against the declared connections: each exists, and fits the
    /// connector it is used with (a host the connector declares, an auth type it takes).
    pub fn check_connections(
        &self,
        pb: &crate::playbook::Playbook,
        connections: &Connections,
    ) -> Vec<Problem> {
        let mut out = Vec::new();
        for used in connections_used(pb) {
            let problem = |message: String| Problem {
                file: None,
                step: Some(used.step.clone()),
                field: "with.connection".into(),
                message,
            };
            let Some(conn) = connections.get(&used.connection) else {
                out.push(problem(format!(
                    "unknown connection `{}` (declared: {})",
                    used.connection,
                    connections.names().collect::<Vec<_>>().join(", ")
                )));
                continue;
            };
            if let Some(connector) = used.connector.as_deref().and_then(|id| self.connector(id)) {
                out.extend(
                    connector
                        .misfits(conn, connections.allow_any_host)
                        .into_iter()
                        .map(problem),
                );
            }
        }
        out
    }
}

impl Connector {
    /// Why `conn` cannot serve this connector: an auth type it does not take, or (unless any host
    /// is allowed) a host it does not declare. Checked when a playbook is stored and again at
    /// call time, since the connections file may have changed in between.
    pub fn misfits(&self, conn: &crate::http::Connection, allow_any_host: bool) -> Vec<String> {
        let mut out = Vec::new();
        if !self.auth.iter().any(|a| a == conn.auth.kind()) {
            out.push(format!(
                "connection `{}` uses auth `{}`; connector `{}` takes {}",
                conn.name,
                conn.auth.kind(),
                self.id,
                self.auth.join(", ")
            ));
        }
        let host = url::Url::parse(&conn.base_url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        if !allow_any_host && !self.allows_host(&host) {
            out.push(format!(
                "connection `{}` points at `{host}`; connector `{}` may call only {}",
                conn.name,
                self.id,
                self.hosts.join(", ")
            ));
        }
        out
    }
}

impl Catalog for ConnectorCatalog {
    fn operation(&self, name: &str) -> Result<OperationSchema, String> {
        if name == HTTP_REQUEST || name == NOOP {
            return Builtins.operation(name);
        }
        match self.operation_named(name) {
            Some(op) => Ok(OperationSchema {
                required: op
                    .inputs
                    .iter()
                    .filter(|(_, i)| i.required)
                    .map(|(k, _)| k.clone())
                    .collect(),
                optional: op
                    .inputs
                    .iter()
                    .filter(|(_, i)| !i.required)
                    .map(|(k, _)| k.clone())
                    .chain(["connection".to_string()])
                    .collect(),
                literal: strings(&["connection"]),
                idempotent: op.idempotent,
            }),
            None => {
                let mut known: Vec<String> = vec![HTTP_REQUEST.into(), NOOP.into()];
                match name.split_once('.').and_then(|(c, _)| self.connector(c)) {
                    Some(c) => {
                        known = c.operations.values().map(|o| o.name.clone()).collect();
                    }
                    None => known.extend(self.connectors.keys().map(|c| format!("{c}.*"))),
                }
                Err(format!(
                    "unknown operation `{name}` (known: {})",
                    known.join(", ")
                ))
            }
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
        any_status: false,
    })
}

/// The declared connections of a deployment, by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Connections {
    map: BTreeMap<String, crate::http::Connection>,
    /// Let a connection point at a host its connector does not declare: only for tests and the
    /// offline sandbox, whose stand-ins listen on 127.0.0.1.
    pub allow_any_host: bool,
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
            if c.timeout_ms > crate::http::MAX_HTTP_TIMEOUT_MS {
                problems.push(crate::playbook::Problem {
                    file: file.map(str::to_string),
                    step: None,
                    field: format!("connections.{name}.timeout_ms"),
                    message: format!(
                        "{} ms is longer than the {} ms any call may take",
                        c.timeout_ms,
                        crate::http::MAX_HTTP_TIMEOUT_MS
                    ),
                });
            }
            map.insert(name, c);
        }
        if problems.is_empty() {
            Ok(Connections {
                map,
                allow_any_host: false,
            })
        } else {
            Err(crate::playbook::Problems(problems))
        }
    }

    pub fn from_list(list: Vec<crate::http::Connection>) -> Connections {
        Connections {
            map: list.into_iter().map(|c| (c.name.clone(), c)).collect(),
            allow_any_host: false,
        }
    }

    pub fn get(&self, name: &str) -> Option<&crate::http::Connection> {
        self.map.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }
}

/// One call's connection, as a playbook names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionUse {
    pub step: String,
    pub connection: String,
    /// The declared connector of the operation (`None` for `http.request`).
    pub connector: Option<String>,
}

/// The connection a call goes through: `with.connection` written literally, or for a declared
/// operation the connector's id.
pub fn connection_of(operation: &str, inputs: &Template) -> Option<String> {
    let named = match inputs {
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
    match operation {
        NOOP => None,
        HTTP_REQUEST => named,
        op => named.or_else(|| op.split_once('.').map(|(c, _)| c.to_string())),
    }
}

/// The connections a playbook's actions and approval notifications name.
pub fn connections_used(pb: &crate::playbook::Playbook) -> Vec<ConnectionUse> {
    use crate::playbook::StepKind;
    let mut out = Vec::new();
    let mut visit = |step: &str, op: &str, t: &Template| {
        if let Some(connection) = connection_of(op, t) {
            out.push(ConnectionUse {
                step: step.to_string(),
                connection,
                connector: (op != HTTP_REQUEST)
                    .then(|| op.split_once('.').map(|(c, _)| c.to_string()))
                    .flatten(),
            });
        }
    };
    for s in &pb.steps {
        match &s.kind {
            StepKind::Action {
                operation, inputs, ..
            } => visit(&s.id, operation, inputs),
            StepKind::Approval(a) => a.notify.iter().for_each(|n| {
                visit(&s.id, &n.operation, &n.inputs);
                if let Some((op, t)) = &n.on_decided {
                    visit(&s.id, op, t);
                }
            }),
            _ => {}
        }
    }
    out
}

/// The Markdown reference of a catalog's connectors (the README's, checked by a test).
pub fn reference(catalog: &ConnectorCatalog) -> String {
    let mut out = String::new();
    out.push_str(
        "Built-in: `http.request` (any declared connection: `method`, `path`, `query`, \
         `headers`, `json` | `form` | `text`) and `core.noop`.\n",
    );
    for c in catalog.connectors() {
        out.push_str(&format!("\n#### {} (`{}`)\n\n", c.name, c.id));
        let description = c
            .description
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if !description.is_empty() {
            out.push_str(&format!("{description}\n\n"));
        }
        out.push_str(&format!(
            "Hosts: {}. Auth: {}.",
            c.hosts
                .iter()
                .map(|h| format!("`{h}`"))
                .collect::<Vec<_>>()
                .join(", "),
            c.auth
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        if !c.docs.is_empty() {
            out.push_str(&format!(" API: <{}>", c.docs));
        }
        out.push_str("\n\n| operation | repeat-safe | inputs (**required**) | outputs |\n");
        out.push_str("|---|---|---|---|\n");
        for (name, op) in &c.operations {
            let inputs: Vec<String> = op
                .inputs
                .iter()
                .map(|(k, i)| {
                    if i.required {
                        format!("**{k}**")
                    } else {
                        k.clone()
                    }
                })
                .collect();
            let outputs: Vec<&str> = op.outputs.iter().map(|(k, _)| k.as_str()).collect();
            out.push_str(&format!(
                "| `{}.{name}` | {} | {} | {} |\n",
                c.id,
                if op.idempotent { "yes" } else { "no" },
                inputs.join(", "),
                outputs.join(", ")
            ));
        }
    }
    out
}

/// The README markers between which [`reference()`] goes.
pub const REFERENCE_BEGIN: &str = "<!-- connector reference: generated by `riposte connectors --write README.md`; do not edit -->";
pub const REFERENCE_END: &str = "<!-- end of connector reference -->";

/// `readme` with the text between the reference markers replaced by `reference`, or `None` when
/// the markers are missing.
pub fn with_reference(readme: &str, reference: &str) -> Option<String> {
    let start = readme.find(REFERENCE_BEGIN)? + REFERENCE_BEGIN.len();
    let end = readme[start..].find(REFERENCE_END)? + start;
    Some(format!(
        "{}\n{}\n{}",
        &readme[..start],
        reference.trim_end(),
        &readme[end..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_connector_loads() {
        for (file, source) in ConnectorCatalog::shipped_sources() {
            if let Err(p) = Connector::parse(source, Some(file), true) {
                panic!("{p}");
            }
        }
        assert_eq!(
            ConnectorCatalog::shipped().connectors().count(),
            ConnectorCatalog::shipped_sources().len()
        );
    }

    fn playbook(catalog: &ConnectorCatalog, connection: Option<&str>) -> crate::playbook::Playbook {
        let with = connection
            .map(|c| format!("connection: {c}, "))
            .unwrap_or_default();
        let src = format!(
            "id: p\nname: p\nsteps:\n  - id: s\n    action: slack.post_message\n    with: {{ {with}channel: C1, text: hi }}\n"
        );
        crate::playbook::load(&src, None, catalog).unwrap_or_else(|p| panic!("{p}"))
    }

    #[test]
    fn a_connection_must_point_at_a_host_its_connector_declares_with_an_auth_it_takes() {
        let catalog = ConnectorCatalog::shipped();
        let conns = Connections::parse(
            r#"connections:
  slack: { base_url: "https://slack.com", auth: { type: bearer, token: { secret: t } } }
  exfil: { base_url: "https://collector.evil.example", auth: { type: bearer, token: { secret: t } } }
  keyless: { base_url: "https://slack.com" }
"#,
            None,
        )
        .unwrap();
        assert!(
            catalog
                .check_connections(&playbook(&catalog, None), &conns)
                .is_empty()
        );
        let p = catalog.check_connections(&playbook(&catalog, Some("exfil")), &conns);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].message.contains(
                "points at `collector.evil.example`; connector `slack` may call only slack.com"
            ),
            "{p:?}"
        );
        let p = catalog.check_connections(&playbook(&catalog, Some("keyless")), &conns);
        assert!(p[0].message.contains("uses auth `none`"), "{p:?}");
        let p = catalog.check_connections(&playbook(&catalog, Some("nope")), &conns);
        assert!(p[0].message.contains("unknown connection `nope`"), "{p:?}");
        // Tests and the sandbox point connections at 127.0.0.1 on purpose.
        let mut relaxed = conns.clone();
        relaxed.allow_any_host = true;
        assert!(
            catalog
                .check_connections(&playbook(&catalog, Some("exfil")), &relaxed)
                .is_empty()
        );
    }

    #[test]
    fn a_user_connector_may_not_take_a_shipped_id() {
        let mut catalog = ConnectorCatalog::shipped();
        let src = "connector: slack\nname: Mine\nhosts: ['*']\nauth: [none]\noperations:\n  x:\n    idempotent: true\n    request: { method: GET, path: / }\n";
        let e = catalog.add(src, Some("mine.yaml")).unwrap_err().to_string();
        assert!(e.contains("already shipped with Riposte"), "{e}");
    }
}
