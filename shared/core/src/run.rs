//! A run: the state of one execution of one pinned playbook version, and its history.
//!
//! Guarantee: statuses only move along [`StepStatus::can_become`]; the engine checks it on every
//! change, and `history` is only ever appended to.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::Millis;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    Waiting,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl RunStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled | RunStatus::TimedOut
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Waiting => "waiting",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::TimedOut => "timed_out",
        }
    }
}

/// The status of a step or of one of its iterations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    Queued,
    Running,
    Waiting,
    Succeeded,
    Failed,
    Skipped,
    Cancelled,
}

impl StepStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StepStatus::Succeeded
                | StepStatus::Failed
                | StepStatus::Skipped
                | StepStatus::Cancelled
        )
    }

    /// The transition table: every status change the engine makes is one of these.
    pub fn can_become(self, to: StepStatus) -> bool {
        use StepStatus::*;
        matches!(
            (self, to),
            (
                Pending,
                Queued | Running | Succeeded | Failed | Skipped | Cancelled
            ) | (Queued, Running | Cancelled)
                | (
                    Running,
                    Succeeded | Failed | Waiting | Queued | Cancelled | Running
                )
                // Waiting -> Queued: a human asks to retry a call whose outcome was unknown.
                | (Waiting, Succeeded | Failed | Cancelled | Running | Queued)
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Queued => "queued",
            StepStatus::Running => "running",
            StepStatus::Waiting => "waiting",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
            StepStatus::Cancelled => "cancelled",
        }
    }
}

/// What started a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Trigger {
    /// An automation rule matched an alert or recommendation.
    Rule {
        rule_id: String,
        event_id: String,
        alert_id: String,
    },
    /// A person started it.
    Manual { by: String },
    /// A parent run's `playbook` step.
    Child {
        parent_run: String,
        step: String,
        iteration: u32,
        attempt: u32,
    },
}

/// A human's (or the timer's) answer to an approval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub choice: String,
    pub by: String,
    pub at: Millis,
    /// True when no one answered and the default was taken at expiry.
    #[serde(default)]
    pub expired: bool,
}

/// An approval waiting on (or answered by) a human. Only a hash of the link nonce is kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApprovalState {
    pub nonce_hash: String,
    pub message: String,
    pub choices: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    #[serde(default)]
    pub approvers: Vec<String>,
    pub expires_at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// What each notification returned (e.g. Slack's channel and ts), for `on_decided`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sent: Vec<Value>,
}

/// One execution of a step (one per item of a `for_each`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Iteration {
    pub status: StepStatus,
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Millis>,
    /// While running: when another worker may take over (the first one is presumed lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<Millis>,
    /// While running: the worker (process) that claimed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
    /// While running: claimed by the worker that finished the step before it, in the same write,
    /// with no message of its own; this names the message that worker was handling
    /// ([`StepMessage::carrier_key`]). If the worker is lost, that message is delivered again and
    /// takes this step over ([`crate::engine::Engine::orphan`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carrier: Option<String>,
    /// While waiting: when the wait, expiry or timeout fires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_run: Option<String>,
}

impl Run {
    /// The messages this run waits for and when each is due: one per waiting iteration with a
    /// wake time (an approval's expiry, the end of a `wait`, a child run's timeout), as the engine
    /// sent them when the iteration began to wait. A host may keep them with the run instead of
    /// queueing them (the DynamoDB store indexes the earliest) and send them when due.
    pub fn wakes(&self) -> Vec<(StepMessage, Millis)> {
        let mut out = Vec::new();
        if self.status.is_terminal() {
            return out;
        }
        for st in &self.steps {
            for (i, it) in st.iterations.iter().enumerate() {
                let (StepStatus::Waiting, Some(at)) = (it.status, it.wake_at) else {
                    continue;
                };
                let kind = if it.approval.is_some() {
                    MessageKind::ApprovalExpired
                } else if it.child_run.is_some() {
                    MessageKind::Timeout
                } else {
                    MessageKind::Resume
                };
                out.push((
                    StepMessage {
                        run_id: self.id.clone(),
                        step: st.id.clone(),
                        iteration: u32::try_from(i).unwrap_or(u32::MAX),
                        attempt: it.attempt,
                        kind,
                    },
                    at,
                ));
            }
        }
        out
    }
}

impl Iteration {
    pub fn new(item: Option<Value>) -> Iteration {
        Iteration {
            status: StepStatus::Queued,
            attempt: 1,
            item,
            input: None,
            output: None,
            error: None,
            started_at: None,
            finished_at: None,
            lease_until: None,
            claimed_by: None,
            carrier: None,
            wake_at: None,
            approval: None,
            child_run: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    pub id: String,
    pub status: StepStatus,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub iterations: Vec<Iteration>,
    /// True when the step ran once per item (its output is then a list).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub looped: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The value the step's switch took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Millis>,
}

/// One line of a run's append-only history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iteration: Option<u32>,
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The most history lines a run keeps; past it one line says what was dropped.
pub const MAX_HISTORY: usize = 5_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub id: String,
    pub playbook_id: String,
    pub playbook_version: u32,
    pub status: RunStatus,
    pub trigger: Trigger,
    pub input: Value,
    #[serde(default)]
    pub vars: serde_json::Map<String, Value>,
    pub steps: Vec<StepState>,
    pub created_at: Millis,
    pub updated_at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
}

impl Run {
    pub fn step(&self, id: &str) -> Option<&StepState> {
        self.steps.iter().find(|s| s.id == id)
    }

    pub(crate) fn log(
        &mut self,
        at: Millis,
        step: Option<&str>,
        iteration: Option<u32>,
        event: &str,
        detail: Option<String>,
    ) {
        if self.history.len() >= MAX_HISTORY {
            if self.history.len() == MAX_HISTORY {
                self.history.push(HistoryEntry {
                    at,
                    step: None,
                    iteration: None,
                    event: "history_truncated".into(),
                    detail: Some(format!("later entries beyond {MAX_HISTORY} are not kept")),
                });
            }
            return;
        }
        self.history.push(HistoryEntry {
            at,
            step: step.map(str::to_string),
            iteration,
            event: event.to_string(),
            detail,
        });
    }
}

/// What a queue message asks a worker to do for one iteration of one step.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// Run the step (or the retry named by `attempt`).
    Execute,
    /// A `wait` has elapsed.
    Resume,
    /// An approval's links expired: take the default choice.
    ApprovalExpired,
    /// A step's timeout fired while it was waiting.
    Timeout,
    /// A child run finished.
    ChildFinished,
    /// An approval was decided: update the channels it was sent through (`on_decided`).
    Announce,
}

/// A step message: names (run, step, iteration, attempt). A message whose attempt or status no
/// longer matches the run is stale and is acknowledged without effect.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StepMessage {
    pub run_id: String,
    pub step: String,
    pub iteration: u32,
    pub attempt: u32,
    pub kind: MessageKind,
}

impl StepMessage {
    /// The key a remote API sees for this side effect: the same for every retry of it.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}:{}", self.run_id, self.step, self.iteration)
    }

    /// Names this message among its run's messages, for the steps carried under it.
    pub fn carrier_key(&self) -> String {
        format!(
            "{}:{}:{}:{:?}",
            self.step, self.iteration, self.attempt, self.kind
        )
    }
}
