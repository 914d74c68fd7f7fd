"""Migrations and the sink against the real embedded engine (chDB, in-process).

chDB hosts one data path per process: every client opened here is closed at
module teardown so other modules can open their own path.
"""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time

import pytest

from agents.sink import BatchWriter
from sendtrail.clickhouse import TABLE_COLUMNS, chdb_path, connect, insert
from sendtrail.migrate import MigrationError, migrate, migrations_dir
from streams.counters import coverage_row, mailing_counter_row, node_counter_row, status_counter_row

log = logging.getLogger(__name__)

SPEC_TABLES = {
    "automations", "contacts", "recipients", "enrollments", "node_states", "messages",
    "message_events", "status_changes", "static_lists", "static_list_members",
}
T0 = 1_760_000_000_000  # ms


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    path = tmp_path_factory.mktemp("chdb") / "clickhouse"
    url = f"chdb://{path}"
    client = connect(url)
    first = migrate(client)
    clients = [client]

    def new_client():
        c = connect(url)
        clients.append(c)
        return c

    yield {"url": url, "client": client, "first": first, "new_client": new_client}
    for c in clients:
        c.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_migrate_creates_every_table_and_is_idempotent(env):
    client = env["client"]
    assert env["first"] == sorted(p.name for p in migrations_dir().iterdir() if p.suffix in (".sql", ".py"))
    tables = {r[0] for r in client.query(
        "SELECT name FROM system.tables WHERE database = {db:String}", parameters={"db": "sendtrail"}
    ).result_rows}
    assert SPEC_TABLES | {"schema_migrations"} <= tables
    for table, columns in TABLE_COLUMNS.items():
        got = tuple(r[0] for r in client.query(
            "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String} ORDER BY position",
            parameters={"db": "sendtrail", "t": table},
        ).result_rows)
        assert got == columns, table
    assert migrate(client) == []
    assert migrate(env["new_client"]()) == []
    recorded = client.query("SELECT count() FROM sendtrail.schema_migrations FINAL").result_rows[0][0]
    assert recorded == len(env["first"])


def test_changed_migration_is_refused(env, tmp_path):
    folder = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), folder)
    client = env["client"]
    assert len(migrate(client, "sendtrail_changed", directory=folder)) == len(env["first"])
    first = sorted(folder.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationError, match="must not change"):
        migrate(client, "sendtrail_changed", directory=folder)
    client.command("DROP DATABASE sendtrail_changed")
    client.database = "sendtrail"


def test_second_path_in_the_same_process_is_a_clear_error(env, tmp_path):
    with pytest.raises(Exception, match="one data path per process"):
        connect(f"chdb://{tmp_path / 'other'}")


def test_chdb_path_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert chdb_path("chdb://./data/clickhouse") == (tmp_path / "data" / "clickhouse").resolve()
    assert chdb_path("chdb://data/clickhouse/") == (tmp_path / "data" / "clickhouse").resolve()
    assert chdb_path(f"chdb://{tmp_path}/x") == (tmp_path / "x").resolve()


def test_parameters_are_bound_server_side(env):
    nasty = "x' OR 1=1 --"
    rows = env["client"].query(
        "SELECT count() FROM recipients WHERE automation_id = {a:String}", parameters={"a": nasty}
    ).result_rows
    assert rows == [(0,)]


def recipient(i: int, automation: str = "a-sink", version: int = 1) -> tuple:
    return (
        f"{automation}:m{i}", automation, 0, f"c{i % 50}", "u1", "Ann", f"c{i % 50}@example.com",
        i % 3, json.dumps({"day": i % 3, "inactive_days": 0}), f"m{i}", "email", f"{automation}:{i % 3}",
        T0 + i, "{}", 0, i, version,
    )


def snapshot(client, automation: str):
    return client.query(
        "SELECT * FROM recipients FINAL WHERE automation_id = {a:String} ORDER BY sent_time, message_id",
        parameters={"a": automation},
    ).result_rows


