"""The report API: every screen of the seed articles as an HTTP route.

``add_routes(app, deps)`` registers every ``/api/v1`` GET route and
``POST /api/v1/static-lists`` (``POST /api/v1/events`` and the webhooks are
the web app's). ``ApiDeps`` is how the routes reach ClickHouse;
``make_deps_for_client`` builds one on a clickhouse-connect client.

Parameters are checked strictly: an unknown or repeated query parameter, a
bad number, date, sort column or order is a 400 ``bad_request`` with a
message saying which and why. Lists answer ``{"items": [...], "total": N}``
and take ``limit`` (1-1000, default 50) and ``offset``.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import hashlib
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Sequence

import orjson
from aiohttp import web

from sendtrail.api import queries as Q
from sendtrail.api.errors import ApiError, BadRequest, error_response
from sendtrail.api.export import (CsvQuery, azip_chunks, content_disposition, csv_row, recipients_zip_name,
                                  safe_filename_part)
from sendtrail.api.queries import Page, Period, Queries
from sendtrail.api.static_lists import StaticLists

log = logging.getLogger(__name__)

MAX_LIMIT = 1000
DEFAULT_LIMIT = 50
MAX_OFFSET = 100_000_000
MAX_TEXT = 200
MIN_TIME = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
MAX_TIME = _dt.datetime(2299, 12, 31, tzinfo=_dt.timezone.utc)


@dataclass
class ApiDeps:
    """What the routes need from the database (all async, none blocks the loop)."""

    query: Callable[[str, dict], Awaitable[list[tuple]]]
    query_columns: Callable[[str, dict], Awaitable[tuple[list[str], list[tuple]]]]
    stream: Callable[[str, dict], AsyncIterator[list[tuple]]]
    command: Callable[[str, dict], Awaitable[None]]
    insert: Callable[[str, list[tuple], list[str]], Awaitable[None]]
    database: str = "sendtrail"
    stuck_after_seconds: int = 7 * 24 * 3600
    now: Callable[[], float] = time.time
    #: optional: streams a SELECT's output in ``FORMAT CSV`` as byte chunks
    #: (ClickHouse renders the CSV: the fastest export path). When None,
    #: exports use ``stream`` with one ``formatRow('CSV', ...)`` string per row.
    stream_raw: Callable[[str, dict], AsyncIterator[bytes]] | None = None


def make_deps_for_client(client: Any, database: str = "sendtrail", *,
                         client_factory: Callable[[], Any] | None = None,
                         stuck_after_seconds: int = 7 * 24 * 3600,
                         now: Callable[[], float] = time.time) -> ApiDeps:
    """ApiDeps on a clickhouse-connect ``client``: calls run on one worker thread.

    Streams (exports) need their own handle: with ``client_factory`` each
    stream opens a client, runs on its own thread and closes it at the end, so
    queries go on while an export streams (required for chDB, whose handle
    refuses other calls while a stream is open). Without a factory, streams
    use ``client`` and queries wait for the export to finish.
    """
    from sendtrail import clickhouse as ch

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="api-clickhouse")
    lock = asyncio.Lock() if client_factory is None else None

    async def run(fn, *args):
        loop = asyncio.get_running_loop()
        if lock is None:
            return await loop.run_in_executor(executor, fn, *args)
        async with lock:
            return await loop.run_in_executor(executor, fn, *args)

    def _query(sql: str, params: dict):
        return client.query(sql, parameters=params or None)

    async def query(sql: str, params: dict) -> list[tuple]:
        return (await run(_query, sql, params)).result_rows

    async def query_columns(sql: str, params: dict) -> tuple[list[str], list[tuple]]:
        result = await run(_query, sql, params)
        return list(result.column_names), result.result_rows

    async def command(sql: str, params: dict) -> None:
        await run(lambda: client.command(sql, parameters=params or None))

    async def insert(table: str, rows: list[tuple], column_names: list[str]) -> None:
        token = hashlib.sha256(repr((table, rows)).encode()).hexdigest()
        await run(lambda: ch.insert(client, table, rows, column_names, token, database=database))

    @contextlib.asynccontextmanager
    async def stream_handle():
        """A client and the thread that may use it for one stream: its own with a factory (chDB refuses
        other calls on a handle while a stream is open), else the shared one, held for the stream."""
        loop = asyncio.get_running_loop()
        if client_factory is None:
            if lock is not None:
                await lock.acquire()
            try:
                yield client, executor
            finally:
                if lock is not None:
                    lock.release()
            return
        ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="api-stream")
        own = await loop.run_in_executor(ex, client_factory)
        try:
            yield own, ex
        finally:
            await loop.run_in_executor(ex, own.close)
            ex.shutdown(wait=False)

    async def stream(sql: str, params: dict) -> AsyncIterator[list[tuple]]:
        loop = asyncio.get_running_loop()
        async with stream_handle() as (own, ex):
            ctx = await loop.run_in_executor(ex, lambda: own.query_row_block_stream(sql, parameters=params or None))
            blocks = await loop.run_in_executor(ex, ctx.__enter__)
            try:
                it = iter(blocks)
                while True:
                    block = await loop.run_in_executor(ex, next, it, None)
                    if block is None:
                        break
                    yield block
            finally:
                await loop.run_in_executor(ex, ctx.__exit__, None, None, None)

    async def stream_raw(sql: str, params: dict) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        async with stream_handle() as (own, ex):
            source = await loop.run_in_executor(
                ex, lambda: own.raw_stream(sql, parameters=params or None, fmt="CSV"))
            try:
                while True:
                    chunk = await loop.run_in_executor(ex, source.read, RAW_CHUNK)
                    if not chunk:
                        break
                    yield chunk
            finally:
                await loop.run_in_executor(ex, source.close)

    return ApiDeps(query=query, query_columns=query_columns, stream=stream, command=command, insert=insert,
                   database=database, stuck_after_seconds=stuck_after_seconds, now=now, stream_raw=stream_raw)


RAW_CHUNK = 1 << 20


# ------------------------------------------------------------------ parameters

class Params:
    """The query string of a request, read strictly."""

    def __init__(self, request_or_query: Any, allowed: Sequence[str]):
        query = getattr(request_or_query, "query", request_or_query)
        self.values: dict[str, str] = {}
        allowed_set = set(allowed)
        pairs = list(query.items())
        for key, value in pairs:
            if key not in allowed_set:
                hint = f"; known: {', '.join(sorted(allowed_set))}" if allowed_set else ""
                raise BadRequest(f"unknown query parameter {key!r}{hint}")
            if key in self.values:
                raise BadRequest(f"query parameter {key!r} is given more than once")
            self.values[key] = value

    def get(self, name: str) -> str | None:
        value = self.values.get(name)
        return value if value != "" else None

    def text(self, name: str, max_length: int = MAX_TEXT) -> str | None:
        value = self.get(name)
        if value is not None:
            if len(value) > max_length:
                raise BadRequest(f"{name} is longer than {max_length} characters")
            if any(ord(c) < 32 for c in value):
                raise BadRequest(f"{name} contains control characters")
        return value

    def integer(self, name: str, default: int | None = None, lo: int = 0, hi: int = 2**31 - 1) -> int | None:
        return parse_int(name, self.get(name), default, lo, hi)

    def choice(self, name: str, choices: Sequence[str], default: str | None = None) -> str | None:
        value = self.get(name)
        if value is None:
            return default
        if value not in choices:
            raise BadRequest(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        return value

    def time(self, name: str) -> _dt.datetime | None:
        return parse_time(name, self.get(name))

    def period(self) -> Period:
        start, end = self.time("from"), self.time("to")
        if start is not None and end is not None and end <= start:
            raise BadRequest("to must be later than from")
        return Period(start, end)

    def page(self, sorts: Mapping[str, str], default_sort: str, default_order: str = "desc") -> tuple[Page, str]:
        limit = self.integer("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        offset = self.integer("offset", 0, 0, MAX_OFFSET)
        sort_key = self.choice("sort", list(sorts), default_sort)
        order = self.choice("order", ["asc", "desc"], default_order)
        return Page(limit=limit, offset=offset, sort=sorts[sort_key], order=order.upper()), sort_key


PAGE_PARAMS = ("limit", "offset", "sort", "order")


def parse_int(name: str, raw: str | None, default: int | None, lo: int, hi: int) -> int | None:
    if raw is None:
        return default
    if not re.fullmatch(r"[+-]?\d{1,12}", raw.strip()):
        raise BadRequest(f"{name} must be an integer; got {raw!r}")
    value = int(raw)
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be from {lo} to {hi}; got {value}")
    return value


_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DATETIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|z|[+-]\d{2}:?\d{2})?$")


def parse_time(name: str, raw: str | None) -> _dt.datetime | None:
    """RFC 3339 / ISO 8601 (``2024-05-01``, ``2024-05-01T10:00:00Z``, with an offset); no offset = UTC."""
    if raw is None:
        return None
    text = raw.strip()
    if not (_DATE_RE.match(text) or _DATETIME_RE.match(text)):
        raise BadRequest(f"{name} must be a date or date-time like 2024-05-01 or 2024-05-01T10:00:00Z; got {raw!r}")
    frac = re.search(r"\.(\d+)", text)
    if frac and len(frac.group(1)) > 6:
        text = text.replace(frac.group(0), "." + frac.group(1)[:6])
    try:
        value = _dt.datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise BadRequest(f"{name} is not a valid date-time: {raw!r}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.timezone.utc)
    value = value.astimezone(_dt.timezone.utc)
    if not MIN_TIME <= value <= MAX_TIME:
        raise BadRequest(f"{name} must be between 1970 and 2299")
    return value


async def read_ahead(source: AsyncIterator[bytes], depth: int = 3) -> AsyncIterator[bytes]:
    """``source`` pulled by a background task up to ``depth`` chunks ahead of the consumer.

    Lets ClickHouse produce the next chunk while the current one is compressed
    and sent; memory stays bounded by ``depth`` chunks. The source is closed
    when the consumer stops early (client gone).
    """
    queue: asyncio.Queue = asyncio.Queue(maxsize=depth)
    done = object()

    async def pump() -> None:
        try:
            async for chunk in source:
                await queue.put(chunk)
            await queue.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise

    task = asyncio.create_task(pump())
    try:
        while True:
            item = await queue.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:  # pragma: no cover - best effort
                log.debug("closing an export stream failed", exc_info=True)


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload, option=orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z),
                        status=status, content_type="application/json")


def _handler(fn):
    """Turn ApiError into its JSON answer even without the web app's middleware."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await fn(request)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message, exc.details)

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


