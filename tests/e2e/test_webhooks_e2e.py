"""Acceptance: provider webhooks through the running worker end up as message statuses and mailing totals.

A real ``sendtrail worker`` subprocess (real Kafka, embedded ClickHouse) with
every provider's secret configured from keys generated here. The automation,
the enrollments and one ``step.sent`` per message go in through ``POST
/api/v1/events``; then, for each provider (SendGrid, Mailgun, SES via SNS,
Postmark), six messages get one outcome each through ``POST /webhooks/<provider>``
(delivered, open, click, bounce, spam report, unsubscribe), signed as the
provider would. Once the worker caught up, the report API must show each
message's status and per-mailing totals that agree with them.
"""
from __future__ import annotations

import json
import time
import urllib.request
import uuid

import pytest

from tests.e2e.harness import WorkerProcess
from tests.unit import provider_helpers as ph

PROVIDERS = ("sendgrid", "mailgun", "ses", "postmark")
OUTCOMES = ("delivered", "open", "click", "bounce", "spam", "unsubscribe")
EXPECTED_STATUS = {"delivered": "delivered", "open": "opened", "click": "clicked", "bounce": "bounced",
                   "spam": "spam_reported", "unsubscribe": "unsubscribed"}
FIXTURES = {
    "mailgun": {"delivered": "delivered", "open": "opened", "click": "clicked", "bounce": "failed_permanent_bounce",
                "spam": "complained", "unsubscribe": "unsubscribed"},
    "postmark": {"delivered": "delivery", "open": "open", "click": "click", "bounce": "bounce_hard",
                 "spam": "spam_complaint", "unsubscribe": "subscription_change_unsubscribe"},
    "ses": {"delivered": "delivery", "open": "open", "click": "click", "bounce": "bounce_permanent",
            "spam": "complaint", "unsubscribe": "subscription"},
}
SENT_AT = "2023-11-14T12:00:00Z"  # before every provider fixture's event time


