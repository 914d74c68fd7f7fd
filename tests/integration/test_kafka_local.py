"""Real Apache Kafka from deploy/local/kafka: topics of the event contract, keyed JSON round trips,
`status`, and a 3-broker cluster with replication factor 3."""
from __future__ import annotations

import asyncio
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import create_topics_async, run_kafka_script

# SPEC section 2: topic -> whether it is compacted
CONTRACT_TOPICS = {
    "automations": True,
    "enrollments": False,
    "sends": False,
    "provider-events": False,
    "status-changes": False,
    "dead-letters": False,
}


async def produce(bootstrap: str, records: list[tuple[str, str, dict]]) -> dict[tuple[str, str], set[int]]:
    """Send (topic, key, value) records; return the partitions each (topic, key) went to."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                key_serializer=str.encode,
                                value_serializer=lambda v: json.dumps(v, sort_keys=True).encode())
    await producer.start()
    try:
        futures = [(topic, key, await producer.send(topic, value, key=key)) for topic, key, value in records]
        placed: dict[tuple[str, str], set[int]] = defaultdict(set)
        for topic, key, fut in futures:
            md = await asyncio.wait_for(fut, 30)
            placed[(topic, key)].add(md.partition)
        return placed
    finally:
        await producer.stop()


async def consume(bootstrap: str, topics: list[str], count: int, timeout: float = 30.0) -> list:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    out = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                out.extend(msgs)
        return out
    finally:
        await consumer.stop()


async def topic_configs(bootstrap: str, topic: str) -> dict[str, str]:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        configs = {}
        for resp in responses:
            for resource in resp.resources:
                for entry in resource[4]:
                    configs[entry[0]] = entry[1]
        return configs
    finally:
        await admin.close()


async def describe(bootstrap: str, topics: list[str]) -> list[dict]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return await admin.describe_topics(topics)
    finally:
        await admin.close()


def contract_records(prefix: str) -> list[tuple[str, str, dict]]:
    records = []
    for i in range(3):
        aid = f"auto-{i}"
        records.append((prefix + "automations", aid, {
            "event_id": f"e-a{i}", "type": "automation.published", "schema_version": 1,
            "occurred_at": "2026-01-01T00:00:00+00:00", "automation_id": aid, "name": f"A{i}"}))
    for c in range(8):
        cid = f"contact-{c}"
        for n in range(3):  # several events per key: they must share a partition and keep order
            records.append((prefix + "enrollments", cid, {
                "event_id": f"e-c{c}-{n}", "type": "contact.enrolled", "schema_version": 1,
                "occurred_at": f"2026-01-01T00:00:0{n}+00:00", "automation_id": "auto-0", "contact_id": cid,
                "seq": n}))
            records.append((prefix + "sends", cid, {
                "event_id": f"e-s{c}-{n}", "type": "step.scheduled", "schema_version": 1,
                "occurred_at": "2026-01-01T00:00:00+00:00", "automation_id": "auto-0", "contact_id": cid,
                "step_index": n, "due_at": "2026-01-02T00:00:00+00:00", "seq": n}))
            records.append((prefix + "status-changes", cid, {"contact_id": cid, "seq": n}))
    for m in range(6):
        mid = f"<msg-{m}@example.test>"
        for n, typ in enumerate(["message.sent", "message.delivered", "message.opened"]):
            records.append((prefix + "provider-events", mid, {
                "event_id": f"e-m{m}-{n}", "type": typ, "schema_version": 1, "occurred_at":
                "2026-01-01T00:00:00+00:00", "message_id": mid, "email": "x@example.test", "provider": "ses",
                "seq": n}))
    records.append((prefix + "dead-letters", "contact-0", {"reason": "invalid_json", "original": "e30K"}))
    return records


def test_contract_topics_round_trip(kafka_bootstrap, topic_prefix, create_topics):
    names = [topic_prefix + t for t, compacted in CONTRACT_TOPICS.items() if not compacted]
    compacted = [topic_prefix + t for t, c in CONTRACT_TOPICS.items() if c]
    create_topics(names, partitions=4)
    create_topics(compacted, partitions=4, configs={"cleanup.policy": "compact"})
    create_topics(compacted, partitions=4, configs={"cleanup.policy": "compact"})  # idempotent

    assert asyncio.run(topic_configs(kafka_bootstrap, topic_prefix + "automations"))["cleanup.policy"] == "compact"
    assert asyncio.run(topic_configs(kafka_bootstrap, topic_prefix + "sends"))["cleanup.policy"] == "delete"
    for t in asyncio.run(describe(kafka_bootstrap, names + compacted)):
        assert t["error_code"] == 0 and len(t["partitions"]) == 4, t

    records = contract_records(topic_prefix)
    placed = asyncio.run(produce(kafka_bootstrap, records))
    # same key -> same partition, on every topic
    assert all(len(parts) == 1 for parts in placed.values()), {k: v for k, v in placed.items() if len(v) > 1}
    # 8 contacts over 4 partitions: the keys really are spread (guards against everything landing on one)
    assert len({next(iter(placed[(topic_prefix + "sends", f"contact-{c}")])) for c in range(8)}) > 1

    got = asyncio.run(consume(kafka_bootstrap, names + compacted, len(records)))
    assert len(got) == len(records)
    sent = sorted((t, k, json.dumps(v, sort_keys=True)) for t, k, v in records)
    received = sorted((m.topic, m.key.decode(), m.value.decode()) for m in got)
    assert received == sent
    for m in got:
        assert m.partition in placed[(m.topic, m.key.decode())]
    # per key, order is preserved
    seqs = defaultdict(list)
    for m in sorted(got, key=lambda m: (m.topic, m.partition, m.offset)):
        v = json.loads(m.value)
        if "seq" in v:
            seqs[(m.topic, m.key)].append(v["seq"])
    assert seqs and all(s == sorted(s) for s in seqs.values())


def test_topic_prefix_is_fresh(topic_prefix):
    assert topic_prefix.startswith("t") and topic_prefix.endswith(".") and len(topic_prefix) == 10


def test_status_reports_running(kafka_cluster):
    if kafka_cluster.dir is None:
        pytest.skip("reusing TEST_KAFKA_BOOTSTRAP without TEST_KAFKA_DIR")
    proc = run_kafka_script("status", "--dir", str(kafka_cluster.dir), timeout=30)
    assert proc.returncode == 0
    assert "running: 1/1" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == kafka_cluster.bootstrap


def test_status_of_empty_dir_is_not_running(tmp_path):
    proc = run_kafka_script("status", "--dir", str(tmp_path), timeout=30, check=False)
    assert proc.returncode == 1
    assert "not running" in proc.stdout


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except OSError:
        return True


@pytest.mark.timeout(240)
def test_three_broker_cluster(tmp_path):
    state_dir = tmp_path / "kafka3"
    t0 = time.monotonic()
    proc = run_kafka_script("start", "--brokers", "3", "--port", "0", "--dir", str(state_dir), timeout=180)
    pids: list[int] = []
    try:
        started = time.monotonic() - t0
        bootstrap = proc.stdout.strip().splitlines()[-1]
        assert len(bootstrap.split(",")) == 3
        assert str(state_dir) in proc.stderr
        state = json.loads((state_dir / "state.json").read_text())
        pids = [n["pid"] for n in state["nodes"]]
        assert len(pids) == 3 and all(_pid_running(p) for p in pids)
        print(f"3-broker cluster started in {started:.1f}s")

        topic = "rf3-topic"
        asyncio.run(create_topics_async(bootstrap, [topic], partitions=3, replication_factor=3))
        [desc] = asyncio.run(describe(bootstrap, [topic]))
        assert all(len(p["replicas"]) == 3 for p in desc["partitions"]), desc
        records = [(topic, f"k{i % 5}", {"i": i}) for i in range(30)]
        placed = asyncio.run(produce(bootstrap, records))
        assert all(len(v) == 1 for v in placed.values())
        got = asyncio.run(consume(bootstrap, [topic], len(records)))
        assert sorted(json.loads(m.value)["i"] for m in got) == list(range(30))

        # a broker can be killed and brought back
        run_kafka_script("kill-broker", "2", "--dir", str(state_dir), timeout=30)
        status = run_kafka_script("status", "--dir", str(state_dir), timeout=30)
        assert "running: 2/3" in status.stdout
        assert not _pid_running(pids[1])
        run_kafka_script("start-broker", "2", "--dir", str(state_dir), timeout=150)
        state = json.loads((state_dir / "state.json").read_text())
        pids = [n["pid"] for n in state["nodes"]]
        assert "running: 3/3" in run_kafka_script("status", "--dir", str(state_dir), timeout=30).stdout
    finally:
        run_kafka_script("stop", "--dir", str(state_dir), timeout=120, check=False)
    assert pids and not any(_pid_running(p) for p in pids), pids
    assert not (state_dir / "state.json").exists()
    assert run_kafka_script("status", "--dir", str(state_dir), timeout=30, check=False).returncode == 1


@pytest.mark.timeout(180)
def test_cluster_stops_when_owner_process_dies(tmp_path):
    """`start --owner-pid` (used by the session fixture) stops the brokers if pytest is killed."""
    import subprocess

    owner = subprocess.Popen(["sleep", "600"])
    state_dir = tmp_path / "owned"
    try:
        run_kafka_script("start", "--port", "0", "--dir", str(state_dir), "--owner-pid", str(owner.pid),
                         timeout=150)
        pid = json.loads((state_dir / "state.json").read_text())["nodes"][0]["pid"]
        assert _pid_running(pid)
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 60
        while _pid_running(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _pid_running(pid)
        assert run_kafka_script("status", "--dir", str(state_dir), check=False).returncode == 1
    finally:
        owner.kill()
        owner.wait()
        run_kafka_script("stop", "--dir", str(state_dir), timeout=120, check=False)


def test_batch_producer_reports_last_offsets_and_partitions_like_the_default_partitioner(kafka_bootstrap,
                                                                                          topic_prefix):
    """The state changelog markers rest on it: the offset reported per partition is its last record's."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from agents.produce import BatchProducer

    topic = f"{topic_prefix}batches"

    async def run():
        await create_topics_async(kafka_bootstrap, [topic], partitions=4)
        # small batches: one send_all spans several batches per partition
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", max_batch_size=1024)
        plain = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        await plain.start()
        await consumer.start()
        try:
            batches = BatchProducer(producer)
            records = [(topic, f"contact-{i}".encode(), b"x" * 100, None) for i in range(300)]
            records += [(topic, b"pinned", f"{i}".encode(), 2) for i in range(7)]
            first = await batches.send_all(records)
            second = await batches.send_all(records)
            ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(4)])
            agree = []
            for i in range(40):
                meta = await (await plain.send(topic, b"v", key=f"contact-{i}".encode()))
                agree.append(meta.partition == batches.partition_of(f"contact-{i}".encode(), 4))
            consumer.assign([TopicPartition(topic, 2)])
            await consumer.seek_to_beginning(TopicPartition(topic, 2))
            pinned = []
            deadline = time.monotonic() + 30
            while len(pinned) < 14 and time.monotonic() < deadline:
                for msgs in (await consumer.getmany(timeout_ms=2000)).values():
                    pinned += [m.value for m in msgs if m.key == b"pinned"]
            return first, second, ends, agree, pinned
        finally:
            await consumer.stop()
            await plain.stop()
            await producer.stop()

    first, second, ends, agree, pinned = asyncio.run(run())
    assert sum(o + 1 for o in first.values()) == 307
    assert {p: o + 1 for (_, p), o in second.items()} == {tp.partition: end for tp, end in ends.items() if end}
    assert all(agree)
    assert pinned == [f"{i}".encode() for i in range(7)] * 2  # order kept within a partition
