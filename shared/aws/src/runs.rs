//! Runs, their outbox, and timers.
//!
//! Guarantee: the conditional put in [`DynamoStore::commit_run`] is the only place a run
//! changes state: it adds the item of the next version, refused if that version exists (the
//! run's log: [`crate::runlog`]). Items are never rewritten but to clear their outbox or extend
//! an input's expiry. A write's messages
//! are sent before it when they can be, each naming the version the write brings its run to
//! (`DynamoStore::send_ahead`); the others go in its outbox. An outbox is removed only by
//! [`DynamoStore::flush`], after every one of its messages was accepted by SQS or written as a
//! timer item, and only if it is still the same outbox (its id). A timer item is deleted only
//! after SQS accepted its message.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeValue, Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem,
};
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;

use riposte_core::engine::Effects;
use riposte_core::model::Millis;
use riposte_core::run::{Run, RunStatus, StepMessage};
use riposte_core::store::{RunSummary, StoreError};

use crate::item::{Item, ItemExt, from_json, key, n, names, s, to_json, unavailable, values};
use crate::outbox::{Outbox, queue_delay, unique_token};
use crate::pack::{deflate, inflate};
use crate::runlog::{Chain, Encoded, MAX_CHAIN_AGE_MS, encode, expired};
use crate::size::{
    BODY_TARGET_BYTES, ITEM_OVERHEAD_BYTES, MAX_ITEM_BYTES, MIN_BODY_BYTES, fit_body,
};
use crate::table::{
    GSI1, GSI2, GSI2_RUNS, GSI3, PK_WAKE_MARKS, SHARDS, SK_INPUT, SK_WAKE_MARKS, TTL_ATTRIBUTE,
    VERSION_SK_PREFIX, outbox_gsi1pk, outbox_gsi1sk, pad, run_gsi2sk, run_pk, shard_of, timer_pk,
    timer_sk, version_sk, wake_gsi3pk, wake_gsi3sk, wake_shard_pk,
};
use crate::{DynamoStore, body_sent_ahead};

/// SendMessageBatch takes at most 10 entries.
const SQS_BATCH: usize = 10;
/// Attempts at sending the entries SQS reports as failed in a batch.
const SQS_ATTEMPTS: usize = 3;
/// SendMessageBatch calls in flight at once for one flush.
const SQS_CONCURRENCY: usize = 8;
/// TransactWriteItems takes at most 100 actions.
const MAX_TRANSACT_ITEMS: usize = 100;
/// Pages of one timer shard read per `fire_due_timers` call (100 timers each).
const TIMER_PAGES: usize = 4;
const TIMER_PAGE_SIZE: i32 = 100;
/// How long a claimed timer stays hidden from other firers before it may be fired again.
const TIMER_CLAIM_MS: Millis = 60_000;
/// An outbox older than this (by the store's clock) is presumed left by a writer that died, and
/// a reader or a refused writer sends it; a younger one is left to its writer for a while.
pub const OUTBOX_GRACE_MS: Millis = 5_000;
/// Pauses of a refused writer waiting for a young outbox to be cleared by its writer.
const PATIENCE_MS: [u64; 5] = [50, 100, 200, 400, 800];
/// How long after a waiting run's wake the timer sends it (a wake due within SQS's delay was
/// queued too, and that message is most likely handled by then).
pub const WAKE_GRACE_MS: Millis = 5_000;
/// A run's input item is given its expiry when it is written: its run's retention after a day
/// past the run's last write (its creation, for a run younger than a day), so that a run ending
/// within a day of its creation never writes its input again. An older run extends it at each
/// write, and a run waiting that long with nothing due is written again by the timer once a day
/// to extend it ([`DynamoStore::fire_due_wakes`]). An input thus outlives its run's records by a
/// day at most, and never expires before them.
pub const INPUT_HORIZON_MS: Millis = 86_400_000;
/// A wake the index alone carries is due at least this long after the write that sets it (one
/// due sooner is also queued with SQS's delay), so that it is in the index, which lags its
/// table, well before the timer's sweep passes its time: the sweep reads each stretch of the
/// index once ([`DynamoStore::fire_due_wakes`]).
const MIN_WAKE_LEAD_MS: Millis = crate::outbox::MAX_QUEUE_DELAY_MS;
/// The sweep sends outboxes pending for longer than this.
pub const STALE_OUTBOX_MS: Millis = 60_000;
/// Pages of one outbox shard read per sweep (25 runs each).
const OUTBOX_PAGES: usize = 2;
const OUTBOX_PAGE_SIZE: i32 = 25;
/// Pages read by `list_runs` when filtering on status.
const RUN_LIST_PAGES: usize = 10;
/// Runs whose latest version `list_runs` reads at once.
const LIST_CONCURRENCY: usize = 16;
/// Pages (1 MB each) of a run's partition read at most to find its latest chain.
const LOG_PAGES: usize = 16;

/// What the conditional put of a version item did.
enum Landing {
    Landed,
    /// The item exists (this is it, when DynamoDB returned it).
    Refused(Option<Item>),
    /// A child run with this id exists already; nothing was written.
    ChildExists(String),
}

/// What the conditional write did.
pub(crate) enum Commit {
    /// Written; the outbox (if any) is now to be flushed.
    Done(Option<Outbox>),
    /// The run's condition failed; this is the item as it stands (`None`: there is none).
    Refused(Option<Item>),
    /// A child run with this id exists already; nothing was written.
    ChildExists(String),
}

impl DynamoStore {
    fn epoch_seconds_after_retention(&self, now: Millis) -> Option<i64> {
        (self.config.retention_days > 0)
            .then(|| now / 1000 + i64::from(self.config.retention_days) * 86_400)
    }

    pub(crate) fn expiry(&self, now: Millis) -> Option<AttributeValue> {
        self.epoch_seconds_after_retention(now).map(n)
    }

    /// The expiry a run's input item is given when `run` is written (see [`INPUT_HORIZON_MS`]).
    fn input_expiry(&self, run: &Run) -> Option<AttributeValue> {
        self.expiry(input_base(run).saturating_add(INPUT_HORIZON_MS))
    }

    /// When a run written as `run` must be written again to extend its input's expiry, if it is
    /// waiting with nothing due before then (see [`INPUT_HORIZON_MS`]); never sooner than
    /// [`MIN_WAKE_LEAD_MS`] after the write, as every wake the index alone carries.
    fn input_refresh_at(&self, run: &Run) -> Option<Millis> {
        (self.config.retention_days > 0 && run.status == RunStatus::Waiting).then(|| {
            input_base(run)
                .saturating_add(INPUT_HORIZON_MS)
                .max(run.updated_at.saturating_add(MIN_WAKE_LEAD_MS))
        })
    }

    /// The expiry of every item of a chain whose snapshot was written at `snap_at`: a day after
    /// it, plus the retention (see [`crate::runlog`]).
    fn chain_expiry(&self, snap_at: Millis) -> Option<AttributeValue> {
        self.expiry(snap_at.saturating_add(MAX_CHAIN_AGE_MS))
    }

