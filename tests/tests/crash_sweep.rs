//! Crash sweeps of the local runtime on the shipped Block/Ignore playbook: the process dies at
//! every I/O boundary of one Block run and one Ignore run, is started again on the same database,
//! and the run must end as a fault-free run ends: same terminal state, same step outputs, every
//! vendor effect made for exactly the same keys, and no call that must not repeat sent twice (a
//! human settles such a call when its outcome is unknown: `done` when the vendor got it, `retry`
//! when it did not).
//!
//! - In process: the store is wrapped in one that counts every store and queue operation and, at
//!   operation N, "crashes": fails it before applying it, or applies it and loses the reply. From
//!   then on that runtime is dead (every store operation and HTTP call fails, nothing is acked),
//!   as a killed process; a fresh runtime over the same SQLite file finishes the work. N sweeps
//!   every operation of a fault-free run, in both modes, for Block and for Ignore. The vendor
//!   stand-ins also kill the runtime when request k arrives (before answering), for every k.
//! - The real binary: `riposte serve` is sent SIGKILL by the stand-in when request k of the Block
//!   run arrives, for every k, then started again on the same database. It runs with
//!   `--workers 1`, so request k is the same boundary in every case.
//!
//! Approval messages sent twice (see [`Gap`]) are printed, not failed; anything else fails.
//! `RIPOSTE_SWEEP_LIST=1` prints every boundary swept.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};

use riposte::runtime::{Local, OsIds, build, load_connections, load_guards, seed};
use riposte_core::approval::Signer;
use riposte_core::connector::ConnectorCatalog;
use riposte_core::engine::{UNKNOWN_OUTCOME_CHOICES, Worker};
use riposte_core::guard::Guards;
use riposte_core::http::{Connection, HttpError, HttpRequest, HttpResponse};
use riposte_core::ports::{HttpSender, IdSource};
use riposte_core::run::{Run, RunStatus, StepStatus};
use riposte_core::service::{Config, Deps, Error, Handled, Service};
use riposte_core::store::{Store, StoreError};
use riposte_sqlite::SqliteStore;
use riposte_tests::faults::{HistorySeen, Hook, Op, Wrapped};
use riposte_tests::vendors::{self, SECRETS, Vendors};
use riposte_tests::{
    OPERATOR_KEY, OffsetClock, Recorded, Vendor, event, repo, riposte_bin, secrets_from, sender,
    test_connections, wait_ready,
};

const EVENT: &str = "guardduty-malicious-ip-caller.json";
/// Who answers the Block/Ignore question (one of its approvers).
const APPROVER: &str = "netadmin@example.com";
/// Who settles a call whose outcome is unknown.
const OPERATOR: &str = "olivia";
/// The API key named [`OPERATOR`] in the binary sweep ([`OPERATOR_KEY`] is named [`APPROVER`]).
const OLIVIA_KEY: &str = "test-olivia-operator-key-0123456789";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Block,
    Ignore,
}

impl Flow {
    fn choice(self) -> &'static str {
        match self {
            Flow::Block => "block",
            Flow::Ignore => "ignore",
        }
    }
}

/// How a store operation crashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The process dies before the operation is applied.
    Before,
    /// The operation is applied, and the process dies before it learns so.
    After,
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    None,
    /// Crash at the store or queue operation with this index (from 0).
    Store(usize, Mode),
    /// Die when the k-th vendor request (from 1) arrives, before it is answered.
    Request(usize),
}

// ----- the dying process -----

fn dead() -> StoreError {
    StoreError::Unavailable("the process is dead".into())
}

/// One process's life: counts its store and queue operations and dies at the planned one.
struct Plan {
    crash_at: Option<(usize, Mode)>,
    ops: AtomicUsize,
    dead: AtomicBool,
    /// What the process is doing (the message it handles, the answer it records).
    context: Mutex<String>,
    /// Every operation, labelled, in order.
    log: Mutex<Vec<String>>,
}

impl Plan {
    fn new(crash_at: Option<(usize, Mode)>) -> Plan {
        Plan {
            crash_at,
            ops: AtomicUsize::new(0),
            dead: AtomicBool::new(false),
            context: Mutex::new(String::new()),
            log: Mutex::new(Vec::new()),
        }
    }

    fn is_dead(&self) -> bool {
        self.dead.load(SeqCst)
    }

    fn kill(&self) {
        self.dead.store(true, SeqCst);
    }

    fn set_context(&self, what: impl Into<String>) {
        *self.context.lock().unwrap() = what.into();
    }

