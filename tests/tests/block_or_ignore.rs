//! The shipped Block/Ignore playbook, end to end on one machine: a GuardDuty event arrives, the
//! rule starts the playbook, the vendors on 127.0.0.1 receive exactly the requests their public
//! APIs document, a human answers by link (or nobody does), and the right branch runs.

use serde_json::json;

use riposte_core::run::{RunStatus, StepStatus};
use riposte_tests::vendors::{
    ENTRA_TENANT, ENTRA_TOKEN, INCIDENT, SECRETS, SLACK_CHANNEL, SLACK_TS_ASK, SLACK_TS_POST,
    SYS_ID, Vendors, connections, vendors,
};
use riposte_tests::{CONTRIBUTOR_KEY, OPERATOR_KEY, Recorded, Riposte, event};

const TITLE: &str = "Outbound traffic to a custom threat list IP 198.51.100.23 from EC2 instance i-0a1b2c3d4e5f67890.";

fn basic(user: &str, pass: &str) -> String {
    use base64_lite::encode;
    format!("Basic {}", encode(format!("{user}:{pass}").as_bytes()))
}

/// Minimal standard base64, so the test states the expected header independently of the sender.
mod base64_lite {
    pub fn encode(input: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

/// Sends the canonical GuardDuty event and waits for the run to wait on the admins.
async fn start(r: &Riposte) -> String {
    let (status, out) = r
        .call(
            "POST",
            "/events",
            Some(OPERATOR_KEY),
            Some(event("guardduty-malicious-ip-caller.json")),
        )
        .await;
    assert_eq!(status, 202, "{out}");
    let alert = &out["alerts"][0];
    let lines = alert["evaluation"]["lines"].as_array().unwrap();
    let verdict = |id: &str| {
        lines
            .iter()
            .find(|l| l["rule_id"] == id)
            .map(|l| l["verdict"]["outcome"].clone())
    };
    assert_eq!(verdict("guardduty-high-remote-ip"), Some(json!("matched")));
    assert_eq!(
        verdict("recommendation-ticket"),
        Some(json!("other_trigger")),
        "each other rule says why it did not match"
    );
    let runs = alert["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    let id = runs[0].as_str().unwrap().to_string();
    r.wait_run(&id, "waiting for the admins", |run| {
        run.status == RunStatus::Waiting && run.step("tell_soc").unwrap().status.is_terminal()
    })
    .await;
    id
}

/// The approval links, as the email carried them; checks the ServiceNow, Slack and SES requests
/// exactly as each vendor documents them.
fn check_notifications(v: &Vendors, r: &Riposte, run_id: &str) -> (String, String) {
    let sn = v.servicenow.requests();
    assert_eq!(sn.len(), 1);
    let open = &sn[0];
    assert_eq!(
        (open.method.as_str(), open.path.as_str()),
        ("POST", "/api/now/table/incident")
    );
    assert_eq!(
        open.query_pairs(),
        vec![(
            "sysparm_fields".into(),
            "sys_id,number,state,sys_created_on".into()
        )]
    );
    assert_eq!(
        open.header("authorization"),
        Some(basic("riposte", "sn-test-password").as_str())
    );
    assert_eq!(open.header("accept"), Some("application/json"));
    assert_eq!(open.header("content-type"), Some("application/json"));
    assert_eq!(
        open.header("idempotency-key"),
        None,
        "ServiceNow takes the key as correlation_id"
    );
    let ev = event("guardduty-malicious-ip-caller.json");
    assert_eq!(
        open.json(),
        json!({
            "short_description": format!("Riposte: {TITLE}"),
            "description": ev["detail"]["description"],
            "urgency": "2",
            "impact": "2",
            "category": "security",
            "correlation_id": format!("{run_id}:open_ticket:0"),
        })
    );

    let slack = v.slack.requests();
    assert_eq!(slack.len(), 2, "one post to tell the SOC, one to ask");
    for s in &slack {
        assert_eq!(
            (s.method.as_str(), s.path.as_str()),
            ("POST", "/api/chat.postMessage")
        );
        assert_eq!(
            s.header("authorization"),
            Some("Bearer slack-test-bot-token")
        );
        assert_eq!(
            s.header("content-type"),
            Some("application/json; charset=utf-8")
        );
    }
    let tell = slack
        .iter()
        .find(|s| s.json().get("blocks").is_none())
        .unwrap();
    assert_eq!(
        tell.json(),
        json!({
            "channel": "#soc-alerts",
            "text": format!("High GuardDuty finding: {TITLE}. Incident {INCIDENT} opened; admins asked to block or ignore."),
            "unfurl_links": false,
            "unfurl_media": false,
        })
    );

    let mail = v.email.requests();
    assert_eq!(mail.len(), 1);
    assert_eq!(
        (mail[0].method.as_str(), mail[0].path.as_str()),
        ("POST", "/v2/email/outbound-emails")
    );
    let auth = mail[0].header("authorization").unwrap();
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
            && auth.contains("/us-east-1/ses/aws4_request, SignedHeaders=")
            && auth.contains(", Signature="),
        "{auth}"
    );
    assert!(
        mail[0].header("x-amz-date").is_some(),
        "{:?}",
        mail[0].headers
    );
    assert_eq!(mail[0].header("content-type"), Some("application/json"));
    let body = mail[0].json();
    let text = body["Content"]["Simple"]["Body"]["Text"]["Data"]
        .as_str()
        .unwrap()
        .to_string();
    let link = |label: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{label}: ")))
            .unwrap_or_else(|| panic!("no {label} link in {text}"))
            .to_string()
    };
    let (block, ignore) = (link("Block"), link("Ignore"));
    assert!(
        block.starts_with(&format!("{}/approvals/", r.url))
            && ignore.starts_with(&format!("{}/approvals/", r.url))
    );
    assert_ne!(block, ignore);
    assert_eq!(
        body,
        json!({
            "FromEmailAddress": "riposte@example.com",
            "Destination": {"ToAddresses": ["netadmin@example.com", "secadmin@example.com"]},
            "Content": {"Simple": {
                "Subject": {"Data": format!("Block or ignore? {TITLE}"), "Charset": "UTF-8"},
                "Body": {"Text": {"Data": format!(
                    "{TITLE}\n\nRemote IPs: 198.51.100.23\nIncident: {INCIDENT}\n\nBlock: {block}\nIgnore: {ignore}\n\nWith no answer in 4 hours the alert is ignored."
                ), "Charset": "UTF-8"}}
            }}
        })
    );

    // The Slack question: one button per choice, each opening its link and carrying its token.
    let ask = slack
        .iter()
        .find(|s| s.json().get("blocks").is_some())
        .unwrap()
        .json();
    let token = |link: &str| link.rsplit('/').next().unwrap().to_string();
    let question = format!("Block or ignore? {TITLE} (remote IPs 198.51.100.23)");
    assert_eq!(
        ask,
        json!({
            "channel": "#soc-alerts",
            "text": question,
            "blocks": [
                {"type": "section", "text": {"type": "plain_text", "text": question}},
                {"type": "actions", "block_id": "riposte_approval", "elements": [
                    {"type": "button", "text": {"type": "plain_text", "text": "Block"}, "url": block, "value": token(&block), "action_id": "riposte_approval_block"},
                    {"type": "button", "text": {"type": "plain_text", "text": "Ignore"}, "url": ignore, "value": token(&ignore), "action_id": "riposte_approval_ignore"},
                ]},
            ],
            "unfurl_links": false,
            "unfurl_media": false,
        })
    );
    (block, ignore)
}

/// After the decision, the Slack question (the ask's channel and ts) is updated in place to say
/// who decided and when: the one chat.update the run sends.
async fn check_slack_update(v: &Vendors, r: &Riposte, run_id: &str, said: &str) {
    for _ in 0..500 {
        if v.slack.requests().len() >= 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let slack = only(v.slack.requests(), 3, "Slack post + ask + update");
    let update = &slack[2];
    assert_eq!(
        (update.method.as_str(), update.path.as_str()),
        ("POST", "/api/chat.update")
    );
    assert_eq!(
        update.header("authorization"),
        Some("Bearer slack-test-bot-token")
    );
    assert_eq!(
        update.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    let run = r.wait_run(run_id, "decided", |_| true).await;
    let decision = run.step("ask_admins").unwrap().iterations[0]
        .approval
        .as_ref()
        .and_then(|a| a.decision.clone())
        .expect("the approval is decided");
    let at = riposte_core::engine::rfc3339(decision.at);
    assert!(at.starts_with("20") && at.ends_with('Z'), "{at}");
    assert_eq!(
        update.json(),
        json!({
            "channel": SLACK_CHANNEL,
            "ts": SLACK_TS_ASK,
            "text": format!("{said} at {at}. {TITLE}"),
        }),
        "the question the ask posted, not the SOC notice ({SLACK_TS_POST})"
    );
}

async fn post_link(r: &Riposte, link: &str, approver: Option<&str>) -> (u16, String) {
    let mut req = r.http.post(link);
    if let Some(a) = approver {
        req = req.form(&[("approver", a)]);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn only(reqs: Vec<Recorded>, n: usize, what: &str) -> Vec<Recorded> {
    assert_eq!(reqs.len(), n, "{what}: {reqs:#?}");
    reqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_blocks_the_remote_ip_disables_the_user_and_resolves_the_ticket() {
    let v = vendors().await;
    let r = Riposte::start(&connections(&v), SECRETS).await;
    let run_id = start(&r).await;
    let (block, ignore) = check_notifications(&v, &r, &run_id);

    // Opening the link (a mail scanner would) shows a confirm page and decides nothing.
    let page = r.http.get(&block).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains("Confirm: block") && html.contains("<form method=\"post\">"),
        "{html}"
    );
    assert!(html.contains("Block 198.51.100.23 on the firewall and disable alice?"));
    let run = r.wait_run(&run_id, "still waiting", |_| true).await;
    assert_eq!(
        run.step("ask_admins").unwrap().status,
        StepStatus::Waiting,
        "GET never decides"
    );

    // A forged link, and a name who is not an approver, are refused.
    let mut forged = block.clone();
    forged.pop();
    forged.push(if block.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(post_link(&r, &forged, None).await.0, 403);
    assert_eq!(
        post_link(&r, &block, Some("mallory@example.com")).await.0,
        403
    );

    let (status, html) = post_link(&r, &block, Some("netadmin@example.com")).await;
    assert_eq!(status, 200, "{html}");
    assert!(html.contains("Recorded: block"));
    let (status, html) = post_link(&r, &ignore, None).await;
    assert_eq!(status, 409, "a second answer is refused: {html}");
    assert!(html.contains("already answered"));
    assert_eq!(
        post_link(&r, &block, None).await.0,
        409,
        "a link is single-use"
    );

    let run = r.succeeded(&run_id).await;

    // PAN-OS: the remote IP registered to the block tag through the User-ID API, no commit.
    let fw = only(v.panos.requests(), 1, "PAN-OS");
    assert_eq!(
        (
            fw[0].method.as_str(),
            fw[0].path.as_str(),
            fw[0].query.as_deref()
        ),
        ("POST", "/api/", None)
    );
    assert_eq!(fw[0].header("x-pan-key"), Some("panos-test-key"));
    assert_eq!(
        fw[0].header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        fw[0].form(),
        [
            ("type".to_string(), "user-id".to_string()),
            (
                "cmd".to_string(),
                r#"<uid-message><version>1.0</version><type>update</type><payload><register><entry ip="198.51.100.23"><tag><member timeout="0">riposte-blocked</member></tag></entry></register></payload></uid-message>"#.to_string()
            ),
        ]
        .into_iter()
        .collect()
    );
    assert_eq!(
        run.step("block_ip").unwrap().iterations[0].output,
        Some(
            json!({"ip": "198.51.100.23", "tag": "riposte-blocked", "timeout_seconds": 0, "already_registered": false})
        ),
        "the XML answer was judged a success"
    );

    // Entra ID: one token (cached), the user disabled, then their sessions revoked.
    let entra = only(v.entra.requests(), 3, "Entra token + PATCH + revoke");
    assert_eq!(
        (entra[0].method.as_str(), entra[0].path.as_str()),
        (
            "POST",
            format!("/{ENTRA_TENANT}/oauth2/v2.0/token").as_str()
        )
    );
    assert_eq!(
        entra[0].header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        entra[0].form(),
        [
            ("grant_type", "client_credentials"),
            ("client_id", "11111111-1111-1111-1111-111111111111"),
            ("client_secret", "entra-test-secret"),
            ("scope", "https://graph.microsoft.com/.default"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    );
    assert_eq!(
        (entra[1].method.as_str(), entra[1].path.as_str()),
        ("PATCH", "/v1.0/users/alice%40example.com")
    );
    assert_eq!(
        entra[1].header("authorization"),
        Some(format!("Bearer {ENTRA_TOKEN}").as_str())
    );
    assert_eq!(entra[1].header("accept"), Some("application/json"));
    assert_eq!(entra[1].header("content-type"), Some("application/json"));
    assert_eq!(entra[1].json(), json!({"accountEnabled": false}));
    assert_eq!(
        (entra[2].method.as_str(), entra[2].path.as_str()),
        (
            "POST",
            "/v1.0/users/alice%40example.com/revokeSignInSessions"
        )
    );
    assert_eq!(
        entra[2].header("authorization"),
        Some(format!("Bearer {ENTRA_TOKEN}").as_str())
    );
    assert_eq!(entra[2].header("accept"), Some("application/json"));
    assert_eq!(entra[2].body, "", "revokeSignInSessions takes no body");
    assert_eq!(
        run.step("revoke_sessions").unwrap().iterations[0].output,
        Some(json!({"user": "alice@example.com", "revoked": true}))
    );

    let sn = only(v.servicenow.requests(), 2, "ServiceNow open + resolve");
    assert_eq!(
        (sn[1].method.as_str(), sn[1].path.as_str()),
        (
            "PATCH",
            format!("/api/now/table/incident/{SYS_ID}").as_str()
        )
    );
    assert_eq!(
        sn[1].query_pairs(),
        vec![(
            "sysparm_fields".into(),
            "sys_id,number,state,resolved_at,sys_updated_on".into()
        )]
    );
    assert_eq!(
        sn[1].header("authorization"),
        Some(basic("riposte", "sn-test-password").as_str())
    );
    assert_eq!(
        sn[1].json(),
        json!({"state": "6", "close_code": "Solved (Permanently)", "close_notes": "Blocked 198.51.100.23 and disabled alice; approved by netadmin@example.com."})
    );
    check_slack_update(&v, &r, &run_id, "block by netadmin@example.com").await;
    only(
        v.securityhub.requests(),
        0,
        "Security Hub is not touched on Block",
    );
    assert_eq!(
        run.step("suppress_finding").unwrap().status,
        StepStatus::Skipped
    );
    assert_eq!(
        run.step("close_ticket").unwrap().status,
        StepStatus::Skipped
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_suppresses_the_finding_and_closes_the_ticket() {
    let v = vendors().await;
    let r = Riposte::start(&connections(&v), SECRETS).await;
    let run_id = start(&r).await;
    let (block, ignore) = check_notifications(&v, &r, &run_id);
    let (status, html) = post_link(&r, &ignore, Some("secadmin@example.com")).await;
    assert_eq!(status, 200, "{html}");
    assert_eq!(post_link(&r, &block, None).await.0, 409);
    r.succeeded(&run_id).await;

    let sh = only(v.securityhub.requests(), 1, "Security Hub");
    assert_eq!(
        (sh[0].method.as_str(), sh[0].path.as_str()),
        ("PATCH", "/findings/batchupdate")
    );
    let auth = sh[0].header("authorization").unwrap();
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
            && auth.contains("/us-east-1/securityhub/aws4_request, SignedHeaders=")
            && auth.contains(", Signature="),
        "{:?}",
        sh[0].headers
    );
    assert_eq!(sh[0].header("content-type"), Some("application/json"));
    let arn = event("guardduty-malicious-ip-caller.json")["detail"]["arn"].clone();
    assert_eq!(
        sh[0].json(),
        json!({
            "FindingIdentifiers": [{"Id": arn, "ProductArn": "arn:aws:securityhub:us-east-1::product/aws/guardduty"}],
            "Workflow": {"Status": "SUPPRESSED"},
            "Note": {"Text": format!("Ignored by secadmin@example.com (Riposte run {run_id})."), "UpdatedBy": "riposte"}
        })
    );
    let sn = only(v.servicenow.requests(), 2, "ServiceNow open + close");
    assert_eq!(
        (sn[1].method.as_str(), sn[1].path.as_str()),
        (
            "PATCH",
            format!("/api/now/table/incident/{SYS_ID}").as_str()
        )
    );
    assert_eq!(
        sn[1].query_pairs(),
        vec![(
            "sysparm_fields".into(),
            "sys_id,number,state,closed_at,sys_updated_on".into()
        )]
    );
    assert_eq!(
        sn[1].json(),
        json!({"state": "7", "close_code": "Closed/Resolved by Caller", "close_notes": "Ignored by secadmin@example.com."})
    );
    check_slack_update(&v, &r, &run_id, "ignore by secadmin@example.com").await;
    only(v.panos.requests(), 0, "no firewall change on Ignore");
    only(v.entra.requests(), 0, "no user change on Ignore");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_answer_the_default_ignore_is_taken_at_expiry() {
    let v = vendors().await;
    let r = Riposte::start(&connections(&v), SECRETS).await;
    let run_id = start(&r).await;
    let (block, _) = check_notifications(&v, &r, &run_id);
    r.advance(4 * 3_600_000 + 1_000);
    let run = r.succeeded(&run_id).await;
    let out = run.step("ask_admins").unwrap().output.clone().unwrap();
    assert_eq!(
        (out["choice"].clone(), out["expired"].clone()),
        (json!("ignore"), json!(true))
    );
    let sn = only(v.servicenow.requests(), 2, "ServiceNow open + close");
    assert_eq!(sn[1].json()["close_notes"], json!("Ignored by expiry."));
    let sh = only(v.securityhub.requests(), 1, "Security Hub suppressed");
    assert_eq!(
        sh[0].json()["Note"],
        json!({"Text": format!("Ignored by expiry (Riposte run {run_id})."), "UpdatedBy": "riposte"})
    );
    only(v.panos.requests(), 0, "no block");
    only(v.entra.requests(), 0, "no user change");
    check_slack_update(&v, &r, &run_id, "No answer in 4 hours: ignored").await;
    let (status, html) = post_link(&r, &block, None).await;
    assert_eq!(status, 410, "an expired link is gone: {html}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_delivered_twice_starts_one_run() {
    let v = vendors().await;
    let r = Riposte::start(&connections(&v), SECRETS).await;
    let first = start(&r).await;
    let (status, out) = r
        .call(
            "POST",
            "/events",
            Some(OPERATOR_KEY),
            Some(event("guardduty-malicious-ip-caller.json")),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(out["alerts"][0]["runs"], json!([first]));
    let (_, runs) = r.call("GET", "/runs", Some(OPERATOR_KEY), None).await;
    assert_eq!(runs.as_array().unwrap().len(), 1);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(v.servicenow.requests().len(), 1, "one ticket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_keeps_the_playbook_version_it_started_with() {
    let v = vendors().await;
    let r = Riposte::start(&connections(&v), SECRETS).await;
    let run_id = start(&r).await;
    let (_, ignore) = check_notifications(&v, &r, &run_id);
    let (status, mut pb) = r
        .call(
            "GET",
            "/playbooks/block-or-ignore-malicious-ip",
            Some(OPERATOR_KEY),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(pb["version"], 1);
    let steps = pb["spec"]["steps"].as_array_mut().unwrap();
    let close = steps
        .iter_mut()
        .find(|s| s["id"] == "close_ticket")
        .unwrap();
    close["with"]["close_notes"] = json!("CHANGED");
    let (status, out) = r
        .call(
            "PUT",
            "/playbooks/block-or-ignore-malicious-ip",
            Some(CONTRIBUTOR_KEY),
            Some(pb["spec"].clone()),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["version"], 2);
    assert_eq!(post_link(&r, &ignore, None).await.0, 200);
    let run = r
        .wait_run(&run_id, "finished", |run| run.status.is_terminal())
        .await;
    assert_eq!(run.playbook_version, 1);
    assert_eq!(
        v.servicenow.requests()[1].json()["close_notes"],
        json!("Ignored by approval link."),
        "the pinned v1 text"
    );
    let (_, audit) = r.call("GET", "/audit", Some(CONTRIBUTOR_KEY), None).await;
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "playbook.put"
                && a["by"] == "carl"
                && a["detail"] == "version 2"),
        "{audit}"
    );
}
