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


def test_a_python_migration_runs_apply_and_a_broken_one_is_a_clear_error(tmp_path):
    """A ``NNN_name.py`` migration (a step SQL cannot make idempotent) runs its ``apply(client)``."""
    import pytest

    from sendtrail.migrate import MigrationError

    (tmp_path / "001_a.sql").write_text("CREATE TABLE IF NOT EXISTS a (x UInt8) ENGINE = Memory;\n")
    (tmp_path / "002_b.py").write_text("def apply(client):\n    client.command('SELECT 2')\n")
    (tmp_path / "003_c.py").write_text("x = 1\n")
    (tmp_path / "004_d.py").write_text("def apply(client):\n    raise ValueError('no table t')\n")
    found = load_migrations(tmp_path)
    assert [m.name for m in found] == ["001_a.sql", "002_b.py", "003_c.py", "004_d.py"]
    assert found[1].statements == [] and found[1].is_python

    class Client:
        commands: list = []

        def command(self, sql):
            self.commands.append(sql)

    client = Client()
    found[0].apply(client)
    found[1].apply(client)
    assert client.commands == ["CREATE TABLE IF NOT EXISTS a (x UInt8) ENGINE = Memory", "SELECT 2"]
    with pytest.raises(MigrationError, match="003_c.py cannot be loaded .*AttributeError"):
        found[2].apply(client)
    with pytest.raises(MigrationError, match="004_d.py: no table t"):
        found[3].apply(client)
    (tmp_path / "5_bad.py").write_text("")
    with pytest.raises(MigrationError, match="NNN_name.sql or NNN_name.py"):
        load_migrations(tmp_path)


def test_split_statements():
    sql = "-- a comment;\nCREATE TABLE a (x UInt8)\nENGINE = Memory;\n\n-- trailing\nSELECT 1;\n-- only a comment\n"
    assert split_statements(sql) == ["-- a comment;\nCREATE TABLE a (x UInt8)\nENGINE = Memory", "-- trailing\nSELECT 1"]
