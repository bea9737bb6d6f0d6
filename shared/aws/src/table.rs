//! The single table: its definition, and the one place every key is spelled.
//!
//! | entity            | pk                   | sk                          | gsi1 (pk / sk)                    | gsi2 (pk / sk)          |
//! |-------------------|----------------------|-----------------------------|-----------------------------------|-------------------------|
//! | playbook version  | `PB#<id>`            | `V#<version:010>`           |                                   |                         |
//! | playbook head     | `PB#<id>`            | `HEAD`                      | `PLAYBOOKS` / `<id>`              |                         |
//! | rule              | `RULE#<id>`          | `RULE`                      | `RULES#<kind>` / `<order:020>#<id>` |                       |
//! | run input         | `RUN#<id>`           | `INPUT`                     |                                   |                         |
//! | run version       | `RUN#<id>`           | `V#<version:020>`           | while its outbox is pending: `OUTBOX#<0..15>` / `<written:020>#<id>` | snapshots: `RUNS` / `<created:020>#<id>` |
//! | event record      | `EVENT#<id>`         | `EVENT`                     |                                   |                         |
//! | audit entry       | `AUDIT`              | `<at:020>#<seq>#<unique>`   |                                   |                         |
//! | timer             | `TIMERS#<0..15>`     | `<due ms:020>#<unique>`     |                                   |                         |
//! | wake index marks  | `WAKES`              | `MARKS`                     |                                   |                         |
//!
//! A waiting run's version item also has gsi3 `WAKE#<0..15>` / `<earliest wake:020>#<id>`: the
//! messages it waits for ([`riposte_core::run::Run::wakes`]) are not queued when due beyond
//! SQS's 15-minute delay; the timer finds the run by this index when the first is due, and
//! sends them. The timer sweeps each shard from where it last stopped (`s<shard>` of the marks
//! item, ms), so a superseded version's entry is read once and left to expire with its item.
//!
//! A run is a log of version items ([`crate::runlog`]): each write puts the next one. Every
//! version item holds `version` (N), `status`, `base` (the version of the snapshot its chain
//! starts from), `write_id` (names the write that stored it), `finished_at` (once finished),
//! `expires_at` (its chain's), and either `z` (a snapshot: the run as JSON without its input,
//! deflated) or `p` (a JSON Patch from version N-1, deflated); and, while messages are pending,
//! `outbox` (their compact JSON) and `outbox_id`. A snapshot also holds `id`, `playbook_id`,
//! `playbook_version`, `created_at`, `updated_at` and `snap_at` (when it was written), and
//! lists the run in gsi2. The run's input (the alert, often the largest part) is written once,
//! before the run, as the `INPUT` item of the same partition (`z`: its JSON, deflated); one
//! query of the partition, newest first, reads the versions and the input. A timer holds `body`
//! (the step message as JSON), `run_id`, `due_at` and, while being fired,
//! `claim`/`claim_until`.
//!
//! Orders are shifted to non-negative (`order + 2^63`) so that the zero-padded decimal sorts like
//! the number. `expires_at` (epoch seconds) is the table's TTL attribute: run versions (their
//! chain's snapshot time, plus a day, plus the retention), inputs (from when they are written:
//! see [`crate::INPUT_HORIZON_MS`]) and event records get one; playbooks, rules, audit entries
//! and timers never do. Readers leave out an item whose expiry has passed, as DynamoDB deletes
//! it only eventually.

use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::client::Waiters;
use aws_sdk_dynamodb::error::DisplayErrorContext;
use aws_sdk_dynamodb::operation::create_table::builders::CreateTableFluentBuilder;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType, TimeToLiveSpecification,
};

use riposte_core::model::{AlertKind, Millis};
use riposte_core::store::StoreError;

/// The rules-by-trigger index; also lists playbooks and runs whose outbox is pending.
pub const GSI1: &str = "gsi1";
/// The runs-by-creation-time index.
pub const GSI2: &str = "gsi2";
/// The index of waiting runs by their earliest wake time (approval expiries, long waits).
pub const GSI3: &str = "gsi3";
/// The TTL attribute (epoch seconds).
pub const TTL_ATTRIBUTE: &str = "expires_at";

/// Timers and pending-outbox markers are spread over this many partitions.
pub(crate) const SHARDS: u32 = 16;

