"""Mailgun webhooks (the JSON "new" webhooks; legacy form-encoded ones get 415).

Authenticity: the body carries ``{"signature": {"timestamp", "token",
"signature"}, "event-data": {...}}``; ``signature`` is the hex
HMAC-SHA256 of ``timestamp + token`` keyed with the HTTP webhook signing key
(``SENDTRAIL_MAILGUN_SIGNING_KEY``). A timestamp further than
``max_age_seconds`` from now (either direction) is refused. Mailgun recommends
also caching tokens to refuse their reuse; that is state, so instead a replay
inside the window yields the same ``event_id`` (``mailgun:<event-data.id>``)
and is absorbed by the idempotent pipeline downstream.

| Mailgun ``event``                       | canonical             | extra fields |
|-----------------------------------------|-----------------------|--------------|
| accepted                                | message.sent          | |
| rejected                                | message.dropped       | reason = reject.reason/description |
| delivered                               | message.delivered     | |
| failed, severity temporary              | message.deferred      | reason |
| failed, permanent, reason suppress-bounce / suppress-unsubscribe / suppress-complaint | message.dropped | reason |
| failed, permanent, reason espblock / blacklisted | message.bounced | bounce_class block |
| failed, permanent, reason old (gave up retrying) | message.bounced | bounce_class soft |
| failed, permanent, any other reason (bounce, generic, ...) | message.bounced | bounce_class hard |
| opened                                  | message.opened        | |
| clicked                                 | message.clicked       | url |
| unsubscribed                            | message.unsubscribed  | |
| complained                              | message.spam_reported | |

``message_id`` is ``message.headers.message-id`` without angle brackets (the
send side must store Mailgun's returned ``id`` the same way); ``email`` is
``recipient``; ``occurred_at`` is ``timestamp`` (float seconds);
``user-variables`` give ``automation_id``, ``contact_id``, ``step_index``.
"""
from __future__ import annotations

import hashlib
import hmac
import re


from .common import (
    Unmapped, WebhookConfig, WebhookError, WebhookResult, as_dict, as_str, check_age, clean_email,
    epoch_to_rfc3339, extract_tags, join_reason, make_event, not_configured, parse_json,
    require_media_type, stable_hash, strip_angle, unknown,
)

NAME = "mailgun"
CONTENT_TYPES = ("application/json",)

_SIMPLE = {
    "accepted": "message.sent",
    "delivered": "message.delivered",
    "opened": "message.opened",
    "unsubscribed": "message.unsubscribed",
    "complained": "message.spam_reported",
}
_DROP_REASONS = {"suppress-bounce", "suppress-unsubscribe", "suppress-complaint"}
_BLOCK_REASONS = {"espblock", "blacklisted"}
_SOFT_REASONS = {"old"}
_TS_RE = re.compile(r"^\d{1,12}(?:\.\d{1,9})?$")


def verify(data: dict, config: WebhookConfig, now: float) -> None:
    key = config.mailgun_signing_key
    if not key:
        raise not_configured(NAME)
    sig = data.get("signature")
    if not isinstance(sig, dict):
        raise WebhookError(401, "missing_signature",
                           "mailgun webhook body has no \"signature\" object (timestamp, token, signature)")
    timestamp, token, signature = sig.get("timestamp"), sig.get("token"), sig.get("signature")
    if isinstance(timestamp, int) and not isinstance(timestamp, bool):
        timestamp = str(timestamp)
    if not all(isinstance(v, str) and v for v in (timestamp, token, signature)):
        raise WebhookError(401, "missing_signature",
                           "mailgun webhook signature needs string timestamp, token and signature")
    if not _TS_RE.match(timestamp):
        raise WebhookError(403, "bad_timestamp", "mailgun signature timestamp is not unix seconds")
    check_age(NAME, float(timestamp), now, config.max_age_seconds, config.max_age_seconds)
    expected = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature.strip().lower().encode()):
        raise WebhookError(403, "bad_signature", "mailgun webhook signature does not verify")


def handle(headers: dict[str, str], body: bytes, content_type: str, config: WebhookConfig,
           now: float) -> WebhookResult:
    if not config.mailgun_signing_key:
        raise not_configured(NAME)
    require_media_type(NAME, content_type, CONTENT_TYPES)
    data = parse_json(NAME, body)
    if not isinstance(data, dict):
        raise WebhookError(400, "malformed_body", "mailgun webhook body must be a JSON object")
    verify(data, config, now)
    event_data = data.get("event-data")
    if not isinstance(event_data, dict):
        return WebhookResult(unknown=[unknown(NAME, "malformed_event: no event-data object",
                                              {k: v for k, v in data.items() if k != "signature"})])
    try:
        return WebhookResult(events=[normalize(event_data)])
    except Unmapped as exc:
        return WebhookResult(unknown=[unknown(NAME, exc.reason, event_data)])


def _failure_reason(item: dict) -> str:
    status = as_dict(item.get("delivery-status"))
    code = status.get("code") or None  # Mailgun reports 0 when there was no SMTP answer
    text = as_str(status.get("message")) or as_str(status.get("description"))
    detail = join_reason(code, text) if (code or text) else None
    return join_reason(item.get("reason"), detail)


def normalize(item: dict) -> dict:
    kind = as_str(item.get("event"))
    if kind is None:
        raise Unmapped("malformed_event: no event type")
    kind = kind.lower()
    message = as_dict(item.get("message"))
    headers = as_dict(message.get("headers"))
    event_id = as_str(item.get("id"))
    common = dict(
        id_part=event_id if event_id else "h:" + stable_hash(item),
        occurred_at=epoch_to_rfc3339(item.get("timestamp")),
        message_id=strip_angle(as_str(headers.get("message-id"))),
        email=clean_email(item.get("recipient")),
        tags=extract_tags(item.get("user-variables")),
    )
    if kind in _SIMPLE:
        return make_event(NAME, _SIMPLE[kind], **common)
    if kind == "clicked":
        url = as_str(item.get("url"))
        if url is None:
            raise Unmapped("malformed_event: clicked without url")
        return make_event(NAME, "message.clicked", **common, url=url)
    if kind == "rejected":
        reject = as_dict(item.get("reject"))
        return make_event(NAME, "message.dropped", **common,
                          reason=join_reason("rejected", reject.get("reason"), reject.get("description")))
    if kind == "failed":
        severity = (as_str(item.get("severity")) or "").lower()
        reason = (as_str(item.get("reason")) or "").lower()
        if severity == "temporary":
            return make_event(NAME, "message.deferred", **common, reason=_failure_reason(item))
        if severity == "permanent":
            if reason in _DROP_REASONS:
                return make_event(NAME, "message.dropped", **common, reason=_failure_reason(item))
            klass = "block" if reason in _BLOCK_REASONS else "soft" if reason in _SOFT_REASONS else "hard"
            return make_event(NAME, "message.bounced", **common, bounce_class=klass,
                              reason=_failure_reason(item))
        raise Unmapped(f"unknown_severity: {severity or 'missing'}")
    raise Unmapped(f"unknown_event_type: {kind}")


