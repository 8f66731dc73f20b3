//! The PostgreSQL statements, one set per table. Every statement is a
//! `&'static str` built at compile time; values are always bind parameters.

pub use crate::store::table::TableSql;

use crate::store::shared::{active, counts, ready, table_sql};

/// The server's time a second from now: a row due by then takes part in
/// its key's order (see `active!`).
macro_rules! soon {
    () => {
        "now() + interval '1 second'"
    };
}

/// A row's payload size for a byte budget: the size omnibox wrote with it,
/// or (a row written by other means) the payload's JSON text measured now.
macro_rules! payload_bytes {
    ($a:literal) => {
        concat!(
            "coalesce(",
            $a,
            ".payload_bytes, octet_length(",
            $a,
            ".payload::text))::int8"
        )
    };
}

/// The claim of a table without per-key order (the inbox): unlocked due rows
/// from the claim index, plus rows whose lease expired from the lock index,
/// in `(scheduled_at, seq)` order up to $2 rows and, by the running sum of
/// their payload sizes, $6 bytes (the first row whatever its size); $4
/// sources, $5 event types and $7 consumer groups filter (`NULL`: any).
macro_rules! plain_claim {
    ($t:literal) => {
        concat!(
            "WITH free AS (
                SELECT id, seq, scheduled_at, ", payload_bytes!("f"), " AS bytes FROM ",
            $t,
            " f
                WHERE status = 'pending' AND locked_at IS NULL AND scheduled_at <= now()
                  AND ($4::text[] IS NULL OR source = ANY($4))
                  AND ($5::text[] IS NULL OR event_type = ANY($5))
                  AND ($7::text[] IS NULL OR consumer_group = ANY($7))
                ORDER BY scheduled_at, seq
                LIMIT $2
                FOR UPDATE SKIP LOCKED
            ),
            expired AS (
                SELECT id, seq, scheduled_at, ", payload_bytes!("x"), " AS bytes FROM ",
            $t,
            " x
                WHERE locked_until <= now() AND scheduled_at <= now()
                  AND ($4::text[] IS NULL OR source = ANY($4))
                  AND ($5::text[] IS NULL OR event_type = ANY($5))
                  AND ($7::text[] IS NULL OR consumer_group = ANY($7))
                ORDER BY locked_until
                LIMIT $2
                FOR UPDATE SKIP LOCKED
            ),
            picked AS (
                SELECT id FROM (
                    SELECT id, bytes, sum(bytes) OVER (ORDER BY scheduled_at, seq
                                                       ROWS UNBOUNDED PRECEDING) AS upto,
                           row_number() OVER (ORDER BY scheduled_at, seq) AS n
                    FROM (SELECT * FROM free UNION ALL SELECT * FROM expired) c
                    ORDER BY scheduled_at, seq
                    LIMIT $2) r
                WHERE r.n = 1 OR r.upto <= $6
            )
            UPDATE ",
            $t,
            " t
            SET locked_at = now(), locked_by = $3, locked_until = now() + make_interval(secs => $1),
                updated_at = now()
            FROM picked
            WHERE t.id = picked.id
            RETURNING t.*"
        )
    };
}

macro_rules! plain_claimable_exists {
    ($t:literal) => {
        concat!(
            "SELECT EXISTS (SELECT 1 FROM ",
            $t,
            " WHERE status = 'pending' AND locked_at IS NULL AND scheduled_at <= now()
                 AND ($1::text[] IS NULL OR source = ANY($1)) AND ($2::text[] IS NULL OR event_type = ANY($2))
                 AND ($3::text[] IS NULL OR consumer_group = ANY($3)))
             OR EXISTS (SELECT 1 FROM ",
            $t,
            " WHERE locked_until <= now() AND scheduled_at <= now()
                 AND ($1::text[] IS NULL OR source = ANY($1)) AND ($2::text[] IS NULL OR event_type = ANY($2))
                 AND ($3::text[] IS NULL OR consumer_group = ANY($3)))"
        )
    };
}

