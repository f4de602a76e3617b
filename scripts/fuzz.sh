#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for a bounded time with cargo-fuzz
# (libFuzzer), one after the other, and prints executions, coverage and crashes per target.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     SECONDS per target (default 60), all targets
#                                             unless some are named
#
# Seeds: fuzz/corpus/<target>/ (committed, small; read only). What a run learns goes to
# fuzz/target/corpus/<target>/ (not committed), so later runs on this machine start from
# there. A crash stops that target and is saved by libFuzzer as
# fuzz/artifacts/<target>/crash-<sha1>; the script prints it (base64) so a CI log keeps it,
# goes on with the other targets, and exits 1. To keep a crash as a regression: fix it,
# add a #[test] in the crate that owns the code, copy the file into fuzz/corpus/<target>/.
# Reproduce one with `cargo +nightly fuzz run -O -a -s none <target> <file>`.
#
# FUZZ_SANITIZER=address builds with AddressSanitizer (default `none`: the code under test
# is safe Rust, so ASan finds nothing more there and costs about half the speed and a
# slower build). Builds are release with debug assertions and overflow checks (-O -a).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SECS="${1:-60}"
[[ $# -gt 0 ]] && shift
[[ "$SECS" =~ ^[0-9]+$ && "$SECS" -gt 0 ]] || { echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2; }
SANITIZER="${FUZZ_SANITIZER:-none}"
FLAGS=(-O -a -s "$SANITIZER")

# libFuzzer needs a nightly toolchain (sanitizer coverage flags) and cargo-fuzz.
scripts/install-cargo-fuzz.sh

FUZZ_START=$SECONDS
cargo +nightly fuzz build "${FLAGS[@]}"
BUILD_SECS=$((SECONDS - FUZZ_START))

if [[ $# -gt 0 ]]; then
  TARGETS=("$@")
else
  mapfile -t TARGETS < <(cargo +nightly fuzz list)
fi

summary=()
failed=0
for t in "${TARGETS[@]}"; do
  work="fuzz/target/corpus/$t"
  seeds="fuzz/corpus/$t"
  log="fuzz/target/logs/$t.log"
  mkdir -p "$work" "$seeds" "fuzz/artifacts/$t" "$(dirname "$log")"
  args=(-max_total_time="$SECS" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048
        -max_len=8192)
  [[ -f "fuzz/dict/$t.dict" ]] && args+=(-dict="fuzz/dict/$t.dict")
  echo "== fuzz $t: ${SECS}s (seeds $seeds, $(find "$seeds" -type f | wc -l) files)"
  stamp="fuzz/target/logs/$t.start"
  touch "$stamp"
  rc=0
  cargo +nightly fuzz run "${FLAGS[@]}" "$t" "$work" "$seeds" -- "${args[@]}" >"$log" 2>&1 || rc=$?
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
  last="$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -1 || true)"
  cov="$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")"
  ft="$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")"
  corp="$(sed -n 's/.* corp: \([0-9]*\/[0-9A-Za-z]*\).*/\1/p' <<<"$last")"
  if [[ $rc -eq 0 ]]; then
    verdict="ok"
  else
    verdict="FAILED (exit $rc)"
    failed=1
    echo "---- $t: last lines of $log"
    grep -v -E '^#[0-9]+[[:space:]]' "$log" | grep -v -E '^ +[0-9]+: |^ +at ' | tail -40
    find "fuzz/artifacts/$t" -type f -newer "$stamp" | while read -r f; do
      echo "---- artefact $f ($(wc -c <"$f") bytes), base64:"
      base64 -w 76 "$f" | head -100
    done
  fi
  summary+=("$(printf '%-18s %-16s execs %-10s exec/s %-7s cov %-6s ft %-6s corpus %s' \
    "$t" "$verdict" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}")")
done

echo
echo "== fuzzing summary (${SECS}s per target, sanitizer $SANITIZER, build ${BUILD_SECS}s)"
printf '%s\n' "${summary[@]}"
exit "$failed"
