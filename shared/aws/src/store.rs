//! [`Store`] for [`DynamoStore`]: playbooks, rules, runs, event records and the audit trail.
//!
//! Guarantee: a new playbook version is written together with its head in one transaction, the
//! version item only if absent and the head only if still at the version read, so two writers
//! can never both create version N. Run writes follow the outbox protocol of the crate docs.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{KeysAndAttributes, Put, ReturnValue, TransactWriteItem};

use riposte_core::engine::Effects;
use riposte_core::model::{AlertKind, Millis};
use riposte_core::playbook::PlaybookSpec;
use riposte_core::rule::Rule;
use riposte_core::run::{Run, RunStatus};
use riposte_core::store::{AuditEntry, EventRecord, RunSummary, Store, StoreError, StoredPlaybook};

use crate::DynamoStore;
use crate::item::{Item, ItemExt, from_json, key, n, s, to_json, unavailable, values};
use crate::outbox::{next_seq, unique_token};
use crate::runs::Commit;
use crate::table::{
    GSI1, GSI1_PLAYBOOKS, PK_AUDIT, SK_EVENT, SK_HEAD, SK_RULE, TTL_ATTRIBUTE, event_pk, pad,
    playbook_pk, playbook_version_sk, rule_gsi1sk, rule_pk, rules_gsi1pk,
};

/// Attempts at creating a playbook version while others do the same.
const PLAYBOOK_ATTEMPTS: usize = 8;
/// Pages read when a list must be complete (rules, playbooks); past this the list fails.
const COMPLETE_LIST_PAGES: usize = 100;
/// Pages read for the audit trail.
const AUDIT_PAGES: usize = 10;
/// BatchGetItem takes at most 100 keys.
const BATCH_GET: usize = 100;
const BATCH_GET_ATTEMPTS: usize = 5;

impl DynamoStore {
    /// An item, read strongly consistent.
    async fn get(&self, pk: String, sk: &str) -> Result<Option<Item>, StoreError> {
        self.get_as(pk, sk, true).await
    }

    /// An item, read strongly consistent or (at half the price) eventually consistent.
    async fn get_as(
        &self,
        pk: String,
        sk: &str,
        consistent: bool,
    ) -> Result<Option<Item>, StoreError> {
        let out = self
            .dynamo
            .get_item()
            .table_name(&self.config.table)
            .set_key(Some(key(pk.as_str(), sk)))
            .consistent_read(consistent)
            .send()
            .await
            .map_err(|e| unavailable(&format!("reading {pk}/{sk}"), e))?;
        Ok(out.item)
    }

    /// An item that never changes once written (a playbook version): read eventually
    /// consistent, at half the price, and again strongly consistent if that read does not find
    /// it (written too recently to have reached every replica).
    async fn get_immutable(&self, pk: String, sk: &str) -> Result<Option<Item>, StoreError> {
        match self.get_as(pk.clone(), sk, false).await? {
            Some(item) => Ok(Some(item)),
            None => self.get(pk, sk).await,
        }
    }