    /// Before each operation: an error once dead; `Some(mode)` when this one is the crash.
    fn enter(&self, op: &str) -> Result<Option<Mode>, StoreError> {
        if self.is_dead() {
            return Err(dead());
        }
        let n = self.ops.fetch_add(1, SeqCst);
        let label = format!("{}: {op}", self.context.lock().unwrap());
        self.log.lock().unwrap().push(label);
        match self.crash_at {
            Some((at, mode)) if at == n => {
                self.kill();
                Ok(Some(mode))
            }
            _ => Ok(None),
        }
    }

    async fn op<T>(
        &self,
        op: &str,
        f: impl std::future::Future<Output = Result<T, StoreError>> + Send,
    ) -> Result<T, StoreError> {
        match self.enter(op)? {
            None => f.await,
            Some(Mode::Before) => Err(dead()),
            Some(Mode::After) => {
                let _ = f.await;
                Err(dead())
            }
        }
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

/// What happens at a store operation: it goes through the [`Plan`], labelled by its name, a run
/// write by what it adds to the run's history (see [`HistorySeen`]). Wrapped around the real SQLite
/// store.
struct Dying {
    plan: Arc<Plan>,
    /// How much of each run's history this process has seen: a save is labelled by what it adds.
    seen: HistorySeen,
}

fn faulty(inner: Arc<SqliteStore>, plan: Arc<Plan>) -> Wrapped<Dying> {
    Wrapped::new(
        inner,
        Dying {
            plan,
            seen: HistorySeen::default(),
        },
    )
}

impl Hook for Dying {
    async fn around<T: Send>(
        &self,
        op: Op<'_>,
        call: BoxFuture<'_, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        // e.g. `save_run [open_ticket succeeded, ask_admins queued]`.
        let label = match op {
            Op::CreateRun { run, .. } | Op::SaveRun { run, .. } => {
                format!("{} [{}]", op.name(), self.seen.added(run))
            }
            Op::TakeToken { bucket, .. } => {
                format!("take_token [{}]", bucket.split('#').next().unwrap_or(""))
            }
            _ => op.name().to_string(),
        };
        self.plan.op(&label, call).await
    }

    fn loaded(&self, run: &Run) {
        self.seen.loaded(run);
    }
}

/// A dead process sends nothing.
struct Gated {
    inner: Arc<dyn HttpSender>,
    plan: Arc<Plan>,
}

#[async_trait]
impl HttpSender for Gated {
    async fn send(
        &self,
        connection: &Connection,
        request: &HttpRequest,
    ) -> Result<HttpResponse, HttpError> {
        if self.plan.is_dead() {
            return Err(HttpError::NotSent("the process is dead".into()));
        }
        self.inner.send(connection, request).await
    }
}

// ----- vendor stand-ins that kill on the k-th request -----

/// Counts the requests every stand-in receives and kills the current process at the k-th.
struct Killer {
    requests: AtomicUsize,
    kill_at: Option<usize>,
    kill: Mutex<Option<Box<dyn FnMut() + Send>>>,
    /// Every request, `vendor METHOD path`, in arrival order.
    log: Mutex<Vec<String>>,
}

impl Killer {
    fn new(kill_at: Option<usize>) -> Arc<Killer> {
        Arc::new(Killer {
            requests: AtomicUsize::new(0),
            kill_at,
            kill: Mutex::new(None),
            log: Mutex::new(Vec::new()),
        })
    }

    fn arm(&self, kill: impl FnMut() + Send + 'static) {
        *self.kill.lock().unwrap() = Some(Box::new(kill));
    }

    fn on_request(&self, vendor: &str, r: &Recorded) {
        self.log
            .lock()
            .unwrap()
            .push(format!("{vendor} {} {}", r.method, r.path));
        let n = self.requests.fetch_add(1, SeqCst) + 1;
        if Some(n) == self.kill_at
            && let Some(k) = self.kill.lock().unwrap().as_mut()
        {
            k();
        }
    }
}

/// The Block/Ignore vendors of the kit, each reporting its requests to `killer` on arrival.
async fn stand_ins(killer: &Arc<Killer>) -> Vendors {
    fn hooked(
        killer: &Arc<Killer>,
        vendor: &'static str,
        answer: fn(&Recorded) -> (u16, Value),
    ) -> impl Fn(&Recorded) -> (u16, Value) + Send + Sync + 'static {
        let killer = killer.clone();
        move |r| {
            killer.on_request(vendor, r);
            answer(r)
        }
    }
    let sn_killer = killer.clone();
    Vendors {
        servicenow: Vendor::start_with_history("servicenow", move |r, earlier| {
            sn_killer.on_request("servicenow", r);
            vendors::servicenow_with_history(r, earlier)
        })
        .await,
        slack: Vendor::start("slack", hooked(killer, "slack", vendors::slack)).await,
        email: Vendor::start("email", hooked(killer, "email", vendors::ses)).await,
        panos: Vendor::start("panos", hooked(killer, "panos", vendors::panos)).await,
        entra: Vendor::start("entra", hooked(killer, "entra", vendors::entra)).await,
        securityhub: Vendor::start(
            "aws_securityhub",
            hooked(killer, "aws_securityhub", vendors::securityhub),
        )
        .await,
    }
}

// ----- what a run did -----

/// Replaces every approval token (after `/approvals/`) in `text` with `TOKEN`.
fn mask_tokens(text: &str) -> String {
    let mut tokens = BTreeSet::new();
    for (i, _) in text.match_indices("/approvals/") {
        let rest = &text[i + "/approvals/".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || "-_.~".contains(c)))
            .unwrap_or(rest.len());
        if end > 0 {
            tokens.insert(rest[..end].to_string());
        }
    }
    let mut out = text.to_string();
    // The approval links' origin (the binary's port differs from case to case).
    while let Some(i) = out.find("http://127.0.0.1:") {
        let rest = &out[i + "http://127.0.0.1:".len()..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        out = format!("{}PUBLIC_URL{}", &out[..i], &rest[end..]);
    }
    // Longest first, so no token is cut by a shorter one it contains.
    let mut tokens: Vec<String> = tokens.into_iter().collect();
    tokens.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in tokens {
        out = out.replace(&t, "TOKEN");
    }
    out
}

/// A request's effect, comparable across runs (approval tokens and decision times masked), and
/// whether it must never be repeated. `None` for the Entra token request, which changes nothing.
fn effect(vendor: &str, r: &Recorded) -> Option<(String, bool)> {
    // A token request changes nothing; nor does a lookup (ServiceNow's check, after a lost
    // worker, of whether its create took effect).
    if (vendor == "entra" && r.path.ends_with("/oauth2/v2.0/token")) || r.method == "GET" {
        return None;
    }
    let text = mask_tokens(&r.body);
    let mut body = match serde_json::from_str::<Value>(&text) {
        Ok(v) => canonical(&v),
        Err(_) => Value::String(text),
    };
    if r.path == "/api/chat.update"
        && let Some(t) = body["text"].as_str()
        && let Some((head, rest)) = t.split_once(" at ")
    {
        let tail = rest.split_once(". ").map(|x| x.1).unwrap_or("");
        body["text"] = json!(format!("{head} at TIME. {tail}"));
    }
    let keys: Vec<String> = ["idempotency-key", "x-riposte-delivery"]
        .iter()
        .filter_map(|h| r.header(h).map(|v| format!("{h}={v}")))
        .collect();
    let once = matches!(
        (vendor, r.method.as_str(), r.path.as_str()),
        ("servicenow", "POST", _) | ("slack", _, "/api/chat.postMessage") | ("email", _, _)
    );
    Some((
        format!(
            "{vendor} {} {}{} {keys:?} {body}",
            r.method,
            r.path,
            r.query
                .as_deref()
                .map(|q| format!("?{q}"))
                .unwrap_or_default()
        ),
        once,
    ))
}

/// Every vendor effect, with how many times it was made.
fn effects(v: &Vendors) -> BTreeMap<String, (usize, bool)> {
    let mut out = BTreeMap::new();
    for vendor in [
        &v.servicenow,
        &v.slack,
        &v.email,
        &v.panos,
        &v.entra,
        &v.securityhub,
    ] {
        for r in vendor.requests() {
            if let Some((e, once)) = effect(&vendor.name, &r) {
                out.entry(e).or_insert((0, once)).0 += 1;
            }
        }
    }
    out
}

/// The same value with every object's members sorted by name (bodies are compared as text).
fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, Value> =
                m.iter().map(|(k, v)| (k, canonical(v))).collect();
            Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// Drops the times of decisions and confirmations, which differ from run to run.
fn scrub(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "decided_at" | "confirmed_at"))
                .map(|(k, v)| (k.clone(), scrub(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(scrub).collect()),
        other => other.clone(),
    }
}

