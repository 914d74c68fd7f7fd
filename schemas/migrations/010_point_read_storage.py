"""Storage for the report API's point reads (issue #5). Nothing here changes what a query returns.

messages: rebuilt with ``index_granularity = 1024`` and ``min_compress_block_size = 4096``. A
mailing's recipients by name or e-mail read 50 messages by primary key; with 8192-row granules
and 64 KiB blocks that read decompressed ~105 MB for 50 rows. On a copy of the 10M-row benchmark
table merged to one part (benchmarks/queries.py data): 111/117 ms (min/median) before, 57/62 ms
after, 265.8 vs 285.3 MB on disk. These settings only apply when a table is created, so the table
is copied into a new one and swapped in by name (``RENAME``); the two materialized views that read
``messages`` (migrations 007 and 008) are recreated on the new table from their own definitions.

node_states: a projection ordered by (automation_id, state, at, ...) so that the health report's
"waiting longest" candidates are read in order from a few granules instead of scanning every
row of the automation (42 -> 11 ms on the 10M-row benchmark). Merges rebuild it
(``deduplicate_merge_projection_mode = 'rebuild'``), so it holds exactly the rows of its part.

Run it while nothing writes ``messages``: the worker migrates before it consumes; with several
workers against a server, run ``sendtrail migrate`` once first (docker-compose does). Every step
looks before it acts, so a run interrupted anywhere is completed by the next one.
"""
from __future__ import annotations

import re

GRANULARITY = 1024
MIN_COMPRESS_BLOCK = 4096
VIEWS = ("mailing_info_mv", "mailing_sort_mv")
PROJECTION = ("PROJECTION by_wait (SELECT * ORDER BY automation_id, state, at, step_index, contact_id, run)")


def _create_query(client, db: str, name: str) -> str | None:
    rows = client.query(
        "SELECT create_table_query FROM system.tables WHERE database = {db:String} AND name = {t:String}",
        parameters={"db": db, "t": name}).result_rows
    return rows[0][0] if rows else None


def _with_settings(create: str, name: str, new_name: str, settings: dict) -> str:
    """``create`` (a ``create_table_query``) for ``new_name``, with ``settings`` set in its SETTINGS clause."""
    head = f"CREATE TABLE {name} "
    if not create.startswith(head):
        raise RuntimeError(f"unexpected definition of {name}: {create[:80]}")
    match = re.search(r" SETTINGS (.*)$", create, re.S)
    body = create[len(head):match.start() if match else len(create)]
    kept = {}
    for item in (match.group(1).split(", ") if match else []):
        key, _, value = item.partition(" = ")
        kept[key.strip()] = value.strip()
    kept.update({k: str(v) for k, v in settings.items()})
    return f"CREATE TABLE IF NOT EXISTS {new_name} {body} SETTINGS " + ", ".join(f"{k} = {v}" for k, v in kept.items())


def _rebuild_messages(client, db: str) -> None:
    q = f"`{db}`."
    create = _create_query(client, db, "messages")
    if f"index_granularity = {GRANULARITY}," not in create + ",":
        client.command(_with_settings(create, f"{db}.messages", f"{q}messages_rebuild",
                                      {"index_granularity": GRANULARITY,
                                       "min_compress_block_size": MIN_COMPRESS_BLOCK}))
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


def _project_node_states(client, db: str) -> None:
    t = f"`{db}`.node_states"
    client.command(f"ALTER TABLE {t} MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild'")
    if "PROJECTION by_wait" not in _create_query(client, db, "node_states"):
        client.command(f"ALTER TABLE {t} ADD {PROJECTION}")
    without = client.query(
        "SELECT count() FROM system.parts WHERE database = {db:String} AND table = 'node_states' AND active "
        "AND NOT has(projections, 'by_wait')", parameters={"db": db}).result_rows[0][0]
    if without:  # parts written before the projection existed
        client.command(f"ALTER TABLE {t} MATERIALIZE PROJECTION by_wait", settings={"mutations_sync": 2})


def apply(client) -> None:
    db = client.database
    _rebuild_messages(client, db)
    _project_node_states(client, db)
