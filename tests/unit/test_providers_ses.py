import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from streams.providers import WebhookError, handle
from streams.providers.ses import string_to_sign
from tests.unit.provider_helpers import (
    NOW, assert_contract, assert_unknown, config, fixture, sns_headers, sns_keys, sns_notification,
    sns_resign,
)

P = "ses"
SES_MID = "0100018bc9f2a1b2-3c4d5e6f-7a8b-9c0d-1e2f-3a4b5c6d7e8f-000000"
SNS_ID = "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324"
RCPT = "recipient@example.com"
TAGS = {"automation_id": "aut-9", "contact_id": "c-3001", "step_index": 1}


def post_envelope(env: dict, cfg=None, now: float = NOW, headers=None, content_type="text/plain; charset=UTF-8"):
    headers = sns_headers(env) if headers is None else headers
    return handle(P, headers, json.dumps(env).encode(), content_type, cfg or config(), now)


def post_note(note, **kw):
    return post_envelope(sns_notification(note, **{k: v for k, v in kw.items() if k in ("version", "message_id")}),
                         **{k: v for k, v in kw.items() if k not in ("version", "message_id")})


def err_of(fn) -> WebhookError:
    with pytest.raises(WebhookError) as info:
        fn()
    return info.value


# fixture -> (type, occurred_at, extra, tagged)
EXPECTED = {
    "send": ("message.sent", "2023-11-14T22:13:20Z", {}, True),
    "delivery": ("message.delivered", "2023-11-14T22:13:21.567000Z", {}, True),
    "bounce_permanent": ("message.bounced", "2023-11-14T22:13:22Z",
                         {"bounce_class": "hard", "reason": "Permanent/General: smtp; 550 5.1.1 user unknown"}, True),
    "bounce_transient": ("message.bounced", "2023-11-14T22:13:23Z",
                         {"bounce_class": "soft", "reason": "Transient/MailboxFull: smtp; 452 4.2.2 mailbox full"}, True),
    "bounce_undetermined": ("message.bounced", "2023-11-14T22:13:24Z",
                            {"bounce_class": "soft", "reason": "Undetermined/Undetermined"}, True),
    "bounce_suppressed": ("message.dropped", "2023-11-14T22:13:20.500000Z",
                          {"reason": "Permanent/Suppressed: Amazon SES has suppressed sending to this address because it has a recent history of bouncing as an invalid address."}, True),
    "complaint": ("message.spam_reported", "2023-11-15T08:00:00Z", {}, True),
    "reject": ("message.dropped", "2023-11-14T22:13:20Z", {"reason": "Reject: Bad content"}, True),
    "rendering_failure": ("message.dropped", "2023-11-14T22:13:20Z",
                          {"reason": "Rendering Failure: Attribute 'attributeName' is not present in the rendering data."}, True),
    "delivery_delay": ("message.deferred", "2023-11-14T22:43:20Z",
                       {"reason": "TransientCommunicationFailure: smtp; 421 4.4.1 Unable to connect to remote host"}, True),
    "open": ("message.opened", "2023-11-14T22:20:00.123000Z", {}, True),
    "click": ("message.clicked", "2023-11-14T22:21:00.456000Z", {"url": "https://www.example.com/pricing?utm_source=sendtrail"}, True),
    "subscription": ("message.unsubscribed", "2023-11-16T10:00:00Z", {}, True),
    "subscription_optin": ("message.resubscribed", "2023-11-17T10:00:00Z", {}, True),
    "notification_bounce": ("message.bounced", "2023-11-14T22:13:22Z",
                            {"bounce_class": "hard", "reason": "Permanent/General: smtp; 5.1.0 - Unknown address error 550-'5.1.1 user unknown'"}, False),
    "notification_delivery": ("message.delivered", "2023-11-14T22:13:21.567000Z", {}, False),
    "notification_complaint": ("message.spam_reported", "2023-11-15T08:00:00Z", {}, False),
}


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.parametrize("version", ["1", "2"])
def test_each_event_type_is_normalized(name, version):
    result = post_note(fixture(P, name), version=version)
    assert result.unknown == [] and result.reply is None
    (event,) = result.events
    assert_contract(event, P)
    type_, occurred_at, extra, tagged = EXPECTED[name]
    assert event == {
        "event_id": f"ses:{SNS_ID}:{RCPT}:{type_}", "type": type_, "occurred_at": occurred_at, "schema_version": 1,
        "message_id": SES_MID, "email": RCPT, "provider": "ses", **(TAGS if tagged else {}), **extra,
    }


