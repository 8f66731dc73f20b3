#!/usr/bin/env bash
# The polling relay against the WAL relay, in one run, on one server:
# a relay runs (null sink, batch 1000) while N rows are inserted with
# `omnibox enqueue --jsonl` (unique keys, or K keys); the figure is N
# divided by the time from the start of the insert to the last row
# completed, whole process, polled with psql every 50 ms. Rounds
# alternate poll, wal, poll, wal.
#
#   bench/wal.sh [--events N] [--rounds R] [--keys K] [--conn plain|tls] [--sink null|kafka]
#   bench/wal.sh --writes [--events N]
#
# With OMNIBOX_REFERENCE_DIR set (see bench/compare.sh), the Python
# reference's own publish benchmark (omni-box 0.3.1: a backlog of N rows
# drained by one worker, batch 1000; its procedure, which runs VACUUM
# ANALYZE before timing) follows on the same server, plain connection.
#
# --writes times the server's share alone (psql, no relay): N rows inserted,
# then half of them taken in batches of 1,000 the way a claim does today
# (a lease written, then the completion: two updates per row), the other
# half held by row locks and completed in the same transaction (one update
# per row), which is what a relay holding its rows in an open transaction
# would cost.
#
# --sink kafka publishes to a 4-partition topic on a tansu started here
# (scripts/kafka.sh, port 19096; the topic is created by the bench harness);
# compare with the broker's own rate: bench/run.sh produce --sink kafka.
#
# A private PostgreSQL 15 is started with PostgreSQL's default durability
# (fsync on) and wal_level = logical, offering TLS without requiring it
# (--conn tls: the URL as users write it, without sslmode), on port 54331;
# it is stopped afterwards. OMNIBOX_BENCH_BIN picks the binary (default:
# a release build of this tree). No ANALYZE, no warm-up: each round starts
# from an emptied table, as a fresh deployment would.
set -euo pipefail
cd "$(dirname "$0")/.."
events=100000
rounds=2
keys=0
conn=plain
sink=null
writes=0
while [ $# -gt 0 ]; do
  case "$1" in
    --events) events=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --keys) keys=$2; shift 2 ;;
    --conn) conn=$2; shift 2 ;;
    --writes) writes=1; shift ;;
    --sink) sink=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