/// Steps whose unknown outcome a human settled, and how.
fn settled(run: &Run) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for s in &run.steps {
        for it in &s.iterations {
            if let Some(a) = &it.approval
                && a.choices == UNKNOWN_OUTCOME_CHOICES
                && let Some(d) = &a.decision
            {
                out.push((s.id.clone(), d.choice.clone()));
            }
        }
    }
    out
}

/// The iteration a human must settle: a call whose outcome is unknown.
fn unknown_outcome(run: &Run) -> Option<(String, u32)> {
    run.steps.iter().find_map(|s| {
        s.iterations.iter().enumerate().find_map(|(i, it)| {
            let a = it.approval.as_ref()?;
            (it.status == StepStatus::Waiting
                && a.choices == UNKNOWN_OUTCOME_CHOICES
                && a.decision.is_none())
            .then(|| (s.id.clone(), i as u32))
        })
    })
}

/// True while the admins' question waits for its answer.
fn asking(run: &Run) -> bool {
    run.step("ask_admins").is_some_and(|s| {
        s.iterations.first().is_some_and(|it| {
            it.status == StepStatus::Waiting
                && it
                    .approval
                    .as_ref()
                    .is_some_and(|a| a.decision.is_none() && a.choices != UNKNOWN_OUTCOME_CHOICES)
        })
    })
}

