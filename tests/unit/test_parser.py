"""Unit tests of schemas.parser (the event contract of SPEC section 2)."""
from __future__ import annotations

import copy
from datetime import datetime, timezone

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.events import EVENT_TYPES, EVENTS, TIMESTAMP_FIELDS
from schemas.examples import EXAMPLES
from schemas.parser import (
    REASONS,
    Rejection,
    parse_event,
    parse_object,
    parse_timestamp,
    to_rfc3339,
)
from schemas.topics import TOPICS, accepts, base_name, topic_for_type, topic_names


def raw(obj) -> bytes:
    return orjson.dumps(obj)


def example(t: str, **changes) -> dict:
    e = copy.deepcopy(EXAMPLES[t])
    for k, v in changes.items():
        if v is _DELETE:
            e.pop(k, None)
        else:
            e[k] = v
    return e


_DELETE = object()


def rejected(obj_or_bytes, reason: str, field: str | None = "", **kw) -> Rejection:
    data = obj_or_bytes if isinstance(obj_or_bytes, (bytes, str)) else raw(obj_or_bytes)
    r = parse_event(data, **kw)
    assert isinstance(r, Rejection), r
    assert r.reason == reason, r
    if field != "":
        assert r.field == field, r
    assert r.reason in REASONS
    assert r.detail
    return r


def ms(y, mo, d, h=0, mi=0, s=0, milli=0) -> int:
    return int(datetime(y, mo, d, h, mi, s, tzinfo=timezone.utc).timestamp()) * 1000 + milli


# -------------------------------------------------------------------- valid


def test_examples_cover_every_type():
    assert set(EXAMPLES) == set(EVENTS)
    for t, e in EXAMPLES.items():
        assert e["type"] == t


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_accepts_example_of_every_type(event_type):
    e = EXAMPLES[event_type]
    out = parse_event(raw(e))
    assert isinstance(out, dict), out
    assert out["type"] == event_type
    assert out["event_id"] == e["event_id"]
    assert out["schema_version"] == 1
    for name in TIMESTAMP_FIELDS:
        if out.get(name) is not None:
            assert type(out[name]) is int
    # every defined field is present in the output (defaults filled)
    for f in EVENTS[event_type].all_fields:
        assert f.name in out, f.name
    # also on its own topic, bare and prefixed
    topic = EVENTS[event_type].topic
    assert isinstance(parse_event(raw(e), topic=topic), dict)
    assert isinstance(parse_event(raw(e), topic="sendtrail." + topic), dict)
    assert isinstance(parse_event(raw(e), topic="acme-" + topic), dict)


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_parse_object_matches_parse_event_and_does_not_mutate(event_type):
    e = copy.deepcopy(EXAMPLES[event_type])
    before = copy.deepcopy(e)
    out = parse_object(e)
    assert e == before
    assert out == parse_event(raw(e))


def test_input_types_accepted():
    assert isinstance(parse_event(bytearray(raw(EXAMPLES["contact.removed"]))), dict)
    assert isinstance(parse_event(memoryview(raw(EXAMPLES["contact.removed"]))), dict)
    assert isinstance(parse_event(raw(EXAMPLES["contact.removed"]).decode()), dict)


