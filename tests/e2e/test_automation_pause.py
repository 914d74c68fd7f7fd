"""Seed 004's master switch through the whole pipeline: pausing an automation pauses its contacts
(also those enrolled while it is paused), resuming it gives each contact back its own status."""
from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from sendtrail.cli import produce
from tests.e2e.harness import WorkerProcess

MIN = 60_000
AID = "aut-switch"


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


class Events:
    def __init__(self, t0: int) -> None:
        self.t0 = t0
        self.n = 0

    def __call__(self, topic: str, key: str, etype: str, minute: int, **fields) -> tuple[str, str, bytes]:
        self.n += 1
        doc = {"event_id": f"ev-switch-{self.n}", "type": etype, "occurred_at": _iso(self.t0 + minute * MIN),
               "schema_version": 1, **fields}
        return topic, key, orjson.dumps(doc)


def _contact(ev: Events, cid: str, minute: int):
    return ev("enrollments", cid, "contact.enrolled", minute, automation_id=AID, contact_id=cid, user_id="u1",
              name=cid.title(), email=f"{cid}@example.com", company=None, attributes={}, needs_enrichment=False)


@pytest.fixture
def worker(tmp_path, kafka_bootstrap, topic_prefix):
    w = WorkerProcess(tmp_path, kafka_bootstrap, topic_prefix, partitions=2)
    yield w
    w.stop()


def _statuses(worker: WorkerProcess) -> dict[str, tuple[str, str | None]]:
    code, body = worker.get(f"/api/v1/automations/{AID}/contacts?limit=100")
    assert code == 200, body
    return {c["contact_id"]: (c["status"], c["reason"]) for c in orjson.loads(body)["items"]}


def _produce(worker: WorkerProcess, events) -> None:
    asyncio.run(produce(worker.settings, events))
    worker.wait_caught_up(timeout=120)


def test_the_master_switch_pauses_every_contact_and_gives_each_its_own_status_back(worker):
    from agents.worker import ensure_topics

    t0 = int(time.time() * 1000) - 3 * 86_400_000
    ev = Events(t0)
    steps = [{"index": k, "name": f"Email {k + 1}", "kind": "email", "day": 2 * k} for k in range(3)]
    before = [
        ev("automations", AID, "automation.published", 0, automation_id=AID, name="Switch", description=None,
           participation="once", start_at=_iso(t0), end_at=None, steps=steps, version=1,
           published_by="u1"),
        _contact(ev, "c-bounced", 1),
        ev("sends", "c-bounced", "step.sent", 2, automation_id=AID, contact_id="c-bounced", step_index=0,
           message_id="m-bounced", channel="email", subject="Hi", sending_user="u1",
           sending_email="me@example.com", mailing_id=None, step_details={}, metadata={}),
        ev("provider-events", "m-bounced", "message.bounced", 3, message_id="m-bounced",
           email="c-bounced@example.com", provider="sendgrid", bounce_class="hard", reason="550 no such user"),
        _contact(ev, "c-vacation", 1),
        ev("enrollments", "c-vacation", "contact.paused", 4, automation_id=AID, contact_id="c-vacation",
           reason="vacation", resume_at=None),
        _contact(ev, "c-plain", 1),
    ]
    asyncio.run(ensure_topics(worker.settings))
    worker.start()
    _produce(worker, before)
    assert _statuses(worker) == {"c-bounced": ("bounced", "hard_bounce"), "c-vacation": ("paused", "vacation"),
                                 "c-plain": ("ready", None)}

    _produce(worker, [ev("automations", AID, "automation.paused", 10, automation_id=AID)])
    _produce(worker, [_contact(ev, "c-late", 11)])  # enrolled while the automation is paused
    assert _statuses(worker) == {c: ("paused", "automation_paused")
                                 for c in ("c-bounced", "c-vacation", "c-plain", "c-late")}

    _produce(worker, [ev("automations", AID, "automation.resumed", 20, automation_id=AID)])
    assert _statuses(worker) == {"c-bounced": ("bounced", "hard_bounce"), "c-vacation": ("paused", "vacation"),
                                 "c-plain": ("ready", None), "c-late": ("ready", None)}
