//! The SQLite statements, one set per table. Static text only; values are
//! bind parameters. Lists of ids travel as one JSON array bound to
//! `json_each(?)`, so no statement text depends on the number of rows.

pub use crate::store::table::TableSql;

use crate::store::shared::{active, counts, ready, table_sql};

/// ?1 now, ?2 the new locked_until, ?3 limit, ?4 worker, ?5 sources and
/// ?6 event types and ?8 consumer groups (`NULL`: any), ?7 the byte budget: rows in `(scheduled_at,
/// seq)` order up to ?3 rows and, by the running sum of their payload
/// sizes (`octet_length` reads a text's size without its content), ?7
/// bytes, the first row whatever its size. Returns the rows' `seq`; the
/// rows are read by [`INBOX_CLAIMED_BY_SEQ`] (see [`OUTBOX_MARK`] for why).
macro_rules! plain_claim {
    ($t:literal) => {
        concat!(
            "UPDATE ",
            $t,
            " SET locked_at = ?1, locked_by = ?4, locked_until = ?2, updated_at = ?1
            WHERE seq IN (
                SELECT seq FROM (
                SELECT seq, row_number() OVER w AS n, sum(bytes) OVER w AS upto FROM (
                    SELECT seq, scheduled_at, bytes FROM (
                        SELECT seq, scheduled_at, octet_length(payload) AS bytes FROM ",
            $t,
            "
                        WHERE status = 'pending' AND locked_at IS NULL AND scheduled_at <= ?1
                          AND (?5 IS NULL OR source IN (SELECT value FROM json_each(?5)))
                          AND (?6 IS NULL OR event_type IN (SELECT value FROM json_each(?6)))
                          AND (?8 IS NULL OR consumer_group IN (SELECT value FROM json_each(?8)))
                        ORDER BY scheduled_at, seq LIMIT ?3)
                    UNION ALL
                    SELECT seq, scheduled_at, bytes FROM (
                        SELECT seq, scheduled_at, octet_length(payload) AS bytes FROM ",
            $t,
            "
                        WHERE locked_until <= ?1 AND scheduled_at <= ?1
                          AND (?5 IS NULL OR source IN (SELECT value FROM json_each(?5)))
                          AND (?6 IS NULL OR event_type IN (SELECT value FROM json_each(?6)))
                          AND (?8 IS NULL OR consumer_group IN (SELECT value FROM json_each(?8)))
                        ORDER BY locked_until LIMIT ?3)
                )
                WINDOW w AS (ORDER BY scheduled_at, seq ROWS UNBOUNDED PRECEDING)
                ORDER BY scheduled_at, seq LIMIT ?3)
                WHERE n = 1 OR upto <= ?7)
            RETURNING seq"
        )
    };
}

macro_rules! plain_claimable_exists {
    ($t:literal) => {
        concat!(
            "SELECT EXISTS (SELECT 1 FROM ",
            $t,
            " WHERE status = 'pending' AND locked_at IS NULL AND scheduled_at <= ?1
                 AND (?2 IS NULL OR source IN (SELECT value FROM json_each(?2)))
                 AND (?3 IS NULL OR event_type IN (SELECT value FROM json_each(?3)))
                 AND (?4 IS NULL OR consumer_group IN (SELECT value FROM json_each(?4))))
             OR EXISTS (SELECT 1 FROM ",
            $t,
            " WHERE locked_until <= ?1 AND scheduled_at <= ?1
                 AND (?2 IS NULL OR source IN (SELECT value FROM json_each(?2)))
                 AND (?3 IS NULL OR event_type IN (SELECT value FROM json_each(?3)))
                 AND (?4 IS NULL OR consumer_group IN (SELECT value FROM json_each(?4))))"
        )
    };
}