def test_minimal_events_get_defaults():
    out = parse_event(
        raw(
            {
                "event_id": "e1",
                "type": "step.sent",
                "occurred_at": "2024-05-01T10:00:00Z",
                "automation_id": "a1",
                "contact_id": "c1",
                "step_index": 2,
                "message_id": "m1",
            }
        )
    )
    assert isinstance(out, dict), out
    assert out["schema_version"] == 1
    assert out["channel"] == "email"
    assert out["mailing_id"] == "a1:2"
    assert out["subject"] is None
    assert out["sending_user"] is None
    assert out["sending_email"] is None
    assert out["step_details"] == {}
    assert out["metadata"] == {}

    # explicit null mailing_id also gets the computed default
    e = example("step.sent", mailing_id=None)
    assert parse_event(raw(e))["mailing_id"] == "auto-1:0"
    assert parse_event(raw(example("step.sent", mailing_id="m-9")))["mailing_id"] == "m-9"

    out = parse_event(
        raw(
            {
                "event_id": "e2",
                "type": "contact.enrolled",
                "occurred_at": "2024-05-01T10:00:00Z",
                "automation_id": "a1",
                "contact_id": "c1",
                "user_id": "u1",
                "name": "N",
                "email": "n@example.com",
            }
        )
    )
    assert isinstance(out, dict), out
    assert out["company"] is None
    assert out["attributes"] == {}
    assert out["needs_enrichment"] is False

    base = {"event_id": "e", "occurred_at": "2024-05-01T10:00:00Z", "automation_id": "a", "contact_id": "c"}
    assert parse_event(raw({**base, "type": "contact.canceled"}))["reason"] == "manual"
    paused = parse_event(raw({**base, "type": "contact.paused", "reason": "manual"}))
    assert paused["resume_at"] is None
    msg = {"event_id": "e", "occurred_at": "2024-05-01T10:00:00Z", "message_id": "m", "email": "a@b", "provider": "ses"}
    out = parse_event(raw({**msg, "type": "message.bounced", "bounce_class": "soft"}))
    assert out["reason"] is None and out["automation_id"] is None
    assert out["contact_id"] is None and out["step_index"] is None
    assert parse_event(raw({**msg, "type": "message.auto_replied"}))["return_at"] is None
    assert parse_event(raw({**msg, "type": "message.deferred"}))["reason"] is None
    pub = example("automation.published", description=_DELETE, end_at=_DELETE)
    out = parse_event(raw(pub))
    assert out["description"] is None and out["end_at"] is None


def test_default_containers_are_fresh():
    base = {
        "event_id": "e",
        "type": "step.sent",
        "occurred_at": "2024-05-01T10:00:00Z",
        "automation_id": "a",
        "contact_id": "c",
        "step_index": 0,
        "message_id": "m",
    }
    a = parse_event(raw(base))
    a["metadata"]["x"] = 1
    a["step_details"]["day"] = 3
    b = parse_event(raw(base))
    assert b["metadata"] == {} and b["step_details"] == {}


def test_timestamps_converted():
    e = example(
        "automation.published",
        occurred_at="2024-05-01T12:00:00+02:00",
        start_at="2024-05-01T00:00:00.5-01:30",
        end_at="2024-06-01T00:00:00.123456789Z",
    )
    out = parse_event(raw(e))
    assert out["occurred_at"] == ms(2024, 5, 1, 10) == 1714557600000
    assert out["start_at"] == ms(2024, 5, 1, 1, 30, 0, 500)
    assert out["end_at"] == ms(2024, 6, 1, 0, 0, 0, 123)
    out = parse_event(raw(EXAMPLES["contact.paused"]))
    assert out["resume_at"] == ms(2024, 5, 8, 7)
    out = parse_event(raw(EXAMPLES["step.scheduled"]))
    assert out["due_at"] == ms(2024, 5, 2, 10)
    out = parse_event(raw(EXAMPLES["message.auto_replied"]))
    assert out["return_at"] == ms(2024, 5, 10, 8)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("2024-05-01T10:00:00Z", 1714557600000),
        ("2024-05-01T12:00:00+02:00", 1714557600000),
        ("2024-05-01T05:30:00-04:30", 1714557600000),
        ("2024-05-01t10:00:00z", 1714557600000),
        ("2024-05-01 10:00:00Z", 1714557600000),
        ("2024-05-01T10:00:00.999Z", 1714557600999),
        ("2024-05-01T10:00:00.9999Z", 1714557600999),
        ("2024-05-01T10:00:00.1+00:00", 1714557600100),
        ("1969-12-31T23:59:59.999Z", -1),
        ("1970-01-01T00:00:00+01:00", -3600000),
        ("2016-12-31T23:59:60Z", ms(2017, 1, 1)),
        ("2024-02-29T00:00:00Z", ms(2024, 2, 29)),
    ],
)
def test_parse_timestamp_valid(text, expected):
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "2024-05-01T10:00:00",  # naive
        "2024-05-01",
        "2024-05-01T10:00Z",
        "20240501T100000Z",
        "2024-05-01T10:00:00+0200",
        "2024-05-01T10:00:00+02",
        "2024-02-30T00:00:00Z",
        "2023-02-29T00:00:00Z",
        "2024-05-01T24:00:00Z",
        "2024-05-01T10:60:00Z",
        "2024-05-01T10:00:61Z",
        "2024-05-01T10:00:00+24:00",
        "2024-13-01T10:00:00Z",
        "2024-05-01T10:00:00.Z",
        "２０２４-05-01T10:00:00Z",
        " 2024-05-01T10:00:00Z",
        "2024-05-01T10:00:00Z ",
        "1899-12-31T23:59:59Z",
        "2300-01-01T00:00:00Z",
        "",
        "yesterday",
    ],
)
def test_parse_timestamp_invalid(text):
    assert parse_timestamp(text) is None
    rejected(example("contact.removed", occurred_at=text), "bad_timestamp", "occurred_at")


