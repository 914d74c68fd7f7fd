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
