//! The engine: a pure state machine over a [`Run`] and its pinned [`Playbook`].
//!
//! It performs no I/O. A host loads a run, asks the engine what a message means ([`Engine::claim`]),
//! performs the [`Work`] it returns, reports the [`Outcome`] ([`Engine::finish`]), and commits the
//! changed run together with the messages in [`Effects`] in one conditional write.
//!
//! Guarantee: a step transition happens at most once. Every message names (step, iteration,
//! attempt); one that does not match the iteration's current attempt and status is stale and
//! changes nothing, so a message delivered twice, late or out of order is a no-op. Readiness,
//! skips, joins, loops, retries and run completion are all decided here and nowhere else.

use serde_json::{Value, json};

use crate::connector::{HTTP_REQUEST, NOOP, render_http};
use crate::expr::{EvalError, Scope, text_of};
use crate::http::HttpRequest;
use crate::model::Millis;
use crate::playbook::{Guard, OnError, Playbook, StepKind};
use crate::run::{
    ApprovalState, Decision, Iteration, MessageKind, Run, RunStatus, StepMessage, StepState,
    StepStatus, Trigger,
};

/// How long a worker holds a claimed step before another may take over, beyond its timeout.
pub const LEASE_GRACE_MS: Millis = 60_000;
/// Default per-attempt timeout of an action.
pub const DEFAULT_ACTION_TIMEOUT_MS: u64 = 30_000;
/// The most iterations a `for_each` may produce.
pub const MAX_ITERATIONS: usize = 1_000;

/// Messages to enqueue (with a delay in milliseconds) and runs to create, committed together with
/// the run's new state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Effects {
    pub messages: Vec<(StepMessage, u64)>,
    pub new_runs: Vec<Run>,
}

impl Effects {
    fn send(&mut self, msg: StepMessage, delay: u64) {
        self.messages.push((msg, delay));
    }
}

/// Links issued for an approval: per choice, the URL; and the hash of the nonce they carry.
#[derive(Clone, Debug, PartialEq)]
pub struct IssuedLinks {
    pub nonce_hash: String,
    pub links: serde_json::Map<String, Value>,
}

/// What a worker must do for a claimed step.
#[derive(Clone, Debug, PartialEq)]
pub enum Work {
    /// Send this request; report its response (or error) as the outcome.
    Http(HttpRequest),
    /// Run this declared connector operation; report its outputs (or error) as the outcome.
    Call(Call),
    /// A non-idempotent call's worker was lost: look up by its key whether it took effect (the
    /// outputs if so; a retryable failure if not; [`Outcome::Unknown`] when it cannot tell).
    Recover(Call),
    /// Send these notifications carrying the approval links; then report [`Outcome::Waiting`].
    Notify(Vec<NotifyWork>),
    /// Start this child run (it is in [`Effects::new_runs`] of the claim); report `Waiting`.
    StartChild,
    /// Nothing outside (set, noop, wait): settled by the engine itself, never returned.
    Local(Value),
    /// Tell the approval's channels how it was decided; best effort, nothing to record.
    Announce(Vec<NotifyWork>),
}

/// One declared operation to run, its inputs rendered.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// `<connector>.<operation>`.
    pub operation: String,
    pub connection: String,
    pub inputs: Value,
    /// Derived from (run, step, iteration): the same on every attempt.
    pub key: String,
    /// The step's `timeout`, applied to each request (when shorter than the connection's).
    pub timeout_ms: Option<u64>,
}

/// One approval notification.
#[derive(Clone, Debug, PartialEq)]
pub enum NotifyWork {
    Http(HttpRequest),
    Call(Call),
}

impl Engine<'_> {
    /// Queues the announcement of a decision when any channel has `on_decided`.
    fn announce(&self, si: usize, msg: &StepMessage, fx: &mut Effects) {
        if let StepKind::Approval(a) = &self.playbook.steps[si].kind
            && a.notify.iter().any(|n| n.on_decided.is_some())
        {
            fx.send(
                StepMessage {
                    kind: MessageKind::Announce,
                    ..msg.clone()
                },
                0,
            );
        }
    }

    /// The `on_decided` updates of a decided approval, rendered.
    fn announcement(&self, run: &Run, msg: &StepMessage) -> Claim {
        let Some((si, step)) = self.playbook.step(&msg.step) else {
            return Claim::Stale(format!("no step `{}`", msg.step));
        };
        let StepKind::Approval(a) = &step.kind else {
            return Claim::Stale("not an approval".into());
        };
        let Some(it) = run
            .steps
            .get(si)
            .and_then(|s| s.iterations.get(msg.iteration as usize))
        else {
            return Claim::Stale("no such iteration".into());
        };
        let Some((ap, d)) = it
            .approval
            .as_ref()
            .and_then(|ap| ap.decision.as_ref().map(|d| (ap, d)))
        else {
            return Claim::Stale("the approval is not decided".into());
        };
        let mut scope = self.scope(run, Some((it, msg.iteration)), &step.reads);
        scope.set(
            "decision",
            &json!({
                "choice": d.choice,
                "by": d.by,
                "at": d.at,
                "at_text": rfc3339(d.at),
                "expired": d.expired,
            }),
        );
        let mut work = Vec::new();
        for (i, n) in a.notify.iter().enumerate() {
            let Some((op, t)) = &n.on_decided else {
                continue;
            };
            scope.set("sent", ap.sent.get(i).unwrap_or(&Value::Null));
            let key = format!("{}/decided/{i}", msg.idempotency_key());
            let rendered = if op == HTTP_REQUEST {
                render_http(t, &scope, Some(key)).map(NotifyWork::Http)
            } else {
                declared_call(op, t, &scope, key).map(NotifyWork::Call)
            };
            match rendered {
                Ok(w) => work.push(w),
                Err(e) => {
                    tracing::warn!(message = "An approval update could not be rendered.", run_id = %run.id, step = %msg.step, error = %e)
                }
            }
        }
        Claim::Execute(Work::Announce(work))
    }
}

