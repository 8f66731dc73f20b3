//! The store conformance suite: every case runs against SQLite and PostgreSQL
//! (a fresh database or schema each).

#[path = "conformance/cases.rs"]
mod cases;
mod common;

backend_tests!(
    migrate_is_idempotent,
    create_and_get_round_trip,
    idempotent_create_returns_the_existing_row,
    bulk_create_keeps_order_and_idempotency,
    bulk_create_is_all_or_nothing,
    inbox_insert_reports_duplicates,
    list_filters_and_pages,
    counts_per_status,
    claim_takes_due_rows_in_order,
    claim_keeps_per_key_order_and_takes_runs,
    tried_or_locked_heads_block_their_key,
    claim_skips_held_rows_until_the_lease_expires,
    fencing_rejects_a_stale_claim_of_the_same_worker,
    fail_counts_attempts_then_dead_letters,
    transient_failure_spends_no_attempt,
    release_returns_rows_untried,
    force_unlock_records_the_reason,
    release_stale_locks_in_batches,
    delete_completed_in_batches,
    requeue_failed_by_filter,
    database_enforces_invariants,
    claim_is_served_by_the_index,
    concurrent_claimers_share_the_work_in_key_order,
);
