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
