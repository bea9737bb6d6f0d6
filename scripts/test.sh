#!/usr/bin/env bash
# Every test Riposte has: formatting, lints, docs, unit, property and end-to-end tests.
# Needs only the Rust toolchain (cargo with rustfmt and clippy); the end-to-end tests start their
# own servers on 127.0.0.1 and the `riposte` binary built below.
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check
step "build (the crash test runs the real binary)"
cargo build --workspace --bins --locked
step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "docs"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
step "tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
# One closing line for the whole suite (cargo prints one per test binary, the last being doc tests).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$log"