# ------------------------------------------------------------------ routes

class Routes:
    def __init__(self, deps: ApiDeps):
        self.deps = deps
        self.q = Queries(deps)
        self.lists = StaticLists(self.q)

    def _now(self) -> _dt.datetime:
        return _dt.datetime.fromtimestamp(self.deps.now(), _dt.timezone.utc)

    # -- automations

    async def automations(self, request: web.Request) -> web.Response:
        p = Params(request, PAGE_PARAMS + ("status", "q"))
        page, _ = p.page(Q.AUTOMATION_SORTS, "updated_at")
        return json_response(await self.q.list_automations(
            status=p.choice("status", Q.AUTOMATION_STATUSES), q=p.text("q"), page=page))

    async def automation(self, request: web.Request) -> web.Response:
        Params(request, ())
        return json_response(await self.q.automation_detail(request.match_info["id"]))

    async def recipients(self, request: web.Request) -> web.Response:
        p = Params(request, PAGE_PARAMS + ("step", "contact_id", "q", "from", "to"))
        page, _ = p.page(Q.RECIPIENT_SORTS, "sent_time")
        return json_response(await self.q.recipients(
            request.match_info["id"], step=p.integer("step", None, 0, 100_000), contact_id=p.text("contact_id"),
            q=p.text("q"), period=p.period(), page=page))

    async def recipients_export(self, request: web.Request) -> web.StreamResponse:
        p = Params(request, ("step", "contact_id", "from", "to"))
        automation_id = request.match_info["id"]
        props = await self.q.require_automation(automation_id)
        cq = self.q.recipients_csv_sql(
            automation_id, step=p.integer("step", None, 0, 100_000), contact_id=p.text("contact_id"),
            period=p.period())
        now = self._now()
        filename = recipients_zip_name(props.get("name") or automation_id, now)
        entry = filename[:-4] + ".csv"
        resp = web.StreamResponse(headers={
            "Content-Type": "application/zip",
            "Content-Disposition": content_disposition(filename),
            "Cache-Control": "no-store",
        })
        await resp.prepare(request)

        async def csv_bytes() -> AsyncIterator[bytes]:
            yield csv_row(self.q.RECIPIENT_CSV_HEADER).encode()
            async for chunk in self._csv_body(cq):
                yield chunk

        async for chunk in azip_chunks(entry, csv_bytes(), date_time=now.timetuple()[:6]):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def _csv_body(self, cq: CsvQuery) -> AsyncIterator[bytes]:
        """The CSV records of ``cq`` (no header), streamed from ClickHouse, read ahead by a few chunks."""
        if self.deps.stream_raw is not None:
            source = self.deps.stream_raw(cq.raw_sql(), cq.params)
        else:
            async def rows() -> AsyncIterator[bytes]:
                async for block in self.deps.stream(cq.row_sql(), cq.params):
                    yield "".join([row[0] for row in block]).encode()
            source = rows()
        async for chunk in read_ahead(source):
            yield chunk

    async def _stream_csv(self, request: web.Request, filename: str, header: Sequence[str],
                          cq: CsvQuery) -> web.StreamResponse:
        resp = web.StreamResponse(headers={
            "Content-Type": "text/csv; charset=utf-8; header=present",
            "Content-Disposition": content_disposition(filename),
            "Cache-Control": "no-store",
        })
        await resp.prepare(request)
        await resp.write(csv_row(header).encode())
        async for chunk in self._csv_body(cq):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    def _csv_name(self, *parts: str) -> str:
        stamp = self._now().strftime("%Y%m%d_%H%M%S")
        return "_".join(safe_filename_part(x) for x in parts) + f"_{stamp}.csv"

    # -- report

    async def report(self, request: web.Request) -> web.Response:
        p = Params(request, ("from", "to"))
        return json_response(await self.q.report(request.match_info["id"], p.period()))

    async def report_svg(self, request: web.Request) -> web.Response:
        from sendtrail.api.render import render_svg

        p = Params(request, ("from", "to"))
        report = await self.q.report(request.match_info["id"], p.period())
        return web.Response(body=render_svg(orjson.loads(orjson.dumps(report))).encode(),
                            content_type="image/svg+xml", charset="utf-8")

    async def report_png(self, request: web.Request) -> web.Response:
        from sendtrail.api.render import render_png

        p = Params(request, ("from", "to", "scale"))
        scale = p.integer("scale", 2, 1, 4)
        report = await self.q.report(request.match_info["id"], p.period())
        png = await asyncio.to_thread(render_png, orjson.loads(orjson.dumps(report)), scale=scale)
        return web.Response(body=png, content_type="image/png")

    # -- contacts of an automation

    _CONTACT_PARAMS = PAGE_PARAMS + ("status", "q", "run")

    async def contacts(self, request: web.Request) -> web.Response:
        p = Params(request, self._CONTACT_PARAMS)
        page, _ = p.page(Q.CONTACT_SORTS, "updated_at")
        return json_response(await self.q.contacts(
            request.match_info["id"], status=p.choice("status", Q.CONTACT_STATUSES), q=p.text("q"),
            run=p.integer("run", None, 0), page=page))

    async def contacts_csv(self, request: web.Request) -> web.StreamResponse:
        p = Params(request, ("sort", "order", "status", "q", "run"))
        automation_id = request.match_info["id"]
        sort = Q.CONTACT_SORTS[p.choice("sort", list(Q.CONTACT_SORTS), "updated_at")]
        order = p.choice("order", ["asc", "desc"], "desc").upper()
        status, q, run = p.choice("status", Q.CONTACT_STATUSES), p.text("q"), p.integer("run", None, 0)
        props = await self.q.require_automation(automation_id)
        cq = self.q.contacts_csv_sql(automation_id, status=status, q=q, run=run, sort=sort, order=order)
        return await self._stream_csv(request, self._csv_name("automation_contacts", props.get("name") or automation_id),
                                      self.q.CONTACT_CSV_HEADER, cq)

    # -- contacts at a node

    def _step(self, request: web.Request) -> int:
        return parse_int("step_index", request.match_info["step_index"], None, 0, 100_000)

    async def node_contacts(self, request: web.Request) -> web.Response:
        p = Params(request, PAGE_PARAMS + ("state", "from", "to"))
        page, sort_key = p.page(Q.NODE_CONTACT_SORTS, "at")
        step = self._step(request)
        return json_response(await self.q.node_contacts(
            request.match_info["id"], step, state=p.choice("state", Q.NODE_STATES), period=p.period(),
            page=page, sort_key=sort_key))

    async def node_contacts_csv(self, request: web.Request) -> web.StreamResponse:
        p = Params(request, ("sort", "order", "state", "from", "to"))
        automation_id = request.match_info["id"]
        step = self._step(request)
        sort = Q.NODE_CONTACT_SORTS[p.choice("sort", list(Q.NODE_CONTACT_SORTS), "at")]
        order = p.choice("order", ["asc", "desc"], "desc").upper()
        state, period = p.choice("state", Q.NODE_STATES), p.period()
        props = await self.q.require_automation(automation_id)
        cq = self.q.node_contacts_csv_sql(automation_id, step, state=state, period=period, sort=sort, order=order)
        name = self._csv_name("node_contacts", props.get("name") or automation_id, f"step{step}", state or "all")
        return await self._stream_csv(request, name, self.q.NODE_CSV_HEADER, cq)

    # -- health

    async def health(self, request: web.Request) -> web.Response:
        p = Params(request, ("older_than", "limit", "offset"))
        older = p.integer("older_than", self.deps.stuck_after_seconds, 0, 100 * 365 * 86400)
        limit = p.integer("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        offset = p.integer("offset", 0, 0, MAX_OFFSET)
        cutoff = self._now() - _dt.timedelta(seconds=older)
        result = await self.q.health(request.match_info["id"], cutoff=cutoff,
                                     page=Page(limit=limit, offset=offset))
        result["older_than"] = older
        return json_response(result)

    # -- static lists

    async def create_static_list(self, request: web.Request) -> web.Response:
        Params(request, ())
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}") from None
        return json_response(await self.lists.create(body), status=201)

    async def static_lists(self, request: web.Request) -> web.Response:
        p = Params(request, PAGE_PARAMS + ("automation_id",))
        page, _ = p.page(Q.STATIC_LIST_SORTS, "created_at")
        return json_response(await self.lists.list_lists(automation_id=p.text("automation_id"), page=page))

    async def static_list(self, request: web.Request) -> web.Response:
        p = Params(request, PAGE_PARAMS)
        page, _ = p.page(Q.LIST_MEMBER_SORTS, "contact_id", "asc")
        return json_response(await self.lists.get(request.match_info["id"], page))

    async def static_list_csv(self, request: web.Request) -> web.StreamResponse:
        Params(request, ())
        props = await self.lists.get_list(request.match_info["id"])
        return await self._stream_csv(request, self._csv_name("static_list", props["name"]),
                                      self.lists.CSV_HEADER, self.lists.members_csv_sql(props["id"]))

    # -- mailings

    _MAILING_PARAMS = ("automation_id", "step", "q", "from", "to")

    async def mailings(self, request: web.Request) -> web.Response:
        p = Params(request, PAGE_PARAMS + self._MAILING_PARAMS)
        page, _ = p.page(Q.MAILING_SORTS, "date")
        return json_response(await self.q.mailings(
            automation_id=p.text("automation_id"), step=p.integer("step", None, 0, 100_000), q=p.text("q"),
            period=p.period(), page=page))

    async def mailings_csv(self, request: web.Request) -> web.StreamResponse:
        p = Params(request, ("sort", "order") + self._MAILING_PARAMS)
        sort = Q.MAILING_SORTS[p.choice("sort", list(Q.MAILING_SORTS), "date")]
        order = p.choice("order", ["asc", "desc"], "desc").upper()
        cq = self.q.mailings_csv_sql(
            automation_id=p.text("automation_id"), step=p.integer("step", None, 0, 100_000), q=p.text("q"),
            period=p.period(), sort=sort, order=order)
        return await self._stream_csv(request, self._csv_name("mailings"), self.q.MAILING_CSV_HEADER, cq)

    async def mailing(self, request: web.Request) -> web.Response:
        Params(request, ())
        return json_response(await self.q.mailing(request.match_info["id"]))

    async def mailing_recipients(self, request: web.Request) -> web.Response:
        p = Params(request, PAGE_PARAMS + ("status", "q"))
        page, _ = p.page(Q.MAILING_RECIPIENT_SORTS, "date")
        return json_response(await self.q.mailing_recipients(
            request.match_info["id"], status=p.choice("status", Q.MESSAGE_STATUSES), q=p.text("q"), page=page))

    # -- contacts

    async def contact_automations(self, request: web.Request) -> web.Response:
        p = Params(request, ("limit", "offset"))
        page = Page(limit=p.integer("limit", DEFAULT_LIMIT, 1, MAX_LIMIT), offset=p.integer("offset", 0, 0, MAX_OFFSET))
        return json_response(await self.q.contact_automations(request.match_info["contact_id"], page=page))

    async def contact_timeline(self, request: web.Request) -> web.Response:
        p = Params(request, PAGE_PARAMS + ("kind", "automation_id"))
        page, _ = p.page(Q.TIMELINE_SORTS, "occurred_at")
        return json_response(await self.q.timeline(
            request.match_info["contact_id"], kind=p.choice("kind", Q.TIMELINE_KINDS),
            automation_id=p.text("automation_id"), page=page))

    async def contact_messages(self, request: web.Request) -> web.Response:
        p = Params(request, PAGE_PARAMS + ("status", "automation_id"))
        page, _ = p.page(Q.MESSAGE_SORTS, "sent_at")
        return json_response(await self.q.contact_messages(
            request.match_info["contact_id"], status=p.choice("status", Q.MESSAGE_STATUSES),
            automation_id=p.text("automation_id"), page=page))

    async def openapi(self, request: web.Request) -> web.Response:
        from sendtrail.api.openapi import OPENAPI

        return json_response(OPENAPI)