/// Whether the vendor received the call of a step whose outcome is unknown.
fn was_called(v: &Vendors, step: &str) -> bool {
    match step {
        "open_ticket" => v.servicenow.requests().iter().any(|r| r.method == "POST"),
        "tell_soc" => v
            .slack
            .requests()
            .iter()
            .any(|r| r.path == "/api/chat.postMessage" && r.json().get("blocks").is_none()),
        other => panic!("step {other} is repeat-safe: its outcome is never unknown"),
    }
}

/// How a run ended and what it did.
struct Seen {
    run: Run,
    effects: BTreeMap<String, (usize, bool)>,
}

/// What differs from the fault-free run.
fn problems(base: &Seen, got: &Seen) -> Vec<String> {
    let mut p = Vec::new();
    if got.run.status != base.run.status {
        p.push(format!(
            "run {} (fault-free: {}): {}",
            got.run.status.as_str(),
            base.run.status.as_str(),
            got.run.error.as_deref().unwrap_or("")
        ));
    }
    let by_human: BTreeSet<String> = settled(&got.run)
        .into_iter()
        .filter(|(_, c)| c == "done")
        .map(|(s, _)| s)
        .collect();
    for b in &base.run.steps {
        let Some(g) = got.run.step(&b.id) else {
            p.push(format!("step {} missing", b.id));
            continue;
        };
        if g.status != b.status {
            p.push(format!(
                "step {} {} (fault-free: {}): {:?}",
                b.id,
                g.status.as_str(),
                b.status.as_str(),
                g.error
                    .as_ref()
                    .or(g.iterations.iter().find_map(|i| i.error.as_ref()))
            ));
            continue;
        }
        if by_human.contains(&b.id) {
            for it in &g.iterations {
                let out = it.output.as_ref().map(scrub);
                if out != Some(json!({"confirmed_by": OPERATOR})) {
                    p.push(format!("step {} settled `done`, output {out:?}", b.id));
                }
            }
            continue;
        }
        let outs = |s: &riposte_core::run::StepState| {
            (
                s.output.as_ref().map(scrub),
                s.iterations
                    .iter()
                    .map(|i| i.output.as_ref().map(scrub))
                    .collect::<Vec<_>>(),
            )
        };
        if outs(g) != outs(b) {
            p.push(format!(
                "step {} output {:?} (fault-free: {:?})",
                b.id,
                outs(g),
                outs(b)
            ));
        }
    }
    for (e, (n, once)) in &got.effects {
        match base.effects.get(e) {
            None => p.push(format!("an effect the fault-free run never made: {e}")),
            Some(_) if *once && *n > 1 => p.push(format!(
                "a call that must not repeat was made {n} times: {e}"
            )),
            Some(_) => {}
        }
    }
    for e in base.effects.keys() {
        if !got.effects.contains_key(e) {
            p.push(format!("an effect never made: {e}"));
        }
    }
    p
}

/// What the sweep accepts beyond the fault-free run, on purpose. A case showing this, and
/// nothing else, is reported (printed) rather than failed; anything else fails the test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Gap {
    /// An approval's messages (`email.send`, `slack.ask`) are sent again when the process dies
    /// after sending them and before the step is recorded as waiting. Approval messages are at
    /// least once (a question nobody sees is worse than one seen twice); both copies carry the
    /// same links, whose nonce derives from (run, step, iteration, attempt).
    NotifyResent,
}

/// Which known gap, if any, explains every problem of a case.
fn known_gap(p: &[String]) -> Option<Gap> {
    if !p.is_empty()
        && p.iter().all(|l| {
            l.starts_with("a call that must not repeat was made 2 times: email POST ")
            || (l.starts_with(
                "a call that must not repeat was made 2 times: slack POST /api/chat.postMessage ",
            ) && l.contains("\"blocks\""))
        })
    {
        return Some(Gap::NotifyResent);
    }
    None
}

