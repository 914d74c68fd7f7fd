"""How far the worker's consumer group is behind: committed offsets against end offsets, from Kafka itself."""
from __future__ import annotations

import asyncio
import time

from schemas.topics import TOPICS, topic_names
from sendtrail.settings import Settings

#: Topics the worker consumes (contract inputs and internal ones).
CONSUMED = [name for name, t in TOPICS.items() if t.role in ("input", "internal")]


async def group_lag(settings: Settings) -> dict[str, int]:
    """Messages not yet committed by the worker's group, per consumed topic (group id: topic prefix + consumer group)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    group = f"{settings.topic_prefix}{settings.consumer_group}"
    names = topic_names(settings.topic_prefix)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka, enable_auto_commit=False)
    try:
        await admin.start()
        await consumer.start()
        committed = await admin.list_consumer_group_offsets(group)
        tps = []
        for base in CONSUMED:
            for p in consumer.partitions_for_topic(names[base]) or await _partitions(consumer, names[base]):
                tps.append(TopicPartition(names[base], p))
        ends = await consumer.end_offsets(tps)
        lag: dict[str, int] = {}
        by_full = {v: k for k, v in names.items()}
        for tp in tps:
            meta = committed.get(tp)
            done = meta.offset if meta is not None and meta.offset >= 0 else 0
            lag[by_full[tp.topic]] = lag.get(by_full[tp.topic], 0) + max(0, ends[tp] - done)
        return lag
    finally:
        await consumer.stop()
        await admin.close()


async def committed_metadata(settings: Settings) -> dict[tuple[str, int], tuple[int, str]]:
    """The group's commits on the consumed topics: (contract topic, partition) -> (offset, metadata)."""
    from aiokafka.admin import AIOKafkaAdminClient

    group = f"{settings.topic_prefix}{settings.consumer_group}"
    by_full = {v: k for k, v in topic_names(settings.topic_prefix).items() if k in CONSUMED}
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {(by_full[tp.topic], tp.partition): (meta.offset, meta.metadata)
            for tp, meta in committed.items() if tp.topic in by_full}


async def _partitions(consumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()
    return consumer.partitions_for_topic(topic) or set()


async def wait_caught_up(settings: Settings, timeout: float = 600.0, stable_checks: int = 3,
                         interval: float = 1.0) -> dict[str, int]:
    """Wait until the group has committed everything, ``stable_checks`` times in a row."""
    deadline = time.monotonic() + timeout
    streak = 0
    lag: dict[str, int] = {}
    error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            lag, error = await group_lag(settings), None
        except Exception as exc:  # group not formed yet, broker busy: try again
            lag, error = {"unknown": -1}, exc
        streak = streak + 1 if lag and all(v == 0 for v in lag.values()) else 0
        if streak >= stable_checks:
            return lag
        await asyncio.sleep(interval)
    if error is not None:
        raise TimeoutError(f"no lag read from Kafka at {settings.kafka} in {timeout:.0f}s; last error: {error!r}")
    raise TimeoutError(f"worker still behind after {timeout:.0f}s: {lag}")
