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
