"""Partition state tables: local RocksDB stores that never get ahead of their changelog."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from agents.state import MARKER_KEY, PartitionStore, StateTables, changelog_topic
from tests.unit.pipeline_helpers import FakeProducer


def test_store_writes_values_deletes_and_marker_together(tmp_path):
    store = PartitionStore(tmp_path / "t" / "0")
    assert store.marker == -1
    store.write({b"a\x1fc1": b"1", b"a\x1fc2": b"2", b"b\x1fc1": b"3"}, marker=7)
    store.write({b"a\x1fc2": None}, marker=8)
    assert store.marker == 8
    assert store.get(b"a\x1fc2") is None
    assert list(store.items(b"a\x1f")) == [(b"a\x1fc1", b"1")]
    assert [k for k, _ in store.items()] == [b"a\x1fc1", b"b\x1fc1"]  # the marker is not a table key
    store.close()
    reopened = PartitionStore(tmp_path / "t" / "0")
    assert reopened.marker == 8 and reopened.get(MARKER_KEY) == b"8"
    reopened.wipe()
    assert reopened.marker == -1 and list(reopened.items()) == []
    reopened.close()


def test_commit_sends_each_staged_key_to_its_changelog_partition_then_applies_locally(tmp_path):
    tables = StateTables(tmp_path, "g", ["enrollments", "messages"])
    tables.put("enrollments", 2, b"k1", b"v1")
    tables.put("enrollments", 2, b"k1", b"v2")  # the last staged value of a key wins
    tables.put("messages", 0, b"m1", b"x")
    tables.put("enrollments", 2, b"k2", None)
    producer = FakeProducer()
    written = asyncio.run(tables.commit(producer))
    assert written == 3
    topic = changelog_topic("g", "enrollments")
    assert topic == "g-enrollments-changelog"
    assert (topic, 2, b"k1", b"v2") in producer.sent and (topic, 2, b"k2", None) in producer.sent
    assert producer.calls == 1
    assert tables.get("enrollments", 2, b"k1") == b"v2"
    assert tables.store("enrollments", 2).marker == 1  # offset of the last record of that partition
    assert tables.store("messages", 0).marker == 0
    assert tables.staged == 0
    tables.close()


def test_a_failed_changelog_send_applies_nothing_locally(tmp_path):
    tables = StateTables(tmp_path, "g", ["enrollments", "messages"])
    tables.put("enrollments", 1, b"k", b"new")
    tables.put("messages", 1, b"m", b"new")
    with pytest.raises(ConnectionError):
        asyncio.run(tables.commit(FakeProducer(fail_topic=changelog_topic("g", "messages"))))
    assert tables.store("enrollments", 1).get(b"k") is None and tables.store("messages", 1).get(b"m") is None
    assert tables.store("enrollments", 1).marker == -1
    assert tables.get("enrollments", 1, b"k") == b"new"  # still staged, for a retry
    tables.discard()
    assert tables.staged == 0
    assert tables.get("enrollments", 1, b"k") is None
    tables.close()


def test_a_batch_reads_the_sealed_layers_of_earlier_batches_until_they_are_committed(tmp_path):
    tables = StateTables(tmp_path, "g", ["enrollments"])
    producer = FakeProducer()
    tables.put("enrollments", 0, b"a\x1f1", b"stored")
    tables.put("enrollments", 0, b"a\x1f2", b"stored")
    tables.put("enrollments", 0, b"b\x1f1", b"other automation")
    asyncio.run(tables.commit(producer))
    # batch 1: changes one key, deletes another, adds a third
    tables.put("enrollments", 0, b"a\x1f1", b"batch1")
    tables.put("enrollments", 0, b"a\x1f2", None)
    tables.put("enrollments", 0, b"a\x1f0", b"batch1")
    first = tables.seal()
    # batch 2 sees batch 1 over the store, and its own open writes over both
    assert tables.get("enrollments", 0, b"a\x1f1") == b"batch1"
    assert tables.get("enrollments", 0, b"a\x1f2") is None
    tables.put("enrollments", 0, b"a\x1f1", b"batch2")
    tables.put("enrollments", 0, b"a\x1f3", b"batch2")
    assert tables.get("enrollments", 0, b"a\x1f1") == b"batch2"
    assert list(tables.items("enrollments", 0, b"a\x1f")) == [
        (b"a\x1f0", b"batch1"), (b"a\x1f1", b"batch2"), (b"a\x1f3", b"batch2")]
    assert [k for k, _ in tables.items("enrollments", 0)] == [b"a\x1f0", b"a\x1f1", b"a\x1f3", b"b\x1f1"]
    second = tables.seal()
    with pytest.raises(RuntimeError, match="order"):
        asyncio.run(tables.commit_layer(second, producer))
    asyncio.run(tables.commit_layer(first, producer))
    store = tables.store("enrollments", 0)
    assert store.get(b"a\x1f1") == b"batch1" and store.get(b"a\x1f2") is None  # only batch 1 is durable
    assert tables.get("enrollments", 0, b"a\x1f1") == b"batch2"
    asyncio.run(tables.commit_layer(second, producer))
    assert store.get(b"a\x1f1") == b"batch2" and tables.staged == 0
    tables.close()


def test_discard_drops_every_uncommitted_layer(tmp_path):
    tables = StateTables(tmp_path, "g", ["messages"])
    tables.put("messages", 3, b"m", b"one")
    tables.seal()
    tables.put("messages", 3, b"m", b"two")
    tables.discard()
    assert tables.get("messages", 3, b"m") is None and list(tables.items("messages", 3)) == []
    assert asyncio.run(tables.commit(FakeProducer())) == 0
    tables.close()


class FakeChangelogConsumer:
    """A group-less consumer over in-memory changelog partitions: {TopicPartition: [(key, value), ...]}."""

    def __init__(self, logs: dict, start: int = 0) -> None:
        self.logs = logs
        self.start = start
        self.positions: dict = {}

    def assign(self, tps):
        self.positions = {tp: self.positions.get(tp, self.start) for tp in tps}

    async def end_offsets(self, tps):
        return {tp: self.start + len(self.logs.get(tp, [])) for tp in tps}

    async def beginning_offsets(self, tps):
        return {tp: self.start for tp in tps}

    def seek(self, tp, offset):
        self.positions[tp] = offset

    def pause(self, tp):
        self.positions.pop(tp, None)

    async def getmany(self, *tps, timeout_ms=0, max_records=None):
        out = {}
        for tp in tps:
            if tp not in self.positions:
                continue
            pos = self.positions[tp]
            chunk = self.logs.get(tp, [])[pos - self.start:pos - self.start + 2]  # small fetches
            if chunk:
                out[tp] = [SimpleNamespace(offset=pos + i, key=k, value=v) for i, (k, v) in enumerate(chunk)]
                self.positions[tp] = pos + len(chunk)
        return out


def _tp(topic, partition):
    from aiokafka import TopicPartition

    return TopicPartition(topic, partition)


def test_recovery_replays_the_changelog_from_the_local_marker_to_its_end(tmp_path):
    tables = StateTables(tmp_path, "g", ["enrollments"])
    tables.store("enrollments", 0).write({b"a": b"1", b"b": b"1"}, marker=1)  # offsets 0..1 applied
    log = [(b"a", b"1"), (b"b", b"1"), (b"a", b"2"), (b"c", b"1"), (b"b", None)]
    applied = asyncio.run(tables.recover(FakeChangelogConsumer({_tp("g-enrollments-changelog", 0): log}),
                                         [("enrollments", 0)]))
    assert applied == {"enrollments": 3}
    store = tables.store("enrollments", 0)
    assert dict(store.items()) == {b"a": b"2", b"c": b"1"} and store.marker == 4
    tables.close()


def test_recovery_rebuilds_a_store_that_belongs_to_another_history(tmp_path):
    tables = StateTables(tmp_path, "g", ["messages"])
    tables.store("messages", 3).write({b"old": b"x"}, marker=40)  # beyond the changelog's end: topics recreated
    log = [(b"m1", b"1"), (b"m2", b"1")]
    applied = asyncio.run(tables.recover(FakeChangelogConsumer({_tp("g-messages-changelog", 3): log}),
                                         [("messages", 3)]))
    assert applied == {"messages": 2}
    assert dict(tables.store("messages", 3).items()) == {b"m1": b"1", b"m2": b"1"}
    tables.close()


def test_recovery_of_an_up_to_date_store_reads_nothing(tmp_path):
    tables = StateTables(tmp_path, "g", ["parked"])
    tables.store("parked", 1).write({b"k": b"v"}, marker=0)
    applied = asyncio.run(tables.recover(FakeChangelogConsumer({_tp("g-parked-changelog", 1): [(b"k", b"v")]}),
                                         [("parked", 1)]))
    assert applied == {}
    assert dict(tables.store("parked", 1).items()) == {b"k": b"v"}
    tables.close()


@pytest.mark.parametrize("members", [1, 2, 3, 5])
def test_the_range_assignor_keeps_every_topic_of_a_partition_number_on_one_member(members):
    """The runtime relies on it: a contact's enrollments, sends and outcomes share a partition number."""
    from aiokafka.coordinator.assignors.range import RangePartitionAssignor

    from agents.runtime import ASSIGNOR

    assert ASSIGNOR is RangePartitionAssignor
    topics = ["p.automations", "p.enrollments", "p.sends", "p.provider-events", "p.internal.to-contacts",
              "p.internal.to-messages"]
    cluster = SimpleNamespace(partitions_for_topic=lambda topic: set(range(8)))
    metadata = {f"member-{i}": RangePartitionAssignor.metadata(topics) for i in range(members)}
    assignment = RangePartitionAssignor.assign(cluster, metadata)
    owner: dict[int, str] = {}
    for member, assigned in assignment.items():
        for topic, partitions in assigned.assignment:
            for p in partitions:
                assert owner.setdefault(p, member) == member, (topic, p)
    assert sorted(owner) == list(range(8))


