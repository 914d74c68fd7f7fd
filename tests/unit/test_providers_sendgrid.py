import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings, strategies as st, HealthCheck

from streams.providers import WebhookError, handle
from tests.unit.provider_helpers import (
    NOW, assert_contract, assert_unknown, config, fixture, sendgrid_keys, sendgrid_sign,
)

P = "sendgrid"


def post(body: bytes, headers: dict | None = None, cfg=None, now: float = NOW, content_type="application/json"):
    headers = sendgrid_sign(body) if headers is None else headers
    return handle(P, headers, body, content_type, cfg or config(), now)


def batch_body(name="batch_all_types") -> bytes:
    return json.dumps(fixture(P, name)).encode()


MID_ALICE = "Np7xG2Z3TCKq6mHzWj2nVQ"
# sg_event_id -> (type, message_id, email, occurred_at, extra fields, tags)
EXPECTED = {
    "cHJvY2Vzc2VkLTE3MDAwMDAwMDA": ("message.sent", MID_ALICE, "alice@example.com", "2023-11-14T22:13:20Z", {}, ("aut-42", "c-1001", 0)),
    "ZGVsaXZlcmVkLTAtMTcwMDAwMDAwNQ": ("message.delivered", MID_ALICE, "alice@example.com", "2023-11-14T22:13:25Z", {}, ("aut-42", "c-1001", 0)),
    "ZGVmZXJyZWQtMS0xNzAwMDAwMDEw": ("message.deferred", "Wr9KsLd2Q0uVx1mZtA8bCg", "bob@example.net", "2023-11-14T22:13:30Z",
                                     {"reason": "421 4.7.0 Try again later, closing connection."}, ("aut-42", "c-1002", 1)),
    "Ym91bmNlLTAtMTcwMDAwMDAyMA": ("message.bounced", "Xb7PqR3sTuVwXyZa1B2c3D", "carol@example.org", "2023-11-14T22:13:40Z",
                                   {"bounce_class": "hard", "reason": "Invalid Address: 550 5.1.1 The email account that you tried to reach does not exist."},
                                   ("aut-42", "c-1003", 0)),
    "YmxvY2tlZC0wLTE3MDAwMDAwMzA": ("message.bounced", "Qq1Ww2Ee3Rr4Tt5Yy6Uu7I", "dave@example.org", "2023-11-14T22:13:50Z",
                                    {"bounce_class": "block", "reason": "Reputation: 554 5.7.1 Service unavailable; Client host [168.1.1.1] blocked using Spamhaus"},
                                    ("aut-42", "c-1004", 2)),
    "ZHJvcHBlZC0wLTE3MDAwMDAwNDA": ("message.dropped", "Pp0Oo9Ii8Uu7Yy6Tt5Rr4E", "erin@example.com", "2023-11-14T22:14:00Z",
                                    {"reason": "Bounced Address"}, ("aut-42", "c-1005", 1)),
    "b3Blbi0wLTE3MDAwMDAxMDA": ("message.opened", MID_ALICE, "alice@example.com", "2023-11-14T22:15:00Z", {}, ("aut-42", "c-1001", 0)),
    "Y2xpY2stMC0xNzAwMDAwMTYw": ("message.clicked", MID_ALICE, "alice@example.com", "2023-11-14T22:16:00Z",
                                 {"url": "https://www.example.com/pricing?utm_source=sendtrail"}, ("aut-42", "c-1001", 0)),
    "c3BhbXJlcG9ydC0wLTE3MDAwMDAyMDA": ("message.spam_reported", "Ll1Kk2Jj3Hh4Gg5Ff6Dd7S", "frank@example.com", "2023-11-14T22:16:40Z", {}, ("aut-42", "c-1006", 0)),
    "dW5zdWJzY3JpYmUtMC0xNzAwMDAwMzAw": ("message.unsubscribed", "Mm1Nn2Bb3Vv4Cc5Xx6Zz7A", "grace@example.com", "2023-11-14T22:18:20Z", {}, ("aut-42", "c-1007", 1)),
    "Z3JvdXBfdW5zdWItMC0xNzAwMDAwNDAw": ("message.unsubscribed", "Aa9Ss8Dd7Ff6Gg5Hh4Jj3K", "heidi@example.com", "2023-11-14T22:20:00Z", {}, ("aut-42", "c-1008", 2)),
    "Z3JvdXBfcmVzdWItMC0xNzAwMDAwNTAw": ("message.resubscribed", "Aa9Ss8Dd7Ff6Gg5Hh4Jj3K", "heidi@example.com", "2023-11-14T22:21:40Z", {}, ("aut-42", "c-1008", 2)),
}


