//! Two people answer the same approval at the same moment, 1,000 times: exactly one answer wins
//! each time, the loser is told who won, and the run follows the winner. And the answers that
//! must never decide: after the run was cancelled, a link of another run, a tampered token.

use std::sync::Arc;

use serde_json::{Value, json};

use riposte_core::playbook::spec_from_value;
use riposte_core::run::RunStatus;
use riposte_core::service::Error;
use riposte_tests::{Riposte, Vendor};

const PLAYBOOK: &str = r#"
id: race
name: Race
steps:
  - id: ask
    approval:
      message: "Block ${{ input.ip }}?"
      choices: [block, ignore]
      default: ignore
      expires_in: 1h
      notify:
        - action: http.request
          with:
            connection: chat
            method: POST
            path: /post
            json: { run: "${{ run.id }}", links: "${{ approval.links }}" }
  - id: after
    needs: [ask]
    set: { chosen: "${{ steps.ask.output.choice }}" }
"#;

struct Setup {
    r: Riposte,
    chat: Vendor,
}

async fn setup() -> Setup {
    let chat = Vendor::start("chat", |_| (200, json!({"ok": true}))).await;
    let r = Riposte::start_with_secrets(
        &format!("connections:\n  chat:\n    base_url: {}\n", chat.url),
        &[],
    )
    .await;
    let spec = spec_from_value(serde_yaml_ng::from_str(PLAYBOOK).unwrap(), None).unwrap();
    r.local.service.put_playbook(spec, "carl").await.unwrap();
    Setup { r, chat }
}

/// Starts `n` runs and waits until each has sent its links; returns (run id, block, ignore).
async fn asked(s: &Setup, n: usize) -> Vec<(String, String, String)> {
    let mut ids = Vec::new();
    for i in 0..n {
        let run =
            s.r.local
                .service
                .start_run(
                    "race",
                    json!({"ip": format!("203.0.113.{}", i % 250)}),
                    "olivia",
                )
                .await
                .unwrap();
        ids.push(run.id);
    }
    for id in &ids {
        s.r.wait_run(id, "waiting", |run| run.status == RunStatus::Waiting)
            .await;
    }
    let token =
        |v: &Value| -> String { v.as_str().unwrap().rsplit('/').next().unwrap().to_string() };
    let sent: Vec<Value> = s.chat.requests().iter().map(|r| r.json()).collect();
    ids.into_iter()
        .map(|id| {
            let m = sent
                .iter()
                .find(|m| m["run"] == id.as_str())
                .unwrap_or_else(|| panic!("no links sent for {id}"));
            (
                id,
                token(&m["links"]["block"]),
                token(&m["links"]["ignore"]),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_answers_at_the_same_moment_have_exactly_one_winner_1000_times() {
    let s = setup().await;
    let service = s.r.local.service.clone();
    let mut wins = [0usize; 2];
    for batch in 0..10 {
        let runs = asked(&s, 100).await;
        let mut races = Vec::new();
        for (id, block, ignore) in runs.clone() {
            let (a, b) = (service.clone(), service.clone());
            let who = format!("netadmin-{batch}");
            // Two tasks on different worker threads, released together.
            let start = Arc::new(tokio::sync::Barrier::new(2));
            let (sa, sb) = (start.clone(), start);
            let x = tokio::spawn(async move {
                sa.wait().await;
                a.decide(&block, Some(&who)).await
            });
            let y = tokio::spawn(async move {
                sb.wait().await;
                b.decide(&ignore, Some("secadmin")).await
            });
            races.push(async move { (id, x.await.unwrap(), y.await.unwrap()) });
        }
        for race in races {
            let (id, x, y) = race.await;
            let (winner, loser) = match (&x, &y) {
                (Ok(w), Err(l)) => {
                    wins[0] += 1;
                    (w.choice.clone(), l.clone())
                }
                (Err(l), Ok(w)) => {
                    wins[1] += 1;
                    (w.choice.clone(), l.clone())
                }
                other => panic!("run {id}: not exactly one winner: {other:?}"),
            };
            // The loser learns who won: 409.
            assert!(matches!(loser, Error::Conflict(_)), "{id}: {loser:?}");
            assert_eq!(loser.status(), 409);
            assert!(loser.to_string().contains(&winner), "{loser}");
            let run = s.r.succeeded(&id).await;
            assert_eq!(
                run.step("after").unwrap().iterations[0].output,
                Some(json!({"chosen": winner})),
                "{id}"
            );
            let answered = run
                .history
                .iter()
                .filter(|h| h.event == "approval_answered")
                .count();
            assert_eq!(answered, 1, "{id}: {:#?}", run.history);
        }
    }
    assert_eq!(wins[0] + wins[1], 1000);
    eprintln!("block won {} times, ignore {} times", wins[0], wins[1]);
}

#[tokio::test]
async fn answers_that_must_never_decide() {
    let s = setup().await;
    let service = Arc::clone(&s.r.local.service);
    let runs = asked(&s, 3).await;
    let (cancelled, c_block, _) = &runs[0];
    let (other, _, o_ignore) = &runs[1];
    let (_, t_block, _) = &runs[2];

    // A token dies with its run.
    service.cancel_run(cancelled, "olivia").await.unwrap();
    let e = service.decide(c_block, None).await.unwrap_err();
    assert_eq!(e.status(), 410, "{e}");

    // A tampered token (another choice spliced in) is forged: 403, and nothing is decided.
    let (payload, sig) = t_block.split_once('.').unwrap();
    let (_, o_sig) = o_ignore.split_once('.').unwrap();
    for forged in [
        format!("{payload}.{o_sig}"),
        format!("{payload}x.{sig}"),
        "not-a-token".to_string(),
    ] {
        let e = service.decide(&forged, None).await.unwrap_err();
        assert_eq!(e.status(), 403, "{forged}: {e}");
    }
    // Each link still decides its own run only.
    let v = service.decide(o_ignore, None).await.unwrap();
    assert_eq!(
        (v.run_id.as_str(), v.choice.as_str()),
        (other.as_str(), "ignore")
    );
    // Replayed: the same link again is 409.
    let e = service.decide(o_ignore, None).await.unwrap_err();
    assert_eq!(e.status(), 409, "{e}");
    let third = service.load(&runs[2].0).await.unwrap().0;
    assert_eq!(third.status, RunStatus::Waiting);
}
