#!/usr/bin/env bash
# The test command (README): provisions what the tests need and runs every test.
#
#   scripts/test.sh [extra nextest arguments]
#
# - PostgreSQL: uses OMNIBOX_TEST_DATABASE_URL when set; otherwise installs
#   Debian's postgresql package if missing and starts a private, throwaway
#   server on 127.0.0.1:${OMNIBOX_TEST_PG_PORT:-54329}, stopped (by PID) on exit.
# - Kafka: uses OMNIBOX_TEST_BROKERS when set; otherwise installs the tansu
#   broker from crates.io if missing (about 13 minutes the first time) and
#   starts it on 127.0.0.1:${OMNIBOX_TEST_KAFKA_PORT:-19092}, stopped (by PID)
#   on exit. Fast relay tests use librdkafka's built-in mock cluster instead.
# - Every test gets its own SQLite file or PostgreSQL schema, so tests run
#   in parallel. Under CI=true a test that cannot reach its database or
#   broker fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_PORT=${OMNIBOX_TEST_PG_PORT:-54329}
KAFKA_PORT=${OMNIBOX_TEST_KAFKA_PORT:-19092}
started_pg=0
started_kafka=0
cleanup() {
  if [ "$started_kafka" = 1 ]; then scripts/kafka.sh stop --port "$KAFKA_PORT" || true; fi
  if [ "$started_pg" = 1 ]; then scripts/postgres.sh stop --port "$PG_PORT" || true; fi
}
trap cleanup EXIT INT TERM
scripts/build-deps.sh

if [ -z "${OMNIBOX_TEST_DATABASE_URL:-}" ]; then
  eval "$(scripts/postgres.sh start --port "$PG_PORT" --logical)"
  started_pg=1
fi
export OMNIBOX_TEST_DATABASE_URL

if [ -z "${OMNIBOX_TEST_BROKERS:-}" ]; then
  eval "$(scripts/kafka.sh start --port "$KAFKA_PORT")"
  started_kafka=1
fi
export OMNIBOX_TEST_BROKERS OMNIBOX_TEST_TANSU

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --lib --bins --tests --no-fail-fast "$@"
else
  echo "[test.sh] cargo-nextest not found; using cargo test" >&2
  cargo test --lib --bins --tests --no-fail-fast "$@"
fi
# nextest does not run doctests.
cargo test --doc --quiet
# The runnable examples (each asserts what it shows).
for example in examples/*.rs; do
  name=$(basename "$example" .rs)
  echo "[test.sh] example $name" >&2
  cargo run --quiet --example "$name" >/dev/null
done
echo "[test.sh] example outbox_service on PostgreSQL" >&2
OMNIBOX_EXAMPLE_DATABASE_URL="$OMNIBOX_TEST_DATABASE_URL" cargo run --quiet --example outbox_service >/dev/null
