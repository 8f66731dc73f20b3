#!/usr/bin/env bash
# Checks the README's migration claim end to end: rows written by the Python
# omni-box 0.3.1 (`PostgresOutboxRepository.bulk_create`) into the tables
# `omnibox migrate` creates are published by `omnibox publish`, every one
# once, in order per key, with their topic, key, payload and headers.
#
#   scripts/check-omni-box-compat.sh
#
# - Python: $OMNI_BOX_PYTHON when set (a Python with omni-box[postgres]==0.3.1
#   installed); otherwise the first Python >= 3.12 found (python3.13,
#   python3.12, python3, then pyenv's versions) gets a venv in
#   ${TMPDIR:-/tmp}/omnibox-compat-venv with omni-box[postgres]==0.3.1 from
#   PyPI (omni-box needs Python >= 3.12).
# - PostgreSQL: OMNIBOX_TEST_DATABASE_URL when set; otherwise a private
#   server on 127.0.0.1:${OMNIBOX_COMPAT_PG_PORT:-54342} (scripts/postgres.sh),
#   stopped on exit. The check works in a schema of its own, dropped on exit.
# - omnibox: target/debug/omnibox, built first (CARGO_TARGET_DIR is honoured).
#
# Exit 0 when every check holds; the last line says what was checked.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[check-omni-box-compat] $*" >&2; }