def test_a_layer_reaches_the_changelogs_phase_by_phase_each_acknowledged_before_the_next(tmp_path):
    """A kill during the sends can leave part of a layer in the changelogs: only a prefix of the phases
    (see agents.app.commit_phase), never a parked event's removal without the enrollment that applied it."""
    from agents.app import commit_phase

    tables = StateTables(tmp_path, "g", ["enrollments", "parked", "resume-index", "automation-replicas"],
                         commit_phase)
    tables.put("parked", 0, b"a\x1fc1", None)
    tables.put("resume-index", 0, b"a\x1fc2", None)
    tables.put("enrollments", 0, b"a\x1fc1", b"applied the parked events")
    tables.put("resume-index", 0, b"a\x1fc1", b"123")
    tables.put("automation-replicas", 0, b"a", b"definition")
    producer = FakeProducer()
    batches = []
    send_all = producer.send_all

    async def recording(records):
        records = list(records)
        batches.append(sorted((topic.split("-", 1)[1].rsplit("-", 1)[0], key, value) for topic, key, value, _ in records))
        return await send_all(records)

    producer.send_all = recording
    assert asyncio.run(tables.commit(producer)) == 5
    assert batches == [
        [("automation-replicas", b"a", b"definition"), ("resume-index", b"a\x1fc1", b"123")],
        [("enrollments", b"a\x1fc1", b"applied the parked events")],
        [("parked", b"a\x1fc1", None), ("resume-index", b"a\x1fc2", None)],
    ]
    index = tables.store("resume-index", 0)
    assert index.marker == 1 and index.get(b"a\x1fc1") == b"123"  # the marker: the later of its two records
    tables.close()
