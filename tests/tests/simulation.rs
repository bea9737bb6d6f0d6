//! Seeded simulation: the real service and engine over an in-memory SQLite store and queue, a
//! manual clock and a fake vendor, with faults injected by seed.
//!
//! For every seed, a generated playbook (1 to 20 steps: joins, `for_each` loops, approvals with
//! a `switch` on the choice, error branches, idempotent and non-idempotent calls, waits) runs
//! twice: once fault-free (the oracle) and once under faults. The faulty run gets crashes before
//! and after every I/O (a worker's future is dropped while paused at a store read or write or at
//! an HTTP call), several workers in flight at once, duplicate deliveries (also of messages whose
//! step finished long ago), lost acknowledgements, reordering, delays up to 900 s, HTTP 5xx, 429,
//! refused connections and timeouts (before or after the vendor acted), store writes that fail
//! before applying, that report a conflict, or whose reply is lost after applying. Then faults
//! stop and the run is driven to its end. Checked:
//!
//! - the run reaches a terminal state, with the oracle's status, step statuses, switch values and
//!   outputs (approval `decided_at` aside; a non-idempotent call's output aside, since a human
//!   may have confirmed it instead);
//! - no transition happens twice (`succeeded`, `failed`, `skipped`, ... once per step iteration
//!   in the run's history);
//! - idempotent calls took effect for exactly the oracle's keys (the fake vendor applies a key
//!   once, however often it is sent);
//! - non-idempotent calls took effect for exactly the oracle's keys, at most once each; none was
//!   sent again after it took effect, and a key is sent more than once only after a definite
//!   "not done" answer (5xx, 429) or a human's `retry`. The driver answers an unknown outcome
//!   like a careful human: `done` when the vendor shows the effect, `retry` otherwise.
//!
//! Approval answers are derived from (seed, step, iteration), never from timing, so the oracle
//! and the faulty run take the same branches. Everything is deterministic: a seed replays
//! exactly.
//!
//! Replay one seed (prints its playbook, input and driver trace):
//!     RIPOSTE_SEED=123 cargo test -p riposte-tests --test simulation -- --nocapture
//! Run more seeds than the default 1,000: `RIPOSTE_SEEDS=10000`.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};

use riposte_core::approval::Signer;
use riposte_core::connector::{Connections, ConnectorCatalog};
use riposte_core::engine::Worker;
use riposte_core::http::{Body, Connection, HttpError, HttpRequest, HttpResponse};
use riposte_core::model::Millis;
use riposte_core::playbook::{self, PlaybookSpec};
use riposte_core::ports::{Clock, HttpSender, IdSource};
use riposte_core::run::{Run, RunStatus, StepMessage, StepStatus};
use riposte_core::service::{Config, Deps, Error, Handled, Service};
use riposte_core::store::{Store, StoreError};
use riposte_sqlite::SqliteStore;
use riposte_tests::faults::{Hook, Op, Wrapped};

// ----------------------------------------------------------------------------------------------
// A small deterministic PRNG (splitmix64).

#[derive(Clone, Debug)]
struct Rng(u64);

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        Rng(splitmix(seed ^ splitmix(stream)))
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix(self.0)
    }
    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
    fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }
}

fn hash_str(seed: u64, s: &str, n: u64) -> u64 {
    let mut h = splitmix(seed ^ 0xA11CE);
    for b in s.bytes() {
        h = splitmix(h ^ b as u64);
    }
    splitmix(h ^ n)
}

// ----------------------------------------------------------------------------------------------
// Which simulated worker is running: set around every poll of a worker's future, read by the
// fault plan at each I/O. Task 0 is the driver itself (an operator's API call): it never pauses.

thread_local! {
    static CURRENT: RefCell<(usize, String)> = RefCell::new((0, "api".into()));
}

fn current() -> (usize, String) {
    CURRENT.with(|c| c.borrow().clone())
}

fn with_current<R>(task: usize, key: &str, f: impl FnOnce() -> R) -> R {
    let before = CURRENT.with(|c| c.replace((task, key.to_string())));
    let r = f();
    CURRENT.with(|c| *c.borrow_mut() = before);
    r
}

/// Polls a future that must complete without waiting (the driver's own calls).
fn now_or_never<T>(fut: impl Future<Output = T>) -> T {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    match with_current(0, "api", || fut.as_mut().poll(&mut cx)) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a driver call waited on something"),
    }
}

// ----------------------------------------------------------------------------------------------
// The fault plan.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Io {
    Read,
    Write,
    Http,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    Go,
    /// Stop before the I/O (the driver may then crash the worker, or let it go on).
    Pause,
    /// Do the I/O, then stop before the caller sees the answer.
    PauseAfter,
    /// Store: fail before writing. HTTP: the vendor got the request and timed out, no effect.
    Fail,
    /// Store: write, then lose the reply. HTTP: the vendor acted, then the answer was lost.
    FailAfter,
    /// Store: a write reports a conflict (nothing written).
    Conflict,
    H503,
    H429,
    /// HTTP: the connection was refused; nothing reached the vendor.
    NotSent,
}

/// A fault to inject at one I/O, for the named tests: the `nth` (from 1) I/O of kind `io` made
/// while handling a message of `step`.
#[derive(Clone, Debug)]
struct Scripted {
    io: Io,
    step: &'static str,
    nth: u32,
    act: Act,
}

struct PlanState {
    rng: Rng,
    enabled: bool,
    /// Probability of a fault at each I/O.
    p: f64,
    /// Per step id: the most faults injected into one step iteration (so that its retries are
    /// never used up by faults alone).
    budget: HashMap<String, u32>,
    spent: HashMap<String, u32>,
    paused: HashSet<usize>,
    script: Vec<Scripted>,
    seen: HashMap<(Io, String), u32>,
    injected: u64,
    log: Vec<String>,
}

struct Plan(Mutex<PlanState>);

fn step_of(key: &str) -> &str {
    key.split(':').nth(1).unwrap_or(key)
}

