//! The Lambda functions' handlers. Each function's `main.rs` builds its clients once and hands
//! events to one of these; all behaviour is the [`Service`]'s, the same the local runtime calls.
//!
//! Guarantee: a step message is acknowledged only when the service handled it (or found it
//! stale); a message that fails is reported as a batch item failure, so SQS redelivers only it,
//! never its neighbours; on its last allowed receive its run is marked failed with the reason
//! before SQS moves it to the dead-letter queue.

use std::sync::Arc;

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use axum::http::HeaderMap;
use serde_json::Value;

use riposte_api::{Authenticator, Principal, Role};
use riposte_aws::{DynamoStore, SecretsManagerSecrets};
use riposte_core::approval::Signer;
use riposte_core::connector::{Connections, ConnectorCatalog};
use riposte_core::engine::Worker;
use riposte_core::model::AlertKind;
use riposte_core::ports::{Clock, HttpSender, IdSource};
use riposte_core::service::{Config, Deps, Error, Handled, Service};
use riposte_http::{EgressPolicy, ReqwestSender};
use riposte_system::{OsIds, SystemClock};

/// How long a warm function trusts its cached rules.
pub const RULES_CACHE_MS: i64 = 5_000;

/// Everything a function needs, built once at init from its environment: `RIPOSTE_TABLE`,
/// `RIPOSTE_QUEUE_URL`, `RIPOSTE_RETENTION_DAYS`, `RIPOSTE_PUBLIC_URL` (where approval links
/// point), `RIPOSTE_APPROVAL_KEY` (at least 32 characters), `RIPOSTE_CONNECTIONS` (the
/// connections YAML), `RIPOSTE_GUARDS` (the guards YAML: never-touch list and rate caps),
/// `RIPOSTE_CONNECTORS` (user connector declarations), `RIPOSTE_SECRET_PREFIX` (default `riposte/`: connection secrets are read
/// from Secrets Manager under it). The AWS SDK's configuration is loaded once and shared.
pub async fn from_env() -> Result<(Arc<Service>, Arc<DynamoStore>), String> {
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let config = riposte_aws::AwsConfig::from_env().map_err(|e| e.to_string())?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = Arc::new(DynamoStore::new(
        aws_sdk_dynamodb::Client::new(&sdk),
        aws_sdk_sqs::Client::new(&sdk),
        config,
        clock.clone(),
    ));
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let prefix = var("RIPOSTE_SECRET_PREFIX").unwrap_or_else(|| "riposte/".into());
    let secrets = Arc::new(SecretsManagerSecrets::new(
        aws_sdk_secretsmanager::Client::new(&sdk),
        &prefix,
        clock.clone(),
    ));
    let key = var("RIPOSTE_APPROVAL_KEY").ok_or("RIPOSTE_APPROVAL_KEY is not set")?;
    let connections = match var("RIPOSTE_CONNECTIONS") {
        Some(yaml) => {
            Connections::parse(&yaml, Some("RIPOSTE_CONNECTIONS")).map_err(|p| p.to_string())?
        }
        None => Connections::default(),
    };
    // Only a test deployment sets this (HTTP stand-ins on 127.0.0.1): it allows loopback, private
    // and plain-http targets.
    let egress = if var("RIPOSTE_ALLOW_PRIVATE_EGRESS").is_some_and(|v| v == "true") {
        EgressPolicy::permissive_for_tests()
    } else {
        EgressPolicy::strict()
    };
    let http = Arc::new(ReqwestSender::new(secrets, egress));
    let mut catalog = ConnectorCatalog::shipped();
    if let Some(yaml) = var("RIPOSTE_CONNECTORS") {
        // User connectors: YAML documents separated by `---`.
        for (i, doc) in yaml.split("\n---").enumerate() {
            if !doc.trim().is_empty() {
                catalog
                    .add(doc, Some(&format!("RIPOSTE_CONNECTORS[{i}]")))
                    .map_err(|p| p.to_string())?;
            }
        }
    }
    let guards = match var("RIPOSTE_GUARDS") {
        Some(yaml) => Some(
            riposte_core::guard::Guards::parse(&yaml, Some("RIPOSTE_GUARDS"), &catalog)
                .map_err(|p| p.to_string())?,
        ),
        None => None,
    };
    let mut connections = connections;
    connections.allow_any_host = egress.allow_private;
    let service = service_with(
        store.clone(),
        &key,
        connections,
        catalog,
        var("RIPOSTE_PUBLIC_URL").unwrap_or_default(),
        http,
        clock,
    )?;
    if let Some(g) = guards {
        service.set_guards(g);
    }
    // Warm the connection (DNS, TLS) during init, which is not billed per event: one GetItem.
    if let Err(e) = riposte_core::store::Store::get_rule(store.as_ref(), "warm-up").await {
        tracing::warn!(message = "Warming the table connection failed.", error = %e);
    }
    Ok((service, store))
}

