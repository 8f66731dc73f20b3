#!/usr/bin/env bash
# Benchmarks: builds the release binary and the harness, makes sure a
# PostgreSQL is there, runs the scenarios, prints events/s with the command
# behind each figure. Raw rounds are appended to bench/results/results.jsonl.
#
#   bench/run.sh enqueue [--events N] [--rounds R] [--keys K] [--idempotency-keys]
#   bench/run.sh inbox [--events N] [--batch B] [--source memory|file|kafka] [--exec CMD]
#   bench/run.sh ops [--events 10000000]
#   bench/run.sh publish [--events N] [--backlog M] [--relays R] [--batch B] [--keys K] [--sink null|kafka] [--otlp] [--ceiling]
#   bench/run.sh latency [--rate 1000] [--seconds 20] [--relay-source poll|wal]
#   any of them ... [--conn plain|tls|tls-latency] [--latency-ms 0.5]
#
# OMNIBOX_BENCH_DATABASE_URL selects the server (e.g. the peer's
# postgres://omnibox:omnibox@127.0.0.1:5432/omnibox, to compare with the
# Python reference on the same server); when unset, a private server with
# PostgreSQL's default durability (fsync on) that offers TLS without
# requiring it (a throwaway certificate) is started on port 54330 and
# stopped afterwards. --conn picks how the timed part connects (default
# plain: sslmode=disable; tls: the URL without sslmode, as users write it;
# tls-latency: tls through the harness's delay proxy, see benches/harness.rs).
# With --conn tls-latency and Kafka, the broker started here advertises a
# free port, where the harness's Kafka delay proxy listens.
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
  logical=""
  if [[ " $* " == *" --relay-source wal "* ]]; then logical=--logical; fi
  eval "$(scripts/postgres.sh start --port 54330 --durable --tls-optional $logical)"
  started=1
  OMNIBOX_BENCH_DATABASE_URL=$OMNIBOX_TEST_DATABASE_URL
fi
export OMNIBOX_BENCH_DATABASE_URL
if [[ " $* " == *" --sink kafka "* || " $* " == *" --source kafka "* ]] && [ -z "${OMNIBOX_BENCH_BROKERS:-}" ]; then
  if [[ " $* " == *" --conn tls-latency "* ]]; then
    OMNIBOX_BENCH_BROKERS_PROXY_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    export OMNIBOX_BENCH_BROKERS_PROXY_PORT
    eval "$(scripts/kafka.sh start --port 19093 --advertise-port "$OMNIBOX_BENCH_BROKERS_PROXY_PORT")"
  else
    eval "$(scripts/kafka.sh start --port 19093)"
  fi
  started_kafka=1
  OMNIBOX_BENCH_BROKERS=$OMNIBOX_TEST_BROKERS
fi
export OMNIBOX_BENCH_BROKERS=${OMNIBOX_BENCH_BROKERS:-}
cargo build --release --quiet --bin omnibox
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%FT%TZ)"
cargo bench --quiet --bench harness -- "$scenario" "$@"
