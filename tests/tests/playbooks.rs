//! Playbook features through the whole local runtime (SQLite store, worker, real HTTP): child
//! playbooks, retries with backoff against a flaky vendor, error branches, waits and loops.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};

use riposte_core::run::{RunStatus, StepStatus};
use riposte_tests::{CONTRIBUTOR_KEY, OPERATOR_KEY, Riposte, Vendor};

async fn put(r: &Riposte, yaml: &str) {
    let id = yaml
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .unwrap()
        .trim()
        .to_string();
    let resp = r
        .http
        .put(format!("{}/playbooks/{id}", r.url))
        .bearer_auth(CONTRIBUTOR_KEY)
        .header("content-type", "application/yaml")
        .body(yaml.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        200,
        "{}",
        resp.text().await.unwrap()
    );
}

async fn start(r: &Riposte, playbook: &str, input: Value) -> String {
    let (s, v) = r
        .call(
            "POST",
            "/runs",
            Some(OPERATOR_KEY),
            Some(json!({"playbook": playbook, "input": input})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    v["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_playbook_runs_and_hands_its_outputs_back() {
    let vendor = Vendor::start("api", |r| (200, json!({"echo": r.path}))).await;
    let r = Riposte::start_empty(&format!(
        "connections:\n  api: {{ base_url: \"{}\" }}\n",
        vendor.url
    ))
    .await;
    put(&r, "id: enrich\nname: Enrich one IP\nsteps:\n  - id: lookup\n    action: http.request\n    with: { connection: api, method: GET, path: \"/ip/${{ input.ip }}\" }\n").await;
    put(
        &r,
        "id: parent\nname: Parent\nsteps:\n  - id: each\n    for_each: input.ips\n    playbook: enrich\n    with: { ip: \"${{ item }}\" }\n  - id: after\n    needs: [each]\n    set: { first: \"${{ steps.each.output[0].lookup.body.echo }}\" }\n",
    )
    .await;
    let id = start(
        &r,
        "parent",
        json!({"ips": ["198.51.100.1", "203.0.113.2"]}),
    )
    .await;
    let run = r.succeeded(&id).await;
    assert_eq!(run.vars["first"], "/ip/198.51.100.1");
    let children: Vec<String> = run
        .step("each")
        .unwrap()
        .iterations
        .iter()
        .map(|it| it.child_run.clone().unwrap())
        .collect();
    assert_eq!(children.len(), 2);
    for c in &children {
        let (s, child) = r
            .call("GET", &format!("/runs/{c}"), Some(OPERATOR_KEY), None)
            .await;
        assert_eq!(s, 200);
        assert_eq!(child["status"], "succeeded");
        assert_eq!(child["trigger"]["parent_run"], json!(id));
    }
    let mut paths: Vec<String> = vendor.requests().into_iter().map(|q| q.path).collect();
    paths.sort();
    assert_eq!(paths, ["/ip/198.51.100.1", "/ip/203.0.113.2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_vendor_is_retried_with_the_same_idempotency_key_and_a_404_is_not() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let vendor = Vendor::start("flaky", move |r| {
        if r.path == "/missing" {
            return (404, json!({"error": "not found"}));
        }
        match c.fetch_add(1, Ordering::SeqCst) {
            0 => (503, json!({"error": "busy"})),
            1 => (429, json!({"error": "slow down"})),
            _ => (201, json!({"id": 7})),
        }
    })
    .await;
    let r = Riposte::start_empty(&format!(
        "connections:\n  flaky: {{ base_url: \"{}\" }}\n",
        vendor.url
    ))
    .await;
    put(
        &r,
        "id: flaky\nname: Flaky\nsteps:\n  - id: call\n    action: http.request\n    retry: { max_attempts: 4, delay: 1s, backoff: 2 }\n    with: { connection: flaky, method: POST, path: /things, json: { a: 1 } }\n  - id: lookup\n    action: http.request\n    with: { connection: flaky, method: GET, path: /missing }\n    on_error: { goto: [recover] }\n  - id: recover\n    set: { why: \"${{ steps.lookup.error }}\" }\n",
    )
    .await;
    let id = start(&r, "flaky", json!({})).await;
    // First attempt fails with 503; the retry waits 1 s, then 2 s: move the clock instead.
    r.wait_run(&id, "retrying", |run| {
        run.step("call").unwrap().iterations[0].attempt == 2
    })
    .await;
    r.advance(1_000);
    r.wait_run(&id, "retrying again", |run| {
        run.step("call").unwrap().iterations[0].attempt == 3
    })
    .await;
    r.advance(2_000);
    let run = r.succeeded(&id).await;
    let things: Vec<_> = vendor
        .requests()
        .into_iter()
        .filter(|q| q.path == "/things")
        .collect();
    assert_eq!(things.len(), 3);
    let keys: Vec<_> = things
        .iter()
        .map(|q| q.header("idempotency-key").unwrap().to_string())
        .collect();
    assert!(
        keys.iter().all(|k| *k == format!("{id}:call:0")),
        "{keys:?}"
    );
    assert_eq!(
        run.step("call").unwrap().output.as_ref().unwrap()["body"],
        json!({"id": 7})
    );
    let missing: Vec<_> = vendor
        .requests()
        .into_iter()
        .filter(|q| q.path == "/missing")
        .collect();
    assert_eq!(missing.len(), 1, "a 404 is not retried");
    assert_eq!(run.step("lookup").unwrap().status, StepStatus::Failed);
    assert!(
        run.vars["why"].as_str().unwrap().contains("404"),
        "{:?}",
        run.vars
    );
    let retries: Vec<_> = run
        .history
        .iter()
        .filter(|h| h.event == "retry_scheduled")
        .map(|h| h.detail.clone().unwrap())
        .collect();
    assert_eq!(retries.len(), 2, "{retries:?}");
    assert!(
        retries[0].contains("HTTP 503") && retries[0].ends_with("attempt 2 in 1000 ms"),
        "{retries:?}"
    );
    assert!(
        retries[1].contains("HTTP 429") && retries[1].ends_with("attempt 3 in 2000 ms"),
        "{retries:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_holds_no_worker_and_resumes_when_due() {
    let r = Riposte::start_empty("connections: {}\n").await;
    put(&r, "id: pause\nname: Pause\nsteps:\n  - id: nap\n    wait: 1h\n  - id: after\n    needs: [nap]\n    set: { woke: true }\n").await;
    let id = start(&r, "pause", json!({})).await;
    let run = r
        .wait_run(&id, "waiting", |run| run.status == RunStatus::Waiting)
        .await;
    assert_eq!(run.step("nap").unwrap().status, StepStatus::Waiting);
    assert_eq!(
        r.local.store.queue_len().unwrap(),
        1,
        "only the timer message is queued"
    );
    r.advance(3_600_000);
    let run = r
        .wait_run(&id, "finished", |run| run.status.is_terminal())
        .await;
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(run.vars["woke"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_keeps_failing_is_set_aside_and_its_run_failed_with_the_reason() {
    use riposte_core::engine::{Effects, Engine};
    use riposte_core::run::Trigger;
    use riposte_core::store::Store;
    let r = Riposte::start_empty("connections: {}\n").await;
    put(
        &r,
        "id: gone\nname: Gone\nsteps:\n  - id: only\n    set: { x: 1 }\n",
    )
    .await;
    // A run pinned to a version the store does not have (as after a bad restore): every
    // delivery of its message fails.
    let spec = riposte_core::playbook::parse_spec(
        "id: gone\nname: Gone\nsteps:\n  - id: only\n    set: { x: 1 }\n",
        None,
    )
    .unwrap();
    let pb = riposte_core::playbook::compile(
        spec,
        9,
        &riposte_core::connector::ConnectorCatalog::shipped(),
    )
    .unwrap();
    let (run, fx) = Engine::new(&pb).start(
        "poisoned".into(),
        Trigger::Manual {
            by: "olivia".into(),
        },
        json!({}),
        0,
    );
    let fx = Effects {
        messages: fx.messages,
        new_runs: vec![],
    };
    assert!(r.local.store.create_run(&run, &fx).await.unwrap());
    let mut failed = None;
    for _ in 0..500 {
        r.advance(600_000);
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        if let Some((run, _)) = r.local.store.load_run("poisoned").await.unwrap()
            && run.status == RunStatus::Failed
        {
            failed = Some(run);
            break;
        }
    }
    let run = failed.unwrap_or_else(|| {
        panic!(
            "the run is failed once its message is set aside; queue {:?}",
            r.local.store.queue_len()
        )
    });
    let error = run.error.clone().unwrap();
    assert!(
        error.contains("step `only` could not be handled after 10 tries")
            && error.contains("version 9 not found"),
        "{error}"
    );
    assert_eq!(
        r.local.store.queue_len().unwrap(),
        0,
        "the message left the queue"
    );
}