    /// Every item of a gsi1 partition, in sort key order.
    async fn query_gsi1(&self, pk: String) -> Result<Vec<Item>, StoreError> {
        let mut out = Vec::new();
        let mut start = None;
        for _ in 0..COMPLETE_LIST_PAGES {
            let page = self
                .dynamo
                .query()
                .table_name(&self.config.table)
                .index_name(GSI1)
                .key_condition_expression("gsi1pk = :pk")
                .set_expression_attribute_values(values([(":pk", s(pk.as_str()))]))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| unavailable(&format!("listing {pk}"), e))?;
            out.extend(page.items.unwrap_or_default());
            start = page.last_evaluated_key;
            if start.is_none() {
                return Ok(out);
            }
        }
        Err(StoreError::Unavailable(format!(
            "listing {pk}: more than {COMPLETE_LIST_PAGES} pages"
        )))
    }

    /// The items at these keys (absent ones left out, the others in no particular order),
    /// strongly consistent.
    pub(crate) async fn batch_get(&self, keys: Vec<Item>) -> Result<Vec<Item>, StoreError> {
        let mut found = Vec::new();
        for chunk in keys.chunks(BATCH_GET) {
            let mut pending = Some(
                KeysAndAttributes::builder()
                    .set_keys(Some(chunk.to_vec()))
                    .consistent_read(true)
                    .build()
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            );
            for _ in 0..BATCH_GET_ATTEMPTS {
                let Some(request) = pending.take() else {
                    break;
                };
                let mut out = self
                    .dynamo
                    .batch_get_item()
                    .request_items(&self.config.table, request)
                    .send()
                    .await
                    .map_err(|e| unavailable("reading items in a batch", e))?;
                if let Some(mut responses) = out.responses.take() {
                    found.extend(responses.remove(&self.config.table).unwrap_or_default());
                }
                pending = out
                    .unprocessed_keys
                    .and_then(|mut u| u.remove(&self.config.table))
                    .filter(|k| !k.keys().is_empty());
            }
            if pending.is_some() {
                return Err(StoreError::Unavailable(
                    "reading items in a batch: DynamoDB kept keys unprocessed".into(),
                ));
            }
        }
        Ok(found)
    }

    fn stored_playbook(item: &Item, deleted: bool) -> Result<StoredPlaybook, StoreError> {
        Ok(StoredPlaybook {
            spec: from_json("playbook", item.str("spec")?)?,
            version: item.num("version")?,
            created_by: item.str("created_by")?.to_string(),
            created_at: item.num("created_at")?,
            deleted,
        })
    }

    /// One attempt at storing `spec` as the next version; `None` when another writer got there
    /// first.
    async fn try_put_playbook(
        &self,
        spec: &PlaybookSpec,
        body: &str,
        by: &str,
        at: Millis,
    ) -> Result<Option<u32>, StoreError> {
        let pk = playbook_pk(&spec.id);
        let head = self.get(pk.clone(), SK_HEAD).await?;
        let latest = match &head {
            Some(h) => Some((h.num::<u32>("latest")?, h.flag("deleted"))),
            None => None,
        };
        if let Some((v, false)) = latest
            && let Some(current) = self.get(pk.clone(), &playbook_version_sk(v)).await?
            && current.str("spec")? == body
        {
            return Ok(Some(v));
        }
        let version = latest.map_or(1, |(v, _)| v + 1);
        let mut version_item = key(pk.as_str(), playbook_version_sk(version));
        version_item.extend([
            ("id".to_string(), s(&spec.id)),
            ("spec".to_string(), s(body)),
            ("version".to_string(), n(version)),
            ("created_by".to_string(), s(by)),
            ("created_at".to_string(), n(at)),
        ]);
        let mut head_item = key(pk.as_str(), SK_HEAD);
        head_item.extend([
            ("id".to_string(), s(&spec.id)),
            ("latest".to_string(), n(version)),
            (
                "deleted".to_string(),
                aws_sdk_dynamodb::types::AttributeValue::Bool(false),
            ),
            ("gsi1pk".to_string(), s(GSI1_PLAYBOOKS)),
            ("gsi1sk".to_string(), s(&spec.id)),
        ]);
        let head_put = Put::builder()
            .table_name(&self.config.table)
            .set_item(Some(head_item));
        let head_put = match latest {
            None => head_put.condition_expression("attribute_not_exists(pk)"),
            Some((v, _)) => head_put
                .condition_expression("latest = :prev")
                .set_expression_attribute_values(values([(":prev", n(v))])),
        };
        let build = |e: aws_sdk_dynamodb::error::BuildError| StoreError::Corrupt(e.to_string());
        let res = self
            .dynamo
            .transact_write_items()
            .transact_items(
                TransactWriteItem::builder()
                    .put(
                        Put::builder()
                            .table_name(&self.config.table)
                            .set_item(Some(version_item))
                            .condition_expression("attribute_not_exists(pk)")
                            .build()
                            .map_err(build)?,
                    )
                    .build(),
            )
            .transact_items(
                TransactWriteItem::builder()
                    .put(head_put.build().map_err(build)?)
                    .build(),
            )
            .send()
            .await;
        match res {
            Ok(_) => Ok(Some(version)),
            Err(e) => match e.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(c))
                    if c.cancellation_reasons().iter().all(|r| {
                        matches!(
                            r.code(),
                            None | Some("None" | "ConditionalCheckFailed" | "TransactionConflict")
                        )
                    }) =>
                {
                    Ok(None)
                }
                _ => Err(unavailable(&format!("storing playbook {}", spec.id), e)),
            },
        }
    }
}

