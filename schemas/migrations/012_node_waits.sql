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
