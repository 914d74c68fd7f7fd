"""Postmark webhooks (Delivery, Bounce, SpamComplaint, Open, Click, SubscriptionChange).

Authenticity: Postmark does not sign webhooks; the webhook URL is configured
with HTTP basic auth credentials (``https://user:password@host/webhooks/postmark``)
and Postmark sends ``Authorization: Basic base64(user:password)``. The
decoded credentials are compared with ``SENDTRAIL_POSTMARK_AUTH`` in constant
time. Missing credentials -> 401, wrong ones -> 403. Postmark sends no
timestamp to check, so there is no staleness check (use HTTPS).

One record per POST, by ``RecordType``:

| RecordType / bounce ``Type``                       | canonical              | extra fields |
|----------------------------------------------------|------------------------|--------------|
| Delivery                                           | message.delivered      | |
| Bounce HardBounce, BadEmailAddress                 | message.bounced        | bounce_class hard |
| Bounce SoftBounce, Transient, DnsError, ChallengeVerification, Unknown | message.bounced | bounce_class soft |
| Bounce Blocked, SpamNotification, VirusNotification, DMARCPolicy | message.bounced | bounce_class block |
| Bounce ManuallyDeactivated, Unconfirmed, SMTPApiError, TemplateRenderingFailed | message.dropped | reason |
| Bounce AutoResponder                               | message.auto_replied   | return_at null |
| Bounce Unsubscribe / Subscribe                     | message.unsubscribed / message.resubscribed | |
| Bounce SpamComplaint, RecordType SpamComplaint     | message.spam_reported  | |
| Bounce AddressChange, OpenRelayTest, InboundError  | unknown (not an outcome of the message) | |
| Open                                               | message.opened         | |
| Click                                              | message.clicked        | url = OriginalLink |
| SubscriptionChange SuppressSending true            | SuppressionReason HardBounce -> message.bounced hard, SpamComplaint -> message.spam_reported, else (ManualSuppression) -> message.unsubscribed |
| SubscriptionChange SuppressSending false           | message.resubscribed   | |

Bounce reasons are ``Type: Description: Details``. ``message_id`` is
``MessageID``; ``email`` is ``Recipient`` (``Email`` on bounce records);
``occurred_at`` is DeliveredAt / BouncedAt / ReceivedAt / ChangedAt;
``Metadata`` gives ``automation_id``, ``contact_id``, ``step_index``.

Event ids: Postmark has no event id. Bounce and SpamComplaint records carry
the bounce ``ID`` (stable across retries): ``postmark:bounce:<ID>``. Other
records get ``postmark:<recordtype>:<hash>`` of their stable fields
(RecordType, MessageID, recipient, time field, and OriginalLink /
SuppressSending), identical for every retry of the same record.
"""
from __future__ import annotations

import base64
import binascii
import hmac

from .common import (
    Unmapped, WebhookConfig, WebhookError, WebhookResult, as_str, clean_email,
    extract_tags, iso_to_rfc3339, join_reason, make_event, not_configured, parse_json,
    require_media_type, stable_hash, unknown,
)

NAME = "postmark"
CONTENT_TYPES = ("application/json",)

_BOUNCE_CLASS = {
    "HardBounce": "hard", "BadEmailAddress": "hard",
    "SoftBounce": "soft", "Transient": "soft", "DnsError": "soft", "ChallengeVerification": "soft",
    "Unknown": "soft",
    "Blocked": "block", "SpamNotification": "block", "VirusNotification": "block", "DMARCPolicy": "block",
}
_BOUNCE_DROPPED = {"ManuallyDeactivated", "Unconfirmed", "SMTPApiError", "TemplateRenderingFailed"}
_BOUNCE_NOT_OUTCOME = {"AddressChange", "OpenRelayTest", "InboundError"}


def verify(headers: dict[str, str], config: WebhookConfig) -> None:
    expected = config.postmark_auth
    if not expected:
        raise not_configured(NAME)
    header = headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        raise WebhookError(401, "missing_credentials",
                           "postmark webhook without HTTP basic auth; put user:password in the webhook URL")
    try:
        given = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise WebhookError(401, "missing_credentials", "postmark Authorization header is not valid base64") from None
    if not hmac.compare_digest(given, expected.encode()):
        raise WebhookError(403, "bad_credentials", "postmark webhook basic auth credentials do not match")


