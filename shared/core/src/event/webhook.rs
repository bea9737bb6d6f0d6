//! Alerts posted by other tools (an EDR, a SIEM) to `POST /webhooks/{name}`, signed with the
//! webhook's secret (see [`crate::callback`]). The body is one alert in Riposte's own shape:
//!
//! ```json
//! {"id": "edr-4711", "title": "Ransomware behaviour on HOST-7", "severity": "Critical",
//!  "kind": "alert", "type": "Ransomware", "description": "...",
//!  "entities": {"ips": ["198.51.100.23"], "remote_ips": ["198.51.100.23"], "users": ["alice"],
//!               "hosts": ["HOST-7"], "urls": [], "hashes": []}}
//! ```
//!
//! `id`, `title` and `severity` are required; `source` becomes `webhook.<name>`. Entities are
//! read leniently, as from AWS sources: IPs must parse, hashes must be hex digests.

use serde_json::Value;

use super::{Error, Node, invalid, list_at, push_hash, push_host, push_ip, push_url, push_user};
use crate::model::{Alert, AlertKind, Entities, Severity};

pub(super) fn normalize(name: &str, event: &Value, detail: &Node<'_>) -> Result<Vec<Alert>, Error> {
    let id = detail.req_str("id")?;
    let title = detail.req_str("title")?;
    let severity_label = detail.req_str("severity")?;
    let severity = Severity::from_label(severity_label).ok_or_else(|| {
        invalid(
            detail.at("severity"),
            format!("`{severity_label}` is not Informational, Low, Medium, High or Critical"),
        )
    })?;
    let kind = match detail.opt_str("kind")? {
        None | Some("alert") => AlertKind::Alert,
        Some("recommendation") => AlertKind::Recommendation,
        Some(other) => {
            return Err(invalid(
                detail.at("kind"),
                format!("`{other}` is not alert or recommendation"),
            ));
        }
    };
    let e = detail.value();
    let mut entities = Entities::default();
    let strings = |key: &str| {
        list_at(e, &["entities", key])
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
    };
    for ip in strings("remote_ips") {
        push_ip(&mut entities, Some(ip));
    }
    entities.remote_ips = entities.ips.clone();
    for ip in strings("ips") {
        push_ip(&mut entities, Some(ip));
    }
    for u in strings("users") {
        push_user(&mut entities, Some(u));
    }
    for h in strings("hosts") {
        push_host(&mut entities, Some(h));
    }
    for u in strings("urls") {
        push_url(&mut entities, Some(u));
    }
    for h in strings("hashes") {
        push_hash(&mut entities, Some(h));
    }
    Ok(vec![Alert {
        id: format!("{name}/{id}"),
        source: format!("webhook.{name}"),
        kind,
        r#type: detail.opt_str("type")?.unwrap_or_default().to_string(),
        title: title.to_string(),
        description: detail
            .opt_str("description")?
            .unwrap_or_default()
            .to_string(),
        severity,
        account: None,
        region: None,
        resources: vec![],
        entities,
        first_seen: None,
        last_seen: None,
        created_at: None,
        updated_at: None,
        raw: event.clone(),
    }])
}

/// The EventBridge-shaped envelope a webhook body is ingested as.
pub fn envelope(name: &str, body: Value) -> Value {
    serde_json::json!({
        "id": body.get("id").cloned().unwrap_or(Value::Null),
        "source": format!("webhook.{name}"),
        "detail-type": "Riposte Alert",
        "detail": body,
    })
}
