#!/usr/bin/env bash
# A private PostgreSQL server for omnibox's tests and benchmarks.
#
#   eval "$(scripts/postgres.sh start [--port 54329] [--dir DIR] [--durable])"
#       installs Debian's postgresql package if its binaries are missing,
#       creates a throwaway cluster in DIR, starts it on 127.0.0.1:PORT only,
#       creates role/database/password omnibox, and prints:
#         export OMNIBOX_TEST_DATABASE_URL=postgres://omnibox:omnibox@127.0.0.1:PORT/omnibox
#         export OMNIBOX_TEST_PG_PID=<postmaster pid>  OMNIBOX_TEST_PG_DIR=DIR
#       Without --durable the cluster runs with fsync=off (tests: fast, and
#       the data is thrown away); --durable keeps PostgreSQL's defaults (benchmarks).
#       --tls CERTS (a directory with ca.crt, server.crt, server.key) turns
#       TLS on and requires it for every TCP connection; the role
#       omnibox_cert (database omnibox) logs in with a client certificate
#       (CN=omnibox_cert) signed by that CA.
#       --tls-optional offers TLS without requiring it (benchmarks: the same
#       server takes sslmode=disable and TLS connections): a throwaway CA and
#       server certificate (RSA 2048, for 127.0.0.1 and localhost) are made
#       with openssl in DIR/tls, unless --tls CERTS gives them.
#       --logical sets wal_level=logical (replication slots; the doctor's
#       slot check and the tests of it) and gives the omnibox role the
#       REPLICATION attribute.
#   scripts/postgres.sh stop [--dir DIR]
#       stops the server started by `start` (by the PID in DIR) and removes DIR.
#   scripts/postgres.sh halt [--port P] [--mode fast|immediate|smart]
#       stops the server, keeping its data (an outage, for the restart tests)
#   scripts/postgres.sh resume [--port P]
#       starts a halted server again with its options; prints its new PID
#   scripts/postgres.sh restart [--port P] [--mode fast|immediate]
#       halt, then resume
#
# Progress goes to stderr; only the export lines go to stdout.
set -euo pipefail

cmd=${1:-}
shift || true
PORT=54329
DIR=""
DURABLE=0
MODE=fast
TLS=""
TLS_OPTIONAL=0
LOGICAL=0
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT=$2; shift 2 ;;
    --mode) MODE=$2; shift 2 ;;
    --tls) TLS=$2; shift 2 ;;
    --tls-optional) TLS_OPTIONAL=1; shift ;;
    --dir) DIR=$2; shift 2 ;;
    --durable) DURABLE=1; shift ;;
    --logical) LOGICAL=1; shift ;;
    *) echo "postgres.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
DIR=${DIR:-/tmp/omnibox-pg-$PORT}
log() { echo "[postgres.sh] $*" >&2; }

pg_bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$d" ] && [ -x "$d/initdb" ] && echo "$d"
}

install_postgres() {
  log "installing Debian's postgresql package (first time on this machine: about a minute)"
  export DEBIAN_FRONTEND=noninteractive
  # Keep the package from starting its own cluster: this script runs its own.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created_policy=1
  fi
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
  [ "$created_policy" = 1 ] && rm -f "$policy"
  return 0
}

as_postgres() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# A throwaway CA and a server certificate it signs, in $1.
make_certs() {
  local d=$1
  command -v openssl >/dev/null || { log "openssl is missing (apt-get install openssl)"; exit 1; }
  ( cd "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj /CN=omnibox-bench-ca \
      -keyout ca.key -out ca.crt
    openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout server.key -out server.csr
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 7 \
      -extfile server.ext -out server.crt
    rm -f ca.key server.csr server.ext ca.srl ) >"$d/openssl.log" 2>&1 \
    || { cat "$d/openssl.log" >&2; exit 1; }
}