    /// The version item without its outbox; `body` is its snapshot or patch. A patch item
    /// carries only what changes (billed by the KB, it stays under one); a snapshot also what
    /// does not, and lists the run in the runs index.
    fn run_item(&self, run: &Run, version: u64, body: &Encoded) -> Item {
        let mut item = key(run_pk(&run.id), version_sk(version));
        item.extend(body.attributes());
        item.extend([
            ("version".to_string(), n(version)),
            ("status".to_string(), s(run.status.as_str())),
        ]);
        if body.is_snapshot() {
            item.extend([
                ("id".to_string(), s(&run.id)),
                ("playbook_id".to_string(), s(&run.playbook_id)),
                ("playbook_version".to_string(), n(run.playbook_version)),
                ("created_at".to_string(), n(run.created_at)),
                ("updated_at".to_string(), n(run.updated_at)),
                // Listed by each snapshot, so that a run stays listed as its older chains expire.
                ("gsi2pk".to_string(), s(GSI2_RUNS)),
                ("gsi2sk".to_string(), s(run_gsi2sk(run.created_at, &run.id))),
            ]);
        }
        if let Some(at) = run.finished_at {
            item.insert("finished_at".into(), n(at));
        }
        if let Some(at) = run
            .wakes()
            .iter()
            .map(|w| w.1)
            .chain(self.input_refresh_at(run))
            .min()
        {
            item.insert("gsi3pk".into(), s(wake_gsi3pk(&run.id)));
            item.insert("gsi3sk".into(), s(wake_gsi3sk(at, &run.id)));
        }
        if let Some(at) = self.chain_expiry(body.recent.snap_at) {
            item.insert(TTL_ATTRIBUTE.into(), at);
        }
        item
    }

    /// What a version item stores for `run` at `version`: a patch from what this process knows
    /// of the previous version, or a snapshot.
    fn encode(
        &self,
        run: &Run,
        version: u64,
        body: &str,
        now: Millis,
    ) -> Result<Encoded, StoreError> {
        let json: serde_json::Value = from_json(&format!("run {}", run.id), body)?;
        let prev = version
            .checked_sub(1)
            .and_then(|v| self.recent.at(&run.id, v));
        encode(prev, version, body, json, now)
    }

    /// Sends a write's messages ahead of it when they all can be (`true`): each due within SQS's
    /// delay, and for this run or a child the write creates. Each names the version the write
    /// brings its run to (1 for a child); those of one run due at once go as one SQS message, up
    /// to [`crate::MAX_BUNDLED`] in each. No outbox, so nothing to clear: a writer that dies in
    /// between, or is refused, leaves messages that are ahead of a write that never landed
    /// (dropped when the queue gives up on them) or that find the run as another writer left it
    /// (stale or current, like any duplicate). The write that makes them current is redone by
    /// whoever redoes the work: the step message delivered again, the event Lambda retries, the
    /// human answering again, the approval's expiry. Otherwise (`false`) nothing is sent and the
    /// messages go in the write's outbox.
    async fn send_ahead(
        &self,
        run: &Run,
        version: u64,
        messages: &[(StepMessage, u64)],
        fx: &Effects,
        now: Millis,
    ) -> Result<bool, StoreError> {
        // Grouped by (run, version it is ahead of, delay), in the order they came.
        let mut groups: Vec<(&str, u64, i32, Vec<&StepMessage>)> = Vec::new();
        for (m, delay) in messages {
            let due = now.saturating_add(Millis::try_from(*delay).unwrap_or(Millis::MAX));
            let after = if m.run_id == run.id {
                version
            } else if fx.new_runs.iter().any(|c| c.id == m.run_id) {
                1
            } else {
                return Ok(false);
            };
            let Some(delay) = queue_delay(due, now) else {
                return Ok(false);
            };
            match groups
                .iter_mut()
                .find(|g| g.0 == m.run_id && g.1 == after && g.2 == delay)
            {
                Some(g) => g.3.push(m),
                None => groups.push((&m.run_id, after, delay, vec![m])),
            }
        }
        let mut bodies = Vec::with_capacity(messages.len());
        for (_, after, delay, msgs) in &groups {
            for bundle in msgs.chunks(crate::MAX_BUNDLED) {
                bodies.push((body_sent_ahead(bundle, *after)?, *delay));
            }
        }
        self.send_bodies(&bodies).await?;
        Ok(true)
    }

    /// What a run write sends ahead of itself, sent, and the write not made: a writer
    /// that dies in between (for crash tests). `false`: the messages would go in an outbox.
    pub async fn send_ahead_without_writing(
        &self,
        run: &Run,
        expected: Option<u64>,
        fx: &Effects,
    ) -> Result<bool, StoreError> {
        let now = self.clock.now();
        let messages = to_send(run, fx, now);
        self.send_ahead(run, expected.map_or(1, |v| v + 1), &messages, fx, now)
            .await
    }

