//! Fault injection around a [`Store`], shared by the tests that make the store fail on purpose
//! (`tests/simulation.rs`, `tests/crash_sweep.rs`, `tests/aws_crash_sweep.rs`).
//!
//! [`Wrapped`] implements every [`Store`] method once: it describes the call as an [`Op`] (which
//! method, with its arguments) and hands the [`Hook`] the inner store's (not yet started) future.
//! The hook decides what happens at that operation: run it, fail it before it is applied, apply it
//! and lose the reply, pause, count and label it... Each test keeps only that decision.
//!
//! [`HistorySeen`] labels a run write by what it adds to the run's history, as the crash sweeps
//! log it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use serde_json::Value;

use riposte_core::engine::Effects;
use riposte_core::model::{AlertKind, Millis};
use riposte_core::playbook::PlaybookSpec;
use riposte_core::rule::Rule;
use riposte_core::run::{Run, RunStatus};
use riposte_core::store::{AuditEntry, EventRecord, RunSummary, Store, StoreError, StoredPlaybook};

/// Whether an operation only reads, or may change what is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `get_*`, `list_*`, `load_run`.
    Read,
    /// Everything else (`take_token` too: it takes a token).
    Write,
}

/// One [`Store`] call: the method and its arguments.
#[derive(Clone, Copy)]
pub enum Op<'a> {
    PutPlaybook {
        spec: &'a PlaybookSpec,
        by: &'a str,
        at: Millis,
    },
    GetPlaybook {
        id: &'a str,
        version: Option<u32>,
    },
    ListPlaybooks,
    DeletePlaybook {
        id: &'a str,
    },
    PutRule {
        rule: &'a Rule,
    },
    GetRule {
        id: &'a str,
    },
    ListRules {
        trigger: Option<AlertKind>,
    },
    DeleteRule {
        id: &'a str,
    },
    CreateRun {
        run: &'a Run,
        fx: &'a Effects,
    },
    LoadRun {
        id: &'a str,
    },
    /// [`Store::load_run_lagging`].
    LoadRunLagging {
        id: &'a str,
    },
    SaveRun {
        run: &'a Run,
        version: u64,
        fx: &'a Effects,
    },
    ListRuns {
        limit: usize,
        status: Option<RunStatus>,
    },
    PutEvent {
        record: &'a EventRecord,
    },
    GetEvent {
        id: &'a str,
    },
    AppendAudit {
        entry: &'a AuditEntry,
    },
    ListAudit {
        limit: usize,
    },
    GetSetting {
        key: &'a str,
    },
    PutSetting {
        key: &'a str,
        value: &'a Value,
    },
    TakeToken {
        bucket: &'a str,
        max: u32,
        expires_at: Millis,
    },
}

impl<'a> Op<'a> {
    /// The [`Store`] method's name, e.g. `save_run`.
    pub fn name(&self) -> &'static str {
        match self {
            Op::PutPlaybook { .. } => "put_playbook",
            Op::GetPlaybook { .. } => "get_playbook",
            Op::ListPlaybooks => "list_playbooks",
            Op::DeletePlaybook { .. } => "delete_playbook",
            Op::PutRule { .. } => "put_rule",
            Op::GetRule { .. } => "get_rule",
            Op::ListRules { .. } => "list_rules",
            Op::DeleteRule { .. } => "delete_rule",
            Op::CreateRun { .. } => "create_run",
            Op::LoadRun { .. } => "load_run",
            Op::LoadRunLagging { .. } => "load_run_lagging",
            Op::SaveRun { .. } => "save_run",
            Op::ListRuns { .. } => "list_runs",
            Op::PutEvent { .. } => "put_event",
            Op::GetEvent { .. } => "get_event",
            Op::AppendAudit { .. } => "append_audit",
            Op::ListAudit { .. } => "list_audit",
            Op::GetSetting { .. } => "get_setting",
            Op::PutSetting { .. } => "put_setting",
            Op::TakeToken { .. } => "take_token",
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Op::GetPlaybook { .. }
            | Op::ListPlaybooks
            | Op::GetRule { .. }
            | Op::ListRules { .. }
            | Op::LoadRun { .. }
            | Op::LoadRunLagging { .. }
            | Op::ListRuns { .. }
            | Op::GetEvent { .. }
            | Op::ListAudit { .. }
            | Op::GetSetting { .. } => Kind::Read,
            Op::PutPlaybook { .. }
            | Op::DeletePlaybook { .. }
            | Op::PutRule { .. }
            | Op::DeleteRule { .. }
            | Op::CreateRun { .. }
            | Op::SaveRun { .. }
            | Op::PutEvent { .. }
            | Op::AppendAudit { .. }
            | Op::PutSetting { .. }
            | Op::TakeToken { .. } => Kind::Write,
        }
    }

    /// The run written, for `create_run` and `save_run`.
    pub fn run(&self) -> Option<&'a Run> {
        match *self {
            Op::CreateRun { run, .. } | Op::SaveRun { run, .. } => Some(run),
            _ => None,
        }
    }
}

