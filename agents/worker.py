"""``sendtrail worker``: serve HTTP, migrate and create topics (retrying while ClickHouse or Kafka is
unreachable; /readyz says which), then run the pipeline, the sink and the HTTP API in one process."""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
from typing import Any

from agents.app import Pipeline
from agents.runtime import Runtime
from agents.sink import BatchWriter
from schemas.topics import TOPICS, topic_names
from sendtrail.clickhouse import connect
from sendtrail.maintenance import clean_waits
from sendtrail.metrics import Metrics
from sendtrail.migrate import migrate
from sendtrail.settings import Settings
from sendtrail.web import Publisher, WebDeps, build_web_app, serve, webhook_config_from

log = logging.getLogger(__name__)


async def ensure_topics(settings: Settings, timeout: float = 60.0, on_wait: Any = None) -> None:
    """Create every contract and internal topic with the configured partitions.

    ``on_wait(exc)`` is called each time the broker does not answer yet."""
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
                try:
                    await admin.close()
                except Exception:
                    pass
                raise RuntimeError(f"Kafka at {settings.kafka} does not answer: {exc}") from exc
            log.warning("waiting for Kafka at %s: %s", settings.kafka, exc)
            if on_wait is not None:
                on_wait(exc)
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


class _LazyClient:
    """A ClickHouse client opened on first use (and again after a failed open), so the worker
    starts, serves /healthz and reports readiness while ClickHouse is not reachable yet."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._client: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = connect(self._url)
                client = self._client
        return client

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._get(), name)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


class BootState:
    """What the worker still waits for before it starts consuming (shown by /readyz)."""

    def __init__(self) -> None:
        self.kafka: str | None = "kafka: not checked yet"
        self.clickhouse: str | None = "clickhouse: not checked yet"
        self.done = False

    def reasons(self) -> list[str]:
        out = [r for r in (self.kafka, self.clickhouse) if r]
        return out or ["starting: agents not started yet"]


class FaultInjectingClient:
    """A ClickHouse client whose inserts fail while ``fault_file`` exists (SENDTRAIL_SINK_FAULT_FILE)."""

    def __init__(self, client: Any, fault_file: Any) -> None:
        self._client = client
        self._fault_file = fault_file

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        if self._fault_file.exists():
            raise ConnectionError(f"ClickHouse unavailable (injected: {self._fault_file} exists)")
        return self._client.insert(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def sink_client(settings: Settings) -> Any:
    client = connect(settings.clickhouse_url)
    if settings.sink_fault_file is not None:
        return FaultInjectingClient(client, settings.sink_fault_file)
    return client


GAUGE_INTERVAL_SECONDS = 2.0


class Worker:
    """Everything one worker process runs: the HTTP edge (API, webhooks, metrics, health), the
    Kafka publisher of the edge, the pipeline with its runtime, the sink and the gauges."""

    def __init__(self, settings: Settings) -> None:
        from sendtrail.api.routes import make_deps_for_client

        self.settings = settings
        self.metrics = metrics = Metrics.create()
        metrics.set_sink_backlog_limit(settings.sink_max_backlog_rows)
        metrics.touch_sink_tables()
        self.sink = BatchWriter(lambda: sink_client(settings), max_rows=settings.batch_size * 4,
                                max_seconds=settings.batch_seconds, max_backlog_rows=settings.sink_max_backlog_rows,
                                retry_max_seconds=settings.sink_retry_max_seconds, metrics=SinkMetrics(metrics))
        self.pipeline = Pipeline(settings, metrics, self.sink)
        self.runtime = Runtime(settings, self.pipeline)
        self.api_client = _LazyClient(settings.clickhouse_url)
        self.api_deps = make_deps_for_client(self.api_client, client_factory=lambda: connect(settings.clickhouse_url),
                                             stuck_after_seconds=settings.stuck_after_seconds)
        self.publisher = Publisher(settings.kafka, settings.topic_prefix)
        self.boot = BootState()
        self.running = False
        self.web_app = build_web_app(WebDeps(settings=settings, metrics=metrics, registry=metrics.registry,
                                             publisher=self.publisher, api_deps=self.api_deps,
                                             readiness=self.readiness,
                                             webhook_config=webhook_config_from(settings)))
        self.runner: Any = None

    async def readiness(self) -> list[str]:
        if not self.boot.done:
            return self.boot.reasons()
        reasons = []
        try:
            await self.publisher.ping()
        except Exception as exc:
            reasons.append(f"kafka: not reachable at {self.settings.kafka} ({type(exc).__name__}: {exc})")
        try:
            await asyncio.wait_for(self.api_deps.query("SELECT 1", {}), 5.0)
        except Exception as exc:
            reasons.append(f"clickhouse: not reachable ({type(exc).__name__}: {exc})")
        if not self.running:
            reasons.append("starting: pipeline not started yet")
            return reasons
        if self.runtime.recovering:
            reasons.append("recovery: state tables are still recovering")
        elif not self.runtime.assignment:
            reasons.append("partitions: none assigned yet")
        if self.sink.backlog_rows >= self.settings.sink_max_backlog_rows:
            reasons.append(f"sink: backlog full ({self.sink.backlog_rows} rows)")
        return reasons

    async def _gauges(self) -> None:
        while True:
            try:
                self.runtime.update_gauges()
            except Exception:
                log.exception("could not update gauges")
            await asyncio.sleep(GAUGE_INTERVAL_SECONDS)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve HTTP at once, wait for ClickHouse and Kafka, run the pipeline until ``stop`` is set."""
        settings = self.settings
        self.runner = await serve(self.web_app, settings.web_host, settings.web_port)
        log.info("HTTP API on http://%s:%d (not ready until Kafka and ClickHouse are)", settings.web_host,
                 settings.web_port)
        gauges = cleanup = None
        try:
            boot = asyncio.ensure_future(bootstrap(settings, self.boot))
            waiter = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({boot, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if boot not in done:
                boot.cancel()
                await asyncio.gather(boot, return_exceptions=True)
                log.info("stopped before the pipeline started")
                return
            waiter.cancel()
            boot.result()
            await self.publisher.start()
            await self.runtime.start()
            self.running = True
            self.metrics.set_up(True)
            gauges = asyncio.ensure_future(self._gauges())
            cleanup = asyncio.ensure_future(_clean_waits_forever(settings))
            watcher = asyncio.ensure_future(stop.wait())
            watcher.add_done_callback(lambda _: self.runtime.stop())
            try:
                await self.runtime.run()
            finally:
                watcher.cancel()
        finally:
            self.metrics.set_up(False)
            self.running = False
            for task in (gauges, cleanup):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            await self.runtime.close()
            await self.publisher.stop()
            await self.sink.close()
            if self.runner is not None:
                await self.runner.cleanup()
            self.api_client.close()


async def _clean_waits_forever(settings: Settings) -> None:
    """Every ``waits_cleanup_seconds``: remove the closed waits of node_waits (a failure is logged and
    tried again next time; the waits stay exact, only health reads more rows meanwhile)."""
    while True:
        await asyncio.sleep(settings.waits_cleanup_seconds)
        try:
            await asyncio.to_thread(_clean_waits_once, settings)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("could not clean node_waits (next try in %.0fs)", settings.waits_cleanup_seconds)


def _clean_waits_once(settings: Settings) -> None:
    client = connect(settings.clickhouse_url)
    try:
        clean_waits(client)
    finally:
        client.close()


def _prepare_clickhouse(settings: Settings) -> list[str]:
    """Apply migrations (or only check the connection); raises while ClickHouse is unreachable."""
    client = connect(settings.clickhouse_url)
    try:
        if settings.migrate_on_start:
            return migrate(client)
        client.query("SELECT 1")
        return []
    finally:
        client.close()


async def _retry(what: str, step, report, max_delay: float = 10.0) -> Any:
    """Run ``step`` until it succeeds, with backoff; ``report(reason or None)`` keeps /readyz current."""
    delay = 0.5
    while True:
        try:
            result = await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            report(f"{type(exc).__name__}: {exc}"[:400])
            log.warning("%s not ready (retrying in %.1fs): %s", what, delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
            continue
        report(None)
        return result


async def bootstrap(settings: Settings, boot: BootState) -> None:
    """Wait (with backoff) until ClickHouse is migrated and every topic exists; /readyz tells why not yet."""
    loop = asyncio.get_running_loop()

    def report_clickhouse(err: str | None) -> None:
        boot.clickhouse = None if err is None else f"clickhouse: not reachable or not migrated ({err})"

    def report_kafka(err: str | None) -> None:
        boot.kafka = None if err is None else f"kafka: not reachable at {settings.kafka} ({err})"

    async def clickhouse_step() -> None:
        applied = await loop.run_in_executor(None, _prepare_clickhouse, settings)
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))

    async def kafka_step() -> None:
        await ensure_topics(settings, timeout=10.0,
                            on_wait=lambda exc: report_kafka(f"{type(exc).__name__}: {exc}"))

    await asyncio.gather(_retry("ClickHouse", clickhouse_step, report_clickhouse),
                         _retry("Kafka", kafka_step, report_kafka))
    boot.done = True


#: Cyclic-GC thresholds of the worker process (CPython's default: 700, 10, 10). Measured on a
#: 120k-event backlog (benchmarks/pipeline.py, gc.callbacks timing): the defaults spent 10.0 s of
#: the worker's 40 s of CPU in 4,097 collections; these thresholds 2.2-4.0 s in 9.
GC_THRESHOLDS = (200_000, 20, 100)


def tune_gc() -> None:
    """Fewer cyclic-GC passes. A batch keeps tens of thousands of containers alive (records,
    states, rows) and frees them when it ends, so with the default thresholds the collector
    walked each batch's objects many times over. Cyclic garbage is rare here (reference counting
    frees the rest); what is alive at start-up moves out of the collector's reach for good."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_worker(settings: Settings) -> None:
    """Run a worker until SIGTERM or SIGINT, then stop cleanly (the running batch ends and commits)."""
    (settings.data_dir / "state").mkdir(parents=True, exist_ok=True)
    tune_gc()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        loop.run_until_complete(Worker(settings).run(stop))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
