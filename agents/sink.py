"""The ClickHouse sink: batch rows per table, insert them off the event loop,
retry forever, never lose or double a row.

Usage::

    writer = BatchWriter(lambda: connect(url), max_rows=2000, max_seconds=0.5,
                         max_backlog_rows=200_000, retry_max_seconds=30)
    await writer.write("recipients", rows, dedup_token=f"sends:{partition}:{offset}")
    ...
    await writer.flush()      # everything written so far is in ClickHouse
    consumer.commit(...)      # only now commit the Kafka offsets
    await writer.close()

Batching. Rows are buffered per table. A table's buffer is sealed into a
batch when it holds ``max_rows`` rows (a single ``write`` is never split, so
a batch may exceed ``max_rows`` by one write) or when ``max_seconds`` have
passed since its first row (a background timer task). ``flush()`` seals all
buffers.

Inserting. Sealed batches are inserted in order by one background task. It
hands every sealed batch to the executor in one job, inserted there one after
the other, so the chain of inserts never waits for a busy event loop between
tables. The executor is by default a private single-thread one (chDB runs
in-process and its client serializes calls on a handle anyway), so the event
loop never blocks on ClickHouse.

Retries. A failed insert is logged (with the exception), reported to
``metrics.on_failure`` and retried with exponential backoff
(``retry_initial_seconds`` doubling up to ``retry_max_seconds``) until it
succeeds; the batch keeps its rows and its ``insert_deduplication_token``, so
an insert that reached ClickHouse but whose answer was lost is dropped by
ClickHouse when retried. A deterministic failure (a row that does not fit
its column) therefore blocks the sink and shows up as repeated errors: fix
the row builder. When a client factory was given, the client is rebuilt after
a failure.

Dedup token. The token of a batch is a hash of the table and, for each
``write`` in it, the caller's ``dedup_token`` and row count. Callers pass a
token that identifies the rows' content, e.g. the source topic, partition and
offset of the event that produced them (same token => same rows).

Back-pressure. ``write`` returns at once while the backlog (buffered plus
not yet inserted rows, all tables) is at most ``max_backlog_rows``; above it
``write`` seals the buffers and waits until the backlog drains back to the
limit, which slows the consumer down while ClickHouse is slow or away.

Metrics. ``metrics`` is optional: an object with any of the methods, or a
dict of callables, ``on_flush(table, rows, seconds)`` (after each successful
insert; seconds = duration of the successful attempt), ``on_failure(table,
exc)`` (each failed attempt) and ``on_backlog(rows)`` (whenever the backlog
changes). Exceptions raised by hooks are logged and ignored.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from sendtrail.clickhouse import (
    DEFAULT_DATABASE,
    TABLE_COLUMNS,
    column_type_names,
    insert,
    rows_from_dicts,
)

__all__ = ["BatchWriter", "TABLE_COLUMNS", "batch_token"]

logger = logging.getLogger(__name__)


def batch_token(table: str, parts: Sequence[tuple[str, int]]) -> str:
    """Stable ``insert_deduplication_token`` of a batch: hash of the table and each write's (token, rows)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(table.encode())
    for token, count in parts:
        h.update(b"\x1e")
        h.update(token.encode())
        h.update(b"\x1f")
        h.update(str(count).encode())
    return f"{table}:{h.hexdigest()}"


@dataclass
class _Buffer:
    rows: list = field(default_factory=list)
    parts: list = field(default_factory=list)  # (dedup_token, row count) per write
    first_at: float = 0.0


@dataclass
class _Batch:
    table: str
    rows: list
    token: str
    done: asyncio.Future