    /// Step 1 of the protocol: one conditional write of the run (version + 1, or 1 when
    /// `expected` is `None`), its outbox and its child runs.
    pub(crate) async fn commit_run(
        &self,
        run: &Run,
        expected: Option<u64>,
        fx: &Effects,
    ) -> Result<Commit, StoreError> {
        let now = self.clock.now();
        let version = expected.map_or(1, |v| v + 1);
        // Names this write: the outbox's id, the transaction's idempotency token, and how a
        // refusal is recognised as this very write having landed (an SDK retry after a timeout).
        let token = unique_token();
        let write_id = format!("{version}.{token}");
        let messages = to_send(run, fx, now);
        let ahead = self.send_ahead(run, version, &messages, fx, now).await?;
        let messages = if ahead { vec![] } else { messages };
        let outbox = Outbox::new(write_id.clone(), now, &messages);
        let outbox_json = outbox.as_ref().map(Outbox::to_json).transpose()?;
        let outbox_len = outbox_json.as_ref().map_or(0, String::len);
        let messages_len = messages.len();
        let budget = BODY_TARGET_BYTES.min(
            MAX_ITEM_BYTES.saturating_sub(ITEM_OVERHEAD_BYTES + outbox_len + 2 * run.id.len()),
        );
        if budget < MIN_BODY_BYTES {
            return Err(StoreError::Unavailable(format!(
                "run {}: {} messages in one write ({outbox_len} bytes) leave no room for the run",
                run.id, messages_len
            )));
        }
        if expected.is_none() {
            // Written once, before the run: a run version is never without its input.
            self.put_input(run).await?;
        } else if input_base(run) != run.created_at {
            // A run older than a day: before the write, so that its input never expires first.
            self.expire_input(run).await?;
        }
        let body = fit_body(&without_input(run), budget, now)?;
        let encoded = self.encode(run, version, &body, now)?;
        let mut item = self.run_item(run, version, &encoded);
        item.insert("write_id".into(), s(&write_id));
        if let (Some(ob), Some(json)) = (&outbox, outbox_json) {
            item.extend([
                ("outbox".to_string(), s(json)),
                ("outbox_id".to_string(), s(&ob.id)),
                ("gsi1pk".to_string(), s(outbox_gsi1pk(&run.id))),
                ("gsi1sk".to_string(), s(outbox_gsi1sk(now, &run.id))),
            ]);
        }
        // Until it is known to have landed, this process knows no version of the run exactly;
        // and a read begun after this write must not share one begun before it.
        self.recent.forget(&run.id);
        self.reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&run.id);
        match self.put_version(run, item, &token, fx, now).await? {
            Landing::Landed => {
                self.recent.remember(&run.id, encoded.recent);
                Ok(Commit::Done(outbox))
            }
            Landing::Refused(item) => {
                let commit = self
                    .refused(&run.id, version, &write_id, item, outbox)
                    .await?;
                if matches!(commit, Commit::Done(_)) {
                    self.recent.remember(&run.id, encoded.recent);
                }
                Ok(commit)
            }
            Landing::ChildExists(child) => Ok(Commit::ChildExists(child)),
        }
    }

    /// The conditional put of a version item (with its child runs, in one transaction).
    async fn put_version(
        &self,
        run: &Run,
        item: Item,
        token: &str,
        fx: &Effects,
        now: Millis,
    ) -> Result<Landing, StoreError> {
        // Two writers from the same version race for the same key; one wins.
        let condition = "attribute_not_exists(pk)";
        if fx.new_runs.is_empty() {
            let res = self
                .dynamo
                .put_item()
                .table_name(&self.config.table)
                .set_item(Some(item))
                .condition_expression(condition)
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .send()
                .await;
            return match res {
                Ok(_) => Ok(Landing::Landed),
                Err(e) => match e.as_service_error() {
                    Some(PutItemError::ConditionalCheckFailedException(c)) => {
                        Ok(Landing::Refused(c.item().cloned()))
                    }
                    _ => Err(unavailable(&format!("writing run {}", run.id), e)),
                },
            };
        }

        if 2 * fx.new_runs.len() + 1 > MAX_TRANSACT_ITEMS {
            return Err(StoreError::Unavailable(format!(
                "run {}: {} child runs in one write; DynamoDB takes at most {}",
                run.id,
                fx.new_runs.len(),
                (MAX_TRANSACT_ITEMS - 1) / 2
            )));
        }
        let build = |e: aws_sdk_dynamodb::error::BuildError| StoreError::Corrupt(e.to_string());
        let mut actions = vec![
            TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(&self.config.table)
                        .set_item(Some(item))
                        .condition_expression(condition)
                        .return_values_on_condition_check_failure(
                            ReturnValuesOnConditionCheckFailure::AllOld,
                        )
                        .build()
                        .map_err(build)?,
                )
                .build(),
        ];
        for child in &fx.new_runs {
            actions.push(
                TransactWriteItem::builder()
                    .put(
                        Put::builder()
                            .table_name(&self.config.table)
                            .set_item(Some(self.input_item(child)?))
                            .build()
                            .map_err(build)?,
                    )
                    .build(),
            );
            let body = fit_body(&without_input(child), BODY_TARGET_BYTES, now)?;
            let snapshot = encode(None, 1, &body, serde_json::Value::Null, now)?;
            actions.push(
                TransactWriteItem::builder()
                    .put(
                        Put::builder()
                            .table_name(&self.config.table)
                            .set_item(Some(self.run_item(child, 1, &snapshot)))
                            .condition_expression("attribute_not_exists(pk)")
                            .build()
                            .map_err(build)?,
                    )
                    .build(),
            );
        }
        let res = self
            .dynamo
            .transact_write_items()
            .set_transact_items(Some(actions))
            .client_request_token(token)
            .send()
            .await;
        match res {
            Ok(_) => Ok(Landing::Landed),
            Err(e) => {
                let Some(TransactWriteItemsError::TransactionCanceledException(c)) =
                    e.as_service_error()
                else {
                    return Err(unavailable(&format!("writing run {}", run.id), e));
                };
                let reasons = c.cancellation_reasons();
                let failed = |r: &aws_sdk_dynamodb::types::CancellationReason| {
                    r.code() == Some("ConditionalCheckFailed")
                };
                if let Some(first) = reasons.first()
                    && failed(first)
                {
                    return Ok(Landing::Refused(first.item().cloned()));
                }
                // After the run: each child's input, then the child.
                if let Some(i) = reasons.iter().skip(1).position(failed) {
                    return Ok(Landing::ChildExists(fx.new_runs[i / 2].id.clone()));
                }
                if reasons
                    .iter()
                    .any(|r| r.code() == Some("TransactionConflict"))
                {
                    return Err(StoreError::Conflict(format!(
                        "run {}: a concurrent transaction on the same items",
                        run.id
                    )));
                }
                Err(unavailable(&format!("writing run {}", run.id), e))
            }
        }
    }

    /// A refused run write: `Done` after all if the item is this very write (the SDK retried a
    /// request that had landed), else `Refused` with the item as it stands.
    async fn refused(
        &self,
        run_id: &str,
        version: u64,
        write_id: &str,
        item: Option<Item>,
        outbox: Option<Outbox>,
    ) -> Result<Commit, StoreError> {
        let item = match item {
            Some(i) => Some(i),
            None => self.get_item_at(run_id, &version_sk(version)).await?,
        };
        if item
            .as_ref()
            .is_some_and(|i| i.opt_str("write_id") == Some(write_id))
        {
            return Ok(Commit::Done(outbox));
        }
        Ok(Commit::Refused(item))
    }

    /// Steps 2 and 3 right after a commit. A failure here is not the caller's: the messages are
    /// safe in the outbox and the next reader or the sweep sends them.
    pub(crate) async fn flush_after_commit(&self, run_id: &str, outbox: Option<Outbox>) {
        if let Some(ob) = outbox
            && let Err(error) = self.flush(run_id, &ob).await
        {
            tracing::warn!(
                message = "Outbox left for a later flush.",
                run_id,
                outbox = %ob.id,
                %error
            );
        }
    }

    /// Sees to the outbox pending on the first version of a run whose creation was refused (a
    /// redelivered event: its first creator may have died before sending). `item` is that
    /// version's item as it stood at the refusal (`None`: read it now). An outbox younger than
    /// [`OUTBOX_GRACE_MS`] most likely belongs to a writer still sending it: this waits (about
    /// 1.5 s at most, re-reading) for that writer to clear it, so that its messages are not all
    /// sent twice. One that is older, or still there after the wait, is flushed here.
    pub(crate) async fn flush_refused(
        &self,
        run_id: &str,
        item: Option<Item>,
    ) -> Result<(), StoreError> {
        let sk = version_sk(1);
        let mut item = match item {
            Some(i) => Some(i),
            None => self.get_item_at(run_id, &sk).await?,
        };
        for pause in PATIENCE_MS {
            let Some(ob) = pending_outbox(run_id, item.as_ref())? else {
                return Ok(());
            };
            if self.is_abandoned(&ob) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
            item = self.get_item_at(run_id, &sk).await?;
            if pending_outbox(run_id, item.as_ref())?.map(|o| o.id) != Some(ob.id) {
                // Its writer finished; any outbox there now is another live writer's.
                return Ok(());
            }
        }
        if let Some(ob) = pending_outbox(run_id, item.as_ref())? {
            self.flush(run_id, &ob).await?;
        }
        Ok(())
    }

    /// Whether an outbox is old enough that its writer is presumed dead.
    fn is_abandoned(&self, outbox: &Outbox) -> bool {
        self.clock.now().saturating_sub(outbox.at) >= OUTBOX_GRACE_MS
    }

    /// One item of a run's partition, read strongly.
    pub(crate) async fn get_item_at(
        &self,
        run_id: &str,
        sk: &str,
    ) -> Result<Option<Item>, StoreError> {
        let out = self
            .dynamo
            .get_item()
            .table_name(&self.config.table)
            .set_key(Some(key(run_pk(run_id), sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| unavailable(&format!("reading run {run_id}"), e))?;
        Ok(out.item)
    }

    /// A run and its version: its latest chain applied ([`crate::runlog`]), with its input;
    /// first flushes the pending outboxes whose writer is presumed dead (step 4 of the protocol).
    /// A younger one is left to its writer.
    ///
    /// Reads of one run made at once in this process (the messages of one batch) share one
    /// query: a read joins one in flight, whose result is as current as its own would be. A
    /// write of the run by this process ends the sharing, so that no read begun after that write
    /// is answered with what was read before it.
    pub(crate) async fn read_run(&self, run_id: &str) -> Result<Option<(Run, u64)>, StoreError> {
        let flight = {
            let mut map = self.reads.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(run_id.to_string()).or_default().clone()
        };
        let res = flight
            .get_or_try_init(|| self.read_run_once(run_id))
            .await
            .cloned();
        self.land_read(run_id, &flight);
        res
    }

    /// Ends a shared read of a run (see [`Self::read_run`]), if it is still the one in flight.
    fn land_read(&self, run_id: &str, flight: &Arc<SharedRead>) {
        let mut map = self.reads.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(run_id).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(run_id);
        }
    }

    async fn read_run_once(&self, run_id: &str) -> Result<Option<(Run, u64)>, StoreError> {
        let Some(log) = self.read_log(run_id, true).await? else {
            return Ok(None);
        };
        for ob in &log.outboxes {
            if self.is_abandoned(ob)
                && let Err(error) = self.flush(run_id, ob).await
            {
                // The run is still readable; the sweep sends it later.
                tracing::warn!(message = "Pending outbox not flushed on load.", run_id, outbox = %ob.id, %error);
            }
        }
        Ok(Some((log.run, log.version)))
    }

    /// A run as an eventually consistent read of its log finds it (half the price; it may
    /// miss the latest write for a moment): for showing, never for writing on. Nothing is
    /// flushed or remembered.
    pub(crate) async fn read_run_lagging(
        &self,
        run_id: &str,
    ) -> Result<Option<(Run, u64)>, StoreError> {
        Ok(self
            .read_log(run_id, false)
            .await?
            .map(|log| (log.run, log.version)))
    }

    /// A run as its log stands, without flushing anything (for tests and tools: what a reader
    /// finds), and whether an outbox is pending on any of its items.
    #[doc(hidden)]
    pub async fn peek_run(&self, run_id: &str) -> Result<Option<(Run, u64, bool)>, StoreError> {
        Ok(self
            .read_log(run_id, true)
            .await?
            .map(|l| (l.run, l.version, !l.outboxes.is_empty())))
    }

    /// One query of the run's partition, newest first: its version items (the latest chain is
    /// applied; expired items are left out), then its input. `consistent`: a strongly
    /// consistent read (what writers write on, and remember); otherwise eventually consistent,
    /// at half the price, which may miss the latest write for a moment.
    async fn read_log(&self, run_id: &str, consistent: bool) -> Result<Option<Log>, StoreError> {
        let now = self.clock.now();
        let mut items = Vec::new();
        let mut start = None;
        let mut input = None;
        for _ in 0..LOG_PAGES {
            let out = self
                .dynamo
                .query()
                .table_name(&self.config.table)
                .key_condition_expression("pk = :pk")
                .set_expression_attribute_values(values([(":pk", s(run_pk(run_id)))]))
                .scan_index_forward(false)
                .consistent_read(consistent)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| unavailable(&format!("reading run {run_id}"), e))?;
            for i in out.items.unwrap_or_default() {
                match i.opt_str("sk") {
                    Some(SK_INPUT) => input = Some(i),
                    Some(sk) if sk.starts_with(VERSION_SK_PREFIX) && !expired(&i, now) => {
                        items.push(i);
                    }
                    _ => {}
                }
            }
            start = out.last_evaluated_key;
            if start.is_none() {
                break;
            }
            let versions: Vec<&Item> = items.iter().collect();
            if Chain::latest(run_id, &versions).is_ok_and(|c| c.is_some()) {
                // The rest is older chains, then the input: read on its own.
                input = self.get_item_at(run_id, SK_INPUT).await?;
                break;
            }
        }
        let versions: Vec<&Item> = items.iter().collect();
        let Some(chain) = Chain::latest(run_id, &versions)? else {
            return Ok(None);
        };
        let recent = chain.run_json(run_id)?;
        let version = recent.version;
        let mut run = <Run as serde::Deserialize>::deserialize(&recent.json)
            .map_err(|e| StoreError::Corrupt(format!("run {run_id} version {version}: {e}")))?;
        if consistent {
            self.recent.remember(run_id, recent);
        }
        if let Some(input) = input {
            run.input = from_json(
                &format!("input of run {run_id}"),
                &inflate(
                    &format!("input of run {run_id}"),
                    input.bin(BODY_ATTRIBUTE)?,
                )?,
            )?;
        }
        let mut outboxes = Vec::new();
        for i in &items {
            if let Some(ob) = pending_outbox(run_id, Some(i))? {
                outboxes.push(ob);
            }
        }
        Ok(Some(Log {
            run,
            version,
            outboxes,
        }))
    }

    fn input_item(&self, run: &Run) -> Result<Item, StoreError> {
        let mut item = key(run_pk(&run.id), SK_INPUT);
        item.insert(
            BODY_ATTRIBUTE.into(),
            AttributeValue::B(Blob::new(deflate(&to_json(&run.input)?))),
        );
        if let Some(at) = self.input_expiry(run) {
            item.insert(TTL_ATTRIBUTE.into(), at);
        }
        Ok(item)
    }

    /// Writes a new run's input item, unless it exists (a redelivered event creating the same run
    /// again: the same input, perhaps with its expiry set already).
    async fn put_input(&self, run: &Run) -> Result<(), StoreError> {
        let res = self
            .dynamo
            .put_item()
            .table_name(&self.config.table)
            .set_item(Some(self.input_item(run)?))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.as_service_error(),
                    Some(PutItemError::ConditionalCheckFailedException(_))
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(unavailable(
                &format!("writing the input of run {}", run.id),
                e,
            )),
        }
    }

    /// Gives a run's input item the expiry that `run`, about to be written, calls for (none when
    /// retention is 0).
    async fn expire_input(&self, run: &Run) -> Result<(), StoreError> {
        let run_id = &run.id;
        let Some(at) = self.input_expiry(run) else {
            return Ok(());
        };
        let res = self
            .dynamo
            .update_item()
            .table_name(&self.config.table)
            .set_key(Some(key(run_pk(run_id), SK_INPUT)))
            .update_expression("SET #ttl = :at")
            .condition_expression("attribute_exists(pk)")
            .set_expression_attribute_names(names([("#ttl", TTL_ATTRIBUTE)]))
            .set_expression_attribute_values(values([(":at", at)]))
            .send()
            .await;
        // Refused: a run written before inputs had their own item.
        unless_refused(res, || {
            format!("setting the expiry of the input of run {run_id}")
        })
    }

    /// Steps 2 and 3: sends every message (timers for the far ones), then removes the outbox if
    /// it is still this one.
    pub(crate) async fn flush(&self, run_id: &str, outbox: &Outbox) -> Result<(), StoreError> {
        let now = self.clock.now();
        let mut queue = Vec::new();
        for (i, (msg, due)) in outbox.messages()?.into_iter().enumerate() {
            match queue_delay(due, now) {
                Some(delay) => queue.push((msg, delay)),
                // The timer's id derives from the outbox's, so a repeated flush rewrites it.
                None => {
                    self.put_timer(&msg, due, &format!("{}.{i}", outbox.id))
                        .await?
                }
            }
        }
        self.send(&queue).await?;
        self.clear_outbox(run_id, &outbox.id).await
    }

    async fn clear_outbox(&self, run_id: &str, outbox_id: &str) -> Result<(), StoreError> {
        let res = self
            .dynamo
            .update_item()
            .table_name(&self.config.table)
            .set_key(Some(key(run_pk(run_id), outbox_sk(run_id, outbox_id)?)))
            .update_expression("REMOVE #outbox, #outbox_id, gsi1pk, gsi1sk")
            .condition_expression("#outbox_id = :id")
            .set_expression_attribute_names(names([
                ("#outbox", "outbox"),
                ("#outbox_id", "outbox_id"),
            ]))
            .set_expression_attribute_values(values([(":id", s(outbox_id))]))
            .send()
            .await;
        // Refused: someone else flushed it (and perhaps a later writer committed a new one).
        unless_refused(res, || format!("clearing the outbox of run {run_id}"))
    }

    async fn put_timer(&self, msg: &StepMessage, due: Millis, id: &str) -> Result<(), StoreError> {
        let mut item = key(timer_pk(shard_of(id)), timer_sk(due, id));
        item.extend([
            ("body".to_string(), s(to_json(msg)?)),
            ("run_id".to_string(), s(&msg.run_id)),
            ("due_at".to_string(), n(due)),
        ]);
        self.dynamo
            .put_item()
            .table_name(&self.config.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| unavailable(&format!("writing a timer for run {}", msg.run_id), e))?;
        Ok(())
    }

    /// Sends messages with their delays (seconds), ten per call and up to
    /// [`SQS_CONCURRENCY`] calls at a time; every one is accepted or this fails.
    pub(crate) async fn send(&self, messages: &[(StepMessage, i32)]) -> Result<(), StoreError> {
        let bodies = messages
            .iter()
            .map(|(m, delay)| Ok((to_json(m)?, *delay)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.send_bodies(&bodies).await
    }

    /// [`Self::send`], of message bodies.
    async fn send_bodies(&self, messages: &[(String, i32)]) -> Result<(), StoreError> {
        let mut chunks = messages.chunks(SQS_BATCH);
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            while in_flight.len() < SQS_CONCURRENCY
                && let Some(chunk) = chunks.next()
            {
                let entries = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, (body, delay))| {
                        SendMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .message_body(body)
                            .delay_seconds(*delay)
                            .build()
                            .map_err(|e| StoreError::Corrupt(e.to_string()))
                    })
                    .collect::<Result<Vec<_>, StoreError>>()?;
                in_flight.spawn(send_batch(
                    self.sqs.clone(),
                    self.config.queue_url.clone(),
                    entries,
                ));
            }
            match in_flight.join_next().await {
                None => return Ok(()),
                Some(Ok(Ok(()))) => {}
                // Dropping the set aborts the other calls; the outbox stays and is sent again.
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(e)) => {
                    return Err(StoreError::Unavailable(format!(
                        "sending step messages: {e}"
                    )));
                }
            }
        }
    }

    /// Sends the timers due at `now` (their sort key's time ≤ `now`), each once: a timer is
    /// claimed with a conditional write, sent, then deleted. A firer that dies after claiming
    /// leaves the timer to be fired again after a minute. Reads at most 4 pages of 100 per shard
    /// per call; returns how many it sent.
    ///
    /// The timer function calls this and [`Self::flush_stale_outboxes`] on every tick.
    pub async fn fire_due_timers(&self, now: Millis) -> Result<usize, StoreError> {
        let mut fired = 0;
        for shard in 0..SHARDS {
            fired += self.fire_shard(shard, now).await?;
        }
        Ok(fired)
    }

    async fn fire_shard(&self, shard: u32, now: Millis) -> Result<usize, StoreError> {
        let mut fired = 0;
        let mut start = None;
        for _ in 0..TIMER_PAGES {
            let page = self
                .dynamo
                .query()
                .table_name(&self.config.table)
                .key_condition_expression("pk = :pk AND sk < :upper")
                .filter_expression("attribute_not_exists(claim_until) OR claim_until < :now")
                .set_expression_attribute_values(values([
                    (":pk", s(timer_pk(shard))),
                    (":upper", s(pad(now.saturating_add(1)))),
                    (":now", n(now)),
                ]))
                .consistent_read(true)
                .limit(TIMER_PAGE_SIZE)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| unavailable("reading due timers", e))?;
            let mut claimed = Vec::new();
            for item in page.items() {
                let sk = item.str("sk")?;
                let msg: StepMessage = from_json(&format!("timer {sk}"), item.str("body")?)?;
                let token = unique_token();
                let res = self
                    .dynamo
                    .update_item()
                    .table_name(&self.config.table)
                    .set_key(Some(key(timer_pk(shard), sk)))
                    .update_expression("SET claim_until = :until, claim = :token")
                    .condition_expression(
                        "attribute_exists(pk) AND (attribute_not_exists(claim_until) OR claim_until < :now)",
                    )
                    .set_expression_attribute_values(values([
                        (":until", n(now.saturating_add(TIMER_CLAIM_MS))),
                        (":token", s(&token)),
                        (":now", n(now)),
                    ]))
                    .send()
                    .await;
                match res {
                    Ok(_) => claimed.push((sk.to_string(), token, msg)),
                    Err(e)
                        if matches!(
                            e.as_service_error(),
                            Some(UpdateItemError::ConditionalCheckFailedException(_))
                        ) => {} // fired or claimed by another
                    Err(e) => return Err(unavailable("claiming a timer", e)),
                }
            }
            let batch: Vec<(StepMessage, i32)> =
                claimed.iter().map(|(_, _, m)| (m.clone(), 0)).collect();
            self.send(&batch).await?;
            for (sk, token, _) in &claimed {
                let res = self
                    .dynamo
                    .delete_item()
                    .table_name(&self.config.table)
                    .set_key(Some(key(timer_pk(shard), sk.as_str())))
                    .condition_expression("claim = :token")
                    .set_expression_attribute_values(values([(":token", s(token))]))
                    .send()
                    .await;
                if let Err(e) = res
                    && !matches!(
                        e.as_service_error(),
                        Some(aws_sdk_dynamodb::operation::delete_item::DeleteItemError::ConditionalCheckFailedException(_))
                    )
                {
                    // Sent already: at worst it is sent again after the claim lapses.
                    tracing::warn!(message = "Fired timer not deleted.", timer = %sk, error = %crate::item::unavailable("deleting a timer", e));
                }
            }
            fired += claimed.len();
            start = page.last_evaluated_key;
            if start.is_none() {
                break;
            }
        }
        Ok(fired)
    }

    /// Sends the messages of waiting runs that are due at `now` ([`Run::wakes`]), found by the wake
    /// index; only wakes that passed [`WAKE_GRACE_MS`] ago (a wake within SQS's delay was also
    /// queued, and is most likely handled by then). The index is read in stretches: each call
    /// reads, per shard, the wakes due since the last call's end (kept in one item, the
    /// shards' marks), so each entry is read once. That includes the entries of versions since
    /// superseded (the version answering an approval has no wake, but the one that waited for
    /// it keeps its entry): read once, they cost one read of their run, and no write to take
    /// them out. Each run is read before anything is sent; a message sent twice is stale the
    /// second time. A run found waiting a day with nothing due is written again instead, to
    /// extend its input's expiry ([`INPUT_HORIZON_MS`]). Reads at most 4 pages of 100 entries
    /// per shard per call (the mark then stops short of `now`); returns how many messages it
    /// sent.
    pub async fn fire_due_wakes(&self, now: Millis) -> Result<usize, StoreError> {
        let cutoff = now.saturating_sub(WAKE_GRACE_MS);
        let mut marks = self.wake_marks().await?;
        let mut fired = 0;
        let mut seen = HashSet::new();
        for shard in 0..marks.len() {
            let (entries, reached) = self.due_wakes(shard, marks[shard], cutoff).await?;
            // Per run listed: its first entry's time, and the newest version its entries name.
            let mut listed: Vec<(String, Millis, u64)> = Vec::new();
            let mut at: HashMap<String, usize> = HashMap::new();
            for (run_id, due, version) in entries {
                match at.get(&run_id) {
                    Some(&i) => listed[i].2 = listed[i].2.max(version),
                    None => {
                        at.insert(run_id.clone(), listed.len());
                        listed.push((run_id, due, version));
                    }
                }
            }
            for (run_id, due, version) in listed {
                if !seen.insert(run_id.clone()) {
                    continue;
                }
                match self.fire_run_wakes(&run_id, version, now).await {
                    Ok(n) => fired += n,
                    // Reading it again will not mend it: said, and passed.
                    Err(StoreError::Corrupt(error)) => {
                        tracing::error!(message = "Wake of an unreadable run passed.", run_id, %error);
                    }
                    // Kept for the next sweep, from this entry on.
                    Err(e) => {
                        marks[shard] = due.saturating_sub(1).max(marks[shard]);
                        self.put_wake_marks(&marks).await?;
                        return Err(e);
                    }
                }
            }
            marks[shard] = reached;
        }
        self.put_wake_marks(&marks).await?;
        Ok(fired)
    }

    /// The query of a run's latest version item, eventually consistent (the caller projects
    /// what it needs).
    fn latest_version_item(
        &self,
        run_id: &str,
    ) -> aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder {
        self.dynamo
            .query()
            .table_name(&self.config.table)
            .key_condition_expression("pk = :pk AND begins_with(sk, :v)")
            .set_expression_attribute_values(values([
                (":pk", s(run_pk(run_id))),
                (":v", s(VERSION_SK_PREFIX)),
            ]))
            .scan_index_forward(false)
            .limit(1)
    }

    /// The wakes of one run due at `now`, sent; or, waiting a day with nothing due, the run
    /// written again. The index lags, and lists superseded versions: the run itself says what
    /// is due. `listed`: the newest version of the run the index listed as due. When the run
    /// has a newer one, that entry is superseded (a version that still waits has an entry of its
    /// own), and a look at the latest item's version (eventually consistent, under 4 KB: half a
    /// read unit) is all it costs; a stale answer only ever shows an older version, which is
    /// then read in full.
    async fn fire_run_wakes(
        &self,
        run_id: &str,
        listed: u64,
        now: Millis,
    ) -> Result<usize, StoreError> {
        let latest = self
            .latest_version_item(run_id)
            .projection_expression("version")
            .send()
            .await
            .map_err(|e| unavailable(&format!("reading run {run_id}'s latest version"), e))?;
        if let Some(item) = latest.items().first()
            && item.num::<u64>("version")? > listed
        {
            return Ok(0);
        }
        let Some((run, version)) = self.read_run(run_id).await? else {
            return Ok(0);
        };
        let due: Vec<(StepMessage, i32)> = run
            .wakes()
            .into_iter()
            .filter(|(_, at)| *at <= now)
            .map(|(m, _)| (m, 0))
            .collect();
        if due.is_empty() && self.input_refresh_at(&run).is_some_and(|at| at <= now) {
            // Waiting for a day with nothing due: written again, which extends its input's
            // expiry and moves its wake a day on. Refused: another writer did it.
            let touched = Run {
                updated_at: now,
                ..run
            };
            self.commit_run(&touched, Some(version), &Effects::default())
                .await?;
            return Ok(0);
        }
        self.send(&due).await?;
        Ok(due.len())
    }

    /// The runs one shard of the wake index lists as due after `mark` and by `cutoff` (each with
    /// its entry's time and version), and the mark to keep: `cutoff`, or short of it when the
    /// pages ran out first.
    async fn due_wakes(
        &self,
        shard: usize,
        mark: Millis,
        cutoff: Millis,
    ) -> Result<(Vec<(String, Millis, u64)>, Millis), StoreError> {
        let mut ids = Vec::new();
        if cutoff <= mark {
            return Ok((ids, mark));
        }
        let mut start = None;
        let mut last_due = mark;
        for _ in 0..TIMER_PAGES {
            let page = self
                .dynamo
                .query()
                .table_name(&self.config.table)
                .index_name(GSI3)
                .key_condition_expression("gsi3pk = :pk AND gsi3sk BETWEEN :lo AND :hi")
                .set_expression_attribute_values(values([
                    (":pk", s(wake_shard_pk(shard))),
                    // Keys are `<due:020>#<id>`: due in (mark, cutoff].
                    (":lo", s(pad(mark.saturating_add(1)))),
                    (":hi", s(pad(cutoff.saturating_add(1)))),
                ]))
                .limit(TIMER_PAGE_SIZE)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| unavailable("reading gsi3", e))?;
            for item in page.items() {
                last_due = item
                    .str("gsi3sk")?
                    .split('#')
                    .next()
                    .and_then(|d| d.parse().ok())
                    .unwrap_or(last_due);
                // Only version items have wakes; any other entry (0) has its run read in full.
                let version = item
                    .opt_str("sk")
                    .and_then(|sk| sk.strip_prefix(VERSION_SK_PREFIX))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                ids.push((run_id_of(item)?.to_string(), last_due, version));
            }
            start = page.last_evaluated_key;
            if start.is_none() {
                return Ok((ids, cutoff));
            }
        }
        // More than the pages hold: the next call starts again at the last time read, whose
        // entries may not all have been; unless every entry read was due that one millisecond
        // (400 in one shard), when the sweep moves past it rather than stall the shard.
        if last_due.saturating_sub(1) > mark {
            Ok((ids, last_due - 1))
        } else {
            tracing::warn!(
                message = "Wake index sweep moved past a crowded millisecond.",
                shard,
                at = last_due
            );
            Ok((ids, last_due))
        }
    }

    /// The wake index's shards' marks (0 for a shard never swept).
    async fn wake_marks(&self) -> Result<Vec<Millis>, StoreError> {
        let item = self
            .dynamo
            .get_item()
            .table_name(&self.config.table)
            .set_key(Some(key(PK_WAKE_MARKS, SK_WAKE_MARKS)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| unavailable("reading the wake index's marks", e))?
            .item
            .unwrap_or_default();
        (0..SHARDS)
            .map(|s| match item.get(&format!("s{s}")) {
                Some(_) => item.num(&format!("s{s}")),
                None => Ok(0),
            })
            .collect()
    }

    /// Keeps the marks. Two sweeps at once may set them back a little: entries read again,
    /// which is safe (a run is read before anything is sent).
    async fn put_wake_marks(&self, marks: &[Millis]) -> Result<(), StoreError> {
        let mut item = key(PK_WAKE_MARKS, SK_WAKE_MARKS);
        for (s, m) in marks.iter().enumerate() {
            item.insert(format!("s{s}"), n(m));
        }
        self.dynamo
            .put_item()
            .table_name(&self.config.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| unavailable("writing the wake index's marks", e))?;
        Ok(())
    }

    /// Sends the outboxes pending for more than [`STALE_OUTBOX_MS`] at `now` (their writer died
    /// between commit and flush), for runs nobody reads or writes again. Reads at most 50 runs
    /// per shard per call; returns how many runs it flushed.
    pub async fn flush_stale_outboxes(&self, now: Millis) -> Result<usize, StoreError> {
        let cutoff = pad(now.saturating_sub(STALE_OUTBOX_MS));
        let mut flushed = 0;
        for (run_id, sk) in self
            .runs_below(GSI1, "OUTBOX#", &cutoff, OUTBOX_PAGES, OUTBOX_PAGE_SIZE)
            .await?
        {
            // The index lags: read the item itself before sending anything.
            let current = self.get_item_at(&run_id, &sk).await?;
            if let Some(ob) = pending_outbox(&run_id, current.as_ref())? {
                self.flush(&run_id, &ob).await?;
                flushed += 1;
            }
        }
        Ok(flushed)
    }

    /// The run ids (and their items' sort keys) a sharded index (`gsi1`) lists under
    /// `<prefix><shard>` with a sort key below `cutoff`, over every shard, at most `pages` pages
    /// of `page_size` per shard.
    async fn runs_below(
        &self,
        index: &str,
        prefix: &str,
        cutoff: &str,
        pages: usize,
        page_size: i32,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut ids = Vec::new();
        for shard in 0..SHARDS {
            let mut start = None;
            for _ in 0..pages {
                let page = self
                    .dynamo
                    .query()
                    .table_name(&self.config.table)
                    .index_name(index)
                    .key_condition_expression(format!("{index}pk = :pk AND {index}sk < :cutoff"))
                    .set_expression_attribute_values(values([
                        (":pk", s(format!("{prefix}{shard}"))),
                        (":cutoff", s(cutoff)),
                    ]))
                    .limit(page_size)
                    .set_exclusive_start_key(start)
                    .send()
                    .await
                    .map_err(|e| unavailable(&format!("reading {index}"), e))?;
                for item in page.items() {
                    ids.push((run_id_of(item)?.to_string(), item.str("sk")?.to_string()));
                }
                start = page.last_evaluated_key;
                if start.is_none() {
                    break;
                }
            }
        }
        Ok(ids)
    }

    /// Runs newest first (ties by id, descending): the runs from the runs-by-time index (gsi2,
    /// written by each snapshot, with what never changes of a run: a run may be listed more
    /// than once), then each
    /// run's latest version item (one query each, several at a time); a status filter is
    /// applied to what is read.
    pub(crate) async fn query_runs(
        &self,
        limit: usize,
        status: Option<RunStatus>,
    ) -> Result<Vec<RunSummary>, StoreError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let page_size = i32::try_from(limit.max(25)).unwrap_or(1000).min(1000);
        let mut start = None;
        let mut seen = HashSet::new();
        for _ in 0..RUN_LIST_PAGES {
            let page = self
                .dynamo
                .query()
                .table_name(&self.config.table)
                .index_name(GSI2)
                .key_condition_expression("gsi2pk = :pk")
                .set_expression_attribute_values(values([(":pk", s(GSI2_RUNS))]))
                .scan_index_forward(false)
                .limit(page_size)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| unavailable("listing runs", e))?;
            let mut listed = Vec::new();
            for i in page.items() {
                let run = listed_run(i)?;
                if seen.insert(run.id.clone()) {
                    listed.push(run);
                }
            }
            let ids: Vec<&str> = listed.iter().map(|r| r.id.as_str()).collect();
            let latest = self.latest_summaries(&ids).await?;
            // In the index's order; a run gone meanwhile (expired) is left out.
            for (mut run, latest) in listed.into_iter().zip(latest) {
                let Some((st, finished_at)) = latest else {
                    continue;
                };
                if status.is_some_and(|want| want != st) {
                    continue;
                }
                run.status = st;
                run.finished_at = finished_at;
                out.push(run);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
            start = page.last_evaluated_key;
            if start.is_none() {
                break;
            }
        }
        Ok(out)
    }

    /// The status (and end) of each run's latest version item, in the order given (`None`:
    /// expired).
    async fn latest_summaries(
        &self,
        ids: &[&str],
    ) -> Result<Vec<Option<(RunStatus, Option<Millis>)>>, StoreError> {
        let mut out = vec![None; ids.len()];
        let mut next = ids.iter().enumerate();
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            while in_flight.len() < LIST_CONCURRENCY
                && let Some((i, id)) = next.next()
            {
                let query = self
                    .latest_version_item(id)
                    .projection_expression("#status, finished_at, #ttl")
                    .set_expression_attribute_names(names([
                        ("#status", "status"),
                        ("#ttl", TTL_ATTRIBUTE),
                    ]));
                in_flight.spawn(async move { (i, query.send().await) });
            }
            let Some(done) = in_flight.join_next().await else {
                return Ok(out);
            };
            let (i, res) =
                done.map_err(|e| StoreError::Unavailable(format!("listing runs: {e}")))?;
            let page = res.map_err(|e| unavailable("listing runs", e))?;
            let now = self.clock.now();
            if let Some(item) = page.items().first().filter(|i| !expired(i, now)) {
                let status = item.str("status")?;
                let finished_at = item
                    .get("finished_at")
                    .map(|_| item.num("finished_at"))
                    .transpose()?;
                out[i] = Some((
                    from_json("run status", &format!("\"{status}\""))?,
                    finished_at,
                ));
            }
        }
    }
}

