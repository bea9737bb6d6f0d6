//! The cargo-fuzz targets' library: the shared harness, plus the panic-hook policy.
//!
//! libfuzzer-sys installs a panic hook that aborts on *every* panic, even one that riposte-core
//! deliberately contains with `catch_unwind` (`Expr::parse` and `Expr::eval` guard against
//! panics in the `cel` crate). A contained panic does not break the public API's promise, so
//! [`init`] replaces the hook: a contained panic is logged (`contained panic: ...`, once per
//! location) and the input saved under `artifacts/<target>/contained-*`, but fuzzing goes on.
//! A panic that escapes the target is still caught by libfuzzer-sys and aborts (a crash).
//! Set `RIPOSTE_FUZZ_STRICT=1` to abort on contained panics too.

#[path = "../harness.rs"]
pub mod harness;

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::sync::Mutex;

thread_local! {
    static PANICKED: Cell<bool> = const { Cell::new(false) };
    static LAST: RefCell<String> = const { RefCell::new(String::new()) };
}

static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);

pub fn init() {
    harness::init();
    let strict = std::env::var_os("RIPOSTE_FUZZ_STRICT").is_some_and(|v| v == "1");
    std::panic::set_hook(Box::new(move |info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if strict {
            eprintln!("panic at {location}: {message}");
            eprintln!("{}", std::backtrace::Backtrace::force_capture());
            std::process::abort();
        }
        PANICKED.with(|p| p.set(true));
        LAST.with(|l| *l.borrow_mut() = format!("{location}: {message}"));
    }));
}

/// Runs one target's function; logs and saves inputs whose panics riposte-core contained.
pub fn run(target: &str, f: fn(&[u8]), data: &[u8]) {
    PANICKED.with(|p| p.set(false));
    // A panic escaping `f` propagates to libfuzzer-sys, which aborts: a crash.
    f(data);
    if PANICKED.with(|p| p.get()) {
        let what = LAST.with(|l| l.borrow().clone());
        let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        if seen.get_or_insert_with(HashSet::new).insert(what.clone()) {
            eprintln!("contained panic: {what}");
            let dir = format!("{}/artifacts/{target}", env!("CARGO_MANIFEST_DIR"));
            let _ = std::fs::create_dir_all(&dir);
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hash::hash(&what, &mut h);
            let _ = std::fs::write(
                format!("{dir}/contained-{:016x}", std::hash::Hasher::finish(&h)),
                data,
            );
        }
    }
}
