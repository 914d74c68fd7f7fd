"""``sendtrail worker``: migrate, create topics, then run the agents, the sink and the HTTP API in one process."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import mode
from prometheus_client import CollectorRegistry

from agents.app import Pipeline
from agents.sink import BatchWriter
from schemas.topics import TOPICS, topic_names
from sendtrail.clickhouse import connect
from sendtrail.metrics import Metrics
from sendtrail.migrate import migrate
from sendtrail.settings import Settings
from sendtrail.web import Publisher, WebDeps, build_web_app, serve, webhook_config_from

log = logging.getLogger(__name__)


async def ensure_topics(settings: Settings, timeout: float = 60.0) -> None:
    """Create every contract and internal topic with the configured partitions (Faust skips missing ones)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    names = topic_names(settings.topic_prefix)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka, request_timeout_ms=int(timeout * 1000))
    deadline = time.monotonic() + timeout
    while True:
        try:
            await admin.start()
            break
        except Exception as exc:  # the broker may still be starting
            if time.monotonic() > deadline:
                raise RuntimeError(f"Kafka at {settings.kafka} does not answer: {exc}") from exc
            log.warning("waiting for Kafka at %s: %s", settings.kafka, exc)
            await asyncio.sleep(1.0)
    try:
        existing = set(await admin.list_topics())
        wanted = []
        for base, full in names.items():
            if full in existing:
                continue
            spec = TOPICS[base]
            config = {"cleanup.policy": spec.cleanup_policy}
            wanted.append(NewTopic(full, num_partitions=settings.partitions,
                                   replication_factor=settings.replication_factor, topic_configs=config))
        if wanted:
            try:
                await admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass
        for _ in range(100):
            if set(names.values()) <= set(await admin.list_topics()):
                break
            await asyncio.sleep(0.1)
        log.info("topics ready: %s", ", ".join(sorted(names.values())))
    finally:
        await admin.close()


class SinkMetrics:
    """Adapts the sink's callbacks to the metric definitions."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def on_flush(self, table: str, rows: int, seconds: float) -> None:
        self.metrics.sink_flushed(table, rows, seconds)

    def on_failure(self, table: str, exc: BaseException) -> None:
        self.metrics.sink_failed(table)

    def on_retry(self, table: str, *args: Any) -> None:
        self.metrics.sink_retried(table)

    def on_backlog(self, rows: int) -> None:
        self.metrics.set_sink_backlog(rows)


def build_worker(settings: Settings) -> tuple[Pipeline, type]:
    """The Faust app of the worker, with the HTTP server and the sink as its services."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    sink = BatchWriter(lambda: connect(settings.clickhouse_url), max_rows=settings.batch_size * 4,
                       max_seconds=settings.batch_seconds, max_backlog_rows=settings.sink_max_backlog_rows,
                       retry_max_seconds=settings.sink_retry_max_seconds, metrics=SinkMetrics(metrics))
    pipeline = Pipeline(settings, metrics, sink)
    app = pipeline.app
    from sendtrail.api.routes import make_deps_for_client

    api_client = connect(settings.clickhouse_url)
    api_deps = make_deps_for_client(api_client, client_factory=lambda: connect(settings.clickhouse_url),
                                    stuck_after_seconds=settings.stuck_after_seconds)
    publisher = Publisher(settings.kafka, settings.topic_prefix)

    async def readiness() -> list[str]:
        reasons = []
        try:
            await publisher.ping()
        except Exception as exc:
            reasons.append(f"kafka: not reachable at {settings.kafka} ({type(exc).__name__}: {exc})")
        try:
            await asyncio.wait_for(api_deps.query("SELECT 1", {}), 5.0)
        except Exception as exc:
            reasons.append(f"clickhouse: {type(exc).__name__}: {exc}")
        if not app.assignor.assigned_actives():
            reasons.append("partitions: none assigned yet")
        recovery = getattr(app.tables, "recovery", None)
        if recovery is not None and not recovery.completed.is_set():
            reasons.append("recovery: state tables are still recovering")
        if sink.backlog_rows >= settings.sink_max_backlog_rows:
            reasons.append(f"sink: backlog full ({sink.backlog_rows} rows)")
        return reasons

    web_app = build_web_app(WebDeps(settings=settings, metrics=metrics, registry=registry, publisher=publisher,
                                    api_deps=api_deps, readiness=readiness,
                                    webhook_config=webhook_config_from(settings)))

    class Edge(mode.Service):
        """The HTTP server, the Kafka publisher and the periodic gauges, started and stopped with the app."""

        runner = None

        async def on_start(self) -> None:
            await publisher.start()
            self.runner = await serve(web_app, settings.web_host, settings.web_port)
            metrics.set_up(True)
            log.info("HTTP API on http://%s:%d", settings.web_host, settings.web_port)

        @mode.Service.task
        async def _gauges(self) -> None:
            while not self.should_stop:
                try:
                    update_gauges(pipeline)
                except Exception:
                    log.exception("could not update gauges")
                await self.sleep(5.0)

        async def on_stop(self) -> None:
            metrics.set_up(False)
            if self.runner is not None:
                await self.runner.cleanup()
            await publisher.stop()
            await sink.close()
            api_client.close()

    app.service(Edge)
    return pipeline, Edge


def update_gauges(pipeline: Pipeline) -> None:
    """Consumer lag per assigned partition and keys per state table."""
    app = pipeline.app
    consumer = app.consumer
    for tp in app.assignor.assigned_actives():
        highwater = consumer.highwater(tp)
        if highwater is None:
            continue
        committed = consumer._committed_offset.get(tp)
        topic = pipeline.contract_name.get(tp.topic, tp.topic)
        pipeline.metrics.set_consumer_offsets(topic, tp.partition, committed, highwater)
    for name, table in (("enrollments", pipeline.enrollments), ("messages", pipeline.messages),
                        ("parked", pipeline.parked), ("resume-index", pipeline.resume_index)):
        total = 0
        for db in list(getattr(table.data, "_dbs", {}).values()):
            try:
                total += int(db.property_int_value("rocksdb.estimate-num-keys") or 0)
            except Exception:
                continue
        pipeline.metrics.set_state_table_keys(name, total)


def run_worker(settings: Settings) -> None:
    import faust

    (settings.data_dir / "state").mkdir(parents=True, exist_ok=True)
    if settings.migrate_on_start:
        client = connect(settings.clickhouse_url)
        try:
            applied = migrate(client)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
        finally:
            client.close()
    asyncio.run(ensure_topics(settings))
    pipeline, _ = build_worker(settings)
    worker = faust.Worker(pipeline.app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