/// A run as the runs index lists it (its status is read from its latest version).
fn listed_run(entry: &Item) -> Result<RunSummary, StoreError> {
    let created_at = entry
        .str("gsi2sk")?
        .split('#')
        .next()
        .and_then(|at| at.parse().ok())
        .ok_or_else(|| {
            StoreError::Corrupt(format!("run {}: gsi2sk", run_id_of(entry).unwrap_or("?")))
        })?;
    Ok(RunSummary {
        id: run_id_of(entry)?.to_string(),
        playbook_id: entry.str("playbook_id")?.to_string(),
        playbook_version: entry.num("playbook_version")?,
        status: RunStatus::Queued,
        created_at,
        finished_at: None,
    })
}

/// The run id of an item of a run's partition.
fn run_id_of(item: &Item) -> Result<&str, StoreError> {
    item.str("pk")?.strip_prefix("RUN#").ok_or_else(|| {
        StoreError::Corrupt(format!(
            "item {}: not a run's",
            item.opt_str("pk").unwrap_or("?")
        ))
    })
}

/// One SendMessageBatch call, again for the entries SQS reports as failed (at most
/// [`SQS_ATTEMPTS`] times); fails unless every entry was accepted.
async fn send_batch(
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    mut entries: Vec<SendMessageBatchRequestEntry>,
) -> Result<(), StoreError> {
    let mut last_error = String::new();
    for _ in 0..SQS_ATTEMPTS {
        let out = sqs
            .send_message_batch()
            .queue_url(&queue_url)
            .set_entries(Some(entries.clone()))
            .send()
            .await
            .map_err(|e| unavailable("sending step messages", e))?;
        let mut failed = HashSet::new();
        for f in out.failed() {
            last_error = format!("{}: {}", f.code(), f.message().unwrap_or_default());
            if f.sender_fault() {
                return Err(StoreError::Unavailable(format!(
                    "SQS refused a step message: {last_error}"
                )));
            }
            failed.insert(f.id().to_string());
        }
        entries.retain(|e| failed.contains(e.id()));
        if entries.is_empty() {
            return Ok(());
        }
    }
    Err(StoreError::Unavailable(format!(
        "SQS did not accept {} step messages: {last_error}",
        entries.len()
    )))
}