/// Deletes a batch of table `$t`'s rows of `$status` whose time `$at` is
/// older than $1 seconds, at most $2 of them, oldest first. The batch is
/// picked once (a materialized CTE: a subquery with LIMIT and SKIP LOCKED
/// under `IN` may be run again by the plan, and each run picks other rows),
/// and the delete tests the status again: on a partitioned table an id is
/// unique within its partition only, and a row of another partition with
/// the same id must not go with it.
macro_rules! delete_aged {
    ($t:literal, $status:literal, $at:literal) => {
        concat!(
            "WITH batch AS MATERIALIZED (
                    SELECT id FROM ",
            $t,
            "
                    WHERE status = '",
            $status,
            "' AND ",
            $at,
            " < now() - make_interval(secs => $1)
                    ORDER BY ",
            $at,
            "
                    LIMIT $2
                    FOR UPDATE SKIP LOCKED
                )
                DELETE FROM ",
            $t,
            " t USING batch WHERE t.id = batch.id AND t.status = '",
            $status,
            "'"
        )
    };
}

/// The statements of table `$t` on PostgreSQL (see `table_sql!`).
macro_rules! pg_table_sql {
    ($t:literal, $claim:expr, $exists:expr) => {
        table_sql!($t, $claim, $exists, {
            complete: concat!(
                "UPDATE ", $t, "
                SET status = 'completed', completed_at = now(), locked_at = NULL, locked_by = NULL,
                    locked_until = NULL, updated_at = now()
                WHERE id = ANY($1) AND locked_by = $2 AND locked_at = $3
                  AND created_at >= $4 AND created_at <= $5
                RETURNING id"
            ),
            // A counted failure of a row whose attempts were already used up
            // (edited by hand) makes it failed without breaking the
            // attempts_made <= max_attempts check.
            fail: concat!(
                "UPDATE ", $t, " t
                SET attempts_made = LEAST(t.attempts_made + CASE WHEN u.counted THEN 1 ELSE 0 END, t.max_attempts),
                    status = CASE WHEN u.dead OR (u.counted AND t.attempts_made + 1 >= t.max_attempts)
                                  THEN 'failed' ELSE 'pending' END,
                    scheduled_at = CASE WHEN u.dead OR (u.counted AND t.attempts_made + 1 >= t.max_attempts)
                                        THEN t.scheduled_at
                                        ELSE COALESCE(u.retry_at, now() + make_interval(secs => u.delay)) END,
                    last_error = u.error,
                    locked_at = NULL, locked_by = NULL, locked_until = NULL, updated_at = now()
                FROM UNNEST($1::uuid[], $2::text[], $3::bool[], $4::timestamptz[], $5::float8[], $8::bool[])
                    AS u(id, error, counted, retry_at, delay, dead)
                WHERE t.id = u.id AND t.created_at >= $9 AND t.created_at <= $10
                  AND ((t.locked_by = $6 AND t.locked_at = $7)
                       -- A dead failure (a retry would reorder its key) is
                       -- written even if an operator unlocked the row in
                       -- flight, as long as nobody holds it now: no lease,
                       -- and no row lock (a claim in progress, or a held
                       -- claim, which would otherwise be waited for).
                       OR (u.dead AND t.status = 'pending' AND t.locked_at IS NULL
                           AND t.id IN (SELECT f.id FROM ", $t, " f
                                         WHERE f.id = ANY($1) AND f.locked_at IS NULL
                                           AND f.created_at >= $9 AND f.created_at <= $10
                                         FOR UPDATE SKIP LOCKED)))
                RETURNING t.id, t.status"
            ),
            release: concat!(
                "UPDATE ", $t, "
                SET locked_at = NULL, locked_by = NULL, locked_until = NULL, updated_at = now()
                WHERE id = ANY($1) AND locked_by = $2 AND locked_at = $3
                  AND created_at >= $4 AND created_at <= $5
                RETURNING id"
            ),
            extend_lease: concat!(
                "UPDATE ", $t, "
                SET locked_until = now() + make_interval(secs => $4), updated_at = now()
                WHERE id = ANY($1) AND locked_by = $2 AND locked_at = $3
                  AND created_at >= $5 AND created_at <= $6
                RETURNING id"
            ),
            force_unlock: concat!(
                "UPDATE ", $t, "
                SET locked_at = NULL, locked_by = NULL, locked_until = NULL, last_error = COALESCE(last_error, $2),
                    updated_at = now()
                WHERE id = $1 AND locked_at IS NOT NULL
                RETURNING *"
            ),
            release_stale: concat!(
                "WITH stale AS (
                    SELECT id FROM ", $t, "
                    WHERE locked_until <= now() AND locked_at < now() - make_interval(secs => $1)
                    ORDER BY locked_until
                    LIMIT $2
                    FOR UPDATE SKIP LOCKED
                )
                UPDATE ", $t, " t
                SET locked_at = NULL, locked_by = NULL, locked_until = NULL, updated_at = now()
                FROM stale WHERE t.id = stale.id"
            ),
            delete_completed: delete_aged!($t, "completed", "completed_at"),
            counts: counts!($t, "now()", "now() AS now"),
            select_all: concat!("SELECT * FROM ", $t, " WHERE TRUE"),
            requeue_head: concat!(
                "UPDATE ", $t, "
                SET status = 'pending', attempts_made = 0, last_error = NULL, scheduled_at = "
            ),
            requeue_where: concat!(
                "
                WHERE id IN (SELECT id FROM ", $t, " WHERE status = 'failed'"
            ),
            unlock_worker: concat!(
                "UPDATE ", $t, "
                SET locked_at = NULL, locked_by = NULL, locked_until = NULL, last_error = COALESCE(last_error, $2),
                    updated_at = now()
                WHERE locked_by = $1
                RETURNING id"
            ),
            count_stale: concat!(
                "SELECT count(*) FROM ", $t,
                " WHERE locked_until <= now() AND locked_at < now() - make_interval(secs => $1)"
            ),
            count_completed_older: concat!(
                "SELECT count(*) FROM ", $t,
                " WHERE status = 'completed' AND completed_at < now() - make_interval(secs => $1)"
            ),
            count_failed_older: concat!(
                "SELECT count(*) FROM ", $t,
                " WHERE status = 'failed' AND updated_at < now() - make_interval(secs => $1)"
            ),
            delete_failed: delete_aged!($t, "failed", "updated_at"),
        })
    };
}