def test_parse_timestamp_non_strings():
    for v in (None, 1714557600, 1.5, [], {}, True):
        assert parse_timestamp(v) is None


def test_to_rfc3339_roundtrip():
    assert to_rfc3339(1714557600000) == "2024-05-01T10:00:00.000Z"
    assert to_rfc3339(1714557600123) == "2024-05-01T10:00:00.123Z"
    assert to_rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert to_rfc3339(-1) == "1969-12-31T23:59:59.999Z"
    for m in (0, 1, 999, 1714557600123, -2208988800000, 10413791999999):
        assert parse_timestamp(to_rfc3339(m)) == m


@given(st.integers(min_value=-2208988800000, max_value=10413791999999))
def test_to_rfc3339_roundtrip_property(m):
    assert parse_timestamp(to_rfc3339(m)) == m


def test_extra_fields_preserved():
    e = example("message.clicked", x_custom={"a": [1, 2]}, tags=["a"], campaign=None)
    out = parse_event(raw(e))
    assert out["x_custom"] == {"a": [1, 2]}
    assert out["tags"] == ["a"]
    assert "campaign" in out and out["campaign"] is None
    e = example("automation.published")
    e["steps"][0]["extra"] = "kept"
    out = parse_event(raw(e))
    assert out["steps"][0]["extra"] == "kept"


def test_steps_returned_sorted_by_index():
    e = example("automation.published")
    e["steps"] = list(reversed(e["steps"]))
    out = parse_event(raw(e))
    assert [s["index"] for s in out["steps"]] == [0, 1, 2]


# -------------------------------------------------------------------- rejections


def test_rejects_non_json():
    rejected(b"{not json", "invalid_json", None)
    rejected(b"", "invalid_json", None)
    rejected(b"\xff\xfe\x00", "invalid_json", None)
    rejected(b'{"a": NaN}', "invalid_json", None)
    r = parse_event(None)
    assert isinstance(r, Rejection) and r.reason == "invalid_json"
    r = parse_event(12345)  # type: ignore[arg-type]
    assert isinstance(r, Rejection) and r.reason == "invalid_json"


@pytest.mark.parametrize("payload", [b"[]", b"[1,2]", b'"x"', b"1", b"null", b"true", b"1.5"])
def test_rejects_non_object(payload):
    rejected(payload, "not_an_object", None)
    r = parse_object(orjson.loads(payload))
    assert isinstance(r, Rejection) and r.reason == "not_an_object"


def test_rejects_missing_type():
    rejected(example("contact.removed", type=_DELETE), "missing_type", "type")
    rejected(example("contact.removed", type=None), "missing_type", "type")


def test_rejects_type_not_a_string():
    rejected(example("contact.removed", type=["contact.removed"]), "wrong_type", "type")
    rejected(example("contact.removed", type={"a": 1}), "wrong_type", "type")
    rejected(example("contact.removed", type=7), "wrong_type", "type")


