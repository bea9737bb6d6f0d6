//! The service: every trigger's behaviour over the ports, shared by every host.
//!
//! The Lambda functions and `riposte serve` call these same functions: ingesting an event,
//! starting a manual run, handling one step message, answering an approval, administering rules
//! and playbooks. Guarantee: every change to a run goes through the engine and one conditional
//! [`Store::save_run`]; on a conflict the run is reloaded and the message re-applied, which the
//! engine makes safe because a transition that already happened is stale.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use futures_util::future::{BoxFuture, Either};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::approval::{Claims, Signer, TokenError, nonce_hash, same_hash};
use crate::connector::{Connections, ConnectorCatalog, Operation, call::call_with_timeout};
use crate::engine::{
    Answer, Call, Claim, DecideError, Effects, Engine, IssuedLinks, NotifyWork, Outcome, Work,
};
use crate::event;
use crate::guard::Guards;
use crate::http::{Connection, HttpError, HttpRequest};
use crate::model::{Alert, AlertKind, Millis};
use crate::playbook::{self, Playbook, PlaybookSpec, Problems, StepKind};
use crate::ports::{Clock, HttpSender, IdSource};
use crate::rule::{Rule, RuleSet};
use crate::run::{MessageKind, Run, StepMessage, Trigger};
use crate::store::{AlertRecord, AuditEntry, EventRecord, Store, StoreError, StoredPlaybook};

/// How many times a conflicting write is retried before the message is handed back to the queue.
const MAX_CONFLICT_RETRIES: usize = 16;
/// The most steps one message carries (performs after its own, with no message of their own).
const MAX_CARRIED: usize = 64;
/// The most steps one write claims to carry: a step's successors are carried, but a wider fan-out
/// (a `for_each` over many entities) goes out as messages, to run in parallel.
const CARRIED_PER_WRITE: usize = 2;
/// Time kept free beyond a carried step's timeout before the invocation's deadline.
const CARRY_MARGIN_MS: Millis = 5_000;
/// Runs whose newest written copy this process keeps (see [`Service::written`]), beyond those
/// being recorded right now.
const WRITTEN_KEPT: usize = 64;
/// The largest input a manual run accepts.
pub const MAX_INPUT_BYTES: usize = 256 * 1024;

/// Errors a caller sees; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Invalid(Problems),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Unavailable(String),
}

impl Error {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            Error::BadRequest(_) | Error::Invalid(_) => 400,
            Error::Forbidden(_) => 403,
            Error::NotFound(_) => 404,
            Error::Conflict(_) => 409,
            Error::Gone(_) => 410,
            Error::TooLarge(_) => 413,
            Error::Unsupported(_) => 422,
            Error::Unavailable(_) => 503,
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        Error::Unavailable(e.to_string())
    }
}

impl From<event::Error> for Error {
    fn from(e: event::Error) -> Error {
        match e {
            event::Error::TooLarge { .. } => Error::TooLarge(e.to_string()),
            event::Error::Unsupported { .. } => Error::Unsupported(e.to_string()),
            _ => Error::BadRequest(e.to_string()),
        }
    }
}

/// What the worker tells its queue about a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Handled {
    /// Done (or stale): delete the message.
    Done,
    /// Deliver it again after this delay.
    Retry { delay_ms: u64, reason: String },
    /// The message was sent ahead of the write that makes it current (see
    /// [`Service::handle_sent_ahead`]), and that write has not landed: the run is at an older
    /// version, or does not exist yet. Deliver it again soon; a message still ahead when the queue
    /// gives up on it belongs to a write that never landed, and is dropped.
    Ahead,
}

/// Settings of a deployment.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where approval links point, e.g. `https://riposte.example.com` or `http://127.0.0.1:8080`.
    pub public_url: String,
    /// How long rules are cached (0 in one process, where writes invalidate the cache).
    pub rules_cache_ms: Millis,
    /// This process as a step worker.
    pub worker: crate::engine::Worker,
}

/// The ports a service runs over.
pub struct Deps {
    pub store: Arc<dyn Store>,
    pub http: Arc<dyn HttpSender>,
    pub clock: Arc<dyn Clock>,
    pub ids: Arc<dyn IdSource>,
    pub signer: Signer,
    pub connections: Connections,
    /// Every operation playbooks may call: built-in, shipped and the user's connectors.
    pub catalog: Arc<ConnectorCatalog>,
    pub config: Config,
}

/// A summary of an ingested event, as answered to the caller.
#[derive(Debug, Clone, Serialize)]
pub struct Ingested {
    pub event_id: String,
    pub alerts: Vec<AlertRecord>,
}

/// What the confirm page and the decision answer show.
#[derive(Debug, Clone, Serialize)]
pub struct ApprovalView {
    pub run_id: String,
    pub playbook_id: String,
    pub step: String,
    pub message: String,
    pub choice: String,
    pub choices: Vec<String>,
    pub expires_at: Millis,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided: Option<crate::run::Decision>,
}

pub struct Service {
    d: Deps,
    playbooks: Mutex<HashMap<(String, u32), Arc<Playbook>>>,
    rules: Mutex<Option<(Millis, Arc<RuleSet>)>>,
    /// Per playbook: its latest version and when that was read, kept as long as the rules are
    /// (a warm trigger function starts runs of a cached playbook without reading it).
    heads: Mutex<HashMap<String, (Millis, u32)>>,
    guards: std::sync::RwLock<Arc<Guards>>,
    kill_switch: Mutex<Option<(Millis, Option<KillSwitch>)>>,
    /// Per run: the newest copy this process wrote and its version, behind a lock held while an
    /// outcome is recorded. Steps of one run that finish together here (two branches delivered in
    /// one batch, two local workers) then record one after the other, each on the copy the other
    /// just wrote, instead of both writing and one being refused (a billed write and a read
    /// lost). Safe whatever the copy: every write is conditional on the version.
    written: Mutex<HashMap<String, Arc<WrittenRun>>>,
    /// Per run: the handlers of its messages in this process now, and the repeat-safe outcomes
    /// one of them leaves for another's next write (see [`Service::perform_queue`]).
    groups: Mutex<HashMap<String, Group>>,
}

type WrittenRun = futures_util::lock::Mutex<Option<(Run, u64)>>;

/// The handlers of one run's messages in this process now, each counted from the start of its
/// handling ([`Service::handle_sent_ahead`]) to its end.
#[derive(Default)]
struct Group {
    /// How many are in it.
    performing: usize,
    /// How many of those wait for another to record their outcomes.
    waiting: usize,
    /// Outcomes left to be recorded, not yet taken by a writer.
    deposits: Vec<Deposit>,
}

/// Repeat-safe outcomes one handler leaves for another handler of the same run to record with
/// its own, in one write. The depositor waits on `signal`'s lock, held here: the writer sets it
/// to `true` once they are recorded, and releasing it unset (the deposit dropped, unwritten)
/// tells the depositor to write them itself.
struct Deposit {
    held: Vec<Held>,
    /// When the first of them was known.
    since: Millis,
    signal: futures_util::lock::OwnedMutexGuard<bool>,
}

/// A handler's membership of its run's [`Group`], left when dropped: when no handler of the
/// run is left that could take a deposit, the deposits are released to their depositors.
struct Performing<'a> {
    groups: &'a Mutex<HashMap<String, Group>>,
    run_id: String,
}

impl Performing<'_> {
    fn join<'a>(groups: &'a Mutex<HashMap<String, Group>>, run_id: &str) -> Performing<'a> {
        if let Ok(mut g) = groups.lock() {
            g.entry(run_id.to_string()).or_default().performing += 1;
        }
        Performing {
            groups,
            run_id: run_id.to_string(),
        }
    }
}

impl Drop for Performing<'_> {
    fn drop(&mut self) {
        let released = {
            let Ok(mut groups) = self.groups.lock() else {
                return;
            };
            let Some(g) = groups.get_mut(&self.run_id) else {
                return;
            };
            g.performing = g.performing.saturating_sub(1);
            let released = if g.performing <= g.waiting {
                std::mem::take(&mut g.deposits)
            } else {
                Vec::new()
            };
            if g.performing == 0 {
                groups.remove(&self.run_id);
            }
            released
        };
        // Dropped unset, outside the lock: each depositor writes its outcomes itself.
        drop(released);
    }
}

/// The kill switch's state: when on, no automatic run starts and running ones stop.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct KillSwitch {
    pub on: bool,
    pub by: String,
    pub at: Millis,
    #[serde(default)]
    pub reason: String,
}

/// The store setting that holds the [`KillSwitch`].
const KILL_SWITCH: &str = "kill_switch";

/// The run id for (alert, rule, playbook): the same on every redelivery of the event.
pub fn derived_run_id(alert_id: &str, rule_id: &str, playbook_id: &str) -> String {
    let mut h = Sha256::new();
    for part in [alert_id, rule_id, playbook_id] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    format!("r{}", &hex::encode(h.finalize())[..25])
}