/// The service a function runs, from explicit parts (tests build it this way).
pub fn service_with(
    store: Arc<dyn riposte_core::store::Store>,
    approval_key: &str,
    connections: Connections,
    catalog: ConnectorCatalog,
    public_url: String,
    http: Arc<dyn HttpSender>,
    clock: Arc<dyn Clock>,
) -> Result<Arc<Service>, String> {
    if approval_key.len() < 32 {
        return Err("the approval key must be at least 32 characters".into());
    }
    Ok(Arc::new(Service::new(Deps {
        store,
        http,
        clock,
        ids: Arc::new(OsIds),
        signer: Signer::new(approval_key.as_bytes()),
        connections,
        catalog: Arc::new(catalog),
        config: Config {
            public_url,
            rules_cache_ms: RULES_CACHE_MS,
            // Many workers may run at once: a claim is taken over only after its lease.
            worker: Worker {
                id: OsIds.new_id(),
                exclusive: false,
            },
        },
    })))
}

/// An EventBridge event for the alert (or recommendation) function: ingest its own kind only.
///
/// An event that can never be ingested (malformed, of an unknown type, too large) is answered
/// with `{"rejected": reason}` and logged, not returned as an error: EventBridge would retry an
/// error for a day. Only a failure worth retrying (the store unavailable) is an error.
pub async fn on_event(service: &Service, event: &Value, kind: AlertKind) -> Result<Value, Error> {
    match service.ingest_event_of(event, Some(kind)).await {
        Ok(out) => Ok(serde_json::to_value(out).unwrap_or(Value::Null)),
        Err(e @ Error::Unavailable(_)) => Err(e),
        Err(e) => {
            let id = event
                .get("id")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default();
            tracing::warn!(message = "Event rejected.", id = %id, error = %e);
            Ok(serde_json::json!({ "rejected": e.to_string() }))
        }
    }
}

/// The step worker: one SQS batch. `max_receives` is the queue's redrive `maxReceiveCount`;
/// `budget`, the time the invocation has left (see [`remaining`]), bounds the steps carried.
pub async fn on_messages(
    service: &Service,
    event: SqsEvent,
    max_receives: u32,
    budget: Option<std::time::Duration>,
) -> SqsBatchResponse {
    handle_batch(service, event, max_receives, budget, true).await
}

/// [`on_messages`] with each SQS message's step messages handled one after the other, in the
/// order sent, instead of at once: the same outcome, in an order a test can replay (the crash
/// sweep names each store operation by its place).
#[doc(hidden)]
pub async fn on_messages_in_order(
    service: &Service,
    event: SqsEvent,
    max_receives: u32,
    budget: Option<std::time::Duration>,
) -> SqsBatchResponse {
    handle_batch(service, event, max_receives, budget, false).await
}

