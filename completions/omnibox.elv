
use builtin;
use str;

set edit:completion:arg-completer[omnibox] = {|@words|
    fn spaces {|n|
        builtin:repeat $n ' ' | str:join ''
    }
    fn cand {|text desc|
        edit:complex-candidate $text &display=$text' '(spaces (- 14 (wcswidth $text)))$desc
    }
    var command = 'omnibox'
    for word $words[1..-1] {
        if (str:has-prefix $word '-') {
            break
        }
        set command = $command';'$word
    }
    var completions = [
        &'omnibox'= {
            cand --database-url 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]'
            cand --schema 'PostgreSQL schema that holds the tables (created by `migrate`)'
            cand --config 'Configuration file [default: ./omnibox.toml when present]'
            cand --format 'Output format: table for people, json for scripts [default: table]'
            cand --color 'When to use colour'
            cand --log-format 'Log format on stderr'
            cand -v 'More logging (-v info, -vv debug, -vvv trace)'
            cand --verbose 'More logging (-v info, -vv debug, -vvv trace)'
            cand -q 'Only errors on stderr'
            cand --quiet 'Only errors on stderr'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
            cand migrate 'Create or upgrade the outbox and inbox tables (idempotent)'
            cand enqueue 'Insert outbox events: one from flags, or many as JSON lines'
            cand publish 'Publish due outbox events to the broker (the relay)'
            cand inbox 'Consume messages into the inbox, and process inbox rows with a handler'
            cand demo 'Run the whole engine once, in seconds, with no servers'
            cand status 'Show counts per table and status, locks, the oldest pending event, what is due, failures by event type, stale locks and keys held up by a failure'
            cand list 'List events with filters, oldest first'
            cand show 'Show one event in full, with its payload as pretty JSON'
            cand replay 'Put failed events back to pending (attempts reset, error cleared, due now)'
            cand failures 'Group failed events by event type and error cause'
            cand unlock 'Force-unlock one event, or every event a dead worker holds'
            cand release-stale-locks 'Unlock rows whose lock is older than a threshold (their worker is gone)'
            cand cleanup 'Delete completed rows past their retention, in bounded batches'
            cand audit 'Show recorded replays, unlocks, stale-lock releases and cleanups'
            cand completions 'Print shell completions'
            cand generate 'Writes completions/ and man/ under a directory'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'omnibox;migrate'= {
            cand --database-url 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]'
            cand --schema 'PostgreSQL schema that holds the tables (created by `migrate`)'
            cand --config 'Configuration file [default: ./omnibox.toml when present]'
            cand --format 'Output format: table for people, json for scripts [default: table]'
            cand --color 'When to use colour'
            cand --log-format 'Log format on stderr'
            cand --print-sql 'Print the DDL for the database URL''s backend instead of applying it (no connection is made)'
            cand -v 'More logging (-v info, -vv debug, -vvv trace)'
            cand --verbose 'More logging (-v info, -vv debug, -vvv trace)'
            cand -q 'Only errors on stderr'
            cand --quiet 'Only errors on stderr'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'omnibox;enqueue'= {
            cand --jsonl 'Read events as JSON lines from PATH, or from stdin when PATH is - or omitted'
            cand --aggregate-type 'Kind of aggregate, e.g. order'
            cand --aggregate-id 'The aggregate''s id (UUID)'
            cand --event-type 'Event type, e.g. order.created'
            cand --topic 'Broker topic'
            cand --partition-key 'Broker key; events of one key are published in order'
            cand --payload 'The payload: a JSON object, or @PATH to read it from a file'
            cand --header 'A header KEY=VALUE (repeatable)'
            cand --id 'Event id [default: a new UUIDv7]'
            cand --idempotency-key 'Idempotency key: an event with an existing key is not inserted again'
            cand --trace-id 'Trace id'
            cand --correlation-id 'Correlation id'
            cand --causation-id 'Causation id'
            cand --schema-version 'Payload schema version, e.g. 1.0.0'
            cand --max-attempts 'Counted failures before the event is failed [default: 6]'
            cand --scheduled-at 'Publish no earlier than this time (RFC 3339 with an offset)'
            cand --database-url 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]'
            cand --schema 'PostgreSQL schema that holds the tables (created by `migrate`)'
            cand --config 'Configuration file [default: ./omnibox.toml when present]'
            cand --format 'Output format: table for people, json for scripts [default: table]'
            cand --color 'When to use colour'
            cand --log-format 'Log format on stderr'
            cand -v 'More logging (-v info, -vv debug, -vvv trace)'
            cand --verbose 'More logging (-v info, -vv debug, -vvv trace)'
            cand -q 'Only errors on stderr'
            cand --quiet 'Only errors on stderr'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'omnibox;publish'= {
            cand --broker 'Where to publish: kafka://HOST:PORT[,HOST:PORT], file:PATH, stdout or null [default: file:omnibox-events.jsonl]'
            cand -X 'A librdkafka property for the producer (repeatable), e.g. -X linger.ms=20'
            cand --batch 'Events per claim'
            cand --worker-id 'This relay''s id in locked_by [default: HOST:PID]'
            cand --lease 'Lease of a claim: a relay that dies leaves its rows to others after this long'
            cand --publish-timeout 'Longest wait for one message''s acknowledgement'
            cand --dlq-topic 'Also write events that end up failed to this topic (best effort)'
            cand --poll-interval 'Longest idle wait between polls when nothing is due'
            cand --metrics-addr 'Serve Prometheus metrics on this address, e.g. 127.0.0.1:9898'
            cand --database-url 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]'
            cand --schema 'PostgreSQL schema that holds the tables (created by `migrate`)'
            cand --config 'Configuration file [default: ./omnibox.toml when present]'
            cand --format 'Output format: table for people, json for scripts [default: table]'
            cand --color 'When to use colour'
            cand --log-format 'Log format on stderr'
            cand --once 'Publish what is due, then exit (for jobs and cron)'
            cand -v 'More logging (-v info, -vv debug, -vvv trace)'
            cand --verbose 'More logging (-v info, -vv debug, -vvv trace)'
            cand -q 'Only errors on stderr'
            cand --quiet 'Only errors on stderr'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'omnibox;inbox'= {
            cand --database-url 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]'
            cand --schema 'PostgreSQL schema that holds the tables (created by `migrate`)'
            cand --config 'Configuration file [default: ./omnibox.toml when present]'
            cand --format 'Output format: table for people, json for scripts [default: table]'
            cand --color 'When to use colour'
            cand --log-format 'Log format on stderr'
            cand -v 'More logging (-v info, -vv debug, -vvv trace)'
            cand --verbose 'More logging (-v info, -vv debug, -vvv trace)'
            cand -q 'Only errors on stderr'
            cand --quiet 'Only errors on stderr'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
            cand consume 'Consume broker messages into the inbox, once per message id and group'
            cand process 'Run a handler on pending inbox rows (the batch pipeline, like publish)'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'omnibox;inbox;consume'= {
            cand --from 'kafka://HOST:PORT[,HOST:PORT], file:PATH, or - for stdin [default: the broker''s file, file:omnibox-events.jsonl]'
            cand --topic 'Kafka topic to consume (repeatable)'
            cand --group 'Consumer group: the inbox deduplicates per group'
            cand -X 'A librdkafka property for the consumer (repeatable)'
            cand --ack 'When offsets are committed'
            cand --commit-on 'at-least-once: commit once stored, or once handled'
            cand --exec 'Run this command per event (via sh -c): the event as JSON on stdin, OMNIBOX_* variables; exit 0 completed, 3 skipped, 75 retry later, other failed'
            cand --webhook 'POST each event as JSON to this URL: 2xx completed, 409 skipped, 429/502/503/504 retry later (Retry-After honoured), other failed'
            cand --timeout 'Longest run of one handler call (a timeout is a failed attempt)'
            cand --batch 'Messages per database transaction'
            cand --dlq-topic 'Also write poison messages and rows that end up failed to this topic'
            cand --dlq-broker 'Where the DLQ topic lives [default: the Kafka source''s brokers, else file:omnibox-dlq.jsonl]'
            cand --worker-id 'This consumer''s id [default: HOST:PID]'
            cand --metrics-addr 'Serve Prometheus metrics on this address'
            cand --database-url 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]'
            cand --schema 'PostgreSQL schema that holds the tables (created by `migrate`)'
            cand --config 'Configuration file [default: ./omnibox.toml when present]'
            cand --format 'Output format: table for people, json for scripts [default: table]'
            cand --color 'When to use colour'
            cand --log-format 'Log format on stderr'
            cand --once 'Stop at the end of the input (file) or once caught up with the end of every partition (Kafka)'
            cand --follow 'File source: keep reading as the file grows'
            cand -v 'More logging (-v info, -vv debug, -vvv trace)'
            cand --verbose 'More logging (-v info, -vv debug, -vvv trace)'
            cand -q 'Only errors on stderr'
            cand --quiet 'Only errors on stderr'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'omnibox;inbox;process'= {
            cand --exec 'Run this command per event (via sh -c): the event as JSON on stdin, OMNIBOX_* variables; exit 0 completed, 3 skipped, 75 retry later, other failed'
            cand --webhook 'POST each event as JSON to this URL: 2xx completed, 409 skipped, 429/502/503/504 retry later (Retry-After honoured), other failed'
            cand --timeout 'Longest run of one handler call (a timeout is a failed attempt)'
            cand --batch 'Rows per claim'
            cand --concurrency 'Handler calls running at once'
            cand --worker-id 'This worker''s id [default: HOST:PID]'
            cand --lease 'Lease of a claim'
            cand --dlq-topic 'Also write rows that end up failed to this topic'
            cand --dlq-broker 'Where the DLQ topic lives [default: file:omnibox-dlq.jsonl]'
            cand --poll-interval 'Longest idle wait between polls when nothing is due'
            cand --metrics-addr 'Serve Prometheus metrics on this address'
            cand --database-url 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]'
            cand --schema 'PostgreSQL schema that holds the tables (created by `migrate`)'
            cand --config 'Configuration file [default: ./omnibox.toml when present]'
            cand --format 'Output format: table for people, json for scripts [default: table]'
            cand --color 'When to use colour'
            cand --log-format 'Log format on stderr'
            cand --once 'Process what is due, then exit'
            cand -v 'More logging (-v info, -vv debug, -vvv trace)'
            cand --verbose 'More logging (-v info, -vv debug, -vvv trace)'
            cand -q 'Only errors on stderr'
            cand --quiet 'Only errors on stderr'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'omnibox;inbox;help'= {
            cand consume 'Consume broker messages into the inbox, once per message id and group'
            cand process 'Run a handler on pending inbox rows (the batch pipeline, like publish)'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'omnibox;inbox;help;consume'= {
        }
        &'omnibox;inbox;help;process'= {
        }
        &'omnibox;inbox;help;help'= {
        }
        &'omnibox;demo'= {
            cand --dir 'Directory to work in (must not exist yet) [default: a new directory under the system''s temp dir]'
            cand --events 'Outbox events to create'
            cand --database-url 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]'
            cand --schema 'PostgreSQL schema that holds the tables (created by `migrate`)'
            cand --config 'Configuration file [default: ./omnibox.toml when present]'
            cand --format 'Output format: table for people, json for scripts [default: table]'
            cand --color 'When to use colour'
            cand --log-format 'Log format on stderr'
            cand -v 'More logging (-v info, -vv debug, -vvv trace)'
            cand --verbose 'More logging (-v info, -vv debug, -vvv trace)'
            cand -q 'Only errors on stderr'
            cand --quiet 'Only errors on stderr'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'omnibox;status'= {
            cand --max-pending-age 'Threshold: age of the oldest pending event'
            cand --max-failed 'Threshold: failed events (per table)'
            cand --max-stale-locks 'Threshold: stale locks (per table)'
            cand --stale-after 'A lock older than this counts as stale'
            cand --database-url 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]'
            cand --schema 'PostgreSQL schema that holds the tables (created by `migrate`)'
            cand --config 'Configuration file [default: ./omnibox.toml when present]'
            cand --format 'Output format: table for people, json for scripts [default: table]'
            cand --color 'When to use colour'
            cand --log-format 'Log format on stderr'
            cand --check 'Exit 1 when a threshold below is crossed'
            cand -v 'More logging (-v info, -vv debug, -vvv trace)'
            cand --verbose 'More logging (-v info, -vv debug, -vvv trace)'
            cand -q 'Only errors on stderr'
            cand --quiet 'Only errors on stderr'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'omnibox;list'= {
            cand --table 'Which table'
            cand --status 'Only this status: pending, completed or failed'
            cand --event-type 'Only this event type'
            cand --topic 'Only this topic (outbox) or source (inbox)'
            cand --since 'Only rows created since: RFC 3339 (2026-01-31T12:00:00Z) or a duration ago (2h)'
            cand --limit 'Most rows to show'
            cand --after 'Start after this sequence number (paging: pass the last seq shown)'
            cand --locked-by 'Only rows locked by this worker (see `omnibox unlock --worker`)'
            cand --database-url 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]'
            cand --schema 'PostgreSQL schema that holds the tables (created by `migrate`)'
            cand --config 'Configuration file [default: ./omnibox.toml when present]'
            cand --format 'Output format: table for people, json for scripts [default: table]'
            cand --color 'When to use colour'
            cand --log-format 'Log format on stderr'
            cand -v 'More logging (-v info, -vv debug, -vvv trace)'
            cand --verbose 'More logging (-v info, -vv debug, -vvv trace)'
            cand -q 'Only errors on stderr'
            cand --quiet 'Only errors on stderr'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'omnibox;show'= {
            cand --table 'Look only in this table'
            cand --database-url 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]'
            cand --schema 'PostgreSQL schema that holds the tables (created by `migrate`)'
            cand --config 'Configuration file [default: ./omnibox.toml when present]'
            cand --format 'Output format: table for people, json for scripts [default: table]'
            cand --color 'When to use colour'
            cand --log-format 'Log format on stderr'
            cand -v 'More logging (-v info, -vv debug, -vvv trace)'
            cand --verbose 'More logging (-v info, -vv debug, -vvv trace)'
            cand -q 'Only errors on stderr'
            cand --quiet 'Only errors on stderr'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'omnibox;replay'= {
            cand --table 'Which table'
            cand --id 'This row (repeatable)'
            cand --event-type 'Rows of this event type'
            cand --topic 'Rows of this topic (outbox) or source (inbox)'
            cand --error-contains 'Rows whose last error contains this text'
            cand --group 'Rows of this failure group (see omnibox failures)'
            cand --since 'Rows that failed at or after this time (RFC 3339, or a duration ago such as 2h)'
            cand --until 'Rows that failed before this time'
            cand --limit 'At most this many rows'
            cand --rate 'At most this many rows per second'
            cand --reason 'Why (recorded in the audit trail)'
            cand --actor 'Who is acting, for the audit trail [default: the OS user]'
            cand --database-url 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]'
            cand --schema 'PostgreSQL schema that holds the tables (created by `migrate`)'
            cand --config 'Configuration file [default: ./omnibox.toml when present]'
            cand --format 'Output format: table for people, json for scripts [default: table]'
            cand --color 'When to use colour'
            cand --log-format 'Log format on stderr'
            cand --all 'Every failed row (explicitly)'
            cand --dry-run 'Show what would change, change nothing'
            cand -y 'Do not ask for confirmation (needed without a terminal, e.g. in cron)'
            cand --yes 'Do not ask for confirmation (needed without a terminal, e.g. in cron)'
            cand -v 'More logging (-v info, -vv debug, -vvv trace)'
            cand --verbose 'More logging (-v info, -vv debug, -vvv trace)'
            cand -q 'Only errors on stderr'
            cand --quiet 'Only errors on stderr'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'omnibox;failures'= {
            cand --table 'Which table'
            cand --database-url 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]'
            cand --schema 'PostgreSQL schema that holds the tables (created by `migrate`)'
            cand --config 'Configuration file [default: ./omnibox.toml when present]'
            cand --format 'Output format: table for people, json for scripts [default: table]'
            cand --color 'When to use colour'
            cand --log-format 'Log format on stderr'
            cand -v 'More logging (-v info, -vv debug, -vvv trace)'
            cand --verbose 'More logging (-v info, -vv debug, -vvv trace)'
            cand -q 'Only errors on stderr'
            cand --quiet 'Only errors on stderr'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'omnibox;unlock'= {
            cand --worker 'Unlock every event locked by this worker instead'
            cand --reason 'Why (1..255 characters; recorded in last_error and the audit trail)'
            cand --table 'Which table [default: the one holding the id; both for --worker]'
            cand --actor 'Who is acting, for the audit trail [default: the OS user]'
            cand --database-url 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]'
            cand --schema 'PostgreSQL schema that holds the tables (created by `migrate`)'
            cand --config 'Configuration file [default: ./omnibox.toml when present]'
            cand --format 'Output format: table for people, json for scripts [default: table]'
            cand --color 'When to use colour'
            cand --log-format 'Log format on stderr'
            cand --dry-run 'Show what would change, change nothing'
            cand -y 'Do not ask for confirmation (needed without a terminal, e.g. in cron)'
            cand --yes 'Do not ask for confirmation (needed without a terminal, e.g. in cron)'
            cand -v 'More logging (-v info, -vv debug, -vvv trace)'
            cand --verbose 'More logging (-v info, -vv debug, -vvv trace)'
            cand -q 'Only errors on stderr'
            cand --quiet 'Only errors on stderr'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'omnibox;release-stale-locks'= {
            cand --older-than 'Locks older than this are stale'
            cand --table 'Only this table [default: both]'
            cand --batch-size 'Rows per statement'
            cand --actor 'Who is acting, for the audit trail [default: the OS user]'
            cand --database-url 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]'
            cand --schema 'PostgreSQL schema that holds the tables (created by `migrate`)'
            cand --config 'Configuration file [default: ./omnibox.toml when present]'
            cand --format 'Output format: table for people, json for scripts [default: table]'
            cand --color 'When to use colour'
            cand --log-format 'Log format on stderr'
            cand --dry-run 'Show what would change, change nothing'
            cand -y 'Do not ask for confirmation (needed without a terminal, e.g. in cron)'
            cand --yes 'Do not ask for confirmation (needed without a terminal, e.g. in cron)'
            cand -v 'More logging (-v info, -vv debug, -vvv trace)'
            cand --verbose 'More logging (-v info, -vv debug, -vvv trace)'
            cand -q 'Only errors on stderr'
            cand --quiet 'Only errors on stderr'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'omnibox;cleanup'= {
            cand --older-than 'Keep completed rows for this long'
            cand --failed-older-than 'With --include-failed: keep failed rows for this long'
            cand --table 'Only this table [default: both]'
            cand --batch-size 'Rows per DELETE statement'
            cand --max-iterations 'Statements per table and kind, at most'
            cand --dedup-window 'The inbox''s deduplication window: its rows are kept at least this long'
            cand --actor 'Who is acting, for the audit trail [default: the OS user]'
            cand --database-url 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]'
            cand --schema 'PostgreSQL schema that holds the tables (created by `migrate`)'
            cand --config 'Configuration file [default: ./omnibox.toml when present]'
            cand --format 'Output format: table for people, json for scripts [default: table]'
            cand --color 'When to use colour'
            cand --log-format 'Log format on stderr'
            cand --include-failed 'Also delete failed rows'
            cand --dry-run 'Show what would change, change nothing'
            cand -y 'Do not ask for confirmation (needed without a terminal, e.g. in cron)'
            cand --yes 'Do not ask for confirmation (needed without a terminal, e.g. in cron)'
            cand -v 'More logging (-v info, -vv debug, -vvv trace)'
            cand --verbose 'More logging (-v info, -vv debug, -vvv trace)'
            cand -q 'Only errors on stderr'
            cand --quiet 'Only errors on stderr'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'omnibox;audit'= {
            cand --action 'Only this action: replay, unlock, unlock-worker, release-stale-locks, cleanup'
            cand --since 'Only entries since: RFC 3339 or a duration ago (24h)'
            cand --id 'Only entries that touched this event'
            cand --limit 'Most entries, newest first'
            cand --database-url 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]'
            cand --schema 'PostgreSQL schema that holds the tables (created by `migrate`)'
            cand --config 'Configuration file [default: ./omnibox.toml when present]'
            cand --format 'Output format: table for people, json for scripts [default: table]'
            cand --color 'When to use colour'
            cand --log-format 'Log format on stderr'
            cand -v 'More logging (-v info, -vv debug, -vvv trace)'
            cand --verbose 'More logging (-v info, -vv debug, -vvv trace)'
            cand -q 'Only errors on stderr'
            cand --quiet 'Only errors on stderr'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'omnibox;completions'= {
            cand --database-url 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]'
            cand --schema 'PostgreSQL schema that holds the tables (created by `migrate`)'
            cand --config 'Configuration file [default: ./omnibox.toml when present]'
            cand --format 'Output format: table for people, json for scripts [default: table]'
            cand --color 'When to use colour'
            cand --log-format 'Log format on stderr'
            cand -v 'More logging (-v info, -vv debug, -vvv trace)'
            cand --verbose 'More logging (-v info, -vv debug, -vvv trace)'
            cand -q 'Only errors on stderr'
            cand --quiet 'Only errors on stderr'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'omnibox;generate'= {
            cand --out 'Where to write completions/ and man/'
            cand --database-url 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]'
            cand --schema 'PostgreSQL schema that holds the tables (created by `migrate`)'
            cand --config 'Configuration file [default: ./omnibox.toml when present]'
            cand --format 'Output format: table for people, json for scripts [default: table]'
            cand --color 'When to use colour'
            cand --log-format 'Log format on stderr'
            cand -v 'More logging (-v info, -vv debug, -vvv trace)'
            cand --verbose 'More logging (-v info, -vv debug, -vvv trace)'
            cand -q 'Only errors on stderr'
            cand --quiet 'Only errors on stderr'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'omnibox;help'= {
            cand migrate 'Create or upgrade the outbox and inbox tables (idempotent)'
            cand enqueue 'Insert outbox events: one from flags, or many as JSON lines'
            cand publish 'Publish due outbox events to the broker (the relay)'
            cand inbox 'Consume messages into the inbox, and process inbox rows with a handler'
            cand demo 'Run the whole engine once, in seconds, with no servers'
            cand status 'Show counts per table and status, locks, the oldest pending event, what is due, failures by event type, stale locks and keys held up by a failure'
            cand list 'List events with filters, oldest first'
            cand show 'Show one event in full, with its payload as pretty JSON'
            cand replay 'Put failed events back to pending (attempts reset, error cleared, due now)'
            cand failures 'Group failed events by event type and error cause'
            cand unlock 'Force-unlock one event, or every event a dead worker holds'
            cand release-stale-locks 'Unlock rows whose lock is older than a threshold (their worker is gone)'
            cand cleanup 'Delete completed rows past their retention, in bounded batches'
            cand audit 'Show recorded replays, unlocks, stale-lock releases and cleanups'
            cand completions 'Print shell completions'
            cand generate 'Writes completions/ and man/ under a directory'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'omnibox;help;migrate'= {
        }
        &'omnibox;help;enqueue'= {
        }
        &'omnibox;help;publish'= {
        }
        &'omnibox;help;inbox'= {
            cand consume 'Consume broker messages into the inbox, once per message id and group'
            cand process 'Run a handler on pending inbox rows (the batch pipeline, like publish)'
        }
        &'omnibox;help;inbox;consume'= {
        }
        &'omnibox;help;inbox;process'= {
        }
        &'omnibox;help;demo'= {
        }
        &'omnibox;help;status'= {
        }
        &'omnibox;help;list'= {
        }
        &'omnibox;help;show'= {
        }
        &'omnibox;help;replay'= {
        }
        &'omnibox;help;failures'= {
        }
        &'omnibox;help;unlock'= {
        }
        &'omnibox;help;release-stale-locks'= {
        }
        &'omnibox;help;cleanup'= {
        }
        &'omnibox;help;audit'= {
        }
        &'omnibox;help;completions'= {
        }
        &'omnibox;help;generate'= {
        }
        &'omnibox;help;help'= {
        }
    ]
    $completions[$command]
}