/// The longest a step's attempt may take: its timeout, or the default.
fn timeout_of(engine: &Engine<'_>, msg: &StepMessage) -> Millis {
    let ms = engine
        .playbook
        .step(&msg.step)
        .and_then(|(_, s)| s.timeout_ms)
        .unwrap_or(crate::engine::DEFAULT_ACTION_TIMEOUT_MS);
    Millis::try_from(ms).unwrap_or(Millis::MAX)
}

/// Whether claimed work may be done before its claim is written: a declared repeat-safe action
/// (its worker, if lost, is simply followed by another doing it again).
fn repeat_safe(engine: &Engine<'_>, msg: &StepMessage, work: &Work) -> bool {
    matches!(work, Work::Call(_) | Work::Http(_))
        && engine.playbook.step(&msg.step).is_some_and(|(_, s)| {
            matches!(
                s.kind,
                StepKind::Action {
                    idempotent: true,
                    ..
                }
            )
        })
}

/// An outcome applied to the run in hand but not written yet (see [`Service::perform_queue`]).
#[derive(Clone)]
struct Held {
    msg: StepMessage,
    outcome: Outcome,
    /// Whether the step's claim was written (it then has a lease in the store).
    claim_written: bool,
    /// Whether the step's work is repeat-safe.
    safe: bool,
}

/// The lease of a step's iteration as the run holds it.
fn lease_of(run: &Run, msg: &StepMessage) -> Option<Millis> {
    run.step(&msg.step)?
        .iterations
        .get(msg.iteration as usize)?
        .lease_until
}

/// Applies the outcomes held, in order, to a run read again: each step whose claim was not
/// written is claimed first (and its message, which the outcome before it made ready, is then
/// not sent). Returns how many applied; the others were done or taken by another meanwhile.
fn reapply(
    engine: &Engine<'_>,
    run: &mut Run,
    held: &[Held],
    now: Millis,
    fx: &mut Effects,
) -> usize {
    let mut applied = 0;
    for h in held {
        let claimed = h.claim_written
            || match engine.claim(run, &h.msg, now, None, fx) {
                Claim::Execute(_) => {
                    fx.messages.retain(|(m, _)| *m != h.msg);
                    true
                }
                _ => false,
            };
        if claimed && engine.finish(run, &h.msg, h.outcome.clone(), now, fx) {
            applied += 1;
        }
    }
    applied
}

/// A step performed with others at once (see [`Service::perform_queue`]; its claim is
/// written), and its outcome.
struct Performed {
    /// Its place among the steps started by this handler: outcomes known together are recorded
    /// in this order, whichever finished first.
    seq: usize,
    msg: StepMessage,
    work: Work,
    timeout: Millis,
    outcome: Outcome,
    /// When it ended.
    at: Millis,
}

/// The next of `running` to finish, taken out of it; `None` when none is running. Each poll
/// polls every one still running (a handful at most), so progress never depends on which one
/// woke the task.
async fn next_finished(running: &mut Vec<BoxFuture<'_, Performed>>) -> Option<Performed> {
    std::future::poll_fn(|cx| {
        if running.is_empty() {
            return Poll::Ready(None);
        }
        for i in 0..running.len() {
            if let Poll::Ready(p) = running[i].as_mut().poll(cx) {
                drop(running.swap_remove(i));
                return Poll::Ready(Some(p));
            }
        }
        Poll::Pending
    })
    .await
}

/// The most outcomes held for one write (see [`Service::perform_queue`]).
const MAX_HELD: usize = 8;
/// How long after the first outcome held more steps may still be started before writing: a
/// run's record lags what was done by at most this and the last step's time.
const MAX_HELD_MS: Millis = 2_000;

fn outcome_of(result: Result<crate::http::HttpResponse, HttpError>) -> Outcome {
    match result {
        Ok(r) => {
            // Response headers are kept for later steps, less any credential (Set-Cookie, tokens).
            let headers: serde_json::Map<String, Value> = r
                .headers
                .into_iter()
                .filter(|(k, _)| !crate::http::is_sensitive_header(k))
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            Outcome::Done(json!({"status": r.status, "headers": headers, "body": r.body}))
        }
        Err(HttpError::Retryable(m) | HttpError::NotSent(m)) => Outcome::Failed {
            message: m,
            retryable: true,
        },
        Err(HttpError::Terminal(m)) => Outcome::Failed {
            message: m,
            retryable: false,
        },
    }
}

impl Service {
    pub fn new(d: Deps) -> Service {
        Service {
            d,
            playbooks: Mutex::new(HashMap::new()),
            rules: Mutex::new(None),
            heads: Mutex::new(HashMap::new()),
            guards: std::sync::RwLock::new(Arc::new(Guards::default())),
            kill_switch: Mutex::new(None),
            written: Mutex::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
        }
    }

    /// Whether another handler of the run, not itself waiting, is at work here now (one
    /// that could take a [`Self::deposit`]): checked before the dearer [`Self::quiet`].
    fn another_performing(&self, run_id: &str) -> bool {
        self.groups
            .lock()
            .ok()
            .and_then(|g| g.get(run_id).map(|g| g.performing >= g.waiting + 2))
            .unwrap_or(false)
    }

    /// Leaves `held` for another handler of the run performing here now to record with its own
    /// outcomes; `None` when no other is (one that itself waits does not count). The lock
    /// returned is free once the deposit is settled, holding whether it was recorded.
    fn deposit(
        &self,
        run_id: &str,
        held: &[Held],
        since: Millis,
    ) -> Option<Arc<futures_util::lock::Mutex<bool>>> {
        let mut groups = self.groups.lock().ok()?;
        let g = groups.get_mut(run_id)?;
        // Itself, and at least one other that is not waiting.
        if g.performing < g.waiting + 2 {
            return None;
        }
        let flag = Arc::new(futures_util::lock::Mutex::new(false));
        let signal = flag.try_lock_owned()?;
        g.waiting += 1;
        g.deposits.push(Deposit {
            held: held.to_vec(),
            since,
            signal,
        });
        Some(flag)
    }

    /// The deposit settled (see [`Self::deposit`]): its depositor no longer waits.
    fn deposit_settled(&self, run_id: &str) {
        if let Ok(mut groups) = self.groups.lock()
            && let Some(g) = groups.get_mut(run_id)
        {
            g.waiting = g.waiting.saturating_sub(1);
        }
    }

    /// Whether the outcomes `held` (all but the last applied to `run`, at `ver`) change the run
    /// quietly: something to record, but no step made ready, no message, no child run, and the
    /// run not ended. Judged on the newest copy this process wrote, if newer.
    async fn quiet(&self, engine: &Engine<'_>, run: &Run, ver: u64, held: &[Held]) -> bool {
        let Some(last) = held.last() else {
            return false;
        };
        let newer = {
            let slot = self.written(&run.id);
            let newest = slot.lock().await;
            newest
                .as_ref()
                .filter(|(_, v)| *v > ver)
                .map(|(r, _)| r.clone())
        };
        let now = self.now();
        let mut fx = Effects::default();
        let (probe, applied) = match newer {
            Some(mut r) => {
                let n = reapply(engine, &mut r, held, now, &mut fx);
                (r, n)
            }
            None => {
                let mut r = run.clone();
                let n = usize::from(engine.finish(
                    &mut r,
                    &last.msg,
                    last.outcome.clone(),
                    now,
                    &mut fx,
                ));
                (r, n)
            }
        };
        applied > 0
            && fx.messages.is_empty()
            && fx.new_runs.is_empty()
            && !probe.status.is_terminal()
    }

    /// The outcomes other handlers of the run left to be recorded, taken to record.
    fn take_deposits(&self, run_id: &str) -> Vec<Deposit> {
        self.groups
            .lock()
            .ok()
            .and_then(|mut g| g.get_mut(run_id).map(|g| std::mem::take(&mut g.deposits)))
            .unwrap_or_default()
    }

    /// The lock and newest written copy of a run (see `written`); copies of runs no one is
    /// recording are forgotten past [`WRITTEN_KEPT`].
    fn written(&self, run_id: &str) -> Arc<WrittenRun> {
        let Ok(mut map) = self.written.lock() else {
            return Arc::default();
        };
        if map.len() >= WRITTEN_KEPT && !map.contains_key(run_id) {
            map.retain(|_, slot| Arc::strong_count(slot) > 1);
        }
        map.entry(run_id.to_string()).or_default().clone()
    }

    pub fn deps(&self) -> &Deps {
        &self.d
    }

    /// Replaces the blast-radius guards (never-touch list, rate caps).
    pub fn set_guards(&self, guards: Guards) {
        *self.guards.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(guards);
    }