/// The statements of table `$t` on SQLite (see `table_sql!`).
macro_rules! lite_table_sql {
    ($t:literal, $claim:expr, $exists:expr) => {
        table_sql!($t, $claim, $exists, {
            complete: concat!(
                "UPDATE ", $t, "
                SET status = 'completed', completed_at = ?2, locked_at = NULL, locked_by = NULL,
                    locked_until = NULL, updated_at = ?2
                WHERE id IN (SELECT value FROM json_each(?1)) AND locked_by = ?3 AND locked_at = ?4
                RETURNING id"
            ),
            // min(): a counted failure of a row whose attempts were already
            // used up (edited by hand) makes it failed without breaking the
            // attempts_made <= max_attempts check.
            fail: concat!(
                "UPDATE ", $t, "
                SET attempts_made = min(attempts_made + u.counted, max_attempts),
                    status = CASE WHEN u.dead = 1 OR (u.counted = 1 AND attempts_made + 1 >= max_attempts)
                                  THEN 'failed' ELSE 'pending' END,
                    scheduled_at = CASE WHEN u.dead = 1 OR (u.counted = 1 AND attempts_made + 1 >= max_attempts)
                                        THEN scheduled_at ELSE u.retry_at END,
                    last_error = u.error,
                    locked_at = NULL, locked_by = NULL, locked_until = NULL, updated_at = ?2
                FROM (SELECT json_extract(value, '$.id') AS id,
                             json_extract(value, '$.error') AS error,
                             json_extract(value, '$.counted') AS counted,
                             json_extract(value, '$.retry_at') AS retry_at,
                             json_extract(value, '$.dead') AS dead
                      FROM json_each(?1)) AS u
                WHERE ", $t, ".id = u.id
                  AND ((", $t, ".locked_by = ?3 AND ", $t, ".locked_at = ?4)
                       OR (u.dead = 1 AND ", $t, ".status = 'pending' AND ", $t, ".locked_at IS NULL))
                RETURNING ", $t, ".id, ", $t, ".status"
            ),
            release: concat!(
                "UPDATE ", $t, "
                SET locked_at = NULL, locked_by = NULL, locked_until = NULL, updated_at = ?2
                WHERE id IN (SELECT value FROM json_each(?1)) AND locked_by = ?3 AND locked_at = ?4
                RETURNING id"
            ),
            extend_lease: concat!(
                "UPDATE ", $t, "
                SET locked_until = ?5, updated_at = ?2
                WHERE id IN (SELECT value FROM json_each(?1)) AND locked_by = ?3 AND locked_at = ?4
                RETURNING id"
            ),
            force_unlock: concat!(
                "UPDATE ", $t, "
                SET locked_at = NULL, locked_by = NULL, locked_until = NULL, last_error = COALESCE(last_error, ?2),
                    updated_at = ?3
                WHERE id = ?1 AND locked_at IS NOT NULL
                RETURNING *"
            ),
            release_stale: concat!(
                "UPDATE ", $t, " SET locked_at = NULL, locked_by = NULL, locked_until = NULL, updated_at = ?1
                WHERE seq IN (SELECT seq FROM ", $t, "
                              WHERE locked_until <= ?1 AND locked_at < ?2 ORDER BY locked_until LIMIT ?3)"
            ),
            delete_completed: concat!(
                "DELETE FROM ", $t, " WHERE seq IN (
                    SELECT seq FROM ", $t, "
                    WHERE status = 'completed' AND completed_at < ?1
                    ORDER BY completed_at LIMIT ?2)"
            ),
            counts: counts!($t, "?1"),
            select_all: concat!("SELECT * FROM ", $t, " WHERE 1 = 1"),
            requeue_head: concat!(
                "UPDATE ", $t, " SET status = 'pending', attempts_made = 0, last_error = NULL, scheduled_at = "
            ),
            requeue_where: concat!(
                " WHERE seq IN (SELECT seq FROM ", $t, " WHERE status = 'failed'"
            ),
            unlock_worker: concat!(
                "UPDATE ", $t, "
                SET locked_at = NULL, locked_by = NULL, locked_until = NULL, last_error = COALESCE(last_error, ?2),
                    updated_at = ?3
                WHERE locked_by = ?1
                RETURNING id"
            ),
            count_stale: concat!(
                "SELECT count(*) FROM ", $t, " WHERE locked_until <= ?2 AND locked_at < ?1"
            ),
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
        })
    };
}