/// What notifications see as `approval`: `links` (choice to URL) and `buttons`, one per choice
/// in order: `{choice, label, url, value}` where `value` is the link's signed token (what a chat
/// callback sends back).
fn approval_scope(l: &IssuedLinks) -> Value {
    let buttons: Vec<Value> = l
        .links
        .iter()
        .map(|(choice, url)| {
            let url = url.as_str().unwrap_or_default();
            let mut label: Vec<char> = choice.replace(['_', '-'], " ").chars().collect();
            if let Some(c) = label.first_mut() {
                *c = c.to_ascii_uppercase();
            }
            json!({
                "choice": choice,
                "label": label.into_iter().collect::<String>(),
                "url": url,
                "value": url.rsplit('/').next().unwrap_or_default(),
            })
        })
        .collect();
    json!({"links": l.links, "buttons": buttons})
}

/// Milliseconds since the epoch as RFC 3339 UTC, e.g. `2026-01-01T00:00:00Z`.
pub fn rfc3339(ms: Millis) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Renders a declared operation's inputs; the connection is written literally (or is the
/// connector's id), never chosen by an expression.
fn declared_call(
    operation: &str,
    inputs: &crate::expr::Template,
    scope: &Scope,
    key: String,
) -> Result<Call, EvalError> {
    let connection =
        crate::connector::connection_of(operation, inputs).ok_or_else(|| EvalError {
            expr: operation.to_string(),
            message: "no connection".into(),
        })?;
    let mut rendered = inputs.render(scope)?;
    if let Value::Object(m) = &mut rendered {
        m.remove("connection");
    }
    Ok(Call {
        operation: operation.to_string(),
        connection,
        inputs: rendered,
        key,
        timeout_ms: None,
    })
}

/// What a message means for the run. Short-lived, so its size difference does not matter.
#[derive(Debug, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Claim {
    /// The step is claimed: persist the run (for side effects, before doing them), then do this.
    Execute(Work),
    /// The engine settled the message by itself: commit the run and effects.
    Settled,
    /// Stale or duplicate: acknowledge, change nothing.
    Stale(String),
    /// Another worker holds the step until this time: deliver again then.
    Busy(Millis),
}

/// How a claimed step's work ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Done(Value),
    Failed {
        message: String,
        retryable: bool,
    },
    /// The step now waits: for an approval, a timer or a child run.
    Waiting,
    /// A call that must not repeat may or may not have happened: a human decides.
    Unknown(String),
    /// The approval was sent; each notification's output, in order. The step now waits.
    Asked(Vec<Value>),
}

/// The choices offered when a non-idempotent call's outcome is unknown.
pub const UNKNOWN_OUTCOME_CHOICES: [&str; 3] = ["retry", "done", "fail"];

/// Why an approval answer is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecideError {
    #[error("this approval was already answered: {choice} by {by}")]
    AlreadyDecided { choice: String, by: String },
    #[error("this approval is no longer open (the run is {0})")]
    Closed(String),
    #[error("this approval expired")]
    Expired,
    #[error("`{0}` is not a choice of this approval")]
    BadChoice(String),
    #[error("no such approval in this run")]
    NotFound,
    #[error("{0} may not answer this approval")]
    NotAllowed(String),
}

/// Who is claiming steps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Worker {
    /// This worker's (process's) id, recorded on each claim.
    pub id: String,
    /// True when this worker is the only one that can exist for its store (the local runtime holds
    /// a lock on its database): a claim held by any other id is from a dead process and is taken
    /// over at once instead of after its lease.
    pub exclusive: bool,
}

/// A human's answer to one approval: which step and iteration, the choice, and who answered.
#[derive(Clone, Copy, Debug)]
pub struct Answer<'a> {
    pub step: &'a str,
    pub iteration: u32,
    pub choice: &'a str,
    pub by: &'a str,
}

/// The engine over one pinned playbook version.
pub struct Engine<'a> {
    pub playbook: &'a Playbook,
    pub worker: Worker,
}

fn set_status(st: &mut StepStatus, to: StepStatus) {
    debug_assert!(st.can_become(to), "{st:?} -> {to:?}");
    *st = to;
}