/// The claim's opening (see [`CLAIM_BEGIN`]) with plan cache mode `$mode`.
macro_rules! claim_begin {
    ($mode:literal) => {
        concat!(
            "BEGIN; SET LOCAL synchronous_commit = off; SET LOCAL plan_cache_mode = ",
            $mode,
            "; SET LOCAL enable_seqscan = off; SET LOCAL DateStyle = 'ISO, MDY'"
        )
    };
}

/// Opens the claim's transaction in one round trip (a simple query):
/// - a claim is a lease, not a result: if the database crashes before it
///   is flushed, its rows are simply claimed (and published) again, so its
///   commit need not wait for the disk;
/// - its statements are prepared once per connection, and each execution
///   is still planned for its own parameters (a generic plan cached after
///   five runs must not decide how the scan reads the table; on a plain
///   table the scan then switches the rest of the claim to generic plans,
///   see [`OUTBOX_SCAN`] and [`CLAIM_GENERIC_BEGIN`]);
/// - every read of the claim has an index made for it, and a table the
///   planner knows little about must not be read whole instead
///   (`enable_seqscan = off`): never analyzed, or a partition created
///   today, the planner prices a lookup of 1,000 ids by primary key above
///   a sequential scan of up to a few hundred thousand rows (measured: 13
///   ms against 1 ms for a batch in a partition of 100,000 rows).
///
/// `DateStyle` is ISO for the claim (sqlx asks for it when it connects; a
/// connection string's `options` could ask otherwise): the partition bounds
/// [`OUTBOX_PENDING_RANGE`] prints and reads back then carry numeric UTC
/// offsets, never an ambiguous zone abbreviation.
pub const CLAIM_BEGIN: &str = claim_begin!("force_custom_plan");

/// [`CLAIM_BEGIN`] with generic plans: a claim of given keys (a fed relay:
/// no scan) on a plain table. The claim's statements after the scan (the
/// walk, the lock, the mark, the completion) are driven by their key and
/// id arrays, each through the one index made for it, whatever the
/// table's statistics say (the conformance suite checks their generic
/// plans), so each is planned once per connection instead of at every
/// claim: at a low rate that planning was most of a claim's time (the
/// walk's alone 0.4–1 ms against 0.05 ms of execution). A partitioned
/// table keeps custom plans: they prune its partitions at planning.
pub const CLAIM_GENERIC_BEGIN: &str = claim_begin!("force_generic_plan");

/// Whether the outbox is a partitioned table (`migrate --partitioned`).
pub const OUTBOX_IS_PARTITIONED: &str = "SELECT coalesce((SELECT c.relkind = 'p'
       FROM pg_class c WHERE c.oid = to_regclass('outbox_events')), false)";

