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
