#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: riposte_fuzz::init(),
    |data: &[u8]| riposte_fuzz::run("playbook", riposte_fuzz::harness::playbook, data)
);
