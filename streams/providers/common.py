"""Shared pieces of the provider webhook adapters.

Everything here is pure: no environment, no clock (``now`` is passed in), no
network, no Kafka/ClickHouse. The adapters turn an authenticated provider
webhook request into canonical ``message.*`` events (SPEC section 2, in their
raw contract form) plus a list of provider events they could not map (which the
HTTP layer sends to ``dead-letters``; nothing is dropped silently).
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import parseaddr
from typing import Any, Mapping

import orjson

from schemas.parser import second_text as _second_text

SCHEMA_VERSION = 1

#: canonical ``message.*`` types produced by the adapters
MESSAGE_TYPES = frozenset({
    "message.sent", "message.delivered", "message.deferred", "message.bounced",
    "message.dropped", "message.opened", "message.clicked", "message.spam_reported",
    "message.unsubscribed", "message.resubscribed", "message.replied", "message.auto_replied",
})
BOUNCE_CLASSES = ("hard", "soft", "block")

#: the environment variable that configures each provider's secret (SPEC section 7)
ENV_VARS = {
    "sendgrid": "SENDTRAIL_SENDGRID_PUBLIC_KEY",
    "mailgun": "SENDTRAIL_MAILGUN_SIGNING_KEY",
    "ses": "SENDTRAIL_SES_CERT_FILE",
    "postmark": "SENDTRAIL_POSTMARK_AUTH",
}


class WebhookError(Exception):
    """A refused webhook request.

    ``status`` is the HTTP status to answer with (400 malformed body, 401
    missing credentials/signature headers, 403 bad signature or stale
    timestamp, 404 unknown provider, 415 wrong content type, 503 provider not
    configured or misconfigured), ``code`` a machine-readable reason and
    ``message`` a sentence for humans. Suggested response body:
    ``{"error": {"code": code, "message": message}}`` (SPEC section 8).
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class WebhookConfig:
    """The webhook secrets (from ``Settings``; ``None`` = that provider refuses webhooks with 503)."""

    sendgrid_public_key: str | None = None   # base64 DER SubjectPublicKeyInfo of the ECDSA P-256 key
    mailgun_signing_key: str | None = None   # "HTTP webhook signing key"
    postmark_auth: str | None = None         # "user:password" expected in HTTP basic auth
    ses_cert_pem: bytes | None = None        # PEM of the SNS signing certificate(s) to trust
    max_age_seconds: int = 600               # allowed clock distance of signed timestamps
    ses_topic_arns: frozenset[str] | None = None  # optional allowlist of SNS TopicArns (None = any)


@dataclass(frozen=True)
class WebhookResult:
    events: list[dict] = field(default_factory=list)
    unknown: list[dict] = field(default_factory=list)
    reply: dict | None = None


# --------------------------------------------------------------------------- errors

def not_configured(provider: str) -> WebhookError:
    var = ENV_VARS[provider]
    return WebhookError(
        503, "provider_not_configured",
        f"{var} is not set; sendtrail cannot verify {provider} webhooks and refuses them",
    )


def misconfigured(provider: str, why: str) -> WebhookError:
    return WebhookError(503, "provider_misconfigured", f"{ENV_VARS[provider]} is unusable: {why}")


# --------------------------------------------------------------------------- request helpers

