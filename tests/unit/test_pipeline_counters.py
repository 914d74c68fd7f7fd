"""Report counters through ``agents.app.Pipeline`` (local RocksDB, no Kafka): the latest counter rows
equal what a FINAL read of the emitted rows counts, after any batching, and after a recovery that lost
the totals (recount) or that has keys stored before the counters existed."""
from __future__ import annotations

import zlib
from collections import defaultdict

import orjson
import pytest
from aiokafka import TopicPartition

from agents.app import COUNTED_MARK, COUNTING_RULE, Pipeline
from sendtrail.clickhouse import TABLE_COLUMNS
from streams import counters as C
from streams.generator import generate
from tests.unit.pipeline_helpers import FakeProducer, Rec, local_pipeline

PARTITIONS = 2
BASE_MS = 1_700_000_000_000
NOW_MS = BASE_MS + 40 * 86_400_000


class Driver:
    """Feeds records to a pipeline in batches and loops its internal topics back, like the runtime."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.p = pipeline
        self.offsets: dict = defaultdict(int)
        self.rows: dict = defaultdict(list)

    def rec(self, topic: str, key: bytes, value: bytes, partition: int | None) -> Rec:
        part = partition if partition is not None else zlib.crc32(key) % PARTITIONS
        off = self.offsets[(topic, part)]
        self.offsets[(topic, part)] += 1
        return Rec(topic, part, off, key, value)

    def batch(self, records: list[Rec], replay_until: dict | None = None, lost: bool = False) -> list[Rec]:
        """Process ``records`` as one batch; returns the internal records it sent. ``lost``: the batch's
        rows are written, then the process dies before its state is committed (nothing is sent)."""
        fetched: dict = {}
        for r in records:
            fetched.setdefault(TopicPartition(r.topic, r.partition), []).append(r)
        ctx = self.p.prepare(fetched, replay_until)
        for table, rows in ctx.rows.items():
            self.rows[table].extend(rows)
        if lost:
            self.p.tables.discard()
            self.p.pending_rows = {}  # a new process
            return []
        self.p.tables.seal()
        self.p.counter_rows_written(ctx.pending_rows)  # what finish() does once the rows are written
        self.p.state_committed(ctx)  # what the runtime does once the batch's state is committed
        internal = {self.p.to_contacts, self.p.to_messages}
        return [self.rec(t, k, v, part) for t, k, v, part in ctx.sends if t in internal]

    def assign(self, unclean: bool = False) -> None:
        """A first assignment of every partition (the runtime's on_assigned): coverage, recounts."""
        names = self.p.topic_names
        assigned = [TopicPartition(names[t], p) for t in ("enrollments", "sends", "provider-events")
                    for p in range(PARTITIONS)]
        self.p.counters_assigned(assigned, set(assigned) if unclean else set())

    def flush(self) -> None:
        """The counter rows still pending, written (a clean stop)."""
        pending = {t: dict(r) for t, r in self.p.pending_rows.items()}
        for table, rows in pending.items():
            self.rows[table].extend(rows.values())
        self.p.counter_rows_written(pending)
        assert not self.p.has_pending_rows

    def run(self, events, size: int = 300) -> None:
        names = self.p.topic_names
        records = [self.rec(names[topic], key.encode(), value, None) for topic, key, value in events]
        for i in range(0, len(records), size):
            pending = self.batch(records[i:i + size])
            while pending:
                pending = self.batch(pending)
        self.flush()


def expected_counts(rows: dict) -> dict:
    """What FINAL reads of the emitted rows count (the latest row per key: the last emitted)."""
    def latest(table, key):
        out = {}
        for r in rows[table]:
            out[tuple(r[k] for k in key)] = r
        return out.values()

    nodes: dict = defaultdict(lambda: [0] * 4)
    for r in latest("node_states", ("automation_id", "contact_id", "run", "step_index")):
        if r["state"] != "none":
            nodes[(r["automation_id"], r["step_index"])][C.NODE_COUNTERS.index(r["state"])] += 1
    statuses: dict = defaultdict(lambda: [0] * 7)
    for r in latest("enrollments", ("automation_id", "contact_id", "run")):
        step = r["current_step"]  # completed: every step done (no current step), not filtered out
        completed = step < 0 and not (r["status"] == "finished" and r["reason"] == "filtered")
        for i, v in enumerate((1, r["run"] == 0, r["ignored_enrollments"], completed, step > 0, step == 0,
                               step < 0 and not completed)):
            statuses[(r["automation_id"], r["status"])][i] += int(v)
    mailings: dict = defaultdict(lambda: [0] * 9)
    for r in latest("messages", ("message_id",)):
        key = (r["mailing_id"], r["channel"], r["automation_id"], r["step_index"])
        mailings[key][0] += 1
        for i, (_, field) in enumerate(C.MAILING_FLAG_COUNTERS):
            mailings[key][i + 1] += int(r[field] is not None)
    return {"node_counters": nodes, "status_counters": statuses, "mailing_counters": mailings}


def counter_counts(rows: dict) -> dict:
    """The counters tables read like the API reads them: the latest row per (key, partition), summed."""
    out = {}
    for table, width in (("node_counters", 2), ("status_counters", 2), ("mailing_counters", 4)):
        latest: dict = {}
        for row in rows[table]:
            key = row[:width + 1]
            if key not in latest or row[-1] >= latest[key][-1]:
                latest[key] = row
        summed: dict = defaultdict(lambda: None)
        for row in latest.values():
            counts = list(row[width + 1:-1])
            prev = summed[row[:width]]
            summed[row[:width]] = counts if prev is None else [a + b for a, b in zip(prev, counts)]
        out[table] = {k: v for k, v in summed.items() if any(v)}
    return out


def nonzero(counts: dict) -> dict:
    return {t: {k: list(v) for k, v in c.items() if any(v)} for t, c in counts.items()}


@pytest.fixture(scope="module")
def workload():
    return generate(7, automations=3, contacts=300, base_ms=BASE_MS, now_ms=NOW_MS)


def test_counters_equal_the_latest_rows_whatever_the_batches(tmp_path, workload):
    results = []
    for size, flush_seconds in ((1000, 0.0), (97, 3600.0)):  # rows written with every batch / at the end
        driver = Driver(local_pipeline(tmp_path / str(size), PARTITIONS))
        driver.p.counter_flush_seconds = flush_seconds
        driver.assign()
        driver.run(workload.events, size)
        expected = nonzero(expected_counts(driver.rows))
        assert expected["node_counters"] and expected["status_counters"] and expected["mailing_counters"]
        assert counter_counts(driver.rows) == expected
        coverage = {(r[0], r[1]) for r in driver.rows["counter_coverage"]}
        assert coverage == {(t, p) for t in C.COUNTER_TABLES for p in range(PARTITIONS)}
        assert all(len(r) == len(TABLE_COLUMNS[t]) for t in C.COUNTER_TABLES for r in driver.rows[t])
        results.append(counter_counts(driver.rows))
    assert results[0] == results[1]


@pytest.mark.parametrize("lost", ["totals", "cc"])
def test_a_recovery_recounts_the_totals_from_the_keys(tmp_path, workload, lost):
    """``totals``: the state came back without the totals of the last batches (a changelog holding part
    of a batch): the partition is recounted, and its rows win over the earlier ones. ``cc``: keys stored
    before the counters existed: they are counted as their snapshot would be written."""
    half = len(workload.events) // 2
    crashed = Driver(local_pipeline(tmp_path / "crashed", PARTITIONS))
    crashed.assign()
    crashed.run(workload.events[:half], 500)

    replay = local_pipeline(tmp_path / "replay", PARTITIONS)
    for table in ("enrollments", "messages", "automation-replicas", "parked", "contact-counters", "message-counters"):
        for p in range(PARTITIONS):
            items = dict(crashed.p.tables.items(table, p))
            if table.endswith("-counters"):
                if lost == "cc":
                    continue  # never counted
                items = {k: v for i, (k, v) in enumerate(sorted(items.items()))
                         if i % 3 or k == COUNTED_MARK}  # some totals lost
            if lost == "cc" and table in ("enrollments", "messages"):
                items = {k: orjson.dumps({f: x for f, x in orjson.loads(v).items() if f != "cc"})
                         for k, v in items.items()}
            replay.tables.store(table, p).write(items, 0)
    after = Driver(replay)
    for table, rows in crashed.rows.items():
        after.rows[table].extend(rows)
    after.assign(unclean=lost == "totals")
    after.run(workload.events[half:], 500)
    assert counter_counts(after.rows) == nonzero(expected_counts(after.rows))
    recounts = replay.metrics.report_recounts
    cause = "unclean" if lost == "totals" else "first"
    assert recounts.labels(partitions="contacts", cause=cause)._value.get() == PARTITIONS
    assert recounts.labels(partitions="messages", cause=cause)._value.get() == PARTITIONS
    assert recounts.labels(partitions="contacts", cause="mismatch")._value.get() == 0
    for p in range(PARTITIONS):
        assert replay.tables.get("contact-counters", p, COUNTED_MARK) is not None
        assert replay.tables.get("message-counters", p, COUNTED_MARK) is not None
    if lost == "cc":  # the keys now carry what they counted
        assert all("cc" in orjson.loads(v) for _, v in replay.tables.items("messages", 0))


def test_totals_of_the_earlier_counting_rule_are_recounted_from_the_keys_snapshots(tmp_path, workload):
    """Rule 1 counted only finished/completed runs as completed; rule 2 every run with every step done. A
    partition counted under rule 1 (its mark says 1, its keys' ``cc`` and totals follow rule 1) is
    recounted on assignment, each key from its snapshot: keys that the later batches do not touch are
    counted by rule 2 too."""
    driver = Driver(local_pipeline(tmp_path / "p", PARTITIONS))
    driver.assign()
    half = len(workload.events) // 2
    driver.run(workload.events[:half], 400)
    tables = driver.p.tables
    downgraded = 0
    for p in range(PARTITIONS):
        ccs = []
        for key, raw in list(tables.items("enrollments", p)):
            state = orjson.loads(raw)
            for entry in (state.get("cc") or {}).get("r", {}).values():
                status, completed, klass, _ = entry
                if completed and status != "finished":  # every step done, then e.g. unsubscribed
                    entry[1] = 0
                    downgraded += 1
            tables.put("enrollments", p, key, orjson.dumps(state))
            ccs.append((key.split(b"\x1f", 1)[0].decode(), state.get("cc")))
        nodes: dict = {}
        statuses: dict = {}
        C.contact_totals(ccs, nodes, statuses)
        for key, _ in list(tables.items("contact-counters", p)):
            if key[:1] == b"s":
                tables.put("contact-counters", p, key, orjson.dumps([0] * 7))
        for total, counts in statuses.items():
            tables.put("contact-counters", p, b"s" + orjson.dumps(total), orjson.dumps(counts))
        tables.put("contact-counters", p, COUNTED_MARK, b"1")
    assert downgraded  # the workload has runs that did every step and then left with another status
    driver.assign()
    driver.run(workload.events[half:], 400)
    assert counter_counts(driver.rows) == nonzero(expected_counts(driver.rows))
    recounts = driver.p.metrics.report_recounts
    assert recounts.labels(partitions="contacts", cause="rule")._value.get() == PARTITIONS
    assert recounts.labels(partitions="contacts", cause="mismatch")._value.get() == 0
    assert all(tables.get("contact-counters", p, COUNTED_MARK) == COUNTING_RULE for p in range(PARTITIONS))


def test_totals_that_do_not_match_their_keys_are_recounted_not_taken_below_zero(tmp_path, workload):
    driver = Driver(local_pipeline(tmp_path / "p", PARTITIONS))
    driver.assign()
    half = len(workload.events) // 2
    driver.run(workload.events[:half], 400)
    for p in range(PARTITIONS):  # a bug's effect: every total of the contacts partitions zeroed
        for key, _ in list(driver.p.tables.items("contact-counters", p)):
            if key != COUNTED_MARK:
                driver.p.tables.put("contact-counters", p, key, orjson.dumps([0] * 7 if key[:1] == b"s" else [0] * 4))
    driver.run(workload.events[half:], 400)
    assert counter_counts(driver.rows) == nonzero(expected_counts(driver.rows))
    assert driver.p.metrics.report_recounts.labels(partitions="contacts",
                                                   cause="mismatch")._value.get() >= 1


def test_a_recount_writes_zeros_for_totals_no_key_counts_any_more(tmp_path, workload):
    """A total in the state that no key counts (a key of an earlier attempt, gone with a lost changelog
    record): the recount writes a row of zeros for it, so its earlier row stops counting, and keeps it
    at zero, so that the next recount writes that row again (a crash may have kept it from being
    written)."""
    driver = Driver(local_pipeline(tmp_path / "p", PARTITIONS))
    driver.assign()
    driver.run(workload.events, 500)
    ghosts = {"node_counters": ("contact-counters", b"n", ["ghost", 9]),
              "status_counters": ("contact-counters", b"s", ["ghost", "paused"]),
              "mailing_counters": ("message-counters", b"m", ["ghost:9", "email", "ghost", 9])}
    for table, (totals, prefix, key) in ghosts.items():
        driver.p.tables.put(totals, 0, prefix + orjson.dumps(key), orjson.dumps([1] * len(C.COUNTER_NAMES[table])))
    driver.assign(unclean=True)
    driver.flush()
    for table, (totals, prefix, key) in ghosts.items():
        zero_rows = [r for r in driver.rows[table] if r[:len(key)] == tuple(key)]
        assert zero_rows and zero_rows[-1] == (*key, 0, *[0] * len(C.COUNTER_NAMES[table]), zero_rows[-1][-1])
        assert len(zero_rows[-1]) == len(TABLE_COLUMNS[table])
        assert driver.p.tables.get(totals, 0, prefix + orjson.dumps(key)) == orjson.dumps(
            [0] * len(C.COUNTER_NAMES[table]))
    assert counter_counts(driver.rows) == nonzero(expected_counts(driver.rows))
    driver.p.pending_rows = {}  # the zero rows were not written: a crash
    before = {table: len(driver.rows[table]) for table in ghosts}
    driver.assign(unclean=True)
    driver.flush()
    for table, (_, _, key) in ghosts.items():
        again = [r for r in driver.rows[table][before[table]:] if r[:len(key)] == tuple(key)]
        assert again and not any(again[-1][len(key) + 1:-1])


@pytest.mark.parametrize("share", [2, 8])
def test_counter_rows_of_a_batch_whose_state_was_lost_are_no_phantoms(tmp_path, workload, share):
    """A worker killed after a batch's rows were written but before its state was committed: the
    replay goes through other batches (here one larger one), in which a total the lost batch had
    created (contacts entering and leaving a status) changes by nothing. A counter row the lost batch
    had written for it would stay in ClickHouse, counting contacts no latest row has (the e2e SIGKILL
    test saw such rows: 'ready', 'waiting_enrichment' counted with no enrollment in them)."""
    import asyncio

    driver = Driver(local_pipeline(tmp_path / "p", PARTITIONS))
    driver.p.counter_flush_seconds = 0.0  # pending counter rows go with every batch
    driver.assign()
    names = driver.p.topic_names
    first = len(workload.events) // share
    driver.run(workload.events[:first], 300)
    asyncio.run(driver.p.tables.commit(FakeProducer()))
    rest = [driver.rec(names[topic], key.encode(), value, None) for topic, key, value in workload.events[first:]]
    replay_until = {TopicPartition(r.topic, r.partition): r.offset + 1 for r in rest}
    for size in (20, 150, 400, 1000):
        driver.batch(rest[:size], lost=True)
        driver.assign(unclean=True)  # the successor recounts, then replays in one batch
        pending = driver.batch(rest[:2 * size], replay_until)
        while pending:
            pending = driver.batch(pending)
        asyncio.run(driver.p.tables.commit(FakeProducer()))
        driver.flush()
        assert counter_counts(driver.rows) == nonzero(expected_counts(driver.rows)), size
        rest = rest[2 * size:]
