//! Riposte's AWS store: one DynamoDB table for all state, SQS for step messages, tied together
//! without a distributed transaction.
//!
//! Guarantee (the [`Store`] contract, kept across two services): a run write commits the run's
//! new state and the child runs it creates in **one conditional DynamoDB write**: the put of
//! the run's next version item, refused if another writer made that version first (a run is a
//! log of version items, each a snapshot or a patch of the one before: [`runlog`]); then no
//! record changes and the caller gets [`StoreError::Conflict`]. Its step messages go one of two
//! ways:
//!
//! - **Sent ahead**, when every one is due within SQS's 15-minute delay and is for this run or a
//!   child the write creates (nearly always): sent to SQS before the write, each naming the
//!   version the write brings its run to (`after` in the body; [`sent_ahead_of`]), those of one run
//!   bundled in one SQS message ([`MAX_BUNDLED`]). The worker
//!   treats one that finds its run at an older version as ahead, not stale
//!   ([`riposte_core::service::Service::handle_sent_ahead`]): it waits for the write a moment,
//!   then hands it back to the queue, and drops it without failing anything when the queue gives
//!   up on it (its write never landed). A writer that dies between SQS and DynamoDB, or is
//!   refused, leaves only such messages, or ones that find the run as another writer left it and
//!   are stale or current like any duplicate; the write itself is redone by whoever redoes the
//!   work (the step message delivered again, the event Lambda retries, the human answering
//!   again, the approval's expiry). Nothing is left to clear.
//! - **In an outbox** otherwise (a message for another run, a timer due later): the write stores
//!   them as its version item's `outbox`; they are then sent to SQS (or, due more than 15 minutes
//!   out, written as timer items) and only then is the outbox removed, conditioned on its id. A
//!   process that dies in between leaves the outbox on that item, and the next reader
//!   ([`Store::load_run`]), a duplicate [`Store::create_run`], or the timer function's sweep
//!   ([`DynamoStore::flush_stale_outboxes`]) sends it. A reader leaves an outbox younger than
//!   [`OUTBOX_GRACE_MS`] to its writer (most likely still sending it). Later writes do not wait
//!   for it: each version is its own item, so none can overwrite another's outbox.
//!
//! A message the run itself waits for ([`riposte_core::run::Run::wakes`]: an approval's expiry,
//! a wait's end) due more than 15 minutes out is sent neither way: the version item carries the
//! run's earliest wake in an index, written by that same conditional write, and
//! [`DynamoStore::fire_due_wakes`] sends it when due (a superseded version's entry is read once
//! there, and sends nothing). So no message a committed write enqueued is ever lost; one may be
//! sent twice, which the engine treats as stale.
//!
//! The table layout is in [`table`]; create it with [`create_table`].

mod item;
mod outbox;
mod pack;
pub mod runlog;
mod runs;
pub mod secrets;
mod size;
mod store;
pub mod table;

use std::sync::Arc;

use aws_config::BehaviorVersion;

use riposte_core::ports::Clock;
use riposte_core::run::StepMessage;
use riposte_system::SystemClock;

pub use runs::{INPUT_HORIZON_MS, OUTBOX_GRACE_MS, STALE_OUTBOX_MS, WAKE_GRACE_MS};
pub use secrets::SecretsManagerSecrets;
pub use table::{create_table, table_definition};

#[doc(no_inline)]
pub use riposte_core::store::{Store, StoreError};

/// Where the store keeps things.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsConfig {
    /// The DynamoDB table (see [`table`]).
    pub table: String,
    /// The SQS queue the step workers read.
    pub queue_url: String,
    /// How long finished runs and event records are kept (DynamoDB TTL); 0 keeps them forever.
    pub retention_days: u32,
}

/// Retention when `RIPOSTE_RETENTION_DAYS` is not set.
pub const DEFAULT_RETENTION_DAYS: u32 = 90;

