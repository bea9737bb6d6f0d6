//! `riposte test`: a dry run of a playbook on an event file. Every request the playbook would make
//! is printed (credentials shown only as the secret's name) and none is sent. Approvals are
//! answered with `--choice` (or each approval's default), and waits and retries pass instantly on
//! a simulated clock.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use serde_json::{Value, json};

use riposte_core::http::{Auth, Body, Connection, HttpError, HttpRequest, HttpResponse, redacted};
use riposte_core::model::Millis;
use riposte_core::ports::{Clock, HttpSender};
use riposte_core::service::Handled;

use crate::runtime::{build, load_catalog, load_connections, yaml_files};

/// A clock that only moves when told to.
pub struct ManualClock(pub AtomicI64);

impl Clock for ManualClock {
    fn now(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

/// Prints each request instead of sending it; answers 200 with the canned body for its connection.
pub struct DryRunSender {
    pub responses: BTreeMap<String, Value>,
    pub count: AtomicI64,
}

fn describe_auth(auth: &Auth) -> String {
    match auth {
        Auth::None => "none".into(),
        Auth::Bearer { token } => format!("bearer token from secret `{}`", token.secret),
        Auth::Basic { username, password } => format!(
            "basic, user `{username}`, password from secret `{}`",
            password.secret
        ),
        Auth::ApiKey {
            header, query, key, ..
        } => format!(
            "API key in {} from secret `{}`",
            header
                .as_deref()
                .map(|h| format!("header {h}"))
                .or(query.as_deref().map(|q| format!("query {q}")))
                .unwrap_or_default(),
            key.secret
        ),
        Auth::JsonBodyKey { member, key } => {
            format!("`{member}` in the JSON body from secret `{}`", key.secret)
        }
        Auth::Hmac { secret, header, .. } => {
            format!(
                "HMAC-SHA256 signature in {header}, key from secret `{}`",
                secret.secret
            )
        }
        Auth::AwsSigv4 { service, region } => {
            format!("AWS SigV4 for {service} in {region}, with the host's AWS credentials")
        }
        Auth::Oauth2ClientCredentials {
            token_url,
            client_id,
            client_secret,
            ..
        } => {
            format!(
                "OAuth2 client credentials at {token_url}, client `{client_id}`, secret `{}`",
                client_secret.secret
            )
        }
    }
}

#[async_trait]
impl HttpSender for DryRunSender {
    async fn send(
        &self,
        connection: &Connection,
        request: &HttpRequest,
    ) -> Result<HttpResponse, HttpError> {
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        let r = redacted(request);
        let mut url = format!("{}{}", connection.base_url.trim_end_matches('/'), r.path);
        if !r.query.is_empty() {
            let q: Vec<String> = r
                .query
                .iter()
                .map(|(k, v)| format!("{k}={}", url_encode(v)))
                .collect();
            url.push('?');
            url.push_str(&q.join("&"));
        }
        println!("\n#{n} {} {url}", r.method);
        println!(
            "   connection: {} (auth: {})",
            connection.name,
            describe_auth(&connection.auth)
        );
        for (k, v) in connection.headers.iter().chain(r.headers.iter()) {
            println!("   {k}: {v}");
        }
        if let Some(k) = &r.idempotency_key {
            println!("   Idempotency-Key: {k}");
        }
        match &r.body {
            Some(Body::Json(v)) => println!(
                "   body (json): {}",
                serde_json::to_string_pretty(v)
                    .unwrap_or_default()
                    .replace('\n', "\n   ")
            ),
            Some(Body::Form(f)) => println!("   body (form): {f:?}"),
            Some(Body::Text { content_type, text }) => println!("   body ({content_type}): {text}"),
            None => {}
        }
        Ok(HttpResponse {
            status: 200,
            headers: Default::default(),
            body: self
                .responses
                .get(&connection.name)
                .cloned()
                .unwrap_or_else(|| json!({})),
        })
    }
}

fn url_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The infra folder a connections file sits in (its user connectors are beside it).
fn infra_of(connections: &Path) -> std::path::PathBuf {
    connections
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| ".".into())
}

pub async fn run(
    playbook_file: &Path,
    event_file: &Path,
    choice: Option<String>,
    connections: &Path,
    responses: Option<&Path>,
) -> Result<()> {
    let responses: Option<BTreeMap<String, Value>> = match responses {
        Some(p) => Some(
            serde_json::from_slice(
                &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| {
                format!(
                    "{}: expected a JSON map of connection name to response body",
                    p.display()
                )
            })?,
        ),
        None => None,
    };
    let text = std::fs::read_to_string(playbook_file)
        .with_context(|| format!("reading {}", playbook_file.display()))?;
    let spec =
        riposte_core::playbook::parse_spec(&text, Some(&playbook_file.display().to_string()))
            .map_err(|p| anyhow::anyhow!("{p}"))?;
    let event: Value = serde_json::from_slice(
        &std::fs::read(event_file).with_context(|| format!("reading {}", event_file.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", event_file.display()))?;
    let alert = riposte_core::event::normalize(&event)
        .map_err(|e| anyhow::anyhow!("{}: {e}", event_file.display()))?
        .into_iter()
        .next()
        .context("the event holds no alert")?;
    let clock = Arc::new(ManualClock(AtomicI64::new(1_767_225_600_000)));
    let sender = Arc::new(DryRunSender {
        responses: responses.unwrap_or_default(),
        count: AtomicI64::new(0),
    });
    let local = build(
        Path::new(":memory:"),
        load_connections(connections)?,
        load_catalog(&infra_of(connections))?,
        "https://riposte.invalid".into(),
        sender.clone(),
        clock.clone(),
    )?;
    // Sibling playbooks first, so sub-playbooks resolve.
    if let Some(dir) = playbook_file.parent() {
        for f in yaml_files(dir)? {
            if f != playbook_file
                && let Ok(s) =
                    riposte_core::playbook::parse_spec(&std::fs::read_to_string(&f)?, None)
            {
                let _ = local.service.put_playbook(s, "dry-run").await;
            }
        }
    }
    let pb = local
        .service
        .put_playbook(spec, "dry-run")
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", playbook_file.display()))?;
    println!(
        "dry run of {} v{} on {} ({}: {})",
        pb.spec.id,
        pb.version,
        event_file.display(),
        alert.id,
        alert.title
    );
    let run = local
        .service
        .start_run(&pb.spec.id, json!({ "alert": alert }), "dry-run")
        .await?;
    let none = HashSet::new();
    for _ in 0..100_000 {
        let due = local.store.due(64, &none)?;
        if due.is_empty() {
            let (r, _) = local.service.load(&run.id).await?;
            if r.status.is_terminal() {
                break;
            }
            let open = r.steps.iter().find_map(|s| {
                s.iterations.iter().enumerate().find_map(|(i, it)| {
                    it.approval
                        .as_ref()
                        .filter(|a| a.decision.is_none())
                        .map(|a| (s.id.clone(), i as u32, a.clone()))
                })
            });
            if let Some((step, i, a)) = open {
                let c = choice
                    .clone()
                    .filter(|c| a.choices.contains(c))
                    .or(a.default.clone())
                    .unwrap_or_else(|| a.choices[0].clone());
                println!(
                    "\n== approval `{step}`: \"{}\" answered `{c}` (dry run)",
                    a.message
                );
                let who = a
                    .approvers
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "dry-run".into());
                local.service.decide_as(&run.id, &step, i, &c, &who).await?;
                continue;
            }
            match local.store.next_visible_at()? {
                Some(at) => clock.0.store(at.max(clock.now()), Ordering::SeqCst),
                None => break,
            }
            continue;
        }
        let mut acks = Vec::new();
        for d in due {
            match local.service.handle(&d.message).await? {
                Handled::Done => acks.push(d.seq),
                Handled::Retry { delay_ms, .. } => local.store.delay(d.seq, delay_ms)?,
                Handled::Ahead => local.store.delay(d.seq, 100)?,
            }
        }
        local.store.ack(&acks)?;
    }
    let (r, _) = local.service.load(&run.id).await?;
    println!(
        "\n== {} request(s) would be sent; none was.\n",
        sender.count.load(Ordering::SeqCst)
    );
    print!("{}", crate::timeline::render(&r));
    if r.status != riposte_core::run::RunStatus::Succeeded {
        bail!("the dry run ended {}", r.status.as_str());
    }
    Ok(())
}