PG_PORT=${OMNIBOX_COMPAT_PG_PORT:-54342}
SCHEMA=omnibox_compat_$$
WORK=$(mktemp -d)
started_pg=0
cleanup() {
  if [ -n "${OMNIBOX_TEST_DATABASE_URL:-}" ] && command -v psql >/dev/null 2>&1; then
    psql -q "$OMNIBOX_TEST_DATABASE_URL" -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true
  fi
  if [ "$started_pg" = 1 ]; then scripts/postgres.sh stop --port "$PG_PORT" || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# 1. A Python with omni-box 0.3.1.
find_python() {
  local c
  for c in python3.13 python3.12 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for c in "$(pyenv root)"/versions/3.1[2-9]*/bin/python3; do
      if [ -x "$c" ] && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
        echo "$c"; return 0
      fi
    done
  fi
  return 1
}
PY=${OMNI_BOX_PYTHON:-}
if [ -z "$PY" ]; then
  venv=${TMPDIR:-/tmp}/omnibox-compat-venv
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import omni_box' 2>/dev/null; then
    base=$(find_python) || { log "omni-box 0.3.1 needs Python >= 3.12 and none was found; set OMNI_BOX_PYTHON"; exit 2; }
    log "creating $venv with $("$base" --version) and installing omni-box[postgres]==0.3.1 from PyPI"
    rm -rf "$venv"
    "$base" -m venv "$venv"
    "$venv/bin/pip" install -q 'omni-box[postgres]==0.3.1'
  fi
  PY=$venv/bin/python
fi
"$PY" -c 'import omni_box, sys; assert omni_box.__version__ == "0.3.1", omni_box.__version__; print("omni-box", omni_box.__version__, "on Python", sys.version.split()[0])' >&2

# 2. PostgreSQL, and omnibox's schema in it.
if [ -z "${OMNIBOX_TEST_DATABASE_URL:-}" ]; then
  eval "$(scripts/postgres.sh start --port "$PG_PORT")"
  started_pg=1
fi
scripts/build-deps.sh
cargo build --quiet --bin omnibox
OMNIBOX="${CARGO_TARGET_DIR:-target}/debug/omnibox"
export OMNIBOX_DATABASE_URL=$OMNIBOX_TEST_DATABASE_URL OMNIBOX_DATABASE_SCHEMA=$SCHEMA
"$OMNIBOX" migrate --quiet
log "migrated schema $SCHEMA with $("$OMNIBOX" --version)"

# 3. omni-box writes, through its own repository:
#    - with the model as omni-box ships it, 30 events of 3 keys interleaved,
#      each with headers, and their orders in the same transaction;
#    - an event without headers with that model is refused: SQLAlchemy writes
#      headers=None as JSON null, which omnibox's CHECK (headers IS NULL or a
#      JSON object) does not take; the README's mapping declares headers with
#      JSONB(none_as_null=True), which writes SQL NULL;
#    - with that model, events without headers, some with an idempotency key:
#      bulk_create inserts the events with a key first, and omnibox publishes
#      a key's events in insertion order; create() and a repeated
#      idempotency key (the existing row comes back, nothing is inserted);
#    - a transaction rolled back: neither the order nor its event.
cat > "$WORK/produce.py" <<'PY'
import asyncio, json, os, sys, uuid
from urllib.parse import urlsplit

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from omni_box import OmniBoxDomainService, StorageIntegrityError
from omni_box.infra.storage.postgres import OutboxEventDBBase, PostgresOutboxRepository


class StockBase(DeclarativeBase):
    pass


class StockOutboxEventDB(OutboxEventDBBase, StockBase):
    """The model as omni-box's README declares it."""


class Base(DeclarativeBase):
    pass


class OutboxEventDB(OutboxEventDBBase, Base):
    """The README's mapping: headers=None is SQL NULL."""

    headers: Mapped[dict[str, str] | None] = mapped_column(JSONB(none_as_null=True))


async def main() -> None:
    url = urlsplit(os.environ["OMNIBOX_DATABASE_URL"])
    engine = create_async_engine(
        f"postgresql+asyncpg://{url.netloc}{url.path}",
        connect_args={"server_settings": {"search_path": os.environ["OMNIBOX_DATABASE_SCHEMA"]}},
    )
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    domain = OmniBoxDomainService()
    expected = []

    def order_event(order_id, key, n, **kw):
        return domain.create_outbox_event(
            aggregate_type="order", aggregate_id=order_id, event_type="order.created",
            topic="orders", partition_key=key, payload={"order_id": str(order_id), "n": n}, **kw,
        )

    async def add_order(session, order_id, n):
        await session.execute(text("INSERT INTO orders (id, total) VALUES (:id, :n)"), {"id": order_id, "n": n})

    async with sessions() as session, session.begin():
        await session.execute(text("CREATE TABLE orders (id uuid PRIMARY KEY, total numeric NOT NULL)"))

    # The stock model, events with headers: orders and events in one transaction.
    async with sessions() as session, session.begin():
        repo = PostgresOutboxRepository(session, model_class=StockOutboxEventDB)
        events = []
        for n in range(30):
            order_id = uuid.uuid4()
            await add_order(session, order_id, n)
            events.append(order_event(order_id, f"customer-{n % 3}", n,
                                      headers={"source": "omni-box"}, correlation_id=f"corr-{n}"))
        assert len(await repo.bulk_create(events)) == 30
        expected += events

    # The stock model, an event without headers: refused by the CHECK.
    try:
        async with sessions() as session, session.begin():
            repo = PostgresOutboxRepository(session, model_class=StockOutboxEventDB)
            await repo.bulk_create([order_event(uuid.uuid4(), "customer-0", 98)])
        raise SystemExit("an event without headers went in with the stock model: update the README")
    except StorageIntegrityError as e:
        assert "outbox_events_headers_object" in str(e), e

    # The README's model: no headers, and idempotency keys on some events.
    async with sessions() as session, session.begin():
        repo = PostgresOutboxRepository(session, model_class=OutboxEventDB)
        events = []
        for n in range(100, 104):
            order_id = uuid.uuid4()
            await add_order(session, order_id, n)
            events.append(order_event(order_id, "customer-9", n,
                                      idempotency_key=f"order-{n}" if n % 2 else None))
        assert len(await repo.bulk_create(events)) == 4
        # Insertion order: the events with an idempotency key first.
        expected += [e for e in events if e.idempotency_key] + [e for e in events if not e.idempotency_key]
        # create(), and a repeated idempotency key: the existing row, nothing inserted.
        order_id = uuid.uuid4()
        await add_order(session, order_id, 104)
        single = order_event(order_id, "customer-9", 104, idempotency_key="order-104")
        assert (await repo.create(single)).id == single.id
        again = order_event(order_id, "customer-9", 104, idempotency_key="order-104")
        assert (await repo.create(again)).id == single.id, "a repeated idempotency key was inserted again"
        expected.append(single)

    # Rolled back: neither the order nor its event.
    async with sessions() as session:
        await session.begin()
        repo = PostgresOutboxRepository(session, model_class=OutboxEventDB)
        order_id = uuid.uuid4()
        await add_order(session, order_id, 99)
        await repo.bulk_create([order_event(order_id, "customer-0", 99)])
        await session.rollback()
    await engine.dispose()
    json.dump([
        {"id": str(e.id), "key": e.partition_key, "n": e.payload["n"], "aggregate_id": str(e.aggregate_id),
         "headers": e.headers, "correlation_id": e.correlation_id}
        for e in expected
    ], open(sys.argv[1], "w"))  # stdout carries omni-box's logs


asyncio.run(main())
PY
"$PY" "$WORK/produce.py" "$WORK/expected.json" >&2
log "omni-box wrote 35 events (4 keys) with their orders (bulk_create and create; a repeated idempotency key was not inserted again); an event without headers was refused with the stock model; one transaction rolled back"

# 4. omnibox relays them.
"$OMNIBOX" publish --once --broker "file:$WORK/published.jsonl" --format json > "$WORK/summary.json"
log "omnibox publish --once: $("$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["completed"], "completed,", r["dead"], "failed")' "$WORK/summary.json")"