async fn handle_batch(
    service: &Service,
    event: SqsEvent,
    max_receives: u32,
    budget: Option<std::time::Duration>,
    at_once: bool,
) -> SqsBatchResponse {
    // The messages of a batch are handled at once: the batch then takes as long as its slowest
    // message, never the sum, so one slow vendor cannot run the function out of time.
    let outcomes = futures_util::future::join_all(
        event
            .records
            .into_iter()
            .map(|record| on_message(service, record, max_receives, budget, at_once)),
    )
    .await;
    let mut response = SqsBatchResponse::default();
    response.batch_item_failures = outcomes.into_iter().flatten().collect();
    response
}

/// The time left before an invocation's deadline (milliseconds since the epoch, as the Lambda
/// context gives it).
pub fn remaining(deadline_ms: u64) -> std::time::Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    std::time::Duration::from_millis(deadline_ms).saturating_sub(now)
}

/// The pauses of a message sent ahead of its write, waiting here for that write to land (2.55 s
/// in all) before it goes back to the queue.
const AHEAD_PAUSES_MS: [u64; 6] = [50, 100, 200, 400, 800, 1_000];

/// One SQS message of a batch: `Some(failure)` when it must be delivered again. A bundle's step
/// messages ([`riposte_aws::MAX_BUNDLED`], of one run) are handled at once; when one of them
/// must be delivered again, so is the bundle, and the others then find their work recorded
/// (each handling is safe to repeat) and cost only the read of their run.
async fn on_message(
    service: &Service,
    record: aws_lambda_events::sqs::SqsMessage,
    max_receives: u32,
    budget: Option<std::time::Duration>,
    at_once: bool,
) -> Option<BatchItemFailure> {
    let id = record.message_id.clone().unwrap_or_default();
    let body = record.body.clone().unwrap_or_default();
    let sent = match riposte_aws::parse_sent(&body) {
        Ok(parsed) => parsed,
        Err(e) => {
            // It can never succeed: acknowledge it instead of feeding a retry storm.
            tracing::error!(message = "Unreadable step message dropped.", message_id = %id, error = %e);
            return None;
        }
    };
    let receives: u32 = record
        .attributes
        .get("ApproximateReceiveCount")
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let deadline = budget.map(|b| std::time::Instant::now() + b);
    let handle =
        |(msg, after)| on_step_message(service, msg, after, receives, max_receives, deadline);
    let failed = if at_once {
        futures_util::future::join_all(sent.into_iter().map(handle))
            .await
            .into_iter()
            .any(|again| again)
    } else {
        let mut again = false;
        for one in sent {
            again |= handle(one).await;
        }
        again
    };
    failed.then(|| {
        let mut f = BatchItemFailure::default();
        f.item_identifier = id;
        f
    })
}

