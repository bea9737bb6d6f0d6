//! `riposte`: the local embedded runtime (`serve`) and the operator's tools.

use riposte::{cli, dry, runtime};

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "riposte",
    version,
    about = "Security automation: playbooks that respond to alerts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ServerArgs {
    /// The running `riposte serve` to talk to.
    #[arg(long, env = "RIPOSTE_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// API key (default: the local development contributor key).
    #[arg(long, env = "RIPOSTE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run every trigger, the HTTP API and the step worker in this process over one SQLite file.
    Serve {
        #[arg(long, env = "RIPOSTE_DB", default_value = ".riposte/riposte.db")]
        db: PathBuf,
        #[arg(long, env = "RIPOSTE_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the example playbooks and rules are loaded from on first start.
        #[arg(long, default_value = "infra")]
        infra: PathBuf,
        /// Declared connections (base URLs and auth); default INFRA/connections.yaml.
        #[arg(long)]
        connections: Option<PathBuf>,
        /// Base URL approval links point at (default: http://LISTEN).
        #[arg(long, env = "RIPOSTE_PUBLIC_URL")]
        public_url: Option<String>,
        /// Allow HTTP actions to plain-http, loopback and private addresses (tests and demos).
        #[arg(long)]
        allow_private_egress: bool,
        /// Step messages handled at once.
        #[arg(long, default_value_t = 64)]
        workers: usize,
        /// Directory of secret files (one file per secret name); env RIPOSTE_SECRET_NAME also works.
        #[arg(long, env = "RIPOSTE_SECRETS_DIR")]
        secrets_dir: Option<PathBuf>,
        /// Send every connection's calls to a built-in vendor sandbox (GET /sandbox shows them).
        #[arg(long)]
        demo: bool,
    },
    /// Validate playbooks, rules and connections (files or directories; default infra/).
    Validate {
        paths: Vec<PathBuf>,
        #[arg(long)]
        connections: Option<PathBuf>,
    },
    /// Print the connector reference (shipped and INFRA/connectors), or write it into a README.
    Connectors {
        #[arg(long, default_value = "infra")]
        infra: PathBuf,
        /// Replace the reference section of this Markdown file instead of printing.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Send an EventBridge event file (Security Hub, GuardDuty, Config) to the running server.
    Send {
        file: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Start a playbook on an input file (JSON), or on the alert in an event file.
    Run {
        playbook: String,
        #[arg(long, conflicts_with = "event")]
        input: Option<PathBuf>,
        #[arg(long)]
        event: Option<PathBuf>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List runs, or show one as a timeline (`riposte runs show ID`).
    Runs {
        #[command(subcommand)]
        show: Option<RunsCommand>,
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Answer an approval: with its link, or as an operator with a run id and a choice.
    Approve {
        /// An approval link, or a run id.
        target: String,
        #[arg(long)]
        choice: Option<String>,
        #[arg(long)]
        step: Option<String>,
        #[arg(long, default_value_t = 0)]
        iteration: u32,
        /// Your name, recorded with a link answer.
        #[arg(long)]
        approver: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Put infra/ (playbooks and rules) into the deployed table (RIPOSTE_TABLE, RIPOSTE_QUEUE_URL).
    #[cfg(feature = "aws")]
    Sync {
        #[arg(long, default_value = "infra")]
        infra: PathBuf,
        #[arg(long, default_value = "infra/connections.yaml")]
        connections: PathBuf,
        /// Recorded in the audit trail as who made the change.
        #[arg(long, default_value = "riposte-sync")]
        by: String,
    },
    /// Dry run: a playbook on an event file, printing every request it would make, sending none.
    Test {
        /// A playbook file.
        playbook: PathBuf,
        #[arg(long)]
        event: PathBuf,
        /// The answer given to approvals (default: each approval's default, else its first choice).
        #[arg(long)]
        choice: Option<String>,
        #[arg(long, default_value = "infra/connections.yaml")]
        connections: PathBuf,
        /// JSON file: connection name -> the response body its calls get (default `{}`).
        #[arg(long)]
        responses: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum RunsCommand {
    /// A run's readable timeline.
    Show { id: String },
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("RIPOSTE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("RIPOSTE_LOG_FORMAT").is_ok_and(|f| f == "json");
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve {
                db,
                listen,
                infra,
                connections,
                public_url,
                allow_private_egress,
                workers,
                secrets_dir,
                demo,
            } => {
                let connections = connections.unwrap_or_else(|| infra.join("connections.yaml"));
                runtime::serve(runtime::LocalConfig {
                    db,
                    listen,
                    infra,
                    connections,
                    public_url,
                    allow_private_egress,
                    api_keys: std::env::var("RIPOSTE_API_KEYS").ok(),
                    workers,
                    secrets_dir,
                    demo,
                })
                .await
            }
            Command::Validate { paths, connections } => cli::validate(paths, connections),
            Command::Connectors { infra, write } => cli::connectors(&infra, write.as_deref()),
            Command::Send { file, server } => {
                cli::Client::new(&server.server, server.api_key)?
                    .send(&file)
                    .await
            }
            Command::Run {
                playbook,
                input,
                event,
                server,
            } => {
                cli::Client::new(&server.server, server.api_key)?
                    .run(&playbook, input, event)
                    .await
            }
            Command::Runs {
                show,
                status,
                limit,
                server,
            } => {
                let c = cli::Client::new(&server.server, server.api_key)?;
                match show {
                    Some(RunsCommand::Show { id }) => c.show(&id).await,
                    None => c.list(status, limit).await,
                }
            }
            Command::Approve {
                target,
                choice,
                step,
                iteration,
                approver,
                server,
            } => {
                cli::Client::new(&server.server, server.api_key)?
                    .approve(&target, choice, step, iteration, approver)
                    .await
            }
            #[cfg(feature = "aws")]
            Command::Sync {
                infra,
                connections,
                by,
            } => riposte::sync::run(&infra, &connections, &by).await,
            Command::Test {
                playbook,
                event,
                choice,
                connections,
                responses,
            } => {
                dry::run(
                    &playbook,
                    &event,
                    choice,
                    &connections,
                    responses.as_deref(),
                )
                .await
            }
        }
    })
}
