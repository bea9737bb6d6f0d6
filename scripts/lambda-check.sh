#!/usr/bin/env bash
# Makes sure cargo lambda (the local Lambda emulator the end-to-end test
# tests/tests/lambda_emulator.rs runs) is installed; installs it from PyPI if not. Idempotent and
# quiet: prints nothing when it is already there.
#
# `cargo lambda watch` builds the functions natively with cargo, so it needs no cross linker;
# PyPI's cargo-lambda depends on `ziglang` anyway (used by `cargo lambda build` for
# cross-compiling), so pip installs that too.
set -euo pipefail

if ! cargo lambda --version >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check 'cargo-lambda>=1.8,<2' 2>&1 |
    grep -v "Running pip as the 'root' user" >&2 || true
  if ! cargo lambda --version >/dev/null 2>&1; then
    echo "cargo lambda is still not runnable after 'pip install cargo-lambda';" \
      "is pip's bin directory on PATH?" >&2
    exit 1
  fi
fi
