"""Driving ``agents.app.Pipeline`` without Kafka: a record as aiokafka's consumer gives it, and a
pipeline over local RocksDB (no sink), and a producer that acknowledges changelog records."""
from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from agents.app import Pipeline
from sendtrail.metrics import Metrics
from sendtrail.settings import Settings


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    timestamp: int = 0


def local_pipeline(path, partitions: int) -> Pipeline:
    settings = Settings.from_env({"SENDTRAIL_DATA_DIR": str(path), "SENDTRAIL_PARTITIONS": str(partitions)})
    return Pipeline(settings, Metrics(CollectorRegistry()), sink=None)


class FakeProducer:
    """A BatchProducer stand-in: records sends, assigns offsets per partition; sends to ``fail_topic`` fail."""

    def __init__(self, fail_topic: str | None = None) -> None:
        self.sent: list[tuple[str, int, bytes, bytes | None]] = []
        self.offsets: dict[tuple[str, int], int] = {}
        self.fail_topic = fail_topic
        self.calls = 0

    async def send_all(self, records):
        self.calls += 1
        records = list(records)
        if any(topic == self.fail_topic for topic, _, _, _ in records):
            raise ConnectionError("broker gone")
        last = {}
        for topic, key, value, partition in records:
            offset = self.offsets.get((topic, partition), 0)
            self.offsets[(topic, partition)] = offset + 1
            self.sent.append((topic, partition, key, value))
            last[(topic, partition)] = offset
        return last
