"""Produce many records at once: one ``BatchBuilder`` per topic partition instead of one
``producer.send`` (future, accumulator bookkeeping, partitioner call) per record.

Keys pick partitions with Kafka's default partitioner (murmur2 of the key, as the Java clients,
aiokafka and the contract's producers do), so outputs keyed by contact id land on the contact's
partition of every topic.
"""
from __future__ import annotations

import random
from typing import Any, Iterable

from aiokafka.partitioner import murmur2

_PARTITION_CACHE_LIMIT = 200_000


class BatchProducer:
    """Wraps a started ``AIOKafkaProducer``."""

    def __init__(self, producer: Any) -> None:
        self.producer = producer
        self._partitions: dict[str, int] = {}
        self._key_partition: dict[tuple[bytes, int], int] = {}

    async def partition_count(self, topic: str) -> int:
        n = self._partitions.get(topic)
        if n is None:
            parts = await self.producer.partitions_for(topic)
            n = len(parts)
            self._partitions[topic] = n
        return n

    def partition_of(self, key: bytes | None, count: int) -> int:
        if key is None:
            return random.randrange(count)
        ck = (key, count)
        p = self._key_partition.get(ck)
        if p is None:
            if len(self._key_partition) >= _PARTITION_CACHE_LIMIT:
                self._key_partition.clear()
            p = (murmur2(key) & 0x7FFFFFFF) % count
            self._key_partition[ck] = p
        return p

    async def send_all(self, records: Iterable[tuple[str, bytes | None, bytes | None, int | None]]) -> dict:
        """Send ``(topic, key, value, partition or None)`` records and wait until Kafka acknowledged
        every one (raises otherwise). Returns the offset of the last record per (topic, partition).

        Records of one topic partition keep their order."""
        groups: dict[tuple[str, int], list[tuple[bytes | None, bytes | None]]] = {}
        for topic, key, value, partition in records:
            if partition is None:
                partition = self.partition_of(key, await self.partition_count(topic))
            groups.setdefault((topic, partition), []).append((key, value))
        producer = self.producer
        pending = []
        for (topic, partition), items in groups.items():
            batch = producer.create_batch()
            count = 0
            for key, value in items:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    pending.append((topic, partition, await producer.send_batch(batch, topic, partition=partition),
                                    count))
                    batch = producer.create_batch()
                    count = 0
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        raise ValueError(f"a record of {len(value or b'')} bytes does not fit a batch for {topic}")
                count += 1
            pending.append((topic, partition, await producer.send_batch(batch, topic, partition=partition), count))
        last: dict[tuple[str, int], int] = {}
        for topic, partition, fut, count in pending:
            meta = await fut  # raises if the broker refused the batch
            end = meta.offset + count - 1  # the records of a batch get consecutive offsets from its base
            if end > last.get((topic, partition), -1):
                last[(topic, partition)] = end
        return last