/// On a partitioned outbox: the `created_at` range of the partitions that
/// hold pending rows, from the first such partition's lower bound to the
/// last one's upper bound (`lo`, `hi`), or two NULLs (no bound) when no
/// partition holds one or a partition's bound is not a plain range (a
/// default partition, `MINVALUE`). One probe per partition (the key-order
/// index of each, pruned at execution to that partition's range). The
/// bounds are printed by `pg_get_expr` and read back in the same statement
/// (same `TimeZone`; `DateStyle` ISO, see [`CLAIM_BEGIN`]).
///
/// A hint for [`OUTBOX_WALK_PARTITIONED`], which checks it in its own
/// snapshot.
pub const OUTBOX_PENDING_RANGE: &str =
    "SELECT CASE WHEN bool_or(p.lo IS NULL OR p.hi IS NULL) THEN NULL ELSE min(p.lo) END AS lo,
                CASE WHEN bool_or(p.lo IS NULL OR p.hi IS NULL) THEN NULL ELSE max(p.hi) END AS hi
          FROM (SELECT b[1]::timestamptz AS lo, b[2]::timestamptz AS hi
                  FROM pg_inherits i
                  JOIN pg_class c ON c.oid = i.inhrelid
                  LEFT JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid),
                       '^FOR VALUES FROM \\(''([^'']+)''\\) TO \\(''([^'']+)''\\)$') AS b ON true
                 WHERE i.inhparent = to_regclass('outbox_events')) p
         WHERE p.lo IS NULL OR p.hi IS NULL OR EXISTS (
                SELECT 1 FROM outbox_events e
                 WHERE e.status = 'pending' AND e.created_at >= p.lo AND e.created_at < p.hi)";

/// The partitioned walk's condition that row `$t` lies in its hint's
/// range ($7..$8; NULL: no bound). Planned for the values (the claim's
/// custom plans), a bound prunes the partitions outside it.
macro_rules! pending_range {
    ($t:literal) => {
        concat!(
            "($7::timestamptz IS NULL OR ",
            $t,
            ".created_at >= $7) AND ($8::timestamptz IS NULL OR ",
            $t,
            ".created_at < $8)"
        )
    };
}

/// The scan's text: `$cond` narrows both of its reads (see [`OUTBOX_SCAN`],
/// [`OUTBOX_SCAN_PARTITIONED`]).
macro_rules! outbox_scan {
    ($cond:expr) => {
        concat!(
            "SELECT * FROM (
        SELECT r.topic, r.partition_key, r.scheduled_at, r.seq, false AS expired
          FROM outbox_events r
         WHERE r.status = 'pending' AND r.locked_at IS NULL AND r.scheduled_at <= now()
           AND (r.scheduled_at, r.seq) > ($1, $2)
           AND ($6::text IS NULL OR r.topic = $6)
           AND ($7::text[] IS NULL OR r.topic = ANY($7))",
            $cond,
            "
         ORDER BY r.scheduled_at, r.seq
         OFFSET $5
         LIMIT $3) a
    UNION ALL
    SELECT * FROM (
        SELECT r.topic, r.partition_key, r.scheduled_at, r.seq, true AS expired
          FROM outbox_events r
         WHERE r.locked_until <= now() AND r.scheduled_at <= now()
           AND ($6::text IS NULL OR r.topic = $6)
           AND ($7::text[] IS NULL OR r.topic = ANY($7))",
            $cond,
            "
         ORDER BY r.locked_until
         LIMIT $4) b"
        )
    };
}

/// Step 1 of the outbox claim (see `store/claim.rs`): the due, unlocked
/// rows after the cursor `($1, $2)` in `(scheduled_at, seq)` order (claim
/// index), skipping $5 of them (a claimer spreading out), at most $3 of them, and at most $4 rows whose lease passed (lock
/// index). Nothing is probed per row: whether a key can be handed out is
/// found once per key by step 2. (A locked row is always pending, a check
/// says so; leaving `status` out of the second scan keeps the planner from
/// combining it with the key-order index.)
///
/// Planned for its parameters (its limits decide how it reads), it then
/// switches the rest of the claim's transaction to generic plans (a
/// one-time filter: no round trip more), see [`CLAIM_GENERIC_BEGIN`].
pub const OUTBOX_SCAN: &str = concat!(
    "SELECT * FROM (",
    outbox_scan!(""),
    ") s WHERE (SELECT set_config('plan_cache_mode', 'force_generic_plan', true)) IS NOT NULL"
);

