"""The HTTP edge: one aiohttp application for the API, webhooks, events, health and metrics.

The worker serves it next to its agents; ``sendtrail api`` and ``sendtrail
gateway`` serve it alone (against a ClickHouse server, or only publishing to
Kafka). What it can do depends on what it is given: ``api_deps`` adds the
report routes, ``publisher`` the write routes (``POST /api/v1/events`` and the
webhooks).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import random
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from schemas.parser import Rejection, parse_object
from sendtrail.api.errors import ApiError
from sendtrail.metrics import Metrics, render
from sendtrail.settings import Settings
from streams.providers import PROVIDERS, WebhookConfig, WebhookError, handle as handle_webhook

log = logging.getLogger(__name__)

#: Which contract topic an event type goes to, and which field is its key.
ROUTE_BY_PREFIX = {
    "automation.": ("automations", "automation_id"),
    "contact.": ("enrollments", "contact_id"),
    "step.": ("sends", "contact_id"),
    "message.": ("provider-events", "message_id"),
}
MAX_EVENTS_PER_REQUEST = 10_000
OPEN_PATHS = ("/healthz", "/readyz", "/webhooks/", "/api/v1/openapi.json")


def route_of(event_type: str) -> tuple[str, str]:
    for prefix, route in ROUTE_BY_PREFIX.items():
        if event_type.startswith(prefix):
            return route
    raise KeyError(event_type)


_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
_WORDS: dict[int, struct.Struct] = {}


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``Utils.murmur2``; same result as ``aiokafka.partitioner.murmur2``), about 3x faster."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    n4 = length >> 2
    words = _WORDS.get(n4)
    if words is None:
        words = _WORDS[n4] = struct.Struct(f"<{n4}I")
    for k in words.unpack_from(data):
        k = (k * _M) & _MASK
        k = ((k ^ (k >> 24)) * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = length & 3
    if tail:
        base = length & ~3
        if tail >= 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h = ((h ^ data[base]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


_PARTITION_CACHE_MAX = 200_000


class PublishError(RuntimeError):
    """Kafka did not acknowledge every write of a request in time (the caller answers 503)."""


class Publisher:
    """Writes canonical events to Kafka and returns only once the broker acknowledged them all.

    ``acks=all`` with an idempotent producer: when :meth:`publish` returns, every
    message is on all in-sync replicas; when it raises :class:`PublishError`,
    some may or may not be (the client retries the whole request; event ids
    make that idempotent). The partition of a message is the one Kafka's default
    (murmur2) partitioner gives its key, as for every other producer of the topics.

    :meth:`start` does not fail when Kafka is down: it keeps reconnecting in
    the background, and meanwhile :meth:`publish` raises :class:`PublishError`
    and :meth:`ping` (readiness) fails, so the HTTP edge answers 503 and
    providers retry later.
    """

    def __init__(self, bootstrap: str, topic_prefix: str, *, timeout: float = 10.0,
                 linger_ms: int = 2, retry_seconds: float = 2.0) -> None:
        self.bootstrap = bootstrap
        self.topic_prefix = topic_prefix
        self.timeout = timeout
        self.linger_ms = linger_ms
        self.retry_seconds = retry_seconds
        self._producer = None
        self._connector: asyncio.Task | None = None
        self._stopping = False
        self.last_error: str | None = None
        self._queues: dict[tuple[str, int], deque[_OpenBatch]] = {}
        self._shippers: dict[tuple[str, int], asyncio.Future] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._hashes: dict[bytes, int] = {}  # key -> murmur2 (message ids come back for every event)

    def _new_producer(self):
        from aiokafka import AIOKafkaProducer

        return AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=self.linger_ms,
                                enable_idempotence=True, max_batch_size=1 << 20,
                                max_request_size=8 << 20, request_timeout_ms=int(self.timeout * 1000),
                                metadata_max_age_ms=60_000)

    async def _connect_once(self) -> bool:
        producer = self._new_producer()
        try:
            await producer.start()
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            try:
                await producer.stop()
            except Exception:
                pass
            return False
        self._producer = producer
        self.last_error = None
        return True

    async def start(self, *, wait: bool = False) -> None:
        """Connect; when Kafka does not answer, keep trying in the background (``wait``: raise instead)."""
        self._stopping = False
        if self._producer is not None:
            return
        if await self._connect_once():
            return
        if wait:
            raise PublishError(f"Kafka at {self.bootstrap} does not answer: {self.last_error}")
        log.warning("Kafka at %s does not answer (%s); retrying in the background", self.bootstrap,
                    self.last_error)
        self._connector = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        while not self._stopping and self._producer is None:
            await asyncio.sleep(self.retry_seconds)
            if await self._connect_once():
                log.info("connected to Kafka at %s", self.bootstrap)
                return

    @property
    def connected(self) -> bool:
        return self._producer is not None

    async def stop(self) -> None:
        self._stopping = True
        if self._connector is not None:
            self._connector.cancel()
            try:
                await self._connector
            except BaseException:
                pass
            self._connector = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._producer is not None:
            self._flush()
            if self._shippers:
                await asyncio.wait(list(self._shippers.values()), timeout=self.timeout)
            producer, self._producer = self._producer, None
            await producer.stop()  # waits for the batches handed over
        for queue in self._queues.values():
            for batch in queue:
                batch.fail(PublishError("the publisher stopped"))
        self._queues.clear()

    async def publish(self, messages: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        """``messages``: (contract topic, key, value). Raises :class:`PublishError` unless all were acknowledged.

        Messages of concurrent calls are appended to shared per-partition record
        batches (cheaper than one ``producer.send`` per message); one batch per
        partition is handed to the producer at a time, the next one fills meanwhile,
        so ordering per key is kept and the batches grow with the load.
        """
        producer = self._producer
        if producer is None:
            raise PublishError(f"not connected to Kafka at {self.bootstrap}"
                               + (f" ({self.last_error})" if self.last_error else ""))
        if not messages:
            return
        deadline = time.monotonic() + self.timeout
        try:
            counts = self._known_partition_counts(producer, messages)
            if counts is None:
                counts = await asyncio.wait_for(self._partition_counts(producer, messages), self.timeout)
            waiters = self._append_all(producer, messages, counts)
        except asyncio.TimeoutError:
            raise PublishError(f"Kafka did not answer within {self.timeout:g}s (topic metadata)") from None
        except PublishError:
            raise
        except Exception as exc:
            raise PublishError(f"Kafka refused the writes: {type(exc).__name__}: {exc}") from exc
        done, pending = await asyncio.wait(waiters, timeout=max(deadline - time.monotonic(), 0.001))
        failure = None
        for fut in done:
            exc = fut.exception()
            if exc is not None and failure is None:
                failure = exc
        if pending:
            raise PublishError(f"Kafka did not acknowledge the writes within {self.timeout:g}s")
        if failure is not None:
            raise PublishError(f"Kafka refused a write: {type(failure).__name__}: {failure}") from failure

    def _known_partition_counts(self, producer, messages) -> dict[str, tuple[str, int]] | None:
        """{contract topic: (topic, partition count)} from the producer's metadata, None when a topic is unknown."""
        prefix = self.topic_prefix
        cluster = producer.client.cluster
        counts: dict[str, tuple[str, int]] = {}
        for topic, _, _ in messages:
            if topic not in counts:
                full = prefix + topic
                parts = cluster.partitions_for_topic(full)
                if not parts:
                    return None
                counts[topic] = (full, len(parts))
        return counts

    async def _partition_counts(self, producer, messages) -> dict[str, tuple[str, int]]:
        """Like :meth:`_known_partition_counts`, fetching the metadata of topics the producer does not know yet."""
        prefix = self.topic_prefix
        counts: dict[str, tuple[str, int]] = {}
        for topic, _, _ in messages:
            if topic not in counts:
                full = prefix + topic
                counts[topic] = (full, await self._partition_count(producer, full))
        return counts

    def _append_all(self, producer, messages, counts: dict[str, tuple[str, int]]) -> set:
        """Append every message to its partition's open batch (no await: the messages of one call stay together)."""
        hashes = self._hashes
        by_partition: dict[tuple[str, int], list] = {}
        for topic, key, value in messages:
            full, n = counts[topic]
            if key is None:
                part = random.randrange(n)
            else:
                h = hashes.get(key)
                if h is None:
                    if len(hashes) >= _PARTITION_CACHE_MAX:
                        hashes.clear()
                    h = hashes[key] = murmur2(key) & 0x7FFFFFFF
                part = h % n  # Kafka's default partitioner (Java clients, aiokafka, Faust)
            group = by_partition.get((full, part))
            if group is None:
                by_partition[(full, part)] = [(key, value)]
            else:
                group.append((key, value))
        queues = self._queues
        waiters = set()
        for tp, group in by_partition.items():
            queue = queues.get(tp)
            if queue is None:
                queue = queues[tp] = deque()
            if not queue:  # the partition's shipper (if any) took the last batch: open a new one
                queue.append(_OpenBatch(producer))
            batch = queue[-1]
            append = batch.builder.append
            for key, value in group:
                if append(timestamp=None, key=key, value=value) is None:
                    waiters.add(batch.acked)
                    batch = _OpenBatch(producer)
                    queue.append(batch)
                    append = batch.builder.append
                    if append(timestamp=None, key=key, value=value) is None:
                        raise PublishError(f"a message of {len(value)} bytes is larger than a Kafka batch")
            waiters.add(batch.acked)
            if tp not in self._shippers:
                self._schedule_flush()
        return waiters

    async def _partition_count(self, producer, topic: str) -> int:
        parts = await producer.partitions_for(topic)
        if not parts:
            raise PublishError(f"topic {topic} has no partitions")
        return len(parts)

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            if self.linger_ms > 0:
                self._flush_handle = loop.call_later(self.linger_ms / 1000, self._flush)
            else:
                self._flush_handle = loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        for tp, queue in list(self._queues.items()):
            if queue and tp not in self._shippers:
                self._shippers[tp] = asyncio.ensure_future(self._ship(tp))

    async def _ship(self, tp: tuple[str, int]) -> None:
        """Hand the partition's batches to the producer in order, one at a time (the producer takes the
        next when the previous one is on the wire; meanwhile the open batch keeps filling)."""
        queue = self._queues.get(tp)
        try:
            while queue:
                batch = queue.popleft()
                batch.builder.close()
                producer = self._producer
                if producer is None:
                    batch.fail(PublishError("the Kafka producer was stopped"))
                    continue
                try:
                    fut = await producer.send_batch(batch.builder, tp[0], partition=tp[1])
                except Exception as exc:
                    batch.fail(exc)
                    continue
                fut.add_done_callback(batch.resolve)
        finally:
            self._shippers.pop(tp, None)
            if queue is not None and not queue and self._queues.get(tp) is queue:
                del self._queues[tp]
            elif queue:
                self._schedule_flush()

    async def ping(self, timeout: float = 2.0) -> None:
        if self._producer is None:
            raise PublishError(f"not connected to Kafka at {self.bootstrap}"
                               + (f" ({self.last_error})" if self.last_error else ""))
        await asyncio.wait_for(self._producer.client.fetch_all_metadata(), timeout)


