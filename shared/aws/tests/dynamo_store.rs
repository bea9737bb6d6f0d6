//! The DynamoDB store against the real SDK and a real emulator (moto): the Store contract, the
//! outbox under a crash, timers, size limits and retention.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{AttributeValue, BillingMode, ProjectionType, TimeToLiveStatus};
use serde_json::json;

use riposte_aws::OUTBOX_GRACE_MS;
use riposte_core::engine::Effects;
use riposte_core::model::AlertKind;
use riposte_core::playbook::{PlaybookSpec, StepSpec};
use riposte_core::ports::Clock;
use riposte_core::rule::{Evaluation, Rule};
use riposte_core::run::{Iteration, MessageKind, RunStatus, StepState, StepStatus};
use riposte_core::store::{AlertRecord, AuditEntry, EventRecord, Store, StoreError};

use support::*;

const HOUR: u64 = 3_600_000;

fn playbook(id: &str, name: &str) -> PlaybookSpec {
    PlaybookSpec {
        id: id.into(),
        name: name.into(),
        description: String::new(),
        vars: Default::default(),
        separate_approver: false,
        steps: vec![StepSpec {
            id: "block".into(),
            action: Some("noop".into()),
            ..Default::default()
        }],
    }
}

fn rule(id: &str, order: i64, trigger: AlertKind) -> Rule {
    Rule {
        id: id.into(),
        name: format!("rule {id}"),
        description: String::new(),
        enabled: true,
        order,
        trigger,
        condition: "true".into(),
        playbooks: vec!["block-ip".into()],
        terminal: false,
        expires: None,
        updated_by: None,
        updated_at: None,
    }
}

fn ids(rules: &[Rule]) -> Vec<&str> {
    rules.iter().map(|r| r.id.as_str()).collect()
}

#[tokio::test]
async fn the_table_has_its_three_indexes_on_demand_with_ttl() {
    let f = fixture().await;
    let t = f
        .dynamo
        .describe_table()
        .table_name(&f.table)
        .send()
        .await
        .unwrap()
        .table
        .unwrap();
    let billing = t.billing_mode_summary().and_then(|b| b.billing_mode());
    assert_eq!(billing, Some(&BillingMode::PayPerRequest));
    let mut indexes: Vec<_> = t
        .global_secondary_indexes()
        .iter()
        .map(|g| {
            (
                g.index_name().unwrap().to_string(),
                g.key_schema()
                    .iter()
                    .map(|k| k.attribute_name().to_string())
                    .collect::<Vec<_>>(),
                g.projection().and_then(|p| p.projection_type()).cloned(),
                g.projection()
                    .map(|p| p.non_key_attributes().to_vec())
                    .unwrap_or_default(),
            )
        })
        .collect();
    indexes.sort();
    assert_eq!(
        indexes,
        [
            (
                "gsi1".to_string(),
                vec!["gsi1pk".to_string(), "gsi1sk".to_string()],
                Some(ProjectionType::Include),
                riposte_aws::table::GSI1_ATTRIBUTES
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
            ),
            (
                "gsi2".to_string(),
                vec!["gsi2pk".to_string(), "gsi2sk".to_string()],
                Some(ProjectionType::Include),
                riposte_aws::table::GSI2_ATTRIBUTES
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
            ),
            (
                "gsi3".to_string(),
                vec!["gsi3pk".to_string(), "gsi3sk".to_string()],
                Some(ProjectionType::KeysOnly),
                riposte_aws::table::GSI3_ATTRIBUTES
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
            ),
        ]
    );
    let ttl = f
        .dynamo
        .describe_time_to_live()
        .table_name(&f.table)
        .send()
        .await
        .unwrap()
        .time_to_live_description
        .unwrap();
    assert_eq!(ttl.attribute_name(), Some("expires_at"));
    assert_eq!(ttl.time_to_live_status(), Some(&TimeToLiveStatus::Enabled));
}

#[tokio::test]
async fn playbook_versions_are_numbered_and_survive_deletion() {
    let f = fixture().await;
    let s = &f.store;
    let v1 = playbook("block-ip", "Block an IP");
    assert_eq!(s.put_playbook(&v1, "ann", T0).await.unwrap(), 1);
    // The same spec again is the same version.
    assert_eq!(s.put_playbook(&v1, "bob", T0 + 1).await.unwrap(), 1);
    let v2 = playbook("block-ip", "Block an IP address");
    assert_eq!(s.put_playbook(&v2, "bob", T0 + 2).await.unwrap(), 2);
    s.put_playbook(&playbook("disable-user", "Disable"), "ann", T0)
        .await
        .unwrap();

    let latest = s.get_playbook("block-ip", None).await.unwrap().unwrap();
    assert_eq!(
        (
            latest.version,
            latest.spec.name.as_str(),
            latest.created_by.as_str()
        ),
        (2, "Block an IP address", "bob")
    );
    let first = s.get_playbook("block-ip", Some(1)).await.unwrap().unwrap();
    assert_eq!((first.spec, first.created_at), (v1.clone(), T0));
    assert!(s.get_playbook("block-ip", Some(3)).await.unwrap().is_none());
    assert!(s.get_playbook("nope", None).await.unwrap().is_none());
    let listed: Vec<_> = s
        .list_playbooks()
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.spec.id, p.version))
        .collect();
    assert_eq!(
        listed,
        [("block-ip".to_string(), 2), ("disable-user".to_string(), 1)]
    );

    // Deleting hides the latest; the versions stay for the runs that pinned them.
    assert!(s.delete_playbook("block-ip").await.unwrap());
    assert!(!s.delete_playbook("block-ip").await.unwrap());
    assert!(!s.delete_playbook("nope").await.unwrap());
    assert!(s.get_playbook("block-ip", None).await.unwrap().is_none());
    let pinned = s.get_playbook("block-ip", Some(1)).await.unwrap().unwrap();
    assert!(pinned.deleted);
    assert_eq!(pinned.spec, v1);
    let listed: Vec<_> = s
        .list_playbooks()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.spec.id)
        .collect();
    assert_eq!(listed, ["disable-user"]);
    // Storing it again brings it back as a new version.
    assert_eq!(s.put_playbook(&v2, "ann", T0 + 3).await.unwrap(), 3);
    assert_eq!(
        s.get_playbook("block-ip", None)
            .await
            .unwrap()
            .unwrap()
            .version,
        3
    );
}

#[tokio::test]
async fn concurrent_playbook_writers_never_share_a_version() {
    let f = fixture().await;
    let specs: Vec<_> = (0..4)
        .map(|i| playbook("contain", &format!("variant {i}")))
        .collect();
    let put = |i: usize| f.store.put_playbook(&specs[i], "ann", T0);
    let (a, b, c, d) = tokio::join!(put(0), put(1), put(2), put(3));
    let mut versions = [a.unwrap(), b.unwrap(), c.unwrap(), d.unwrap()];
    versions.sort();
    assert_eq!(versions, [1, 2, 3, 4]);
    // Every version holds the spec its writer was told it holds.
    for v in 1..=4 {
        assert!(
            f.store
                .get_playbook("contain", Some(v))
                .await
                .unwrap()
                .is_some()
        );
    }
}

