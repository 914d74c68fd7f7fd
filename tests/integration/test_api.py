"""The report API against a small embedded-ClickHouse dataset with known figures (api_fixtures)."""
from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import io
import re
import xml.etree.ElementTree as ET
import zipfile
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sendtrail.api import ROUTES, add_routes, make_deps_for_client
from sendtrail.api.openapi import OPENAPI
from sendtrail.api.queries import COMPLETED_RUN, LEFT_RUN
from tests.integration import api_fixtures as F

pytestmark = pytest.mark.network

DB = "api_test"
LISTS_DB = "api_lists"


class Api:
    """A running app on 127.0.0.1 and a client, driven from sync tests."""

    def __init__(self, deps):
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        add_routes(app, deps)
        self.app = app

        async def start() -> TestClient:
            client = TestClient(TestServer(app, host="127.0.0.1"))
            await client.start_server()
            return client

        self.client = self.loop.run_until_complete(start())

    def request(self, method: str, path: str, **kw) -> tuple[int, Any, Any]:
        async def go():
            resp = await self.client.request(method, path, **kw)
            body = await resp.read()
            return resp.status, body, resp.headers

        return self.loop.run_until_complete(go())

    def get(self, path: str, params: dict | None = None, expect: int = 200) -> Any:
        status, body, headers = self.request("GET", path, params=params or {})
        assert status == expect, (status, body[:500])
        if headers.get("Content-Type", "").startswith("application/json"):
            import orjson

            return orjson.loads(body)
        return body

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    path = tmp_path_factory.mktemp("api-chdb")
    clients = []

    def factory(db):
        def make():
            return F.open_database(str(path), db)
        return make

    main = F.open_database(str(path), DB)
    clients.append(main)
    F.load_dataset(main, DB)
    lists = F.open_database(str(path), LISTS_DB)
    clients.append(lists)
    F.load_dataset(lists, LISTS_DB)
    now = lambda: F.NOW.replace(tzinfo=dt.timezone.utc).timestamp()  # noqa: E731
    api = Api(make_deps_for_client(main, DB, client_factory=factory(DB), now=now))
    lists_api = Api(make_deps_for_client(lists, LISTS_DB, client_factory=factory(LISTS_DB), now=now))
    yield {"api": api, "lists_api": lists_api, "lists_client": lists, "path": str(path)}
    api.close()
    lists_api.close()
    for c in clients:
        c.close()


@pytest.fixture(scope="module")
def api(env) -> Api:
    return env["api"]


A1 = "/api/v1/automations/a1"


# ------------------------------------------------------------------ schema checker

