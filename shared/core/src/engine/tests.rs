//! The engine driven by messages, with no I/O: each test is a scenario a user would describe.

use std::collections::VecDeque;

use serde_json::{Value, json};

use super::*;
use crate::connector::Builtins;
use crate::playbook::load;

fn pb(src: &str) -> Playbook {
    load(src, None, &Builtins).unwrap_or_else(|p| panic!("{p}"))
}

/// A queue and a clock around one run; `respond` decides each action's outcome.
struct Drive<'a> {
    engine: Engine<'a>,
    run: Run,
    queue: VecDeque<(StepMessage, Millis)>,
    now: Millis,
    sent: Vec<HttpRequest>,
}

impl<'a> Drive<'a> {
    fn start(p: &'a Playbook, input: Value) -> Drive<'a> {
        let engine = Engine::new(p);
        let (run, fx) = engine.start(
            "run1".into(),
            Trigger::Manual { by: "ann".into() },
            input,
            1_000,
        );
        let mut d = Drive {
            engine,
            run,
            queue: VecDeque::new(),
            now: 1_000,
            sent: vec![],
        };
        d.push(fx);
        d
    }

    fn push(&mut self, fx: Effects) {
        // What a host may keep with the run instead of queueing (Run::wakes) is exactly what the
        // engine sends for a step that begins to wait.
        let wakes = self.run.wakes();
        for (m, delay) in &fx.messages {
            if matches!(
                m.kind,
                MessageKind::Resume | MessageKind::ApprovalExpired | MessageKind::Timeout
            ) {
                assert!(
                    wakes.contains(&(m.clone(), self.now + *delay as Millis)),
                    "{m:?} in {delay} ms is not among the run's wakes {wakes:?}"
                );
            }
        }
        for (m, delay) in fx.messages {
            self.queue.push_back((m, self.now + delay as Millis));
        }
    }

    fn links() -> IssuedLinks {
        let mut links = serde_json::Map::new();
        links.insert("block".into(), json!("https://riposte/approvals/t-block"));
        links.insert("ignore".into(), json!("https://riposte/approvals/t-ignore"));
        IssuedLinks {
            nonce_hash: "h".into(),
            links,
        }
    }

    /// Delivers one message; returns what the claim said.
    fn deliver(
        &mut self,
        msg: &StepMessage,
        respond: &mut dyn FnMut(&HttpRequest) -> Outcome,
    ) -> Claim {
        let mut fx = Effects::default();
        let links = Self::links();
        let claim = self
            .engine
            .claim(&mut self.run, msg, self.now, Some(&links), &mut fx);
        match &claim {
            Claim::Execute(Work::Http(r)) => {
                self.sent.push(r.clone());
                let out = respond(r);
                self.engine
                    .finish(&mut self.run, msg, out, self.now, &mut fx);
            }
            Claim::Execute(Work::Notify(rs)) => {
                self.sent.extend(rs.iter().filter_map(|n| match n {
                    NotifyWork::Http(r) => Some(r.clone()),
                    NotifyWork::Call(_) => None,
                }));
                self.engine
                    .finish(&mut self.run, msg, Outcome::Waiting, self.now, &mut fx);
            }
            Claim::Execute(other) => panic!("unexpected work {other:?}"),
            Claim::Settled | Claim::Stale(_) | Claim::Busy(_) => {}
        }
        self.push(fx);
        claim
    }

    /// Delivers everything due, advancing the clock to delayed messages (bounded).
    fn drain(&mut self, respond: &mut dyn FnMut(&HttpRequest) -> Outcome) {
        for _ in 0..10_000 {
            let Some(pos) = self
                .queue
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(i, _)| i)
            else {
                return;
            };
            let (msg, at) = self.queue.remove(pos).unwrap();
            if at > self.now {
                // Stop at a wait that a human is expected to end.
                if msg.kind == MessageKind::ApprovalExpired {
                    self.queue.push_back((msg, at));
                    return;
                }
                self.now = at;
            }
            self.deliver(&msg, respond);
        }
        panic!("did not settle");
    }

    fn status(&self, step: &str) -> StepStatus {
        self.run.step(step).unwrap().status
    }
}

