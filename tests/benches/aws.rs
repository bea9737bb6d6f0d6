//! The AWS numbers, measured: `cargo bench -p riposte-tests --bench aws`.
//!
//! 1. AWS API calls per step, by kind: the reference Block/Ignore playbook (block branch) driven
//!    through the Lambda handlers against moto exactly as `tests/tests/aws_flow.rs` does, every SDK
//!    request counted by an interceptor on the DynamoDB and SQS clients. The SQS calls this harness
//!    makes standing in for Lambda's event source mapping are counted apart.
//! 2. Cost per million runs at us-east-1 list prices, from those counts and the item sizes seen.
//! 3. Function init time (spawn to the first `GET /runtime/invocation/next` on a runtime API stub)
//!    and peak memory (VmHWM) of each function binary already built.
//! 4. Release binary sizes of the functions built in release.
//!
//! Needs `moto_server` (pip install 'moto[server]'). Every server is on 127.0.0.1; every wait is
//! bounded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::{
    AfterDeserializationInterceptorContextRef, BeforeTransmitInterceptorContextRef,
};
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::{ConfigBag, Storable, StoreReplace};
use axum::body::Body;
use axum::http::Request;
use serde_json::{Value, json};
use tower::ServiceExt;

use riposte_aws::{AwsConfig, DynamoStore};
use riposte_core::connector::Connections;
use riposte_core::model::AlertKind;
use riposte_core::run::{Run, RunStatus, StepStatus};
use riposte_core::service::Service;
use riposte_core::store::Store;
use riposte_tests::moto::{Moto, acknowledge, receive_batch};
use riposte_tests::vendors::{SECRETS, Vendors, connections, vendors};
use riposte_tests::{OffsetClock, event, repo, secrets_from, sender, test_connections};

const FUNCTIONS: [&str; 6] = [
    "alert-created",
    "recommendation-created",
    "manual-run",
    "approval-response",
    "step-worker",
    "timer",
];
const APPROVAL_KEY: &str = "test-approval-key-0123456789abcdef";
const PUBLIC_URL: &str = "https://riposte.example.com";

// us-east-1 list prices (DynamoDB on-demand as cut in half in November 2024).
const DDB_PER_MILLION_WRU: f64 = 0.625;
const DDB_PER_MILLION_RRU: f64 = 0.125;
/// Provisioned capacity: per WCU-hour and RCU-hour, and the share of it a table on auto scaling
/// uses (its default target).
const DDB_PER_WCU_HOUR: f64 = 0.000_65;
const DDB_PER_RCU_HOUR: f64 = 0.000_13;
const DDB_PROVISIONED_USE: f64 = 0.70;
const SQS_PER_MILLION_REQUESTS: f64 = 0.40;
const LAMBDA_PER_MILLION_REQUESTS: f64 = 0.20;
const LAMBDA_ARM64_PER_GB_SECOND: f64 = 0.000_013_333_4;
const LAMBDA_MEMORY_GB: f64 = 128.0 / 1024.0;
const SFN_STANDARD_PER_MILLION_TRANSITIONS: f64 = 25.0;
/// API Gateway HTTP APIs, per million requests (the first 300 million a month).
const APIGW_HTTP_PER_MILLION_REQUESTS: f64 = 1.00;
/// A duration to price Lambda compute at, besides the one measured here (vendor APIs are
/// stand-ins on 127.0.0.1 here; real ones answer in hundreds of milliseconds).
const ASSUMED_INVOCATION_MS: f64 = 300.0;

// ---------------------------------------------------------------------------------------------
// Counting every SDK request.

/// One HTTP request the SDK sent (one attempt), with what it sent and what came back.
#[derive(Clone, Debug)]
struct Call {
    who: &'static str,
    phase: &'static str,
    service: String,
    operation: String,
    request: Value,
    request_bytes: usize,
    response: Value,
    status: u16,
}

#[derive(Debug, Default)]
struct Log {
    enabled: AtomicBool,
    phase: Mutex<&'static str>,
    calls: Mutex<Vec<Call>>,
}

impl Log {
    fn phase(&self, p: &'static str) {
        *self.phase.lock().unwrap() = p;
    }
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

/// An SDK interceptor recording every attempt of every operation.
#[derive(Clone, Debug)]
struct Counter {
    who: &'static str,
    log: Arc<Log>,
}

/// What `read_before_transmit` saw, for `read_after_deserialization` (the request is gone then).
#[derive(Clone, Debug)]
struct Sent {
    phase: &'static str,
    service: String,
    operation: String,
    request: Value,
    request_bytes: usize,
}

impl Storable for Sent {
    type Storer = StoreReplace<Self>;
}

impl Intercept for Counter {
    fn name(&self) -> &'static str {
        "riposte-bench-counter"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if !self.log.enabled.load(Ordering::SeqCst) {
            return Ok(());
        }
        let (service, operation) = cfg
            .load::<Metadata>()
            .map(|m| (m.service().to_string(), m.name().to_string()))
            .unwrap_or_else(|| ("?".into(), "?".into()));
        let bytes = context.request().body().bytes().unwrap_or_default();
        let sent = Sent {
            phase: *self.log.phase.lock().unwrap(),
            service,
            operation,
            request: serde_json::from_slice(bytes).unwrap_or(Value::Null),
            request_bytes: bytes.len(),
        };
        cfg.interceptor_state().store_put(sent);
        Ok(())
    }