def test_batch_writer_rows_reach_chdb_and_a_replay_changes_nothing(env):
    client = env["client"]
    rows = [recipient(i) for i in range(5000)]
    flushes = []

    async def write(batch_rows, max_rows, prefix):
        w = BatchWriter(env["new_client"], max_rows=max_rows, max_seconds=0.2, max_backlog_rows=100_000,
                        retry_max_seconds=1, metrics={"on_flush": lambda t, n, s: flushes.append((t, n, s))})
        started = time.monotonic()
        for i in range(0, len(batch_rows), 100):
            await w.write("recipients", batch_rows[i:i + 100], f"{prefix}:sends:0:{i}")
        await w.flush()
        elapsed = time.monotonic() - started
        await w.close()
        return elapsed

    elapsed = run(write(rows, 1000, "a"))
    log.warning("BatchWriter: 5000 recipient rows in %.3fs, inserts: %s", elapsed,
                [(n, round(s, 4)) for _, n, s in flushes])
    before = snapshot(client, "a-sink")
    assert len(before) == 5000
    # replay the same range with different batching (as after a crash)
    run(write(rows, 700, "b"))
    assert snapshot(client, "a-sink") == before
    # a retried insert (same token) is dropped by ClickHouse even without FINAL
    raw = client.query("SELECT count() FROM recipients WHERE automation_id = 'a-sink'").result_rows[0][0]
    insert(client, "recipients", rows[:100], dedup_token=f"{'a'}-retry")
    insert(client, "recipients", rows[:100], dedup_token=f"{'a'}-retry")
    raw2 = client.query("SELECT count() FROM recipients WHERE automation_id = 'a-sink'").result_rows[0][0]
    assert raw2 == raw + 100
    assert snapshot(client, "a-sink") == before


def test_latest_state_read_returns_the_highest_version(env):
    client = env["client"]

    def enrollment(status, version):
        return {
            "automation_id": "a-rmt", "contact_id": "c1", "run": 0, "status": status, "reason": None,
            "current_step": 1, "name": "Ann", "email": "ann@example.com", "user_id": "u1",
            "enrolled_at": T0, "status_at": T0 + version, "updated_at": T0 + version,
            "ignored_enrollments": 0, "_version": version,
        }

    for status, version in (("ready", 1), ("paused", 3), ("in_progress", 2)):
        insert(client, "enrollments", [enrollment(status, version)], dedup_token=f"rmt-{version}")
    final = client.query(
        "SELECT status, _version FROM enrollments FINAL WHERE automation_id = {a:String}", parameters={"a": "a-rmt"}
    ).result_rows
    assert final == [("paused", 3)]
    arg = client.query(
        "SELECT argMax(status, _version), max(_version) FROM enrollments "
        "WHERE automation_id = {a:String} GROUP BY contact_id, run", parameters={"a": "a-rmt"}
    ).result_rows
    assert arg == [("paused", 3)]
    client.command("OPTIMIZE TABLE enrollments FINAL")
    raw = client.query(
        "SELECT status FROM enrollments WHERE automation_id = {a:String}", parameters={"a": "a-rmt"}
    ).result_rows
    assert raw == [("paused",)]


def test_every_table_accepts_a_row(env):
    """One row per table through the sink: the column order and types fit."""
    samples = {
        "automations": ("a1", "Welcome", None, "once", T0, None, "bob", 1,
                        json.dumps([{"index": 0, "name": "hi", "kind": "email", "day": 0}]), "active", T0, 1),
        "contacts": ("c1", "u1", "Ann", "ann@example.com", None, "{}", T0, 1),
        "recipients": recipient(1, "a1"),
        "enrollments": ("a1", "c1", 0, "in_progress", None, 1, "Ann", "ann@example.com", "u1", T0, T0, None,
                        T0, 0, 1),
        "node_states": ("a1", "c1", 0, 0, "done", T0, 1),
        "messages": ("m1", "a1:0", "a1", 0, "c1", 0, "Hi", "bob", "bob@x.com", "ann@example.com", "Ann", "email",
                     "opened", T0 + 2, T0, T0 + 1, None, T0 + 2, None, None, None, None, None, None, None, None,
                     None, None, 1, 0, T0 + 2, 3),
        "message_events": ("e1", "m1", "message.opened", T0 + 2, "ann@example.com", "sendgrid", "a1", "c1", 0,
                           None, None, None, 0, 1),
        "status_changes": ("ch1", "message_status", "a1", "c1", 0, 0, "m1", "delivered", "opened", None, "e1",
                           "message.opened", T0 + 2),
        "repeat_sends": ("a1", "c1", 0, 0, ["m1", "m2"], 0),
        "node_waits": ("a1", T0, "c1", 0, 1, 0, 1),
        "static_lists": ("l1", "done at 0", "a1", 0, "done", None, 1, T0),
        "static_list_members": ("l1", "c1", "Ann", "ann@example.com"),
        "mailing_counters": mailing_counter_row(("a1:0", "email", "a1", 0), 0, [3, 2, 1, 1, 0, 0, 0, 0, 0], 1),
        "node_counters": node_counter_row(("a1", 0), 0, [1, 2, 0, 0], 1),
        "status_counters": status_counter_row(("a1", "in_progress"), 0, [2, 2, 0, 0, 2, 0, 0], 1),
        "counter_coverage": coverage_row("node_counters", 0, 4, 1),
    }
    assert set(samples) == set(TABLE_COLUMNS)

    async def main():
        w = BatchWriter(env["client"], max_rows=100, max_seconds=0.1, max_backlog_rows=1000, retry_max_seconds=0.1)
        for table, row in samples.items():
            await w.write(table, [row], f"sample:{table}")
        await w.flush()
        await w.close()

    run(main())
    for table in samples:
        n = env["client"].query(f"SELECT count() FROM {table} FINAL").result_rows[0][0]
        assert n >= 1, table