/// A configuration that could not be read from the environment.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("environment variable {0} is not set")]
    Missing(&'static str),
    #[error("environment variable {name}={value:?} is not a number of days")]
    Invalid { name: &'static str, value: String },
}

impl AwsConfig {
    /// Reads `RIPOSTE_TABLE`, `RIPOSTE_QUEUE_URL` and `RIPOSTE_RETENTION_DAYS` (default
    /// [`DEFAULT_RETENTION_DAYS`]).
    pub fn from_env() -> Result<AwsConfig, ConfigError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<AwsConfig, ConfigError> {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let required = |name: &'static str| set(name).ok_or(ConfigError::Missing(name));
        let retention_days = match set("RIPOSTE_RETENTION_DAYS") {
            Some(v) => v.trim().parse().map_err(|_| ConfigError::Invalid {
                name: "RIPOSTE_RETENTION_DAYS",
                value: v,
            })?,
            None => DEFAULT_RETENTION_DAYS,
        };
        Ok(AwsConfig {
            table: required("RIPOSTE_TABLE")?,
            queue_url: required("RIPOSTE_QUEUE_URL")?,
            retention_days,
        })
    }
}

/// The DynamoDB + SQS implementation of [`Store`].
pub struct DynamoStore {
    dynamo: aws_sdk_dynamodb::Client,
    sqs: aws_sdk_sqs::Client,
    config: AwsConfig,
    clock: Arc<dyn Clock>,
    /// The run versions this process knows exactly, to write the next as a patch.
    recent: runlog::RecentRuns,
    /// The reads of a run in flight, shared by the callers that want it at once.
    reads: std::sync::Mutex<std::collections::HashMap<String, Arc<runs::SharedRead>>>,
}

impl DynamoStore {
    /// A store over these clients. Time comes only from `clock`.
    pub fn new(
        dynamo: aws_sdk_dynamodb::Client,
        sqs: aws_sdk_sqs::Client,
        config: AwsConfig,
        clock: Arc<dyn Clock>,
    ) -> DynamoStore {
        DynamoStore {
            dynamo,
            sqs,
            config,
            clock,
            recent: runlog::RecentRuns::default(),
            reads: std::sync::Mutex::default(),
        }
    }

    /// The store a Lambda function uses: [`AwsConfig::from_env`], the SDK's default credentials
    /// and region, and the system clock.
    pub async fn from_env() -> Result<DynamoStore, ConfigError> {
        let config = AwsConfig::from_env()?;
        let sdk = aws_config::load_defaults(BehaviorVersion::latest()).await;
        Ok(DynamoStore::new(
            aws_sdk_dynamodb::Client::new(&sdk),
            aws_sdk_sqs::Client::new(&sdk),
            config,
            Arc::new(SystemClock),
        ))
    }

    pub fn config(&self) -> &AwsConfig {
        &self.config
    }
}

/// Reads an SQS message body holding one [`StepMessage`] as JSON (the timer's and an outbox's).
pub fn parse_message(body: &str) -> Result<StepMessage, String> {
    serde_json::from_str(body).map_err(|e| format!("not a step message: {e}"))
}

/// The most step messages one SQS message carries ([`parse_sent`]): a write that makes
/// several steps of its run ready at once (an approval's decision: both branches and the
/// announcement) sends them as one, so the queue bills one send, one receive and one delete,
/// and Lambda one invocation, for all of them. Kept small because the worker handles a body's
/// messages at once: a wide fan-out still spreads over many invocations.
pub const MAX_BUNDLED: usize = 4;

/// Reads an SQS message body written by this store: its step messages, each with the run
/// version it was sent ahead of (its `after`), if it was. The store sends a write's messages
/// before the write, and the worker treats one that finds the run at an older version as
/// ahead, not stale ([`riposte_core::service::Service::handle_sent_ahead`]).
///
/// Two shapes: one [`StepMessage`] as JSON, with `after` when sent ahead; or
/// `{"after": N, "messages": [...]}`, up to [`MAX_BUNDLED`] messages of one run sent ahead of
/// one write.
pub fn parse_sent(body: &str) -> Result<Vec<(StepMessage, Option<u64>)>, String> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Body {
        Bundle {
            after: u64,
            messages: Vec<StepMessage>,
        },
        One {
            #[serde(flatten)]
            msg: StepMessage,
            #[serde(default)]
            after: Option<u64>,
        },
    }
    match serde_json::from_str::<Body>(body) {
        Ok(Body::One { msg, after }) => Ok(vec![(msg, after)]),
        Ok(Body::Bundle { messages, .. }) if messages.is_empty() => {
            Err("not a step message: a bundle of no messages".into())
        }
        Ok(Body::Bundle { after, messages }) => {
            Ok(messages.into_iter().map(|m| (m, Some(after))).collect())
        }
        Err(_) => Err(format!(
            "not a step message: {}",
            serde_json::from_str::<StepMessage>(body)
                .err()
                .map_or_else(|| "unreadable".to_string(), |e| e.to_string())
        )),
    }
}

