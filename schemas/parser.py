"""Validate and normalise contract events (SPEC section 2): the hot path.

:func:`parse_event` turns the bytes of one Kafka message into either the
event as a ``dict`` (defaults filled in, ``schema_version`` set, every
timestamp field converted to integer milliseconds since the epoch, UTC) or a
:class:`Rejection` with a machine-readable ``reason``. It never raises on
input data: random bytes give a ``Rejection``.

Validators are compiled once (at import, from the tables in
:mod:`schemas.events`) into one small closure per field; the common, valid
case takes a fast path of plain ``type(v) is ...`` checks, everything else
falls to a generic slow path that fills defaults or names the problem.

Reason codes (:data:`REASONS`):

``too_large``, ``invalid_json``, ``not_an_object``, ``missing_type``,
``unknown_type``, ``wrong_topic``, ``missing_field``, ``wrong_type``,
``bad_timestamp``, ``bad_enum``, ``bad_value``, ``unsupported_schema_version``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Callable

import orjson

from schemas import topics as _topics
from schemas.events import (
    EVENTS,
    SUPPORTED_SCHEMA_VERSION,
    TIMESTAMP_MAX_YEAR,
    TIMESTAMP_MIN_YEAR,
    Field,
)

__all__ = [
    "Rejection",
    "REASONS",
    "DEFAULT_MAX_BYTES",
    "parse_event",
    "parse_object",
    "parse_timestamp",
    "to_rfc3339",
]

DEFAULT_MAX_BYTES = 262144

TOO_LARGE = "too_large"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_TYPE = "missing_type"
UNKNOWN_TYPE = "unknown_type"
WRONG_TOPIC = "wrong_topic"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
BAD_TIMESTAMP = "bad_timestamp"
BAD_ENUM = "bad_enum"
BAD_VALUE = "bad_value"
UNSUPPORTED_SCHEMA_VERSION = "unsupported_schema_version"

#: Every reason code a :class:`Rejection` can carry.
REASONS: tuple[str, ...] = (
    TOO_LARGE,
    INVALID_JSON,
    NOT_AN_OBJECT,
    MISSING_TYPE,
    UNKNOWN_TYPE,
    WRONG_TOPIC,
    MISSING_FIELD,
    WRONG_TYPE,
    BAD_TIMESTAMP,
    BAD_ENUM,
    BAD_VALUE,
    UNSUPPORTED_SCHEMA_VERSION,
)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an event was refused. ``reason`` is one of :data:`REASONS`;
    ``detail`` is a human message naming the field; ``field`` is the field's
    path (``steps[2].index``) or ``None`` when the problem is not one field."""

    reason: str
    detail: str
    field: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "detail": self.detail, "field": self.field}


_MISSING: Any = object()
_loads = orjson.loads

# --------------------------------------------------------------------------
# timestamps

_TS_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})\Z",
    re.ASCII,
)
_ts_match = _TS_RE.match
_fromiso = datetime.fromisoformat
_UNIX_DAY = 719163  # date(1970, 1, 1).toordinal()
_MIN_MS = (date(TIMESTAMP_MIN_YEAR, 1, 1).toordinal() - _UNIX_DAY) * 86_400_000
_MAX_MS = (date(TIMESTAMP_MAX_YEAR + 1, 1, 1).toordinal() - _UNIX_DAY) * 86_400_000 - 1


def _ts_slow(s: str) -> int | None:
    """Non-canonical spellings: lower-case t/z, a space, a leap second."""
    norm = s[:10] + "T" + s[11:]
    if norm[-1] == "z":
        norm = norm[:-1] + "Z"
    leap = norm[17:19] == "60"
    if leap:
        norm = norm[:17] + "59" + norm[19:]
    try:
        dt = _fromiso(norm)
    except ValueError:
        return None
    ms = ((dt.toordinal() - _UNIX_DAY) * 86400 + dt.hour * 3600 + dt.minute * 60 + dt.second + leap) * 1000
    ms += dt.microsecond // 1000
    if norm[-1] != "Z":
        ms -= (int(norm[-5:-3]) * 60 + int(norm[-2:])) * 60000 * (1 if norm[-6] == "+" else -1)
    return ms


