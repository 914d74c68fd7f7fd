import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from streams.providers import WebhookError, handle
from tests.unit.provider_helpers import (
    NOW, POSTMARK_AUTH, assert_contract, assert_unknown, config, fixture, postmark_headers,
)

P = "postmark"
MID = "883953f4-6105-42a2-a16a-77a8eac79483"
TAGS = {"automation_id": "aut-5", "contact_id": "c-4001", "step_index": 2}
BOUNCED_AT = "2023-11-14T16:33:54.907025Z"


def post(record, headers=None, cfg=None, content_type="application/json"):
    body = record if isinstance(record, bytes) else json.dumps(record).encode()
    return handle(P, postmark_headers() if headers is None else headers, body, content_type, cfg or config(), NOW)


def err_of(fn) -> WebhookError:
    with pytest.raises(WebhookError) as info:
        fn()
    return info.value


def bounce_reason(name):
    r = fixture(P, name)
    return f"{r['Type']}: {r['Description']}: {r['Details']}"


# fixture -> (type, occurred_at, extra, event_id or None for a hash id)
EXPECTED = {
    "delivery": ("message.delivered", "2023-11-14T16:33:54.907025Z", {}, None),
    "bounce_hard": ("message.bounced", BOUNCED_AT, {"bounce_class": "hard"}, "postmark:bounce:4323372036854775807"),
    "bounce_bad_email": ("message.bounced", BOUNCED_AT, {"bounce_class": "hard"}, "postmark:bounce:4323372036854775813"),
    "bounce_soft": ("message.bounced", BOUNCED_AT, {"bounce_class": "soft"}, "postmark:bounce:4323372036854775808"),
    "bounce_transient": ("message.bounced", BOUNCED_AT, {"bounce_class": "soft"}, "postmark:bounce:4323372036854775809"),
    "bounce_dns_error": ("message.bounced", BOUNCED_AT, {"bounce_class": "soft"}, "postmark:bounce:4323372036854775812"),
    "bounce_blocked": ("message.bounced", BOUNCED_AT, {"bounce_class": "block"}, "postmark:bounce:4323372036854775810"),
    "bounce_spam_notification": ("message.bounced", BOUNCED_AT, {"bounce_class": "block"}, "postmark:bounce:4323372036854775811"),
    "bounce_dmarc_policy": ("message.bounced", BOUNCED_AT, {"bounce_class": "block"}, "postmark:bounce:4323372036854775816"),
    "bounce_manually_deactivated": ("message.dropped", BOUNCED_AT, {}, "postmark:bounce:4323372036854775815"),
    "bounce_auto_responder": ("message.auto_replied", BOUNCED_AT, {"return_at": None}, "postmark:bounce:4323372036854775814"),
    "spam_complaint": ("message.spam_reported", "2023-11-15T08:00:00.123456Z", {}, "postmark:bounce:4323372036854775818"),
    "open": ("message.opened", "2023-11-14T17:02:11.123456Z", {}, None),
    "click": ("message.clicked", "2023-11-14T22:03:00Z", {"url": "https://www.example.com/pricing?utm_source=sendtrail"}, None),
    "subscription_change_unsubscribe": ("message.unsubscribed", "2023-11-16T10:53:34.416071Z", {}, None),
    "subscription_change_hard_bounce": ("message.bounced", "2023-11-14T16:33:55Z",
                                        {"bounce_class": "hard", "reason": "SubscriptionChange: HardBounce"}, None),
    "subscription_change_resubscribe": ("message.resubscribed", "2023-11-17T09:00:00Z", {}, None),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_record_type_is_normalized(name):
    result = post(fixture(P, name))
    assert result.unknown == [] and result.reply is None
    (event,) = result.events
    assert_contract(event, P)
    type_, occurred_at, extra, event_id = EXPECTED[name]
    if type_ in ("message.bounced", "message.dropped") and "reason" not in extra:
        extra = dict(extra, reason=bounce_reason(name))
    expected = {
        "type": type_, "occurred_at": occurred_at, "schema_version": 1, "message_id": MID,
        "email": "john@example.com", "provider": "postmark", **TAGS, **extra,
    }
    assert {k: v for k, v in event.items() if k != "event_id"} == expected
    if event_id:
        assert event["event_id"] == event_id
    else:
        assert event["event_id"].startswith(f"postmark:{fixture(P, name)['RecordType'].lower()}:")
    # retries of the same record give the same id
    assert post(fixture(P, name)).events[0]["event_id"] == event["event_id"]


def test_hash_ids_distinguish_distinct_records():
    a = fixture(P, "open")
    b = dict(a, ReceivedAt="2023-11-14T18:00:00Z", FirstOpen=False)
    c = dict(fixture(P, "click"), OriginalLink="https://www.example.com/other")
    ids = {post(r).events[0]["event_id"] for r in (a, b, fixture(P, "click"), c)}
    assert len(ids) == 4
    # fields that are not part of the record's identity do not change the id
    d = dict(a, Geo={}, UserAgent="other")
    assert post(d).events[0]["event_id"] == post(a).events[0]["event_id"]


def test_unmapped_records_go_to_unknown():
    (entry,) = post(fixture(P, "bounce_address_change")).unknown
    assert_unknown(entry, P, "unmapped_bounce_type")
    (entry,) = post(fixture(P, "inbound")).unknown
    assert_unknown(entry, P, "unknown_event_type")
    rec = fixture(P, "bounce_hard")
    rec["Type"] = "SomethingNew"
    assert_unknown(post(rec).unknown[0], P, "unknown_bounce_type")
    rec = fixture(P, "delivery")
    del rec["DeliveredAt"]
    assert_unknown(post(rec).unknown[0], P, "bad_timestamp")


def test_metadata_absent_means_no_tags():
    rec = fixture(P, "delivery")
    del rec["Metadata"]
    (event,) = post(rec).events
    assert not {"automation_id", "contact_id", "step_index"} & set(event)


# ----------------------------------------------------------------------------- authenticity

def test_wrong_password_is_403():
    err = err_of(lambda: post(fixture(P, "delivery"), headers=postmark_headers("postmark-hooks:guess")))
    assert (err.status, err.code) == (403, "bad_credentials")


def test_wrong_configured_password_is_403():
    err = err_of(lambda: post(fixture(P, "delivery"), cfg=config(postmark_auth="postmark-hooks:rotated")))
    assert err.status == 403


@pytest.mark.parametrize("authorization", [None, "", "Bearer abc", "Basic", "Basic !!!notbase64"])
def test_missing_credentials_are_401(authorization):
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    err = err_of(lambda: post(fixture(P, "delivery"), headers=headers))
    assert (err.status, err.code) == (401, "missing_credentials")


def test_header_name_is_case_insensitive():
    headers = {"authorization": "basic " + base64.b64encode(POSTMARK_AUTH.encode()).decode()}
    assert post(fixture(P, "delivery"), headers=headers).events


def test_unconfigured_is_503():
    err = err_of(lambda: post(fixture(P, "delivery"), cfg=config(postmark_auth=None)))
    assert (err.status, err.code) == (503, "provider_not_configured")
    assert "SENDTRAIL_POSTMARK_AUTH" in err.message


def test_wrong_content_type_is_415():
    assert err_of(lambda: post(fixture(P, "delivery"), content_type="text/plain")).status == 415


@pytest.mark.parametrize("body", [b"", b"{", b"12", b'"x"'])
def test_malformed_body_is_400(body):
    assert err_of(lambda: post(body)).status == 400


def test_unauthenticated_malformed_body_is_401_not_400():
    assert err_of(lambda: post(b"{", headers={})).status == 401


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1000))
def test_authenticated_arbitrary_bytes_raise_only_webhook_error(body):
    try:
        result = post(body)
    except WebhookError as err:
        assert err.status == 400
        return
    for event in result.events:
        assert_contract(event, P)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(EXPECTED) + ["inbound", "bounce_address_change"]), st.data())
def test_authentic_records_with_arbitrary_values_never_crash(name, data):
    record = fixture(P, name)
    key = data.draw(st.sampled_from(sorted(record)))
    record[key] = data.draw(json_values)
    result = post(record)
    for event in result.events:
        assert_contract(event, P)
    assert len(result.events) + len(result.unknown) == 1
