"""Amazon SES notifications delivered by SNS (HTTP/S subscription).

Authenticity: every SNS message is signed. The string to sign is ``Key\\nValue\\n``
for, in this order,

* ``Notification``: Message, MessageId, Subject (only when present), Timestamp, TopicArn, Type;
* ``SubscriptionConfirmation`` / ``UnsubscribeConfirmation``: Message, MessageId,
  SubscribeURL, Timestamp, Token, TopicArn, Type;

signed with RSA PKCS#1 v1.5 and SHA-1 (``SignatureVersion`` 1) or SHA-256
(``SignatureVersion`` 2). sendtrail never fetches ``SigningCertURL``: it
verifies with the public key of the certificate(s) in ``SENDTRAIL_SES_CERT_FILE``
(a PEM file; several concatenated certificates are all tried, which lets an
operator add AWS's next certificate before a rotation). SNS keeps a message's
``Timestamp`` across delivery retries, so a message is accepted up to
``max(max_age_seconds, 3600)`` seconds old (and at most ``max_age_seconds`` in the
future); SNS HTTP retry policies longer than an hour would need a larger
allowance. Raw message delivery must be disabled (a raw SES body carries no
signature and is refused with 401).

``SubscriptionConfirmation`` is verified and answered with ``reply =
{"action": "confirm_subscription", "subscribe_url": ..., "topic_arn": ...}``:
sendtrail does not fetch the URL; an operator confirms the subscription by
opening it (the HTTP layer logs it and returns it with a 200).
``UnsubscribeConfirmation`` gives ``{"action": "unsubscribe_confirmation", ...}``.

Note: the SNS certificate is AWS's, shared by every AWS account in the region,
so a valid signature proves the message came from SNS, not from *your* topic.
Since sendtrail never auto-confirms subscriptions, another account's topic
cannot deliver here unless an operator confirms it: confirm only your own
``topic_arn``. ``WebhookConfig.ses_topic_arns`` (optional allowlist) makes this
explicit: messages from other topics are refused with 403 ``unexpected_topic``.

The ``Message`` is SES's JSON (``eventType`` for configuration-set event
publishing, ``notificationType`` for identity notifications); one canonical
event per affected recipient:

| SES type             | canonical              | extra fields |
|----------------------|------------------------|--------------|
| Send                 | message.sent           | (recipients: mail.destination) |
| Delivery             | message.delivered      | (delivery.recipients) |
| DeliveryDelay        | message.deferred       | reason = delayType: diagnosticCode (deliveryDelay.delayedRecipients) |
| Bounce Permanent     | message.bounced hard   | reason = Permanent/subType: diagnosticCode |
| Bounce Permanent, subType Suppressed / OnAccountSuppressionList | message.dropped | reason (SES did not send: address suppressed) |
| Bounce Transient     | message.bounced soft   | |
| Bounce Undetermined  | message.bounced soft   | (not proven permanent: soft, which does not end the contact) |
| Complaint            | message.spam_reported  | (complainedRecipients) |
| Complaint, complaintSubType OnAccountSuppressionList | message.dropped | |
| Reject               | message.dropped        | reason = reject.reason |
| Rendering Failure    | message.dropped        | reason = failure.errorMessage |
| Open                 | message.opened         | (recipients: mail.destination) |
| Click                | message.clicked        | url = click.link |
| Subscription         | message.unsubscribed when unsubscribeAll or any topic OptOut, else message.resubscribed |

``message_id`` is ``mail.messageId``; ``event_id`` is
``ses:<SNS MessageId>:<recipient>:<canonical type>``; ``occurred_at`` is the
event object's ``timestamp`` (``mail.timestamp`` for Send, Reject and
Rendering Failure); ``mail.tags`` (lists of strings) give ``automation_id``,
``contact_id``, ``step_index``. Other notifications (e.g. Received,
AmazonSnsSubscriptionSucceeded) go to ``unknown``.
"""
from __future__ import annotations

import base64
import binascii
import functools

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

import orjson

from .common import (
    Unmapped, WebhookConfig, WebhookError, WebhookResult, as_dict, as_list, as_str, check_age,
    clean_email, extract_tags, iso_to_rfc3339, join_reason, make_event, misconfigured,
    not_configured, parse_iso, parse_json, require_media_type, unknown,
)

NAME = "ses"
CONTENT_TYPES = ("text/plain", "application/json")
MIN_PAST_ALLOWANCE = 3600
TYPE_HEADER = "x-amz-sns-message-type"

NOTIFICATION_FIELDS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
CONFIRMATION_FIELDS = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")
_CONFIRMATIONS = ("SubscriptionConfirmation", "UnsubscribeConfirmation")
_HASHES = {"1": hashes.SHA1, "2": hashes.SHA256}