/// [`OUTBOX_SCAN`] on a partitioned outbox: only in `created_at` range
/// $8..$9 (NULL: no bound), the hint of where pending rows lie
/// ([`OUTBOX_PENDING_RANGE`]), planned for it (the other partitions are
/// pruned at planning). A hint that went stale costs nothing but a delay:
/// the scan only proposes keys, and the walk decides in its own snapshot
/// ([`OUTBOX_WALK_PARTITIONED`]).
pub const OUTBOX_SCAN_PARTITIONED: &str = outbox_scan!(
    " AND ($8::timestamptz IS NULL OR r.created_at >= $8) AND ($9::timestamptz IS NULL OR r.created_at < $9)"
);

/// The walk's text: `$e`/`$g` the range conditions of its probes, `$stale`
/// its guard column (see [`OUTBOX_WALK`], [`OUTBOX_WALK_PARTITIONED`]).
macro_rules! outbox_walk {
    ($e:expr, $g:expr, $stale:expr) => {
        concat!(
    "SELECT k.ord, w.id, w.seq, w.created_at, ", ready!("w", "now()"), " AS ready, w.last_error IS NOT NULL AS tried,
            (w.locked_at IS NOT NULL AND w.locked_until > now()) AS locked, w.bytes, ", $stale, " AS stale
      FROM unnest($1::text[], $2::text[], $4::int8[], $5::int8[])
           WITH ORDINALITY AS k(topic, partition_key, own_first, own_last, ord)
     CROSS JOIN LATERAL (
        SELECT e.seq, e.last_error IS NOT NULL AS tried, ", ready!("e", "now()"), " AS ready
          FROM outbox_events e
         WHERE e.status = 'pending' AND e.topic = k.topic AND e.partition_key = k.partition_key
           AND ", active!("e", soon!()), " AND ", $e, "
         ORDER BY e.seq LIMIT 1) f
     CROSS JOIN LATERAL (
        SELECT CASE WHEN k.own_first IS NOT NULL AND f.seq >= k.own_first AND NOT EXISTS (
                        SELECT 1 FROM outbox_events g
                         WHERE g.status = 'pending' AND g.topic = k.topic AND g.partition_key = k.partition_key
                           AND g.seq >= f.seq AND g.seq <= k.own_last AND ", active!("g", soon!()), "
                           AND ", $g, "
                           AND NOT coalesce(g.locked_by = $6 AND g.locked_until > now(), false))
                    THEN k.own_last + 1
                    ELSE f.seq END AS seq
        OFFSET 0) s
     CROSS JOIN LATERAL (
        SELECT f.seq, f.tried, f.ready WHERE s.seq = f.seq
        UNION ALL
        (SELECT e.seq, e.last_error IS NOT NULL AS tried, ", ready!("e", "now()"), " AS ready
          FROM outbox_events e
         WHERE s.seq <> f.seq
           AND e.status = 'pending' AND e.topic = k.topic AND e.partition_key = k.partition_key
           AND e.seq >= s.seq AND ", active!("e", soon!()), " AND ", $e, "
         ORDER BY e.seq LIMIT 1)) h
     CROSS JOIN LATERAL (
        SELECT e.id, e.seq, e.locked_at, e.locked_until, e.scheduled_at, e.last_error, e.created_at,
               ", payload_bytes!("e"), " AS bytes
          FROM outbox_events e
         WHERE h.ready AND e.status = 'pending' AND e.topic = k.topic AND e.partition_key = k.partition_key
           AND e.seq >= h.seq
           AND ", active!("e", soon!()), " AND ", $e, "
         ORDER BY e.seq
         LIMIT CASE WHEN h.tried THEN 2 ELSE $3 END) w
     LIMIT $3 + cardinality($1)"
        )
    };
}

