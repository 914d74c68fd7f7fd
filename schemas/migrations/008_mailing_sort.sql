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
