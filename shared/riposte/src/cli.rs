//! The operator's commands: they talk to a running `riposte serve` over its HTTP API, except
//! `validate`, which reads files.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use riposte_core::playbook;
use riposte_core::rule::Rule;

use crate::runtime::{DEV_CONTRIBUTOR_KEY, load_catalog, load_connections, yaml_files};
use crate::timeline;

pub struct Client {
    base: String,
    key: String,
    http: reqwest::Client,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

impl Client {
    pub fn new(base: &str, key: Option<String>) -> Result<Client> {
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            key: key.unwrap_or_else(|| DEV_CONTRIBUTOR_KEY.to_string()),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()?,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("is `riposte serve` running at {}?", self.base))?;
        let status = resp.status();
        let text = resp.text().await?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let msg = value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            let problems = value
                .get("problems")
                .and_then(Value::as_array)
                .map(|p| {
                    p.iter()
                        .map(|x| format!("\n  - {}", problem_line(x)))
                        .collect::<String>()
                })
                .unwrap_or_default();
            bail!("HTTP {status}: {msg}{problems}");
        }
        Ok(value)
    }

    pub async fn send(&self, file: &Path) -> Result<()> {
        let event = read_json(file)?;
        let out = self
            .call(reqwest::Method::POST, "/events", Some(event))
            .await?;
        for alert in out["alerts"].as_array().into_iter().flatten() {
            println!(
                "{} {}: {}",
                alert["kind"].as_str().unwrap_or(""),
                alert["alert_id"].as_str().unwrap_or(""),
                alert["title"].as_str().unwrap_or("")
            );
            for line in alert["evaluation"]["lines"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let verdict = &line["verdict"];
                let text = match verdict["outcome"].as_str() {
                    Some("matched") => "matched".to_string(),
                    Some(other) => match verdict.get("detail").and_then(Value::as_str) {
                        Some(d) => format!("{} ({d})", other.replace('_', " ")),
                        None => other.replace('_', " "),
                    },
                    None => verdict.to_string(),
                };
                println!(
                    "  rule {:<32} {text}",
                    line["rule_id"].as_str().unwrap_or("")
                );
            }
            for run in alert["runs"].as_array().into_iter().flatten() {
                println!("  run started: {}", run.as_str().unwrap_or(""));
            }
        }
        Ok(())
    }

    pub async fn run(
        &self,
        playbook: &str,
        input: Option<PathBuf>,
        event: Option<PathBuf>,
    ) -> Result<()> {
        let input = match (input, event) {
            (Some(p), _) => read_json(&p)?,
            (None, Some(p)) => {
                let alerts = riposte_core::event::normalize(&read_json(&p)?)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                let alert = alerts
                    .into_iter()
                    .next()
                    .context("the event holds no alert")?;
                json!({ "alert": alert })
            }
            (None, None) => json!({}),
        };
        let run = self
            .call(
                reqwest::Method::POST,
                "/runs",
                Some(json!({"playbook": playbook, "input": input})),
            )
            .await?;
        println!(
            "run {} started ({} v{}): {}",
            run["id"].as_str().unwrap_or(""),
            run["playbook_id"].as_str().unwrap_or(""),
            run["playbook_version"],
            run["status"].as_str().unwrap_or("")
        );
        Ok(())
    }

    pub async fn list(&self, status: Option<String>, limit: usize) -> Result<()> {
        let mut path = format!("/runs?limit={limit}");
        if let Some(s) = status {
            path.push_str(&format!("&status={s}"));
        }
        let runs = self.call(reqwest::Method::GET, &path, None).await?;
        println!("{:<28} {:<28} {:<10} CREATED", "RUN", "PLAYBOOK", "STATUS");
        for r in runs.as_array().into_iter().flatten() {
            println!(
                "{:<28} {:<28} {:<10} {}",
                r["id"].as_str().unwrap_or(""),
                format!(
                    "{} v{}",
                    r["playbook_id"].as_str().unwrap_or(""),
                    r["playbook_version"]
                ),
                r["status"].as_str().unwrap_or(""),
                timeline::time(r["created_at"].as_i64().unwrap_or(0))
            );
        }
        Ok(())
    }

    pub async fn show(&self, id: &str) -> Result<()> {
        let run = self
            .call(reqwest::Method::GET, &format!("/runs/{id}"), None)
            .await?;
        let run: riposte_core::run::Run = serde_json::from_value(run)?;
        print!("{}", timeline::render(&run));
        Ok(())
    }

    pub async fn approve(
        &self,
        target: &str,
        choice: Option<String>,
        step: Option<String>,
        iteration: u32,
        approver: Option<String>,
    ) -> Result<()> {
        if target.starts_with("http://") || target.starts_with("https://") {
            let mut form = vec![];
            if let Some(a) = &approver {
                form.push(("approver", a.as_str()));
            }
            let resp = self.http.post(target).form(&form).send().await?;
            let status = resp.status();
            let text = resp.text().await?;
            let msg = text
                .split("<p>")
                .nth(1)
                .and_then(|t| t.split("</p>").next())
                .unwrap_or("")
                .to_string();
            let title = text
                .split("<h1>")
                .nth(1)
                .and_then(|t| t.split("</h1>").next())
                .unwrap_or("");
            if !status.is_success() {
                bail!("HTTP {status}: {title}: {msg}");
            }
            println!("{title}. {msg}");
            return Ok(());
        }
        let choice = choice.context("--choice is required with a run id")?;
        let step = match step {
            Some(s) => s,
            None => {
                let run: riposte_core::run::Run = serde_json::from_value(
                    self.call(reqwest::Method::GET, &format!("/runs/{target}"), None)
                        .await?,
                )?;
                run.steps
                    .iter()
                    .find(|s| {
                        s.iterations
                            .iter()
                            .any(|it| it.approval.as_ref().is_some_and(|a| a.decision.is_none()))
                    })
                    .map(|s| s.id.clone())
                    .context("this run has no open approval")?
            }
        };
        let out = self
            .call(
                reqwest::Method::POST,
                &format!("/runs/{target}/approvals/{step}"),
                Some(json!({"choice": choice, "iteration": iteration})),
            )
            .await?;
        println!(
            "recorded `{}` for step {step} of run {target}",
            out["choice"].as_str().unwrap_or("")
        );
        Ok(())
    }
}