/// Step 2: for each key ($1 topics, $2 partition keys, in the claim's
/// order), its head (first active row: one probe of the key-order index,
/// `f`), and, when the head can be handed out, its active rows from the head
/// (the head and the row after it when the head was tried: a tried head
/// goes alone, and the next row shows whether the key is still in flight),
/// at most $3 per key and $3 in all (plus one row a key, for those looks at
/// the row after a head). A held key costs its probe and yields nothing.
/// The nested loop is evaluated lazily: keys after the first $3 rows are
/// never probed.
///
/// $4/$5: for keys this claimer ($6) has batches in flight for, the first
/// and last `seq` it holds (NULL otherwise). When the key's first active
/// row is at or after the first it holds, and every active row from there
/// to the last it holds is still locked by it, the head is the first
/// active row after those: the claimer's own batches do not hold it up.
///
/// Index descents per key: a key this claimer holds nothing of costs two
/// (`f`, whose row is the head, and the run `w`); a key it holds rows of
/// costs up to four (`f`, the check `g` over the rows it holds, the head
/// after them `h`, and `w`). `s` is computed once per key (`OFFSET 0`
/// keeps the planner from copying its check into each place `h` reads
/// it). Measured against a third descent for every key (`h` always):
/// the walk's server time per 1,000 unique keys 5.1–5.5 ms against
/// 6.1 ms. On a plain table it runs a generic plan (no parameter's value
/// changes how it should read; see [`CLAIM_GENERIC_BEGIN`]).
pub const OUTBOX_WALK: &str = outbox_walk!("true", "true", "false");

/// [`OUTBOX_WALK`] on a partitioned outbox: its probes read only the
/// partitions in `created_at` range $7..$8 (NULL: no bound), a hint of
/// where pending rows lie ([`OUTBOX_PENDING_RANGE`], read earlier).
/// Planned for its values, it prunes the other partitions at planning. A
/// key's pending rows may lie in any partition, so unbounded the walk
/// probes every partition's key-order index for every key (a week of daily
/// partitions cost the drain about a quarter of its rate).
///
/// `stale`: whether a pending row lies outside the range, in the walk's
/// own snapshot (one probe of each partition left out, per claim, not per
/// key). When it is false, the partitions left out hold no pending row the
/// walk could see, so the pruned walk reads what the whole walk would. When
/// it is true, the caller drops the result and walks again without a
/// bound. The hint alone is not enough: read by an earlier statement, it
/// broke a transaction's atomicity (rows one transaction inserts into two
/// partitions, an older `created_at` and today's, could show the walk the
/// later row without the earlier one; the randomized model test found
/// this).
pub const OUTBOX_WALK_PARTITIONED: &str = outbox_walk!(
    pending_range!("e"),
    pending_range!("g"),
    "(SELECT EXISTS (SELECT 1 FROM outbox_events x
        WHERE x.status = 'pending' AND (x.created_at < $7 OR x.created_at >= $8)))"
);

/// Step 3a: lock planned rows (first the heads of the runs, then the rest
/// of the runs whose head this claim got, so that two claimers racing for
/// one key do not each take a part of it). A row another claimer holds is
/// skipped (its key's run is cut there). Only the primary key is in the condition
/// (so no statistics can steer the planner to another index); the rows'
/// latest values come back for the caller to check that they are still
/// pending and ready.
pub const OUTBOX_LOCK: &str = concat!(
    "SELECT t.id, t.status = 'pending' AND ",
    ready!("t", "now()"),
    " AS ready
       FROM outbox_events t
      WHERE t.id = ANY($1) AND t.created_at >= $2 AND t.created_at <= $3
        FOR UPDATE SKIP LOCKED"
);

/// Step 3b: mark the rows claimed with the claimer's own lease.
///
/// The rows are the claim's, locked by its transaction since step 3a found
/// them pending, so their status cannot have changed. It is checked anyway,
/// written `NOT IN ('completed', 'failed')` (the check constraint allows
/// three values) rather than `= 'pending'`: the planner would take the
/// latter as a reason to read a partial index on pending rows (the
/// key-order index) and recheck every pending row against the ids, one
/// batch's completion reading the whole backlog (measured: 20 ms of 26 for
/// 1,000 rows over a backlog of 100,000); so the rows are found by primary
/// key.
///
/// Every write by id (3a: $2/$3, 3b: $4/$5, and the writes that present a
/// claim's token: their last two parameters) also bounds `created_at` by
/// the rows' own (`postgres::created_bounds`): on a partitioned
/// table only the partitions that can hold the rows are read. Without it
/// the planner, which cannot tell in which partition an id lies, read
/// every older partition whole to look a batch's ids up.
pub const OUTBOX_MARK: &str = "UPDATE outbox_events
    SET locked_at = now(), locked_by = $2, locked_until = now() + make_interval(secs => $3),
        updated_at = now()
    WHERE id = ANY($1) AND status NOT IN ('completed', 'failed') AND created_at >= $4 AND created_at <= $5
    RETURNING *";

