"""The SQL behind every report, and the shaping of its rows into JSON.

Rules kept by every function here:

* values from requests are passed as server-side parameters (``{name:Type}``);
  the only text put into SQL is the database name (validated identifier) and
  sort expressions taken from the allowlist dicts below;
* latest-state tables (automations, contacts, recipients, enrollments,
  node_states, messages, static lists) are read with ``FINAL``, so duplicate
  rows from replays are never counted twice; append-only tables
  (status_changes) too, since a re-emitted change is an identical row;
* node states ``none`` (no longer at that node) are ignored;
* the worker's report counters (migration 009: ``mailing_counters``,
  ``node_counters``, ``status_counters``) are read only while
  ``counter_coverage`` covers every partition of that table
  (:meth:`Queries.counters_cover`); otherwise, and for period-filtered
  figures, the latest state is counted as before.

Period selection (``from`` inclusive, ``to`` exclusive, UTC) of the report:

* ``nodes``: a run counts at a node in its latest state there (done, waiting,
  filtered, stopped) when the time it reached that state (``node_states.at``:
  the step's done time, the filter time, or the time it started waiting / was
  stopped) lies in the period;
* ``statuses`` and ``completion``: the cohort of runs *enrolled* in the period
  (``enrolled_at``, or ``status_at`` when the enrollment event has not
  arrived), by their current status / position;
* without ``from``/``to`` everything counts.

Completion is positional, as the recipients page defines it: ``completed`` =
runs with every step done (no current step and not filtered out: status
finished/completed, and also a run that replied to, unsubscribed from or bounced
on its last step), ``in_progress`` = at least one step done and steps left,
``not_started`` = enrolled, no step done yet (at the first node), and ``left`` =
runs that were filtered out of the flow before the end (not among the three).
"""
from __future__ import annotations

import datetime as _dt
import time as _time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import orjson

from sendtrail.api.errors import BadRequest, NotFound
from sendtrail.api.export import CsvQuery
from streams.counters import COUNTER_TABLES

NODE_STATES = ("done", "waiting", "filtered", "stopped")
#: completion classes of an ``enrollments`` row without a current step (streams.counters counts the same):
#: every step done (completed, whatever the status), or filtered out of the flow before the end (left)
COMPLETED_RUN = "current_step < 0 AND NOT (status = 'finished' AND ifNull(reason, '') = 'filtered')"
LEFT_RUN = "current_step < 0 AND status = 'finished' AND ifNull(reason, '') = 'filtered'"
CONTACT_STATUSES = (
    "waiting_enrichment", "ready", "active_limit", "coworkers_limit", "in_progress", "paused",
    "not_sent", "bounced", "finished", "canceled", "failed", "unsubscribed", "duplicate",
)
MESSAGE_STATUSES = (
    "dropped", "bounced", "spam_reported", "unsubscribed", "clicked", "opened", "delivered", "deferred", "sent",
)
MESSAGE_FLAGS = (
    "sent", "delivered", "deferred", "opened", "clicked", "bounced", "dropped", "spam_reported",
    "unsubscribed", "resubscribed", "replied", "auto_replied",
)
AUTOMATION_STATUSES = ("active", "paused", "archived")
TIMELINE_KINDS = ("contact_status", "node_state", "message_status")

TIME = "DateTime64(3, 'UTC')"

# Appended to queries that read latest-state tables with FINAL. The tables are
# not partitioned, so every part is in one partition and merging "across
# partitions" never applies: the setting changes no result (background merges
# never cross partitions either). What it buys: a partition that holds a single
# part (a table that merges have caught up with) is read without any FINAL
# merge step. Without it, ClickHouse 26.x still sort-merges the ranges of a
# single part when a skip index has split them (measured: a step-filtered
# recipients count over 5M rows, 250 ms -> 20 ms).
FINAL_SETTINGS = " SETTINGS do_not_merge_across_partitions_select_final = 1"
# node_waits without a reset row joins reset 0 (not NULL): every version passes
WAITS_SETTINGS = " SETTINGS join_use_nulls = 0"
# a node's reset row in node_waits (migration 012) has since 0
WAIT_SINCE_ZERO = "toDateTime64(0, 3, 'UTC')"
WAIT_RESET = f"since = {WAIT_SINCE_ZERO}"

# ---------------------------------------------------------------- allowlists
# request value -> SQL expression (trusted text)

AUTOMATION_SORTS = {"name": "name", "start_at": "start_at", "updated_at": "updated_at",
                    "status": "status", "automation_id": "automation_id"}
RECIPIENT_SORTS = {"sent_time": "sent_time", "step_index": "step_index", "user_name": "user_name",
                   "email": "email"}
CONTACT_SORTS = {"updated_at": "updated_at", "status_at": "status_at", "enrolled_at": "enrolled_at",
                 "name": "name", "email": "email", "status": "status", "contact_id": "contact_id",
                 "current_step": "current_step"}
# node-contact sorts that only need node_states (page first, then join)
NODE_CONTACT_NODE_SORTS = {"at": "at", "state_at": "at", "contact_id": "contact_id", "state": "state"}
NODE_CONTACT_JOIN_SORTS = {"name": "name", "email": "email", "status": "status", "updated_at": "updated_at"}
NODE_CONTACT_SORTS = {**NODE_CONTACT_NODE_SORTS, **NODE_CONTACT_JOIN_SORTS}
MAILING_SORTS = {"date": "date", "subject": "subject", "total_sent": "total_sent", "delivered": "delivered",
                 "opened": "opened", "clicked": "clicked", "bounced": "bounced", "mailing_id": "mailing_id",
                 "step_index": "step_index"}
_STATUS_RANK = "indexOf(['" + "','".join(MESSAGE_STATUSES) + "'], status)"
MAILING_RECIPIENT_SORTS = {"name": "name", "email": "email", "status": _STATUS_RANK, "date": "status_at",
                           "status_at": "status_at", "sent_at": "sent_at"}
MESSAGE_SORTS = {"sent_at": "sent_at", "status_at": "status_at", "status": _STATUS_RANK, "subject": "subject"}
TIMELINE_SORTS = {"occurred_at": "occurred_at"}
LIST_MEMBER_SORTS = {"contact_id": "contact_id", "name": "name", "email": "email"}
STATIC_LIST_SORTS = {"created_at": "created_at", "name": "name", "count": "count"}


# ---------------------------------------------------------------- helpers

def sql_time(value: _dt.datetime) -> str:
    """A parameter value for ``{x:DateTime64(3, 'UTC')}``."""
    if value.tzinfo is not None:
        value = value.astimezone(_dt.timezone.utc).replace(tzinfo=None)
    return value.strftime("%Y-%m-%d %H:%M:%S.") + f"{value.microsecond // 1000:03d}"