# ---------------------------------------------------------------- migration 010 (a table rebuild)

class _CrashAt:
    """A client that fails its ``at``-th command (an interruption at that point of a migration)."""

    def __init__(self, client, at: int):
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "_left", at)

    def __getattr__(self, name):
        return getattr(self._client, name)

    def __setattr__(self, name, value):
        setattr(self._client, name, value)

    def command(self, *args, **kwargs):
        left = self._left - 1
        object.__setattr__(self, "_left", left)
        if left == 0:
            raise RuntimeError("interrupted")
        return self._client.command(*args, **kwargs)


def _message_rows(n: int, start: int = 0) -> list[dict]:
    return [{
        "message_id": f"m{i}", "mailing_id": f"a1:{i % 3}", "automation_id": "a1", "run": 0,
        "contact_id": f"c{i}", "step_index": i % 3, "subject": "Hi", "sending_user": "u", "sending_email": "u@x",
        "email": f"c{i}@example.com", "name": f"Name {i % 97}", "channel": "email", "status": "delivered",
        "status_at": T0 + i, "sent_at": T0 + i, "delivered_at": T0 + i + 5, "opens": 0, "clicks": 0,
        "updated_at": T0 + i, "_version": 1,
    } for i in range(start, start + n)]


def _state(client, db: str) -> dict:
    q = client.query
    return {
        "messages": q(f"SELECT * FROM `{db}`.messages FINAL ORDER BY message_id").result_rows,
        "mailing_sort": q(f"SELECT * FROM `{db}`.mailing_sort FINAL ORDER BY ALL").result_rows,
        "mailing_info": q(f"SELECT * FROM `{db}`.mailing_info FINAL ORDER BY ALL").result_rows,
        "tables": sorted(r[0] for r in q("SELECT name FROM system.tables WHERE database = {db:String}",
                                         parameters={"db": db}).result_rows),
    }


def _migrations_before(tmp_path, number: str):
    """A folder with the migrations numbered below ``number``."""
    folder = tmp_path / f"before_{number}"
    folder.mkdir()
    for path in migrations_dir().iterdir():
        if path.name < number and path.suffix in (".sql", ".py"):
            shutil.copy(path, folder / path.name)
    return folder


# command 1 of a migrate() run creates schema_migrations; 010 issues 11; the last one records it
@pytest.mark.parametrize("crash_at", [None, *range(2, 14)])
def test_migration_010_rebuilds_messages_and_survives_an_interruption_anywhere(env, tmp_path, crash_at):
    """Data written before 010 stays; the views on messages keep feeding their tables afterwards; a run
    interrupted at any of its commands is completed by the next run."""
    client, db = env["client"], "sendtrail_m010"
    before, folder = _migrations_before(tmp_path, "010"), _migrations_before(tmp_path, "011")
    client.command(f"DROP DATABASE IF EXISTS {db}")
    try:
        migrate(client, db, directory=before)
        insert(client, "messages", _message_rows(300), dedup_token="m010-a", database=db)
        expected = _state(client, db)
        if crash_at is not None:
            with pytest.raises((MigrationError, RuntimeError), match="interrupted"):
                migrate(_CrashAt(client, crash_at), db, directory=folder)
        assert migrate(client, db, directory=folder) == ["010_point_read_storage.py"]
        assert migrate(client, db, directory=folder) == []
        assert _state(client, db) == expected
        create = client.query(f"SELECT create_table_query FROM system.tables WHERE database = '{db}' "
                              "AND name = 'messages'").result_rows[0][0]
        assert "index_granularity = 1024" in create and "min_compress_block_size = 4096" in create
        assert "non_replicated_deduplication_window = 1000" in create
        # the views feed their tables from the new messages table
        insert(client, "messages", _message_rows(1, start=1000), dedup_token="m010-b", database=db)
        sort_rows = client.query(f"SELECT field, value FROM `{db}`.mailing_sort WHERE message_id = 'm1000' "
                                 "ORDER BY field").result_rows
        assert sort_rows == [("email", "c1000@example.com"), ("name", "Name 30")]
        info = client.query(f"SELECT count() FROM `{db}`.mailing_info WHERE mailing_id = 'a1:1'").result_rows
        assert info[0][0] >= 1
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db}")
        client.database = "sendtrail"


