//! The outbox: the step messages a run write commits, kept on the version item of that write until they are sent.
//!
//! Stored compactly (one run id list, then `[run, step, iteration, attempt, kind, due]` rows) so
//! that a fan-out of a thousand iterations fits beside the run body in one item. `due` is absolute
//! (ms, by the store's clock when committed): a flush that happens late, after a crash, sends with
//! only the delay that remains.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use riposte_core::model::Millis;
use riposte_core::run::{MessageKind, StepMessage};
use riposte_core::store::StoreError;

/// The longest delay SQS takes (15 minutes); a message due later becomes a timer item.
pub(crate) const MAX_QUEUE_DELAY_MS: Millis = 900_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Outbox {
    /// Unique per write; the clear is conditioned on it.
    pub id: String,
    /// When the write committed (store clock).
    pub at: Millis,
    pub runs: Vec<String>,
    pub msgs: Vec<Row>,
}

/// `[run index, step, iteration, attempt, kind, due ms]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Row(usize, String, u32, u32, MessageKind, Millis);

impl Outbox {
    /// The outbox for these messages, or `None` when there are none.
    pub fn new(id: String, now: Millis, messages: &[(StepMessage, u64)]) -> Option<Outbox> {
        if messages.is_empty() {
            return None;
        }
        let mut runs: Vec<String> = Vec::new();
        let msgs = messages
            .iter()
            .map(|(m, delay)| {
                let r = match runs.iter().position(|r| *r == m.run_id) {
                    Some(i) => i,
                    None => {
                        runs.push(m.run_id.clone());
                        runs.len() - 1
                    }
                };
                let delay = Millis::try_from(*delay).unwrap_or(Millis::MAX);
                Row(
                    r,
                    m.step.clone(),
                    m.iteration,
                    m.attempt,
                    m.kind.clone(),
                    now.saturating_add(delay),
                )
            })
            .collect();
        Some(Outbox {
            id,
            at: now,
            runs,
            msgs,
        })
    }

    pub fn to_json(&self) -> Result<String, StoreError> {
        serde_json::to_string(self).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    pub fn parse(run_id: &str, text: &str) -> Result<Outbox, StoreError> {
        serde_json::from_str(text)
            .map_err(|e| StoreError::Corrupt(format!("outbox of run {run_id}: {e}")))
    }

    /// Every message with the time it is due.
    pub fn messages(&self) -> Result<Vec<(StepMessage, Millis)>, StoreError> {
        self.msgs
            .iter()
            .map(|Row(r, step, iteration, attempt, kind, due)| {
                let run_id = self.runs.get(*r).ok_or_else(|| {
                    StoreError::Corrupt(format!("outbox {}: run index {r}", self.id))
                })?;
                Ok((
                    StepMessage {
                        run_id: run_id.clone(),
                        step: step.clone(),
                        iteration: *iteration,
                        attempt: *attempt,
                        kind: kind.clone(),
                    },
                    *due,
                ))
            })
            .collect()
    }
}

/// How a message due at `due` is sent at `now`: `Some(delay seconds)` for SQS (rounded up, so
/// never early), or `None` when it is too far off and becomes a timer.
pub(crate) fn queue_delay(due: Millis, now: Millis) -> Option<i32> {
    let remaining = due.saturating_sub(now).max(0);
    if remaining > MAX_QUEUE_DELAY_MS {
        return None;
    }
    // At most 900 after the check above.
    Some(i32::try_from((remaining + 999) / 1000).unwrap_or(900))
}

/// A token unique across processes for all practical purposes (std's randomly keyed hasher over a
/// process-wide counter). Not a secret: it names writes, timers and audit entries.
pub(crate) fn unique_token() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(seq);
    format!("{:016x}{seq:x}", h.finish())
}

/// The process-wide sequence number (for ordering entries written by one process in one ms).
pub(crate) fn next_seq() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(run: &str, step: &str, i: u32) -> StepMessage {
        StepMessage {
            run_id: run.into(),
            step: step.into(),
            iteration: i,
            attempt: 1,
            kind: MessageKind::Execute,
        }
    }

    #[test]
    fn round_trips_with_absolute_due_times() {
        let input = vec![
            (msg("parent", "a", 0), 0),
            (msg("child", "b", 1), 2_000),
            (msg("parent", "c", 2), 4 * 3_600_000),
        ];
        let ob = Outbox::new("x".into(), 1_000, &input).unwrap();
        assert_eq!(ob.runs, ["parent", "child"]);
        let back = Outbox::parse("parent", &ob.to_json().unwrap()).unwrap();
        let got = back.messages().unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[1], (msg("child", "b", 1), 3_000));
        assert_eq!(got[2].1, 1_000 + 4 * 3_600_000);
        assert!(Outbox::new("y".into(), 0, &[]).is_none());
    }

    #[test]
    fn a_thousand_messages_stay_small() {
        let input: Vec<_> = (0..1000)
            .map(|i| (msg("01JDZ8Q3C0W8X3V5M7K9N2P4R6.block", "block_ip", i), 0))
            .collect();
        let json = Outbox::new("x".into(), 0, &input)
            .unwrap()
            .to_json()
            .unwrap();
        assert!(json.len() < 40_000, "{}", json.len());
    }

    #[test]
    fn delays_round_up_and_long_ones_become_timers() {
        assert_eq!(queue_delay(1_000, 1_000), Some(0));
        assert_eq!(queue_delay(500, 1_000), Some(0));
        assert_eq!(queue_delay(3_000, 1_000), Some(2));
        assert_eq!(queue_delay(3_001, 1_000), Some(3));
        assert_eq!(queue_delay(901_000, 1_000), Some(900));
        assert_eq!(queue_delay(901_001, 1_000), None);
    }

    #[test]
    fn tokens_differ() {
        let a: std::collections::HashSet<_> = (0..1000).map(|_| unique_token()).collect();
        assert_eq!(a.len(), 1000);
    }
}
