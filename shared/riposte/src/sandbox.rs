//! `riposte serve --demo`: vendor stand-ins inside the local server, so the example playbook runs
//! end to end on a laptop with no accounts and no network. Every declared connection is pointed
//! at `/sandbox/NAME` on this server; each request is printed and kept (GET `/sandbox` lists
//! them: the demo's outbox, where the approval links arrive) and answered as the vendor would.
//!
//! Only for demos: nothing in it is used by the tests that check the vendors' requests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde_json::{Value, json};

use riposte_core::connector::Connections;
use riposte_core::http::{Auth, Connection};

/// The vendor answers the sandbox gives, by connection name.
const RESPONSES: &str = include_str!("../../../events/responses/block-or-ignore.json");

#[derive(Clone, Default)]
pub struct Sandbox {
    seen: Arc<Mutex<Vec<Value>>>,
    responses: Arc<BTreeMap<String, Value>>,
}

/// Every connection of `connections`, pointed at the sandbox under `base` and with no credentials.
pub fn redirect(connections: &Connections, base: &str) -> Connections {
    Connections::from_list(
        connections
            .names()
            .filter_map(|n| connections.get(n))
            .map(|c| Connection {
                base_url: format!("{}/sandbox/{}", base.trim_end_matches('/'), c.name),
                auth: Auth::None,
                ..c.clone()
            })
            .collect(),
    )
}

impl Sandbox {
    pub fn new() -> Sandbox {
        Sandbox {
            seen: Default::default(),
            responses: Arc::new(serde_json::from_str(RESPONSES).unwrap_or_default()),
        }
    }

    pub fn router(self) -> Router {
        Router::new()
            .route("/sandbox", get(list))
            .route("/sandbox/{name}/{*rest}", any(receive))
            .with_state(self)
    }
}

async fn list(State(s): State<Sandbox>) -> Json<Value> {
    Json(Value::Array(
        s.seen.lock().map(|v| v.clone()).unwrap_or_default(),
    ))
}

async fn receive(
    State(s): State<Sandbox>,
    Path((name, rest)): Path<(String, String)>,
    method: Method,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    println!(
        "[sandbox] {name}: {method} /{rest}\n{}",
        serde_json::to_string_pretty(&body).unwrap_or_default()
    );
    if let Ok(mut seen) = s.seen.lock()
        && seen.len() < 10_000
    {
        seen.push(json!({"connection": name, "method": method.as_str(), "path": format!("/{rest}"), "body": body}));
    }
    let answer = s.responses.get(&name).cloned().unwrap_or_else(|| json!({}));
    (StatusCode::OK, Json(answer)).into_response()
}
