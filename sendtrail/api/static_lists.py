"""Static lists: a named, frozen set of contacts taken from an automation.

``create`` copies the matching contacts *now* into ``static_list_members``
with one ``INSERT ... SELECT`` (server side, no rows through Python), then
writes the ``static_lists`` row with the member count. Later changes in the
automation do not touch the list. Members are distinct contacts (a contact
with two runs that both match is one member, with the name and e-mail of its
latest run).

Selection: ``automation_id`` (required); ``step_index`` (optional): only
contacts with a run at that node, in ``state`` (optional: done, waiting,
filtered, stopped; needs ``step_index``); ``status`` (optional): only runs
with that contact status.
"""
from __future__ import annotations

import datetime as _dt
import uuid
from typing import Any, Mapping

from sendtrail.api.errors import BadRequest, NotFound
from sendtrail.api.export import CsvQuery
from sendtrail.api.queries import CONTACT_STATUSES, NODE_STATES, Page, Queries, iso, shape

MAX_NAME = 200


def validate_create(body: Any) -> dict[str, Any]:
    """The create request checked: {name, automation_id, step_index?, state?, status?}."""
    if not isinstance(body, Mapping):
        raise BadRequest("send a JSON object {name, automation_id, step_index?, state?, status?}")
    unknown = set(body) - {"name", "automation_id", "step_index", "state", "status"}
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise BadRequest("name is required: a non-empty string")
    if len(name) > MAX_NAME:
        raise BadRequest(f"name is longer than {MAX_NAME} characters")
    automation_id = body.get("automation_id")
    if not isinstance(automation_id, str) or not automation_id:
        raise BadRequest("automation_id is required: a string")
    step_index = body.get("step_index")
    if isinstance(step_index, float) and step_index.is_integer():
        step_index = int(step_index)  # JSON has one number type: 3.0 is the integer 3
    if step_index is not None and (not isinstance(step_index, int) or isinstance(step_index, bool)
                                   or not 0 <= step_index <= 100_000):
        raise BadRequest("step_index must be an integer from 0")
    state = body.get("state")
    if state is not None:
        if state not in NODE_STATES:
            raise BadRequest(f"state must be one of {', '.join(NODE_STATES)}")
        if step_index is None:
            raise BadRequest("state needs step_index (the node whose contacts are taken)")
    status = body.get("status")
    if status is not None and status not in CONTACT_STATUSES:
        raise BadRequest(f"status must be one of {', '.join(CONTACT_STATUSES)}")
    return {"name": name.strip(), "automation_id": automation_id, "step_index": step_index,
            "state": state, "status": status}


class StaticLists:
    def __init__(self, queries: Queries):
        self.q = queries
        self.deps = queries.deps

    async def create(self, body: Any) -> dict:
        req = validate_create(body)
        await self.q.require_automation(req["automation_id"])
        list_id = uuid.uuid4().hex
        created = _dt.datetime.fromtimestamp(self.deps.now(), _dt.timezone.utc)
        params: dict[str, Any] = {"id": list_id, "a": req["automation_id"]}
        runs = (f"SELECT contact_id, run, name, email FROM {self.q.t('enrollments')} FINAL "
                "WHERE automation_id = {a:String}")
        if req["status"]:
            runs += " AND status = {status:String}"
            params["status"] = req["status"]
        if req["step_index"] is not None:
            params["step"] = req["step_index"]
            node = (f"SELECT contact_id, run FROM {self.q.t('node_states')} FINAL "
                    "WHERE automation_id = {a:String} AND step_index = {step:UInt32}")
            if req["state"]:
                node += " AND state = {state:String}"
                params["state"] = req["state"]
            else:
                node += " AND state IN ('done', 'waiting', 'filtered', 'stopped')"
            runs += f" AND (contact_id, run) IN ({node})"
        await self.deps.command(
            f"INSERT INTO {self.q.t('static_list_members')} (list_id, contact_id, name, email) "
            "SELECT {id:String}, contact_id, argMax(name, run), argMax(email, run) "
            f"FROM ({runs}) GROUP BY contact_id",
            params,
        )
        count = await self.q._scalar(
            f"SELECT count() FROM {self.q.t('static_list_members')} FINAL WHERE list_id = {{id:String}}",
            {"id": list_id})
        await self.deps.insert(
            "static_lists",
            [(list_id, req["name"], req["automation_id"], req["step_index"], req["state"], req["status"],
              int(count or 0), created.replace(tzinfo=None))],
            ["list_id", "name", "automation_id", "step_index", "state", "status", "count", "created_at"],
        )
        return {"id": list_id, "name": req["name"], "automation_id": req["automation_id"],
                "step_index": req["step_index"], "state": req["state"], "status": req["status"],
                "count": int(count or 0), "created_at": iso(created)}

    _LIST_COLS = ("list_id AS id, name, automation_id, step_index, state, status, count, created_at")

    async def get_list(self, list_id: str) -> dict:
        cols, rows = await self.q._rows(
            f"SELECT {self._LIST_COLS} FROM {self.q.t('static_lists')} FINAL WHERE list_id = {{id:String}} LIMIT 1",
            {"id": list_id})
        if not rows:
            raise NotFound(f"static list {list_id!r} not found")
        return shape(cols, rows)[0]

    async def get(self, list_id: str, page: Page) -> dict:
        props = await self.get_list(list_id)
        cols, rows = await self.q._rows(
            f"SELECT contact_id, name, email FROM {self.q.t('static_list_members')} FINAL "
            f"WHERE list_id = {{id:String}} ORDER BY {page.sort} {page.order}, contact_id {page.order} "
            "LIMIT {limit:UInt64} OFFSET {offset:UInt64}",
            {"id": list_id, "limit": page.limit, "offset": page.offset})
        return {**props, "items": shape(cols, rows), "total": props["count"]}

    async def list_lists(self, *, automation_id: str | None, page: Page) -> dict:
        where, params = "", {}
        if automation_id:
            where, params = "WHERE automation_id = {a:String}", {"a": automation_id}
        cols, rows = await self.q._rows(
            f"SELECT {self._LIST_COLS} FROM {self.q.t('static_lists')} FINAL {where} "
            f"ORDER BY {page.sort} {page.order}, list_id LIMIT {{limit:UInt64}} OFFSET {{offset:UInt64}}",
            {**params, "limit": page.limit, "offset": page.offset})
        total = await self.q._scalar(f"SELECT count() FROM {self.q.t('static_lists')} FINAL {where}", params)
        return {"items": shape(cols, rows), "total": int(total or 0)}

    CSV_HEADER = ("Contact ID", "Name", "Email")

    def members_csv_sql(self, list_id: str) -> CsvQuery:
        return CsvQuery([("contact_id", "text"), ("name", "text"), ("email", "text")],
                        f"FROM {self.q.t('static_list_members')} FINAL WHERE list_id = {{id:String}} "
                        "ORDER BY contact_id", {"id": list_id})


__all__ = ["StaticLists", "validate_create"]