    fn read_after_deserialization(
        &self,
        context: &AfterDeserializationInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let Some(sent) = cfg.load::<Sent>().cloned() else {
            return Ok(());
        };
        let response = context.response();
        let body = response.body().bytes().unwrap_or_default();
        self.log.calls.lock().unwrap().push(Call {
            who: self.who,
            phase: sent.phase,
            service: sent.service,
            operation: sent.operation,
            request: sent.request,
            request_bytes: sent.request_bytes,
            response: serde_json::from_slice(body).unwrap_or(Value::Null),
            status: response.status().as_u16(),
        });
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// DynamoDB item sizes and capacity units (as DynamoDB documents them: attribute names plus
// values; numbers about one byte per two digits; 1 WRU per KB written, 1 RRU per 4 KB read
// strongly consistent, half that eventually consistent, twice that in a transaction).

fn value_size(v: &Value) -> usize {
    let Some((kind, inner)) = v.as_object().and_then(|o| o.iter().next()) else {
        return 0;
    };
    match kind.as_str() {
        "S" => inner.as_str().map_or(0, str::len),
        "N" => inner.as_str().map_or(0, |n| n.len().div_ceil(2) + 1),
        "B" => inner.as_str().map_or(0, |b| b.len() * 3 / 4),
        "BOOL" | "NULL" => 1,
        "SS" | "NS" | "BS" => inner.as_array().map_or(0, |a| {
            a.iter()
                .map(|x| x.as_str().map_or(0, str::len))
                .sum::<usize>()
        }),
        "M" => {
            3 + inner.as_object().map_or(0, |m| {
                m.iter()
                    .map(|(k, x)| k.len() + value_size(x) + 1)
                    .sum::<usize>()
            })
        }
        "L" => {
            3 + inner
                .as_array()
                .map_or(0, |a| a.iter().map(|x| value_size(x) + 1).sum::<usize>())
        }
        _ => 0,
    }
}

fn item_size(item: &Value) -> usize {
    item.as_object()
        .map_or(0, |m| m.iter().map(|(k, v)| k.len() + value_size(v)).sum())
}

fn item_key(item: &Value) -> String {
    let s = |name: &str| item[name]["S"].as_str().unwrap_or_default().to_string();
    format!("{}|{}", s("pk"), s("sk"))
}

fn wru(bytes: usize) -> f64 {
    bytes.div_ceil(1024).max(1) as f64
}

fn rru(bytes: usize, consistent: bool) -> f64 {
    let units = bytes.div_ceil(4096).max(1) as f64;
    if consistent { units } else { units / 2.0 }
}

/// One item a write request wrote (or checked, in a transaction).
#[derive(Debug)]
struct Written {
    call: usize,
    key: String,
    kind: &'static str,
    /// The item's size as sent (puts only).
    put_size: Option<usize>,
    /// The item as sent (puts only).
    put_item: Option<Value>,
    conditional: bool,
    transactional: bool,
    /// The request sets or removes the gsi1 key.
    touches_gsi1: bool,
    /// The request removes the gsi3 key (a superseded version's wake).
    touches_gsi3: bool,
}

fn written_items(index: usize, call: &Call) -> Vec<Written> {
    let one = |kind: &'static str, body: &Value, transactional: bool| {
        let put_size = (kind == "Put").then(|| item_size(&body["Item"]));
        let key_source = if kind == "Put" {
            &body["Item"]
        } else {
            &body["Key"]
        };
        Written {
            call: index,
            key: item_key(key_source),
            kind,
            put_size,
            put_item: (kind == "Put").then(|| body["Item"].clone()),
            conditional: body.get("ConditionExpression").is_some(),
            transactional,
            touches_gsi1: body.to_string().contains("gsi1pk"),
            touches_gsi3: body.to_string().contains("gsi3pk"),
        }
    };
    match call.operation.as_str() {
        "PutItem" => vec![one("Put", &call.request, false)],
        "UpdateItem" => vec![one("Update", &call.request, false)],
        "DeleteItem" => vec![one("Delete", &call.request, false)],
        "TransactWriteItems" => call.request["TransactItems"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|t| {
                        let (kind, body) = t.as_object()?.iter().next()?;
                        let kind = match kind.as_str() {
                            "Put" => "Put",
                            "Update" => "Update",
                            "Delete" => "Delete",
                            _ => "ConditionCheck",
                        };
                        Some(one(kind, body, true))
                    })
                    .collect()
            })
            .unwrap_or_default(),
        "BatchWriteItem" => call.request["RequestItems"]
            .as_object()
            .map(|tables| {
                tables
                    .values()
                    .flat_map(|reqs| reqs.as_array().cloned().unwrap_or_default())
                    .filter_map(|r| {
                        if let Some(p) = r.get("PutRequest") {
                            Some(one("Put", p, false))
                        } else {
                            r.get("DeleteRequest").map(|d| one("Delete", d, false))
                        }
                    })
                    .collect()
            })
            .unwrap_or_default(),
        _ => vec![],
    }
}

/// What one read request returned.
struct Read {
    /// (key, size) of each item returned.
    found: Vec<(String, usize)>,
    /// Read request units it cost.
    units: f64,
    /// Keys asked for.
    keys: usize,
}

