#!/usr/bin/env bash
# The relay benchmark matrix: 20,000 pending rows on PostgreSQL, drained by
# `omnibox publish --once` processes (the release binary) from a table that
# was never analyzed, as right after a bulk enqueue. Null sink at batch 1000
# and 100, 1 and 4 relays, keys 1, 10, 100, 1000 and unique; labelled
# variants (VACUUM ANALYZE before timing; relays in the harness's process);
# a hot key (20,000 rows) beside 99 keys of 100 rows; the first 20,000 of a
# 1,000,000-row backlog; the Kafka sink (tansu) and the broker's own rate.
# Prints one line per configuration with the median of ROUNDS rounds; raw
# rounds go to bench/results/matrix-*.jsonl.
#
#   bench/matrix.sh [ROUNDS] [PART...]   PART: null variants hot backlog kafka (default: all)
#
# OMNIBOX_BENCH_DATABASE_URL as for bench/run.sh. OMNIBOX_BENCH_CONN (plain,
# tls or tls-latency; default plain) and OMNIBOX_BENCH_LATENCY_MS (default
# 0.5) pick the connection kind of every figure (see bench/run.sh);
# bench/conditions.sh runs the main figures under all three side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
shift || true
parts=${*:-null variants hot backlog kafka}
mkdir -p bench/results
export OMNIBOX_BENCH_RESULTS=$PWD/bench/results/matrix-$(date -u +%Y%m%dT%H%M%SZ).jsonl
conn=(--conn "${OMNIBOX_BENCH_CONN:-plain}" --latency-ms "${OMNIBOX_BENCH_LATENCY_MS:-0.5}")
run() {
  local out
  out=$(bench/run.sh publish --rounds "$rounds" "$@" "${conn[@]}" 2>&1 | grep -E "^publish: median|small keys|panicked|error" | tail -2 | tr '\n' ' ' || true)
  printf '%-70s %s\n' "$*" "$out"
}
has() { [[ " $parts " == *" $1 "* ]]; }
if has null; then
  for batch in 1000 100; do
    for keys in 0 1000 100 10 1; do
      for relays in 1 4; do
        run --events 20000 --batch "$batch" --relays "$relays" --keys "$keys" --sink null
      done
    done
  done
fi
if has variants; then
  run --events 20000 --batch 1000 --relays 1 --keys 0 --sink null --analyze
  run --events 20000 --batch 1000 --relays 1 --keys 0 --sink null --mode library
  run --events 20000 --batch 1000 --relays 1 --keys 0 --sink null --mode library --analyze
fi
if has hot; then
  for relays in 1 4; do
    run --hot 20000 --events 9900 --keys 99 --batch 1000 --relays "$relays" --sink null
  done
fi
if has backlog; then
  rounds=1 run --events 20000 --backlog 1000000 --batch 1000 --relays 1 --keys 0 --sink null
fi
if has kafka; then
  for keys in 0 100; do
    for relays in 1 4; do
      run --events 20000 --batch 1000 --relays "$relays" --keys "$keys" --sink kafka
    done
  done
  bench/run.sh produce --sink kafka --events 20000 --batch 1000 --rounds "$rounds" "${conn[@]}" 2>&1 | grep -E "^produce: median"
fi
echo "raw rounds: $OMNIBOX_BENCH_RESULTS"
