#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: riposte_fuzz::init(),
    |data: &[u8]| riposte_fuzz::run("expr", riposte_fuzz::harness::expr, data)
);
