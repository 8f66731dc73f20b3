#!/usr/bin/env bash
# The relay benchmarks of bench/matrix.sh and, in the same run on the same
# PostgreSQL, the Python reference's publish benchmark (omni-box 0.3.1), for
# side-by-side figures in bench/RESULTS.md.
#
#   OMNIBOX_REFERENCE_DIR=DIR bench/compare.sh [ROUNDS]
#
# DIR holds the reference's benchmark (`bench_python_peer.py`, the module
# it imports, and `py`, a wrapper for a Python with omni-box[postgres]==0.3.1
# installed), as published beside omni-box's own benchmarks. Without it only
# omnibox is measured. A private, durable PostgreSQL is started on port
# 54330 (unless OMNIBOX_BENCH_DATABASE_URL is set) and stopped afterwards.
# Note: the reference's publish benchmark runs VACUUM ANALYZE before its
# timed part (its own design); omnibox's default runs do not.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
started=0
cleanup() { if [ "$started" = 1 ]; then scripts/postgres.sh stop --port 54330 || true; fi; }
trap cleanup EXIT INT TERM
if [ -z "${OMNIBOX_BENCH_DATABASE_URL:-}" ]; then
  eval "$(scripts/postgres.sh start --port 54330 --durable --tls-optional)"
  started=1
  OMNIBOX_BENCH_DATABASE_URL=$OMNIBOX_TEST_DATABASE_URL
fi
export OMNIBOX_BENCH_DATABASE_URL
echo "== omnibox ($(date -u +%FT%TZ))"
bench/matrix.sh "$rounds" null variants hot backlog
if [ -n "${OMNIBOX_REFERENCE_DIR:-}" ]; then
  ref=$OMNIBOX_REFERENCE_DIR
  # Plain, as omnibox's figures here (bench/conditions.sh compares over TLS).
  dsn="postgresql+asyncpg://$(printf '%s' "${OMNIBOX_BENCH_DATABASE_URL%%\?*}" | sed -e 's|^[a-z]*://||')?ssl=disable"
  echo "== reference: omni-box 0.3.1 ($(date -u +%FT%TZ))"
  for r in $(seq 1 "$rounds"); do
    PEER_DSN=$dsn "$ref/py" "$ref/bench_python_peer.py" --scenario outbox_publish --events 20000 \
      --batch-sizes 1000,100 --workers 1,4
    PEER_DSN=$dsn "$ref/py" "$ref/bench_python_peer.py" --scenario outbox_publish --events 20000 \
      --keys 100 --batch-sizes 1000 --workers 1,4
  done
fi