def test_batch_fans_out_one_event_per_element_in_order():
    result = post(batch_body())
    assert result.unknown == [] and result.reply is None
    assert [e["event_id"] for e in result.events] == [f"sendgrid:{k}" for k in EXPECTED]
    for event in result.events:
        assert_contract(event, P)


@pytest.mark.parametrize("sg_event_id", list(EXPECTED))
def test_each_event_type_is_normalized(sg_event_id):
    events = {e["event_id"]: e for e in post(batch_body()).events}
    type_, message_id, email, occurred_at, extra, (automation_id, contact_id, step_index) = EXPECTED[sg_event_id]
    expected = {
        "event_id": f"sendgrid:{sg_event_id}", "type": type_, "occurred_at": occurred_at, "schema_version": 1,
        "message_id": message_id, "email": email, "provider": "sendgrid",
        "automation_id": automation_id, "contact_id": contact_id, "step_index": step_index, **extra,
    }
    assert events[f"sendgrid:{sg_event_id}"] == expected


def test_event_ids_are_stable_across_retries():
    body = batch_body()
    first = post(body, sendgrid_signed := sendgrid_sign(body, NOW - 30)).events
    second = post(body, sendgrid_sign(body, NOW)).events
    assert first == second
    assert sendgrid_signed  # retried delivery re-signed with a new timestamp gives identical events


def test_untagged_unknown_and_incomplete_elements():
    result = post(batch_body("batch_untagged_and_unknown"))
    assert len(result.events) == 1
    sent = result.events[0]
    assert_contract(sent, P)
    assert sent["type"] == "message.sent" and sent["message_id"] == "Tt1Yy2Uu3Ii4Oo5Pp6Aa7S"
    assert not {"automation_id", "contact_id", "step_index"} & set(sent)
    assert len(result.unknown) == 2
    assert_unknown(result.unknown[0], P, "unknown_event_type")
    assert result.unknown[0]["payload"]["event"] == "account_status_change"
    assert_unknown(result.unknown[1], P, "missing_message_id")


def test_bounce_classification_without_type_and_missing_event_id_hash():
    item = {"email": "x@example.com", "timestamp": 1700000000, "event": "bounce", "reason": "550 blocked",
            "bounce_classification": "Content", "sg_message_id": "abc.def"}
    result = post(json.dumps([item]).encode())
    (event,) = result.events
    assert event["bounce_class"] == "block" and event["message_id"] == "abc"
    assert event["event_id"].startswith("sendgrid:h:")
    assert post(json.dumps([item]).encode()).events[0]["event_id"] == event["event_id"]
    item2 = dict(item, bounce_classification="Invalid Address")
    assert post(json.dumps([item2]).encode()).events[0]["bounce_class"] == "hard"


def test_non_numeric_step_index_is_left_out_and_malformed_elements_go_unknown():
    items = [
        {"email": "x@example.com", "timestamp": 1700000000, "event": "delivered", "sg_event_id": "e1",
         "sg_message_id": "m1.filter", "step_index": "second", "automation_id": 17},
        "not an object",
        {"email": "x@example.com", "timestamp": "yesterday", "event": "delivered", "sg_event_id": "e2", "sg_message_id": "m1"},
        {"email": "x@example.com", "timestamp": 1700000000, "event": "click", "sg_event_id": "e3", "sg_message_id": "m1"},
    ]
    result = post(json.dumps(items).encode())
    (event,) = result.events
    assert event["automation_id"] == "17" and "step_index" not in event
    assert [u["reason"].split(":")[0] for u in result.unknown] == ["malformed_event", "bad_timestamp", "malformed_event"]


# ----------------------------------------------------------------------------- authenticity