def parse_timestamp(value: Any) -> int | None:
    """RFC 3339 (``Z`` or an offset required) to epoch milliseconds UTC, or ``None``.

    Fractions beyond milliseconds are truncated (toward the past); a leap
    second (``:60``) is read as the first instant of the next minute; instants
    outside the years 1900-2299 (UTC) are refused.
    """
    if type(value) is not str:
        if not isinstance(value, str):
            return None
        value = str(value)
    if _ts_match(value) is None:
        return None
    try:
        dt = _fromiso(value)
    except ValueError:
        ms = _ts_slow(value)
        if ms is None:
            return None
    else:
        ms = (
            (dt.toordinal() - _UNIX_DAY) * 86400 + dt.hour * 3600 + dt.minute * 60 + dt.second
        ) * 1000 + dt.microsecond // 1000
        last = value[-1]
        if last != "Z" and last != "z":
            off = (int(value[-5:-3]) * 60 + int(value[-2:])) * 60000
            ms = ms - off if value[-6] == "+" else ms + off
    if _MIN_MS <= ms <= _MAX_MS:
        return ms
    return None


_SECOND_TEXT: dict[int, str] = {}  # whole unix second -> "YYYY-MM-DDTHH:MM:SS" (events of a batch share a few)
_SECOND_TEXT_MAX = 4096


def second_text(second: int) -> str:
    """Unix seconds (UTC) as ``YYYY-MM-DDTHH:MM:SS``, cached (a batch's events share few seconds)."""
    text = _SECOND_TEXT.get(second)
    if text is None:
        if len(_SECOND_TEXT) >= _SECOND_TEXT_MAX:
            _SECOND_TEXT.clear()
        days, rest = divmod(second, 86400)
        day = date.fromordinal(_UNIX_DAY + days)
        minutes, sec = divmod(rest, 60)
        text = _SECOND_TEXT[second] = (f"{day.year:04d}-{day.month:02d}-{day.day:02d}T"
                                       f"{minutes // 60:02d}:{minutes % 60:02d}:{sec:02d}")
    return text


def to_rfc3339(ms: int) -> str:
    """Epoch milliseconds to RFC 3339 in UTC with millisecond precision and ``Z``."""
    second, milli = divmod(ms, 1000)
    return f"{second_text(second)}.{milli:03d}Z"


# --------------------------------------------------------------------------
# generic (slow path) validation


_KIND_WORDS = {
    "str": "a string",
    "int": "an integer",
    "bool": "a boolean",
    "object": "an object",
    "list": "an array",
    "timestamp": "an RFC 3339 timestamp string",
    "enum": "a string",
}


def _json_kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _wrong_type(f: Field, v: Any, path: str) -> Rejection:
    want = _KIND_WORDS[f.kind]
    if f.nullable:
        want += " or null"
    return Rejection(WRONG_TYPE, f"{path} must be {want}, not {_json_kind(v)}", path)


