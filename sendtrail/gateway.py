"""``sendtrail gateway`` and ``sendtrail api``: the HTTP edge without the agents.

``sendtrail gateway`` serves only the write side of the HTTP edge:
``POST /webhooks/{sendgrid|mailgun|ses|postmark}``, ``POST /api/v1/events``,
``/metrics``, ``/healthz`` and ``/readyz``, with a :class:`~sendtrail.web.Publisher`
that answers 2xx only after Kafka acknowledged every write (``acks=all``).
It runs no agents and opens no ClickHouse, so webhooks scale apart from the
workers: run as many gateway processes as the providers' traffic needs (each
on its own port or host, behind a load balancer); they share nothing. Each
process has its own Prometheus registry and is scraped on its own ``/metrics``
(the ``instance`` label tells them apart; sum over instances in queries). When
Kafka is down the gateway stays up, ``/readyz`` answers 503 with the reason and
the write routes answer 503 (providers retry), until Kafka is back.

``sendtrail api`` serves the report API alone (every ``/api/v1`` GET route,
``POST /api/v1/static-lists``, ``/metrics``, ``/healthz``, ``/readyz``) against
``SENDTRAIL_CLICKHOUSE_URL``, for scaling reads apart from the workers. Use a
ClickHouse server URL (``http(s)://...``) there: with ``chdb://PATH`` the
embedded engine allows one process per path, so ``sendtrail api`` must not
run beside a worker on the same path (the worker already serves the API). It
does not apply migrations (the worker and ``sendtrail migrate`` do); ``/readyz``
says so while the tables are missing.

Both take ``SENDTRAIL_WEB_HOST`` / ``SENDTRAIL_WEB_PORT`` (or ``--host`` /
``--port``) and stop cleanly on SIGTERM / SIGINT.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web

from sendtrail.metrics import Metrics
from sendtrail.settings import Settings
from sendtrail.web import Publisher, WebDeps, bound_port, build_web_app, serve, webhook_config_from

log = logging.getLogger(__name__)


@dataclass
class Edge:
    """A built (not yet started) HTTP edge: the aiohttp app and what it needs started and stopped."""

    app: web.Application
    metrics: Metrics
    on_start: Callable[[], Awaitable[None]]
    on_stop: Callable[[], Awaitable[None]]


async def _ensure_topics_forever(settings: Settings, retry_seconds: float = 5.0) -> None:
    """Create the contract topics (best effort, retried until Kafka answers)."""
    from agents.worker import ensure_topics

    while True:
        try:
            await ensure_topics(settings, timeout=10.0)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("could not create the topics yet (%s); retrying in %.0fs", exc, retry_seconds)
            await asyncio.sleep(retry_seconds)


def build_gateway(settings: Settings, *, publisher: Publisher | None = None, create_topics: bool = True) -> Edge:
    """Webhooks + ``POST /api/v1/events`` + health + metrics, publishing to Kafka; no agents, no ClickHouse."""
    metrics = Metrics.create()
    publisher = publisher or Publisher(settings.kafka, settings.topic_prefix)
    topics_task: dict[str, asyncio.Task] = {}

    async def readiness() -> list[str]:
        reasons = []
        try:
            await publisher.ping()
        except Exception as exc:
            reasons.append(f"kafka: not reachable at {settings.kafka} ({type(exc).__name__}: {exc})")
        task = topics_task.get("t")
        if task is not None and not task.done():
            reasons.append("kafka: topics not created yet")
        return reasons

    app = build_web_app(WebDeps(settings=settings, metrics=metrics, registry=metrics.registry,
                                publisher=publisher, readiness=readiness,
                                webhook_config=webhook_config_from(settings)))
    configured = [name for name, value in (("sendgrid", settings.sendgrid_public_key),
                                           ("mailgun", settings.mailgun_signing_key),
                                           ("ses", settings.ses_cert_file),
                                           ("postmark", settings.postmark_auth)) if value]

    async def on_start() -> None:
        if create_topics:
            topics_task["t"] = asyncio.ensure_future(_ensure_topics_forever(settings))
        await publisher.start()
        metrics.set_up(True)
        log.info("webhooks configured for: %s", ", ".join(configured) or "none (every webhook answers 503)")

    async def on_stop() -> None:
        metrics.set_up(False)
        task = topics_task.pop("t", None)
        if task is not None:
            task.cancel()
            try:
                await task
            except BaseException:
                pass
        await publisher.stop()

    return Edge(app, metrics, on_start, on_stop)


def build_api(settings: Settings, *, client_factory: Callable[[], Any] | None = None) -> Edge:
    """The report API alone against ``settings.clickhouse_url`` (see the module doc about chdb://)."""
    from sendtrail.api.routes import make_deps_for_client
    from sendtrail.clickhouse import connect

    factory = client_factory or (lambda: connect(settings.clickhouse_url))
    metrics = Metrics.create()
    client = factory()
    deps = make_deps_for_client(client, client_factory=factory, stuck_after_seconds=settings.stuck_after_seconds)

    async def readiness() -> list[str]:
        try:
            rows = await asyncio.wait_for(deps.query(
                "SELECT count() FROM system.tables WHERE database = {db:String} AND name = 'messages'",
                {"db": deps.database}), 5.0)
        except Exception as exc:
            return [f"clickhouse: {type(exc).__name__}: {exc}"]
        if not rows or not rows[0][0]:
            return [f"clickhouse: no sendtrail tables in database {deps.database!r} "
                    "(run `sendtrail migrate` or start a worker)"]
        return []

    app = build_web_app(WebDeps(settings=settings, metrics=metrics, registry=metrics.registry,
                                api_deps=deps, readiness=readiness))

    async def on_start() -> None:
        metrics.set_up(True)

    async def on_stop() -> None:
        metrics.set_up(False)
        try:
            client.close()
        except Exception:
            pass

    return Edge(app, metrics, on_start, on_stop)


async def serve_edge(edge: Edge, host: str, port: int, stop: asyncio.Event, *,
                     on_listening: Callable[[int], None] | None = None) -> None:
    await edge.on_start()
    runner = None
    try:
        runner = await serve(edge.app, host, port)
        bound = bound_port(runner)
        log.info("listening on http://%s:%d", host, bound)
        if on_listening is not None:
            on_listening(bound)
        await stop.wait()
        log.info("stopping")
    finally:
        if runner is not None:
            await runner.cleanup()
        await edge.on_stop()


def run(build: Callable[[], Edge], host: str, port: int) -> int:
    """Build and serve an edge until SIGTERM or SIGINT."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        await serve_edge(build(), host, port, stop)

    asyncio.run(main())
    return 0


def run_gateway(settings: Settings, host: str | None = None, port: int | None = None) -> int:
    return run(lambda: build_gateway(settings), host or settings.web_host,
               settings.web_port if port is None else port)


def run_api(settings: Settings, host: str | None = None, port: int | None = None) -> int:
    if settings.embedded_clickhouse:
        log.warning("serving the API on the embedded ClickHouse %s: no worker may run on that path at the "
                    "same time (one process per chDB path); use a ClickHouse server to run both",
                    settings.clickhouse_url)
    return run(lambda: build_api(settings), host or settings.web_host, settings.web_port if port is None else port)