/// A read of one run shared by the callers that want it at once (see
/// [`DynamoStore::read_run`]).
pub(crate) type SharedRead = tokio::sync::OnceCell<Option<(Run, u64)>>;

/// The deflated body of a run's input item.
pub(crate) const BODY_ATTRIBUTE: &str = "z";

/// A run as its log stands ([`DynamoStore::read_log`]).
struct Log {
    run: Run,
    version: u64,
    /// The outboxes pending on its items.
    outboxes: Vec<Outbox>,
}

/// The sort key of the item an outbox is on: its id starts with the version the write made.
fn outbox_sk(run_id: &str, outbox_id: &str) -> Result<String, StoreError> {
    outbox_id
        .split('.')
        .next()
        .and_then(|v| v.parse().ok())
        .map(version_sk)
        .ok_or_else(|| StoreError::Corrupt(format!("run {run_id}: outbox id {outbox_id}")))
}

/// An update whose refused condition means there is nothing left to do.
fn unless_refused<T>(
    res: Result<T, aws_sdk_dynamodb::error::SdkError<UpdateItemError>>,
    what: impl FnOnce() -> String,
) -> Result<(), StoreError> {
    match res {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.as_service_error(),
                Some(UpdateItemError::ConditionalCheckFailedException(_))
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(unavailable(&what(), e)),
    }
}

