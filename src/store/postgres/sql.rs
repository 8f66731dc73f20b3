//! The PostgreSQL statements, one set per table. Every statement is a
//! `&'static str` built at compile time; values are always bind parameters.

pub struct TableSql {
    pub get: &'static str,
    pub claim: &'static str,
    pub complete: &'static str,
    pub fail: &'static str,
    pub release: &'static str,
    pub force_unlock: &'static str,
    pub release_stale: &'static str,
    pub delete_completed: &'static str,
    pub counts: &'static str,
    pub select_all: &'static str,
    pub requeue_head: &'static str,
    pub failed_head: &'static str,
    pub unlock_worker: &'static str,
    pub count_stale: &'static str,
    pub count_completed_older: &'static str,
    pub count_failed_older: &'static str,
    pub delete_failed: &'static str,
    pub failed_by_type: &'static str,
}

/// The claim of a table without per-key order (the inbox): unlocked due rows
/// from the claim index, plus rows whose lease expired from the lock index.
macro_rules! plain_claim {
    ($t:literal) => {
        concat!(
            "WITH free AS (
                SELECT id, seq, scheduled_at FROM ",
            $t,
            "
                WHERE status = 'pending' AND locked_at IS NULL AND scheduled_at <= now()
                ORDER BY scheduled_at, seq
                LIMIT $2
                FOR UPDATE SKIP LOCKED
            ),
            expired AS (
                SELECT id, seq, scheduled_at FROM ",
            $t,
            "
                WHERE locked_at < now() - make_interval(secs => $1)
                  AND status = 'pending' AND scheduled_at <= now()
                ORDER BY locked_at
                LIMIT $2
                FOR UPDATE SKIP LOCKED
            ),
            picked AS (
                SELECT id FROM (SELECT * FROM free UNION ALL SELECT * FROM expired) c
                ORDER BY scheduled_at, seq
                LIMIT $2
            )
            UPDATE ",
            $t,
            " t
            SET locked_at = now(), locked_by = $3, updated_at = now()
            FROM picked
            WHERE t.id = picked.id
            RETURNING t.*"
        )
    };
}

