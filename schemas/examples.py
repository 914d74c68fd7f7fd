"""One valid example of every event type, in the raw JSON form producers send
(RFC 3339 strings, optional fields partly omitted so defaults are exercised).

Used by the unit tests, the parser benchmark and the docs. Treat as read-only
(copy before changing: ``copy.deepcopy(EXAMPLES[t])``).
"""
from __future__ import annotations

from typing import Any

__all__ = ["EXAMPLES"]

_T = "2024-05-01T10:00:00Z"
_AUTO = {"automation_id": "auto-1"}
_CONTACT = {"automation_id": "auto-1", "contact_id": "contact-1"}
_STEP = {**_CONTACT, "step_index": 0}
_MSG = {
    "message_id": "msg-1",
    "email": "ada@example.com",
    "provider": "sendgrid",
    "automation_id": "auto-1",
    "contact_id": "contact-1",
    "step_index": 0,
}


def _ev(n: int, type_: str, **fields: Any) -> dict[str, Any]:
    return {"event_id": f"evt-{n:04d}", "type": type_, "occurred_at": _T, "schema_version": 1, **fields}


EXAMPLES: dict[str, dict[str, Any]] = {
    e["type"]: e
    for e in (
        _ev(
            1,
            "automation.published",
            **_AUTO,
            name="Spring outreach",
            description="Three touches for new sign-ups",
            participation="once",
            start_at="2024-05-01T00:00:00+02:00",
            end_at=None,
            published_by="user-42",
            version=1,
            steps=[
                {"index": 0, "name": "Intro email", "kind": "email", "day": 0},
                {"index": 1, "name": "Wait", "kind": "wait", "day": 2},
                {"index": 2, "name": "Follow-up", "kind": "email", "day": 3},
            ],
        ),
        _ev(2, "automation.paused", **_AUTO),
        _ev(3, "automation.resumed", **_AUTO),
        _ev(4, "automation.archived", **_AUTO),
        _ev(
            5,
            "contact.enrolled",
            **_CONTACT,
            user_id="user-7",
            name="Ada Lovelace",
            email="ada@example.com",
            company="Analytical Engines Ltd",
            attributes={"plan": "pro"},
            needs_enrichment=False,
        ),
        _ev(6, "contact.enriched", **_CONTACT),
        _ev(7, "contact.enrichment_failed", **_CONTACT, reason="no_data"),
        _ev(8, "contact.duplicate", **_CONTACT),
        _ev(9, "contact.limit_reached", **_CONTACT, limit="active"),
        _ev(10, "contact.limit_released", **_CONTACT),
        _ev(11, "contact.paused", **_CONTACT, reason="out_of_office", resume_at="2024-05-08T09:00:00+02:00"),
        _ev(12, "contact.resumed", **_CONTACT),
        _ev(13, "contact.finished", **_CONTACT, reason="meeting_booked"),
        _ev(14, "contact.canceled", **_CONTACT, reason="manual"),
        _ev(15, "contact.failed", **_CONTACT, reason="invalid_address"),
        _ev(16, "contact.removed", **_CONTACT),
        _ev(17, "step.scheduled", **_STEP, due_at="2024-05-02T10:00:00Z"),
        _ev(
            18,
            "step.sent",
            **_STEP,
            message_id="msg-1",
            channel="email",
            subject="Hello Ada",
            sending_user="Grace Hopper",
            sending_email="grace@sender.example",
            step_details={"day": 0, "inactive_days": 0},
            metadata={"template": "intro-v2"},
        ),
        _ev(19, "step.filtered", **_STEP, reason="condition_not_met"),
        _ev(20, "step.not_sent", **_STEP, reason="missing_email"),
        _ev(21, "step.failed", **_STEP, reason="provider_error"),
        _ev(22, "message.sent", **_MSG),
        _ev(23, "message.delivered", **_MSG),
        _ev(24, "message.deferred", **_MSG, reason="mailbox full"),
        _ev(25, "message.bounced", **_MSG, bounce_class="hard", reason="550 no such user"),
        _ev(26, "message.dropped", **_MSG, reason="suppressed"),
        _ev(27, "message.opened", **_MSG),
        _ev(28, "message.clicked", **_MSG, url="https://example.com/pricing"),
        _ev(29, "message.spam_reported", **_MSG),
        _ev(30, "message.unsubscribed", **_MSG),
        _ev(31, "message.resubscribed", **_MSG),
        _ev(32, "message.replied", **_MSG),
        _ev(33, "message.auto_replied", **_MSG, return_at="2024-05-10T08:00:00Z"),
    )
}