fn ok(_: &HttpRequest) -> Outcome {
    Outcome::Done(json!({"status": 200, "body": {"ok": true}}))
}

const BLOCK_OR_IGNORE: &str = r#"
id: block-or-ignore
name: Block or ignore
steps:
  - id: ticket
    action: http.request
    with: { connection: itsm, method: POST, path: /api/now/table/incident, json: { short_description: "${{ alert.title }}" } }
  - id: ask
    needs: [ticket]
    approval:
      message: "Block ${{ alert.entities.ips[0] }}?"
      choices: [block, ignore]
      default: ignore
      expires_in: 1h
      notify:
        - action: http.request
          with: { connection: chat, method: POST, path: /post, json: { text: "${{ approval.links.block }}" } }
    switch:
      on: output.choice
      cases: { block: [block_ip], ignore: [close_ticket] }
  - id: block_ip
    for_each: alert.entities.ips
    action: http.request
    with: { connection: fw, method: POST, path: "/block/${{ item }}" }
  - id: disable_user
    needs: [block_ip]
    action: http.request
    with: { connection: idp, method: POST, path: "/users/${{ alert.entities.users[0] }}/disable" }
  - id: close_ticket
    action: http.request
    with: { connection: itsm, method: PATCH, path: /api/now/table/incident/1, json: { state: "7" } }
  - id: summary
    needs: [disable_user, close_ticket]
    set: { done: true }
"#;

fn alert() -> Value {
    json!({"alert": {"title": "Bad IP", "entities": {"ips": ["198.51.100.7", "203.0.113.9"], "users": ["alice"]}}})
}

