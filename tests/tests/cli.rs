//! The `riposte` command as an operator uses it: validate, a dry run that sends nothing, and the
//! tour's send / runs / approve / runs show against a `riposte serve --demo`.

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use riposte_tests::{Vendor, repo, riposte_bin, wait_ready};

fn riposte(args: &[&str], server: Option<&str>) -> Output {
    let mut c = Command::new(riposte_bin());
    c.args(args)
        .current_dir(repo())
        .env("RUST_BACKTRACE", "0")
        .env("RIPOSTE_LOG", "warn");
    if let Some(s) = server {
        c.env("RIPOSTE_SERVER", s);
    }
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn validate_accepts_the_examples_and_names_file_step_and_field_of_a_mistake() {
    let o = riposte(&["validate"], None);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("ok  infra/playbooks/block-or-ignore-malicious-ip.yaml (playbook block-or-ignore-malicious-ip, 9 steps)"));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "id: bad\nname: Bad\nsteps:\n  - id: a\n    action: http.request\n    with: { connection: servicenow, method: GET, path: /x, bodyy: 1 }\n").unwrap();
    let o = riposte(
        &[
            "validate",
            bad.to_str().unwrap(),
            "--connections",
            "infra/connections.yaml",
        ],
        None,
    );
    assert!(!o.status.success());
    let out = text(&o);
    assert!(
        out.contains(&format!(
            "{}: step `a`: action.with.bodyy: `http.request` has no input `bodyy`",
            bad.display()
        )),
        "{out}"
    );
    assert!(out.contains("1 problem(s) found"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_prints_every_request_and_sends_none() {
    // The firewall (a host the customer names, so any host) pointing at a live stand-in: the
    // dry run must not reach it. The other connections keep their vendors' hosts.
    let vendor = Vendor::start("any", |_| (200, serde_json::json!({}))).await;
    let dir = tempfile::tempdir().unwrap();
    let conns = std::fs::read_to_string(repo().join("infra/connections.yaml")).unwrap();
    assert!(conns.contains("base_url: https://firewall.example.com"));
    let conns = conns.replace("https://firewall.example.com", &vendor.url);
    let conn_file = dir.path().join("connections.yaml");
    std::fs::write(&conn_file, conns).unwrap();
    let o = tokio::task::spawn_blocking(move || {
        riposte(
            &[
                "test",
                "infra/playbooks/block-or-ignore-malicious-ip.yaml",
                "--event",
                "events/guardduty-malicious-ip-caller.json",
                "--choice",
                "block",
                "--responses",
                "events/responses/block-or-ignore.json",
                "--connections",
                conn_file.to_str().unwrap(),
            ],
            None,
        )
    })
    .await
    .unwrap();
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let requests: Vec<&str> = out.lines().filter(|l| l.starts_with('#')).collect();
    let sn = "https://example.service-now.com/api/now/table/incident";
    let graph = "https://graph.microsoft.com/v1.0/users/alice%40example.com";
    assert_eq!(
        requests,
        [
            format!("#1 POST {sn}?sysparm_fields=sys_id%2Cnumber%2Cstate%2Csys_created_on"),
            "#2 POST https://slack.com/api/chat.postMessage".to_string(),
            "#3 POST https://email.us-east-1.amazonaws.com/v2/email/outbound-emails".to_string(),
            "#4 POST https://slack.com/api/chat.postMessage".to_string(),
            format!("#5 POST {}/api/", vendor.url),
            format!("#6 PATCH {graph}"),
            // The steps the user's disabling makes ready are carried by the same worker, before
            // the decision's announcement (its own message) is handled.
            format!("#7 POST {graph}/revokeSignInSessions"),
            format!(
                "#8 PATCH {sn}/9d385017c611228701d22104cc95c371?sysparm_fields=sys_id%2Cnumber%2Cstate%2Cresolved_at%2Csys_updated_on"
            ),
            "#9 POST https://slack.com/api/chat.update".to_string(),
        ],
        "{out}"
    );
    assert!(
        out.contains("== 9 request(s) would be sent; none was."),
        "{out}"
    );
    assert!(
        out.contains("auth: basic, user `riposte`, password from secret `servicenow-password`"),
        "{out}"
    );
    assert!(
        out.contains("auth: API key in header X-PAN-KEY from secret `panos-api-key`"),
        "{out}"
    );
    assert!(
        out.contains(
            r#"<entry ip=\"198.51.100.23\"><tag><member timeout=\"0\">riposte-blocked</member>"#
        ),
        "the PAN-OS register command: {out}"
    );
    assert!(
        out.contains("block by netadmin@example.com at 2026-01-01T00:00:00Z."),
        "the Slack question's update: {out}"
    );
    assert!(out.contains("status succeeded"), "{out}");
    assert!(vendor.requests().is_empty(), "a dry run sends nothing");
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tour_send_runs_approve_and_show() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let _serve = Serve(
        Command::new(riposte_bin())
            .args(["serve", "--demo", "--db"])
            .arg(dir.path().join("r.db"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .current_dir(repo())
            .env("RIPOSTE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::new();
    wait_ready(&http, &url).await;
    let u = url.clone();
    let run = move |args: Vec<String>| {
        let u = u.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                riposte(
                    &args.iter().map(String::as_str).collect::<Vec<_>>(),
                    Some(&u),
                )
            })
            .await
            .unwrap()
        }
    };
    let o = run(vec![
        "send".into(),
        "events/guardduty-malicious-ip-caller.json".into(),
    ])
    .await;
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("rule guardduty-high-remote-ip         matched"),
        "{out}"
    );
    let run_id = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("run started: "))
        .unwrap()
        .to_string();

    let mut link = String::new();
    for _ in 0..200 {
        let outbox: serde_json::Value = http
            .get(format!("{url}/sandbox"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(l) = outbox
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["connection"] == "email")
            .and_then(|m| {
                m["body"]["Content"]["Simple"]["Body"]["Text"]["Data"]
                    .as_str()?
                    .lines()
                    .find_map(|l| l.strip_prefix("Block: "))
                    .map(str::to_string)
            })
        {
            link = l;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        link.starts_with(&format!("{url}/approvals/")),
        "no link in the sandbox outbox"
    );
    let o = run(vec!["runs".into()]).await;
    assert!(
        text(&o).contains(&run_id) && text(&o).contains("waiting"),
        "{}",
        text(&o)
    );

    // As an operator who is not a named approver: refused. With the link: recorded.
    let o = run(vec![
        "approve".into(),
        run_id.clone(),
        "--choice".into(),
        "block".into(),
    ])
    .await;
    assert!(
        !o.status.success() && text(&o).contains("is not an approver of this step"),
        "{}",
        text(&o)
    );
    let o = run(vec![
        "approve".into(),
        link.clone(),
        "--approver".into(),
        "netadmin@example.com".into(),
    ])
    .await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("Recorded: block"), "{}", text(&o));
    let o = run(vec!["approve".into(), link.clone()]).await;
    assert!(
        !o.status.success() && text(&o).contains("409"),
        "{}",
        text(&o)
    );

    let mut shown = String::new();
    for _ in 0..200 {
        shown = text(&run(vec!["runs".into(), "show".into(), run_id.clone()]).await);
        if shown.contains("status succeeded") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(shown.contains("status succeeded"), "{shown}");
    assert!(
        shown.contains("answered: block by netadmin@example.com"),
        "{shown}"
    );
    assert!(shown.contains("suppress_finding       skipped"), "{shown}");
    assert!(shown.contains("approval_answered"), "{shown}");
    // The sandbox answered each vendor's request as the vendor would: the firewall's XML was a
    // success, and the Slack question was updated with who decided.
    assert!(shown.contains("\"already_registered\":false"), "{shown}");
    let outbox: serde_json::Value = http
        .get(format!("{url}/sandbox"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let update = outbox
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["connection"] == "slack" && m["path"] == "/api/chat.update")
        .unwrap_or_else(|| panic!("no chat.update in {outbox}"));
    assert_eq!(update["body"]["channel"], "C0SOCALERTS", "{update}");
    assert!(
        update["body"]["text"]
            .as_str()
            .unwrap()
            .starts_with("block by netadmin@example.com at "),
        "{update}"
    );
}