fn problem_line(p: &Value) -> String {
    let mut s = String::new();
    if let Some(f) = p.get("file").and_then(Value::as_str) {
        s.push_str(&format!("{f}: "));
    }
    if let Some(st) = p.get("step").and_then(Value::as_str) {
        s.push_str(&format!("step `{st}`: "));
    }
    if let Some(f) = p
        .get("field")
        .and_then(Value::as_str)
        .filter(|f| !f.is_empty())
    {
        s.push_str(&format!("{f}: "));
    }
    s.push_str(p.get("message").and_then(Value::as_str).unwrap_or(""));
    s
}

/// `riposte validate`: every playbook and rule file, with their cross-references.
pub fn validate(paths: Vec<PathBuf>, connections: Option<PathBuf>) -> Result<()> {
    let paths = if paths.is_empty() {
        vec![PathBuf::from("infra")]
    } else {
        paths
    };
    let mut files = Vec::new();
    for p in &paths {
        if p.is_dir() {
            for sub in ["playbooks", "rules"] {
                files.extend(yaml_files(&p.join(sub))?);
            }
            files.extend(
                yaml_files(p)?
                    .into_iter()
                    // Checked on their own below.
                    .filter(|f| !f.ends_with("connections.yaml") && !f.ends_with("guards.yaml")),
            );
        } else {
            files.push(p.clone());
        }
    }
    let conn_path = connections.unwrap_or_else(|| {
        paths
            .iter()
            .find(|p| p.is_dir())
            .map(|d| d.join("connections.yaml"))
            .unwrap_or_else(|| PathBuf::from("infra/connections.yaml"))
    });
    let conns = load_connections(&conn_path)?;
    let infra = conn_path.parent().unwrap_or(Path::new("."));
    let catalog = load_catalog(infra)?;
    match crate::runtime::load_guards(infra) {
        Ok(Some(_)) => println!("ok  {}", infra.join("guards.yaml").display()),
        Ok(None) => {}
        Err(e) => {
            println!("{e}");
            bail!("guards are invalid");
        }
    }
    let mut problems = Vec::new();
    let mut playbook_ids = Vec::new();
    let mut rules = Vec::new();
    for f in &files {
        let name = f.display().to_string();
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {name}"))?;
        let is_rule = text.lines().any(|l| l.starts_with("trigger:"))
            && !text.lines().any(|l| l.starts_with("steps:"));
        if is_rule {
            match Rule::parse(&text, Some(&name)) {
                Ok(r) => rules.push((name, r)),
                Err(p) => problems.push(p.to_string()),
            }
            continue;
        }
        match playbook::load(&text, Some(&name), &catalog) {
            Ok(pb) => {
                for p in catalog.check_connections(&pb, &conns) {
                    problems.push(format!(
                        "{name}: {p} (connections in {})",
                        conn_path.display()
                    ));
                }
                playbook_ids.push(pb.id().to_string());
                println!(
                    "ok  {name} (playbook {}, {} steps)",
                    pb.id(),
                    pb.steps.len()
                );
            }
            Err(p) => problems.push(p.to_string()),
        }
    }
    for (name, r) in rules {
        let id = r.id.clone();
        match r.compile(&|p| playbook_ids.iter().any(|k| k == p)) {
            Ok(_) => println!("ok  {name} (rule {id})"),
            Err(p) => problems.push(p.with_file(&name).to_string()),
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    for p in &problems {
        eprintln!("{p}");
    }
    bail!("{} problem(s) found", problems.len())
}

/// `riposte connectors`: the connector reference, printed or written into a README.
pub fn connectors(infra: &Path, write: Option<&Path>) -> Result<()> {
    let catalog = load_catalog(infra)?;
    let reference = riposte_core::connector::reference(&catalog);
    match write {
        None => print!("{reference}"),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let updated =
                riposte_core::connector::with_reference(&text, &reference).with_context(|| {
                    format!("{} has no connector reference markers", path.display())
                })?;
            std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote the connector reference into {}", path.display());
        }
    }
    Ok(())
}