def test_rejects_unknown_type():
    rejected(example("contact.removed", type="contact.teleported"), "unknown_type", "type")
    rejected(example("contact.removed", type=""), "unknown_type", "type")
    rejected(example("contact.removed", type="CONTACT.REMOVED"), "unknown_type", "type")


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_rejects_missing_required_field(event_type):
    for f in EVENTS[event_type].all_fields:
        if not f.required:
            continue
        e = example(event_type, **{f.name: _DELETE})
        expected = "missing_type" if f.name == "type" else "missing_field"
        rejected(e, expected, f.name)


def test_rejects_null_for_required_field():
    rejected(example("contact.enrolled", email=None), "wrong_type", "email")
    rejected(example("step.sent", step_index=None), "wrong_type", "step_index")
    rejected(example("contact.removed", occurred_at=None), "wrong_type", "occurred_at")


def test_rejects_wrong_type():
    rejected(example("contact.removed", contact_id=42), "wrong_type", "contact_id")
    rejected(example("step.sent", step_index="0"), "wrong_type", "step_index")
    rejected(example("step.sent", step_index=1.0), "wrong_type", "step_index")
    rejected(example("step.sent", metadata=[1]), "wrong_type", "metadata")
    rejected(example("step.sent", step_details="day 1"), "wrong_type", "step_details")
    rejected(example("step.sent", step_details={"day": "1"}), "wrong_type", "step_details.day")
    rejected(example("contact.enrolled", attributes="x"), "wrong_type", "attributes")
    rejected(example("contact.enrolled", needs_enrichment="yes"), "wrong_type", "needs_enrichment")
    rejected(example("contact.enrolled", needs_enrichment=1), "wrong_type", "needs_enrichment")
    rejected(example("automation.published", steps={"0": {}}), "wrong_type", "steps")
    rejected(example("automation.published", steps=[1]), "wrong_type", "steps[0]")
    rejected(example("contact.removed", occurred_at=1714557600000), "wrong_type", "occurred_at")
    rejected(example("contact.removed", event_id=["e"]), "wrong_type", "event_id")
    rejected(example("message.bounced", bounce_class=1), "wrong_type", "bounce_class")


def test_rejects_bool_as_int():
    rejected(example("step.sent", step_index=True), "wrong_type", "step_index")
    rejected(example("step.sent", step_index=False), "wrong_type", "step_index")
    rejected(example("message.opened", step_index=True), "wrong_type", "step_index")
    rejected(example("automation.published", version=True), "wrong_type", "version")
    rejected(example("contact.removed", schema_version=True), "wrong_type", "schema_version")
    e = example("automation.published")
    e["steps"][1]["index"] = True
    rejected(e, "wrong_type", "steps[1].index")
    rejected(example("step.sent", step_details={"day": True}), "wrong_type", "step_details.day")


def test_rejects_bad_enum():
    rejected(example("automation.published", participation="twice"), "bad_enum", "participation")
    rejected(example("contact.limit_reached", limit="daily"), "bad_enum", "limit")
    rejected(example("contact.finished", reason="bored"), "bad_enum", "reason")
    rejected(example("message.bounced", bounce_class="HARD"), "bad_enum", "bounce_class")
    e = example("automation.published")
    e["steps"][2]["kind"] = "sms"
    rejected(e, "bad_enum", "steps[2].kind")


def test_rejects_bad_values():
    rejected(example("step.sent", step_index=-1), "bad_value", "step_index")
    rejected(example("step.sent", step_index=2**31), "bad_value", "step_index")
    rejected(example("contact.removed", event_id=""), "bad_value", "event_id")
    rejected(example("contact.removed", event_id="x" * 201), "bad_value", "event_id")
    assert isinstance(parse_event(raw(example("contact.removed", event_id="x" * 200))), dict)
    rejected(example("contact.removed", contact_id=""), "bad_value", "contact_id")
    rejected(example("contact.enrolled", email="not-an-email"), "bad_value", "email")
    rejected(example("message.opened", email="nobody"), "bad_value", "email")
    rejected(example("step.sent", sending_email="nobody"), "bad_value", "sending_email")
    rejected(example("step.sent", mailing_id=""), "bad_value", "mailing_id")
    rejected(example("automation.published", steps=[]), "bad_value", "steps")
    rejected(example("contact.failed", reason=""), "bad_value", "reason")
    e = example("automation.published")
    e["steps"][2]["index"] = 0
    r = rejected(e, "bad_value", "steps[2].index")
    assert "more than once" in r.detail
    e = example("automation.published")
    e["steps"][0]["day"] = -3
    rejected(e, "bad_value", "steps[0].day")
    e = example("automation.published")
    del e["steps"][0]["kind"]
    rejected(e, "missing_field", "steps[0].kind")
    rejected(example("step.sent", step_details={"inactive_days": -1}), "bad_value", "step_details.inactive_days")


