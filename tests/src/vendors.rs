//! The vendors the shipped Block/Ignore playbook calls, as stand-ins on 127.0.0.1 that answer as
//! each vendor's public API documents, and the connections file that points at them.

use serde_json::{Value, json};

use crate::Vendor;

/// The sys_id the ServiceNow stand-in gives the incident it creates.
pub const SYS_ID: &str = "9d385017c611228701d22104cc95c371";
pub const SECRETS: &[(&str, &str)] = &[
    ("servicenow-password", "sn-test-password"),
    ("slack-bot-token", "slack-test-token"),
    ("sendgrid-api-key", "sendgrid-test-key"),
    ("panos-api-key", "panos-test-key"),
    ("entra-client-secret", "entra-test-secret"),
];

pub struct Vendors {
    pub servicenow: Vendor,
    pub slack: Vendor,
    pub sendgrid: Vendor,
    pub panos: Vendor,
    pub entra: Vendor,
    pub securityhub: Vendor,
}

pub async fn vendors() -> Vendors {
    Vendors {
        servicenow: Vendor::start("servicenow", |r| match (r.method.as_str(), r.path.as_str()) {
            ("POST", "/api/now/table/incident") => (201, json!({"result": {"sys_id": SYS_ID, "number": "INC0010042", "state": "1"}})),
            ("PATCH", p) if p == format!("/api/now/table/incident/{SYS_ID}") => {
                (200, json!({"result": {"sys_id": SYS_ID, "number": "INC0010042", "state": r.json()["state"]}}))
            }
            _ => (404, json!({"error": {"message": "No Record found", "detail": "Record doesn't exist or ACL restricts the record retrieval"}, "status": "failure"})),
        })
        .await,
        slack: Vendor::start("slack", |_| (200, json!({"ok": true, "channel": "C0SOCALERTS", "ts": "1767225600.000100"}))).await,
        sendgrid: Vendor::start("sendgrid", |_| (202, Value::Null)).await,
        panos: Vendor::start("panos", |_| (200, json!({"@status": "success", "@code": "20", "msg": "command succeeded"}))).await,
        entra: Vendor::start("entra", |r| match r.method.as_str() {
            "POST" => (200, json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": "entra-access-token-1"})),
            _ => (204, Value::Null),
        })
        .await,
        securityhub: Vendor::start("securityhub", |r| {
            let id = r.json()["FindingIdentifiers"][0].clone();
            (200, json!({"ProcessedFindings": [id], "UnprocessedFindings": []}))
        })
        .await,
    }
}

pub fn connections(v: &Vendors) -> String {
    format!(
        r#"connections:
  servicenow:
    base_url: {sn}
    auth: {{ type: basic, username: riposte, password: {{ secret: servicenow-password }} }}
    headers: {{ Accept: application/json }}
  slack:
    base_url: {slack}
    auth: {{ type: bearer, token: {{ secret: slack-bot-token }} }}
  sendgrid:
    base_url: {sg}
    auth: {{ type: bearer, token: {{ secret: sendgrid-api-key }} }}
  panos:
    base_url: {panos}
    auth: {{ type: api_key, header: X-PAN-KEY, key: {{ secret: panos-api-key }} }}
  entra:
    base_url: {entra}
    auth:
      type: oauth2_client_credentials
      token_url: {entra}/00000000-0000-0000-0000-000000000000/oauth2/v2.0/token
      client_id: 11111111-1111-1111-1111-111111111111
      client_secret: {{ secret: entra-client-secret }}
      scope: https://graph.microsoft.com/.default
  securityhub:
    base_url: {sh}
    auth: {{ type: aws_sigv4, service: securityhub, region: us-east-1 }}
"#,
        sn = v.servicenow.url,
        slack = v.slack.url,
        sg = v.sendgrid.url,
        panos = v.panos.url,
        entra = v.entra.url,
        sh = v.securityhub.url
    )
}