def iso(value: Any) -> Any:
    """Datetimes as RFC 3339 UTC with milliseconds (``2024-05-01T10:00:00.000Z``); other values unchanged."""
    if isinstance(value, _dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    return value


def json_field(text: Any) -> Any:
    """A JSON column parsed (objects stay objects); text that is not JSON is returned as it is."""
    if text is None or text == "":
        return None if text is None else {}
    if not isinstance(text, (str, bytes)):
        return text
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def shape(columns: Sequence[str], rows: Iterable[Sequence[Any]], json_cols: Iterable[str] = ()) -> list[dict]:
    jc = set(json_cols)
    out = []
    for row in rows:
        item = {}
        for name, value in zip(columns, row):
            if name in jc:
                item[name] = json_field(value)
            else:
                item[name] = iso(value)
        out.append(item)
    return out


@dataclass
class Where:
    """A WHERE clause built from trusted fragments and named parameters."""

    parts: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def add(self, fragment: str, **params: Any) -> "Where":
        self.parts.append(fragment)
        self.params.update(params)
        return self

    def sql(self, keyword: str = "WHERE") -> str:
        return f"{keyword} " + " AND ".join(self.parts) if self.parts else ""


def _largest_merged(parts: Sequence[tuple[str, int, int]]) -> str:
    """Name of the largest merged part (level > 0) among ``(name, level, rows)``; ties: the last name."""
    return max((p for p in parts if p[1] > 0), key=lambda p: (p[2], p[0]))[0]


def _in_part(where: Where, part: str) -> Where:
    """``where`` limited to the rows of one data part (``_part``)."""
    return Where(where.parts + ["_part = {_only:String}"], {**where.params, "_only": part})


def _without(where: Where, fixed: Where) -> Where:
    """The conditions of ``where`` that are not in ``fixed``, with their parameters."""
    return Where([x for x in where.parts if x not in fixed.parts],
                 {k: v for k, v in where.params.items() if k not in fixed.params})


@dataclass(frozen=True)
class Page:
    limit: int = 50
    offset: int = 0
    sort: str = ""          # SQL expression from an allowlist
    order: str = "DESC"     # ASC | DESC


@dataclass(frozen=True)
class Period:
    start: _dt.datetime | None = None
    end: _dt.datetime | None = None

    @property
    def whole(self) -> bool:
        """No bound: all time (the worker's counters answer only such figures)."""
        return self.start is None and self.end is None

    def apply(self, where: Where, column: str, prefix: str = "p") -> Where:
        if self.start is not None:
            where.add(f"{column} >= {{{prefix}_from:{TIME}}}", **{f"{prefix}_from": sql_time(self.start)})
        if self.end is not None:
            where.add(f"{column} < {{{prefix}_to:{TIME}}}", **{f"{prefix}_to": sql_time(self.end)})
        return where

    def as_json(self) -> dict[str, Any]:
        return {"from": iso(self.start), "to": iso(self.end)}


class Queries:
    """All report queries over one database, through an :class:`~sendtrail.api.routes.ApiDeps`."""

    def __init__(self, deps: Any):
        from sendtrail.clickhouse import check_identifier

        self.deps = deps
        self.db = check_identifier(deps.database)
        self._covered: dict[str, float] = {}  # counters table -> monotonic time its full coverage was seen

    def t(self, table: str) -> str:
        return f"`{self.db}`.{table}"

    async def _rows(self, sql: str, params: Mapping[str, Any]) -> tuple[list[str], list[tuple]]:
        cols, rows = await self.deps.query_columns(sql, dict(params))
        return list(cols), list(rows)

    async def _scalar(self, sql: str, params: Mapping[str, Any]) -> Any:
        rows = await self.deps.query(sql, dict(params))
        return rows[0][0] if rows else None

    @staticmethod
    def _known_total(page: "Page", n_rows: int) -> int | None:
        """The total of a list whose page has ``n_rows`` rows when it is known without counting: the page
        is not full (it is the last page) or the first page is empty; else None."""
        if 0 < n_rows < page.limit or (n_rows == 0 and page.offset == 0):
            return page.offset + n_rows
        return None

    async def _page_total(self, page: "Page", n_rows: int, count_sql: str, params: Mapping[str, Any]) -> int:
        """The total of a list whose page has ``n_rows`` rows: ``_known_total``, else ``count_sql`` (a
        ``SELECT count()``)."""
        known = self._known_total(page, n_rows)
        if known is not None:
            return known
        return int(await self._scalar(count_sql, params) or 0)

    # ------------------------------------------------------------ report counters (migration 009)

    # a complete coverage is remembered this long (an incomplete one is read again on every call)
    COVERAGE_TTL_S = 5.0

    async def counters_cover(self, table: str) -> bool:
        """Whether the worker's counters ``table`` (migration 009) count every key, so that summing its latest
        rows (``FINAL``) over the partitions gives exactly what counting the latest state would.

        ``counter_coverage`` holds one row per (counters table, partition) whose counters are complete, with
        the topic's partition count N. The table is covered only when it has a row for every partition
        0..N-1 and all its rows agree on N (a partition count that changed leaves rows with another N until
        every partition is counted again). A complete coverage is remembered for ``COVERAGE_TTL_S`` seconds;
        without access to ``counter_coverage`` (or without the table) nothing is covered."""
        now = _time.monotonic()
        seen = self._covered.get(table)
        if seen is not None and now - seen < self.COVERAGE_TTL_S:
            return True
        try:
            rows = await self.deps.query(
                "SELECT counters, uniqExact(partition), min(partitions), max(partitions), max(partition) "
                f"FROM {self.t('counter_coverage')} FINAL GROUP BY counters", {})
        except Exception:
            self._covered.clear()
            return False
        complete = set()
        for name, covered, low, high, top in rows:
            covered, low, high, top = int(covered), int(low), int(high), int(top)
            # distinct partitions, all below N = their count: exactly 0..N-1
            if covered > 0 and low == high == covered and top == covered - 1:
                complete.add(str(name))
        for name in COUNTER_TABLES:
            if name in complete:
                self._covered[name] = now
            else:
                self._covered.pop(name, None)
        return table in complete

    async def _counted_total(self, table: str, sum_sql: str, params: Mapping[str, Any]) -> int | None:
        """``sum_sql`` (one sum over the worker's counters ``table``) when they cover every partition, else
        None (the caller counts the latest state)."""
        if not await self.counters_cover(table):
            return None
        return int(await self._scalar(sum_sql, params) or 0)

    # ------------------------------------------------------------ pages of a latest-state table

    # candidates read before falling back to one FINAL query
    LATEST_PAGE_MAX_CANDIDATES = 20_000

    # keys outside the largest merged part up to which _latest_count corrects that part's count
    LATEST_COUNT_MAX_KEYS = 10_000

    async def _active_parts(self, table: str) -> list[tuple[str, int, int]] | None:
        """(name, level, rows) of ``table``'s active parts, by name; None without access to system.parts."""
        try:
            rows = await self.deps.query(
                "SELECT name, level, rows FROM system.parts WHERE database = {db:String} AND table = {t:String} "
                "AND active ORDER BY name", {"db": self.db, "t": table})
        except Exception:
            return None
        return [(str(n), int(lv), int(r)) for n, lv, r in rows]

    async def _outside_largest(self, table: str, keys: Sequence[str], fixed: Where
                               ) -> tuple[list[tuple[str, int, int]], list[tuple]] | None:
        """The active parts of ``table`` and the keys (matching ``fixed``) that have rows outside its largest
        merged part ``L``; None when there is no merged part or more than ``LATEST_COUNT_MAX_KEYS`` such
        keys (parts not merged yet). A key not among them has exactly one row, in ``L`` (a merge keeps one
        row per key)."""
        before = await self._active_parts(table)
        merged = [p for p in before or [] if p[1] > 0]
        if not merged:
            return None
        if len(before) == 1:
            return before, []  # the merged part is the only one
        sql, params = self._outside_keys(table, keys, fixed, before)
        other = await self.deps.query(f"SELECT DISTINCT * FROM ({sql}) LIMIT {{_max:UInt64}}",
                                      {**params, "_max": self.LATEST_COUNT_MAX_KEYS + 1})
        if len(other) > self.LATEST_COUNT_MAX_KEYS:
            return None
        return before, [tuple(r) for r in other]

    def _outside_keys(self, table: str, keys: Sequence[str], fixed: Where, parts: Sequence[tuple[str, int, int]]
                      ) -> tuple[str, dict]:
        """The SELECT (and its parameters) of the keys of ``table`` matching ``fixed`` in the parts other than
        the largest merged one of ``parts``, the keys ``K`` of ``_outside_largest``. The corrections read
        ``K`` through it as a subquery: ClickHouse builds that set from the recent parts in a few ms, where
        a parameter of thousands of keys takes tens of ms to parse (recipients, 1,250 keys: 18 against
        63 ms); the callers check that the set of parts did not change."""
        glue = "AND" if fixed.parts else "PREWHERE"
        return (f"SELECT {', '.join(keys)} FROM {self.t(table)} {fixed.sql('PREWHERE')} {glue} "
                "_part != {_largest:String}", {**fixed.params, "_largest": _largest_merged(parts)})

    async def _latest_count(self, *, table: str, keys: Sequence[str], fixed: Where,
                            changing: Where, final_sql: str, final_params: Mapping[str, Any]) -> int:
        """``count()`` of ``table`` FINAL matching ``fixed`` (columns fixed per key) and ``changing``, read
        mostly without FINAL.

        With ``K`` the keys that have rows outside the largest merged part (``_outside_largest``; the other
        keys have one row each): count = all matching rows (without FINAL; without ``changing`` filter the
        primary key answers it) minus the matching rows of the keys in ``K`` plus their latest versions
        that match (FINAL, by key). The set of active parts must be the same before and after (so every
        count saw the same rows); else, or when ``K`` is large, the count is ``final_sql``.
        """
        found = await self._outside_largest(table, keys, fixed)
        if found is None:
            return int(await self._scalar(final_sql, final_params) or 0)
        before, other = found
        both = Where(fixed.parts + changing.parts, {**fixed.params, **changing.params})
        t = self.t(table)
        if len(before) == 1:  # one merged part, one row per key: its rows are the latest state
            only = _in_part(both, before[0][0])
            total = int(await self._scalar(f"SELECT count() FROM {t} {only.sql()}", only.params) or 0)
            if total or await self._active_parts(table) == before:  # (0 rows: was the part merged away?)
                return total
            return int(await self._scalar(final_sql, final_params) or 0)
        total = int(await self._scalar(f"SELECT count() FROM {t} {both.sql()}", both.params) or 0)
        if other:  # K as a subquery (_outside_keys); the set of parts is checked below
            key_sql = f"({', '.join(keys)})" if len(keys) > 1 else keys[0]
            outside, params = self._outside_keys(table, keys, fixed, before)
            params.update(both.params)
            glue = "AND" if fixed.parts else "PREWHERE"
            in_k = f"{fixed.sql('PREWHERE')} {glue} {key_sql} IN ({outside}) {changing.sql()}"
            rows = await self.deps.query(
                f"SELECT (SELECT count() FROM {t} {in_k}), (SELECT count() FROM {t} FINAL {in_k}"
                f"{FINAL_SETTINGS})", params)
            total += int(rows[0][1] or 0) - int(rows[0][0] or 0)
        if await self._active_parts(table) != before:
            return int(await self._scalar(final_sql, final_params) or 0)
        return total

    async def _latest_page(self, *, table: str, keys: Sequence[str], key_types: Sequence[str], columns: str,
                           fixed: Where, changing: Where, sort: Sequence[str], page: Page,
                           final_sql: str, final_params: Mapping[str, Any], window_total: bool = False
                           ) -> tuple[list[str], list[tuple]]:
        """A page of ``table`` FINAL (latest version per key) matching ``fixed`` and ``changing``, sorted by
        ``sort`` (plain columns, none Nullable, ending with the key columns) in ``page.order``, without
        running FINAL over every matching row.

        ``fixed`` filters columns that are the same in every version of a key (so they may run before
        FINAL, as PREWHERE); ``changing`` filters the others.

        1. The top ``n`` rows matching both are read without FINAL (older versions and repeats
           included). Every latest row that matches and sorts no later than the ``n``-th row (``T``)
           is among them.
        2. The highest version, outside a merged part ``L``, of each of their keys: ``L`` is the merged part
           that holds the most candidates (then the largest; under a running worker the other parts are
           small and recent). ``L`` holds one row per key (a merge keeps one), so a candidate from ``L``
           is its key's latest version unless another part holds a higher one.
        3. The latest versions of the keys that have a candidate outside ``L``, read with FINAL by
           primary key.

        The latest rows that match and sort no later than ``T`` are exactly the first rows of the
        answer. When they cover the page (or the candidates were all there is) the page is exact; else
        ``n`` grows (at least 4x, more when few candidates were latest rows), and past
        ``LATEST_PAGE_MAX_CANDIDATES``, or when no candidate was, the page comes from ``final_sql``. A part
        merged away meanwhile only makes more keys go through step 3 (``_part != L`` then matches all).
        A table of one merged part is read without FINAL (it holds one row per key; the read is limited to
        that part, so a part inserted meanwhile is not seen half-way); a table of one part written by an
        insert is read with ``final_sql``. With ``window_total`` that one-part read also counts every
        matching row (a last column ``_total``, as ``final_sql`` may have).
        """
        need = page.offset + page.limit
        n = need + 16
        order = page.order
        sort_sql = ", ".join(f"{c} {order}" for c in sort)
        width = len(sort)
        key_at = [list(sort).index(k) for k in keys]
        both = Where(fixed.parts + changing.parts, {**fixed.params, **changing.params})
        ok = " AND ".join(changing.parts) or "1"
        key_sql = f"({', '.join(keys)})" if len(keys) > 1 else keys[0]
        keys_param = "{_keys:Array(" + (f"Tuple({', '.join(key_types)})" if len(keys) > 1 else key_types[0]) + ")}"

        def as_param(ks):  # key tuples as the _keys parameter
            return [k if len(keys) > 1 else k[0] for k in ks]

        head = f"SELECT {', '.join(f'{c} AS _s{i}' for i, c in enumerate(sort))}, ({ok}) AS _ok, {columns}"
        parts = await self._active_parts(table)
        if parts is not None and len(parts) == 1:
            if parts[0][1] > 0:  # one merged part, one row per key: read in its own order
                only = _in_part(both, parts[0][0])
                total = ", count() OVER () AS _total" if window_total else ""
                cols, rows = await self._rows(
                    f"SELECT {columns}{total} FROM {self.t(table)} {only.sql()} ORDER BY {sort_sql} "
                    "LIMIT {_limit:UInt64} OFFSET {_offset:UInt64}",
                    {**only.params, "_limit": page.limit, "_offset": page.offset})
                # a short page may be a part merged away since: then FINAL
                if len(rows) == page.limit or await self._active_parts(table) == parts:
                    return cols, rows
            return await self._rows(final_sql, final_params)  # (an inserted part: FINAL merges nothing)
        merged = {name: rows for name, level, rows in parts or [] if level > 0}
        while n <= self.LATEST_PAGE_MAX_CANDIDATES:
            cols, cand = await self._rows(
                f"{head}, _version AS _v, _part AS _p FROM {self.t(table)} "
                f"{both.sql()} ORDER BY {sort_sql} LIMIT {{_n:UInt64}}", {**both.params, "_n": n})
            if not cand:
                return [c.strip() for c in cols[width + 1:-2]], []

            def key_of(r):
                return tuple(r[i] for i in key_at)

            wanted = sorted({key_of(r) for r in cand})
            # L: the merged part that holds the most candidates (then the largest)
            held = Counter(r[-1] for r in cand if r[-1] in merged)
            base = max(held, key=lambda name: (held[name], merged[name], name)) if held else ""
            if base:
                elsewhere = await self.deps.query(
                    f"SELECT {', '.join(keys)}, max(_version) FROM {self.t(table)} "
                    f"{fixed.sql('PREWHERE')} {'AND' if fixed.parts else 'PREWHERE'} _part != {{_base:String}} "
                    f"AND {key_sql} IN {keys_param} GROUP BY {', '.join(keys)}",
                    {**fixed.params, "_base": base, "_keys": as_param(wanted)})
                newest = {tuple(r[:-1]): r[-1] for r in elsewhere}
                by_final = {key_of(r) for r in cand if r[-1] != base}
            else:
                newest, by_final = {}, set(wanted)
            latest = [r[:-2] for r in cand if r[-1] == base and key_of(r) not in by_final
                      and newest.get(key_of(r), 0) <= r[-2]]
            if by_final:
                _, fresh = await self._rows(
                    f"{head} FROM {self.t(table)} FINAL {fixed.sql('PREWHERE')} {'AND' if fixed.parts else 'PREWHERE'} "
                    f"{key_sql} IN {keys_param}" + FINAL_SETTINGS,
                    {**both.params, "_keys": as_param(sorted(by_final))})
                latest += [tuple(r) for r in fresh]
            last = tuple(cand[-1][:width])
            complete = len(cand) < n
            if order == "DESC":
                good = [r for r in latest if r[width] and (complete or tuple(r[:width]) >= last)]
                good.sort(key=lambda r: tuple(r[:width]), reverse=True)
            else:
                good = [r for r in latest if r[width] and (complete or tuple(r[:width]) <= last)]
                good.sort(key=lambda r: tuple(r[:width]))
            if complete or len(good) >= need:
                return cols[width + 1:-2], [tuple(r[width + 1:]) for r in good[page.offset:need]]
            if not good:
                # a run of superseded rows sorts first (under a running worker: the oldest waiting node
                # states of contacts that moved on since the last merge); more candidates would mostly be
                # more of them, and one FINAL read costs about what a round of candidates does
                break
            n = max(n * 4, 2 * need * len(cand) // len(good))  # as many candidates per latest row as so far
        return await self._rows(final_sql, final_params)

    # ------------------------------------------------------------ automations

    _AUTOMATION_COLS = ("automation_id, name, description, participation, start_at, end_at, published_by, "
                        "version, status, steps, updated_at")

    async def list_automations(self, *, status: str | None, q: str | None, page: Page) -> dict:
        w = Where()
        if status:
            w.add("status = {status:String}", status=status)
        if q:
            w.add("positionCaseInsensitiveUTF8(name, {q:String}) > 0", q=q)
        cols, rows = await self._rows(
            f"SELECT {self._AUTOMATION_COLS} FROM {self.t('automations')} FINAL {w.sql()} "
            f"ORDER BY {page.sort} {page.order}, automation_id {page.order} "
            "LIMIT {limit:UInt64} OFFSET {offset:UInt64}",
            {**w.params, "limit": page.limit, "offset": page.offset},
        )
        total = await self._scalar(f"SELECT count() FROM {self.t('automations')} FINAL {w.sql()}", w.params)
        return {"items": shape(cols, rows, ("steps",)), "total": int(total or 0)}

    async def automation(self, automation_id: str) -> dict | None:
        cols, rows = await self._rows(
            f"SELECT {self._AUTOMATION_COLS} FROM {self.t('automations')} FINAL "
            "WHERE automation_id = {a:String} LIMIT 1",
            {"a": automation_id},
        )
        if not rows:
            return None
        item = shape(cols, rows, ("steps",))[0]
        if not isinstance(item.get("steps"), list):
            item["steps"] = []
        item["steps"] = sorted((s for s in item["steps"] if isinstance(s, dict)),
                               key=lambda s: int(s.get("index", 0) or 0))
        return item

    async def require_automation(self, automation_id: str) -> dict:
        """The automation's properties; 404 when nothing at all is known about it.

        Enrollments or sends may arrive before ``automation.published``: then
        the properties are placeholders (name = id, no steps) rather than a 404.
        """
        found = await self.automation(automation_id)
        if found is not None:
            return found
        known = await self._scalar(
            f"SELECT (SELECT count() FROM (SELECT 1 FROM {self.t('enrollments')} WHERE automation_id = {{a:String}} LIMIT 1))"
            f" + (SELECT count() FROM (SELECT 1 FROM {self.t('recipients')} WHERE automation_id = {{a:String}} LIMIT 1))",
            {"a": automation_id},
        )
        if not known:
            raise NotFound(f"automation {automation_id!r} not found")
        return {"automation_id": automation_id, "name": automation_id, "description": None, "participation": None,
                "start_at": None, "end_at": None, "published_by": None, "version": None, "status": None,
                "steps": [], "updated_at": None}

    async def automation_detail(self, automation_id: str) -> dict:
        props = await self.require_automation(automation_id)
        p = {"a": automation_id}
        # one scan of the automation's enrollments: runs and contacts per status (runs are numbered from 0
        # per contact, so the run-0 rows count the contacts: no uniqExact)
        if await self.counters_cover("status_counters"):
            # the worker's counters (migration 009): a few rows per status; a status whose runs all left it
            # keeps a row of zeros, which FINAL over enrollments would not list
            status_rows = await self.deps.query(
                "SELECT status, sum(runs) AS n, sum(contacts), sum(ignored_enrollments) "
                f"FROM {self.t('status_counters')} FINAL WHERE automation_id = {{a:String}} "
                "GROUP BY status HAVING n > 0 ORDER BY status", p)
        else:
            status_rows = await self.deps.query(
                f"SELECT status, count(), countIf(run = 0), sum(ignored_enrollments) FROM {self.t('enrollments')} "
                "FINAL WHERE automation_id = {a:String} GROUP BY status ORDER BY status" + FINAL_SETTINGS, p)
        # recipient rows never change; the sorting key after the automation, (sent_time, message_id), makes
        # the keys of recent parts one range of the primary key (a message id alone is spread over it)
        recipients = await self._latest_count(
            table="recipients", keys=("sent_time", "message_id"),
            fixed=Where().add("automation_id = {a:String}", a=automation_id), changing=Where(),
            final_sql=f"SELECT count() FROM {self.t('recipients')} FINAL WHERE automation_id = {{a:String}}"
            + FINAL_SETTINGS, final_params=p)
        return {
            **props,
            "totals": {
                "contacts": sum(int(c) for _, _, c, _ in status_rows),
                "runs": sum(int(n) for _, n, _, _ in status_rows),
                "recipients": int(recipients or 0),
                "ignored_enrollments": sum(int(i) for _, _, _, i in status_rows),
                "statuses": {s: int(n) for s, n, _, _ in status_rows},
            },
        }

    # ------------------------------------------------------------ recipients

    RECIPIENT_COLS = ("recipient_id, automation_id, run, contact_id, user_id, user_name, email, step_index, "
                      "step_details, message_id, channel, mailing_id, sent_time, metadata")

    def _recipient_where(self, automation_id: str, *, step: int | None = None, contact_id: str | None = None,
                         q: str | None = None, period: Period = Period()) -> Where:
        w = Where().add("automation_id = {a:String}", a=automation_id)
        if step is not None:
            w.add("step_index = {step:UInt32}", step=step)
        if contact_id:
            w.add("contact_id = {contact:String}", contact=contact_id)
        if q:
            w.add("(positionCaseInsensitiveUTF8(email, {q:String}) > 0 "
                  "OR positionCaseInsensitiveUTF8(user_name, {q:String}) > 0)", q=q)
        period.apply(w, "sent_time")
        return w

    async def recipients(self, automation_id: str, *, step: int | None, contact_id: str | None, q: str | None,
                         period: Period, page: Page) -> dict:
        await self.require_automation(automation_id)
        w = self._recipient_where(automation_id, step=step, contact_id=contact_id, q=q, period=period)
        # Recipient rows are immutable (every version of a key is the same row), so filtering before
        # FINAL (PREWHERE) gives the same rows as filtering after it, and reads only the matching rows.
        cols, rows = await self._rows(
            f"SELECT {self.RECIPIENT_COLS} FROM {self.t('recipients')} FINAL {w.sql('PREWHERE')} "
            f"ORDER BY {page.sort} {page.order}, message_id {page.order} "
            "LIMIT {limit:UInt64} OFFSET {offset:UInt64}" + FINAL_SETTINGS,
            {**w.params, "limit": page.limit, "offset": page.offset},
        )
        total = await self._page_total(
            page, len(rows),
            f"SELECT count() FROM {self.t('recipients')} FINAL {w.sql('PREWHERE')}" + FINAL_SETTINGS, w.params)
        return {"items": shape(cols, rows, ("step_details", "metadata")), "total": total}

    RECIPIENT_CSV_HEADER = ("Recipient ID", "User ID", "User Name", "Email", "Step Index", "Step Details",
                            "Sent Time", "Metadata", "Automation ID", "Run", "Contact ID", "Message ID",
                            "Mailing ID", "Channel")
    RECIPIENT_CSV_COLUMNS = (
        ("recipient_id", "text"), ("user_id", "text"), ("user_name", "text"), ("email", "text"),
        ("step_index", "raw"), ("step_details", "text"), ("sent_time", "raw"), ("metadata", "text"),
        ("automation_id", "text"), ("run", "raw"), ("contact_id", "text"), ("message_id", "text"),
        ("mailing_id", "text"), ("channel", "text"),
    )

    def recipients_csv_sql(self, automation_id: str, *, step: int | None = None, contact_id: str | None = None,
                           q: str | None = None, period: Period = Period()) -> CsvQuery:
        """The recipient rows as CSV, rendered in ClickHouse, in (sent_time, message_id) order."""
        w = self._recipient_where(automation_id, step=step, contact_id=contact_id, q=q, period=period)
        return CsvQuery(self.RECIPIENT_CSV_COLUMNS,
                        f"FROM {self.t('recipients')} FINAL {w.sql()} ORDER BY sent_time, message_id", w.params)

    # ------------------------------------------------------------ report

    async def report(self, automation_id: str, period: Period) -> dict:
        props = await self.require_automation(automation_id)
        w = Where().add("automation_id = {a:String}", a=automation_id)
        period.apply(w, "at")
        # without a period, from the worker's counters when they cover every partition (migration 009); else
        # one row per node with a countIf per state (2x faster than GROUP BY step_index, state), no filter on
        # state (the countIfs skip 'none'), so FINAL's output goes straight into the aggregation
        if period.whole and await self.counters_cover("node_counters"):
            node_rows = await self.deps.query(
                "SELECT step_index, sum(done), sum(waiting), sum(filtered), sum(stopped) "
                f"FROM {self.t('node_counters')} FINAL WHERE automation_id = {{a:String}} GROUP BY step_index",
                {"a": automation_id})
        else:
            node_rows = await self.deps.query(
                "SELECT step_index, countIf(state = 'done'), countIf(state = 'waiting'), "
                f"countIf(state = 'filtered'), countIf(state = 'stopped') FROM {self.t('node_states')} FINAL "
                f"{w.sql()} GROUP BY step_index" + FINAL_SETTINGS, w.params)
        counts: dict[int, dict[str, int]] = {}
        for step_index, *per_state in node_rows:
            if any(per_state):  # a node with only 'none' rows: no contact there
                counts[int(step_index)] = {k: int(v) for k, v in zip(NODE_STATES, per_state)}
        nodes = []
        seen = set()
        for step in props["steps"]:
            idx = int(step.get("index", 0) or 0)
            seen.add(idx)
            nodes.append({"step_index": idx, "name": step.get("name"), "kind": step.get("kind"),
                          "day": step.get("day"), **counts.get(idx, dict.fromkeys(NODE_STATES, 0))})
        for idx in sorted(set(counts) - seen):  # states for steps the definition does not list (yet)
            nodes.append({"step_index": idx, "name": None, "kind": None, "day": None, **counts[idx]})

        ew = Where().add("automation_id = {a:String}", a=automation_id)
        period.apply(ew, "coalesce(enrolled_at, status_at)")
        if period.whole and await self.counters_cover("status_counters"):
            rows = await self.deps.query(
                "SELECT status, sum(runs) AS n, sum(completed), sum(in_progress), sum(not_started), sum(left_runs) "
                f"FROM {self.t('status_counters')} FINAL WHERE automation_id = {{a:String}} "
                "GROUP BY status HAVING n > 0 ORDER BY status", {"a": automation_id})
        else:
            rows = await self.deps.query(
                "SELECT status, count(), "
                f"countIf({COMPLETED_RUN}), countIf(current_step > 0), countIf(current_step = 0), countIf({LEFT_RUN}) "
                f"FROM {self.t('enrollments')} FINAL {ew.sql()} GROUP BY status ORDER BY status" + FINAL_SETTINGS,
                ew.params)
        statuses: dict[str, int] = {}
        completed = in_progress = not_started = left = 0
        for status, n, c, ip, ns, lf in rows:
            statuses[status] = int(n)
            completed += int(c)
            in_progress += int(ip)
            not_started += int(ns)
            left += int(lf)
        return {
            "automation": props,
            "period": period.as_json(),
            "nodes": nodes,
            "completion": {"completed": completed, "in_progress": in_progress, "not_started": not_started,
                           "left": left, "runs": sum(statuses.values())},
            "statuses": statuses,
        }

    # ------------------------------------------------------------ contacts of an automation

    CONTACT_COLS = ("contact_id, run, name, email, status, reason, current_step, enrolled_at, status_at, resume_at, "
                    "updated_at")

    def _contacts_where(self, automation_id: str, status: str | None, q: str | None, run: int | None) -> Where:
        w = Where().add("automation_id = {a:String}", a=automation_id)
        if status:
            w.add("status = {status:String}", status=status)
        if run is not None:
            w.add("run = {run:UInt32}", run=run)
        if q:
            w.add("(positionCaseInsensitiveUTF8(email, {q:String}) > 0 "
                  "OR positionCaseInsensitiveUTF8(name, {q:String}) > 0 OR contact_id = {q:String})", q=q)
        return w

    async def contacts(self, automation_id: str, *, status: str | None, q: str | None, run: int | None,
                       page: Page) -> dict:
        await self.require_automation(automation_id)
        w = self._contacts_where(automation_id, status, q, run)
        final_sql = (f"SELECT {self.CONTACT_COLS} FROM {self.t('enrollments')} FINAL {w.sql()} "
                     f"ORDER BY {page.sort} {page.order}, contact_id {page.order}, run {page.order} "
                     "LIMIT {limit:UInt64} OFFSET {offset:UInt64}" + FINAL_SETTINGS)
        final_params = {**w.params, "limit": page.limit, "offset": page.offset}
        # automation and run are fixed per key; status, name, e-mail change between versions
        fixed = Where().add("automation_id = {a:String}", a=automation_id)
        if run is not None:
            fixed.add("run = {run:UInt32}", run=run)
        changing = _without(w, fixed)
        if page.sort in self._CONTACT_PAGE_SORTS:
            cols, rows = await self._latest_page(
                table="enrollments", keys=("contact_id", "run"), key_types=("String", "UInt32"),
                columns=self.CONTACT_COLS, fixed=fixed, changing=changing,
                sort=[page.sort] + [k for k in ("contact_id", "run") if k != page.sort], page=page,
                final_sql=final_sql, final_params=final_params)
        else:
            cols, rows = await self._rows(final_sql, final_params)
        total = self._known_total(page, len(rows))
        if total is None and not q and run is None:
            sw = Where().add("automation_id = {a:String}", a=automation_id)
            if status:
                sw.add("status = {status:String}", status=status)
            total = await self._counted_total(
                "status_counters", f"SELECT sum(runs) FROM {self.t('status_counters')} FINAL {sw.sql()}", sw.params)
        if total is None:
            total = await self._run_total(page, len(rows), "enrollments", w, fixed, changing)
        return {"items": shape(cols, rows), "total": total}

    async def _run_total(self, page: "Page", n_rows: int, table: str, w: Where, fixed: Where,
                         changing: Where) -> int:
        """Total of a page of runs (``table`` keyed by contact and run) filtered by ``w``."""
        total = self._known_total(page, n_rows)
        if total is not None:
            return total
        return await self._latest_count(
            table=table, keys=("contact_id", "run"), fixed=fixed,
            changing=changing, final_sql=f"SELECT count() FROM {self.t(table)} FINAL {w.sql()}" + FINAL_SETTINGS,
            final_params=w.params)

    # contact sorts served by _latest_page (plain, non-Nullable columns; enrolled_at is Nullable)
    _CONTACT_PAGE_SORTS = {"updated_at", "status_at", "name", "email", "status", "contact_id", "current_step"}

    CONTACT_CSV_HEADER = ("Contact ID", "Run", "Name", "Email", "Status", "Reason", "Current Step",
                          "Enrolled At", "Status At", "Updated At")
    CONTACT_CSV_COLUMNS = (("contact_id", "text"), ("run", "raw"), ("name", "text"), ("email", "text"),
                           ("status", "text"), ("ifNull(reason, '')", "text"), ("current_step", "raw"),
                           ("enrolled_at", "raw"), ("status_at", "raw"), ("updated_at", "raw"))

    def contacts_csv_sql(self, automation_id: str, *, status: str | None, q: str | None, run: int | None,
                         sort: str, order: str) -> CsvQuery:
        w = self._contacts_where(automation_id, status, q, run)
        return CsvQuery(self.CONTACT_CSV_COLUMNS,
                        f"FROM {self.t('enrollments')} FINAL {w.sql()} "
                        f"ORDER BY {sort} {order}, contact_id {order}, run {order}", w.params)

    # ------------------------------------------------------------ contacts at a node

    def _node_where(self, automation_id: str, step_index: int, state: str | None, period: Period) -> Where:
        w = Where().add("automation_id = {a:String}", a=automation_id).add(
            "step_index = {step:UInt32}", step=step_index)
        if state:
            w.add("state = {state:String}", state=state)
        else:
            w.add("state IN ('done', 'waiting', 'filtered', 'stopped')")
        period.apply(w, "at")
        return w

    _NODE_JOIN = (
        "SELECT n.contact_id AS contact_id, n.run AS run, e.name AS name, e.email AS email, "
        "e.status AS status, e.reason AS reason, e.current_step AS current_step, e.updated_at AS updated_at, "
        "n.state AS state, n.at AS state_at "
        "FROM ({nodes}) AS n "
        "LEFT JOIN (SELECT contact_id, run, name, email, status, reason, current_step, updated_at "
        "FROM {enrollments} FINAL WHERE automation_id = {{a:String}}{extra}) AS e "
        "ON n.contact_id = e.contact_id AND n.run = e.run"
    )

    _NODE_CONTACT_COLS = ("contact_id", "run", "name", "email", "status", "reason", "current_step", "updated_at",
                          "state", "state_at")

    async def node_contacts(self, automation_id: str, step_index: int, *, state: str | None, period: Period,
                            page: Page, sort_key: str) -> dict:
        await self.require_automation(automation_id)
        w = self._node_where(automation_id, step_index, state, period)
        params = {**w.params, "limit": page.limit, "offset": page.offset}
        # automation and step are fixed per key; state and time change between versions
        fixed = Where().add("automation_id = {a:String}", a=automation_id).add(
            "step_index = {step:UInt32}", step=step_index)
        changing = _without(w, fixed)
        if sort_key in NODE_CONTACT_NODE_SORTS:
            # page on node_states alone, then look up the page's runs in enrollments (by key): each
            # query runs once, and the enrollments read is a primary-key lookup of at most `limit` contacts
            _, nrows = await self._latest_page(
                table="node_states", keys=("contact_id", "run"), key_types=("String", "UInt32"),
                columns="contact_id, run, state, at", fixed=fixed, changing=changing,
                sort=[page.sort] + [k for k in ("contact_id", "run") if k != page.sort], page=page,
                final_sql=(f"SELECT contact_id, run, state, at FROM {self.t('node_states')} FINAL {w.sql()} "
                           f"ORDER BY {page.sort} {page.order}, contact_id {page.order}, run {page.order} "
                           "LIMIT {limit:UInt64} OFFSET {offset:UInt64}" + FINAL_SETTINGS),
                final_params=params)
            runs: dict[tuple[str, int], tuple] = {}
            if nrows:
                erows = await self.deps.query(
                    "SELECT contact_id, run, name, email, status, reason, current_step, updated_at "
                    f"FROM {self.t('enrollments')} FINAL "
                    "WHERE automation_id = {a:String} AND contact_id IN {cids:Array(String)}" + FINAL_SETTINGS,
                    {"a": automation_id, "cids": sorted({r[0] for r in nrows})})
                runs = {(cid, int(run)): tuple(rest) for cid, run, *rest in erows}
            missing = (None,) * 6  # a node state whose enrollment row has not arrived (LEFT JOIN semantics)
            cols = list(self._NODE_CONTACT_COLS)
            rows = [(cid, run, *runs.get((cid, int(run)), missing), st, at) for cid, run, st, at in nrows]
        else:
            nodes = f"SELECT contact_id, run, state, at FROM {self.t('node_states')} FINAL {w.sql()}"
            sql = self._NODE_JOIN.format(nodes=nodes, enrollments=self.t("enrollments"), extra="")
            sql += (f" ORDER BY {page.sort} {page.order}, contact_id {page.order}, run {page.order} "
                    "LIMIT {limit:UInt64} OFFSET {offset:UInt64}")
            cols, rows = await self._rows(
                sql + " SETTINGS join_use_nulls = 1, do_not_merge_across_partitions_select_final = 1", params)
        total = self._known_total(page, len(rows))
        if total is None and period.whole and (state is None or state in NODE_STATES):
            states = [state] if state else list(NODE_STATES)  # column names from the allowlist
            total = await self._counted_total(
                "node_counters", f"SELECT sum({' + '.join(states)}) FROM {self.t('node_counters')} FINAL "
                "WHERE automation_id = {a:String} AND step_index = {step:UInt32}",
                {"a": automation_id, "step": step_index})
        if total is None:
            total = await self._run_total(page, len(rows), "node_states", w, fixed, changing)
        return {"items": shape(cols, rows), "total": total}

    NODE_CSV_HEADER = ("Contact ID", "Run", "Name", "Email", "State", "State At", "Status", "Reason",
                       "Current Step", "Updated At")
    NODE_CSV_COLUMNS = (("contact_id", "text"), ("run", "raw"), ("ifNull(name, '')", "text"),
                        ("ifNull(email, '')", "text"), ("state", "text"), ("state_at", "raw"),
                        ("ifNull(status, '')", "text"), ("ifNull(reason, '')", "text"), ("current_step", "raw"),
                        ("updated_at", "raw"))

    def node_contacts_csv_sql(self, automation_id: str, step_index: int, *, state: str | None, period: Period,
                              sort: str, order: str) -> CsvQuery:
        w = self._node_where(automation_id, step_index, state, period)
        nodes = f"SELECT contact_id, run, state, at FROM {self.t('node_states')} FINAL {w.sql()}"
        inner = self._NODE_JOIN.format(nodes=nodes, enrollments=self.t("enrollments"), extra="")
        outer_sort = "state_at" if sort == "at" else sort
        return CsvQuery(self.NODE_CSV_COLUMNS,
                        f"FROM ({inner}) ORDER BY {outer_sort} {order}, contact_id {order}, run {order}",
                        w.params, "join_use_nulls = 1")

    # ------------------------------------------------------------ health

    async def health(self, automation_id: str, *, cutoff: _dt.datetime, page: Page) -> dict:
        await self.require_automation(automation_id)
        p = {"a": automation_id, "cutoff": sql_time(cutoff), "limit": page.limit, "offset": page.offset}
        # resets are rare (left by a crash until the next cleanup): without any, no anti-join (a third of the
        # stuck read: 44 vs 64 ms for 250k waits in benchmarks/queries.py's live phase)
        resets = await self._scalar(f"SELECT count() {self._waits_of_automation()} WHERE {WAIT_RESET}", p)
        waits = self._open_waits(bool(resets))
        cols, rows = await self._rows(
            f"SELECT contact_id, run, step_index, since AS waiting_since, count() OVER () AS _total FROM ({waits}) "
            "ORDER BY waiting_since, contact_id, run, step_index LIMIT {limit:UInt64} OFFSET {offset:UInt64}"
            + WAITS_SETTINGS, p)
        stuck_total = await self._window_total(cols, rows, f"SELECT count() FROM ({waits}){WAITS_SETTINGS}", p,
                                               page.offset)
        cols, rows = cols[:-1], [r[:-1] for r in rows]
        dcols, drows, dup_total = await self._duplicate_sends(automation_id, page)
        return {
            "stuck": shape(cols, rows),
            "stuck_total": stuck_total,
            "stuck_before": iso(cutoff),
            "duplicate_sends": shape(dcols, drows),
            "duplicate_sends_total": dup_total,
        }

    def _open_waits(self, resets: bool = True) -> str:
        """The SELECT of the nodes of automation ``{a}`` waiting since before ``{cutoff}``: the open waits of
        ``node_waits`` (migration 012; FINAL drops the closed ones) that no reset row of their node (``since``
        0, a higher version) removes. In the order of its key, so a page reads the oldest waits first; the
        table holds the open waits and the waits closed since its last cleanup, not every node state.
        ``resets`` False: the automation has no reset row, so no anti-join."""
        opened = f"{self._waits_of_automation()} WHERE since > {WAIT_SINCE_ZERO} AND since < {{cutoff:{TIME}}}"
        if not resets:
            return f"SELECT contact_id, run, step_index, since {opened}"
        return ("SELECT w.contact_id AS contact_id, w.run AS run, w.step_index AS step_index, w.since AS since "
                f"FROM (SELECT contact_id, run, step_index, since, _version {opened}) AS w "
                f"LEFT ANY JOIN (SELECT contact_id, run, step_index, _version AS reset {self._waits_of_automation()} "
                f"WHERE {WAIT_RESET}) AS r USING (contact_id, run, step_index) WHERE w._version >= r.reset")

    def _waits_of_automation(self) -> str:
        """FROM node_waits FINAL, the rows of automation ``{a}``."""
        return f"FROM {self.t('node_waits')} FINAL PREWHERE automation_id = {{a:String}}"

    async def _duplicate_sends(self, automation_id: str, page: Page) -> tuple[list[str], list[tuple], int]:
        """Steps sent more than once to the same run: (contact_id, run, step_index, message_ids) rows.

        From ``repeat_sends`` (migration 011), which the worker writes per step registered a second
        time, with the ids registered at it: the read is as small as the automation's duplicates. A key
        marked ``verify`` (a message's step changed) takes its ids from ``send_index`` (migration 007,
        every id sent per key, united by merges), read by primary key; a key that then holds one id is
        no duplicate.
        """
        p = {"a": automation_id, "limit": page.limit, "offset": page.offset}
        named = (f"SELECT contact_id, run, step_index, groupUniqArrayArray(message_ids) AS ids, max(verify) AS v "
                 f"FROM {self.t('repeat_sends')} WHERE automation_id = {{a:String}} "
                 "GROUP BY contact_id, run, step_index")
        dup_sql = (
            f"WITH named AS ({named}) "
            "SELECT contact_id, run, step_index, arraySort(ids) AS message_ids FROM ("
            "SELECT contact_id, run, step_index, ids FROM named WHERE v = 0 UNION ALL "
            "SELECT contact_id, run, step_index, groupUniqArrayArray(message_ids) AS ids "
            f"FROM {self.t('send_index')} WHERE automation_id = {{a:String}} AND (contact_id, run, step_index) "
            "IN (SELECT contact_id, run, step_index FROM named WHERE v = 1) GROUP BY contact_id, run, step_index"
            ") WHERE length(ids) > 1")
        cols, rows = await self._rows(
            f"SELECT contact_id, run, step_index, message_ids, count() OVER () AS _total FROM ({dup_sql}) "
            "ORDER BY contact_id, run, step_index LIMIT {limit:UInt64} OFFSET {offset:UInt64}", p)
        total = await self._window_total(cols, rows, f"SELECT count() FROM ({dup_sql})", p, page.offset)
        return cols[:-1], [r[:-1] for r in rows], total

    # ------------------------------------------------------------ mailings

    # Flags are counted from the NULL maps (``x.null`` subcolumns): with FINAL
    # this reads 1 byte per flag instead of the 8-byte times (6x faster).
    _MAILING_AGG = (
        "SELECT mailing_id, any(automation_id) AS automation_id, any(step_index) AS step_index, "
        "any(subject) AS subject, any(sending_user) AS sending_user, any(sending_email) AS sending_email, "
        "'sent' AS status, min(sent_at) AS date, count() AS total_sent, "
        "countIf(NOT delivered_at.null) AS delivered, countIf(NOT opened_at.null) AS opened, "
        "countIf(NOT clicked_at.null) AS clicked, countIf(NOT bounced_at.null) AS bounced, "
        "countIf(NOT dropped_at.null) AS dropped, countIf(NOT deferred_at.null) AS deferred, "
        "countIf(NOT spam_reported_at.null) AS spam_reports, countIf(NOT unsubscribed_at.null) AS unsubscribed "
        "FROM {messages} AS m FINAL {where} GROUP BY mailing_id {having}"
    )
    # Fast path. The mailings themselves (descriptive fields and date = first send) come from
    # ``mailing_info`` (migration 007: a few rows per mailing, kept by a materialized view with
    # any/min, so replays and row versions change nothing); the counters come from messages FINAL,
    # for the page's mailings only when the sort is descriptive (one primary-key range per mailing),
    # else for every selected mailing. The counters are counted from the NULL maps (``x.null``:
    # 1 byte per flag) and no string but the key is read.
    _MAILING_INFO = (
        "SELECT mailing_id, any(automation_id) AS automation_id, any(step_index) AS step_index, "
        "any(subject) AS subject, any(sending_user) AS sending_user, any(sending_email) AS sending_email, "
        "min(first_sent_at) AS date FROM {info} AS i {where} GROUP BY mailing_id {having}"
    )
    _MAILING_COUNTERS = (
        "count() AS total_sent, "
        "countIf(NOT delivered_at.null) AS delivered, countIf(NOT opened_at.null) AS opened, "
        "countIf(NOT clicked_at.null) AS clicked, countIf(NOT bounced_at.null) AS bounced, "
        "countIf(NOT dropped_at.null) AS dropped, countIf(NOT deferred_at.null) AS deferred, "
        "countIf(NOT spam_reported_at.null) AS spam_reports, countIf(NOT unsubscribed_at.null) AS unsubscribed"
    )
    _MAILING_COUNTS = "SELECT mailing_id, " + _MAILING_COUNTERS + " FROM {messages} FINAL {prewhere} GROUP BY mailing_id"
    _MAILING_UNION_MAX = 8
    _MAILING_INFO_SORTS = {"date", "mailing_id", "step_index", "subject"}
    _MAILING_COUNT_SORTS = {"total_sent", "delivered", "opened", "clicked", "bounced"}

    def _mailing_filters(self, *, automation_id: str | None, step: int | None,
                         mailing_id: str | None, alias: str = "") -> Where:
        # Mail analytics (seed 003) is about e-mails: LinkedIn, task, wait and condition steps are no mailings.
        # (``alias``: qualify the columns where the select list reuses their names for aggregates)
        w = Where().add(f"{alias}channel = {{channel:String}}", channel="email")
        if mailing_id is not None:
            w.add(f"{alias}mailing_id = {{m:String}}", m=mailing_id)
        if automation_id:
            w.add(f"{alias}automation_id = {{a:String}}", a=automation_id)
        if step is not None:
            w.add(f"{alias}step_index = {{step:UInt32}}", step=step)
        return w

    async def _mailing_counts(self, w: Where, ids: list[str] | None, *, order_by: str = "") -> tuple[list, list]:
        """Counters per mailing of messages FINAL matching ``w``, for the mailings ``ids`` (None: every
        mailing that matches ``w``); rows of other mailings may come too (callers keep theirs).

        The filter columns (mailing, channel, automation, step) are fixed per message by its send, the
        same in every row version, so filtering before FINAL (PREWHERE) is exact. A mailing whose
        messages all share one (channel, automation, step) (``mailing_info`` says so; the usual
        ``<automation>:<step>`` mailing) matches the filter with all its messages: then only its
        primary-key range is read, without the filter columns, and with every mailing on the page
        not even the mailing ids are compared.

        When the worker's ``mailing_counters`` (migration 009) cover every partition, the counters are the
        sums of their latest rows (a few per mailing) instead: their key holds the filter columns, so
        filtering them is exact, and a mailing whose rows sum to no message is left out (as messages
        FINAL would not list it)."""
        if await self.counters_cover("mailing_counters"):
            cw = Where(list(w.parts), dict(w.params))
            if ids is not None:
                cw.add("mailing_id IN {ids:Array(String)}", ids=ids)
            sums = ", ".join(f"sum(c.{name}) AS {name}" for name in self._COUNTERS)
            return await self._rows(
                f"SELECT mailing_id, {sums} FROM {self.t('mailing_counters')} AS c FINAL {cw.sql()} "
                "GROUP BY mailing_id HAVING total_sent > 0" + order_by, cw.params)
        rows = await self.deps.query(
            "SELECT uniqExact(mailing_id), groupArrayIf(mailing_id, n > 1) FROM (SELECT mailing_id, "
            f"uniqExact(channel, automation_id, step_index) AS n FROM {self.t('mailing_info')} GROUP BY mailing_id)",
            {})
        n_mailings, mixed = (int(rows[0][0]), set(rows[0][1])) if rows else (0, set())
        wanted = set(ids) if ids is not None else None
        if mixed and (wanted is None or mixed & wanted):
            cw = Where(list(w.parts), dict(w.params))
            if ids is not None:
                cw.add("mailing_id IN {ids:Array(String)}", ids=ids)
        elif wanted is not None and len(wanted) < n_mailings:
            cw = Where().add("mailing_id IN {ids:Array(String)}", ids=ids)
        else:
            cw = Where()
        # merged (the usual state): every row once, corrected for the keys with rows in recent parts
        found = await self._outside_largest("messages", ("mailing_id", "message_id"), cw)
        if found is not None:
            counted = await self._mailing_counts_merged(cw, found, order_by)
            if counted is not None:
                return counted
        if not (mixed and (wanted is None or mixed & wanted)) and wanted is not None \
                and len(wanted) <= self._MAILING_UNION_MAX:
            # a few mailings: one primary-key range read per mailing, without grouping on the mailing id
            # (measured over 4 mailings of 1.25M messages: 45 ms against 70 ms with IN + GROUP BY)
            ordered = sorted(wanted)
            params = {f"m{i}": m for i, m in enumerate(ordered)}
            branches = " UNION ALL ".join(
                f"SELECT {{m{i}:String}} AS _mailing, {self._MAILING_COUNTERS} FROM {self.t('messages')} FINAL "
                f"PREWHERE mailing_id = {{m{i}:String}}" for i in range(len(ordered)))
            names = ", ".join(self._COUNTERS)
            return await self._rows(f"SELECT _mailing AS mailing_id, {names} FROM ({branches})"
                                    + order_by + FINAL_SETTINGS, params)
        sql = self._MAILING_COUNTS.format(messages=self.t("messages"), prewhere=cw.sql("PREWHERE"))
        return await self._rows(sql + order_by + FINAL_SETTINGS, cw.params)

    async def _mailing_counts_merged(self, cw: Where, found: tuple, order_by: str) -> tuple[list, list] | None:
        """Counters per mailing of messages matching ``cw`` (filters on the mailing id only), read without
        FINAL: ``found`` = (active parts, keys with rows outside the largest merged part, ``K``); the other
        keys have one row each. counters = all rows (grouped in primary-key order, no hash table on the
        mailing id) - the rows of the keys in ``K`` + their latest versions (FINAL, by key). None when
        the set of active parts changed meanwhile (the caller counts with FINAL)."""
        before, other = found
        t = self.t("messages")
        signed = ", ".join(f"{{sign}} * toInt64({expr}) AS {name}" for expr, name in zip(
            ["count()"] + [f"countIf(NOT {f}_at.null)" for f in (
                "delivered", "opened", "clicked", "bounced", "dropped", "deferred", "spam_reported", "unsubscribed")],
            self._COUNTERS))
        glue = "AND" if cw.parts else "PREWHERE"
        params = dict(cw.params)
        ids = cw.params.get("ids")
        if ids is not None and len(cw.parts) == 1 and len(ids) <= self._MAILING_UNION_MAX:
            # a few whole mailings: one primary-key range each, the mailing id never read
            branches = [f"SELECT {{_m{i}:String}} AS _mailing, {signed.format(sign=1)} FROM {t} "
                        f"PREWHERE mailing_id = {{_m{i}:String}}" for i in range(len(ids))]
            params.update({f"_m{i}": m for i, m in enumerate(ids)})
        else:
            branches = [f"SELECT mailing_id AS _mailing, {signed.format(sign=1)} FROM {t} {cw.sql('PREWHERE')} "
                        "GROUP BY mailing_id"]
        if other:  # K as a subquery (_outside_keys); the set of parts is checked below
            outside, outside_params = self._outside_keys("messages", ("mailing_id", "message_id"), cw, before)
            params.update(outside_params)
            in_k = f"{cw.sql('PREWHERE')} {glue} (mailing_id, message_id) IN ({outside})"
            branches.append(f"SELECT mailing_id AS _mailing, {signed.format(sign=-1)} FROM {t} {in_k} "
                            "GROUP BY mailing_id")
            branches.append(f"SELECT mailing_id AS _mailing, {signed.format(sign=1)} FROM {t} FINAL {in_k} "
                            "GROUP BY mailing_id")
        sums = ", ".join(f"toUInt64(sum({c})) AS {c}" for c in self._COUNTERS)
        result = await self._rows(
            f"SELECT _mailing AS mailing_id, {sums} FROM ({' UNION ALL '.join(branches)}) GROUP BY _mailing"
            + order_by
            + FINAL_SETTINGS + ", optimize_aggregation_in_order = 1", params)
        if await self._active_parts("messages") != before:
            return None
        return result

    async def _mailing_page_fast(self, *, automation_id: str | None, step: int | None, period: Period,
                                 page: Page, mailing_id: str | None = None) -> dict:
        w = self._mailing_filters(automation_id=automation_id, step=step, mailing_id=mailing_id)
        iw = self._mailing_filters(automation_id=automation_id, step=step, mailing_id=mailing_id, alias="i.")
        h = period.apply(Where(), "date")
        info_sql = self._MAILING_INFO.format(info=self.t("mailing_info"), where=iw.sql(), having=h.sql("HAVING"))
        params = {**w.params, **h.params}
        if page.sort in self._MAILING_INFO_SORTS:
            icols, irows = await self._rows(
                f"SELECT *, count() OVER () AS _total FROM ({info_sql}) ORDER BY {page.sort} {page.order}, "
                f"mailing_id {page.order} LIMIT {{limit:UInt64}} OFFSET {{offset:UInt64}}",
                {**params, "limit": page.limit, "offset": page.offset})
            total = await self._window_total(icols, irows, f"SELECT count() FROM ({info_sql})", params,
                                             page.offset)
            info = [{k: v for k, v in item.items() if k != "_total"} for item in shape(icols, irows)]
            counted: list[dict] = []
            if info:
                ccols, crows = await self._mailing_counts(w, [i["mailing_id"] for i in info])
                counted = shape(ccols, crows)
        else:
            icols, irows = await self._rows(info_sql, params)
            by_id = {i["mailing_id"]: i for i in shape(icols, irows)}
            ids = list(by_id) if (h.parts or len(by_id) < 1000) else None
            if not by_id:
                return {"items": [], "total": 0}
            ccols, crows = await self._mailing_counts(
                w, ids, order_by=f" ORDER BY {page.sort} {page.order}, mailing_id {page.order}")
            counted = [c for c in shape(ccols, crows) if c["mailing_id"] in by_id]  # in the selection
            total = len(counted)
            counted = counted[page.offset:page.offset + page.limit]
            info = [by_id[c["mailing_id"]] for c in counted]
        numbers = {c["mailing_id"]: c for c in counted}
        items = []
        for d in info:
            merged = {**d, **numbers.get(d["mailing_id"], dict.fromkeys(self._COUNTERS, 0)), "status": "sent"}
            items.append({k: merged.get(k) for k in self.MAILING_COLUMNS})
        return {"items": items, "total": total}

    _COUNTERS = ("total_sent", "delivered", "opened", "clicked", "bounced", "dropped", "deferred", "spam_reports",
                 "unsubscribed")

    MAILING_COLUMNS = ("mailing_id", "automation_id", "step_index", "subject", "sending_user", "sending_email",
                       "status", "date", "total_sent", "delivered", "opened", "clicked", "bounced", "dropped",
                       "deferred", "spam_reports", "unsubscribed")

    def _mailings_sql(self, *, automation_id: str | None, step: int | None, q: str | None, period: Period,
                      mailing_id: str | None = None, template: str | None = None) -> tuple[str, dict]:
        # columns qualified with the table alias: the select list reuses their names as aliases
        w = Where()
        # Mail analytics (seed 003) is about e-mails: LinkedIn, task, wait and condition steps are no mailings.
        w.add("m.channel = {channel:String}", channel="email")
        if mailing_id is not None:
            w.add("m.mailing_id = {m:String}", m=mailing_id)
        if automation_id:
            w.add("m.automation_id = {a:String}", a=automation_id)
        if step is not None:
            w.add("m.step_index = {step:UInt32}", step=step)
        if q:
            w.add("positionCaseInsensitiveUTF8(m.subject, {q:String}) > 0", q=q)
        h = period.apply(Where(), "date")
        return (template or self._MAILING_AGG).format(messages=self.t("messages"), where=w.sql(),
                                                      having=h.sql("HAVING")), \
            {**w.params, **h.params}

    async def mailings(self, *, automation_id: str | None, step: int | None, q: str | None, period: Period,
                       page: Page) -> dict:
        if not q and page.sort in self._MAILING_INFO_SORTS | self._MAILING_COUNT_SORTS:
            return await self._mailing_page_fast(automation_id=automation_id, step=step, period=period, page=page)
        sql, params = self._mailings_sql(automation_id=automation_id, step=step, q=q, period=period)
        # the total rides along as a window over the (few) aggregated rows: the scan runs once
        cols, rows = await self._rows(
            f"SELECT *, count() OVER () AS _total FROM ({sql}) ORDER BY {page.sort} {page.order}, "
            f"mailing_id {page.order} LIMIT {{limit:UInt64}} OFFSET {{offset:UInt64}}",
            {**params, "limit": page.limit, "offset": page.offset})
        return {"items": [{k: v for k, v in item.items() if k != "_total"} for item in shape(cols, rows)],
                "total": await self._window_total(cols, rows, f"SELECT count() FROM ({sql})", params,
                                                  page.offset)}

    async def _window_total(self, cols: list[str], rows: list[tuple], count_sql: str, params: Mapping[str, Any],
                            offset: int) -> int:
        """The ``_total`` window column of a page, 0 for an empty first page, or a count query when the page
        (at ``offset``) is past the end."""
        if rows:
            return int(rows[0][cols.index("_total")])
        if offset == 0:
            return 0
        return int(await self._scalar(count_sql, params) or 0)

    async def mailing(self, mailing_id: str) -> dict:
        found = await self._mailing_page_fast(automation_id=None, step=None, period=Period(),
                                              page=Page(1, 0, "mailing_id", "ASC"), mailing_id=mailing_id)
        if not found["items"]:
            raise NotFound(f"mailing {mailing_id!r} not found")
        return found["items"][0]

    MAILING_CSV_HEADER = ("Mailing ID", "Automation ID", "Step Index", "Subject", "Sending User", "Sending Email",
                          "Status", "Date", "Total Sent", "Delivered", "Opened", "Clicked", "Bounced", "Dropped",
                          "Deferred", "Spam Reports", "Unsubscribed")

    def mailings_csv_sql(self, *, automation_id: str | None, step: int | None, q: str | None, period: Period,
                         sort: str, order: str) -> CsvQuery:
        sql, params = self._mailings_sql(automation_id=automation_id, step=step, q=q, period=period)
        kinds = {"mailing_id": "text", "automation_id": "text", "subject": "text", "sending_user": "text",
                 "sending_email": "text", "status": "text"}
        return CsvQuery([(c, kinds.get(c, "raw")) for c in self.MAILING_COLUMNS],
                        f"FROM ({sql}) ORDER BY {sort} {order}, mailing_id {order}", params)

    _FLAG_COLS = ", ".join(f"{f}_at" for f in MESSAGE_FLAGS)
    MAILING_RECIPIENT_COLS = ("message_id, contact_id, name, email, status, status_at, " + _FLAG_COLS +
                              ", bounce_class, opens, clicks, run, step_index")

    # sorts on a message's fixed facts that ``mailing_sort`` (migration 008) keeps in order
    _MAILING_SORT_FIELDS = {"name": "name", "email": "email"}

    async def _mailing_recipients_by_fixed(self, mailing_id: str, page: Page) -> tuple[list[str], list[tuple]]:
        """A page of a mailing's recipients sorted by name or e-mail (no filter), from ``mailing_sort``.

        ``mailing_sort`` holds (mailing_id, field, value, message_id) in sort order, so the page's
        message ids are read in order from a few granules instead of sorting every message of the
        mailing. Its rows are identical in every version of a message (name and e-mail are fixed by
        the send), so a key may only be repeated (parts not merged yet): the rows are read without
        FINAL and repeats dropped. All rows of one key are adjacent in the sort order, hence the
        distinct keys among the first ``n`` rows are the first distinct keys overall; ``n`` grows
        until they cover the page or the mailing ends. The page's messages are then read by primary
        key (mailing_id, message_id), the highest version of each, and put in the page's order.
        """
        need = page.offset + page.limit
        n = need
        while True:
            found = await self.deps.query(
                f"SELECT value, message_id FROM {self.t('mailing_sort')} "
                "PREWHERE mailing_id = {m:String} AND field = {f:String} "
                f"ORDER BY value {page.order}, message_id {page.order} LIMIT {{n:UInt64}}",
                {"m": mailing_id, "f": self._MAILING_SORT_FIELDS[page.sort], "n": n})
            keys = list(dict.fromkeys((v, mid) for v, mid in found))
            if len(keys) >= need or len(found) < n:
                break
            n *= 2
        ids = [mid for _, mid in keys[page.offset:need]]
        cols = [c.strip() for c in self.MAILING_RECIPIENT_COLS.split(",")]
        if not ids:
            return cols, []
        # the latest version of each: the same rows as FINAL, without merging the parts' streams (measured
        # on 10M messages in 6 parts, medians: 93 ms against 119 with FINAL; ordering by message_id first
        # reads in key order and took 181); versions of a message only grow, and rows of equal version
        # are the same row written again
        cols, rows = await self._rows(
            f"SELECT {self.MAILING_RECIPIENT_COLS} FROM {self.t('messages')} "
            "PREWHERE mailing_id = {m:String} AND message_id IN {ids:Array(String)} "
            "ORDER BY _version DESC LIMIT 1 BY message_id",
            {"m": mailing_id, "ids": ids})
        at = {mid: i for i, mid in enumerate(ids)}
        k = cols.index("message_id")
        return cols, sorted(rows, key=lambda r: at[r[k]])

    async def mailing_recipients(self, mailing_id: str, *, status: str | None, q: str | None, page: Page) -> dict:
        w = Where().add("mailing_id = {m:String}", m=mailing_id)
        if status:
            w.add("status = {status:String}", status=status)
        if q:
            w.add("(positionCaseInsensitiveUTF8(email, {q:String}) > 0 "
                  "OR positionCaseInsensitiveUTF8(name, {q:String}) > 0)", q=q)
        if not status and not q and page.sort in self._MAILING_SORT_FIELDS:
            cols, rows = await self._mailing_recipients_by_fixed(mailing_id, page)
        else:
            cols, rows = await self._rows(
                f"SELECT {self.MAILING_RECIPIENT_COLS} FROM {self.t('messages')} FINAL {w.sql()} "
                f"ORDER BY {page.sort} {page.order}, message_id {page.order} "
                "LIMIT {limit:UInt64} OFFSET {offset:UInt64}" + FINAL_SETTINGS,
                {**w.params, "limit": page.limit, "offset": page.offset})
        if not rows:  # a page with rows says the mailing exists
            exists = await self._scalar(
                f"SELECT count() FROM (SELECT 1 FROM {self.t('messages')} WHERE mailing_id = {{m:String}} LIMIT 1)",
                {"m": mailing_id})
            if not exists:
                raise NotFound(f"mailing {mailing_id!r} not found")
        total = self._known_total(page, len(rows))
        if total is None and not status and not q:
            # every message of the mailing, whatever its channel, automation and step: the counters' sent
            total = await self._counted_total(
                "mailing_counters",
                f"SELECT sum(total_sent) FROM {self.t('mailing_counters')} FINAL WHERE mailing_id = {{m:String}}",
                {"m": mailing_id})
        if total is None:
            total = await self._page_total(
                page, len(rows), f"SELECT count() FROM {self.t('messages')} FINAL {w.sql()}" + FINAL_SETTINGS,
                w.params)
        return {"items": shape(cols, rows), "total": total}

    # ------------------------------------------------------------ contacts

    async def contact(self, contact_id: str) -> dict | None:
        cols, rows = await self._rows(
            f"SELECT contact_id, user_id, name, email, company, attributes, updated_at "
            f"FROM {self.t('contacts')} FINAL WHERE contact_id = {{c:String}} LIMIT 1", {"c": contact_id})
        return shape(cols, rows, ("attributes",))[0] if rows else None

    async def contact_automations(self, contact_id: str, *, page: Page) -> dict:
        contact = await self.contact(contact_id)
        p = {"c": contact_id, "limit": page.limit, "offset": page.offset}
        cols, rows = await self._rows(
            "SELECT e.automation_id AS automation_id, if(a.name = '', e.automation_id, a.name) AS name, "
            "e.run AS run, e.status AS status, e.reason AS reason, e.current_step AS current_step, "
            "e.enrolled_at AS enrolled_at, e.status_at AS status_at, e.updated_at AS updated_at "
            f"FROM (SELECT * FROM {self.t('enrollments')} FINAL WHERE contact_id = {{c:String}}) AS e "
            f"LEFT JOIN (SELECT automation_id, name FROM {self.t('automations')} FINAL) AS a "
            "ON e.automation_id = a.automation_id "
            "ORDER BY coalesce(e.enrolled_at, e.status_at) DESC, automation_id, run DESC "
            "LIMIT {limit:UInt64} OFFSET {offset:UInt64}", p)
        total = await self._scalar(
            f"SELECT count() FROM {self.t('enrollments')} FINAL WHERE contact_id = {{c:String}}", p)
        if contact is None and not total:
            raise NotFound(f"contact {contact_id!r} not found")
        items = shape(cols, rows)
        if items:
            keys = sorted({i["automation_id"] for i in items})
            nrows = await self.deps.query(
                f"SELECT automation_id, run, step_index, state, at FROM {self.t('node_states')} FINAL "
                "WHERE contact_id = {c:String} AND automation_id IN {keys:Array(String)} AND state != 'none' "
                "ORDER BY automation_id, run, step_index", {"c": contact_id, "keys": keys})
            by_run: dict[tuple[str, int], list[dict]] = {}
            for a, run, step_index, state, at in nrows:
                by_run.setdefault((a, int(run)), []).append(
                    {"step_index": int(step_index), "state": state, "at": iso(at)})
            for item in items:
                item["nodes"] = by_run.get((item["automation_id"], int(item["run"])), [])
        return {"contact": contact, "items": items, "total": int(total or 0)}

    async def contact_exists(self, contact_id: str) -> bool:
        n = await self._scalar(
            f"SELECT (SELECT count() FROM (SELECT 1 FROM {self.t('contacts')} WHERE contact_id = {{c:String}} LIMIT 1))"
            f" + (SELECT count() FROM (SELECT 1 FROM {self.t('enrollments')} WHERE contact_id = {{c:String}} LIMIT 1))"
            f" + (SELECT count() FROM (SELECT 1 FROM {self.t('status_changes')} WHERE contact_id = {{c:String}} LIMIT 1))",
            {"c": contact_id})
        return bool(n)

    async def timeline(self, contact_id: str, *, kind: str | None, automation_id: str | None, page: Page) -> dict:
        w = Where().add("contact_id = {c:String}", c=contact_id)
        if kind:
            w.add("kind = {kind:String}", kind=kind)
        if automation_id:
            w.add("automation_id = {a:String}", a=automation_id)
        cols, rows = await self._rows(
            "SELECT change_id, kind, automation_id, run, step_index, message_id, from_status, to_status, reason, "
            f"event_id, event_type, occurred_at FROM {self.t('status_changes')} FINAL {w.sql()} "
            f"ORDER BY occurred_at {page.order}, change_id {page.order} LIMIT {{limit:UInt64}} OFFSET {{offset:UInt64}}",
            {**w.params, "limit": page.limit, "offset": page.offset})
        total = await self._scalar(f"SELECT count() FROM {self.t('status_changes')} FINAL {w.sql()}", w.params)
        if not total and not await self.contact_exists(contact_id):
            raise NotFound(f"contact {contact_id!r} not found")
        return {"items": shape(cols, rows), "total": int(total or 0)}

    async def contact_messages(self, contact_id: str, *, status: str | None, automation_id: str | None,
                               page: Page) -> dict:
        w = Where().add("contact_id = {c:String}", c=contact_id)
        if status:
            w.add("status = {status:String}", status=status)
        if automation_id:
            w.add("automation_id = {a:String}", a=automation_id)
        cols, rows = await self._rows(
            "SELECT message_id, mailing_id, automation_id, run, step_index, subject, sending_user, sending_email, "
            f"email, status, status_at, {self._FLAG_COLS}, bounce_class, opens, clicks "
            f"FROM {self.t('messages')} FINAL {w.sql()} "
            f"ORDER BY {page.sort} {page.order}, message_id {page.order} LIMIT {{limit:UInt64}} OFFSET {{offset:UInt64}}",
            {**w.params, "limit": page.limit, "offset": page.offset})
        total = await self._scalar(f"SELECT count() FROM {self.t('messages')} FINAL {w.sql()}", w.params)
        if not total and not await self.contact_exists(contact_id):
            raise NotFound(f"contact {contact_id!r} not found")
        return {"items": shape(cols, rows), "total": int(total or 0)}


def check_choice(name: str, value: str | None, choices: Sequence[str]) -> str | None:
    if value is not None and value not in choices:
        raise BadRequest(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value
