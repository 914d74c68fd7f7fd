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
