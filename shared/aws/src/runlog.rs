//! A run as a log of version items: what each write stores, and how a run is read back.
//!
//! DynamoDB bills a write by the size of the whole item written (the larger of before and
//! after), so a run kept as one item rewritten at every step pays for all of it at every step:
//! 2 WRU once a ticket is open and an approval asked, and far more for a run looping over many
//! entities. Instead each write puts a new item, `V#<version>`, conditioned on it not existing
//! (which is the optimistic-concurrency check: two writers from the same version race for the
//! same key). It holds either the whole run (a **snapshot**, `z`) or a JSON Patch (RFC 6902)
//! from the previous version (`p`), both deflated, so that a step's write costs what the step
//! changed: 1 WRU for the reference playbook's steps.
//!
//! A **chain** is a snapshot and the patches that follow it. A writer patches only from the
//! version it knows exactly (the one it read or wrote itself, which it keeps in memory);
//! otherwise, or when the chain is a day old, or its patches come to more than the run itself
//! (deflated, and at least [`MAX_CHAIN_BYTES`]), it writes a snapshot: a read brings at most
//! about twice the run. Every item of a chain carries the chain's expiry
//! (the snapshot's time, plus a day, plus the retention), so a chain expires as a whole, and a
//! run written at least daily (the timer writes a run that waits longer) never loses the chain
//! it reads. A reader queries the partition newest first and applies the latest chain.
//!
//! Guarantee: a reader (`Chain::run_json`) gets exactly the JSON the writer of the latest
//! version stored, or fails as corrupt naming the version; it never returns an older state as
//! current.

use std::collections::HashMap;
use std::sync::Mutex;

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use serde_json::Value;

use riposte_core::model::Millis;
use riposte_core::store::StoreError;

use crate::item::{Item, ItemExt, from_json, to_json};
use crate::pack::{deflate, inflate};
use crate::table::TTL_ATTRIBUTE;

/// A snapshot's body: the run's JSON (without its input), deflated.
pub(crate) const SNAPSHOT_ATTRIBUTE: &str = "z";
/// A patch's body: the JSON Patch from the previous version's JSON, deflated.
pub(crate) const PATCH_ATTRIBUTE: &str = "p";
/// The version of the snapshot a version item's chain starts from (its own, for a snapshot).
pub(crate) const BASE_ATTRIBUTE: &str = "base";
/// When (store clock, ms) that snapshot was written.
pub(crate) const SNAP_AT_ATTRIBUTE: &str = "snap_at";
/// Patches (deflated) a chain may hold whatever the run's size; beyond this and beyond the
/// run's own size, a new snapshot.
pub const MAX_CHAIN_BYTES: usize = 8 * 1024;
/// A chain older than this gets a new snapshot, so that a live run's chain never expires.
pub const MAX_CHAIN_AGE_MS: Millis = crate::runs::INPUT_HORIZON_MS;
/// Runs remembered per process (a run's JSON is at most about 350 KB, so this bounds the memory
/// to about 11 MB; a step worker's batch holds at most 10 runs); beyond this the memory is
/// cleared (the next write of a forgotten run is a snapshot, which is correct, only larger).
const RECENT_RUNS: usize = 32;

/// What this process knows exactly of a run's latest stored version: the JSON it read or wrote.
#[derive(Clone, Debug)]
pub(crate) struct Recent {
    pub version: u64,
    pub json: Value,
    pub base: u64,
    pub snap_at: Millis,
    /// Deflated bytes of the chain's patches so far.
    pub patch_bytes: usize,
}

/// The [`Recent`] versions of the runs this process read or wrote.
#[derive(Default)]
pub(crate) struct RecentRuns(Mutex<HashMap<String, Recent>>);

impl RecentRuns {
    /// What is known of `run_id` at exactly `version`.
    pub fn at(&self, run_id: &str, version: u64) -> Option<Recent> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(run_id).filter(|r| r.version == version).cloned()
    }

    pub fn remember(&self, run_id: &str, recent: Recent) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= RECENT_RUNS && !map.contains_key(run_id) {
            map.clear();
        }
        map.insert(run_id.to_string(), recent);
    }

    pub fn forget(&self, run_id: &str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(run_id);
    }
}

/// A version item's body, chosen by [`encode`].
pub(crate) struct Encoded {
    /// [`SNAPSHOT_ATTRIBUTE`] or [`PATCH_ATTRIBUTE`], and its deflated bytes.
    pub attribute: &'static str,
    pub bytes: Vec<u8>,
    /// What this process knows once the write lands.
    pub recent: Recent,
}

