//! Riposte's embedded store and queue: one SQLite file.
//!
//! Guarantee: a run's new state, the step messages it enqueues and the child runs it creates
//! commit in one SQLite transaction, and only if the run is still at the version that was read
//! (`UPDATE .. WHERE version = ?`). The queue is a table in the same file, so a process killed at
//! any point (`kill -9`) restarts with every accepted run and every pending message: a message is
//! deleted only after the state change it caused has committed, and a redelivered message is a
//! no-op for the engine.
//!
//! WAL mode with `synchronous=NORMAL`: a commit survives the process being killed; the last
//! commits before a power loss may be lost (set `RIPOSTE_SQLITE_SYNC=full` to fsync each commit).

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use riposte_core::engine::Effects;
use riposte_core::model::{AlertKind, Millis};
use riposte_core::playbook::PlaybookSpec;
use riposte_core::ports::Clock;
use riposte_core::rule::Rule;
use riposte_core::run::{Run, RunStatus, StepMessage};
use riposte_core::store::{AuditEntry, EventRecord, RunSummary, Store, StoreError, StoredPlaybook};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS playbook_versions (
    id TEXT NOT NULL, version INTEGER NOT NULL, spec TEXT NOT NULL,
    created_by TEXT NOT NULL, created_at INTEGER NOT NULL, PRIMARY KEY (id, version));
CREATE TABLE IF NOT EXISTS playbooks (
    id TEXT PRIMARY KEY, latest INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS rules (
    id TEXT PRIMARY KEY, trigger TEXT NOT NULL, ord INTEGER NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, version INTEGER NOT NULL, status TEXT NOT NULL,
    playbook_id TEXT NOT NULL, playbook_version INTEGER NOT NULL,
    created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS runs_by_created ON runs (created_at DESC, id);
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, visible_at INTEGER NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS queue_by_visible ON queue (visible_at, seq);
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY, received_at INTEGER NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    bucket TEXT PRIMARY KEY, taken INTEGER NOT NULL, expires_at INTEGER NOT NULL);
"#;

/// A message taken from the queue: its row and what it says.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    pub seq: i64,
    pub message: StepMessage,
}

