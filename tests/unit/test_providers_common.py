import ast
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import streams.providers as providers
from streams.providers import PROVIDERS, WebhookConfig, WebhookError, handle
from streams.providers.common import (
    epoch_to_rfc3339, extract_tags, format_dt, iso_to_rfc3339, normalize_headers, strip_angle, clean_email,
)
from tests.unit.provider_helpers import (
    NOW, config, fixture, mailgun_body, postmark_headers, sendgrid_sign, sns_headers, sns_notification,
)


def test_registry_names_and_settings():
    assert set(PROVIDERS) == {"sendgrid", "mailgun", "ses", "postmark"}
    assert {p.env_var for p in PROVIDERS.values()} == {
        "SENDTRAIL_SENDGRID_PUBLIC_KEY", "SENDTRAIL_MAILGUN_SIGNING_KEY",
        "SENDTRAIL_SES_CERT_FILE", "SENDTRAIL_POSTMARK_AUTH",
    }
    assert all(p.configured(config()) for p in PROVIDERS.values())
    assert not any(p.configured(WebhookConfig()) for p in PROVIDERS.values())


def test_unknown_provider_is_404():
    with pytest.raises(WebhookError) as info:
        handle("sparkpost", {}, b"[]", "application/json", config(), NOW)
    assert (info.value.status, info.value.code) == (404, "unknown_provider")


@pytest.mark.parametrize("name", sorted(PROVIDERS))
def test_every_provider_refuses_when_unconfigured_before_looking_at_the_request(name):
    with pytest.raises(WebhookError) as info:
        handle(name, {}, b"garbage", "application/xml", WebhookConfig(), NOW)
    err = info.value
    assert (err.status, err.code) == (503, "provider_not_configured")
    assert PROVIDERS[name].env_var in err.message and "refuses" in err.message


def test_time_helpers():
    assert epoch_to_rfc3339(1700000000) == "2023-11-14T22:13:20Z"
    assert epoch_to_rfc3339(1521472262.908181) == "2018-03-19T15:11:02.908181Z"
    assert epoch_to_rfc3339("1700000000") == "2023-11-14T22:13:20Z"
    for bad in (None, True, "soon", float("nan"), float("inf"), -5, 0, 10**20, [1]):
        assert epoch_to_rfc3339(bad) is None
    assert iso_to_rfc3339("2019-11-05T16:33:54.9070259Z") == "2019-11-05T16:33:54.907025Z"
    assert iso_to_rfc3339("2019-11-05T16:33:54.9070259-05:00") == "2019-11-05T21:33:54.907025Z"
    assert iso_to_rfc3339("2019-11-05T16:33:54+0130") == "2019-11-05T15:03:54Z"
    assert iso_to_rfc3339("2019-11-05T16:33:54") == "2019-11-05T16:33:54Z"
    assert iso_to_rfc3339("2016-12-31T23:59:60Z") == "2016-12-31T23:59:59Z"
    for bad in (None, "", "2019-13-05T16:33:54Z", "0001-01-01T00:00:00+01:00", "yesterday", 5, "2019-11-05"):
        assert iso_to_rfc3339(bad) is None


def test_tag_helpers():
    assert extract_tags({"automation_id": "a", "contact_id": "c", "step_index": "3"}) == \
        {"automation_id": "a", "contact_id": "c", "step_index": 3}
    assert extract_tags({"automationId": ["a", "b"], "contact-id": ["c"], "Step_Index": ["12"]}) == \
        {"automation_id": "a", "contact_id": "c", "step_index": 12}
    assert extract_tags({"step_index": "-1", "automation_id": " ", "contact_id": None}) == {}
    assert extract_tags({"step_index": True}) == {}
    assert extract_tags(None, "x", [1]) == {}
    assert strip_angle("<a@b>") == "a@b" and strip_angle("a@b") == "a@b"
    assert clean_email('"Al" <al@example.com>') == "al@example.com" and clean_email(5) is None


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.integers(1, 253402300799),
                 st.floats(min_value=0, max_value=253402300799.99, exclude_min=True, allow_nan=False),
                 st.floats(min_value=1.6e9, max_value=1.9e9)))
def test_epoch_to_rfc3339_is_format_dt_of_the_instant_rounded_to_the_microsecond(value):
    instant = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=round(float(value) * 1_000_000))
    assert epoch_to_rfc3339(value) == format_dt(instant)
    assert epoch_to_rfc3339(str(value)) == format_dt(instant)


def _tags_reference(*sources):
    """extract_tags written plainly (no caches): every key of every source, in order."""
    names = {"automationid": "automation_id", "contactid": "contact_id", "stepindex": "step_index"}
    out = {}
    for source in sources:
        if not isinstance(source, dict):
            continue
        for key, value in source.items():
            if not isinstance(key, str):
                continue
            name = names.get(key.replace("_", "").replace("-", "").lower())
            if name is None or name in out:
                continue
            if isinstance(value, list):
                value = value[0] if value else None
            if name == "step_index":
                if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**9:
                    out[name] = value
                elif isinstance(value, str) and re.match(r"^\d{1,9}$", value.strip()):
                    out[name] = int(value.strip())
            elif isinstance(value, int) and not isinstance(value, bool):
                out[name] = str(value)
            elif isinstance(value, str) and value.strip():
                out[name] = value.strip()
    return out


