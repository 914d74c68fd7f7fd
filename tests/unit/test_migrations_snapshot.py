"""The migrations, concatenated, equal the committed snapshot.

A changed snapshot is a schema change for analysts and for already-migrated
installations (an applied migration must never change: add a new numbered
file). Regenerate after adding a migration with::

    UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest -q tests/unit/test_migrations_snapshot.py
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from sendtrail.clickhouse import TABLE_COLUMNS
from sendtrail.migrate import ddl_snapshot, load_migrations, split_statements

SNAPSHOT = Path(__file__).parent / "snapshots" / "ddl.sql"


def test_ddl_matches_snapshot():
    current = ddl_snapshot()
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(current, encoding="utf-8")
    assert SNAPSHOT.exists(), f"no snapshot at {SNAPSHOT}; run with UPDATE_SNAPSHOTS=1"
    expected = SNAPSHOT.read_text(encoding="utf-8")
    assert current == expected, (
        "the migrations differ from tests/unit/snapshots/ddl.sql; if the change is intended "
        "(a new migration file, never an edit of an applied one) regenerate with UPDATE_SNAPSHOTS=1"
    )


def test_migration_files_are_numbered_and_idempotent():
    migrations = load_migrations()
    assert [m.name[:3] for m in migrations] == [f"{i:03d}" for i in range(1, len(migrations) + 1)]
    for m in migrations:
        for stmt in m.statements:
            if stmt.upper().startswith("CREATE"):
                assert "IF NOT EXISTS" in stmt.upper(), f"{m.name}: {stmt[:60]}"


# Tables that only materialized views write (migrations 007, 008): no sink row layout in TABLE_COLUMNS.
DERIVED_TABLES = {
    "mailing_info": ("mailing_id", "channel", "automation_id", "step_index", "subject", "sending_user",
                     "sending_email", "first_sent_at"),
    "send_index": ("automation_id", "contact_id", "run", "step_index", "message_ids"),
    "mailing_sort": ("mailing_id", "field", "value", "message_id"),  # migration 008
}


def test_every_table_has_a_dedup_window_and_the_declared_columns():
    created = {}
    for m in load_migrations():
        for stmt in m.statements:
            match = re.search(r"CREATE TABLE IF NOT EXISTS (\w+)\s*\((.*)\)\s*ENGINE", stmt, re.S)
            if not match:
                continue
            assert "non_replicated_deduplication_window" in stmt, match.group(1)
            cols = []
            for line in match.group(2).splitlines():
                line = line.strip()
                if line and not line.startswith(("INDEX", "PROJECTION", "--")):
                    cols.append(line.split()[0])
            created[match.group(1)] = tuple(cols)
    assert created == {**TABLE_COLUMNS, **DERIVED_TABLES}
    assert not set(DERIVED_TABLES) & set(TABLE_COLUMNS)


def test_derived_tables_are_fed_by_views_that_sum_nothing():
    """A view that summed or counted inserted rows would count a replayed row or a row version twice."""
    code = ["\n".join(ln for ln in stmt.splitlines() if not ln.strip().startswith("--"))
            for m in load_migrations() for stmt in m.statements]
    views = [c for c in code if c.upper().startswith("CREATE MATERIALIZED VIEW")]
    assert {re.search(r"\bTO\s+(\w+)", v).group(1) for v in views} == set(DERIVED_TABLES)
    for v in views:
        assert not re.search(r"\b(sum|count|avg|uniq)\w*\s*\(", v, re.I), v


def test_split_statements():
    sql = "-- a comment;\nCREATE TABLE a (x UInt8)\nENGINE = Memory;\n\n-- trailing\nSELECT 1;\n-- only a comment\n"
    assert split_statements(sql) == ["-- a comment;\nCREATE TABLE a (x UInt8)\nENGINE = Memory", "-- trailing\nSELECT 1"]