/// Step 1 of the outbox claim (see `store/claim.rs`), ?1 now: the due,
/// unlocked rows after the cursor `(?2, ?3)` in `(scheduled_at, seq)` order
/// (claim index), skipping ?6 of them (a claimer spreading out), at most ?4
/// of them, and at most ?5 rows whose lease passed (lock index).
pub const OUTBOX_SCAN: &str = "SELECT * FROM (
        SELECT r.topic, r.partition_key, r.scheduled_at, r.seq, 0 AS expired
          FROM outbox_events r
         WHERE r.status = 'pending' AND r.locked_at IS NULL AND r.scheduled_at <= ?1
           AND (r.scheduled_at, r.seq) > (?2, ?3)
           AND (?7 IS NULL OR r.topic IN (SELECT value FROM json_each(?7)))
         ORDER BY r.scheduled_at, r.seq
         LIMIT ?4 OFFSET ?6)
    UNION ALL
    SELECT * FROM (
        SELECT r.topic, r.partition_key, r.scheduled_at, r.seq, 1 AS expired
          FROM outbox_events r
         WHERE r.locked_until <= ?1 AND r.scheduled_at <= ?1
           AND (?7 IS NULL OR r.topic IN (SELECT value FROM json_each(?7)))
         ORDER BY r.locked_until
         LIMIT ?5)";

/// Step 2, ?1 now, ?2 the keys as a JSON array of `[topic, partition_key]`
/// in the claim's order, ?3 the limit, ?4 now plus a second: one result row per key (read lazily:
/// the caller stops reading once it has enough), its active rows from its
/// head as a JSON array of `[id, seq, ready, tried, locked, bytes]` when the head
/// can be handed out (the head and the next row when it was tried), an
/// empty array when the key is held. The keys' optional third and fourth
/// elements, with ?5 the claimer, are the first and last `seq` it holds of
/// the key in batches in flight: when the key's first active row is at or
/// after the first, and every active row up to the last is still locked by
/// the claimer, the head is the first active row after them.
pub const OUTBOX_WALK: &str = concat!(
    "WITH keys AS (
        SELECT k.key AS ord, json_extract(k.value, '$[0]') AS topic, json_extract(k.value, '$[1]') AS partition_key,
               json_extract(k.value, '$[2]') AS own_first, json_extract(k.value, '$[3]') AS own_last
          FROM json_each(?2) k
    ),
    firsts AS (
        SELECT k.*, (SELECT e.seq FROM outbox_events e
                      WHERE e.status = 'pending' AND e.topic = k.topic AND e.partition_key = k.partition_key
                        AND ", active!("e", "?4"), "
                      ORDER BY e.seq LIMIT 1) AS first_seq
          FROM keys k
    ),
    starts AS (
        SELECT f.ord, f.topic, f.partition_key,
               CASE WHEN f.own_first IS NOT NULL AND f.first_seq >= f.own_first AND NOT EXISTS (
                        SELECT 1 FROM outbox_events g
                         WHERE g.status = 'pending' AND g.topic = f.topic AND g.partition_key = f.partition_key
                           AND g.seq >= f.first_seq AND g.seq <= f.own_last AND ", active!("g", "?4"), "
                           AND NOT coalesce(g.locked_by = ?5 AND g.locked_until > ?1, 0))
                    THEN (SELECT e.seq FROM outbox_events e
                           WHERE e.status = 'pending' AND e.topic = f.topic AND e.partition_key = f.partition_key
                             AND e.seq > f.own_last AND ", active!("e", "?4"), "
                           ORDER BY e.seq LIMIT 1)
                    ELSE f.first_seq END AS start_seq
          FROM firsts f
         WHERE f.first_seq IS NOT NULL
    ),
    heads AS (
        SELECT k.ord, k.topic, k.partition_key, h.seq AS head_seq,
               CASE WHEN NOT ", ready!("h", "?1"), " THEN -1
                    WHEN h.last_error IS NULL THEN 9223372036854775807
                    ELSE coalesce((SELECT n.seq FROM outbox_events n
                                    WHERE n.status = 'pending' AND n.topic = k.topic
                                      AND n.partition_key = k.partition_key AND n.seq > h.seq
                                      AND ", active!("n", "?4"), "
                                    ORDER BY n.seq LIMIT 1), h.seq) END AS last_seq
          FROM starts k
          JOIN outbox_events h ON h.seq = k.start_seq
    )
    SELECT k.ord, (SELECT json_group_array(json_array(w.id, w.seq, ", ready!("w", "?1"), ", w.last_error IS NOT NULL,
                                                      w.locked_at IS NOT NULL AND w.locked_until > ?1, w.bytes))
              FROM (SELECT e.id, e.seq, e.locked_at, e.locked_until, e.scheduled_at, e.last_error,
                           octet_length(e.payload) AS bytes
                      FROM outbox_events e
                     WHERE e.status = 'pending' AND e.topic = k.topic AND e.partition_key = k.partition_key
                       AND e.seq >= k.head_seq AND e.seq <= k.last_seq
                       AND ", active!("e", "?4"), "
                     ORDER BY e.seq
                     LIMIT ?3) w) AS walk
      FROM heads k"
);

