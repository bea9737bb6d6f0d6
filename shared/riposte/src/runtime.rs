//! The local embedded runtime: every function of the AWS deployment in one process, over one
//! SQLite file.
//!
//! The HTTP routes are the same router API Gateway serves; the worker loop calls the same
//! [`Service::handle`] the SQS-fed step worker calls. Guarantee: a message is deleted from the
//! queue only after `handle` returned for it, so a process killed at any point redelivers what
//! was in flight when it restarts, and the engine turns what already happened into a no-op.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::sync::{mpsc, watch};

use riposte_api::{ApiKeys, AppState, Role};
use riposte_core::approval::Signer;
use riposte_core::connector::{Connections, ConnectorCatalog};
use riposte_core::engine::Worker;
use riposte_core::playbook;
use riposte_core::ports::{Clock, HttpSender, IdSource, Secrets};
use riposte_core::rule::Rule;
use riposte_core::service::{Config, Deps, Error, Handled, Service};
use riposte_http::{EgressPolicy, EnvSecrets, ReqwestSender};
use riposte_sqlite::SqliteStore;

pub use riposte_system::{OsIds, SystemClock, random_bytes};

/// Local API keys used when `RIPOSTE_API_KEYS` is not set, for a server bound to loopback only.
pub const DEV_OPERATOR_KEY: &str = "local-dev-operator-key";
pub const DEV_CONTRIBUTOR_KEY: &str = "local-dev-contributor-key";

/// Everything `riposte serve` is configured with.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    pub db: PathBuf,
    pub listen: SocketAddr,
    pub infra: PathBuf,
    pub connections: PathBuf,
    pub public_url: Option<String>,
    pub allow_private_egress: bool,
    pub api_keys: Option<String>,
    pub workers: usize,
    pub secrets_dir: Option<PathBuf>,
    /// Point every connection at the built-in vendor sandbox (see [`crate::sandbox`]).
    pub demo: bool,
}

/// A built local runtime.
pub struct Local {
    pub service: Arc<Service>,
    pub store: Arc<SqliteStore>,
    /// Held while the runtime lives: one process per database file.
    _lock: Option<std::fs::File>,
}

/// The shipped connectors plus the user's: `INFRA/connectors/<id>/connector.yaml`.
pub fn load_catalog(infra: &Path) -> Result<ConnectorCatalog> {
    let mut catalog = ConnectorCatalog::shipped();
    let dir = infra.join("connectors");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path().join("connector.yaml"))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for f in files {
            let text =
                std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            catalog
                .add(&text, Some(&f.display().to_string()))
                .map_err(|p| anyhow::anyhow!("{p}"))?;
        }
    }
    Ok(catalog)
}

/// Reads `INFRA/guards.yaml` (never-touch list, rate caps), checked against the catalog.
pub fn load_guards(infra: &Path) -> Result<Option<riposte_core::guard::Guards>> {
    let path = infra.join("guards.yaml");
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    riposte_core::guard::Guards::parse(
        &text,
        Some(&path.display().to_string()),
        &load_catalog(infra)?,
    )
    .map(Some)
    .map_err(|p| anyhow::anyhow!("{p}"))
}