def _check_value(f: Field, v: Any, path: str) -> Any:
    """Validate a present, non-null value; return it (normalised) or a Rejection."""
    kind = f.kind
    if kind == "str" or kind == "enum":
        if not isinstance(v, str):
            return _wrong_type(f, v, path)
        if type(v) is not str:
            v = str(v)
        if kind == "enum":
            if v not in f.values:
                return Rejection(BAD_ENUM, f"{path} must be one of {', '.join(f.values)}, not {v[:100]!r}", path)
            return v
        if f.non_empty and not v:
            return Rejection(BAD_VALUE, f"{path} must not be empty", path)
        if f.max_len is not None and len(v) > f.max_len:
            return Rejection(BAD_VALUE, f"{path} must be at most {f.max_len} characters", path)
        if f.fmt == "email" and "@" not in v:
            return Rejection(BAD_VALUE, f"{path} must be an e-mail address (no '@' in {v[:100]!r})", path)
        return v
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            return _wrong_type(f, v, path)
        v = int(v)
        if f.min is not None and v < f.min:
            return Rejection(BAD_VALUE, f"{path} must be at least {f.min}, not {v}", path)
        if f.max is not None and v > f.max:
            return Rejection(BAD_VALUE, f"{path} must be at most {f.max}", path)
        return v
    if kind == "bool":
        if v is True or v is False:
            return v
        return _wrong_type(f, v, path)
    if kind == "timestamp":
        if not isinstance(v, str):
            return _wrong_type(f, v, path)
        ms = parse_timestamp(v)
        if ms is None:
            return Rejection(
                BAD_TIMESTAMP,
                f"{path} must be RFC 3339 with a time zone (e.g. 2024-05-01T10:00:00Z) "
                f"in the years {TIMESTAMP_MIN_YEAR}-{TIMESTAMP_MAX_YEAR}, not {v[:60]!r}",
                path,
            )
        return ms
    if kind == "object":
        if not isinstance(v, dict):
            return _wrong_type(f, v, path)
        for p in f.props:
            pv = v.get(p.name, _MISSING)
            ppath = f"{path}.{p.name}"
            if pv is _MISSING:
                if p.required:
                    return Rejection(MISSING_FIELD, f"{ppath} is required", ppath)
                continue
            if pv is None:
                if p.nullable:
                    continue
                return _wrong_type(p, pv, ppath)
            r = _check_value(p, pv, ppath)
            if r.__class__ is Rejection:
                return r
        return v
    if kind == "list":
        if not isinstance(v, list):
            return _wrong_type(f, v, path)
        if len(v) < f.min_items:
            return Rejection(BAD_VALUE, f"{path} must have at least {f.min_items} item(s)", path)
        if f.items:
            item_field = Field(f.name, "object", props=f.items)
            seen: set[Any] = set()
            for i, item in enumerate(v):
                ipath = f"{path}[{i}]"
                r = _check_value(item_field, item, ipath)
                if r.__class__ is Rejection:
                    return r
                if f.unique_by is not None:
                    key = item[f.unique_by]
                    if key in seen:
                        return Rejection(
                            BAD_VALUE,
                            f"{path} has {f.unique_by} {key} more than once ({ipath}.{f.unique_by})",
                            f"{ipath}.{f.unique_by}",
                        )
                    seen.add(key)
            if f.unique_by is not None:
                ub = f.unique_by
                v = sorted(v, key=lambda it: it[ub])
                if f.unique_by == "index" and [it[ub] for it in v] != list(range(len(v))):
                    return Rejection(
                        BAD_VALUE,
                        f"{path} indexes must run 0, 1, 2, ... without gaps (node k is step k)",
                        f"{path}",
                    )
        return v
    raise AssertionError(f"unknown field kind {kind!r}")  # pragma: no cover - table error


def _slow(f: Field, ev: dict, v: Any) -> Rejection | None:
    name = f.name
    if v is _MISSING:
        if f.required:
            return Rejection(MISSING_FIELD, f"{name} is required", name)
        ev[name] = f.make_default(ev)
        return None
    if v is None:
        if f.nullable:
            if f.default_from is not None:
                ev[name] = f.default_from(ev)
            return None
        return _wrong_type(f, v, name)
    r = _check_value(f, v, name)
    if r.__class__ is Rejection:
        return r
    if r is not v:
        ev[name] = r
    return None


# --------------------------------------------------------------------------
# compiled validators: one generated function per event type
#
# Each field becomes a few lines of straight code testing the common valid
# case with plain ``type(v) is ...`` checks; anything else (absent, null,
# wrong, str subclass, ...) goes to ``_slow``, which fills the default or
# returns the Rejection. Generated source, rather than one closure per field,
# saves a Python call per field on the hot path.

Validator = Callable[[dict], "Rejection | None"]


