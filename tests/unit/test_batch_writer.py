"""BatchWriter against a fake client: no sockets, no ClickHouse."""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from agents.sink import BatchWriter, batch_token
from sendtrail.clickhouse import TABLE_COLUMNS

COLS = ("k", "v")
TABLES = {"t": COLS, "u": COLS}


class FakeClient:
    """Records inserts; honours insert_deduplication_token like ClickHouse does.

    ``fail`` failing attempts come first; ``lose_answer`` attempts store the
    rows and then raise (the insert reached ClickHouse, its answer was lost).
    ``gate`` (a threading.Event) blocks inserts until set.
    """

    def __init__(self, fail: int = 0, lose_answer: int = 0, gate: threading.Event | None = None):
        self.fail = fail
        self.lose_answer = lose_answer
        self.gate = gate
        self.attempts: list[tuple[str, str, int]] = []
        self.rows: dict[str, list] = {}
        self.tokens: set[str] = set()
        self.threads: set[int] = set()
        self.settings: list[dict] = []
        self.closed = False

    def query(self, sql, parameters=None):
        return SimpleNamespace(result_rows=[(c, "String") for c in TABLES.get(parameters["t"], TABLE_COLUMNS.get(parameters["t"], ()))])

    def insert(self, table, data, column_names=None, database=None, column_oriented=False, settings=None,
               column_type_names=None):
        self.threads.add(threading.get_ident())
        if self.gate is not None:
            assert self.gate.wait(10)
        token = settings["insert_deduplication_token"]
        self.settings.append(dict(settings))
        self.attempts.append((table, token, len(data)))
        if self.fail > 0:
            self.fail -= 1
            raise ConnectionError("ClickHouse is away")
        if token not in self.tokens:
            self.tokens.add(token)
            self.rows.setdefault(table, []).extend(tuple(r) for r in data)
        if self.lose_answer > 0:
            self.lose_answer -= 1
            raise TimeoutError("answer lost")
        return SimpleNamespace(written_rows=len(data))

    def close(self):
        self.closed = True


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def writer(client, **kw):
    opts = dict(max_rows=3, max_seconds=60, max_backlog_rows=1000, retry_max_seconds=0.02,
                retry_initial_seconds=0.001, table_columns=TABLES)
    opts.update(kw)
    return BatchWriter(client, **opts)


async def eventually(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


def test_flush_by_size():
    async def main():
        c = FakeClient()
        w = writer(c)
        await w.write("t", [(1, "a"), (2, "b")], "p0:1")
        await asyncio.sleep(0.05)
        assert c.attempts == []  # below max_rows, long max_seconds: still buffered
        await w.write("t", [(3, "c")], "p0:2")
        await eventually(lambda: len(c.attempts) == 1)
        assert c.rows["t"] == [(1, "a"), (2, "b"), (3, "c")]
        assert w.backlog_rows == 0
        await w.close()
    run(main())


def test_a_write_is_never_split_across_batches():
    async def main():
        c = FakeClient()
        w = writer(c, max_rows=2)
        await w.write("t", [(i, "x") for i in range(5)], "p0:1")
        await w.flush()
        assert [a[2] for a in c.attempts] == [5]
        await w.close()
    run(main())


def test_flush_by_time():
    async def main():
        c = FakeClient()
        w = writer(c, max_rows=1000, max_seconds=0.05)
        await w.write("t", [(1, "a")], "p0:1")
        await w.write("u", [(2, "b")], "p1:1")
        await eventually(lambda: len(c.attempts) == 2, timeout=2)
        assert c.rows == {"t": [(1, "a")], "u": [(2, "b")]}
        # and again, after the buffers emptied
        await w.write("t", [(3, "c")], "p0:2")
        await eventually(lambda: len(c.attempts) == 3, timeout=2)
        await w.close()
    run(main())


def test_insert_runs_off_the_event_loop_with_idempotence_settings():
    async def main():
        c = FakeClient()
        w = writer(c)
        await w.write("t", [(1, "a")], "p0:1")
        await w.flush()
        assert threading.get_ident() not in c.threads
        s = c.settings[0]
        assert s["async_insert"] == 0 and s["insert_deduplicate"] == 1
        assert s["insert_deduplication_token"] == batch_token("t", [("p0:1", 1)])
        await w.close()
    run(main())


def test_retry_after_failures_without_loss_or_duplication(caplog):
    failures = []

    async def main():
        c = FakeClient(fail=3, lose_answer=1)
        w = writer(c, metrics={"on_failure": lambda table, exc: failures.append((table, type(exc)))})
        rows = [(i, str(i)) for i in range(7)]
        for i in range(0, 7, 2):
            await w.write("t", rows[i:i + 2], f"p0:{i}")
        await w.flush()
        assert sorted(c.rows["t"]) == rows  # every row once
        # the batch that failed kept its token across attempts
        first_token = c.attempts[0][1]
        assert [a[1] for a in c.attempts[:5]] == [first_token] * 5
        await w.close()

    with caplog.at_level("ERROR", logger="agents.sink"):
        run(main())
    assert len(failures) == 4
    assert failures[0] == ("t", ConnectionError) and failures[3] == ("t", TimeoutError)
    assert sum("insert into t failed" in r.getMessage() for r in caplog.records) == 4


def test_factory_client_is_rebuilt_after_a_failure():
    made = []

    def factory():
        c = FakeClient(fail=1 if not made else 0)
        made.append(c)
        return c

    async def main():
        w = writer(factory)
        await w.write("t", [(1, "a")], "p0:1")
        await w.flush()
        await w.close()

    run(main())
    assert len(made) == 2
    assert made[0].closed and made[1].closed
    assert made[1].rows == {"t": [(1, "a")]}


def test_back_pressure_blocks_write_until_the_backlog_drains():
    gate = threading.Event()

    async def main():
        c = FakeClient(gate=gate)
        backlog = []
        w = writer(c, max_rows=2, max_backlog_rows=4, metrics=SimpleNamespace(on_backlog=backlog.append))
        await w.write("t", [(1, "a"), (2, "b")], "a")      # sealed, insert blocked at the gate
        await w.write("t", [(3, "c"), (4, "d")], "b")      # backlog 4: still fine
        blocked = asyncio.create_task(w.write("t", [(5, "e")], "c"))
        await asyncio.sleep(0.1)
        assert not blocked.done() and w.backlog_rows == 5
        gate.set()
        await asyncio.wait_for(blocked, 5)
        assert w.backlog_rows <= 4
        await w.flush()
        assert sorted(c.rows["t"]) == [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "e")]
        assert max(backlog) == 5 and backlog[-1] == 0
        await w.close()
    run(main())