def test_documented_notification_envelope_resigned_is_accepted_and_stable():
    env = fixture(P, "sns_notification")
    a = post_envelope(sns_resign(env, NOW - 100)).events
    b = post_envelope(sns_resign(env, NOW, version="2")).events
    assert a == b and a[0]["type"] == "message.delivered"
    assert a[0]["event_id"] == f"ses:{env['MessageId']}:{RCPT}:message.delivered"


def test_multiple_recipients_fan_out():
    note = fixture(P, "bounce_permanent")
    note["bounce"]["bouncedRecipients"].append({"emailAddress": "\"Other\" <other@example.com>", "diagnosticCode": "smtp; 550 nope"})
    events = post_note(note).events
    assert [e["email"] for e in events] == [RCPT, "other@example.com"]
    assert len({e["event_id"] for e in events}) == 2
    assert events[1]["reason"] == "Permanent/General: smtp; 550 nope"


def test_complaint_on_account_suppression_list_is_dropped():
    note = fixture(P, "complaint")
    note["complaint"]["complaintSubType"] = "OnAccountSuppressionList"
    (event,) = post_note(note).events
    assert event["type"] == "message.dropped"


def test_subscription_confirmation_is_verified_and_returned_not_fetched():
    env = sns_resign(fixture(P, "sns_subscription_confirmation"), NOW)
    result = post_envelope(env)
    assert result.events == [] and result.unknown == []
    assert result.reply["action"] == "confirm_subscription"
    assert result.reply["subscribe_url"] == env["SubscribeURL"]
    assert result.reply["topic_arn"] == env["TopicArn"]
    env["SubscribeURL"] = "https://evil.example.com/confirm"
    assert err_of(lambda: post_envelope(env)).status == 403


def test_unsubscribe_confirmation_reply():
    result = post_envelope(sns_resign(fixture(P, "sns_unsubscribe_confirmation"), NOW, version="2"))
    assert result.reply["action"] == "unsubscribe_confirmation" and result.events == []


def test_string_to_sign_layouts():
    note = {"Type": "Notification", "MessageId": "m", "TopicArn": "t", "Message": "x", "Timestamp": "ts", "Subject": "s",
            "UnsubscribeURL": "u", "SignatureVersion": "1"}
    assert string_to_sign(note) == b"Message\nx\nMessageId\nm\nSubject\ns\nTimestamp\nts\nTopicArn\nt\nType\nNotification\n"
    del note["Subject"]
    assert string_to_sign(note) == b"Message\nx\nMessageId\nm\nTimestamp\nts\nTopicArn\nt\nType\nNotification\n"
    conf = {"Type": "SubscriptionConfirmation", "MessageId": "m", "TopicArn": "t", "Message": "x", "Timestamp": "ts",
            "Token": "k", "SubscribeURL": "s"}
    assert string_to_sign(conf) == (b"Message\nx\nMessageId\nm\nSubscribeURL\ns\nTimestamp\nts\nToken\nk\nTopicArn\nt\n"
                                    b"Type\nSubscriptionConfirmation\n")


def test_unknown_and_malformed_ses_messages_go_to_unknown():
    (entry,) = post_note(fixture(P, "notification_received")).unknown
    assert_unknown(entry, P, "unknown_event_type")
    (entry,) = post_note({"notificationType": "AmazonSnsSubscriptionSucceeded", "message": "ok"}).unknown
    assert_unknown(entry, P, "unknown_event_type")
    (entry,) = post_note("this is not JSON").unknown
    assert_unknown(entry, P, "malformed_event")
    note = fixture(P, "open")
    del note["mail"]["messageId"]
    assert_unknown(post_note(note).unknown[0], P, "missing_message_id")


def test_application_json_content_type_is_accepted():
    env = sns_notification(fixture(P, "send"))
    assert post_envelope(env, content_type="application/json").events


# ----------------------------------------------------------------------------- authenticity

def test_tampered_message_is_403():
    env = sns_notification(fixture(P, "delivery"))
    env["Message"] = env["Message"].replace(RCPT, "mallory@example.com")
    err = err_of(lambda: post_envelope(env))
    assert (err.status, err.code) == (403, "bad_signature")


def test_tampered_subject_is_403_and_removed_subject_is_403():
    env = sns_notification(fixture(P, "delivery"))
    env["Subject"] = "other"
    assert err_of(lambda: post_envelope(env)).status == 403
    env = sns_notification(fixture(P, "delivery"))
    del env["Subject"]
    assert err_of(lambda: post_envelope(env)).status == 403


def test_signature_by_another_certificate_is_403():
    other_key, other_pem = sns_keys(1)
    env = sns_notification(fixture(P, "delivery"), key=other_key)
    assert err_of(lambda: post_envelope(env)).code == "bad_signature"
    # an operator can trust both certificates during an AWS rotation
    assert post_envelope(env, cfg=config(ses_cert_pem=sns_keys()[1] + other_pem)).events


