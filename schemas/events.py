"""The event contract of SPEC section 2, defined once, as data.

Every event type is an :class:`EventType`: a name, the input topic it travels
on, and a tuple of :class:`Field` specs. The parser (:mod:`schemas.parser`)
compiles its validators from these tables and the JSON Schema generator
(:mod:`schemas.jsonschema`) renders them, so the two can never disagree.

Field kinds (``Field.kind``):

- ``str``        a string (``non_empty``, ``max_len``, ``fmt="email"`` add checks)
- ``int``        an integer, never a bool (``min``/``max`` bound it)
- ``bool``       ``true`` / ``false``
- ``object``     a JSON object (``props`` optionally describes known members;
                 unknown members are always allowed)
- ``list``       a JSON array (``items`` describes object items; ``min_items``)
- ``timestamp``  RFC 3339 with ``Z`` or an offset; the parser turns it into
                 integer milliseconds since the epoch, UTC
- ``enum``       one of ``values`` (strings)

``nullable`` allows ``null``; a field that is not ``required`` gets its
``default`` (or ``default_from(event)``) when it is absent. Unknown fields of
an event are allowed and preserved (forward compatibility).

Pure data: no I/O, no environment, nothing happens at import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = [
    "Field",
    "EventType",
    "COMMON_FIELDS",
    "EVENTS",
    "EVENT_TYPES",
    "TIMESTAMP_FIELDS",
    "SUPPORTED_SCHEMA_VERSION",
    "ID_MAX_LEN",
    "INT_MAX",
    "TIMESTAMP_MIN_YEAR",
    "TIMESTAMP_MAX_YEAR",
    "event_fields",
]

#: Highest ``schema_version`` this code understands; greater ones are rejected
#: with ``unsupported_schema_version`` (they go to dead-letters and can be
#: replayed once the pipeline is upgraded).
SUPPORTED_SCHEMA_VERSION = 1

#: Maximum length of any identifier (event_id, automation_id, contact_id, ...).
ID_MAX_LEN = 200

#: Upper bound of every integer field unless a field says otherwise (fits the
#: Int32/UInt32 columns of ClickHouse).
INT_MAX = 2**31 - 1

#: Timestamps outside these years are rejected (``bad_timestamp``): they fit
#: ClickHouse ``DateTime64(3)`` (1900-01-01 .. 2299-12-31).
TIMESTAMP_MIN_YEAR = 1900
TIMESTAMP_MAX_YEAR = 2299

_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class Field:
    """One field of an event (or of a nested object)."""

    name: str
    kind: str  # str | int | bool | object | list | timestamp | enum
    required: bool = True
    nullable: bool = False
    default: Any = None
    default_from: Callable[[Mapping[str, Any]], Any] | None = None
    values: tuple[str, ...] = ()  # enum members
    non_empty: bool = False  # str: at least one character
    max_len: int | None = None  # str: at most this many characters
    fmt: str | None = None  # str: "email" (must contain '@')
    min: int | None = None  # int: lower bound
    max: int | None = None  # int: upper bound
    props: tuple["Field", ...] = ()  # object: known members (validated when present)
    items: tuple["Field", ...] = ()  # list: fields of each (object) item
    min_items: int = 0  # list
    unique_by: str | None = None  # list: item member whose values must be unique
    doc: str = ""

    def make_default(self, event: Mapping[str, Any]) -> Any:
        """The value filled in when the field is absent (fresh copy for containers)."""
        if self.default_from is not None:
            return self.default_from(event)
        d = self.default
        if isinstance(d, dict):
            return dict(d)
        if isinstance(d, list):
            return list(d)
        return d


@dataclass(frozen=True, slots=True)
class EventType:
    """One event type: its name, the contract topic it is accepted on, its own fields."""

    name: str
    topic: str
    fields: tuple[Field, ...]
    doc: str = ""

    @property
    def all_fields(self) -> tuple[Field, ...]:
        """Common fields first, then the type's own fields."""
        return COMMON_FIELDS + self.fields


# --------------------------------------------------------------------------
# small constructors, to keep the tables below readable


def _id(name: str, *, required: bool = True, nullable: bool = False, doc: str = "") -> Field:
    return Field(
        name,
        "str",
        required=required,
        nullable=nullable,
        non_empty=True,
        max_len=ID_MAX_LEN,
        default=None,
        doc=doc,
    )


def _str(
    name: str,
    *,
    required: bool = True,
    nullable: bool = False,
    default: Any = None,
    non_empty: bool = False,
    fmt: str | None = None,
    doc: str = "",
) -> Field:
    return Field(
        name,
        "str",
        required=required,
        nullable=nullable,
        default=default,
        non_empty=non_empty,
        fmt=fmt,
        doc=doc,
    )