impl Plan {
    fn new(rng: Rng, enabled: bool, p: f64, budget: HashMap<String, u32>) -> Plan {
        Plan(Mutex::new(PlanState {
            rng,
            enabled,
            p,
            budget,
            spent: HashMap::new(),
            paused: HashSet::new(),
            script: vec![],
            seen: HashMap::new(),
            injected: 0,
            log: vec![],
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PlanState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_enabled(&self, on: bool) {
        self.lock().enabled = on;
    }

    fn is_paused(&self, task: usize) -> bool {
        self.lock().paused.contains(&task)
    }

    fn release(&self, task: usize) {
        self.lock().paused.remove(&task);
    }

    /// What happens at this I/O, attributed to the message the current task handles.
    fn act(&self, io: Io, what: &str) -> Act {
        let (_, key) = current();
        self.act_for(io, what, &key, 0)
    }

    /// What happens at this I/O, attributed to the step iteration `key` (`run:step:iteration`):
    /// a vendor call is its own step's, even when a worker carries that step under another
    /// step's message. `used`: attempts of it already spent otherwise (a human's `retry` after a
    /// worker was lost during it, which faults charged to the carrying message caused), which
    /// its fault budget leaves room for.
    fn act_for(&self, io: Io, what: &str, key: &str, used: u32) -> Act {
        let (task, _) = current();
        let key = key.to_string();
        let mut s = self.lock();
        let step = step_of(&key).to_string();
        let n = {
            let n = s.seen.entry((io, step.clone())).or_insert(0);
            *n += 1;
            *n
        };
        if let Some(i) = s
            .script
            .iter()
            .position(|f| f.io == io && f.step == step && f.nth == n)
        {
            let f = s.script.remove(i);
            s.log
                .push(format!("task {task} {key}: {what}: scripted {:?}", f.act));
            s.injected += 1;
            return f.act;
        }
        if !s.enabled {
            return Act::Go;
        }
        let budget = s.budget.get(&step).copied().unwrap_or(30);
        if s.spent.get(&key).copied().unwrap_or(0) + used >= budget {
            return Act::Go;
        }
        let p = s.p;
        if !s.rng.chance(p) {
            return Act::Go;
        }
        *s.spent.entry(key.clone()).or_insert(0) += 1;
        let driver = task == 0;
        let options: &[Act] = match (io, driver) {
            (Io::Read, false) => &[Act::Fail, Act::Pause],
            (Io::Read, true) => &[Act::Fail],
            (Io::Write, false) => &[
                Act::Fail,
                Act::FailAfter,
                Act::Conflict,
                Act::Pause,
                Act::PauseAfter,
            ],
            (Io::Write, true) => &[Act::Fail, Act::FailAfter, Act::Conflict],
            (Io::Http, _) => &[
                Act::H503,
                Act::H429,
                Act::NotSent,
                Act::Fail,
                Act::FailAfter,
                Act::Pause,
                Act::PauseAfter,
            ],
        };
        let act = options[s.rng.index(options.len())];
        s.injected += 1;
        s.log.push(format!("task {task} {key}: {what}: {act:?}"));
        act
    }

    /// Stops the current worker until the driver releases it (or drops it: a crash).
    async fn pause(&self) {
        let task = current().0;
        assert_ne!(task, 0, "the driver never pauses");
        self.lock().paused.insert(task);
        PauseFut { plan: self, task }.await
    }
}

struct PauseFut<'a> {
    plan: &'a Plan,
    task: usize,
}

impl Future for PauseFut<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        if self.plan.is_paused(self.task) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

// ----------------------------------------------------------------------------------------------
// The store, with faults: the real SQLite store (and queue) underneath.

/// What happens at a store operation: `get_playbook`, `load_run` and `get_setting` (reads) and
/// `create_run` and `save_run` (writes) consult the plan; every other operation passes straight
/// through without consulting it.
struct StoreFaults {
    plan: Arc<Plan>,
}

fn lost(what: &str) -> StoreError {
    StoreError::Unavailable(format!("simulated: {what}"))
}

impl StoreFaults {
    async fn read<T>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match self.plan.act(Io::Read, what) {
            Act::Fail => Err(lost("read failed")),
            Act::Pause => {
                self.plan.pause().await;
                f.await
            }
            _ => f.await,
        }
    }

    async fn write<T>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match self.plan.act(Io::Write, what) {
            Act::Fail => Err(lost("write failed before it was applied")),
            Act::Conflict => Err(StoreError::Conflict("simulated".into())),
            Act::FailAfter => {
                f.await?;
                Err(lost("write applied, reply lost"))
            }
            Act::Pause => {
                self.plan.pause().await;
                f.await
            }
            Act::PauseAfter => {
                let r = f.await;
                self.plan.pause().await;
                r
            }
            _ => f.await,
        }
    }
}

impl Hook for StoreFaults {
    async fn around<T: Send>(
        &self,
        op: Op<'_>,
        call: BoxFuture<'_, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match op {
            Op::GetPlaybook { .. } | Op::LoadRun { .. } | Op::GetSetting { .. } => {
                self.read(op.name(), call).await
            }
            Op::CreateRun { .. } | Op::SaveRun { .. } => self.write(op.name(), call).await,
            _ => call.await,
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Clock, ids, and the vendor.

struct SimClock(AtomicI64);

impl Clock for SimClock {
    fn now(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

impl SimClock {
    fn advance(&self, ms: Millis) {
        self.0.fetch_add(ms.max(0), Ordering::SeqCst);
    }
    fn advance_to(&self, at: Millis) {
        self.0.fetch_max(at, Ordering::SeqCst);
    }
}

struct SimIds(AtomicU64);

impl IdSource for SimIds {
    fn new_id(&self) -> String {
        format!("run{}", self.0.fetch_add(1, Ordering::SeqCst))
    }
    fn nonce(&self) -> String {
        format!("{:032x}", self.0.fetch_add(1, Ordering::SeqCst))
    }
}

/// The test connector: `block` may be repeated (the vendor deduplicates by key), `notify` must
/// not be. `fail: true` makes the vendor refuse the call (HTTP 400, not retryable).
const TESTCO: &str = r#"
connector: testco
name: A simulated vendor
hosts: ["*"]
auth: [none]
operations:
  block:
    idempotent: true
    inputs: { target: { required: true }, fail: { default: false } }
    request:
      method: POST
      path: /block
      headers: { Idempotency-Key: "${{ key }}" }
      json: { target: "${{ inputs.target }}", fail: "${{ inputs.fail }}" }
    outputs: { id: response.body.id, target: response.body.target }
  notify:
    idempotent: false
    inputs: { text: { required: true }, fail: { default: false } }
    request:
      method: POST
      path: /notify
      headers: { Idempotency-Key: "${{ key }}" }
      json: { text: "${{ inputs.text }}", fail: "${{ inputs.fail }}" }
    outputs: { id: response.body.id }
"#;

/// What the vendor saw for one idempotency key.
#[derive(Clone, Debug, Default, PartialEq)]
struct KeyStats {
    idempotent: bool,
    /// Requests that reached the vendor.
    sends: u32,
    /// Requests that changed the vendor's state (for `block`, only the first per key does).
    effects: u32,
    /// Requests that arrived after the key had taken effect.
    after_effect: u32,
    /// Answers that said for certain nothing was done (5xx, 429, 400).
    definite: u32,
    /// Times the driver, as a human, answered `retry` for an unknown outcome of this key.
    human_retries: u32,
}

struct Vendor {
    plan: Arc<Plan>,
    keys: Mutex<BTreeMap<String, KeyStats>>,
}

fn response(status: u16, body: Value) -> HttpResponse {
    HttpResponse {
        status,
        headers: BTreeMap::new(),
        body,
    }
}

impl Vendor {
    fn stats(&self) -> BTreeMap<String, KeyStats> {
        self.keys.lock().unwrap().clone()
    }

    fn took_effect(&self, key: &str) -> bool {
        self.keys
            .lock()
            .unwrap()
            .get(key)
            .is_some_and(|k| k.effects > 0)
    }

    fn human_retry(&self, key: &str) {
        self.keys
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_default()
            .human_retries += 1;
    }

    /// The request reached the vendor; the answer it would give, and whether it acted.
    fn arrive(&self, key: &str, req: &HttpRequest, act: Act) -> HttpResponse {
        let idempotent = req.path == "/block";
        let body = match &req.body {
            Some(Body::Json(v)) => v.clone(),
            _ => Value::Null,
        };
        let mut keys = self.keys.lock().unwrap();
        let k = keys.entry(key.to_string()).or_default();
        k.idempotent = idempotent;
        k.sends += 1;
        if k.effects > 0 {
            k.after_effect += 1;
        }
        match act {
            Act::H503 => {
                k.definite += 1;
                return response(503, json!({"error": "unavailable"}));
            }
            Act::H429 => {
                k.definite += 1;
                return response(429, json!({"error": "slow down"}));
            }
            Act::Fail => return response(0, Value::Null),
            _ => {}
        }
        if body["fail"] == json!(true) {
            k.definite += 1;
            return response(400, json!({"error": "refused by input"}));
        }
        if !idempotent || k.effects == 0 {
            k.effects += 1;
        }
        let op = if idempotent { "block" } else { "notify" };
        let mut out = json!({"id": format!("{op}-{key}")});
        if let Some(t) = body.get("target") {
            out["target"] = t.clone();
        }
        response(200, out)
    }
}

#[async_trait]
impl HttpSender for Vendor {
    async fn send(
        &self,
        _connection: &Connection,
        req: &HttpRequest,
    ) -> Result<HttpResponse, HttpError> {
        let key = req
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("idempotency-key"))
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let act = if key.is_empty() {
            self.plan.act(Io::Http, &req.path)
        } else {
            let used = self
                .keys
                .lock()
                .unwrap()
                .get(&key)
                .map_or(0, |k| k.human_retries);
            self.plan.act_for(Io::Http, &req.path, &key, used)
        };
        match act {
            Act::NotSent => return Err(HttpError::NotSent("connection refused".into())),
            Act::Pause => self.plan.pause().await,
            _ => {}
        }
        let r = self.arrive(&key, req, act);
        match act {
            Act::Fail => Err(HttpError::Retryable("timed out".into())),
            Act::FailAfter => Err(HttpError::Retryable("timed out (the vendor acted)".into())),
            Act::PauseAfter => {
                self.plan.pause().await;
                Ok(r)
            }
            _ => Ok(r),
        }
    }
}

// ----------------------------------------------------------------------------------------------
// The playbook generator.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Set,
    Block,
    Notify,
    Approval,
    Wait,
}

struct Generated {
    spec: Value,
    input: Value,
    kinds: BTreeMap<String, Kind>,
    /// Per step: the most faults one of its iterations may get.
    budget: HashMap<String, u32>,
}

impl Generated {
    fn describe(&self) -> String {
        format!(
            "playbook:\n{}input: {}\n",
            serde_yaml_ng::to_string(&self.spec).unwrap_or_default(),
            self.input
        )
    }
}

enum Attach {
    Case(String),
    Default,
    Goto,
}

struct GenStep {
    id: String,
    kind: Kind,
    choices: Vec<String>,
    /// An approval whose choice picks the next steps; an action whose failure does.
    brancher: bool,
    cases: BTreeMap<String, Vec<String>>,
    default: Vec<String>,
    goto: Vec<String>,
    ancestors: BTreeSet<usize>,
    obj: serde_json::Map<String, Value>,
}

fn generate(seed: u64) -> Generated {
    let mut rng = Rng::new(seed, 1);
    let n = 1 + rng.index(20);
    let mut steps: Vec<GenStep> = Vec::new();
    let mut budget = HashMap::new();
    for i in 0..n {
        let id = format!("s{i}");
        let kind = match rng.below(100) {
            0..25 => Kind::Set,
            25..50 => Kind::Block,
            50..65 => Kind::Notify,
            65..85 => Kind::Approval,
            _ => Kind::Wait,
        };
        let looped = kind != Kind::Wait && rng.chance(0.25);
        let mut obj = serde_json::Map::new();
        obj.insert("id".into(), json!(id));
        // The ways in.
        let mut needs: Vec<usize> = Vec::new();
        let mut attach: Option<(usize, Attach)> = None;
        if i > 0 && !rng.chance(0.12) {
            let branchers: Vec<usize> = (0..i).filter(|&b| steps[b].brancher).collect();
            if !branchers.is_empty() && rng.chance(0.4) {
                let b = branchers[rng.index(branchers.len())];
                let a = if steps[b].kind == Kind::Approval {
                    let ch = &steps[b].choices;
                    if rng.chance(0.25) {
                        Attach::Default
                    } else {
                        Attach::Case(ch[rng.index(ch.len())].clone())
                    }
                } else {
                    Attach::Goto
                };
                attach = Some((b, a));
                if i > 1 && rng.chance(0.25) {
                    let other = rng.index(i);
                    if other != b {
                        needs.push(other);
                    }
                }
            } else {
                for _ in 0..1 + rng.index(3) {
                    let k = rng.index(i);
                    if !needs.contains(&k) {
                        needs.push(k);
                    }
                }
            }
        }
        let mut ancestors = BTreeSet::new();
        for &k in needs.iter().chain(attach.as_ref().map(|(b, _)| b)) {
            ancestors.insert(k);
            ancestors.extend(steps[k].ancestors.iter().copied());
        }
        if !needs.is_empty() {
            needs.sort();
            obj.insert(
                "needs".into(),
                json!(needs.iter().map(|k| format!("s{k}")).collect::<Vec<_>>()),
            );
        }
        if let Some((b, a)) = attach {
            match a {
                Attach::Case(c) => steps[b].cases.entry(c).or_default().push(id.clone()),
                Attach::Default => steps[b].default.push(id.clone()),
                Attach::Goto => steps[b].goto.push(id.clone()),
            }
        }
        if rng.chance(0.12) {
            obj.insert("if".into(), json!(format!("input.flags.f{}", rng.below(4))));
        }
        if looped {
            obj.insert("for_each".into(), json!("input.items"));
        }
        let target = if looped {
            json!("${{ item }}")
        } else {
            json!(format!("t{i}"))
        };
        let mut choices = vec![];
        let mut brancher = false;
        match kind {
            Kind::Set => {
                let mut values = serde_json::Map::new();
                values.insert(format!("v{i}"), json!("${{ size(input.items) }}"));
                let anc: Vec<usize> = ancestors.iter().copied().collect();
                if !anc.is_empty() {
                    let k = anc[rng.index(anc.len())];
                    values.insert(
                        format!("v{i}_status"),
                        json!(format!("${{{{ steps.s{k}.status }}}}")),
                    );
                    let readable: Vec<usize> = anc
                        .iter()
                        .copied()
                        .filter(|&k| matches!(steps[k].kind, Kind::Set | Kind::Block))
                        .collect();
                    if !readable.is_empty() {
                        let k = readable[rng.index(readable.len())];
                        values.insert(
                            format!("v{i}_output"),
                            json!(format!("${{{{ steps.s{k}.output }}}}")),
                        );
                    }
                }
                if looped {
                    values.insert(
                        format!("v{i}_item"),
                        json!("${{ item + ':' + string(index) }}"),
                    );
                }
                obj.insert("set".into(), Value::Object(values));
            }
            Kind::Block | Kind::Notify => {
                let (op, field) = if kind == Kind::Block {
                    ("testco.block", "target")
                } else {
                    ("testco.notify", "text")
                };
                obj.insert("action".into(), json!(op));
                let mut with = serde_json::Map::new();
                let mut fails = false;
                with.insert(field.into(), target);
                if rng.chance(0.15) {
                    with.insert("fail".into(), json!(true));
                    fails = true;
                } else if looped && rng.chance(0.35) {
                    with.insert("fail".into(), json!("${{ item == 'x1' }}"));
                    fails = true;
                }
                obj.insert("with".into(), Value::Object(with));
                let attempts = if rng.chance(0.5) {
                    obj.insert(
                        "retry".into(),
                        json!({"max_attempts": 8, "delay": "2s", "backoff": 1.5}),
                    );
                    8
                } else {
                    3
                };
                budget.insert(id.clone(), (attempts - 1).min(5));
                if fails || rng.chance(0.1) {
                    match rng.below(10) {
                        0..4 => {
                            obj.insert("on_error".into(), json!("continue"));
                        }
                        4..8 => brancher = true,
                        _ => {}
                    }
                }
            }
            Kind::Approval => {
                let all = ["yes", "no", "later"];
                choices = all[..2 + rng.index(2)]
                    .iter()
                    .map(|c| c.to_string())
                    .collect();
                let mut a = serde_json::Map::new();
                a.insert("message".into(), json!(format!("Go on with s{i}?")));
                a.insert("choices".into(), json!(choices));
                if rng.chance(0.85) {
                    a.insert("default".into(), json!(choices[rng.index(choices.len())]));
                }
                a.insert("expires_in".into(), json!("2h"));
                obj.insert("approval".into(), Value::Object(a));
                brancher = !looped && rng.chance(0.7);
                if rng.chance(0.3) {
                    obj.insert("on_error".into(), json!("continue"));
                }
            }
            Kind::Wait => {
                obj.insert("wait".into(), json!(format!("{}s", 1 + rng.below(900))));
            }
        }
        steps.push(GenStep {
            id,
            kind,
            choices,
            brancher,
            cases: BTreeMap::new(),
            default: vec![],
            goto: vec![],
            ancestors,
            obj,
        });
    }
    let mut kinds = BTreeMap::new();
    let mut out = Vec::new();
    for mut s in steps {
        kinds.insert(s.id.clone(), s.kind);
        if s.kind == Kind::Approval && (!s.cases.is_empty() || !s.default.is_empty()) {
            let mut cases = s.cases.clone();
            if cases.is_empty() {
                cases.insert(s.choices[0].clone(), vec![]);
            }
            let mut sw = json!({"on": "output.choice", "cases": cases});
            if !s.default.is_empty() {
                sw["default"] = json!(s.default);
            }
            s.obj.insert("switch".into(), sw);
        }
        if !s.goto.is_empty() {
            s.obj.insert("on_error".into(), json!({"goto": s.goto}));
        } else if s.brancher && s.kind != Kind::Approval {
            s.obj.insert("on_error".into(), json!("continue"));
        }
        out.push(Value::Object(s.obj));
    }
    let k = rng.index(4);
    let items: Vec<String> = (0..k).map(|i| format!("x{i}")).collect();
    let flags: serde_json::Map<String, Value> = (0..4)
        .map(|f| (format!("f{f}"), json!(rng.chance(0.6))))
        .collect();
    Generated {
        spec: json!({
            "id": "sim",
            "name": format!("Simulated playbook {seed}"),
            "steps": out,
        }),
        input: json!({"items": items, "flags": flags}),
        kinds,
        budget,
    }
}

fn catalog() -> ConnectorCatalog {
    let mut c = ConnectorCatalog::default();
    c.add(TESTCO, Some("testco.yaml"))
        .unwrap_or_else(|p| panic!("{p}"));
    c
}

fn spec_of(g: &Generated) -> PlaybookSpec {
    playbook::spec_from_value(g.spec.clone(), None).unwrap_or_else(|p| panic!("{p}"))
}

// ----------------------------------------------------------------------------------------------
// A world: one store, clock, vendor and its workers, driven by hand.

type Handling = Pin<Box<dyn Future<Output = Result<Handled, Error>>>>;

struct Task {
    id: usize,
    /// The queue row; `None` for a duplicate copy of a message.
    seq: Option<i64>,
    key: String,
    fut: Handling,
}

struct World {
    seed: u64,
    kinds: BTreeMap<String, Kind>,
    clock: Arc<SimClock>,
    store: Arc<SqliteStore>,
    plan: Arc<Plan>,
    vendor: Arc<Vendor>,
    ids: Arc<SimIds>,
    catalog: Arc<ConnectorCatalog>,
    connections: Connections,
    /// One process holding the database (the local runtime), restarted on a crash; or several
    /// workers with leases (the Lambda step worker).
    exclusive: bool,
    workers: Vec<Arc<Service>>,
    processes: u32,
    tasks: Vec<Task>,
    next_task: usize,
    delivered: Vec<StepMessage>,
    run_id: String,
    rng: Rng,
    trace: Vec<String>,
    problems: Vec<String>,
    deliveries: u64,
    /// Faults injected when faults stopped: a handling error after that, with no new fault, is
    /// a problem.
    clean_mark: Option<u64>,
    /// A worker ran since approvals were last looked at.
    changed: bool,
}

const START: Millis = 1_767_225_600_000;
/// The most deliveries after faults stop: a run not finished by then is stuck.
const CLEAN_LIMIT: usize = 5_000;

impl World {
    fn new(seed: u64, g: &Generated) -> World {
        let clock = Arc::new(SimClock(AtomicI64::new(START)));
        let store = Arc::new(SqliteStore::in_memory(clock.clone()).expect("in-memory store"));
        let mut rng = Rng::new(seed, 2);
        let p = 0.04 + rng.below(24) as f64 / 100.0;
        let plan = Arc::new(Plan::new(Rng::new(seed, 3), false, p, g.budget.clone()));
        let vendor = Arc::new(Vendor {
            plan: plan.clone(),
            keys: Mutex::new(BTreeMap::new()),
        });
        let mut connections = Connections::parse(
            "connections:\n  testco:\n    base_url: https://vendor.example\n",
            None,
        )
        .expect("connections");
        connections.allow_any_host = true;
        let exclusive = rng.chance(0.5);
        let mut w = World {
            seed,
            kinds: g.kinds.clone(),
            clock,
            store,
            plan,
            vendor,
            ids: Arc::new(SimIds(AtomicU64::new(1))),
            catalog: Arc::new(catalog()),
            connections,
            exclusive,
            workers: vec![],
            processes: 0,
            tasks: vec![],
            next_task: 1,
            delivered: vec![],
            run_id: String::new(),
            rng,
            trace: vec![],
            problems: vec![],
            deliveries: 0,
            clean_mark: None,
            changed: true,
        };
        if exclusive {
            w.restart();
        } else {
            w.workers = (0..3).map(|i| w.service(format!("w{i}"), false)).collect();
        }
        let svc = w.workers[0].clone();
        let spec = spec_of(g);
        let id = spec.id.clone();
        now_or_never(svc.put_playbook(spec, "sim")).unwrap_or_else(|e| panic!("put_playbook: {e}"));
        w.run_id = now_or_never(svc.start_run(&id, g.input.clone(), "sim-starter"))
            .unwrap_or_else(|e| panic!("start_run: {e}"))
            .id;
        w
    }

    fn service(&self, id: String, exclusive: bool) -> Arc<Service> {
        Arc::new(Service::new(Deps {
            store: Arc::new(Wrapped::new(
                self.store.clone(),
                StoreFaults {
                    plan: self.plan.clone(),
                },
            )),
            http: self.vendor.clone(),
            clock: self.clock.clone(),
            ids: self.ids.clone(),
            signer: Signer::new(&[7u8; 32]),
            connections: self.connections.clone(),
            catalog: self.catalog.clone(),
            config: Config {
                public_url: "https://riposte.example".into(),
                rules_cache_ms: 0,
                worker: Worker { id, exclusive },
            },
        }))
    }

    /// The process dies (every message it was handling is lost) and a new one starts.
    fn restart(&mut self) {
        for t in self.tasks.drain(..) {
            self.plan.release(t.id);
            self.trace.push(format!("crash: task {} ({})", t.id, t.key));
        }
        self.processes += 1;
        self.workers = vec![self.service(format!("p{}", self.processes), true)];
    }

    fn note(&mut self, s: String) {
        if self.trace.len() < 4_000 {
            self.trace.push(s);
        }
    }

    fn run(&self) -> Run {
        now_or_never(self.store.load_run(&self.run_id))
            .expect("load")
            .expect("the run exists")
            .0
    }

    fn start_task(&mut self, seq: Option<i64>, msg: StepMessage) {
        let worker = self.rng.index(self.workers.len());
        let svc = self.workers[worker].clone();
        let id = self.next_task;
        self.next_task += 1;
        self.deliveries += 1;
        let key = msg.idempotency_key();
        self.note(format!(
            "t={} deliver task {id} seq {seq:?} worker {worker}: {key} attempt {} {:?}",
            self.clock.now() - START,
            msg.attempt,
            msg.kind
        ));
        if seq.is_some() {
            self.delivered.push(msg.clone());
        }
        let fut: Handling = Box::pin(async move { svc.handle(&msg).await });
        self.poll(Task { id, seq, key, fut });
    }

    /// Lets a task run until it ends or pauses.
    fn poll(&mut self, mut t: Task) {
        self.changed = true;
        self.plan.release(t.id);
        let mut cx = Context::from_waker(Waker::noop());
        let r = with_current(t.id, &t.key.clone(), || t.fut.as_mut().poll(&mut cx));
        match r {
            Poll::Ready(res) => self.finished(t.id, t.seq, res),
            Poll::Pending => {
                // Paused at a simulated I/O, or waiting for a lock of its process (the run lock
                // of `Service`) held by another task in flight: resumed later either way.
                assert!(
                    self.plan.is_paused(t.id) || !self.tasks.is_empty(),
                    "a worker waited on something other than a simulated pause"
                );
                self.note(format!("  task {} paused", t.id));
                self.tasks.push(t);
            }
        }
    }

    fn finished(&mut self, task: usize, seq: Option<i64>, res: Result<Handled, Error>) {
        self.note(format!("  task {task} -> {res:?}"));
        let Some(seq) = seq else { return };
        match res {
            Ok(Handled::Done) => {
                if self.faulty_now() && self.rng.chance(0.05) {
                    self.note("  ack lost".into());
                } else {
                    self.store.ack(&[seq]).expect("ack");
                }
            }
            Ok(Handled::Retry { delay_ms, .. }) => self.store.delay(seq, delay_ms).expect("delay"),
            Ok(Handled::Ahead) => panic!("a local message is never sent ahead of its write"),
            Err(e) => {
                if self.clean_mark.is_some() && self.clean_mark == Some(self.plan.lock().injected) {
                    self.problems
                        .push(format!("handling failed with no fault injected: {e}"));
                }
                let d = if self.faulty_now() {
                    self.rng.below(60_000)
                } else {
                    1_000
                };
                self.store.delay(seq, d).expect("delay");
            }
        }
    }

    fn faulty_now(&self) -> bool {
        self.plan.lock().enabled
    }

    fn due(&self) -> Vec<riposte_sqlite::Delivery> {
        let inflight: HashSet<i64> = self.tasks.iter().filter_map(|t| t.seq).collect();
        self.store.due(64, &inflight).expect("due")
    }

    /// Answers what a human would: approvals as planned by the seed, unknown outcomes by
    /// looking at the vendor.
    fn answer_approvals(&mut self) {
        // Only a worker's handling changes the run (time alone opens no approval).
        if !std::mem::take(&mut self.changed) {
            return;
        }
        let run = self.run();
        if run.status.is_terminal() {
            return;
        }
        for st in &run.steps {
            for (i, it) in st.iterations.iter().enumerate() {
                let Some(ap) = &it.approval else { continue };
                if it.status != StepStatus::Waiting || ap.decision.is_some() {
                    continue;
                }
                let key = format!("{}:{}:{i}", run.id, st.id);
                let choice = match self.kinds.get(&st.id) {
                    Some(Kind::Approval) => {
                        match planned_choice(self.seed, &st.id, i as u32, &ap.choices) {
                            Some(c) => c,
                            None => continue,
                        }
                    }
                    Some(Kind::Block | Kind::Notify) => {
                        if self.vendor.took_effect(&key) {
                            "done".to_string()
                        } else {
                            self.vendor.human_retry(&key);
                            "retry".to_string()
                        }
                    }
                    _ => {
                        self.problems
                            .push(format!("unexpected approval on {} {i}", st.id));
                        continue;
                    }
                };
                self.decide(&st.id, i as u32, &choice);
            }
        }
    }

    fn decide(&mut self, step: &str, iteration: u32, choice: &str) {
        self.note(format!(
            "t={} answer {step}[{iteration}]: {choice}",
            self.clock.now() - START
        ));
        for _ in 0..100 {
            let svc = self.workers[0].clone();
            match now_or_never(svc.decide_as(&self.run_id, step, iteration, choice, "sim-human")) {
                Ok(_) => return,
                // A lost reply: the answer was recorded by the earlier try.
                Err(Error::Conflict(m)) => {
                    self.note(format!("  answer: {m}"));
                    return;
                }
                Err(Error::Unavailable(m)) => self.note(format!("  answer failed: {m}")),
                // An answer given just before (to another approval of this pass) ended the run.
                Err(Error::Gone(m)) if self.run().status.is_terminal() => {
                    self.note(format!("  answer: {m}"));
                    return;
                }
                Err(e) => {
                    self.problems.push(format!(
                        "answering {step}[{iteration}] with `{choice}` failed: {e}"
                    ));
                    return;
                }
            }
        }
        self.problems
            .push(format!("answering {step}[{iteration}] kept failing"));
    }

    /// The faulty phase: random deliveries, pauses, crashes, duplicates, delays.
    fn chaos(&mut self, deliveries: u64) {
        self.plan.set_enabled(true);
        for _ in 0..20 * deliveries {
            if self.deliveries >= deliveries {
                break;
            }
            self.answer_approvals();
            let due = self.due();
            let r = self.rng.below(100);
            if r < 45 && !due.is_empty() {
                let d = due[self.rng.index(due.len())].clone();
                self.start_task(Some(d.seq), d.message);
            } else if r < 65 && !self.tasks.is_empty() {
                let i = self.rng.index(self.tasks.len());
                let t = self.tasks.swap_remove(i);
                self.note(format!("  resume task {}", t.id));
                self.poll(t);
            } else if r < 71 && !self.tasks.is_empty() {
                if self.exclusive {
                    self.restart();
                } else {
                    let i = self.rng.index(self.tasks.len());
                    let t = self.tasks.swap_remove(i);
                    self.plan.release(t.id);
                    self.note(format!("crash: task {} ({})", t.id, t.key));
                }
            } else if r < 77 && !due.is_empty() {
                let d = &due[self.rng.index(due.len())];
                let ms = self.rng.below(900_001);
                self.note(format!("delay seq {} by {ms} ms", d.seq));
                self.store.delay(d.seq, ms).expect("delay");
            } else if r < 83 && !self.delivered.is_empty() {
                let m = self.delivered[self.rng.index(self.delivered.len())].clone();
                self.note("duplicate:".into());
                self.start_task(None, m);
            } else if r < 88 && self.tasks.is_empty() {
                let ms = self.rng.below(900_001) as Millis;
                self.note(format!("advance {ms} ms"));
                self.clock.advance(ms);
            } else if due.is_empty() && self.tasks.is_empty() {
                match self.store.next_visible_at().expect("queue") {
                    Some(at) => {
                        self.clock.advance_to(at + self.rng.below(5_000) as Millis);
                    }
                    None => break,
                }
            }
        }
    }

    /// Faults stop: paused workers go on, then every message is delivered in order until the
    /// queue is empty.
    fn settle(&mut self) {
        self.plan.set_enabled(false);
        self.clean_mark = Some(self.plan.lock().injected);
        self.note("faults stop".into());
        // In turn, oldest first: a task waiting for a lock another holds is resumed after it.
        while !self.tasks.is_empty() {
            let t = self.tasks.remove(0);
            self.poll(t);
        }
        for _ in 0..CLEAN_LIMIT {
            self.answer_approvals();
            if let Some(d) = self.store.due(1, &HashSet::new()).expect("due").pop() {
                self.start_task(Some(d.seq), d.message);
                continue;
            }
            match self.store.next_visible_at().expect("queue") {
                Some(at) => self.clock.advance_to(at),
                None => return,
            }
        }
        self.problems.push(format!(
            "the queue was not empty after {CLEAN_LIMIT} deliveries without faults"
        ));
    }
}

/// The seed's answer to an approval: a choice, or `None` to let it expire to its default.
fn planned_choice(seed: u64, step: &str, iteration: u32, choices: &[String]) -> Option<String> {
    let h = hash_str(seed, step, iteration as u64);
    if h.is_multiple_of(4) || choices.is_empty() {
        None
    } else {
        Some(choices[(h / 4) as usize % choices.len()].clone())
    }
}

// ----------------------------------------------------------------------------------------------
// The checks.

/// Drops what depends on timing: when an approval was decided.
fn normalized(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "decided_at")
                .map(|(k, v)| (k.clone(), normalized(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalized).collect()),
        v => v.clone(),
    }
}

/// Transitions that happen at most once per (step, iteration) of a run.
const ONCE: &[&str] = &[
    "queued",
    "succeeded",
    "failed",
    "skipped",
    "step_failed",
    "switch",
    "approval_answered",
    "approval_expired",
    "run_succeeded",
    "run_failed",
];

fn check(g: &Generated, oracle: &World, faulty: &World) -> Vec<String> {
    let mut problems: Vec<String> = oracle
        .problems
        .iter()
        .map(|p| format!("oracle: {p}"))
        .collect();
    problems.extend(faulty.problems.iter().cloned());
    let want = oracle.run();
    let got = faulty.run();
    if !want.status.is_terminal() {
        problems.push(format!("the oracle run is {}", want.status.as_str()));
    }
    if !got.status.is_terminal() {
        problems.push(format!(
            "the run is {} after faults stopped, not terminal",
            got.status.as_str()
        ));
    }
    // A run that fails stops at its first failing step and cancels whatever else was open:
    // which parallel branches had finished by then depends on the schedule. There, a step
    // cancelled in one run may have any status in the other; everything else must agree.
    let failed = want.status == RunStatus::Failed;
    let cancelled = |a: StepStatus, b: StepStatus| {
        failed && (a == StepStatus::Cancelled || b == StepStatus::Cancelled)
    };
    if got.status != want.status {
        problems.push(format!(
            "run status {} (oracle: {}); error {:?} (oracle: {:?})",
            got.status.as_str(),
            want.status.as_str(),
            got.error,
            want.error
        ));
    } else if got.error != want.error && !failed {
        problems.push(format!(
            "run error {:?} (oracle: {:?})",
            got.error, want.error
        ));
    }
    let mut unsettled = BTreeSet::new();
    for (w, s) in want.steps.iter().zip(&got.steps) {
        if cancelled(w.status, s.status) {
            unsettled.insert(s.id.clone());
            continue;
        }
        let compare_output = g.kinds.get(&s.id) != Some(&Kind::Notify);
        if w.status != s.status {
            problems.push(format!(
                "step {} is {} (oracle: {}); error {:?} (oracle: {:?})",
                s.id,
                s.status.as_str(),
                w.status.as_str(),
                s.error,
                w.error
            ));
        }
        if w.switch_value != s.switch_value {
            problems.push(format!(
                "step {} switched to {:?} (oracle: {:?})",
                s.id, s.switch_value, w.switch_value
            ));
        }
        if compare_output
            && normalized(w.output.as_ref().unwrap_or(&Value::Null))
                != normalized(s.output.as_ref().unwrap_or(&Value::Null))
        {
            problems.push(format!(
                "step {} output {:?} (oracle: {:?})",
                s.id, s.output, w.output
            ));
        }
        if w.iterations.len() != s.iterations.len() {
            problems.push(format!(
                "step {} has {} iterations (oracle: {})",
                s.id,
                s.iterations.len(),
                w.iterations.len()
            ));
        }
        for (i, (wi, si)) in w.iterations.iter().zip(&s.iterations).enumerate() {
            if wi.status != si.status && !cancelled(wi.status, si.status) {
                problems.push(format!(
                    "step {}[{i}] is {} (oracle: {}); error {:?} (oracle: {:?})",
                    s.id,
                    si.status.as_str(),
                    wi.status.as_str(),
                    si.error,
                    wi.error
                ));
            }
        }
    }
    // No transition twice.
    let mut seen: BTreeMap<(Option<String>, Option<u32>, String), u32> = BTreeMap::new();
    for h in &got.history {
        // A call whose outcome was unknown more than once (once per attempt) is answered once
        // per attempt: only a playbook's own approvals are answered once.
        let per_attempt = h.event == "approval_answered"
            && h.step.as_ref().and_then(|s| g.kinds.get(s)) != Some(&Kind::Approval);
        if ONCE.contains(&h.event.as_str()) && !per_attempt {
            *seen
                .entry((h.step.clone(), h.iteration, h.event.clone()))
                .or_insert(0) += 1;
        }
    }
    for ((step, it, event), n) in seen {
        if n > 1 {
            problems.push(format!("`{event}` of {step:?}[{it:?}] happened {n} times"));
        }
    }
    // Effects.
    let effected = |w: &World, idempotent: bool| -> BTreeSet<String> {
        w.vendor
            .stats()
            .into_iter()
            .filter(|(key, k)| {
                k.idempotent == idempotent && k.effects > 0 && !unsettled.contains(step_of(key))
            })
            .map(|(key, _)| key)
            .collect()
    };
    for idempotent in [true, false] {
        let (w, s) = (effected(oracle, idempotent), effected(faulty, idempotent));
        if w != s {
            problems.push(format!(
                "{} effects for keys {s:?} (oracle: {w:?})",
                if idempotent {
                    "idempotent"
                } else {
                    "non-idempotent"
                }
            ));
        }
    }
    for (key, k) in faulty.vendor.stats() {
        if k.idempotent {
            continue;
        }
        if k.effects > 1 {
            problems.push(format!(
                "non-idempotent {key} took effect {} times",
                k.effects
            ));
        }
        if k.after_effect > 0 {
            problems.push(format!(
                "non-idempotent {key} was sent {} time(s) after it took effect",
                k.after_effect
            ));
        }
        if k.sends > 1 + k.human_retries + k.definite {
            problems.push(format!(
                "non-idempotent {key} was sent {} times with {} human retry(ies) and {} definite refusal(s)",
                k.sends, k.human_retries, k.definite
            ));
        }
    }
    problems
}

#[derive(Default, Debug)]
struct Totals {
    seeds: u64,
    steps: u64,
    deliveries: u64,
    faults: u64,
    unknown_outcomes: u64,
    worker_lost: u64,
    human_retries: u64,
    statuses: BTreeMap<&'static str, u64>,
}

/// Runs one seed; `Err` holds the report of a failure.
fn simulate(seed: u64) -> Result<Totals, String> {
    let g = generate(seed);
    let compiled = playbook::compile(spec_of(&g), 1, &catalog());
    if let Err(p) = compiled {
        return Err(format!(
            "seed {seed}: the generated playbook does not compile: {p}\n{}",
            g.describe()
        ));
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut oracle = World::new(seed, &g);
        oracle.settle();
        let mut faulty = World::new(seed, &g);
        let mut rng = Rng::new(seed, 4);
        let deliveries = 10 + rng.below(150);
        faulty.chaos(deliveries);
        faulty.settle();
        let problems = check(&g, &oracle, &faulty);
        (oracle, faulty, problems)
    }));
    let (oracle, faulty, problems) = match outcome {
        Ok(r) => r,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            return Err(format!("seed {seed}: panicked: {msg}\n{}", g.describe()));
        }
    };
    if !problems.is_empty() {
        let faults = faulty.plan.lock().log.join("\n");
        let trace = faulty.trace.join("\n");
        let history: Vec<String> = faulty
            .run()
            .history
            .iter()
            .map(|h| {
                format!(
                    "{} {:?}[{:?}] {} {}",
                    h.at - START,
                    h.step,
                    h.iteration,
                    h.event,
                    h.detail.clone().unwrap_or_default()
                )
            })
            .collect();
        let verbose = std::env::var("RIPOSTE_SEED").is_ok();
        return Err(format!(
            "seed {seed} (replay: RIPOSTE_SEED={seed} cargo test -p riposte-tests --test simulation -- --nocapture):\n  {}\n{}exclusive worker: {}\nvendor: {:#?}\n{}",
            problems.join("\n  "),
            g.describe(),
            faulty.exclusive,
            faulty.vendor.stats(),
            if verbose {
                format!(
                    "faults:\n{faults}\nhistory:\n{}\ntrace:\n{trace}\n",
                    history.join("\n")
                )
            } else {
                String::new()
            }
        ));
    }
    let run = faulty.run();
    let mut t = Totals {
        seeds: 1,
        steps: run.steps.len() as u64,
        deliveries: faulty.deliveries,
        faults: faulty.plan.lock().injected,
        ..Totals::default()
    };
    let _ = oracle;
    for h in &run.history {
        match h.event.as_str() {
            "outcome_unknown" => t.unknown_outcomes += 1,
            "worker_lost" => t.worker_lost += 1,
            _ => {}
        }
    }
    t.human_retries = faulty
        .vendor
        .stats()
        .values()
        .map(|k| k.human_retries as u64)
        .sum();
    *t.statuses.entry(run.status.as_str()).or_insert(0) += 1;
    Ok(t)
}

