"""SendGrid (Twilio) signed Event Webhook.

Authenticity: SendGrid signs each POST with ECDSA P-256 / SHA-256 over
``timestamp + raw body``; the signature (base64 ASN.1 DER) comes in
``X-Twilio-Email-Event-Webhook-Signature`` and the timestamp in
``X-Twilio-Email-Event-Webhook-Timestamp``. The public key is the base64 DER
SubjectPublicKeyInfo that the SendGrid UI shows ("Signed Event Webhook" ->
verification key) and is configured as ``SENDTRAIL_SENDGRID_PUBLIC_KEY``. A
timestamp further than ``max_age_seconds`` from now (either direction) is refused.

The body is a JSON array of events; each element becomes one canonical event.

| SendGrid ``event``   | canonical              | extra fields |
|----------------------|------------------------|--------------|
| processed            | message.sent           | |
| delivered            | message.delivered      | |
| deferred             | message.deferred       | reason = ``response`` (or ``reason``) |
| bounce, type=bounce  | message.bounced        | bounce_class hard (block when bounce_classification is Reputation, Content or Frequency or Volume Limits) |
| bounce, type=blocked | message.bounced        | bounce_class block |
| dropped              | message.dropped        | reason |
| open                 | message.opened         | |
| click                | message.clicked        | url |
| spamreport           | message.spam_reported  | |
| unsubscribe          | message.unsubscribed   | |
| group_unsubscribe    | message.unsubscribed   | |
| group_resubscribe    | message.resubscribed   | |

``message_id`` is ``sg_message_id`` up to its first ``.`` (the ``X-Message-Id``
returned at send time); ``event_id`` is ``sendgrid:<sg_event_id>`` (a hash of
the element when SendGrid did not give one); ``occurred_at`` is ``timestamp``
(unix seconds); unique/custom args at the top level of the event give
``automation_id``, ``contact_id``, ``step_index``.
"""
from __future__ import annotations

import base64
import binascii
import functools
import re
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .common import (
    Unmapped, WebhookConfig, WebhookError, WebhookResult, as_str, check_age, clean_email,
    epoch_to_rfc3339, join_reason, make_event, misconfigured, not_configured, parse_json,
    require_media_type, stable_hash, extract_tags, unknown,
)

NAME = "sendgrid"
SIGNATURE_HEADER = "x-twilio-email-event-webhook-signature"
TIMESTAMP_HEADER = "x-twilio-email-event-webhook-timestamp"
CONTENT_TYPES = ("application/json",)

_BLOCK_CLASSIFICATIONS = {"reputation", "content", "frequency or volume limits"}
_SIMPLE = {
    "processed": "message.sent",
    "delivered": "message.delivered",
    "open": "message.opened",
    "spamreport": "message.spam_reported",
    "unsubscribe": "message.unsubscribed",
    "group_unsubscribe": "message.unsubscribed",
    "group_resubscribe": "message.resubscribed",
}
_TS_RE = re.compile(r"^\d{1,12}$")
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


@functools.lru_cache(maxsize=8)
def load_public_key(b64_der: str) -> ec.EllipticCurvePublicKey:
    text = b64_der.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode("".join(text.split()), validate=True))
    except (ValueError, TypeError, binascii.Error) as exc:
        raise misconfigured(NAME, f"not a base64 DER public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise misconfigured(NAME, "the key is not an ECDSA P-256 public key")
    return key


def verify(headers: dict[str, str], body: bytes, config: WebhookConfig, now: float) -> None:
    if not config.sendgrid_public_key:
        raise not_configured(NAME)
    key = load_public_key(config.sendgrid_public_key)
    signature = headers.get(SIGNATURE_HEADER)
    timestamp = headers.get(TIMESTAMP_HEADER)
    if not signature or not timestamp:
        raise WebhookError(
            401, "missing_signature",
            "sendgrid webhook without X-Twilio-Email-Event-Webhook-Signature/-Timestamp headers; "
            "enable the Signed Event Webhook in SendGrid",
        )
    if not _TS_RE.match(timestamp):
        raise WebhookError(403, "bad_timestamp", "X-Twilio-Email-Event-Webhook-Timestamp is not unix seconds")
    check_age(NAME, float(timestamp), now, config.max_age_seconds, config.max_age_seconds)
    try:
        der = base64.b64decode(signature, validate=True)
        key.verify(der, timestamp.encode() + body, _ECDSA_SHA256)
    except (binascii.Error, ValueError, InvalidSignature):
        raise WebhookError(403, "bad_signature", "sendgrid webhook signature does not verify") from None


def handle(headers: dict[str, str], body: bytes, content_type: str, config: WebhookConfig,
           now: float) -> WebhookResult:
    if not config.sendgrid_public_key:
        raise not_configured(NAME)
    require_media_type(NAME, content_type, CONTENT_TYPES)
    verify(headers, body, config, now)
    data = parse_json(NAME, body)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise WebhookError(400, "malformed_body", "sendgrid webhook body must be a JSON array of events")
    events: list[dict] = []
    unknowns: list[dict] = []
    for item in data:
        if not isinstance(item, dict):
            unknowns.append(unknown(NAME, "malformed_event: not an object", item))
            continue
        try:
            events.append(normalize(item))
        except Unmapped as exc:
            unknowns.append(unknown(NAME, exc.reason, item))
    return WebhookResult(events=events, unknown=unknowns)


def message_id(sg_message_id: Any) -> str | None:
    text = as_str(sg_message_id)
    if text is None:
        return None
    return text.split(".", 1)[0].strip() or None


def bounce_class(item: dict) -> str:
    kind = (as_str(item.get("type")) or "").lower()
    classification = (as_str(item.get("bounce_classification")) or "").lower()
    if kind == "blocked":
        return "block"
    if classification in _BLOCK_CLASSIFICATIONS:
        return "block"
    return "hard"


def normalize(item: dict) -> dict:
    get = item.get
    kind = as_str(get("event"))
    if kind is None:
        raise Unmapped("malformed_event: no event type")
    kind = kind.lower()
    event_id = as_str(get("sg_event_id"))
    common = (event_id if event_id else "h:" + stable_hash(item), epoch_to_rfc3339(get("timestamp")),
              message_id(get("sg_message_id")), clean_email(get("email")), extract_tags(item))
    simple = _SIMPLE.get(kind)
    if simple is not None:
        return make_event(NAME, simple, *common)
    if kind == "deferred":
        return make_event(NAME, "message.deferred", *common, reason=join_reason(get("response") or get("reason")))
    if kind == "bounce":
        classification = as_str(get("bounce_classification"))
        return make_event(NAME, "message.bounced", *common, bounce_class=bounce_class(item),
                          reason=join_reason(classification, get("reason") or get("status")))
    if kind == "dropped":
        return make_event(NAME, "message.dropped", *common, reason=join_reason(get("reason")))
    if kind == "click":
        url = as_str(get("url"))
        if url is None:
            raise Unmapped("malformed_event: click without url")
        return make_event(NAME, "message.clicked", *common, url=url)
    raise Unmapped(f"unknown_event_type: {kind}")
