//! The HTTP API as an operator or contributor meets it: roles, administration of rules and
//! playbooks, and bad input of every kind answered with a clear error and nothing lost.

use serde_json::{Value, json};

use riposte_tests::vendors::{SECRETS, closed_connections};
use riposte_tests::{CONTRIBUTOR_KEY, OPERATOR_KEY, Riposte, event};

/// No vendor is called in these tests: every connection points at a closed port.
async fn riposte() -> Riposte {
    Riposte::start(&closed_connections(), SECRETS).await
}

fn err(v: &Value) -> String {
    v["error"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_gate_every_route() {
    let r = riposte().await;
    let (s, v) = r.call("GET", "/runs", None, None).await;
    assert_eq!(s, 403, "{v}");
    assert!(err(&v).contains("API key"));
    assert_eq!(
        r.call("GET", "/runs", Some("not-a-key-at-all-000000"), None)
            .await
            .0,
        403
    );
    assert_eq!(
        r.call("GET", "/runs", Some(OPERATOR_KEY), None).await.0,
        200
    );
    assert_eq!(
        r.call(
            "POST",
            "/runs",
            None,
            Some(json!({"playbook": "ticket-for-recommendation"}))
        )
        .await
        .0,
        403
    );
    // An operator runs playbooks but cannot change them.
    let (s, v) = r
        .call(
            "DELETE",
            "/rules/recommendation-ticket",
            Some(OPERATOR_KEY),
            None,
        )
        .await;
    assert_eq!(s, 403);
    assert!(err(&v).contains("contributor"), "{v}");
    assert_eq!(
        r.call("PUT", "/playbooks/x", Some(OPERATOR_KEY), Some(json!({})))
            .await
            .0,
        403
    );
    assert_eq!(
        r.call(
            "POST",
            "/rules/recommendation-ticket/disable",
            Some(OPERATOR_KEY),
            None
        )
        .await
        .0,
        403
    );
    assert_eq!(
        r.call("GET", "/audit", Some(OPERATOR_KEY), None).await.0,
        403
    );
    assert_eq!(
        r.call("GET", "/rules", Some(OPERATOR_KEY), None).await.0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_events_get_clear_errors_and_nothing_is_lost() {
    let r = riposte().await;
    // An accepted event first: its run must survive everything below.
    let (s, out) = r
        .call(
            "POST",
            "/events",
            Some(OPERATOR_KEY),
            Some(event("securityhub-control-failed.json")),
        )
        .await;
    assert_eq!(s, 202, "{out}");
    let run_id = out["alerts"][0]["runs"][0].as_str().unwrap().to_string();

    let resp = r
        .http
        .post(format!("{}/events", r.url))
        .bearer_auth(OPERATOR_KEY)
        .body("{\"source\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let v: Value = resp.json().await.unwrap();
    assert!(
        err(&v).contains("not valid JSON") && err(&v).contains("line 1"),
        "{v}"
    );

    let (s, v) = r
        .call(
            "POST",
            "/events",
            Some(OPERATOR_KEY),
            Some(event("unknown-source.json")),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(err(&v).contains("aws.ec2"), "{v}");

    let mut bad = event("securityhub-findings-imported.json");
    bad["detail"]["findings"][1]
        .as_object_mut()
        .unwrap()
        .remove("Id");
    let (s, v) = r
        .call("POST", "/events", Some(OPERATOR_KEY), Some(bad))
        .await;
    assert_eq!(s, 400);
    assert!(err(&v).contains("detail.findings[1].Id"), "{v}");

    let mut big = event("guardduty-malicious-ip-caller.json");
    big["detail"]["description"] = json!("x".repeat(300 * 1024));
    let (s, v) = r
        .call("POST", "/events", Some(OPERATOR_KEY), Some(big))
        .await;
    assert_eq!(s, 413, "{v}");
    let huge = "x".repeat(2 * 1024 * 1024);
    // Its own client: the server closes the connection after refusing a body this large.
    let resp = reqwest::Client::new()
        .post(format!("{}/events", r.url))
        .bearer_auth(OPERATOR_KEY)
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);

    let (s, v) = r
        .call("GET", &format!("/runs/{run_id}"), Some(OPERATOR_KEY), None)
        .await;
    assert_eq!(s, 200, "the accepted run is still there: {v}");
    let (s, v) = r
        .call("GET", "/runs/no-such-run", Some(OPERATOR_KEY), None)
        .await;
    assert_eq!(
        (s, err(&v)),
        (404, "run `no-such-run` not found".to_string())
    );
    let (s, v) = r
        .call("GET", "/events/no-such-event", Some(OPERATOR_KEY), None)
        .await;
    assert_eq!(s, 404, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_playbooks_and_rules_are_refused_with_every_problem_named() {
    let r = riposte().await;
    let bad = json!({
        "id": "bad-pb",
        "name": "Bad",
        "steps": [
            {"id": "a", "action": "http.request", "with": {"connection": "nowhere", "method": "GET", "path": "/x"}},
            {"id": "b", "needs": ["ghost"], "set": {"x": "${{ alert.title"}},
            {"id": "c", "action": "http.reqest", "with": {}},
        ]
    });
    let (s, v) = r
        .call("PUT", "/playbooks/bad-pb", Some(CONTRIBUTOR_KEY), Some(bad))
        .await;
    assert_eq!(s, 400, "{v}");
    let problems: Vec<String> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| format!("{} {} {}", p["step"], p["field"], p["message"]))
        .collect();
    let all = problems.join("\n");
    assert!(
        all.contains("\"b\" \"needs\" \"unknown step `ghost`\""),
        "{all}"
    );
    assert!(all.contains("\"b\" \"set.x\""), "{all}");
    assert!(
        all.contains("\"c\" \"action\" \"unknown operation `http.reqest`"),
        "{all}"
    );

    // Unknown connections are caught at load time too.
    let bad_conn = json!({"id": "bad-conn", "name": "x", "steps": [{"id": "a", "action": "http.request", "with": {"connection": "nowhere", "method": "GET", "path": "/x"}}]});
    let (s, v) = r
        .call(
            "PUT",
            "/playbooks/bad-conn",
            Some(CONTRIBUTOR_KEY),
            Some(bad_conn),
        )
        .await;
    assert_eq!(s, 400);
    assert!(
        v["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("unknown connection `nowhere`"),
        "{v}"
    );

    // YAML over the API, with the line of the mistake.
    let resp = r
        .http
        .put(format!("{}/playbooks/y", r.url))
        .bearer_auth(CONTRIBUTOR_KEY)
        .header("content-type", "application/yaml")
        .body("id: y\nname: y\nsteps:\n  - id: a\n    set: {x: 1}\n    retyr: 3\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let v: Value = resp.json().await.unwrap();
    assert!(
        err(&v).contains("step `a`") && err(&v).contains("unknown field `retyr`"),
        "{v}"
    );

    let rule = json!({"id": "r1", "name": "r", "trigger": "alert", "condition": "alert.severity ==", "playbooks": ["ghost"]});
    let (s, v) = r
        .call("PUT", "/rules/r1", Some(CONTRIBUTOR_KEY), Some(rule))
        .await;
    assert_eq!(s, 400);
    let msgs = v["problems"].to_string();
    assert!(
        msgs.contains("unknown playbook `ghost`") && msgs.contains("cannot parse"),
        "{v}"
    );
    assert_eq!(
        r.call(
            "PUT",
            "/rules/r2",
            Some(CONTRIBUTOR_KEY),
            Some(json!({"id": "other", "name": "x"}))
        )
        .await
        .0,
        400
    );
    // Nothing accepted was lost: the examples are still there.
    let (_, rules) = r.call("GET", "/rules", Some(OPERATOR_KEY), None).await;
    assert_eq!(
        rules.as_array().unwrap().len(),
        riposte_tests::example_rules()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_created_disabled_enabled_and_deleted_and_evaluation_says_why() {
    let r = riposte().await;
    let ev = event("securityhub-control-failed.json");
    let (s, v) = r
        .call(
            "POST",
            "/rules/recommendation-ticket/disable",
            Some(CONTRIBUTOR_KEY),
            None,
        )
        .await;
    assert_eq!((s, v["enabled"].clone()), (200, json!(false)));
    let (_, out) = r
        .call("POST", "/events", Some(OPERATOR_KEY), Some(ev.clone()))
        .await;
    assert_eq!(out["alerts"][0]["runs"], json!([]));
    let line = out["alerts"][0]["evaluation"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["rule_id"] == "recommendation-ticket")
        .unwrap()
        .clone();
    assert_eq!(line["verdict"]["outcome"], "disabled");
    // The record of the evaluation is kept per event.
    let (s, rec) = r
        .call(
            "GET",
            &format!("/events/{}", ev["id"].as_str().unwrap()),
            Some(OPERATOR_KEY),
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        rec["alerts"][0]["evaluation"]["lines"]
            .as_array()
            .unwrap()
            .len(),
        riposte_tests::example_rules(),
        "a line for every rule"
    );

    // A new, terminal, earlier rule with an expiry in the future.
    let rule = json!({
        "id": "aaa-first", "name": "S3 first", "description": "", "order": 1, "trigger": "recommendation",
        "condition": "alert.title.contains('S3')", "playbooks": ["ticket-for-recommendation"], "terminal": true,
        "expires": "2999-01-01T00:00:00Z"
    });
    let (s, v) = r
        .call("PUT", "/rules/aaa-first", Some(CONTRIBUTOR_KEY), Some(rule))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["updated_by"], "carl");
    assert_eq!(
        r.call(
            "POST",
            "/rules/recommendation-ticket/enable",
            Some(CONTRIBUTOR_KEY),
            None
        )
        .await
        .0,
        200
    );
    let mut ev2 = ev.clone();
    ev2["id"] = json!("another-delivery");
    ev2["detail"]["findings"][0]["Id"] = json!("another-finding");
    let (_, out) = r
        .call("POST", "/events", Some(OPERATOR_KEY), Some(ev2))
        .await;
    let lines = out["alerts"][0]["evaluation"]["lines"].as_array().unwrap();
    let order: Vec<&str> = lines
        .iter()
        .map(|l| l["rule_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        order,
        [
            "aaa-first",
            "securityhub-run-playbook-action",
            "guardduty-high-remote-ip",
            "recommendation-ticket"
        ],
        "by order, then id"
    );
    assert_eq!(lines[0]["verdict"]["outcome"], "matched");
    assert_eq!(
        lines[3]["verdict"],
        json!({"outcome": "after_terminal", "detail": "aaa-first"})
    );
    assert_eq!(out["alerts"][0]["runs"].as_array().unwrap().len(), 1);

    assert_eq!(
        r.call("DELETE", "/rules/aaa-first", Some(CONTRIBUTOR_KEY), None)
            .await
            .0,
        204
    );
    assert_eq!(
        r.call("DELETE", "/rules/aaa-first", Some(CONTRIBUTOR_KEY), None)
            .await
            .0,
        404
    );
    let (_, audit) = r.call("GET", "/audit", Some(CONTRIBUTOR_KEY), None).await;
    let actions: Vec<String> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{} {} {}", a["action"], a["target"], a["by"]))
        .collect();
    assert!(
        actions.contains(&"\"rule.delete\" \"aaa-first\" \"carl\"".to_string()),
        "{actions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_runs_start_read_and_cancel() {
    let r = riposte().await;
    let (s, v) = r
        .call(
            "POST",
            "/runs",
            Some(OPERATOR_KEY),
            Some(json!({"playbook": "nope"})),
        )
        .await;
    assert_eq!((s, err(&v)), (404, "playbook `nope` not found".to_string()));
    let (s, v) = r
        .call(
            "POST",
            "/runs",
            Some(OPERATOR_KEY),
            Some(json!({"playbok": "x"})),
        )
        .await;
    assert_eq!(s, 400);
    assert!(err(&v).contains("unknown field `playbok`"), "{v}");
    let big =
        json!({"playbook": "ticket-for-recommendation", "input": {"blob": "x".repeat(300 * 1024)}});
    assert_eq!(
        r.call("POST", "/runs", Some(OPERATOR_KEY), Some(big))
            .await
            .0,
        413
    );

    let input = json!({"alert": {"title": "Manual check", "description": "by hand"}});
    let (s, run) = r
        .call(
            "POST",
            "/runs",
            Some(OPERATOR_KEY),
            Some(json!({"playbook": "ticket-for-recommendation", "input": input})),
        )
        .await;
    assert_eq!(s, 201, "{run}");
    assert_eq!(run["trigger"], json!({"type": "manual", "by": "olivia"}));
    let id = run["id"].as_str().unwrap().to_string();
    // The ticket call fails against a closed port and is retried with backoff; cancel stops it.
    let (s, v) = r
        .call(
            "POST",
            &format!("/runs/{id}/cancel"),
            Some(OPERATOR_KEY),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "cancelled");
    assert_eq!(
        r.call(
            "POST",
            &format!("/runs/{id}/cancel"),
            Some(OPERATOR_KEY),
            None
        )
        .await
        .0,
        409
    );
    let (_, list) = r
        .call("GET", "/runs?status=cancelled", Some(OPERATOR_KEY), None)
        .await;
    assert_eq!(list[0]["id"], json!(id));
    assert_eq!(
        r.call("GET", "/runs?status=bogus", Some(OPERATOR_KEY), None)
            .await
            .0,
        400
    );
}