// ----- the in-process runtime -----

/// Where the in-process runtime's approval links point (nothing listens: answers go through
/// `Service::decide_as`).
const PUBLIC_URL: &str = "http://127.0.0.1:9";

/// One process: the real SQLite store (and its lock file), wrapped with its [`Dying`] hook.
struct Runtime {
    service: Service,
    sqlite: Arc<SqliteStore>,
    plan: Arc<Plan>,
    _local: Local,
}

/// The process died.
struct Crashed;

impl Runtime {
    fn start(
        db: &Path,
        connections: &Path,
        kit: &Kit,
        plan: Arc<Plan>,
        clock: Arc<OffsetClock>,
    ) -> Self {
        let conns = || test_connections(load_connections(connections).unwrap());
        // One HTTP client per process (its Entra token cache dies with it).
        let http: Arc<dyn HttpSender> = Arc::new(Gated {
            inner: sender(secrets_from(SECRETS)),
            plan: plan.clone(),
        });
        // The dropped runtime closed its lock file, but a `riposte serve` that the kill -9 test
        // spawns at that moment may hold a copy of the descriptor between its fork and its exec
        // (which closes it): the lock is then free a moment later, not at once.
        let mut local = None;
        for _ in 0..100 {
            match build(
                db,
                conns(),
                kit.catalog.clone(),
                PUBLIC_URL.into(),
                http.clone(),
                clock.clone(),
            ) {
                Ok(l) => {
                    local = Some(l);
                    break;
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
        let local = local.expect("the crashed runtime released the database (within 2 s)");
        let key = local
            .store
            .meta("approval_key")
            .unwrap()
            .expect("the approval key");
        let service = Service::new(Deps {
            store: Arc::new(faulty(local.store.clone(), plan.clone())),
            http,
            clock,
            ids: Arc::new(OsIds),
            signer: Signer::new(key.as_bytes()),
            connections: conns(),
            catalog: Arc::new(kit.catalog.clone()),
            config: Config {
                public_url: PUBLIC_URL.into(),
                rules_cache_ms: 0,
                worker: Worker {
                    id: OsIds.new_id(),
                    exclusive: true,
                },
            },
        });
        service.set_guards(kit.guards.clone());
        Runtime {
            service,
            sqlite: local.store.clone(),
            plan,
            _local: local,
        }
    }

    /// `riposte::runtime::run_worker` with one worker: handles every due message, acks it only
    /// after `handle` returned, until the queue is idle (timers hours away are left).
    async fn pump(&self, clock: &OffsetClock) -> Result<(), Crashed> {
        for _ in 0..500 {
            if self.plan.is_dead() {
                return Err(Crashed);
            }
            let due = self.sqlite.due(1, &HashSet::new()).expect("the queue");
            let Some(d) = due.into_iter().next() else {
                let now = self.sqlite.now();
                match self.sqlite.next_visible_at().expect("the queue") {
                    Some(at) if at - now <= 60_000 => {
                        clock.advance((at - now).max(1));
                        continue;
                    }
                    _ => return Ok(()),
                }
            };
            let m = &d.message;
            self.plan.set_context(format!(
                "{} [{}] {:?} #{}",
                m.step, m.iteration, m.kind, m.attempt
            ));
            let handled = self.service.handle(m).await;
            if self.plan.is_dead() {
                return Err(Crashed);
            }
            match handled {
                Ok(Handled::Done) => {
                    if self.plan.enter("ack").map_err(|_| Crashed)? == Some(Mode::Before) {
                        return Err(Crashed);
                    }
                    self.sqlite.ack(&[d.seq]).expect("ack");
                }
                Ok(Handled::Retry { delay_ms, .. }) => {
                    if self.plan.enter("delay").map_err(|_| Crashed)? == Some(Mode::Before) {
                        return Err(Crashed);
                    }
                    self.sqlite.delay(d.seq, delay_ms).expect("delay");
                }
                Ok(Handled::Ahead) => panic!("a local message is never sent ahead of its write"),
                Err(e) => panic!("a live process failed to handle {m:?}: {e}"),
            }
        }
        panic!("the queue never went idle");
    }

    /// A human's (or the event source's) request: `Ok(None)` when refused as already done.
    async fn request<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<Option<T>, Crashed> {
        self.plan.set_context(what);
        let r = f.await;
        if self.plan.is_dead() {
            return Err(Crashed);
        }
        match r {
            Ok(v) => Ok(Some(v)),
            Err(Error::Conflict(_)) => Ok(None),
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// What the people around a run know across restarts: the run their event started.
#[derive(Default)]
struct People {
    run_id: Option<String>,
}

/// Delivers the event (again, until accepted), runs the queue, answers the admins' question and
/// settles unknown outcomes, until the run ends or the process dies.
async fn drive(
    rt: &Runtime,
    v: &Vendors,
    flow: Flow,
    people: &mut People,
    clock: &OffsetClock,
) -> Result<Run, Crashed> {
    if people.run_id.is_none() {
        let ev = event(EVENT);
        let out = rt
            .request("POST /events", rt.service.ingest_event(&ev))
            .await?
            .expect("accepted");
        let runs = &out.alerts[0].runs;
        assert_eq!(runs.len(), 1, "{runs:?}");
        people.run_id = Some(runs[0].clone());
    }
    let id = people.run_id.clone().unwrap();
    for _ in 0..20 {
        rt.pump(clock).await?;
        let (run, _) = rt.sqlite.load_run(&id).await.unwrap().expect("the run");
        if run.status.is_terminal() {
            return Ok(run);
        }
        if let Some((step, i)) = unknown_outcome(&run) {
            let choice = if was_called(v, &step) {
                "done"
            } else {
                "retry"
            };
            rt.request(
                &format!("answer {step} `{choice}`"),
                rt.service.decide_as(&id, &step, i, choice, OPERATOR),
            )
            .await?;
        } else if asking(&run) {
            rt.request(
                &format!("answer ask_admins `{}`", flow.choice()),
                rt.service
                    .decide_as(&id, "ask_admins", 0, flow.choice(), APPROVER),
            )
            .await?;
        } else {
            panic!("the run is stuck:\n{}", riposte::timeline::render(&run));
        }
    }
    panic!("the run never ended");
}

/// What every case of a sweep shares: the shipped connectors, the shipped guards, and a
/// database with the examples loaded, copied for each case.
struct Kit {
    catalog: ConnectorCatalog,
    guards: Guards,
    template: PathBuf,
    _dir: tempfile::TempDir,
}

impl Kit {
    async fn new() -> Kit {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("template.db");
        let conns = dir.path().join("template-connections.yaml");
        std::fs::write(&conns, vendors::closed_connections()).unwrap();
        let catalog = ConnectorCatalog::shipped();
        let local = build(
            &template,
            test_connections(load_connections(&conns).unwrap()),
            catalog.clone(),
            PUBLIC_URL.into(),
            sender(secrets_from(SECRETS)),
            Arc::new(OffsetClock::default()),
        )
        .unwrap();
        seed(&local, &repo().join("infra")).await.unwrap();
        drop(local);
        Kit {
            catalog,
            guards: load_guards(&repo().join("infra")).unwrap().unwrap(),
            template,
            _dir: dir,
        }
    }
}

struct CaseResult {
    seen: Seen,
    /// The operations of the first life.
    log: Vec<String>,
    /// How many times the process was started again.
    restarts: usize,
    /// The vendor requests, in arrival order.
    requests: Vec<String>,
}

async fn in_process(kit: &Kit, flow: Flow, fault: Fault) -> CaseResult {
    let killer = Killer::new(match fault {
        Fault::Request(k) => Some(k),
        _ => None,
    });
    let v = stand_ins(&killer).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("riposte.db");
    std::fs::copy(&kit.template, &db).unwrap();
    let conns = dir.path().join("connections.yaml");
    std::fs::write(&conns, vendors::connections(&v)).unwrap();
    let clock = Arc::new(OffsetClock::default());
    let mut people = People::default();
    let mut log = None;
    for life in 0..3 {
        let crash_at = match fault {
            Fault::Store(n, mode) if life == 0 => Some((n, mode)),
            _ => None,
        };
        let plan = Arc::new(Plan::new(crash_at));
        let p = plan.clone();
        killer.arm(move || p.kill());
        let rt = Runtime::start(&db, &conns, kit, plan.clone(), clock.clone());
        let r = drive(&rt, &v, flow, &mut people, &clock).await;
        log.get_or_insert_with(|| plan.log());
        match r {
            Ok(run) => {
                return CaseResult {
                    seen: Seen {
                        run,
                        effects: effects(&v),
                    },
                    log: log.unwrap(),
                    restarts: life,
                    requests: killer.log.lock().unwrap().clone(),
                };
            }
            // Abandoned like a killed process; the next life opens the same file.
            Err(Crashed) => drop(rt),
        }
    }
    panic!("{fault:?}: still dying after 3 lives");
}

/// Failures that are the engine's, not this test's: see the module's report in the final
/// assertion message.
struct Sweep {
    cases: usize,
    failures: Vec<String>,
    /// Cases that ended with a known gap, and where the crash was.
    gaps: Vec<(Gap, String)>,
}

impl Sweep {
    fn new() -> Sweep {
        Sweep {
            cases: 0,
            failures: Vec::new(),
            gaps: Vec::new(),
        }
    }

    fn add(&mut self, at: String, base: &Seen, got: &Seen) {
        self.cases += 1;
        let p = problems(base, got);
        if p.is_empty() {
            return;
        }
        match known_gap(&p) {
            Some(gap) => self.gaps.push((gap, at)),
            None => self.failures.push(format!(
                "{at}, answers {:?}:\n    {}",
                settled(&got.run),
                p.join("\n    ")
            )),
        }
    }
}

async fn sweep_in_process(flow: Flow) -> Sweep {
    let kit = Kit::new().await;
    let t = Instant::now();
    let base = in_process(&kit, flow, Fault::None).await;
    eprintln!("{flow:?}: the fault-free run took {:?}", t.elapsed());
    assert_eq!(base.seen.run.status, RunStatus::Succeeded);
    assert_eq!(base.restarts, 0);
    let boundaries = base.log.clone();
    let requests = base.requests.len();
    let mut out = Sweep::new();
    let mut faults = Vec::new();
    for n in 0..boundaries.len() {
        for mode in [Mode::Before, Mode::After] {
            faults.push(Fault::Store(n, mode));
        }
    }
    for k in 1..=requests {
        faults.push(Fault::Request(k));
    }
    for fault in faults {
        let got = in_process(&kit, flow, fault).await;
        let at = match fault {
            Fault::Store(n, mode) => {
                assert_eq!(
                    got.log,
                    boundaries[..=n],
                    "{fault:?}: the crash landed where the fault-free run had operation {n}"
                );
                assert!(got.restarts > 0, "{fault:?}: it crashed");
                format!("store op {n} {mode:?} `{}`", boundaries[n])
            }
            Fault::Request(k) => {
                assert!(got.restarts > 0, "{fault:?}: it crashed");
                format!("vendor request {k} `{}`", base.requests[k - 1])
            }
            Fault::None => unreachable!(),
        };
        out.add(format!("{flow:?}, {at}"), &base.seen, &got.seen);
    }
    eprintln!(
        "{flow:?}: {} store/queue operations x 2 modes + {requests} vendor requests = {} crash cases",
        boundaries.len(),
        out.cases,
    );
    if std::env::var_os("RIPOSTE_SWEEP_LIST").is_some() {
        for (i, b) in boundaries.iter().enumerate() {
            eprintln!("  {flow:?} op {i}: {b}");
        }
        for (k, r) in base.requests.iter().enumerate() {
            eprintln!("  {flow:?} request {}: {r}", k + 1);
        }
    }
    out
}

fn report(s: &Sweep) {
    for (gap, at) in &s.gaps {
        eprintln!("known gap {gap:?}: {at}");
    }
    for f in &s.failures {
        eprintln!("{f}");
    }
    assert!(
        s.failures.is_empty(),
        "{} of {} crash cases did not end as the fault-free run did (above)",
        s.failures.len(),
        s.cases
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_survives_a_crash_at_every_store_operation_and_vendor_call() {
    report(&sweep_in_process(Flow::Block).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_survives_a_crash_at_every_store_operation_and_vendor_call() {
    report(&sweep_in_process(Flow::Ignore).await);
}

// ----- kill -9 of `riposte serve` -----

struct Serve {
    dir: PathBuf,
    port: u16,
    child: Arc<Mutex<Option<Child>>>,
    starts: usize,
}

impl Serve {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let log =
            std::fs::File::create(self.dir.join(format!("serve-{}.log", self.starts))).unwrap();
        let mut cmd = Command::new(riposte_bin());
        cmd.args(["serve", "--db"])
            .arg(self.dir.join("riposte.db"))
            .args(["--listen", &format!("127.0.0.1:{}", self.port), "--infra"])
            .arg(self.dir.join("infra"))
            .args(["--allow-private-egress", "--workers", "1"])
            .env(
                "RIPOSTE_API_KEYS",
                format!("{OPERATOR_KEY}:{APPROVER}:operator,{OLIVIA_KEY}:{OPERATOR}:operator"),
            )
            .env("RIPOSTE_LOG", "warn")
            .env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
            .env("AWS_SECRET_ACCESS_KEY", "test-aws-secret-key")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("RIPOSTE_APPROVAL_KEY")
            .stdout(Stdio::null())
            .stderr(log);
        for (name, value) in SECRETS {
            cmd.env(
                format!(
                    "RIPOSTE_SECRET_{}",
                    name.to_ascii_uppercase().replace('-', "_")
                ),
                value,
            );
        }
        *self.child.lock().unwrap() = Some(cmd.spawn().unwrap());
        self.starts += 1;
    }

    fn is_dead(&self) -> bool {
        match self.child.lock().unwrap().as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_some(),
            None => true,
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(c) = self.child.lock().unwrap().as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One Block run through `riposte serve`, SIGKILLed by the stand-in at vendor request `kill_at`.
/// Returns what the run did, the vendor requests in arrival order, and how many times
/// `riposte serve` was started.
async fn serve_case(kill_at: Option<usize>) -> (Seen, Vec<String>, usize) {
    let killer = Killer::new(kill_at);
    let v = stand_ins(&killer).await;
    let dir = tempfile::tempdir().unwrap();
    let infra = dir.path().join("infra");
    for sub in ["playbooks", "rules"] {
        std::fs::create_dir_all(infra.join(sub)).unwrap();
        for f in std::fs::read_dir(repo().join("infra").join(sub)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, infra.join(sub).join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::copy(repo().join("infra/guards.yaml"), infra.join("guards.yaml")).unwrap();
    std::fs::write(infra.join("connections.yaml"), vendors::connections(&v)).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut srv = Serve {
        dir: dir.path().to_path_buf(),
        port,
        child: Arc::new(Mutex::new(None)),
        starts: 0,
    };
    let child = srv.child.clone();
    killer.arm(move || {
        if let Some(c) = child.lock().unwrap().as_mut() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    });
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let url = srv.url();
    let mut run_id: Option<String> = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    let run = loop {
        assert!(
            Instant::now() < deadline,
            "kill at {kill_at:?}: the run did not end in 30 s (logs in {})",
            dir.path().display()
        );
        if srv.is_dead() {
            srv.spawn();
            wait_ready(&http, &url).await;
        }
        let Some(id) = run_id.clone() else {
            // EventBridge delivers again until the event is accepted.
            if let Ok(r) = http
                .post(format!("{url}/events"))
                .bearer_auth(OPERATOR_KEY)
                .json(&event(EVENT))
                .send()
                .await
                && r.status().as_u16() == 202
                && let Ok(out) = r.json::<Value>().await
            {
                run_id = out["alerts"][0]["runs"][0].as_str().map(str::to_string);
            }
            continue;
        };
        let run = match http
            .get(format!("{url}/runs/{id}"))
            .bearer_auth(OPERATOR_KEY)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => match r.json::<Run>().await {
                Ok(run) => run,
                Err(_) => continue,
            },
            _ => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if run.status.is_terminal() {
            break run;
        }
        let answer = if let Some((step, i)) = unknown_outcome(&run) {
            let choice = if was_called(&v, &step) {
                "done"
            } else {
                "retry"
            };
            Some((OLIVIA_KEY, step, json!({"choice": choice, "iteration": i})))
        } else if asking(&run) {
            Some((
                OPERATOR_KEY,
                "ask_admins".to_string(),
                json!({"choice": "block"}),
            ))
        } else {
            None
        };
        if let Some((key, step, body)) = answer {
            // A lost answer is given again; a 409 says it was recorded.
            let _ = http
                .post(format!("{url}/runs/{id}/approvals/{step}"))
                .bearer_auth(key)
                .json(&body)
                .send()
                .await;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    // The Slack question's update (best effort, its own message) may come after the run ended.
    for _ in 0..100 {
        if run.status != RunStatus::Succeeded
            || v.slack
                .requests()
                .iter()
                .any(|r| r.path == "/api/chat.update")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // Nothing more happens after that.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let starts = srv.starts;
    drop(srv);
    let requests = killer.log.lock().unwrap().clone();
    (
        Seen {
            run,
            effects: effects(&v),
        },
        requests,
        starts,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn riposte_serve_killed_at_every_vendor_request_of_a_block_run_finishes_it() {
    let (base, requests, starts) = serve_case(None).await;
    assert_eq!(
        base.run.status,
        RunStatus::Succeeded,
        "{}",
        riposte::timeline::render(&base.run)
    );
    assert_eq!(starts, 1);
    let mut sweep = Sweep::new();
    for (k, request) in requests.iter().enumerate() {
        let k = k + 1;
        let (got, _, starts) = serve_case(Some(k)).await;
        assert!(starts >= 2, "killed at request {k}, it was started again");
        sweep.add(
            format!("kill -9 at vendor request {k} `{request}`"),
            &base,
            &got,
        );
    }
    eprintln!(
        "riposte serve: killed at each of {} vendor requests: {requests:#?}",
        requests.len()
    );
    report(&sweep);
}
