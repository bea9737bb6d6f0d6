//! The store port: durable state and its outbox.
//!
//! Guarantee asked of every implementation: [`Store::save_run`] applies the run's new state and
//! the child runs it creates together or not at all, and only if the run is still at the version
//! that was loaded; otherwise it returns [`StoreError::Conflict`] and changes no record. Once
//! applied, every message it enqueues is delivered. A store may also deliver the messages of a
//! write that was not applied, when it sends them ahead of the write, each naming the version
//! the write would have brought its run to ([`crate::service::Service::handle_sent_ahead`]): a
//! worker then finds them ahead of the run, or stale or current like any duplicate.
//! [`Store::create_run`] creates a run only if no run has that id.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::engine::Effects;
use crate::model::{AlertKind, Millis};
use crate::playbook::PlaybookSpec;
use crate::rule::{Evaluation, Rule};
use crate::run::{Run, RunStatus};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The record changed since it was read (optimistic concurrency).
    #[error("concurrent update of {0}")]
    Conflict(String),
    /// The backend failed; worth retrying.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored record could not be read back.
    #[error("corrupt record {0}")]
    Corrupt(String),
}

/// One immutable playbook version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredPlaybook {
    pub spec: PlaybookSpec,
    pub version: u32,
    pub created_by: String,
    pub created_at: Millis,
    #[serde(default)]
    pub deleted: bool,
}

/// One line of a list of runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub id: String,
    pub playbook_id: String,
    pub playbook_version: u32,
    pub status: RunStatus,
    pub created_at: Millis,
    /// When it ended; `None` while it runs. (Not when it last changed: on DynamoDB the list
    /// comes from an index that is then rewritten only when the status changes, not at every
    /// step.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Millis>,
}

/// What happened to one alert or recommendation: the rules' verdicts and the runs started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    pub alert_id: String,
    pub kind: AlertKind,
    pub title: String,
    pub evaluation: Evaluation,
    /// Run ids started (or found already started, on redelivery).
    pub runs: Vec<String>,
    /// Why matching rules started nothing (the kill switch was on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// What happened to one delivered event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub event_id: String,
    pub received_at: Millis,
    pub source: String,
    pub alerts: Vec<AlertRecord>,
}

/// One change to a rule or playbook, for the append-only audit trail.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: Millis,
    pub by: String,
    /// e.g. `playbook.put`, `rule.delete`.
    pub action: String,
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[async_trait]
pub trait Store: Send + Sync {
    /// Stores a new version (latest + 1) unless it equals the latest, whose version it returns.
    async fn put_playbook(
        &self,
        spec: &PlaybookSpec,
        by: &str,
        at: Millis,
    ) -> Result<u32, StoreError>;
    /// A version, or the latest live one when `version` is `None`.
    async fn get_playbook(
        &self,
        id: &str,
        version: Option<u32>,
    ) -> Result<Option<StoredPlaybook>, StoreError>;
    /// The number of a playbook's latest live version (`None`: no such playbook, or deleted),
    /// without its body: what a trigger that has that version compiled already needs to know.
    async fn latest_playbook_version(&self, id: &str) -> Result<Option<u32>, StoreError> {
        Ok(self.get_playbook(id, None).await?.map(|p| p.version))
    }
    /// The latest version of every live playbook.
    async fn list_playbooks(&self) -> Result<Vec<StoredPlaybook>, StoreError>;
    /// Marks a playbook deleted: no new run starts; versions stay for the runs that pinned them.
    async fn delete_playbook(&self, id: &str) -> Result<bool, StoreError>;

    async fn put_rule(&self, rule: &Rule) -> Result<(), StoreError>;
    async fn get_rule(&self, id: &str) -> Result<Option<Rule>, StoreError>;
    /// Rules, for one trigger kind or all.
    async fn list_rules(&self, trigger: Option<AlertKind>) -> Result<Vec<Rule>, StoreError>;
    async fn delete_rule(&self, id: &str) -> Result<bool, StoreError>;

    /// Creates the run and commits its effects; `false` (and nothing written) if the id exists.
    async fn create_run(&self, run: &Run, fx: &Effects) -> Result<bool, StoreError>;
    /// The run and its version.
    async fn load_run(&self, id: &str) -> Result<Option<(Run, u64)>, StoreError>;
    /// The run as a read that may lag the latest write by a moment finds it: for showing it,
    /// never for writing on (a store whose reads cost less so overrides this).
    async fn load_run_lagging(&self, id: &str) -> Result<Option<(Run, u64)>, StoreError> {
        self.load_run(id).await
    }
    /// See the module guarantee.
    async fn save_run(&self, run: &Run, version: u64, fx: &Effects) -> Result<(), StoreError>;
    async fn list_runs(
        &self,
        limit: usize,
        status: Option<RunStatus>,
    ) -> Result<Vec<RunSummary>, StoreError>;

    async fn put_event(&self, record: &EventRecord) -> Result<(), StoreError>;
    async fn get_event(&self, id: &str) -> Result<Option<EventRecord>, StoreError>;

    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError>;
    async fn list_audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;

    /// A deployment-wide setting (the kill switch), or `None` when never set.
    async fn get_setting(&self, key: &str) -> Result<Option<serde_json::Value>, StoreError>;
    async fn put_setting(&self, key: &str, value: &serde_json::Value) -> Result<(), StoreError>;

    /// Takes one of `max` tokens of `bucket` (a rate cap's operation and window): `true` if one
    /// was left. Atomic across workers; the bucket may be dropped after `expires_at`.
    async fn take_token(
        &self,
        bucket: &str,
        max: u32,
        expires_at: Millis,
    ) -> Result<bool, StoreError>;
}