/// The body of version `version` whose JSON is `json` (text `body`): a patch from `prev` when
/// that is the previous version, its chain is younger than a day and stays under
/// what [`MAX_CHAIN_BYTES`] and the run's size allow, and the patch is smaller than a snapshot;
/// else a snapshot.
pub(crate) fn encode(
    prev: Option<Recent>,
    version: u64,
    body: &str,
    json: Value,
    now: Millis,
) -> Result<Encoded, StoreError> {
    let snapshot = deflate(body);
    if let Some(p) = prev
        .filter(|p| p.version + 1 == version && now.saturating_sub(p.snap_at) < MAX_CHAIN_AGE_MS)
    {
        let patch = deflate(&to_json(&json_patch::diff(&p.json, &json))?);
        if patch.len() < snapshot.len()
            && p.patch_bytes + patch.len() <= MAX_CHAIN_BYTES.max(snapshot.len())
        {
            return Ok(Encoded {
                attribute: PATCH_ATTRIBUTE,
                recent: Recent {
                    version,
                    json,
                    base: p.base,
                    snap_at: p.snap_at,
                    patch_bytes: p.patch_bytes + patch.len(),
                },
                bytes: patch,
            });
        }
    }
    Ok(Encoded {
        attribute: SNAPSHOT_ATTRIBUTE,
        recent: Recent {
            version,
            json,
            base: version,
            snap_at: now,
            patch_bytes: 0,
        },
        bytes: snapshot,
    })
}

impl Encoded {
    /// The attributes that put this body and its chain on a version item (the chain's time on
    /// its snapshot only).
    pub fn attributes(&self) -> Vec<(String, AttributeValue)> {
        let mut out = vec![
            (
                self.attribute.to_string(),
                AttributeValue::B(Blob::new(self.bytes.clone())),
            ),
            (
                BASE_ATTRIBUTE.to_string(),
                AttributeValue::N(self.recent.base.to_string()),
            ),
        ];
        if self.is_snapshot() {
            out.push((
                SNAP_AT_ATTRIBUTE.to_string(),
                AttributeValue::N(self.recent.snap_at.to_string()),
            ));
        }
        out
    }

    pub fn is_snapshot(&self) -> bool {
        self.attribute == SNAPSHOT_ATTRIBUTE
    }
}

/// Whether an item's TTL has passed (DynamoDB deletes expired items only eventually).
pub(crate) fn expired(item: &Item, now: Millis) -> bool {
    item.num::<i64>(TTL_ATTRIBUTE)
        .is_ok_and(|at| at.saturating_mul(1000) <= now)
}

/// The latest chain of a run's version items.
pub(crate) struct Chain<'a> {
    /// From the snapshot to the latest version, oldest first.
    items: Vec<&'a Item>,
}