/// Step 3a of a claim that may be held ([`ClaimOptions::hold`](crate::store::ClaimOptions::hold)):
/// [`OUTBOX_LOCK`], returning each row whole, as [`OUTBOX_MARK`] would
/// return it with the lease the claim would write, so that a held claim
/// reads its rows once and writes nothing until they are done ($1 ids,
/// $2..$3 the rows' `created_at` bounds, $4 worker, $5 lease seconds). The
/// claim's transaction may stay open; the server ends it after $6 ms of
/// idleness. `ready` as for `OUTBOX_LOCK`; `leased`: the row still carries
/// a lease that ran out (another worker's, who may yet write it under that
/// lease).
pub const OUTBOX_LOCK_READ: &str = concat!(
    "WITH idle AS (SELECT set_config('idle_in_transaction_session_timeout', $6, true))
    SELECT e.id, e.seq, e.event_type, e.payload, e.headers, e.trace_id, e.idempotency_key,
           e.correlation_id, e.causation_id, e.schema_version, e.status, e.attempts_made,
           e.max_attempts, e.last_error, e.scheduled_at, e.completed_at, now() AS locked_at,
           $4::varchar AS locked_by, now() + make_interval(secs => $5) AS locked_until,
           now() AS updated_at, e.created_at, e.aggregate_type, e.aggregate_id, e.topic,
           e.partition_key, e.payload_bytes, e.locked_at IS NOT NULL AS leased,
           e.status = 'pending' AND ",
    ready!("e", "now()"),
    " AS ready
      FROM outbox_events e, idle
     WHERE e.id = ANY($1) AND e.created_at >= $2 AND e.created_at <= $3
       FOR UPDATE OF e SKIP LOCKED"
);

/// Completes rows of a held claim in its transaction, committed durably
/// ($1 ids, $2..$3 `created_at` bounds): each row is written once. A row
/// claimed after its earlier lease ran out still carries that lease, and
/// loses it here. `completed_at` is the statement's time, not the
/// transaction's: the claim's transaction began before the batch was
/// published (a slow broker's seconds), and `now()` would date the
/// completion before the publish. The status is checked as
/// [`OUTBOX_MARK`] checks it, so that the rows are found by primary key.
pub const OUTBOX_COMPLETE_HELD: &str =
    "WITH durable AS (SELECT set_config('synchronous_commit', 'on', true))
    UPDATE outbox_events SET status = 'completed', completed_at = statement_timestamp(),
           updated_at = statement_timestamp(),
           locked_at = NULL, locked_by = NULL, locked_until = NULL
      FROM durable
     WHERE id = ANY($1) AND status NOT IN ('completed', 'failed') AND created_at >= $2 AND created_at <= $3
    RETURNING id";

/// Is anything claimable now (for `publish --once`): a key with a due,
/// unlocked (or expired) row whose head can be handed out. The keys are
/// gathered first, then each head is probed once (a probe per row would
/// walk a busy key's dead index entries once per row). No row locks are
/// taken.
pub const OUTBOX_CLAIMABLE_EXISTS: &str = concat!(
    "SELECT EXISTS (
        SELECT 1
          FROM (SELECT DISTINCT topic, partition_key FROM outbox_events r
                 WHERE r.status = 'pending' AND r.locked_at IS NULL AND r.scheduled_at <= now()
                   AND ($1::text[] IS NULL OR r.topic = ANY($1))
                UNION
                SELECT topic, partition_key FROM outbox_events r
                 WHERE r.locked_until <= now() AND r.scheduled_at <= now()
                   AND ($1::text[] IS NULL OR r.topic = ANY($1))) k
         WHERE (SELECT ", ready!("e", "now()"), "
                  FROM outbox_events e
                 WHERE e.status = 'pending' AND e.topic = k.topic AND e.partition_key = k.partition_key
                   AND ", active!("e", soon!()), "
                 ORDER BY e.seq LIMIT 1))"
);

pub static OUTBOX: TableSql = pg_table_sql!("outbox_events", "", OUTBOX_CLAIMABLE_EXISTS);
/// The inbox claim: $1 lease seconds, $2 limit, $3 worker, $4 sources and
/// $5 event types (`NULL`: any), $6 the byte budget, $7 consumer groups
/// (`NULL`: any).
pub const INBOX_CLAIM: &str = plain_claim!("inbox_events");

pub static INBOX: TableSql = pg_table_sql!(
    "inbox_events",
    INBOX_CLAIM,
    plain_claimable_exists!("inbox_events")
);

