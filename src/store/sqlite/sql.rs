//! The SQLite statements, one set per table. Static text only; values are
//! bind parameters. Lists of ids travel as one JSON array bound to
//! `json_each(?)`, so no statement text depends on the number of rows.

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
    pub requeue_where: &'static str,
    pub failed_head: &'static str,
    pub unlock_worker: &'static str,
    pub count_stale: &'static str,
    pub count_completed_older: &'static str,
    pub count_failed_older: &'static str,
    pub delete_failed: &'static str,
    pub failed_by_type: &'static str,
    pub insert: &'static str,
}

macro_rules! plain_claim {
    ($t:literal) => {
        concat!(
            "UPDATE ",
            $t,
            " SET locked_at = ?1, locked_by = ?4, updated_at = ?1
            WHERE seq IN (
                SELECT seq FROM (
                    SELECT seq, scheduled_at FROM (
                        SELECT seq, scheduled_at FROM ",
            $t,
            "
                        WHERE status = 'pending' AND locked_at IS NULL AND scheduled_at <= ?1
                        ORDER BY scheduled_at, seq LIMIT ?3)
                    UNION ALL
                    SELECT seq, scheduled_at FROM (
                        SELECT seq, scheduled_at FROM ",
            $t,
            "
                        WHERE locked_at < ?2 AND status = 'pending' AND scheduled_at <= ?1
                        ORDER BY locked_at LIMIT ?3)
                )
                ORDER BY scheduled_at, seq LIMIT ?3)
            RETURNING *"
        )
    };
}

macro_rules! table_sql {
    ($t:literal, $claim:expr, $insert:expr) => {
        TableSql {
            get: concat!("SELECT * FROM ", $t, " WHERE id = ?1"),
            claim: $claim,
            complete: concat!(
                "UPDATE ", $t, "
                SET status = 'completed', completed_at = ?2, locked_at = NULL, locked_by = NULL, updated_at = ?2
                WHERE id IN (SELECT value FROM json_each(?1)) AND locked_by = ?3 AND locked_at = ?4
                RETURNING id"
            ),
            fail: concat!(
                "UPDATE ", $t, "
                SET attempts_made = attempts_made + u.counted,
                    status = CASE WHEN u.counted = 1 AND attempts_made + 1 >= max_attempts
                                  THEN 'failed' ELSE 'pending' END,
                    scheduled_at = CASE WHEN u.counted = 1 AND attempts_made + 1 >= max_attempts
                                        THEN scheduled_at ELSE u.retry_at END,
                    last_error = u.error,
                    locked_at = NULL, locked_by = NULL, updated_at = ?2
                FROM (SELECT json_extract(value, '$.id') AS id,
                             json_extract(value, '$.error') AS error,
                             json_extract(value, '$.counted') AS counted,
                             json_extract(value, '$.retry_at') AS retry_at
                      FROM json_each(?1)) AS u
                WHERE ", $t, ".id = u.id AND ", $t, ".locked_by = ?3 AND ", $t, ".locked_at = ?4
                RETURNING ", $t, ".id, ", $t, ".status"
            ),
            release: concat!(
                "UPDATE ", $t, "
                SET locked_at = NULL, locked_by = NULL, updated_at = ?2
                WHERE id IN (SELECT value FROM json_each(?1)) AND locked_by = ?3 AND locked_at = ?4
                RETURNING id"
            ),
            force_unlock: concat!(
                "UPDATE ", $t, "
                SET locked_at = NULL, locked_by = NULL, last_error = ?2, updated_at = ?3
                WHERE id = ?1 AND locked_at IS NOT NULL
                RETURNING *"
            ),
            release_stale: concat!(
                "UPDATE ", $t, " SET locked_at = NULL, locked_by = NULL, updated_at = ?1
                WHERE seq IN (SELECT seq FROM ", $t, " WHERE locked_at < ?2 ORDER BY locked_at LIMIT ?3)"
            ),
            delete_completed: concat!(
                "DELETE FROM ", $t, " WHERE seq IN (
                    SELECT seq FROM ", $t, "
                    WHERE status = 'completed' AND completed_at < ?1
                    ORDER BY completed_at LIMIT ?2)"
            ),
            counts: concat!(
                "SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                        count(*) FILTER (WHERE status = 'completed') AS completed,
                        count(*) FILTER (WHERE status = 'failed') AS failed,
                        count(*) FILTER (WHERE locked_at IS NOT NULL) AS locked,
                        count(*) FILTER (WHERE status = 'pending' AND locked_at IS NULL AND scheduled_at <= ?1) AS due_now,
                        min(created_at) FILTER (WHERE status = 'pending') AS oldest_pending
                FROM ", $t
            ),
            select_all: concat!("SELECT * FROM ", $t, " WHERE 1 = 1"),
            requeue_head: concat!(
                "UPDATE ", $t, " SET status = 'pending', attempts_made = 0, last_error = NULL, scheduled_at = "
            ),
            requeue_where: concat!(
                " WHERE seq IN (SELECT seq FROM ", $t, " WHERE status = 'failed'"
            ),
            failed_head: concat!("SELECT * FROM ", $t, " WHERE status = 'failed'"),
            unlock_worker: concat!(
                "UPDATE ", $t, "
                SET locked_at = NULL, locked_by = NULL, last_error = ?2, updated_at = ?3
                WHERE locked_by = ?1
                RETURNING id"
            ),
            count_stale: concat!("SELECT count(*) FROM ", $t, " WHERE locked_at < ?1"),
            count_completed_older: concat!(
                "SELECT count(*) FROM ", $t, " WHERE status = 'completed' AND completed_at < ?1"
            ),
            count_failed_older: concat!(
                "SELECT count(*) FROM ", $t, " WHERE status = 'failed' AND updated_at < ?1"
            ),
            delete_failed: concat!(
                "DELETE FROM ", $t, " WHERE seq IN (
                    SELECT seq FROM ", $t, "
                    WHERE status = 'failed' AND updated_at < ?1
                    ORDER BY updated_at LIMIT ?2)"
            ),
            failed_by_type: concat!(
                "SELECT event_type, count(*) FROM ", $t,
                " WHERE status = 'failed' GROUP BY event_type ORDER BY count(*) DESC, event_type"
            ),
            insert: $insert,
        }
    };
}