def handle(headers: dict[str, str], body: bytes, content_type: str, config: WebhookConfig,
           now: float) -> WebhookResult:
    if not config.postmark_auth:
        raise not_configured(NAME)
    require_media_type(NAME, content_type, CONTENT_TYPES)
    verify(headers, config)
    data = parse_json(NAME, body)
    records = data if isinstance(data, list) else [data]
    if not isinstance(data, (list, dict)):
        raise WebhookError(400, "malformed_body", "postmark webhook body must be a JSON object")
    events: list[dict] = []
    unknowns: list[dict] = []
    for record in records:
        if not isinstance(record, dict):
            unknowns.append(unknown(NAME, "malformed_event: not an object", record))
            continue
        try:
            events.append(normalize(record))
        except Unmapped as exc:
            unknowns.append(unknown(NAME, exc.reason, record))
    return WebhookResult(events=events, unknown=unknowns)


def _hash_id(kind: str, record: dict, email: str | None, when: str | None, *extra) -> str:
    return f"{kind.lower()}:" + stable_hash(kind, record.get("MessageID"), email, when, *extra)


def normalize(record: dict) -> dict:
    kind = as_str(record.get("RecordType"))
    if kind is None:
        raise Unmapped("malformed_event: no RecordType")
    message_id = as_str(record.get("MessageID"))
    tags = extract_tags(record.get("Metadata"))
    if kind == "Delivery":
        email = clean_email(record.get("Recipient"))
        when = iso_to_rfc3339(record.get("DeliveredAt"))
        return make_event(NAME, "message.delivered", _hash_id(kind, record, email, when), when,
                          message_id, email, tags)
    if kind in ("Open", "Click"):
        email = clean_email(record.get("Recipient"))
        when = iso_to_rfc3339(record.get("ReceivedAt"))
        if kind == "Open":
            return make_event(NAME, "message.opened", _hash_id(kind, record, email, when), when,
                              message_id, email, tags)
        url = as_str(record.get("OriginalLink"))
        if url is None:
            raise Unmapped("malformed_event: Click without OriginalLink")
        return make_event(NAME, "message.clicked", _hash_id(kind, record, email, when, url), when,
                          message_id, email, tags, url=url)
    if kind == "SubscriptionChange":
        email = clean_email(record.get("Recipient"))
        when = iso_to_rfc3339(record.get("ChangedAt"))
        suppress = record.get("SuppressSending")
        if not isinstance(suppress, bool):
            raise Unmapped("malformed_event: SuppressSending is not a boolean")
        id_part = _hash_id(kind, record, email, when, suppress)
        if not suppress:
            return make_event(NAME, "message.resubscribed", id_part, when, message_id, email, tags)
        why = as_str(record.get("SuppressionReason")) or "ManualSuppression"
        if why == "HardBounce":
            return make_event(NAME, "message.bounced", id_part, when, message_id, email, tags,
                              bounce_class="hard", reason=join_reason("SubscriptionChange", why))
        if why == "SpamComplaint":
            return make_event(NAME, "message.spam_reported", id_part, when, message_id, email, tags)
        return make_event(NAME, "message.unsubscribed", id_part, when, message_id, email, tags)
    if kind in ("Bounce", "SpamComplaint"):
        email = clean_email(record.get("Email") or record.get("Recipient"))
        when = iso_to_rfc3339(record.get("BouncedAt"))
        bounce_id = record.get("ID")
        if isinstance(bounce_id, int) and not isinstance(bounce_id, bool):
            id_part = f"bounce:{bounce_id}"
        elif as_str(bounce_id):
            id_part = f"bounce:{as_str(bounce_id)}"
        else:
            id_part = _hash_id(kind, record, email, when, record.get("Type"))
        btype = as_str(record.get("Type")) or ("SpamComplaint" if kind == "SpamComplaint" else "Unknown")
        reason = join_reason(btype, record.get("Description"), record.get("Details"))
        args = (id_part, when, message_id, email, tags)
        if kind == "SpamComplaint" or btype == "SpamComplaint":
            return make_event(NAME, "message.spam_reported", *args)
        if btype in _BOUNCE_CLASS:
            return make_event(NAME, "message.bounced", *args, bounce_class=_BOUNCE_CLASS[btype], reason=reason)
        if btype in _BOUNCE_DROPPED:
            return make_event(NAME, "message.dropped", *args, reason=reason)
        if btype == "AutoResponder":
            return make_event(NAME, "message.auto_replied", *args, return_at=None)
        if btype == "Unsubscribe":
            return make_event(NAME, "message.unsubscribed", *args)
        if btype == "Subscribe":
            return make_event(NAME, "message.resubscribed", *args)
        if btype in _BOUNCE_NOT_OUTCOME:
            raise Unmapped(f"unmapped_bounce_type: {btype}")
        raise Unmapped(f"unknown_bounce_type: {btype}")
    raise Unmapped(f"unknown_event_type: {kind}")