/// The items a read returned and what it cost (`None`: not a read).
fn read_items(call: &Call) -> Option<Read> {
    let consistent = |v: &Value| v["ConsistentRead"].as_bool().unwrap_or(false);
    let sized = |items: &[Value]| -> Vec<(String, usize)> {
        items.iter().map(|i| (item_key(i), item_size(i))).collect()
    };
    match call.operation.as_str() {
        "GetItem" => {
            let items: Vec<Value> = call.response.get("Item").cloned().into_iter().collect();
            let found = sized(&items);
            let bytes = found.iter().map(|f| f.1).sum();
            Some(Read {
                found,
                units: rru(bytes, consistent(&call.request)),
                keys: 1,
            })
        }
        "Query" | "Scan" => {
            let items = call.response["Items"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let found = sized(&items);
            let bytes = found.iter().map(|f| f.1).sum();
            Some(Read {
                found,
                units: rru(bytes, consistent(&call.request)),
                keys: 1,
            })
        }
        "BatchGetItem" => {
            let mut found = Vec::new();
            let mut units = 0.0;
            let mut keys = 0;
            for (table, req) in call.request["RequestItems"]
                .as_object()
                .cloned()
                .unwrap_or_default()
            {
                keys += req["Keys"].as_array().map_or(0, Vec::len);
                let items = call.response["Responses"][&table]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                for (k, size) in sized(&items) {
                    units += rru(size, consistent(&req));
                    found.push((k, size));
                }
            }
            Some(Read { found, units, keys })
        }
        _ => None,
    }
}

/// Write units of every write, from the item sizes seen before and after it (an update costs the
/// larger of the item before and after; each index whose key the item has costs its projected
/// size again).
struct WriteCost {
    base: f64,
    gsi: f64,
    /// The size the write is billed at: the larger of the item before and after it.
    bytes: usize,
}

fn write_costs(
    calls: &[Call],
    writes: &[Written],
    final_items: &BTreeMap<String, Value>,
) -> Vec<WriteCost> {
    // Every time an item's size was seen, in call order (puts, and items reads returned).
    let mut seen: BTreeMap<String, Vec<(usize, usize)>> = BTreeMap::new();
    for (i, call) in calls.iter().enumerate() {
        if let Some(read) = read_items(call) {
            for (k, size) in read.found {
                seen.entry(k).or_default().push((i, size));
            }
        }
    }
    for w in writes {
        if let Some(size) = w.put_size {
            seen.entry(w.key.clone()).or_default().push((w.call, size));
        }
    }
    // Every time an item's whole content was seen, in call order: base-table reads (an index
    // returns only its projection) and puts.
    let mut known: BTreeMap<String, Vec<(usize, Value)>> = BTreeMap::new();
    for (i, call) in calls.iter().enumerate() {
        if call.request.get("IndexName").is_some() {
            continue;
        }
        let items: Vec<Value> = match call.operation.as_str() {
            "GetItem" => call.response.get("Item").cloned().into_iter().collect(),
            "Query" => call.response["Items"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
            _ => vec![],
        };
        for item in items {
            known.entry(item_key(&item)).or_default().push((i, item));
        }
    }
    for w in writes {
        if let Some(item) = &w.put_item {
            known
                .entry(w.key.clone())
                .or_default()
                .push((w.call, item.clone()));
        }
    }
    for obs in known.values_mut() {
        obs.sort_by_key(|(i, _)| *i);
    }
    // An update that clears an outbox removes gsi1's key, one that takes a superseded version
    // out of the wake index gsi3's: the item as it stands after it.
    for w in writes
        .iter()
        .filter(|w| w.kind == "Update" && (w.touches_gsi1 || w.touches_gsi3))
    {
        let Some(obs) = known.get_mut(&w.key) else {
            continue;
        };
        let Some((_, last)) = obs.iter().rfind(|(i, _)| *i < w.call) else {
            continue;
        };
        let mut after = last.clone();
        if let Some(m) = after.as_object_mut() {
            let removed: &[&str] = if w.touches_gsi1 {
                &["gsi1pk", "gsi1sk", "outbox", "outbox_id"]
            } else {
                &["gsi3pk", "gsi3sk"]
            };
            for attr in removed {
                m.remove(*attr);
            }
        }
        obs.push((w.call, after));
        obs.sort_by_key(|(i, _)| *i);
    }
    writes
        .iter()
        .map(|w| {
            let obs = seen.get(&w.key).cloned().unwrap_or_default();
            let before = obs
                .iter()
                .filter(|(i, _)| *i < w.call)
                .map(|o| o.1)
                .next_back()
                .unwrap_or(0);
            let after = w.put_size.unwrap_or_else(|| {
                obs.iter()
                    .find(|(i, _)| *i > w.call)
                    .map(|o| o.1)
                    .or_else(|| final_items.get(&w.key).map(item_size))
                    .unwrap_or(before)
            });
            let size = before.max(after);
            let factor = if w.transactional { 2.0 } else { 1.0 };
            let base = factor * wru(size);
            if w.kind == "ConditionCheck" {
                return WriteCost {
                    base,
                    gsi: 0.0,
                    bytes: size,
                };
            }
            // Each index bills its own copy, at the size of what it projects (the keys plus its
            // INCLUDE attributes, riposte_aws::table, none for gsi2; never the run body), and only
            // when that copy changes: put into the index (1 write), removed from it (1), its index
            // key changed (2: a delete and a put), or a projected attribute changed (1); a write
            // that changes nothing the index holds costs the index nothing (the developer guide's
            // "Global secondary indexes: writes").
            let before_item = known
                .get(&w.key)
                .and_then(|obs| obs.iter().rfind(|(i, _)| *i < w.call))
                .map(|(_, item)| item.clone());
            let mut gsi = 0.0;
            for (pk, sk, attrs) in [
                ("gsi1pk", "gsi1sk", riposte_aws::table::GSI1_ATTRIBUTES),
                ("gsi2pk", "gsi2sk", riposte_aws::table::GSI2_ATTRIBUTES),
                ("gsi3pk", "gsi3sk", riposte_aws::table::GSI3_ATTRIBUTES),
            ] {
                let view = |item: &Option<Value>| -> Option<Value> {
                    let m = item.as_ref()?.as_object()?;
                    m.get(pk)?;
                    Some(Value::Object(
                        m.iter()
                            .filter(|(k, _)| {
                                ["pk", "sk", pk, sk].contains(&k.as_str())
                                    || attrs.contains(&k.as_str())
                            })
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                    ))
                };
                let size = |v: &Value| {
                    v.as_object().map_or(0, |m| {
                        m.iter()
                            .map(|(k, x)| k.len() + value_size(x))
                            .sum::<usize>()
                    })
                };
                let before = view(&before_item);
                let after = match w.kind {
                    "Put" => view(&w.put_item),
                    "Delete" => None,
                    // The store's updates of an indexed item only remove gsi1's key (clearing
                    // an outbox) or gsi3's (a superseded wake); any other update leaves the
                    // indexes as they were.
                    _ if pk == "gsi1pk" && w.touches_gsi1 => None,
                    _ if pk == "gsi3pk" && w.touches_gsi3 => None,
                    _ => before.clone(),
                };
                gsi += factor
                    * match (&before, &after) {
                        (None, None) => 0.0,
                        (None, Some(a)) => wru(size(a)),
                        (Some(b), None) => wru(size(b)),
                        (Some(b), Some(a)) if b[pk] != a[pk] || b[sk] != a[sk] => {
                            wru(size(b)) + wru(size(a))
                        }
                        (Some(b), Some(a)) if b != a => wru(size(a)),
                        _ => 0.0,
                    };
            }
            WriteCost {
                base,
                gsi,
                bytes: size,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The Block/Ignore run through the handlers, as tests/tests/aws_flow.rs drives it.

struct Aws {
    moto: Moto,
    log: Arc<Log>,
    /// Each function's own service over its own store (as deployed: caches are per function).
    alert: Arc<Service>,
    worker: Arc<Service>,
    approval: Arc<Service>,
    timer: Arc<DynamoStore>,
    /// The harness's view of the table: nothing counts it, and its reads warm no function.
    harness: Arc<DynamoStore>,
    clock: Arc<OffsetClock>,
    /// The harness's own SQS client: Lambda's event source mapping stands in as this.
    esm: aws_sdk_sqs::Client,
    /// Clients nothing counts (setup, the final table scan).
    plain_dynamo: aws_sdk_dynamodb::Client,
    queue: String,
    /// Per Lambda invocation: (function, records handed over, handler wall time).
    invocations: Mutex<Vec<(&'static str, usize, Duration)>>,
    receives: Mutex<(usize, usize)>,
    /// Step messages the step worker was handed (an SQS message may bundle several).
    step_messages: Mutex<usize>,
}

async fn aws(v: &Vendors) -> Aws {
    let moto = Moto::start().await;
    let sdk = moto.sdk().await;
    let log = Arc::new(Log::default());
    let counted = |who: &'static str| Counter {
        who,
        log: log.clone(),
    };
    let dynamo = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&sdk)
            .interceptor(counted("functions"))
            .build(),
    );
    let sqs = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::config::Builder::from(&sdk)
            .interceptor(counted("functions"))
            .build(),
    );
    let esm = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::config::Builder::from(&sdk)
            .interceptor(counted("event source mapping"))
            .build(),
    );
    let plain_dynamo = aws_sdk_dynamodb::Client::new(&sdk);
    riposte_aws::create_table(&plain_dynamo, "riposte")
        .await
        .unwrap();
    let queue = aws_sdk_sqs::Client::new(&sdk)
        .create_queue()
        .queue_name("riposte-steps")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let clock = Arc::new(OffsetClock::default());
    let config = AwsConfig {
        table: "riposte".into(),
        queue_url: queue.clone(),
        retention_days: 90,
    };
    let function_store = || {
        Arc::new(DynamoStore::new(
            dynamo.clone(),
            sqs.clone(),
            config.clone(),
            clock.clone(),
        ))
    };
    let service_over = |store: Arc<DynamoStore>| {
        riposte_lambda::service_with(
            store,
            APPROVAL_KEY,
            test_connections(Connections::parse(&connections(v), None).unwrap()),
            riposte_core::connector::ConnectorCatalog::shipped(),
            PUBLIC_URL.into(),
            sender(secrets_from(SECRETS)),
            clock.clone(),
        )
        .unwrap()
    };
    let harness = Arc::new(DynamoStore::new(
        plain_dynamo.clone(),
        aws_sdk_sqs::Client::new(&sdk),
        config.clone(),
        clock.clone(),
    ));
    let admin = service_over(harness.clone());
    let (playbooks, rules) = riposte::runtime::read_infra(&repo().join("infra")).unwrap();
    for (_, p) in playbooks {
        admin.put_playbook(p, "deploy").await.unwrap();
    }
    for (_, r) in rules {
        admin.put_rule(r, "deploy").await.unwrap();
    }
    Aws {
        moto,
        log,
        alert: service_over(function_store()),
        worker: service_over(function_store()),
        approval: service_over(function_store()),
        timer: function_store(),
        harness,
        clock,
        esm,
        plain_dynamo,
        queue,
        invocations: Mutex::new(Vec::new()),
        receives: Mutex::new((0, 0)),
        step_messages: Mutex::new(0),
    }
}

impl Aws {
    fn invoked(&self, function: &'static str, records: usize, took: Duration) {
        self.invocations
            .lock()
            .unwrap()
            .push((function, records, took));
    }

    /// Receives what SQS has ready and hands it to the step worker as Lambda's SQS integration
    /// would: deletes what succeeded, leaves failures. Returns how many messages it delivered.
    async fn deliver_ready(&self) -> usize {
        let (messages, event) = receive_batch(&self.esm, &self.queue).await;
        {
            let mut r = self.receives.lock().unwrap();
            if messages.is_empty() {
                r.1 += 1;
            } else {
                r.0 += 1;
            }
        }
        if messages.is_empty() {
            return 0;
        }
        *self.step_messages.lock().unwrap() += messages
            .iter()
            .map(|m| riposte_aws::parse_sent(m.body().unwrap_or_default()).map_or(0, |s| s.len()))
            .sum::<usize>();
        let started = Instant::now();
        let response = riposte_lambda::on_messages(&self.worker, event, 5, None).await;
        self.invoked("step-worker", messages.len(), started.elapsed());
        acknowledge(&self.esm, &self.queue, &messages, &response).await;
        messages.len()
    }

    async fn run(&self, id: &str) -> Run {
        self.harness.load_run(id).await.unwrap().unwrap().0
    }

    /// Delivers messages until the run satisfies `done` (bounded). Reading the run to check is
    /// the harness's business: not counted.
    async fn until(&self, id: &str, what: &str, done: impl Fn(&Run) -> bool) -> Run {
        for _ in 0..300 {
            self.log.enabled.store(false, Ordering::SeqCst);
            let run = self.run(id).await;
            self.log.enabled.store(true, Ordering::SeqCst);
            if done(&run) {
                return run;
            }
            if self.deliver_ready().await == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!(
            "run {id} never became {what}: {}",
            riposte::timeline::render(&self.run(id).await)
        );
    }

    /// The approval link, through the HTTP function's router: GET (the confirm page a person
    /// opens), then the POST the page sends.
    async fn approve(&self, link: &str) -> (u16, u16) {
        let path = link.strip_prefix(PUBLIC_URL).unwrap().to_string();
        let mut statuses = Vec::new();
        for method in ["GET", "POST"] {
            let app = riposte_lambda::http_app(self.approval.clone());
            let req = if method == "GET" {
                Request::get(&path).body(Body::empty()).unwrap()
            } else {
                Request::post(&path)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(Body::from("approver=netadmin%40example.com"))
                    .unwrap()
            };
            let started = Instant::now();
            let resp = app.oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let _ = axum::body::to_bytes(resp.into_body(), 1 << 20).await;
            self.invoked("approval-response", 1, started.elapsed());
            statuses.push(status);
        }
        (statuses[0], statuses[1])
    }

    /// Every item of the table as it stands (not counted).
    async fn scan(&self) -> BTreeMap<String, Value> {
        let mut items = BTreeMap::new();
        let mut start = None;
        for _ in 0..100 {
            let out = self
                .plain_dynamo
                .scan()
                .table_name("riposte")
                .set_exclusive_start_key(start)
                .send()
                .await
                .unwrap();
            for item in out.items.unwrap_or_default() {
                let json = attribute_map_json(&item);
                items.insert(item_key(&json), json);
            }
            start = out.last_evaluated_key;
            if start.is_none() {
                break;
            }
        }
        items
    }
}

/// An SDK item as DynamoDB's JSON (for sizing).
fn attribute_map_json(
    item: &std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>,
) -> Value {
    use aws_sdk_dynamodb::types::AttributeValue as A;
    fn one(v: &A) -> Value {
        match v {
            A::S(s) => json!({"S": s}),
            A::N(n) => json!({"N": n}),
            A::Bool(b) => json!({"BOOL": b}),
            A::Null(_) => json!({"NULL": true}),
            A::B(b) => json!({"B": "x".repeat(b.as_ref().len() * 4 / 3)}),
            A::Ss(s) => json!({"SS": s}),
            A::Ns(s) => json!({"NS": s}),
            A::M(m) => {
                json!({"M": m.iter().map(|(k, v)| (k.clone(), one(v))).collect::<serde_json::Map<_, _>>()})
            }
            A::L(l) => json!({"L": l.iter().map(one).collect::<Vec<_>>()}),
            _ => json!({"NULL": true}),
        }
    }
    Value::Object(item.iter().map(|(k, v)| (k.clone(), one(v))).collect())
}

/// The link for `choice` in the latest approval mail.
fn link(v: &Vendors, choice: &str) -> String {
    let mail = v.email.requests();
    let last = mail.last().expect("an approval mail");
    let text = last.json()["Content"]["Simple"]["Body"]["Text"]["Data"]
        .as_str()
        .unwrap()
        .to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{choice}: ")))
        .unwrap()
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// Part 1 and 2.

struct Tally {
    requests: usize,
    items: usize,
    conditional: usize,
    units: f64,
}

/// The phases a run's requests are logged under: the measured run's, or the first run's, which
/// warms each function (its cold reads are reported apart).
struct Phases {
    alert: &'static str,
    worker: &'static str,
    approval: &'static str,
    timer: &'static str,
}

const MEASURED: Phases = Phases {
    alert: "alert-created",
    worker: "step-worker",
    approval: "approval-response",
    timer: "timer",
};

const COLD: Phases = Phases {
    alert: "cold alert-created",
    worker: "cold step-worker",
    approval: "cold approval-response",
    timer: "cold timer",
};

/// One Block run of the reference playbook through the functions, from GuardDuty finding
/// number `n`; then the timer's tick that passes the waiting version's superseded wake.
async fn block_run(a: &Aws, v: &Vendors, n: u32, phases: &Phases) -> (String, Run) {
    a.log.phase(phases.alert);
    let mut e = event("guardduty-malicious-ip-caller.json");
    if n > 0 {
        e["id"] = json!(format!("c8c4daa7-a20c-2f03-0070-{n:012}"));
        e["detail"]["id"] = json!(format!("finding-{n}"));
    }
    let started = Instant::now();
    let out = riposte_lambda::on_event(&a.alert, &e, AlertKind::Alert)
        .await
        .unwrap();
    a.invoked("alert-created", 1, started.elapsed());
    let id = out["alerts"][0]["runs"][0]
        .as_str()
        .unwrap_or_else(|| panic!("no run started: {out}"))
        .to_string();

    a.log.phase(phases.worker);
    a.until(&id, "waiting", |r| {
        r.status == RunStatus::Waiting && r.step("tell_soc").is_some_and(|s| s.status.is_terminal())
    })
    .await;
    a.log.phase(phases.approval);
    let (page, decided) = a.approve(&link(v, "Block")).await;
    assert_eq!(
        (page, decided),
        (200, 200),
        "the confirm page, then the decision"
    );
    a.log.phase(phases.worker);
    let run = a.until(&id, "finished", |r| r.status.is_terminal()).await;
    // Later, the timer's tick when the waiting version's wake comes due: that version was
    // superseded by the decision, so the timer reads the run once and sends nothing; the entry
    // is left to expire with its item.
    a.log.phase(phases.timer);
    let wake_of_run = |i: &Value| {
        let key = i["gsi3sk"]["S"].as_str()?;
        let (due, run) = key.split_once('#')?;
        (run == id).then(|| due.parse::<i64>().ok()).flatten()
    };
    let due = a
        .scan()
        .await
        .values()
        .filter_map(wake_of_run)
        .min()
        .expect("the waiting version's wake");
    let sent = a
        .timer
        .fire_due_wakes(due + riposte_aws::WAKE_GRACE_MS + 60_000)
        .await
        .unwrap();
    assert_eq!(sent, 0, "a superseded wake sends nothing");
    (id, run)
}

async fn api_calls_and_cost() -> Moto {
    let v = vendors().await;
    let a = aws(&v).await;

    a.log.enabled.store(true, Ordering::SeqCst);
    // The first run after a deployment finds every function cold: it is logged apart.
    block_run(&a, &v, 0, &COLD).await;
    a.invocations.lock().unwrap().clear();
    *a.receives.lock().unwrap() = (0, 0);
    *a.step_messages.lock().unwrap() = 0;
    // The run measured comes ten minutes later, to warm functions whose rules, kill switch and
    // latest playbook versions have expired from their caches (5 s), as at a low, steady volume:
    // only what never changes (a playbook version, compiled) is still cached.
    a.clock.advance(600_000);
    let (id, run) = block_run(&a, &v, 1, &MEASURED).await;
    let firewall_calls = v.panos.requests().len();
    a.log.enabled.store(false, Ordering::SeqCst);
    assert_eq!(
        run.status,
        RunStatus::Succeeded,
        "{}",
        riposte::timeline::render(&run)
    );
    assert_eq!(firewall_calls, 2, "the firewall was called once a run");
    let final_items = a.scan().await;

    // The timer's queries of its index and its marks item are read and written every minute
    // whatever runs exist: a flat cost of the deployment, not of this run (its reading of this
    // run is).
    let (cold_calls, calls): (Vec<Call>, Vec<Call>) = a
        .log
        .calls()
        .into_iter()
        .map(|mut c| {
            let marks =
                c.request["Key"]["pk"]["S"] == "WAKES" || c.request["Item"]["pk"]["S"] == "WAKES";
            if c.phase.ends_with("timer") && (c.request.get("IndexName").is_some() || marks) {
                c.who = "timer tick (flat)";
            }
            c
        })
        .partition(|c| c.phase.starts_with("cold "));
    let invocations = a.invocations.lock().unwrap().clone();
    let (busy_receives, empty_receives) = *a.receives.lock().unwrap();
    let sqs_messages: usize = invocations
        .iter()
        .filter(|i| i.0 == "step-worker")
        .map(|i| i.1)
        .sum();
    let step_messages = *a.step_messages.lock().unwrap();
    let worker_invocations = invocations.iter().filter(|i| i.0 == "step-worker").count();
    let steps_run: Vec<&str> = run
        .steps
        .iter()
        .filter(|s| s.status == StepStatus::Succeeded)
        .map(|s| s.id.as_str())
        .collect();
    let skipped: Vec<&str> = run
        .steps
        .iter()
        .filter(|s| s.status == StepStatus::Skipped)
        .map(|s| s.id.as_str())
        .collect();
    // The run's log: its version items, each a snapshot (`z`) or a patch (`p`), deflated (base64
    // on the wire).
    let versions: Vec<&Value> = final_items
        .range(format!("RUN#{id}|V#")..format!("RUN#{id}|W"))
        .map(|(_, v)| v)
        .collect();
    let body_of = |v: &Value, attr: &str| v[attr]["B"].as_str().map_or(0, |b| b.len() * 3 / 4);
    let snapshots: usize = versions.iter().map(|v| body_of(v, "z")).sum();
    let patches: usize = versions.iter().map(|v| body_of(v, "p")).sum();
    let largest = versions.iter().map(|v| item_size(v)).max().unwrap_or(0);

    if let Some(path) = std::env::var_os("RIPOSTE_BENCH_DUMP_RUN") {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&run).expect("run as JSON"),
        )
        .expect("writing the run");
    }
    println!("# Riposte on AWS: the numbers, measured");
    println!();
    println!("## 1. AWS API calls per step (Block/Ignore playbook, block branch, against moto)");
    println!();
    println!(
        "Run {id}: {} ({} playbook steps succeeded: {}; skipped: {}).",
        format!("{:?}", run.status).to_lowercase(),
        steps_run.len(),
        steps_run.join(", "),
        skipped.join(", ")
    );
    println!(
        "Step messages handled by the step worker: {step_messages}, in {sqs_messages} SQS messages \
         and {worker_invocations} invocations \
         (batches); plus 1 alert-created invocation and 2 approval-response requests (GET the confirm \
         page, POST the decision)."
    );
    println!(
        "Run log at the end: {} version items; bodies deflated: snapshots {snapshots} bytes, \
         patches {patches} bytes; the largest item {largest} bytes as DynamoDB sizes it.",
        versions.len()
    );
    println!();
    println!("Every request, by who sent it, phase, service and operation (attempts, as billed):");
    println!();
    println!(
        "| {:<21} | {:<17} | {:<8} | {:<18} | {:>8} | {:>5} |",
        "sent by", "phase", "service", "operation", "requests", "items"
    );
    println!(
        "|{:-<23}|{:-<19}|{:-<10}|{:-<20}|{:->10}|{:->7}|",
        "", "", "", "", "", ""
    );
    let mut by_op: BTreeMap<(&str, &str, String, String), (usize, usize)> = BTreeMap::new();
    for c in &calls {
        let items = match c.operation.as_str() {
            "TransactWriteItems" => c.request["TransactItems"].as_array().map_or(0, Vec::len),
            "SendMessageBatch" | "DeleteMessageBatch" => {
                c.request["Entries"].as_array().map_or(0, Vec::len)
            }
            "ReceiveMessage" => c.response["Messages"].as_array().map_or(0, Vec::len),
            "BatchGetItem" => read_items(c).map_or(0, |r| r.keys),
            "Query" | "Scan" => c.response["Items"].as_array().map_or(0, Vec::len),
            _ => 1,
        };
        let e = by_op
            .entry((c.who, c.phase, c.service.clone(), c.operation.clone()))
            .or_default();
        e.0 += 1;
        e.1 += items;
    }
    for ((who, phase, service, op), (n, items)) in &by_op {
        println!("| {who:<21} | {phase:<17} | {service:<8} | {op:<18} | {n:>8} | {items:>5} |");
    }
    let failed: Vec<String> = calls
        .iter()
        .filter(|c| c.status >= 400)
        .map(|c| {
            format!(
                "{} {} -> {} {}",
                c.service, c.operation, c.status, c.response["__type"]
            )
        })
        .collect();
    if !failed.is_empty() {
        println!();
        println!(
            "Requests answered with an error (billed all the same): {}",
            failed.join("; ")
        );
    }

    // Units.
    let mut writes = Vec::new();
    for (i, c) in calls.iter().enumerate() {
        if c.service.eq_ignore_ascii_case("dynamodb") {
            writes.extend(written_items(i, c));
        }
    }
    let costs = write_costs(&calls, &writes, &final_items);
    if std::env::var_os("RIPOSTE_BENCH_DETAIL").is_some() {
        println!();
        println!("Every request in order (RIPOSTE_BENCH_DETAIL is set):");
        println!();
        for (i, c) in calls.iter().enumerate() {
            let items: Vec<String> = writes
                .iter()
                .zip(&costs)
                .filter(|(w, _)| w.call == i)
                .map(|(w, cost)| {
                    format!(
                        "{} {}{} {}+{} WRU ({} B)",
                        w.kind,
                        w.key,
                        if w.conditional { " (conditional)" } else { "" },
                        cost.base,
                        cost.gsi,
                        cost.bytes
                    )
                })
                .collect();
            let read = read_items(c)
                .map(|read| {
                    let keys: Vec<String> = read
                        .found
                        .iter()
                        .map(|f| format!("{} {}B", f.0, f.1))
                        .collect();
                    format!("{} RRU [{}]", read.units, keys.join(", "))
                })
                .unwrap_or_default();
            println!(
                "{i:>3} {:<21} {:<17} {:<8} {:<18} {} {}",
                c.who,
                c.phase,
                c.service,
                c.operation,
                items.join("; "),
                read
            );
        }
    }
    let tally = |phase: Option<&str>| {
        let in_phase = |c: &Call| phase.is_none_or(|p| c.phase == p) && c.who == "functions";
        let mut w = Tally {
            requests: 0,
            items: 0,
            conditional: 0,
            units: 0.0,
        };
        let mut gsi = 0.0;
        for (wr, cost) in writes.iter().zip(&costs) {
            if in_phase(&calls[wr.call]) {
                w.items += 1;
                w.conditional += usize::from(wr.conditional);
                w.units += cost.base;
                gsi += cost.gsi;
            }
        }
        w.requests = calls
            .iter()
            .filter(|c| in_phase(c))
            .filter(|c| {
                matches!(
                    c.operation.as_str(),
                    "PutItem"
                        | "UpdateItem"
                        | "DeleteItem"
                        | "TransactWriteItems"
                        | "BatchWriteItem"
                )
            })
            .count();
        let mut r = Tally {
            requests: 0,
            items: 0,
            conditional: 0,
            units: 0.0,
        };
        for c in calls.iter().filter(|c| in_phase(c)) {
            if let Some(read) = read_items(c) {
                r.requests += 1;
                r.items += read.found.len();
                r.units += read.units;
            }
        }
        let sqs = calls
            .iter()
            .filter(|c| in_phase(c) && c.service.eq_ignore_ascii_case("sqs"))
            .count();
        (w, gsi, r, sqs)
    };
    let esm_requests = calls
        .iter()
        .filter(|c| c.who == "event source mapping")
        .count();
    let esm_deletes = calls
        .iter()
        .filter(|c| c.who == "event source mapping" && c.operation.starts_with("DeleteMessage"))
        .count();

    println!();
    println!(
        "| {:<27} | {:>6} | {:>6} | {:>6} | {:>6} | {:>6} | {:>7} | {:>7} | {:>5} | {:>7} |",
        "phase", "writes", "items", "cond.", "WRU", "+GSI", "reads", "RRU", "SQS", "SQS/ESM"
    );
    println!(
        "|{:-<29}|{:->8}|{:->8}|{:->8}|{:->8}|{:->8}|{:->9}|{:->9}|{:->7}|{:->9}|",
        "", "", "", "", "", "", "", "", "", ""
    );
    let esm_busy = busy_receives + esm_deletes;
    for (label, phase, esm) in [
        ("alert-created (ingest)", Some("alert-created"), 0),
        ("step-worker", Some("step-worker"), esm_busy),
        ("approval-response", Some("approval-response"), 0),
        ("timer (wake due later)", Some("timer"), 0),
        ("whole run", None, esm_busy),
    ] {
        let (w, gsi, r, sqs) = tally(phase);
        println!(
            "| {label:<27} | {:>6} | {:>6} | {:>6} | {:>6.0} | {:>6.0} | {:>7} | {:>7.1} | {:>5} | {:>7} |",
            w.requests, w.items, w.conditional, w.units, gsi, r.requests, r.units, sqs, esm
        );
    }
    let (w_worker, _, r_worker, sqs_worker) = tally(Some("step-worker"));
    let (w_all, gsi_all, r_all, sqs_all) = tally(None);
    // Per playbook step run: a step worker carries the steps a step makes ready, so steps and
    // messages differ (the per-message figures are printed too).
    let steps = steps_run.len().max(1) as f64;
    let per = |x: f64| x / steps;
    let per_message = |x: f64| x / step_messages.max(1) as f64;
    // What the same run cost the functions cold (the first run after a deployment or a
    // scale-out): their reads of rules, the kill switch and the playbook, on top of the run's.
    let reads_of = |calls: &[Call], phase: &str| -> (usize, f64) {
        calls
            .iter()
            .filter(|c| c.who == "functions" && c.phase == phase)
            .filter_map(read_items)
            .fold((0, 0.0), |(n, u), r| (n + 1, u + r.units))
    };
    let cold: Vec<String> = [COLD.alert, COLD.worker, COLD.approval]
        .iter()
        .zip([MEASURED.alert, MEASURED.worker, MEASURED.approval])
        .map(|(cold, warm)| {
            let (cn, cu) = reads_of(&cold_calls, cold);
            let (wn, wu) = reads_of(&calls, warm);
            let more = cn.saturating_sub(wn);
            let reads = if more == 1 { "read" } else { "reads" };
            format!("{warm} {more} more {reads} ({:.1} RRU)", cu - wu)
        })
        .collect();
    println!();
    println!(
        "The figures are of warm functions whose 5 s caches of rules, the kill switch and the \
         latest playbook versions have expired (a run ten minutes after the one before). Cold, \
         the first run after a deployment or a scale-out costs: {}.",
        cold.join(", ")
    );
    println!();
    println!(
        "Per message ({step_messages} handled): step worker alone: {:.2} conditional writes, {:.2} reads, \
         {:.2} SQS requests.",
        per_message(w_worker.conditional as f64),
        per_message(r_worker.requests as f64),
        per_message(sqs_worker as f64),
    );
    println!(
        "Per playbook step ({} run): step worker alone: {:.2} conditional writes, {:.2} \
         reads (GetItem/Query/BatchGetItem requests), {:.2} SQS requests; whole run (ingest and \
         approval included): {:.2} conditional writes ({:.2} write requests), {:.2} reads, {:.2} SQS \
         requests.",
        steps_run.len(),
        per(w_worker.conditional as f64),
        per(r_worker.requests as f64),
        per(sqs_worker as f64),
        per(w_all.conditional as f64),
        per(w_all.requests as f64),
        per(r_all.requests as f64),
        per(sqs_all as f64),
    );
    let verdict = |ok: bool| if ok { "meets" } else { "MISSES" };
    println!(
        "Targets (per step, on average): <= 1 conditional write: {} ({:.2}); <= 1 read: {} ({:.2}); \
         <= 1.2 SQS requests: {} ({:.2}) [step worker alone].",
        verdict(per(w_worker.conditional as f64) <= 1.0),
        per(w_worker.conditional as f64),
        verdict(per(r_worker.requests as f64) <= 1.0),
        per(r_worker.requests as f64),
        verdict(per(sqs_worker as f64) <= 1.2),
        per(sqs_worker as f64),
    );
    println!(
        "Lambda's SQS polling, counted apart (standing in for the event source mapping here): \
         {busy_receives} ReceiveMessage calls that returned messages, {esm_deletes} DeleteMessage \
         calls = {:.2} per playbook step; {empty_receives} empty receives while this harness \
         waited (in production the mapping's long polling is a flat cost per queue, not per run). \
         In production these are SQS requests billed to the account too.",
        per(esm_busy as f64),
    );
    println!(
        "All SQS requests of this harness: {} (functions {sqs_all} + polling {esm_requests}).",
        sqs_all + esm_requests
    );

    // Part 2: cost.
    // At low volume the event source mapping invokes the step worker once per message; this
    // harness batched some (`worker_invocations`): price the larger count.
    let lambda_invocations = (invocations.len() - worker_invocations + sqs_messages) as f64;
    let measured_ms: f64 = invocations
        .iter()
        .map(|i| (i.2.as_secs_f64() * 1000.0).ceil())
        .sum();
    let gb_s = |ms: f64| ms / 1000.0 * LAMBDA_MEMORY_GB;
    let ddb_w = (w_all.units + gsi_all) * DDB_PER_MILLION_WRU;
    let ddb_w_base = w_all.units * DDB_PER_MILLION_WRU;
    let ddb_r = r_all.units * DDB_PER_MILLION_RRU;
    // SQS bills each 64 KB chunk of a request's payload as one request.
    let sqs_billed: usize = calls
        .iter()
        .filter(|c| c.service.eq_ignore_ascii_case("sqs"))
        .filter(|c| {
            c.who == "functions"
                || c.operation != "ReceiveMessage"
                || c.response["Messages"].is_array()
        })
        .map(|c| c.request_bytes.div_ceil(64 * 1024).max(1))
        .sum();
    let largest_sqs = calls
        .iter()
        .filter(|c| c.service.eq_ignore_ascii_case("sqs"))
        .map(|c| c.request_bytes)
        .max()
        .unwrap_or(0);
    let sqs_cost = sqs_billed as f64 * SQS_PER_MILLION_REQUESTS;
    let lambda_req = lambda_invocations * LAMBDA_PER_MILLION_REQUESTS;
    let lambda_gb_measured = gb_s(measured_ms) * LAMBDA_ARM64_PER_GB_SECOND * 1e6;
    let lambda_gb_assumed =
        gb_s(ASSUMED_INVOCATION_MS * lambda_invocations) * LAMBDA_ARM64_PER_GB_SECOND * 1e6;
    let total_measured = ddb_w + ddb_r + sqs_cost + lambda_req + lambda_gb_measured;
    let total_assumed = ddb_w + ddb_r + sqs_cost + lambda_req + lambda_gb_assumed;
    // A million units a second's worth of capacity-hours, at the share auto scaling keeps used.
    let per_million = |per_hour: f64| 1e6 / 3600.0 / DDB_PROVISIONED_USE * per_hour;
    let ddb_provisioned = (w_all.units + gsi_all) * per_million(DDB_PER_WCU_HOUR)
        + r_all.units * per_million(DDB_PER_RCU_HOUR);
    let total_provisioned = total_measured - ddb_w - ddb_r + ddb_provisioned;
    // The approval link's requests reach the HTTP function through API Gateway: billed per
    // request, the same for any engine behind it, so shown beside the engine's bill.
    let api_requests = invocations
        .iter()
        .filter(|i| i.0 == "approval-response")
        .count();
    let apigw = api_requests as f64 * APIGW_HTTP_PER_MILLION_REQUESTS;
    let transitions = steps_run.len() as f64;
    let sfn = transitions * SFN_STANDARD_PER_MILLION_TRANSITIONS;
    println!();
    println!(
        "## 2. Cost per million runs of this {}-step playbook run (us-east-1 list prices)",
        steps_run.len()
    );
    println!();
    println!(
        "Prices: DynamoDB on-demand ${DDB_PER_MILLION_WRU:.2}/M write request units (1 WRU per KB \
         written, x2 in a transaction, each index's projected copy billed again), \
         ${DDB_PER_MILLION_RRU:.2}/M read request units (1 RRU per 4 KB strongly consistent, half \
         eventually consistent); SQS ${SQS_PER_MILLION_REQUESTS:.2}/M requests; Lambda \
         ${LAMBDA_PER_MILLION_REQUESTS:.2}/M requests + ${LAMBDA_ARM64_PER_GB_SECOND}/GB-s (arm64, \
         128 MB); Step Functions Standard ${SFN_STANDARD_PER_MILLION_TRANSITIONS:.2}/M state \
         transitions."
    );
    println!(
        "SQS: the largest request sent was {largest_sqs} bytes (a request is billed per 64 KB \
         chunk); empty receives are left out (a flat cost of the queue's polling, not per run)."
    );
    println!(
        "Units are estimated from the items' sizes seen on the wire (each write at the larger of \
         the item before and after it; each version of the run is a new item, the largest {largest} \
         bytes)."
    );
    println!();
    println!(
        "| {:<60} | {:>12} | {:>9} |",
        "per run", "quantity", "$ per 1M"
    );
    println!("|{:-<62}|{:->14}|{:->11}|", "", "", "");
    println!(
        "| {:<60} | {:>12.0} | {:>9.2} |",
        "DynamoDB write request units, table", w_all.units, ddb_w_base
    );
    println!(
        "| {:<60} | {:>12.0} | {:>9.2} |",
        "DynamoDB write request units, GSI copies (keys and projected attributes)",
        gsi_all,
        gsi_all * DDB_PER_MILLION_WRU
    );
    println!(
        "| {:<60} | {:>12.1} | {:>9.2} |",
        "DynamoDB read request units", r_all.units, ddb_r
    );
    println!(
        "| {:<60} | {:>12} | {:>9.2} |",
        "SQS requests (functions + Lambda's receive/delete)", sqs_billed, sqs_cost
    );
    println!(
        "| {:<60} | {:>12} | {:>9.2} |",
        "Lambda requests (1 alert + 1 per SQS message + 2 approval)",
        lambda_invocations,
        lambda_req
    );
    println!(
        "| {:<60} | {:>12} | {:>9.2} |",
        format!("Lambda GB-s, measured here ({measured_ms:.0} ms in all)"),
        format!("{:.4}", gb_s(measured_ms)),
        lambda_gb_measured
    );
    println!(
        "| {:<60} | {:>12.2} | {:>9.2} |",
        "total, Lambda duration as measured here", "", total_measured
    );
    println!(
        "| {:<60} | {:>12} | {:>9.2} |",
        "API Gateway HTTP API requests (the approval link's GET and POST)", api_requests, apigw
    );
    println!(
        "| {:<60} | {:>12} | {:>9.2} |",
        "total with API Gateway, Lambda duration as measured here",
        "",
        total_measured + apigw
    );
    println!(
        "| {:<60} | {:>12} | {:>9.2} |",
        format!("(Lambda GB-s if every invocation took {ASSUMED_INVOCATION_MS:.0} ms)"),
        format!("{:.4}", gb_s(ASSUMED_INVOCATION_MS * lambda_invocations)),
        lambda_gb_assumed
    );
    println!(
        "| {:<60} | {:>12} | {:>9.2} |",
        format!("total, {ASSUMED_INVOCATION_MS:.0} ms per invocation assumed"),
        "",
        total_assumed
    );
    println!(
        "| {:<60} | {:>12} | {:>9.2} |",
        format!(
            "total, measured durations, table on provisioned capacity ({:.0}% used)",
            DDB_PROVISIONED_USE * 100.0
        ),
        "",
        total_provisioned
    );
    println!(
        "| {:<60} | {:>12.0} | {:>9.2} |",
        "Step Functions Standard: state transitions alone", transitions, sfn
    );
    println!();
    println!(
        "Durations measured here are in-process handler times against moto and vendor stand-ins \
         on 127.0.0.1 ({} invocations, the step worker's in {worker_invocations} batches; priced as \
         one invocation per SQS message, as at low volume). Step Functions Standard at \
         {transitions:.0} transitions per run: ${sfn:.0} per million runs before any Lambda it \
         would call (the issue estimates ~$151 for this playbook); Riposte's bill (DynamoDB, SQS, \
         Lambda): \
         ${total_measured:.2} (measured durations) to ${total_assumed:.2} ({ASSUMED_INVOCATION_MS:.0} \
         ms assumed). On provisioned capacity (${DDB_PER_WCU_HOUR}/WCU-hour, \
         ${DDB_PER_RCU_HOUR}/RCU-hour, kept {:.0}% used by auto scaling: ${:.2}/M WRU, ${:.2}/M \
         RRU), which suits a steady volume rather than alert storms, DynamoDB would cost \
         ${ddb_provisioned:.2} instead of ${:.2}. Totals leave out API Gateway (${apigw:.2} for \
         the approval's {api_requests} requests, the same whatever engine is behind them) unless \
         they say otherwise, and CloudWatch Logs.",
        invocations.len(),
        DDB_PROVISIONED_USE * 100.0,
        per_million(DDB_PER_WCU_HOUR),
        per_million(DDB_PER_RCU_HOUR),
        ddb_w + ddb_r
    );
    a.moto
}

// ---------------------------------------------------------------------------------------------
// Part 3: init time and peak memory.

/// A Lambda runtime API stub: reports when `GET /invocation/next` first arrives, then holds it.
async fn runtime_api() -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<(Instant, String)>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let next_tx = tx.clone();
    let app = axum::Router::new()
        .route(
            "/2018-06-01/runtime/invocation/next",
            axum::routing::get(move || {
                let tx = next_tx.clone();
                async move {
                    let _ = tx.send((Instant::now(), "next".to_string()));
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    axum::http::StatusCode::SERVICE_UNAVAILABLE
                }
            }),
        )
        .route(
            "/2018-06-01/runtime/init/error",
            axum::routing::post(move |body: String| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send((Instant::now(), format!("init error: {body}")));
                    axum::http::StatusCode::ACCEPTED
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, rx)
}

fn vm_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
}

/// One cold start: milliseconds from spawn to the first poll for an event, and VmHWM in KB.
async fn cold_start(
    bin: &Path,
    name: &str,
    env: &[(String, String)],
) -> Result<(f64, u64), String> {
    let (api, mut rx) = runtime_api().await;
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("AWS_LAMBDA_RUNTIME_API", &api)
        .env("AWS_LAMBDA_FUNCTION_NAME", name)
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{name}"))
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "bench")
        .stdin(Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(out.reopen().unwrap());
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
    let first = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
    let result = match first {
        Ok(Some((at, what))) if what == "next" => {
            let ms = at.duration_since(started).as_secs_f64() * 1000.0;
            // Held at the first poll for a moment: whatever init allocated is in the peak.
            tokio::time::sleep(Duration::from_millis(300)).await;
            vm_kb(child.id(), "VmHWM:")
                .map(|kb| (ms, kb))
                .ok_or_else(|| "no /proc status".to_string())
        }
        Ok(Some((_, what))) => Err(what),
        _ => Err(format!(
            "no poll within 30 s: {}",
            std::fs::read_to_string(out.path()).unwrap_or_default()
        )),
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

async fn init_times(moto: &Moto) {
    let sdk = moto.sdk().await;
    let queue = aws_sdk_sqs::Client::new(&sdk)
        .get_queue_url()
        .queue_name("riposte-steps")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let env: Vec<(String, String)> = [
        ("PATH", "/usr/bin:/bin"),
        ("AWS_ENDPOINT_URL", moto.endpoint.as_str()),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("RIPOSTE_TABLE", "riposte"),
        ("RIPOSTE_QUEUE_URL", queue.as_str()),
        ("RIPOSTE_APPROVAL_KEY", APPROVAL_KEY),
        (
            "RIPOSTE_CONNECTIONS",
            &std::fs::read_to_string(repo().join("infra/connections.yaml")).unwrap(),
        ),
        ("RIPOSTE_PUBLIC_URL", PUBLIC_URL),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    println!();
    println!("## 3. Function init time and peak memory");
    println!();
    println!(
        "Each binary spawned with the functions' environment against moto and \
         AWS_LAMBDA_RUNTIME_API pointing at a stub on 127.0.0.1; init = spawn to its first \
         `GET /2018-06-01/runtime/invocation/next` (ready for the first event; includes loading the \
         AWS config and the warm-up GetItem against moto), held there 300 ms, then VmHWM from \
         /proc/PID/status. Five cold starts each. Targets: 40 ms, 32 MB."
    );
    println!();
    println!(
        "| {:<22} | {:<7} | {:>9} | {:>9} | {:>9} | {:>8} | {:<6} |",
        "function", "build", "init p50", "init min", "init max", "peak MB", "target"
    );
    println!(
        "|{:-<24}|{:-<9}|{:->11}|{:->11}|{:->11}|{:->10}|{:-<8}|",
        "", "", "", "", "", "", ""
    );
    let target = target_dir();
    for profile in ["release", "debug"] {
        for name in FUNCTIONS {
            let bin = target.join(profile).join(name);
            if !bin.exists() {
                if profile == "debug" {
                    println!(
                        "| {name:<22} | {profile:<7} | not built: cargo build --workspace --bins |"
                    );
                }
                continue;
            }
            let mut ms = Vec::new();
            let mut peak = 0;
            let mut error = None;
            for _ in 0..5 {
                match cold_start(&bin, name, &env).await {
                    Ok((t, kb)) => {
                        ms.push(t);
                        peak = peak.max(kb);
                    }
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = error {
                println!(
                    "| {name:<22} | {profile:<7} | failed: {} |",
                    e.replace('\n', " ")
                );
                continue;
            }
            ms.sort_by(f64::total_cmp);
            let mb = peak as f64 / 1024.0;
            let ok = ms[ms.len() / 2] <= 40.0 && mb <= 32.0;
            println!(
                "| {name:<22} | {profile:<7} | {:>6.1} ms | {:>6.1} ms | {:>6.1} ms | {mb:>8.1} | {:<6} |",
                ms[ms.len() / 2],
                ms[0],
                ms[ms.len() - 1],
                if ok { "meets" } else { "misses" }
            );
        }
    }
    println!();
    println!(
        "Debug binaries are unoptimized (opt-level 0 for the workspace, 1 for dependencies): their \
         figures overstate a deployed function's; the release rows are the ones to hold to the \
         targets. Build a release one with `cargo build --release -p step-worker`."
    );
}

// ---------------------------------------------------------------------------------------------
// Part 4: sizes.

fn sizes() {
    println!();
    println!("## 4. Release binary size per function");
    println!();
    let target = target_dir().join("release");
    let mut missing = Vec::new();
    println!("| {:<22} | {:>10} |", "function", "MB");
    println!("|{:-<24}|{:->12}|", "", "");
    for name in FUNCTIONS {
        match std::fs::metadata(target.join(name)) {
            Ok(m) => println!(
                "| {name:<22} | {:>10.1} |",
                m.len() as f64 / (1024.0 * 1024.0)
            ),
            Err(_) => missing.push(name),
        }
    }
    if !missing.is_empty() {
        println!();
        println!(
            "Not built in release: {}. Measure with `cargo build --release -p NAME && ls -l \
             target/release/NAME` (the workspace's release profile strips symbols; `cargo lambda \
             build --release --arm64` packages the same binary as `bootstrap`).",
            missing.join(", ")
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let moto = api_calls_and_cost().await;
        init_times(&moto).await;
        drop(moto);
    });
    sizes();
}