pub(crate) const SK_HEAD: &str = "HEAD";
pub(crate) const SK_RULE: &str = "RULE";
/// Run version items' sort keys start so (then the version, zero-padded).
pub(crate) const VERSION_SK_PREFIX: &str = "V#";
pub(crate) const SK_INPUT: &str = "INPUT";
pub(crate) const SK_EVENT: &str = "EVENT";
pub(crate) const PK_AUDIT: &str = "AUDIT";
/// The item holding how far the timer has swept each shard of the wake index.
pub(crate) const PK_WAKE_MARKS: &str = "WAKES";
pub(crate) const SK_WAKE_MARKS: &str = "MARKS";
pub(crate) const GSI1_PLAYBOOKS: &str = "PLAYBOOKS";
pub(crate) const GSI2_RUNS: &str = "RUNS";

/// A non-negative time (or count) zero-padded to 20 digits, so that strings sort like numbers.
pub(crate) fn pad(n: Millis) -> String {
    format!("{:020}", n.max(0))
}

pub(crate) fn playbook_pk(id: &str) -> String {
    format!("PB#{id}")
}

pub(crate) fn playbook_version_sk(version: u32) -> String {
    format!("V#{version:010}")
}

pub(crate) fn rule_pk(id: &str) -> String {
    format!("RULE#{id}")
}

pub(crate) fn rules_gsi1pk(kind: AlertKind) -> String {
    format!("RULES#{}", kind.as_str())
}

/// `order` shifted by 2^63 into `u64`, zero-padded, then the id: sorts by (order, id).
pub(crate) fn rule_gsi1sk(order: i64, id: &str) -> String {
    let shifted = order.cast_unsigned() ^ (1 << 63);
    format!("{shifted:020}#{id}")
}

pub(crate) fn run_pk(id: &str) -> String {
    format!("RUN#{id}")
}

/// The sort key of a run's version item.
pub(crate) fn version_sk(version: u64) -> String {
    format!("{VERSION_SK_PREFIX}{version:020}")
}

pub(crate) fn run_gsi2sk(created_at: Millis, id: &str) -> String {
    format!("{}#{id}", pad(created_at))
}

pub(crate) fn outbox_gsi1pk(run_id: &str) -> String {
    format!("OUTBOX#{}", shard_of(run_id))
}

pub(crate) fn outbox_gsi1sk(written_at: Millis, run_id: &str) -> String {
    format!("{}#{run_id}", pad(written_at))
}

pub(crate) fn event_pk(id: &str) -> String {
    format!("EVENT#{id}")
}

pub(crate) fn wake_gsi3pk(run_id: &str) -> String {
    wake_shard_pk(shard_of(run_id) as usize)
}

pub(crate) fn wake_shard_pk(shard: usize) -> String {
    format!("WAKE#{shard}")
}

pub(crate) fn wake_gsi3sk(due: Millis, run_id: &str) -> String {
    format!("{}#{run_id}", pad(due))
}

pub(crate) fn timer_pk(shard: u32) -> String {
    format!("TIMERS#{shard}")
}

pub(crate) fn timer_sk(due: Millis, unique: &str) -> String {
    format!("{}#{unique}", pad(due))
}

/// A stable shard in `0..SHARDS` (FNV-1a: the same on every host and every build).
pub(crate) fn shard_of(key: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % SHARDS
}

fn key(name: &str, kind: KeyType) -> KeySchemaElement {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
        .expect("name and key type are set")
}

fn string_attribute(name: &str) -> AttributeDefinition {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .expect("name and type are set")
}

/// What gsi1 copies: a rule's JSON (`rule`), a playbook head's `latest` and `deleted`, and the ids
/// pending outboxes are found by. Not a run's body: an index bills every copy at its size.
pub const GSI1_ATTRIBUTES: &[&str] = &["id", "rule", "latest", "deleted"];
/// What gsi3 copies: nothing but the keys (the run's id is in `pk`; the timer reads the run
/// itself).
pub const GSI3_ATTRIBUTES: &[&str] = &[];
/// What gsi2 copies: what never changes of a run. Only snapshot items are listed (so the copy
/// is written when the run is created, and once a day for a run living longer); `list_runs`
/// reads each listed run's status from its latest version. A projected status would rewrite the
/// copy at every status change, on one index partition shared by every run.
pub const GSI2_ATTRIBUTES: &[&str] = &["playbook_id", "playbook_version"];