macro_rules! table_sql {
    ($t:literal, $claim:expr) => {
        TableSql {
            get: concat!("SELECT * FROM ", $t, " WHERE id = $1"),
            claim: $claim,
            complete: concat!(
                "UPDATE ", $t, "
                SET status = 'completed', completed_at = now(), locked_at = NULL, locked_by = NULL, updated_at = now()
                WHERE id = ANY($1) AND locked_by = $2 AND locked_at = $3
                RETURNING id"
            ),
            fail: concat!(
                "UPDATE ", $t, " t
                SET attempts_made = t.attempts_made + CASE WHEN u.counted THEN 1 ELSE 0 END,
                    status = CASE WHEN u.counted AND t.attempts_made + 1 >= t.max_attempts
                                  THEN 'failed' ELSE 'pending' END,
                    scheduled_at = CASE WHEN u.counted AND t.attempts_made + 1 >= t.max_attempts
                                        THEN t.scheduled_at ELSE u.retry_at END,
                    last_error = u.error,
                    locked_at = NULL, locked_by = NULL, updated_at = now()
                FROM UNNEST($1::uuid[], $2::text[], $3::bool[], $4::timestamptz[]) AS u(id, error, counted, retry_at)
                WHERE t.id = u.id AND t.locked_by = $5 AND t.locked_at = $6
                RETURNING t.id, t.status"
            ),
            release: concat!(
                "UPDATE ", $t, "
                SET locked_at = NULL, locked_by = NULL, updated_at = now()
                WHERE id = ANY($1) AND locked_by = $2 AND locked_at = $3
                RETURNING id"
            ),
            force_unlock: concat!(
                "UPDATE ", $t, "
                SET locked_at = NULL, locked_by = NULL, last_error = $2, updated_at = now()
                WHERE id = $1 AND locked_at IS NOT NULL
                RETURNING *"
            ),
            release_stale: concat!(
                "WITH stale AS (
                    SELECT id FROM ", $t, "
                    WHERE locked_at < now() - make_interval(secs => $1)
                    ORDER BY locked_at
                    LIMIT $2
                    FOR UPDATE SKIP LOCKED
                )
                UPDATE ", $t, " t
                SET locked_at = NULL, locked_by = NULL, updated_at = now()
                FROM stale WHERE t.id = stale.id"
            ),
            delete_completed: concat!(
                "DELETE FROM ", $t, " WHERE id IN (
                    SELECT id FROM ", $t, "
                    WHERE status = 'completed' AND completed_at < now() - make_interval(secs => $1)
                    ORDER BY completed_at
                    LIMIT $2
                    FOR UPDATE SKIP LOCKED
                )"
            ),
            counts: concat!(
                "SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                        count(*) FILTER (WHERE status = 'completed') AS completed,
                        count(*) FILTER (WHERE status = 'failed') AS failed,
                        count(*) FILTER (WHERE locked_at IS NOT NULL) AS locked,
                        count(*) FILTER (WHERE status = 'pending' AND locked_at IS NULL AND scheduled_at <= now()) AS due_now,
                        min(created_at) FILTER (WHERE status = 'pending') AS oldest_pending,
                        now() AS now
                FROM ", $t
            ),
            select_all: concat!("SELECT * FROM ", $t, " WHERE TRUE"),
            requeue_head: concat!(
                "UPDATE ", $t, "
                SET status = 'pending', attempts_made = 0, last_error = NULL, scheduled_at = now(), updated_at = now()
                WHERE id IN (SELECT id FROM ", $t, " WHERE status = 'failed'"
            ),
            failed_head: concat!("SELECT * FROM ", $t, " WHERE status = 'failed'"),
            unlock_worker: concat!(
                "UPDATE ", $t, "
                SET locked_at = NULL, locked_by = NULL, last_error = $2, updated_at = now()
                WHERE locked_by = $1
                RETURNING id"
            ),
            count_stale: concat!(
                "SELECT count(*) FROM ", $t, " WHERE locked_at < now() - make_interval(secs => $1)"
            ),
            count_completed_older: concat!(
                "SELECT count(*) FROM ", $t,
                " WHERE status = 'completed' AND completed_at < now() - make_interval(secs => $1)"
            ),
            count_failed_older: concat!(
                "SELECT count(*) FROM ", $t,
                " WHERE status = 'failed' AND updated_at < now() - make_interval(secs => $1)"
            ),
            delete_failed: concat!(
                "DELETE FROM ", $t, " WHERE id IN (
                    SELECT id FROM ", $t, "
                    WHERE status = 'failed' AND updated_at < now() - make_interval(secs => $1)
                    ORDER BY updated_at
                    LIMIT $2
                    FOR UPDATE SKIP LOCKED
                )"
            ),
            failed_by_type: concat!(
                "SELECT event_type, count(*) FROM ", $t,
                " WHERE status = 'failed' GROUP BY event_type ORDER BY count(*) DESC, event_type"
            ),
        }
    };
}

