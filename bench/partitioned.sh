#!/usr/bin/env bash
# Partitioned tables against plain ones, in one run, on one server.
#
#   bench/partitioned.sh [--events N] [--rounds R] [--conn plain|tls] [--period day|week]
#                        [--ahead A] [--history DAYS] [--history-rows N] [--backlog]
#   bench/partitioned.sh --cleanup [--rows N]
#
# Relay: two schemas of one database, one migrated plain and one with
# `migrate --partitioned --partition-period P --partitions-ahead A` (day and
# 2 by default). With --history, both tables first get DAYS past days of
# completed rows (N a day, 100,000 by default; written by SQL, in
# partitions made by `omnibox partitions create --from`), as a table kept
# for a retention of DAYS days holds: the partitioned one then has a
# partition per period of it. A polling relay
# runs (null sink, batch 1000) while N rows are inserted with
# `omnibox enqueue --jsonl` (unique keys); the figure is N divided by the
# time from the start of the insert to the last row completed, whole
# process, polled with psql every 50 ms. With --backlog the N rows are
# inserted first and `omnibox publish --once` drains them, timed whole
# process (the relay alone). Each round runs both tables, plain first in
# odd rounds and partitioned first in even ones.
#
# --cleanup: N completed rows (default 1,000,000) written by SQL into a day
# ten days ago, in each schema (the partitions back to it made by
# `omnibox partitions create --from`); then `omnibox cleanup --older-than 7d --yes`
# is timed, whole process: on the partitioned table it drops the day's
# partition, on the plain one it deletes the rows (batches of 10,000). The
# dead tuples left behind are read from pg_stat_user_tables afterwards.
#
# A private PostgreSQL 15 is started with PostgreSQL's default durability
# (fsync on), offering TLS without requiring it (--conn tls: the URL as
# users write it, without sslmode), on port 54332; it is stopped
# afterwards. OMNIBOX_BENCH_BIN picks the binary (default: a release build
# of this tree). No ANALYZE, no warm-up.
set -euo pipefail
cd "$(dirname "$0")/.."
events=100000
rounds=2
conn=plain
mode=relay
rows=1000000
period=day
ahead=2
history=0
history_rows=100000
while [ $# -gt 0 ]; do
  case "$1" in
    --events) events=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --conn) conn=$2; shift 2 ;;
    --cleanup) mode=cleanup; shift ;;
    --rows) rows=$2; shift 2 ;;
    --period) period=$2; shift 2 ;;
    --ahead) ahead=$2; shift 2 ;;
    --history) history=$2; shift 2 ;;
    --history-rows) history_rows=$2; shift 2 ;;
    --backlog) mode=backlog; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