class BatchWriter:
    def __init__(
        self,
        client_factory_or_client: Any,
        *,
        max_rows: int = 2000,
        max_seconds: float = 0.5,
        max_backlog_rows: int = 200_000,
        retry_max_seconds: float = 30.0,
        retry_initial_seconds: float = 0.1,
        metrics: Any = None,
        executor: concurrent.futures.Executor | None = None,
        database: str = DEFAULT_DATABASE,
        table_columns: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        if max_rows < 1 or max_backlog_rows < 1:
            raise ValueError("max_rows and max_backlog_rows must be at least 1")
        if max_seconds <= 0 or retry_max_seconds <= 0 or retry_initial_seconds <= 0:
            raise ValueError("max_seconds and the retry delays must be positive")
        if hasattr(client_factory_or_client, "insert"):
            self._client = client_factory_or_client
            self._factory: Callable[[], Any] | None = None
        elif callable(client_factory_or_client):
            self._client = None
            self._factory = client_factory_or_client
        else:
            raise TypeError("BatchWriter needs a clickhouse-connect client or a callable that returns one")
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self.max_backlog_rows = max_backlog_rows
        self.retry_max_seconds = retry_max_seconds
        self.retry_initial_seconds = retry_initial_seconds
        self.database = database
        self.table_columns = {t: tuple(c) for t, c in (table_columns or TABLE_COLUMNS).items()}
        self._metrics = metrics
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sendtrail-sink"
        )
        self._type_names: dict[str, list[str]] = {}

        self._buffers: dict[str, _Buffer] = {}
        self._pending: deque[_Batch] = deque()
        self._backlog = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._has_data: asyncio.Event | None = None
        self._has_batches: asyncio.Event | None = None
        self._drained: asyncio.Condition | None = None
        self._tasks: list[asyncio.Task] = []

    # ---- public API -----------------------------------------------------

    @property
    def backlog_rows(self) -> int:
        """Rows accepted by ``write`` and not yet in ClickHouse."""
        return self._backlog

    async def write(self, table: str, rows: Sequence[Sequence[Any]] | Sequence[Mapping[str, Any]],
                    dedup_token: str) -> None:
        """Buffer ``rows`` (tuples in ``TABLE_COLUMNS[table]`` order, or dicts) for ``table``.

        Returns when the rows are buffered and the backlog is within
        ``max_backlog_rows``; call :meth:`flush` to know they are in ClickHouse.
        """
        if self._closed:
            raise RuntimeError("BatchWriter is closed")
        if not rows:
            return
        if not dedup_token:
            raise ValueError("write needs a non-empty dedup_token")
        columns = self.table_columns.get(table)
        if columns is None:
            raise KeyError(f"unknown table {table!r}; known: {sorted(self.table_columns)}")
        prepared = self._prepare(table, columns, rows)
        self._start()
        buf = self._buffers.get(table)
        if buf is None:
            buf = self._buffers[table] = _Buffer()
        if not buf.rows:
            buf.first_at = time.monotonic()
            self._has_data.set()
        buf.rows.extend(prepared)
        buf.parts.append((dedup_token, len(prepared)))
        self._add_backlog(len(prepared))
        if len(buf.rows) >= self.max_rows:
            self._seal(table)
        if self._backlog > self.max_backlog_rows:
            self._seal_all()
            async with self._drained:
                await self._drained.wait_for(lambda: self._backlog <= self.max_backlog_rows or self._closed)

    async def flush(self) -> None:
        """Return once every row written before this call is in ClickHouse (waits through retries)."""
        if self._loop is None:
            return
        self._seal_all()
        waiting = [b.done for b in self._pending if not b.done.done()]
        if waiting:
            await asyncio.wait(waiting)
        for fut in waiting:
            if fut.cancelled():
                raise RuntimeError("the sink stopped before the rows were inserted")

    async def close(self, timeout: float | None = None) -> None:
        """Flush (waiting up to ``timeout`` seconds, forever by default), then stop the tasks.

        If the timeout passes, the rows not yet inserted are abandoned with an
        error log (their Kafka offsets must not be committed) and
        ``asyncio.TimeoutError`` is raised after cleaning up.
        """
        if self._closed:
            return
        error: BaseException | None = None
        try:
            if timeout is None:
                await self.flush()
            else:
                await asyncio.wait_for(self.flush(), timeout)
        except asyncio.TimeoutError as exc:
            logger.error("sink closed with %d rows not inserted (ClickHouse unavailable?)", self._backlog)
            error = exc
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []
        for batch in self._pending:
            if not batch.done.done():
                batch.done.cancel()
        if self._drained is not None:
            async with self._drained:
                self._drained.notify_all()
        if self._own_executor:
            self._executor.shutdown(wait=True)
        if self._factory is not None and self._client is not None:
            try:
                self._client.close()
            except Exception:
                logger.debug("error closing the sink's ClickHouse client", exc_info=True)
            self._client = None
        if error is not None:
            raise error

    # ---- internals ------------------------------------------------------

    @staticmethod
    def _prepare(table: str, columns: tuple, rows) -> list:
        if isinstance(rows[0], Mapping):
            return rows_from_dicts(columns, rows)
        width = len(columns)
        out = []
        for row in rows:
            if len(row) != width:
                raise ValueError(f"{table}: a row has {len(row)} values, expected {width} ({', '.join(columns)})")
            out.append(row)
        return out

    def _start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._has_data = asyncio.Event()
        self._has_batches = asyncio.Event()
        self._drained = asyncio.Condition()
        self._tasks = [
            self._loop.create_task(self._timer_loop(), name="sendtrail-sink-timer"),
            self._loop.create_task(self._insert_loop(), name="sendtrail-sink-insert"),
        ]

    def _add_backlog(self, delta: int) -> None:
        self._backlog += delta
        self._hook("on_backlog", self._backlog)

    def _seal(self, table: str) -> None:
        buf = self._buffers.get(table)
        if buf is None or not buf.rows:
            return
        self._buffers[table] = _Buffer()
        batch = _Batch(table, buf.rows, batch_token(table, buf.parts), self._loop.create_future())
        self._pending.append(batch)
        self._has_batches.set()

    def _seal_all(self) -> None:
        for table in list(self._buffers):
            self._seal(table)

    async def _timer_loop(self) -> None:
        while True:
            waiting = [b.first_at for b in self._buffers.values() if b.rows]
            if not waiting:
                self._has_data.clear()
                await self._has_data.wait()
                continue
            now = time.monotonic()
            deadline = min(waiting) + self.max_seconds
            if deadline > now:
                await asyncio.sleep(deadline - now)
                continue
            for table, buf in list(self._buffers.items()):
                if buf.rows and buf.first_at + self.max_seconds <= now:
                    self._seal(table)

    async def _insert_loop(self) -> None:
        delay = self.retry_initial_seconds
        attempt = 0  # failed attempts of the batch at the head of the queue
        while True:
            if not self._pending:
                self._has_batches.clear()
                await self._has_batches.wait()
                continue
            # Every sealed batch goes to the executor in one job, inserted there in order: the
            # chain of inserts does not wait for the event loop between tables (the loop may be
            # busy with the next batch of records for a while).
            batches = list(self._pending)
            durations, exc = await self._loop.run_in_executor(self._executor, self._insert_run, batches)
            for batch, seconds in zip(batches, durations):
                self._pending.popleft()
                self._add_backlog(-len(batch.rows))
                if not batch.done.done():
                    batch.done.set_result(None)
                self._hook("on_flush", batch.table, len(batch.rows), seconds)
                if attempt:
                    logger.info("ClickHouse insert into %s succeeded after %d attempts", batch.table, attempt + 1)
                    attempt = 0
                    delay = self.retry_initial_seconds
            if durations:
                async with self._drained:
                    self._drained.notify_all()
            if exc is None:
                continue
            failed = batches[len(durations)]
            attempt += 1
            logger.error(
                "ClickHouse insert into %s failed (%d rows, attempt %d, token %s); retrying in %.2fs: %s",
                failed.table, len(failed.rows), attempt, failed.token, delay, exc, exc_info=exc,
            )
            self._hook("on_failure", failed.table, exc)
            self._hook("on_retry", failed.table, attempt, delay)
            if self._factory is not None:
                self._drop_client()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max_seconds)

    def _insert_run(self, batches: list[_Batch]) -> tuple[list[float], BaseException | None]:
        """Runs in the executor thread: insert ``batches`` in order, stop at the first failure.
        Returns the seconds of each successful insert and the failure (None when all succeeded)."""
        durations: list[float] = []
        for batch in batches:
            started = time.monotonic()
            try:
                self._insert_sync(batch)
            except Exception as exc:
                return durations, exc
            durations.append(time.monotonic() - started)
        return durations, None

    def _insert_sync(self, batch: _Batch) -> None:
        """Runs in the executor thread."""
        client = self._client
        if client is None:
            client = self._client = self._factory()
        names = self.table_columns[batch.table]
        types = self._type_names.get(batch.table)
        if types is None:
            types = column_type_names(client, batch.table, self.database, names)
            self._type_names[batch.table] = types
        insert(client, batch.table, batch.rows, names, batch.token,
               database=self.database, column_type_names=types)

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        self._type_names.clear()
        if client is not None:
            def _close() -> None:
                try:
                    client.close()
                except Exception:
                    logger.debug("error closing a failed ClickHouse client", exc_info=True)
            self._executor.submit(_close)

    def _hook(self, name: str, *args: Any) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        fn = metrics.get(name) if isinstance(metrics, Mapping) else getattr(metrics, name, None)
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            logger.exception("sink metrics hook %s failed", name)
