"""The consume-process-commit loop around :class:`agents.app.Pipeline` (aiokafka, no Faust).

One consumer group member subscribes to every input and internal topic. Kafka's range
assignor gives a member the same partition numbers of topics with equal partition counts,
so a contact's enrollments, sends and forwarded outcomes (and a message's provider events and
send registration) reach one member, which owns the matching state-table partitions.

Per batch (``getmany``, bounded by ``batch_size`` and ``batch_seconds``), under the batch lock:

1. the pipeline turns the records into outputs, rows and state writes, staged in a layer of the
   tables over the layers of earlier batches not yet durable;
2. once the previous batch is durable, a task makes this one durable: outputs produced and
   acknowledged, rows written to ClickHouse (effects first), then the batch's state layer to the
   changelogs (acknowledged) and the local stores, then its offsets committed;
3. meanwhile the loop fetches and processes the next batch, so the ClickHouse inserts and Kafka
   round trips of one batch overlap the processing of the next.

A crash at any point replays from the last commit; replays are idempotent (facts merge, rows
are ReplacingMergeTree with stable keys and versions, outputs carry stable ids). A failed batch
drops every staged layer and is retried, with the batch processed after it, from their first
records after a backoff; the worker never stops for input.

Rebalances (eager: everything revoked, then assigned): ``on_partitions_revoked`` waits for the
running batch to end (its offsets committed), ``on_partitions_assigned`` recovers the assigned
state partitions from their changelogs before any record of them is processed. Records fetched
before a rebalance are dropped and fetched again from the committed offsets.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from agents.produce import BatchProducer
from agents.state import StateTables
from sendtrail.settings import Settings

log = logging.getLogger(__name__)

MAX_RETRY_SECONDS = 30.0
#: Offset commit metadata: the member stopped cleanly (drained, every processed batch durable).
CLEAN = "sendtrail:clean"
#: Offset commit metadata: the partition's first owner is about to process it.
STARTED = "sendtrail:started"
#: Lays out each topic's partitions over the sorted members in the same ranges, so topics with
#: equal partition counts are co-partitioned (tests/unit/test_state_tables.py checks it).
ASSIGNOR = RangePartitionAssignor


class _Listener(ConsumerRebalanceListener):
    def __init__(self, runtime: "Runtime") -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.runtime.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.runtime.on_assigned(set(assigned))


class Runtime:
    """Runs a pipeline: ``await start()``, then ``await run()`` until ``stop()``."""

    def __init__(self, settings: Settings, pipeline: Any) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.group = pipeline.group_id
        self.tables: StateTables = pipeline.tables
        self.metrics = pipeline.metrics
        self.producer: AIOKafkaProducer | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self._changelog_reader: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        self.generation = 0
        self.assignment: set[TopicPartition] = set()
        self.recovering = False
        self.committed: dict[TopicPartition, int] = {}
        self.durable: dict[TopicPartition, int] = {}  # next offset after the last durable batch
        self._stopping = asyncio.Event()
        self._ticker: asyncio.Task | None = None
        self.fatal: BaseException | None = None
        self._inflight: asyncio.Future | None = None  # the last batch, being made durable
        self._uncommitted: list[dict] = []  # fetched batches whose state is not durable yet, in order
        #: partition -> first offset whose effects surely were not emitted by an earlier attempt
        self.replay_until: dict[TopicPartition, int] = {}

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        await self._ensure_changelogs()
        self.producer = AIOKafkaProducer(bootstrap_servers=s.kafka, acks="all", linger_ms=5,
                                         max_batch_size=256 * 1024, max_request_size=2 * 1024 * 1024)
        await self.producer.start()
        self.pipeline.producer = BatchProducer(self.producer)
        self._changelog_reader = AIOKafkaConsumer(bootstrap_servers=s.kafka, enable_auto_commit=False,
                                                  max_partition_fetch_bytes=4 * 1024 * 1024)
        await self._changelog_reader.start()
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka, group_id=self.group, enable_auto_commit=False,
            auto_offset_reset="earliest", max_poll_records=s.batch_size,
            # co-partitioning: every member gets the same partition numbers of every topic
            # (aiokafka's default, round robin, would split a contact's topics across members)
            partition_assignment_strategy=(ASSIGNOR,),
            # A killed worker's membership expires after this, so its partitions move on soon.
            session_timeout_ms=10_000, heartbeat_interval_ms=3_000,
            # Fetched chunks are drained one partition at a time: smaller chunks interleave the
            # internal hops with a backlog of input (latency) at no measurable throughput cost.
            max_partition_fetch_bytes=256 * 1024)
        self.consumer.subscribe(self.pipeline.input_topics, listener=_Listener(self))
        await self.consumer.start()
        self._ticker = asyncio.create_task(self._tick_loop(), name="sendtrail-resume-ticks")

    async def _ensure_changelogs(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic
        from aiokafka.errors import TopicAlreadyExistsError

        s = self.settings
        admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            wanted = [NewTopic(self.tables.topic(t), num_partitions=s.partitions,
                               replication_factor=s.replication_factor,
                               topic_configs={"cleanup.policy": "compact"})
                      for t in self.tables.tables if self.tables.topic(t) not in existing]
            if wanted:
                try:
                    await admin.create_topics(wanted)
                except TopicAlreadyExistsError:
                    pass
        finally:
            await admin.close()

    def stop(self) -> None:
        self._stopping.set()

    async def close(self) -> None:
        """Leave the group (after the running batch) and release every resource."""
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        async with self._lock:
            await self._drain()
            if self.consumer is not None:
                await self._commit_clean(self.assignment)
                await self.consumer.stop()
            if self._changelog_reader is not None:
                await self._changelog_reader.stop()
            if self.producer is not None:
                await self.producer.stop()
            self.tables.close()

    # ---- rebalances ---------------------------------------------------------------------------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:  # the running batch ends and commits first
            await self._drain()
            await self._commit_clean(revoked)
            self.generation += 1
            self.assignment = set()
            for tp in revoked:
                self.committed.pop(tp, None)
                self.durable.pop(tp, None)
                self.metrics.forget_partition(self.pipeline.contract_name.get(tp.topic, tp.topic), tp.partition)
        self.metrics.rebalanced("revoked")

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        async with self._lock:
            self.generation += 1
            self.recovering = True
            began = time.monotonic()
            try:
                wanted = sorted({(table, tp.partition) for tp in assigned
                                 for table in self.pipeline.tables_of_topic(tp.topic)})
                applied = await self.tables.recover(self._changelog_reader, wanted)
                for table, n in applied.items():
                    self.metrics.state_recovered(table, n)
            except Exception as exc:
                # Processing without the recovered state would be wrong: stop (a restart recovers again).
                log.exception("state recovery failed; stopping the worker")
                self.fatal = exc
                self._stopping.set()
                raise
            finally:
                self.recovering = False
            self.metrics.observe_recovery(time.monotonic() - began)
            self.assignment = set(assigned)
            self.durable = {}
            self.replay_until = await self._replay_ranges(assigned)
            try:
                # report counters: recount the partitions a crash may have left with part of a batch
                self.pipeline.counters_assigned(assigned, set(self.replay_until))
                await self.tables.commit(self.pipeline.producer)
            except Exception as exc:
                log.exception("recounting the report counters failed; stopping the worker")
                self.fatal = exc
                self._stopping.set()
                raise
        self.metrics.rebalanced("assigned")
        log.info("assigned %d partitions: %s", len(assigned),
                 ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)))

    async def _replay_ranges(self, assigned: set[TopicPartition]) -> dict[TopicPartition, int]:
        """Sets ``self.committed``; returns, per partition, the offset below which records may have
        had their effects emitted by an earlier attempt (a member that crashed, or that left
        without its last offsets committed).

        Such a member may have emitted the effects of up to three batches above its committed
        offset (one whose offset commit was under way, one being made durable and the one
        processed meanwhile): the keys of those records re-emit all their rows when they are
        processed again. A member that stopped cleanly committed its offsets with ``CLEAN`` as
        metadata: nothing to replay there. A partition nobody committed is new: it is marked
        ``STARTED`` before its first record is processed, so that a crash before the first
        batch's commit is told apart from a fresh start.
        """
        known = True  # the commits' metadata is known
        try:
            # aiokafka's public committed() drops the metadata; the coordinator call keeps it
            found = await self.consumer._coordinator.fetch_committed_offsets(list(assigned))
        except Exception:
            log.warning("could not read the commits' metadata; replaying above every commit", exc_info=True)
            known, found = False, {}
            for tp in assigned:
                try:
                    offset = await self.consumer.committed(tp)
                except Exception:
                    log.exception("could not read the committed offset of %s", tp)
                    continue
                if offset is not None:
                    found[tp] = OffsetAndMetadata(offset, "")
        span = 3 * self.settings.batch_size
        self.committed = {}
        replay: dict[TopicPartition, int] = {}
        fresh = []
        for tp in assigned:
            meta = found.get(tp)
            if meta is None or meta.offset < 0:
                fresh.append(tp)
                continue
            self.committed[tp] = meta.offset
            if meta.metadata != CLEAN:
                replay[tp] = meta.offset + span
        if fresh:
            starts = await self.consumer.beginning_offsets(fresh)
            try:
                if not known:
                    raise RuntimeError("commits unknown")
                await self.consumer.commit({tp: (starts[tp], STARTED) for tp in fresh})
                self.committed.update({tp: starts[tp] for tp in fresh})
            except Exception:
                log.warning("could not mark new partitions started; treating them as replayed", exc_info=True)
                replay.update({tp: starts[tp] + span for tp in fresh})
        return replay

    async def _commit_clean(self, partitions: set[TopicPartition]) -> None:
        """After a drain: commit the durable offsets of ``partitions`` as ``CLEAN`` (every record
        below them is durable and none above was processed), unless records above them may have
        had effects emitted (a failed batch not processed again yet)."""
        try:
            await self.pipeline.flush_counter_rows()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("could not write the report counter rows; the next owner recounts", exc_info=True)
        if self.pipeline.has_pending_rows:
            return  # not a clean stop: the next owner recounts the counters
        offsets = {}
        for tp in partitions:
            off = self.durable.get(tp, self.committed.get(tp))
            if off is not None and self.replay_until.get(tp, 0) <= off:
                offsets[tp] = (off, CLEAN)
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
            self.committed.update({tp: off for tp, (off, _) in offsets.items()})
        except Exception:
            log.warning("could not commit the clean stop; the next owner replays the last batches", exc_info=True)

    # ---- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        s = self.settings
        delay = 0.5
        timeout_ms = int(s.batch_seconds * 1000)
        stop_wait = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                generation = self.generation
                fetch = asyncio.ensure_future(self.consumer.getmany(timeout_ms=timeout_ms,
                                                                    max_records=s.batch_size))
                done, _ = await asyncio.wait({fetch, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if fetch not in done:
                    fetch.cancel()
                    await asyncio.gather(fetch, return_exceptions=True)
                    break
                fetched = fetch.result()
                async with self._lock:
                    if generation != self.generation:
                        continue  # a rebalance happened meanwhile: fetched again from the committed offsets
                    try:
                        if fetched:
                            await self._process(fetched)
                        elif self._inflight is None or self._inflight.done():
                            await self._await_inflight()  # raises if the last batch failed
                            # Idle: the counter rows of the last batches go now, not with a next
                            # batch that may not come (the reports would lag until it did).
                            await self.pipeline.flush_counter_rows()
                        else:
                            continue
                        delay = 0.5
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("batch failed; retrying from the last durable offsets in %.1fs", delay)
                        self.metrics.batch_failed()
                        await self._reset(fetched)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, MAX_RETRY_SECONDS)
        finally:
            stop_wait.cancel()
        if self.fatal is not None:
            raise RuntimeError("the worker stopped: state recovery failed") from self.fatal

    async def _process(self, fetched: dict[TopicPartition, list]) -> None:
        """Process a batch while the previous one is being made durable (two-stage pipeline).

        The batch is processed over the previous batch's staged state (a sealed layer of the
        tables). Its effects start once the previous batch is durable, so outputs and rows keep
        the batches' order; they, its state commit and its offset commit then run while the
        next batch is fetched and processed.
        """
        began = time.perf_counter()
        replay = self.replay_until
        if replay:
            for tp in [tp for tp, until in replay.items() if self.committed.get(tp, -1) >= until]:
                del replay[tp]  # past the replayed range
        self._uncommitted.append(fetched)
        ctx = self.pipeline.prepare(fetched, {tp: replay[tp] for tp in fetched if tp in replay})
        layer = self.tables.seal()
        await self._await_inflight()
        offsets = {tp: records[-1].offset + 1 for tp, records in fetched.items() if records}
        self._inflight = asyncio.ensure_future(self._finish(ctx, layer, offsets, began))

    async def _finish(self, ctx: Any, layer: dict, offsets: dict[TopicPartition, int], began: float) -> None:
        """Effects durable, then the state layer, then the offsets (a failed offset commit is
        logged: the next batch's commit covers it)."""
        await self.pipeline.finish(ctx)
        written = await self.tables.commit_layer(layer, self.pipeline.producer)
        self.pipeline.state_committed(ctx)
        if written:
            self.metrics.changelog_written(written)
        self._uncommitted.pop(0)
        self.durable.update(offsets)
        try:
            await self.consumer.commit(offsets)
            self.committed.update(offsets)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("offset commit failed; the next batch's commit covers it", exc_info=True)
        self.metrics.batch_done(time.perf_counter() - began)

    async def _await_inflight(self) -> None:
        """Wait until the batch in flight is durable; raises its error if it failed."""
        task, self._inflight = self._inflight, None
        if task is not None:
            await task

    async def _drain(self) -> None:
        """Finish the batch in flight; if it fails, drop the staged state (it is replayed from
        the committed offsets by whoever owns the partitions next)."""
        try:
            await self._await_inflight()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the last batch failed; its records are processed again from the committed offsets")
            self.metrics.batch_failed()
            self.tables.discard()
            self._mark_replayed(self._uncommitted)  # so that a stop now is not committed as clean
            self._uncommitted = []

    async def _reset(self, fetched: dict[TopicPartition, list]) -> None:
        """After a failure: let the batch in flight end, drop all staged state and seek every
        partition of a batch that is not durable back to its first record. Those batches may
        have emitted some effects, so their records count as replayed."""
        try:
            await self._await_inflight()
        except asyncio.CancelledError:
            raise
        except Exception:
            pass  # the failure being handled, or one its reset covers
        self.tables.discard()
        batches = self._uncommitted + ([fetched] if fetched and all(b is not fetched for b in self._uncommitted) else [])
        self._uncommitted = []
        assignment = self.consumer.assignment()
        for tp, offset in self._mark_replayed(batches).items():
            if tp in assignment:
                self.consumer.seek(tp, offset)

    def _mark_replayed(self, batches: list[dict[TopicPartition, list]]) -> dict[TopicPartition, int]:
        """Count the records of ``batches`` (not durable; some of their effects may be out) as
        replayed; returns each partition's first record among them."""
        first: dict[TopicPartition, int] = {}
        for batch in batches:
            for tp, records in batch.items():
                if records:
                    first[tp] = min(first.get(tp, records[0].offset), records[0].offset)
                    self.replay_until[tp] = max(self.replay_until.get(tp, 0), records[-1].offset + 1)
        return first

    async def _tick_loop(self) -> None:
        """Ask every assigned contacts partition to auto-resume holds whose date has passed."""
        while True:
            await asyncio.sleep(self.settings.resume_check_seconds)
            try:
                await self.pipeline.send_ticks(self.assignment, int(time.time() * 1000))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not send resume ticks (next try in %.0fs)", self.settings.resume_check_seconds)

    # ---- gauges -------------------------------------------------------------------------------

    def update_gauges(self) -> None:
        """Lag per assigned input partition and keys per state table."""
        consumer = self.consumer
        if consumer is None:
            return
        for tp in list(self.assignment):
            topic = self.pipeline.contract_name.get(tp.topic)
            if topic is None:
                continue
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            self.metrics.set_consumer_offsets(topic, tp.partition, self.committed.get(tp), highwater)
        for table in self.tables.tables:
            self.metrics.set_state_table_keys(table, self.tables.estimate_keys(table))
