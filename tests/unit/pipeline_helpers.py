"""Driving ``agents.app.Pipeline`` without Kafka: a record as aiokafka's consumer gives it, and a
pipeline over local RocksDB (no sink)."""
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
