"""Housekeeping a worker runs on ClickHouse from time to time (not per batch).

``node_waits`` (migration 012) keeps, besides the open waits that health reads, the waits closed
since the last cleanup and the nodes' reset rows: merges keep a closed row (the last version of its
key), so without a cleanup the table would grow with every wait that ever ended, and health would
read them all before the oldest open one.
"""
from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

_ZERO = "toDateTime64(0, 3, 'UTC')"


def clean_waits(client: Any, database: str | None = None) -> dict:
    """Remove the closed waits and the reset rows of ``node_waits``; what health lists does not change.

    1. A reset removes its node's waits of lower versions: each of them, and the reset itself, gets a
       closed row at the reset's version (one read of the table gives both, so a reset written
       meanwhile, at a higher version, stays);
    2. ``OPTIMIZE ... FINAL CLEANUP`` then drops every key whose last row is closed.

    A wait closed by the cleanup cannot come back: the worker writes a wait's close after its open
    (a replay writes both again), and re-opens a node's current wait with a reset.
    Returns the seconds each step took.
    """
    table = f"`{database}`.node_waits" if database else "node_waits"
    started = time.monotonic()
    client.command(
        f"INSERT INTO {table} (automation_id, since, contact_id, run, step_index, closed, _version) "
        "SELECT automation_id, w.1, contact_id, run, step_index, 1, reset FROM ("
        f"SELECT automation_id, contact_id, run, step_index, maxIf(_version, since = {_ZERO}) AS reset, "
        f"groupArray((since, _version)) AS waits FROM {table} FINAL "
        "WHERE (automation_id, contact_id, run, step_index) IN ("
        f"SELECT automation_id, contact_id, run, step_index FROM {table} WHERE since = {_ZERO}) "
        "GROUP BY automation_id, contact_id, run, step_index HAVING reset > 0) "
        f"ARRAY JOIN arrayFilter(x -> x.1 = {_ZERO} OR x.2 < reset, waits) AS w",
        settings={"async_insert": 0})
    resets = time.monotonic()
    client.command(f"OPTIMIZE TABLE {table} FINAL CLEANUP")
    done = time.monotonic()
    out = {"resets_seconds": round(resets - started, 3), "optimize_seconds": round(done - resets, 3)}
    log.info("node_waits cleaned: %s", out)
    return out