#[test]
fn block_branch_blocks_each_ip_then_disables_the_user_and_skips_the_close() {
    let p = pb(BLOCK_OR_IGNORE);
    let mut d = Drive::start(&p, alert());
    d.drain(&mut ok);
    assert_eq!(d.run.status, RunStatus::Waiting, "{:#?}", d.run.steps);
    assert_eq!(d.status("ask"), StepStatus::Waiting);
    let paths: Vec<&str> = d.sent.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/api/now/table/incident", "/post"]);
    assert_eq!(
        d.sent[1].body,
        Some(crate::http::Body::Json(
            json!({"text": "https://riposte/approvals/t-block"})
        ))
    );

    let mut fx = Effects::default();
    d.engine
        .decide(
            &mut d.run,
            &Answer {
                step: "ask",
                iteration: 0,
                choice: "block",
                by: "bob",
            },
            d.now,
            &mut fx,
        )
        .unwrap();
    d.push(fx);
    d.drain(&mut ok);
    let paths: Vec<&str> = d.sent.iter().skip(2).map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/block/198.51.100.7",
            "/block/203.0.113.9",
            "/users/alice/disable"
        ]
    );
    assert_eq!(d.status("close_ticket"), StepStatus::Skipped);
    assert_eq!(
        d.status("summary"),
        StepStatus::Succeeded,
        "the join runs after one branch"
    );
    assert_eq!(d.run.status, RunStatus::Succeeded);
    assert_eq!(
        d.run
            .step("block_ip")
            .unwrap()
            .output
            .as_ref()
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn ignore_branch_closes_the_ticket_and_skips_blocking() {
    let p = pb(BLOCK_OR_IGNORE);
    let mut d = Drive::start(&p, alert());
    d.drain(&mut ok);
    let mut fx = Effects::default();
    d.engine
        .decide(
            &mut d.run,
            &Answer {
                step: "ask",
                iteration: 0,
                choice: "ignore",
                by: "bob",
            },
            d.now,
            &mut fx,
        )
        .unwrap();
    d.push(fx);
    d.drain(&mut ok);
    assert_eq!(d.status("block_ip"), StepStatus::Skipped);
    assert_eq!(
        d.status("disable_user"),
        StepStatus::Skipped,
        "skips propagate down a branch"
    );
    assert_eq!(d.status("close_ticket"), StepStatus::Succeeded);
    assert_eq!(d.run.status, RunStatus::Succeeded);
    assert_eq!(d.sent.last().unwrap().method, "PATCH");
}

#[test]
fn an_unanswered_approval_takes_its_default_at_expiry() {
    let p = pb(BLOCK_OR_IGNORE);
    let mut d = Drive::start(&p, alert());
    d.drain(&mut ok);
    let (msg, at) = d.queue.pop_front().unwrap();
    assert_eq!(msg.kind, MessageKind::ApprovalExpired);
    // Delivered early (a clock skew, a fast timer): it waits.
    assert!(matches!(d.deliver(&msg, &mut ok), Claim::Busy(t) if t == at));
    d.now = at;
    assert_eq!(d.deliver(&msg, &mut ok), Claim::Settled);
    d.drain(&mut ok);
    let out = d.run.step("ask").unwrap().output.clone().unwrap();
    assert_eq!(out["choice"], "ignore");
    assert_eq!(out["expired"], true);
    assert_eq!(d.status("close_ticket"), StepStatus::Succeeded);
    // A human answering after expiry is refused.
    let mut fx = Effects::default();
    let err = d
        .engine
        .decide(
            &mut d.run,
            &Answer {
                step: "ask",
                iteration: 0,
                choice: "block",
                by: "bob",
            },
            d.now,
            &mut fx,
        )
        .unwrap_err();
    assert!(matches!(err, DecideError::AlreadyDecided { .. }));
}

#[test]
fn the_first_answer_wins_and_a_second_is_refused() {
    let p = pb(BLOCK_OR_IGNORE);
    let mut d = Drive::start(&p, alert());
    d.drain(&mut ok);
    let mut fx = Effects::default();
    d.engine
        .decide(
            &mut d.run,
            &Answer {
                step: "ask",
                iteration: 0,
                choice: "ignore",
                by: "bob",
            },
            d.now,
            &mut fx,
        )
        .unwrap();
    let err = d
        .engine
        .decide(
            &mut d.run,
            &Answer {
                step: "ask",
                iteration: 0,
                choice: "block",
                by: "eve",
            },
            d.now,
            &mut fx,
        )
        .unwrap_err();
    assert_eq!(
        err,
        DecideError::AlreadyDecided {
            choice: "ignore".into(),
            by: "bob".into()
        }
    );
    let err = d
        .engine
        .decide(
            &mut d.run,
            &Answer {
                step: "ask",
                iteration: 0,
                choice: "maybe",
                by: "eve",
            },
            d.now,
            &mut fx,
        )
        .unwrap_err();
    assert!(matches!(err, DecideError::AlreadyDecided { .. }));
}

#[test]
fn duplicate_late_and_out_of_order_messages_change_nothing() {
    let p = pb(BLOCK_OR_IGNORE);
    let mut d = Drive::start(&p, alert());
    let first = d.queue.front().unwrap().0.clone();
    d.drain(&mut ok);
    let before = d.run.clone();
    // The same message again, after the step finished.
    assert!(matches!(d.deliver(&first, &mut ok), Claim::Stale(_)));
    // A message from the future (attempt 2 that was never scheduled) and one for an unknown step.
    let future = StepMessage {
        attempt: 2,
        ..first.clone()
    };
    assert!(matches!(d.deliver(&future, &mut ok), Claim::Stale(_)));
    let unknown = StepMessage {
        step: "nope".into(),
        ..first.clone()
    };
    assert!(matches!(d.deliver(&unknown, &mut ok), Claim::Stale(_)));
    // A step that is not ready yet (out of order).
    let early = StepMessage {
        step: "disable_user".into(),
        ..first
    };
    assert!(matches!(d.deliver(&early, &mut ok), Claim::Stale(_)));
    assert_eq!(d.run, before, "no transition happened twice");
    assert_eq!(d.sent.len(), 2, "no request was sent twice");
}

#[test]
fn a_claimed_step_is_not_taken_twice_until_its_lease_ends() {
    let p = pb(BLOCK_OR_IGNORE);
    let mut d = Drive::start(&p, alert());
    let (msg, _) = d.queue.pop_front().unwrap();
    let mut fx = Effects::default();
    let claim = d.engine.claim(&mut d.run, &msg, d.now, None, &mut fx);
    assert!(matches!(claim, Claim::Execute(Work::Http(_))));
    // The same message delivered to a second worker while the first still works.
    let lease = match d.engine.claim(&mut d.run, &msg, d.now + 5, None, &mut fx) {
        Claim::Busy(until) => until,
        other => panic!("{other:?}"),
    };
    // The first worker died: after the lease the step is taken over, once.
    assert!(matches!(
        d.engine.claim(&mut d.run, &msg, lease, None, &mut fx),
        Claim::Execute(_)
    ));
    assert!(d.run.history.iter().any(|h| h.event == "worker_lost"));
    assert!(
        d.engine
            .finish(&mut d.run, &msg, Outcome::Done(json!({})), lease, &mut fx)
    );
    assert!(
        !d.engine
            .finish(&mut d.run, &msg, Outcome::Done(json!({})), lease, &mut fx),
        "a second result is stale"
    );
}

#[test]
fn retryable_failures_retry_with_backoff_then_fail_the_run() {
    let p = pb(BLOCK_OR_IGNORE);
    let mut d = Drive::start(&p, alert());
    let mut calls = 0;
    let start = d.now;
    d.drain(&mut |_| {
        calls += 1;
        Outcome::Failed {
            message: "HTTP 503".into(),
            retryable: true,
        }
    });
    assert_eq!(calls, 3, "default policy: 3 attempts");
    assert_eq!(d.now - start, 1_000 + 2_000, "1 s then 2 s");
    assert_eq!(d.run.status, RunStatus::Failed);
    assert!(
        d.run
            .error
            .as_ref()
            .unwrap()
            .contains("step `ticket` failed: HTTP 503")
    );
    assert_eq!(d.status("ask"), StepStatus::Cancelled);
    assert!(d.queue.is_empty());
}

#[test]
fn terminal_failures_do_not_retry_and_error_branches_run() {
    let src = r#"
id: t
name: t
steps:
  - id: a
    action: http.request
    with: { connection: x, method: GET, path: /a }
    on_error: { goto: [recover] }
  - id: next
    needs: [a]
    set: { x: 1 }
  - id: recover
    set: { recovered: "${{ steps.a.error }}" }
  - id: soft
    action: http.request
    with: { connection: x, method: GET, path: /soft }
    on_error: continue
  - id: after_soft
    needs: [soft]
    set: { ran: true }
"#;
    let p = pb(src);
    let mut d = Drive::start(&p, json!({}));
    let mut calls = 0;
    d.drain(&mut |_| {
        calls += 1;
        Outcome::Failed {
            message: "HTTP 404".into(),
            retryable: false,
        }
    });
    assert_eq!(calls, 2);
    assert_eq!(d.status("next"), StepStatus::Skipped);
    assert_eq!(d.status("recover"), StepStatus::Succeeded);
    assert_eq!(d.run.vars["recovered"], "HTTP 404");
    assert_eq!(d.status("soft"), StepStatus::Failed);
    assert_eq!(d.status("after_soft"), StepStatus::Succeeded);
    assert_eq!(d.run.status, RunStatus::Succeeded);
}

#[test]
fn conditions_skip_waits_wait_and_parallel_branches_join() {
    let src = r#"
id: t
name: t
steps:
  - id: a
    set: { n: 1 }
  - id: b
    set: { n: 2 }
  - id: only_if_high
    if: alert.severity == "High"
    set: { high: true }
  - id: pause
    needs: [a, b]
    wait: 10m
  - id: join
    needs: [pause, only_if_high]
    set: { sum: "${{ vars.n }}" }
"#;
    let p = pb(src);
    let mut d = Drive::start(&p, json!({"severity": "Low"}));
    let t0 = d.now;
    d.drain(&mut ok);
    assert_eq!(d.status("only_if_high"), StepStatus::Skipped);
    assert_eq!(d.status("pause"), StepStatus::Succeeded);
    assert_eq!(d.now - t0, 600_000);
    assert_eq!(d.status("join"), StepStatus::Succeeded);
    assert_eq!(d.run.status, RunStatus::Succeeded);
}

#[test]
fn an_empty_loop_succeeds_and_a_non_list_fails_with_its_reason() {
    let src = r#"
id: t
name: t
steps:
  - id: each
    for_each: alert.entities.ips
    action: core.noop
    with: { value: "${{ item }}" }
"#;
    let p = pb(src);
    let mut d = Drive::start(&p, json!({"entities": {"ips": []}}));
    d.drain(&mut ok);
    assert_eq!(d.run.status, RunStatus::Succeeded);
    let mut d = Drive::start(&p, json!({"entities": {"ips": "1.2.3.4"}}));
    d.drain(&mut ok);
    assert_eq!(d.run.status, RunStatus::Failed);
    assert!(
        d.run.error.as_ref().unwrap().contains("not a list"),
        "{:?}",
        d.run.error
    );
}

#[test]
fn a_cancelled_run_kills_its_approval() {
    let p = pb(BLOCK_OR_IGNORE);
    let mut d = Drive::start(&p, alert());
    d.drain(&mut ok);
    assert!(d.engine.cancel(&mut d.run, "carol", d.now));
    let mut fx = Effects::default();
    let err = d
        .engine
        .decide(
            &mut d.run,
            &Answer {
                step: "ask",
                iteration: 0,
                choice: "block",
                by: "bob",
            },
            d.now,
            &mut fx,
        )
        .unwrap_err();
    assert!(matches!(err, DecideError::Closed(_)), "{err:?}");
    d.now += 3_600_000;
    d.drain(&mut ok);
    assert_eq!(d.run.status, RunStatus::Cancelled);
}

#[test]
fn separate_approver_refuses_the_person_who_started_the_run() {
    let src = BLOCK_OR_IGNORE.replace(
        "name: Block or ignore",
        "name: Block or ignore\nseparate_approver: true",
    );
    let p = pb(&src);
    let mut d = Drive::start(&p, alert());
    d.drain(&mut ok);
    let mut fx = Effects::default();
    let err = d
        .engine
        .decide(
            &mut d.run,
            &Answer {
                step: "ask",
                iteration: 0,
                choice: "block",
                by: "ann",
            },
            d.now,
            &mut fx,
        )
        .unwrap_err();
    assert_eq!(err, DecideError::NotAllowed("ann".into()));
    d.engine
        .decide(
            &mut d.run,
            &Answer {
                step: "ask",
                iteration: 0,
                choice: "block",
                by: "bob",
            },
            d.now,
            &mut fx,
        )
        .unwrap();
}

#[test]
fn alert_text_never_changes_the_shape_of_a_request() {
    let p = pb(BLOCK_OR_IGNORE);
    let evil = json!({"alert": {"title": "\"}, \"admin\": true, \"x\": {\"${{ 1+1 }}", "entities": {"ips": ["../../admin"], "users": ["a/b?c"]}}});
    let mut d = Drive::start(&p, evil);
    d.drain(&mut ok);
    let mut fx = Effects::default();
    d.engine
        .decide(
            &mut d.run,
            &Answer {
                step: "ask",
                iteration: 0,
                choice: "block",
                by: "bob",
            },
            d.now,
            &mut fx,
        )
        .unwrap();
    d.push(fx);
    d.drain(&mut ok);
    assert_eq!(
        d.sent[0].body,
        Some(crate::http::Body::Json(
            json!({"short_description": "\"}, \"admin\": true, \"x\": {\"${{ 1+1 }}"})
        ))
    );
    assert_eq!(d.sent[2].path, "/block/..%2F..%2Fadmin");
    assert_eq!(d.sent[3].path, "/users/a%2Fb%3Fc/disable");
}

const ONE_WAY: &str = r#"
connector: bank
name: A vendor whose transfers must never repeat
hosts: ["*"]
auth: [none]
operations:
  transfer:
    idempotent: false
    inputs: { amount: { required: true } }
    request: { method: POST, path: /transfers, json: { amount: "${{ inputs.amount }}" } }
  lookup:
    idempotent: true
    inputs: { id: { required: true } }
    request: { method: GET, path: "/transfers/${{ inputs.id }}" }
"#;

fn declared(src: &str) -> Playbook {
    let mut catalog = crate::connector::ConnectorCatalog::default();
    catalog.add(ONE_WAY, Some("bank.yaml")).unwrap();
    load(src, None, &catalog).unwrap_or_else(|p| panic!("{p}"))
}

fn answer(d: &mut Drive<'_>, step: &str, choice: &str) -> Effects {
    let mut fx = Effects::default();
    d.engine
        .decide(
            &mut d.run,
            &Answer {
                step,
                iteration: 0,
                choice,
                by: "oncall@example.com",
            },
            d.now,
            &mut fx,
        )
        .unwrap();
    fx
}

#[test]
fn a_lost_worker_during_a_non_idempotent_call_asks_a_human_instead_of_calling_again() {
    let p = declared(
        "id: pay\nname: Pay\nsteps:\n  - id: pay\n    action: bank.transfer\n    with: { amount: 10 }\n",
    );
    let mut d = Drive::start(&p, json!({}));
    let (msg, _) = d.queue.pop_front().unwrap();
    let mut fx = Effects::default();
    let Claim::Execute(Work::Call(call)) = d.engine.claim(&mut d.run, &msg, d.now, None, &mut fx)
    else {
        panic!("expected a call");
    };
    assert_eq!(call.operation, "bank.transfer");
    assert_eq!(call.connection, "bank");
    assert_eq!(call.inputs, json!({"amount": 10}));
    // The worker dies mid-call. After its lease the message comes back: no second call, but a
    // lookup by the call's key; this connector has none, so the worker reports it unknown.
    let later = d.now + 10 * 60_000;
    let claim = d.engine.claim(&mut d.run, &msg, later, None, &mut fx);
    assert_eq!(claim, Claim::Execute(Work::Recover(call)));
    assert!(d.engine.finish(
        &mut d.run,
        &msg,
        Outcome::Unknown("the worker was lost during `bank.transfer`".into()),
        later,
        &mut fx
    ));
    assert_eq!(d.status("pay"), StepStatus::Waiting);
    assert_eq!(d.run.status, RunStatus::Waiting);
    let it = &d.run.step("pay").unwrap().iterations[0];
    let ap = it.approval.as_ref().unwrap();
    assert_eq!(ap.choices, ["retry", "done", "fail"]);
    assert!(ap.message.contains("bank.transfer"), "{}", ap.message);
    assert!(d.run.history.iter().any(|h| h.event == "outcome_unknown"));
    // The same message again changes nothing.
    assert!(matches!(
        d.engine.claim(&mut d.run, &msg, later + 1, None, &mut fx),
        Claim::Stale(_)
    ));

    // A human checked the bank: it went through.
    d.now = later;
    let fx = answer(&mut d, "pay", "done");
    assert!(fx.messages.is_empty());
    assert_eq!(d.status("pay"), StepStatus::Succeeded);
    assert_eq!(d.run.status, RunStatus::Succeeded);
    assert_eq!(
        d.run.step("pay").unwrap().iterations[0]
            .output
            .as_ref()
            .unwrap()["confirmed_by"],
        "oncall@example.com"
    );
}

#[test]
fn a_human_may_retry_an_unknown_call_or_fail_it() {
    let p = declared(
        "id: pay\nname: Pay\nsteps:\n  - id: pay\n    action: bank.transfer\n    with: { amount: 10 }\n",
    );
    for (choice, status) in [("retry", RunStatus::Succeeded), ("fail", RunStatus::Failed)] {
        let mut d = Drive::start(&p, json!({}));
        let (msg, _) = d.queue.pop_front().unwrap();
        let mut fx = Effects::default();
        assert!(matches!(
            d.engine.claim(&mut d.run, &msg, d.now, None, &mut fx),
            Claim::Execute(Work::Call(_))
        ));
        // The call timed out: the vendor may have acted.
        assert!(d.engine.finish(
            &mut d.run,
            &msg,
            Outcome::Unknown("timed out".into()),
            d.now,
            &mut fx
        ));
        assert_eq!(d.status("pay"), StepStatus::Waiting, "{choice}");
        let fx = answer(&mut d, "pay", choice);
        d.push(fx);
        let mut calls = 0;
        for _ in 0..4 {
            let Some((m, _)) = d.queue.pop_front() else {
                break;
            };
            let mut fx = Effects::default();
            if let Claim::Execute(Work::Call(_)) =
                d.engine.claim(&mut d.run, &m, d.now, None, &mut fx)
            {
                calls += 1;
                d.engine
                    .finish(&mut d.run, &m, Outcome::Done(json!({})), d.now, &mut fx);
            }
            d.push(fx);
        }
        assert_eq!(calls, usize::from(choice == "retry"), "{choice}");
        assert_eq!(d.run.status, status, "{choice}: {:#?}", d.run.history);
    }
}

#[test]
fn a_lost_worker_during_an_idempotent_call_is_simply_taken_over() {
    let p = declared(
        "id: look\nname: Look\nsteps:\n  - id: look\n    action: bank.lookup\n    with: { id: t-1 }\n",
    );
    let mut d = Drive::start(&p, json!({}));
    let (msg, _) = d.queue.pop_front().unwrap();
    let mut fx = Effects::default();
    assert!(matches!(
        d.engine.claim(&mut d.run, &msg, d.now, None, &mut fx),
        Claim::Execute(Work::Call(_))
    ));
    assert!(matches!(
        d.engine
            .claim(&mut d.run, &msg, d.now + 10 * 60_000, None, &mut fx),
        Claim::Execute(Work::Call(_))
    ));
}

#[test]
fn a_misspelt_or_missing_connector_input_is_an_error_at_load() {
    let mut catalog = crate::connector::ConnectorCatalog::default();
    catalog.add(ONE_WAY, Some("bank.yaml")).unwrap();
    let err = load(
        "id: pay\nname: Pay\nsteps:\n  - id: pay\n    action: bank.transfer\n    with: { amout: 10 }\n",
        Some("pay.yaml"),
        &catalog,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`bank.transfer` needs input `amount`"),
        "{err}"
    );
    assert!(err.contains("has no input `amout`"), "{err}");
    let err = load(
        "id: pay\nname: Pay\nsteps:\n  - id: pay\n    action: bank.wire\n",
        Some("pay.yaml"),
        &catalog,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("unknown operation `bank.wire` (known: bank.lookup, bank.transfer)"),
        "{err}"
    );
}

#[test]
fn a_step_carried_under_a_message_is_found_by_that_message_only_once_its_lease_ends() {
    let p = pb(
        "id: two\nname: Two\nsteps:\n  - id: a\n    set: { x: 1 }\n  - id: b\n    needs: [a]\n    action: http.request\n    with: { connection: c, method: GET, path: /b }\n",
    );
    let mut d = Drive::start(&p, json!({}));
    let (carrier, _) = d.queue.pop_front().unwrap();
    let mut fx = Effects::default();
    assert_eq!(
        d.engine.claim(&mut d.run, &carrier, d.now, None, &mut fx),
        Claim::Settled
    );
    // `a` made `b` ready: its worker claims it in the same write instead of sending it.
    let (next, _) = fx.messages.pop().unwrap();
    assert_eq!(next.step, "b");
    assert!(matches!(
        d.engine.claim(&mut d.run, &next, d.now, None, &mut fx),
        Claim::Execute(Work::Http(_))
    ));
    d.engine.mark_carried(&mut d.run, &next, &carrier);
    let it = &d.run.step("b").unwrap().iterations[0];
    let lease = it.lease_until.unwrap();
    assert_eq!(it.carrier.as_deref(), Some("a:0:1:Execute"));
    // While the lease lasts the carrier is told to wait; another message sees nothing.
    assert_eq!(
        d.engine.orphan(&d.run, &carrier, d.now + 1),
        Some(Err(lease))
    );
    let other = StepMessage {
        step: "b".into(),
        ..carrier.clone()
    };
    assert_eq!(d.engine.orphan(&d.run, &other, lease + 1), None);
    // After it, the carrier takes `b` over as if `b`'s own message had come.
    assert_eq!(
        d.engine.orphan(&d.run, &carrier, lease + 1),
        Some(Ok(StepMessage {
            kind: MessageKind::Execute,
            ..next.clone()
        }))
    );
    // Once recorded, nothing is carried any more.
    assert!(
        d.engine
            .finish(&mut d.run, &next, Outcome::Done(json!({})), d.now, &mut fx)
    );
    assert_eq!(d.run.step("b").unwrap().iterations[0].carrier, None);
    assert_eq!(d.engine.orphan(&d.run, &carrier, lease + 1), None);
}