impl<'a> Engine<'a> {
    pub fn new(playbook: &'a Playbook) -> Engine<'a> {
        Engine {
            playbook,
            worker: Worker::default(),
        }
    }

    pub fn with_worker(playbook: &'a Playbook, worker: Worker) -> Engine<'a> {
        Engine { playbook, worker }
    }

    /// Creates a run and queues its first steps.
    pub fn start(&self, id: String, trigger: Trigger, input: Value, now: Millis) -> (Run, Effects) {
        let pb = self.playbook;
        let mut run = Run {
            id,
            playbook_id: pb.id().to_string(),
            playbook_version: pb.version,
            status: RunStatus::Queued,
            trigger,
            input,
            vars: Default::default(),
            steps: pb
                .steps
                .iter()
                .map(|s| StepState {
                    id: s.id.clone(),
                    status: StepStatus::Pending,
                    iterations: vec![],
                    looped: false,
                    output: None,
                    error: None,
                    switch_value: None,
                    started_at: None,
                    finished_at: None,
                })
                .collect(),
            created_at: now,
            updated_at: now,
            finished_at: None,
            error: None,
            history: vec![],
        };
        run.log(
            now,
            None,
            None,
            "run_created",
            Some(format!("{} v{}", pb.id(), pb.version)),
        );
        let mut fx = Effects::default();
        let reads: Vec<String> = pb.vars.exprs().iter().flat_map(|e| e.variables()).collect();
        match pb.vars.render(&self.scope(&run, None, &reads)) {
            Ok(Value::Object(m)) => run.vars = m,
            Ok(_) => {}
            Err(e) => {
                Self::fail_run(&mut run, now, format!("vars: {e}"));
                return (run, fx);
            }
        }
        let roots: Vec<usize> = (0..pb.steps.len())
            .filter(|&i| pb.steps[i].incoming.is_empty())
            .collect();
        for i in roots {
            self.activate(&mut run, i, now, &mut fx);
        }
        Self::update_status(&mut run, now, &mut fx);
        (run, fx)
    }

    /// The variables expressions see, for `step`'s iteration if given. Only the variables named
    /// in `reads` are built (converting a large alert into CEL values is the costly part).
    pub fn scope(
        &self,
        run: &Run,
        iteration: Option<(&Iteration, u32)>,
        reads: &[String],
    ) -> Scope {
        let mut s = Scope::new();
        let wants = |v: &str| reads.iter().any(|r| r == v);
        if wants("input") {
            s.set("input", &run.input);
        }
        if !wants("alert") {
            return self.scope_rest(s, run, iteration, &wants);
        }
        let alert = match &run.trigger {
            Trigger::Rule { .. } => &run.input,
            _ => run.input.get("alert").unwrap_or(&run.input),
        };
        s.set("alert", alert);
        self.scope_rest(s, run, iteration, &wants)
    }

    fn scope_rest(
        &self,
        mut s: Scope,
        run: &Run,
        iteration: Option<(&Iteration, u32)>,
        wants: &dyn Fn(&str) -> bool,
    ) -> Scope {
        if wants("vars") {
            s.set("vars", &Value::Object(run.vars.clone()));
        }
        if wants("steps") {
            let mut steps = serde_json::Map::new();
            for st in &run.steps {
                steps.insert(
                    st.id.clone(),
                    json!({
                        "status": st.status.as_str(),
                        "output": st.output.clone().unwrap_or(Value::Null),
                        "error": st.error.clone().unwrap_or_default(),
                    }),
                );
            }
            s.set("steps", &Value::Object(steps));
        }
        if wants("run") {
            let started_by = match &run.trigger {
                Trigger::Manual { by } => by.clone(),
                Trigger::Rule { rule_id, .. } => format!("rule:{rule_id}"),
                Trigger::Child { parent_run, .. } => format!("run:{parent_run}"),
            };
            s.set(
                "run",
                &json!({"id": run.id, "playbook": run.playbook_id, "version": run.playbook_version, "started_by": started_by}),
            );
        }
        if let Some((it, index)) = iteration {
            s.set("item", it.item.as_ref().unwrap_or(&Value::Null));
            s.set("index", &json!(index));
        }
        s
    }

    fn step_index(&self, run: &Run, msg: &StepMessage) -> Option<usize> {
        let (i, _) = self.playbook.step(&msg.step)?;
        (run.steps.get(i)?.id == msg.step).then_some(i)
    }

    /// Decides what a delivered message means. `links` must be given for an approval step's
    /// `Execute` (the host signs them); it is ignored otherwise. `child_id` names the child run a
    /// `playbook` step would start.
    pub fn claim(
        &self,
        run: &mut Run,
        msg: &StepMessage,
        now: Millis,
        links: Option<&IssuedLinks>,
        fx: &mut Effects,
    ) -> Claim {
        if msg.kind == MessageKind::Announce {
            // Announced even when the run has moved on or finished since the decision.
            return self.announcement(run, msg);
        }
        if run.status.is_terminal() {
            return Claim::Stale(format!("run is {}", run.status.as_str()));
        }
        let Some(si) = self.step_index(run, msg) else {
            return Claim::Stale(format!("no step `{}` in this run", msg.step));
        };
        let step = &self.playbook.steps[si];
        let Some(it) = run.steps[si].iterations.get(msg.iteration as usize) else {
            return Claim::Stale(format!("no iteration {} of `{}`", msg.iteration, msg.step));
        };
        if it.attempt != msg.attempt {
            return Claim::Stale(format!(
                "attempt {} is stale (current {})",
                msg.attempt, it.attempt
            ));
        }
        match msg.kind {
            MessageKind::Execute => {}
            MessageKind::Resume | MessageKind::ApprovalExpired | MessageKind::Timeout => {
                if it.status != StepStatus::Waiting {
                    return Claim::Stale(format!("step is {}", it.status.as_str()));
                }
                if let Some(wake) = it.wake_at
                    && wake > now
                {
                    return Claim::Busy(wake);
                }
                let outcome = match (&msg.kind, &step.kind) {
                    (MessageKind::Resume, StepKind::Wait { ms }) => {
                        Outcome::Done(json!({"waited_ms": ms}))
                    }
                    (MessageKind::ApprovalExpired, StepKind::Approval(_)) => {
                        let it = &mut run.steps[si].iterations[msg.iteration as usize];
                        let Some(ap) = it.approval.as_mut() else {
                            return Claim::Stale("no approval".into());
                        };
                        if ap.decision.is_some() {
                            return Claim::Stale("approval already answered".into());
                        }
                        match ap.default.clone() {
                            Some(choice) => {
                                let d = Decision {
                                    choice: choice.clone(),
                                    by: "expiry".into(),
                                    at: now,
                                    expired: true,
                                };
                                ap.decision = Some(d.clone());
                                run.log(
                                    now,
                                    Some(&msg.step),
                                    Some(msg.iteration),
                                    "approval_expired",
                                    Some(format!("no answer; default `{choice}` taken")),
                                );
                                self.announce(si, msg, fx);
                                Outcome::Done(decision_output(&d))
                            }
                            None => Outcome::Failed {
                                message: "approval expired with no answer and no default".into(),
                                retryable: false,
                            },
                        }
                    }
                    (MessageKind::Timeout, _) => Outcome::Failed {
                        message: format!(
                            "timed out after {} ms",
                            step.timeout_ms.unwrap_or_default()
                        ),
                        retryable: false,
                    },
                    _ => return Claim::Stale("message does not fit this step".into()),
                };
                self.settle(run, si, msg, outcome, now, fx);
                return Claim::Settled;
            }
            MessageKind::Announce => return Claim::Stale("announced above".into()),
            MessageKind::ChildFinished => {
                return Claim::Stale(
                    "child results are reported with Engine::child_finished".into(),
                );
            }
        }
        // Execute.
        let mut lost_call = false;
        match it.status {
            StepStatus::Queued => {}
            StepStatus::Running => match it.lease_until {
                Some(until)
                    if until > now
                        && !(self.worker.exclusive
                            && it.claimed_by.as_deref() != Some(self.worker.id.as_str())) =>
                {
                    return Claim::Busy(until);
                }
                _ => {
                    run.log(
                        now,
                        Some(&msg.step),
                        Some(msg.iteration),
                        "worker_lost",
                        Some(format!(
                            "attempt {} taken over after its lease ended",
                            msg.attempt
                        )),
                    );
                    if let StepKind::Action {
                        operation,
                        idempotent: false,
                        ..
                    } = &step.kind
                    {
                        lost_call = true;
                        if operation == HTTP_REQUEST || operation == NOOP {
                            let why = format!(
                                "the worker was lost during `{operation}`, which must not be \
                                 repeated blindly: check whether it took effect"
                            );
                            self.settle(run, si, msg, Outcome::Unknown(why), now, fx);
                            return Claim::Settled;
                        }
                    }
                }
            },
            other => return Claim::Stale(format!("step is {}", other.as_str())),
        }
        let index = msg.iteration;
        let scope = {
            let it = &run.steps[si].iterations[index as usize];
            let mut s = self.scope(run, Some((it, index)), &step.reads);
            if let Some(l) = links {
                s.set("approval", &approval_scope(l));
            }
            s
        };
        let key = Some(msg.idempotency_key());
        let lease =
            now + step.timeout_ms.unwrap_or(DEFAULT_ACTION_TIMEOUT_MS) as Millis + LEASE_GRACE_MS;
        let rendered: Result<(Work, Option<Value>), EvalError> = match &step.kind {
            StepKind::Action {
                operation, inputs, ..
            } if operation == HTTP_REQUEST => render_http(inputs, &scope, key).map(|mut r| {
                if r.timeout_ms.is_none() {
                    r.timeout_ms = step.timeout_ms;
                }
                let shown = serde_json::to_value(crate::http::redacted(&r)).ok();
                (Work::Http(r), shown)
            }),
            StepKind::Action {
                operation, inputs, ..
            } if operation == NOOP => inputs
                .render(&scope)
                .map(|v| (Work::Local(v.clone()), Some(v))),
            StepKind::Action {
                operation, inputs, ..
            } => declared_call(operation, inputs, &scope, msg.idempotency_key()).map(|mut c| {
                c.timeout_ms = step.timeout_ms;
                let shown = Some(c.inputs.clone());
                (Work::Call(c), shown)
            }),
            StepKind::Set { values } => values
                .render(&scope)
                .map(|v| (Work::Local(v.clone()), None)),
            StepKind::Wait { ms } => Ok((Work::Local(json!({"wait_ms": ms})), None)),
            StepKind::Approval(a) => match links {
                None => Err(EvalError {
                    expr: "approval".into(),
                    message: "the host issued no links".into(),
                }),
                Some(l) => (|| {
                    let message = text_of(&a.message.render(&scope)?);
                    let mut notify = Vec::new();
                    for (i, n) in a.notify.iter().enumerate() {
                        if n.operation == HTTP_REQUEST {
                            notify.push(NotifyWork::Http(render_http(
                                &n.inputs,
                                &scope,
                                key.clone(),
                            )?));
                        } else if n.operation != NOOP {
                            notify.push(NotifyWork::Call(declared_call(
                                &n.operation,
                                &n.inputs,
                                &scope,
                                format!("{}/notify/{i}", msg.idempotency_key()),
                            )?));
                        }
                    }
                    let it = &mut run.steps[si].iterations[index as usize];
                    it.approval = Some(ApprovalState {
                        nonce_hash: l.nonce_hash.clone(),
                        message: message.clone(),
                        choices: a.choices.clone(),
                        default: a.default.clone(),
                        approvers: a.approvers.clone(),
                        expires_at: now + a.expires_in_ms as Millis,
                        decision: None,
                        sent: vec![],
                    });
                    Ok((
                        Work::Notify(notify),
                        Some(json!({"message": message, "choices": a.choices})),
                    ))
                })(),
            },
            StepKind::Playbook { id, inputs } => inputs
                .render(&scope)
                .map(|v| (Work::StartChild, Some(json!({"playbook": id, "input": v})))),
        };
        let it = &mut run.steps[si].iterations[index as usize];
        set_status(&mut it.status, StepStatus::Running);
        it.started_at.get_or_insert(now);
        it.lease_until = Some(lease);
        it.claimed_by = Some(self.worker.id.clone());
        it.carrier = None;
        run.steps[si].started_at.get_or_insert(now);
        if run.steps[si].status == StepStatus::Queued {
            set_status(&mut run.steps[si].status, StepStatus::Running);
        }
        run.log(
            now,
            Some(&msg.step),
            Some(index),
            "started",
            Some(format!("attempt {}", msg.attempt)),
        );
        match rendered {
            Err(e) => {
                self.settle(
                    run,
                    si,
                    msg,
                    Outcome::Failed {
                        message: e.to_string(),
                        retryable: false,
                    },
                    now,
                    fx,
                );
                Claim::Settled
            }
            Ok((work, shown)) => {
                if let Some(v) = shown {
                    run.steps[si].iterations[index as usize].input = Some(v);
                }
                // Steps with nothing outside to do are settled here, in the same commit.
                match (&step.kind, work) {
                    (StepKind::Wait { .. }, _) => {
                        self.settle(run, si, msg, Outcome::Waiting, now, fx);
                        Claim::Settled
                    }
                    (_, Work::Local(v)) => {
                        self.settle(run, si, msg, Outcome::Done(v), now, fx);
                        Claim::Settled
                    }
                    // The lost call is looked up by its key, not made again.
                    (_, Work::Call(c)) if lost_call => {
                        self.claimed(run, si, msg, now, fx, Work::Recover(c))
                    }
                    (_, work) => self.claimed(run, si, msg, now, fx, work),
                }
            }
        }
    }

    fn claimed(
        &self,
        run: &mut Run,
        si: usize,
        msg: &StepMessage,
        now: Millis,
        fx: &mut Effects,
        work: Work,
    ) -> Claim {
        if matches!(work, Work::StartChild) {
            run.steps[si].iterations[msg.iteration as usize].child_run =
                Some(child_run_id(&run.id, msg));
        }
        Self::update_status(run, now, fx);
        Claim::Execute(work)
    }

    /// Marks a claimed step as carried: its worker claimed it in the write that finished the step
    /// before it, so no message of its own is in any queue. The message that worker was handling
    /// stays undeleted until the carried steps are recorded; delivered again, it takes them over
    /// ([`Engine::orphan`]).
    pub fn mark_carried(&self, run: &mut Run, msg: &StepMessage, carrier: &StepMessage) {
        if let Some(si) = self.step_index(run, msg)
            && let Some(it) = run.steps[si].iterations.get_mut(msg.iteration as usize)
            && it.status == StepStatus::Running
        {
            it.carrier = Some(carrier.carrier_key());
        }
    }

    /// A step carried under `carrier` whose worker is presumed lost: `Ok` with the message to
    /// handle for it (as if it had been delivered: the claim takes the step over); `Err(until)`
    /// while that worker's lease lasts; `None` when no step carried under it is running.
    pub fn orphan(
        &self,
        run: &Run,
        carrier: &StepMessage,
        now: Millis,
    ) -> Option<Result<StepMessage, Millis>> {
        if run.status.is_terminal() {
            return None;
        }
        let key = carrier.carrier_key();
        let mut busy_until = None;
        for st in &run.steps {
            for (i, it) in st.iterations.iter().enumerate() {
                if !(it.status == StepStatus::Running && it.carrier.as_deref() == Some(&key)) {
                    continue;
                }
                let lost = self.worker.exclusive
                    && it.claimed_by.as_deref() != Some(self.worker.id.as_str());
                match it.lease_until {
                    Some(until) if until > now && !lost => {
                        busy_until = Some(busy_until.map_or(until, |b: Millis| b.min(until)));
                    }
                    _ => {
                        return Some(Ok(StepMessage {
                            run_id: run.id.clone(),
                            step: st.id.clone(),
                            iteration: i as u32,
                            attempt: it.attempt,
                            kind: MessageKind::Execute,
                        }));
                    }
                }
            }
        }
        busy_until.map(Err)
    }

    /// What a claimed `playbook` step asks to start: (child playbook id, its input, trigger).
    pub fn child_request(&self, run: &Run, msg: &StepMessage) -> Option<(String, Value, Trigger)> {
        let si = self.step_index(run, msg)?;
        let StepKind::Playbook { id, .. } = &self.playbook.steps[si].kind else {
            return None;
        };
        let it = run.steps[si].iterations.get(msg.iteration as usize)?;
        let input = it
            .input
            .as_ref()?
            .get("input")
            .cloned()
            .unwrap_or(Value::Null);
        Some((
            id.clone(),
            input,
            Trigger::Child {
                parent_run: run.id.clone(),
                step: msg.step.clone(),
                iteration: msg.iteration,
                attempt: msg.attempt,
            },
        ))
    }

    /// Records the outcome of claimed work. A stale report changes nothing and returns false.
    pub fn finish(
        &self,
        run: &mut Run,
        msg: &StepMessage,
        outcome: Outcome,
        now: Millis,
        fx: &mut Effects,
    ) -> bool {
        if run.status.is_terminal() {
            return false;
        }
        let Some(si) = self.step_index(run, msg) else {
            return false;
        };
        match run.steps[si].iterations.get(msg.iteration as usize) {
            Some(it) if it.attempt == msg.attempt && it.status == StepStatus::Running => {}
            _ => return false,
        }
        self.settle(run, si, msg, outcome, now, fx);
        true
    }

    /// Records that a child run ended (`status`, its outputs).
    pub fn child_finished(
        &self,
        run: &mut Run,
        msg: &StepMessage,
        child: &Run,
        now: Millis,
        fx: &mut Effects,
    ) -> bool {
        let Some(si) = self.step_index(run, msg) else {
            return false;
        };
        match run.steps[si].iterations.get(msg.iteration as usize) {
            Some(it)
                if it.attempt == msg.attempt
                    && it.status == StepStatus::Waiting
                    && it.child_run.as_deref() == Some(child.id.as_str()) => {}
            _ => return false,
        }
        let outcome = if child.status == RunStatus::Succeeded {
            Outcome::Done(run_outputs(child))
        } else {
            Outcome::Failed {
                message: format!(
                    "child run {} {}: {}",
                    child.id,
                    child.status.as_str(),
                    child.error.clone().unwrap_or_default()
                ),
                retryable: false,
            }
        };
        self.settle(run, si, msg, outcome, now, fx);
        true
    }

    /// Records a human's answer to a waiting approval.
    pub fn decide(
        &self,
        run: &mut Run,
        answer: &Answer<'_>,
        now: Millis,
        fx: &mut Effects,
    ) -> Result<(), DecideError> {
        let Answer {
            step,
            iteration,
            choice,
            by,
        } = *answer;
        let si = self
            .playbook
            .step(step)
            .map(|(i, _)| i)
            .ok_or(DecideError::NotFound)?;
        let it = run
            .steps
            .get(si)
            .and_then(|s| s.iterations.get(iteration as usize))
            .ok_or(DecideError::NotFound)?;
        let ap = it.approval.as_ref().ok_or(DecideError::NotFound)?;
        if let Some(d) = &ap.decision {
            return Err(DecideError::AlreadyDecided {
                choice: d.choice.clone(),
                by: d.by.clone(),
            });
        }
        if run.status.is_terminal() {
            return Err(DecideError::Closed(run.status.as_str().into()));
        }
        if it.status != StepStatus::Waiting {
            return Err(DecideError::Closed(format!("step {}", it.status.as_str())));
        }
        if ap.expires_at <= now {
            return Err(DecideError::Expired);
        }
        if !ap.choices.iter().any(|c| c == choice) {
            return Err(DecideError::BadChoice(choice.into()));
        }
        if self.playbook.spec.separate_approver
            && let Trigger::Manual { by: starter } = &run.trigger
            && starter == by
        {
            return Err(DecideError::NotAllowed(by.into()));
        }
        let d = Decision {
            choice: choice.into(),
            by: by.into(),
            at: now,
            expired: false,
        };
        let attempt = it.attempt;
        if let Some(a) = run.steps[si].iterations[iteration as usize]
            .approval
            .as_mut()
        {
            a.decision = Some(d.clone());
        }
        run.log(
            now,
            Some(step),
            Some(iteration),
            "approval_answered",
            Some(format!("`{choice}` by {by}")),
        );
        let msg = StepMessage {
            run_id: run.id.clone(),
            step: step.into(),
            iteration,
            attempt,
            kind: MessageKind::Execute,
        };
        if let StepKind::Action { operation, .. } = &self.playbook.steps[si].kind {
            // A human settles a call whose outcome was unknown.
            match choice {
                "retry" => {
                    let it = &mut run.steps[si].iterations[iteration as usize];
                    set_status(&mut it.status, StepStatus::Queued);
                    it.attempt = attempt + 1;
                    fx.send(
                        StepMessage {
                            attempt: attempt + 1,
                            ..msg
                        },
                        0,
                    );
                }
                "done" => self.settle(
                    run,
                    si,
                    &msg,
                    Outcome::Done(json!({"confirmed_by": by, "confirmed_at": now})),
                    now,
                    fx,
                ),
                _ => self.settle(
                    run,
                    si,
                    &msg,
                    Outcome::Failed {
                        message: format!("`{operation}` marked failed by {by}"),
                        retryable: false,
                    },
                    now,
                    fx,
                ),
            }
            return Ok(());
        }
        self.settle(run, si, &msg, Outcome::Done(decision_output(&d)), now, fx);
        self.announce(si, &msg, fx);
        Ok(())
    }

    /// Cancels a run: nothing more is queued, waiting approvals die with it.
    pub fn cancel(&self, run: &mut Run, by: &str, now: Millis) -> bool {
        if run.status.is_terminal() {
            return false;
        }
        Self::close_open_steps(run, now);
        run.status = RunStatus::Cancelled;
        run.finished_at = Some(now);
        run.updated_at = now;
        run.error = Some(format!("cancelled by {by}"));
        run.log(now, None, None, "run_cancelled", Some(format!("by {by}")));
        true
    }

    /// Applies an outcome to an iteration (running or waiting) and everything it makes ready.
    fn settle(
        &self,
        run: &mut Run,
        si: usize,
        msg: &StepMessage,
        outcome: Outcome,
        now: Millis,
        fx: &mut Effects,
    ) {
        let step = &self.playbook.steps[si];
        let idx = msg.iteration as usize;
        let step_id = step.id.as_str();
        run.steps[si].iterations[idx].carrier = None;
        match outcome {
            Outcome::Done(v) => {
                let it = &mut run.steps[si].iterations[idx];
                set_status(&mut it.status, StepStatus::Succeeded);
                it.output = Some(v);
                it.error = None;
                it.finished_at = Some(now);
                it.lease_until = None;
                it.claimed_by = None;
                it.wake_at = None;
                run.log(now, Some(step_id), Some(msg.iteration), "succeeded", None);
                if let StepKind::Set { .. } = step.kind
                    && let Some(Value::Object(m)) = &run.steps[si].iterations[idx].output
                {
                    for (k, v) in m.clone() {
                        run.vars.insert(k, v);
                    }
                }
            }
            Outcome::Waiting => {
                let it = &mut run.steps[si].iterations[idx];
                set_status(&mut it.status, StepStatus::Waiting);
                it.lease_until = None;
                let (wake, kind) = match &step.kind {
                    StepKind::Wait { ms } => (Some(now + *ms as Millis), MessageKind::Resume),
                    StepKind::Approval(_) => (
                        it.approval.as_ref().map(|a| a.expires_at),
                        MessageKind::ApprovalExpired,
                    ),
                    _ => (
                        step.timeout_ms.map(|t| now + t as Millis),
                        MessageKind::Timeout,
                    ),
                };
                it.wake_at = wake;
                if let Some(at) = wake {
                    fx.send(
                        StepMessage {
                            kind,
                            ..msg.clone()
                        },
                        (at - now).max(0) as u64,
                    );
                }
                let detail = match &step.kind {
                    StepKind::Approval(_) => Some("waiting for an answer".to_string()),
                    StepKind::Playbook { .. } => {
                        it.child_run.as_ref().map(|c| format!("child run {c}"))
                    }
                    _ => None,
                };
                run.log(now, Some(step_id), Some(msg.iteration), "waiting", detail);
            }
            Outcome::Asked(sent) => {
                if let Some(a) = run.steps[si].iterations[idx].approval.as_mut() {
                    a.sent = sent;
                }
                self.settle(run, si, msg, Outcome::Waiting, now, fx);
            }
            Outcome::Unknown(message) => {
                let it = &mut run.steps[si].iterations[idx];
                set_status(&mut it.status, StepStatus::Waiting);
                it.lease_until = None;
                it.claimed_by = None;
                it.wake_at = None;
                it.error = Some(message.clone());
                it.approval = Some(ApprovalState {
                    nonce_hash: String::new(),
                    message: format!(
                        "{message}. Answer `retry` to call again, `done` if it took effect, \
                         `fail` to fail the step."
                    ),
                    choices: UNKNOWN_OUTCOME_CHOICES.map(String::from).to_vec(),
                    default: None,
                    approvers: vec![],
                    // Open until a human answers or the run is cancelled.
                    expires_at: Millis::MAX,
                    decision: None,
                    sent: vec![],
                });
                run.log(
                    now,
                    Some(step_id),
                    Some(msg.iteration),
                    "outcome_unknown",
                    Some(message),
                );
            }
            Outcome::Failed { message, retryable } => {
                let attempt = run.steps[si].iterations[idx].attempt;
                let it = &mut run.steps[si].iterations[idx];
                it.lease_until = None;
                it.wake_at = None;
                if retryable
                    && attempt < step.retry.max_attempts
                    && it.status == StepStatus::Running
                {
                    let delay = step.retry.delay_before(attempt + 1);
                    set_status(&mut it.status, StepStatus::Queued);
                    it.attempt = attempt + 1;
                    it.error = Some(message.clone());
                    fx.send(
                        StepMessage {
                            attempt: attempt + 1,
                            kind: MessageKind::Execute,
                            ..msg.clone()
                        },
                        delay,
                    );
                    run.log(
                        now,
                        Some(step_id),
                        Some(msg.iteration),
                        "retry_scheduled",
                        Some(format!(
                            "attempt {} failed: {message}; attempt {} in {delay} ms",
                            attempt,
                            attempt + 1
                        )),
                    );
                } else {
                    set_status(&mut it.status, StepStatus::Failed);
                    it.error = Some(message.clone());
                    it.finished_at = Some(now);
                    run.log(
                        now,
                        Some(step_id),
                        Some(msg.iteration),
                        "failed",
                        Some(message),
                    );
                }
            }
        }
        if run.steps[si]
            .iterations
            .iter()
            .all(|it| it.status.is_terminal())
        {
            self.complete_step(run, si, now, fx);
        } else {
            // Not finished: the step shows whether it is still working or only waiting.
            let st = &mut run.steps[si];
            let working = st
                .iterations
                .iter()
                .any(|it| matches!(it.status, StepStatus::Queued | StepStatus::Running));
            let to = if working {
                StepStatus::Running
            } else {
                StepStatus::Waiting
            };
            if st.status != to {
                set_status(&mut st.status, to);
            }
        }
        Self::update_status(run, now, fx);
    }

    /// All iterations are terminal: the step's own result, its switch, and what it unblocks.
    fn complete_step(&self, run: &mut Run, si: usize, now: Millis, fx: &mut Effects) {
        let step = &self.playbook.steps[si];
        let st = &mut run.steps[si];
        let failed = st
            .iterations
            .iter()
            .find(|it| it.status == StepStatus::Failed);
        let error = failed.and_then(|it| it.error.clone());
        let output = if st.looped {
            Value::Array(
                st.iterations
                    .iter()
                    .map(|it| it.output.clone().unwrap_or(Value::Null))
                    .collect(),
            )
        } else {
            st.iterations
                .first()
                .and_then(|it| it.output.clone())
                .unwrap_or(Value::Null)
        };
        st.output = Some(output.clone());
        st.finished_at = Some(now);
        if let Some(e) = error {
            set_status(&mut st.status, StepStatus::Failed);
            st.error = Some(e.clone());
            run.log(now, Some(&step.id), None, "step_failed", Some(e.clone()));
            if step.on_error == OnError::Fail {
                Self::fail_run(run, now, format!("step `{}` failed: {e}", step.id));
                return;
            }
        } else {
            set_status(&mut st.status, StepStatus::Succeeded);
        }
        let continued =
            run.steps[si].status == StepStatus::Succeeded || step.on_error == OnError::Continue;
        if continued && let Some(sw) = &step.switch {
            let mut scope = self.scope(run, None, &step.reads);
            scope.set("output", &output);
            match sw.on.eval(&scope) {
                Ok(v) => {
                    let text = text_of(&v);
                    run.log(
                        now,
                        Some(&step.id),
                        None,
                        "switch",
                        Some(format!("took `{text}`")),
                    );
                    run.steps[si].switch_value = Some(text);
                }
                Err(e) => {
                    run.log(
                        now,
                        Some(&step.id),
                        None,
                        "switch",
                        Some(format!("no value ({e}); default taken")),
                    );
                    run.steps[si].switch_value = None;
                }
            }
        }
        for &to in &step.outgoing {
            self.activate(run, to, now, fx);
        }
    }

    fn edge_live(&self, run: &Run, from: usize, guard: &Guard) -> bool {
        let src = &self.playbook.steps[from];
        let st = &run.steps[from];
        let done = st.status == StepStatus::Succeeded
            || (st.status == StepStatus::Failed && src.on_error == OnError::Continue);
        match guard {
            Guard::Done => done,
            Guard::Case(v) => done && st.switch_value.as_deref() == Some(v.as_str()),
            Guard::Default => {
                done && src.switch.as_ref().is_some_and(|sw| {
                    st.switch_value
                        .as_ref()
                        .is_none_or(|v| !sw.cases.contains_key(v))
                })
            }
            Guard::Error => {
                st.status == StepStatus::Failed && matches!(src.on_error, OnError::Goto(_))
            }
        }
    }

    /// Makes a pending step ready if everything it needs is finished: queue it, or skip it.
    fn activate(&self, run: &mut Run, si: usize, now: Millis, fx: &mut Effects) {
        if run.status.is_terminal() || run.steps[si].status != StepStatus::Pending {
            return;
        }
        let step = &self.playbook.steps[si];
        if step
            .incoming
            .iter()
            .any(|e| !run.steps[e.from].status.is_terminal())
        {
            return;
        }
        let live = step.incoming.is_empty()
            || step
                .incoming
                .iter()
                .any(|e| self.edge_live(run, e.from, &e.guard));
        let skip = |run: &mut Run, why: String| {
            set_status(&mut run.steps[si].status, StepStatus::Skipped);
            run.steps[si].finished_at = Some(now);
            run.log(now, Some(&step.id), None, "skipped", Some(why));
        };
        if !live {
            skip(run, "no path into it was taken".into());
            for &to in &step.outgoing {
                self.activate(run, to, now, fx);
            }
            return;
        }
        let scope = self.scope(run, None, &step.reads);
        if let Some(cond) = &step.condition {
            match cond.eval_bool(&scope) {
                Ok(true) => {}
                Ok(false) => {
                    skip(run, format!("`if: {}` is false", cond.source()));
                    for &to in &step.outgoing {
                        self.activate(run, to, now, fx);
                    }
                    return;
                }
                Err(e) => {
                    self.fail_before_start(run, si, format!("if: {e}"), now, fx);
                    return;
                }
            }
        }
        let items: Option<Vec<Value>> = match &step.for_each {
            None => None,
            Some(e) => match e.eval(&scope) {
                Ok(Value::Array(items)) if items.len() <= MAX_ITERATIONS => Some(items),
                Ok(Value::Array(items)) => {
                    self.fail_before_start(
                        run,
                        si,
                        format!(
                            "for_each: {} items; the limit is {MAX_ITERATIONS}",
                            items.len()
                        ),
                        now,
                        fx,
                    );
                    return;
                }
                Ok(other) => {
                    self.fail_before_start(
                        run,
                        si,
                        format!(
                            "for_each: `{}` gave {}, not a list",
                            e.source(),
                            crate::expr::type_name(&other)
                        ),
                        now,
                        fx,
                    );
                    return;
                }
                Err(err) => {
                    self.fail_before_start(run, si, format!("for_each: {err}"), now, fx);
                    return;
                }
            },
        };
        let st = &mut run.steps[si];
        st.looped = items.is_some();
        st.iterations = match items {
            None => vec![Iteration::new(None)],
            Some(items) => items.into_iter().map(|v| Iteration::new(Some(v))).collect(),
        };
        if st.iterations.is_empty() {
            set_status(&mut st.status, StepStatus::Succeeded);
            st.output = Some(Value::Array(vec![]));
            st.finished_at = Some(now);
            run.log(
                now,
                Some(&step.id),
                None,
                "succeeded",
                Some("for_each over an empty list".into()),
            );
            let sw_default = step.switch.is_some();
            if sw_default {
                run.steps[si].switch_value = None;
            }
            for &to in &step.outgoing {
                self.activate(run, to, now, fx);
            }
            return;
        }
        set_status(&mut st.status, StepStatus::Queued);
        let n = st.iterations.len();
        for i in 0..n {
            fx.send(
                StepMessage {
                    run_id: run.id.clone(),
                    step: step.id.clone(),
                    iteration: i as u32,
                    attempt: 1,
                    kind: MessageKind::Execute,
                },
                0,
            );
        }
        run.log(
            now,
            Some(&step.id),
            None,
            "queued",
            (n > 1).then(|| format!("{n} iterations")),
        );
    }

    /// A step that could not even start (its condition or list failed to evaluate).
    fn fail_before_start(
        &self,
        run: &mut Run,
        si: usize,
        error: String,
        now: Millis,
        fx: &mut Effects,
    ) {
        let step = &self.playbook.steps[si];
        let st = &mut run.steps[si];
        set_status(&mut st.status, StepStatus::Failed);
        st.error = Some(error.clone());
        st.finished_at = Some(now);
        run.log(
            now,
            Some(&step.id),
            None,
            "step_failed",
            Some(error.clone()),
        );
        if step.on_error == OnError::Fail {
            Self::fail_run(run, now, format!("step `{}` failed: {error}", step.id));
            return;
        }
        for &to in &step.outgoing {
            self.activate(run, to, now, fx);
        }
    }

    fn close_open_steps(run: &mut Run, now: Millis) {
        for st in &mut run.steps {
            for it in &mut st.iterations {
                if !it.status.is_terminal() {
                    set_status(&mut it.status, StepStatus::Cancelled);
                    it.finished_at = Some(now);
                    it.lease_until = None;
                    it.wake_at = None;
                }
            }
            if !st.status.is_terminal() {
                set_status(&mut st.status, StepStatus::Cancelled);
                st.finished_at = Some(now);
            }
        }
    }

    fn fail_run(run: &mut Run, now: Millis, error: String) {
        Self::close_open_steps(run, now);
        run.status = RunStatus::Failed;
        run.finished_at = Some(now);
        run.log(now, None, None, "run_failed", Some(error.clone()));
        run.error = Some(error);
    }

    /// Fails a run that cannot go on (its messages keep failing, its playbook cannot be loaded):
    /// open steps are cancelled and a parent run is told. Returns false if it had already ended.
    pub fn abandon(run: &mut Run, reason: String, now: Millis, fx: &mut Effects) -> bool {
        if run.status.is_terminal() {
            return false;
        }
        Self::fail_run(run, now, reason);
        Self::update_status(run, now, fx);
        true
    }

    /// Recomputes the run's status; when it ends, tells a parent run.
    fn update_status(run: &mut Run, now: Millis, fx: &mut Effects) {
        run.updated_at = now;
        if !run.status.is_terminal() {
            let all_done = run.steps.iter().all(|s| s.status.is_terminal());
            let active = run
                .steps
                .iter()
                .flat_map(|s| &s.iterations)
                .any(|it| matches!(it.status, StepStatus::Queued | StepStatus::Running));
            let waiting = run
                .steps
                .iter()
                .flat_map(|s| &s.iterations)
                .any(|it| it.status == StepStatus::Waiting);
            run.status = if all_done {
                run.finished_at = Some(now);
                run.log(now, None, None, "run_succeeded", None);
                RunStatus::Succeeded
            } else if active {
                if run.steps.iter().any(|s| s.started_at.is_some()) {
                    RunStatus::Running
                } else {
                    RunStatus::Queued
                }
            } else if waiting {
                RunStatus::Waiting
            } else {
                RunStatus::Running
            };
        }
        if run.status.is_terminal()
            && let Trigger::Child {
                parent_run,
                step,
                iteration,
                attempt,
            } = &run.trigger
            && !fx
                .messages
                .iter()
                .any(|(m, _)| m.kind == MessageKind::ChildFinished && &m.run_id == parent_run)
        {
            fx.send(
                StepMessage {
                    run_id: parent_run.clone(),
                    step: step.clone(),
                    iteration: *iteration,
                    attempt: *attempt,
                    kind: MessageKind::ChildFinished,
                },
                0,
            );
        }
    }
}

/// The id of the child run a `playbook` step's attempt starts: derived, so a redelivered
/// message cannot start a second child.
pub fn child_run_id(parent: &str, msg: &StepMessage) -> String {
    format!("{parent}.{}.{}.{}", msg.step, msg.iteration, msg.attempt)
}

fn decision_output(d: &Decision) -> Value {
    json!({"choice": d.choice, "decided_by": d.by, "decided_at": d.at, "expired": d.expired})
}

/// A finished run's outputs: every step's output by id.
pub fn run_outputs(run: &Run) -> Value {
    Value::Object(
        run.steps
            .iter()
            .map(|s| (s.id.clone(), s.output.clone().unwrap_or(Value::Null)))
            .collect(),
    )
}

#[cfg(test)]
mod tests;