port=54332
cleanup() {
  scripts/postgres.sh stop --port $port >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM
eval "$(scripts/postgres.sh start --port $port --durable --tls-optional)"
url=$OMNIBOX_TEST_DATABASE_URL
if [ "$conn" = plain ]; then url="$url?sslmode=disable"; fi
bin=${OMNIBOX_BENCH_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --quiet --bin omnibox
  bin=${CARGO_TARGET_DIR:-target}/release/omnibox
fi
export OMNIBOX_DATABASE_URL=$url
OMNIBOX_DATABASE_SCHEMA=plain "$bin" migrate -q
OMNIBOX_DATABASE_SCHEMA=part "$bin" migrate -q --partitioned --partition-period "$period" --partitions-ahead "$ahead"
psqlq() { psql "$url" -qAtX -c "SET search_path = $1" -c "$2"; }

# Completed rows of the past `history` days, `history_rows` a day, in both
# schemas (the partitioned one gets a partition per past period).
if [ "$history" -gt 0 ]; then
  OMNIBOX_DATABASE_SCHEMA=part "$bin" partitions create -q --from "$(date -u -d "$history days ago" +%F)"
  for day in $(seq "$history"); do
    d=$(date -u -d "$day days ago" +%F)
    for schema in plain part; do
      psqlq $schema "INSERT INTO outbox_events (id, event_type, payload, status, completed_at, created_at, updated_at,
                       scheduled_at, aggregate_type, aggregate_id, topic, partition_key)
                     SELECT gen_random_uuid(), 'order.created', jsonb_build_object('n', g, 'note', repeat('x', 100)),
                            'completed', t + interval '1 second', t, t + interval '1 second', t, 'order',
                            gen_random_uuid(), 'orders', 'k' || g
                       FROM generate_series(1, $history_rows) g,
                            LATERAL (SELECT '$d 00:00+00'::timestamptz + (g * interval '86399 seconds') / $history_rows AS t) s" >/dev/null
    done
  done
fi
partitions=$(psqlq part "SELECT count(*) FROM pg_inherits WHERE inhparent = 'outbox_events'::regclass")

if [ "$mode" = cleanup ]; then
  echo "machine: $(nproc) cores, $(date -u +%FT%TZ); $rows completed rows in one day ten days ago, conn $conn"
  for schema in part plain; do
    if [ "$schema" = part ]; then
      OMNIBOX_DATABASE_SCHEMA=part "$bin" partitions create -q --from "$(date -u -d '10 days ago' +%F)"
    fi
    psqlq $schema "INSERT INTO outbox_events (id, event_type, payload, status, completed_at, created_at, updated_at,
                     scheduled_at, aggregate_type, aggregate_id, topic, partition_key)
                   SELECT gen_random_uuid(), 'order.created', jsonb_build_object('n', g, 'note', repeat('x', 100)),
                          'completed', d + interval '2 hours', d + interval '1 hour', d + interval '2 hours',
                          d + interval '1 hour', 'order', gen_random_uuid(), 'orders', 'k' || g
                     FROM generate_series(1, $rows) g, (SELECT date_trunc('day', now() - interval '10 days') AS d) s" >/dev/null
    start=$(date +%s.%N)
    OMNIBOX_DATABASE_SCHEMA=$schema "$bin" cleanup --older-than 7d --yes -q --table outbox --batch-size 10000
    end=$(date +%s.%N)
    sleep 1 # the statistics collector's report
    dead=$(psqlq $schema "SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_user_tables
                          WHERE schemaname = '$schema' AND (relname LIKE 'outbox_events%' OR relname = 'omnibox_outbox_keys')")
    left=$(psqlq $schema "SELECT count(*) FROM outbox_events")
    python3 -c "import sys; s,e=float(sys.argv[1]),float(sys.argv[2]); print(f'$schema: cleanup {e-s:.3f} s, rows left $left, dead tuples left $dead')" "$start" "$end"
  done
  exit 0
fi

input=$(mktemp /tmp/omnibox-part-bench.XXXX.jsonl)
python3 - "$events" > "$input" <<'PY'
import json, sys
n = int(sys.argv[1])
for i in range(n):
    print(json.dumps({"aggregate_type": "order", "aggregate_id": "0190f1d2-7a3b-7cde-8f00-123456789abc",
                      "event_type": "order.created", "topic": "orders", "partition_key": f"k{i}",
                      "payload": {"n": i, "note": "x" * 100}}))
PY
echo "machine: $(nproc) cores, $(date -u +%FT%TZ); $mode, $events rows, unique keys, conn $conn, batch 1000, null sink;" \
  "history $history day(s) of $history_rows completed rows; partitioned by $period, $ahead ahead: $partitions partitions"
for round in $(seq "$rounds"); do
  # The order alternates, so that neither table's runs meet the server's
  # checkpoints (the history and the inserts write about a gigabyte of
  # WAL) more often than the other's.
  order="plain part"
  if [ $((round % 2)) = 0 ]; then order="part plain"; fi
  for schema in $order; do
    psqlq $schema "DELETE FROM outbox_events WHERE created_at > now() - interval '1 hour'" >/dev/null
    label=$([ "$schema" = part ] && echo partitioned || echo "plain      ")
    if [ "$mode" = backlog ]; then
      OMNIBOX_DATABASE_SCHEMA=$schema "$bin" enqueue -q --jsonl "$input"
      start=$(date +%s.%N)
      OMNIBOX_DATABASE_SCHEMA=$schema "$bin" publish --once --broker null --batch 1000 -q
      end=$(date +%s.%N)
      python3 -c "import sys; s,e,n=float(sys.argv[1]),float(sys.argv[2]),int(sys.argv[3]); print(f'round $round  $label: {n/(e-s):>8.0f} events/s ({e-s:.2f} s)')" "$start" "$end" "$events"
      continue
    fi
    OMNIBOX_DATABASE_SCHEMA=$schema "$bin" publish --broker null --batch 1000 -q 2>/tmp/omnibox-part-bench-relay.log &
    relay=$!
    sleep 0.5
    start=$(date +%s.%N)
    OMNIBOX_DATABASE_SCHEMA=$schema "$bin" enqueue -q --jsonl "$input"
    while [ "$(psqlq $schema "SELECT count(*) FROM outbox_events WHERE status = 'completed'")" != "$events" ]; do
      sleep 0.05
    done
    end=$(date +%s.%N)
    kill -TERM $relay; wait $relay || true
    python3 -c "import sys; s,e,n=float(sys.argv[1]),float(sys.argv[2]),int(sys.argv[3]); print(f'round $round  $label: {n/(e-s):>8.0f} events/s ({e-s:.2f} s)')" "$start" "$end" "$events"
  done
done
rm -f "$input"
