"""Kafka topics of the contract (SPEC section 2) and sendtrail's internal ones.

Names here are the *base* names; the deployed name is ``prefix + name``
(prefix from ``SENDTRAIL_TOPIC_PREFIX``, default ``sendtrail.``), see
:func:`topic_names`. Pure data: no Kafka import, no environment read.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Topic",
    "TOPICS",
    "AUTOMATIONS",
    "ENROLLMENTS",
    "SENDS",
    "PROVIDER_EVENTS",
    "STATUS_CHANGES",
    "DEAD_LETTERS",
    "TO_CONTACTS",
    "TO_MESSAGES",
    "INPUT_TOPICS",
    "DEFAULT_PREFIX",
    "topic_names",
    "topic_for_type",
    "accepts",
    "base_name",
]

DEFAULT_PREFIX = "sendtrail."

AUTOMATIONS = "automations"
ENROLLMENTS = "enrollments"
SENDS = "sends"
PROVIDER_EVENTS = "provider-events"
STATUS_CHANGES = "status-changes"
DEAD_LETTERS = "dead-letters"
TO_CONTACTS = "internal.to-contacts"
TO_MESSAGES = "internal.to-messages"


@dataclass(frozen=True, slots=True)
class Topic:
    """One topic: base name, message key field, accepted event type prefixes."""

    name: str
    #: field of the event/record used as the Kafka message key; ``None`` for
    #: dead-letters, which keep the original message's key.
    key: str | None
    #: event type prefixes accepted (input topics only), e.g. ``("contact.",)``
    accepts: tuple[str, ...]
    #: ``delete`` or ``compact``
    cleanup_policy: str
    #: ``input`` (users produce), ``output`` (sendtrail produces) or ``internal``
    role: str
    description: str

    @property
    def internal(self) -> bool:
        return self.role == "internal"

    def accepts_type(self, event_type: str) -> bool:
        return event_type.startswith(self.accepts) if self.accepts else False


TOPICS: dict[str, Topic] = {
    t.name: t
    for t in (
        Topic(
            AUTOMATIONS,
            "automation_id",
            ("automation.",),
            "compact",
            "input",
            "automation.* definitions and lifecycle (compacted: the latest event per automation is kept)",
        ),
        Topic(ENROLLMENTS, "contact_id", ("contact.",), "delete", "input", "contact.* events"),
        Topic(SENDS, "contact_id", ("step.",), "delete", "input", "step.* events"),
        Topic(PROVIDER_EVENTS, "message_id", ("message.",), "delete", "input", "message.* events (webhook gateway output)"),
        Topic(STATUS_CHANGES, "contact_id", (), "delete", "output", "every status change sendtrail derives"),
        Topic(
            DEAD_LETTERS,
            None,
            (),
            "delete",
            "output",
            "invalid events with the reason and the original bytes (key: the original key)",
        ),
        Topic(
            TO_CONTACTS,
            "contact_id",
            (),
            "delete",
            "internal",
            "message outcomes and automation fan-outs routed to the contact agent",
        ),
        Topic(TO_MESSAGES, "message_id", (), "delete", "internal", "send registrations routed to the message agent"),
    )
}

#: The four topics users produce to, in contract order.
INPUT_TOPICS: tuple[str, ...] = tuple(n for n, t in TOPICS.items() if t.role == "input")

_TYPE_PREFIX_TO_TOPIC: dict[str, str] = {p: t.name for t in TOPICS.values() for p in t.accepts}


def topic_names(prefix: str = DEFAULT_PREFIX) -> dict[str, str]:
    """``{base name: prefixed name}`` for every topic, internal ones included."""
    return {name: prefix + name for name in TOPICS}


def topic_for_type(event_type: str) -> str | None:
    """Base name of the input topic an event type belongs on (``None`` if none)."""
    dot = event_type.find(".")
    if dot <= 0:
        return None
    return _TYPE_PREFIX_TO_TOPIC.get(event_type[: dot + 1])


def base_name(topic: str) -> str | None:
    """The base name of ``topic``, given as a base name or with any prefix.

    ``"enrollments"`` and ``"sendtrail.enrollments"`` both give
    ``"enrollments"``; an unknown topic gives ``None``. The longest matching
    base name wins (so ``x.internal.to-contacts`` is not confused with others).
    """
    if topic in TOPICS:
        return topic
    best = None
    for name in TOPICS:
        if topic.endswith(name) and (best is None or len(name) > len(best)):
            best = name
    return best


def accepts(topic: str, event_type: str) -> bool:
    """May ``event_type`` be produced to ``topic`` (base or prefixed name)?"""
    base = base_name(topic)
    return base is not None and TOPICS[base].accepts_type(event_type)
