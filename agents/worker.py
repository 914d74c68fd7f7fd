"""``sendtrail worker``: serve HTTP, migrate and create topics (retrying while ClickHouse or Kafka is
unreachable; /readyz says which), then run the agents, the sink and the HTTP API in one process."""
from __future__ import annotations

import asyncio
import logging
import threading
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


async def ensure_topics(settings: Settings, timeout: float = 60.0, on_wait: Any = None) -> None:
    """Create every contract and internal topic with the configured partitions (Faust skips missing ones).

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


#: Faust's PrometheusMonitor observes milliseconds into histograms named without a unit (one
#: with the abbreviation ``_ms``); we give those histograms base-unit names and observe seconds.
_FAUST_HISTOGRAMS = {
    "events_runtime_latency": "event_runtime_seconds",
    "producer_send_latency": "producer_send_latency_seconds",
    "producer_error_send_latency": "producer_error_send_latency_seconds",
    "assign_latency": "assign_latency_seconds",
    "rebalance_done_consumer_latency": "rebalance_done_consumer_latency_seconds",
    "rebalance_done_latency": "rebalance_done_latency_seconds",
    "http_latency": "http_latency_seconds",
    "consumer_commit_latency": "consumer_commit_latency_seconds",
}
FAUST_METRIC_PREFIX = "faust"


class _MillisToSeconds:
    __slots__ = ("_histogram",)

    def __init__(self, histogram: Any) -> None:
        self._histogram = histogram

    def observe(self, amount: float, *args: Any, **kwargs: Any) -> None:
        self._histogram.observe(amount / 1000.0)


def attach_faust_monitor(app: Any, registry: CollectorRegistry, prefix: str = FAUST_METRIC_PREFIX) -> Any:
    """Faust's own Prometheus monitor, recording on ``registry`` (not the global one) under
    ``<prefix>_*`` names that pass ``promtool check metrics``; returns the monitor."""
    from faust.sensors.prometheus import FaustMetrics, PrometheusMonitor
    from prometheus_client import Histogram

    scratch = CollectorRegistry(auto_describe=True)
    created = FaustMetrics.create(scratch, prefix)
    fields = {}
    for name, metric in created._asdict().items():
        if name in _FAUST_HISTOGRAMS:
            doc = getattr(metric, "_documentation", name).replace(" in ms", "").replace("in ms", "")
            fields[name] = _MillisToSeconds(Histogram(f"{prefix}_{_FAUST_HISTOGRAMS[name]}", doc + " (seconds)",
                                                      registry=registry))
        else:
            scratch.unregister(metric)
            registry.register(metric)
            fields[name] = metric
    monitor = PrometheusMonitor(metrics=created._replace(**fields))
    app.monitor = monitor
    return monitor


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


def build_worker(settings: Settings) -> tuple[Pipeline, type]:
    """The Faust app of the worker, with the HTTP server and the sink as its services.

    The returned ``Edge`` service class carries ``web_app``, ``boot`` (a :class:`BootState`),
    ``metrics`` and ``api_client``; :func:`run_worker` serves ``web_app`` before the app starts.
    """
    metrics = Metrics.create()
    registry = metrics.registry
    metrics.set_sink_backlog_limit(settings.sink_max_backlog_rows)
    metrics.touch_sink_tables()
    sink = BatchWriter(lambda: sink_client(settings), max_rows=settings.batch_size * 4,
                       max_seconds=settings.batch_seconds, max_backlog_rows=settings.sink_max_backlog_rows,
                       retry_max_seconds=settings.sink_retry_max_seconds, metrics=SinkMetrics(metrics))
    pipeline = Pipeline(settings, metrics, sink)
    app = pipeline.app
    attach_faust_monitor(app, registry)
    from sendtrail.api.routes import make_deps_for_client

    api_client = _LazyClient(settings.clickhouse_url)
    api_deps = make_deps_for_client(api_client, client_factory=lambda: connect(settings.clickhouse_url),
                                    stuck_after_seconds=settings.stuck_after_seconds)
    publisher = Publisher(settings.kafka, settings.topic_prefix)
    boot = BootState()
    started = {"edge": False}

    async def readiness() -> list[str]:
        if not boot.done:
            return boot.reasons()
        reasons = []
        try:
            await publisher.ping()
        except Exception as exc:
            reasons.append(f"kafka: not reachable at {settings.kafka} ({type(exc).__name__}: {exc})")
        try:
            await asyncio.wait_for(api_deps.query("SELECT 1", {}), 5.0)
        except Exception as exc:
            reasons.append(f"clickhouse: not reachable ({type(exc).__name__}: {exc})")
        if not started["edge"]:
            reasons.append("starting: agents not started yet")
            return reasons
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
    gauges = GaugeState()

    class Edge(mode.Service):
        """The HTTP server, the Kafka publisher and the periodic gauges, started and stopped with the app."""

        runner = None  # set by run_worker when it serves the HTTP API before the app starts

        async def on_start(self) -> None:
            await publisher.start()
            if type(self).runner is None:
                type(self).runner = await serve(web_app, settings.web_host, settings.web_port)
                log.info("HTTP API on http://%s:%d", settings.web_host, settings.web_port)
            started["edge"] = True
            metrics.set_up(True)

        @mode.Service.task
        async def _gauges(self) -> None:
            while not self.should_stop:
                try:
                    update_gauges(pipeline, gauges)
                except Exception:
                    log.exception("could not update gauges")
                await self.sleep(GAUGE_INTERVAL_SECONDS)

        async def on_stop(self) -> None:
            metrics.set_up(False)
            started["edge"] = False
            runner, type(self).runner = type(self).runner, None
            if runner is not None:
                await runner.cleanup()
            await publisher.stop()
            await sink.close()
            api_client.close()

    Edge.web_app = web_app
    Edge.boot = boot
    Edge.metrics = metrics
    Edge.api_client = api_client
    app.service(Edge)
    return pipeline, Edge


GAUGE_INTERVAL_SECONDS = 2.0
#: State tables whose keys are reported: metric label -> Pipeline attribute.
STATE_TABLES = {"enrollments": "enrollments", "messages": "messages", "parked": "parked",
                "resume-index": "resume_index", "automation-replicas": "replicas", "automations": "automations"}


class GaugeState:
    """The partitions whose lag series this process reports (to forget revoked ones)."""

    def __init__(self) -> None:
        self.reported: set[tuple[str, int]] = set()


def update_gauges(pipeline: Pipeline, state: GaugeState | None = None) -> None:
    """Consumer lag per assigned partition of a consumed topic (revoked partitions are forgotten)
    and keys per state table."""
    from agents.offsets import CONSUMED

    app = pipeline.app
    consumer = app.consumer
    consumed = set(CONSUMED)
    current: set[tuple[str, int]] = set()
    committed_offsets = getattr(consumer, "_committed_offset", {})
    for tp in app.assignor.assigned_actives():
        topic = pipeline.contract_name.get(tp.topic)
        if topic not in consumed:
            continue  # table changelogs are read only to recover; no committed offset to report
        try:
            highwater = consumer.highwater(tp)
        except Exception:
            highwater = None
        if highwater is None:
            continue
        committed = committed_offsets.get(tp)
        pipeline.metrics.set_consumer_offsets(topic, tp.partition, committed, highwater)
        current.add((topic, tp.partition))
    if state is not None:
        for topic, partition in state.reported - current:
            pipeline.metrics.forget_partition(topic, partition)
        state.reported = current
    for name, attr in STATE_TABLES.items():
        table = getattr(pipeline, attr, None)
        if table is None:
            continue
        total = 0
        for db in list(getattr(table.data, "_dbs", {}).values()):
            try:
                total += int(db.property_int_value("rocksdb.estimate-num-keys") or 0)
            except Exception:
                continue
        pipeline.metrics.set_state_table_keys(name, total)


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


def run_worker(settings: Settings) -> None:
    """Serve HTTP at once, wait for ClickHouse (migrations) and Kafka (topics), then run the agents."""
    import faust
    import signal

    (settings.data_dir / "state").mkdir(parents=True, exist_ok=True)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    pipeline, edge = build_worker(settings)
    edge.runner = loop.run_until_complete(serve(edge.web_app, settings.web_host, settings.web_port))
    log.info("HTTP API on http://%s:%d (not ready until Kafka and ClickHouse are)", settings.web_host,
             settings.web_port)
    task = loop.create_task(bootstrap(settings, edge.boot))
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, task.cancel)
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        log.info("stopped before the agents started")
        runner, edge.runner = edge.runner, None
        loop.run_until_complete(runner.cleanup())
        edge.api_client.close()
        loop.close()
        return
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    worker = faust.Worker(pipeline.app, loop=loop, loglevel=settings.log_level, quiet=True,
                          redirect_stdouts=False)
    worker.spinner = None  # its terminal spinner sets the root logger to DEBUG: every log call would build a record
    worker.execute_from_commandline()