_TAG_KEYS = st.sampled_from(["automation_id", "automationId", "AUTOMATION-ID", "contact_id", "contactId",
                             "step_index", "stepIndex", "Step-Index", "email", "event", "_contact_id_", "x"])
_TAG_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 2 * 10**9), st.floats(allow_nan=False),
                        st.sampled_from(["", " ", "a", " b ", "12", " 7 ", "1a", "-1", "1234567890", "١٢", "²"]),
                        st.lists(st.sampled_from(["x", "3", " "]), max_size=2))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.dictionaries(_TAG_KEYS, _TAG_VALUES, max_size=8), st.none(), st.just([1])),
                max_size=3))
def test_extract_tags_matches_the_plain_definition(sources):
    # run twice: the second call answers from the caches of key sets
    assert extract_tags(*sources) == _tags_reference(*sources)
    assert list(extract_tags(*sources).items()) == list(_tags_reference(*sources).items())


def test_tags_of_a_cached_key_set_come_from_each_event():
    for i in range(3):
        assert extract_tags({"event": "x", "automation_id": f"a{i}", "automationId": "b", "step_index": str(i)}) == \
            {"automation_id": f"a{i}", "step_index": i}
    assert extract_tags({"automation_id": " ", "automationId": "b"}) == {"automation_id": "b"}
    assert extract_tags({"step_index": "١٢"}) == {"step_index": 12} and extract_tags({"step_index": "²"}) == {}
    assert extract_tags({"contact_id": 42}, {"contact_id": "later"}) == {"contact_id": "42"}
    assert extract_tags({1: "x", "contact_id": "c"}) == {"contact_id": "c"}


def test_headers_are_normalized():
    assert normalize_headers({"X-Foo": " bar ", "content-TYPE": b"x"}) == {"x-foo": "bar", "content-type": "x"}


def test_module_is_pure():
    """No Kafka/Faust/ClickHouse imports, no environment or clock reads, no network."""
    forbidden_modules = {"faust", "aiokafka", "kafka", "clickhouse_connect", "chdb", "os", "time", "socket",
                         "urllib", "requests", "aiohttp", "http"}
    root = Path(providers.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in forbidden_modules, f"{path.name} imports {name}"
        text = path.read_text()
        for needle in ("datetime.now", "utcnow", "os.environ", "getenv", "time.time", "date.today"):
            assert needle not in text, f"{path.name} uses {needle}"


def _valid_request(name: str):
    if name == "sendgrid":
        body = json.dumps(fixture("sendgrid", "batch_all_types")).encode()
        return sendgrid_sign(body), body, "application/json"
    if name == "mailgun":
        return {}, mailgun_body(fixture("mailgun", "delivered")["event-data"]), "application/json"
    if name == "ses":
        env = sns_notification(fixture("ses", "delivery"))
        return sns_headers(env), json.dumps(env).encode(), "text/plain; charset=UTF-8"
    return postmark_headers(), json.dumps(fixture("postmark", "delivery")).encode(), "application/json"


@pytest.mark.parametrize("name", sorted(PROVIDERS))
def test_valid_request_for_every_provider_is_accepted(name):
    headers, body, ctype = _valid_request(name)
    result = handle(name, headers, body, ctype, config(), NOW)
    assert result.events and result.unknown == []


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(PROVIDERS)),
    st.dictionaries(st.text(max_size=40), st.text(max_size=60), max_size=4),
    st.binary(max_size=300),
    st.sampled_from(["application/json", "text/plain", "", "application/json; charset=utf-8", "x/y"]),
    st.floats(allow_nan=True, allow_infinity=True) | st.integers(0, 2**40),
)
def test_any_request_raises_only_webhook_error(name, headers, body, ctype, now):
    try:
        handle(name, headers, body, ctype, config(), now)
    except WebhookError as err:
        assert err.status in (400, 401, 403, 415)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(PROVIDERS)), st.data())
def test_mutated_valid_requests_raise_only_webhook_error(name, data):
    headers, body, ctype = _valid_request(name)
    raw = bytearray(body)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        handle(name, headers, bytes(raw), ctype, config(), NOW)
    except WebhookError as err:
        assert err.status in (400, 401, 403)


def test_every_fixture_event_passes_the_contract_validator():
    """Cross-check with the pipeline's own validator (schemas.parser), topic provider-events."""
    parser = pytest.importorskip("schemas.parser")
    from tests.unit import test_providers_mailgun as mg, test_providers_postmark as pm
    from tests.unit import test_providers_sendgrid as sg, test_providers_ses as ses

    events = list(sg.post(sg.batch_body()).events)
    for name in mg.EXPECTED:
        events += mg.post(mg.signed(name)).events
    for name in ses.EXPECTED:
        events += ses.post_note(fixture("ses", name)).events
    for name in pm.EXPECTED:
        events += pm.post(fixture("postmark", name)).events
    assert len(events) == 12 + len(mg.EXPECTED) + len(ses.EXPECTED) + len(pm.EXPECTED)
    for event in events:
        result = parser.parse_object(event, topic="provider-events")
        assert not isinstance(result, parser.Rejection), (event, result)
        assert result["message_id"] == event["message_id"]
