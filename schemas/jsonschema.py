"""JSON Schema (draft 2020-12) of the event contract, generated from
:mod:`schemas.events`.

``python -m schemas.jsonschema`` (or :func:`main`) writes
``schemas/events.schema.json``; a unit test checks that the committed file
equals :func:`render` so it never drifts from the definitions.

The schema describes the *wire* form (timestamps are RFC 3339 strings). A few
rules are enforced by the parser only and are stated in ``description``:
unique step indexes, the computed default of ``mailing_id``, the supported
timestamp years and the ``unsupported_schema_version`` reason.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from schemas.events import (
    EVENTS,
    SUPPORTED_SCHEMA_VERSION,
    TIMESTAMP_MAX_YEAR,
    TIMESTAMP_MIN_YEAR,
    EventType,
    Field,
)

__all__ = ["SCHEMA_PATH", "SCHEMA_ID", "RFC3339_PATTERN", "generate", "render", "main"]

SCHEMA_PATH = Path(__file__).with_name("events.schema.json")
SCHEMA_ID = "https://sendtrail.dev/schemas/events.schema.json"

#: The timestamp syntax the parser accepts (the parser also checks the calendar).
RFC3339_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})$"

_JSON_TYPES = {
    "str": "string",
    "int": "integer",
    "bool": "boolean",
    "object": "object",
    "list": "array",
    "timestamp": "string",
    "enum": "string",
}


def _field_schema(f: Field) -> dict[str, Any]:
    s: dict[str, Any] = {}
    jt = _JSON_TYPES[f.kind]
    s["type"] = [jt, "null"] if f.nullable else jt
    if f.kind == "enum":
        s["enum"] = list(f.values) + ([None] if f.nullable else [])
    if f.kind == "str":
        if f.non_empty:
            s["minLength"] = 1
        if f.max_len is not None:
            s["maxLength"] = f.max_len
        if f.fmt == "email":
            s["pattern"] = "@"
    if f.kind == "timestamp":
        s["format"] = "date-time"
        s["pattern"] = RFC3339_PATTERN
    if f.kind == "int":
        if f.min is not None:
            s["minimum"] = f.min
        if f.max is not None:
            s["maximum"] = f.max
    if f.kind == "object":
        if f.props:
            s["properties"] = {p.name: _field_schema(p) for p in f.props}
            req = [p.name for p in f.props if p.required]
            if req:
                s["required"] = req
        s["additionalProperties"] = True
    if f.kind == "list":
        if f.min_items:
            s["minItems"] = f.min_items
        if f.items:
            item: dict[str, Any] = {
                "type": "object",
                "properties": {p.name: _field_schema(p) for p in f.items},
                "required": [p.name for p in f.items if p.required],
                "additionalProperties": True,
            }
            s["items"] = item
    if not f.required and f.default_from is None:
        s["default"] = f.default
    desc = f.doc
    if f.kind == "timestamp":
        extra = f"RFC 3339 with Z or an offset, years {TIMESTAMP_MIN_YEAR}-{TIMESTAMP_MAX_YEAR} (UTC)"
        desc = f"{desc}; {extra}" if desc else extra
    if f.unique_by:
        extra = f"{f.unique_by} values must be unique"
        desc = f"{desc}; {extra}" if desc else extra
    if desc:
        s["description"] = desc
    return s


def _event_schema(et: EventType) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for f in et.all_fields:
        if f.name == "type":
            props["type"] = {"const": et.name, "description": f.doc}
        elif f.name == "schema_version":
            s = _field_schema(f)
            s["description"] = (
                f"contract version; default 1; versions above {SUPPORTED_SCHEMA_VERSION} "
                "are rejected as unsupported_schema_version"
            )
            props["schema_version"] = s
        else:
            props[f.name] = _field_schema(f)
    return {
        "title": et.name,
        "description": f"{et.doc} (topic: {et.topic})",
        "type": "object",
        "properties": props,
        "required": [f.name for f in et.all_fields if f.required],
        "additionalProperties": True,
    }


def generate() -> dict[str, Any]:
    """The schema document as a dict."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "sendtrail events",
        "description": (
            "One sendtrail event (SPEC section 2). Generated from schemas/events.py by "
            "`python -m schemas.jsonschema`; do not edit by hand. Unknown fields are allowed."
        ),
        "type": "object",
        "required": ["type"],
        "oneOf": [{"$ref": f"#/$defs/{name}"} for name in EVENTS],
        "$defs": {name: _event_schema(et) for name, et in EVENTS.items()},
    }


def render() -> str:
    """The schema document as the exact text committed in ``events.schema.json``."""
    return json.dumps(generate(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the schema (to ``argv[0]`` if given, else ``schemas/events.schema.json``)."""
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else SCHEMA_PATH
    path.write_text(render(), encoding="utf-8")
    sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