def test_version_mismatch_and_unknown_version_are_403():
    env = sns_notification(fixture(P, "delivery"), version="1")
    env["SignatureVersion"] = "2"
    assert err_of(lambda: post_envelope(env)).status == 403
    env["SignatureVersion"] = "3"
    assert err_of(lambda: post_envelope(env)).status == 403


@pytest.mark.parametrize("age", [3601, -601])
def test_stale_timestamp_is_403(age):
    env = sns_notification(fixture(P, "delivery"), timestamp=NOW - age)
    err = err_of(lambda: post_envelope(env))
    assert (err.status, err.code) == (403, "stale_timestamp")


def test_sns_retries_within_an_hour_are_accepted():
    env = sns_notification(fixture(P, "delivery"), timestamp=NOW - 3500)
    assert post_envelope(env).events


@pytest.mark.parametrize("field", ["Signature", "SignatureVersion"])
def test_missing_signature_is_401(field):
    env = sns_notification(fixture(P, "delivery"))
    del env[field]
    err = err_of(lambda: post_envelope(env))
    assert (err.status, err.code) == (401, "missing_signature")


def test_raw_message_delivery_is_401():
    err = err_of(lambda: post_envelope(fixture(P, "delivery"), headers={}))
    assert err.status == 401


def test_header_type_mismatch_is_400():
    env = sns_notification(fixture(P, "delivery"))
    headers = sns_headers(env) | {"x-amz-sns-message-type": "SubscriptionConfirmation"}
    assert err_of(lambda: post_envelope(env, headers=headers)).status == 400


def test_garbage_signature_is_403():
    env = sns_notification(fixture(P, "delivery"))
    env["Signature"] = "%%%"
    assert err_of(lambda: post_envelope(env)).status == 403
    env["Signature"] = base64.b64encode(b"x" * 256).decode()
    assert err_of(lambda: post_envelope(env)).status == 403


def test_unconfigured_is_503_and_bad_pem_is_503():
    err = err_of(lambda: post_envelope(sns_notification(fixture(P, "send")), cfg=config(ses_cert_pem=None)))
    assert (err.status, err.code) == (503, "provider_not_configured")
    assert "SENDTRAIL_SES_CERT_FILE" in err.message
    err = err_of(lambda: post_envelope(sns_notification(fixture(P, "send")), cfg=config(ses_cert_pem=b"nope")))
    assert (err.status, err.code) == (503, "provider_misconfigured")


def test_wrong_content_type_is_415():
    env = sns_notification(fixture(P, "send"))
    assert err_of(lambda: post_envelope(env, content_type="application/xml")).status == 415


@pytest.mark.parametrize("body", [b"", b"[]", b"{", b'"x"'])
def test_malformed_body_is_400(body):
    assert err_of(lambda: handle(P, {}, body, "text/plain", config(), NOW)).status == 400


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=500))
def test_signed_arbitrary_message_bytes_raise_only_webhook_error(raw):
    env = sns_notification(raw.decode("utf-8", "replace"))
    result = post_envelope(env)
    for event in result.events:
        assert_contract(event, P)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1000))
def test_arbitrary_bodies_raise_only_webhook_error(body):
    try:
        handle(P, {}, body, "text/plain", config(), NOW)
    except WebhookError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(EXPECTED)), st.data())
def test_authentic_messages_with_arbitrary_values_never_crash(name, data):
    note = fixture(P, name)
    target = note
    for _ in range(data.draw(st.integers(1, 3))):
        if not isinstance(target, dict) or not target:
            break
        key = data.draw(st.sampled_from(sorted(target)))
        if isinstance(target[key], dict) and data.draw(st.booleans()):
            target = target[key]
            continue
        target[key] = data.draw(json_values)
        break
    result = post_note(note)
    for event in result.events:
        assert_contract(event, P)
    assert result.events or result.unknown


def test_topic_allowlist():
    env = sns_notification(fixture(P, "delivery"))
    assert post_envelope(env, cfg=config(ses_topic_arns=frozenset({env["TopicArn"]}))).events
    err = err_of(lambda: post_envelope(env, cfg=config(ses_topic_arns=frozenset({"arn:aws:sns:us-east-1:1:other"}))))
    assert (err.status, err.code) == (403, "unexpected_topic")


def test_nan_clock_fails_closed():
    env = sns_notification(fixture(P, "delivery"))
    assert err_of(lambda: post_envelope(env, now=float("nan"))).status == 403