/// Step 3 (no locks to take: SQLite has one writer, and the claim is one
/// write transaction): ?1 now, ?2 worker, ?3 locked_until, ?4 the ids. The
/// rows are read afterwards by [`OUTBOX_CLAIMED`], one at a time: SQLite
/// computes every row of a `RETURNING` before handing out the first, so a
/// claim of large events would be held twice.
pub const OUTBOX_MARK: &str = "UPDATE outbox_events
    SET locked_at = ?1, locked_by = ?2, locked_until = ?3, updated_at = ?1
    WHERE id IN (SELECT value FROM json_each(?4))";

/// The rows a claim marked (?1 the ids), in `seq` order.
pub const OUTBOX_CLAIMED: &str =
    "SELECT * FROM outbox_events WHERE id IN (SELECT value FROM json_each(?1)) ORDER BY seq";

/// Is anything claimable now (for `publish --once`), ?1 now, ?2 now plus a
/// second.
pub const OUTBOX_CLAIMABLE_EXISTS: &str = concat!(
    "SELECT EXISTS (
        SELECT 1
          FROM (SELECT DISTINCT topic, partition_key FROM outbox_events r
                 WHERE r.status = 'pending' AND r.locked_at IS NULL AND r.scheduled_at <= ?1
                   AND (?3 IS NULL OR r.topic IN (SELECT value FROM json_each(?3)))
                UNION
                SELECT topic, partition_key FROM outbox_events r
                 WHERE r.locked_until <= ?1 AND r.scheduled_at <= ?1
                   AND (?3 IS NULL OR r.topic IN (SELECT value FROM json_each(?3)))) k
         WHERE (SELECT ", ready!("e", "?1"), "
                  FROM outbox_events e
                 WHERE e.status = 'pending' AND e.topic = k.topic AND e.partition_key = k.partition_key
                   AND ", active!("e", "?2"), "
                 ORDER BY e.seq LIMIT 1))"
);

pub(super) const INSERT_OUTBOX: &str = "INSERT INTO outbox_events (
        id, event_type, payload, headers, trace_id, idempotency_key, correlation_id, causation_id,
        schema_version, status, attempts_made, max_attempts, last_error, scheduled_at, completed_at,
        created_at, updated_at, aggregate_type, aggregate_id, topic, partition_key)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?16, ?17, ?18, ?19, ?20)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id";

pub(super) const INSERT_INBOX: &str = "INSERT INTO inbox_events (
        id, event_type, payload, headers, trace_id, idempotency_key, correlation_id, causation_id,
        schema_version, status, attempts_made, max_attempts, last_error, scheduled_at, completed_at,
        created_at, updated_at, message_id, consumer_group, source)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?16, ?17, ?18, ?19)
    ON CONFLICT (message_id, consumer_group) DO NOTHING
    RETURNING id";

pub static OUTBOX: TableSql = lite_table_sql!("outbox_events", "", OUTBOX_CLAIMABLE_EXISTS);
pub static INBOX: TableSql = lite_table_sql!(
    "inbox_events",
    plain_claim!("inbox_events"),
    plain_claimable_exists!("inbox_events")
);

/// The rows a plain claim marked (?1 their `seq`s as a JSON array), in
/// `seq` order.
pub const INBOX_CLAIMED_BY_SEQ: &str =
    "SELECT * FROM inbox_events WHERE seq IN (SELECT value FROM json_each(?1)) ORDER BY seq";

pub const OUTBOX_BY_IDEMPOTENCY_KEY: &str =
    "SELECT id FROM outbox_events WHERE idempotency_key = ?1";
pub const INBOX_BY_MESSAGE: &str =
    "SELECT * FROM inbox_events WHERE message_id = ?1 AND consumer_group = ?2";

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