def _post(port: int, path: str, body: bytes, headers: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _get_json(worker: WorkerProcess, path: str) -> dict:
    status, body = worker.get(path)
    assert status == 200, f"GET {path} -> {status}: {body[:2000]!r}"
    return json.loads(body)


def _retag(provider: str, payload: dict, message_id: str, email: str) -> dict:
    """A fixture payload re-addressed to our message: our message id and recipient, no foreign tags."""
    original = _probe(provider, payload)
    text = json.dumps(payload)
    text = text.replace(original["message_id"], message_id).replace(original["email"], email)
    doc = json.loads(text)
    if provider == "mailgun":
        doc.pop("user-variables", None)
    elif provider == "postmark":
        doc.pop("Metadata", None)
    elif provider == "ses":
        doc.get("mail", {}).pop("tags", None)
    return doc


def _probe(provider: str, payload: dict) -> dict:
    """The canonical event the adapter makes of a fixture (to learn its message id and recipient)."""
    from streams.providers import handle

    if provider == "mailgun":
        result = handle(provider, {"Content-Type": "application/json"}, ph.mailgun_body(payload),
                        "application/json", ph.config(), ph.NOW)
    elif provider == "postmark":
        result = handle(provider, ph.postmark_headers(), json.dumps(payload).encode(), "application/json",
                        ph.config(), ph.NOW)
    else:
        env = ph.sns_notification(payload)
        result = handle(provider, ph.sns_headers(env), json.dumps(env).encode(), "text/plain", ph.config(), ph.NOW)
    assert len(result.events) == 1, (provider, result)
    return result.events[0]


def _sendgrid_event(outcome: str, message_id: str, email: str, ts: int) -> dict:
    ev = {"email": email, "timestamp": ts, "sg_event_id": f"sg-{uuid.uuid4().hex}",
          "sg_message_id": f"{message_id}.filterdrecv-1-2-3", "event": {
              "delivered": "delivered", "open": "open", "click": "click", "bounce": "bounce",
              "spam": "spamreport", "unsubscribe": "unsubscribe"}[outcome]}
    if outcome == "click":
        ev["url"] = "https://www.example.com/pricing"
    if outcome == "bounce":
        ev.update(type="bounce", reason="550 5.1.1 no such user", status="5.1.1",
                  bounce_classification="Invalid Address")
    return ev


def _webhook_request(provider: str, outcome: str, message_id: str, email: str) -> tuple[bytes, dict]:
    now = time.time()
    if provider == "sendgrid":
        body = json.dumps([_sendgrid_event(outcome, message_id, email, int(ph.NOW))]).encode()
        return body, ph.sendgrid_sign(body, timestamp=now)
    payload = ph.fixture(provider, FIXTURES[provider][outcome])
    if provider == "mailgun":
        data = _retag(provider, payload["event-data"], message_id, email)
        return ph.mailgun_body(data, timestamp=now), {"Content-Type": "application/json"}
    if provider == "postmark":
        data = _retag(provider, payload, message_id, email)
        return json.dumps(data).encode(), ph.postmark_headers()
    data = _retag(provider, payload, message_id, email)
    env = ph.sns_notification(data, message_id=str(uuid.uuid4()), timestamp=now)
    return json.dumps(env).encode(), ph.sns_headers(env)


@pytest.fixture
def worker(tmp_path, kafka_bootstrap, topic_prefix):
    cert = tmp_path / "sns-cert.pem"
    cert.write_bytes(ph.sns_keys()[1])
    w = WorkerProcess(tmp_path, kafka_bootstrap, topic_prefix, partitions=2, extra_env={
        "SENDTRAIL_SENDGRID_PUBLIC_KEY": ph.sendgrid_keys()[1],
        "SENDTRAIL_MAILGUN_SIGNING_KEY": ph.MAILGUN_KEY,
        "SENDTRAIL_POSTMARK_AUTH": ph.POSTMARK_AUTH,
        "SENDTRAIL_SES_CERT_FILE": str(cert),
    })
    yield w
    w.stop()


def test_provider_webhooks_become_message_statuses_and_mailing_totals(worker):
    run = uuid.uuid4().hex[:6]
    automation = f"aut-wh-{run}"
    messages = {}  # message_id -> (provider, outcome, contact_id, email)
    for provider in PROVIDERS:
        for outcome in OUTCOMES:
            mid = f"{provider}-{outcome}-{run}"
            messages[mid] = (provider, outcome, f"c-{provider}-{outcome}", f"{outcome}.{provider}@example.com")

    events = [{
        "event_id": f"{automation}:published", "type": "automation.published", "occurred_at": "2023-11-01T00:00:00Z",
        "schema_version": 1, "automation_id": automation, "name": "Webhook acceptance", "description": "e2e",
        "participation": "once", "start_at": "2023-11-01T00:00:00Z", "end_at": None, "published_by": "user-1",
        "version": 1, "steps": [{"index": 0, "name": "Intro", "kind": "email", "day": 0},
                                {"index": 1, "name": "Follow-up", "kind": "email", "day": 3}]}]
    for mid, (provider, outcome, contact, email) in messages.items():
        events.append({
            "event_id": f"{contact}:enrolled", "type": "contact.enrolled", "occurred_at": "2023-11-02T00:00:00Z",
            "schema_version": 1, "automation_id": automation, "contact_id": contact, "user_id": f"u-{contact}",
            "name": f"{outcome.title()} {provider.title()}", "email": email, "company": "Acme",
            "attributes": {}, "needs_enrichment": False})
        events.append({
            "event_id": f"{contact}:sent:0", "type": "step.sent", "occurred_at": SENT_AT, "schema_version": 1,
            "automation_id": automation, "contact_id": contact, "step_index": 0, "message_id": mid,
            "channel": "email", "mailing_id": f"{automation}:{provider}", "subject": f"Hello via {provider}",
            "sending_user": "Grace", "sending_email": "grace@sender.example",
            "step_details": {"day": 0, "inactive_days": 0}, "metadata": {"provider": provider}})

    worker.start()
    # the worker serves HTTP while it boots (migrations, topics) and answers writes with 503 until ready
    worker.wait_http("/readyz", timeout=240)
    status, body = _post(worker.port, "/api/v1/events", json.dumps({"events": events}).encode(),
                         {"Content-Type": "application/json"})
    assert status == 202, body
    assert body == {"accepted": len(events)}

    for mid, (provider, outcome, contact, email) in messages.items():
        data, headers = _webhook_request(provider, outcome, mid, email)
        status, body = _post(worker.port, f"/webhooks/{provider}", data, headers)
        assert status == 200, (provider, outcome, status, body)
        assert body.get("accepted") == 1 and body.get("unknown") == 0, (provider, outcome, body)
        # a provider retry of the same request changes nothing
        if outcome == "click":
            status, body = _post(worker.port, f"/webhooks/{provider}", data, headers)
            assert status == 200, (provider, outcome, status, body)

    # refused requests are not processed: a bad signature for an existing message changes nothing
    data, headers = _webhook_request("sendgrid", "bounce", f"sendgrid-delivered-{run}", "x@example.com")
    status, _ = _post(worker.port, "/webhooks/sendgrid", data.replace(b"bounce", b"bounce "), headers)
    assert status == 403

    worker.wait_caught_up(timeout=300)

    mailings = _get_json(worker, f"/api/v1/mailings?automation_id={automation}&limit=100")
    by_id = {m["mailing_id"]: m for m in mailings["items"]}
    assert sorted(by_id) == sorted(f"{automation}:{p}" for p in PROVIDERS), mailings
    problems = []
    for provider in PROVIDERS:
        mailing_id = f"{automation}:{provider}"
        recipients = _get_json(worker, f"/api/v1/mailings/{urllib.request.quote(mailing_id, safe='')}"
                                       f"/recipients?limit=100")
        got = {r["message_id"]: r for r in recipients["items"]}
        assert recipients["total"] == len(OUTCOMES), recipients
        for outcome in OUTCOMES:
            mid = f"{provider}-{outcome}-{run}"
            row = got.get(mid)
            if row is None:
                problems.append(f"{mid}: missing from the mailing's recipients")
            elif row["status"] != EXPECTED_STATUS[outcome]:
                problems.append(f"{mid}: status {row['status']!r}, expected {EXPECTED_STATUS[outcome]!r}")
            elif not row.get("status_at"):
                problems.append(f"{mid}: no status_at")
        totals = by_id[mailing_id]
        expected = {"total_sent": 6, "opened": 2, "clicked": 1, "bounced": 1, "spam_reports": 1,
                    "unsubscribed": 1, "dropped": 0, "deferred": 0}
        for key, value in expected.items():
            if totals.get(key) != value:
                problems.append(f"mailing {mailing_id} {key}: {totals.get(key)!r}, expected {value}")
        # open and click imply delivered; the plain delivery too
        if not isinstance(totals.get("delivered"), int) or totals["delivered"] < 3:
            problems.append(f"mailing {mailing_id} delivered: {totals.get('delivered')!r}, expected >= 3")
        for key in ("subject", "sending_user", "sending_email"):
            if not totals.get(key):
                problems.append(f"mailing {mailing_id} has no {key}")
    assert not problems, "\n".join(problems)

    # a contact's message status is visible per contact too
    timeline = _get_json(worker, "/api/v1/contacts/c-sendgrid-click/automations")
    assert any(item["automation_id"] == automation for item in timeline["items"]), timeline
    # and on /metrics: every provider's webhooks were counted
    status, metrics = worker.get("/metrics")
    assert status == 200
    for provider in PROVIDERS:
        assert f'sendtrail_webhook_requests_total{{outcome="accepted",provider="{provider}"}}'.encode() in metrics \
            or f'provider="{provider}"'.encode() in metrics
