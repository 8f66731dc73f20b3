
using namespace System.Management.Automation
using namespace System.Management.Automation.Language

Register-ArgumentCompleter -Native -CommandName 'omnibox' -ScriptBlock {
    param($wordToComplete, $commandAst, $cursorPosition)

    $commandElements = $commandAst.CommandElements
    $command = @(
        'omnibox'
        for ($i = 1; $i -lt $commandElements.Count; $i++) {
            $element = $commandElements[$i]
            if ($element -isnot [StringConstantExpressionAst] -or
                $element.StringConstantType -ne [StringConstantType]::BareWord -or
                $element.Value.StartsWith('-') -or
                $element.Value -eq $wordToComplete) {
                break
        }
        $element.Value
    }) -join ';'

    $completions = @(switch ($command) {
        'omnibox' {
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('migrate', 'migrate', [CompletionResultType]::ParameterValue, 'Create or upgrade the outbox and inbox tables (idempotent)')
            [CompletionResult]::new('enqueue', 'enqueue', [CompletionResultType]::ParameterValue, 'Insert outbox events: one from flags, or many as JSON lines')
            [CompletionResult]::new('publish', 'publish', [CompletionResultType]::ParameterValue, 'Publish due outbox events to the broker (the relay)')
            [CompletionResult]::new('inbox', 'inbox', [CompletionResultType]::ParameterValue, 'Consume messages into the inbox, and process inbox rows with a handler')
            [CompletionResult]::new('demo', 'demo', [CompletionResultType]::ParameterValue, 'Run the whole engine once, in seconds, with no servers')
            [CompletionResult]::new('status', 'status', [CompletionResultType]::ParameterValue, 'Show counts per table and status, locks, the oldest pending event, what is due, failures by event type, stale locks and keys held up by a failure')
            [CompletionResult]::new('doctor', 'doctor', [CompletionResultType]::ParameterValue, 'Check the database, the claim''s indexes and plan, statistics, the broker, leases, blocked keys, the backlog, retention and table health')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List events with filters, oldest first')
            [CompletionResult]::new('show', 'show', [CompletionResultType]::ParameterValue, 'Show one event in full, with its payload as pretty JSON')
            [CompletionResult]::new('replay', 'replay', [CompletionResultType]::ParameterValue, 'Put failed events back to pending (attempts reset, error cleared, due now)')
            [CompletionResult]::new('failures', 'failures', [CompletionResultType]::ParameterValue, 'Group failed events by event type and error cause')
            [CompletionResult]::new('unlock', 'unlock', [CompletionResultType]::ParameterValue, 'Force-unlock one event, or every event a dead worker holds')
            [CompletionResult]::new('release-stale-locks', 'release-stale-locks', [CompletionResultType]::ParameterValue, 'Unlock rows whose lock is older than a threshold and whose lease ran out')
            [CompletionResult]::new('cleanup', 'cleanup', [CompletionResultType]::ParameterValue, 'Delete completed rows past their retention, in bounded batches')
            [CompletionResult]::new('partitions', 'partitions', [CompletionResultType]::ParameterValue, 'List the partitions of the outbox and inbox, or create those missing')
            [CompletionResult]::new('audit', 'audit', [CompletionResultType]::ParameterValue, 'Show recorded replays, unlocks, stale-lock releases and cleanups')
            [CompletionResult]::new('config', 'config', [CompletionResultType]::ParameterValue, 'Show the effective settings')
            [CompletionResult]::new('completions', 'completions', [CompletionResultType]::ParameterValue, 'Print shell completions')
            [CompletionResult]::new('generate', 'generate', [CompletionResultType]::ParameterValue, 'Writes completions/ and man/ under a directory')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'omnibox;migrate' {
            [CompletionResult]::new('--partition-period', '--partition-period', [CompletionResultType]::ParameterName, 'With --partitioned: the range of one partition')
            [CompletionResult]::new('--partitions-ahead', '--partitions-ahead', [CompletionResultType]::ParameterName, 'With --partitioned: partitions kept ready past the current one')
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('--print-sql', '--print-sql', [CompletionResultType]::ParameterName, 'Print the DDL for the database URL''s backend instead of applying it (no connection is made)')
            [CompletionResult]::new('--partitioned', '--partitioned', [CompletionResultType]::ParameterName, 'Partition the outbox and inbox by created_at (PostgreSQL)')
            [CompletionResult]::new('--force', '--force', [CompletionResultType]::ParameterName, 'With --partitioned: convert tables of any size (their rows are copied under a write lock)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;enqueue' {
            [CompletionResult]::new('--jsonl', '--jsonl', [CompletionResultType]::ParameterName, 'Read events as JSON lines from PATH, or from stdin when PATH is - or omitted')
            [CompletionResult]::new('--aggregate-type', '--aggregate-type', [CompletionResultType]::ParameterName, 'Kind of aggregate, e.g. order')
            [CompletionResult]::new('--aggregate-id', '--aggregate-id', [CompletionResultType]::ParameterName, 'The aggregate''s id (UUID)')
            [CompletionResult]::new('--event-type', '--event-type', [CompletionResultType]::ParameterName, 'Event type, e.g. order.created')
            [CompletionResult]::new('--topic', '--topic', [CompletionResultType]::ParameterName, 'Broker topic')
            [CompletionResult]::new('--partition-key', '--partition-key', [CompletionResultType]::ParameterName, 'Broker key; events of one key are published in order')
            [CompletionResult]::new('--payload', '--payload', [CompletionResultType]::ParameterName, 'The payload: a JSON object, or @PATH to read it from a file')
            [CompletionResult]::new('--header', '--header', [CompletionResultType]::ParameterName, 'A header KEY=VALUE (repeatable)')
            [CompletionResult]::new('--id', '--id', [CompletionResultType]::ParameterName, 'Event id [default: a new UUIDv7]')
            [CompletionResult]::new('--idempotency-key', '--idempotency-key', [CompletionResultType]::ParameterName, 'Idempotency key: an event with an existing key is not inserted again')
            [CompletionResult]::new('--trace-id', '--trace-id', [CompletionResultType]::ParameterName, 'Trace id')
            [CompletionResult]::new('--correlation-id', '--correlation-id', [CompletionResultType]::ParameterName, 'Correlation id')
            [CompletionResult]::new('--causation-id', '--causation-id', [CompletionResultType]::ParameterName, 'Causation id')
            [CompletionResult]::new('--schema-version', '--schema-version', [CompletionResultType]::ParameterName, 'Payload schema version, e.g. 1.0.0')
            [CompletionResult]::new('--max-attempts', '--max-attempts', [CompletionResultType]::ParameterName, 'Counted failures before the event is failed [default: 6]')
            [CompletionResult]::new('--scheduled-at', '--scheduled-at', [CompletionResultType]::ParameterName, 'Publish no earlier than this time (RFC 3339 with an offset)')
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;publish' {
            [CompletionResult]::new('--broker', '--broker', [CompletionResultType]::ParameterName, 'Where to publish: kafka://HOST:PORT[,HOST:PORT], file:PATH, stdout or null [default: file:omnibox-events.jsonl]')
            [CompletionResult]::new('-X', '-X ', [CompletionResultType]::ParameterName, 'A librdkafka property for the producer (repeatable), e.g. -X linger.ms=20')
            [CompletionResult]::new('--kafka-tls-ca', '--kafka-tls-ca', [CompletionResultType]::ParameterName, 'Kafka over TLS, verifying the brokers with this CA certificate (PEM)')
            [CompletionResult]::new('--kafka-tls-cert', '--kafka-tls-cert', [CompletionResultType]::ParameterName, 'A client certificate for Kafka (PEM; with --kafka-tls-key)')
            [CompletionResult]::new('--kafka-tls-key', '--kafka-tls-key', [CompletionResultType]::ParameterName, 'The client certificate''s key (PEM)')
            [CompletionResult]::new('--kafka-sasl-mechanism', '--kafka-sasl-mechanism', [CompletionResultType]::ParameterName, 'SASL authentication with Kafka (password from --kafka-sasl-password-file or OMNIBOX_KAFKA_SASL_PASSWORD)')
            [CompletionResult]::new('--kafka-sasl-username', '--kafka-sasl-username', [CompletionResultType]::ParameterName, 'The SASL user name')
            [CompletionResult]::new('--kafka-sasl-password-file', '--kafka-sasl-password-file', [CompletionResultType]::ParameterName, 'A file holding the SASL password (its first line)')
            [CompletionResult]::new('--circuit-breaker', '--circuit-breaker', [CompletionResultType]::ParameterName, 'Pause claiming while downstream (the broker, the handler) does not answer; off keeps claiming at the transient retry''s pace (no attempt is spent either way)')
            [CompletionResult]::new('--circuit-threshold', '--circuit-threshold', [CompletionResultType]::ParameterName, 'Consecutive batches downstream did not take before the pause starts')
            [CompletionResult]::new('--circuit-recovery', '--circuit-recovery', [CompletionResultType]::ParameterName, 'Longest pause: it starts at 1s and doubles while downstream stays out, up to this (at least 1s)')
            [CompletionResult]::new('--batch', '--batch', [CompletionResultType]::ParameterName, 'Events per claim')
            [CompletionResult]::new('--batch-bytes', '--batch-bytes', [CompletionResultType]::ParameterName, 'Payload bytes per claim, e.g. 64MiB: a claim stops before the event that would pass it (one event at least, however large); up to three batches are in flight [default: OMNIBOX_BATCH_BYTES, batch_bytes in omnibox.toml, or 16MiB]')
            [CompletionResult]::new('--topic', '--topic', [CompletionResultType]::ParameterName, 'Publish only events of this topic (repeatable): a relay dedicated to some topics, e.g. a slow one, while others take the rest. Per-key order holds (a key belongs to one topic); --once exits when nothing of these topics is due')
            [CompletionResult]::new('--default-schema-version', '--default-schema-version', [CompletionResultType]::ParameterName, 'The envelope''s schema_version for events that have none of their own')
            [CompletionResult]::new('--worker-id', '--worker-id', [CompletionResultType]::ParameterName, 'This relay''s id in locked_by [default: HOST:PID]')
            [CompletionResult]::new('--lease', '--lease', [CompletionResultType]::ParameterName, 'Lease of a claim: a relay that dies leaves its rows to others after this long (extended while a batch is in flight) [default: OMNIBOX_LEASE, lease in omnibox.toml, or 5m]')
            [CompletionResult]::new('--publish-timeout', '--publish-timeout', [CompletionResultType]::ParameterName, 'Longest wait for one message''s acknowledgement')
            [CompletionResult]::new('--dlq-topic', '--dlq-topic', [CompletionResultType]::ParameterName, 'Also write events that end up failed to this topic (best effort)')
            [CompletionResult]::new('--dlq', '--dlq', [CompletionResultType]::ParameterName, 'Also keep events that end up failed as dead letters here (replay them with `omnibox replay --table dead-letters`)')
            [CompletionResult]::new('--limit', '--limit', [CompletionResultType]::ParameterName, 'Stop after claiming this many events (whole batches), e.g. to drain a backlog in chunks')
            [CompletionResult]::new('--topic-unavailable-limit', '--topic-unavailable-limit', [CompletionResultType]::ParameterName, 'How long a topic may stay unavailable (unknown, no leader) before its events spend attempts')
            [CompletionResult]::new('--hold', '--hold', [CompletionResultType]::ParameterName, 'How a claim holds its rows while they are published: transaction (PostgreSQL: row locks in the claim''s open transaction, each row written once, when done; status shows rows in flight as pending; a relay that dies frees its rows at once, one that stops answering after the lease) or lease (written on each row: status shows them locked, another relay takes them over when the lease runs out; about two thirds of the rows/s) [default: transaction on PostgreSQL (both sources), lease on SQLite]')
            [CompletionResult]::new('--source', '--source', [CompletionResultType]::ParameterName, 'How new rows are found: poll (claim them from the table) or wal (PostgreSQL''s write-ahead log, through a replication slot)')
            [CompletionResult]::new('--slot', '--slot', [CompletionResultType]::ParameterName, '--source wal: the logical replication slot to read (created when missing)')
            [CompletionResult]::new('--publication', '--publication', [CompletionResultType]::ParameterName, '--source wal: the publication of the outbox''s inserts (created when missing)')
            [CompletionResult]::new('--poll-interval', '--poll-interval', [CompletionResultType]::ParameterName, 'Longest idle wait between polls when nothing is due (with --source wal: between scans of the table)')
            [CompletionResult]::new('--outage-limit', '--outage-limit', [CompletionResultType]::ParameterName, 'With --once: give up (exit 1) when the database stays unreachable this long; a running one waits however long')
            [CompletionResult]::new('--metrics-addr', '--metrics-addr', [CompletionResultType]::ParameterName, 'Serve Prometheus metrics on this address, e.g. 127.0.0.1:9898')
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('--once', '--once', [CompletionResultType]::ParameterName, 'Publish what is due, then exit (for jobs and cron)')
            [CompletionResult]::new('--standby', '--standby', [CompletionResultType]::ParameterName, '--source wal: when another relay reads the slot, wait and take over when it stops (instead of refusing to start)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;inbox' {
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('consume', 'consume', [CompletionResultType]::ParameterValue, 'Consume broker messages into the inbox, once per message id and group')
            [CompletionResult]::new('process', 'process', [CompletionResultType]::ParameterValue, 'Run a handler on pending inbox rows (the batch pipeline, like publish)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'omnibox;inbox;consume' {
            [CompletionResult]::new('--from', '--from', [CompletionResultType]::ParameterName, 'kafka://HOST:PORT[,HOST:PORT], file:PATH, or - for stdin [default: the broker''s file, file:omnibox-events.jsonl]')
            [CompletionResult]::new('--topic', '--topic', [CompletionResultType]::ParameterName, 'Kafka topic to consume (repeatable)')
            [CompletionResult]::new('--group', '--group', [CompletionResultType]::ParameterName, 'Consumer group: the inbox deduplicates per group (--consumer-group in the commands that select inbox rows by it)')
            [CompletionResult]::new('--consumer-group', '--consumer-group', [CompletionResultType]::ParameterName, 'Consumer group: the inbox deduplicates per group (--consumer-group in the commands that select inbox rows by it)')
            [CompletionResult]::new('-X', '-X ', [CompletionResultType]::ParameterName, 'A librdkafka property for the consumer (repeatable)')
            [CompletionResult]::new('--kafka-tls-ca', '--kafka-tls-ca', [CompletionResultType]::ParameterName, 'Kafka over TLS, verifying the brokers with this CA certificate (PEM)')
            [CompletionResult]::new('--kafka-tls-cert', '--kafka-tls-cert', [CompletionResultType]::ParameterName, 'A client certificate for Kafka (PEM; with --kafka-tls-key)')
            [CompletionResult]::new('--kafka-tls-key', '--kafka-tls-key', [CompletionResultType]::ParameterName, 'The client certificate''s key (PEM)')
            [CompletionResult]::new('--kafka-sasl-mechanism', '--kafka-sasl-mechanism', [CompletionResultType]::ParameterName, 'SASL authentication with Kafka (password from --kafka-sasl-password-file or OMNIBOX_KAFKA_SASL_PASSWORD)')
            [CompletionResult]::new('--kafka-sasl-username', '--kafka-sasl-username', [CompletionResultType]::ParameterName, 'The SASL user name')
            [CompletionResult]::new('--kafka-sasl-password-file', '--kafka-sasl-password-file', [CompletionResultType]::ParameterName, 'A file holding the SASL password (its first line)')
            [CompletionResult]::new('--ack', '--ack', [CompletionResultType]::ParameterName, 'When offsets are committed')
            [CompletionResult]::new('--commit-on', '--commit-on', [CompletionResultType]::ParameterName, 'at-least-once: commit once stored, or once handled')
            [CompletionResult]::new('--exec', '--exec', [CompletionResultType]::ParameterName, 'Run this command per event (via sh -c): the event as JSON on stdin, OMNIBOX_* variables; exit 0 completed, 3 skipped, 75 retry later, other failed')
            [CompletionResult]::new('--webhook', '--webhook', [CompletionResultType]::ParameterName, 'POST each event as JSON to this URL: 2xx completed, 409 skipped, 429/502/503/504 retry later (Retry-After honoured), other failed')
            [CompletionResult]::new('--timeout', '--timeout', [CompletionResultType]::ParameterName, 'Longest run of one handler call (a timeout is a failed attempt)')
            [CompletionResult]::new('--batch', '--batch', [CompletionResultType]::ParameterName, 'Messages per database transaction')
            [CompletionResult]::new('--batch-bytes', '--batch-bytes', [CompletionResultType]::ParameterName, 'Bytes per database transaction (values, keys and headers), e.g. 64MiB: a batch ends before the message that would pass it (one message at least, however large); a Kafka source also prefetches at most this much (queued.max.messages.kbytes, unless -X sets it) [default: OMNIBOX_BATCH_BYTES, batch_bytes in omnibox.toml, or 16MiB]')
            [CompletionResult]::new('--max-attempts', '--max-attempts', [CompletionResultType]::ParameterName, 'Counted handler failures of a message before its row is failed (exactly-once)')
            [CompletionResult]::new('--transient-limit', '--transient-limit', [CompletionResultType]::ParameterName, 'A message still failing transiently (exit 75, HTTP 429/502/503/504, no connection) this long after it was first stored is parked as failed')
            [CompletionResult]::new('--lease', '--lease', [CompletionResultType]::ParameterName, 'How long this consumer''s locks on rows in hand last if it dies (extended every third of it while it lives; external handlers)')
            [CompletionResult]::new('--dlq-topic', '--dlq-topic', [CompletionResultType]::ParameterName, 'Also write poison messages and rows that end up failed to this topic')
            [CompletionResult]::new('--dlq', '--dlq', [CompletionResultType]::ParameterName, 'Also keep poison messages and rows that end up failed as dead letters here')
            [CompletionResult]::new('--dlq-broker', '--dlq-broker', [CompletionResultType]::ParameterName, 'Where the DLQ topic lives [default: the Kafka source''s brokers, else file:omnibox-dlq.jsonl]')
            [CompletionResult]::new('--worker-id', '--worker-id', [CompletionResultType]::ParameterName, 'This consumer''s id [default: HOST:PID]')
            [CompletionResult]::new('--outage-limit', '--outage-limit', [CompletionResultType]::ParameterName, 'With --once: give up (exit 1) when the database stays unreachable this long; a running one waits however long')
            [CompletionResult]::new('--metrics-addr', '--metrics-addr', [CompletionResultType]::ParameterName, 'Serve Prometheus metrics on this address')
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('--once', '--once', [CompletionResultType]::ParameterName, 'Stop at the end of the input (file) or once caught up with the end of every partition (Kafka; the broker''s long poll is then cut to 100 ms, fetch.wait.max.ms, unless -X sets it)')
            [CompletionResult]::new('--follow', '--follow', [CompletionResultType]::ParameterName, 'File source: keep reading as the file grows')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;inbox;process' {
            [CompletionResult]::new('--exec', '--exec', [CompletionResultType]::ParameterName, 'Run this command per event (via sh -c): the event as JSON on stdin, OMNIBOX_* variables; exit 0 completed, 3 skipped, 75 retry later, other failed')
            [CompletionResult]::new('--webhook', '--webhook', [CompletionResultType]::ParameterName, 'POST each event as JSON to this URL: 2xx completed, 409 skipped, 429/502/503/504 retry later (Retry-After honoured), other failed')
            [CompletionResult]::new('--timeout', '--timeout', [CompletionResultType]::ParameterName, 'Longest run of one handler call (a timeout is a failed attempt)')
            [CompletionResult]::new('--circuit-breaker', '--circuit-breaker', [CompletionResultType]::ParameterName, 'Pause claiming while downstream (the broker, the handler) does not answer; off keeps claiming at the transient retry''s pace (no attempt is spent either way)')
            [CompletionResult]::new('--circuit-threshold', '--circuit-threshold', [CompletionResultType]::ParameterName, 'Consecutive batches downstream did not take before the pause starts')
            [CompletionResult]::new('--circuit-recovery', '--circuit-recovery', [CompletionResultType]::ParameterName, 'Longest pause: it starts at 1s and doubles while downstream stays out, up to this (at least 1s)')
            [CompletionResult]::new('--batch', '--batch', [CompletionResultType]::ParameterName, 'Rows per claim')
            [CompletionResult]::new('--batch-bytes', '--batch-bytes', [CompletionResultType]::ParameterName, 'Payload bytes per claim, e.g. 64MiB: a claim stops before the row that would pass it (one row at least, however large) [default: OMNIBOX_BATCH_BYTES, batch_bytes in omnibox.toml, or 16MiB]')
            [CompletionResult]::new('--source', '--source', [CompletionResultType]::ParameterName, 'Handle only rows from this source (the producing service, or the topic; repeatable)')
            [CompletionResult]::new('--event-type', '--event-type', [CompletionResultType]::ParameterName, 'Handle only rows of this event type (repeatable)')
            [CompletionResult]::new('--consumer-group', '--consumer-group', [CompletionResultType]::ParameterName, 'Handle only rows of this consumer group (what `inbox consume --group` stored them under; repeatable)')
            [CompletionResult]::new('--concurrency', '--concurrency', [CompletionResultType]::ParameterName, 'Handler calls running at once')
            [CompletionResult]::new('--worker-id', '--worker-id', [CompletionResultType]::ParameterName, 'This worker''s id [default: HOST:PID]')
            [CompletionResult]::new('--lease', '--lease', [CompletionResultType]::ParameterName, 'Lease of a claim (extended while handlers run) [default: OMNIBOX_LEASE, lease in omnibox.toml, or 5m]')
            [CompletionResult]::new('--dlq-topic', '--dlq-topic', [CompletionResultType]::ParameterName, 'Also write rows that end up failed to this topic')
            [CompletionResult]::new('--dlq', '--dlq', [CompletionResultType]::ParameterName, 'Also keep rows that end up failed as dead letters here (replay them with `omnibox replay --table dead-letters`)')
            [CompletionResult]::new('--dlq-broker', '--dlq-broker', [CompletionResultType]::ParameterName, 'Where the DLQ topic lives [default: file:omnibox-dlq.jsonl]')
            [CompletionResult]::new('--poll-interval', '--poll-interval', [CompletionResultType]::ParameterName, 'Longest idle wait between polls when nothing is due')
            [CompletionResult]::new('--outage-limit', '--outage-limit', [CompletionResultType]::ParameterName, 'With --once: give up (exit 1) when the database stays unreachable this long; a running one waits however long')
            [CompletionResult]::new('--metrics-addr', '--metrics-addr', [CompletionResultType]::ParameterName, 'Serve Prometheus metrics on this address')
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('--once', '--once', [CompletionResultType]::ParameterName, 'Process what is due, then exit')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;inbox;help' {
            [CompletionResult]::new('consume', 'consume', [CompletionResultType]::ParameterValue, 'Consume broker messages into the inbox, once per message id and group')
            [CompletionResult]::new('process', 'process', [CompletionResultType]::ParameterValue, 'Run a handler on pending inbox rows (the batch pipeline, like publish)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'omnibox;inbox;help;consume' {
            break
        }
        'omnibox;inbox;help;process' {
            break
        }
        'omnibox;inbox;help;help' {
            break
        }
        'omnibox;demo' {
            [CompletionResult]::new('--dir', '--dir', [CompletionResultType]::ParameterName, 'Directory to work in (must not exist yet) [default: a new directory under the system''s temp dir]')
            [CompletionResult]::new('--events', '--events', [CompletionResultType]::ParameterName, 'Outbox events to create')
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;status' {
            [CompletionResult]::new('--max-pending-age', '--max-pending-age', [CompletionResultType]::ParameterName, 'Threshold: age of the oldest pending event')
            [CompletionResult]::new('--max-failed', '--max-failed', [CompletionResultType]::ParameterName, 'Threshold: failed events (per table)')
            [CompletionResult]::new('--max-stale-locks', '--max-stale-locks', [CompletionResultType]::ParameterName, 'Threshold: stale locks (per table)')
            [CompletionResult]::new('--stale-after', '--stale-after', [CompletionResultType]::ParameterName, 'A lock older than this counts as stale')
            [CompletionResult]::new('--interval', '--interval', [CompletionResultType]::ParameterName, 'With --watch: the time between reports')
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('--check', '--check', [CompletionResultType]::ParameterName, 'Exit 1 when a threshold below is crossed')
            [CompletionResult]::new('--watch', '--watch', [CompletionResultType]::ParameterName, 'Refresh every --interval until interrupted, with rates (like top); on a terminal the screen is redrawn, otherwise each report is printed in turn (one JSON object per line with --format json)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;doctor' {
            [CompletionResult]::new('--broker', '--broker', [CompletionResultType]::ParameterName, 'Check this broker [default: the configured broker (OMNIBOX_BROKER, broker in omnibox.toml)]')
            [CompletionResult]::new('--max-pending-age', '--max-pending-age', [CompletionResultType]::ParameterName, 'Warn when the oldest due pending event is older than this')
            [CompletionResult]::new('-X', '-X ', [CompletionResultType]::ParameterName, 'A librdkafka property for the broker check (repeatable)')
            [CompletionResult]::new('--kafka-tls-ca', '--kafka-tls-ca', [CompletionResultType]::ParameterName, 'Kafka over TLS, verifying the brokers with this CA certificate (PEM)')
            [CompletionResult]::new('--kafka-tls-cert', '--kafka-tls-cert', [CompletionResultType]::ParameterName, 'A client certificate for Kafka (PEM; with --kafka-tls-key)')
            [CompletionResult]::new('--kafka-tls-key', '--kafka-tls-key', [CompletionResultType]::ParameterName, 'The client certificate''s key (PEM)')
            [CompletionResult]::new('--kafka-sasl-mechanism', '--kafka-sasl-mechanism', [CompletionResultType]::ParameterName, 'SASL authentication with Kafka (password from --kafka-sasl-password-file or OMNIBOX_KAFKA_SASL_PASSWORD)')
            [CompletionResult]::new('--kafka-sasl-username', '--kafka-sasl-username', [CompletionResultType]::ParameterName, 'The SASL user name')
            [CompletionResult]::new('--kafka-sasl-password-file', '--kafka-sasl-password-file', [CompletionResultType]::ParameterName, 'A file holding the SASL password (its first line)')
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;list' {
            [CompletionResult]::new('--table', '--table', [CompletionResultType]::ParameterName, 'Which table [default: both event tables, or the one a filter belongs to]')
            [CompletionResult]::new('--status', '--status', [CompletionResultType]::ParameterName, 'Only this status: pending, completed or failed')
            [CompletionResult]::new('--event-type', '--event-type', [CompletionResultType]::ParameterName, 'Only this event type')
            [CompletionResult]::new('--topic', '--topic', [CompletionResultType]::ParameterName, 'Only this topic (the outbox; with --table inbox, the source)')
            [CompletionResult]::new('--source', '--source', [CompletionResultType]::ParameterName, 'Only this source (the inbox; with --table outbox, the topic)')
            [CompletionResult]::new('--consumer-group', '--consumer-group', [CompletionResultType]::ParameterName, 'Only inbox rows of this consumer group (the outbox has none)')
            [CompletionResult]::new('--since', '--since', [CompletionResultType]::ParameterName, 'Only rows created (dead letters: written) since: RFC 3339 (2026-01-31T12:00:00Z) or a duration ago (2h)')
            [CompletionResult]::new('--limit', '--limit', [CompletionResultType]::ParameterName, 'Most rows to show')
            [CompletionResult]::new('--after', '--after', [CompletionResultType]::ParameterName, 'Start after this sequence number of one table (paging: pass the last seq shown)')
            [CompletionResult]::new('--locked-by', '--locked-by', [CompletionResultType]::ParameterName, 'Only rows locked by this worker (see `omnibox unlock --worker`)')
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;show' {
            [CompletionResult]::new('--table', '--table', [CompletionResultType]::ParameterName, 'Look only in this table')
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;replay' {
            [CompletionResult]::new('--table', '--table', [CompletionResultType]::ParameterName, 'Which table [default: both event tables, or the one a selector belongs to]')
            [CompletionResult]::new('--id', '--id', [CompletionResultType]::ParameterName, 'This row (repeatable)')
            [CompletionResult]::new('--event-type', '--event-type', [CompletionResultType]::ParameterName, 'Rows of this event type')
            [CompletionResult]::new('--topic', '--topic', [CompletionResultType]::ParameterName, 'Rows of this topic (the outbox; with --table inbox, the source)')
            [CompletionResult]::new('--source', '--source', [CompletionResultType]::ParameterName, 'Rows of this source (the inbox; with --table outbox, the topic)')
            [CompletionResult]::new('--error-contains', '--error-contains', [CompletionResultType]::ParameterName, 'Rows whose last error contains this text')
            [CompletionResult]::new('--consumer-group', '--consumer-group', [CompletionResultType]::ParameterName, 'Inbox rows of this consumer group (the outbox has none)')
            [CompletionResult]::new('--fingerprint', '--fingerprint', [CompletionResultType]::ParameterName, 'Rows of this failure group: its fingerprint (see omnibox failures)')
            [CompletionResult]::new('--group', '--group', [CompletionResultType]::ParameterName, 'Not a selector here: --fingerprint or --consumer-group says which')
            [CompletionResult]::new('--since', '--since', [CompletionResultType]::ParameterName, 'Rows that failed at or after this time (RFC 3339, or a duration ago such as 2h)')
            [CompletionResult]::new('--until', '--until', [CompletionResultType]::ParameterName, 'Rows that failed before this time')
            [CompletionResult]::new('--limit', '--limit', [CompletionResultType]::ParameterName, 'At most this many rows')
            [CompletionResult]::new('--rate', '--rate', [CompletionResultType]::ParameterName, 'At most this many rows per second')
            [CompletionResult]::new('--reason', '--reason', [CompletionResultType]::ParameterName, 'Why (recorded in the audit trail)')
            [CompletionResult]::new('--actor', '--actor', [CompletionResultType]::ParameterName, 'Who is acting, for the audit trail [default: the OS user]')
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('--all', '--all', [CompletionResultType]::ParameterName, 'Every failed row (explicitly)')
            [CompletionResult]::new('--pending', '--pending', [CompletionResultType]::ParameterName, 'Select pending rows waiting for a retry instead of failed ones, and make them due now (attempts and last error stay)')
            [CompletionResult]::new('--dry-run', '--dry-run', [CompletionResultType]::ParameterName, 'Show what would change, change nothing')
            [CompletionResult]::new('-y', '-y', [CompletionResultType]::ParameterName, 'Do not ask for confirmation (needed without a terminal, e.g. in cron)')
            [CompletionResult]::new('--yes', '--yes', [CompletionResultType]::ParameterName, 'Do not ask for confirmation (needed without a terminal, e.g. in cron)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;failures' {
            [CompletionResult]::new('--table', '--table', [CompletionResultType]::ParameterName, 'Which table [default: both]')
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;unlock' {
            [CompletionResult]::new('--worker', '--worker', [CompletionResultType]::ParameterName, 'Unlock every event locked by this worker instead')
            [CompletionResult]::new('--reason', '--reason', [CompletionResultType]::ParameterName, 'Why (1..255 characters; recorded in the audit trail, and in last_error when the row has none)')
            [CompletionResult]::new('--table', '--table', [CompletionResultType]::ParameterName, 'Which table [default: the one holding the id; both for --worker]')
            [CompletionResult]::new('--actor', '--actor', [CompletionResultType]::ParameterName, 'Who is acting, for the audit trail [default: the OS user]')
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('--dry-run', '--dry-run', [CompletionResultType]::ParameterName, 'Show what would change, change nothing')
            [CompletionResult]::new('-y', '-y', [CompletionResultType]::ParameterName, 'Do not ask for confirmation (needed without a terminal, e.g. in cron)')
            [CompletionResult]::new('--yes', '--yes', [CompletionResultType]::ParameterName, 'Do not ask for confirmation (needed without a terminal, e.g. in cron)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;release-stale-locks' {
            [CompletionResult]::new('--older-than', '--older-than', [CompletionResultType]::ParameterName, 'Locks older than this are stale')
            [CompletionResult]::new('--table', '--table', [CompletionResultType]::ParameterName, 'Only this table [default: both]')
            [CompletionResult]::new('--batch-size', '--batch-size', [CompletionResultType]::ParameterName, 'Rows per statement')
            [CompletionResult]::new('--actor', '--actor', [CompletionResultType]::ParameterName, 'Who is acting, for the audit trail [default: the OS user]')
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('--force', '--force', [CompletionResultType]::ParameterName, 'Accept a threshold shorter than the lease relays take')
            [CompletionResult]::new('--dry-run', '--dry-run', [CompletionResultType]::ParameterName, 'Show what would change, change nothing')
            [CompletionResult]::new('-y', '-y', [CompletionResultType]::ParameterName, 'Do not ask for confirmation (needed without a terminal, e.g. in cron)')
            [CompletionResult]::new('--yes', '--yes', [CompletionResultType]::ParameterName, 'Do not ask for confirmation (needed without a terminal, e.g. in cron)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;cleanup' {
            [CompletionResult]::new('--older-than', '--older-than', [CompletionResultType]::ParameterName, 'Keep completed rows for this long')
            [CompletionResult]::new('--failed-older-than', '--failed-older-than', [CompletionResultType]::ParameterName, 'With --include-failed: keep failed rows for this long')
            [CompletionResult]::new('--table', '--table', [CompletionResultType]::ParameterName, 'Only this table [default: both]')
            [CompletionResult]::new('--batch-size', '--batch-size', [CompletionResultType]::ParameterName, 'Rows per DELETE statement')
            [CompletionResult]::new('--max-iterations', '--max-iterations', [CompletionResultType]::ParameterName, 'Statements per table and kind, at most')
            [CompletionResult]::new('--audit-older-than', '--audit-older-than', [CompletionResultType]::ParameterName, 'Keep audit rows (omnibox audit) for this long; older ones are deleted')
            [CompletionResult]::new('--dead-letters-older-than', '--dead-letters-older-than', [CompletionResultType]::ParameterName, 'Keep replayed dead letters (omnibox list --table dead-letters) for this long; open ones are always kept')
            [CompletionResult]::new('--lock-timeout', '--lock-timeout', [CompletionResultType]::ParameterName, 'Partitioned tables: wait this long at most for the table''s lock to drop a partition (past it the partition stays for the next run)')
            [CompletionResult]::new('--actor', '--actor', [CompletionResultType]::ParameterName, 'Who is acting, for the audit trail [default: the OS user]')
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('--include-failed', '--include-failed', [CompletionResultType]::ParameterName, 'Also delete failed rows')
            [CompletionResult]::new('--force', '--force', [CompletionResultType]::ParameterName, 'Allow a retention shorter than an hour (completed rows also hold idempotency keys: deleting them at once lets a retried enqueue in again), and an --audit-older-than shorter than 30 days')
            [CompletionResult]::new('--dry-run', '--dry-run', [CompletionResultType]::ParameterName, 'Show what would change, change nothing')
            [CompletionResult]::new('-y', '-y', [CompletionResultType]::ParameterName, 'Do not ask for confirmation (needed without a terminal, e.g. in cron)')
            [CompletionResult]::new('--yes', '--yes', [CompletionResultType]::ParameterName, 'Do not ask for confirmation (needed without a terminal, e.g. in cron)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;partitions' {
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List the partitions (the default)')
            [CompletionResult]::new('create', 'create', [CompletionResultType]::ParameterValue, 'Create the partitions missing from the current one to the partitions kept ahead')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'omnibox;partitions;list' {
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;partitions;create' {
            [CompletionResult]::new('--from', '--from', [CompletionResultType]::ParameterName, 'Also create the partitions from the one holding this date (UTC: 2026-11-01 or 2026-11-01T13:00:00Z) on, for rows written with an older created_at (an event replayed from its dead letter keeps its own)')
            [CompletionResult]::new('--lock-timeout', '--lock-timeout', [CompletionResultType]::ParameterName, 'Wait this long at most for the table''s lock (creating a partition locks the table for a moment)')
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;partitions;help' {
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List the partitions (the default)')
            [CompletionResult]::new('create', 'create', [CompletionResultType]::ParameterValue, 'Create the partitions missing from the current one to the partitions kept ahead')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'omnibox;partitions;help;list' {
            break
        }
        'omnibox;partitions;help;create' {
            break
        }
        'omnibox;partitions;help;help' {
            break
        }
        'omnibox;audit' {
            [CompletionResult]::new('--action', '--action', [CompletionResultType]::ParameterName, 'Only this action: replay, unlock, unlock-worker, release-stale-locks, cleanup')
            [CompletionResult]::new('--since', '--since', [CompletionResultType]::ParameterName, 'Only entries since: RFC 3339 or a duration ago (24h)')
            [CompletionResult]::new('--id', '--id', [CompletionResultType]::ParameterName, 'Only entries that touched this event')
            [CompletionResult]::new('--limit', '--limit', [CompletionResultType]::ParameterName, 'Most entries, newest first')
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;config' {
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('show', 'show', [CompletionResultType]::ParameterValue, 'Each setting''s value and where it came from (flag, environment, file, default); secrets masked')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'omnibox;config;show' {
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;config;help' {
            [CompletionResult]::new('show', 'show', [CompletionResultType]::ParameterValue, 'Each setting''s value and where it came from (flag, environment, file, default); secrets masked')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'omnibox;config;help;show' {
            break
        }
        'omnibox;config;help;help' {
            break
        }
        'omnibox;completions' {
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;generate' {
            [CompletionResult]::new('--out', '--out', [CompletionResultType]::ParameterName, 'Where to write completions/ and man/')
            [CompletionResult]::new('--database-url', '--database-url', [CompletionResultType]::ParameterName, 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]')
            [CompletionResult]::new('--schema', '--schema', [CompletionResultType]::ParameterName, 'PostgreSQL schema that holds the tables (created by `migrate`)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Configuration file [default: ./omnibox.toml when present]')
            [CompletionResult]::new('--format', '--format', [CompletionResultType]::ParameterName, 'Output format: table for people, json for scripts [default: table]')
            [CompletionResult]::new('--color', '--color', [CompletionResultType]::ParameterName, 'When to use colour')
            [CompletionResult]::new('--log-format', '--log-format', [CompletionResultType]::ParameterName, 'Log format on stderr')
            [CompletionResult]::new('--dedup-window', '--dedup-window', [CompletionResultType]::ParameterName, 'The inbox''s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]')
            [CompletionResult]::new('--otlp-endpoint', '--otlp-endpoint', [CompletionResultType]::ParameterName, 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug, -vvv trace)')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'omnibox;help' {
            [CompletionResult]::new('migrate', 'migrate', [CompletionResultType]::ParameterValue, 'Create or upgrade the outbox and inbox tables (idempotent)')
            [CompletionResult]::new('enqueue', 'enqueue', [CompletionResultType]::ParameterValue, 'Insert outbox events: one from flags, or many as JSON lines')
            [CompletionResult]::new('publish', 'publish', [CompletionResultType]::ParameterValue, 'Publish due outbox events to the broker (the relay)')
            [CompletionResult]::new('inbox', 'inbox', [CompletionResultType]::ParameterValue, 'Consume messages into the inbox, and process inbox rows with a handler')
            [CompletionResult]::new('demo', 'demo', [CompletionResultType]::ParameterValue, 'Run the whole engine once, in seconds, with no servers')
            [CompletionResult]::new('status', 'status', [CompletionResultType]::ParameterValue, 'Show counts per table and status, locks, the oldest pending event, what is due, failures by event type, stale locks and keys held up by a failure')
            [CompletionResult]::new('doctor', 'doctor', [CompletionResultType]::ParameterValue, 'Check the database, the claim''s indexes and plan, statistics, the broker, leases, blocked keys, the backlog, retention and table health')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List events with filters, oldest first')
            [CompletionResult]::new('show', 'show', [CompletionResultType]::ParameterValue, 'Show one event in full, with its payload as pretty JSON')
            [CompletionResult]::new('replay', 'replay', [CompletionResultType]::ParameterValue, 'Put failed events back to pending (attempts reset, error cleared, due now)')
            [CompletionResult]::new('failures', 'failures', [CompletionResultType]::ParameterValue, 'Group failed events by event type and error cause')
            [CompletionResult]::new('unlock', 'unlock', [CompletionResultType]::ParameterValue, 'Force-unlock one event, or every event a dead worker holds')
            [CompletionResult]::new('release-stale-locks', 'release-stale-locks', [CompletionResultType]::ParameterValue, 'Unlock rows whose lock is older than a threshold and whose lease ran out')
            [CompletionResult]::new('cleanup', 'cleanup', [CompletionResultType]::ParameterValue, 'Delete completed rows past their retention, in bounded batches')
            [CompletionResult]::new('partitions', 'partitions', [CompletionResultType]::ParameterValue, 'List the partitions of the outbox and inbox, or create those missing')
            [CompletionResult]::new('audit', 'audit', [CompletionResultType]::ParameterValue, 'Show recorded replays, unlocks, stale-lock releases and cleanups')
            [CompletionResult]::new('config', 'config', [CompletionResultType]::ParameterValue, 'Show the effective settings')
            [CompletionResult]::new('completions', 'completions', [CompletionResultType]::ParameterValue, 'Print shell completions')
            [CompletionResult]::new('generate', 'generate', [CompletionResultType]::ParameterValue, 'Writes completions/ and man/ under a directory')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'omnibox;help;migrate' {
            break
        }
        'omnibox;help;enqueue' {
            break
        }
        'omnibox;help;publish' {
            break
        }
        'omnibox;help;inbox' {
            [CompletionResult]::new('consume', 'consume', [CompletionResultType]::ParameterValue, 'Consume broker messages into the inbox, once per message id and group')
            [CompletionResult]::new('process', 'process', [CompletionResultType]::ParameterValue, 'Run a handler on pending inbox rows (the batch pipeline, like publish)')
            break
        }
        'omnibox;help;inbox;consume' {
            break
        }
        'omnibox;help;inbox;process' {
            break
        }
        'omnibox;help;demo' {
            break
        }
        'omnibox;help;status' {
            break
        }
        'omnibox;help;doctor' {
            break
        }
        'omnibox;help;list' {
            break
        }
        'omnibox;help;show' {
            break
        }
        'omnibox;help;replay' {
            break
        }
        'omnibox;help;failures' {
            break
        }
        'omnibox;help;unlock' {
            break
        }
        'omnibox;help;release-stale-locks' {
            break
        }
        'omnibox;help;cleanup' {
            break
        }
        'omnibox;help;partitions' {
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List the partitions (the default)')
            [CompletionResult]::new('create', 'create', [CompletionResultType]::ParameterValue, 'Create the partitions missing from the current one to the partitions kept ahead')
            break
        }
        'omnibox;help;partitions;list' {
            break
        }
        'omnibox;help;partitions;create' {
            break
        }
        'omnibox;help;audit' {
            break
        }
        'omnibox;help;config' {
            [CompletionResult]::new('show', 'show', [CompletionResultType]::ParameterValue, 'Each setting''s value and where it came from (flag, environment, file, default); secrets masked')
            break
        }
        'omnibox;help;config;show' {
            break
        }
        'omnibox;help;completions' {
            break
        }
        'omnibox;help;generate' {
            break
        }
        'omnibox;help;help' {
            break
        }
    })

    $completions.Where{ $_.CompletionText -like "$wordToComplete*" } |
        Sort-Object -Property ListItemText
}