/// The outbox claim keeps per-key order. Candidates are the first $2 due rows
/// (unlocked, or lease expired) in (scheduled_at, seq) order, locked with
/// SKIP LOCKED, leaving out rows queued behind a tried row of their key (one
/// probe of the small key_held index each; without this, rows stuck behind a
/// failed head could fill every window and starve the head itself). For each key among them, the *barrier* is the earliest
/// pending row of that key that is not a candidate and is due, tried
/// (last_error set) or locked; it is found with one probe of the key-order
/// index per key. A candidate is claimed only if it precedes its key's
/// barrier, so a claim takes runs of consecutive rows starting at a key's
/// head, and never a row behind one that is held or waiting for a retry.
const OUTBOX_CLAIM: &str = "WITH free AS (
        SELECT id, seq, scheduled_at, topic, partition_key FROM outbox_events r
        WHERE status = 'pending' AND locked_at IS NULL AND scheduled_at <= now()
          -- NOT COALESCE(scalar subquery), not NOT EXISTS: the planner turns
          -- NOT EXISTS into an anti-join whose plan depends on how many rows
          -- the statistics say are held (a nested loop over all of them when
          -- they said none), and a bare `IS NULL` makes it sort the backlog.
          -- This form stays an index scan with one probe per row.
          AND NOT COALESCE((SELECT true FROM outbox_events h
               WHERE h.status = 'pending' AND h.last_error IS NOT NULL
                 AND h.topic = r.topic AND h.partition_key = r.partition_key AND h.seq < r.seq
               LIMIT 1), false)
        ORDER BY scheduled_at, seq
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ),
    expired AS (
        SELECT id, seq, scheduled_at, topic, partition_key FROM outbox_events
        WHERE locked_at < now() - make_interval(secs => $1)
          AND status = 'pending' AND scheduled_at <= now()
        ORDER BY locked_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ),
    cand AS MATERIALIZED (
        SELECT * FROM (SELECT * FROM free UNION ALL SELECT * FROM expired) c
        ORDER BY scheduled_at, seq
        LIMIT $2
    ),
    keys AS (
        SELECT topic, partition_key, max(seq) AS max_seq
        FROM cand
        GROUP BY topic, partition_key
    ),
    barrier AS MATERIALIZED (
        SELECT k.topic, k.partition_key,
               (SELECT e.seq FROM outbox_events e
                 WHERE e.status = 'pending'
                   AND e.topic = k.topic AND e.partition_key = k.partition_key
                   AND e.seq < k.max_seq
                   AND (e.scheduled_at <= now() OR e.last_error IS NOT NULL OR e.locked_at IS NOT NULL)
                   AND e.seq NOT IN (SELECT seq FROM cand)
                 ORDER BY e.seq
                 LIMIT 1) AS seq
        FROM keys k
    ),
    picked AS (
        SELECT c.id FROM cand c
        JOIN barrier b ON b.topic = c.topic AND b.partition_key = c.partition_key
        WHERE b.seq IS NULL OR c.seq < b.seq
    )
    UPDATE outbox_events t
    SET locked_at = now(), locked_by = $3, updated_at = now()
    FROM picked
    WHERE t.id = picked.id
    RETURNING t.*";

pub static OUTBOX: TableSql = table_sql!("outbox_events", OUTBOX_CLAIM);
pub static INBOX: TableSql = table_sql!("inbox_events", plain_claim!("inbox_events"));

/// The candidate scan of the claim alone, for EXPLAIN in tests and benches.
pub const OUTBOX_CLAIM_SCAN: &str = "SELECT id FROM outbox_events r
    WHERE status = 'pending' AND locked_at IS NULL AND scheduled_at <= now()
      -- NOT COALESCE(scalar subquery), not NOT EXISTS: the planner turns
      -- NOT EXISTS into an anti-join whose plan depends on how many rows
      -- the statistics say are held (a nested loop over all of them when
      -- they said none), and a bare `IS NULL` makes it sort the backlog.
      -- This form stays an index scan with one probe per row.
      AND NOT COALESCE((SELECT true FROM outbox_events h
           WHERE h.status = 'pending' AND h.last_error IS NOT NULL
             AND h.topic = r.topic AND h.partition_key = r.partition_key AND h.seq < r.seq
           LIMIT 1), false)
    ORDER BY scheduled_at, seq
    LIMIT 1000
    FOR UPDATE SKIP LOCKED";

