//! Replays the fuzzers' kept inputs on stable Rust: every file under `fuzz/regressions/<target>/`
//! (inputs that once crashed) and `fuzz/corpus/<target>/` (the minimized corpus) goes through the
//! same function the cargo-fuzz target calls (`fuzz/harness.rs`, included here), and none may
//! panic. Fuzzing itself needs nightly and runs by hand: see fuzz/README.md.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut out = Vec::new();
    for dir in ["regressions", "corpus"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Runs `f` on every kept input of `target`, each under `catch_unwind`, and fails naming every
/// input that panicked. Runs on a thread with the fuzzer's 8 MiB main-thread stack, so a deep
/// but bounded input that the fuzzer accepted does not overflow the test harness's 2 MiB one.
fn replay(target: &'static str, f: fn(&[u8])) {
    let handle = std::thread::Builder::new()
        .name(format!("replay-{target}"))
        .stack_size(8 << 20)
        .spawn(move || {
            harness::init();
            let files = inputs(target);
            assert!(
                !files.is_empty(),
                "no inputs for `{target}` under fuzz/corpus or fuzz/regressions"
            );
            let mut panicked = Vec::new();
            for p in &files {
                let data = std::fs::read(p).unwrap();
                if std::panic::catch_unwind(|| f(&data)).is_err() {
                    panicked.push(p.display().to_string());
                }
            }
            eprintln!(
                "fuzz replay {target}: {} inputs, {} panicked",
                files.len(),
                panicked.len()
            );
            panicked
        })
        .unwrap();
    let panicked = handle
        .join()
        .expect("the replay thread itself does not panic");
    assert!(
        panicked.is_empty(),
        "`{target}` panicked on {} input(s):\n  {}",
        panicked.len(),
        panicked.join("\n  ")
    );
}

#[test]
fn normalize_inputs_do_not_panic() {
    replay("normalize", harness::normalize);
}

#[test]
fn playbook_inputs_do_not_panic() {
    replay("playbook", harness::playbook);
}

#[test]
fn rule_inputs_do_not_panic() {
    replay("rule", harness::rule);
}

#[test]
fn expr_inputs_do_not_panic() {
    replay("expr", harness::expr);
}