def _fast_condition(f: Field, ref: str, env: dict[str, Any]) -> str | None:
    """A Python expression over ``v`` true when ``v`` is valid as is (no change)."""
    kind = f.kind
    if kind == "str":
        cond = "type(v) is str"
        if f.non_empty or f.max_len is not None:
            lo = 1 if f.non_empty else 0
            if f.max_len is None:
                cond += " and len(v) > 0"
            else:
                cond += f" and {lo} <= len(v) <= {f.max_len}"
        if f.fmt == "email":
            cond += " and '@' in v"
        return cond
    if kind == "int":
        lo = f.min if f.min is not None else -(1 << 63)
        hi = f.max if f.max is not None else 1 << 63
        return f"type(v) is int and {lo} <= v <= {hi}"
    if kind == "enum":
        env[ref + "_values"] = frozenset(f.values)
        return f"type(v) is str and v in {ref}_values"
    if kind == "bool":
        return "v is True or v is False"
    if kind == "object" and not f.props:
        return "type(v) is dict"
    return None  # timestamps are special-cased; nested objects and lists go slow


def _default_expr(f: Field, ref: str, env: dict[str, Any]) -> str | None:
    """Source of a fresh default value for an optional field, or None (use _slow)."""
    if f.required or f.default_from is not None:
        return None
    d = f.default
    if isinstance(d, dict):
        return "{}" if not d else None
    if isinstance(d, list):
        return "[]" if not d else None
    env[ref + "_default"] = d
    return ref + "_default"


def _generate(et_name: str, fields: tuple[Field, ...]) -> Validator:
    env: dict[str, Any] = {"_slow": _slow, "_M": _MISSING, "_pt": parse_timestamp}
    lines = ["def validate(ev):", "    get = ev.get"]
    for i, f in enumerate(fields):
        ref = f"F{i}"
        env[ref] = f
        name = repr(f.name)
        lines.append(f"    v = get({name}, _M)")
        default = _default_expr(f, ref, env)
        keyword = "if"
        if default is not None:
            lines += ["    if v is _M:", f"        ev[{name}] = {default}"]
            keyword = "elif"
        null_ok = f.nullable and f.default_from is None
        if f.kind == "timestamp":
            if null_ok:
                lines.append(f"    {keyword} v is None:")
                lines.append("        pass")
                keyword = "elif"
            lines += [
                f"    {keyword} type(v) is str and (ms := _pt(v)) is not None:",
                f"        ev[{name}] = ms",
                "    else:",
                f"        r = _slow({ref}, ev, v)",
                "        if r is not None:",
                "            return r",
            ]
            continue
        cond = _fast_condition(f, ref, env)
        if cond is None:
            if keyword == "elif":
                lines.append("    else:")
                lines += [f"        r = _slow({ref}, ev, v)", "        if r is not None:", "            return r"]
            else:
                lines += [f"    r = _slow({ref}, ev, v)", "    if r is not None:", "        return r"]
            continue
        if null_ok:
            cond = f"v is None or ({cond})"
        lines += [
            f"    {keyword} not ({cond}):",
            f"        r = _slow({ref}, ev, v)",
            "        if r is not None:",
            "            return r",
        ]
    lines.append("    return None")
    src = "\n".join(lines) + "\n"
    code = compile(src, f"<schemas.parser validator {et_name}>", "exec")
    exec(code, env)  # noqa: S102 - source generated from our own tables
    fn = env["validate"]
    fn.__qualname__ = fn.__name__ = "validate_" + et_name.replace(".", "_")
    fn.source = src  # for debugging: print(_COMPILED[t].source)
    return fn


def _compile_type(name: str) -> Validator:
    # type and schema_version are checked before dispatch
    fields = tuple(f for f in EVENTS[name].all_fields if f.name not in ("type", "schema_version"))
    return _generate(name, fields)


_COMPILED: dict[str, Validator] = {name: _compile_type(name) for name in EVENTS}
_SV_FIELD = next(f for f in EVENTS["contact.removed"].all_fields if f.name == "schema_version")

# topic (as given) -> accepted type prefixes; filled lazily, bounded by the
# number of distinct topic names a process uses
_TOPIC_ACCEPTS: dict[str, tuple[tuple[str, ...], str]] = {}


