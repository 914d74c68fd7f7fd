-- >>> 001_automations_contacts.sql
-- Latest-state tables: one row per key survives (ReplacingMergeTree keeps the
-- highest _version). Read them with FINAL or argMax(..., _version).
-- Every table sets non_replicated_deduplication_window so that a retried
-- insert carrying the same insert_deduplication_token is dropped.

CREATE TABLE IF NOT EXISTS automations
(
    automation_id  String,
    name           String,
    description    Nullable(String),
    participation  LowCardinality(String),
    start_at       DateTime64(3, 'UTC'),
    end_at         Nullable(DateTime64(3, 'UTC')),
    published_by   String,
    version        UInt32,
    steps          String COMMENT 'JSON array of {index, name, kind, day}',
    status         LowCardinality(String) COMMENT 'active | paused | archived',
    updated_at     DateTime64(3, 'UTC'),
    _version       UInt64
)
ENGINE = ReplacingMergeTree(_version)
ORDER BY automation_id
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS contacts
(
    contact_id  String,
    user_id     String,
    name        String,
    email       String,
    company     Nullable(String),
    attributes  String COMMENT 'JSON object',
    updated_at  DateTime64(3, 'UTC'),
    _version    UInt64,
    INDEX idx_email email TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree(_version)
ORDER BY contact_id
SETTINGS non_replicated_deduplication_window = 1000;

-- >>> 002_recipients.sql
-- One row per step sent (per message). Rows are immutable once written: every
-- column is fixed by the send fact (first step.sent of the message), so a
-- replay re-inserts identical rows and ReplacingMergeTree folds them.
-- Sort key: (automation_id, sent_time, message_id). The unique key is
-- (automation_id, message_id); sent_time is a function of the message, so
-- adding it in front of message_id keeps the dedup key equivalent while the
-- default recipients page (one automation, by sent_time, LIMIT/OFFSET) reads
-- in order and stops after the page. "Did contact X get step k" and
-- duplicate-send checks use the contact_id bloom filter inside the
-- automation's range.

CREATE TABLE IF NOT EXISTS recipients
(
    recipient_id  String COMMENT 'stable id of the row (derived from automation_id and message_id)',
    automation_id String,
    run           UInt32,
    contact_id    String,
    user_id       String,
    user_name     String,
    email         String,
    step_index    UInt32,
    step_details  String COMMENT 'JSON {day, inactive_days}',
    message_id    String,
    channel       LowCardinality(String),
    mailing_id    String,
    sent_time     DateTime64(3, 'UTC'),
    metadata      String COMMENT 'JSON object',
    _partition    UInt32,
    _offset       UInt64,
    _version      UInt64,
    INDEX idx_contact contact_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_message message_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_step step_index TYPE set(256) GRANULARITY 4
)
ENGINE = ReplacingMergeTree(_version)
ORDER BY (automation_id, sent_time, message_id)
SETTINGS non_replicated_deduplication_window = 1000;

-- >>> 003_enrollments_node_states.sql
-- Current contact status per run, and node state per run and step.
-- Both are latest-state tables (ReplacingMergeTree(_version)).

CREATE TABLE IF NOT EXISTS enrollments
(
    automation_id        String,
    contact_id           String,
    run                  UInt32,
    status               LowCardinality(String),
    reason               Nullable(String),
    current_step         Int32 COMMENT '-1 = no current node (run finished by completed/filtered)',
    name                 String,
    email                String,
    user_id              String,
    enrolled_at          Nullable(DateTime64(3, 'UTC')),
    status_at            DateTime64(3, 'UTC'),
    resume_at            Nullable(DateTime64(3, 'UTC')) COMMENT 'automatic resume time of an active hold',
    updated_at           DateTime64(3, 'UTC'),
    ignored_enrollments  UInt32,
    _version             UInt64,
    INDEX idx_contact contact_id TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_status status TYPE set(32) GRANULARITY 4
)
ENGINE = ReplacingMergeTree(_version)
ORDER BY (automation_id, contact_id, run)
SETTINGS non_replicated_deduplication_window = 1000;

-- state 'none' marks a node the run no longer stands at (written when a
-- contact leaves a waiting/stopped node); readers skip it.
CREATE TABLE IF NOT EXISTS node_states
(
    automation_id  String,
    contact_id     String,
    run            UInt32,
    step_index     UInt32,
    state          LowCardinality(String) COMMENT 'done | waiting | filtered | stopped | none',
    at             DateTime64(3, 'UTC'),
    _version       UInt64,
    INDEX idx_contact contact_id TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = ReplacingMergeTree(_version)
ORDER BY (automation_id, step_index, contact_id, run)
SETTINGS non_replicated_deduplication_window = 1000;

-- >>> 004_messages.sql
-- Message state (flags with their first time, status) and the raw provider
-- events.

CREATE TABLE IF NOT EXISTS messages
(
    message_id        String,
    mailing_id        String COMMENT 'fixed per message; defaults to <automation_id>:<step_index>',
    automation_id     String,
    run               UInt32,
    contact_id        String,
    step_index        UInt32,
    subject           String,
    sending_user      String,
    sending_email     String,
    email             String,
    name              String,
    channel           LowCardinality(String),
    status            LowCardinality(String),
    status_at         DateTime64(3, 'UTC'),
    sent_at           Nullable(DateTime64(3, 'UTC')),
    delivered_at      Nullable(DateTime64(3, 'UTC')),
    deferred_at       Nullable(DateTime64(3, 'UTC')),
    opened_at         Nullable(DateTime64(3, 'UTC')),
    clicked_at        Nullable(DateTime64(3, 'UTC')),
    bounced_at        Nullable(DateTime64(3, 'UTC')),
    dropped_at        Nullable(DateTime64(3, 'UTC')),
    spam_reported_at  Nullable(DateTime64(3, 'UTC')),
    unsubscribed_at   Nullable(DateTime64(3, 'UTC')),
    resubscribed_at   Nullable(DateTime64(3, 'UTC')),
    replied_at        Nullable(DateTime64(3, 'UTC')),
    auto_replied_at   Nullable(DateTime64(3, 'UTC')),
    bounce_class      LowCardinality(Nullable(String)) COMMENT 'hard | block | soft (most severe seen)',
    return_at         Nullable(DateTime64(3, 'UTC')) COMMENT 'return date of the earliest auto-reply',
    opens             UInt32,
    clicks            UInt32,
    updated_at        DateTime64(3, 'UTC'),
    _version          UInt64,
    INDEX idx_automation automation_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_contact contact_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_status status TYPE set(16) GRANULARITY 4
)
ENGINE = ReplacingMergeTree(_version)
ORDER BY (mailing_id, message_id)
SETTINGS non_replicated_deduplication_window = 1000;

-- Raw provider events, one row per event_id (a replayed event is an
-- identical row, folded by ReplacingMergeTree).
CREATE TABLE IF NOT EXISTS message_events
(
    event_id       String,
    message_id     String,
    type           LowCardinality(String),
    occurred_at    DateTime64(3, 'UTC'),
    email          String,
    provider       LowCardinality(String),
    automation_id  Nullable(String),
    contact_id     Nullable(String),
    step_index     Nullable(UInt32),
    bounce_class   LowCardinality(Nullable(String)),
    reason         Nullable(String),
    url            Nullable(String),
    _partition     UInt32,
    _offset        UInt64,
    INDEX idx_automation automation_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_type type TYPE set(32) GRANULARITY 4
)
ENGINE = ReplacingMergeTree
ORDER BY (message_id, event_id)
SETTINGS non_replicated_deduplication_window = 1000;

-- >>> 005_status_changes.sql
-- Every derived change (contact status, node state, message status), as
-- emitted on the status-changes topic. change_id is a stable hash of
-- (event_id, kind, entity, to), and occurred_at is the causing event's time,
-- so a re-emitted change is an identical row.

CREATE TABLE IF NOT EXISTS status_changes
(
    change_id      String,
    kind           LowCardinality(String) COMMENT 'contact_status | node_state | message_status',
    automation_id  String,
    contact_id     String,
    run            UInt32,
    step_index     Nullable(UInt32),
    message_id     Nullable(String),
    from_status    LowCardinality(Nullable(String)),
    to_status      LowCardinality(String),
    reason         Nullable(String),
    event_id       String,
    event_type     LowCardinality(String),
    occurred_at    DateTime64(3, 'UTC'),
    INDEX idx_automation automation_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_message message_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree
ORDER BY (contact_id, occurred_at, change_id)
SETTINGS non_replicated_deduplication_window = 1000;

-- >>> 006_static_lists.sql
-- Static lists: a named, frozen set of contacts taken from a node or the
-- automation's contacts. Written once by the API; ReplacingMergeTree makes a
-- retried creation harmless.

CREATE TABLE IF NOT EXISTS static_lists
(
    list_id        String,
    name           String,
    automation_id  String,
    step_index     Nullable(UInt32),
    state          LowCardinality(Nullable(String)),
    status         LowCardinality(Nullable(String)),
    count          UInt64,
    created_at     DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY list_id
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS static_list_members
(
    list_id     String,
    contact_id  String,
    name        String,
    email       String
)
ENGINE = ReplacingMergeTree
ORDER BY (list_id, contact_id)
SETTINGS non_replicated_deduplication_window = 1000;

-- >>> 007_report_indexes.sql
-- Query support for the report API (issue #5). Nothing here changes what the
-- pipeline writes: one skip index on node_states, and two small derived
-- tables kept by materialized views. Both views store only facts that are
-- idempotent under replays and row versions (min, any, set union), so a
-- replayed or re-versioned row changes nothing: no counter is ever summed
-- from inserted rows. Every statement may run again (interrupted migration).

-- node_states: which granules hold a given state. FINAL queries on a state
-- (health "stuck", node contacts) use it in exact mode
-- (use_skip_indexes_if_final_exact_mode, default since ClickHouse 25.6:
-- granules of other parts with the same key range are read too, so a newer
-- version of a row is never skipped).
ALTER TABLE node_states ADD INDEX IF NOT EXISTS idx_state state TYPE set(8) GRANULARITY 1;

ALTER TABLE node_states MATERIALIZE INDEX idx_state;

-- mailing_info: one row per (mailing, channel, automation, step) with the
-- mailing's descriptive fields and its first send time (the mailings table's
-- "date"). Rows of the same key are folded by merges; read it with GROUP BY
-- (any/min), never by summing. The counters (sent, delivered, opened...) are
-- not here: they come from messages FINAL, for the mailings of the page.
CREATE TABLE IF NOT EXISTS mailing_info
(
    mailing_id     String,
    channel        LowCardinality(String),
    automation_id  String,
    step_index     UInt32,
    subject        SimpleAggregateFunction(any, String),
    sending_user   SimpleAggregateFunction(any, String),
    sending_email  SimpleAggregateFunction(any, String),
    first_sent_at  SimpleAggregateFunction(min, Nullable(DateTime64(3, 'UTC')))
)
ENGINE = AggregatingMergeTree
ORDER BY (mailing_id, channel, automation_id, step_index)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE MATERIALIZED VIEW IF NOT EXISTS mailing_info_mv TO mailing_info AS
SELECT mailing_id, channel, automation_id, step_index,
       any(subject) AS subject, any(sending_user) AS sending_user, any(sending_email) AS sending_email,
       min(sent_at) AS first_sent_at
FROM messages
GROUP BY mailing_id, channel, automation_id, step_index;

-- Backfill (after the view exists, so no insert falls between the two; rows
-- seen by both are folded like any replay).
INSERT INTO mailing_info
SELECT mailing_id, channel, automation_id, step_index,
       any(subject), any(sending_user), any(sending_email), min(sent_at)
FROM messages
GROUP BY mailing_id, channel, automation_id, step_index;

-- send_index: the message ids sent per (automation, contact, run, step), as a
-- set (union on merge). A step sent more than once (health: duplicate sends)
-- is a row with two or more ids once merged, found in the largest part
-- through idx_multi without scanning the automation; keys in the other parts
-- are all read (see sendtrail/api/queries.py). Skip indexes of a part written
-- by an insert are computed on the rows as inserted, before rows of the same
-- key are folded, so idx_multi is trusted only in parts made by a merge.
CREATE TABLE IF NOT EXISTS send_index
(
    automation_id  String,
    contact_id     String,
    run            UInt32,
    step_index     UInt32,
    message_ids    SimpleAggregateFunction(groupUniqArrayArray, Array(String)),
    INDEX idx_multi length(message_ids) TYPE minmax GRANULARITY 1
)
ENGINE = AggregatingMergeTree
ORDER BY (automation_id, contact_id, run, step_index)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE MATERIALIZED VIEW IF NOT EXISTS send_index_mv TO send_index AS
SELECT automation_id, contact_id, run, step_index, [message_id] AS message_ids
FROM recipients;

INSERT INTO send_index
SELECT automation_id, contact_id, run, step_index, [message_id]
FROM recipients;

-- >>> 008_mailing_sort.sql
-- Query support for the report API (issue #5): a mailing's recipients sorted
-- by name or e-mail without sorting all of its messages. Nothing here changes
-- what the pipeline writes.
--
-- mailing_sort: per message two rows, (mailing_id, 'name', name, message_id)
-- and (mailing_id, 'email', email, message_id), kept in sort order. A
-- message's mailing, name and e-mail are fixed by its send (the first
-- step.sent), so every version of a messages row gives the same two rows: a
-- replay or a newer version re-inserts identical rows, which
-- ReplacingMergeTree folds. The view copies rows and sums nothing.
-- /api/v1/mailings/{id}/recipients?sort=name|email (without status or q
-- filter) reads the page's message ids here in order (a few granules), then
-- those messages from messages FINAL by primary key.
CREATE TABLE IF NOT EXISTS mailing_sort
(
    mailing_id  String,
    field       LowCardinality(String) COMMENT 'name | email',
    value       String,
    message_id  String
)
ENGINE = ReplacingMergeTree
ORDER BY (mailing_id, field, value, message_id)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE MATERIALIZED VIEW IF NOT EXISTS mailing_sort_mv TO mailing_sort AS
SELECT mailing_id, f.1 AS field, f.2 AS value, message_id
FROM messages
ARRAY JOIN [('name', name), ('email', email)] AS f;

-- Backfill (after the view exists, so no insert falls between the two; rows
-- seen by both are identical and folded).
INSERT INTO mailing_sort
SELECT mailing_id, f.1, f.2, message_id
FROM messages
ARRAY JOIN [('name', name), ('email', email)] AS f;

-- >>> 009_report_counters.sql
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

-- >>> 010_point_read_storage.py
"""Storage for the report API's point reads (issue #5). Nothing here changes what a query returns.

messages: rebuilt with ``index_granularity = 1024`` and ``min_compress_block_size = 4096``. A
mailing's recipients by name or e-mail read 50 messages by primary key; with 8192-row granules
and 64 KiB blocks that read decompressed ~105 MB for 50 rows. On the 10M-row benchmark table
(benchmarks/queries.py data; min/median): 111/117 ms as it was (6 parts, 265.8 MB on disk), 57/62 ms
on a copy with both settings merged to one part (285.3 MB). These settings only apply when a table is created, so the table
is copied into a new one and swapped in by name (``RENAME``); the two materialized views that read
``messages`` (migrations 007 and 008) are recreated on the new table from their own definitions.

A projection on node_states ordered by waiting time (for the health report) was tried here and
left out: its sorted second copy on every insert and merge took the worker's batch median from
0.39 to 0.69 s and latency p99 from 1.8 to 2.0 s at 2,500 events/s (benchmarks/pipeline.py
--latency-only 2500, with and without it).

Run it while nothing writes ``messages``: the worker migrates before it consumes; with several
workers against a server, run ``sendtrail migrate`` once first (docker-compose does). Every step
looks before it acts, so a run interrupted anywhere is completed by the next one.
"""
from __future__ import annotations

GRANULARITY = 1024
MIN_COMPRESS_BLOCK = 4096
VIEWS = ("mailing_info_mv", "mailing_sort_mv")


def _create_query(client, db: str, name: str) -> str | None:
    rows = client.query(
        "SELECT create_table_query FROM system.tables WHERE database = {db:String} AND name = {t:String}",
        parameters={"db": db, "t": name}).result_rows
    return rows[0][0] if rows else None


def _rebuild_messages(client, db: str) -> None:
    q = f"`{db}`."
    create = _create_query(client, db, "messages")
    if f"index_granularity = {GRANULARITY}," not in create + ",":
        # columns, comments and skip indexes come from messages itself; engine and key as in migration 004
        client.command(f"CREATE TABLE IF NOT EXISTS {q}messages_rebuild AS {q}messages "
                       "ENGINE = ReplacingMergeTree(_version) ORDER BY (mailing_id, message_id) "
                       "SETTINGS non_replicated_deduplication_window = 1000, "
                       f"index_granularity = {GRANULARITY}, min_compress_block_size = {MIN_COMPRESS_BLOCK}")
        client.command(f"TRUNCATE TABLE {q}messages_rebuild")  # a copy an interruption left half-done
        client.command(f"INSERT INTO {q}messages_rebuild SELECT * FROM {q}messages",
                       settings={"async_insert": 0, "insert_deduplicate": 0})
        for view in VIEWS:  # kept under another name: their definitions recreate them below
            if _create_query(client, db, view) and not _create_query(client, db, f"{view}_previous"):
                client.command(f"RENAME TABLE {q}{view} TO {q}{view}_previous")
        client.command(f"RENAME TABLE {q}messages TO {q}messages_previous, {q}messages_rebuild TO {q}messages")
    for view in VIEWS:
        previous = _create_query(client, db, f"{view}_previous")
        if previous is None:
            continue
        if _create_query(client, db, view) is None:
            head = f"CREATE MATERIALIZED VIEW {db}.{view}_previous "
            if not previous.startswith(head):
                raise RuntimeError(f"unexpected definition of {view}_previous: {previous[:80]}")
            client.command(f"CREATE MATERIALIZED VIEW IF NOT EXISTS {q}{view} " + previous[len(head):])
        client.command(f"DROP VIEW IF EXISTS {q}{view}_previous")
    client.command(f"DROP TABLE IF EXISTS {q}messages_previous")


def apply(client) -> None:
    db = client.database
    _rebuild_messages(client, db)

-- >>> 011_repeat_sends.sql
-- repeat_sends: the steps of a run sent more than once (issue #5, health
-- "duplicate sends"), written by the worker (streams/engine/enrollment.py,
-- Result.repeats). When a message is registered while other messages of the
-- run have its step, the row holds its id and theirs; when a message's step
-- changes (an earlier report of it said another step), the old and the new
-- step get a row with verify = 1 and no ids, and health reads the ids of such
-- a key from send_index. Health reads this table only: its cost follows the
-- automation's duplicates, not its sends. Ids are united and verify is a max,
-- so replays and repeated rows change nothing.

CREATE TABLE IF NOT EXISTS repeat_sends
(
    automation_id  String,
    contact_id     String,
    run            UInt32,
    step_index     UInt32,
    message_ids    SimpleAggregateFunction(groupUniqArrayArray, Array(String)),
    verify         SimpleAggregateFunction(max, UInt8) COMMENT '1: read the ids of this key from send_index'
)
ENGINE = AggregatingMergeTree
ORDER BY (automation_id, contact_id, run, step_index)
SETTINGS non_replicated_deduplication_window = 1000;

-- Backfill: the duplicates already sent, with their ids (once; an interrupted
-- run inserts the same rows again, which the union folds).
INSERT INTO repeat_sends
SELECT automation_id, contact_id, run, step_index, groupUniqArrayArray(message_ids), 0
FROM send_index
GROUP BY automation_id, contact_id, run, step_index
HAVING length(groupUniqArrayArray(message_ids)) > 1;

-- send_index's skip index served the former way of finding duplicates (every
-- key outside the largest part was a candidate); nothing reads it any more.
ALTER TABLE send_index DROP INDEX IF EXISTS idx_multi;

-- >>> 012_node_waits.sql
-- node_waits: the waits of nodes (issue #5, health "stuck"), in the order
-- health lists them: by automation, then by start. A node_states row in state
-- 'waiting' is a wait that started at its `at`. The worker writes the waits
-- (streams/engine/enrollment.py, Result.waits): a node that starts waiting
-- opens one (closed = 0); a node that stops waiting writes the same key at a
-- later version with closed = 1, so FINAL drops it. A row with since = 0 is a
-- node's reset: it removes that node's waits of lower versions. The worker
-- writes one when the waits a node had are not known (a state of an earlier
-- layout; after a crash, every node it re-emits, with its current wait again).
-- Health reads the open waits older than its cutoff from here, in order,
-- instead of merging every waiting node_states row of the automation. Closed
-- waits and resets are removed by OPTIMIZE ... FINAL CLEANUP, which the worker
-- runs from time to time (sendtrail/maintenance.py).

CREATE TABLE IF NOT EXISTS node_waits
(
    automation_id  String,
    since          DateTime64(3, 'UTC') COMMENT 'start of the wait (node_states.at); 0: a reset row',
    contact_id     String,
    run            UInt32,
    step_index     UInt32,
    closed         UInt8 COMMENT '1: the wait ended',
    _version       UInt64
)
ENGINE = ReplacingMergeTree(_version, closed)
ORDER BY (automation_id, since, contact_id, run, step_index)
SETTINGS non_replicated_deduplication_window = 1000, allow_experimental_replacing_merge_with_cleanup = 1;

-- Backfill: the waits of the nodes waiting now (an interrupted run inserts the
-- same rows again, which FINAL folds).
INSERT INTO node_waits
SELECT automation_id, at, contact_id, run, step_index, 0, _version
FROM node_states FINAL
WHERE state = 'waiting';
