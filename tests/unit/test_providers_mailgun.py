import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from streams.providers import WebhookError, handle
from tests.unit.provider_helpers import (
    NOW, assert_contract, assert_unknown, config, fixture, mailgun_body, mailgun_signature,
)

P = "mailgun"
MID = "20231114221320.5d3f5e1a2b6c7d8e@mg.sendtrail.dev"


def post(body: bytes, cfg=None, now: float = NOW, content_type="application/json", headers=None):
    return handle(P, headers or {"Content-Type": content_type}, body, content_type, cfg or config(), now)


def signed(name: str, **kw) -> bytes:
    return mailgun_body(fixture(P, name)["event-data"], **kw)


def err_of(fn) -> WebhookError:
    with pytest.raises(WebhookError) as info:
        fn()
    return info.value


# fixture -> (type, event-data id, occurred_at, extra)
EXPECTED = {
    "accepted": ("message.sent", "G9Bn5sl1TC6nu79C8C0bwg", "2023-11-14T22:13:20.123456Z", {}),
    "delivered": ("message.delivered", "CPgfbmQMTCKtHW6uIWtuVe", "2023-11-14T22:13:22.908181Z", {}),
    "failed_permanent_bounce": ("message.bounced", "G9Bn5sl1TC6nu79C8C0bwh", "2023-11-14T22:13:23.500000Z",
                                {"bounce_class": "hard", "reason": "bounce: 550: 550 5.1.1 The email account that you tried to reach does not exist."}),
    "failed_temporary": ("message.deferred", "Fs7-5t81S2ycYbFzsKZkkg", "2023-11-14T22:13:24.250000Z",
                         {"reason": "generic: 452: 4.2.2 The email account that you tried to reach is over quota."}),
    "failed_suppress_bounce": ("message.dropped", "dsa3qUI8SEqN2_Df7pp2bA", "2023-11-14T22:13:25Z",
                               {"reason": "suppress-bounce: 605: Not delivering to previously bounced address"}),
    "failed_suppress_unsubscribe": ("message.dropped", "xK4m2Zt3Qb6Ww1Ee8Rr5Yy", "2023-11-14T22:13:26Z",
                                    {"reason": "suppress-unsubscribe: 606: Not delivering to unsubscribed address"}),
    "failed_suppress_complaint": ("message.dropped", "pL9o8I7u6Y5t4R3e2W1q0A", "2023-11-14T22:13:27Z",
                                  {"reason": "suppress-complaint: 607: Not delivering to a user who marked your messages as spam"}),
    "failed_old": ("message.bounced", "oLdRetRy5GaVeUp00000001", "2023-11-15T06:13:27Z", {"bounce_class": "soft", "reason": "old: Too old"}),
    "failed_espblock": ("message.bounced", "eSpBlOcK0000000000000001", "2023-11-14T22:13:28Z",
                        {"bounce_class": "block", "reason": "espblock: 554: 554 5.7.1 Message rejected due to local policy"}),
    "rejected": ("message.dropped", "R3jEcTeD0000000000000001", "2023-11-14T22:13:29Z",
                 {"reason": "rejected: Sandbox subdomains are for test purposes only."}),
    "opened": ("message.opened", "Ase7i2zsRYeDXztHGENqRA", "2023-11-14T22:15:00.500000Z", {}),
    "clicked": ("message.clicked", "Ase7i2zsRYeDXztHGENqRB", "2023-11-14T22:16:00.750000Z",
                {"url": "https://www.example.com/pricing?utm_source=sendtrail"}),
    "unsubscribed": ("message.unsubscribed", "Ase7i2zsRYeDXztHGENqRC", "2023-11-14T22:16:40Z", {}),
    "complained": ("message.spam_reported", "-Agny091SquKnsrW2NEKUA", "2023-11-14T22:18:20Z", {}),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_event_type_is_normalized(name):
    result = post(signed(name))
    assert result.unknown == [] and result.reply is None
    (event,) = result.events
    assert_contract(event, P)
    type_, event_id, occurred_at, extra = EXPECTED[name]
    assert event == {
        "event_id": f"mailgun:{event_id}", "type": type_, "occurred_at": occurred_at, "schema_version": 1,
        "message_id": MID, "email": "alice@example.com", "provider": "mailgun",
        "automation_id": "aut-7", "contact_id": "c-2001", "step_index": 1, **extra,
    }


def test_event_id_is_stable_across_retries_with_new_tokens():
    a = post(signed("delivered", timestamp=NOW - 100)).events
    b = post(signed("delivered", timestamp=NOW)).events
    assert a == b


def test_message_id_angle_brackets_are_stripped_and_user_variable_spellings():
    data = fixture(P, "opened")["event-data"]
    data["message"]["headers"]["message-id"] = f"<{MID}>"
    data["user-variables"] = {"automation-id": "aut-8", "contactId": 99, "step_index": 3}
    (event,) = post(mailgun_body(data)).events
    assert event["message_id"] == MID
    assert (event["automation_id"], event["contact_id"], event["step_index"]) == ("aut-8", "99", 3)


def test_no_user_variables_means_no_tags():
    data = fixture(P, "delivered")["event-data"]
    del data["user-variables"]
    (event,) = post(mailgun_body(data)).events
    assert not {"automation_id", "contact_id", "step_index"} & set(event)


def test_unknown_event_types_go_to_unknown():
    result = post(signed("stored"))
    assert result.events == []
    (entry,) = result.unknown
    assert_unknown(entry, P, "unknown_event_type")
    assert entry["payload"]["event"] == "stored"


def test_incomplete_authentic_events_go_to_unknown_not_400():
    data = fixture(P, "delivered")["event-data"]
    del data["message"]
    assert_unknown(post(mailgun_body(data)).unknown[0], P, "missing_message_id")
    data = fixture(P, "failed_temporary")["event-data"]
    data["severity"] = "catastrophic"
    assert_unknown(post(mailgun_body(data)).unknown[0], P, "unknown_severity")
    assert_unknown(post(mailgun_body("just a string")).unknown[0], P, "malformed_event")


# ----------------------------------------------------------------------------- authenticity

def test_documented_example_signature_verifies():
    # the example from Mailgun's docs is a valid HMAC of timestamp+token for *some* key; ours must
    # compute the same construction: hex(HMAC-SHA256(key, timestamp + token))
    sig = mailgun_signature(1529006854, "a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0")
    body = json.dumps({"signature": sig, "event-data": fixture(P, "delivered")["event-data"]}).encode()
    assert post(body, now=1529006854 + 5).events


def test_tampered_signature_is_403():
    body = json.loads(signed("delivered"))
    body["signature"]["token"] += "x"
    err = err_of(lambda: post(json.dumps(body).encode()))
    assert (err.status, err.code) == (403, "bad_signature")


def test_wrong_key_is_403():
    err = err_of(lambda: post(signed("delivered", key="key-someone-else")))
    assert (err.status, err.code) == (403, "bad_signature")
    err = err_of(lambda: post(signed("delivered"), cfg=config(mailgun_signing_key="key-rotated")))
    assert err.status == 403


@pytest.mark.parametrize("skew", [601, -601, 10**6])
def test_stale_timestamp_is_403(skew):
    err = err_of(lambda: post(signed("delivered", timestamp=NOW - skew)))
    assert (err.status, err.code) == (403, "stale_timestamp")


@pytest.mark.parametrize("mutate", [
    lambda b: b.pop("signature"),
    lambda b: b["signature"].pop("signature"),
    lambda b: b["signature"].pop("token"),
    lambda b: b["signature"].pop("timestamp"),
    lambda b: b.__setitem__("signature", "abc"),
])
def test_missing_signature_parts_are_401(mutate):
    body = json.loads(signed("delivered"))
    mutate(body)
    err = err_of(lambda: post(json.dumps(body).encode()))
    assert (err.status, err.code) == (401, "missing_signature")


def test_integer_timestamp_is_accepted():
    body = json.loads(signed("delivered"))
    body["signature"]["timestamp"] = int(body["signature"]["timestamp"])
    assert post(json.dumps(body).encode()).events


def test_unconfigured_is_503():
    err = err_of(lambda: post(signed("delivered"), cfg=config(mailgun_signing_key=None)))
    assert (err.status, err.code) == (503, "provider_not_configured")
    assert "SENDTRAIL_MAILGUN_SIGNING_KEY" in err.message


def test_legacy_form_webhooks_are_415():
    err = err_of(lambda: post(b"event=delivered&token=x", content_type="multipart/form-data; boundary=x"))
    assert err.status == 415


@pytest.mark.parametrize("body", [b"", b"[1,2]", b"{", b"null"])
def test_malformed_bodies_are_400(body):
    assert err_of(lambda: post(body)).status == 400


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1000))
def test_arbitrary_bytes_raise_only_webhook_error(body):
    try:
        post(body)
    except WebhookError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(EXPECTED) + ["stored"]), st.data())
def test_authentic_bodies_with_arbitrary_values_never_crash(name, data):
    event_data = fixture(P, name)["event-data"]
    # replace one (possibly nested) value by arbitrary JSON
    target = event_data
    path = data.draw(st.lists(st.sampled_from(sorted(event_data)), min_size=1, max_size=1))
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = data.draw(json_values)
    result = post(mailgun_body(event_data))
    for event in result.events:
        assert_contract(event, P)
    assert len(result.events) + len(result.unknown) == 1