def _topic_accepts(topic: str) -> tuple[tuple[str, ...], str]:
    hit = _TOPIC_ACCEPTS.get(topic)
    if hit is not None:
        return hit
    base = _topics.base_name(topic) if isinstance(topic, str) else None
    if base is None or not _topics.TOPICS[base].accepts:
        raise ValueError(
            f"parse_event: topic {topic!r} is not an input topic of the contract "
            f"({', '.join(_topics.INPUT_TOPICS)}, with or without prefix)"
        )
    hit = (_topics.TOPICS[base].accepts, base)
    if len(_TOPIC_ACCEPTS) < 1024:
        _TOPIC_ACCEPTS[topic] = hit
    return hit


def _validate(ev: dict, topic: str | None) -> dict | Rejection:
    sv = ev.get("schema_version")
    if sv is None:
        ev["schema_version"] = 1
    elif type(sv) is not int or sv != 1:
        if isinstance(sv, bool) or not isinstance(sv, int):
            return _wrong_type(_SV_FIELD, sv, "schema_version")
        if sv > SUPPORTED_SCHEMA_VERSION:
            return Rejection(
                UNSUPPORTED_SCHEMA_VERSION,
                f"schema_version {sv} is newer than the supported {SUPPORTED_SCHEMA_VERSION}",
                "schema_version",
            )
        if sv < 1:
            return Rejection(BAD_VALUE, f"schema_version must be at least 1, not {sv}", "schema_version")
        ev["schema_version"] = int(sv)

    t = ev.get("type")
    if type(t) is not str:
        if t is None:
            return Rejection(MISSING_TYPE, "type is required", "type")
        if not isinstance(t, str):
            return Rejection(WRONG_TYPE, f"type must be a string, not {_json_kind(t)}", "type")
        t = ev["type"] = str(t)
    validate = _COMPILED.get(t)
    if validate is None:
        return Rejection(UNKNOWN_TYPE, f"unknown event type {t[:100]!r}", "type")
    if topic is not None:
        prefix, base = _topic_accepts(topic)
        if not t.startswith(prefix):
            return Rejection(WRONG_TOPIC, f"type {t} is not accepted on topic {base}", "type")
    r = validate(ev)
    if r is not None:
        return r
    return ev


def parse_event(
    raw: bytes | bytearray | memoryview | str | None,
    *,
    topic: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict | Rejection:
    """Decode and validate one event.

    ``topic``, when given, is the contract topic the bytes came from (base
    name like ``enrollments`` or prefixed like ``sendtrail.enrollments``);
    an event type not accepted there is ``wrong_topic``. Raises only
    ``ValueError`` for a ``topic`` that is not an input topic (a programming
    error, not bad input). Returns the event dict (defaults filled,
    timestamps in epoch ms UTC) or a :class:`Rejection`.
    """
    if type(raw) is bytes:
        size = len(raw)
    elif raw is None:
        return Rejection(INVALID_JSON, "the message has no value (null / tombstone)")
    elif isinstance(raw, memoryview):
        size = raw.nbytes
    elif isinstance(raw, (bytes, bytearray, str)):
        size = len(raw)
    else:
        return Rejection(INVALID_JSON, f"the message is {type(raw).__name__}, not bytes")
    if size > max_bytes:
        return Rejection(TOO_LARGE, f"the message has {size} bytes, more than the limit of {max_bytes}")
    try:
        ev = _loads(raw)
    except (orjson.JSONDecodeError, TypeError, ValueError) as e:
        return Rejection(INVALID_JSON, f"not valid JSON: {str(e)[:200]}")
    if type(ev) is not dict:
        return Rejection(NOT_AN_OBJECT, f"the event must be a JSON object, not {_json_kind(ev)}")
    return _validate(ev, topic)


def parse_object(obj: Any, topic: str | None = None) -> dict | Rejection:
    """Validate an already decoded event (e.g. from the HTTP API).

    Same rules and result as :func:`parse_event`; ``obj`` is not modified
    (a shallow copy is returned). Callers should decode with ``orjson`` so
    that strings are valid UTF-8 (``parse_event`` on the raw bytes is best).
    """
    if not isinstance(obj, dict):
        return Rejection(NOT_AN_OBJECT, f"the event must be a JSON object, not {_json_kind(obj)}")
    return _validate(dict(obj), topic)

