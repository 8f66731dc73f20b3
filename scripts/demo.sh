#!/usr/bin/env bash
# The main job on the embedded default: an SQLite file and a JSON lines file,
# no servers. Builds omnibox, creates the schema, enqueues sample events (in
# bulk from JSON lines, and one from flags), publishes them with the relay to
# ./omnibox-events.jsonl, and shows the status.
#
#   scripts/demo.sh            # works in target/demo (recreated each run)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --bin omnibox
bin=$PWD/target/debug/omnibox
work=${OMNIBOX_DEMO_DIR:-$PWD/target/demo}
rm -rf "$work" && mkdir -p "$work" && cd "$work"
export NO_COLOR=${NO_COLOR:-}

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

say omnibox migrate
"$bin" migrate

say "omnibox enqueue --jsonl < events.jsonl   # 1,000 events for 10 orders"
for i in $(seq 1 1000); do
  order=$((i % 10))
  printf '{"aggregate_type":"order","aggregate_id":"00000000-0000-7000-8000-%012d","event_type":"order.updated","topic":"orders","partition_key":"order-%d","payload":{"order":%d,"version":%d}}\n' \
    "$order" "$order" "$order" "$i"
done > events.jsonl
"$bin" enqueue --jsonl < events.jsonl

say "omnibox enqueue --aggregate-type order ... --idempotency-key order-42-created"
"$bin" enqueue --aggregate-type order --aggregate-id 0190f1d2-7a3b-7cde-8f00-123456789abc \
  --event-type order.created --topic orders --partition-key order-42 \
  --payload '{"order": 42, "total": 12.5}' --idempotency-key order-42-created

say "omnibox status"
"$bin" status

say "omnibox publish --batch 100 --once      # the relay, to file:omnibox-events.jsonl"
"$bin" publish --batch 100 --once

say "head -n 1 omnibox-events.jsonl"
head -n 1 omnibox-events.jsonl

say "omnibox status"
"$bin" status

printf '\nThe database is %s/omnibox.db; inspect it with `%s status` there, or with sqlite3.\n' "$work" "$bin"