def test_flush_returns_only_when_everything_is_inserted():
    gate = threading.Event()

    async def main():
        c = FakeClient(gate=gate)
        w = writer(c, max_rows=1000)
        await w.flush()  # nothing written: returns at once
        await w.write("t", [(1, "a")], "x")
        await w.write("u", [(2, "b")], "y")
        flushing = asyncio.create_task(w.flush())
        await asyncio.sleep(0.1)
        assert not flushing.done()
        gate.set()
        await asyncio.wait_for(flushing, 5)
        assert c.rows == {"t": [(1, "a")], "u": [(2, "b")]}
        assert w.backlog_rows == 0
        # a flush cancelled by its caller does not cancel the insert
        gate.clear()
        await w.write("t", [(3, "c")], "z")
        flushing = asyncio.create_task(w.flush())
        await asyncio.sleep(0.05)
        flushing.cancel()
        gate.set()
        await w.flush()
        assert c.rows["t"] == [(1, "a"), (3, "c")]
        await w.close()
    run(main())


def test_flush_waits_through_retries():
    async def main():
        c = FakeClient(fail=5)
        w = writer(c)
        await w.write("t", [(1, "a")], "x")
        await w.flush()
        assert c.rows == {"t": [(1, "a")]} and len(c.attempts) == 6
        await w.close()
    run(main())


def test_close_flushes_and_rejects_later_writes():
    async def main():
        c = FakeClient()
        w = writer(c, max_rows=1000)
        await w.write("t", [(1, "a")], "x")
        await w.close()
        assert c.rows == {"t": [(1, "a")]}
        with pytest.raises(RuntimeError):
            await w.write("t", [(2, "b")], "y")
    run(main())


def test_close_with_timeout_when_clickhouse_stays_away():
    async def main():
        c = FakeClient(fail=10**9)
        w = writer(c)
        await w.write("t", [(1, "a")], "x")
        with pytest.raises(asyncio.TimeoutError):
            await w.close(timeout=0.1)
    run(main())


def test_dict_rows_and_validation():
    async def main():
        c = FakeClient()
        w = writer(c)
        await w.write("t", [{"v": "a", "k": 1}, {"k": 2}], "x")
        with pytest.raises(ValueError):
            await w.write("t", [{"k": 1, "nope": 2}], "y")
        with pytest.raises(ValueError):
            await w.write("t", [(1, "a", "extra")], "y")
        with pytest.raises(KeyError):
            await w.write("nope", [(1, "a")], "y")
        with pytest.raises(ValueError):
            await w.write("t", [(1, "a")], "")
        await w.flush()
        assert c.rows == {"t": [(1, "a"), (2, None)]}
        await w.close()
    run(main())


def test_batch_token_is_stable_and_content_sensitive():
    a = batch_token("t", [("p0:1", 2), ("p0:2", 1)])
    assert a == batch_token("t", [("p0:1", 2), ("p0:2", 1)])
    assert a != batch_token("u", [("p0:1", 2), ("p0:2", 1)])
    assert a != batch_token("t", [("p0:1", 2)])
    assert a != batch_token("t", [("p0:1", 1), ("p0:2", 2)])


def test_default_columns_cover_every_table():
    assert set(TABLE_COLUMNS) == {
        "automations", "contacts", "recipients", "enrollments", "node_states", "messages",
        "message_events", "status_changes", "repeat_sends", "node_waits", "static_lists", "static_list_members",
        "mailing_counters", "node_counters", "status_counters", "counter_coverage",
    }
