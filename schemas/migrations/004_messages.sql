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