impl<'a> Chain<'a> {
    /// The latest chain among `versions` (newest first, expired ones already left out), or
    /// `None` when there is no version at all. Fails when the chain has a gap.
    pub fn latest(run_id: &str, versions: &[&'a Item]) -> Result<Option<Chain<'a>>, StoreError> {
        let Some(latest) = versions.first() else {
            return Ok(None);
        };
        let top: u64 = latest.num("version")?;
        let base: u64 = latest.num(BASE_ATTRIBUTE)?;
        let mut items = Vec::new();
        let mut want = top;
        for item in versions {
            let v: u64 = item.num("version")?;
            if v != want {
                return Err(StoreError::Corrupt(format!(
                    "run {run_id}: version {want} is missing from its log (found {v})"
                )));
            }
            items.push(*item);
            if v == base {
                items.reverse();
                return Ok(Some(Chain { items }));
            }
            want = v.saturating_sub(1);
        }
        Err(StoreError::Corrupt(format!(
            "run {run_id}: the snapshot of version {base} is missing from its log"
        )))
    }

    pub fn version(&self) -> Result<u64, StoreError> {
        self.last().num("version")
    }

    pub fn last(&self) -> &'a Item {
        self.items[self.items.len() - 1]
    }

    /// The run's JSON at the latest version, and what a writer from it needs to know.
    pub fn run_json(&self, run_id: &str) -> Result<Recent, StoreError> {
        let first = self.items[0];
        let what = |v: &Item| {
            let version = v
                .num::<u64>("version")
                .map_or("?".into(), |n| n.to_string());
            format!("run {run_id} version {version}")
        };
        let mut json: Value = from_json(
            &what(first),
            &inflate(&what(first), first.bin(SNAPSHOT_ATTRIBUTE)?)?,
        )?;
        let mut patch_bytes = 0;
        for item in &self.items[1..] {
            let bytes = item.bin(PATCH_ATTRIBUTE)?;
            patch_bytes += bytes.len();
            let patch: json_patch::Patch = from_json(&what(item), &inflate(&what(item), bytes)?)?;
            json_patch::patch(&mut json, &patch)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", what(item))))?;
        }
        Ok(Recent {
            version: self.version()?,
            json,
            base: first.num("version")?,
            snap_at: first.num(SNAP_AT_ATTRIBUTE)?,
            patch_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item(version: u64, e: &Encoded) -> Item {
        let mut i: Item = HashMap::from([
            ("pk".to_string(), AttributeValue::S("RUN#r1".into())),
            (
                "version".to_string(),
                AttributeValue::N(version.to_string()),
            ),
        ]);
        i.extend(e.attributes());
        i
    }

    #[test]
    fn a_chain_of_patches_reads_back_as_the_last_json_written() {
        // A playbook-sized constant part, as a run has, so that a patch beats a snapshot.
        let pad: String = (0..200).map(|i| format!("{} ", i * 7919 % 1000)).collect();
        let states = [
            json!({"status": "queued", "pad": pad, "steps": {}, "history": []}),
            json!({"status": "running", "pad": pad, "steps": {"a": {"status": "running"}}, "history": [{"at": 1}]}),
            json!({"status": "running", "pad": pad, "steps": {"a": {"status": "succeeded", "output": {"n": null}}}, "history": [{"at": 1}, {"at": 2}]}),
            json!({"status": "succeeded", "pad": pad, "steps": {"a": {"status": "succeeded", "output": {"n": null}}, "b~/x": {}}, "history": [{"at": 1}, {"at": 2}, {"at": 3}]}),
        ];
        let mut prev = None;
        let mut items = Vec::new();
        for (i, s) in states.iter().enumerate() {
            let e = encode(prev, i as u64 + 1, &s.to_string(), s.clone(), 1_000).unwrap();
            assert_eq!(e.is_snapshot(), i == 0, "version {}", i + 1);
            items.push(item(i as u64 + 1, &e));
            prev = Some(e.recent);
        }
        let newest_first: Vec<&Item> = items.iter().rev().collect();
        let chain = Chain::latest("r1", &newest_first).unwrap().unwrap();
        let got = chain.run_json("r1").unwrap();
        assert_eq!(got.json, states[3]);
        assert_eq!((got.version, got.base), (4, 1));
        // Each version read alone from its own point in the log.
        let upto: Vec<&Item> = items[..2].iter().rev().collect();
        let got = Chain::latest("r1", &upto)
            .unwrap()
            .unwrap()
            .run_json("r1")
            .unwrap();
        assert_eq!(got.json, states[1]);
    }

    #[test]
    fn a_writer_that_does_not_know_the_previous_version_or_an_old_chain_writes_a_snapshot() {
        let pad: String = (0..200).map(|i| format!("{} ", i * 7919 % 1000)).collect();
        let s = json!({"status": "running", "pad": pad});
        let prev = encode(None, 1, &s.to_string(), s.clone(), 0)
            .unwrap()
            .recent;
        // Not the previous version.
        assert!(
            encode(Some(prev.clone()), 3, &s.to_string(), s.clone(), 1)
                .unwrap()
                .is_snapshot()
        );
        // A day old.
        assert!(
            encode(
                Some(prev.clone()),
                2,
                &s.to_string(),
                s.clone(),
                MAX_CHAIN_AGE_MS
            )
            .unwrap()
            .is_snapshot()
        );
        assert!(
            !encode(Some(prev), 2, &s.to_string(), s, 1)
                .unwrap()
                .is_snapshot()
        );
    }

    #[test]
    fn a_gap_or_a_missing_snapshot_is_corrupt_not_an_older_state() {
        let pad: String = (0..200).map(|i| format!("{} ", i * 7919 % 1000)).collect();
        let s0 = json!({"n": 0, "pad": pad});
        let s1 = json!({"n": 1, "pad": pad});
        let e1 = encode(None, 1, &s0.to_string(), s0, 0).unwrap();
        let e2 = encode(Some(e1.recent.clone()), 2, &s1.to_string(), s1.clone(), 0).unwrap();
        let e3 = encode(Some(e2.recent.clone()), 3, &s1.to_string(), s1, 0).unwrap();
        let (i1, i3) = (item(1, &e1), item(3, &e3));
        let e = Chain::latest("r1", &[&i3, &i1]).err().unwrap();
        assert!(e.to_string().contains("version 2 is missing"), "{e}");
        let e = Chain::latest("r1", &[&i3]).err().unwrap();
        assert!(e.to_string().contains("snapshot of version 1"), "{e}");
    }
}