fn index(name: &str, pk: &str, sk: &str, attributes: &[&str]) -> GlobalSecondaryIndex {
    GlobalSecondaryIndex::builder()
        .index_name(name)
        .key_schema(key(pk, KeyType::Hash))
        .key_schema(key(sk, KeyType::Range))
        .projection(if attributes.is_empty() {
            Projection::builder()
                .projection_type(ProjectionType::KeysOnly)
                .build()
        } else {
            Projection::builder()
                .projection_type(ProjectionType::Include)
                .set_non_key_attributes(Some(attributes.iter().map(|a| a.to_string()).collect()))
                .build()
        })
        .build()
        .expect("name, keys and projection are set")
}

/// The `CreateTable` request for this layout (on-demand; each GSI copies only what is read from it).
/// Send it as is, or read it to write the same table in infrastructure code.
pub fn table_definition(client: &Client, name: &str) -> CreateTableFluentBuilder {
    client
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(string_attribute("pk"))
        .attribute_definitions(string_attribute("sk"))
        .attribute_definitions(string_attribute("gsi1pk"))
        .attribute_definitions(string_attribute("gsi1sk"))
        .attribute_definitions(string_attribute("gsi2pk"))
        .attribute_definitions(string_attribute("gsi2sk"))
        .attribute_definitions(string_attribute("gsi3pk"))
        .attribute_definitions(string_attribute("gsi3sk"))
        .key_schema(key("pk", KeyType::Hash))
        .key_schema(key("sk", KeyType::Range))
        .global_secondary_indexes(index(GSI1, "gsi1pk", "gsi1sk", GSI1_ATTRIBUTES))
        .global_secondary_indexes(index(GSI2, "gsi2pk", "gsi2sk", GSI2_ATTRIBUTES))
        .global_secondary_indexes(index(GSI3, "gsi3pk", "gsi3sk", GSI3_ATTRIBUTES))
}

/// Creates the table, waits (at most two minutes) until it is active, and turns on its TTL.
pub async fn create_table(client: &Client, name: &str) -> Result<(), StoreError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Unavailable(format!("{what} table {name}: {e}"))
    };
    table_definition(client, name)
        .send()
        .await
        .map_err(|e| fail("creating", &DisplayErrorContext(&e)))?;
    client
        .wait_until_table_exists()
        .table_name(name)
        .wait(Duration::from_secs(120))
        .await
        .map_err(|e| fail("waiting for", &DisplayErrorContext(&e)))?;
    client
        .update_time_to_live()
        .table_name(name)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .attribute_name(TTL_ATTRIBUTE)
                .enabled(true)
                .build()
                .expect("name and flag are set"),
        )
        .send()
        .await
        .map_err(|e| fail("enabling TTL on", &DisplayErrorContext(&e)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_keys_sort_like_order_then_id() {
        let mut keys = [
            (i64::MAX, "a"),
            (0, "b"),
            (-1, "a"),
            (0, "a"),
            (i64::MIN, "z"),
            (10, "a"),
            (9, "z"),
        ]
        .map(|(o, id)| (rule_gsi1sk(o, id), (o, id)));
        keys.sort();
        let order: Vec<_> = keys.iter().map(|(_, k)| *k).collect();
        assert_eq!(
            order,
            [
                (i64::MIN, "z"),
                (-1, "a"),
                (0, "a"),
                (0, "b"),
                (9, "z"),
                (10, "a"),
                (i64::MAX, "a")
            ]
        );
    }

    #[test]
    fn shards_are_stable_and_in_range() {
        assert_eq!(shard_of("run-1"), shard_of("run-1"));
        assert!((0..1000).all(|i| shard_of(&format!("r{i}")) < SHARDS));
        let used: std::collections::HashSet<_> =
            (0..1000).map(|i| shard_of(&format!("r{i}"))).collect();
        assert_eq!(used.len(), SHARDS as usize);
    }

    #[test]
    fn padded_times_sort_like_numbers() {
        assert!(pad(999) < pad(1000));
        assert_eq!(pad(-5), pad(0));
        assert!(timer_sk(1000, "x") < pad(1001));
        assert!(timer_sk(1001, "x") > pad(1001));
    }
}
