//! `riposte serve` under load, as a separate process on loopback:
//! `cargo bench -p riposte --bench serve`
//!
//! 1. Durable steps per second: 2,000 runs of a 10-step playbook, each step an HTTP call to a
//!    stand-in on loopback and its own committed transaction (a worker carries a run's next step
//!    itself, so each run takes one queue message).
//! 2. Alert to first action: GuardDuty events POSTed at a steady 1,000 per second for 5 seconds;
//!    latency from the moment an event is sent to the moment the playbook's first HTTP action
//!    reaches a vendor stand-in; p50 and p99.
//! 3. Resident memory of the server idle, and its peak over the run.
//!
//! Every loop here is bounded in count and time, and every target is 127.0.0.1.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use serde_json::{Value, json};

const KEY: &str = "bench-operator-key-0123456789";
const RUNS: usize = 2_000;
const SECONDS: u64 = 5;

/// Alerts per second for the latency phase (`RIPOSTE_BENCH_RATE`, default 1,000).
fn rate() -> u64 {
    std::env::var("RIPOSTE_BENCH_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
        .clamp(1, 5_000)
}

fn rss_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn write_infra(dir: &Path, vendor: &str) {
    std::fs::create_dir_all(dir.join("playbooks")).unwrap();
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    let mut steps = String::new();
    for i in 0..10 {
        steps.push_str(&format!("  - id: s{i}\n"));
        if i > 0 {
            steps.push_str(&format!("    needs: [s{}]\n", i - 1));
        }
        steps.push_str(&format!(
            "    action: http.request\n    with: {{ connection: vendor, method: POST, path: /step, json: {{ step: {i} }} }}\n"
        ));
    }
    std::fs::write(
        dir.join("playbooks/chain10.yaml"),
        format!("id: chain10\nname: Ten calls in a chain\nsteps:\n{steps}"),
    )
    .unwrap();
    std::fs::write(
        dir.join("playbooks/first-action.yaml"),
        "id: first-action\nname: First action\nsteps:\n  - id: act\n    action: http.request\n    with: { connection: vendor, method: POST, path: /act, json: { alert: \"${{ alert.id }}\" } }\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("rules/bench.yaml"),
        "id: bench\nname: Bench\ntrigger: alert\ncondition: alert.source == 'guardduty' && alert.severity in ['High', 'Critical']\nplaybooks: [first-action]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("connections.yaml"),
        format!("connections:\n  vendor: {{ base_url: \"{vendor}\" }}\n"),
    )
    .unwrap();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // The vendor stand-in records when each alert's first action arrives.
    let arrivals: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let rec = arrivals.clone();
    let app = axum::Router::new().fallback(move |body: Bytes| {
        let rec = rec.clone();
        async move {
            let now = Instant::now();
            if let Ok(v) = serde_json::from_slice::<Value>(&body)
                && let Some(id) = v["alert"].as_str()
            {
                rec.lock().unwrap().insert(id.to_string(), now);
            }
            axum::Json(json!({"ok": true}))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let vendor = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    write_infra(&dir.path().join("infra"), &vendor);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_riposte"))
        .args(["serve", "--db"])
        .arg(dir.path().join("riposte.db"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--infra"])
        .arg(dir.path().join("infra"))
        .args(["--allow-private-egress"])
        .env("RIPOSTE_API_KEYS", format!("{KEY}:bench:operator"))
        .env("RIPOSTE_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    for _ in 0..500 {
        if http.get(format!("{url}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_kb(pid, "VmRSS:");

    // 1. Durable steps per second.
    let skip_steps = std::env::var("RIPOSTE_BENCH_SKIP_STEPS").is_ok();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for chunk in 0..(if skip_steps { 0 } else { RUNS / 50 }) {
        let http = http.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                let r = http
                    .post(format!("{url}/runs"))
                    .bearer_auth(KEY)
                    .json(&json!({"playbook": "chain10"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 201, "run {chunk}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let created = start.elapsed();
    // Done when no run is queued or running (the list route pages at 1,000).
    let count = |status: &'static str| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let v: Value = http
                .get(format!("{url}/runs?status={status}&limit=1000"))
                .bearer_auth(KEY)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v.as_array().map(Vec::len).unwrap_or(0)
        }
    };
    let mut finished = false;
    for _ in 0..6_000 {
        if count("queued").await + count("running").await == 0 {
            finished = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = start.elapsed();
    assert!(finished, "every run finished");
    assert_eq!(count("failed").await, 0, "no run failed");
    let steps = RUNS * 10;
    println!(
        "durable steps: {steps} in {:.2} s = {:.0} steps/s ({} runs created over HTTP in {:.2} s)",
        took.as_secs_f64(),
        steps as f64 / took.as_secs_f64(),
        RUNS,
        created.as_secs_f64()
    );

    // 2. Alert to first action at a steady rate.
    let template: Value = serde_json::from_slice(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../events/guardduty-malicious-ip-caller.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let rate = rate();
    let total = rate * SECONDS;
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(total as usize);
    let load_start = Instant::now();
    for i in 0..total {
        ticker.tick().await;
        let mut ev = template.clone();
        let id = format!("bench-finding-{i}");
        ev["id"] = json!(format!("bench-event-{i}"));
        ev["detail"]["id"] = json!(id);
        let http = http.clone();
        let url = url.clone();
        let sent = sent.clone();
        tasks.push(tokio::spawn(async move {
            sent.lock().unwrap().insert(id, Instant::now());
            let r = http
                .post(format!("{url}/events"))
                .bearer_auth(KEY)
                .json(&ev)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 202);
        }));
    }
    let offered = load_start.elapsed();
    for t in tasks {
        t.await.unwrap();
    }
    for _ in 0..1_500 {
        if arrivals.lock().unwrap().len() as u64 >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let peak = rss_kb(pid, "VmHWM:");
    let sent = sent.lock().unwrap();
    let arrivals = arrivals.lock().unwrap();
    let mut lat: Vec<Duration> = sent
        .iter()
        .filter_map(|(id, t0)| arrivals.get(id).map(|t1| t1.saturating_duration_since(*t0)))
        .collect();
    lat.sort();
    println!(
        "alert to first action: {} alerts offered at {rate}/s over {:.2} s; {} reached the vendor; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        total,
        offered.as_secs_f64(),
        lat.len(),
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    println!(
        "resident memory: idle {:.1} MB, peak {:.1} MB",
        idle as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    let _ = child.kill();
    let _ = child.wait();
}