def normalize_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Lower-cased header names (HTTP header names are case-insensitive)."""
    out: dict[str, str] = {}
    if not headers:
        return out
    for key, value in headers.items():
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        out[str(key).strip().lower()] = str(value).strip()
    return out


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def require_media_type(provider: str, content_type: str | None, allowed: tuple[str, ...]) -> None:
    got = media_type(content_type)
    if got not in allowed:
        raise WebhookError(
            415, "unsupported_media_type",
            f"{provider} webhooks must be sent as {' or '.join(allowed)}, got {got or 'no content type'!r}",
        )


def parse_json(provider: str, body: bytes) -> Any:
    if not body:
        raise WebhookError(400, "malformed_body", f"{provider} webhook body is empty")
    try:
        return orjson.loads(body)
    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
        raise WebhookError(400, "malformed_body", f"{provider} webhook body is not valid JSON: {exc}") from None


def check_age(provider: str, timestamp: float, now: float, max_past: float, max_future: float) -> None:
    """403 when a signed timestamp is further from ``now`` than allowed (replay protection)."""
    if not math.isfinite(timestamp) or not math.isfinite(now):
        raise WebhookError(403, "bad_timestamp", f"{provider} webhook timestamp is not a number")
    age = now - timestamp
    if not age <= max_past:
        raise WebhookError(
            403, "stale_timestamp",
            f"{provider} webhook timestamp is {int(age)}s old (more than {int(max_past)}s); refused as a possible replay",
        )
    if not -age <= max_future:
        raise WebhookError(
            403, "stale_timestamp",
            f"{provider} webhook timestamp is {int(-age)}s in the future (more than {int(max_future)}s); check clocks",
        )


# --------------------------------------------------------------------------- value helpers

def as_str(value: Any) -> str | None:
    """A non-empty stripped string, or None."""
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return None


def as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list:
    return value if isinstance(value, list) else []


def strip_angle(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    return value or None


def clean_email(value: Any) -> str | None:
    """The address part of a recipient (``"Name" <a@b>`` -> ``a@b``); None when not a string."""
    text = as_str(value)
    if text is None:
        return None
    if "<" in text:
        _, addr = parseaddr(text)
        addr = addr.strip()
        return addr or None
    return text


_MAX_EPOCH = 253402300800  # 10000-01-01


def format_dt(dt: datetime) -> str:
    """RFC 3339 in UTC with ``Z``; microseconds only when non-zero."""
    dt = dt.astimezone(timezone.utc)
    text = (f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T"
            f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}")
    if dt.microsecond:
        text += f".{dt.microsecond:06d}"
    return text + "Z"


def epoch_to_rfc3339(value: Any) -> str | None:
    """Unix seconds (int, float or numeric string) -> RFC 3339 ``Z``; None when unusable.

    Same text as :func:`format_dt` of the instant rounded to the microsecond.
    """
    if type(value) is int:  # the common case (SendGrid): no float detour
        if 0 < value < _MAX_EPOCH:
            return _second_text(value) + "Z"
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    if not math.isfinite(seconds) or not 0 < seconds < _MAX_EPOCH:
        return None
    second, micros = divmod(round(seconds * 1_000_000), 1_000_000)
    if micros:
        return f"{_second_text(second)}.{micros:06d}Z"
    return _second_text(second) + "Z"


_ISO_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:[.,](\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))?$"
)


def parse_iso(value: Any) -> datetime | None:
    """ISO 8601 / RFC 3339 (any number of fraction digits; no offset = UTC) -> aware datetime."""
    text = as_str(value)
    if text is None:
        return None
    m = _ISO_RE.match(text)
    if not m:
        return None
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    frac = (m.group(7) or "")[:6].ljust(6, "0")
    try:
        if second == 60:  # leap second: clamp
            second = 59
        dt = datetime(year, month, day, hour, minute, second, int(frac), tzinfo=timezone.utc)
        if m.group(9):
            offset = timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
            if offset >= timedelta(hours=24):
                return None
            dt = dt - offset if m.group(9) == "+" else dt + offset
        dt.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        return None
    return dt


def iso_to_rfc3339(value: Any) -> str | None:
    dt = parse_iso(value)
    if dt is None:
        return None
    try:
        return format_dt(dt)
    except (ValueError, OverflowError):
        return None


def stable_hash(*parts: Any) -> str:
    """A short deterministic hash of JSON-able parts (for providers without an event id)."""
    data = orjson.dumps(list(parts), option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return hashlib.sha256(data).hexdigest()[:32]


# --------------------------------------------------------------------------- sender tags

_TAG_NAMES = {"automationid": "automation_id", "contactid": "contact_id", "stepindex": "step_index"}
_TAG_OF_KEY: dict[str, str | None] = {}  # key as sent -> tag name or None
_TAG_KEYS_OF: dict[tuple, tuple[tuple[str, str], ...]] = {}  # a source's keys, in order -> its (key, tag name)s
_CACHE_MAX = 4096  # both caches start over when they reach this many entries (keys come from the outside)
_UNSEEN = object()


def _tag_of(key: Any) -> str | None:
    if not isinstance(key, str):
        return None
    name = _TAG_OF_KEY.get(key, _UNSEEN)
    if name is _UNSEEN:
        if len(_TAG_OF_KEY) >= _CACHE_MAX:
            _TAG_OF_KEY.clear()
        name = _TAG_OF_KEY[key] = _TAG_NAMES.get(key.replace("_", "").replace("-", "").lower())
    return name


def _tag_keys(source: dict) -> tuple[tuple[str, str], ...]:
    """The keys of ``source`` that name a tag, in order, with the tag they name.

    Events of one provider share a handful of key sets, so the answer is cached by the
    tuple of keys (hashing it reuses the keys' cached hashes; no per-key Python work).
    """
    signature = tuple(source)
    found = _TAG_KEYS_OF.get(signature)
    if found is None:
        if len(_TAG_KEYS_OF) >= _CACHE_MAX:
            _TAG_KEYS_OF.clear()
        found = []
        for key in signature:
            name = _tag_of(key)
            if name is not None:
                found.append((key, name))
        found = _TAG_KEYS_OF[signature] = tuple(found)
    return found


def extract_tags(*sources: Any) -> dict:
    """``automation_id``, ``contact_id`` and ``step_index`` from sender custom args.

    Key spelling is lenient (``automation_id``, ``automation-id``, ``automationId``);
    list values (SES ``mail.tags``) use their first element; ``step_index`` becomes an
    int when it is an integer or a string of digits and is left out otherwise. Earlier
    sources win.
    """
    out: dict = {}
    for source in sources:
        if not isinstance(source, dict) or not source:
            continue
        for key, name in _tag_keys(source):
            if name in out:
                continue
            value = source[key]
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, str):
                text = value.strip()
                if name == "step_index":
                    if len(text) <= 9 and text.isdecimal():  # what ^\d{1,9}$ matches (Unicode category Nd)
                        out[name] = int(text)
                elif text:
                    out[name] = text
            elif isinstance(value, int) and not isinstance(value, bool):
                if name != "step_index":
                    out[name] = str(value)
                elif 0 <= value < 10**9:
                    out[name] = value
    return out


# --------------------------------------------------------------------------- canonical events

class Unmapped(Exception):
    """Raised while normalizing one provider event: it goes to ``unknown`` with this reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def make_event(
    provider: str,
    type_: str,
    id_part: str,
    occurred_at: str | None,
    message_id: str | None,
    email: str | None,
    tags: dict,
    **fields: Any,
) -> dict:
    """One canonical event in raw contract form, or :class:`Unmapped` when a required field is missing."""
    if type_ not in MESSAGE_TYPES:  # programming error guard
        raise ValueError(type_)
    if not message_id:
        raise Unmapped("missing_message_id")
    if not email:
        raise Unmapped("missing_recipient")
    if not occurred_at:
        raise Unmapped("bad_timestamp")
    event = {
        "event_id": f"{provider}:{id_part}",
        "type": type_,
        "occurred_at": occurred_at,
        "schema_version": SCHEMA_VERSION,
        "message_id": message_id,
        "email": email,
        "provider": provider,
    }
    if fields:
        if "reason" in fields:
            text = fields["reason"]
            fields["reason"] = text if isinstance(text, str) and text.strip() else "unknown"
        if "bounce_class" in fields and fields["bounce_class"] not in BOUNCE_CLASSES:
            raise ValueError(fields["bounce_class"])
        event.update(fields)
    if tags:
        event.update(tags)
    return event


def unknown(provider: str, reason: str, payload: Any) -> dict:
    """An entry of ``WebhookResult.unknown`` (the HTTP layer sends it to dead-letters).

    ``reason`` is machine-readable: a code, optionally followed by ``": "`` and a detail.
    """
    if not isinstance(payload, dict):
        payload = {"value": payload}
    return {"provider": provider, "reason": reason, "payload": payload}


def join_reason(*parts: Any) -> str:
    """Non-empty string parts joined with ': ' (numbers are included as text)."""
    texts = []
    for part in parts:
        if isinstance(part, bool):
            continue
        if isinstance(part, (int, float)):
            part = str(part)
        text = as_str(part)
        if text and text not in texts:
            texts.append(text)
    return ": ".join(texts) if texts else "unknown"
