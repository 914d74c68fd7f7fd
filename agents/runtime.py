"""The consume-process-commit loop around :class:`agents.app.Pipeline` (aiokafka, no Faust).

One consumer group member subscribes to every input and internal topic. Kafka's range
assignor gives a member the same partition numbers of topics with equal partition counts,
so a contact's enrollments, sends and forwarded outcomes (and a message's provider events and
send registration) reach one member, which owns the matching state-table partitions.

Per batch (``getmany``, bounded by ``batch_size`` and ``batch_seconds``), under the batch lock:

1. the pipeline turns the records into outputs, rows and staged state writes;
2. outputs are produced and acknowledged, rows are written to ClickHouse (effects first);
3. staged state goes to the changelogs (acknowledged), then to the local stores;
4. the batch's offsets are committed.

A crash at any point replays from the last commit; replays are idempotent (facts merge, rows
are ReplacingMergeTree with stable keys and versions, outputs carry stable ids). A failed batch
is retried from the committed offsets after a backoff; the worker never stops for input.

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
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from agents.produce import BatchProducer
from agents.state import StateTables
from sendtrail.settings import Settings

log = logging.getLogger(__name__)

MAX_RETRY_SECONDS = 30.0
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
        self._stopping = asyncio.Event()
        self._ticker: asyncio.Task | None = None
        self.fatal: BaseException | None = None
        self._commit_task: asyncio.Future | None = None
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
            await self._await_commit()
            if self.consumer is not None:
                await self.consumer.stop()
            if self._changelog_reader is not None:
                await self._changelog_reader.stop()
            if self.producer is not None:
                await self.producer.stop()
            self.tables.close()

    # ---- rebalances ---------------------------------------------------------------------------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:  # the running batch ends and commits first
            await self._await_commit()
            self.generation += 1
            self.assignment = set()
            for tp in revoked:
                self.committed.pop(tp, None)
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
            committed = {}
            for tp in assigned:
                try:
                    committed[tp] = await self.consumer.committed(tp)
                except Exception:
                    log.exception("could not read the committed offset of %s", tp)
            self.committed = {tp: off for tp, off in committed.items() if off is not None}
            # A member that crashed may have emitted the effects of up to two uncommitted batches
            # (the one being committed and the next): their keys re-emit all rows on replay.
            starts = await self.consumer.beginning_offsets([tp for tp in assigned if tp not in self.committed])
            span = 2 * self.settings.batch_size
            self.replay_until = {tp: (self.committed.get(tp) if tp in self.committed else starts[tp]) + span
                                 for tp in assigned}
        self.metrics.rebalanced("assigned")
        log.info("assigned %d partitions: %s", len(assigned),
                 ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)))

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
                if not fetched:
                    continue
                async with self._lock:
                    if generation != self.generation:
                        continue  # a rebalance happened meanwhile: fetched again from the committed offsets
                    try:
                        await self._process(fetched)
                        delay = 0.5
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("batch failed; retrying from the committed offsets in %.1fs", delay)
                        self.metrics.batch_failed()
                        self.tables.discard()
                        await self._rewind(fetched)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, MAX_RETRY_SECONDS)
        finally:
            stop_wait.cancel()
        if self.fatal is not None:
            raise RuntimeError("the worker stopped: state recovery failed") from self.fatal

    async def _process(self, fetched: dict[TopicPartition, list]) -> None:
        began = time.perf_counter()
        replay = self.replay_until
        if replay:
            for tp in [tp for tp, until in replay.items() if self.committed.get(tp, -1) >= until]:
                del replay[tp]  # past the replayed range
        await self.pipeline.process(fetched, {tp: replay[tp] for tp in fetched if tp in replay})
        written = await self.tables.commit(self.pipeline.producer)
        if written:
            self.metrics.changelog_written(written)
        offsets = {tp: records[-1].offset + 1 for tp, records in fetched.items() if records}
        # The batch is durable: its offsets are committed while the next batch is processed
        # (commits stay in order: the previous one is awaited first).
        await self._await_commit()
        self._commit_task = asyncio.ensure_future(self._commit(offsets))
        self.metrics.batch_done(time.perf_counter() - began)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        await self.consumer.commit(offsets)
        self.committed.update(offsets)

    async def _await_commit(self) -> None:
        """Wait for the last batch's commit; a failed commit is logged, a later one covers it."""
        task, self._commit_task = self._commit_task, None
        if task is None:
            return
        try:
            await task
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("offset commit failed; the next batch's commit covers it", exc_info=True)

    async def _rewind(self, fetched: dict[TopicPartition, list]) -> None:
        """Seek the failed batch's partitions back to their first record (not committed); the
        batch may have emitted some of its effects, so its records count as replayed."""
        for tp, records in fetched.items():
            if records and tp in self.consumer.assignment():
                self.consumer.seek(tp, records[0].offset)
                self.replay_until[tp] = max(self.replay_until.get(tp, 0), records[-1].offset + 1)

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
