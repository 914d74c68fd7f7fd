"""Query-parameter parsing of the report API: strict, with 400s that say what is wrong."""
from __future__ import annotations

import datetime as dt

import pytest
from multidict import MultiDict, MultiDictProxy

from sendtrail.api import queries as Q
from sendtrail.api.errors import ApiError, BadRequest, NotFound
from sendtrail.api.routes import ROUTES, Params, parse_int, parse_time
from sendtrail.api.static_lists import validate_create

UTC = dt.timezone.utc


def P(allowed, **values):
    return Params(MultiDictProxy(MultiDict(values)), allowed)


def test_page_defaults():
    page, key = P(("limit", "offset", "sort", "order")).page(Q.RECIPIENT_SORTS, "sent_time")
    assert (page.limit, page.offset, page.sort, page.order, key) == (50, 0, "sent_time", "DESC", "sent_time")


def test_page_values():
    page, key = P(("limit", "offset", "sort", "order"), limit="1000", offset="20", sort="user_name",
                  order="asc").page(Q.RECIPIENT_SORTS, "sent_time")
    assert (page.limit, page.offset, page.sort, page.order, key) == (1000, 20, "user_name", "ASC", "user_name")


@pytest.mark.parametrize("name,value", [
    ("limit", "-1"), ("limit", "0"), ("limit", "1001"), ("limit", "1.5"), ("limit", "ten"), ("limit", "1e3"),
    ("offset", "-1"), ("offset", "x"), ("sort", "password"), ("sort", "sent_time desc"),
    ("sort", "sent_time; DROP TABLE recipients"), ("order", "ASC "), ("order", "random"),
])
def test_page_rejects(name, value):
    with pytest.raises(BadRequest) as err:
        P(("limit", "offset", "sort", "order"), **{name: value}).page(Q.RECIPIENT_SORTS, "sent_time")
    assert name in err.value.message
    assert err.value.status == 400 and err.value.code == "bad_request"


def test_sort_values_come_from_the_allowlist_only():
    for sorts in (Q.RECIPIENT_SORTS, Q.CONTACT_SORTS, Q.MAILING_SORTS, Q.MAILING_RECIPIENT_SORTS,
                  Q.NODE_CONTACT_SORTS, Q.AUTOMATION_SORTS, Q.MESSAGE_SORTS):
        for key, expr in sorts.items():
            page, _ = P(("sort",), sort=key).page(sorts, key)
            assert page.sort == expr


def test_unknown_and_repeated_parameters():
    with pytest.raises(BadRequest, match="unknown query parameter 'sortby'"):
        P(("sort",), sortby="x")
    with pytest.raises(BadRequest, match="more than once"):
        Params(MultiDictProxy(MultiDict([("step", "1"), ("step", "2")])), ("step",))


def test_empty_value_is_absent():
    assert P(("step",), step="").integer("step", None) is None


@pytest.mark.parametrize("raw,expected", [
    ("2024-05-01", dt.datetime(2024, 5, 1, tzinfo=UTC)),
    ("2024-05-01T10:00:00Z", dt.datetime(2024, 5, 1, 10, tzinfo=UTC)),
    ("2024-05-01T10:00:00z", dt.datetime(2024, 5, 1, 10, tzinfo=UTC)),
    ("2024-05-01T12:00:00+02:00", dt.datetime(2024, 5, 1, 10, tzinfo=UTC)),
    ("2024-05-01 10:00", dt.datetime(2024, 5, 1, 10, tzinfo=UTC)),
    ("2024-05-01T10:00:00.123456789Z", dt.datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)),
    ("2024-05-01T10:00:00", dt.datetime(2024, 5, 1, 10, tzinfo=UTC)),
])
def test_parse_time(raw, expected):
    assert parse_time("from", raw) == expected


@pytest.mark.parametrize("raw", ["yesterday", "2024-13-01", "2024-02-30", "2024-05-01T25:00:00Z", "1714557600",
                                 "2024-05-01T10:00:00+25:00", "1969-12-31", "2300-01-01", "2024-05-01'; --"])