def test_rejects_oversized_payload():
    e = example("contact.enrolled", attributes={"blob": "x" * 300_000})
    rejected(e, "too_large", None)
    small = raw(EXAMPLES["contact.removed"])
    rejected(small, "too_large", None, max_bytes=len(small) - 1)
    assert isinstance(parse_event(small, max_bytes=len(small)), dict)


def test_rejects_wrong_topic():
    r = rejected(EXAMPLES["step.sent"], "wrong_topic", "type", topic="enrollments")
    assert "enrollments" in r.detail
    rejected(EXAMPLES["contact.enrolled"], "wrong_topic", "type", topic="sendtrail.sends")
    rejected(EXAMPLES["message.opened"], "wrong_topic", "type", topic="automations")
    rejected(EXAMPLES["automation.published"], "wrong_topic", "type", topic="x.provider-events")
    r = parse_object(EXAMPLES["step.sent"], topic="enrollments")
    assert isinstance(r, Rejection) and r.reason == "wrong_topic"
    # a topic that is not an input topic is a programming error
    with pytest.raises(ValueError):
        parse_event(raw(EXAMPLES["step.sent"]), topic="sendtrail.status-changes")
    with pytest.raises(ValueError):
        parse_event(raw(EXAMPLES["step.sent"]), topic="nonsense")


def test_schema_version():
    assert parse_event(raw(example("contact.removed", schema_version=_DELETE)))["schema_version"] == 1
    assert parse_event(raw(example("contact.removed", schema_version=None)))["schema_version"] == 1
    assert parse_event(raw(example("contact.removed", schema_version=1)))["schema_version"] == 1
    rejected(example("contact.removed", schema_version=2), "unsupported_schema_version", "schema_version")
    # a newer version wins over an unknown type: it may be a type of that version
    rejected(
        example("contact.removed", schema_version=3, type="contact.teleported"),
        "unsupported_schema_version",
        "schema_version",
    )
    rejected(example("contact.removed", schema_version=0), "bad_value", "schema_version")
    rejected(example("contact.removed", schema_version=-1), "bad_value", "schema_version")
    rejected(example("contact.removed", schema_version="1"), "wrong_type", "schema_version")
    rejected(example("contact.removed", schema_version=1.0), "wrong_type", "schema_version")


def test_rejection_shape():
    r = rejected(example("contact.removed", contact_id=1), "wrong_type", "contact_id")
    assert "contact_id" in r.detail
    assert r.to_dict() == {"reason": "wrong_type", "detail": r.detail, "field": "contact_id"}
    with pytest.raises(AttributeError):
        r.reason = "x"  # type: ignore[misc]
    assert len(set(REASONS)) == 12


# -------------------------------------------------------------------- topics


def test_topics():
    names = topic_names("sendtrail.")
    assert names == {
        "automations": "sendtrail.automations",
        "enrollments": "sendtrail.enrollments",
        "sends": "sendtrail.sends",
        "provider-events": "sendtrail.provider-events",
        "status-changes": "sendtrail.status-changes",
        "dead-letters": "sendtrail.dead-letters",
        "internal.to-contacts": "sendtrail.internal.to-contacts",
        "internal.to-messages": "sendtrail.internal.to-messages",
    }
    assert topic_names("")["sends"] == "sends"
    assert TOPICS["automations"].cleanup_policy == "compact"
    assert TOPICS["automations"].key == "automation_id"
    assert TOPICS["enrollments"].key == "contact_id"
    assert TOPICS["sends"].key == "contact_id"
    assert TOPICS["provider-events"].key == "message_id"
    assert TOPICS["status-changes"].key == "contact_id"
    assert TOPICS["internal.to-contacts"].key == "contact_id"
    assert TOPICS["internal.to-messages"].key == "message_id"
    assert TOPICS["internal.to-contacts"].internal
    for t, et in EVENTS.items():
        assert topic_for_type(t) == et.topic
        assert accepts(et.topic, t)
        assert accepts("sendtrail." + et.topic, t)
        # the example's key field exists
        assert EXAMPLES[t][TOPICS[et.topic].key]
    assert topic_for_type("nope") is None
    assert base_name("p.internal.to-contacts") == "internal.to-contacts"
    assert base_name("whatever") is None