/// See the PostgreSQL claim (`store/postgres/sql.rs`) for the reasoning; the
/// same query without row locks, since SQLite runs one writer at a time and
/// this single UPDATE is its own write transaction.
const OUTBOX_CLAIM: &str = "WITH cand AS MATERIALIZED (
        SELECT seq, topic, partition_key FROM (
            SELECT seq, topic, partition_key, scheduled_at FROM (
                SELECT seq, topic, partition_key, scheduled_at FROM outbox_events r
                WHERE status = 'pending' AND locked_at IS NULL AND scheduled_at <= ?1
                  AND NOT EXISTS (
                      SELECT 1 FROM outbox_events h
                      WHERE h.status = 'pending' AND h.last_error IS NOT NULL
                        AND h.topic = r.topic AND h.partition_key = r.partition_key AND h.seq < r.seq)
                ORDER BY scheduled_at, seq LIMIT ?3)
            UNION ALL
            SELECT seq, topic, partition_key, scheduled_at FROM (
                SELECT seq, topic, partition_key, scheduled_at FROM outbox_events
                WHERE locked_at < ?2 AND status = 'pending' AND scheduled_at <= ?1
                ORDER BY locked_at LIMIT ?3)
        )
        ORDER BY scheduled_at, seq LIMIT ?3
    ),
    keys AS (
        SELECT topic, partition_key, max(seq) AS max_seq FROM cand GROUP BY topic, partition_key
    ),
    barrier AS (
        SELECT k.topic, k.partition_key,
               (SELECT min(e.seq) FROM outbox_events e
                 WHERE e.status = 'pending'
                   AND e.topic = k.topic AND e.partition_key = k.partition_key
                   AND e.seq < k.max_seq
                   AND (e.scheduled_at <= ?1 OR e.last_error IS NOT NULL OR e.locked_at IS NOT NULL)
                   AND e.seq NOT IN (SELECT seq FROM cand)) AS seq
        FROM keys k
    )
    UPDATE outbox_events SET locked_at = ?1, locked_by = ?4, updated_at = ?1
    WHERE seq IN (
        SELECT c.seq FROM cand c
        JOIN barrier b ON b.topic = c.topic AND b.partition_key = c.partition_key
        WHERE b.seq IS NULL OR c.seq < b.seq)
    RETURNING *";

const INSERT_OUTBOX: &str = "INSERT INTO outbox_events (
        id, event_type, payload, headers, trace_id, idempotency_key, correlation_id, causation_id,
        schema_version, status, attempts_made, max_attempts, last_error, scheduled_at, completed_at,
        created_at, updated_at, aggregate_type, aggregate_id, topic, partition_key)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?16, ?17, ?18, ?19, ?20)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id";

const INSERT_INBOX: &str = "INSERT INTO inbox_events (
        id, event_type, payload, headers, trace_id, idempotency_key, correlation_id, causation_id,
        schema_version, status, attempts_made, max_attempts, last_error, scheduled_at, completed_at,
        created_at, updated_at, message_id, consumer_group, source)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?16, ?17, ?18, ?19)
    ON CONFLICT (message_id, consumer_group) DO NOTHING
    RETURNING id";

pub static OUTBOX: TableSql = table_sql!("outbox_events", OUTBOX_CLAIM, INSERT_OUTBOX);
pub static INBOX: TableSql = table_sql!("inbox_events", plain_claim!("inbox_events"), INSERT_INBOX);

pub const OUTBOX_BY_IDEMPOTENCY_KEY: &str =
    "SELECT id FROM outbox_events WHERE idempotency_key = ?1";
pub const INBOX_BY_MESSAGE: &str =
    "SELECT * FROM inbox_events WHERE message_id = ?1 AND consumer_group = ?2";

/// The candidate scan of the claim alone, for EXPLAIN QUERY PLAN in tests.
pub const OUTBOX_CLAIM_SCAN: &str = "SELECT seq FROM outbox_events r
    WHERE status = 'pending' AND locked_at IS NULL AND scheduled_at <= ?1
      AND NOT EXISTS (
          SELECT 1 FROM outbox_events h
          WHERE h.status = 'pending' AND h.last_error IS NOT NULL
            AND h.topic = r.topic AND h.partition_key = r.partition_key AND h.seq < r.seq)
    ORDER BY scheduled_at, seq LIMIT 1000";

pub const BLOCKED_KEYS: &str =
    "SELECT h.topic, h.partition_key, h.id, h.attempts_made, h.last_error, h.scheduled_at,
        (SELECT count(*) FROM outbox_events w
          WHERE w.status = 'pending' AND w.topic = h.topic AND w.partition_key = h.partition_key
            AND w.seq > h.seq) AS waiting
    FROM outbox_events h
    WHERE h.status = 'pending' AND h.last_error IS NOT NULL
      AND h.seq = (SELECT min(x.seq) FROM outbox_events x
                   WHERE x.status = 'pending' AND x.last_error IS NOT NULL
                     AND x.topic = h.topic AND x.partition_key = h.partition_key)
    ORDER BY waiting DESC, h.topic, h.partition_key
    LIMIT ?1";