pub(super) const INSERT_OUTBOX: &str = "INSERT INTO outbox_events (
        id, event_type, payload, headers, trace_id, idempotency_key, correlation_id, causation_id,
        schema_version, status, attempts_made, max_attempts, last_error, scheduled_at, completed_at,
        created_at, updated_at, aggregate_type, aggregate_id, topic, partition_key)
    SELECT u.id, u.event_type, u.payload::jsonb, u.headers::jsonb, u.trace_id, u.idempotency_key,
        u.correlation_id, u.causation_id, u.schema_version, u.status, u.attempts_made, u.max_attempts,
        u.last_error, u.scheduled_at, u.completed_at, u.created_at, u.created_at,
        u.aggregate_type, u.aggregate_id, u.topic, u.partition_key
    FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
        $8::text[], $9::text[], $10::text[], $11::int4[], $12::int4[], $13::text[], $14::timestamptz[],
        $15::timestamptz[], $16::timestamptz[], $17::text[], $18::uuid[], $19::text[], $20::text[])
        WITH ORDINALITY AS u(id, event_type, payload, headers, trace_id, idempotency_key, correlation_id,
            causation_id, schema_version, status, attempts_made, max_attempts, last_error, scheduled_at,
            completed_at, created_at, aggregate_type, aggregate_id, topic, partition_key, ord)
    ORDER BY u.ord
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id";

pub(super) const INSERT_INBOX: &str = "INSERT INTO inbox_events (
        id, event_type, payload, headers, trace_id, idempotency_key, correlation_id, causation_id,
        schema_version, status, attempts_made, max_attempts, last_error, scheduled_at, completed_at,
        created_at, updated_at, message_id, consumer_group, source)
    SELECT u.id, u.event_type, u.payload::jsonb, u.headers::jsonb, u.trace_id, u.idempotency_key,
        u.correlation_id, u.causation_id, u.schema_version, u.status, u.attempts_made, u.max_attempts,
        u.last_error, u.scheduled_at, u.completed_at, u.created_at, u.created_at,
        u.message_id, u.consumer_group, u.source
    FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
        $8::text[], $9::text[], $10::text[], $11::int4[], $12::int4[], $13::text[], $14::timestamptz[],
        $15::timestamptz[], $16::timestamptz[], $17::text[], $18::text[], $19::text[])
        WITH ORDINALITY AS u(id, event_type, payload, headers, trace_id, idempotency_key, correlation_id,
            causation_id, schema_version, status, attempts_made, max_attempts, last_error, scheduled_at,
            completed_at, created_at, message_id, consumer_group, source, ord)
    ORDER BY u.ord
    ON CONFLICT (message_id, consumer_group) DO NOTHING
    RETURNING id";

pub(super) const EXISTING_BY_IDEMPOTENCY_KEY: &str =
    "SELECT idempotency_key, id FROM outbox_events WHERE idempotency_key = ANY($1)";

pub(super) const EXISTING_BY_MESSAGE: &str = "SELECT i.message_id, i.consumer_group, i.id
    FROM inbox_events i
    JOIN UNNEST($1::text[], $2::text[]) AS k(message_id, consumer_group)
      ON i.message_id = k.message_id AND i.consumer_group = k.consumer_group";

pub(super) const INBOX_BY_MESSAGE: &str =
    "SELECT * FROM inbox_events WHERE message_id = $1 AND consumer_group = $2";

/// COPY of outbox rows without idempotency keys (nothing can conflict, so
/// the plain, faster path applies). Columns in the order of `copy_outbox_row`.
pub(super) const COPY_OUTBOX: &str = "COPY outbox_events (
        id, event_type, payload, headers, trace_id, idempotency_key, correlation_id, causation_id,
        schema_version, status, attempts_made, max_attempts, last_error, scheduled_at, completed_at,
        created_at, updated_at, aggregate_type, aggregate_id, topic, partition_key)
    FROM STDIN (FORMAT csv)";

pub(super) const BLOCKED_KEYS: &str = "SELECT h.topic, h.partition_key, h.id, h.attempts_made, h.last_error, h.scheduled_at,
        (SELECT count(*) FROM outbox_events w
          WHERE w.status = 'pending' AND w.topic = h.topic AND w.partition_key = h.partition_key
            AND w.seq > h.seq) AS waiting
    FROM (SELECT DISTINCT ON (topic, partition_key) topic, partition_key, id, seq, attempts_made, last_error, scheduled_at
          FROM outbox_events
          WHERE status = 'pending' AND last_error IS NOT NULL
          ORDER BY topic, partition_key, seq) h
    ORDER BY waiting DESC, h.topic, h.partition_key
    LIMIT $1";