# -------------------------------------------------------------------- properties

_json_leaf = st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    _json_leaf,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def _check_result(r):
    assert isinstance(r, (dict, Rejection))
    if isinstance(r, Rejection):
        assert r.reason in REASONS
        assert isinstance(r.detail, str) and r.detail
    return r


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data):
    _check_result(parse_event(data))
    _check_result(parse_event(data, topic="sends", max_bytes=64))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=20), json_values, max_size=8), st.sampled_from(EVENT_TYPES + ("bogus",)))
def test_random_json_objects_never_raise(obj, t):
    _check_result(parse_object(obj))
    _check_result(parse_event(orjson.dumps(obj)))
    obj2 = dict(obj, type=t)
    _check_result(parse_object(obj2))
    _check_result(parse_event(orjson.dumps(obj2), topic="provider-events"))


def _all_paths(event_type):
    paths = [(f.name,) for f in EVENTS[event_type].all_fields]
    e = EXAMPLES[event_type]
    for k, v in e.items():
        if isinstance(v, dict):
            paths += [(k, kk) for kk in v]
        if isinstance(v, list):
            for i, item in enumerate(v):
                paths.append((k, i))
                if isinstance(item, dict):
                    paths += [(k, i, kk) for kk in item]
    return paths


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutating_one_field_gives_event_or_rejection(data):
    t = data.draw(st.sampled_from(EVENT_TYPES))
    path = data.draw(st.sampled_from(_all_paths(t)))
    value = data.draw(json_values)
    e = copy.deepcopy(EXAMPLES[t])
    target = e
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    r1 = _check_result(parse_event(orjson.dumps(e), topic=EVENTS[t].topic))
    r2 = _check_result(parse_object(e, topic=EVENTS[t].topic))
    assert r1 == r2
    if isinstance(r1, dict):
        # whatever got through is well-formed
        assert r1["type"] in EVENTS
        for name in TIMESTAMP_FIELDS:
            if name in r1 and r1[name] is not None and name in {f.name for f in EVENTS[r1["type"]].all_fields}:
                assert type(r1[name]) is int
        assert isinstance(r1["event_id"], str) and r1["event_id"]


@settings(max_examples=200)
@given(st.data())
def test_deleting_one_field_gives_event_or_rejection(data):
    t = data.draw(st.sampled_from(EVENT_TYPES))
    e = copy.deepcopy(EXAMPLES[t])
    key = data.draw(st.sampled_from(sorted(e)))
    del e[key]
    r = _check_result(parse_event(orjson.dumps(e)))
    f = next((f for f in EVENTS[t].all_fields if f.name == key), None)
    if f is not None and f.required:
        assert isinstance(r, Rejection)
    else:
        assert isinstance(r, dict)


def test_step_indexes_must_run_from_zero_without_gaps():
    import copy

    from schemas.examples import EXAMPLES
    from schemas.parser import Rejection, parse_object

    ev = copy.deepcopy(EXAMPLES["automation.published"])
    ev["steps"] = [dict(ev["steps"][0], index=0), dict(ev["steps"][0], index=2)]
    res = parse_object(ev)
    assert isinstance(res, Rejection) and res.reason == "bad_value" and "without gaps" in res.detail
    ev["steps"] = [dict(ev["steps"][0], index=1), dict(ev["steps"][0], index=0)]
    ok = parse_object(ev)
    assert not isinstance(ok, Rejection) and [s["index"] for s in ok["steps"]] == [0, 1]
