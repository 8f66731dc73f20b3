#!/usr/bin/env bash
# The relay benchmark matrix of the relay issue: 20,000 pending rows on
# PostgreSQL; null sink at batch 100 and 1000, 1 and 4 relays, keys 1, 10,
# 100, 1000 and unique; the Kafka sink (tansu) at batch 1000; and the drain
# rate with a 1,000,000-row backlog. Prints one line per configuration with
# the median of ROUNDS rounds; raw rounds go to bench/results/matrix-*.jsonl.
#
#   bench/matrix.sh [ROUNDS]      (OMNIBOX_BENCH_DATABASE_URL as for bench/run.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
mkdir -p bench/results
export OMNIBOX_BENCH_RESULTS=$PWD/bench/results/matrix-$(date -u +%Y%m%dT%H%M%SZ).jsonl
run() {
  local out
  out=$(bench/run.sh publish --rounds "$rounds" "$@" 2>&1 | grep -E "^publish: median|panicked|error" || true)
  printf '%-55s %s\n' "$*" "$out"
}
for batch in 1000 100; do
  for keys in 0 1000 100 10 1; do
    for relays in 1 4; do
      run --events 20000 --batch "$batch" --relays "$relays" --keys "$keys" --sink null
    done
  done
done
for keys in 0 100; do
  for relays in 1 4; do
    run --events 20000 --batch 1000 --relays "$relays" --keys "$keys" --sink kafka
  done
done
rounds=1 run --events 20000 --backlog 1000000 --batch 1000 --relays 1 --keys 0 --sink null
echo "raw rounds: $OMNIBOX_BENCH_RESULTS"
