"""Partition-local state tables: one RocksDB (rocksdict) per table partition, backed by a compacted
changelog topic with the same partitions as the input topics.

Write protocol, once per batch (:meth:`StateTables.commit`):

1. every staged key goes to its table's changelog partition, and the producer waits for the
   acknowledgements (``acks=all``);
2. then the same keys are written to the local RocksDB in one ``WriteBatch``, together with the
   offset of the last changelog record of that partition (the *applied marker*).

So a local store is always a prefix of its changelog. Recovery (:meth:`StateTables.recover`)
replays the changelog from ``marker + 1`` to its end; it never writes an older value over a newer
local one. (Faust's recovery could: a changelog read up to a stale highwater overwrote newer
local writes after a mid-stream rebalance, and a contact was lost in the SIGKILL test.)
A store whose marker is beyond its changelog's end, or before its start, belongs to another
history (topics recreated, retention): it is wiped and rebuilt from the changelog.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

from rocksdict import Options, Rdict, WriteBatch

log = logging.getLogger(__name__)

#: Sorts before every table key (keys are ids in UTF-8); never returned by iteration.
MARKER_KEY = b"\x00sendtrail:changelog-offset"
RECOVERY_CHUNK = 5000


def _merge(stored: Iterator[tuple[bytes, bytes]], overlay: dict[bytes, bytes | None]
           ) -> Iterator[tuple[bytes, bytes]]:
    """Stored items with the overlay's writes applied (``None`` deletes), in key order."""
    pending = sorted(overlay)
    i = 0
    for key, value in stored:
        while i < len(pending) and pending[i] < key:
            if overlay[pending[i]] is not None:
                yield pending[i], overlay[pending[i]]
            i += 1
        if key in overlay:
            continue
        yield key, value
    for k in pending[i:]:
        if overlay[k] is not None:
            yield k, overlay[k]


def changelog_topic(group: str, table: str) -> str:
    """Same naming as Faust's table changelogs (``<app id>-<table>-changelog``)."""
    return f"{group}-{table}-changelog"


class PartitionStore:
    """One partition of one table in its own RocksDB directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = Rdict(str(path), options=Options(raw_mode=True))

    def get(self, key: bytes) -> bytes | None:
        return self._db.get(key)

    def items(self, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Keys and values in key order, optionally those starting with ``prefix``."""
        items = self._db.items(from_key=prefix) if prefix else self._db.items()
        for key, value in items:
            if prefix and not key.startswith(prefix):
                break
            if key == MARKER_KEY:
                continue
            yield key, value

    @property
    def marker(self) -> int:
        """Offset of the last changelog record applied here; -1 when none."""
        raw = self._db.get(MARKER_KEY)
        return int(raw) if raw else -1

    def write(self, writes: dict[bytes, bytes | None], marker: int) -> None:
        """Apply puts (bytes) and deletes (None) and move the marker, atomically."""
        batch = WriteBatch(raw_mode=True)
        for key, value in writes.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        batch.put(MARKER_KEY, str(marker).encode())
        self._db.write(batch)

    def estimate_keys(self) -> int:
        return int(self._db.property_int_value("rocksdb.estimate-num-keys") or 0)

    def wipe(self) -> None:
        self._db.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self._db = Rdict(str(self.path), options=Options(raw_mode=True))

    def close(self) -> None:
        self._db.close()