#[tokio::test]
async fn rules_list_by_trigger_in_order_with_ties_by_id() {
    let f = fixture().await;
    let s = &f.store;
    for r in [
        rule("b", 5, AlertKind::Alert),
        rule("a", 5, AlertKind::Alert),
        rule("late", 100, AlertKind::Alert),
        rule("first", -3, AlertKind::Alert),
        rule("posture", 0, AlertKind::Recommendation),
        rule("min", i64::MIN, AlertKind::Recommendation),
    ] {
        s.put_rule(&r).await.unwrap();
    }
    assert_eq!(
        ids(&s.list_rules(Some(AlertKind::Alert)).await.unwrap()),
        ["first", "a", "b", "late"]
    );
    assert_eq!(
        ids(&s.list_rules(Some(AlertKind::Recommendation)).await.unwrap()),
        ["min", "posture"]
    );
    assert_eq!(
        ids(&s.list_rules(None).await.unwrap()),
        ["min", "first", "posture", "a", "b", "late"]
    );
    assert_eq!(
        s.get_rule("a").await.unwrap().unwrap(),
        rule("a", 5, AlertKind::Alert)
    );
    assert!(s.get_rule("zzz").await.unwrap().is_none());

    // A rule moved to the other trigger and order leaves its old place.
    s.put_rule(&rule("b", -10, AlertKind::Recommendation))
        .await
        .unwrap();
    assert_eq!(
        ids(&s.list_rules(Some(AlertKind::Alert)).await.unwrap()),
        ["first", "a", "late"]
    );
    assert_eq!(
        ids(&s.list_rules(Some(AlertKind::Recommendation)).await.unwrap()),
        ["min", "b", "posture"]
    );

    assert!(s.delete_rule("a").await.unwrap());
    assert!(!s.delete_rule("a").await.unwrap());
    assert!(s.get_rule("a").await.unwrap().is_none());
    assert_eq!(
        ids(&s.list_rules(Some(AlertKind::Alert)).await.unwrap()),
        ["first", "late"]
    );
}

