#!/usr/bin/env bash
# A local Kafka-protocol broker for omnibox's tests: tansu (Apache-2.0, from
# crates.io), with its SQLite storage, on loopback only.
#
#   eval "$(scripts/kafka.sh start [--port 19092] [--dir DIR])"
#       installs tansu 0.6.0 with `cargo install` if missing (the first time
#       takes about 13 minutes), starts it in DIR (an empty directory: tansu
#       reads ./.env), adds the index its header table lacks (without it,
#       fetching messages with headers slows down quadratically), and prints
#         export OMNIBOX_TEST_BROKERS=127.0.0.1:PORT OMNIBOX_TEST_KAFKA_PID=<pid>
#         export OMNIBOX_TEST_KAFKA_DIR=DIR OMNIBOX_TEST_TANSU=<path of the binary>
#       --advertise-port P: the broker advertises 127.0.0.1:P instead of its
#       own port, so clients follow a proxy listening there (the benchmarks'
#       delay proxy); resume keeps it.
#   scripts/kafka.sh stop [--dir DIR]
#       stops the broker started by `start` (by its PID: TERM, then KILL) and removes DIR.
#   scripts/kafka.sh halt [--port P]
#       stops the broker, keeping its data (an outage, for the restart tests)
#   scripts/kafka.sh resume [--port P]
#       starts a halted broker again on its data; prints its new PID
#   scripts/kafka.sh install
#       only installs tansu.
set -euo pipefail

cmd=${1:-}
shift || true
PORT=19092
DIR=""
ADVERTISE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --advertise-port) ADVERTISE=$2; shift 2 ;;
    *) echo "kafka.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
DIR=${DIR:-/tmp/omnibox-kafka-$PORT}
VERSION=0.6.0
log() { echo "[kafka.sh] $*" >&2; }

tansu_bin() {
  local b
  for b in "$(command -v tansu 2>/dev/null || true)" "${CARGO_HOME:-$HOME/.cargo}/bin/tansu"; do
    if [ -n "$b" ] && [ -x "$b" ] && "$b" --version 2>/dev/null | grep -q "$VERSION"; then
      echo "$b"; return 0
    fi
  done
  return 1
}

install() {
  if tansu_bin >/dev/null; then return 0; fi
  log "installing tansu $VERSION with cargo (first time on this machine: about 13 minutes)"
  cargo install tansu --version "$VERSION" --locked --features libsql >&2
}

index_headers() {
  # The table exists once the broker has started; retry until it does.
  python3 - "$DIR/tansu.db" <<'PY'
import sqlite3, sys, time
for _ in range(200):
    try:
        c = sqlite3.connect(sys.argv[1], timeout=10)
        c.execute("CREATE INDEX IF NOT EXISTS header_topition_offset ON header(topition, offset_id)")
        c.commit(); c.close(); sys.exit(0)
    except sqlite3.OperationalError:
        time.sleep(0.05)
sys.exit("[kafka.sh] could not add the index to tansu's header table")
PY
}

start() {
  install
  local bin
  bin=$(tansu_bin)
  if [ -f "$DIR/tansu.pid" ] && kill -0 "$(cat "$DIR/tansu.pid")" 2>/dev/null; then
    log "a broker from an earlier run is still up in $DIR; stopping it first"
    stop
  fi
  rm -rf "$DIR" && mkdir -p "$DIR"
  echo "${ADVERTISE:-$PORT}" > "$DIR/advertised-port"
  launch
  index_headers
  log "tansu $VERSION on 127.0.0.1:$PORT, advertising port $(cat "$DIR/advertised-port") (pid $(cat "$DIR/tansu.pid"), data in $DIR)"
  echo "export OMNIBOX_TEST_BROKERS=127.0.0.1:$PORT"
  echo "export OMNIBOX_TEST_KAFKA_PID=$(cat "$DIR/tansu.pid")"
  echo "export OMNIBOX_TEST_KAFKA_DIR=$DIR"
  echo "export OMNIBOX_TEST_TANSU=$bin"
}

# Starts tansu on the data in $DIR and waits until it listens.
launch() {
  local bin advertised
  bin=$(tansu_bin)
  advertised=$(cat "$DIR/advertised-port" 2>/dev/null || echo "$PORT")
  ( cd "$DIR" && exec env -u OTEL_EXPORTER_OTLP_ENDPOINT -u SCHEMA_REGISTRY \
      "$bin" broker --listener-url "tcp://127.0.0.1:$PORT" \
                    --advertised-listener-url "tcp://127.0.0.1:$advertised" \
                    --storage-engine sqlite://tansu.db ) >"$DIR/tansu.log" 2>&1 &
  local pid=$!
  echo "$pid" > "$DIR/tansu.pid"
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    cat "$DIR/tansu.log" >&2; log "the broker did not start"; exit 1
  fi
}

halt() {
  local pid=""
  [ -f "$DIR/tansu.pid" ] && pid=$(cat "$DIR/tansu.pid")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  fi
  log "halted tansu on port $PORT; data kept in $DIR"
}

resume() {
  mv "$DIR/tansu.log" "$DIR/tansu.log.1" 2>/dev/null || true
  launch
  log "resumed tansu on 127.0.0.1:$PORT (pid $(cat "$DIR/tansu.pid"))"
  echo "export OMNIBOX_TEST_KAFKA_PID=$(cat "$DIR/tansu.pid")"
}

stop() {
  local pid=""
  [ -f "$DIR/tansu.pid" ] && pid=$(cat "$DIR/tansu.pid")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    log "stopped tansu (pid $pid)"
  fi
  rm -rf "$DIR"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  halt) halt ;;
  resume) resume ;;
  install) install ;;
  *) echo "usage: scripts/kafka.sh start|stop|halt|resume|install [--port P] [--dir D] [--advertise-port P]" >&2; exit 2 ;;
esac