def _int(
    name: str,
    *,
    required: bool = True,
    nullable: bool = False,
    default: Any = None,
    min: int | None = 0,
    doc: str = "",
) -> Field:
    return Field(
        name, "int", required=required, nullable=nullable, default=default, min=min, max=INT_MAX, doc=doc
    )


def _ts(name: str, *, required: bool = True, nullable: bool = False, doc: str = "") -> Field:
    return Field(name, "timestamp", required=required, nullable=nullable, default=None, doc=doc)


def _enum(name: str, values: tuple[str, ...], *, doc: str = "") -> Field:
    return Field(name, "enum", values=values, doc=doc)


def _obj(name: str, *, props: tuple[Field, ...] = (), doc: str = "") -> Field:
    return Field(name, "object", required=False, default={}, props=props, doc=doc)


def _reason(*, doc: str = "why") -> Field:
    return _str("reason", non_empty=True, doc=doc)


def _reason_nullable(*, doc: str = "provider's reason, if any") -> Field:
    return _str("reason", required=False, nullable=True, doc=doc)


def _mailing_id_default(event: Mapping[str, Any]) -> str:
    return f"{event.get('automation_id')}:{event.get('step_index')}"


# --------------------------------------------------------------------------
# common fields (every event)

COMMON_FIELDS: tuple[Field, ...] = (
    _id("event_id", doc="unique id of the event; the idempotency key (replays change nothing)"),
    Field("type", "str", non_empty=True, doc="event type, e.g. contact.enrolled"),
    _ts("occurred_at", doc="when it happened (RFC 3339 with offset); parsed to epoch ms UTC"),
    Field(
        "schema_version",
        "int",
        required=False,
        nullable=True,
        default=1,
        min=1,
        max=SUPPORTED_SCHEMA_VERSION,
        doc=f"contract version (default 1; greater than {SUPPORTED_SCHEMA_VERSION} is unsupported)",
    ),
)

STEP_KINDS = ("email", "linkedin_connect", "linkedin_message", "task", "wait", "condition")

_STEP_ITEM: tuple[Field, ...] = (
    _int("index", doc="position of the step in the flow; 0 = first"),
    _str("name", doc="step name"),
    _enum("kind", STEP_KINDS, doc="what the step does"),
    _int("day", doc="day of the step in the flow"),
)

_AUTO = (_id("automation_id"),)
_CONTACT = (_id("automation_id"), _id("contact_id"))
_STEP = (_id("automation_id"), _id("contact_id"), _int("step_index", doc="0 = first step"))
_MESSAGE = (
    _id("message_id", doc="provider message id"),
    _str("email", non_empty=True, fmt="email", doc="recipient address"),
    _str("provider", non_empty=True, doc="sendgrid, mailgun, ses, postmark, ..."),
    _id("automation_id", required=False, nullable=True, doc="set when the sender tagged the message"),
    _id("contact_id", required=False, nullable=True, doc="set when the sender tagged the message"),
    _int("step_index", required=False, nullable=True, doc="set when the sender tagged the message"),
)

_A = "automations"
_E = "enrollments"
_S = "sends"
_P = "provider-events"

