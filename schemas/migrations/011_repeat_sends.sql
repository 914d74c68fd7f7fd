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