/// Reads a connections file; a missing file means no connections.
pub fn load_connections(path: &Path) -> Result<Connections> {
    if !path.exists() {
        return Ok(Connections::default());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Connections::parse(&text, Some(&path.display().to_string())).map_err(|p| anyhow::anyhow!("{p}"))
}

/// Builds the service over an SQLite file (or memory when `db` is `:memory:`).
pub fn build(
    db: &Path,
    connections: Connections,
    catalog: ConnectorCatalog,
    public_url: String,
    http: Arc<dyn HttpSender>,
    clock: Arc<dyn Clock>,
) -> Result<Local> {
    let mut lock = None;
    let store = Arc::new(if db.as_os_str() == ":memory:" {
        SqliteStore::in_memory(clock.clone())?
    } else {
        if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // The worker takes over claims of any other process at once (see `Worker::exclusive`):
        // that is only right while no other process uses this database.
        let lock_path = db.with_extension("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        if file.try_lock().is_err() {
            bail!("another riposte process is using {}", db.display());
        }
        lock = Some(file);
        SqliteStore::open(db, clock.clone()).with_context(|| format!("opening {}", db.display()))?
    });
    let key = match std::env::var("RIPOSTE_APPROVAL_KEY") {
        Ok(k) if k.len() >= 32 => k.into_bytes(),
        Ok(_) => bail!("RIPOSTE_APPROVAL_KEY must be at least 32 characters"),
        Err(_) => store
            .meta_init("approval_key", &hex::encode(random_bytes::<32>()))?
            .into_bytes(),
    };
    let service = Service::new(Deps {
        store: store.clone(),
        http,
        clock,
        ids: Arc::new(OsIds),
        signer: Signer::new(&key),
        connections,
        catalog: Arc::new(catalog),
        config: Config {
            public_url,
            rules_cache_ms: 0,
            worker: Worker {
                id: OsIds.new_id(),
                exclusive: true,
            },
        },
    });
    Ok(Local {
        service: Arc::new(service),
        store,
        _lock: lock,
    })
}

/// Loads infra/playbooks and infra/rules into an empty store (the first start).
pub async fn seed(local: &Local, infra: &Path) -> Result<(usize, usize)> {
    if local.store.meta("seeded")?.is_some() {
        return Ok((0, 0));
    }
    let loaded = load_infra(&local.service, infra, "infra").await?;
    local.store.meta_init("seeded", "1")?;
    Ok(loaded)
}

/// Puts every playbook and rule under `infra` through the service (validated, versioned,
/// audited as `by`): the local first start and `riposte sync` on AWS share it. Returns how many
/// playbooks and rules were loaded.
pub async fn load_infra(service: &Service, infra: &Path, by: &str) -> Result<(usize, usize)> {
    let (playbooks, rules) = read_infra(infra)?;
    // Sub-playbooks must exist before the playbooks that call them: retry until no progress.
    let mut pending = playbooks;
    let mut loaded = 0;
    while !pending.is_empty() {
        let before = pending.len();
        let mut next = Vec::new();
        let mut errors = Vec::new();
        for (file, spec) in pending {
            match service.put_playbook(spec.clone(), by).await {
                Ok(_) => loaded += 1,
                Err(e) => {
                    errors.push(format!("{file}: {e}"));
                    next.push((file, spec));
                }
            }
        }
        if next.len() == before {
            bail!("{}", errors.join("\n"));
        }
        pending = next;
    }
    let mut nrules = 0;
    for (file, rule) in rules {
        service
            .put_rule(rule, by)
            .await
            .map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        nrules += 1;
    }
    Ok((loaded, nrules))
}

type Sources = (Vec<(String, playbook::PlaybookSpec)>, Vec<(String, Rule)>);

/// Reads and parses every playbook and rule file under `infra` (YAML), sorted by file name.
pub fn read_infra(infra: &Path) -> Result<Sources> {
    let mut playbooks = Vec::new();
    let mut rules = Vec::new();
    let mut problems = Vec::new();
    for (dir, is_rule) in [("playbooks", false), ("rules", true)] {
        for path in yaml_files(&infra.join(dir))? {
            let name = path.display().to_string();
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {name}"))?;
            if is_rule {
                match Rule::parse(&text, Some(&name)) {
                    Ok(r) => rules.push((name, r)),
                    Err(p) => problems.push(p.to_string()),
                }
            } else {
                match playbook::parse_spec(&text, Some(&name)) {
                    Ok(s) => playbooks.push((name, s)),
                    Err(p) => problems.push(p.to_string()),
                }
            }
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok((playbooks, rules))
}

pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(vec![]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

/// How many times a message whose handling errors is retried before it is set aside.
pub const MAX_RECEIVES: u32 = 10;

/// Feeds queued step messages to [`Service::handle`], up to `concurrency` at once, until `stop`.
pub async fn run_worker(
    store: Arc<SqliteStore>,
    service: Arc<Service>,
    concurrency: usize,
    mut stop: watch::Receiver<bool>,
) {
    let concurrency = concurrency.max(1);
    let mut inflight: HashSet<i64> = HashSet::new();
    let mut errors: std::collections::HashMap<i64, u32> = std::collections::HashMap::new();
    let (tx, mut rx) = mpsc::unbounded_channel::<(i64, Result<Handled, Error>)>();
    let mut finished: Vec<(i64, Result<Handled, Error>)> = Vec::new();
    let mut messages: std::collections::HashMap<i64, riposte_core::run::StepMessage> =
        std::collections::HashMap::new();
    loop {
        if *stop.borrow() {
            break;
        }
        while let Ok(done) = rx.try_recv() {
            finished.push(done);
        }
        let mut acks = Vec::new();
        for (seq, result) in finished.drain(..) {
            inflight.remove(&seq);
            let is_error = result.is_err();
            let outcome = match result {
                Ok(Handled::Done) => {
                    errors.remove(&seq);
                    acks.push(seq);
                    Ok(())
                }
                Ok(Handled::Retry { delay_ms, .. }) => store.delay(seq, delay_ms),
                // Local messages are committed with their write, never ahead of it.
                Ok(Handled::Ahead) => store.delay(seq, 100),
                Err(e) => {
                    let n = errors.entry(seq).or_insert(0);
                    *n += 1;
                    tracing::warn!(message = "Step message failed; it will be retried.", seq, receives = *n, error = %e);
                    if *n >= MAX_RECEIVES {
                        tracing::error!(message = "Step message set aside after repeated failures; its run is failed.", seq, error = %e);
                        errors.remove(&seq);
                        acks.push(seq);
                        if let Some(m) = messages.get(&seq) {
                            let reason = format!(
                                "step `{}` could not be handled after {MAX_RECEIVES} tries: {e}",
                                m.step
                            );
                            if let Err(e) = service.fail_run(&m.run_id, &reason).await {
                                tracing::error!(message = "Failing the run failed.", run_id = %m.run_id, error = %e);
                            }
                        }
                        Ok(())
                    } else {
                        store.delay(seq, 500 * (1 << (*n).min(8)))
                    }
                }
            };
            if let Err(e) = outcome {
                tracing::error!(message = "Queue update failed.", error = %e);
            }
            if !is_error || !errors.contains_key(&seq) {
                messages.remove(&seq);
            }
        }
        if !acks.is_empty()
            && let Err(e) = store.ack(&acks)
        {
            tracing::error!(message = "Acknowledging messages failed; they will be redelivered.", error = %e);
        }
        let room = concurrency.saturating_sub(inflight.len());
        let due = if room > 0 {
            store.due(room, &inflight).unwrap_or_else(|e| {
                tracing::error!(message = "Reading the queue failed.", error = %e);
                vec![]
            })
        } else {
            vec![]
        };
        let got = !due.is_empty();
        for d in due {
            inflight.insert(d.seq);
            messages.insert(d.seq, d.message.clone());
            let service = service.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let r = service.handle(&d.message).await;
                let _ = tx.send((d.seq, r));
            });
        }
        if got && inflight.len() < concurrency {
            tokio::task::yield_now().await;
            continue;
        }
        let wait = match store.next_visible_at() {
            Ok(Some(at)) if inflight.len() < concurrency => {
                Duration::from_millis((at - store.now()).clamp(1, 1000) as u64)
            }
            _ => Duration::from_millis(1000),
        };
        tokio::select! {
            Some(done) = rx.recv() => finished.push(done),
            _ = store.enqueued.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Builds the HTTP sender for a configuration.
pub fn sender(cfg: &LocalConfig) -> Arc<dyn HttpSender> {
    if cfg.demo {
        return crate::sandbox::sender();
    }
    let secrets: Arc<dyn Secrets> = Arc::new(EnvSecrets::new(cfg.secrets_dir.clone()));
    let policy = if cfg.allow_private_egress {
        EgressPolicy::permissive_for_tests()
    } else {
        EgressPolicy::strict()
    };
    Arc::new(ReqwestSender::new(secrets, policy))
}

/// The API keys in force: `RIPOSTE_API_KEYS`, or the development keys on a loopback address.
pub fn api_keys(cfg: &LocalConfig) -> Result<ApiKeys> {
    match &cfg.api_keys {
        Some(spec) => ApiKeys::parse(spec).map_err(|e| anyhow::anyhow!("RIPOSTE_API_KEYS: {e}")),
        None if cfg.listen.ip().is_loopback() => {
            tracing::warn!(
                message = "RIPOSTE_API_KEYS is not set: using the local development keys (loopback only)."
            );
            Ok(ApiKeys::new()
                .with(DEV_OPERATOR_KEY, "local-operator", Role::Operator)
                .with(DEV_CONTRIBUTOR_KEY, "local-contributor", Role::Contributor))
        }
        None => bail!("RIPOSTE_API_KEYS must be set when listening on a non-loopback address"),
    }
}

/// `riposte serve`: routes and worker until Ctrl-C or SIGTERM.
pub async fn serve(cfg: LocalConfig) -> Result<()> {
    let mut connections = load_connections(&cfg.connections)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let public_url = cfg
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let mut cfg = cfg;
    if cfg.demo {
        connections = crate::sandbox::redirect(&connections, &format!("http://{addr}"));
        cfg.allow_private_egress = true;
        println!(
            "demo mode: every connection goes to the sandbox at http://{addr}/sandbox (GET it to read the outbox)"
        );
    }
    connections.allow_any_host = cfg.allow_private_egress;
    let local = build(
        &cfg.db,
        connections,
        load_catalog(&cfg.infra)?,
        public_url.clone(),
        sender(&cfg),
        Arc::new(SystemClock),
    )?;
    if let Some(guards) = load_guards(&cfg.infra)? {
        local.service.set_guards(guards);
    }
    let (np, nr) = seed(&local, &cfg.infra).await?;
    if np + nr > 0 {
        tracing::info!(message = "Loaded examples.", playbooks = np, rules = nr, from = %cfg.infra.display());
    }
    let state = AppState {
        service: local.service.clone(),
        auth: Arc::new(api_keys(&cfg)?),
        slack: riposte_api::slack_from_env(),
        webhooks: riposte_api::webhooks_from_env(),
    };
    let mut app = riposte_api::router(state);
    if cfg.demo {
        app = app.merge(crate::sandbox::Sandbox::new().router());
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let worker = tokio::spawn(run_worker(
        local.store.clone(),
        local.service.clone(),
        cfg.workers,
        stop_rx,
    ));
    println!(
        "riposte serving on {public_url} (database {})",
        cfg.db.display()
    );
    tracing::info!(message = "Serving.", address = %addr, queued = local.store.queue_len().unwrap_or(0));
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("installing the SIGTERM handler");
                tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
            }
            #[cfg(not(unix))]
            let _ = ctrl_c.await;
        })
        .await?;
    let _ = stop_tx.send(true);
    let _ = worker.await;
    Ok(())
}