#[tokio::test]
async fn the_audit_trail_lists_newest_first_in_the_order_written() {
    let f = fixture().await;
    let entry = |i: i64| AuditEntry {
        at: T0,
        by: "ann".into(),
        action: "rule.put".into(),
        target: format!("rule-{i}"),
        detail: None,
    };
    // Several in the same millisecond, then one later.
    for i in 0..5 {
        f.store.append_audit(&entry(i)).await.unwrap();
    }
    f.clock.advance(1);
    f.store.append_audit(&entry(5)).await.unwrap();
    let targets = |v: Vec<AuditEntry>| v.into_iter().map(|e| e.target).collect::<Vec<_>>();
    assert_eq!(
        targets(f.store.list_audit(10).await.unwrap()),
        ["rule-5", "rule-4", "rule-3", "rule-2", "rule-1", "rule-0"]
    );
    assert_eq!(
        targets(f.store.list_audit(2).await.unwrap()),
        ["rule-5", "rule-4"]
    );
    assert!(f.store.list_audit(0).await.unwrap().is_empty());
    // Audit entries never expire.
    let out = f
        .dynamo
        .query()
        .table_name(&f.table)
        .key_condition_expression("pk = :pk")
        .expression_attribute_values(
            ":pk",
            aws_sdk_dynamodb::types::AttributeValue::S("AUDIT".into()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(out.items().len(), 6);
    assert!(out.items().iter().all(|i| !i.contains_key("expires_at")));
}

#[tokio::test]
async fn event_records_round_trip_and_expire_after_retention() {
    let f = fixture().await;
    let record = EventRecord {
        event_id: "evt-1".into(),
        received_at: T0,
        source: "aws.guardduty".into(),
        alerts: vec![AlertRecord {
            alert_id: "a1".into(),
            kind: AlertKind::Alert,
            title: "Recon".into(),
            evaluation: Evaluation { lines: vec![] },
            runs: vec!["r1".into()],
            refused: None,
        }],
    };
    f.store.put_event(&record).await.unwrap();
    assert_eq!(f.store.get_event("evt-1").await.unwrap().unwrap(), record);
    assert!(f.store.get_event("evt-2").await.unwrap().is_none());
    let raw = f.raw("EVENT#evt-1", "EVENT").await.unwrap();
    assert_eq!(
        attr_n(&raw, "expires_at"),
        Some(T0 / 1000 + i64::from(RETENTION_DAYS) * 86_400)
    );
}

#[tokio::test]
async fn creating_a_run_twice_creates_it_once() {
    let f = fixture().await;
    let r = run("r1", T0);
    let first = sends(&[(msg("r1", "lookup"), 0)]);
    assert!(f.store.create_run(&r, &first).await.unwrap());
    // Sent ahead of the write that creates the run (version 1), with no outbox left to clear.
    assert_eq!(f.drain_sent().await, [(msg("r1", "lookup"), Some(1))]);
    assert!(!f.raw_run("r1").await.unwrap().contains_key("outbox"));

    let mut again = r.clone();
    again.input = json!({"ip": "198.51.100.1"});
    let second = sends(&[(msg("r1", "other"), 0)]);
    assert!(!f.store.create_run(&again, &second).await.unwrap());
    // The refused create's message went out ahead of it: the worker finds the run as the first
    // create left it, where it is stale (as any duplicate would be).
    assert_eq!(f.drain_sent().await, [(msg("r1", "other"), Some(1))]);
    let (loaded, version) = f.store.load_run("r1").await.unwrap().unwrap();
    assert_eq!((loaded, version), (r, 1));
    assert!(f.store.load_run("r2").await.unwrap().is_none());
}

#[tokio::test]
async fn a_stale_save_conflicts_and_changes_nothing() {
    let f = fixture().await;
    let r = run("r1", T0);
    f.store.create_run(&r, &none()).await.unwrap();
    let mut v2 = r.clone();
    v2.status = RunStatus::Running;
    f.store
        .save_run(&v2, 1, &sends(&[(msg("r1", "a"), 0)]))
        .await
        .unwrap();
    assert_eq!(f.drain().await, [msg("r1", "a")]);

    let mut stale = r.clone();
    stale.status = RunStatus::Failed;
    let err = f
        .store
        .save_run(&stale, 1, &sends(&[(msg("r1", "b"), 0)]))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(f.store.load_run("r1").await.unwrap().unwrap(), (v2, 2));
    // Its message went out ahead of it, naming version 2: the worker finds version 2 as the other
    // writer made it, and handles the message against that, as any duplicate.
    assert_eq!(f.drain_sent().await, [(msg("r1", "b"), Some(2))]);
    assert_eq!(f.raw_versions("r1").await.len(), 2);
}

#[tokio::test]
async fn messages_reach_sqs_with_their_delays_and_far_ones_become_timers() {
    let f = fixture().await;
    let r = run("r1", T0);
    f.store.create_run(&r, &none()).await.unwrap();
    let mut resume = msg("r1", "wait");
    resume.kind = MessageKind::Resume;
    let mut expiry = msg("r1", "approve");
    expiry.kind = MessageKind::ApprovalExpired;
    let fx = sends(&[
        (msg("r1", "now"), 0),
        (resume.clone(), 2_000),
        (expiry.clone(), 4 * HOUR),
    ]);
    let sent_at = Instant::now();
    f.store.save_run(&r, 1, &fx).await.unwrap();

    // At once: only the undelayed one; the 2 s one is delayed, the 4 h one is not on SQS.
    assert_eq!(f.drain().await, [msg("r1", "now")]);
    assert_eq!(f.queued().await, 1);
    let got = f.receive(1, Duration::from_secs(10)).await;
    assert_eq!(got, [resume]);
    assert!(
        sent_at.elapsed() >= Duration::from_millis(1_900),
        "a 2 s delay was visible after {:?}",
        sent_at.elapsed()
    );
    // The outbox is gone once everything was sent.
    let raw = f.raw_run("r1").await.unwrap();
    assert!(!raw.contains_key("outbox"));
    assert!(!raw.contains_key("gsi1pk"));

    // The timer fires at its time, not before, and once.
    assert_eq!(f.store.fire_due_timers(T0).await.unwrap(), 0);
    let due = T0 + 4 * HOUR as i64;
    assert_eq!(f.store.fire_due_timers(due - 1).await.unwrap(), 0);
    assert!(f.drain().await.is_empty());
    assert_eq!(f.store.fire_due_timers(due).await.unwrap(), 1);
    assert_eq!(f.drain().await, [expiry]);
    assert_eq!(f.store.fire_due_timers(due + 60_000).await.unwrap(), 0);
    assert_eq!(f.store.fire_due_timers(due + 600_000).await.unwrap(), 0);
    assert_eq!(f.queued().await, 0);
}

#[tokio::test]
async fn a_wide_fan_out_in_one_write_all_arrives() {
    let f = fixture().await;
    let r = run("fan", T0);
    f.store.create_run(&r, &none()).await.unwrap();
    let fx = Effects {
        // 63 SQS messages of at most four, in 7 batches; the compact outbox's room for 1000 is
        // checked in the unit tests.
        messages: (0..250)
            .map(|i| {
                let mut m = msg("fan", "block_ip");
                m.iteration = i;
                (m, 0)
            })
            .collect(),
        new_runs: vec![],
    };
    f.store.save_run(&r, 1, &fx).await.unwrap();
    assert_eq!(
        f.queued().await,
        250usize.div_ceil(riposte_aws::MAX_BUNDLED),
        "the fan-out's messages travel bundled"
    );
    let got: HashSet<u32> = f.drain().await.into_iter().map(|m| m.iteration).collect();
    assert_eq!(got, (0..250).collect());
    assert!(!f.raw_run("fan").await.unwrap().contains_key("outbox"));
}

/// A message for another run than the one written (a child's news for its parent): it cannot be
/// sent ahead of the write (its run's version is not this write's), so it goes through the run's
/// outbox, which these tests are about.
fn news(from: &str, step: &str) -> riposte_core::run::StepMessage {
    msg(&format!("parent-of-{from}"), step)
}

#[tokio::test]
async fn a_writer_that_died_after_committing_is_finished_by_the_next_reader() {
    let f = fixture().await;
    let r = run("r1", T0);
    f.store.create_run(&r, &none()).await.unwrap();
    let mut v2 = r.clone();
    v2.status = RunStatus::Running;
    let fx = sends(&[(news("r1", "a"), 0), (news("r1", "b"), 0)]);
    assert!(f.store.save_run_without_flush(&v2, 1, &fx).await.unwrap());
    // Committed, not sent: the outbox holds the messages.
    let raw = f.raw_run("r1").await.unwrap();
    assert!(attr_s(&raw, "outbox").is_some());
    assert_eq!(attr_n(&raw, "version"), Some(2));
    assert_eq!(f.queued().await, 0);

    // A reader right away leaves it to its writer, presumably still sending it.
    assert_eq!(
        f.store.load_run("r1").await.unwrap().unwrap(),
        (v2.clone(), 2)
    );
    assert_eq!(f.queued().await, 0);
    assert!(f.raw_run("r1").await.unwrap().contains_key("outbox"));
    // Once the writer is presumed dead, the next reader sends them and clears the outbox.
    f.clock.advance(OUTBOX_GRACE_MS);
    assert_eq!(
        f.store.load_run("r1").await.unwrap().unwrap(),
        (v2.clone(), 2)
    );
    let mut got = f.drain().await;
    got.sort_by(|a, b| a.step.cmp(&b.step));
    assert_eq!(got, [news("r1", "a"), news("r1", "b")]);
    let raw = f.raw_run("r1").await.unwrap();
    assert!(!raw.contains_key("outbox"));
    assert!(!raw.contains_key("outbox_id"));
    assert!(!raw.contains_key("gsi1pk"));
    assert_eq!(attr_n(&raw, "version"), Some(2));
}

#[tokio::test]
async fn a_pending_outbox_holds_up_no_writer_and_a_reader_sends_it_once_its_writer_is_presumed_dead()
 {
    let f = fixture().await;
    let r = run("r1", T0);
    f.store.create_run(&r, &none()).await.unwrap();
    assert!(
        f.store
            .save_run_without_flush(&r, 1, &sends(&[(news("r1", "left"), 0)]))
            .await
            .unwrap()
    );
    // The outbox stays on version 2's item; version 3 is a new item beside it, so the next
    // writer neither waits for it nor could overwrite it.
    let mut next = r.clone();
    next.status = RunStatus::Running;
    f.store
        .save_run(&next, 2, &sends(&[(news("r1", "mine"), 0)]))
        .await
        .unwrap();
    assert_eq!(f.drain().await, [news("r1", "mine")]);
    let versions = f.raw_versions("r1").await;
    assert_eq!(versions.len(), 3);
    assert!(versions[1].contains_key("outbox"));
    assert!(!versions[2].contains_key("outbox"));
    // A reader leaves a young outbox to its writer, and sends one whose writer is presumed dead.
    assert_eq!(
        f.store.load_run("r1").await.unwrap().unwrap(),
        (next.clone(), 3)
    );
    assert!(f.drain().await.is_empty());
    f.clock.advance(OUTBOX_GRACE_MS);
    f.store.load_run("r1").await.unwrap().unwrap();
    assert_eq!(f.drain().await, [news("r1", "left")]);
    assert!(!f.raw_versions("r1").await[1].contains_key("outbox"));
    f.store.load_run("r1").await.unwrap().unwrap();
    assert_eq!(f.queued().await, 0);
}

#[tokio::test]
async fn a_creator_that_died_is_finished_by_the_redelivered_create_or_the_sweep() {
    let f = fixture().await;
    // Redelivery: the duplicate create sends the first one's messages, not its own.
    let r = run("r1", T0);
    assert!(
        f.store
            .create_run_without_flush(&r, &sends(&[(news("r1", "start"), 0)]))
            .await
            .unwrap()
    );
    assert_eq!(f.queued().await, 0);
    f.clock.advance(10_000);
    assert!(
        !f.store
            .create_run(&r, &sends(&[(news("r1", "dup"), 0)]))
            .await
            .unwrap()
    );
    assert_eq!(f.drain().await, [news("r1", "start")]);

    // No redelivery and no reader: the timer function's sweep sends it after a minute.
    let lonely = run("r2", T0);
    assert!(
        f.store
            .create_run_without_flush(&lonely, &sends(&[(news("r2", "start"), 0)]))
            .await
            .unwrap()
    );
    let written = f.clock.now();
    assert_eq!(
        f.store
            .flush_stale_outboxes(written + 30_000)
            .await
            .unwrap(),
        0
    );
    assert!(f.drain().await.is_empty());
    assert_eq!(
        f.store
            .flush_stale_outboxes(written + 61_000)
            .await
            .unwrap(),
        1
    );
    assert_eq!(f.drain().await, [news("r2", "start")]);
    assert!(!f.raw_run("r2").await.unwrap().contains_key("outbox"));
    assert_eq!(
        f.store
            .flush_stale_outboxes(written + 120_000)
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn child_runs_are_created_with_the_parent_or_not_at_all() {
    let f = fixture().await;
    let parent = run("p1", T0);
    f.store.create_run(&parent, &none()).await.unwrap();
    let mut waiting = parent.clone();
    waiting.status = RunStatus::Waiting;
    let child = run("p1.sub.0.1", T0 + 5);
    let fx = Effects {
        messages: vec![(msg("p1.sub.0.1", "first"), 0)],
        new_runs: vec![child.clone()],
    };
    f.store.save_run(&waiting, 1, &fx).await.unwrap();
    assert_eq!(
        f.store.load_run("p1.sub.0.1").await.unwrap().unwrap(),
        (child.clone(), 1)
    );
    assert_eq!(f.store.load_run("p1").await.unwrap().unwrap().1, 2);
    // The child's first message went out ahead of the write that created the child (version 1).
    assert_eq!(
        f.drain_sent().await,
        [(msg("p1.sub.0.1", "first"), Some(1))]
    );

    // Another write creating the same child fails as a whole.
    let other = run("p2", T0);
    f.store.create_run(&other, &none()).await.unwrap();
    let mut other_next = other.clone();
    other_next.status = RunStatus::Waiting;
    let mut impostor = child.clone();
    impostor.input = json!({"ip": "192.0.2.1"});
    let err = f
        .store
        .save_run(
            &other_next,
            1,
            &Effects {
                messages: vec![(msg("p2", "x"), 0)],
                new_runs: vec![impostor],
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("child run p1.sub.0.1")),
        "{err:?}"
    );
    assert_eq!(f.store.load_run("p2").await.unwrap().unwrap(), (other, 1));
    assert_eq!(
        f.store.load_run("p1.sub.0.1").await.unwrap().unwrap(),
        (child, 1)
    );
    // Its message went out ahead of a write that never landed: the run is still at version 1.
    assert_eq!(f.drain_sent().await, [(msg("p2", "x"), Some(2))]);

    // And a stale parent creates no child.
    let fresh_child = run("p1.sub.0.2", T0);
    let err = f
        .store
        .save_run(
            &waiting,
            1,
            &Effects {
                messages: vec![(msg("p1.sub.0.2", "first"), 0)],
                new_runs: vec![fresh_child],
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert!(f.store.load_run("p1.sub.0.2").await.unwrap().is_none());
    // Ahead of a child that was never created: the worker keeps finding no run, and drops it
    // when the queue gives up on it.
    assert_eq!(
        f.drain_sent().await,
        [(msg("p1.sub.0.2", "first"), Some(1))]
    );
}

#[tokio::test]
async fn a_600_kb_output_is_truncated_and_the_write_succeeds() {
    let f = fixture().await;
    let r = run("big", T0);
    f.store.create_run(&r, &none()).await.unwrap();
    let mut done = r.clone();
    let mut it = Iteration::new(None);
    it.status = StepStatus::Succeeded;
    it.output = Some(json!({"log": "x".repeat(600 * 1024)}));
    done.steps = vec![StepState {
        id: "fetch".into(),
        status: StepStatus::Succeeded,
        iterations: vec![it],
        looped: false,
        output: Some(json!({"summary": "ok"})),
        error: None,
        switch_value: None,
        started_at: Some(T0),
        finished_at: Some(T0 + 1),
    }];
    f.clock.advance(1_000);
    f.store.save_run(&done, 1, &none()).await.unwrap();
    let (loaded, v) = f.store.load_run("big").await.unwrap().unwrap();
    assert_eq!(v, 2);
    let out = loaded.steps[0].iterations[0].output.clone().unwrap();
    assert_eq!(out["truncated"], json!(true));
    assert!(out["original_bytes"].as_u64().unwrap() > 600 * 1024);
    assert_eq!(loaded.steps[0].output, Some(json!({"summary": "ok"})));
    let last = loaded.history.last().unwrap();
    assert_eq!(last.event, "output_truncated");
    assert_eq!(last.at, T0 + 1_000);
    let raw = f.raw_run("big").await.unwrap();
    let body = inflated(&raw, "z").or_else(|| inflated(&raw, "p")).unwrap();
    assert!(body.len() <= 350 * 1024, "{} bytes", body.len());
}

const DAY: i64 = 86_400_000;

/// The expiry (epoch seconds) retention gives a record counted from `at`.
fn retained_from(at: i64) -> Option<i64> {
    Some(at / 1000 + i64::from(RETENTION_DAYS) * 86_400)
}

#[tokio::test]
async fn a_runs_records_expire_together_retention_after_it_ends_and_a_day_at_most_later() {
    let f = fixture().await;
    let r = run("r1", T0);
    f.store.create_run(&r, &none()).await.unwrap();
    // Every item of a chain carries its snapshot's time plus a day plus retention; the input,
    // retention after a day past its run's creation.
    let chain_expiry = retained_from(T0 + DAY);
    assert_eq!(
        attr_n(&f.raw_run("r1").await.unwrap(), "expires_at"),
        chain_expiry
    );
    let input = f.raw("RUN#r1", "INPUT").await.unwrap();
    assert_eq!(attr_n(&input, "expires_at"), chain_expiry);
    let mut done = r.clone();
    done.status = RunStatus::Succeeded;
    done.finished_at = Some(T0 + 10);
    done.updated_at = T0 + 10;
    let now = f.clock.advance(10_000);
    f.store.save_run(&done, 1, &none()).await.unwrap();
    let raw = f.raw_run("r1").await.unwrap();
    assert!(
        raw.contains_key("p"),
        "the finishing write is a patch of the same chain"
    );
    assert_eq!(attr_n(&raw, "expires_at"), chain_expiry);
    // Kept at least retention after it ended, and at most a day more.
    let expiry = chain_expiry.unwrap();
    let ended = retained_from(now).unwrap();
    assert!(
        expiry >= ended && expiry < ended + 86_400,
        "{expiry} vs {ended}"
    );
    // The input, as written: it never expires before its run.
    let input = f.raw("RUN#r1", "INPUT").await.unwrap();
    assert_eq!(attr_n(&input, "expires_at"), chain_expiry);
    // A redelivered event creating the same run again does not make its input immortal.
    assert!(!f.store.create_run(&r, &none()).await.unwrap());
    let input = f.raw("RUN#r1", "INPUT").await.unwrap();
    assert_eq!(attr_n(&input, "expires_at"), chain_expiry);
    // Once expired, the run is gone for readers even before DynamoDB deletes its items.
    assert!(
        f.store
            .list_runs(10, None)
            .await
            .unwrap()
            .iter()
            .any(|s| s.id == "r1")
    );
    f.clock.set(expiry * 1000);
    assert_eq!(f.store.load_run("r1").await.unwrap(), None);
    assert!(f.store.list_runs(10, None).await.unwrap().is_empty());
    assert_eq!(f.raw_versions("r1").await.len(), 2);
}

#[tokio::test]
async fn a_run_written_after_a_day_starts_a_new_chain_and_extends_its_inputs_expiry() {
    let f = fixture().await;
    let r = run("r1", T0);
    f.store.create_run(&r, &none()).await.unwrap();
    let mut done = r.clone();
    done.status = RunStatus::Succeeded;
    done.finished_at = Some(T0 + 3 * DAY);
    done.updated_at = T0 + 3 * DAY;
    f.clock.advance(3 * DAY);
    f.store.save_run(&done, 1, &none()).await.unwrap();
    let raw = f.raw_run("r1").await.unwrap();
    assert!(
        raw.contains_key("z"),
        "a snapshot: the old chain expires first"
    );
    assert_eq!(attr_n(&raw, "base"), Some(2));
    let run_expiry = attr_n(&raw, "expires_at").unwrap();
    assert_eq!(Some(run_expiry), retained_from(T0 + 4 * DAY));
    let input = f.raw("RUN#r1", "INPUT").await.unwrap();
    assert_eq!(attr_n(&input, "expires_at"), retained_from(T0 + 4 * DAY));
    // The first chain expired: the run reads from the second.
    f.clock.set(retained_from(T0 + DAY).unwrap() * 1000);
    assert_eq!(f.store.load_run("r1").await.unwrap().unwrap().0, done);
}

/// `r` waiting on its one step `step`, whose one iteration is `it`.
/// An iteration waiting until `due` (its wake).
fn waiting_until(due: i64) -> Iteration {
    let mut it = Iteration::new(None);
    it.status = StepStatus::Waiting;
    it.wake_at = Some(due);
    it
}

fn waiting_on(r: &riposte_core::run::Run, step: &str, it: Iteration) -> riposte_core::run::Run {
    let mut waiting = r.clone();
    waiting.status = RunStatus::Waiting;
    waiting.steps = vec![StepState {
        id: step.into(),
        status: StepStatus::Waiting,
        iterations: vec![it],
        looped: false,
        output: None,
        error: None,
        switch_value: None,
        started_at: Some(T0),
        finished_at: None,
    }];
    waiting
}

#[tokio::test]
async fn a_run_waiting_a_day_with_nothing_due_is_written_again_by_the_timer() {
    let f = fixture().await;
    let r = run("r1", T0);
    f.store.create_run(&r, &none()).await.unwrap();
    // Waiting for a human with no expiry (a call whose outcome is unknown): no wake of its own.
    let mut it = Iteration::new(None);
    it.status = StepStatus::Waiting;
    let mut waiting = waiting_on(&r, "call", it);
    waiting.updated_at = T0 + 1_000;
    assert!(waiting.wakes().is_empty());
    f.store.save_run(&waiting, 1, &none()).await.unwrap();
    // Before its day is out the timer leaves it alone.
    assert_eq!(f.store.fire_due_wakes(T0 + DAY - 60_000).await.unwrap(), 0);
    assert_eq!(f.store.load_run("r1").await.unwrap().unwrap().1, 2);
    // A day on, it is written again: its input is kept a day longer, and its wake moves on.
    let now = T0 + DAY + 10_000;
    f.clock.set(now);
    assert_eq!(f.store.fire_due_wakes(now).await.unwrap(), 0);
    assert!(f.drain().await.is_empty(), "nothing is sent");
    let (again, version) = f.store.load_run("r1").await.unwrap().unwrap();
    assert_eq!(version, 3);
    assert_eq!(again.status, RunStatus::Waiting);
    assert_eq!(again.steps, waiting.steps);
    let input = f.raw("RUN#r1", "INPUT").await.unwrap();
    assert_eq!(attr_n(&input, "expires_at"), retained_from(now + DAY));
    // Not again within that day.
    assert_eq!(f.store.fire_due_wakes(now + DAY - 60_000).await.unwrap(), 0);
    assert_eq!(f.store.load_run("r1").await.unwrap().unwrap().1, 3);
}

#[tokio::test]
async fn the_input_is_written_once_and_each_step_rewrites_a_small_deflated_item() {
    let f = fixture().await;
    let mut r = run("r1", T0);
    // An alert the size of a GuardDuty finding.
    r.input = json!({"alert": {"raw": {"detail": "x".repeat(6_000)}, "title": "t"}});
    f.store.create_run(&r, &none()).await.unwrap();
    let raw = f.raw_run("r1").await.unwrap();
    let stored: serde_json::Value = serde_json::from_str(&inflated(&raw, "z").unwrap()).unwrap();
    assert_eq!(stored["input"], json!(null), "the run item holds no input");
    let body = match raw.get("z") {
        Some(AttributeValue::B(b)) => b.as_ref().len(),
        other => panic!("a deflated body: {other:?}"),
    };
    assert!(body < 1024, "the run item's body is {body} bytes");
    assert!(f.raw("RUN#r1", "INPUT").await.is_some());
    // Loaded, the run has its input back; saved, it keeps it.
    let (mut loaded, v) = f.store.load_run("r1").await.unwrap().unwrap();
    assert_eq!(loaded, r);
    loaded.status = RunStatus::Running;
    f.store.save_run(&loaded, v, &none()).await.unwrap();
    assert_eq!(f.store.load_run("r1").await.unwrap().unwrap().0, loaded);
}

#[tokio::test]
async fn runs_list_newest_first_and_filter_on_status_across_pages() {
    let f = fixture().await;
    // Two old failed runs below thirty newer queued ones: the filter has to page.
    for (i, status) in [(0, RunStatus::Failed), (1, RunStatus::Failed)] {
        let mut r = run(&format!("old-{i}"), T0 + i);
        r.status = status;
        f.store.create_run(&r, &none()).await.unwrap();
    }
    for i in 0..30 {
        f.store
            .create_run(&run(&format!("new-{i:02}"), T0 + 100 + i), &none())
            .await
            .unwrap();
    }
    let mut running = run("middle", T0 + 50);
    running.status = RunStatus::Running;
    f.store.create_run(&running, &none()).await.unwrap();

    // A status changed by a patch, and one written after a day (a new snapshot, listed again
    // by the index): each run is listed once, as its latest version has it.
    let (mut done, v) = f.store.load_run("new-05").await.unwrap().unwrap();
    done.status = RunStatus::Succeeded;
    done.finished_at = Some(T0 + 500);
    f.store.save_run(&done, v, &none()).await.unwrap();
    f.clock.advance(2 * DAY);
    let (mut old, v) = f.store.load_run("old-0").await.unwrap().unwrap();
    old.status = RunStatus::Cancelled;
    old.finished_at = Some(T0 + 2 * DAY);
    f.store.save_run(&old, v, &none()).await.unwrap();
    assert_eq!(f.raw_versions("old-0").await.len(), 2);
    assert!(f.raw_run("old-0").await.unwrap().contains_key("gsi2pk"));
    let ended: Vec<_> = f
        .store
        .list_runs(100, None)
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.finished_at.is_some())
        .map(|s| (s.id, s.status, s.finished_at))
        .collect();
    assert_eq!(
        ended,
        [
            ("new-05".into(), RunStatus::Succeeded, Some(T0 + 500)),
            ("old-0".into(), RunStatus::Cancelled, Some(T0 + 2 * DAY))
        ]
    );

    let all = f.store.list_runs(100, None).await.unwrap();
    assert_eq!(all.len(), 33);
    assert_eq!(all[0].id, "new-29");
    assert!(all.windows(2).all(|w| w[0].created_at >= w[1].created_at));
    let top: Vec<_> = f
        .store
        .list_runs(3, None)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(top, ["new-29", "new-28", "new-27"]);

    let cancelled = f
        .store
        .list_runs(5, Some(RunStatus::Cancelled))
        .await
        .unwrap();
    assert_eq!(cancelled.len(), 1);
    assert_eq!(cancelled[0].id, "old-0");
    let failed = f.store.list_runs(5, Some(RunStatus::Failed)).await.unwrap();
    let failed: Vec<_> = failed.iter().map(|s| (s.id.as_str(), s.status)).collect();
    assert_eq!(failed, [("old-1", RunStatus::Failed)]);
    let one = f
        .store
        .list_runs(1, Some(RunStatus::Running))
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(
        (
            one[0].id.as_str(),
            one[0].playbook_id.as_str(),
            one[0].created_at
        ),
        ("middle", "block-ip", T0 + 50)
    );
    assert!(
        f.store
            .list_runs(5, Some(RunStatus::Waiting))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(f.store.list_runs(0, None).await.unwrap().is_empty());
}

#[tokio::test]
async fn rate_cap_tokens_run_out_atomically_and_settings_round_trip() {
    let f = fixture().await;
    // Ten takes for 3 tokens: exactly 3 win. Each take is one conditional update, which
    // DynamoDB applies atomically; moto's threaded server does not serialize concurrent
    // conditional writes, so the takes are made one after another here.
    let mut won = 0;
    for _ in 0..10 {
        if f.store
            .take_token("entra.disable_user#0", 3, T0 + 3_600_000)
            .await
            .unwrap()
        {
            won += 1;
        }
    }
    assert_eq!(won, 3);
    // Another window (or operation) has its own tokens.
    assert!(
        f.store
            .take_token("entra.disable_user#3600000", 3, T0 + 7_200_000)
            .await
            .unwrap()
    );
    let raw = f
        .raw("TOKENS#entra.disable_user#0", "TOKENS")
        .await
        .unwrap();
    assert_eq!(
        raw.get("taken")
            .and_then(|v| v.as_n().ok())
            .map(String::as_str),
        Some("3")
    );
    // The bucket expires by TTL after its window.
    assert_eq!(
        raw.get("expires_at")
            .and_then(|v| v.as_n().ok())
            .map(String::as_str),
        Some(((T0 + 3_600_000) / 1000 + 1).to_string().as_str())
    );

    assert_eq!(f.store.get_setting("kill_switch").await.unwrap(), None);
    let on = json!({"on": true, "by": "carl", "at": T0, "reason": "review"});
    f.store.put_setting("kill_switch", &on).await.unwrap();
    assert_eq!(f.store.get_setting("kill_switch").await.unwrap(), Some(on));
}

#[tokio::test]
async fn a_waiting_runs_far_wake_is_kept_with_the_run_and_sent_by_the_timer_when_due() {
    let f = fixture().await;
    let r = run("r1", T0);
    f.store.create_run(&r, &none()).await.unwrap();
    // The approval step begins to wait: its expiry, 4 h out, is what the engine sends.
    let due = T0 + 4 * HOUR as i64;
    let mut it = waiting_until(due);
    it.approval = Some(riposte_core::run::ApprovalState {
        nonce_hash: "h".into(),
        message: "Block?".into(),
        choices: vec!["block".into(), "ignore".into()],
        default: Some("ignore".into()),
        approvers: vec![],
        expires_at: due,
        decision: None,
        sent: vec![],
    });
    let waiting = waiting_on(&r, "approve", it);
    let mut expiry = msg("r1", "approve");
    expiry.kind = MessageKind::ApprovalExpired;
    assert_eq!(waiting.wakes(), [(expiry.clone(), due)]);
    f.store
        .save_run(&waiting, 1, &sends(&[(expiry.clone(), 4 * HOUR)]))
        .await
        .unwrap();
    // Nothing queued, no outbox, no timer item: the run's wake index holds it.
    assert!(f.drain().await.is_empty());
    let raw = f.raw_run("r1").await.unwrap();
    assert!(!raw.contains_key("outbox"));
    assert_eq!(
        attr_s(&raw, "gsi3pk").map(|p| p.starts_with("WAKE#")),
        Some(true)
    );
    assert_eq!(f.store.fire_due_timers(due).await.unwrap(), 0);
    // The timer sends it once due (after a few seconds' grace), not before, and once.
    assert_eq!(f.store.fire_due_wakes(due - 60_000).await.unwrap(), 0);
    assert_eq!(f.store.fire_due_wakes(due + 10_000).await.unwrap(), 1);
    assert_eq!(f.drain().await, [expiry.clone()]);
    assert_eq!(f.store.fire_due_wakes(due + 70_000).await.unwrap(), 0);

    // Answered before its expiry, a run no longer waits for it: the answer's version has no
    // wake, and the version that waited keeps its entry, left to expire with its item. When
    // the timer's sweep passes it, the run is read once, and nothing is sent or written.
    let (timer, queries) = recorded(&f, "Query");
    let r2 = run("r2", T0);
    f.store.create_run(&r2, &none()).await.unwrap();
    let mut it = waiting.steps[0].iterations[0].clone();
    it.wake_at = Some(due + HOUR as i64);
    let waiting2 = waiting_on(&r2, "approve", it);
    f.store.save_run(&waiting2, 1, &none()).await.unwrap();
    let mut answered = waiting2.clone();
    answered.status = RunStatus::Running;
    answered.steps[0].iterations[0].status = StepStatus::Succeeded;
    answered.steps[0].iterations[0].wake_at = None;
    f.store.save_run(&answered, 2, &none()).await.unwrap();
    let versions = f.raw_versions("r2").await;
    assert!(!versions[2].contains_key("gsi3pk"));
    assert!(versions[1].contains_key("gsi3pk"));
    for tick in 1..=3 {
        let at = due + HOUR as i64 + tick * 60_000;
        assert_eq!(timer.fire_due_wakes(at).await.unwrap(), 0);
    }
    assert!(f.drain().await.is_empty());
    assert_eq!(f.raw_versions("r2").await.len(), 3);
    // Each sweep queries the 16 shards of the index; of the run, one look at its latest
    // version's number (one item, eventually consistent: half a read unit) showed the entry
    // superseded, and the run was not read.
    let queries = queries.1.lock().unwrap().clone();
    assert_eq!(queries.len(), 3 * 16 + 1);
    let of_run: Vec<&serde_json::Value> = queries
        .iter()
        .filter(|q| q.get("IndexName").is_none())
        .collect();
    assert_eq!(of_run.len(), 1, "{of_run:?}");
    assert_eq!(of_run[0]["Limit"], 1);
    assert_eq!(of_run[0]["ProjectionExpression"], "version");
    assert_ne!(of_run[0]["ConsistentRead"], true);
}

/// A run that still waits after a later write has two entries in the wake index, the later
/// version's due no sooner: when one sweep passes both, the newer entry is what counts, and
/// the wake is sent once (the older entry alone would look superseded).
#[tokio::test]
async fn a_wake_listed_by_two_versions_of_a_waiting_run_is_sent_once() {
    let f = fixture().await;
    let r = run("r1", T0);
    f.store.create_run(&r, &none()).await.unwrap();
    let due = T0 + 4 * HOUR as i64;
    let waiting = waiting_on(&r, "wait", waiting_until(due));
    let mut wake = msg("r1", "wait");
    wake.kind = MessageKind::Resume;
    assert_eq!(waiting.wakes(), [(wake.clone(), due)]);
    f.store.save_run(&waiting, 1, &none()).await.unwrap();
    // Another branch's outcome is recorded meanwhile; the run still waits, as before.
    let mut later = waiting.clone();
    later.updated_at = T0 + 1;
    f.store.save_run(&later, 2, &none()).await.unwrap();
    let versions = f.raw_versions("r1").await;
    assert!(versions[1].contains_key("gsi3pk") && versions[2].contains_key("gsi3pk"));
    assert_eq!(f.store.fire_due_wakes(due + 10_000).await.unwrap(), 1);
    assert_eq!(f.drain().await, [wake]);
}

#[tokio::test]
async fn reads_of_one_run_made_at_once_share_one_query_and_none_outlives_a_write() {
    let f = fixture().await;
    let (store, queries) = recorded(&f, "Query");
    let r = run("r1", T0);
    store.create_run(&r, &none()).await.unwrap();
    // Three messages of the run in one batch load it at once: one query answers all three.
    let loads = tokio::join!(
        store.load_run("r1"),
        store.load_run("r1"),
        store.load_run("r1")
    );
    assert_eq!(queries.count(), 1);
    for l in [loads.0, loads.1, loads.2] {
        assert_eq!(l.unwrap(), Some((r.clone(), 1)));
    }
    // Once it has landed, a new read queries again and sees the write that came after.
    let mut next = r.clone();
    next.status = RunStatus::Running;
    store.save_run(&next, 1, &none()).await.unwrap();
    assert_eq!(store.load_run("r1").await.unwrap(), Some((next, 2)));
    assert_eq!(queries.count(), 2);
}

/// What DynamoDB bills a write of `item` by, about: its attribute names and values.
fn billed_bytes(item: &std::collections::HashMap<String, AttributeValue>) -> usize {
    item.iter()
        .map(|(k, v)| {
            k.len()
                + match v {
                    AttributeValue::S(s) => s.len(),
                    AttributeValue::N(n) => n.len(),
                    AttributeValue::B(b) => b.as_ref().len(),
                    _ => 1,
                }
        })
        .sum()
}

#[tokio::test]
async fn a_step_of_a_large_run_writes_only_what_it_changed() {
    let f = fixture().await;
    // A loop over 800 entities, each iteration's output a vendor's answer: a run above 8 KB
    // even deflated.
    let mut r = run("wide", T0);
    r.status = RunStatus::Running;
    r.steps = vec![StepState {
        id: "disable_users".into(),
        status: StepStatus::Running,
        iterations: (0..800)
            .map(|i| {
                let mut it = Iteration::new(Some(json!(format!("user{i}@example.com"))));
                it.status = StepStatus::Succeeded;
                it.output = Some(json!({"id": format!("{i:08x}-5f1c-4b8e-9d7a-{:012x}", i * 7919), "accountEnabled": false}));
                it
            })
            .collect(),
        looped: true,
        output: None,
        error: None,
        switch_value: None,
        started_at: Some(T0),
        finished_at: None,
    }];
    f.store.create_run(&r, &none()).await.unwrap();
    let first = f.raw_run("wide").await.unwrap();
    assert!(billed_bytes(&first) > 8192, "{}", billed_bytes(&first));
    // The last iteration is retried: one changed output, one history entry.
    let (mut next, v) = f.store.load_run("wide").await.unwrap().unwrap();
    next.steps[0].iterations[799].attempt = 2;
    next.steps[0].iterations[799].output = Some(json!({"id": "retried", "accountEnabled": false}));
    f.store.save_run(&next, v, &none()).await.unwrap();
    let patch = f.raw_run("wide").await.unwrap();
    assert!(patch.contains_key("p"), "a patch, not the whole run again");
    assert!(
        billed_bytes(&patch) < 1024,
        "{} bytes",
        billed_bytes(&patch)
    );
    assert_eq!(f.store.load_run("wide").await.unwrap().unwrap(), (next, 2));
}

#[tokio::test]
async fn an_unreadable_run_in_the_wake_index_holds_up_no_other_runs_wake() {
    let f = fixture().await;
    let due = T0 + 4 * HOUR as i64;
    for id in ["bad", "good"] {
        let r = run(id, T0);
        f.store.create_run(&r, &none()).await.unwrap();
        let mut it = Iteration::new(None);
        it.status = StepStatus::Waiting;
        it.wake_at = Some(due);
        f.store
            .save_run(&waiting_on(&r, "wait", it), 1, &none())
            .await
            .unwrap();
    }
    // "bad"'s latest version is damaged (a patch that is not deflate data).
    let mut item = f.raw_run("bad").await.unwrap();
    item.insert(
        "p".into(),
        AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(
            b"not a patch".to_vec(),
        )),
    );
    f.dynamo
        .put_item()
        .table_name(&f.table)
        .set_item(Some(item))
        .send()
        .await
        .unwrap();
    let timer = recorded(&f, "Query").0;
    assert_eq!(timer.fire_due_wakes(due + 10_000).await.unwrap(), 1);
    let mut resume = msg("good", "wait");
    resume.kind = MessageKind::Resume;
    assert_eq!(f.drain().await, [resume]);
    assert!(matches!(
        timer.load_run("bad").await,
        Err(StoreError::Corrupt(e)) if e.contains("bad version 2")
    ));
}

#[tokio::test]
async fn writers_racing_from_one_version_make_it_once_and_the_log_reads_as_the_winner_wrote() {
    let f = fixture().await;
    let r = run("r1", T0);
    f.store.create_run(&r, &none()).await.unwrap();
    // Eight processes, each having read version 1 (so each patches from it).
    let mut writers = Vec::new();
    for i in 0..8 {
        let (store, _) = recorded(&f, "Query");
        let (mut mine, v) = store.load_run("r1").await.unwrap().unwrap();
        mine.status = RunStatus::Running;
        mine.error = Some(format!("writer {i}"));
        writers.push((store, mine, v));
    }
    let fx = none();
    let results = futures_util::future::join_all(
        writers
            .iter()
            .map(|(store, mine, v)| store.save_run(mine, *v, &fx)),
    )
    .await;
    let won: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_ok())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(won.len(), 1, "{results:?}");
    for r in &results {
        assert!(matches!(r, Ok(()) | Err(StoreError::Conflict(_))), "{r:?}");
    }
    let winner = &writers[won[0]].1;
    assert_eq!(
        f.store.load_run("r1").await.unwrap().unwrap(),
        (winner.clone(), 2)
    );
    assert_eq!(f.raw_versions("r1").await.len(), 2);
    // A loser reloads and writes the next version as a patch of what the winner wrote.
    let loser = &writers[(won[0] + 1) % 8].0;
    let (mut again, v) = loser.load_run("r1").await.unwrap().unwrap();
    again.status = RunStatus::Succeeded;
    loser.save_run(&again, v, &none()).await.unwrap();
    assert!(f.raw_run("r1").await.unwrap().contains_key("p"));
    assert_eq!(f.store.load_run("r1").await.unwrap().unwrap(), (again, 3));
}

/// Records the body of each DynamoDB request of one operation (by its `X-Amz-Target`).
#[derive(Debug, Clone)]
struct Bodies(&'static str, Arc<std::sync::Mutex<Vec<serde_json::Value>>>);

impl aws_sdk_dynamodb::config::Intercept for Bodies {
    fn name(&self) -> &'static str {
        "bodies"
    }

    fn read_before_transmit(
        &self,
        context: &aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _: &aws_sdk_dynamodb::config::RuntimeComponents,
        _: &mut aws_sdk_dynamodb::config::ConfigBag,
    ) -> Result<(), aws_sdk_dynamodb::error::BoxError> {
        let request = context.request();
        let target = request.headers().get("x-amz-target");
        if target.is_some_and(|t| t.ends_with(&format!(".{}", self.0))) {
            let body = serde_json::from_slice(request.body().bytes().unwrap_or_default())?;
            self.1.lock().unwrap().push(body);
        }
        Ok(())
    }
}

impl Bodies {
    /// How many requests were recorded.
    fn count(&self) -> usize {
        self.1.lock().unwrap().len()
    }
}

/// A second store over the fixture's table whose requests of `op` are recorded.
fn recorded(f: &Fixture, op: &'static str) -> (riposte_aws::DynamoStore, Bodies) {
    let bodies = Bodies(op, Arc::default());
    let client = aws_sdk_dynamodb::Client::from_conf(
        f.dynamo
            .config()
            .to_builder()
            .interceptor(bodies.clone())
            .build(),
    );
    let store = riposte_aws::DynamoStore::new(
        client,
        f.sqs.clone(),
        riposte_aws::AwsConfig {
            table: f.table.clone(),
            queue_url: f.queue_url.clone(),
            retention_days: RETENTION_DAYS,
        },
        f.clock.clone(),
    );
    (store, bodies)
}

/// Each GetItem recorded: its key (`pk|sk`) and whether it asked for a strongly consistent
/// read, sorted.
fn get_items(bodies: &Bodies) -> Vec<(String, bool)> {
    let mut got: Vec<(String, bool)> = bodies
        .1
        .lock()
        .unwrap()
        .drain(..)
        .map(|b| {
            let key = format!("{}|{}", b["Key"]["pk"]["S"], b["Key"]["sk"]["S"]);
            (
                key.replace('"', ""),
                b["ConsistentRead"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    got.sort();
    got
}

/// A playbook version never changes once written, so it is read eventually consistent (half
/// the read units: a 4.5 KB playbook costs 1 RRU instead of 2); its head, which says which
/// version is latest and whether the playbook was deleted, strongly.
#[tokio::test]
async fn a_playbook_version_is_read_at_half_price_and_its_head_strongly() {
    let f = fixture().await;
    let (store, gets) = recorded(&f, "GetItem");
    store
        .put_playbook(&playbook("block-ip", "Block an IP"), "ann", T0)
        .await
        .unwrap();
    gets.1.lock().unwrap().clear();
    let latest = store.get_playbook("block-ip", None).await.unwrap().unwrap();
    let pinned = store
        .get_playbook("block-ip", Some(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((latest.version, pinned.version), (1, 1));
    let (head, v1) = ("PB#block-ip|HEAD", "PB#block-ip|V#0000000001");
    assert_eq!(
        get_items(&gets),
        [
            (head.to_string(), true),
            (head.to_string(), true),
            (v1.to_string(), false),
            (v1.to_string(), false),
        ]
    );
    // Which version is latest, alone: the head, strongly.
    assert_eq!(
        store.latest_playbook_version("block-ip").await.unwrap(),
        Some(1)
    );
    assert_eq!(get_items(&gets), [(head.to_string(), true)]);
    // A version not found by an eventually consistent read (too recent for every replica, or
    // absent) is asked for again, strongly: absent is only ever the table's answer.
    assert!(
        store
            .get_playbook("block-ip", Some(2))
            .await
            .unwrap()
            .is_none()
    );
    let v2 = "PB#block-ip|V#0000000002";
    assert_eq!(
        get_items(&gets),
        [
            (head.to_string(), true),
            (v2.to_string(), false),
            (v2.to_string(), true),
        ]
    );
    store.delete_playbook("block-ip").await.unwrap();
    assert_eq!(
        store.latest_playbook_version("block-ip").await.unwrap(),
        None
    );
}

/// A read that may lag (for showing a run: the approval's confirm page) is eventually
/// consistent, at half the price; the reads writers write on are strongly consistent.
#[tokio::test]
async fn a_lagging_read_of_a_run_is_eventually_consistent_and_a_load_strongly() {
    let f = fixture().await;
    let (store, queries) = recorded(&f, "Query");
    let r = run("r1", T0);
    store.create_run(&r, &none()).await.unwrap();
    let shown = store.load_run_lagging("r1").await.unwrap().unwrap();
    let loaded = store.load_run("r1").await.unwrap().unwrap();
    assert_eq!((shown.0.id.as_str(), shown.1), ("r1", 1));
    assert_eq!(shown, loaded);
    let consistent: Vec<bool> = queries
        .1
        .lock()
        .unwrap()
        .iter()
        .map(|q| q["ConsistentRead"].as_bool().unwrap_or(false))
        .collect();
    assert_eq!(consistent, [false, true]);
}
