"""The HTTP edge: one aiohttp application for the API, webhooks, events, health and metrics.

The worker serves it next to its agents; ``sendtrail api`` and ``sendtrail
gateway`` serve it alone (against a ClickHouse server, or only publishing to
Kafka). What it can do depends on what it is given: ``api_deps`` adds the
report routes, ``publisher`` the write routes (``POST /api/v1/events`` and the
webhooks).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Sequence

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


class Publisher:
    """Writes canonical events to Kafka and returns only once the broker acknowledged them all."""

    def __init__(self, bootstrap: str, topic_prefix: str) -> None:
        self.bootstrap = bootstrap
        self.topic_prefix = topic_prefix
        self._producer = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer

        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=2,
                                          enable_idempotence=True, max_batch_size=1 << 20,
                                          request_timeout_ms=15000)
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def publish(self, messages: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        """``messages``: (contract topic, key, value). Raises when any write is not acknowledged."""
        if self._producer is None:
            raise RuntimeError("publisher not started")
        futures = [await self._producer.send(self.topic_prefix + topic, value=value, key=key)
                   for topic, key, value in messages]
        await asyncio.gather(*futures)

    async def ping(self, timeout: float = 2.0) -> None:
        if self._producer is None:
            raise RuntimeError("publisher not started")
        await asyncio.wait_for(self._producer.client.fetch_all_metadata(), timeout)


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
            return _error(exc.status, exc.code, exc.message)
        except web.HTTPException as exc:
            status = exc.status
            if exc.status >= 400:
                return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
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


def _events_handler(deps: WebDeps):
    settings = deps.settings

    async def post_events(request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            raise ApiError(415, "unsupported_media_type", "send events as application/json")
        body = await _read_body(request, settings.max_body_bytes)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
        events = doc.get("events") if isinstance(doc, dict) and "type" not in doc else doc
        if isinstance(events, dict):
            events = [events]
        if not isinstance(events, list) or not events:
            raise ApiError(400, "bad_request", "send one event object, a list of events or {\"events\": [...]}")
        if len(events) > MAX_EVENTS_PER_REQUEST:
            raise ApiError(400, "too_many_events", f"at most {MAX_EVENTS_PER_REQUEST} events per request")
        errors, messages = [], []
        for index, raw in enumerate(events):
            parsed = parse_object(raw) if isinstance(raw, dict) else Rejection(
                "not_an_object", "an event must be a JSON object", None)
            if isinstance(parsed, Rejection):
                errors.append({"index": index, "reason": parsed.reason, "field": parsed.field,
                               "message": parsed.detail})
                continue
            topic, key_field = route_of(parsed["type"])
            messages.append((topic, str(parsed[key_field]).encode(), orjson.dumps(raw)))
        if errors:
            for err in errors:
                deps.metrics.rejected("api", err["reason"])
            return _json({"error": {"code": "invalid_events", "message":
                                    f"{len(errors)} of {len(events)} events are invalid; nothing was written",
                                    "events": errors[:100]}}, status=400)
        await deps.publisher.publish(messages)
        return _json({"accepted": len(messages)}, status=202)

    return post_events


def _webhook_handler(deps: WebDeps):
    settings = deps.settings

    async def post_webhook(request: web.Request) -> web.Response:
        provider = request.match_info["provider"]
        started = time.perf_counter()
        if provider not in PROVIDERS:
            raise ApiError(404, "unknown_provider", f"no webhook for {provider!r}; known: {', '.join(sorted(PROVIDERS))}")
        body = await _read_body(request, settings.max_body_bytes)
        try:
            result = handle_webhook(provider, request.headers, body, request.headers.get("Content-Type", ""),
                                    deps.webhook_config or WebhookConfig(None, None, None, None),
                                    deps.now())
        except WebhookError as exc:
            outcome = {401: "rejected_auth", 403: "rejected_auth", 415: "unsupported_media",
                       503: "not_configured"}.get(exc.status, "bad_request")
            deps.metrics.webhook_request(provider, outcome, time.perf_counter() - started)
            return _error(exc.status, exc.code, exc.message)
        messages = [("provider-events", ev["message_id"].encode(), orjson.dumps(ev)) for ev in result.events]
        for unknown in result.unknown:
            messages.append(("dead-letters", provider.encode(), orjson.dumps({
                "reason": "unknown_provider_event", "detail": unknown.get("reason"),
                "topic": f"webhooks/{provider}", "original_text": orjson.dumps(unknown.get("payload")).decode(),
            })))
        try:
            if messages:
                await deps.publisher.publish(messages)
        except Exception:
            deps.metrics.webhook_request(provider, "error", time.perf_counter() - started)
            log.exception("could not write %d %s webhook events to Kafka", len(messages), provider)
            return _error(503, "kafka_unavailable", "events not stored; retry later")
        for ev in result.events:
            deps.metrics.webhook_event(provider, ev["type"])
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