port=54331
kafka_started=0
cleanup() {
  scripts/postgres.sh stop --port $port >/dev/null 2>&1 || true
  if [ "$kafka_started" = 1 ]; then scripts/kafka.sh stop --port 19096 >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT INT TERM
eval "$(scripts/postgres.sh start --port $port --durable --tls-optional --logical)"
url=$OMNIBOX_TEST_DATABASE_URL
if [ "$conn" = plain ]; then url="$url?sslmode=disable"; fi
bin=${OMNIBOX_BENCH_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --quiet --bin omnibox
  bin=${CARGO_TARGET_DIR:-target}/release/omnibox
fi
export OMNIBOX_DATABASE_URL=$url
"$bin" migrate -q
broker=null
if [ "$sink" = kafka ]; then
  eval "$(scripts/kafka.sh start --port 19096)"
  kafka_started=1
  OMNIBOX_BENCH_BROKERS=$OMNIBOX_TEST_BROKERS OMNIBOX_BENCH_TOPIC=orders OMNIBOX_BENCH_DATABASE_URL=$url \
    cargo bench --quiet --bench harness -- topic
  broker="kafka://$OMNIBOX_TEST_BROKERS"
fi
input=$(mktemp /tmp/omnibox-wal-bench.XXXX.jsonl)
python3 - "$events" "$keys" > "$input" <<'PY'
import json, sys
n, keys = int(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    key = f"k{i % keys}" if keys else f"k{i}"
    print(json.dumps({"aggregate_type": "order", "aggregate_id": "0190f1d2-7a3b-7cde-8f00-123456789abc",
                      "event_type": "order.created", "topic": "orders", "partition_key": key,
                      "payload": {"n": i, "note": "x" * 100}}))
PY
psqlq() { psql "$url" -qAtX -c "$1"; }
if [ "$writes" = 1 ]; then
  "$bin" enqueue -q --jsonl "$input"
  half=$((events / 2000))
  echo "machine: $(nproc) cores, $(date -u +%FT%TZ); server only, $((half * 1000)) rows each, batches of 1000"
  psql "$url" -qAtX <<SQL
\\timing on
\\echo lease then completion (two updates per row):
DO \$\$ DECLARE ids uuid[]; BEGIN
FOR i IN 1..$half LOOP
  SELECT array_agg(id) INTO ids FROM (SELECT id FROM outbox_events WHERE status = 'pending' AND locked_at IS NULL ORDER BY seq LIMIT 1000) s;
  UPDATE outbox_events SET locked_at = now(), locked_by = 'w', locked_until = now() + interval '5 min', updated_at = now() WHERE id = ANY(ids);
  UPDATE outbox_events SET status = 'completed', completed_at = now(), locked_at = NULL, locked_by = NULL, locked_until = NULL,
         attempts_made = attempts_made + 1, updated_at = now() WHERE id = ANY(ids);
  COMMIT;
END LOOP; END \$\$;
\\echo row locks then completion (one update per row):
DO \$\$ DECLARE ids uuid[]; BEGIN
FOR i IN 1..$half LOOP
  SELECT array_agg(id) INTO ids FROM (SELECT id FROM outbox_events WHERE status = 'pending' AND locked_at IS NULL ORDER BY seq LIMIT 1000 FOR UPDATE) s;
  UPDATE outbox_events SET status = 'completed', completed_at = now(), attempts_made = attempts_made + 1, updated_at = now() WHERE id = ANY(ids);
  COMMIT;
END LOOP; END \$\$;
SQL
  rm -f "$input"
  exit 0
fi
echo "machine: $(nproc) cores, $(date -u +%FT%TZ); $events rows, keys ${keys/#0/unique}, conn $conn, batch 1000, $sink sink"
for round in $(seq "$rounds"); do
  for source in poll wal; do
    psqlq "TRUNCATE outbox_events" >/dev/null
    psqlq "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots" >/dev/null
    "$bin" publish --source "$source" --broker "$broker" --batch 1000 -q 2>/tmp/omnibox-wal-bench-relay.log &
    relay=$!
    # The relay is up (and the WAL relay's slot held) before the clock starts.
    for _ in $(seq 100); do
      if [ "$source" = poll ] || [ "$(psqlq "SELECT count(*) FROM pg_replication_slots WHERE active")" = 1 ]; then break; fi
      sleep 0.1
    done
    sleep 0.5
    start=$(date +%s.%N)
    "$bin" enqueue -q --jsonl "$input"
    while [ "$(psqlq "SELECT count(*) FROM outbox_events WHERE status = 'completed'")" != "$events" ]; do
      sleep 0.05
    done
    end=$(date +%s.%N)
    kill -TERM $relay; wait $relay || true
    python3 -c "import sys; s,e,n=float(sys.argv[1]),float(sys.argv[2]),int(sys.argv[3]); print(f'round $round  $source: {n/(e-s):>8.0f} events/s ({e-s:.2f} s)')" "$start" "$end" "$events"
  done
done
rm -f "$input"
if [ -n "${OMNIBOX_REFERENCE_DIR:-}" ]; then
  ref=$OMNIBOX_REFERENCE_DIR
  dsn="postgresql+asyncpg://$(printf '%s' "${OMNIBOX_TEST_DATABASE_URL%%\?*}" | sed -e 's|^[a-z]*://||')?ssl=disable"
  echo "reference: omni-box 0.3.1, its outbox_publish benchmark (backlog of $events rows, batch 1000, 1 worker)"
  for round in $(seq "$rounds"); do
    PEER_DSN=$dsn "$ref/py" "$ref/bench_python_peer.py" --scenario outbox_publish --events "$events" \
      --batch-sizes 1000 --workers 1 2>&1 | grep -iE "events/s|throughput|publish" | sed "s/^/round $round  reference: /"
  done
fi