@functools.lru_cache(maxsize=8)
def load_keys(pem: bytes) -> tuple[rsa.RSAPublicKey, ...]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except (ValueError, TypeError) as exc:
        raise misconfigured(NAME, f"not a PEM X.509 certificate ({exc})") from None
    keys = tuple(c.public_key() for c in certs if isinstance(c.public_key(), rsa.RSAPublicKey))
    if not keys:
        raise misconfigured(NAME, "no RSA certificate in the PEM")
    return keys


def string_to_sign(msg: dict) -> bytes:
    """The canonical SNS string to sign (raises WebhookError when a signed field is missing)."""
    kind = msg.get("Type")
    names = CONFIRMATION_FIELDS if kind in _CONFIRMATIONS else NOTIFICATION_FIELDS
    parts: list[str] = []
    for name in names:
        value = msg.get(name)
        if value is None and name == "Subject":
            continue
        if not isinstance(value, str):
            raise WebhookError(400, "malformed_body", f"SNS message field {name} is missing or not a string")
        parts.append(f"{name}\n{value}\n")
    return "".join(parts).encode()


def verify(msg: dict, config: WebhookConfig, now: float) -> None:
    if not config.ses_cert_pem:
        raise not_configured(NAME)
    keys = load_keys(bytes(config.ses_cert_pem))
    signature = msg.get("Signature")
    version = msg.get("SignatureVersion")
    if not isinstance(signature, str) or not signature or version is None:
        raise WebhookError(
            401, "missing_signature",
            "SNS message without Signature/SignatureVersion (is raw message delivery enabled? disable it)",
        )
    hash_cls = _HASHES.get(str(version))
    if hash_cls is None:
        raise WebhookError(403, "bad_signature", f"unsupported SNS SignatureVersion {version!r}")
    if msg.get("Type") not in ("Notification",) + _CONFIRMATIONS:
        raise WebhookError(400, "malformed_body", f"unknown SNS message Type {msg.get('Type')!r}")
    signed = string_to_sign(msg)
    stamp = parse_iso(msg.get("Timestamp"))
    if stamp is None:
        raise WebhookError(403, "bad_timestamp", "SNS Timestamp is not an ISO 8601 time")
    check_age(NAME, stamp.timestamp(), now, max(config.max_age_seconds, MIN_PAST_ALLOWANCE),
              config.max_age_seconds)
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise WebhookError(403, "bad_signature", "SNS Signature is not base64") from None
    for key in keys:
        try:
            key.verify(raw, signed, padding.PKCS1v15(), hash_cls())
            return
        except (InvalidSignature, ValueError):
            continue
    raise WebhookError(403, "bad_signature", "SNS message signature does not verify with the configured certificate")


def handle(headers: dict[str, str], body: bytes, content_type: str, config: WebhookConfig,
           now: float) -> WebhookResult:
    if not config.ses_cert_pem:
        raise not_configured(NAME)
    require_media_type(NAME, content_type, CONTENT_TYPES)
    msg = parse_json(NAME, body)
    if not isinstance(msg, dict):
        raise WebhookError(400, "malformed_body", "SNS body must be a JSON object")
    header_type = headers.get(TYPE_HEADER)
    if header_type and msg.get("Type") is not None and header_type != msg.get("Type"):
        raise WebhookError(400, "malformed_body",
                           f"x-amz-sns-message-type {header_type!r} does not match the body Type")
    verify(msg, config, now)
    if config.ses_topic_arns is not None and msg["TopicArn"] not in config.ses_topic_arns:
        raise WebhookError(403, "unexpected_topic", f"SNS topic {msg['TopicArn']!r} is not in the allowed topics")
    kind = msg["Type"]
    if kind == "SubscriptionConfirmation":
        return WebhookResult(reply={
            "action": "confirm_subscription",
            "subscribe_url": msg["SubscribeURL"],
            "topic_arn": msg["TopicArn"],
            "message": "sendtrail does not confirm SNS subscriptions itself: open subscribe_url to confirm",
        })
    if kind == "UnsubscribeConfirmation":
        return WebhookResult(reply={
            "action": "unsubscribe_confirmation",
            "subscribe_url": msg["SubscribeURL"],
            "topic_arn": msg["TopicArn"],
            "message": "the SNS subscription was removed; open subscribe_url to subscribe again",
        })
    sns_id = msg["MessageId"]
    try:
        note = orjson.loads(msg["Message"])
    except (orjson.JSONDecodeError, ValueError):
        note = None
    if not isinstance(note, dict):
        return WebhookResult(unknown=[unknown(NAME, "malformed_event: SNS Message is not an SES JSON object",
                                              {"sns_message_id": sns_id, "message": msg["Message"]})])
    events: list[dict] = []
    unknowns: list[dict] = []
    try:
        events = normalize(note, sns_id)
    except Unmapped as exc:
        unknowns.append(unknown(NAME, exc.reason, note))
    return WebhookResult(events=events, unknown=unknowns)