#: (method, path, Routes method name), in registration order (literal ``.csv`` paths before ``{id}``).
ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/api/v1/openapi.json", "openapi"),
    ("GET", "/api/v1/automations", "automations"),
    ("GET", "/api/v1/automations/{id}", "automation"),
    ("GET", "/api/v1/automations/{id}/recipients", "recipients"),
    ("GET", "/api/v1/automations/{id}/recipients/export", "recipients_export"),
    ("GET", "/api/v1/automations/{id}/report", "report"),
    ("GET", "/api/v1/automations/{id}/report.svg", "report_svg"),
    ("GET", "/api/v1/automations/{id}/report.png", "report_png"),
    ("GET", "/api/v1/automations/{id}/contacts", "contacts"),
    ("GET", "/api/v1/automations/{id}/contacts.csv", "contacts_csv"),
    ("GET", "/api/v1/automations/{id}/nodes/{step_index}/contacts", "node_contacts"),
    ("GET", "/api/v1/automations/{id}/nodes/{step_index}/contacts.csv", "node_contacts_csv"),
    ("GET", "/api/v1/automations/{id}/health", "health"),
    ("POST", "/api/v1/static-lists", "create_static_list"),
    ("GET", "/api/v1/static-lists", "static_lists"),
    ("GET", "/api/v1/static-lists/{id}.csv", "static_list_csv"),
    ("GET", "/api/v1/static-lists/{id}", "static_list"),
    ("GET", "/api/v1/mailings", "mailings"),
    ("GET", "/api/v1/mailings.csv", "mailings_csv"),
    ("GET", "/api/v1/mailings/{id}", "mailing"),
    ("GET", "/api/v1/mailings/{id}/recipients", "mailing_recipients"),
    ("GET", "/api/v1/contacts/{contact_id}/automations", "contact_automations"),
    ("GET", "/api/v1/contacts/{contact_id}/timeline", "contact_timeline"),
    ("GET", "/api/v1/contacts/{contact_id}/messages", "contact_messages"),
)


def add_routes(app: web.Application, deps: ApiDeps) -> None:
    """Register every report route of :data:`ROUTES` on ``app``."""
    routes = Routes(deps)
    for method, path, name in ROUTES:
        handler = _handler(getattr(routes, name))
        if method == "GET":
            app.router.add_get(path, handler, allow_head=False)
        else:
            app.router.add_route(method, path, handler)
