"""Signing helpers for provider webhook tests (reused by integration tests and benchmarks).

Each helper builds what the real provider would send: headers + raw body bytes
signed with a key generated here, plus the matching ``WebhookConfig`` secret.
"""
from __future__ import annotations

import base64
import copy
import datetime as _dt
import functools
import hashlib
import hmac
import json
import secrets
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from streams.providers import WebhookConfig
from streams.providers.ses import string_to_sign

FIXTURES = Path(__file__).parent / "fixtures" / "providers"
NOW = 1_700_000_600.0  # a fixed "now" for tests (2023-11-14T22:23:20Z)


def fixture(provider: str, name: str) -> Any:
    """The parsed JSON fixture ``fixtures/providers/<provider>/<name>.json`` (a fresh copy)."""
    return json.loads((FIXTURES / provider / f"{name}.json").read_text())


def fixture_names(provider: str) -> list[str]:
    return sorted(p.stem for p in (FIXTURES / provider).glob("*.json"))


# ----------------------------------------------------------------------------- SendGrid

@functools.lru_cache(maxsize=None)
def sendgrid_keys(seed: int = 0) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """(private key, public key as base64 DER SubjectPublicKeyInfo — how SendGrid shows it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, base64.b64encode(der).decode()


def sendgrid_sign(body: bytes, timestamp: float | int = NOW, key: ec.EllipticCurvePrivateKey | None = None) -> dict:
    """Headers of a SendGrid signed event webhook POST of ``body``."""
    key = key or sendgrid_keys()[0]
    ts = str(int(timestamp))
    sig = key.sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(sig).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": ts,
    }


# ----------------------------------------------------------------------------- Mailgun

MAILGUN_KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"


def mailgun_signature(timestamp: float | int = NOW, token: str | None = None, key: str = MAILGUN_KEY) -> dict:
    ts = str(int(timestamp))
    token = token or secrets.token_hex(25)
    digest = hmac.new(key.encode(), (ts + token).encode(), hashlib.sha256).hexdigest()
    return {"timestamp": ts, "token": token, "signature": digest}


def mailgun_body(event_data: Any, timestamp: float | int = NOW, token: str | None = None,
                 key: str = MAILGUN_KEY) -> bytes:
    """A Mailgun webhook body: ``{"signature": {...}, "event-data": event_data}``."""
    return json.dumps({"signature": mailgun_signature(timestamp, token, key), "event-data": event_data}).encode()


# ----------------------------------------------------------------------------- SES / SNS

@functools.lru_cache(maxsize=None)
def sns_keys(seed: int = 0) -> tuple[rsa.RSAPrivateKey, bytes]:
    """(RSA private key, PEM of a self-signed certificate for it) standing in for AWS's SNS cert."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"sns.us-east-1.amazonaws.com ({seed})")])
    start = _dt.datetime(2023, 1, 1, tzinfo=_dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + _dt.timedelta(days=3650)).sign(key, hashes.SHA256()))
    return key, cert.public_bytes(serialization.Encoding.PEM)