def status_of(fn):
    with pytest.raises(WebhookError) as info:
        fn()
    return info.value


def test_valid_signature_with_lowercase_headers_and_charset():
    body = batch_body()
    headers = {k.lower(): v for k, v in sendgrid_sign(body).items()}
    assert len(post(body, headers, content_type="application/json; charset=utf-8").events) == 12


def test_tampered_body_is_refused_403():
    body = batch_body()
    headers = sendgrid_sign(body)
    err = status_of(lambda: post(body.replace(b"alice", b"mallory"), headers))
    assert (err.status, err.code) == (403, "bad_signature")


def test_signature_by_another_key_is_refused_403():
    body = batch_body()
    other = ec.generate_private_key(ec.SECP256R1())
    err = status_of(lambda: post(body, sendgrid_sign(body, key=other)))
    assert (err.status, err.code) == (403, "bad_signature")


def test_configured_key_of_someone_else_refuses_403():
    other = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    body = batch_body()
    err = status_of(lambda: post(body, cfg=config(sendgrid_public_key=base64.b64encode(other).decode())))
    assert err.status == 403


def test_timestamp_is_part_of_the_signed_payload():
    body = batch_body()
    headers = sendgrid_sign(body, NOW - 10)
    headers["X-Twilio-Email-Event-Webhook-Timestamp"] = str(int(NOW))
    assert status_of(lambda: post(body, headers)).code == "bad_signature"


@pytest.mark.parametrize("skew", [-601, 601, 86400])
def test_stale_or_future_timestamp_is_refused_403(skew):
    body = batch_body()
    err = status_of(lambda: post(body, sendgrid_sign(body, NOW - skew)))
    assert (err.status, err.code) == (403, "stale_timestamp")


def test_timestamp_within_window_is_accepted():
    body = batch_body()
    assert post(body, sendgrid_sign(body, NOW - 599)).events
    assert post(body, sendgrid_sign(body, NOW + 599)).events


@pytest.mark.parametrize("drop", ["X-Twilio-Email-Event-Webhook-Signature", "X-Twilio-Email-Event-Webhook-Timestamp"])
def test_missing_headers_are_refused_401(drop):
    body = batch_body()
    headers = sendgrid_sign(body)
    del headers[drop]
    err = status_of(lambda: post(body, headers))
    assert (err.status, err.code) == (401, "missing_signature")


def test_garbage_signature_is_403():
    body = batch_body()
    headers = sendgrid_sign(body)
    headers["X-Twilio-Email-Event-Webhook-Signature"] = "not base64!!"
    assert status_of(lambda: post(body, headers)).status == 403
    headers["X-Twilio-Email-Event-Webhook-Timestamp"] = "soon"
    assert status_of(lambda: post(body, headers)).status == 403


def test_unconfigured_is_503_naming_the_setting():
    body = batch_body()
    err = status_of(lambda: post(body, cfg=config(sendgrid_public_key=None)))
    assert (err.status, err.code) == (503, "provider_not_configured")
    assert "SENDTRAIL_SENDGRID_PUBLIC_KEY" in err.message


def test_unusable_key_is_503():
    body = batch_body()
    err = status_of(lambda: post(body, cfg=config(sendgrid_public_key="bm90IGEga2V5")))
    assert (err.status, err.code) == (503, "provider_misconfigured")


def test_pem_key_is_accepted_too():
    key = sendgrid_keys()[0].public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    body = batch_body()
    assert post(body, cfg=config(sendgrid_public_key=key.decode())).events


def test_wrong_content_type_is_415():
    body = batch_body()
    err = status_of(lambda: post(body, content_type="application/x-www-form-urlencoded"))
    assert err.status == 415


@pytest.mark.parametrize("body", [b"", b"{not json", b"42", b'"text"', b"\xff\xfe"])
def test_malformed_body_with_valid_signature_is_400(body):
    assert status_of(lambda: post(body)).status == 400


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_arbitrary_signed_bytes_raise_only_webhook_error(body):
    try:
        result = post(body)
    except WebhookError as err:
        assert err.status == 400
        return
    for event in result.events:
        assert_contract(event, P)