def _resolve(schema: dict) -> dict:
    while "$ref" in schema:
        schema = OPENAPI["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def conforms(value: Any, schema: dict, where: str = "$") -> list[str]:
    """Errors of ``value`` against the subset of JSON Schema that OPENAPI uses."""
    schema = _resolve(schema)
    errors: list[str] = []
    if "allOf" in schema:
        for sub in schema["allOf"]:
            errors += conforms(value, sub, where)
        return errors
    if "oneOf" in schema:
        if not any(not conforms(value, sub, where) for sub in schema["oneOf"]):
            errors.append(f"{where}: matches none of oneOf")
        return errors
    types = schema.get("type")
    if types is not None:
        types = types if isinstance(types, list) else [types]
        checks = {"string": lambda v: isinstance(v, str), "integer": lambda v: isinstance(v, int)
                  and not isinstance(v, bool), "number": lambda v: isinstance(v, (int, float))
                  and not isinstance(v, bool), "object": lambda v: isinstance(v, dict),
                  "array": lambda v: isinstance(v, list), "null": lambda v: v is None,
                  "boolean": lambda v: isinstance(v, bool)}
        if not any(checks[t](value) for t in types):
            return [f"{where}: {value!r} is not {types}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if schema.get("format") == "date-time" and isinstance(value, str):
        if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", value):
            errors.append(f"{where}: {value!r} is not an RFC 3339 UTC time")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: missing {key!r}")
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += conforms(value[key], sub, f"{where}.{key}")
        if schema.get("additionalProperties") is False:
            extra = set(value) - set(schema.get("properties", {}))
            if extra:
                errors.append(f"{where}: unexpected {sorted(extra)}")
        elif isinstance(schema.get("additionalProperties"), dict):
            for key, v in value.items():
                errors += conforms(v, schema["additionalProperties"], f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += conforms(v, schema["items"], f"{where}[{i}]")
    return errors


def check_schema(body: Any, path_template: str, method: str = "get", status: str = "200") -> None:
    response = OPENAPI["paths"][path_template][method]["responses"][status]
    schema = response["content"]["application/json"]["schema"]
    errors = conforms(body, schema)
    assert not errors, errors[:10]


# ------------------------------------------------------------------ automations

def test_automations_list_sort_filter(api):
    body = api.get("/api/v1/automations", {"sort": "name", "order": "asc"})
    check_schema(body, "/api/v1/automations")
    assert body["total"] == 2
    assert [a["name"] for a in body["items"]] == [F.A2_NAME, F.A1_NAME]
    a1 = body["items"][1]
    assert a1["participation"] == "unlimited" and a1["published_by"] == "alice" and a1["description"] == "New sign-ups"
    assert [s["name"] for s in a1["steps"]] == ["Welcome", "Tips", "Offer"]
    assert a1["start_at"] == "2024-03-01T00:00:00.000Z" and a1["end_at"] is None
    assert [a["automation_id"] for a in api.get("/api/v1/automations", {"status": "paused"})["items"]] == ["a2"]
    assert api.get("/api/v1/automations", {"q": "welcome"})["total"] == 1
    page = api.get("/api/v1/automations", {"sort": "name", "order": "desc", "limit": 1, "offset": 1})
    assert page["total"] == 2 and [a["automation_id"] for a in page["items"]] == ["a2"]


def test_automation_detail_totals(api):
    body = api.get(A1)
    check_schema(body, "/api/v1/automations/{id}")
    t = body["totals"]
    assert t["contacts"] == F.EXPECTED["a1_contacts"]
    assert t["runs"] == F.EXPECTED["a1_runs"]
    assert t["recipients"] == F.EXPECTED["a1_recipients"]  # the replayed rows are not counted twice
    assert t["statuses"] == F.EXPECTED["a1_statuses"]
    assert t["ignored_enrollments"] == 1


# ------------------------------------------------------------------ recipients

def test_recipients_total_shape_and_replays_folded(api):
    body = api.get(f"{A1}/recipients", {"limit": 1000})
    check_schema(body, "/api/v1/automations/{id}/recipients")
    assert body["total"] == F.EXPECTED["a1_recipients"] == len(body["items"])
    assert len({r["message_id"] for r in body["items"]}) == body["total"]
    row = next(r for r in body["items"] if r["message_id"] == "m-a1-c03-r0-s1-0")
    assert row == {
        "recipient_id": "r-m-a1-c03-r0-s1-0", "automation_id": "a1", "run": 0, "contact_id": "c03",
        "user_id": "u03", "user_name": "Cy Cole", "email": "c03@example.com", "step_index": 1,
        "step_details": {"day": 3, "inactive_days": 0}, "message_id": "m-a1-c03-r0-s1-0", "channel": "email",
        "mailing_id": "a1:1", "sent_time": "2024-03-06T01:00:00.000Z", "metadata": row["metadata"],
    }
    assert row["metadata"]["campaign"] == "spring"


def test_recipients_filters(api):
    for step, n in F.EXPECTED["a1_recipients_by_step"].items():
        body = api.get(f"{A1}/recipients", {"step": step})
        assert body["total"] == n and all(r["step_index"] == step for r in body["items"])
    c12 = api.get(f"{A1}/recipients", {"contact_id": "c12", "step": 0})
    assert c12["total"] == 2  # a duplicate send is visible: same contact, same step, two messages
    assert api.get(f"{A1}/recipients", {"contact_id": "c06"})["total"] == 0  # never received anything
    ann = api.get(f"{A1}/recipients", {"q": "ANN"})
    assert ann["total"] == 4 and {r["contact_id"] for r in ann["items"]} == {"c01"}
    assert api.get(f"{A1}/recipients", {"q": "c05@example"})["total"] == 1
    # period on sent_time: [T0+5d, T0+10d)
    start, end = F.T0 + 5 * F.DAY, F.T0 + 10 * F.DAY
    expected = sum(1 for s in F.sends() if s.run.automation_id == "a1" and start <= s.sent_time < end)
    body = api.get(f"{A1}/recipients", {"from": "2024-03-06", "to": "2024-03-11T00:00:00Z", "limit": 1000})
    assert body["total"] == expected == len(body["items"]) > 0
    # the same instant written with an offset
    assert api.get(f"{A1}/recipients", {"from": "2024-03-06T01:00:00+01:00", "to": "2024-03-11"})["total"] == expected


def test_recipients_sorting_and_pagination(api):
    all_desc = api.get(f"{A1}/recipients", {"limit": 1000})["items"]
    times = [r["sent_time"] for r in all_desc]
    assert times == sorted(times, reverse=True)  # default: newest first
    asc = api.get(f"{A1}/recipients", {"sort": "sent_time", "order": "asc", "limit": 1000})["items"]
    assert [r["message_id"] for r in asc] == [r["message_id"] for r in reversed(all_desc)]
    pages = []
    for offset in range(0, 17, 5):
        page = api.get(f"{A1}/recipients", {"limit": 5, "offset": offset})
        assert page["total"] == 17 and len(page["items"]) == min(5, 17 - offset)
        pages += page["items"]
    assert [r["message_id"] for r in pages] == [r["message_id"] for r in all_desc]
    by_name = api.get(f"{A1}/recipients", {"sort": "user_name", "order": "asc", "limit": 1000})["items"]
    assert [r["user_name"] for r in by_name] == sorted(r["user_name"] for r in by_name)
    by_step = api.get(f"{A1}/recipients", {"sort": "step_index", "order": "desc", "limit": 1000})["items"]
    assert [r["step_index"] for r in by_step] == sorted((r["step_index"] for r in by_step), reverse=True)
    by_email = api.get(f"{A1}/recipients", {"sort": "email", "order": "asc", "limit": 1000})["items"]
    assert [r["email"] for r in by_email] == sorted(r["email"] for r in by_email)


def test_recipients_export_zip(api):
    status, body, headers = api.request("GET", f"{A1}/recipients/export")
    assert status == 200 and headers["Content-Type"] == "application/zip"
    m = re.search(r'filename="([^"]+)"', headers["Content-Disposition"])
    assert m and m.group(1) == "automation_recipients_Welcome_Series_Q1_20240430_000000.zip"
    assert re.fullmatch(r"automation_recipients_[^/\\\x00-\x1f]+_\d{8}_\d{6}\.zip", m.group(1))
    zf = zipfile.ZipFile(io.BytesIO(body))
    assert zf.testzip() is None
    (name,) = zf.namelist()
    assert name.endswith(".csv")
    text = zf.read(name).decode("utf-8")
    assert "\r\n" in text
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0][:8] == ["Recipient ID", "User ID", "User Name", "Email", "Step Index", "Step Details",
                           "Sent Time", "Metadata"]
    assert {"Automation ID", "Run", "Contact ID", "Message ID"} <= set(rows[0])
    assert len(rows) - 1 == F.EXPECTED["a1_recipients"]
    by_id = {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    c04 = by_id["r-m-a1-c04-r0-s0-0"]
    assert c04["User Name"] == "'=cmd|' /C calc'!A0"  # formula neutralized
    assert c04["Sent Time"] == "2024-03-05 01:00:00.000" and c04["Step Index"] == "0"
    assert by_id["r-m-a1-c01-r0-s0-0"]["User Name"] == "Ann Archer"
    # sent_time order
    assert [r[6] for r in rows[1:]] == sorted(r[6] for r in rows[1:])
    # filtered export and 404
    status, body, _ = api.request("GET", f"{A1}/recipients/export", params={"step": "2"})
    zf = zipfile.ZipFile(io.BytesIO(body))
    assert len(zf.read(zf.namelist()[0]).decode().strip().split("\r\n")) == 1 + 2
    status, body, _ = api.request("GET", "/api/v1/automations/nope/recipients/export")
    assert status == 404


# ------------------------------------------------------------------ report

def test_report_counts(api):
    body = api.get(f"{A1}/report")
    check_schema(body, "/api/v1/automations/{id}/report")
    assert body["automation"]["name"] == F.A1_NAME and body["automation"]["participation"] == "unlimited"
    nodes = {n["step_index"]: {k: n[k] for k in ("done", "waiting", "filtered", "stopped")} for n in body["nodes"]}
    assert nodes == F.EXPECTED["a1_nodes"]
    assert [(n["name"], n["kind"]) for n in body["nodes"]] == [("Welcome", "email"), ("Tips", "email"),
                                                              ("Offer", "email")]
    assert body["statuses"] == F.EXPECTED["a1_statuses"]
    comp = body["completion"]
    assert {k: comp[k] for k in ("completed", "in_progress", "not_started", "left")} == F.EXPECTED["a1_completion"]
    assert comp["runs"] == F.EXPECTED["a1_runs"]


@pytest.mark.parametrize("start,end", [(5, 10), (0, 3), (9, 30), (12, 13)])
def test_report_period(api, start, end):
    s, e = F.T0 + start * F.DAY, F.T0 + end * F.DAY
    body = api.get(f"{A1}/report", {"from": s.strftime("%Y-%m-%dT%H:%M:%SZ"), "to": e.strftime("%Y-%m-%d")})
    got = {n["step_index"]: {k: n[k] for k in ("done", "waiting", "filtered", "stopped")} for n in body["nodes"]
           if any(n[k] for k in ("done", "waiting", "filtered", "stopped"))}
    assert got == F.expected_nodes_in_period("a1", s, e)
    assert body["statuses"] == F.expected_statuses_in_period("a1", s, e)
    assert body["period"]["from"] == s.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert sum(body["statuses"].values()) == body["completion"]["runs"]


def test_report_period_example_by_hand(api):
    # [2024-03-06, 2024-03-11): node 0 done at enrolled+1h: c05 (03-06T01), c08 (03-09T01), c09 (03-10T01);
    # waiting at node 0 since enrollment: c06 (03-07), c07 (03-08); c11 stopped 03-12T01 (out).
    # Node 1: done c03 (03-06T01); waiting c04 (since 03-05T01: out); stopped c05 (03-06T02);
    # filtered c08 (03-09T02). Cohort enrolled in the period: c05..c09.
    body = api.get(f"{A1}/report", {"from": "2024-03-06", "to": "2024-03-11"})
    n = {x["step_index"]: x for x in body["nodes"]}
    assert (n[0]["done"], n[0]["waiting"], n[0]["filtered"], n[0]["stopped"]) == (3, 2, 0, 0)
    assert (n[1]["done"], n[1]["waiting"], n[1]["filtered"], n[1]["stopped"]) == (1, 0, 1, 1)
    assert body["statuses"] == {"bounced": 1, "ready": 1, "waiting_enrichment": 1, "finished": 1,
                                "unsubscribed": 1}


def test_report_pictures(api):
    status, body, headers = api.request("GET", f"{A1}/report.svg")
    assert status == 200 and headers["Content-Type"].startswith("image/svg+xml")
    root = ET.fromstring(body)
    groups = [g for g in root.iter("{http://www.w3.org/2000/svg}g") if g.get("class") == "node"]
    assert [g.get("data-step-index") for g in groups] == ["0", "1", "2"]
    counts = {(g.get("data-step-index"), c.get("data-state")): int(c.get("data-count"))
              for g in groups for c in g if c.get("class") == "count"}
    assert counts[("1", "waiting")] == 4 and counts[("0", "done")] == 10
    status, body, headers = api.request("GET", f"{A1}/report.png", params={"scale": "1"})
    assert status == 200 and headers["Content-Type"] == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    img = Image.open(io.BytesIO(body))
    assert img.size[0] == 760 and 300 < img.size[1] < 1000
    status, _, _ = api.request("GET", f"{A1}/report.png", params={"scale": "9"})
    assert status == 400


# ------------------------------------------------------------------ contacts

def test_automation_contacts(api):
    body = api.get(f"{A1}/contacts", {"limit": 1000})
    check_schema(body, "/api/v1/automations/{id}/contacts")
    assert body["total"] == 13
    c04 = next(c for c in body["items"] if c["contact_id"] == "c04")
    assert c04["status"] == "in_progress" and c04["current_step"] == 1  # the newer version wins
    c05 = next(c for c in body["items"] if c["contact_id"] == "c05")
    assert (c05["status"], c05["reason"]) == ("bounced", "hard_bounce")
    # a paused contact says when it resumes by itself (seed 004: set a date to auto-resume)
    c10 = next(c for c in body["items"] if c["contact_id"] == "c10")
    assert (c10["status"], c10["resume_at"]) == ("paused", "2024-04-01T09:00:00.000Z")
    assert c05["resume_at"] is None
    ip = api.get(f"{A1}/contacts", {"status": "in_progress"})
    assert ip["total"] == 4 and {(c["contact_id"], c["run"]) for c in ip["items"]} == {
        ("c01", 1), ("c03", 0), ("c04", 0), ("c12", 0)}
    names = [c["name"] for c in api.get(f"{A1}/contacts", {"sort": "name", "order": "asc", "limit": 1000})["items"]]
    assert names == sorted(names)
    assert api.get(f"{A1}/contacts", {"run": 1})["total"] == 1
    assert api.get(f"{A1}/contacts", {"q": "zoë"})["items"][0]["contact_id"] == "c07"


def test_automation_contacts_csv(api):
    status, body, headers = api.request("GET", f"{A1}/contacts.csv", params={"sort": "contact_id", "order": "asc"})
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    assert "attachment" in headers["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(body.decode("utf-8"))))
    assert rows[0] == ["Contact ID", "Run", "Name", "Email", "Status", "Reason", "Current Step", "Enrolled At",
                       "Status At", "Updated At"]
    assert len(rows) == 14 and rows[1][0] == "c01"
    by_id = {r[0]: r for r in rows[1:]}
    assert by_id["c04"][2] == "'=cmd|' /C calc'!A0"
    assert by_id["c06"][2] == 'Smith, "Bob"'
    assert by_id["c07"][2] == "Zoë Ångström"
    assert by_id["c11"][4:6] == ["canceled", "removed"]


def test_node_contacts(api):
    body = api.get(f"{A1}/nodes/1/contacts", {"state": "waiting"})
    check_schema(body, "/api/v1/automations/{id}/nodes/{step_index}/contacts")
    assert body["total"] == 4
    assert {(c["contact_id"], c["run"]) for c in body["items"]} == {("c01", 1), ("c04", 0), ("c10", 0), ("c12", 0)}
    c10 = next(c for c in body["items"] if c["contact_id"] == "c10")
    assert (c10["status"], c10["reason"], c10["state"]) == ("paused", "manual", "waiting")
    all1 = api.get(f"{A1}/nodes/1/contacts", {"limit": 1000})
    assert all1["total"] == 10 and len(all1["items"]) == 10
    filtered = api.get(f"{A1}/nodes/1/contacts", {"state": "filtered"})["items"]
    assert [(c["contact_id"], c["status"], c["reason"]) for c in filtered] == [("c08", "finished", "filtered")]
    # sort by an enrollment column (join first) and by a node column (page first)
    by_name = api.get(f"{A1}/nodes/1/contacts", {"sort": "name", "order": "asc", "limit": 1000})["items"]
    assert [c["name"] for c in by_name] == sorted(c["name"] for c in by_name)
    page1 = api.get(f"{A1}/nodes/1/contacts", {"sort": "at", "order": "asc", "limit": 3})
    page2 = api.get(f"{A1}/nodes/1/contacts", {"sort": "at", "order": "asc", "limit": 3, "offset": 3})
    both = page1["items"] + page2["items"]
    assert [c["state_at"] for c in both] == sorted(c["state_at"] for c in both)
    assert len({(c["contact_id"], c["run"]) for c in both}) == 6 and all(c["name"] for c in both)
    by_contact = api.get(f"{A1}/nodes/0/contacts", {"sort": "contact_id", "order": "desc", "limit": 1000})["items"]
    assert [c["contact_id"] for c in by_contact] == sorted((c["contact_id"] for c in by_contact), reverse=True)
    # the period selects on the node state time, as the report does
    p = api.get(f"{A1}/nodes/0/contacts", {"from": "2024-03-06", "to": "2024-03-11"})
    assert p["total"] == 5  # done c05, c08, c09; waiting c06, c07
    assert api.get(f"{A1}/nodes/7/contacts")["total"] == 0


def test_node_contacts_csv(api):
    status, body, headers = api.request("GET", f"{A1}/nodes/1/contacts.csv", params={"state": "waiting"})
    assert status == 200
    rows = list(csv.reader(io.StringIO(body.decode())))
    assert rows[0][:5] == ["Contact ID", "Run", "Name", "Email", "State"]
    assert sorted(r[0] for r in rows[1:]) == ["c01", "c04", "c10", "c12"]
    assert "node_contacts_Welcome_Series_Q1_step1_waiting_" in headers["Content-Disposition"]


def test_health(api):
    body = api.get(f"{A1}/health")
    check_schema(body, "/api/v1/automations/{id}/health")
    assert body["stuck_total"] == F.EXPECTED["a1_stuck"] == len(body["stuck"])
    assert body["stuck"][0] == {"contact_id": "c04", "run": 0, "step_index": 1,
                                "waiting_since": "2024-03-05T01:00:00.000Z"}
    since = [s["waiting_since"] for s in body["stuck"]]
    assert since == sorted(since)
    assert [(d["contact_id"], d["run"], d["step_index"], d["message_ids"]) for d in body["duplicate_sends"]] == [
        tuple(x) for x in F.EXPECTED["a1_duplicates"]]
    # waiting longer than 40 days before NOW: waiting since before 2024-03-21
    assert api.get(f"{A1}/health", {"older_than": str(40 * 86400)})["stuck_total"] == 6
    assert api.get(f"{A1}/health", {"older_than": str(400 * 86400)})["stuck_total"] == 0


@contextlib.contextmanager
def _dataset_api(env, db: str):
    """A database of its own holding the dataset, and the API over it at the dataset's NOW; dropped after."""
    client = F.open_database(env["path"], db)
    try:
        F.load_dataset(client, db)
        now = lambda: F.NOW.replace(tzinfo=dt.timezone.utc).timestamp()  # noqa: E731
        api = Api(make_deps_for_client(client, db, now=now))
        try:
            yield client, api
        finally:
            api.close()
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db}")
        client.close()


def test_duplicate_sends_across_parts_replays_and_merges(env):
    """Health's duplicate sends: the worker's candidates (repeat_sends, migration 011) with their ids
    from send_index (migration 007). A second send of a step in a later insert (another part) is
    found before any merge; a replayed send, and a candidate whose key holds one message id, are no
    duplicates; all of it still holds once the parts are merged."""
    from sendtrail.clickhouse import insert
    from streams.rows import repeat_send_row

    db = "api_dups"
    with _dataset_api(env, db) as (client, api):
        def dups():
            body = api.get(f"{A1}/health")
            assert body["duplicate_sends_total"] == len(body["duplicate_sends"])
            return [(d["contact_id"], d["run"], d["step_index"], d["message_ids"])
                    for d in body["duplicate_sends"]]

        expected = [tuple(x) for x in F.EXPECTED["a1_duplicates"]]
        assert dups() == expected
        row = client.query(
            "SELECT * FROM recipients FINAL WHERE automation_id = 'a1' AND contact_id = 'c03' AND step_index = 1"
        ).named_results()
        first = next(iter(row))
        # a replay of c03's step-1 send (identical row, its own insert): no duplicate, even when the
        # worker named the step for verification (as when a message's step changes): send_index
        # holds one id for it
        insert(client, "recipients", [first], dedup_token="replay-c03", database=db)
        check = repeat_send_row("a1", "c03", 0, 1, [], True)
        insert(client, "repeat_sends", [check], dedup_token="check-c03", database=db)
        assert dups() == expected
        # a second message for the same step, in a later insert: a duplicate before any merge, with
        # its ids from send_index (the key is marked for verification)...
        second = dict(first, message_id="m-a1-c03-r0-s1-again", recipient_id="r-again")
        insert(client, "recipients", [second], dedup_token="second-c03", database=db)
        both = sorted([first["message_id"], "m-a1-c03-r0-s1-again"])
        assert dups() == sorted(expected + [("c03", 0, 1, both)])
        # ...and the worker's row for it (ids united with the verified ones) changes nothing
        named = repeat_send_row("a1", "c03", 0, 1, both, False)
        insert(client, "repeat_sends", [named], dedup_token="second-c03", database=db)
        assert dups() == sorted(expected + [("c03", 0, 1, both)])
        page = api.get(f"{A1}/health", {"limit": "1", "offset": "1"})
        assert page["duplicate_sends_total"] == 2 and len(page["duplicate_sends"]) == 1
        for table in ("send_index", "recipients", "repeat_sends"):
            client.command(f"OPTIMIZE TABLE {db}.{table} FINAL")
        assert dups() == sorted(expected + [("c03", 0, 1, both)])
        # a later single send elsewhere: a new small part next to the merged one changes nothing
        other = dict(first, contact_id="c09", step_index=2, message_id="m-a1-c09-r0-s2-0", recipient_id="r-c09")
        insert(client, "recipients", [other], dedup_token="replay-c09", database=db)
        assert dups() == sorted(expected + [("c03", 0, 1, both)])


def test_stuck_waits_resets_and_cleanup(env):
    """Health's stuck contacts come from node_waits (migration 012): an open wait is listed until a
    later version closes it; a node's reset row removes its waits of lower versions (a crashed
    attempt's wait the replay never closed) but not the wait the worker opened again with it;
    ``clean_waits`` removes the closed waits and the resets from the table and changes no answer."""
    from sendtrail.api.queries import iso
    from sendtrail.clickhouse import insert
    from sendtrail.maintenance import clean_waits
    from streams.rows import wait_reset_row, wait_row

    db = "api_waits"
    with _dataset_api(env, db) as (client, api):
        def stuck():
            body = api.get(f"{A1}/health")
            assert body["stuck_total"] == len(body["stuck"])
            return [(s["contact_id"], s["run"], s["step_index"], s["waiting_since"]) for s in body["stuck"]]

        before = stuck()
        assert len(before) == F.EXPECTED["a1_stuck"]
        t1 = F.T0 + dt.timedelta(days=3)
        t2 = F.T0 + dt.timedelta(days=4)
        ms = lambda t: int(t.replace(tzinfo=dt.timezone.utc).timestamp() * 1000)  # noqa: E731
        # c90 waited at node 2 in an attempt that crashed (version 7, never closed); the replay's
        # snapshot reset the node at version 9 and opened its current wait (since t2) again
        insert(client, "node_waits", [wait_row("a1", "c90", 0, 2, ms(t1), False, 7)], dedup_token="ghost",
               database=db)
        assert stuck()[0] == ("c90", 0, 2, iso(t1))  # (before the reset: listed, the oldest)
        insert(client, "node_waits", [wait_reset_row("a1", "c90", 0, 2, 9), wait_row("a1", "c90", 0, 2, ms(t2),
                                                                                      False, 9)],
               dedup_token="reset", database=db)
        # c91's wait opened and closed; c92's close comes before its open is merged with it
        insert(client, "node_waits", [wait_row("a1", "c91", 0, 1, ms(t1), False, 3),
                                      wait_row("a1", "c92", 0, 1, ms(t1), False, 3)], dedup_token="opens",
               database=db)
        insert(client, "node_waits", [wait_row("a1", "c91", 0, 1, ms(t1), True, 4)], dedup_token="close91",
               database=db)
        # a close whose start is unknown (a state of the earlier layout): c93's node reset at version 5
        insert(client, "node_waits", [wait_row("a1", "c93", 0, 1, ms(t1), False, 2)], dedup_token="open93",
               database=db)
        insert(client, "node_waits", [wait_row("a1", "c93", 0, 1, None, True, 5)], dedup_token="close93",
               database=db)
        want = sorted(before + [("c90", 0, 2, iso(t2)), ("c92", 0, 1, iso(t1))], key=lambda s: (s[3], s[:3]))
        assert stuck() == want
        page = api.get(f"{A1}/health", {"limit": "2", "offset": "1"})
        assert page["stuck_total"] == len(want)
        assert [(s["contact_id"], s["run"], s["step_index"], s["waiting_since"]) for s in page["stuck"]] == want[1:3]
        assert api.get(f"{A1}/health", {"limit": "2", "offset": "100"})["stuck_total"] == len(want)
        rows_before = client.query(f"SELECT count() FROM {db}.node_waits").result_rows[0][0]
        clean_waits(client, db)
        assert stuck() == want
        left = client.query(f"SELECT contact_id, since, closed FROM {db}.node_waits WHERE contact_id IN "
                            "('c90', 'c91', 'c92', 'c93') ORDER BY contact_id").result_rows
        assert [(c, s, k) for c, s, k in left] == [("c90", t2, 0), ("c92", t1, 0)]
        assert client.query(f"SELECT count() FROM {db}.node_waits").result_rows[0][0] < rows_before
        assert client.query(f"SELECT count() FROM {db}.node_waits WHERE closed = 1 OR since = "
                            "toDateTime64(0, 3, 'UTC')").result_rows[0][0] == 0
        clean_waits(client, db)  # again: nothing to do
        assert stuck() == want


# ------------------------------------------------------------------ mailings

def test_mailings_table(api):
    body = api.get("/api/v1/mailings")
    check_schema(body, "/api/v1/mailings")
    assert body["total"] == 4
    got = {m["mailing_id"]: {k: m[k] for k in F.EXPECTED["mailings"]["a1:0"]} for m in body["items"]}
    assert got == F.EXPECTED["mailings"]
    dates = [m["date"] for m in body["items"]]
    assert dates == sorted(dates, reverse=True)
    a10 = next(m for m in body["items"] if m["mailing_id"] == "a1:0")
    assert (a10["subject"], a10["sending_user"], a10["sending_email"], a10["status"], a10["automation_id"],
            a10["step_index"], a10["date"]) == ("Welcome!", "alice", "alice@example.com", "sent", "a1", 0,
                                                "2024-03-02T01:00:00.000Z")
    by_sent = api.get("/api/v1/mailings", {"sort": "total_sent", "order": "asc"})["items"]
    assert [m["total_sent"] for m in by_sent] == [2, 4, 5, 11]
    assert api.get("/api/v1/mailings", {"automation_id": "a1"})["total"] == 3
    assert [m["mailing_id"] for m in api.get("/api/v1/mailings", {"automation_id": "a1", "step": "1"})["items"]] == [
        "a1:1"]
    assert api.get("/api/v1/mailings", {"q": "miss"})["total"] == 1
    assert api.get("/api/v1/mailings", {"from": "2024-03-03", "to": "2024-03-10"})["total"] == 2  # a1:1, a1:2
    # the fast path (numbers first, then the page's subjects) and the full aggregate agree
    full = api.get("/api/v1/mailings", {"q": "e"})  # every subject has an e: full-aggregate path
    assert full == body
    subjects = [m["subject"] for m in api.get("/api/v1/mailings", {"sort": "subject", "order": "asc"})["items"]]
    assert subjects == sorted(subjects)
    assert api.get("/api/v1/mailings", {"limit": 2, "offset": 4}) == {"items": [], "total": 4}
    one = api.get("/api/v1/mailings/a2:0")
    check_schema(one, "/api/v1/mailings/{id}")
    assert one["total_sent"] == 5
    api.get("/api/v1/mailings/zz:9", expect=404)


def test_mailings_csv(api):
    status, body, _ = api.request("GET", "/api/v1/mailings.csv", params={"sort": "mailing_id", "order": "asc"})
    rows = list(csv.reader(io.StringIO(body.decode())))
    assert rows[0] == ["Mailing ID", "Automation ID", "Step Index", "Subject", "Sending User", "Sending Email",
                       "Status", "Date", "Total Sent", "Delivered", "Opened", "Clicked", "Bounced", "Dropped",
                       "Deferred", "Spam Reports", "Unsubscribed"]
    assert [r[0] for r in rows[1:]] == ["a1:0", "a1:1", "a1:2", "a2:0"]
    assert rows[2][3] == "'=HYPERLINK(\"http://evil\")"  # neutralized subject
    assert rows[1][8:] == ["11", "8", "3", "1", "1", "1", "1", "0", "0"]


def test_mailing_recipients(api):
    base = "/api/v1/mailings/a1:0/recipients"
    body = api.get(base, {"limit": 1000})
    check_schema(body, "/api/v1/mailings/{id}/recipients")
    assert body["total"] == 11
    bounced = next(r for r in body["items"] if r["contact_id"] == "c05")
    assert bounced["status"] == "bounced" and bounced["bounce_class"] == "hard" and bounced["delivered_at"] is None
    assert bounced["status_at"] == bounced["bounced_at"] == "2024-03-06T02:00:00.000Z"
    clicked = next(r for r in body["items"] if r["message_id"] == "m-a1-c01-r0-s0-0")
    assert clicked["status"] == "clicked" and clicked["opened_at"] and clicked["clicks"] == 1  # newest version
    for key in ("name", "email"):
        for order in ("asc", "desc"):
            items = api.get(base, {"sort": key, "order": order, "limit": 1000})["items"]
            assert [r[key] for r in items] == sorted((r[key] for r in items), reverse=order == "desc")
    dates = [r["status_at"] for r in api.get(base, {"sort": "date", "order": "asc", "limit": 1000})["items"]]
    assert dates == sorted(dates)
    sev = [r["status"] for r in api.get(base, {"sort": "status", "order": "asc", "limit": 1000})["items"]]
    assert sev[:2] == ["dropped", "bounced"] and sev[-1] == "sent"
    assert api.get(base, {"status": "opened"})["total"] == 2  # c02, c03 (c01 clicked)
    assert api.get(base, {"q": "lu lane"})["total"] == 2
    api.get("/api/v1/mailings/none/recipients", expect=404)


def test_mailing_recipients_sorted_by_name_or_email_pages(api):
    """Sorts by name and e-mail page through mailing_sort (migration 008): the page's ids in order (a
    message repeated by a row version in another part counted once), then the newest rows."""
    base = "/api/v1/mailings/a1:0/recipients"
    full = api.get(base, {"limit": 1000, "sort": "date"})["items"]
    assert len(full) == 11
    for key in ("name", "email"):
        for order in ("asc", "desc"):
            want = sorted(full, key=lambda r: (r[key], r["message_id"]), reverse=order == "desc")
            paged = []
            for offset in range(0, 13, 3):
                body = api.get(base, {"sort": key, "order": order, "limit": 3, "offset": offset})
                assert body["total"] == 11
                paged += body["items"]
            assert paged == want
    newest = next(r for r in api.get(base, {"sort": "name", "limit": 1000})["items"]
                  if r["message_id"] == "m-a1-c01-r0-s0-0")
    assert newest["status"] == "clicked"  # the older version (status sent) lives in another part
    assert api.get(base, {"sort": "name", "offset": 11})["items"] == []


# ------------------------------------------------------------------ contact card and timeline

def test_contact_automations(api):
    body = api.get("/api/v1/contacts/c01/automations")
    check_schema(body, "/api/v1/contacts/{contact_id}/automations")
    assert body["total"] == 3 and body["contact"]["name"] == "Ann Archer"
    runs = {(i["automation_id"], i["run"]): i for i in body["items"]}
    assert set(runs) == {("a1", 0), ("a1", 1), ("a2", 0)}
    assert runs[("a1", 0)]["name"] == F.A1_NAME
    assert (runs[("a1", 0)]["status"], runs[("a1", 0)]["reason"]) == ("finished", "completed")
    assert [(n["step_index"], n["state"]) for n in runs[("a1", 0)]["nodes"]] == [(0, "done"), (1, "done"),
                                                                              (2, "done")]
    assert [(n["step_index"], n["state"]) for n in runs[("a1", 1)]["nodes"]] == [(0, "done"), (1, "waiting")]
    assert runs[("a2", 0)]["current_step"] == 0
    api.get("/api/v1/contacts/nobody/automations", expect=404)


def test_contact_timeline_and_messages(api):
    body = api.get("/api/v1/contacts/c01/timeline")
    check_schema(body, "/api/v1/contacts/{contact_id}/timeline")
    assert body["total"] == F.EXPECTED["c01_timeline"]  # replayed changes folded
    times = [c["occurred_at"] for c in body["items"]]
    assert times == sorted(times, reverse=True)
    assert body["items"][0]["to_status"] == "finished"
    page = api.get("/api/v1/contacts/c01/timeline", {"limit": 2, "offset": 2})
    assert [c["change_id"] for c in page["items"]] == [c["change_id"] for c in body["items"][2:4]]
    assert api.get("/api/v1/contacts/c01/timeline", {"kind": "message_status"})["total"] == 1
    assert api.get("/api/v1/contacts/c02/timeline")["total"] == 0  # known contact, no changes
    api.get("/api/v1/contacts/nobody/timeline", expect=404)
    msgs = api.get("/api/v1/contacts/c01/messages")
    check_schema(msgs, "/api/v1/contacts/{contact_id}/messages")
    assert msgs["total"] == 4 and {m["status"] for m in msgs["items"]} == {"clicked", "delivered", "opened", "sent"}


# ------------------------------------------------------------------ static lists

def test_static_list_frozen(env):
    api, client = env["lists_api"], env["lists_client"]
    status, body, _ = api.request("POST", "/api/v1/static-lists",
                                  json={"name": "Waiting at Tips", "automation_id": "a1", "step_index": 1,
                                        "state": "waiting"})
    assert status == 201, body
    import orjson

    created = orjson.loads(body)
    check_schema(created, "/api/v1/static-lists", "post", "201")
    assert created["count"] == 4 and created["name"] == "Waiting at Tips"
    got = api.get(f"/api/v1/static-lists/{created['id']}")
    check_schema(got, "/api/v1/static-lists/{id}")
    members = [m["contact_id"] for m in got["items"]]
    assert members == ["c01", "c04", "c10", "c12"] and got["total"] == 4
    # more contacts reach the node afterwards: the list does not change
    from sendtrail.clickhouse import insert

    insert(client, "node_states", [dict(automation_id="a1", contact_id="c06", run=0, step_index=1, state="waiting",
                                        at=F.NOW, _version=9)], dedup_token="late", database=LISTS_DB)
    insert(client, "node_states", [dict(automation_id="a1", contact_id="c04", run=0, step_index=1, state="done",
                                        at=F.NOW, _version=9)], dedup_token="late2", database=LISTS_DB)
    again = api.get(f"/api/v1/static-lists/{created['id']}")
    assert [m["contact_id"] for m in again["items"]] == members and again["count"] == 4
    status, body, _ = api.request("POST", "/api/v1/static-lists",
                                  json={"name": "Now", "automation_id": "a1", "step_index": 1, "state": "waiting"})
    assert orjson.loads(body)["count"] == 4  # c06 in, c04 out
    # paging, csv, by status, whole automation, listing
    page = api.get(f"/api/v1/static-lists/{created['id']}", {"limit": 2, "offset": 2, "sort": "contact_id",
                                                              "order": "asc"})
    assert [m["contact_id"] for m in page["items"]] == ["c10", "c12"] and page["total"] == 4
    status, csv_body, headers = api.request("GET", f"/api/v1/static-lists/{created['id']}.csv")
    rows = list(csv.reader(io.StringIO(csv_body.decode())))
    assert rows[0] == ["Contact ID", "Name", "Email"] and [r[0] for r in rows[1:]] == members
    assert rows[2][1] == "'=cmd|' /C calc'!A0"
    status, body, _ = api.request("POST", "/api/v1/static-lists",
                                  json={"name": "All finished", "automation_id": "a1", "status": "finished"})
    assert orjson.loads(body)["count"] == 3  # finished runs: c01 (run 0), c02, c08
    status, body, _ = api.request("POST", "/api/v1/static-lists", json={"name": "Everyone", "automation_id": "a1"})
    assert orjson.loads(body)["count"] == 12  # distinct contacts, c01's two runs are one member
    listing = api.get("/api/v1/static-lists", {"automation_id": "a1"})
    assert listing["total"] == 4
    api.get("/api/v1/static-lists/unknown", expect=404)
    api.get("/api/v1/static-lists/unknown.csv", expect=404)


@pytest.mark.parametrize("payload,code", [
    ({"automation_id": "a1"}, 400),
    ({"name": "", "automation_id": "a1"}, 400),
    ({"name": "x", "automation_id": "a1", "state": "done"}, 400),  # state without a node
    ({"name": "x", "automation_id": "a1", "step_index": 1, "state": "nope"}, 400),
    ({"name": "x", "automation_id": "a1", "step_index": -1}, 400),
    ({"name": "x", "automation_id": "a1", "status": "happy"}, 400),
    ({"name": "x", "automation_id": "a1", "extra": 1}, 400),
    ({"name": "x", "automation_id": "zz"}, 404),
    ([1, 2], 400),
])
def test_static_list_bad_requests(env, payload, code):
    status, body, _ = env["lists_api"].request("POST", "/api/v1/static-lists", json=payload)
    assert status == code, body
    import orjson

    err = orjson.loads(body)["error"]
    assert err["code"] and err["message"]


def test_static_list_invalid_json(env):
    status, body, _ = env["lists_api"].request("POST", "/api/v1/static-lists", data=b"{nope",
                                               headers={"Content-Type": "application/json"})
    assert status == 400


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("path,params", [
    (f"{A1}/recipients", {"sort": "password"}),
    (f"{A1}/recipients", {"sort": "sent_time; DROP TABLE recipients"}),
    (f"{A1}/recipients", {"order": "sideways"}),
    (f"{A1}/recipients", {"limit": "-1"}),
    (f"{A1}/recipients", {"limit": "0"}),
    (f"{A1}/recipients", {"limit": "1001"}),
    (f"{A1}/recipients", {"limit": "ten"}),
    (f"{A1}/recipients", {"offset": "-5"}),
    (f"{A1}/recipients", {"from": "yesterday"}),
    (f"{A1}/recipients", {"from": "2024-13-01"}),
    (f"{A1}/recipients", {"from": "2024-03-02", "to": "2024-03-01"}),
    (f"{A1}/recipients", {"step": "-1"}),
    (f"{A1}/recipients", {"bogus": "1"}),
    (f"{A1}/report", {"from": "2024-03-01T25:00:00Z"}),
    (f"{A1}/report", {"limit": "5"}),
    (f"{A1}/contacts", {"status": "happy"}),
    (f"{A1}/contacts", {"sort": "nope"}),
    (f"{A1}/nodes/x/contacts", {}),
    (f"{A1}/nodes/1/contacts", {"state": "asleep"}),
    (f"{A1}/health", {"older_than": "-3"}),
    ("/api/v1/mailings", {"sort": "nope"}),
    ("/api/v1/mailings/a1:0/recipients", {"status": "lost"}),
    ("/api/v1/mailings/a1:0/recipients", {"sort": "subject"}),
    ("/api/v1/contacts/c01/timeline", {"kind": "weird"}),
])
def test_bad_parameters_are_400(api, path, params):
    body = api.get(path, params, expect=400)
    assert body["error"]["code"] == "bad_request" and body["error"]["message"]


def test_repeated_parameter_is_400(api):
    status, body, _ = api.request("GET", f"{A1}/recipients", params=[("step", "1"), ("step", "2")])
    assert status == 400


@pytest.mark.parametrize("path", [
    "/api/v1/automations/nope", "/api/v1/automations/nope/recipients", "/api/v1/automations/nope/report",
    "/api/v1/automations/nope/report.svg", "/api/v1/automations/nope/contacts",
    "/api/v1/automations/nope/contacts.csv", "/api/v1/automations/nope/nodes/0/contacts",
    "/api/v1/automations/nope/nodes/0/contacts.csv", "/api/v1/automations/nope/health",
    "/api/v1/mailings/nope", "/api/v1/mailings/nope/recipients", "/api/v1/static-lists/nope",
    "/api/v1/contacts/nope/automations", "/api/v1/contacts/nope/timeline", "/api/v1/contacts/nope/messages",
])
def test_unknown_ids_are_404(api, path):
    body = api.get(path, expect=404)
    assert body["error"]["code"] == "not_found"


# ------------------------------------------------------------------ OpenAPI

LEAD_ROUTES = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("POST", "/api/v1/events"),
               ("POST", "/webhooks/{provider}")}


def test_openapi_matches_registered_routes(api):
    registered = set()
    for route in api.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD":
            registered.add((route.method, path))
    documented = {(m.upper(), p) for p, ops in OPENAPI["paths"].items() for m in ops}
    assert registered == {(m, p) for m, p, _ in ROUTES}
    assert documented == registered | LEAD_ROUTES
    served = api.get("/api/v1/openapi.json")
    assert served["openapi"].startswith("3.") and set(served["paths"]) == set(OPENAPI["paths"])
    # every $ref resolves
    import json

    for name in re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(OPENAPI)):
        assert name in OPENAPI["components"]["schemas"], name


def test_openapi_parameters_match_handlers(api):
    """Every documented query parameter is accepted (not a 400 'unknown query parameter')."""
    samples = {"id": "a1", "step_index": "1", "contact_id": "c01"}
    for path, ops in OPENAPI["paths"].items():
        if "get" not in ops or not path.startswith("/api/v1/") or path.endswith("openapi.json"):
            continue
        url = path
        for k, v in samples.items():
            url = url.replace("{" + k + "}", v)
        if "{id}" in url:
            url = url.replace("{id}", "a1:0" if "mailings" in path else "x")
        for p in ops["get"].get("parameters", []):
            if p["in"] != "query":
                continue
            status, body, _ = api.request("GET", url, params={p["name"]: "\x01"})
            assert b"unknown query parameter" not in body, (path, p["name"])


def test_mailings_cover_email_only(env):
    """A LinkedIn or task step is no mailing: mail analytics (seed 003) lists e-mails only."""
    api, client = env["lists_api"], env["lists_client"]
    from sendtrail.clickhouse import TABLE_COLUMNS, insert

    before = api.get("/api/v1/mailings")
    row = {c: None for c in TABLE_COLUMNS["messages"]}
    row.update(message_id="li-1", mailing_id="a2:1", automation_id="a2", run=0, contact_id="c01", step_index=1,
               subject="", sending_user="", sending_email="", email="x@example.com", name="X",
               channel="linkedin_message", status="sent", status_at=F.NOW, sent_at=F.NOW, bounce_class="",
               opens=0, clicks=0, updated_at=F.NOW, _version=1)
    insert(client, "messages", [row], dedup_token="linkedin-row", database=LISTS_DB)
    after = api.get("/api/v1/mailings")
    assert after == before
    assert "a2:1" not in [m["mailing_id"] for m in after["items"]]
    # a mailing id shared by a LinkedIn message and by another automation's message: the e-mails of
    # the selected automation only are counted (a mailing with several kinds of messages is filtered)
    shared = [dict(row, message_id="li-2", mailing_id="a1:0", automation_id="a1", step_index=0),
              dict(row, message_id="other-1", mailing_id="a1:0", automation_id="a2", step_index=0, channel="email",
                   delivered_at=F.NOW)]
    insert(client, "messages", shared, dedup_token="shared-mailing-rows", database=LISTS_DB)
    a10 = next(m for m in before["items"] if m["mailing_id"] == "a1:0")
    mixed = {m["mailing_id"]: m for m in api.get("/api/v1/mailings")["items"]}
    assert mixed["a1:0"]["total_sent"] == a10["total_sent"] + 1  # the other automation's e-mail
    assert mixed["a1:0"]["delivered"] == a10["delivered"] + 1
    of_a1 = {m["mailing_id"]: m for m in api.get("/api/v1/mailings", {"automation_id": "a1"})["items"]}
    assert {k: of_a1["a1:0"][k] for k in F.EXPECTED["mailings"]["a1:0"]} == F.EXPECTED["mailings"]["a1:0"]
    by_sent = api.get("/api/v1/mailings", {"automation_id": "a1", "sort": "total_sent", "order": "desc"})["items"]
    assert (by_sent[0]["mailing_id"], by_sent[0]["total_sent"]) == ("a1:0", F.EXPECTED["mailings"]["a1:0"]["total_sent"])


@pytest.mark.parametrize("fallback", [False, True], ids=["candidates", "final"])
def test_pages_and_totals_over_a_merged_part_and_newer_rows(env, fallback):
    """Contacts, node contacts and health pages take candidates without FINAL and check only the keys
    that have rows outside the largest merged part (queries._latest_page, _latest_count). After a merge,
    newer versions in another part (a waiting node now done, a done node now waiting, a run that changed
    status, an older version written after the merge) must give the same pages and totals as FINAL.
    ``fallback``: every page and total through the queries' own FINAL statements (taken when the
    candidates fall short or too many keys have recent rows, as under a running worker)."""
    from sendtrail.api.queries import Page, Period, Queries, Where, iso
    from sendtrail.clickhouse import insert

    db = "api_merged_final" if fallback else "api_merged"
    client = F.open_database(env["path"], db)
    try:
        F.load_dataset(client, db)
        for table in ("node_states", "enrollments", "messages", "recipients"):
            client.command(f"OPTIMIZE TABLE {db}.{table} FINAL")
        deps = make_deps_for_client(client, db, client_factory=lambda: F.open_database(env["path"], db),
                                    now=lambda: F.NOW.replace(tzinfo=dt.timezone.utc).timestamp())
        q = Queries(deps)
        if fallback:
            q.LATEST_PAGE_MAX_CANDIDATES = 0
            q.LATEST_COUNT_MAX_KEYS = 0
        loop = asyncio.new_event_loop()
        run = loop.run_until_complete

        def final(sql, **params):
            return [tuple(r) for r in client.query(sql, parameters=params).result_rows]

        def check_pages():
            for step in (0, 1, 2):
                for state in ("waiting", "done", "stopped", None):
                    for sort, order in (("at", "ASC"), ("at", "DESC"), ("contact_id", "ASC"), ("state", "DESC")):
                        cond = "state = {s:String}" if state else "state IN ('done', 'waiting', 'filtered', 'stopped')"
                        want = final(f"SELECT contact_id, run, state, at FROM {db}.node_states FINAL "
                                     f"WHERE automation_id = 'a1' AND step_index = {{step:UInt32}} AND {cond} "
                                     f"ORDER BY {sort} {order}, contact_id {order}, run {order}", step=step, s=state)
                        for offset in (0, 2, 5):
                            got = run(q.node_contacts("a1", step, state=state, period=Period(),
                                                      page=Page(2, offset, sort, order), sort_key=sort))
                            assert [(i["contact_id"], i["run"], i["state"], i["state_at"]) for i in got["items"]] == [
                                (c, r, s, iso(a)) for c, r, s, a in want[offset:offset + 2]], (step, state, sort, order)
                            assert got["total"] == len(want)
            for status in (None, "in_progress", "paused", "finished"):
                for sort, order in (("updated_at", "DESC"), ("name", "ASC"), ("status", "DESC"), ("current_step", "ASC")):
                    cond = "AND status = {s:String}" if status else ""
                    want = final(f"SELECT contact_id, run, status, updated_at FROM {db}.enrollments FINAL "
                                 f"WHERE automation_id = 'a1' {cond} ORDER BY {sort} {order}, contact_id {order}, "
                                 f"run {order}", s=status)
                    for offset in (0, 3):
                        got = run(q.contacts("a1", status=status, q=None, run=None, page=Page(3, offset, sort, order)))
                        assert [(i["contact_id"], i["run"], i["status"], i["updated_at"]) for i in got["items"]] == [
                            (c, r, s, iso(u)) for c, r, s, u in want[offset:offset + 3]], (status, sort, order)
                        assert got["total"] == len(want)
            for cutoff in (F.NOW, F.T0 + dt.timedelta(days=5)):
                want = final(f"SELECT contact_id, run, step_index, at FROM {db}.node_states FINAL "
                             "WHERE automation_id = 'a1' AND state = 'waiting' AND at < {c:DateTime64(3, 'UTC')} "
                             "ORDER BY at, contact_id, run, step_index", c=cutoff)
                for offset in (0, 1, 3):
                    got = run(q.health("a1", cutoff=cutoff, page=Page(2, offset)))
                    assert [(s["contact_id"], s["run"], s["step_index"], s["waiting_since"]) for s in got["stuck"]] == [
                        (c, r, k, iso(a)) for c, r, k, a in want[offset:offset + 2]]
                    assert got["stuck_total"] == len(want)

        for table in ("node_states", "enrollments"):  # one merged part: read without FINAL
            assert [level > 0 for _, level, _ in run(q._active_parts(table))] == [True]
        check_pages()
        mrow = next(client.query(f"SELECT * FROM {db}.messages FINAL WHERE mailing_id = 'a1:1' "
                                 "ORDER BY message_id LIMIT 1").named_results())
        insert(client, "messages", [
            dict(mrow, opened_at=F.NOW, clicked_at=F.NOW, delivered_at=mrow["delivered_at"] or F.NOW,
                 status="clicked", _version=mrow["_version"] + 1),                       # newer: 2 more flags
            dict(mrow, message_id="m-new", dropped_at=F.NOW, status="dropped", _version=1),  # a new message
            dict(mrow, message_id="m-new", _version=0),                                   # its older version
        ], dedup_token="merged-messages", database=db)
        late = F.NOW - dt.timedelta(days=1)
        node = dict(automation_id="a1", run=0, at=F.T0 + dt.timedelta(days=1), _version=50)
        insert(client, "node_states", [
            dict(node, contact_id="c03", step_index=2, state="done"),        # was waiting
            dict(node, contact_id="c02", step_index=0, state="waiting"),     # was done
            dict(node, contact_id="c09", step_index=1, state="stopped", at=late),
            dict(node, contact_id="c06", step_index=0, state="done", _version=0),  # older: loses
        ], dedup_token="merged-nodes", database=db)
        F.write_waits(client, db)
        erow = {c: v for c, v in client.query(
            f"SELECT * FROM {db}.enrollments FINAL WHERE contact_id = 'c06'").named_results().__next__().items()}
        insert(client, "enrollments", [dict(erow, status="paused", reason="manual", updated_at=late,
                                            _version=erow["_version"] + 5),
                                       dict(erow, contact_id="c05", status="failed", _version=0)],
               dedup_token="merged-enrollments", database=db)
        for table in ("node_states", "enrollments"):  # a merged part and newer parts: the paths under test
            parts = run(q._active_parts(table))
            assert len(parts) > 1 and any(level > 0 for _, level, _ in parts)
        check_pages()
        want = {r[0]: r[1:] for r in final(
            f"SELECT mailing_id, count(), countIf(delivered_at IS NOT NULL), countIf(opened_at IS NOT NULL), "
            f"countIf(clicked_at IS NOT NULL), countIf(dropped_at IS NOT NULL) FROM {db}.messages FINAL "
            "WHERE channel = 'email' GROUP BY mailing_id")}
        # keys outside L (fallback: more than LATEST_COUNT_MAX_KEYS, so the mailings are counted with FINAL)
        outside = run(q._outside_largest("messages", ("mailing_id", "message_id"), Where()))
        assert outside is None if fallback else outside[1]
        for automation_id, sort in ((None, "date"), (None, "total_sent"), ("a1", "date"), ("a1", "opened")):
            got = run(q.mailings(automation_id=automation_id, step=None, q=None, period=Period(),
                                 page=Page(50, 0, sort, "DESC")))
            assert {m["mailing_id"]: (m["total_sent"], m["delivered"], m["opened"], m["clicked"], m["dropped"])
                    for m in got["items"]} == {k: v for k, v in want.items()
                                               if automation_id is None or k.startswith(automation_id)}
        # after the merge: a replayed recipient row and a new one (a time with milliseconds, replayed as well)
        # in later parts
        replayed, other = client.query(f"SELECT * FROM {db}.recipients FINAL WHERE automation_id = 'a1' "
                                       "ORDER BY message_id LIMIT 2").named_results()
        new = dict(other, message_id="m-late", recipient_id="r-late",
                   sent_time=other["sent_time"] + dt.timedelta(milliseconds=123))
        insert(client, "recipients", [replayed, new], dedup_token=f"late-{db}", database=db)
        insert(client, "recipients", [new], dedup_token=f"late-again-{db}", database=db)  # replayed too
        outside = run(q._outside_largest("recipients", ("sent_time", "message_id"),
                                         Where().add("automation_id = {a:String}", a="a1")))
        assert outside is None if fallback else sorted(k[1] for k in outside[1]) == sorted(
            [replayed["message_id"], "m-late"])
        expected = final(f"SELECT count() FROM {db}.recipients FINAL WHERE automation_id = 'a1'")[0][0]
        assert run(q.automation_detail("a1"))["totals"]["recipients"] == expected == F.EXPECTED["a1_recipients"] + 1
        loop.close()
    finally:
        client.close()


# ------------------------------------------------------------------ report counters (migration 009)

COUNTER_PARTITIONS = 3


def _fill_counters(client, db: str, version: int, *, scale: int = 1, shift: int = 0,
                   partitions: int = COUNTER_PARTITIONS) -> None:
    """The worker's report counters as a worker that counted from the start holds them: one row per (key,
    partition), the partition of a message / contact (cityHash64 of the topic key modulo ``partitions``),
    counted from the latest state (FINAL), at ``_version`` ``version``. ``scale``/``shift`` turn the
    counts into wrong ones (count * scale + shift), for rows that must lose or must not be read."""
    def c(expr: str) -> str:
        return f"toUInt64(({expr}) * {scale} + {shift})"

    flags = ("delivered", "opened", "clicked", "bounced", "dropped", "deferred", "spam_reported", "unsubscribed")
    client.command(
        f"INSERT INTO {db}.mailing_counters (mailing_id, channel, automation_id, step_index, partition, total_sent, "
        "delivered, opened, clicked, bounced, dropped, deferred, spam_reports, unsubscribed, _version) "
        f"SELECT mailing_id, channel, automation_id, step_index, cityHash64(message_id) % {partitions} AS p, "
        f"{c('count()')}, {', '.join(c(f'countIf({f}_at IS NOT NULL)') for f in flags)}, {version} "
        f"FROM {db}.messages FINAL GROUP BY mailing_id, channel, automation_id, step_index, p")
    client.command(
        f"INSERT INTO {db}.node_counters (automation_id, step_index, partition, done, waiting, filtered, stopped, "
        f"_version) SELECT automation_id, step_index, cityHash64(contact_id) % {partitions} AS p, "
        f"{', '.join(c(f'countIf(state = {s!r})') for s in ('done', 'waiting', 'filtered', 'stopped'))}, {version} "
        f"FROM {db}.node_states FINAL GROUP BY automation_id, step_index, p")
    client.command(
        f"INSERT INTO {db}.status_counters (automation_id, status, partition, runs, contacts, ignored_enrollments, "
        "completed, in_progress, not_started, left_runs, _version) "
        f"SELECT automation_id, status, cityHash64(contact_id) % {partitions} AS p, {c('count()')}, "
        f"{c('countIf(run = 0)')}, {c('sum(ignored_enrollments)')}, {c(f'countIf({COMPLETED_RUN})')}, "
        f"{c('countIf(current_step > 0)')}, {c('countIf(current_step = 0)')}, "
        f"{c(f'countIf({LEFT_RUN})')}, {version} "
        f"FROM {db}.enrollments FINAL GROUP BY automation_id, status, p")


def _cover(client, db: str, rows: list[tuple[str, int, int, int]], token: str) -> None:
    """counter_coverage rows (counters table, partition, partitions, _version)."""
    from sendtrail.clickhouse import insert

    insert(client, "counter_coverage", rows, column_names=("counters", "partition", "partitions", "_version"),
           dedup_token=token, database=db)


# (path, query) of every answer that the counters may feed, and of some they must not
_COUNTER_REQUESTS = [
    (A1, None), ("/api/v1/automations/a2", None),
    (f"{A1}/report", None), ("/api/v1/automations/a2/report", None),
    (f"{A1}/report", {"from": "2024-03-06", "to": "2024-03-11"}), (f"{A1}/report.svg", None),
    *[(f"{A1}/contacts", {"limit": 3, "offset": o, **extra}) for o in (0, 3, 50) for extra in (
        {}, {"status": "in_progress"}, {"status": "finished", "sort": "name", "order": "asc"},
        {"status": "failed"}, {"run": 0}, {"q": "example"})],
    *[(f"{A1}/nodes/{step}/contacts", {"limit": 2, "offset": o, **extra}) for step in (0, 1, 2, 7)
      for o in (0, 40) for extra in ({}, {"state": "waiting"}, {"state": "done", "sort": "contact_id"},
                                     {"state": "filtered"}, {"state": "stopped", "sort": "name"},
                                     {"from": "2024-03-06", "to": "2024-03-11"})],
    *[("/api/v1/mailings", {"sort": s, "order": o, **extra})
      for s, o in (("date", "desc"), ("total_sent", "asc"), ("delivered", "desc"), ("opened", "asc"),
                   ("clicked", "desc"), ("bounced", "asc"), ("subject", "asc"), ("mailing_id", "desc"))
      for extra in ({}, {"automation_id": "a1"}, {"automation_id": "a2"}, {"limit": 2, "offset": 1})],
    ("/api/v1/mailings", {"automation_id": "a1", "step": "0"}), ("/api/v1/mailings", {"q": "e"}),
    ("/api/v1/mailings", {"from": "2024-03-03", "to": "2024-03-10", "sort": "opened"}),
    ("/api/v1/mailings/a1:0", None), ("/api/v1/mailings/a1:1", None), ("/api/v1/mailings/a2:0", None),
    ("/api/v1/mailings/zz:9", None), ("/api/v1/mailings.csv", {"sort": "mailing_id", "order": "asc"}),
    *[(f"/api/v1/mailings/{m}/recipients", {"limit": 2, "offset": o, **extra}) for m in ("a1:0", "a1:1")
      for o in (0, 1) for extra in ({}, {"sort": "name", "order": "asc"}, {"sort": "email", "order": "desc"},
                                    {"status": "opened"}, {"q": "example"})],
]
_COUNTER_TABLES = ("mailing_counters", "node_counters", "status_counters")


def test_report_counters_give_the_same_answers(env):
    """Migration 009: the report, automation totals, contact and node-contact totals and the mailings read
    the worker's counters (one row per key and partition, the latest version wins) only once
    counter_coverage covers every partition with one partition count, and then give byte-identical
    answers; with a partition missing, partitions disagreeing on N, or no coverage table they count the
    latest state (wrong counters in the tables then change nothing). Counter rows of zeros (a status, a
    node, a mailing key nothing stands at any more) list nothing that the latest state would not."""
    import dataclasses

    from sendtrail.clickhouse import TABLE_COLUMNS, insert

    db = "api_counters"
    client = F.open_database(env["path"], db)
    sql_log: list[str] = []
    now = lambda: F.NOW.replace(tzinfo=dt.timezone.utc).timestamp()  # noqa: E731
    try:
        F.load_dataset(client, db)
        # a LinkedIn message (no mailing) and an e-mail of a2 under a1's mailing id (a mixed mailing)
        row = {c: None for c in TABLE_COLUMNS["messages"]}
        row.update(message_id="li-1", mailing_id="a1:0", automation_id="a1", run=0, contact_id="c01",
                   step_index=0, subject="", sending_user="", sending_email="", email="x@example.com", name="X",
                   channel="linkedin_message", status="sent", status_at=F.NOW, sent_at=F.NOW, bounce_class="",
                   opens=0, clicks=0, updated_at=F.NOW, _version=1)
        insert(client, "messages", [row, dict(row, message_id="other-1", automation_id="a2", channel="email",
                                              delivered_at=F.NOW)], dedup_token="counters-extra", database=db)
        base = make_deps_for_client(client, db, client_factory=lambda: F.open_database(env["path"], db), now=now)

        async def logged(sql, params):
            sql_log.append(sql)
            return await base.query(sql, params)

        async def logged_columns(sql, params):
            sql_log.append(sql)
            return await base.query_columns(sql, params)

        deps = dataclasses.replace(base, query=logged, query_columns=logged_columns)

        def answers() -> list:
            api = Api(deps)
            try:
                out = []
                for path, params in _COUNTER_REQUESTS:
                    status, body, _ = api.request("GET", path, params=params or {})
                    assert status in (200, 404), (path, params, status, body[:300])
                    out.append((path, params, status, body))
                return out
            finally:
                api.close()

        def counters_read() -> set[str]:
            return {t for t in _COUNTER_TABLES for s in sql_log if f".{t} " in s}

        def assert_same(got, want):
            for g, w in zip(got, want, strict=True):
                assert g == w, (g[:2], g[3][:400], w[3][:400])

        scanned = answers()
        assert not counters_read()
        assert b'"failed"' not in scanned[0][3] and b'"step_index":5' not in scanned[2][3]

        # wrong counters (version 1), coverage of partitions 0 and 2 of 3: not covered, not read
        _fill_counters(client, db, 1, scale=3, shift=1)
        _cover(client, db, [(t, p, COUNTER_PARTITIONS, 1) for t in _COUNTER_TABLES for p in (0, 2)], "cover-0-2")
        sql_log.clear()
        assert_same(answers(), scanned)
        assert not counters_read()
        # partition 1 counted, but with another partition count: the partitions disagree on N
        _cover(client, db, [(t, 1, COUNTER_PARTITIONS + 1, 1) for t in _COUNTER_TABLES], "cover-1-of-4")
        sql_log.clear()
        assert_same(answers(), scanned)
        assert not counters_read()

        # the right counters at a higher version, rows of zeros that must list nothing, then partition 1's
        # coverage with the same N (a newer coverage row): every table covered
        _fill_counters(client, db, 5)
        zeros = 5 * [0]
        insert(client, "status_counters", [("a1", "failed", 1, 2, 1, 0, 0, 0, 0, 2, 3),   # older: loses
                                           ("a1", "failed", 1, *zeros, 0, 0, 6)],
               column_names=TABLE_COLUMNS["status_counters"], dedup_token="status-zeros", database=db)
        insert(client, "node_counters", [("a1", 7, 0, 1, 0, 0, 0, 3), ("a1", 7, 0, 0, 0, 0, 0, 6)],
               column_names=TABLE_COLUMNS["node_counters"], dedup_token="node-zeros", database=db)
        insert(client, "mailing_counters", [("a1:0", "email", "a1", 9, 2, 1, 1, *7 * [0], 3),
                                            ("a1:0", "email", "a1", 9, 2, *9 * [0], 6),
                                            ("a1:7", "email", "a1", 7, 0, *9 * [0], 6)],
                      column_names=TABLE_COLUMNS["mailing_counters"], dedup_token="mailing-zeros", database=db)
        _cover(client, db, [(t, 1, COUNTER_PARTITIONS, 2) for t in _COUNTER_TABLES], "cover-1-of-3")
        sql_log.clear()
        assert_same(answers(), scanned)
        assert counters_read() == set(_COUNTER_TABLES)
        # the report without a period counts no latest state; with a period it does
        counted = [s for s in sql_log if ("node_states" in s and "GROUP BY step_index" in s)
                   or (".enrollments FINAL" in s and "GROUP BY status" in s)]
        assert len(counted) == 2 and all("{p_from:" in s for s in counted)

        # stale rows (a lower version) written after the latest ones, in other parts: they lose
        _fill_counters(client, db, 2, scale=2, shift=3)
        _fill_counters(client, db, 4, scale=0, shift=0)
        sql_log.clear()
        assert_same(answers(), scanned)
        assert counters_read() == set(_COUNTER_TABLES)

        # and wrong counters at the highest version are read indeed (the answers above came from them)
        _fill_counters(client, db, 9, scale=1, shift=1)
        changed = answers()
        assert changed[0] != scanned[0] and changed[2] != scanned[2]
        _fill_counters(client, db, 10)
        assert_same(answers(), scanned)

        # a partition's coverage replaced by one with another N (a repartitioning under way): not covered
        _cover(client, db, [(t, 2, COUNTER_PARTITIONS + 1, 3) for t in _COUNTER_TABLES], "cover-2-of-4")
        _fill_counters(client, db, 11, scale=3, shift=1)
        sql_log.clear()
        assert_same(answers(), scanned)
        assert not counters_read()
        # no coverage table at all (a database before migration 009, or no access): not covered
        client.command(f"DROP TABLE {db}.counter_coverage")
        sql_log.clear()
        assert_same(answers(), scanned)
        assert not counters_read()
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db}")
        client.close()
