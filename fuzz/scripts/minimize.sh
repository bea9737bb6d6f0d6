#!/bin/bash
# Shrinks a target's working corpus (fuzz/corpus-full/<target>, not committed) into the committed
# one (fuzz/corpus/<target>): `cargo fuzz cmin`, then a set cover on edge coverage alone (hit
# counts ignored), capped at 300 files by scripts/cap.py. Run from the repository
# root with nightly: fuzz/scripts/minimize.sh <target>
set -euo pipefail
t=$1
F=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$F/corpus-full/$t"
cp -n "$F/corpus/$t"/* "$F/corpus-full/$t/" 2>/dev/null || true
cargo +nightly fuzz cmin --fuzz-dir "$F" "$t" "$F/corpus-full/$t" -- -rss_limit_mb=2048 -max_len=65536
out=$(mktemp -d)
"$F/target/x86_64-unknown-linux-gnu/release/$t" -set_cover_merge=1 -use_counters=0 \
  -rss_limit_mb=2048 -max_len=65536 "$out" "$F/corpus-full/$t"
rm -rf "$F/corpus/$t"
mkdir -p "$F/corpus/$t"
find "$out" -type f -size -64k -exec cp {} "$F/corpus/$t/" \;
rm -rf "$out"
# At most 300 files: a greedy edge cover from a merge control file.
out=$(mktemp -d)
"$F/target/x86_64-unknown-linux-gnu/release/$t" -merge=1 -merge_control_file="$out.ctl" \
  -rss_limit_mb=2048 -max_len=65536 "$out" "$F/corpus/$t"
python3 "$F/scripts/cap.py" "$out.ctl" "$F/corpus/$t" 300
rm -rf "$out" "$out.ctl"
echo "$t: $(ls "$F/corpus/$t" | wc -l) files in fuzz/corpus/$t"