def test_parse_time_rejects(raw):
    with pytest.raises(BadRequest):
        parse_time("from", raw)


def test_period():
    p = P(("from", "to"), **{"from": "2024-05-01", "to": "2024-05-02"}).period()
    assert p.start == dt.datetime(2024, 5, 1, tzinfo=UTC) and p.end == dt.datetime(2024, 5, 2, tzinfo=UTC)
    with pytest.raises(BadRequest, match="later"):
        P(("from", "to"), **{"from": "2024-05-02", "to": "2024-05-01"}).period()
    with pytest.raises(BadRequest, match="later"):
        P(("from", "to"), **{"from": "2024-05-01", "to": "2024-05-01"}).period()
    assert P(("from", "to")).period() == Q.Period()


def test_period_where_uses_parameters():
    w = Q.Period(dt.datetime(2024, 5, 1, tzinfo=UTC), None).apply(Q.Where(), "sent_time")
    assert w.sql() == "WHERE sent_time >= {p_from:DateTime64(3, 'UTC')}"
    assert w.params == {"p_from": "2024-05-01 00:00:00.000"}


def test_parse_int():
    assert parse_int("step", "3", None, 0, 10) == 3
    assert parse_int("step", None, 7, 0, 10) == 7
    for bad in ("-1", "11", "3.0", "0x1", "", " "):
        with pytest.raises(BadRequest):
            parse_int("step", bad, None, 0, 10)


def test_choice_and_text():
    p = P(("status", "q"), status="paused", q="a" * 201)
    assert p.choice("status", Q.AUTOMATION_STATUSES) == "paused"
    with pytest.raises(BadRequest, match="longer"):
        p.text("q")
    with pytest.raises(BadRequest, match="control"):
        P(("q",), q="a\x00b").text("q")
    with pytest.raises(BadRequest, match="one of"):
        P(("status",), status="gone").choice("status", Q.AUTOMATION_STATUSES)


def test_api_errors():
    e = ApiError(413, "payload_too_large", "too big")
    assert (e.status, e.code, e.message) == (413, "payload_too_large", "too big")
    assert BadRequest("x").to_dict() == {"error": {"code": "bad_request", "message": "x"}}
    assert NotFound("y").status == 404
    assert ApiError("z", status=409, code="conflict").to_response().status == 409


@pytest.mark.parametrize("body,match", [
    (None, "JSON object"),
    ({"automation_id": "a"}, "name"),
    ({"name": "  ", "automation_id": "a"}, "name"),
    ({"name": "x" * 201, "automation_id": "a"}, "longer"),
    ({"name": "n"}, "automation_id"),
    ({"name": "n", "automation_id": "a", "step_index": "1"}, "step_index"),
    ({"name": "n", "automation_id": "a", "step_index": True}, "step_index"),
    ({"name": "n", "automation_id": "a", "state": "done"}, "needs step_index"),
    ({"name": "n", "automation_id": "a", "step_index": 0, "state": "asleep"}, "state"),
    ({"name": "n", "automation_id": "a", "status": "happy"}, "status"),
    ({"name": "n", "automation_id": "a", "x": 1}, "unknown"),
])
def test_static_list_validation(body, match):
    with pytest.raises(BadRequest, match=match):
        validate_create(body)


def test_static_list_validation_ok():
    assert validate_create({"name": " Done ", "automation_id": "a", "step_index": 2, "state": "done"}) == {
        "name": "Done", "automation_id": "a", "step_index": 2, "state": "done", "status": None}


def test_routes_table_is_unique():
    keys = [(m, p) for m, p, _ in ROUTES]
    assert len(keys) == len(set(keys))
    # literal .csv routes are registered before the {id} route they would otherwise match
    paths = [p for _, p, _ in ROUTES]
    assert paths.index("/api/v1/static-lists/{id}.csv") < paths.index("/api/v1/static-lists/{id}")
