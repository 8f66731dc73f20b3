#!/usr/bin/env bash
# Benchmarks: builds the release binary and the harness, makes sure a
# PostgreSQL is there, runs the scenarios, prints events/s with the command
# behind each figure. Raw rounds are appended to bench/results/results.jsonl.
#
#   bench/run.sh enqueue [--events N] [--rounds R] [--keys K] [--idempotency-keys]
#   bench/run.sh inbox [--events N] [--batch B] [--source memory|file|kafka] [--exec CMD]
#   bench/run.sh ops [--events 10000000]
#   bench/run.sh publish [--events N] [--backlog M] [--relays R] [--batch B] [--keys K] [--sink null|kafka] [--otlp]
#
# OMNIBOX_BENCH_DATABASE_URL selects the server (e.g. the peer's
# postgres://omnibox:omnibox@127.0.0.1:5432/omnibox?sslmode=disable, to compare
# with the Python reference on the same server); when unset, a private server
# with PostgreSQL's default durability (fsync on) is started on port 54330 and
# stopped afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
scenario=${1:-enqueue}
shift || true

started=0
started_kafka=0
cleanup() {
  if [ "$started_kafka" = 1 ]; then scripts/kafka.sh stop --port 19093 || true; fi
  if [ "$started" = 1 ]; then scripts/postgres.sh stop --port 54330 || true; fi
}
trap cleanup EXIT INT TERM
if [ -z "${OMNIBOX_BENCH_DATABASE_URL:-}" ]; then
  eval "$(scripts/postgres.sh start --port 54330 --durable)"
  started=1
  OMNIBOX_BENCH_DATABASE_URL="$OMNIBOX_TEST_DATABASE_URL?sslmode=disable"
fi
export OMNIBOX_BENCH_DATABASE_URL
if [[ " $* " == *" --sink kafka "* || " $* " == *" --source kafka "* ]] && [ -z "${OMNIBOX_BENCH_BROKERS:-}" ]; then
  eval "$(scripts/kafka.sh start --port 19093)"
  started_kafka=1
  OMNIBOX_BENCH_BROKERS=$OMNIBOX_TEST_BROKERS
fi
export OMNIBOX_BENCH_BROKERS=${OMNIBOX_BENCH_BROKERS:-}
cargo build --release --quiet --bin omnibox
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%FT%TZ)"
cargo bench --quiet --bench harness -- "$scenario" "$@"