/// The run version a message body was sent ahead of, if it was (see [`parse_sent`]).
pub fn sent_ahead_of(body: &str) -> Option<u64> {
    parse_sent(body).ok()?.first()?.1
}

/// The body of messages sent ahead of the write that brings their run to version `after`: one
/// message as itself, several (at most [`MAX_BUNDLED`], of one run) as a bundle.
pub(crate) fn body_sent_ahead(msgs: &[&StepMessage], after: u64) -> Result<String, StoreError> {
    let corrupt = |e: serde_json::Error| StoreError::Corrupt(e.to_string());
    if let [msg] = msgs {
        let mut value = serde_json::to_value(msg).map_err(corrupt)?;
        if let Some(fields) = value.as_object_mut() {
            fields.insert("after".into(), after.into());
        }
        return Ok(value.to_string());
    }
    serde_json::to_string(&serde_json::json!({"after": after, "messages": msgs})).map_err(corrupt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use riposte_core::run::MessageKind;

    #[test]
    fn messages_parse_from_their_json() {
        let m = StepMessage {
            run_id: "r".into(),
            step: "s".into(),
            iteration: 2,
            attempt: 3,
            kind: MessageKind::ApprovalExpired,
        };
        assert_eq!(
            parse_message(&serde_json::to_string(&m).unwrap()).unwrap(),
            m
        );
        assert!(parse_message("{\"run_id\": 1}").is_err());
        // Sent ahead of a write, the body names the version; the message is the same.
        let ahead = body_sent_ahead(&[&m], 4).unwrap();
        assert_eq!(parse_message(&ahead).unwrap(), m);
        assert_eq!(parse_sent(&ahead).unwrap(), [(m.clone(), Some(4))]);
        assert_eq!(sent_ahead_of(&ahead), Some(4));
        let plain = serde_json::to_string(&m).unwrap();
        assert_eq!(parse_sent(&plain).unwrap(), [(m.clone(), None)]);
        assert_eq!(sent_ahead_of(&plain), None);
    }

    #[test]
    fn a_bundle_parses_to_its_messages_in_order_each_ahead_of_the_write() {
        let m = |step: &str, kind| StepMessage {
            run_id: "r".into(),
            step: step.into(),
            iteration: 0,
            attempt: 1,
            kind,
        };
        let (a, b) = (
            m("block_ip", MessageKind::Execute),
            m("ask", MessageKind::Announce),
        );
        let body = body_sent_ahead(&[&a, &b], 6).unwrap();
        assert_eq!(
            parse_sent(&body).unwrap(),
            [(a, Some(6)), (b, Some(6))],
            "{body}"
        );
        assert_eq!(sent_ahead_of(&body), Some(6));
        // Not a step message either way: the error says what is wrong.
        let empty = parse_sent(r#"{"after": 6, "messages": []}"#).unwrap_err();
        assert!(empty.contains("no messages"), "{empty}");
        let bad = parse_sent(r#"{"run_id": "r"}"#).unwrap_err();
        assert!(bad.contains("missing field"), "{bad}");
    }

    #[test]
    fn the_configuration_comes_from_three_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let full = AwsConfig::from_vars(env(&[
            ("RIPOSTE_TABLE", "riposte"),
            ("RIPOSTE_QUEUE_URL", "https://sqs.example/q"),
            ("RIPOSTE_RETENTION_DAYS", " 7 "),
        ]))
        .unwrap();
        assert_eq!(
            full,
            AwsConfig {
                table: "riposte".into(),
                queue_url: "https://sqs.example/q".into(),
                retention_days: 7
            }
        );
        let defaults = AwsConfig::from_vars(env(&[
            ("RIPOSTE_TABLE", "riposte"),
            ("RIPOSTE_QUEUE_URL", "https://sqs.example/q"),
        ]))
        .unwrap();
        assert_eq!(defaults.retention_days, DEFAULT_RETENTION_DAYS);
        assert!(matches!(
            AwsConfig::from_vars(env(&[
                ("RIPOSTE_TABLE", "riposte"),
                ("RIPOSTE_QUEUE_URL", " ")
            ])),
            Err(ConfigError::Missing("RIPOSTE_QUEUE_URL"))
        ));
        assert!(matches!(
            AwsConfig::from_vars(env(&[
                ("RIPOSTE_TABLE", "t"),
                ("RIPOSTE_QUEUE_URL", "q"),
                ("RIPOSTE_RETENTION_DAYS", "ninety")
            ])),
            Err(ConfigError::Invalid { .. })
        ));
    }
}