class _OpenBatch:
    """A record batch being filled for one partition, and the future of its acknowledgement."""

    __slots__ = ("builder", "acked")

    def __init__(self, producer) -> None:
        self.builder = producer.create_batch()
        self.acked: asyncio.Future = asyncio.get_running_loop().create_future()
        self.acked.add_done_callback(_consume_exception)

    def resolve(self, fut: asyncio.Future) -> None:
        if self.acked.done():
            return
        if fut.cancelled():
            self.acked.set_exception(PublishError("the write was cancelled"))
        elif fut.exception() is not None:
            self.acked.set_exception(fut.exception())
        else:
            self.acked.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if not self.acked.done():
            self.acked.set_exception(exc)


def _consume_exception(fut: asyncio.Future) -> None:
    """Mark a failed acknowledgement as seen (its publish() may have timed out already)."""
    if not fut.cancelled():
        fut.exception()


@dataclass
class WebDeps:
    settings: Settings
    metrics: Metrics
    registry: CollectorRegistry
    publisher: Publisher | None = None
    api_deps: Any = None  # sendtrail.api.routes.ApiDeps
    readiness: Callable[[], Awaitable[list[str]]] | None = None  # returns reasons not ready ([] = ready)
    webhook_config: WebhookConfig | None = None
    now: Callable[[], float] = time.time
    extra: dict = field(default_factory=dict)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status,
                             dumps=lambda v: orjson.dumps(v).decode())


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def build_web_app(deps: WebDeps) -> web.Application:
    settings = deps.settings

    @web.middleware
    async def errors_and_metrics(request: web.Request, handler):
        started = time.perf_counter()
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        status = 500
        try:
            if settings.api_token and not request.path.startswith(OPEN_PATHS):
                header = request.headers.get("Authorization", "")
                if header != f"Bearer {settings.api_token}":
                    status = 401
                    return _error(401, "unauthorized", "this API wants 'Authorization: Bearer <token>'")
            response = await handler(request)
            status = response.status
            return response
        except ApiError as exc:
            status = exc.status
            return _json(exc.to_dict(), status=exc.status)
        except web.HTTPException as exc:
            status = exc.status
            if exc.status >= 400:
                resp = _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
                if "Allow" in exc.headers:  # 405 names the methods that are (RFC 9110)
                    resp.headers["Allow"] = exc.headers["Allow"]
                return resp
            raise
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            status = 500
            return _error(500, "internal", "internal error; see the server log")
        finally:
            deps.metrics.api_request(route, status, time.perf_counter() - started)

    app = web.Application(middlewares=[errors_and_metrics], client_max_size=settings.max_body_bytes)

    async def healthz(_: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        reasons = await deps.readiness() if deps.readiness else []
        if reasons:
            return _json({"status": "not_ready", "reasons": reasons}, status=503)
        return _json({"status": "ready"})

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = render(deps.registry, request.headers.get("Accept"))
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)

    if deps.publisher is not None:
        app.router.add_post("/api/v1/events", _events_handler(deps))
        app.router.add_post("/webhooks/{provider}", _webhook_handler(deps))
    if deps.api_deps is not None:
        from sendtrail.api.routes import add_routes

        add_routes(app, deps.api_deps)
    return app


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "payload_too_large", f"the body is larger than {limit} bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, "payload_too_large", f"the body is larger than {limit} bytes") from None


