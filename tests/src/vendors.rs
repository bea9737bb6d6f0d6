//! The vendors the shipped Block/Ignore playbook calls, as stand-ins on 127.0.0.1 that answer as
//! each vendor's public API documents (the answers in `connectors/<id>/tests.yaml`), and the
//! connections file that points at them.

use serde_json::{Value, json};

use crate::{Recorded, Vendor, text_body};

/// The sys_id the ServiceNow stand-in gives the incident it creates.
pub const SYS_ID: &str = "9d385017c611228701d22104cc95c371";
/// The incident's number.
pub const INCIDENT: &str = "INC0010042";
/// The channel id Slack answers for `#soc-alerts`.
pub const SLACK_CHANNEL: &str = "C0SOCALERTS";
/// The ts Slack gives a plain message (the SOC notice).
pub const SLACK_TS_POST: &str = "1767225600.000100";
/// The ts Slack gives a message with blocks (the approval question).
pub const SLACK_TS_ASK: &str = "1767225601.000200";
/// The MessageId SES answers.
pub const SES_MESSAGE_ID: &str = "0100019b7a5e1c2d-7e9f3a41-2b6c-4d8e-9f01-23456789abcd-000000";
/// The access token the Entra token endpoint issues.
pub const ENTRA_TOKEN: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.entra-test-access-token";
/// The tenant in the Entra token URL.
pub const ENTRA_TENANT: &str = "00000000-0000-0000-0000-000000000000";
/// PAN-OS's answer to a successful User-ID register.
pub const PANOS_SUCCESS: &str = r#"<response status="success"><result><uid-response><version>2.0</version><payload><register></register></payload></uid-response></result></response>"#;

pub const SECRETS: &[(&str, &str)] = &[
    ("servicenow-password", "sn-test-password"),
    ("slack-bot-token", "slack-test-bot-token"),
    ("panos-api-key", "panos-test-key"),
    ("entra-client-secret", "entra-test-secret"),
];

pub struct Vendors {
    pub servicenow: Vendor,
    pub slack: Vendor,
    /// Amazon SES API v2 (the `email` connector).
    pub email: Vendor,
    pub panos: Vendor,
    pub entra: Vendor,
    /// AWS Security Hub (the `aws_securityhub` connector).
    pub securityhub: Vendor,
}

/// ServiceNow's Table API: 201 with the new incident, 200 with the updated one (the fields
/// `sysparm_fields` asked for), 404 for anything else.
pub fn servicenow(r: &Recorded) -> (u16, Value) {
    let not_found = || {
        (
            404,
            json!({"error": {"message": "No Record found", "detail": "Record doesn't exist or ACL restricts the record retrieval"}, "status": "failure"}),
        )
    };
    match (r.method.as_str(), r.path.as_str()) {
        ("POST", "/api/now/table/incident") => (
            201,
            json!({"result": {"sys_id": SYS_ID, "number": INCIDENT, "state": "1", "sys_created_on": "2026-01-01 00:00:00"}}),
        ),
        ("PATCH", p) if p == format!("/api/now/table/incident/{SYS_ID}") => {
            let state = r.json()["state"].clone();
            let mut result = json!({"sys_id": SYS_ID, "number": INCIDENT, "state": state, "sys_updated_on": "2026-01-01 01:00:00"});
            match state.as_str() {
                Some("6") => result["resolved_at"] = json!("2026-01-01 01:00:00"),
                Some("7") => result["closed_at"] = json!("2026-01-01 01:00:00"),
                _ => {}
            }
            (200, json!({ "result": result }))
        }
        _ => not_found(),
    }
}

/// ServiceNow as [`servicenow`], plus the Table API lookup the connector makes after a lost
/// worker (`GET /api/now/table/incident?sysparm_query=correlation_id=KEY`): the incident an
/// earlier create with that correlation id made, or none.
pub fn servicenow_with_history(r: &Recorded, earlier: &[Recorded]) -> (u16, Value) {
    if r.method == "GET" && r.path == "/api/now/table/incident" {
        let query: std::collections::BTreeMap<String, String> =
            r.query_pairs().into_iter().collect();
        let key = query
            .get("sysparm_query")
            .and_then(|q| q.strip_prefix("correlation_id="))
            .unwrap_or_default();
        let created = earlier.iter().any(|e| {
            e.method == "POST"
                && e.path == "/api/now/table/incident"
                && e.json()["correlation_id"] == key
        });
        let result = if created {
            json!([{"sys_id": SYS_ID, "number": INCIDENT, "state": "1", "sys_created_on": "2026-01-01 00:00:00"}])
        } else {
            json!([])
        };
        return (200, json!({ "result": result }));
    }
    servicenow(r)
}

/// Slack's Web API: chat.postMessage answers the channel id and the message's ts (a question with
/// blocks gets [`SLACK_TS_ASK`], a plain message [`SLACK_TS_POST`]); chat.update echoes them.
pub fn slack(r: &Recorded) -> (u16, Value) {
    match r.path.as_str() {
        "/api/chat.postMessage" => {
            let body = r.json();
            let ts = if body.get("blocks").is_some() {
                SLACK_TS_ASK
            } else {
                SLACK_TS_POST
            };
            (
                200,
                json!({"ok": true, "channel": SLACK_CHANNEL, "ts": ts, "message": {"type": "message", "text": body["text"], "ts": ts, "bot_id": "B0123456789"}}),
            )
        }
        "/api/chat.update" => {
            let body = r.json();
            (
                200,
                json!({"ok": true, "channel": body["channel"], "ts": body["ts"], "text": body["text"], "message": {"type": "message", "text": body["text"]}}),
            )
        }
        _ => (200, json!({"ok": false, "error": "unknown_method"})),
    }
}

