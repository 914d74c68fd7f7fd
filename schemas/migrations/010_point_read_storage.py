"""Storage for the report API's point reads (issue #5). Nothing here changes what a query returns.

messages: rebuilt with ``index_granularity = 1024`` and ``min_compress_block_size = 4096``. A
mailing's recipients by name or e-mail read 50 messages by primary key; with 8192-row granules
and 64 KiB blocks that read decompressed ~105 MB for 50 rows. On the 10M-row benchmark table
(benchmarks/queries.py data; min/median): 111/117 ms as it was (6 parts, 265.8 MB on disk), 57/62 ms
on a copy with both settings merged to one part (285.3 MB). These settings only apply when a table is created, so the table
is copied into a new one and swapped in by name (``RENAME``); the two materialized views that read
``messages`` (migrations 007 and 008) are recreated on the new table from their own definitions.

A projection on node_states ordered by waiting time (for the health report) was tried here and
left out: its sorted second copy on every insert and merge took the worker's batch median from
0.39 to 0.69 s and latency p99 from 1.8 to 2.0 s at 2,500 events/s (benchmarks/pipeline.py
--latency-only 2500, with and without it).

Run it while nothing writes ``messages``: the worker migrates before it consumes; with several
workers against a server, run ``sendtrail migrate`` once first (docker-compose does). Every step
looks before it acts, so a run interrupted anywhere is completed by the next one.
"""
from __future__ import annotations

GRANULARITY = 1024
MIN_COMPRESS_BLOCK = 4096
VIEWS = ("mailing_info_mv", "mailing_sort_mv")


def _create_query(client, db: str, name: str) -> str | None:
    rows = client.query(
        "SELECT create_table_query FROM system.tables WHERE database = {db:String} AND name = {t:String}",
        parameters={"db": db, "t": name}).result_rows
    return rows[0][0] if rows else None


def _rebuild_messages(client, db: str) -> None:
    q = f"`{db}`."
    create = _create_query(client, db, "messages")
    if f"index_granularity = {GRANULARITY}," not in create + ",":
        # columns, comments and skip indexes come from messages itself; engine and key as in migration 004
        client.command(f"CREATE TABLE IF NOT EXISTS {q}messages_rebuild AS {q}messages "
                       "ENGINE = ReplacingMergeTree(_version) ORDER BY (mailing_id, message_id) "
                       "SETTINGS non_replicated_deduplication_window = 1000, "
                       f"index_granularity = {GRANULARITY}, min_compress_block_size = {MIN_COMPRESS_BLOCK}")
        client.command(f"TRUNCATE TABLE {q}messages_rebuild")  # a copy an interruption left half-done
        client.command(f"INSERT INTO {q}messages_rebuild SELECT * FROM {q}messages",
                       settings={"async_insert": 0, "insert_deduplicate": 0})
        for view in VIEWS:  # kept under another name: their definitions recreate them below
            if _create_query(client, db, view) and not _create_query(client, db, f"{view}_previous"):
                client.command(f"RENAME TABLE {q}{view} TO {q}{view}_previous")
        client.command(f"RENAME TABLE {q}messages TO {q}messages_previous, {q}messages_rebuild TO {q}messages")
    for view in VIEWS:
        previous = _create_query(client, db, f"{view}_previous")
        if previous is None:
            continue
        if _create_query(client, db, view) is None:
            head = f"CREATE MATERIALIZED VIEW {db}.{view}_previous "
            if not previous.startswith(head):
                raise RuntimeError(f"unexpected definition of {view}_previous: {previous[:80]}")
            client.command(f"CREATE MATERIALIZED VIEW IF NOT EXISTS {q}{view} " + previous[len(head):])
        client.command(f"DROP VIEW IF EXISTS {q}{view}_previous")
    client.command(f"DROP TABLE IF EXISTS {q}messages_previous")


def apply(client) -> None:
    db = client.database
    _rebuild_messages(client, db)