/// What a test does at each store operation.
pub trait Hook: Send + Sync {
    /// Called for every operation, with `call`, the inner store's future for it (nothing happens
    /// until it is polled): await it to apply the operation, drop it to skip it.
    fn around<T: Send>(
        &self,
        op: Op<'_>,
        call: BoxFuture<'_, Result<T, StoreError>>,
    ) -> impl Future<Output = Result<T, StoreError>> + Send;

    /// After a `load_run` that returned a run (whatever [`Hook::around`] let through).
    fn loaded(&self, _run: &Run) {}
}

/// A store whose every operation goes through `hook`.
pub struct Wrapped<H> {
    pub inner: Arc<dyn Store>,
    pub hook: H,
}

impl<H: Hook> Wrapped<H> {
    pub fn new(inner: Arc<dyn Store>, hook: H) -> Wrapped<H> {
        Wrapped { inner, hook }
    }
}

#[async_trait]
impl<H: Hook> Store for Wrapped<H> {
    async fn put_playbook(
        &self,
        spec: &PlaybookSpec,
        by: &str,
        at: Millis,
    ) -> Result<u32, StoreError> {
        let op = Op::PutPlaybook { spec, by, at };
        let call = self.inner.put_playbook(spec, by, at);
        self.hook.around(op, call).await
    }
    async fn get_playbook(
        &self,
        id: &str,
        version: Option<u32>,
    ) -> Result<Option<StoredPlaybook>, StoreError> {
        let op = Op::GetPlaybook { id, version };
        let call = self.inner.get_playbook(id, version);
        self.hook.around(op, call).await
    }
    async fn latest_playbook_version(&self, id: &str) -> Result<Option<u32>, StoreError> {
        let op = Op::GetPlaybook { id, version: None };
        let call = self.inner.latest_playbook_version(id);
        self.hook.around(op, call).await
    }
    async fn list_playbooks(&self) -> Result<Vec<StoredPlaybook>, StoreError> {
        let call = self.inner.list_playbooks();
        self.hook.around(Op::ListPlaybooks, call).await
    }
    async fn delete_playbook(&self, id: &str) -> Result<bool, StoreError> {
        let call = self.inner.delete_playbook(id);
        self.hook.around(Op::DeletePlaybook { id }, call).await
    }
    async fn put_rule(&self, rule: &Rule) -> Result<(), StoreError> {
        let call = self.inner.put_rule(rule);
        self.hook.around(Op::PutRule { rule }, call).await
    }
    async fn get_rule(&self, id: &str) -> Result<Option<Rule>, StoreError> {
        let call = self.inner.get_rule(id);
        self.hook.around(Op::GetRule { id }, call).await
    }
    async fn list_rules(&self, trigger: Option<AlertKind>) -> Result<Vec<Rule>, StoreError> {
        let call = self.inner.list_rules(trigger);
        self.hook.around(Op::ListRules { trigger }, call).await
    }
    async fn delete_rule(&self, id: &str) -> Result<bool, StoreError> {
        let call = self.inner.delete_rule(id);
        self.hook.around(Op::DeleteRule { id }, call).await
    }
    async fn create_run(&self, run: &Run, fx: &Effects) -> Result<bool, StoreError> {
        let call = self.inner.create_run(run, fx);
        self.hook.around(Op::CreateRun { run, fx }, call).await
    }
    async fn load_run_lagging(&self, id: &str) -> Result<Option<(Run, u64)>, StoreError> {
        let call = self.inner.load_run_lagging(id);
        self.hook.around(Op::LoadRunLagging { id }, call).await
    }
    async fn load_run(&self, id: &str) -> Result<Option<(Run, u64)>, StoreError> {
        let call = self.inner.load_run(id);
        let loaded = self.hook.around(Op::LoadRun { id }, call).await;
        if let Ok(Some((run, _))) = &loaded {
            self.hook.loaded(run);
        }
        loaded
    }
    async fn save_run(&self, run: &Run, version: u64, fx: &Effects) -> Result<(), StoreError> {
        let op = Op::SaveRun { run, version, fx };
        let call = self.inner.save_run(run, version, fx);
        self.hook.around(op, call).await
    }
    async fn list_runs(
        &self,
        limit: usize,
        status: Option<RunStatus>,
    ) -> Result<Vec<RunSummary>, StoreError> {
        let call = self.inner.list_runs(limit, status);
        self.hook.around(Op::ListRuns { limit, status }, call).await
    }
    async fn put_event(&self, record: &EventRecord) -> Result<(), StoreError> {
        let call = self.inner.put_event(record);
        self.hook.around(Op::PutEvent { record }, call).await
    }
    async fn get_event(&self, id: &str) -> Result<Option<EventRecord>, StoreError> {
        let call = self.inner.get_event(id);
        self.hook.around(Op::GetEvent { id }, call).await
    }
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let call = self.inner.append_audit(entry);
        self.hook.around(Op::AppendAudit { entry }, call).await
    }
    async fn list_audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let call = self.inner.list_audit(limit);
        self.hook.around(Op::ListAudit { limit }, call).await
    }
    async fn get_setting(&self, key: &str) -> Result<Option<Value>, StoreError> {
        let call = self.inner.get_setting(key);
        self.hook.around(Op::GetSetting { key }, call).await
    }
    async fn put_setting(&self, key: &str, value: &Value) -> Result<(), StoreError> {
        let call = self.inner.put_setting(key, value);
        self.hook.around(Op::PutSetting { key, value }, call).await
    }
    async fn take_token(
        &self,
        bucket: &str,
        max: u32,
        expires_at: Millis,
    ) -> Result<bool, StoreError> {
        let op = Op::TakeToken {
            bucket,
            max,
            expires_at,
        };
        let call = self.inner.take_token(bucket, max, expires_at);
        self.hook.around(op, call).await
    }
}

/// How much of each run's history one process has seen (read or written), so that a run write
/// can be labelled by the entries it adds.
#[derive(Default)]
pub struct HistorySeen(Mutex<HashMap<String, usize>>);

impl HistorySeen {
    /// The entries `run` adds to what was seen of it, e.g. `open_ticket succeeded, ask_admins
    /// queued`; from now on all of `run`'s history counts as seen.
    pub fn added(&self, run: &Run) -> String {
        let from = self
            .0
            .lock()
            .unwrap()
            .insert(run.id.clone(), run.history.len())
            .unwrap_or(0)
            .min(run.history.len());
        run.history[from..]
            .iter()
            .map(|h| format!("{} {}", h.step.as_deref().unwrap_or("run"), h.event))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Records `run` (as read) as seen.
    pub fn loaded(&self, run: &Run) {
        self.0
            .lock()
            .unwrap()
            .insert(run.id.clone(), run.history.len());
    }
}
