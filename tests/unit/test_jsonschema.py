"""The committed JSON Schema matches the definitions and agrees with the parser.

No ``jsonschema`` dependency: a tiny checker below covers the keywords the
generator emits (and fails loudly on any other).
"""
from __future__ import annotations

import copy
import json
import re
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.events import EVENT_TYPES, EVENTS
from schemas.examples import EXAMPLES
from schemas.jsonschema import SCHEMA_PATH, generate, main, render
from schemas.parser import Rejection, parse_event

_KNOWN = {
    "$schema", "$id", "title", "description", "default", "format",
    "$ref", "$defs", "oneOf", "type", "const", "enum", "required", "properties",
    "additionalProperties", "items", "minItems", "minLength", "maxLength",
    "pattern", "minimum", "maximum",
}  # fmt: skip

_TYPES = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def errors(schema: dict, value: Any, root: dict, path: str = "$") -> list[str]:
    """A minimal draft 2020-12 checker for the keywords in events.schema.json."""
    unknown = set(schema) - _KNOWN
    assert not unknown, f"checker does not know {unknown}"
    out: list[str] = []
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/")
        out += errors(root["$defs"][ref[len("#/$defs/") :]], value, root, path)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            return out + [f"{path}: not {types}"]
    if "const" in schema and not (value == schema["const"] and type(value) is type(schema["const"])):
        out.append(f"{path}: not const {schema['const']!r}")
    if "enum" in schema and not any(value == e and type(value) is type(e) for e in schema["enum"]):
        out.append(f"{path}: not in enum")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            out.append(f"{path}: too short")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            out.append(f"{path}: too long")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            out.append(f"{path}: pattern")
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{path}: below minimum")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{path}: above maximum")
    if isinstance(value, dict):
        for r in schema.get("required", []):
            if r not in value:
                out.append(f"{path}: missing {r}")
        for k, sub in schema.get("properties", {}).items():
            if k in value:
                out += errors(sub, value[k], root, f"{path}.{k}")
        assert schema.get("additionalProperties", True) is True
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            out.append(f"{path}: too few items")
        if "items" in schema:
            for i, item in enumerate(value):
                out += errors(schema["items"], item, root, f"{path}[{i}]")
    if "oneOf" in schema:
        ok = sum(1 for s in schema["oneOf"] if not errors(s, value, root, path))
        if ok != 1:
            out.append(f"{path}: matches {ok} of oneOf")
    return out


SCHEMA = generate()


def valid(value: Any) -> bool:
    return not errors(SCHEMA, value, SCHEMA)


def test_committed_file_is_fresh(tmp_path):
    committed = SCHEMA_PATH.read_text(encoding="utf-8")
    assert committed == render(), "run: python -m schemas.jsonschema"
    assert json.loads(committed) == SCHEMA
    out = tmp_path / "s.json"
    assert main([str(out)]) == 0
    assert out.read_text(encoding="utf-8") == committed


def test_document_structure():
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert [b["$ref"] for b in SCHEMA["oneOf"]] == [f"#/$defs/{t}" for t in EVENT_TYPES]
    assert list(SCHEMA["$defs"]) == list(EVENT_TYPES)
    for t, et in EVENTS.items():
        d = SCHEMA["$defs"][t]
        assert d["type"] == "object"
        assert d["additionalProperties"] is True
        assert d["properties"]["type"] == {"const": t, "description": d["properties"]["type"]["description"]}
        assert d["required"] == [f.name for f in et.all_fields if f.required]
        assert list(d["properties"]) == [f.name for f in et.all_fields]
        for f in et.all_fields:
            p = d["properties"][f.name]
            if f.name == "type":
                continue
            if f.nullable:
                assert "null" in p["type"], (t, f.name)
            if f.kind == "enum":
                assert [v for v in p["enum"] if v is not None] == list(f.values)
            if f.kind == "timestamp":
                assert p["format"] == "date-time"
            if not f.required and f.default_from is None:
                assert p["default"] == f.default


def test_common_required_fields():
    for t in EVENT_TYPES:
        req = SCHEMA["$defs"][t]["required"]
        assert req[:3] == ["event_id", "type", "occurred_at"]
        assert "schema_version" not in req


def test_examples_validate():
    for t, e in EXAMPLES.items():
        assert errors(SCHEMA, e, SCHEMA) == [], t
        assert not errors(SCHEMA["$defs"][t], e, SCHEMA)


def test_checker_catches_invalid_events():
    bad = [
        {**EXAMPLES["contact.removed"], "type": "contact.teleported"},
        {k: v for k, v in EXAMPLES["contact.removed"].items() if k != "contact_id"},
        {**EXAMPLES["step.sent"], "step_index": True},
        {**EXAMPLES["step.sent"], "step_index": -1},
        {**EXAMPLES["message.bounced"], "bounce_class": "HARD"},
        {**EXAMPLES["contact.enrolled"], "email": "nobody"},
        {**EXAMPLES["contact.removed"], "occurred_at": "2024-05-01T10:00:00"},
        {**EXAMPLES["contact.removed"], "schema_version": 2},
        {**EXAMPLES["automation.published"], "steps": []},
        {**EXAMPLES["contact.removed"], "event_id": ""},
    ]
    for e in bad:
        assert not valid(e), e
        assert isinstance(parse_event(orjson.dumps(e)), Rejection), e


_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["2024-05-01T10:00:00Z", "2024-02-30T10:00:00Z", "once", "hard", "a@b", "", "x" * 201])
)
json_values = st.recursive(
    _json_leaf,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=8,
)


def _paths(t: str) -> list[tuple]:
    e = EXAMPLES[t]
    paths: list[tuple] = [(f.name,) for f in EVENTS[t].all_fields]
    for k, v in e.items():
        if isinstance(v, dict):
            paths += [(k, kk) for kk in v]
        if isinstance(v, list):
            for i, item in enumerate(v):
                paths += [(k, i)] + ([(k, i, kk) for kk in item] if isinstance(item, dict) else [])
    return paths


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_parser_and_schema_agree_on_mutations(data):
    """Parser accepts => schema accepts; schema accepts but parser rejects only
    for the rules the schema cannot express (calendar and range of
    timestamps, step indexes unique and without gaps)."""
    t = data.draw(st.sampled_from(EVENT_TYPES))
    path = data.draw(st.sampled_from(_paths(t)))
    value = data.draw(json_values)
    e = copy.deepcopy(EXAMPLES[t])
    target = e
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    r = parse_event(orjson.dumps(e))
    if isinstance(r, dict):
        assert valid(e), (e, errors(SCHEMA, e, SCHEMA))
    elif valid(e):
        assert r.reason in ("bad_timestamp", "bad_value"), r
        if r.reason == "bad_value":
            assert "more than once" in r.detail or "without gaps" in r.detail, r
