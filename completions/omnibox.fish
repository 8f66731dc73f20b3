# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_omnibox_global_optspecs
    string join \n database-url= schema= config= format= color= log-format= v/verbose q/quiet dedup-window= otlp-endpoint= h/help V/version
end

function __fish_omnibox_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_omnibox_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_omnibox_using_subcommand
    set -l cmd (__fish_omnibox_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c omnibox -n "__fish_omnibox_needs_command" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_needs_command" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_needs_command" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_needs_command" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_needs_command" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_needs_command" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_needs_command" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_needs_command" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_needs_command" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_needs_command" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_needs_command" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "migrate" -d 'Create or upgrade the outbox and inbox tables (idempotent)'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "enqueue" -d 'Insert outbox events: one from flags, or many as JSON lines'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "publish" -d 'Publish due outbox events to the broker (the relay)'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "inbox" -d 'Consume messages into the inbox, and process inbox rows with a handler'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "demo" -d 'Run the whole engine once, in seconds, with no servers'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "status" -d 'Show counts per table and status, locks, the oldest pending event, what is due, failures by event type, stale locks and keys held up by a failure'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "doctor" -d 'Check the database, the claim\'s indexes and plan, statistics, the broker, leases, blocked keys, the backlog, retention and table health'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "list" -d 'List events with filters, oldest first'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "show" -d 'Show one event in full, with its payload as pretty JSON'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "replay" -d 'Put failed events back to pending (attempts reset, error cleared, due now)'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "failures" -d 'Group failed events by event type and error cause'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "unlock" -d 'Force-unlock one event, or every event a dead worker holds'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "release-stale-locks" -d 'Unlock rows whose lock is older than a threshold and whose lease ran out'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "cleanup" -d 'Delete completed rows past their retention, in bounded batches'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "partitions" -d 'List the partitions of the outbox and inbox, or create those missing'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "audit" -d 'Show recorded replays, unlocks, stale-lock releases and cleanups'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "config" -d 'Show the effective settings'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "completions" -d 'Print shell completions'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "generate" -d 'Writes completions/ and man/ under a directory'
complete -c omnibox -n "__fish_omnibox_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c omnibox -n "__fish_omnibox_using_subcommand migrate" -l partition-period -d 'With --partitioned: the range of one partition' -r -f -a "hour\t'One partition per hour (UTC)'
day\t'One partition per day (UTC)'
week\t'One partition per week, from Monday (UTC)'"
complete -c omnibox -n "__fish_omnibox_using_subcommand migrate" -l partitions-ahead -d 'With --partitioned: partitions kept ready past the current one' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand migrate" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand migrate" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand migrate" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand migrate" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand migrate" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand migrate" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand migrate" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand migrate" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand migrate" -l print-sql -d 'Print the DDL for the database URL\'s backend instead of applying it (no connection is made)'
complete -c omnibox -n "__fish_omnibox_using_subcommand migrate" -l partitioned -d 'Partition the outbox and inbox by created_at (PostgreSQL)'
complete -c omnibox -n "__fish_omnibox_using_subcommand migrate" -l force -d 'With --partitioned: convert tables of any size (their rows are copied under a write lock)'
complete -c omnibox -n "__fish_omnibox_using_subcommand migrate" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand migrate" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand migrate" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand migrate" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l jsonl -d 'Read events as JSON lines from PATH, or from stdin when PATH is - or omitted' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l aggregate-type -d 'Kind of aggregate, e.g. order' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l aggregate-id -d 'The aggregate\'s id (UUID)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l event-type -d 'Event type, e.g. order.created' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l topic -d 'Broker topic' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l partition-key -d 'Broker key; events of one key are published in order' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l payload -d 'The payload: a JSON object, or @PATH to read it from a file' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l header -d 'A header KEY=VALUE (repeatable)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l id -d 'Event id [default: a new UUIDv7]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l idempotency-key -d 'Idempotency key: an event with an existing key is not inserted again' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l trace-id -d 'Trace id' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l correlation-id -d 'Correlation id' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l causation-id -d 'Causation id' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l schema-version -d 'Payload schema version, e.g. 1.0.0' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l max-attempts -d 'Counted failures before the event is failed [default: 6]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l scheduled-at -d 'Publish no earlier than this time (RFC 3339 with an offset)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand enqueue" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l broker -d 'Where to publish: kafka://HOST:PORT[,HOST:PORT], file:PATH, stdout or null [default: file:omnibox-events.jsonl]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -s X -d 'A librdkafka property for the producer (repeatable), e.g. -X linger.ms=20' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l kafka-tls-ca -d 'Kafka over TLS, verifying the brokers with this CA certificate (PEM)' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l kafka-tls-cert -d 'A client certificate for Kafka (PEM; with --kafka-tls-key)' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l kafka-tls-key -d 'The client certificate\'s key (PEM)' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l kafka-sasl-mechanism -d 'SASL authentication with Kafka (password from --kafka-sasl-password-file or OMNIBOX_KAFKA_SASL_PASSWORD)' -r -f -a "PLAIN\t''
SCRAM-SHA-256\t''
SCRAM-SHA-512\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l kafka-sasl-username -d 'The SASL user name' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l kafka-sasl-password-file -d 'A file holding the SASL password (its first line)' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l circuit-breaker -d 'Pause claiming while downstream (the broker, the handler) does not answer; off keeps claiming at the transient retry\'s pace (no attempt is spent either way)' -r -f -a "on\t'On'
off\t'Off'"
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l circuit-threshold -d 'Consecutive batches downstream did not take before the pause starts' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l circuit-recovery -d 'Longest pause: it starts at 1s and doubles while downstream stays out, up to this (at least 1s)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l batch -d 'Events per claim' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l batch-bytes -d 'Payload bytes per claim, e.g. 64MiB: a claim stops before the event that would pass it (one event at least, however large); up to three batches are in flight [default: OMNIBOX_BATCH_BYTES, batch_bytes in omnibox.toml, or 16MiB]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l topic -d 'Publish only events of this topic (repeatable): a relay dedicated to some topics, e.g. a slow one, while others take the rest. Per-key order holds (a key belongs to one topic); --once exits when nothing of these topics is due' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l default-schema-version -d 'The envelope\'s schema_version for events that have none of their own' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l worker-id -d 'This relay\'s id in locked_by [default: HOST:PID]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l lease -d 'Lease of a claim: a relay that dies leaves its rows to others after this long (extended while a batch is in flight) [default: OMNIBOX_LEASE, lease in omnibox.toml, or 5m]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l publish-timeout -d 'Longest wait for one message\'s acknowledgement' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l dlq-topic -d 'Also write events that end up failed to this topic (best effort)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l dlq -d 'Also keep events that end up failed as dead letters here (replay them with `omnibox replay --table dead-letters`)' -r -f -a "table\t'The omnibox_dead_letters table (see `omnibox list --table dead-letters`)'"
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l limit -d 'Stop after claiming this many events (whole batches), e.g. to drain a backlog in chunks' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l topic-unavailable-limit -d 'How long a topic may stay unavailable (unknown, no leader) before its events spend attempts' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l hold -d 'How a claim holds its rows while they are published: transaction (PostgreSQL: row locks in the claim\'s open transaction, each row written once, when done; status shows rows in flight as pending; a relay that dies frees its rows at once, one that stops answering after the lease) or lease (written on each row: status shows them locked, another relay takes them over when the lease runs out; about two thirds of the rows/s) [default: transaction on PostgreSQL (both sources), lease on SQLite]' -r -f -a "lease\t'A lease written on each claimed row'
transaction\t'Row locks in the claim\'s open transaction (PostgreSQL)'"
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l source -d 'How new rows are found: poll (claim them from the table) or wal (PostgreSQL\'s write-ahead log, through a replication slot)' -r -f -a "poll\t'Claim new rows from the table'
wal\t'Learn of new rows from PostgreSQL\'s write-ahead log'"
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l slot -d '--source wal: the logical replication slot to read (created when missing)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l publication -d '--source wal: the publication of the outbox\'s inserts (created when missing)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l poll-interval -d 'Longest idle wait between polls when nothing is due (with --source wal: between scans of the table)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l outage-limit -d 'With --once: give up (exit 1) when the database stays unreachable this long; a running one waits however long' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l metrics-addr -d 'Serve Prometheus metrics on this address, e.g. 127.0.0.1:9898' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l once -d 'Publish what is due, then exit (for jobs and cron)'
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -l standby -d '--source wal: when another relay reads the slot, wait and take over when it stops (instead of refusing to start)'
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand publish" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and not __fish_seen_subcommand_from consume process help" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and not __fish_seen_subcommand_from consume process help" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and not __fish_seen_subcommand_from consume process help" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and not __fish_seen_subcommand_from consume process help" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and not __fish_seen_subcommand_from consume process help" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and not __fish_seen_subcommand_from consume process help" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and not __fish_seen_subcommand_from consume process help" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and not __fish_seen_subcommand_from consume process help" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and not __fish_seen_subcommand_from consume process help" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and not __fish_seen_subcommand_from consume process help" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and not __fish_seen_subcommand_from consume process help" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and not __fish_seen_subcommand_from consume process help" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and not __fish_seen_subcommand_from consume process help" -f -a "consume" -d 'Consume broker messages into the inbox, once per message id and group'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and not __fish_seen_subcommand_from consume process help" -f -a "process" -d 'Run a handler on pending inbox rows (the batch pipeline, like publish)'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and not __fish_seen_subcommand_from consume process help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l from -d 'kafka://HOST:PORT[,HOST:PORT], file:PATH, or - for stdin [default: the broker\'s file, file:omnibox-events.jsonl]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l topic -d 'Kafka topic to consume (repeatable)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l group -l consumer-group -d 'Consumer group: the inbox deduplicates per group (--consumer-group in the commands that select inbox rows by it)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -s X -d 'A librdkafka property for the consumer (repeatable)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l kafka-tls-ca -d 'Kafka over TLS, verifying the brokers with this CA certificate (PEM)' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l kafka-tls-cert -d 'A client certificate for Kafka (PEM; with --kafka-tls-key)' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l kafka-tls-key -d 'The client certificate\'s key (PEM)' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l kafka-sasl-mechanism -d 'SASL authentication with Kafka (password from --kafka-sasl-password-file or OMNIBOX_KAFKA_SASL_PASSWORD)' -r -f -a "PLAIN\t''
SCRAM-SHA-256\t''
SCRAM-SHA-512\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l kafka-sasl-username -d 'The SASL user name' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l kafka-sasl-password-file -d 'A file holding the SASL password (its first line)' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l ack -d 'When offsets are committed' -r -f -a "at-most-once\t''
at-least-once\t''
exactly-once\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l commit-on -d 'at-least-once: commit once stored, or once handled' -r -f -a "persist\t''
success\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l exec -d 'Run this command per event (via sh -c): the event as JSON on stdin, OMNIBOX_* variables; exit 0 completed, 3 skipped, 75 retry later, other failed' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l webhook -d 'POST each event as JSON to this URL: 2xx completed, 409 skipped, 429/502/503/504 retry later (Retry-After honoured), other failed' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l timeout -d 'Longest run of one handler call (a timeout is a failed attempt)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l batch -d 'Messages per database transaction' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l batch-bytes -d 'Bytes per database transaction (values, keys and headers), e.g. 64MiB: a batch ends before the message that would pass it (one message at least, however large); a Kafka source also prefetches at most this much (queued.max.messages.kbytes, unless -X sets it) [default: OMNIBOX_BATCH_BYTES, batch_bytes in omnibox.toml, or 16MiB]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l max-attempts -d 'Counted handler failures of a message before its row is failed (exactly-once)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l transient-limit -d 'A message still failing transiently (exit 75, HTTP 429/502/503/504, no connection) this long after it was first stored is parked as failed' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l lease -d 'How long this consumer\'s locks on rows in hand last if it dies (extended every third of it while it lives; external handlers)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l dlq-topic -d 'Also write poison messages and rows that end up failed to this topic' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l dlq -d 'Also keep poison messages and rows that end up failed as dead letters here' -r -f -a "table\t'The omnibox_dead_letters table (see `omnibox list --table dead-letters`)'"
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l dlq-broker -d 'Where the DLQ topic lives [default: the Kafka source\'s brokers, else file:omnibox-dlq.jsonl]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l worker-id -d 'This consumer\'s id [default: HOST:PID]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l outage-limit -d 'With --once: give up (exit 1) when the database stays unreachable this long; a running one waits however long' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l metrics-addr -d 'Serve Prometheus metrics on this address' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l once -d 'Stop at the end of the input (file) or once caught up with the end of every partition (Kafka; the broker\'s long poll is then cut to 100 ms, fetch.wait.max.ms, unless -X sets it)'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -l follow -d 'File source: keep reading as the file grows'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from consume" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l exec -d 'Run this command per event (via sh -c): the event as JSON on stdin, OMNIBOX_* variables; exit 0 completed, 3 skipped, 75 retry later, other failed' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l webhook -d 'POST each event as JSON to this URL: 2xx completed, 409 skipped, 429/502/503/504 retry later (Retry-After honoured), other failed' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l timeout -d 'Longest run of one handler call (a timeout is a failed attempt)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l circuit-breaker -d 'Pause claiming while downstream (the broker, the handler) does not answer; off keeps claiming at the transient retry\'s pace (no attempt is spent either way)' -r -f -a "on\t'On'
off\t'Off'"
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l circuit-threshold -d 'Consecutive batches downstream did not take before the pause starts' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l circuit-recovery -d 'Longest pause: it starts at 1s and doubles while downstream stays out, up to this (at least 1s)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l batch -d 'Rows per claim' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l batch-bytes -d 'Payload bytes per claim, e.g. 64MiB: a claim stops before the row that would pass it (one row at least, however large) [default: OMNIBOX_BATCH_BYTES, batch_bytes in omnibox.toml, or 16MiB]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l source -d 'Handle only rows from this source (the producing service, or the topic; repeatable)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l event-type -d 'Handle only rows of this event type (repeatable)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l consumer-group -d 'Handle only rows of this consumer group (what `inbox consume --group` stored them under; repeatable)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l concurrency -d 'Handler calls running at once' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l worker-id -d 'This worker\'s id [default: HOST:PID]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l lease -d 'Lease of a claim (extended while handlers run) [default: OMNIBOX_LEASE, lease in omnibox.toml, or 5m]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l dlq-topic -d 'Also write rows that end up failed to this topic' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l dlq -d 'Also keep rows that end up failed as dead letters here (replay them with `omnibox replay --table dead-letters`)' -r -f -a "table\t'The omnibox_dead_letters table (see `omnibox list --table dead-letters`)'"
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l dlq-broker -d 'Where the DLQ topic lives [default: file:omnibox-dlq.jsonl]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l poll-interval -d 'Longest idle wait between polls when nothing is due' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l outage-limit -d 'With --once: give up (exit 1) when the database stays unreachable this long; a running one waits however long' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l metrics-addr -d 'Serve Prometheus metrics on this address' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -l once -d 'Process what is due, then exit'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from process" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from help" -f -a "consume" -d 'Consume broker messages into the inbox, once per message id and group'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from help" -f -a "process" -d 'Run a handler on pending inbox rows (the batch pipeline, like publish)'
complete -c omnibox -n "__fish_omnibox_using_subcommand inbox; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c omnibox -n "__fish_omnibox_using_subcommand demo" -l dir -d 'Directory to work in (must not exist yet) [default: a new directory under the system\'s temp dir]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand demo" -l events -d 'Outbox events to create' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand demo" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand demo" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand demo" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand demo" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand demo" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand demo" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand demo" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand demo" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand demo" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand demo" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand demo" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand demo" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand status" -l max-pending-age -d 'Threshold: age of the oldest pending event' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand status" -l max-failed -d 'Threshold: failed events (per table)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand status" -l max-stale-locks -d 'Threshold: stale locks (per table)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand status" -l stale-after -d 'A lock older than this counts as stale' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand status" -l interval -d 'With --watch: the time between reports' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand status" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand status" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand status" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand status" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand status" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand status" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand status" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand status" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand status" -l check -d 'Exit 1 when a threshold below is crossed'
complete -c omnibox -n "__fish_omnibox_using_subcommand status" -l watch -d 'Refresh every --interval until interrupted, with rates (like top); on a terminal the screen is redrawn, otherwise each report is printed in turn (one JSON object per line with --format json)'
complete -c omnibox -n "__fish_omnibox_using_subcommand status" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand status" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand status" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand status" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -l broker -d 'Check this broker [default: the configured broker (OMNIBOX_BROKER, broker in omnibox.toml)]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -l max-pending-age -d 'Warn when the oldest due pending event is older than this' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -s X -d 'A librdkafka property for the broker check (repeatable)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -l kafka-tls-ca -d 'Kafka over TLS, verifying the brokers with this CA certificate (PEM)' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -l kafka-tls-cert -d 'A client certificate for Kafka (PEM; with --kafka-tls-key)' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -l kafka-tls-key -d 'The client certificate\'s key (PEM)' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -l kafka-sasl-mechanism -d 'SASL authentication with Kafka (password from --kafka-sasl-password-file or OMNIBOX_KAFKA_SASL_PASSWORD)' -r -f -a "PLAIN\t''
SCRAM-SHA-256\t''
SCRAM-SHA-512\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -l kafka-sasl-username -d 'The SASL user name' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -l kafka-sasl-password-file -d 'A file holding the SASL password (its first line)' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand doctor" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -l table -d 'Which table [default: both event tables, or the one a filter belongs to]' -r -f -a "outbox\t''
inbox\t''
dead-letters\t'omnibox_dead_letters (copies of events that failed, kept by --dlq table)'"
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -l status -d 'Only this status: pending, completed or failed' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -l event-type -d 'Only this event type' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -l topic -d 'Only this topic (the outbox; with --table inbox, the source)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -l source -d 'Only this source (the inbox; with --table outbox, the topic)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -l consumer-group -d 'Only inbox rows of this consumer group (the outbox has none)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -l since -d 'Only rows created (dead letters: written) since: RFC 3339 (2026-01-31T12:00:00Z) or a duration ago (2h)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -l limit -d 'Most rows to show' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -l after -d 'Start after this sequence number of one table (paging: pass the last seq shown)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -l locked-by -d 'Only rows locked by this worker (see `omnibox unlock --worker`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand list" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand show" -l table -d 'Look only in this table' -r -f -a "outbox\t''
inbox\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand show" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand show" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand show" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand show" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand show" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand show" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand show" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand show" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand show" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand show" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand show" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand show" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l table -d 'Which table [default: both event tables, or the one a selector belongs to]' -r -f -a "outbox\t''
inbox\t''
dead-letters\t'omnibox_dead_letters (copies of events that failed, kept by --dlq table)'"
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l id -d 'This row (repeatable)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l event-type -d 'Rows of this event type' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l topic -d 'Rows of this topic (the outbox; with --table inbox, the source)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l source -d 'Rows of this source (the inbox; with --table outbox, the topic)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l error-contains -d 'Rows whose last error contains this text' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l consumer-group -d 'Inbox rows of this consumer group (the outbox has none)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l fingerprint -d 'Rows of this failure group: its fingerprint (see omnibox failures)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l group -d 'Not a selector here: --fingerprint or --consumer-group says which' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l since -d 'Rows that failed at or after this time (RFC 3339, or a duration ago such as 2h)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l until -d 'Rows that failed before this time' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l limit -d 'At most this many rows' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l rate -d 'At most this many rows per second' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l reason -d 'Why (recorded in the audit trail)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l actor -d 'Who is acting, for the audit trail [default: the OS user]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l all -d 'Every failed row (explicitly)'
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l pending -d 'Select pending rows waiting for a retry instead of failed ones, and make them due now (attempts and last error stay)'
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -l dry-run -d 'Show what would change, change nothing'
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -s y -l yes -d 'Do not ask for confirmation (needed without a terminal, e.g. in cron)'
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand replay" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand failures" -l table -d 'Which table [default: both]' -r -f -a "outbox\t''
inbox\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand failures" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand failures" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand failures" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand failures" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand failures" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand failures" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand failures" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand failures" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand failures" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand failures" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand failures" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand failures" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand unlock" -l worker -d 'Unlock every event locked by this worker instead' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand unlock" -l reason -d 'Why (1..255 characters; recorded in the audit trail, and in last_error when the row has none)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand unlock" -l table -d 'Which table [default: the one holding the id; both for --worker]' -r -f -a "outbox\t''
inbox\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand unlock" -l actor -d 'Who is acting, for the audit trail [default: the OS user]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand unlock" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand unlock" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand unlock" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand unlock" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand unlock" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand unlock" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand unlock" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand unlock" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand unlock" -l dry-run -d 'Show what would change, change nothing'
complete -c omnibox -n "__fish_omnibox_using_subcommand unlock" -s y -l yes -d 'Do not ask for confirmation (needed without a terminal, e.g. in cron)'
complete -c omnibox -n "__fish_omnibox_using_subcommand unlock" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand unlock" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand unlock" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand unlock" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand release-stale-locks" -l older-than -d 'Locks older than this are stale' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand release-stale-locks" -l table -d 'Only this table [default: both]' -r -f -a "outbox\t''
inbox\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand release-stale-locks" -l batch-size -d 'Rows per statement' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand release-stale-locks" -l actor -d 'Who is acting, for the audit trail [default: the OS user]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand release-stale-locks" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand release-stale-locks" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand release-stale-locks" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand release-stale-locks" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand release-stale-locks" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand release-stale-locks" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand release-stale-locks" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand release-stale-locks" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand release-stale-locks" -l force -d 'Accept a threshold shorter than the lease relays take'
complete -c omnibox -n "__fish_omnibox_using_subcommand release-stale-locks" -l dry-run -d 'Show what would change, change nothing'
complete -c omnibox -n "__fish_omnibox_using_subcommand release-stale-locks" -s y -l yes -d 'Do not ask for confirmation (needed without a terminal, e.g. in cron)'
complete -c omnibox -n "__fish_omnibox_using_subcommand release-stale-locks" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand release-stale-locks" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand release-stale-locks" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand release-stale-locks" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l older-than -d 'Keep completed rows for this long' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l failed-older-than -d 'With --include-failed: keep failed rows for this long' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l table -d 'Only this table [default: both]' -r -f -a "outbox\t''
inbox\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l batch-size -d 'Rows per DELETE statement' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l max-iterations -d 'Statements per table and kind, at most' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l audit-older-than -d 'Keep audit rows (omnibox audit) for this long; older ones are deleted' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l dead-letters-older-than -d 'Keep replayed dead letters (omnibox list --table dead-letters) for this long; open ones are always kept' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l lock-timeout -d 'Partitioned tables: wait this long at most for the table\'s lock to drop a partition (past it the partition stays for the next run)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l actor -d 'Who is acting, for the audit trail [default: the OS user]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l include-failed -d 'Also delete failed rows'
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l force -d 'Allow a retention shorter than an hour (completed rows also hold idempotency keys: deleting them at once lets a retried enqueue in again), and an --audit-older-than shorter than 30 days'
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -l dry-run -d 'Show what would change, change nothing'
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -s y -l yes -d 'Do not ask for confirmation (needed without a terminal, e.g. in cron)'
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand cleanup" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and not __fish_seen_subcommand_from list create help" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and not __fish_seen_subcommand_from list create help" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and not __fish_seen_subcommand_from list create help" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and not __fish_seen_subcommand_from list create help" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and not __fish_seen_subcommand_from list create help" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and not __fish_seen_subcommand_from list create help" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and not __fish_seen_subcommand_from list create help" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and not __fish_seen_subcommand_from list create help" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and not __fish_seen_subcommand_from list create help" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and not __fish_seen_subcommand_from list create help" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and not __fish_seen_subcommand_from list create help" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and not __fish_seen_subcommand_from list create help" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and not __fish_seen_subcommand_from list create help" -f -a "list" -d 'List the partitions (the default)'
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and not __fish_seen_subcommand_from list create help" -f -a "create" -d 'Create the partitions missing from the current one to the partitions kept ahead'
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and not __fish_seen_subcommand_from list create help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from list" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from list" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from list" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from list" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from list" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from list" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from list" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from list" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from list" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from list" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from list" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from create" -l from -d 'Also create the partitions from the one holding this date (UTC: 2026-11-01 or 2026-11-01T13:00:00Z) on, for rows written with an older created_at (an event replayed from its dead letter keeps its own)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from create" -l lock-timeout -d 'Wait this long at most for the table\'s lock (creating a partition locks the table for a moment)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from create" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from create" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from create" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from create" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from create" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from create" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from create" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from create" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from create" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from create" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from create" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from create" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from help" -f -a "list" -d 'List the partitions (the default)'
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from help" -f -a "create" -d 'Create the partitions missing from the current one to the partitions kept ahead'
complete -c omnibox -n "__fish_omnibox_using_subcommand partitions; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c omnibox -n "__fish_omnibox_using_subcommand audit" -l action -d 'Only this action: replay, unlock, unlock-worker, release-stale-locks, cleanup' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand audit" -l since -d 'Only entries since: RFC 3339 or a duration ago (24h)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand audit" -l id -d 'Only entries that touched this event' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand audit" -l limit -d 'Most entries, newest first' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand audit" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand audit" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand audit" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand audit" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand audit" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand audit" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand audit" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand audit" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand audit" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand audit" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand audit" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand audit" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and not __fish_seen_subcommand_from show help" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and not __fish_seen_subcommand_from show help" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and not __fish_seen_subcommand_from show help" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and not __fish_seen_subcommand_from show help" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and not __fish_seen_subcommand_from show help" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and not __fish_seen_subcommand_from show help" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and not __fish_seen_subcommand_from show help" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and not __fish_seen_subcommand_from show help" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and not __fish_seen_subcommand_from show help" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and not __fish_seen_subcommand_from show help" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and not __fish_seen_subcommand_from show help" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and not __fish_seen_subcommand_from show help" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and not __fish_seen_subcommand_from show help" -f -a "show" -d 'Each setting\'s value and where it came from (flag, environment, file, default); secrets masked'
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and not __fish_seen_subcommand_from show help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and __fish_seen_subcommand_from show" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and __fish_seen_subcommand_from show" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and __fish_seen_subcommand_from show" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and __fish_seen_subcommand_from show" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and __fish_seen_subcommand_from show" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and __fish_seen_subcommand_from show" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and __fish_seen_subcommand_from show" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and __fish_seen_subcommand_from show" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and __fish_seen_subcommand_from show" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and __fish_seen_subcommand_from show" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and __fish_seen_subcommand_from show" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and __fish_seen_subcommand_from show" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and __fish_seen_subcommand_from help" -f -a "show" -d 'Each setting\'s value and where it came from (flag, environment, file, default); secrets masked'
complete -c omnibox -n "__fish_omnibox_using_subcommand config; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c omnibox -n "__fish_omnibox_using_subcommand completions" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand completions" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand completions" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand completions" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand completions" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand completions" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand completions" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand completions" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand completions" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand completions" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand completions" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand completions" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand generate" -l out -d 'Where to write completions/ and man/' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand generate" -l database-url -d 'Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB [default: sqlite://omnibox.db]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand generate" -l schema -d 'PostgreSQL schema that holds the tables (created by `migrate`)' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand generate" -l config -d 'Configuration file [default: ./omnibox.toml when present]' -r -F
complete -c omnibox -n "__fish_omnibox_using_subcommand generate" -l format -d 'Output format: table for people, json for scripts [default: table]' -r -f -a "table\t'Human-readable tables'
json\t'One JSON document per command, with a stable, documented shape'"
complete -c omnibox -n "__fish_omnibox_using_subcommand generate" -l color -d 'When to use colour' -r -f -a "auto\t''
always\t''
never\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand generate" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c omnibox -n "__fish_omnibox_using_subcommand generate" -l dedup-window -d 'The inbox\'s deduplication window: inbox rows are kept at least this long (cleanup refuses less), so a message redelivered within it is a duplicate [default: 7d]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand generate" -l otlp-endpoint -d 'Export OpenTelemetry spans with OTLP over HTTP to this collector (base URL; /v1/traces is added) [default: OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set]' -r
complete -c omnibox -n "__fish_omnibox_using_subcommand generate" -s v -l verbose -d 'More logging (-v info, -vv debug, -vvv trace)'
complete -c omnibox -n "__fish_omnibox_using_subcommand generate" -s q -l quiet -d 'Nothing on stdout or stderr unless the command fails (then its report and the error); for cron'
complete -c omnibox -n "__fish_omnibox_using_subcommand generate" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c omnibox -n "__fish_omnibox_using_subcommand generate" -s V -l version -d 'Print version'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "migrate" -d 'Create or upgrade the outbox and inbox tables (idempotent)'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "enqueue" -d 'Insert outbox events: one from flags, or many as JSON lines'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "publish" -d 'Publish due outbox events to the broker (the relay)'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "inbox" -d 'Consume messages into the inbox, and process inbox rows with a handler'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "demo" -d 'Run the whole engine once, in seconds, with no servers'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "status" -d 'Show counts per table and status, locks, the oldest pending event, what is due, failures by event type, stale locks and keys held up by a failure'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "doctor" -d 'Check the database, the claim\'s indexes and plan, statistics, the broker, leases, blocked keys, the backlog, retention and table health'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "list" -d 'List events with filters, oldest first'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "show" -d 'Show one event in full, with its payload as pretty JSON'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "replay" -d 'Put failed events back to pending (attempts reset, error cleared, due now)'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "failures" -d 'Group failed events by event type and error cause'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "unlock" -d 'Force-unlock one event, or every event a dead worker holds'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "release-stale-locks" -d 'Unlock rows whose lock is older than a threshold and whose lease ran out'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "cleanup" -d 'Delete completed rows past their retention, in bounded batches'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "partitions" -d 'List the partitions of the outbox and inbox, or create those missing'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "audit" -d 'Show recorded replays, unlocks, stale-lock releases and cleanups'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "config" -d 'Show the effective settings'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "completions" -d 'Print shell completions'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "generate" -d 'Writes completions/ and man/ under a directory'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and not __fish_seen_subcommand_from migrate enqueue publish inbox demo status doctor list show replay failures unlock release-stale-locks cleanup partitions audit config completions generate help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and __fish_seen_subcommand_from inbox" -f -a "consume" -d 'Consume broker messages into the inbox, once per message id and group'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and __fish_seen_subcommand_from inbox" -f -a "process" -d 'Run a handler on pending inbox rows (the batch pipeline, like publish)'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and __fish_seen_subcommand_from partitions" -f -a "list" -d 'List the partitions (the default)'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and __fish_seen_subcommand_from partitions" -f -a "create" -d 'Create the partitions missing from the current one to the partitions kept ahead'
complete -c omnibox -n "__fish_omnibox_using_subcommand help; and __fish_seen_subcommand_from config" -f -a "show" -d 'Each setting\'s value and where it came from (flag, environment, file, default); secrets masked'
