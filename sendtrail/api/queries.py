"""The SQL behind every report, and the shaping of its rows into JSON.

Rules kept by every function here:

* values from requests are passed as server-side parameters (``{name:Type}``);
  the only text put into SQL is the database name (validated identifier) and
  sort expressions taken from the allowlist dicts below;
* latest-state tables (automations, contacts, recipients, enrollments,
  node_states, messages, static lists) are read with ``FINAL``, so duplicate
  rows from replays are never counted twice; append-only tables
  (status_changes) too, since a re-emitted change is an identical row;
* node states ``none`` (no longer at that node) are ignored.

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
runs with every step done (status finished, reason completed),
``in_progress`` = at least one step done and steps left, ``not_started`` =
enrolled, no step done yet (at the first node), and ``left`` = runs that were
filtered out of the flow before the end (not among the three).
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import orjson

from sendtrail.api.errors import BadRequest, NotFound
from sendtrail.api.export import CsvQuery

NODE_STATES = ("done", "waiting", "filtered", "stopped")
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

    def t(self, table: str) -> str:
        return f"`{self.db}`.{table}"

    async def _rows(self, sql: str, params: Mapping[str, Any]) -> tuple[list[str], list[tuple]]:
        cols, rows = await self.deps.query_columns(sql, dict(params))
        return list(cols), list(rows)

    async def _scalar(self, sql: str, params: Mapping[str, Any]) -> Any:
        rows = await self.deps.query(sql, dict(params))
        return rows[0][0] if rows else None

    async def _page_total(self, page: "Page", n_rows: int, count_sql: str, params: Mapping[str, Any]) -> int:
        """The total of a list whose page has ``n_rows`` rows: known without counting when the page is
        not full (it is the last page), else ``count_sql`` (a ``SELECT count()``)."""
        if 0 < n_rows < page.limit or (n_rows == 0 and page.offset == 0):
            return page.offset + n_rows
        return int(await self._scalar(count_sql, params) or 0)

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
        status_rows = await self.deps.query(
            f"SELECT status, count(), countIf(run = 0), sum(ignored_enrollments) FROM {self.t('enrollments')} FINAL "
            "WHERE automation_id = {a:String} GROUP BY status ORDER BY status" + FINAL_SETTINGS, p)
        recipients = await self._scalar(
            f"SELECT count() FROM {self.t('recipients')} FINAL WHERE automation_id = {{a:String}}" + FINAL_SETTINGS,
            p)
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
        # one row per node with a countIf per state (2x faster than GROUP BY step_index, state); no filter on
        # state (the countIfs skip 'none'), so FINAL's output goes straight into the aggregation
        node_rows = await self.deps.query(
            "SELECT step_index, countIf(state = 'done'), countIf(state = 'waiting'), countIf(state = 'filtered'), "
            f"countIf(state = 'stopped') FROM {self.t('node_states')} FINAL {w.sql()} GROUP BY step_index"
            + FINAL_SETTINGS, w.params)
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
        rows = await self.deps.query(
            "SELECT status, count(), "
            "countIf(status = 'finished' AND reason = 'completed'), "
            "countIf(current_step > 0), countIf(current_step = 0), "
            "countIf(current_step < 0 AND NOT (status = 'finished' AND ifNull(reason, '') = 'completed')) "
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

    CONTACT_COLS = "contact_id, run, name, email, status, reason, current_step, enrolled_at, status_at, updated_at"

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
        cols, rows = await self._rows(
            f"SELECT {self.CONTACT_COLS} FROM {self.t('enrollments')} FINAL {w.sql()} "
            f"ORDER BY {page.sort} {page.order}, contact_id {page.order}, run {page.order} "
            "LIMIT {limit:UInt64} OFFSET {offset:UInt64}" + FINAL_SETTINGS,
            {**w.params, "limit": page.limit, "offset": page.offset})
        total = await self._page_total(
            page, len(rows), f"SELECT count() FROM {self.t('enrollments')} FINAL {w.sql()}" + FINAL_SETTINGS,
            w.params)
        return {"items": shape(cols, rows), "total": total}

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
        if sort_key in NODE_CONTACT_NODE_SORTS:
            # page on node_states alone, then look up the page's runs in enrollments (by key): each
            # query runs once, and the enrollments read is a primary-key lookup of at most `limit` contacts
            _, nrows = await self._rows(
                f"SELECT contact_id, run, state, at FROM {self.t('node_states')} FINAL {w.sql()} "
                f"ORDER BY {page.sort} {page.order}, contact_id {page.order}, run {page.order} "
                "LIMIT {limit:UInt64} OFFSET {offset:UInt64}" + FINAL_SETTINGS, params)
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
        total = await self._page_total(
            page, len(rows), f"SELECT count() FROM {self.t('node_states')} FINAL {w.sql()}" + FINAL_SETTINGS,
            w.params)
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
        # node_states.idx_state (migration 007) narrows FINAL to the granules that hold waiting rows
        stuck_where = ("WHERE automation_id = {a:String} AND state = 'waiting' "
                       f"AND at < {{cutoff:{TIME}}}")
        cols, rows = await self._rows(
            "SELECT contact_id, run, step_index, at AS waiting_since "
            f"FROM {self.t('node_states')} FINAL {stuck_where} "
            "ORDER BY waiting_since, contact_id, run LIMIT {limit:UInt64} OFFSET {offset:UInt64}" + FINAL_SETTINGS, p)
        stuck_total = await self._page_total(
            page, len(rows), f"SELECT count() FROM {self.t('node_states')} FINAL {stuck_where}" + FINAL_SETTINGS, p)
        dcols, drows, dup_total = await self._duplicate_sends(automation_id, page)
        return {
            "stuck": shape(cols, rows),
            "stuck_total": stuck_total,
            "stuck_before": iso(cutoff),
            "duplicate_sends": shape(dcols, drows),
            "duplicate_sends_total": dup_total,
        }

    async def _duplicate_sends(self, automation_id: str, page: Page) -> tuple[list[str], list[tuple], int]:
        """Steps sent more than once to the same run: (contact_id, run, step_index, message_ids) rows.

        ``send_index`` (migration 007) holds the set of message ids per (automation, contact, run, step),
        merged by union; a part holds one row per key (parts are aggregated when written). A key with
        two or more ids is either a row with two or more ids in one part, or rows in two or more parts.
        Candidates: in the largest part, the rows with two or more ids, found by the ``idx_multi``
        skip index without reading the automation's other rows; in every other part, all rows (they
        hold the recent sends; a key split over parts has a row outside the largest one). The
        candidates' rows are then read by key and their sets united; a replayed send repeats its
        message id, which the union folds. ``idx_multi`` is only right in a part made by a merge (an
        insert computes it before folding the rows of a key), so a largest part that is not a merge
        of several parts is read in full too.
        """
        p = {"a": automation_id, "limit": page.limit, "offset": page.offset}
        try:
            largest = await self.deps.query(
                "SELECT name FROM system.parts WHERE database = {db:String} AND table = 'send_index' AND active "
                "AND min_block_number < max_block_number ORDER BY rows DESC, name LIMIT 1", {"db": self.db})
        except Exception:  # no access to system.parts: read every part (same answer, slower)
            largest = []
        p["largest"] = largest[0][0] if largest else ""
        si = self.t("send_index")
        candidates = (
            f"SELECT contact_id, run, step_index FROM {si} "
            "WHERE automation_id = {a:String} AND length(message_ids) > 1 "
            "UNION ALL "
            f"SELECT contact_id, run, step_index FROM {si} "
            "WHERE automation_id = {a:String} AND _part != {largest:String}")
        dup_sql = (f"SELECT contact_id, run, step_index, arraySort(groupUniqArrayArray(message_ids)) AS message_ids "
                   f"FROM {si} WHERE automation_id = {{a:String}} AND (contact_id, run, step_index) IN ({candidates}) "
                   "GROUP BY contact_id, run, step_index HAVING length(message_ids) > 1")
        cols, rows = await self._rows(
            f"SELECT contact_id, run, step_index, message_ids, count() OVER () AS _total FROM ({dup_sql}) "
            "ORDER BY contact_id, run, step_index LIMIT {limit:UInt64} OFFSET {offset:UInt64}", p)
        total = await self._window_total(cols, rows, f"SELECT count() FROM ({dup_sql})", p)
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
    _MAILING_COUNTS = (
        "SELECT mailing_id, count() AS total_sent, "
        "countIf(NOT delivered_at.null) AS delivered, countIf(NOT opened_at.null) AS opened, "
        "countIf(NOT clicked_at.null) AS clicked, countIf(NOT bounced_at.null) AS bounced, "
        "countIf(NOT dropped_at.null) AS dropped, countIf(NOT deferred_at.null) AS deferred, "
        "countIf(NOT spam_reported_at.null) AS spam_reports, countIf(NOT unsubscribed_at.null) AS unsubscribed "
        "FROM {messages} FINAL {prewhere} GROUP BY mailing_id"
    )
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
        not even the mailing ids are compared."""
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
        sql = self._MAILING_COUNTS.format(messages=self.t("messages"), prewhere=cw.sql("PREWHERE"))
        return await self._rows(sql + order_by + FINAL_SETTINGS, cw.params)

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
            total = await self._window_total(icols, irows, f"SELECT count() FROM ({info_sql})", params)
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
                "total": await self._window_total(cols, rows, f"SELECT count() FROM ({sql})", params)}

    async def _window_total(self, cols: list[str], rows: list[tuple], count_sql: str, params: Mapping[str, Any]) -> int:
        """The ``_total`` window column of a page, or a count query when the page is past the end."""
        if rows:
            return int(rows[0][cols.index("_total")])
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

    async def mailing_recipients(self, mailing_id: str, *, status: str | None, q: str | None, page: Page) -> dict:
        exists = await self._scalar(
            f"SELECT count() FROM (SELECT 1 FROM {self.t('messages')} WHERE mailing_id = {{m:String}} LIMIT 1)",
            {"m": mailing_id})
        if not exists:
            raise NotFound(f"mailing {mailing_id!r} not found")
        w = Where().add("mailing_id = {m:String}", m=mailing_id)
        if status:
            w.add("status = {status:String}", status=status)
        if q:
            w.add("(positionCaseInsensitiveUTF8(email, {q:String}) > 0 "
                  "OR positionCaseInsensitiveUTF8(name, {q:String}) > 0)", q=q)
        cols, rows = await self._rows(
            f"SELECT {self.MAILING_RECIPIENT_COLS} FROM {self.t('messages')} FINAL {w.sql()} "
            f"ORDER BY {page.sort} {page.order}, message_id {page.order} "
            "LIMIT {limit:UInt64} OFFSET {offset:UInt64}" + FINAL_SETTINGS,
            {**w.params, "limit": page.limit, "offset": page.offset})
        total = await self._page_total(
            page, len(rows), f"SELECT count() FROM {self.t('messages')} FINAL {w.sql()}" + FINAL_SETTINGS, w.params)
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