fn rule_of(item: &Item) -> Result<Rule, StoreError> {
    from_json("rule", item.str("rule")?)
}

/// Whether a conditional UpdateItem applied: `false` when its condition failed.
fn applied<T>(
    res: Result<T, aws_sdk_dynamodb::error::SdkError<UpdateItemError>>,
    what: impl FnOnce() -> String,
) -> Result<bool, StoreError> {
    match res {
        Ok(_) => Ok(true),
        Err(e)
            if matches!(
                e.as_service_error(),
                Some(UpdateItemError::ConditionalCheckFailedException(_))
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(unavailable(&what(), e)),
    }
}

#[async_trait]
impl Store for DynamoStore {
    async fn put_playbook(
        &self,
        spec: &PlaybookSpec,
        by: &str,
        at: Millis,
    ) -> Result<u32, StoreError> {
        let body = to_json(spec)?;
        for _ in 0..PLAYBOOK_ATTEMPTS {
            if let Some(v) = self.try_put_playbook(spec, &body, by, at).await? {
                return Ok(v);
            }
        }
        Err(StoreError::Conflict(format!(
            "playbook {} kept changing while a version was stored",
            spec.id
        )))
    }

    async fn get_playbook(
        &self,
        id: &str,
        version: Option<u32>,
    ) -> Result<Option<StoredPlaybook>, StoreError> {
        let pk = playbook_pk(id);
        match version {
            Some(v) => {
                let sk = playbook_version_sk(v);
                let (item, head) = tokio::try_join!(
                    self.get_immutable(pk.clone(), &sk),
                    self.get(pk.clone(), SK_HEAD)
                )?;
                let deleted = head.as_ref().is_some_and(|h| h.flag("deleted"));
                item.map(|i| Self::stored_playbook(&i, deleted)).transpose()
            }
            None => {
                let Some(head) = self.get(pk.clone(), SK_HEAD).await? else {
                    return Ok(None);
                };
                if head.flag("deleted") {
                    return Ok(None);
                }
                let latest: u32 = head.num("latest")?;
                self.get_immutable(pk, &playbook_version_sk(latest))
                    .await?
                    .map(|i| Self::stored_playbook(&i, false))
                    .transpose()
            }
        }
    }

    async fn latest_playbook_version(&self, id: &str) -> Result<Option<u32>, StoreError> {
        match self.get(playbook_pk(id), SK_HEAD).await? {
            Some(head) if !head.flag("deleted") => Ok(Some(head.num("latest")?)),
            _ => Ok(None),
        }
    }

    async fn list_playbooks(&self) -> Result<Vec<StoredPlaybook>, StoreError> {
        let heads = self.query_gsi1(GSI1_PLAYBOOKS.to_string()).await?;
        let mut ids = Vec::new();
        let mut keys = Vec::new();
        for h in heads.iter().filter(|h| !h.flag("deleted")) {
            let id = h.str("id")?;
            let latest: u32 = h.num("latest")?;
            ids.push(id.to_string());
            keys.push(key(playbook_pk(id), playbook_version_sk(latest)));
        }
        let mut by_id: HashMap<String, StoredPlaybook> = HashMap::new();
        for item in self.batch_get(keys).await? {
            by_id.insert(
                item.str("id")?.to_string(),
                Self::stored_playbook(&item, false)?,
            );
        }
        // In id order, as the index keeps the heads.
        Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
    }

    async fn delete_playbook(&self, id: &str) -> Result<bool, StoreError> {
        let res = self
            .dynamo
            .update_item()
            .table_name(&self.config.table)
            .set_key(Some(key(playbook_pk(id), SK_HEAD)))
            .update_expression("SET deleted = :yes")
            .condition_expression("attribute_exists(pk) AND deleted = :no")
            .set_expression_attribute_values(values([
                (":yes", aws_sdk_dynamodb::types::AttributeValue::Bool(true)),
                (":no", aws_sdk_dynamodb::types::AttributeValue::Bool(false)),
            ]))
            .send()
            .await;
        applied(res, || format!("deleting playbook {id}"))
    }

    /// Read eventually consistent (half the price): functions keep a setting 5 s anyway, and a
    /// change reaches every replica well within that.
    async fn get_setting(&self, key: &str) -> Result<Option<serde_json::Value>, StoreError> {
        match self
            .get_as(format!("SETTING#{key}"), "SETTING", false)
            .await?
        {
            Some(item) => Ok(Some(from_json("setting", item.str("value")?)?)),
            None => Ok(None),
        }
    }

    async fn put_setting(&self, key: &str, value: &serde_json::Value) -> Result<(), StoreError> {
        let mut item = crate::item::key(format!("SETTING#{key}"), "SETTING");
        item.insert("value".to_string(), s(value.to_string()));
        self.dynamo
            .put_item()
            .table_name(&self.config.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| unavailable(&format!("storing setting {key}"), e))?;
        Ok(())
    }

    async fn take_token(
        &self,
        bucket: &str,
        max: u32,
        expires_at: Millis,
    ) -> Result<bool, StoreError> {
        // One conditional ADD: concurrent workers cannot both take the last token.
        let res = self
            .dynamo
            .update_item()
            .table_name(&self.config.table)
            .set_key(Some(key(format!("TOKENS#{bucket}"), "TOKENS")))
            .update_expression("ADD taken :one SET #ttl = :ttl")
            .condition_expression("attribute_not_exists(taken) OR taken < :max")
            .expression_attribute_names("#ttl", crate::table::TTL_ATTRIBUTE)
            .set_expression_attribute_values(values([
                (":one", n(1)),
                (":max", n(max)),
                (":ttl", n(expires_at.div_euclid(1000) + 1)),
            ]))
            .send()
            .await;
        applied(res, || format!("taking a token of {bucket}"))
    }

    async fn put_rule(&self, rule: &Rule) -> Result<(), StoreError> {
        let mut item = key(rule_pk(&rule.id), SK_RULE);
        item.extend([
            ("id".to_string(), s(&rule.id)),
            // Under its own name: gsi1 copies `rule`, never a run's `body`.
            ("rule".to_string(), s(to_json(rule)?)),
            ("gsi1pk".to_string(), s(rules_gsi1pk(rule.trigger))),
            ("gsi1sk".to_string(), s(rule_gsi1sk(rule.order, &rule.id))),
        ]);
        self.dynamo
            .put_item()
            .table_name(&self.config.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| unavailable(&format!("storing rule {}", rule.id), e))?;
        Ok(())
    }

    async fn get_rule(&self, id: &str) -> Result<Option<Rule>, StoreError> {
        self.get(rule_pk(id), SK_RULE)
            .await?
            .map(|i| rule_of(&i))
            .transpose()
    }

    async fn list_rules(&self, trigger: Option<AlertKind>) -> Result<Vec<Rule>, StoreError> {
        match trigger {
            Some(kind) => self
                .query_gsi1(rules_gsi1pk(kind))
                .await?
                .iter()
                .map(rule_of)
                .collect(),
            None => {
                let (alerts, recommendations) = tokio::try_join!(
                    self.query_gsi1(rules_gsi1pk(AlertKind::Alert)),
                    self.query_gsi1(rules_gsi1pk(AlertKind::Recommendation))
                )?;
                let mut rules = alerts
                    .iter()
                    .chain(recommendations.iter())
                    .map(rule_of)
                    .collect::<Result<Vec<_>, _>>()?;
                rules.sort_by(|a, b| a.order.cmp(&b.order).then_with(|| a.id.cmp(&b.id)));
                Ok(rules)
            }
        }
    }

    async fn delete_rule(&self, id: &str) -> Result<bool, StoreError> {
        let out = self
            .dynamo
            .delete_item()
            .table_name(&self.config.table)
            .set_key(Some(key(rule_pk(id), SK_RULE)))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| unavailable(&format!("deleting rule {id}"), e))?;
        Ok(out.attributes.is_some_and(|a| !a.is_empty()))
    }

    async fn create_run(&self, run: &Run, fx: &Effects) -> Result<bool, StoreError> {
        match self.commit_run(run, None, fx).await? {
            Commit::Done(outbox) => {
                self.flush_after_commit(&run.id, outbox).await;
                Ok(true)
            }
            Commit::Refused(existing) => {
                // The first creator may have died before sending; its messages go out now.
                self.flush_refused(&run.id, existing).await?;
                Ok(false)
            }
            Commit::ChildExists(child) => Err(StoreError::Conflict(format!(
                "run {}: child run {child} exists already",
                run.id
            ))),
        }
    }

    async fn load_run(&self, id: &str) -> Result<Option<(Run, u64)>, StoreError> {
        self.read_run(id).await
    }

    async fn load_run_lagging(&self, id: &str) -> Result<Option<(Run, u64)>, StoreError> {
        self.read_run_lagging(id).await
    }

    async fn save_run(&self, run: &Run, version: u64, fx: &Effects) -> Result<(), StoreError> {
        match self.commit_run(run, Some(version), fx).await? {
            Commit::Done(outbox) => {
                self.flush_after_commit(&run.id, outbox).await;
                Ok(())
            }
            // The other writer's outbox, if any, is on its own item: its writer, the next
            // reader or the sweep sends it; nothing here waits for it.
            Commit::Refused(_) => Err(StoreError::Conflict(format!(
                "run {} is no longer at version {version}",
                run.id
            ))),
            Commit::ChildExists(child) => Err(StoreError::Conflict(format!(
                "run {}: child run {child} exists already",
                run.id
            ))),
        }
    }

    async fn list_runs(
        &self,
        limit: usize,
        status: Option<RunStatus>,
    ) -> Result<Vec<RunSummary>, StoreError> {
        self.query_runs(limit, status).await
    }

    async fn put_event(&self, record: &EventRecord) -> Result<(), StoreError> {
        let mut item = key(event_pk(&record.event_id), SK_EVENT);
        item.extend([
            ("id".to_string(), s(&record.event_id)),
            ("received_at".to_string(), n(record.received_at)),
            ("body".to_string(), s(to_json(record)?)),
        ]);
        if let Some(at) = self.expiry(self.clock.now()) {
            item.insert(TTL_ATTRIBUTE.into(), at);
        }
        self.dynamo
            .put_item()
            .table_name(&self.config.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| unavailable(&format!("storing event {}", record.event_id), e))?;
        Ok(())
    }

    async fn get_event(&self, id: &str) -> Result<Option<EventRecord>, StoreError> {
        self.get(event_pk(id), SK_EVENT)
            .await?
            .map(|i| from_json("event", i.str("body")?))
            .transpose()
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        // Insertion order: the store's clock, then this process's sequence, then a tie-breaker.
        let sk = format!(
            "{}#{:010}#{}",
            pad(self.clock.now()),
            next_seq(),
            unique_token()
        );
        let mut item = key(PK_AUDIT, sk);
        item.insert("body".into(), s(to_json(entry)?));
        self.dynamo
            .put_item()
            .table_name(&self.config.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await
            .map_err(|e| unavailable("appending to the audit trail", e))?;
        Ok(())
    }

    async fn list_audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let mut out = Vec::new();
        let mut start = None;
        if limit == 0 {
            return Ok(out);
        }
        for _ in 0..AUDIT_PAGES {
            let page = self
                .dynamo
                .query()
                .table_name(&self.config.table)
                .key_condition_expression("pk = :pk")
                .set_expression_attribute_values(values([(":pk", s(PK_AUDIT))]))
                .scan_index_forward(false)
                .limit(i32::try_from(limit - out.len()).unwrap_or(1000).min(1000))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| unavailable("reading the audit trail", e))?;
            for item in page.items() {
                out.push(from_json("audit entry", item.str("body")?)?);
            }
            start = page.last_evaluated_key;
            if start.is_none() || out.len() >= limit {
                break;
            }
        }
        out.truncate(limit);
        Ok(out)
    }
}

impl DynamoStore {
    /// Test hook: step 1 of a run write only (the commit), as a writer that died before sending
    /// would leave it. `Ok(false)` when the write was refused.
    #[doc(hidden)]
    pub async fn save_run_without_flush(
        &self,
        run: &Run,
        version: u64,
        fx: &Effects,
    ) -> Result<bool, StoreError> {
        Ok(matches!(
            self.commit_run(run, Some(version), fx).await?,
            Commit::Done(_)
        ))
    }

    /// Test hook: the commit of [`Store::create_run`] only, as a creator that died before
    /// sending would leave it.
    #[doc(hidden)]
    pub async fn create_run_without_flush(
        &self,
        run: &Run,
        fx: &Effects,
    ) -> Result<bool, StoreError> {
        Ok(matches!(
            self.commit_run(run, None, fx).await?,
            Commit::Done(_)
        ))
    }
}
