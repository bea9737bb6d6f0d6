#!/usr/bin/env bash
# Every test Riposte has: formatting, lints, docs, unit, property and end-to-end tests.
# Needs the Rust toolchain (cargo with rustfmt and clippy) and Python's pip: it installs the AWS
# API emulator (moto server) and cfn-lint if they are missing. The end-to-end tests start their
# own servers on 127.0.0.1 (vendor stand-ins, moto, the `riposte` binary built below).
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "tools: moto server (AWS API emulator), cfn-lint, cargo lambda"
if ! command -v moto_server >/dev/null 2>&1 || ! command -v cfn-lint >/dev/null 2>&1; then
  python3 -m pip install --quiet 'moto[server]>=5.1,<6' 'cfn-lint>=1.20,<2'
fi
command -v moto_server
cfn-lint --version
# cargo lambda, whose local emulator runs each function binary in tests/tests/lambda_emulator.rs.
bash scripts/lambda-check.sh
cargo lambda --version

step "cfn-lint template.yaml"
cfn-lint template.yaml

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