    pub fn guards(&self) -> Arc<Guards> {
        self.guards
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The kill switch, read through a cache as old as the rules cache on AWS; locally read once
    /// and then kept current by [`Service::set_kill_switch`].
    pub async fn kill_switch(&self) -> Result<Option<KillSwitch>, Error> {
        let now = self.now();
        let cached = self
            .kill_switch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // The only process on its store (the local runtime) changes the switch through this
        // service, so its cached value is always current; on AWS it is re-read after the cache.
        if let Some((at, k)) = cached
            && (self.d.config.worker.exclusive || now - at < self.d.config.rules_cache_ms as Millis)
        {
            return Ok(k);
        }
        let k = match self.d.store.get_setting(KILL_SWITCH).await? {
            Some(v) => serde_json::from_value::<KillSwitch>(v).ok(),
            None => None,
        };
        *self.kill_switch.lock().unwrap_or_else(|e| e.into_inner()) = Some((now, k.clone()));
        Ok(k)
    }

    async fn killed(&self) -> Result<Option<KillSwitch>, Error> {
        Ok(self.kill_switch().await?.filter(|k| k.on))
    }

    /// Turns the kill switch on or off (the contributor role), recorded in the audit trail.
    pub async fn set_kill_switch(
        &self,
        on: bool,
        reason: &str,
        by: &str,
    ) -> Result<KillSwitch, Error> {
        let k = KillSwitch {
            on,
            by: by.to_string(),
            at: self.now(),
            reason: reason.to_string(),
        };
        self.d
            .store
            .put_setting(
                KILL_SWITCH,
                &serde_json::to_value(&k).unwrap_or(Value::Null),
            )
            .await?;
        *self.kill_switch.lock().unwrap_or_else(|e| e.into_inner()) = Some((k.at, Some(k.clone())));
        self.audit(
            by,
            if on {
                "kill_switch.on"
            } else {
                "kill_switch.off"
            },
            KILL_SWITCH,
            Some(reason.to_string()).filter(|r| !r.is_empty()),
        )
        .await?;
        tracing::warn!(message = "Kill switch changed.", on, %by, %reason);
        Ok(k)
    }

    fn now(&self) -> Millis {
        self.d.clock.now()
    }

    /// A pinned playbook version, compiled once per process.
    pub async fn playbook(&self, id: &str, version: u32) -> Result<Arc<Playbook>, Error> {
        let key = (id.to_string(), version);
        if let Some(p) = self.playbooks.lock().map_err(|_| poisoned())?.get(&key) {
            return Ok(p.clone());
        }
        let stored = self
            .d
            .store
            .get_playbook(id, Some(version))
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!("playbook `{id}` version {version} not found"))
            })?;
        self.compiled(key, stored.spec)
    }

    /// Compiles a stored version and keeps it (versions never change).
    fn compiled(&self, key: (String, u32), spec: PlaybookSpec) -> Result<Arc<Playbook>, Error> {
        let p = Arc::new(
            playbook::compile(spec, key.1, self.d.catalog.as_ref()).map_err(Error::Invalid)?,
        );
        self.playbooks
            .lock()
            .map_err(|_| poisoned())?
            .insert(key, p.clone());
        Ok(p)
    }

    /// The latest version of a playbook, as new runs start it. Which version is latest is kept
    /// as long as the rules are (see [`Config::rules_cache_ms`]): a new version is picked up as
    /// soon as a rule change would be.
    async fn latest_playbook(&self, id: &str) -> Result<Arc<Playbook>, Error> {
        let now = self.now();
        let head = self.heads.lock().map_err(|_| poisoned())?.get(id).copied();
        if let Some((at, version)) = head
            && (self.d.config.rules_cache_ms == 0 || now - at < self.d.config.rules_cache_ms)
            && let Some(p) = self
                .playbooks
                .lock()
                .map_err(|_| poisoned())?
                .get(&(id.to_string(), version))
        {
            return Ok(p.clone());
        }
        let not_found = || Error::NotFound(format!("playbook `{id}` not found"));
        // With a version of it compiled here, most likely the latest: which one is latest (the
        // head alone), its body only if another. Else the latest, whole, in one go.
        let compiled_any = self
            .playbooks
            .lock()
            .map_err(|_| poisoned())?
            .keys()
            .any(|(p, _)| p == id);
        if compiled_any {
            let version = self
                .d
                .store
                .latest_playbook_version(id)
                .await?
                .ok_or_else(not_found)?;
            self.heads
                .lock()
                .map_err(|_| poisoned())?
                .insert(id.to_string(), (now, version));
            return self.playbook(id, version).await;
        }
        let stored = self
            .d
            .store
            .get_playbook(id, None)
            .await?
            .ok_or_else(not_found)?;
        self.heads
            .lock()
            .map_err(|_| poisoned())?
            .insert(id.to_string(), (now, stored.version));
        // Compiled from what was just read, not read again.
        self.compiled((id.to_string(), stored.version), stored.spec)
    }

    /// The enabled and disabled rules, compiled, indexed and in evaluation order.
    async fn rules(&self) -> Result<Arc<RuleSet>, Error> {
        let now = self.now();
        if let Some((at, rules)) = self.rules.lock().map_err(|_| poisoned())?.as_ref()
            && (self.d.config.rules_cache_ms == 0 || now - at < self.d.config.rules_cache_ms)
        {
            return Ok(rules.clone());
        }
        let mut compiled = Vec::new();
        for r in self.d.store.list_rules(None).await? {
            let id = r.id.clone();
            match r.compile(&|_| true) {
                Ok(c) => compiled.push(c),
                Err(p) => {
                    tracing::warn!(message = "Stored rule does not compile; skipped.", rule = %id, problems = %p)
                }
            }
        }
        let rules = Arc::new(RuleSet::new(compiled));
        *self.rules.lock().map_err(|_| poisoned())? = Some((now, rules.clone()));
        Ok(rules)
    }

    /// Forgets the rules and which playbook versions are latest: read again at the next event.
    fn forget_rules(&self) {
        if let Ok(mut r) = self.rules.lock() {
            *r = None;
        }
        if let Ok(mut h) = self.heads.lock() {
            h.clear();
        }
    }

    // ----- triggers -----

    /// An EventBridge event arrives: normalize, evaluate rules, start one run per match.
    pub async fn ingest_event(&self, event: &Value) -> Result<Ingested, Error> {
        self.ingest_event_of(event, None).await
    }

    /// Like [`Service::ingest_event`], for the alerts (or the recommendations) of the event only:
    /// the alert and recommendation functions each take their own kind from a shared event.
    pub async fn ingest_event_of(
        &self,
        event: &Value,
        only: Option<AlertKind>,
    ) -> Result<Ingested, Error> {
        let alerts: Vec<Alert> = event::normalize(event)?
            .into_iter()
            .filter(|a| only.is_none_or(|k| a.kind == k))
            .collect();
        let event_id = event
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| alerts.first().map(|a| a.id.clone()).unwrap_or_default());
        let source = event
            .get("source")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let now = self.now();
        let rules = self.rules().await?;
        let killed = self.killed().await?;
        let mut records = Vec::new();
        for alert in alerts {
            records.push(
                self.ingest_alert(&rules, &event_id, alert, now, killed.as_ref())
                    .await?,
            );
        }
        let record = EventRecord {
            event_id: event_id.clone(),
            received_at: now,
            source,
            alerts: records.clone(),
        };
        self.d.store.put_event(&record).await?;
        Ok(Ingested {
            event_id,
            alerts: records,
        })
    }

    async fn ingest_alert(
        &self,
        rules: &RuleSet,
        event_id: &str,
        alert: Alert,
        now: Millis,
        killed: Option<&KillSwitch>,
    ) -> Result<AlertRecord, Error> {
        let evaluation = rules.evaluate(&alert, now);
        let input = serde_json::to_value(&alert).unwrap_or(Value::Null);
        let mut runs = Vec::new();
        let matched = evaluation.runs(rules.rules());
        if let Some(k) = killed.filter(|_| !matched.is_empty()) {
            tracing::warn!(message = "Kill switch on: matching rules started nothing.", alert_id = %alert.id);
            return Ok(AlertRecord {
                alert_id: alert.id,
                kind: alert.kind,
                title: alert.title,
                evaluation,
                runs,
                refused: Some(format!(
                    "the kill switch is on (by {}: {}); {} matching rule(s) started nothing",
                    k.by,
                    k.reason,
                    matched.len()
                )),
            });
        }
        for (rule_id, playbook_id) in matched {
            let pb = match self.latest_playbook(&playbook_id).await {
                Ok(pb) => pb,
                // The store failing is worth a retry (EventBridge redelivers the event): only a
                // playbook that cannot run is skipped.
                Err(e @ (Error::Unavailable(_) | Error::Conflict(_))) => return Err(e),
                Err(e) => {
                    tracing::warn!(message = "Rule names a playbook that cannot run.", rule = %rule_id, playbook = %playbook_id, error = %e);
                    continue;
                }
            };
            let id = derived_run_id(&alert.id, &rule_id, &playbook_id);
            let trigger = Trigger::Rule {
                rule_id: rule_id.clone(),
                event_id: event_id.to_string(),
                alert_id: alert.id.clone(),
            };
            let (run, fx) = Engine::new(&pb).start(id.clone(), trigger, input.clone(), now);
            if self.d.store.create_run(&run, &fx).await? {
                tracing::info!(message = "Run started by rule.", run_id = %id, rule = %rule_id, playbook = %playbook_id);
            }
            runs.push(id);
        }
        Ok(AlertRecord {
            alert_id: alert.id,
            kind: alert.kind,
            title: alert.title,
            evaluation,
            runs,
            refused: None,
        })
    }

    /// An operator starts a playbook on an input (an alert, a recommendation, or any JSON).
    pub async fn start_run(&self, playbook_id: &str, input: Value, by: &str) -> Result<Run, Error> {
        let size = serde_json::to_vec(&input).map(|v| v.len()).unwrap_or(0);
        if size > MAX_INPUT_BYTES {
            return Err(Error::TooLarge(format!(
                "input is {size} bytes; the limit is {MAX_INPUT_BYTES}"
            )));
        }
        let pb = self.latest_playbook(playbook_id).await?;
        let id = self.d.ids.new_id();
        let (run, fx) =
            Engine::new(&pb).start(id, Trigger::Manual { by: by.into() }, input, self.now());
        self.d.store.create_run(&run, &fx).await?;
        Ok(run)
    }

    /// Cancels a run; its waiting approvals die with it.
    pub async fn cancel_run(&self, run_id: &str, by: &str) -> Result<Run, Error> {
        for _ in 0..MAX_CONFLICT_RETRIES {
            let (mut run, ver) = self.load(run_id).await?;
            let pb = self
                .playbook(&run.playbook_id, run.playbook_version)
                .await?;
            if !Engine::new(&pb).cancel(&mut run, by, self.now()) {
                return Err(Error::Conflict(format!(
                    "run {run_id} is already {}",
                    run.status.as_str()
                )));
            }
            match self.d.store.save_run(&run, ver, &Effects::default()).await {
                Ok(()) => return Ok(run),
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Unavailable(format!(
            "run {run_id} is too busy to cancel; try again"
        )))
    }

    /// Marks a run failed with `reason` (a message for it could not be handled after repeated
    /// tries: the local worker's dead letter).
    pub async fn fail_run(&self, run_id: &str, reason: &str) -> Result<(), Error> {
        for _ in 0..MAX_CONFLICT_RETRIES {
            let Some((mut run, ver)) = self.d.store.load_run(run_id).await? else {
                return Ok(());
            };
            let mut fx = Effects::default();
            if !Engine::abandon(&mut run, reason.to_string(), self.now(), &mut fx) {
                return Ok(());
            }
            match self.d.store.save_run(&run, ver, &fx).await {
                Ok(()) => return Ok(()),
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Unavailable(format!(
            "run {run_id} is too busy to fail; try again"
        )))
    }

    pub async fn load(&self, run_id: &str) -> Result<(Run, u64), Error> {
        self.d
            .store
            .load_run(run_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("run `{run_id}` not found")))
    }

    // ----- the step worker -----

    /// Handles one step message. Safe to call again with the same message at any point.
    pub async fn handle(&self, msg: &StepMessage) -> Result<Handled, Error> {
        self.handle_within(msg, None).await
    }

    /// [`Service::handle`] with the time this invocation has left (a Lambda function's deadline):
    /// a ready step is carried (performed here, with no message of its own) only while its
    /// timeout fits in what is left. `None`: no limit.
    pub async fn handle_within(
        &self,
        msg: &StepMessage,
        budget: Option<std::time::Duration>,
    ) -> Result<Handled, Error> {
        self.handle_sent_ahead(msg, None, budget).await
    }

    /// [`Service::handle_within`] for a message a store sent before the write that makes it
    /// current, which brings the run to version `after`: until the run is at that version it is
    /// [`Handled::Ahead`], not stale. (The DynamoDB store sends a write's messages first and
    /// writes after, so that no outbox needs clearing: a message the write refused or never made
    /// finds the run as it is, and is stale or current like any duplicate.)
    pub async fn handle_sent_ahead(
        &self,
        msg: &StepMessage,
        after: Option<u64>,
        budget: Option<std::time::Duration>,
    ) -> Result<Handled, Error> {
        // A member of its run's group from the start, before its first read: a handler of the
        // same batch whose step ends first may then leave its outcome to this one's write (see
        // `perform_queue`), however long this one takes to read the run. Joined once, here: the
        // nested handlings below (`adopt`) are this same handler. A chat update or a child's
        // news never performs steps, so it takes no outcomes and nothing waits on it.
        let _performing = (!matches!(msg.kind, MessageKind::Announce | MessageKind::ChildFinished))
            .then(|| Performing::join(&self.groups, &msg.run_id));
        let until = budget.map(|b| {
            self.now()
                .saturating_add(Millis::try_from(b.as_millis()).unwrap_or(Millis::MAX))
        });
        for _ in 0..MAX_CONFLICT_RETRIES {
            match self.handle_once(msg, msg, until, after).await {
                Err(Error::Conflict(_)) => continue,
                other => return other,
            }
        }
        Ok(Handled::Retry {
            delay_ms: 100,
            reason: format!("run {} kept changing under this message", msg.run_id),
        })
    }

    /// Handles `msg`; `carrier` is the message the queue delivered (`msg` itself, or the message
    /// under which `msg`'s step was carried when it is taken over here).
    async fn handle_once(
        &self,
        msg: &StepMessage,
        carrier: &StepMessage,
        until: Option<Millis>,
        after: Option<u64>,
    ) -> Result<Handled, Error> {
        let loaded = self.d.store.load_run(&msg.run_id).await?;
        if let Some(after) = after
            && loaded.as_ref().is_none_or(|(_, v)| *v < after)
        {
            return Ok(Handled::Ahead);
        }
        let Some((mut run, ver)) = loaded else {
            tracing::warn!(message = "Message for an unknown run dropped.", run_id = %msg.run_id, step = %msg.step);
            return Ok(Handled::Done);
        };
        let pb = self
            .playbook(&run.playbook_id, run.playbook_version)
            .await?;
        let engine = Engine::with_worker(&pb, self.d.config.worker.clone());
        let now = self.now();
        let mut fx = Effects::default();

        // The kill switch stops automatic runs (and sub-playbook runs) at their next message.
        if !matches!(run.trigger, Trigger::Manual { .. })
            && !run.status.is_terminal()
            && msg.kind != MessageKind::Announce
            && let Some(k) = self.killed().await?
        {
            let by = format!("the kill switch (turned on by {}: {})", k.by, k.reason);
            if engine.cancel(&mut run, &by, now) {
                self.save(&run, ver, &fx).await?;
            }
            return Ok(Handled::Done);
        }

        if msg.kind == MessageKind::ChildFinished {
            let child_id = pb
                .step(&msg.step)
                .and_then(|(i, _)| run.steps.get(i))
                .and_then(|s| s.iterations.get(msg.iteration as usize))
                .and_then(|it| it.child_run.clone());
            let Some(child_id) = child_id else {
                return Ok(Handled::Done);
            };
            let Some((child, _)) = self.d.store.load_run(&child_id).await? else {
                return Ok(Handled::Done);
            };
            if engine.child_finished(&mut run, msg, &child, now, &mut fx) {
                self.save(&run, ver, &fx).await?;
            }
            return Ok(Handled::Done);
        }

        let links = match (pb.step(&msg.step), &msg.kind) {
            (Some((_, step)), MessageKind::Execute) => match &step.kind {
                StepKind::Approval(a) => Some(self.issue_links(msg, a, now)),
                _ => None,
            },
            _ => None,
        };
        match engine.claim(&mut run, msg, now, links.as_ref(), &mut fx) {
            Claim::Stale(reason) => {
                if msg == carrier {
                    let handled = self.adopt(&engine, run, carrier, now, until).await?;
                    if handled != Handled::Done {
                        return Ok(handled);
                    }
                }
                tracing::debug!(message = "Stale message acknowledged.", run_id = %msg.run_id, step = %msg.step, %reason);
                Ok(Handled::Done)
            }
            Claim::Busy(until) => Ok(Handled::Retry {
                delay_ms: (until - now).max(1) as u64,
                reason: "the step is claimed by another worker".into(),
            }),
            Claim::Settled => {
                // Settled here (a set, a wait's end, an approval's expiry): the steps this makes
                // ready are carried as after any other step.
                let room = until.map(|u| u.saturating_sub(now));
                let next = self
                    .carry(&engine, &mut run, &mut fx, carrier, room, now)
                    .await;
                self.save(&run, ver, &fx).await?;
                let queue = next.into_iter().map(|(m, w)| (m, w, true)).collect();
                self.perform_queue(
                    &engine,
                    run,
                    ver + 1,
                    queue,
                    Effects::default(),
                    carrier,
                    until,
                )
                .await
            }
            Claim::Execute(Work::StartChild) => {
                let (child_pb, input, trigger) = engine
                    .child_request(&run, msg)
                    .ok_or_else(|| Error::BadRequest("not a playbook step".into()))?;
                let outcome = match self.latest_playbook(&child_pb).await {
                    Ok(cpb) => {
                        let child_id = crate::engine::child_run_id(&run.id, msg);
                        let (child, cfx) = Engine::new(&cpb).start(child_id, trigger, input, now);
                        fx.messages.extend(cfx.messages);
                        fx.new_runs.push(child);
                        Outcome::Waiting
                    }
                    Err(e) => Outcome::Failed {
                        message: e.to_string(),
                        retryable: false,
                    },
                };
                engine.finish(&mut run, msg, outcome, now, &mut fx);
                self.save(&run, ver, &fx).await?;
                Ok(Handled::Done)
            }
            Claim::Execute(Work::Announce(list)) => {
                // Best effort: a chat message that still shows the buttons is not worth failing
                // anything for; the decision is already recorded.
                for n in &list {
                    let (connection, outcome) = match n {
                        NotifyWork::Http(r) => (&r.connection, self.send(r).await),
                        NotifyWork::Call(c) => (&c.connection, self.call(c).await),
                    };
                    if let Outcome::Failed { message, .. } | Outcome::Unknown(message) = outcome {
                        tracing::warn!(message = "Updating an approval's channel failed.", run_id = %msg.run_id, step = %msg.step, %connection, error = %message);
                    }
                }
                Ok(Handled::Done)
            }
            Claim::Execute(work) => {
                self.execute(&engine, run, ver, msg.clone(), work, fx, carrier, until)
                    .await
            }
        }
    }

    /// A delivered message whose own step is done (or taken) may still carry steps: delivered
    /// again because the worker carrying them was lost, or a duplicate of a message another
    /// worker carries steps under. Each step carried under it whose worker's lease ended is
    /// taken over, one after the other (bounded: each pass settles one, which then no longer
    /// runs); while a lease lasts, the message is kept (`Retry`) so that it is not deleted
    /// before the steps it carries are recorded.
    async fn adopt(
        &self,
        engine: &Engine<'_>,
        mut run: Run,
        carrier: &StepMessage,
        mut now: Millis,
        until: Option<Millis>,
    ) -> Result<Handled, Error> {
        for _ in 0..=MAX_CARRIED {
            match engine.orphan(&run, carrier, now) {
                Some(Ok(orphan)) => {
                    tracing::info!(message = "A step carried under this message is taken over.", run_id = %carrier.run_id, step = %orphan.step, iteration = orphan.iteration);
                    let handled = Box::pin(self.handle_once(&orphan, carrier, until, None)).await?;
                    if handled != Handled::Done {
                        return Ok(handled);
                    }
                    let Some((again, _)) = self.d.store.load_run(&carrier.run_id).await? else {
                        break;
                    };
                    run = again;
                    now = self.now();
                }
                Some(Err(lease)) => {
                    return Ok(Handled::Retry {
                        delay_ms: (lease - now).max(1) as u64,
                        reason: "a step carried under this message is still running".into(),
                    });
                }
                None => break,
            }
        }
        Ok(Handled::Done)
    }

    /// Performs claimed work and records its outcome. Steps that this write makes ready are
    /// claimed in the same write and performed here too, at once (carried: no message, no
    /// separate claim, no read), while the invocation has time for them; their outcomes are
    /// recorded by one write (see [`Service::perform_queue`]), which claims the steps they make
    /// ready in turn.
    ///
    /// Work that must not be repeated blindly is recorded as started before it is done; work that
    /// is repeat-safe is claimed and recorded in one write, after it is done (a duplicate message
    /// meanwhile may repeat it, which is what repeat-safe allows). Carried steps are always
    /// claimed before they start, in the write that made them ready.
    #[allow(clippy::too_many_arguments)]
    async fn execute(
        &self,
        engine: &Engine<'_>,
        mut run: Run,
        mut ver: u64,
        msg: StepMessage,
        work: Work,
        mut fx: Effects,
        carrier: &StepMessage,
        until: Option<Millis>,
    ) -> Result<Handled, Error> {
        if msg != *carrier {
            // A carried step taken over: it is carried again, under the same message.
            engine.mark_carried(&mut run, &msg, carrier);
        }
        let first_claim_written = !repeat_safe(engine, &msg, &work);
        if first_claim_written {
            // A lost worker is then visible, and its step is taken over only after the lease.
            self.save(&run, ver, &fx).await?;
            ver += 1;
            fx = Effects::default();
        }
        let queue = std::collections::VecDeque::from([(msg, work, first_claim_written)]);
        self.perform_queue(engine, run, ver, queue, fx, carrier, until)
            .await
    }

    /// Performs claimed steps and records their outcomes, each write claiming the steps its
    /// outcomes make ready (see [`Service::execute`]). Each entry: the step's message, its work,
    /// and whether its claim was written. `fx`: effects not yet written (of the first entry's
    /// claim, when that was not written).
    ///
    /// Steps whose claims are written (those one write carried: independent, all ready at once)
    /// are performed at once. Their outcomes are recorded by one write when they end within
    /// [`MAX_HELD_MS`] of the first ([`Service::finished_together`]); what ends later is recorded
    /// when it ends. A step whose claim is not written (repeat-safe, see below) is performed
    /// alone, before its claim is written with its outcome.
    ///
    /// Repeat-safe outcomes are grouped: when a repeat-safe step makes only repeat-safe steps
    /// ready (and nothing else to write: no message, no child run), its outcome is kept here and
    /// recorded by the write that records theirs, while every step so held can still be recorded
    /// before its written claim's lease ends, for at most [`MAX_HELD`] steps and
    /// [`MAX_HELD_MS`]. A worker lost meanwhile loses only repeat-safe work, which is done again
    /// when its message comes back; a step that must not be repeated blindly always has its claim
    /// written before it starts.
    ///
    /// Across handlers of one run at once in this process (the branches of a decision, delivered
    /// together): repeat-safe outcomes, with no claim written, that make nothing ready, and end
    /// nothing, with nothing more to do here, are left ([`Service::deposit`]) to another handler
    /// still at work on its message (counted from the start of its handling), whose next write
    /// records them with its own; this handler returns only once that write has landed, or
    /// writes them itself when it does not (the other failed, or ended without taking them).
    /// Lost with the process, they are done again like any held outcome. Every write stays
    /// conditional on the version: an outcome recorded twice is refused the second time and
    /// dropped.
    ///
    /// However the handling ends (a store error included), no call started here is cut short:
    /// the steps still running are awaited first. (Their outcomes, unrecorded then, are like a
    /// lost worker's: their claims are written, and they are taken over once their leases end.)
    #[allow(clippy::too_many_arguments)]
    async fn perform_queue(
        &self,
        engine: &Engine<'_>,
        run: Run,
        ver: u64,
        queue: std::collections::VecDeque<(StepMessage, Work, bool)>,
        fx: Effects,
        carrier: &StepMessage,
        until: Option<Millis>,
    ) -> Result<Handled, Error> {
        let mut running = Vec::new();
        let handled = self
            .perform_queue_with(engine, run, ver, queue, fx, carrier, until, &mut running)
            .await;
        while next_finished(&mut running).await.is_some() {}
        handled
    }

    /// [`Service::perform_queue`], with the steps it starts at once kept in `running`.
    #[allow(clippy::too_many_arguments)]
    async fn perform_queue_with<'s>(
        &'s self,
        engine: &Engine<'_>,
        mut run: Run,
        mut ver: u64,
        mut queue: std::collections::VecDeque<(StepMessage, Work, bool)>,
        mut fx: Effects,
        carrier: &StepMessage,
        until: Option<Millis>,
        running: &mut Vec<BoxFuture<'s, Performed>>,
    ) -> Result<Handled, Error> {
        // What the queue is told: `Retry` when an outcome could not be recorded, or steps are
        // still carried under this message by another worker.
        let mut handled = Handled::Done;
        let mut carried = 0;
        // Outcomes applied to `run` but not yet written, in the order they came: (message,
        // outcome, whether its claim was written, whether its work is repeat-safe).
        let mut held: Vec<Held> = Vec::new();
        // The earliest lease among the written claims of the steps held: they are written before.
        let mut lease: Option<Millis> = None;
        // When the first outcome held was known: none is held for long unseen.
        let mut held_since: Option<Millis> = None;
        // Of the deposits taken from other handlers of the run (their outcomes are in `held`):
        // set once written.
        let mut signals: Vec<futures_util::lock::OwnedMutexGuard<bool>> = Vec::new();
        // Steps whose claims are written run at once (the branches one write made ready): those
        // still running, and the outcomes of those that finished together, not yet taken.
        let mut running_time: Millis = 0;
        let mut known: std::collections::VecDeque<Performed> = std::collections::VecDeque::new();
        let mut started = 0usize;
        // Set when an outcome could not be recorded (the run kept changing): `run` is then a
        // copy read again, with none of the outcomes held applied.
        let mut reapply_held = false;
        loop {
            while queue.front().is_some_and(|e| e.2) {
                let Some((msg, work, _)) = queue.pop_front() else {
                    break;
                };
                let timeout = timeout_of(engine, &msg);
                running_time = running_time.saturating_add(timeout);
                let seq = started;
                started += 1;
                running.push(Box::pin(async move {
                    let outcome = self.perform(&work).await;
                    Performed {
                        seq,
                        msg,
                        work,
                        timeout,
                        outcome,
                        at: self.now(),
                    }
                }));
            }
            if known.is_empty() && !running.is_empty() {
                known = self.finished_together(running).await;
            }
            let (msg, work, claim_written, outcome, at) = if let Some(p) = known.pop_front() {
                running_time = running_time.saturating_sub(p.timeout);
                (p.msg, p.work, true, p.outcome, p.at)
            } else if let Some((msg, work, claim_written)) = queue.pop_front() {
                // Repeat-safe, its claim not written: done before it is recorded.
                let outcome = self.perform(&work).await;
                (msg, work, claim_written, outcome, self.now())
            } else {
                break;
            };
            // Whether steps performed together with this one have outcomes still to take.
            let more = !known.is_empty() || !running.is_empty();
            let safe = repeat_safe(engine, &msg, &work);
            if claim_written && let Some(l) = lease_of(&run, &msg) {
                lease = Some(lease.map_or(l, |e| e.min(l)));
            }
            // When the first outcome held was known (of those taken together, the earliest).
            held_since = Some(match held_since {
                Some(t) if !held.is_empty() => t.min(at),
                _ => at,
            });
            held.push(Held {
                msg: msg.clone(),
                outcome,
                claim_written,
                safe,
            });
            // Another handler of this run performing here now (the other branch of a decision,
            // delivered with this one) may record these outcomes with its own, in one write:
            // left to it when they are repeat-safe with no claim written, make nothing ready,
            // end nothing, and nothing is left to do here. Its write is awaited; if it does not
            // make it, they are written here.
            if queue.is_empty()
                && !more
                && held.iter().all(|h| h.safe && !h.claim_written)
                && self.another_performing(&run.id)
                && self.quiet(engine, &run, ver, &held).await
                && let Some(flag) =
                    self.deposit(&run.id, &held, held_since.unwrap_or_else(|| self.now()))
            {
                let recorded = *flag.lock().await;
                self.deposit_settled(&run.id);
                if recorded {
                    held.clear();
                    continue;
                }
            }
            // Recorded on the copy held (most often nobody changed the run meanwhile, so no read
            // before writing), or on a newer one this process wrote meanwhile; on a conflict, on
            // the run as it stands. `run` has every outcome held but this one applied, unless it
            // was replaced by a newer copy (`fresh`): then all of them are applied again.
            let slot = self.written(&msg.run_id);
            let mut newest = slot.lock().await;
            let mut fresh = std::mem::take(&mut reapply_held);
            if let Some((r, v)) = newest.as_ref()
                && *v > ver
            {
                run = r.clone();
                ver = *v;
                fx = Effects::default();
                fresh = true;
            }
            // Outcomes other handlers of the run left (see above): recorded by this write too,
            // held before this handler's newest outcome (the one not yet applied to `run`). On
            // a fresh copy all are applied below; else each deposit is applied now, whole, or
            // left to its handler (its step done or taken meanwhile: that handler sees to it).
            for d in self.take_deposits(&msg.run_id) {
                if !fresh {
                    let mut trial = run.clone();
                    let mut trial_fx = fx.clone();
                    if reapply(engine, &mut trial, &d.held, self.now(), &mut trial_fx)
                        != d.held.len()
                    {
                        continue;
                    }
                    run = trial;
                    fx = trial_fx;
                }
                held_since = Some(held_since.map_or(d.since, |t| t.min(d.since)));
                let newest_own = held.pop();
                held.extend(d.held);
                held.extend(newest_own);
                signals.push(d.signal);
            }
            let mut recorded = false;
            let mut dropped = false;
            for _ in 0..MAX_CONFLICT_RETRIES {
                let now = self.now();
                let applied = if fresh {
                    reapply(engine, &mut run, &held, now, &mut fx)
                } else {
                    // The outcomes held before this one are in `run` already.
                    held.len() - 1
                        + usize::from(engine.finish(
                            &mut run,
                            &msg,
                            held[held.len() - 1].outcome.clone(),
                            now,
                            &mut fx,
                        ))
                };
                if applied == 0 {
                    dropped = true;
                    break;
                }
                // With outcomes of steps performed together still to take, which come at
                // once (`known`): held for the same write, which carries what they all make
                // ready.
                let together = !known.is_empty();
                let next = if !together && carried < MAX_CARRIED {
                    // The time left once the carried steps already queued or running here are
                    // done.
                    let queued: Millis = queue.iter().fold(running_time, |t, (m, _, _)| {
                        t.saturating_add(timeout_of(engine, m))
                    });
                    let room = until.map(|u| u.saturating_sub(now).saturating_sub(queued));
                    self.carry(engine, &mut run, &mut fx, carrier, room, now)
                        .await
                } else {
                    vec![]
                };
                let next_time: Millis = next
                    .iter()
                    .fold(0, |t, (m, _)| t.saturating_add(timeout_of(engine, m)));
                let hold = together
                    || queue.is_empty()
                        && running.is_empty()
                        && !next.is_empty()
                        && held.len() < MAX_HELD
                        && held_since.is_none_or(|t| now.saturating_sub(t) <= MAX_HELD_MS)
                        && held.iter().all(|h| h.safe)
                        && next.iter().all(|(m, w)| repeat_safe(engine, m, w))
                        && fx.messages.is_empty()
                        && fx.new_runs.is_empty()
                        && lease.is_none_or(|l| {
                            now.saturating_add(next_time)
                                .saturating_add(CARRY_MARGIN_MS)
                                <= l
                        });
                if hold {
                    // Recorded with the outcomes of the steps it made ready, after them.
                    carried += next.len();
                    queue.extend(next.into_iter().map(|(m, w)| (m, w, false)));
                    recorded = true;
                    break;
                }
                match self.d.store.save_run(&run, ver, &fx).await {
                    Ok(()) => {
                        ver += 1;
                        *newest = Some((run.clone(), ver));
                        fx = Effects::default();
                        held.clear();
                        for mut recorded in signals.drain(..) {
                            *recorded = true;
                        }
                        lease = None;
                        // The claims of the steps still queued here were in the run just written.
                        for entry in queue.iter_mut() {
                            entry.2 = true;
                        }
                        carried += next.len();
                        queue.extend(next.into_iter().map(|(m, w)| (m, w, true)));
                        recorded = true;
                        break;
                    }
                    Err(StoreError::Conflict(_)) => {
                        let Some((again, v)) = self.d.store.load_run(&msg.run_id).await? else {
                            return Ok(Handled::Done);
                        };
                        run = again;
                        ver = v;
                        fx = Effects::default();
                        fresh = true;
                    }
                    // The steps already carried are taken over when the message comes back
                    // (those still running here end first: see `perform_queue`).
                    Err(e) => return Err(e.into()),
                }
            }
            drop(newest);
            if dropped {
                // Deposits among them go back to their handlers, which see to their own.
                signals.clear();
                // Done or taken by another meanwhile: these outcomes are dropped. Steps may still
                // be carried under this message (by a duplicate of it).
                if held.iter().any(|h| h.msg == *carrier) {
                    let now = self.now();
                    let h = self.adopt(engine, run.clone(), carrier, now, until).await?;
                    if h != Handled::Done {
                        handled = h;
                    }
                }
                held.clear();
                lease = None;
                // The copy held may have been changed by the attempt: the steps still queued
                // here are recorded on the run as it stands.
                let Some((again, v)) = self.d.store.load_run(&msg.run_id).await? else {
                    return Ok(Handled::Done);
                };
                run = again;
                ver = v;
                fx = Effects::default();
                recorded = true;
            }
            if !recorded {
                reapply_held = true;
                handled = Handled::Retry {
                    delay_ms: 100,
                    reason: format!("run {} kept changing under this message", msg.run_id),
                };
            }
        }
        Ok(handled)
    }

    /// The outcomes of steps running at once that are recorded together: the first to finish,
    /// and every other that finishes within [`MAX_HELD_MS`] of it, in the order they started.
    /// Those still running after that are left in `running`, their outcomes recorded when they
    /// come.
    async fn finished_together(
        &self,
        running: &mut Vec<BoxFuture<'_, Performed>>,
    ) -> std::collections::VecDeque<Performed> {
        let mut known = Vec::new();
        known.extend(next_finished(running).await);
        if !running.is_empty() {
            let mut deadline = self.d.clock.sleep(MAX_HELD_MS);
            loop {
                let finished = match futures_util::future::select(
                    Box::pin(next_finished(running)),
                    deadline.as_mut(),
                )
                .await
                {
                    Either::Left((p, _)) => p,
                    Either::Right(_) => None,
                };
                let Some(p) = finished else { break };
                known.push(p);
                if running.is_empty() {
                    break;
                }
            }
        }
        known.sort_by_key(|p| p.seq);
        known.into()
    }

    /// Takes the steps to carry out of `fx`: the first [`CARRIED_PER_WRITE`] `Execute`s of this run
    /// that are due now, while their timeouts fit one after the other in `room` (the time the
    /// invocation has left for them; `None`: no limit) and the kill switch lets the run go on. They are
    /// claimed on `run` (in the write about to be made). A step the engine settles by itself
    /// (set, wait, a failed render) is settled here, and what it makes ready looked at in turn.
    async fn carry(
        &self,
        engine: &Engine<'_>,
        run: &mut Run,
        fx: &mut Effects,
        carrier: &StepMessage,
        room: Option<Millis>,
        now: Millis,
    ) -> Vec<(StepMessage, Work)> {
        let mut out = Vec::new();
        if run.status.is_terminal()
            || (!matches!(run.trigger, Trigger::Manual { .. })
                && !matches!(self.killed().await, Ok(None)))
        {
            return out;
        }
        let run_id = run.id.clone();
        // Carried steps run one after the other: each must fit in `room` after those before it.
        let mut used: Millis = 0;
        let mut fits = |m: &StepMessage, delay: u64| {
            let ok = delay == 0
                && m.kind == MessageKind::Execute
                && m.run_id == run_id
                && engine
                    .playbook
                    .step(&m.step)
                    .is_some_and(|(_, s)| !matches!(s.kind, StepKind::Playbook { .. }))
                && room.is_none_or(|r| {
                    used.saturating_add(timeout_of(engine, m))
                        .saturating_add(CARRY_MARGIN_MS)
                        <= r
                });
            if ok {
                used = used.saturating_add(timeout_of(engine, m));
            }
            ok
        };
        // In the order the engine made them ready; what a settled step makes ready is looked at
        // after. Bounded: each round claims or keeps one message.
        let mut queue: std::collections::VecDeque<(StepMessage, u64)> =
            std::mem::take(&mut fx.messages).into();
        let mut kept = Vec::new();
        for _ in 0..MAX_CARRIED * 4 {
            let Some((next, delay)) = queue.pop_front() else {
                break;
            };
            if out.len() >= CARRIED_PER_WRITE || !fits(&next, delay) {
                kept.push((next, delay));
                continue;
            }
            let links = match engine.playbook.step(&next.step).map(|(_, s)| &s.kind) {
                Some(StepKind::Approval(a)) => Some(self.issue_links(&next, a, now)),
                _ => None,
            };
            match engine.claim(run, &next, now, links.as_ref(), fx) {
                Claim::Execute(work) => {
                    engine.mark_carried(run, &next, carrier);
                    out.push((next, work));
                }
                Claim::Settled => {}
                Claim::Stale(_) | Claim::Busy(_) => kept.push((next, delay)),
            }
            queue.extend(fx.messages.drain(..));
        }
        kept.extend(queue);
        fx.messages = kept;
        out
    }

    async fn perform(&self, work: &Work) -> Outcome {
        match work {
            Work::Http(req) => self.send(req).await,
            Work::Call(c) => self.call(c).await,
            Work::Recover(c) => match self.resolve(c) {
                Ok((op, conn)) => crate::connector::call::recover(
                    op,
                    &c.inputs,
                    &c.key,
                    conn,
                    self.d.http.as_ref(),
                    c.timeout_ms,
                )
                .await
                .into_outcome(op.idempotent),
                Err(why) => Outcome::Unknown(why),
            },
            Work::Announce(_) => Outcome::Waiting,
            Work::Notify(list) => {
                let mut sent = Vec::new();
                for n in list {
                    let (connection, outcome) = match n {
                        NotifyWork::Http(r) => (&r.connection, self.send(r).await),
                        NotifyWork::Call(c) => (&c.connection, self.call(c).await),
                    };
                    match outcome {
                        Outcome::Failed { message, retryable } => {
                            return Outcome::Failed {
                                message: format!(
                                    "sending the approval through `{connection}`: {message}"
                                ),
                                retryable,
                            };
                        }
                        // An approval message lost in flight is sent again: a duplicate
                        // message is better than an approval nobody sees.
                        Outcome::Unknown(message) => {
                            return Outcome::Failed {
                                message,
                                retryable: true,
                            };
                        }
                        Outcome::Done(v) => sent.push(v),
                        Outcome::Waiting | Outcome::Asked(_) => sent.push(Value::Null),
                    }
                }
                Outcome::Asked(sent)
            }
            Work::Local(v) => Outcome::Done(v.clone()),
            Work::StartChild => Outcome::Failed {
                message: "child runs start in handle".into(),
                retryable: false,
            },
        }
    }

    /// A call's operation and connection, checked again at call time.
    fn resolve(&self, c: &Call) -> Result<(&Operation, &Connection), String> {
        let op = self
            .d
            .catalog
            .operation_named(&c.operation)
            .ok_or_else(|| format!("unknown operation `{}`", c.operation))?;
        let conn = self
            .d
            .connections
            .get(&c.connection)
            .ok_or_else(|| format!("unknown connection `{}`", c.connection))?;
        if let Some(connector) = self.d.catalog.connector(&op.connector)
            && let Some(why) = connector
                .misfits(conn, self.d.connections.allow_any_host)
                .into_iter()
                .next()
        {
            return Err(why);
        }
        Ok((op, conn))
    }

    async fn call(&self, c: &Call) -> Outcome {
        let (op, conn) = match self.resolve(c) {
            Ok(found) => found,
            Err(message) => {
                return Outcome::Failed {
                    message,
                    retryable: false,
                };
            }
        };
        let guards = self.guards();
        if let Err(refused) = guards.check_never_touch(&c.operation, &c.inputs) {
            return Outcome::Failed {
                message: refused.0,
                retryable: false,
            };
        }
        if let Some((max, window)) = guards.cap(&c.operation) {
            let now = self.now();
            let start = now - now.rem_euclid(window as Millis);
            let bucket = format!("{}#{start}", c.operation);
            match self
                .d
                .store
                .take_token(&bucket, max, start + window as Millis)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    return Outcome::Failed {
                        message: format!(
                            "refused: the rate cap of `{}` ({max} per {}) is reached",
                            c.operation, guards.rate_caps[&c.operation].per
                        ),
                        retryable: false,
                    };
                }
                Err(e) => {
                    return Outcome::Failed {
                        message: format!("checking the rate cap of `{}`: {e}", c.operation),
                        retryable: true,
                    };
                }
            }
        }
        call_with_timeout(
            op,
            &c.inputs,
            &c.key,
            conn,
            self.d.http.as_ref(),
            c.timeout_ms,
        )
        .await
        .into_outcome(op.idempotent)
    }

    async fn send(&self, req: &HttpRequest) -> Outcome {
        match self.d.connections.get(&req.connection) {
            None => Outcome::Failed {
                message: format!("unknown connection `{}`", req.connection),
                retryable: false,
            },
            Some(conn) => outcome_of(self.d.http.send(conn, req).await),
        }
    }

    async fn save(&self, run: &Run, ver: u64, fx: &Effects) -> Result<(), Error> {
        self.d
            .store
            .save_run(run, ver, fx)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(m) => Error::Conflict(m),
                e => e.into(),
            })
    }

    fn issue_links(
        &self,
        msg: &StepMessage,
        a: &crate::playbook::Approval,
        now: Millis,
    ) -> IssuedLinks {
        let nonce = self.d.signer.nonce_for(&format!(
            "{}/{}/{}/{}",
            msg.run_id, msg.step, msg.iteration, msg.attempt
        ));
        let mut links = serde_json::Map::new();
        for choice in &a.choices {
            let token = self.d.signer.sign(&Claims {
                r: msg.run_id.clone(),
                s: msg.step.clone(),
                i: msg.iteration,
                c: choice.clone(),
                e: now + a.expires_in_ms as Millis,
                a: a.approvers.clone(),
                n: nonce.clone(),
            });
            links.insert(
                choice.clone(),
                Value::String(format!(
                    "{}/approvals/{token}",
                    self.d.config.public_url.trim_end_matches('/')
                )),
            );
        }
        IssuedLinks {
            nonce_hash: nonce_hash(&nonce),
            links,
        }
    }

    // ----- approvals -----

    async fn approval_of(&self, token: &str) -> Result<(Claims, Run, u64, ApprovalView), Error> {
        self.approval_read(token, false).await
    }

    /// [`Self::approval_of`]; `lagging`: read as [`Store::load_run_lagging`] does (to show it).
    async fn approval_read(
        &self,
        token: &str,
        lagging: bool,
    ) -> Result<(Claims, Run, u64, ApprovalView), Error> {
        let claims = self.d.signer.verify(token).map_err(|e| match e {
            TokenError::Malformed | TokenError::BadSignature => {
                Error::Forbidden(format!("{e}: it was altered or not issued by this Riposte"))
            }
        })?;
        let forged =
            || Error::Forbidden("this approval link does not belong to a current approval".into());
        let loaded = if lagging {
            self.d.store.load_run_lagging(&claims.r).await?
        } else {
            self.d.store.load_run(&claims.r).await?
        };
        let (run, ver) = loaded.ok_or_else(forged)?;
        let it = run
            .steps
            .iter()
            .find(|s| s.id == claims.s)
            .and_then(|s| s.iterations.get(claims.i as usize))
            .ok_or_else(forged)?;
        let ap = it.approval.as_ref().ok_or_else(forged)?;
        if !same_hash(&ap.nonce_hash, &nonce_hash(&claims.n)) {
            return Err(forged());
        }
        let view = ApprovalView {
            run_id: run.id.clone(),
            playbook_id: run.playbook_id.clone(),
            step: claims.s.clone(),
            message: ap.message.clone(),
            choice: claims.c.clone(),
            choices: ap.choices.clone(),
            expires_at: ap.expires_at,
            decided: ap.decision.clone(),
        };
        Ok((claims, run, ver, view))
    }

    /// What a link's confirm page shows. Never decides. The run is read as a read that may lag
    /// the latest write finds it (half the price on AWS): a link is only refused after a read
    /// that does not lag, and a decision the page misses is found by the POST, which reads
    /// strongly.
    pub async fn approval_view(&self, token: &str) -> Result<ApprovalView, Error> {
        let (claims, run, _, view) = match self.approval_read(token, true).await {
            Ok(found) => found,
            Err(_) => self.approval_of(token).await?,
        };
        if let Some(d) = &view.decided {
            return Err(Error::Conflict(format!(
                "already answered: `{}` by {}",
                d.choice, d.by
            )));
        }
        if run.status.is_terminal() {
            return Err(Error::Gone(format!("the run is {}", run.status.as_str())));
        }
        if claims.e <= self.now() {
            return Err(Error::Gone("this approval link has expired".into()));
        }
        Ok(view)
    }

    /// Answers an approval with the link's choice. The first valid answer wins.
    pub async fn decide(&self, token: &str, by: Option<&str>) -> Result<ApprovalView, Error> {
        let (claims, run, ver, _) = self.approval_of(token).await?;
        if claims.e <= self.now() {
            return Err(Error::Gone("this approval link has expired".into()));
        }
        let who = match by.map(str::trim).filter(|s| !s.is_empty()) {
            Some(name) => {
                if !claims.a.is_empty() && !claims.a.iter().any(|a| a.eq_ignore_ascii_case(name)) {
                    return Err(Error::Forbidden(format!(
                        "{name} is not an approver of this step"
                    )));
                }
                name.to_string()
            }
            None => "approval link".to_string(),
        };
        self.decide_at(
            &claims.r,
            &claims.s,
            claims.i,
            &claims.c,
            &who,
            Some(&claims.n),
            Some((run, ver)),
        )
        .await
    }

    /// An authenticated operator answers an approval of a run (the `riposte approve` path).
    /// Named approvers, when the approval has any, are enforced.
    pub async fn decide_as(
        &self,
        run_id: &str,
        step: &str,
        iteration: u32,
        choice: &str,
        by: &str,
    ) -> Result<ApprovalView, Error> {
        self.decide_at(run_id, step, iteration, choice, by, None, None)
            .await
    }

    /// Records the answer; `loaded`: the run as just read (the link's checks read it), written
    /// on as it is (no second read); after a conflict, the run is read again.
    #[allow(clippy::too_many_arguments)]
    async fn decide_at(
        &self,
        run_id: &str,
        step: &str,
        iteration: u32,
        choice: &str,
        who: &str,
        nonce: Option<&str>,
        mut loaded: Option<(Run, u64)>,
    ) -> Result<ApprovalView, Error> {
        for _ in 0..MAX_CONFLICT_RETRIES {
            let (mut run, ver) = match loaded.take() {
                Some(copy) => copy,
                None => self.load(run_id).await?,
            };
            let ap = run
                .steps
                .iter()
                .find(|s| s.id == step)
                .and_then(|s| s.iterations.get(iteration as usize))
                .and_then(|it| it.approval.clone())
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "no approval at step `{step}` iteration {iteration} of run {run_id}"
                    ))
                })?;
            match nonce {
                Some(n) if !same_hash(&ap.nonce_hash, &nonce_hash(n)) => {
                    return Err(Error::Forbidden(
                        "this approval link does not belong to a current approval".into(),
                    ));
                }
                None if !ap.approvers.is_empty()
                    && !ap.approvers.iter().any(|a| a.eq_ignore_ascii_case(who)) =>
                {
                    return Err(Error::Forbidden(format!(
                        "{who} is not an approver of this step"
                    )));
                }
                _ => {}
            }
            let pb = self
                .playbook(&run.playbook_id, run.playbook_version)
                .await?;
            let mut fx = Effects::default();
            let now = self.now();
            match Engine::new(&pb).decide(
                &mut run,
                &Answer {
                    step,
                    iteration,
                    choice,
                    by: who,
                },
                now,
                &mut fx,
            ) {
                Ok(()) => {}
                Err(e @ DecideError::AlreadyDecided { .. }) => {
                    return Err(Error::Conflict(e.to_string()));
                }
                Err(e @ (DecideError::Closed(_) | DecideError::Expired)) => {
                    return Err(Error::Gone(e.to_string()));
                }
                Err(e @ DecideError::BadChoice(_)) => return Err(Error::BadRequest(e.to_string())),
                Err(e @ (DecideError::NotAllowed(_) | DecideError::NotFound)) => {
                    return Err(Error::Forbidden(e.to_string()));
                }
            }
            match self.d.store.save_run(&run, ver, &fx).await {
                Ok(()) => {
                    tracing::info!(message = "Approval answered.", run_id = %run.id, step = %step, choice = %choice, by = %who);
                    return Ok(ApprovalView {
                        run_id: run.id.clone(),
                        playbook_id: run.playbook_id.clone(),
                        step: step.into(),
                        message: ap.message.clone(),
                        choice: choice.into(),
                        choices: ap.choices.clone(),
                        expires_at: ap.expires_at,
                        decided: Some(crate::run::Decision {
                            choice: choice.into(),
                            by: who.into(),
                            at: now,
                            expired: false,
                        }),
                    });
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Unavailable("the run is busy; try again".into()))
    }

    // ----- administration -----

    /// Validates and stores a playbook as a new version.
    pub async fn put_playbook(
        &self,
        spec: PlaybookSpec,
        by: &str,
    ) -> Result<StoredPlaybook, Error> {
        let pb =
            playbook::compile(spec.clone(), 0, self.d.catalog.as_ref()).map_err(Error::Invalid)?;
        let missing = self.d.catalog.check_connections(&pb, &self.d.connections);
        if !missing.is_empty() {
            return Err(Error::Invalid(Problems(missing)));
        }
        for s in &pb.steps {
            if let StepKind::Playbook { id, .. } = &s.kind
                && id != pb.id()
                && self.d.store.get_playbook(id, None).await?.is_none()
            {
                return Err(Error::Invalid(Problems(vec![playbook::Problem {
                    file: None,
                    step: Some(s.id.clone()),
                    field: "playbook".into(),
                    message: format!("unknown playbook `{id}`"),
                }])));
            }
        }
        let now = self.now();
        let version = self.d.store.put_playbook(&spec, by, now).await?;
        self.forget_rules();
        self.audit(
            by,
            "playbook.put",
            &spec.id,
            Some(format!("version {version}")),
        )
        .await?;
        Ok(StoredPlaybook {
            spec,
            version,
            created_by: by.into(),
            created_at: now,
            deleted: false,
        })
    }

    pub async fn delete_playbook(&self, id: &str, by: &str) -> Result<(), Error> {
        if !self.d.store.delete_playbook(id).await? {
            return Err(Error::NotFound(format!("playbook `{id}` not found")));
        }
        self.forget_rules();
        self.audit(by, "playbook.delete", id, None).await
    }

    /// Validates and stores a rule (create or replace).
    pub async fn put_rule(&self, mut r: Rule, by: &str) -> Result<Rule, Error> {
        let mut known = Vec::new();
        for id in &r.playbooks {
            if self.d.store.get_playbook(id, None).await?.is_some() {
                known.push(id.clone());
            }
        }
        r.updated_by = Some(by.into());
        r.updated_at = Some(self.now());
        let compiled = r
            .clone()
            .compile(&|id| known.iter().any(|k| k == id))
            .map_err(Error::Invalid)?;
        self.d.store.put_rule(&compiled.rule).await?;
        self.forget_rules();
        self.audit(
            by,
            "rule.put",
            &r.id,
            Some(format!("enabled={}", r.enabled)),
        )
        .await?;
        Ok(compiled.rule)
    }

    pub async fn set_rule_enabled(&self, id: &str, enabled: bool, by: &str) -> Result<Rule, Error> {
        let mut r = self
            .d
            .store
            .get_rule(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("rule `{id}` not found")))?;
        r.enabled = enabled;
        self.put_rule(r, by).await
    }

    pub async fn delete_rule(&self, id: &str, by: &str) -> Result<(), Error> {
        if !self.d.store.delete_rule(id).await? {
            return Err(Error::NotFound(format!("rule `{id}` not found")));
        }
        self.forget_rules();
        self.audit(by, "rule.delete", id, None).await
    }

    async fn audit(
        &self,
        by: &str,
        action: &str,
        target: &str,
        detail: Option<String>,
    ) -> Result<(), Error> {
        self.d
            .store
            .append_audit(&AuditEntry {
                at: self.now(),
                by: by.into(),
                action: action.into(),
                target: target.into(),
                detail,
            })
            .await
            .map_err(Into::into)
    }

    /// Rules for one trigger kind, in evaluation order.
    pub async fn list_rules(&self) -> Result<Vec<Rule>, Error> {
        let mut rules = self.d.store.list_rules(None).await?;
        rules.sort_by(|a, b| (a.order, &a.id).cmp(&(b.order, &b.id)));
        Ok(rules)
    }
}

fn poisoned() -> Error {
    Error::Unavailable("internal cache lock poisoned".into())
}