class StateTables:
    """The worker's tables by name and partition, with layered staged writes and changelog recovery.

    Writes are staged with :meth:`put` into the open layer; :meth:`seal` closes it (one layer
    per batch) and :meth:`commit_layer` makes the oldest sealed layer durable. Reads
    (:meth:`get`, :meth:`items`) see the open layer, then the sealed layers newest first, then
    the local store: a batch sees the state left by the batches before it while their effects
    and state are still being made durable.
    """

    def __init__(self, root: Path, group: str, tables: list[str],
                 phase: Callable[[str, bool], int] | None = None) -> None:
        self.root = root
        self.group = group
        self.tables = list(tables)
        #: (table, is a delete) -> the write's phase: a layer's changelog records are sent phase by
        #: phase, each acknowledged before the next is sent (see :meth:`commit_layer`)
        self.phase = phase or (lambda table, delete: 0)
        self._stores: dict[tuple[str, int], PartitionStore] = {}
        self._open: dict[tuple[str, int], dict[bytes, bytes | None]] = {}
        self._layers: deque[dict[tuple[str, int], dict[bytes, bytes | None]]] = deque()

    def topic(self, table: str) -> str:
        return changelog_topic(self.group, table)

    def store(self, table: str, partition: int) -> PartitionStore:
        key = (table, partition)
        store = self._stores.get(key)
        if store is None:
            store = PartitionStore(self.root / table / str(partition))
            self._stores[key] = store
        return store

    def get(self, table: str, partition: int, key: bytes) -> bytes | None:
        if self._open or self._layers:
            tp = (table, partition)
            writes = self._open.get(tp)
            if writes is not None and key in writes:
                return writes[key]
            for layer in reversed(self._layers):
                writes = layer.get(tp)
                if writes is not None and key in writes:
                    return writes[key]
        return self.store(table, partition).get(key)

    def items(self, table: str, partition: int, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Keys and values in key order (optionally those starting with ``prefix``), staged writes included."""
        stored = self.store(table, partition).items(prefix)
        tp = (table, partition)
        overlay: dict[bytes, bytes | None] = {}
        for writes in (*(layer.get(tp) for layer in self._layers), self._open.get(tp)):
            if writes:
                overlay.update((k, v) for k, v in writes.items() if k.startswith(prefix))
        return _merge(stored, overlay) if overlay else stored

    def put(self, table: str, partition: int, key: bytes, value: bytes | None) -> None:
        """Stage a write (``None`` deletes) in the open layer."""
        writes = self._open.get((table, partition))
        if writes is None:
            writes = self._open[(table, partition)] = {}
        writes[key] = value

    @property
    def staged(self) -> int:
        """Writes staged and not yet durable (open and sealed layers)."""
        return sum(len(w) for layer in (*self._layers, self._open) for w in layer.values())

    def seal(self) -> dict:
        """Close the open layer (the batch's writes) and return it, for :meth:`commit_layer`."""
        layer, self._open = self._open, {}
        self._layers.append(layer)
        return layer

    def discard(self) -> None:
        """Drop every staged write, open and sealed (a failed batch is replayed from Kafka)."""
        self._open = {}
        self._layers.clear()

    async def commit(self, producer: Any) -> int:
        """Seal the open layer and commit it (and any older sealed one)."""
        self.seal()
        written = 0
        while self._layers:
            written += await self.commit_layer(self._layers[0], producer)
        return written

    async def commit_layer(self, layer: dict, producer: Any) -> int:
        """Make the oldest sealed layer durable: changelog first (acknowledged), then the local
        stores with their markers; returns the number of records written. ``producer`` is an
        :class:`agents.produce.BatchProducer`. On a failed send nothing is applied locally and the
        layer stays (retry, or :meth:`discard`).

        A process killed while the changelog records are sent leaves part of the layer in the
        changelogs, and a recovery from them gives that part. The records go out phase by phase
        (each acknowledged before the next is sent), so that the part that can be left is one
        the tables tolerate: e.g. an automation's definition before the enrollments applied
        under it, the enrollments before the parked events they took in (a parked event deleted
        while the enrollment that applied it was not written would be lost)."""
        if not self._layers or self._layers[0] is not layer:
            raise RuntimeError("state layers must be committed in the order they were sealed")
        if not layer:
            self._layers.popleft()
            return 0
        phases: dict[int, list[tuple[str, bytes, bytes | None, int]]] = {}
        for (table, partition), writes in layer.items():
            topic = self.topic(table)
            put_phase, delete_phase = self.phase(table, False), self.phase(table, True)
            for key, value in writes.items():
                phases.setdefault(delete_phase if value is None else put_phase, []).append(
                    (topic, key, value, partition))
        last: dict = {}
        for phase in sorted(phases):
            for tp, offset in (await producer.send_all(phases[phase])).items():
                last[tp] = max(offset, last.get(tp, -1))
        written = 0
        for (table, partition), writes in layer.items():
            self.store(table, partition).write(writes, last[(self.topic(table), partition)])
            written += len(writes)
        self._layers.popleft()
        return written

    async def recover(self, consumer: Any, partitions: list[tuple[str, int]]) -> dict[str, int]:
        """Bring the given table partitions up to their changelog's end; returns records applied per table.

        ``consumer`` is a group-less ``AIOKafkaConsumer`` used only for changelogs."""
        from aiokafka import TopicPartition

        if not partitions:
            return {}
        by_tp = {TopicPartition(self.topic(t), p): (t, p) for t, p in partitions}
        tps = list(by_tp)
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        pending: dict[Any, int] = {}  # changelog partition -> its end offset
        seek_to: dict[Any, int] = {}
        for tp in tps:
            table, partition = by_tp[tp]
            store = self.store(table, partition)
            marker, end, start = store.marker, ends[tp], starts[tp]
            foreign = marker >= end or (0 <= marker < start - 1) or (marker < 0 and next(store.items(), None))
            if foreign:
                log.warning("state %s[%d]: local marker %d outside changelog [%d, %d): rebuilding it",
                            table, partition, marker, start, end)
                store.wipe()
                marker = -1
            if marker + 1 < end:
                pending[tp] = end
                seek_to[tp] = max(marker + 1, start)
        consumer.assign(list(pending))
        for tp, offset in seek_to.items():
            consumer.seek(tp, offset)
        applied: dict[str, int] = {}
        began = time.monotonic()
        while pending:
            batches = await consumer.getmany(*pending, timeout_ms=1000, max_records=RECOVERY_CHUNK)
            for tp, records in batches.items():
                end = pending.get(tp)
                if end is None:
                    continue
                writes: dict[bytes, bytes | None] = {}
                last = -1
                for rec in records:
                    if rec.offset >= end:
                        break
                    writes[rec.key] = rec.value
                    last = rec.offset
                if last >= 0:
                    self.store(*by_tp[tp]).write(writes, last)
                    table = by_tp[tp][0]
                    applied[table] = applied.get(table, 0) + len(writes)
                if records and records[-1].offset + 1 >= end:
                    pending.pop(tp)
                    consumer.pause(tp)
        consumer.assign([])
        if applied:
            log.info("state recovered from changelogs in %.2fs: %s", time.monotonic() - began, applied)
        return applied

    def estimate_keys(self, table: str) -> int:
        return sum(s.estimate_keys() for (t, _), s in self._stores.items() if t == table)

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()