/// SES v2 SendEmail: 200 with the MessageId.
pub fn ses(r: &Recorded) -> (u16, Value) {
    match (r.method.as_str(), r.path.as_str()) {
        ("POST", "/v2/email/outbound-emails") => (200, json!({ "MessageId": SES_MESSAGE_ID })),
        _ => (404, json!({"message": "Not Found"})),
    }
}

/// PAN-OS XML API: a User-ID register answered with the XML success document.
pub fn panos(r: &Recorded) -> (u16, Value) {
    match (r.method.as_str(), r.path.as_str()) {
        ("POST", "/api/") => (
            200,
            text_body("application/xml; charset=UTF-8", PANOS_SUCCESS),
        ),
        _ => (
            200,
            text_body(
                "application/xml; charset=UTF-8",
                r#"<response status="error" code="400"><result><msg>Bad request</msg></result></response>"#,
            ),
        ),
    }
}

/// The Microsoft identity platform token endpoint and Microsoft Graph v1.0: a token, 204 for a
/// user update, `{"value": true}` for revokeSignInSessions.
pub fn entra(r: &Recorded) -> (u16, Value) {
    let (m, p) = (r.method.as_str(), r.path.as_str());
    if m == "POST" && p == format!("/{ENTRA_TENANT}/oauth2/v2.0/token") {
        return (
            200,
            json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": ENTRA_TOKEN}),
        );
    }
    match (m, p.strip_prefix("/v1.0/users/")) {
        ("PATCH", Some(user)) if !user.contains('/') => (204, Value::Null),
        ("POST", Some(rest)) if rest.ends_with("/revokeSignInSessions") => (
            200,
            json!({"@odata.context": "https://graph.microsoft.com/v1.0/$metadata#Edm.Boolean", "value": true}),
        ),
        _ => (
            404,
            json!({"error": {"code": "Request_ResourceNotFound", "message": "Resource not found."}}),
        ),
    }
}

/// Security Hub BatchUpdateFindings: every finding processed.
pub fn securityhub(r: &Recorded) -> (u16, Value) {
    match (r.method.as_str(), r.path.as_str()) {
        ("PATCH", "/findings/batchupdate") => {
            let ids = r.json()["FindingIdentifiers"].clone();
            (
                200,
                json!({"ProcessedFindings": ids, "UnprocessedFindings": []}),
            )
        }
        _ => (
            404,
            json!({"Code": "ResourceNotFoundException", "Message": "Not Found"}),
        ),
    }
}

pub async fn vendors() -> Vendors {
    Vendors {
        servicenow: Vendor::start_with_history("servicenow", servicenow_with_history).await,
        slack: Vendor::start("slack", slack).await,
        email: Vendor::start("email", ses).await,
        panos: Vendor::start("panos", panos).await,
        entra: Vendor::start("entra", entra).await,
        securityhub: Vendor::start("aws_securityhub", securityhub).await,
    }
}

/// The connections file pointing at the stand-ins.
pub fn connections(v: &Vendors) -> String {
    connections_to([
        &v.servicenow.url,
        &v.slack.url,
        &v.email.url,
        &v.panos.url,
        &v.entra.url,
        &v.securityhub.url,
    ])
}

/// The same connections, every one pointing at a closed port (for tests that call no vendor).
pub fn closed_connections() -> String {
    connections_to(["http://127.0.0.1:9"; 6])
}

/// The connections the shipped playbooks use (named like their connectors, with the auth types
/// the connectors take), at the given base URLs: servicenow, slack, email, panos, entra,
/// aws_securityhub.
pub fn connections_to([sn, slack, email, panos, entra, sh]: [&str; 6]) -> String {
    format!(
        r#"connections:
  servicenow:
    base_url: {sn}
    auth: {{ type: basic, username: riposte, password: {{ secret: servicenow-password }} }}
  slack:
    base_url: {slack}
    auth: {{ type: bearer, token: {{ secret: slack-bot-token }} }}
  email:
    base_url: {email}
    auth: {{ type: aws_sigv4, service: ses, region: us-east-1 }}
  panos:
    base_url: {panos}
    auth: {{ type: api_key, header: X-PAN-KEY, key: {{ secret: panos-api-key }} }}
  entra:
    base_url: {entra}
    auth:
      type: oauth2_client_credentials
      token_url: {entra}/{ENTRA_TENANT}/oauth2/v2.0/token
      client_id: 11111111-1111-1111-1111-111111111111
      client_secret: {{ secret: entra-client-secret }}
      scope: https://graph.microsoft.com/.default
  aws_securityhub:
    base_url: {sh}
    auth: {{ type: aws_sigv4, service: securityhub, region: us-east-1 }}
"#
    )
}