def _recipients(items: list, key: str | None = "emailAddress") -> list[tuple[str | None, dict]]:
    out = []
    for item in items:
        if key is None:
            out.append((clean_email(item), {}))
        elif isinstance(item, dict):
            out.append((clean_email(item.get(key)), item))
        else:
            out.append((None, {}))
    return out


def normalize(note: dict, sns_id: str) -> list[dict]:
    kind = as_str(note.get("eventType")) or as_str(note.get("notificationType"))
    if kind is None:
        raise Unmapped("malformed_event: no eventType/notificationType")
    mail = as_dict(note.get("mail"))
    message_id = as_str(mail.get("messageId"))
    tags = extract_tags(mail.get("tags"))
    destination = _recipients(as_list(mail.get("destination")), key=None)
    mail_time = iso_to_rfc3339(mail.get("timestamp"))

    def build(type_: str, recipients: list[tuple[str | None, dict]], occurred_at: str | None,
              reason_of=None, **fields) -> list[dict]:
        if not recipients:
            raise Unmapped("missing_recipient")
        out = []
        for email, detail in recipients:
            extra = dict(fields)
            if reason_of is not None:
                extra["reason"] = reason_of(detail)
            out.append(make_event(NAME, type_, f"{sns_id}:{email}:{type_}", occurred_at, message_id,
                                  email, tags, **extra))
        return out

    if kind == "Send":
        return build("message.sent", destination, mail_time)
    if kind == "Delivery":
        obj = as_dict(note.get("delivery"))
        return build("message.delivered", _recipients(as_list(obj.get("recipients")), key=None),
                     iso_to_rfc3339(obj.get("timestamp")))
    if kind == "Bounce":
        obj = as_dict(note.get("bounce"))
        btype = as_str(obj.get("bounceType")) or "Undetermined"
        subtype = as_str(obj.get("bounceSubType"))
        when = iso_to_rfc3339(obj.get("timestamp"))
        recipients = _recipients(as_list(obj.get("bouncedRecipients")))

        def reason(detail: dict) -> str:
            label = f"{btype}/{subtype}" if subtype else btype
            return join_reason(label, detail.get("diagnosticCode") or detail.get("status"))

        if btype == "Permanent" and subtype in ("Suppressed", "OnAccountSuppressionList"):
            return build("message.dropped", recipients, when, reason_of=reason)
        klass = {"Permanent": "hard", "Transient": "soft"}.get(btype, "soft")
        return build("message.bounced", recipients, when, reason_of=reason, bounce_class=klass)
    if kind == "Complaint":
        obj = as_dict(note.get("complaint"))
        when = iso_to_rfc3339(obj.get("timestamp"))
        recipients = _recipients(as_list(obj.get("complainedRecipients")))
        if as_str(obj.get("complaintSubType")) == "OnAccountSuppressionList":
            return build("message.dropped", recipients, when,
                         reason_of=lambda _: "Complaint/OnAccountSuppressionList")
        return build("message.spam_reported", recipients, when)
    if kind == "Reject":
        obj = as_dict(note.get("reject"))
        return build("message.dropped", destination, mail_time,
                     reason=join_reason("Reject", obj.get("reason")))
    if kind == "Rendering Failure":
        obj = as_dict(note.get("failure"))
        return build("message.dropped", destination, mail_time,
                     reason=join_reason("Rendering Failure", obj.get("errorMessage")))
    if kind == "DeliveryDelay":
        obj = as_dict(note.get("deliveryDelay"))
        delay = as_str(obj.get("delayType"))
        return build("message.deferred", _recipients(as_list(obj.get("delayedRecipients"))),
                     iso_to_rfc3339(obj.get("timestamp")),
                     reason_of=lambda d: join_reason(delay, d.get("diagnosticCode") or d.get("status")))
    if kind == "Open":
        obj = as_dict(note.get("open"))
        return build("message.opened", destination, iso_to_rfc3339(obj.get("timestamp")))
    if kind == "Click":
        obj = as_dict(note.get("click"))
        url = as_str(obj.get("link"))
        if url is None:
            raise Unmapped("malformed_event: Click without link")
        return build("message.clicked", destination, iso_to_rfc3339(obj.get("timestamp")), url=url)
    if kind == "Subscription":
        obj = as_dict(note.get("subscription"))
        prefs = as_dict(obj.get("newTopicPreferences"))
        opted_out = prefs.get("unsubscribeAll") is True or any(
            as_dict(t).get("subscriptionStatus") == "OptOut"
            for t in as_list(prefs.get("topicSubscriptionStatus"))
        )
        return build("message.unsubscribed" if opted_out else "message.resubscribed", destination,
                     iso_to_rfc3339(obj.get("timestamp")))
    raise Unmapped(f"unknown_event_type: {kind}")
