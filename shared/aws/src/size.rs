//! Keeping a run inside DynamoDB's 400 KB item limit.
//!
//! Guarantee: [`fit_body`] never fails a write for size while the run can be made to fit by
//! dropping data: it replaces the largest step outputs, iteration inputs and outputs (then loop
//! items, variables and the run's input) with `{"truncated": true, "original_bytes": N}` until the
//! body fits, and appends one `output_truncated` history entry saying what it replaced. Only if
//! that is not enough does it drop the oldest history entries (keeping the first), saying so.

use serde_json::{Value, json};

use riposte_core::model::Millis;
use riposte_core::run::Run;
use riposte_core::store::StoreError;

/// DynamoDB's limit for one item.
pub(crate) const MAX_ITEM_BYTES: usize = 400 * 1024;
/// The most a run body may take before values are truncated.
pub(crate) const BODY_TARGET_BYTES: usize = 350 * 1024;
/// Room kept for a version item's other attributes (keys, status, ids, times).
pub(crate) const ITEM_OVERHEAD_BYTES: usize = 8 * 1024;
/// Below this the body budget is not worth trying (the outbox is too large).
pub(crate) const MIN_BODY_BYTES: usize = 32 * 1024;

/// The serialized run, made to fit `budget` bytes.
pub(crate) fn fit_body(run: &Run, budget: usize, now: Millis) -> Result<String, StoreError> {
    let body = serde_json::to_string(run).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    if body.len() <= budget {
        return Ok(body);
    }
    let mut v = serde_json::to_value(run).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let original = body.len();
    let mut size = original;
    // A generous allowance for the history entry this adds.
    let entry_allowance = 1024;
    let mut replaced: Vec<(String, usize)> = Vec::new();
    for (path, bytes) in candidates(&v) {
        if size + entry_allowance <= budget {
            break;
        }
        let marker = json!({"truncated": true, "original_bytes": bytes});
        let marker_len = marker.to_string().len();
        if bytes <= marker_len {
            continue;
        }
        // A candidate inside one replaced earlier is gone already.
        if let Some(slot) = v.pointer_mut(&path) {
            let now_len = slot.to_string().len();
            if now_len <= marker_len {
                continue;
            }
            *slot = marker;
            size -= now_len - marker_len;
            replaced.push((path, now_len));
        }
    }
    if !replaced.is_empty() {
        let total: usize = replaced.iter().map(|(_, b)| b).sum();
        let mut listed: Vec<String> = replaced
            .iter()
            .take(10)
            .map(|(p, b)| format!("{p} ({b} bytes)"))
            .collect();
        if replaced.len() > 10 {
            listed.push(format!("and {} more", replaced.len() - 10));
        }
        push_history(
            &mut v,
            now,
            "output_truncated",
            format!(
                "the run ({original} bytes) exceeded the store's item limit; {} values ({total} bytes) \
                 were replaced with truncation markers: {}",
                replaced.len(),
                listed.join(", ")
            ),
        );
    }
    let mut body = v.to_string();
    if body.len() > budget {
        drop_history(&mut v, budget, now);
        body = v.to_string();
    }
    if body.len() > budget {
        return Err(StoreError::Corrupt(format!(
            "run {} cannot be made to fit {budget} bytes ({} bytes after truncation)",
            run.id,
            body.len()
        )));
    }
    Ok(body)
}

/// JSON pointers to the values that may be truncated, with their sizes, largest first.
fn candidates(v: &Value) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut add = |path: String, value: Option<&Value>| {
        if let Some(value) = value
            && !value.is_null()
        {
            out.push((path, value.to_string().len()));
        }
    };
    if let Some(steps) = v.get("steps").and_then(Value::as_array) {
        for (si, step) in steps.iter().enumerate() {
            add(format!("/steps/{si}/output"), step.get("output"));
            if let Some(its) = step.get("iterations").and_then(Value::as_array) {
                for (ii, it) in its.iter().enumerate() {
                    for field in ["output", "input", "item"] {
                        add(
                            format!("/steps/{si}/iterations/{ii}/{field}"),
                            it.get(field),
                        );
                    }
                }
            }
        }
    }
    if let Some(vars) = v.get("vars").and_then(Value::as_object) {
        for (k, value) in vars {
            add(format!("/vars/{}", escape_pointer(k)), Some(value));
        }
    }
    add("/input".into(), v.get("input"));
    // Largest first; ties in document order, so the result is deterministic.
    out.sort_by_key(|c| std::cmp::Reverse(c.1));
    out
}

fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn push_history(v: &mut Value, now: Millis, event: &str, detail: String) {
    if let Some(h) = v.get_mut("history").and_then(Value::as_array_mut) {
        h.push(json!({"at": now, "event": event, "detail": detail}));
    }
}

/// Last resort: drops the oldest history entries but the first until the body fits.
fn drop_history(v: &mut Value, budget: usize, now: Millis) {
    let Some(len) = v.get("history").and_then(Value::as_array).map(Vec::len) else {
        return;
    };
    let mut size = v.to_string().len() + 512;
    let mut drop = 0;
    if let Some(h) = v.get("history").and_then(Value::as_array) {
        for entry in h.iter().skip(1) {
            if size <= budget || drop + 2 >= len {
                break;
            }
            size -= entry.to_string().len() + 1;
            drop += 1;
        }
    }
    if drop == 0 {
        return;
    }
    if let Some(h) = v.get_mut("history").and_then(Value::as_array_mut) {
        h.drain(1..=drop);
    }
    push_history(
        v,
        now,
        "history_truncated",
        format!("{drop} older history entries were dropped to fit the store's item limit"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use riposte_core::run::{Iteration, RunStatus, StepState, StepStatus, Trigger};

    fn run_with_outputs(sizes: &[usize]) -> Run {
        let steps = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let mut it = Iteration::new(None);
                it.status = StepStatus::Succeeded;
                it.output = Some(json!({"text": "x".repeat(*n)}));
                StepState {
                    id: format!("s{i}"),
                    status: StepStatus::Succeeded,
                    iterations: vec![it],
                    looped: false,
                    output: Some(json!({"text": "y".repeat(*n)})),
                    error: None,
                    switch_value: None,
                    started_at: None,
                    finished_at: None,
                }
            })
            .collect();
        Run {
            id: "r1".into(),
            playbook_id: "pb".into(),
            playbook_version: 1,
            status: RunStatus::Running,
            trigger: Trigger::Manual { by: "ann".into() },
            input: json!({"ip": "203.0.113.9"}),
            vars: Default::default(),
            steps,
            created_at: 1,
            updated_at: 1,
            finished_at: None,
            error: None,
            history: vec![],
        }
    }

    #[test]
    fn a_small_run_is_stored_as_is() {
        let run = run_with_outputs(&[10, 20]);
        let body = fit_body(&run, BODY_TARGET_BYTES, 5).unwrap();
        assert_eq!(body, serde_json::to_string(&run).unwrap());
    }

    #[test]
    fn the_largest_outputs_go_first_and_history_says_so() {
        let run = run_with_outputs(&[1_000, 300_000, 2_000]);
        let body = fit_body(&run, BODY_TARGET_BYTES, 5).unwrap();
        assert!(body.len() <= BODY_TARGET_BYTES);
        let back: Run = serde_json::from_str(&body).unwrap();
        let marker = |v: &Option<Value>| {
            v.as_ref()
                .is_some_and(|v| v.get("truncated") == Some(&json!(true)))
        };
        // The big step's output (and its iteration's output) are replaced, the small ones kept.
        assert!(marker(&back.steps[1].output) || marker(&back.steps[1].iterations[0].output));
        assert!(!marker(&back.steps[0].output));
        assert!(!marker(&back.steps[2].output));
        let last = back.history.last().unwrap();
        assert_eq!(last.event, "output_truncated");
        assert!(last.detail.as_ref().unwrap().contains("/steps/1/"));
        assert_eq!(last.at, 5);
    }

    #[test]
    fn an_oversized_history_is_cut_keeping_the_first_entry() {
        let mut run = run_with_outputs(&[]);
        for i in 0..5_000 {
            run.history.push(riposte_core::run::HistoryEntry {
                at: i,
                step: None,
                iteration: None,
                event: "note".into(),
                detail: Some("z".repeat(100)),
            });
        }
        let body = fit_body(&run, 100 * 1024, 9).unwrap();
        assert!(body.len() <= 100 * 1024);
        let back: Run = serde_json::from_str(&body).unwrap();
        assert_eq!(back.history[0].at, 0);
        assert_eq!(back.history.last().unwrap().event, "history_truncated");
        assert_eq!(back.history[back.history.len() - 2].at, 4_999);
    }
}
