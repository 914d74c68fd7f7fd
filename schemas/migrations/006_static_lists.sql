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
