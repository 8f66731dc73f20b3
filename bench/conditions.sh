#!/usr/bin/env bash
# The main figures under production-like connections, side by side: every
# configuration below measured plain (sslmode=disable), over TLS (the URL
# without sslmode, as users write it: sqlx's prefer against a server that
# offers TLS) and over TLS with network latency (the harness's TCP delay
# proxy between omnibox and PostgreSQL, OMNIBOX_BENCH_LATENCY_MS each way,
# default 0.5), in one run on one server. Rounds are interleaved (every
# configuration under every kind once per round) so that drift spreads
# evenly; the table shows the median of ROUNDS rounds.
#
#   bench/conditions.sh [ROUNDS] [KIND...]     KIND: plain tls tls-latency (default: all three)
#
# omnibox (the release binary, each figure timed from process start to exit,
# as in bench/run.sh; no VACUUM ANALYZE and no warm-up before timing):
#   enqueue 20,000; publish, null sink, batch 1000, 1 relay, unique keys
#   (with held claims, the relay's default on PostgreSQL, and with leases:
#   --hold lease) and keys 1000, 100, 10, 1; 4 relays, unique keys; inbox exactly-once from a
#   file (20,000 distinct + 2,000 redelivered lines, 500 per transaction as
#   in bench/RESULTS.md's inbox figures).
# The Python reference (omni-box 0.3.1), when OMNIBOX_REFERENCE_DIR is set
# (as for bench/compare.sh): outbox_insert, outbox_publish (batch 1000, 1
# worker, unique keys; its script runs VACUUM ANALYZE before timing, its own
# design) and inbox_consume (20,000 + 2,000), over the same kind: asyncpg
# with ssl=disable, ssl=require (TLS or an error: never a silent fallback),
# and ssl=require through a delay proxy of its own (the harness's `proxy`
# scenario on port OMNIBOX_BENCH_PROXY_PORT, default an ephemeral one,
# started and stopped here).
#
# OMNIBOX_BENCH_DATABASE_URL: a server that offers TLS, as postgres://...
# without parameters; when unset, a private durable server offering TLS
# (scripts/postgres.sh --tls-optional) is started on port 54330 and stopped
# afterwards. OMNIBOX_BENCH_EVENTS (default 20000) scales every figure,
# for quick checks only. OMNIBOX_REFERENCE_ROUNDS=N runs the reference in
# the first N rounds only; OMNIBOX_REFERENCE_INBOX_EVENTS sets its
# inbox_consume's message count (its rate does not depend on it).
# Output: the table on stdout and in bench/results/conditions-*.md; the
# harness's output in conditions-*.log; raw rounds (omnibox's and the
# reference's, each with its "conn") in conditions-*.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
shift || true
kinds=${*:-plain tls tls-latency}
for k in $kinds; do
  case "$k" in plain|tls|tls-latency) ;; *) echo "unknown kind $k (plain, tls, tls-latency)" >&2; exit 2 ;; esac
done
latency=${OMNIBOX_BENCH_LATENCY_MS:-0.5}
events=${OMNIBOX_BENCH_EVENTS:-20000}
ref=${OMNIBOX_REFERENCE_DIR:-}
proxy_port=${OMNIBOX_BENCH_PROXY_PORT:-0}
# The reference in the first N rounds only, and its inbox_consume (one
# transaction per message, about 100 msg/s here) with fewer messages: for a
# run that fits in a session. Both are printed with the table.
ref_rounds=${OMNIBOX_REFERENCE_ROUNDS:-$rounds}
ref_inbox_events=${OMNIBOX_REFERENCE_INBOX_EVENTS:-$events}
stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p bench/results
out=$PWD/bench/results/conditions-$stamp.jsonl
log=$PWD/bench/results/conditions-$stamp.log
table=$PWD/bench/results/conditions-$stamp.md
refconn=$PWD/bench/results/conditions-$stamp.ref-conn.jsonl
export OMNIBOX_BENCH_RESULTS=$out