# 5. Every event once, in order per key, as written.
"$PY" - "$WORK/expected.json" "$WORK/published.jsonl" "$WORK/summary.json" <<'PY'
import json, sys
expected = json.load(open(sys.argv[1]))
published = [json.loads(line) for line in open(sys.argv[2])]
summary = json.load(open(sys.argv[3]))
n = len(expected)
assert summary["completed"] == n and summary["dead"] == 0, summary
assert len(published) == n, f"{len(published)} messages published, {n} expected"
by_id = {m["headers"]["event_id"]: m for m in published}
assert len(by_id) == n, "an event was published twice"
for e in expected:
    m = by_id[e["id"]]
    assert m["topic"] == "orders" and m["key"] == e["key"], m
    v = m["value"]
    assert v["payload"]["n"] == e["n"] and v["event_type"] == "order.created", v
    assert v["aggregate_type"] == "order" and v["aggregate_id"] == e["aggregate_id"], v
    assert m["headers"]["event_type"] == "order.created", m
    for name, value in (e["headers"] or {}).items():
        assert m["headers"][name] == value, m
    if e["correlation_id"]:
        assert v["correlation_id"] == e["correlation_id"] == m["headers"]["correlation_id"], m
for key in {e["key"] for e in expected}:
    want = [e["id"] for e in expected if e["key"] == key]
    got = [m["headers"]["event_id"] for m in published if m["key"] == key]
    assert got == want, f"{key}: published out of insertion order"
assert not any(m["value"]["payload"]["n"] in (98, 99) for m in published), "a refused or rolled-back event was published"
PY
counts=$("$OMNIBOX" status --format json | "$PY" -c 'import json,sys; t=[t for t in json.load(sys.stdin)["tables"] if t["table"]=="outbox"][0]; print(t["completed"], t["pending"], t["failed"])')
[ "$counts" = "35 0 0" ] || { log "outbox counts (completed pending failed): $counts, expected 35 0 0"; exit 1; }
echo "ok: 35 events written by omni-box 0.3.1's PostgresOutboxRepository.bulk_create and create were published once each by omnibox publish, in insertion order per key, with their topic, key, payload and headers; headers=None needs JSONB(none_as_null=True); the rolled-back event was not published"