/// The messages a write sends: its effects' messages, less those the run waits for past SQS's
/// longest delay (they stay with the run, in its wake index: no timer item, no outbox; gone with
/// the next write if no longer waited for).
fn to_send(run: &Run, fx: &Effects, now: Millis) -> Vec<(StepMessage, u64)> {
    let wakes = run.wakes();
    fx.messages
        .iter()
        .filter(|(m, delay)| {
            let due = now.saturating_add(Millis::try_from(*delay).unwrap_or(Millis::MAX));
            !(queue_delay(due, now).is_none() && wakes.iter().any(|(w, _)| w == m))
        })
        .cloned()
        .collect()
}

/// From when a run's input expiry is counted ([`INPUT_HORIZON_MS`]): its creation, or its last
/// write once it is older than the horizon.
fn input_base(run: &Run) -> Millis {
    if run.updated_at.saturating_sub(run.created_at) >= INPUT_HORIZON_MS {
        run.updated_at
    } else {
        run.created_at
    }
}

/// The run as stored in its version items: without its input (kept in the input item).
fn without_input(run: &Run) -> Run {
    Run {
        input: serde_json::Value::Null,
        ..run.clone()
    }
}

/// The outbox pending on a version item, if any.
fn pending_outbox(run_id: &str, item: Option<&Item>) -> Result<Option<Outbox>, StoreError> {
    item.and_then(|i| i.opt_str("outbox"))
        .map(|text| Outbox::parse(run_id, text))
        .transpose()
}