_DEFS: tuple[EventType, ...] = (
    # ---- automations ------------------------------------------------------
    EventType(
        "automation.published",
        _A,
        _AUTO
        + (
            _str("name"),
            _str("description", required=False, nullable=True),
            _enum("participation", ("once", "unlimited"), doc="may a contact enter again after its run ended"),
            _ts("start_at"),
            _ts("end_at", required=False, nullable=True),
            _str("published_by", doc="who published it"),
            _int("version", doc="definition version"),
            Field(
                "steps",
                "list",
                items=_STEP_ITEM,
                min_items=1,
                unique_by="index",
                doc="the flow; indexes unique (the parser returns them sorted by index)",
            ),
        ),
        "an automation definition (published or republished)",
    ),
    EventType("automation.paused", _A, _AUTO, "every waiting contact is paused"),
    EventType("automation.resumed", _A, _AUTO, "paused contacts continue"),
    EventType("automation.archived", _A, _AUTO, "waiting contacts are canceled, in-flight ones failed"),
    # ---- enrollments ------------------------------------------------------
    EventType(
        "contact.enrolled",
        _E,
        _CONTACT
        + (
            _id("user_id", doc="the sender's id of the contact (Recipient's User ID)"),
            _str("name"),
            _str("email", non_empty=True, fmt="email"),
            _str("company", required=False, nullable=True),
            _obj("attributes", doc="free-form contact attributes"),
            Field("needs_enrichment", "bool", required=False, default=False),
        ),
        "a contact entered the automation",
    ),
    EventType("contact.enriched", _E, _CONTACT, "enrichment done"),
    EventType("contact.enrichment_failed", _E, _CONTACT + (_reason(),), "enrichment failed (status failed)"),
    EventType("contact.duplicate", _E, _CONTACT, "the contact is a duplicate (ends the run)"),
    EventType(
        "contact.limit_reached",
        _E,
        _CONTACT + (_enum("limit", ("active", "coworkers")),),
        "held by a sending limit",
    ),
    EventType("contact.limit_released", _E, _CONTACT, "sending limit released"),
    EventType(
        "contact.paused",
        _E,
        _CONTACT
        + (
            _reason(doc="free text; commonly manual or out_of_office"),
            _ts("resume_at", required=False, nullable=True, doc="automatic resume time"),
        ),
        "paused",
    ),
    EventType("contact.resumed", _E, _CONTACT, "resumed (also releases not_sent and bounced holds)"),
    EventType(
        "contact.finished",
        _E,
        _CONTACT + (_enum("reason", ("completed", "replied", "meeting_booked", "manual")),),
        "finished",
    ),
    EventType(
        "contact.canceled",
        _E,
        _CONTACT + (_str("reason", required=False, default="manual", non_empty=True),),
        "canceled",
    ),
    EventType("contact.failed", _E, _CONTACT + (_reason(),), "failed"),
    EventType("contact.removed", _E, _CONTACT, "removed from the automation (canceled, reason removed)"),
    # ---- sends --------------------------------------------------------------
    EventType("step.scheduled", _S, _STEP + (_ts("due_at"),), "a step is queued for a time"),
    EventType(
        "step.sent",
        _S,
        _STEP
        + (
            _id("message_id"),
            _str("channel", required=False, default="email", non_empty=True),
            Field(
                "mailing_id",
                "str",
                required=False,
                nullable=True,
                non_empty=True,
                max_len=ID_MAX_LEN,
                default_from=_mailing_id_default,
                doc="defaults to <automation_id>:<step_index> (also when null)",
            ),
            _str("subject", required=False, nullable=True),
            _str("sending_user", required=False, nullable=True),
            _str("sending_email", required=False, nullable=True, fmt="email"),
            _obj(
                "step_details",
                props=(
                    _int("day", required=False, nullable=True),
                    _int("inactive_days", required=False, nullable=True),
                ),
                doc="{day, inactive_days}",
            ),
            _obj("metadata", doc="free-form"),
        ),
        "a step was executed: a message went out",
    ),
    EventType("step.filtered", _S, _STEP + (_reason(),), "the contact did not pass the step (run finished, filtered)"),
    EventType("step.not_sent", _S, _STEP + (_reason(),), "the step could not be sent (held until resumed)"),
    EventType("step.failed", _S, _STEP + (_reason(),), "the step failed (run failed)"),
    # ---- provider events ---------------------------------------------------
    EventType("message.sent", _P, _MESSAGE, "the provider accepted the message"),
    EventType("message.delivered", _P, _MESSAGE, "delivered"),
    EventType("message.deferred", _P, _MESSAGE + (_reason_nullable(),), "temporarily deferred"),
    EventType(
        "message.bounced",
        _P,
        _MESSAGE + (_enum("bounce_class", ("hard", "soft", "block")), _reason_nullable()),
        "bounced",
    ),
    EventType("message.dropped", _P, _MESSAGE + (_reason_nullable(),), "dropped by the provider"),
    EventType("message.opened", _P, _MESSAGE, "opened"),
    EventType("message.clicked", _P, _MESSAGE + (_str("url", non_empty=True),), "a link was clicked"),
    EventType("message.spam_reported", _P, _MESSAGE, "reported as spam"),
    EventType("message.unsubscribed", _P, _MESSAGE, "the recipient unsubscribed"),
    EventType("message.resubscribed", _P, _MESSAGE, "the recipient resubscribed"),
    EventType("message.replied", _P, _MESSAGE, "the recipient replied"),
    EventType(
        "message.auto_replied",
        _P,
        _MESSAGE + (_ts("return_at", required=False, nullable=True, doc="out-of-office return date"),),
        "an automatic reply (out of office)",
    ),
)

#: Every event type by name, in contract order.
EVENTS: dict[str, EventType] = {e.name: e for e in _DEFS}

#: Event type names, in contract order.
EVENT_TYPES: tuple[str, ...] = tuple(EVENTS)

#: Every top-level timestamp field name (converted to epoch ms by the parser).
TIMESTAMP_FIELDS: frozenset[str] = frozenset(
    f.name for e in _DEFS for f in e.all_fields if f.kind == "timestamp"
)


def event_fields(event_type: str) -> tuple[Field, ...]:
    """All fields (common first) of ``event_type``; KeyError if unknown."""
    return EVENTS[event_type].all_fields