/// The SQLite store and queue.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    clock: Arc<dyn Clock>,
    /// Woken whenever a commit enqueues messages.
    pub enqueued: tokio::sync::Notify,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn to_json<T: Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_json<T: DeserializeOwned>(what: &str, s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

impl SqliteStore {
    /// Opens (creating if needed) the database file.
    pub fn open(path: &Path, clock: Arc<dyn Clock>) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path).map_err(unavailable)?;
        Self::init(conn, clock)
    }

    /// An in-memory database (tests, dry runs).
    pub fn in_memory(clock: Arc<dyn Clock>) -> Result<SqliteStore, StoreError> {
        Self::init(Connection::open_in_memory().map_err(unavailable)?, clock)
    }

    fn init(conn: Connection, clock: Arc<dyn Clock>) -> Result<SqliteStore, StoreError> {
        let sync = match std::env::var("RIPOSTE_SQLITE_SYNC").as_deref() {
            Ok("full") => "FULL",
            _ => "NORMAL",
        };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync}; PRAGMA busy_timeout=5000;"
        ))
        .map_err(unavailable)?;
        conn.execute_batch(SCHEMA).map_err(unavailable)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            clock,
            enqueued: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.conn
            .lock()
            .map_err(|_| StoreError::Unavailable("database lock poisoned".into()))
    }

    fn write_effects(
        tx: &rusqlite::Transaction<'_>,
        now: Millis,
        fx: &Effects,
    ) -> Result<(), StoreError> {
        {
            let mut q = tx
                .prepare_cached("INSERT INTO queue (visible_at, body) VALUES (?1, ?2)")
                .map_err(unavailable)?;
            for (msg, delay) in &fx.messages {
                q.execute(params![now + *delay as Millis, to_json(msg)?])
                    .map_err(unavailable)?;
            }
        }
        for child in &fx.new_runs {
            Self::insert_run(tx, child)?;
        }
        Ok(())
    }

    fn insert_run(tx: &rusqlite::Transaction<'_>, run: &Run) -> Result<bool, StoreError> {
        let n = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO runs (id, version, status, playbook_id, playbook_version, created_at, updated_at, body)
                 VALUES (?1, 1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .map_err(unavailable)?
            .execute(params![
                run.id,
                run.status.as_str(),
                run.playbook_id,
                run.playbook_version,
                run.created_at,
                run.updated_at,
                to_json(run)?
            ])
            .map_err(unavailable)?;
        Ok(n == 1)
    }

    // ----- the queue (local host only) -----

    /// Up to `limit` messages visible now, oldest first, excluding rows in `skip` (in flight).
    pub fn due(
        &self,
        limit: usize,
        skip: &std::collections::HashSet<i64>,
    ) -> Result<Vec<Delivery>, StoreError> {
        let now = self.clock.now();
        let conn = self.lock()?;
        let mut stmt = conn
            .prepare_cached("SELECT seq, body FROM queue WHERE visible_at <= ?1 ORDER BY visible_at, seq LIMIT ?2")
            .map_err(unavailable)?;
        let rows = stmt
            .query_map(params![now, (limit + skip.len()) as i64], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(unavailable)?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, body) = row.map_err(unavailable)?;
            if skip.contains(&seq) {
                continue;
            }
            out.push(Delivery {
                seq,
                message: from_json("queue message", &body)?,
            });
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The time by this store's clock (what `visible_at` is measured against).
    pub fn now(&self) -> Millis {
        self.clock.now()
    }

    /// When the next message becomes visible, if any is queued.
    pub fn next_visible_at(&self) -> Result<Option<Millis>, StoreError> {
        let conn = self.lock()?;
        conn.query_row("SELECT MIN(visible_at) FROM queue", [], |r| {
            r.get::<_, Option<Millis>>(0)
        })
        .map_err(unavailable)
    }

    /// Deletes handled messages.
    pub fn ack(&self, seqs: &[i64]) -> Result<(), StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction().map_err(unavailable)?;
        {
            let mut stmt = tx
                .prepare_cached("DELETE FROM queue WHERE seq = ?1")
                .map_err(unavailable)?;
            for s in seqs {
                stmt.execute([s]).map_err(unavailable)?;
            }
        }
        tx.commit().map_err(unavailable)
    }

    /// Makes a message visible again later.
    pub fn delay(&self, seq: i64, delay_ms: u64) -> Result<(), StoreError> {
        let at = self.clock.now() + delay_ms as Millis;
        self.lock()?
            .execute(
                "UPDATE queue SET visible_at = ?1 WHERE seq = ?2",
                params![at, seq],
            )
            .map_err(unavailable)?;
        Ok(())
    }

    /// How many messages are queued (visible or not).
    pub fn queue_len(&self) -> Result<u64, StoreError> {
        self.lock()?
            .query_row("SELECT COUNT(*) FROM queue", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(unavailable)
    }

    /// A value in the meta table (e.g. the approval signing key, whether examples were loaded).
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.lock()?
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(unavailable)
    }

    /// Sets a meta value only if it is not set; returns the value in force.
    pub fn meta_init(&self, key: &str, value: &str) -> Result<String, StoreError> {
        let conn = self.lock()?;
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)",
            params![key, value],
        )
        .map_err(unavailable)?;
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .map_err(unavailable)
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn put_playbook(
        &self,
        spec: &PlaybookSpec,
        by: &str,
        at: Millis,
    ) -> Result<u32, StoreError> {
        let body = to_json(spec)?;
        let mut conn = self.lock()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(unavailable)?;
        let latest: Option<(u32, bool)> = tx
            .query_row(
                "SELECT latest, deleted FROM playbooks WHERE id = ?1",
                [&spec.id],
                |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0)),
            )
            .optional()
            .map_err(unavailable)?;
        if let Some((v, deleted)) = latest {
            let current: String = tx
                .query_row(
                    "SELECT spec FROM playbook_versions WHERE id = ?1 AND version = ?2",
                    params![spec.id, v],
                    |r| r.get(0),
                )
                .map_err(unavailable)?;
            if current == body && !deleted {
                return Ok(v);
            }
        }
        let version = latest.map(|(v, _)| v + 1).unwrap_or(1);
        tx.execute(
            "INSERT INTO playbook_versions (id, version, spec, created_by, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![spec.id, version, body, by, at],
        )
        .map_err(unavailable)?;
        tx.execute(
            "INSERT INTO playbooks (id, latest, deleted) VALUES (?1, ?2, 0)
             ON CONFLICT (id) DO UPDATE SET latest = excluded.latest, deleted = 0",
            params![spec.id, version],
        )
        .map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        Ok(version)
    }

    async fn get_playbook(
        &self,
        id: &str,
        version: Option<u32>,
    ) -> Result<Option<StoredPlaybook>, StoreError> {
        let conn = self.lock()?;
        let row = match version {
            Some(v) => conn
                .query_row(
                    "SELECT v.spec, v.version, v.created_by, v.created_at, COALESCE(p.deleted, 0)
                     FROM playbook_versions v LEFT JOIN playbooks p ON p.id = v.id WHERE v.id = ?1 AND v.version = ?2",
                    params![id, v],
                    |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get::<_, i64>(4)?)),
                )
                .optional(),
            None => conn
                .query_row(
                    "SELECT v.spec, v.version, v.created_by, v.created_at, p.deleted
                     FROM playbooks p JOIN playbook_versions v ON v.id = p.id AND v.version = p.latest
                     WHERE p.id = ?1 AND p.deleted = 0",
                    [id],
                    |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get::<_, i64>(4)?)),
                )
                .optional(),
        }
        .map_err(unavailable)?;
        row.map(|(spec, version, created_by, created_at, deleted)| {
            Ok(StoredPlaybook {
                spec: from_json("playbook", &spec)?,
                version,
                created_by,
                created_at,
                deleted: deleted != 0,
            })
        })
        .transpose()
    }

    async fn list_playbooks(&self) -> Result<Vec<StoredPlaybook>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn
            .prepare(
                "SELECT v.spec, v.version, v.created_by, v.created_at FROM playbooks p
                 JOIN playbook_versions v ON v.id = p.id AND v.version = p.latest WHERE p.deleted = 0 ORDER BY p.id",
            )
            .map_err(unavailable)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .map_err(unavailable)?;
        rows.map(|row| {
            let (spec, version, created_by, created_at) = row.map_err(unavailable)?;
            Ok(StoredPlaybook {
                spec: from_json("playbook", &spec)?,
                version,
                created_by,
                created_at,
                deleted: false,
            })
        })
        .collect()
    }

    async fn delete_playbook(&self, id: &str) -> Result<bool, StoreError> {
        let n = self
            .lock()?
            .execute(
                "UPDATE playbooks SET deleted = 1 WHERE id = ?1 AND deleted = 0",
                [id],
            )
            .map_err(unavailable)?;
        Ok(n == 1)
    }

    async fn put_rule(&self, rule: &Rule) -> Result<(), StoreError> {
        self.lock()?
            .execute(
                "INSERT INTO rules (id, trigger, ord, body) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET trigger = excluded.trigger, ord = excluded.ord, body = excluded.body",
                params![rule.id, rule.trigger.as_str(), rule.order, to_json(rule)?],
            )
            .map_err(unavailable)?;
        Ok(())
    }

    async fn get_rule(&self, id: &str) -> Result<Option<Rule>, StoreError> {
        let body: Option<String> = self
            .lock()?
            .query_row("SELECT body FROM rules WHERE id = ?1", [id], |r| r.get(0))
            .optional()
            .map_err(unavailable)?;
        body.map(|b| from_json("rule", &b)).transpose()
    }

    async fn list_rules(&self, trigger: Option<AlertKind>) -> Result<Vec<Rule>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT body FROM rules WHERE (?1 IS NULL OR trigger = ?1) ORDER BY ord, id",
            )
            .map_err(unavailable)?;
        let rows = stmt
            .query_map([trigger.map(|t| t.as_str())], |r| r.get::<_, String>(0))
            .map_err(unavailable)?;
        rows.map(|b| from_json("rule", &b.map_err(unavailable)?))
            .collect()
    }

    async fn delete_rule(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .lock()?
            .execute("DELETE FROM rules WHERE id = ?1", [id])
            .map_err(unavailable)?
            == 1)
    }

    async fn create_run(&self, run: &Run, fx: &Effects) -> Result<bool, StoreError> {
        let now = self.clock.now();
        let created = {
            let mut conn = self.lock()?;
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            if !Self::insert_run(&tx, run)? {
                return Ok(false);
            }
            Self::write_effects(&tx, now, fx)?;
            tx.commit().map_err(unavailable)?;
            true
        };
        if !fx.messages.is_empty() {
            self.enqueued.notify_one();
        }
        Ok(created)
    }

    async fn load_run(&self, id: &str) -> Result<Option<(Run, u64)>, StoreError> {
        let row: Option<(String, i64)> = self
            .lock()?
            .prepare_cached("SELECT body, version FROM runs WHERE id = ?1")
            .map_err(unavailable)?
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(unavailable)?;
        row.map(|(body, v)| Ok((from_json("run", &body)?, v as u64)))
            .transpose()
    }

    async fn save_run(&self, run: &Run, version: u64, fx: &Effects) -> Result<(), StoreError> {
        let now = self.clock.now();
        let body = to_json(run)?;
        {
            let mut conn = self.lock()?;
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let n = tx
                .prepare_cached("UPDATE runs SET version = ?1, status = ?2, updated_at = ?3, body = ?4 WHERE id = ?5 AND version = ?6")
                .map_err(unavailable)?
                .execute(params![version as i64 + 1, run.status.as_str(), run.updated_at, body, run.id, version as i64])
                .map_err(unavailable)?;
            if n != 1 {
                return Err(StoreError::Conflict(format!("run {}", run.id)));
            }
            Self::write_effects(&tx, now, fx)?;
            tx.commit().map_err(unavailable)?;
        }
        if !fx.messages.is_empty() {
            self.enqueued.notify_one();
        }
        Ok(())
    }

    async fn list_runs(
        &self,
        limit: usize,
        status: Option<RunStatus>,
    ) -> Result<Vec<RunSummary>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, playbook_id, playbook_version, status, created_at, updated_at FROM runs
                 WHERE (?1 IS NULL OR status = ?1) ORDER BY created_at DESC, id LIMIT ?2",
            )
            .map_err(unavailable)?;
        let rows = stmt
            .query_map(params![status.map(|s| s.as_str()), limit as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, String>(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })
            .map_err(unavailable)?;
        rows.map(|row| {
            let (id, playbook_id, playbook_version, status, created_at, updated_at) =
                row.map_err(unavailable)?;
            let status: RunStatus = from_json("status", &format!("\"{status}\""))?;
            Ok(RunSummary {
                id,
                playbook_id,
                playbook_version,
                // A finished run is not written again: its last update is its end.
                finished_at: status.is_terminal().then_some(updated_at),
                status,
                created_at,
            })
        })
        .collect()
    }

    async fn put_event(&self, record: &EventRecord) -> Result<(), StoreError> {
        self.lock()?
            .execute(
                "INSERT INTO events (id, received_at, body) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                params![record.event_id, record.received_at, to_json(record)?],
            )
            .map_err(unavailable)?;
        Ok(())
    }

    async fn get_event(&self, id: &str) -> Result<Option<EventRecord>, StoreError> {
        let body: Option<String> = self
            .lock()?
            .query_row("SELECT body FROM events WHERE id = ?1", [id], |r| r.get(0))
            .optional()
            .map_err(unavailable)?;
        body.map(|b| from_json("event", &b)).transpose()
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        self.lock()?
            .execute(
                "INSERT INTO audit (at, body) VALUES (?1, ?2)",
                params![entry.at, to_json(entry)?],
            )
            .map_err(unavailable)?;
        Ok(())
    }

    async fn list_audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn
            .prepare("SELECT body FROM audit ORDER BY seq DESC LIMIT ?1")
            .map_err(unavailable)?;
        let rows = stmt
            .query_map([limit as i64], |r| r.get::<_, String>(0))
            .map_err(unavailable)?;
        rows.map(|b| from_json("audit", &b.map_err(unavailable)?))
            .collect()
    }

    async fn get_setting(&self, key: &str) -> Result<Option<serde_json::Value>, StoreError> {
        match self.meta(&format!("setting:{key}"))? {
            Some(text) => Ok(Some(from_json("setting", &text)?)),
            None => Ok(None),
        }
    }

    async fn put_setting(&self, key: &str, value: &serde_json::Value) -> Result<(), StoreError> {
        self.lock()?
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) \
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                rusqlite::params![format!("setting:{key}"), value.to_string()],
            )
            .map_err(unavailable)?;
        Ok(())
    }

    async fn take_token(
        &self,
        bucket: &str,
        max: u32,
        expires_at: Millis,
    ) -> Result<bool, StoreError> {
        let conn = self.lock()?;
        conn.execute(
            "DELETE FROM tokens WHERE expires_at < ?1",
            [self.clock.now()],
        )
        .map_err(unavailable)?;
        let changed = conn
            .execute(
                "INSERT INTO tokens (bucket, taken, expires_at) VALUES (?1, 1, ?3) \
                 ON CONFLICT(bucket) DO UPDATE SET taken = taken + 1 WHERE taken < ?2",
                rusqlite::params![bucket, max, expires_at],
            )
            .map_err(unavailable)?;
        Ok(changed == 1)
    }
}