started=0
proxy_pid=""
cleanup() {
  if [ -n "$proxy_pid" ]; then kill "$proxy_pid" 2>/dev/null || true; wait "$proxy_pid" 2>/dev/null || true; fi
  if [ "$started" = 1 ]; then scripts/postgres.sh stop --port 54330 || true; fi
  if [ -n "${bindir:-}" ]; then rm -rf "$bindir"; fi
}
trap cleanup EXIT INT TERM
if [ -z "${OMNIBOX_BENCH_DATABASE_URL:-}" ]; then
  eval "$(scripts/postgres.sh start --port 54330 --durable --tls-optional)"
  started=1
  OMNIBOX_BENCH_DATABASE_URL=$OMNIBOX_TEST_DATABASE_URL
fi
export OMNIBOX_BENCH_DATABASE_URL
unset OMNIBOX_BENCH_BROKERS

# Copies of the harness and of the omnibox binary it runs, made right after
# the build: no cargo (and no wait for other builds' lock) between rounds,
# no rebuild under a long run (a shared CARGO_TARGET_DIR), and the
# standalone proxy's PID is its own.
bindir=$(mktemp -d /tmp/omnibox-conditions.XXXXXX)
cargo bench --quiet --no-run --bench harness --message-format=json \
  | python3 -c 'import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    name = {"harness": "harness", "omnibox": "omnibox"}.get(m["target"]["name"])
    if name:
        shutil.copy2(m["executable"], sys.argv[1] + "/" + name)' "$bindir"
harness=$bindir/harness
export OMNIBOX_BENCH_BIN=$bindir/omnibox
[ -x "$harness" ] && [ -x "$OMNIBOX_BENCH_BIN" ] || { echo "could not find the harness or omnibox executables" >&2; exit 1; }
"$harness" --help | grep -q -- --conn \
  || { echo "$harness is not this checkout's harness (another build in the same target dir?)" >&2; exit 1; }

base=${OMNIBOX_BENCH_DATABASE_URL%%\?*}
hostport=$(printf '%s' "$base" | sed -E 's|^[a-z]+://([^@/]*@)?([^/?]*).*|\2|')
ref_dsn() { # KIND -> the reference's SQLAlchemy DSN
  local url=$base
  if [ "$1" = tls-latency ]; then
    url=$(printf '%s' "$base" | sed -E "s|^([a-z]+://([^@/]*@)?)[^/?]*|\\1127.0.0.1:$proxy_port|")
  fi
  url="postgresql+asyncpg://${url#*://}"
  if [ "$1" = plain ]; then echo "$url?ssl=disable"; else echo "$url?ssl=require"; fi
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%FT%TZ)" | tee "$log"
echo "kinds: $kinds; latency $latency ms each way for tls-latency; $rounds rounds; $events events" | tee -a "$log"
[ -n "$ref" ] && echo "reference: rounds 1..$ref_rounds; inbox_consume of $ref_inbox_events messages" | tee -a "$log"

if [ -n "$ref" ]; then
  if [[ " $kinds " == *" tls-latency "* ]]; then
    "$harness" proxy --listen-port "$proxy_port" --target "$hostport" --latency-ms "$latency" >"$log.proxy" 2>&1 &
    proxy_pid=$!
    for _ in $(seq 50); do grep -q listening "$log.proxy" 2>/dev/null && break; sleep 0.1; done
    grep -q listening "$log.proxy" || { cat "$log.proxy" >&2; echo "the reference's proxy did not start" >&2; exit 1; }
    proxy_port=$(sed -nE 's/.*listening on [0-9.]+:([0-9]+),.*/\1/p' "$log.proxy")
    cat "$log.proxy" | tee -a "$log"
  fi
  # What the reference's connection is, checked with its own asyncpg.
  for kind in $kinds; do
    dsn=$(ref_dsn "$kind")
    "$ref/py" - "postgresql://${dsn#postgresql+asyncpg://}" "$kind" <<'PY' | tee -a "$log" | tee -a "$refconn" >/dev/null