// The inserts' `ON CONFLICT` names no target: on a plain table the unique
// index of the idempotency key (outbox) or of `(message_id,
// consumer_group)` (inbox) skips a duplicate; on a partitioned table, which
// can hold no unique index without `created_at`, a row trigger skips it
// (store/postgres/partition/convert.rs). A row whose id is taken is skipped too,
// and `insert_outbox`/`insert_inbox` report it as not inserted.
pub(super) const INSERT_OUTBOX: &str = "INSERT INTO outbox_events (
        id, event_type, payload, headers, trace_id, idempotency_key, correlation_id, causation_id,
        schema_version, status, attempts_made, max_attempts, last_error, scheduled_at, completed_at,
        created_at, updated_at, aggregate_type, aggregate_id, topic, partition_key, payload_bytes)
    SELECT u.id, u.event_type, u.payload::jsonb, u.headers::jsonb, u.trace_id, u.idempotency_key,
        u.correlation_id, u.causation_id, u.schema_version, u.status, u.attempts_made, u.max_attempts,
        u.last_error, COALESCE(u.scheduled_at, now()), u.completed_at, COALESCE(u.created_at, now()),
        COALESCE(u.created_at, now()), u.aggregate_type, u.aggregate_id, u.topic, u.partition_key,
        u.payload_bytes
    FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
        $8::text[], $9::text[], $10::text[], $11::int4[], $12::int4[], $13::text[], $14::timestamptz[],
        $15::timestamptz[], $16::timestamptz[], $17::text[], $18::uuid[], $19::text[], $20::text[],
        $21::int4[])
        WITH ORDINALITY AS u(id, event_type, payload, headers, trace_id, idempotency_key, correlation_id,
            causation_id, schema_version, status, attempts_made, max_attempts, last_error, scheduled_at,
            completed_at, created_at, aggregate_type, aggregate_id, topic, partition_key, payload_bytes, ord)
    ORDER BY u.ord
    ON CONFLICT DO NOTHING
    RETURNING id";

pub(super) const INSERT_INBOX: &str = "INSERT INTO inbox_events (
        id, event_type, payload, headers, trace_id, idempotency_key, correlation_id, causation_id,
        schema_version, status, attempts_made, max_attempts, last_error, scheduled_at, completed_at,
        created_at, updated_at, message_id, consumer_group, source, payload_bytes)
    SELECT u.id, u.event_type, u.payload::jsonb, u.headers::jsonb, u.trace_id, u.idempotency_key,
        u.correlation_id, u.causation_id, u.schema_version, u.status, u.attempts_made, u.max_attempts,
        u.last_error, COALESCE(u.scheduled_at, now()), u.completed_at, COALESCE(u.created_at, now()),
        COALESCE(u.created_at, now()), u.message_id, u.consumer_group, u.source, u.payload_bytes
    FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
        $8::text[], $9::text[], $10::text[], $11::int4[], $12::int4[], $13::text[], $14::timestamptz[],
        $15::timestamptz[], $16::timestamptz[], $17::text[], $18::text[], $19::text[], $20::int4[])
        WITH ORDINALITY AS u(id, event_type, payload, headers, trace_id, idempotency_key, correlation_id,
            causation_id, schema_version, status, attempts_made, max_attempts, last_error, scheduled_at,
            completed_at, created_at, message_id, consumer_group, source, payload_bytes, ord)
    ORDER BY u.ord
    ON CONFLICT DO NOTHING
    RETURNING id";

pub(super) const EXISTING_BY_IDEMPOTENCY_KEY: &str =
    "SELECT idempotency_key, id FROM outbox_events WHERE idempotency_key = ANY($1)";

pub(super) const EXISTING_BY_MESSAGE: &str = "SELECT i.message_id, i.consumer_group, i.id
    FROM inbox_events i
    JOIN UNNEST($1::text[], $2::text[]) AS k(message_id, consumer_group)
      ON i.message_id = k.message_id AND i.consumer_group = k.consumer_group";

/// COPY of outbox rows without idempotency keys (nothing can conflict, so
/// the plain, faster path applies). Columns in the order of `copy_outbox_row`.
pub(super) const COPY_OUTBOX: &str = "COPY outbox_events (
        id, event_type, payload, headers, trace_id, idempotency_key, correlation_id, causation_id,
        schema_version, status, attempts_made, max_attempts, last_error, scheduled_at, completed_at,
        created_at, updated_at, aggregate_type, aggregate_id, topic, partition_key, payload_bytes)
    FROM STDIN (FORMAT binary)";

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