start() {
  local bin
  bin=$(pg_bin || true)
  if [ -z "$bin" ]; then
    install_postgres
    bin=$(pg_bin)
  fi
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    log "no postgres user: reinstall the postgresql package"; exit 1
  fi
  if [ -f "$DIR/data/postmaster.pid" ] && kill -0 "$(head -1 "$DIR/data/postmaster.pid")" 2>/dev/null; then
    log "a server from an earlier run is still up in $DIR; stopping it first"
    stop
  fi
  rm -rf "$DIR"
  mkdir -p "$DIR"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$DIR"
  log "initdb in $DIR ($("$bin/postgres" --version))"
  as_postgres "$bin/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$DIR/initdb.log" 2>&1 \
    || { cat "$DIR/initdb.log" >&2; exit 1; }
  local opts="-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c max_connections=300 -c TimeZone=UTC"
  if [ "$DURABLE" = 0 ]; then
    opts="$opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  fi
  if [ "$LOGICAL" = 1 ]; then
    opts="$opts -c wal_level=logical -c max_replication_slots=20 -c max_wal_senders=20"
  fi
  if [ -n "$TLS" ] || [ "$TLS_OPTIONAL" = 1 ]; then
    mkdir -p "$DIR/tls"
    if [ -n "$TLS" ]; then
      cp "$TLS/ca.crt" "$TLS/server.crt" "$TLS/server.key" "$DIR/tls/"
    else
      make_certs "$DIR/tls"
    fi
    chmod 600 "$DIR/tls/server.key"
    [ "$(id -u)" = 0 ] && chown -R postgres:postgres "$DIR/tls"
    opts="$opts -c ssl=on -c ssl_cert_file=$DIR/tls/server.crt -c ssl_key_file=$DIR/tls/server.key -c ssl_ca_file=$DIR/tls/ca.crt"
    # Certificate login for omnibox_cert; with --tls, TLS for every TCP
    # connection.
    local hba="$DIR/data/pg_hba.conf"
    { [ "$TLS_OPTIONAL" = 1 ] || echo "hostnossl all all 127.0.0.1/32 reject"
      echo "hostssl omnibox omnibox_cert 127.0.0.1/32 cert"
      cat "$hba"; } > "$hba.new"
    mv "$hba.new" "$hba"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$hba"
  fi
  echo "$opts" > "$DIR/opts"
  as_postgres "$bin/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -o "$opts" -w -t 60 start >&2 \
    || { cat "$DIR/server.log" >&2; exit 1; }
  local pid
  pid=$(head -1 "$DIR/data/postmaster.pid")
  "$bin/psql" -h "$DIR" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -q >&2 <<SQL
CREATE ROLE omnibox LOGIN PASSWORD 'omnibox';
CREATE DATABASE omnibox OWNER omnibox;
CREATE ROLE omnibox_cert LOGIN IN ROLE omnibox;
SQL
  if [ "$LOGICAL" = 1 ]; then
    "$bin/psql" -h "$DIR" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -q \
      -c "ALTER ROLE omnibox REPLICATION" >&2
  fi
  log "PostgreSQL on 127.0.0.1:$PORT (pid $pid, data in $DIR)"
  echo "export OMNIBOX_TEST_DATABASE_URL=postgres://omnibox:omnibox@127.0.0.1:$PORT/omnibox"
  echo "export OMNIBOX_TEST_PG_PID=$pid"
  echo "export OMNIBOX_TEST_PG_DIR=$DIR"
}

stop() {
  local pid=""
  [ -f "$DIR/data/postmaster.pid" ] && pid=$(head -1 "$DIR/data/postmaster.pid")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -INT "$pid" 2>/dev/null || true   # fast shutdown
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    log "stopped PostgreSQL (pid $pid)"
  fi
  rm -rf "$DIR"
}

halt() {
  local bin
  bin=$(pg_bin)
  case "$MODE" in fast|immediate|smart) ;; *) log "--mode is fast, immediate or smart"; exit 2 ;; esac
  as_postgres "$bin/pg_ctl" -D "$DIR/data" -m "$MODE" -w -t 60 stop >&2
  log "halted PostgreSQL on port $PORT ($MODE); data kept in $DIR"
}

resume() {
  local bin pid
  bin=$(pg_bin)
  as_postgres "$bin/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -o "$(cat "$DIR/opts")" -w -t 60 start >&2 \
    || { tail -20 "$DIR/server.log" >&2; exit 1; }
  pid=$(head -1 "$DIR/data/postmaster.pid")
  log "resumed PostgreSQL on port $PORT (pid $pid)"
  echo "export OMNIBOX_TEST_PG_PID=$pid"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  halt) halt ;;
  resume) resume ;;
  restart) halt; resume ;;
  *) echo "usage: scripts/postgres.sh start|stop|halt|resume|restart [--port P] [--dir D] [--durable] [--tls CERTS] [--tls-optional] [--logical] [--mode M]" >&2; exit 2 ;;
esac