import asyncio, json, sys, time
import asyncpg
dsn, kind = sys.argv[1], sys.argv[2]
url, _, mode = dsn.partition("?ssl=")
async def main():
    c = await asyncpg.connect(url, ssl=mode)
    row = await c.fetchrow("SELECT ssl, version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    trips = []
    for _ in range(50):
        t = time.perf_counter()
        await c.fetchval("SELECT 1")
        trips.append((time.perf_counter() - t) * 1000)
    await c.close()
    trips.sort()
    print(json.dumps({"conn": kind, "ssl": mode, "tls": row["version"] if row["ssl"] else None,
                      "cipher": row["cipher"], "select1_round_trip_ms": round(trips[25], 3)}))
asyncio.run(main())
PY
  done
  sed 's/^/reference connection: /' "$refconn"
fi

configs=(
  "enqueue --events $events"
  "publish --events $events --batch 1000 --relays 1 --keys 0 --sink null"
  "publish --events $events --batch 1000 --relays 1 --keys 0 --sink null --hold lease"
  "publish --events $events --batch 1000 --relays 1 --keys 1000 --sink null"
  "publish --events $events --batch 1000 --relays 1 --keys 100 --sink null"
  "publish --events $events --batch 1000 --relays 1 --keys 10 --sink null"
  "publish --events $events --batch 1000 --relays 1 --keys 1 --sink null"
  "publish --events $events --batch 1000 --relays 4 --keys 0 --sink null"
  "inbox --source file --events $events --batch 500"
)
failed=0
for r in $(seq 1 "$rounds"); do
  echo "== round $r/$rounds ($(date -u +%T))" | tee -a "$log"
  for config in "${configs[@]}"; do
    for kind in $kinds; do
      # shellcheck disable=SC2086
      if line=$("$harness" $config --rounds 1 --conn "$kind" --latency-ms "$latency" 2>&1 | tee -a "$log" \
          | grep -E "round 1:" | tail -1) && [ -n "$line" ]; then
        printf '%-12s %-75s %s\n' "$kind" "$config" "$(printf '%s' "$line" | grep -oE '= [0-9]+ [a-z]+/s' || true)"
      else
        printf '%-12s %-75s FAILED (see %s)\n' "$kind" "$config" "$log"
        failed=$((failed + 1))
      fi
    done
  done
  if [ -n "$ref" ] && [ "$r" -le "$ref_rounds" ]; then
    for kind in $kinds; do
      dsn=$(ref_dsn "$kind")
      for args in "--scenario outbox_insert --events $events" \
                  "--scenario outbox_publish --batch-sizes 1000 --workers 1 --events $events" \
                  "--scenario inbox_consume --events $ref_inbox_events"; do
        # shellcheck disable=SC2086
        if lines=$(PEER_DSN=$dsn "$ref/py" "$ref/bench_python_peer.py" $args 2>>"$log"); then
          printf '%s\n' "$lines" | sed "s/^{/{\"system\": \"omni-box 0.3.1\", \"conn\": \"$kind\", \"latency_ms_each_way\": $( [ "$kind" = tls-latency ] && echo "$latency" || echo 0 ), /" >>"$out"
          printf '%-12s %-75s %s\n' "$kind" "reference $args" \
            "$(printf '%s' "$lines" | python3 -c 'import json,sys; print(" ".join("= %.0f events/s" % json.loads(l)["events_per_s"] for l in sys.stdin if l.strip()))')"
        else
          printf '%-12s %-75s FAILED (see %s)\n' "$kind" "reference $args" "$log"
          failed=$((failed + 1))
        fi
      done
    done
  fi
done

{ echo "bench/conditions.sh $rounds $kinds ($(date -u +%FT%TZ); $(nproc) cores; $events events; latency $latency ms each way;"
  echo "PostgreSQL $(psql "${OMNIBOX_BENCH_DATABASE_URL%%\?*}?sslmode=disable" -Atc 'SHOW server_version' 2>/dev/null || echo '?')$([ "$started" = 1 ] && echo ', private and durable, started by this script'))"
  echo; } >"$table"
python3 - "$out" "$kinds" "$latency" >>"$table" <<'PY'
import json, statistics, sys
path, kinds, latency = sys.argv[1], sys.argv[2].split(), sys.argv[3]
rows, conns = {}, {}
order = []
def add(key, kind, rate):
    if key not in rows:
        rows[key] = {}
        order.append(key)
    rows[key].setdefault(kind, []).append(rate)
for line in open(path):
    r = json.loads(line)
    kind, p = r["conn"], r.get("params", {})
    if r.get("system") == "omni-box 0.3.1":
        key = {
            "outbox_insert": "omni-box 0.3.1: outbox_insert (bulk_create, 1,000 per transaction)",
            "outbox_publish": f"omni-box 0.3.1: outbox_publish, batch {p.get('batch_size')}, {p.get('workers')} worker, keys {p.get('keys')} (VACUUM ANALYZE before timing: its script's design)",
            "inbox_consume": "omni-box 0.3.1: inbox_consume, exactly-once, in-memory consumer, a transaction per message",
        }.get(r["scenario"], r["scenario"])
    else:
        d = r.get("conn_detail", {})
        conns.setdefault(kind, []).append(d)
        s = r["scenario"]
        if s == "omnibox_enqueue":
            key = f"omnibox: enqueue --jsonl, {r['events']:,} events (whole process)"
        elif s == "omnibox_publish":
            relays = p["workers"]
            held = ", --hold lease" if p.get("hold") == "lease" else ""
            key = f"omnibox: publish --once{held}, null sink, batch {p['batch_size']}, {relays} relay{'s' if relays > 1 else ''}, keys {p['keys']} (whole processes)"
        elif s == "omnibox_inbox_consume_file":
            key = f"omnibox: inbox consume --from file, exactly-once, {r['events']:,} lines (whole process)"
        else:
            key = s
    add(key, kind, r["events_per_s"])
names = {"plain": "plain", "tls": "TLS", "tls-latency": f"TLS + {latency} ms each way"}
def cell(v):
    return f"{statistics.median(v):,.0f} ({len(v)})" if v else "–"
print("| figure (events/s, median (rounds)) | " + " | ".join(names[k] for k in kinds) + " |")
print("|---|" + "---:|" * len(kinds))
def rank(k):
    # omnibox and the reference's corresponding figure next to each other
    for i, prefix in enumerate(["omnibox: enqueue", "omni-box 0.3.1: outbox_insert",
                                "omnibox: publish --once, null sink, batch 1000, 1 relay, keys unique",
                                "omni-box 0.3.1: outbox_publish", "omnibox: publish", "omnibox: inbox",
                                "omni-box 0.3.1: inbox"]):
        if k.startswith(prefix):
            return i
    return 99
for key in sorted(order, key=lambda k: (rank(k), order.index(k))):
    print(f"| {key} | " + " | ".join(cell(rows[key].get(k, [])) for k in kinds) + " |")
print()
for k in kinds:
    ds = conns.get(k, [])
    if not ds:
        continue
    tls = ds[0].get("tls") or {}
    rt = statistics.median(d.get("select1_round_trip_ms", 0) for d in ds)
    how = " ".join(filter(None, [tls.get("version"), tls.get("cipher")])) or "no TLS"
    print(f"- {names[k]}: omnibox over {how}"
          f"{', through the harness delay proxy' if ds[0].get('latency_ms_each_way') else ''}; "
          f"SELECT 1 round trip (sqlx, median of the runs' checks) {rt:.2f} ms")
PY
if [ -s "$refconn" ]; then
  python3 - "$refconn" >>"$table" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    how = " ".join(filter(None, [r["tls"], r["cipher"]])) or "no TLS"
    print(f"- reference, {r['conn']}: asyncpg ssl={r['ssl']}, {how}; "
          f"SELECT 1 round trip {r['select1_round_trip_ms']:.2f} ms")
PY
fi
echo
cat "$table"
echo
echo "table: $table; raw rounds: $out; log: $log"
[ "$failed" = 0 ] || { echo "$failed runs FAILED" >&2; exit 1; }