def _unavailable(message: str) -> web.Response:
    resp = _error(503, "kafka_unavailable", message)
    resp.headers["Retry-After"] = "5"
    return resp


def _events_handler(deps: WebDeps):
    settings = deps.settings
    dumps = orjson.dumps

    async def post_events(request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            raise ApiError(415, "unsupported_media_type",
                           f"send events as application/json, not {request.content_type or 'no content type'!r}")
        body = await _read_body(request, settings.max_body_bytes)
        if not body.strip():
            raise ApiError(400, "empty_body", "the body is empty; send one event object, a list of events "
                                              "or {\"events\": [...]}")
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
        events = doc.get("events") if isinstance(doc, dict) and "type" not in doc else doc
        if isinstance(events, dict):
            events = [events]
        if not isinstance(events, list) or not events:
            raise ApiError(400, "bad_request", "send one event object, a non-empty list of events "
                                               "or {\"events\": [...]}")
        if len(events) > MAX_EVENTS_PER_REQUEST:
            raise ApiError(400, "too_many_events", f"at most {MAX_EVENTS_PER_REQUEST} events per request, "
                                                   f"got {len(events)}")
        max_event = settings.max_event_bytes
        errors, messages = [], []
        for index, raw in enumerate(events):
            if type(raw) is not dict:
                errors.append({"index": index, "reason": "not_an_object", "field": None,
                               "message": "an event must be a JSON object"})
                continue
            parsed = parse_object(raw)
            if isinstance(parsed, Rejection):
                errors.append({"index": index, "reason": parsed.reason, "field": parsed.field,
                               "message": parsed.detail})
                continue
            value = dumps(raw)
            if len(value) > max_event:
                errors.append({"index": index, "reason": "too_large", "field": None,
                               "message": f"the event is {len(value)} bytes; at most {max_event}"})
                continue
            topic, key_field = route_of(parsed["type"])
            messages.append((topic, str(parsed[key_field]).encode(), value))
        if errors:
            for err in errors:
                deps.metrics.rejected("api", err["reason"])
            return _json({"error": {"code": "invalid_events", "message":
                                    f"{len(errors)} of {len(events)} events are invalid; nothing was written",
                                    "events": errors}}, status=400)
        try:
            await deps.publisher.publish(messages)
        except Exception as exc:
            log.warning("could not write %d events to Kafka: %s", len(messages), exc)
            return _unavailable(f"events not stored ({exc}); retry later")
        return _json({"accepted": len(messages)}, status=202)

    return post_events


def _dead_letter(provider: str, entry: dict, received_at: float) -> tuple[str, bytes, bytes]:
    """A provider event the adapter could not map, as a dead-letters record (same shape as the worker's)."""
    reason = str(entry.get("reason") or "unknown_provider_event")
    code, _, detail = reason.partition(":")
    payload = entry.get("payload")
    original = orjson.dumps(payload)
    doc = {
        "reason": code.strip() or "unknown_provider_event",
        "detail": detail.strip() or reason,
        "field": None,
        "topic": f"webhooks/{provider}",
        "provider": provider,
        "received_at": received_at,
        "original_text": original.decode(),
        "original_base64": base64.b64encode(original).decode(),
    }
    key = None
    if isinstance(payload, dict):
        for name in ("sg_message_id", "MessageID", "message_id", "messageId"):
            value = payload.get(name)
            if isinstance(value, str) and value:
                key = value.encode()
                break
    return "dead-letters", key or provider.encode(), orjson.dumps(doc)


def _webhook_handler(deps: WebDeps):
    settings = deps.settings
    dumps = orjson.dumps

    async def post_webhook(request: web.Request) -> web.Response:
        provider = request.match_info["provider"]
        started = time.perf_counter()
        if provider not in PROVIDERS:
            raise ApiError(404, "unknown_provider", f"no webhook for {provider!r}; known: {', '.join(sorted(PROVIDERS))}")
        now = deps.now()
        try:
            body = await _read_body(request, settings.max_body_bytes)
        except ApiError:
            deps.metrics.webhook_request(provider, "bad_request", time.perf_counter() - started)
            raise
        try:
            result = handle_webhook(provider, request.headers, body, request.headers.get("Content-Type", ""),
                                    deps.webhook_config or WebhookConfig(None, None, None, None), now)
        except WebhookError as exc:
            outcome = {401: "rejected_auth", 403: "rejected_auth", 415: "unsupported_media",
                       503: "not_configured"}.get(exc.status, "bad_request")
            deps.metrics.webhook_request(provider, outcome, time.perf_counter() - started)
            return _error(exc.status, exc.code, exc.message)
        messages = [("provider-events", ev["message_id"].encode(), dumps(ev)) for ev in result.events]
        for entry in result.unknown:
            messages.append(_dead_letter(provider, entry, now))
        try:
            if messages:
                await deps.publisher.publish(messages)
        except Exception as exc:
            deps.metrics.webhook_request(provider, "error", time.perf_counter() - started)
            log.warning("could not write %d %s webhook events to Kafka: %s", len(messages), provider, exc)
            return _unavailable(f"events not stored ({exc}); retry later")
        counts: dict[str, int] = {}
        for ev in result.events:
            counts[ev["type"]] = counts.get(ev["type"], 0) + 1
        for type_, n in counts.items():
            deps.metrics.webhook_event(provider, type_, n)
        if result.unknown:
            for entry in result.unknown:
                deps.metrics.rejected("webhooks", str(entry.get("reason") or "").partition(":")[0] or "unknown")
            deps.metrics.dead_letter_produced("webhooks", len(result.unknown))
        deps.metrics.webhook_request(provider, "accepted", time.perf_counter() - started)
        reply: dict[str, Any] = {"accepted": len(result.events), "unknown": len(result.unknown)}
        if result.reply:
            reply["reply"] = result.reply
            log.warning("%s webhook asks for an action: %s", provider, result.reply)
        return _json(reply)

    return post_webhook


def webhook_config_from(settings: Settings) -> WebhookConfig:
    pem = None
    if settings.ses_cert_file is not None:
        pem = settings.ses_cert_file.read_bytes()
    return WebhookConfig(
        sendgrid_public_key=settings.sendgrid_public_key,
        mailgun_signing_key=settings.mailgun_signing_key,
        postmark_auth=settings.postmark_auth,
        ses_cert_pem=pem,
        max_age_seconds=settings.webhook_max_age_seconds,
    )


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            return server.sockets[0].getsockname()[1]
    raise RuntimeError("server not started")