fn run_seeds(seeds: std::ops::Range<u64>) -> (Totals, Vec<String>) {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8) as u64;
    let results: Vec<(Totals, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|k| {
                let seeds = seeds.clone();
                s.spawn(move || {
                    let mut totals = Totals::default();
                    let mut failures = Vec::new();
                    for seed in seeds.filter(|s| s % threads == k) {
                        match simulate(seed) {
                            Ok(t) => {
                                totals.seeds += t.seeds;
                                totals.steps += t.steps;
                                totals.deliveries += t.deliveries;
                                totals.faults += t.faults;
                                totals.unknown_outcomes += t.unknown_outcomes;
                                totals.worker_lost += t.worker_lost;
                                totals.human_retries += t.human_retries;
                                for (k, v) in t.statuses {
                                    *totals.statuses.entry(k).or_insert(0) += v;
                                }
                            }
                            Err(f) => failures.push(f),
                        }
                    }
                    (totals, failures)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut totals = Totals::default();
    let mut failures = Vec::new();
    for (t, f) in results {
        totals.seeds += t.seeds;
        totals.steps += t.steps;
        totals.deliveries += t.deliveries;
        totals.faults += t.faults;
        totals.unknown_outcomes += t.unknown_outcomes;
        totals.worker_lost += t.worker_lost;
        totals.human_retries += t.human_retries;
        for (k, v) in t.statuses {
            *totals.statuses.entry(k).or_insert(0) += v;
        }
        failures.extend(f);
    }
    (totals, failures)
}

#[test]
fn a_thousand_seeds_under_faults_end_like_the_fault_free_run() {
    let range = match std::env::var("RIPOSTE_SEED") {
        Ok(s) => {
            let seed: u64 = s.trim().parse().expect("RIPOSTE_SEED is a number");
            seed..seed + 1
        }
        Err(_) => {
            let n = std::env::var("RIPOSTE_SEEDS")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(1_000u64);
            0..n
        }
    };
    let started = std::time::Instant::now();
    let (totals, mut failures) = run_seeds(range.clone());
    eprintln!(
        "simulated seeds {range:?} in {:.1?}: {totals:?}",
        started.elapsed()
    );
    if std::env::var("RIPOSTE_SEED").is_ok()
        && let Ok(seed) = std::env::var("RIPOSTE_SEED").unwrap().trim().parse::<u64>()
    {
        eprintln!("{}", generate(seed).describe());
    }
    failures.sort_by_key(|f| {
        f.split_whitespace()
            .nth(1)
            .and_then(|s| s.trim_end_matches(':').parse::<u64>().ok())
            .unwrap_or(0)
    });
    let seeds: Vec<&str> = failures
        .iter()
        .filter_map(|f| f.split_whitespace().nth(1))
        .collect();
    assert!(
        failures.is_empty(),
        "{} seed(s) failed: {seeds:?}\n\n{}",
        failures.len(),
        failures
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n\n")
    );
    assert!(totals.seeds as usize >= range.count());
}

#[test]
fn generated_playbooks_are_valid_and_varied() {
    let catalog = catalog();
    let mut kinds = BTreeMap::new();
    let mut features = BTreeMap::new();
    for seed in 0..1_000 {
        let g = generate(seed);
        playbook::compile(spec_of(&g), 1, &catalog)
            .unwrap_or_else(|p| panic!("seed {seed}: {p}\n{}", g.describe()));
        for k in g.kinds.values() {
            *kinds.entry(format!("{k:?}")).or_insert(0) += 1;
        }
        let text = g.spec.to_string();
        for f in [
            "\"needs\"",
            "for_each",
            "switch",
            "goto",
            "continue",
            "\"if\"",
            "\"fail\":true",
        ] {
            if text.contains(f) {
                *features.entry(f).or_insert(0) += 1;
            }
        }
        let n = g.spec["steps"].as_array().unwrap().len();
        assert!((1..=20).contains(&n));
    }
    for f in [
        "\"needs\"",
        "for_each",
        "switch",
        "goto",
        "continue",
        "\"if\"",
        "\"fail\":true",
    ] {
        assert!(
            features.get(f).copied().unwrap_or(0) > 50,
            "{f}: {features:?}"
        );
    }
    assert_eq!(kinds.len(), 5, "{kinds:?}");
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [3, 17, 42] {
        let g = generate(seed);
        let trace = || {
            let mut w = World::new(seed, &g);
            w.chaos(80);
            w.settle();
            (w.trace.clone(), w.run().history, w.vendor.stats())
        };
        assert_eq!(trace(), trace(), "seed {seed}");
    }
}

// ----------------------------------------------------------------------------------------------
// Named fault scenarios.

fn scripted(yaml: &str, script: Vec<Scripted>) -> World {
    let spec: Value = serde_yaml_ng::from_str(yaml).unwrap();
    let g = Generated {
        kinds: spec["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let id = s["id"].as_str().unwrap().to_string();
                let kind = match s["action"].as_str() {
                    Some("testco.block") => Kind::Block,
                    Some("testco.notify") => Kind::Notify,
                    _ if s.get("approval").is_some() => Kind::Approval,
                    _ if s.get("wait").is_some() => Kind::Wait,
                    _ => Kind::Set,
                };
                (id, kind)
            })
            .collect(),
        spec,
        input: json!({"items": ["x0", "x1"], "flags": {}}),
        budget: HashMap::new(),
    };
    // An even seed whose world is exclusive would restart on crash; these tests crash nothing.
    let w = World::new(0, &g);
    w.plan.lock().script = script;
    w
}

/// Delivers every message in order, answering approvals, until the queue is empty.
fn drive(w: &mut World) {
    w.settle();
    assert!(
        w.problems.is_empty(),
        "{:?}\n{}",
        w.problems,
        w.trace.join("\n")
    );
}

const PAIR: &str = r#"
id: pair
name: A call that may repeat, then one that must not
steps:
  - id: block
    action: testco.block
    with: { target: 203.0.113.9 }
  - id: tell
    needs: [block]
    action: testco.notify
    with: { text: blocked }
  - id: after
    needs: [tell]
    set: { done: true }
"#;

#[test]
fn a_lost_reply_after_the_claim_write_asks_a_human_for_a_one_way_call_and_retries_the_other() {
    // `block` is repeat-safe: its claim is written with its result, in the write that also claims
    // `tell`, carried by the same worker. That write is applied and its reply lost: the worker
    // is gone, `tell` is claimed but never called, and no message of its own exists.
    let mut w = scripted(
        PAIR,
        vec![Scripted {
            io: Io::Write,
            step: "block",
            nth: 1,
            act: Act::FailAfter,
        }],
    );
    drive(&mut w);
    let run = w.run();
    assert_eq!(run.status, RunStatus::Succeeded, "{:#?}", run.history);
    let stats = w.vendor.stats();
    let block = &stats["run1:block:0"];
    let tell = &stats["run1:tell:0"];
    // `block`'s message came back and took `tell` over, only after its lease: the one-way call
    // was not made blindly: a human (who saw nothing at the vendor) said `retry`.
    assert_eq!((block.sends, block.effects), (1, 1), "{stats:#?}");
    assert_eq!(
        (tell.sends, tell.effects, tell.human_retries),
        (1, 1, 1),
        "{stats:#?}"
    );
    let lost: Vec<_> = run
        .history
        .iter()
        .filter(|h| h.event == "worker_lost")
        .map(|h| h.step.clone().unwrap())
        .collect();
    assert_eq!(lost, ["tell"], "{:#?}", run.history);
    assert!(
        run.history
            .iter()
            .any(|h| h.event == "outcome_unknown" && h.step.as_deref() == Some("tell"))
    );
    let took_over = run
        .history
        .iter()
        .find(|h| h.event == "worker_lost")
        .unwrap()
        .at;
    assert!(
        took_over - START >= 60_000,
        "taken over before the lease ended"
    );
}

#[test]
fn a_duplicate_delivery_of_a_finished_step_changes_nothing() {
    let mut w = scripted(PAIR, vec![]);
    drive(&mut w);
    let (before, version) = now_or_never(w.store.load_run(&w.run_id)).unwrap().unwrap();
    assert_eq!(before.status, RunStatus::Succeeded);
    let stats = w.vendor.stats();
    let delivered = w.delivered.clone();
    // `block` carries `tell` and `after`: one message did it all.
    assert!(!delivered.is_empty());
    w.clock.advance(3_600_000);
    for m in delivered.iter().chain(delivered.iter().rev()) {
        let svc = w.workers[0].clone();
        let r = now_or_never(svc.handle(m));
        assert_eq!(r, Ok(Handled::Done), "{m:?}");
    }
    let (after, version_after) = now_or_never(w.store.load_run(&w.run_id)).unwrap().unwrap();
    assert_eq!(version_after, version, "a duplicate wrote the run");
    assert_eq!(after, before);
    assert_eq!(w.vendor.stats(), stats, "a duplicate called the vendor");
    assert_eq!(w.store.queue_len().unwrap(), 0);
}

#[test]
fn a_timed_out_one_way_call_goes_to_a_human_who_sees_it_took_effect() {
    let mut w = scripted(
        PAIR,
        vec![Scripted {
            io: Io::Http,
            step: "tell",
            nth: 1,
            act: Act::FailAfter,
        }],
    );
    // Up to the question: it is asked, and nothing is sent again meanwhile.
    for _ in 0..20 {
        if let Some(d) = w.store.due(1, &HashSet::new()).unwrap().pop() {
            w.start_task(Some(d.seq), d.message);
        } else if let Some(at) = w.store.next_visible_at().unwrap() {
            w.clock.advance_to(at);
        }
    }
    let run = w.run();
    assert_eq!(run.status, RunStatus::Waiting, "{:#?}", run.history);
    let it = &run.step("tell").unwrap().iterations[0];
    assert_eq!(it.status, StepStatus::Waiting);
    assert_eq!(
        it.approval.as_ref().unwrap().choices,
        ["retry", "done", "fail"]
    );
    assert_eq!(w.vendor.stats()["run1:tell:0"].sends, 1);
    // The driver, as the human, sees the effect at the vendor and answers `done`.
    drive(&mut w);
    let run = w.run();
    assert_eq!(run.status, RunStatus::Succeeded, "{:#?}", run.history);
    let tell = &w.vendor.stats()["run1:tell:0"];
    assert_eq!((tell.sends, tell.effects, tell.human_retries), (1, 1, 0));
    assert_eq!(
        run.step("tell").unwrap().iterations[0]
            .output
            .as_ref()
            .unwrap()["confirmed_by"],
        "sim-human"
    );
}

#[test]
fn a_one_way_call_that_timed_out_before_the_vendor_acted_is_sent_again_only_on_a_humans_retry() {
    let mut w = scripted(
        PAIR,
        vec![
            Scripted {
                io: Io::Http,
                step: "tell",
                nth: 1,
                act: Act::Fail,
            },
            Scripted {
                io: Io::Http,
                step: "block",
                nth: 1,
                act: Act::Fail,
            },
        ],
    );
    drive(&mut w);
    let run = w.run();
    assert_eq!(run.status, RunStatus::Succeeded, "{:#?}", run.history);
    let stats = w.vendor.stats();
    // The idempotent call timed out too: retried on its own, with the same key.
    assert_eq!(
        (stats["run1:block:0"].sends, stats["run1:block:0"].effects),
        (2, 1)
    );
    let tell = &stats["run1:tell:0"];
    assert_eq!((tell.sends, tell.effects, tell.human_retries), (2, 1, 1));
    assert_eq!(run.step("tell").unwrap().iterations[0].attempt, 2);
}