def sns_iso(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def sns_sign(envelope: dict, version: str = "1", key: rsa.RSAPrivateKey | None = None) -> dict:
    """Sign an SNS envelope in place (SignatureVersion 1 = SHA1withRSA, 2 = SHA256withRSA)."""
    key = key or sns_keys()[0]
    envelope["SignatureVersion"] = version
    envelope.pop("Signature", None)
    digest = hashes.SHA1() if version == "1" else hashes.SHA256()
    envelope["Signature"] = base64.b64encode(key.sign(string_to_sign(envelope), padding.PKCS1v15(), digest)).decode()
    return envelope


def sns_notification(message: Any, message_id: str = "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
                     timestamp: float = NOW, version: str = "1", subject: str | None = "Amazon SES Email Event Notification",
                     key: rsa.RSAPrivateKey | None = None) -> dict:
    """A signed SNS ``Notification`` envelope whose Message is ``message`` (JSON-encoded unless a str)."""
    env = {
        "Type": "Notification",
        "MessageId": message_id,
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:sendtrail-ses-events",
        "Message": message if isinstance(message, str) else json.dumps(message),
        "Timestamp": sns_iso(timestamp),
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem",
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=arn:aws:sns:us-east-1:123456789012:sendtrail-ses-events:c9135db0",
    }
    if subject is not None:
        env["Subject"] = subject
    return sns_sign(env, version, key)


def sns_resign(envelope: dict, timestamp: float = NOW, version: str = "1",
               key: rsa.RSAPrivateKey | None = None) -> dict:
    """A copy of a documented SNS envelope (fixture) with a fresh Timestamp and a test signature."""
    env = copy.deepcopy(envelope)
    env["Timestamp"] = sns_iso(timestamp)
    return sns_sign(env, version, key)


def sns_headers(envelope: dict) -> dict:
    return {
        "Content-Type": "text/plain; charset=UTF-8",
        "x-amz-sns-message-type": envelope.get("Type", "Notification"),
        "x-amz-sns-message-id": envelope.get("MessageId", ""),
        "x-amz-sns-topic-arn": envelope.get("TopicArn", ""),
        "User-Agent": "Amazon Simple Notification Service Agent",
    }


# ----------------------------------------------------------------------------- Postmark

POSTMARK_AUTH = "postmark-hooks:s3cr3t-Pa55word"


def postmark_headers(auth: str = POSTMARK_AUTH) -> dict:
    return {
        "Content-Type": "application/json",
        "Authorization": "Basic " + base64.b64encode(auth.encode()).decode(),
        "User-Agent": "Postmark",
    }


# ----------------------------------------------------------------------------- config

def config(**overrides: Any) -> WebhookConfig:
    """A WebhookConfig with every provider configured for the test keys above."""
    values = dict(
        sendgrid_public_key=sendgrid_keys()[1],
        mailgun_signing_key=MAILGUN_KEY,
        postmark_auth=POSTMARK_AUTH,
        ses_cert_pem=sns_keys()[1],
        max_age_seconds=600,
    )
    values.update(overrides)
    return WebhookConfig(**values)


def content_type(headers: dict) -> str:
    return next((v for k, v in headers.items() if k.lower() == "content-type"), "")


# ----------------------------------------------------------------------------- contract check

import re as _re

RFC3339_Z = _re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")
_TYPE_FIELDS = {
    "message.sent": (), "message.delivered": (), "message.deferred": ("reason",),
    "message.bounced": ("bounce_class", "reason"), "message.dropped": ("reason",),
    "message.opened": (), "message.clicked": ("url",), "message.spam_reported": (),
    "message.unsubscribed": (), "message.resubscribed": (), "message.replied": (),
    "message.auto_replied": ("return_at",),
}
_BASE = {"event_id", "type", "occurred_at", "schema_version", "message_id", "email", "provider"}
_TAGS = {"automation_id", "contact_id", "step_index"}


def assert_contract(event: dict, provider: str) -> None:
    """The event is a canonical message.* event of SPEC section 2 in raw contract form."""
    assert event["type"] in _TYPE_FIELDS, event
    assert set(event) - _TAGS == _BASE | set(_TYPE_FIELDS[event["type"]]), event
    assert isinstance(event["event_id"], str) and event["event_id"].startswith(provider + ":")
    assert RFC3339_Z.match(event["occurred_at"]), event["occurred_at"]
    assert event["schema_version"] == 1
    assert event["provider"] == provider
    for key in ("message_id", "email"):
        assert isinstance(event[key], str) and event[key].strip() == event[key] and event[key]
    if "reason" in event:
        assert isinstance(event["reason"], str) and event["reason"]
    if "bounce_class" in event:
        assert event["bounce_class"] in ("hard", "soft", "block")
    if "url" in event:
        assert isinstance(event["url"], str) and event["url"]
    if "step_index" in event:
        assert type(event["step_index"]) is int and event["step_index"] >= 0
    for key in ("automation_id", "contact_id"):
        if key in event:
            assert isinstance(event[key], str) and event[key]
    json.dumps(event)  # serializable


def assert_unknown(entry: dict, provider: str, reason_code: str) -> None:
    assert set(entry) == {"provider", "reason", "payload"}
    assert entry["provider"] == provider
    assert entry["reason"].split(":", 1)[0] == reason_code, entry["reason"]
    assert isinstance(entry["payload"], dict)