/// One step message of an SQS message: `true` when it must be delivered again.
async fn on_step_message(
    service: &Service,
    msg: riposte_core::run::StepMessage,
    after: Option<u64>,
    receives: u32,
    max_receives: u32,
    deadline: Option<std::time::Instant>,
) -> bool {
    // Sent ahead of a write that has not landed yet: most often it lands within milliseconds, so
    // the message waits for it here a little before going back to the queue.
    let left = || deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
    let mut handled = service.handle_sent_ahead(&msg, after, left()).await;
    for pause in AHEAD_PAUSES_MS {
        if !matches!(handled, Ok(Handled::Ahead)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        handled = service.handle_sent_ahead(&msg, after, left()).await;
    }
    let reason = match handled {
        Ok(Handled::Done) => return false,
        Ok(Handled::Retry { reason, .. }) => reason,
        Ok(Handled::Ahead) if receives >= max_receives => {
            // Its write never landed (its writer died, or was refused and wrote again with
            // messages of its own): nothing is owed to it, and its run is not failed.
            tracing::warn!(message = "Step message sent ahead of a write that never landed dropped.", run_id = %msg.run_id, step = %msg.step);
            return false;
        }
        Ok(Handled::Ahead) => "sent ahead of a write that has not landed".to_string(),
        Err(e) => e.to_string(),
    };
    if receives >= max_receives {
        let reason = format!(
            "step `{}` failed on all {max_receives} deliveries: {reason}",
            msg.step
        );
        tracing::error!(message = "Step message goes to the dead-letter queue; its run is failed.", run_id = %msg.run_id, %reason);
        if let Err(e) = service.fail_run(&msg.run_id, &reason).await {
            tracing::error!(message = "Failing the run failed.", run_id = %msg.run_id, error = %e);
        }
    }
    true
}

/// The header the HTTP function sets from API Gateway's verified IAM caller; any value a client
/// sends under this name is removed first.
pub const CALLER_HEADER: &str = "x-riposte-caller";

/// Principals from API Gateway's IAM authorization: the caller ARN as the name; the contributor
/// role for ARNs listed in `RIPOSTE_CONTRIBUTOR_ARNS` (comma-separated, `*` suffix allowed),
/// the operator role for every other caller IAM let through.
pub struct IamCallers {
    contributors: Vec<String>,
}

impl IamCallers {
    pub fn new(contributors: &str) -> IamCallers {
        IamCallers {
            contributors: contributors
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }

    fn is_contributor(&self, arn: &str) -> bool {
        self.contributors.iter().any(|c| match c.strip_suffix('*') {
            Some(prefix) => arn.starts_with(prefix),
            None => arn == c,
        })
    }
}

impl Authenticator for IamCallers {
    fn principal(&self, headers: &HeaderMap) -> Option<Principal> {
        let arn = headers.get(CALLER_HEADER)?.to_str().ok()?.to_string();
        let role = if self.is_contributor(&arn) {
            Role::Contributor
        } else {
            Role::Operator
        };
        Some(Principal { name: arn, role })
    }
}

/// Moves the IAM caller that API Gateway verified into [`CALLER_HEADER`], dropping any forged one.
pub async fn caller_from_context(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use lambda_http::RequestExt;
    req.headers_mut().remove(CALLER_HEADER);
    let arn = match req.request_context_ref() {
        Some(lambda_http::request::RequestContext::ApiGatewayV2(ctx)) => ctx
            .authorizer
            .as_ref()
            .and_then(|a| a.iam.as_ref())
            .and_then(|i| i.user_arn.clone()),
        _ => None,
    };
    if let Some(arn) = arn
        && let Ok(v) = arn.parse()
    {
        req.headers_mut().insert(CALLER_HEADER, v);
    }
    next.run(req).await
}

/// Logs as JSON lines, as CloudWatch reads them.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RIPOSTE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .without_time()
        .try_init();
}

/// The HTTP function's app: the same router `riposte serve` serves, behind API Gateway's IAM
/// authorization (`RIPOSTE_CONTRIBUTOR_ARNS` names the contributors).
pub fn http_app(service: Arc<Service>) -> axum::Router {
    let callers = IamCallers::new(&std::env::var("RIPOSTE_CONTRIBUTOR_ARNS").unwrap_or_default());
    riposte_api::router(riposte_api::AppState {
        service,
        auth: Arc::new(callers),
        slack: riposte_api::slack_from_env(),
        webhooks: riposte_api::webhooks_from_env(),
    })
    .layer(axum::middleware::from_fn(caller_from_context))
}

/// The step queue's `maxReceiveCount` (`RIPOSTE_MAX_RECEIVES`, default 5, as template.yaml sets).
pub fn max_receives() -> u32 {
    std::env::var("RIPOSTE_MAX_RECEIVES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// The whole of the alert and recommendation functions: clients built once, then each
/// EventBridge event handed to [`on_event`] for `kind`.
pub async fn serve_events(kind: AlertKind) -> Result<(), lambda_runtime::Error> {
    init_tracing();
    let (service, _) = from_env().await?;
    lambda_runtime::run(lambda_runtime::service_fn(
        move |event: lambda_runtime::LambdaEvent<Value>| {
            let service = service.clone();
            async move {
                on_event(&service, &event.payload, kind)
                    .await
                    .map_err(|e| lambda_runtime::Error::from(e.to_string()))
            }
        },
    ))
    .await
}
