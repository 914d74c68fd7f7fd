-- Exact report counters kept by the worker (issue #5; streams/counters.py):
-- one latest-state row per (key, source partition). Every message and
-- enrollment key keeps in its own state what it last counted; the rows it
-- emits are compared with that, and the differences go to its partition's
-- totals, which the worker writes here at a version later than any earlier
-- owner of the partition wrote (after an unclean stop the partition is
-- recounted from its keys first). Read with FINAL and sum over partitions:
-- a key belongs to exactly one partition, so nothing is counted twice. No
-- materialized view: ClickHouse never sums inserted rows.
--
-- The API uses a counters table only while counter_coverage says that every
-- partition is counted (sendtrail/api/queries.py); until then, and for
-- period-filtered reports, it counts the latest state.

CREATE TABLE IF NOT EXISTS mailing_counters
(
    mailing_id     String,
    channel        LowCardinality(String),
    automation_id  String,
    step_index     UInt32,
    partition      UInt32 COMMENT 'partition of the messages (provider-events) topic',
    total_sent     UInt64,
    delivered      UInt64,
    opened         UInt64,
    clicked        UInt64,
    bounced        UInt64,
    dropped        UInt64,
    deferred       UInt64,
    spam_reports   UInt64,
    unsubscribed   UInt64,
    _version       UInt64
)
ENGINE = ReplacingMergeTree(_version)
ORDER BY (mailing_id, channel, automation_id, step_index, partition)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS node_counters
(
    automation_id  String,
    step_index     UInt32,
    partition      UInt32 COMMENT 'partition of the contacts (enrollments) topic',
    done           UInt64,
    waiting        UInt64,
    filtered       UInt64,
    stopped        UInt64,
    _version       UInt64
)
ENGINE = ReplacingMergeTree(_version)
ORDER BY (automation_id, step_index, partition)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS status_counters
(
    automation_id        String,
    status               LowCardinality(String),
    partition            UInt32 COMMENT 'partition of the contacts (enrollments) topic',
    runs                 UInt64,
    contacts             UInt64 COMMENT 'runs numbered 0: one per contact',
    ignored_enrollments  UInt64,
    completed            UInt64,
    in_progress          UInt64,
    not_started          UInt64,
    left_runs            UInt64 COMMENT 'the report completion class "left"',
    _version             UInt64
)
ENGINE = ReplacingMergeTree(_version)
ORDER BY (automation_id, status, partition)
SETTINGS non_replicated_deduplication_window = 1000;

-- counters = mailing_counters | node_counters | status_counters: that table
-- counts every key of `partition` (of `partitions`), written once the
-- partition's counters started from an empty state or were rebuilt from the
-- partition's whole state.
CREATE TABLE IF NOT EXISTS counter_coverage
(
    counters    LowCardinality(String),
    partition   UInt32,
    partitions  UInt32,
    _version    UInt64
)
ENGINE = ReplacingMergeTree(_version)
ORDER BY (counters, partition)
SETTINGS non_replicated_deduplication_window = 1000;