def _recipient_rows(sends: list[tuple[str, int, str]]) -> list[dict]:
    return [{
        "recipient_id": f"r-{mid}", "automation_id": "a1", "run": 0, "contact_id": cid, "user_id": "u",
        "user_name": "N", "email": f"{cid}@example.com", "step_index": step, "step_details": "{}",
        "message_id": mid, "channel": "email", "mailing_id": f"a1:{step}", "sent_time": T0, "metadata": "{}",
        "_partition": 0, "_offset": i, "_version": 1,
    } for i, (cid, step, mid) in enumerate(sends)]


# 011 issues 3 commands after the one that creates schema_migrations; the last one records it
@pytest.mark.parametrize("crash_at", [None, 2, 3, 4, 5])
def test_migration_011_names_the_steps_already_sent_twice(env, tmp_path, crash_at):
    """repeat_sends starts with every (automation, contact, run, step) that send_index holds two message
    ids for, whether the two sends are in one part or two; a replayed send is no duplicate; an
    interrupted run is completed by the next one."""
    client, db = env["client"], "sendtrail_m011"
    before, folder = _migrations_before(tmp_path, "011"), _migrations_before(tmp_path, "012")
    client.command(f"DROP DATABASE IF EXISTS {db}")
    try:
        migrate(client, db, directory=before)
        first = _recipient_rows([("c1", 0, "m1"), ("c1", 1, "m2"), ("c2", 0, "m3"), ("c3", 2, "m4"), ("c3", 2, "m5")])
        insert(client, "recipients", first, dedup_token="m011-a", database=db)
        later = _recipient_rows([("c1", 1, "m6"), ("c2", 0, "m3")])  # c1 step 1 again; c2's send replayed
        insert(client, "recipients", later, dedup_token="m011-b", database=db)
        if crash_at is not None:
            with pytest.raises((MigrationError, RuntimeError), match="interrupted"):
                migrate(_CrashAt(client, crash_at), db, directory=folder)
        assert migrate(client, db, directory=folder) == ["011_repeat_sends.sql"]
        rows = client.query(f"SELECT automation_id, contact_id, run, step_index, "
                            f"arraySort(groupUniqArrayArray(message_ids)), max(verify) FROM `{db}`.repeat_sends "
                            "GROUP BY ALL ORDER BY ALL").result_rows
        assert rows == [("a1", "c1", 0, 1, ["m2", "m6"], 0), ("a1", "c3", 0, 2, ["m4", "m5"], 0)]
        indexes = client.query("SELECT name FROM system.data_skipping_indices WHERE database = {db:String} "
                               "AND table = 'send_index'", parameters={"db": db}).result_rows
        assert indexes == []
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db}")
        client.database = "sendtrail"


def _node_rows(nodes: list[tuple[str, int, str, int, int]]) -> list[dict]:
    return [{"automation_id": "a1", "contact_id": cid, "run": 0, "step_index": step, "state": state, "at": at,
             "_version": version} for cid, step, state, at, version in nodes]


# 012 issues 2 commands after the one that creates schema_migrations; the last one records it
@pytest.mark.parametrize("crash_at", [None, 2, 3, 4])
def test_migration_012_opens_the_waits_of_the_nodes_waiting_now(env, tmp_path, crash_at):
    """node_waits starts with one open wait per node waiting in node_states' latest rows, since the
    node's ``at``: a node that waited and moved on in a later row has none; an interrupted run is
    completed by the next one without a wait listed twice."""
    client, db = env["client"], "sendtrail_m012"
    before = _migrations_before(tmp_path, "012")
    client.command(f"DROP DATABASE IF EXISTS {db}")
    try:
        migrate(client, db, directory=before)
        insert(client, "node_states", _node_rows([
            ("c1", 0, "done", T0, 1), ("c1", 1, "waiting", T0 + 10, 1),  # c1 waits at node 1
            ("c2", 0, "waiting", T0 + 20, 1), ("c3", 2, "waiting", T0 + 30, 1),
        ]), dedup_token="m012-a", database=db)
        insert(client, "node_states", _node_rows([
            ("c2", 0, "done", T0 + 40, 2), ("c2", 1, "waiting", T0 + 40, 2),  # c2 moved on to node 1
            ("c3", 2, "stopped", T0 + 50, 2),  # c3 stopped
        ]), dedup_token="m012-b", database=db)
        if crash_at is not None:
            with pytest.raises((MigrationError, RuntimeError), match="interrupted"):
                migrate(_CrashAt(client, crash_at), db)
        assert migrate(client, db) == ["012_node_waits.sql"]
        rows = client.query(f"SELECT contact_id, step_index, toUnixTimestamp64Milli(since), _version "
                            f"FROM `{db}`.node_waits FINAL WHERE closed = 0 ORDER BY ALL").result_rows
        assert rows == [("c1", 1, T0 + 10, 1), ("c2", 1, T0 + 40, 2)]
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db}")
        client.database = "sendtrail"
