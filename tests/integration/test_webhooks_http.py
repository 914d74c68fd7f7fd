"""The HTTP edge in-process (aiohttp TestServer on 127.0.0.1) with a real Publisher against real Kafka.

Webhooks and ``POST /api/v1/events``: what a 2xx means (every event acknowledged by
Kafka, one message per event, on the contract topic with the contract key), and
that every refusal (401/403/413/415/400/503) writes nothing.
"""
from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from typing import Any, Awaitable, Callable

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from schemas.examples import EXAMPLES
from sendtrail.metrics import Metrics
from sendtrail.settings import Settings
from sendtrail.web import Publisher, WebDeps, build_web_app
from tests.conftest import run_coro
from tests.e2e.harness import free_port
from tests.unit import provider_helpers as ph

CONTRACT = ("automations", "enrollments", "sends", "provider-events", "status-changes", "dead-letters")
MAX_BODY = 64 * 1024


def _settings(bootstrap: str, prefix: str, **kw: Any) -> Settings:
    return Settings(kafka=bootstrap, topic_prefix=prefix, max_body_bytes=MAX_BODY, **kw)


async def _with_app(settings: Settings, publisher: Publisher, scenario: Callable[[TestClient], Awaitable[Any]],
                    webhook_config=None, now: float = ph.NOW) -> Any:
    metrics = Metrics.create(process_collectors=False)
    await publisher.start()
    try:
        app = build_web_app(WebDeps(settings=settings, metrics=metrics, registry=metrics.registry,
                                    publisher=publisher, webhook_config=webhook_config or ph.config(),
                                    now=lambda: now))
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            return await scenario(client)
    finally:
        await publisher.stop()


@pytest.fixture
def topics(create_topics, topic_prefix):
    create_topics([topic_prefix + t for t in CONTRACT], partitions=4)
    return topic_prefix


@pytest.fixture
def run_app(kafka_bootstrap, topics):
    def run(scenario, **kw):
        settings = _settings(kafka_bootstrap, topics)
        publisher = Publisher(kafka_bootstrap, topics, timeout=10.0)
        return run_coro(_with_app(settings, publisher, scenario, **kw))

    return run


async def consume_all(bootstrap: str, topic: str, timeout: float = 15.0) -> list[tuple[bytes, bytes]]:
    """Every message of ``topic`` from the beginning up to its end offsets now (keys and values)."""
    return [(k, v) for _, k, v in await consume_records(bootstrap, topic, timeout)]


async def consume_records(bootstrap: str, topic: str, timeout: float = 15.0) -> list[tuple[int, bytes, bytes]]:
    """(partition, key, value) of every message of ``topic`` up to its end offsets now, in offset order."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    out: list[tuple[int, bytes, bytes]] = []
    try:
        cluster = await consumer._client.fetch_all_metadata()
        parts = cluster.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        assert tps, f"topic {topic} has no partitions"
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= ends[tp] for pos, tp in zip(positions, tps)):
                break
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for records in batch.values():
                out.extend((r.partition, r.key, r.value) for r in records)
        else:
            raise TimeoutError(f"could not read {topic} to its end in {timeout}s")
    finally:
        await consumer.stop()
    return out


def _read(bootstrap: str, prefix: str, topic: str) -> list[tuple[bytes, bytes]]:
    return run_coro(consume_all(bootstrap, prefix + topic))


def _read_all(bootstrap: str, prefix: str) -> dict[str, list]:
    return {t: _read(bootstrap, prefix, t) for t in CONTRACT}


def _sendgrid_batch(n: int, start: int = 0) -> list[dict]:
    kinds = ["processed", "delivered", "open", "click", "bounce", "spamreport", "unsubscribe", "deferred"]
    out = []
    for i in range(start, start + n):
        kind = kinds[i % len(kinds)]
        ev = {"email": f"user{i}@example.com", "timestamp": int(ph.NOW) - 60, "event": kind,
              "sg_event_id": f"ev-{uuid.uuid4().hex}", "sg_message_id": f"msg{i:05d}.filter-1-2-3",
              "automation_id": "aut-1", "contact_id": f"c-{i}", "step_index": "0"}
        if kind == "click":
            ev["url"] = "https://example.com/x"
        if kind == "bounce":
            ev.update(type="bounce", reason="550 no such user", bounce_classification="Invalid Address")
        if kind == "deferred":
            ev["response"] = "421 try later"
        out.append(ev)
    return out


async def _post_sendgrid(client: TestClient, events: Any, tamper: bool = False, **headers: str):
    body = json.dumps(events).encode()
    signed = ph.sendgrid_sign(body)
    if tamper:
        body = body.replace(b"user", b"usex", 1)
    signed.update(headers)
    return await client.post("/webhooks/sendgrid", data=body, headers=signed)


# ----------------------------------------------------------------------------- webhooks

def test_signed_sendgrid_batch_fans_out_one_message_per_event(run_app, kafka_bootstrap, topics):
    batch = _sendgrid_batch(40)
    batch.append({"email": "x@example.com", "timestamp": int(ph.NOW), "event": "brand_new_kind",
                  "sg_event_id": "u-1", "sg_message_id": "unk.1"})

    async def scenario(client):
        resp = await _post_sendgrid(client, batch)
        return resp.status, await resp.json()

    status, body = run_app(scenario)
    assert status == 200, body
    assert body == {"accepted": 40, "unknown": 1}
    got = _read(kafka_bootstrap, topics, "provider-events")
    assert len(got) == 40
    by_key = {}
    for key, value in got:
        ev = orjson.loads(value)
        assert key == ev["message_id"].encode()
        assert ev["provider"] == "sendgrid" and ev["type"].startswith("message.")
        by_key[key.decode()] = ev
    assert sorted(by_key) == sorted(f"msg{i:05d}" for i in range(40))
    assert by_key["msg00003"]["type"] == "message.clicked" and by_key["msg00003"]["url"] == "https://example.com/x"
    assert by_key["msg00004"]["bounce_class"] == "hard"
    # the unknown provider event is never dropped: it is on dead-letters with its original payload
    dead = _read(kafka_bootstrap, topics, "dead-letters")
    assert len(dead) == 1
    doc = orjson.loads(dead[0][1])
    assert doc["reason"] == "unknown_event_type" and doc["topic"] == "webhooks/sendgrid"
    assert orjson.loads(doc["original_text"])["event"] == "brand_new_kind"
    assert dead[0][0] == b"unk.1"


def test_other_providers_are_written_keyed_by_message_id(run_app, kafka_bootstrap, topics):
    mg = ph.fixture("mailgun", "delivered")["event-data"]
    pm = ph.fixture("postmark", "delivery")
    ses_msg = ph.fixture("ses", "delivery")

    async def scenario(client):
        out = []
        resp = await client.post("/webhooks/mailgun", data=ph.mailgun_body(mg),
                                 headers={"Content-Type": "application/json"})
        out.append((resp.status, await resp.text()))
        resp = await client.post("/webhooks/postmark", data=json.dumps(pm).encode(), headers=ph.postmark_headers())
        out.append((resp.status, await resp.text()))
        env = ph.sns_notification(ses_msg)
        resp = await client.post("/webhooks/ses", data=json.dumps(env).encode(), headers=ph.sns_headers(env))
        out.append((resp.status, await resp.text()))
        return out

    results = run_app(scenario)
    assert [s for s, _ in results] == [200, 200, 200], results
    got = [(k, orjson.loads(v)) for k, v in _read(kafka_bootstrap, topics, "provider-events")]
    assert sorted(ev["provider"] for _, ev in got) == ["mailgun", "postmark", "ses"]
    for key, ev in got:
        assert key == ev["message_id"].encode()
        assert ev["type"] == "message.delivered"


def test_refused_webhooks_write_nothing(kafka_bootstrap, topics):
    """403 tampered / 401 unsigned / 415 / 413 / 400 malformed / 503 unconfigured: nothing in Kafka."""
    batch = _sendgrid_batch(5)

    async def scenario(client):
        out = {}
        resp = await _post_sendgrid(client, batch, tamper=True)
        out["tampered"] = (resp.status, await resp.json())
        body = json.dumps(batch).encode()
        resp = await client.post("/webhooks/sendgrid", data=body, headers={"Content-Type": "application/json"})
        out["unsigned"] = (resp.status, await resp.json())
        resp = await _post_sendgrid(client, batch, **{"Content-Type": "text/plain"})
        out["content_type"] = (resp.status, await resp.json())
        big = _sendgrid_batch(400)
        resp = await _post_sendgrid(client, big)
        out["too_large"] = (resp.status, await resp.json())
        bad = b'[{"event": "delivered", '
        resp = await client.post("/webhooks/sendgrid", data=bad, headers=ph.sendgrid_sign(bad))
        out["malformed"] = (resp.status, await resp.json())
        resp = await client.post("/webhooks/mailgun", data=ph.mailgun_body(ph.fixture("mailgun", "delivered")["event-data"]),
                                 headers={"Content-Type": "application/json"})
        out["unconfigured"] = (resp.status, await resp.json())
        resp = await client.post("/webhooks/nope", data=b"{}", headers={"Content-Type": "application/json"})
        out["unknown_provider"] = (resp.status, await resp.json())
        stale = json.dumps(batch).encode()
        headers = ph.sendgrid_sign(stale, timestamp=ph.NOW - 3600)
        resp = await client.post("/webhooks/sendgrid", data=stale, headers=headers)
        out["stale"] = (resp.status, await resp.json())
        return out

    settings = _settings(kafka_bootstrap, topics)
    out = run_coro(_with_app(settings, Publisher(kafka_bootstrap, topics), scenario,
                             webhook_config=ph.config(mailgun_signing_key=None)))
    expected = {"tampered": 403, "unsigned": 401, "content_type": 415, "too_large": 413, "malformed": 400,
                "unconfigured": 503, "unknown_provider": 404, "stale": 403}
    assert {k: s for k, (s, _) in out.items()} == expected, out
    for name, (_, body) in out.items():
        assert body["error"]["code"] and body["error"]["message"], (name, body)
    assert "SENDTRAIL_MAILGUN_SIGNING_KEY" in out["unconfigured"][1]["error"]["message"]
    assert out["malformed"][1]["error"]["code"] == "malformed_body"
    assert {t: len(v) for t, v in _read_all(kafka_bootstrap, topics).items()} == {t: 0 for t in CONTRACT}


# ----------------------------------------------------------------------------- POST /api/v1/events

def _canonical_batch() -> list[dict]:
    out = []
    for i, (type_, ex) in enumerate(sorted(EXAMPLES.items())):
        ev = copy.deepcopy(ex)
        ev["event_id"] = f"api-{i}-{uuid.uuid4().hex[:6]}"
        out.append(ev)
    return out


def test_events_batch_goes_to_the_contract_topics_with_contract_keys(run_app, kafka_bootstrap, topics):
    events = _canonical_batch()

    async def scenario(client):
        resp = await client.post("/api/v1/events", json={"events": events})
        first = (resp.status, await resp.json())
        resp = await client.post("/api/v1/events", json=events[0])  # one bare event works too
        return first, (resp.status, await resp.json())

    (status, body), (status1, body1) = run_app(scenario)
    assert status == 202, body
    assert body == {"accepted": len(events)}
    assert status1 == 202 and body1 == {"accepted": 1}
    expected: dict[str, list[tuple[bytes, str]]] = {}
    for ev in events + [events[0]]:
        t = ev["type"]
        topic, key = {"automation": ("automations", "automation_id"), "contact": ("enrollments", "contact_id"),
                      "step": ("sends", "contact_id"), "message": ("provider-events", "message_id")}[t.split(".")[0]]
        expected.setdefault(topic, []).append((ev[key].encode(), ev["event_id"]))
    got = _read_all(kafka_bootstrap, topics)
    for topic in ("automations", "enrollments", "sends", "provider-events"):
        have = sorted((k, orjson.loads(v)["event_id"]) for k, v in got[topic])
        assert have == sorted(expected[topic]), topic
    assert got["dead-letters"] == [] and got["status-changes"] == []
    # the value is the event as sent (the worker validates it again)
    sent = {e["event_id"]: e for e in events}
    for topic in ("automations", "enrollments", "sends", "provider-events"):
        for _, v in got[topic]:
            doc = orjson.loads(v)
            assert doc == sent[doc["event_id"]]


def test_invalid_events_batch_is_refused_whole(run_app, kafka_bootstrap, topics):
    events = _canonical_batch()
    bad_missing = dict(events[1])
    bad_missing.pop("occurred_at")
    bad_type = dict(events[2], type="contact.teleported")
    bad_enum = copy.deepcopy(EXAMPLES["message.bounced"])
    bad_enum["bounce_class"] = "squishy"
    batch = [events[0], bad_missing, events[3], bad_type, "not an object", bad_enum]

    async def scenario(client):
        out = {}
        resp = await client.post("/api/v1/events", json=batch)
        out["invalid"] = (resp.status, await resp.json())
        resp = await client.post("/api/v1/events", data=b"{nope", headers={"Content-Type": "application/json"})
        out["not_json"] = (resp.status, await resp.json())
        resp = await client.post("/api/v1/events", data=json.dumps(events).encode(),
                                 headers={"Content-Type": "text/plain"})
        out["content_type"] = (resp.status, await resp.json())
        resp = await client.post("/api/v1/events", json=[])
        out["empty"] = (resp.status, await resp.json())
        huge = [dict(events[0], event_id=f"h{i}", description="x" * 1000) for i in range(100)]
        resp = await client.post("/api/v1/events", json=huge)
        out["too_large"] = (resp.status, await resp.json())
        return out

    out = run_app(scenario)
    status, body = out["invalid"]
    assert status == 400, body
    err = body["error"]
    assert err["code"] == "invalid_events"
    assert [(e["index"], e["reason"]) for e in err["events"]] == [
        (1, "missing_field"), (3, "unknown_type"), (4, "not_an_object"), (5, "bad_enum")]
    assert all(e["message"] for e in err["events"])
    assert out["not_json"][0] == 400 and out["not_json"][1]["error"]["code"] == "invalid_json"
    assert out["content_type"][0] == 415
    assert out["empty"][0] == 400
    assert out["too_large"][0] == 413
    assert {t: len(v) for t, v in _read_all(kafka_bootstrap, topics).items()} == {t: 0 for t in CONTRACT}


# ----------------------------------------------------------------------------- Kafka unavailable

def test_kafka_unreachable_answers_503_and_comes_back(kafka_bootstrap, topics):
    """A Publisher whose Kafka does not answer: webhooks and events get 503 (providers retry), readiness fails."""
    dead = f"127.0.0.1:{free_port()}"
    settings = _settings(dead, topics)
    publisher = Publisher(dead, topics, timeout=2.0, retry_seconds=0.5)
    batch = _sendgrid_batch(3)

    async def scenario(client):
        out = {}
        resp = await _post_sendgrid(client, batch)
        out["webhook"] = (resp.status, await resp.json(), resp.headers.get("Retry-After"))
        resp = await client.post("/api/v1/events", json=_canonical_batch())
        out["events"] = (resp.status, await resp.json(), resp.headers.get("Retry-After"))
        try:
            await publisher.ping()
            out["ping"] = "ok"
        except Exception as exc:
            out["ping"] = type(exc).__name__
        return out

    started = time.monotonic()
    out = run_coro(_with_app(settings, publisher, scenario))
    assert time.monotonic() - started < 30
    for name in ("webhook", "events"):
        status, body, retry_after = out[name]
        assert status == 503, (name, body)
        assert body["error"]["code"] == "kafka_unavailable"
        assert retry_after
    assert out["ping"] == "PublishError"


def test_publisher_refuses_when_kafka_stops_acknowledging(kafka_bootstrap, topics):
    """A started publisher whose broker goes away mid-life: publish raises (-> 503) within its timeout."""
    from sendtrail.web import PublishError

    async def scenario():
        publisher = Publisher(kafka_bootstrap, topics, timeout=2.0)
        await publisher.start(wait=True)
        try:
            await publisher.publish([("provider-events", b"k", b'{"x": 1}')])
            # point the live producer at a topic that cannot exist (invalid name): the write is refused
            started = time.monotonic()
            with pytest.raises(PublishError):
                await publisher.publish([("bad topic name!!", b"k", b"{}")])
            return time.monotonic() - started
        finally:
            await publisher.stop()

    assert run_coro(scenario()) < 15


def test_publisher_partitions_like_kafka_and_keeps_per_key_order(kafka_bootstrap, topics):
    """Concurrent publishes share batches; every key lands where Kafka's default partitioner puts it, in order."""
    from aiokafka.partitioner import DefaultPartitioner

    keys = [f"m-{i}".encode() for i in range(50)]

    async def scenario():
        publisher = Publisher(kafka_bootstrap, topics)
        await publisher.start(wait=True)
        try:
            async def one(req: int):
                await publisher.publish([("provider-events", k, orjson.dumps({"k": k.decode(), "req": req}))
                                         for k in keys])
            for wave in range(5):
                await asyncio.gather(*(one(wave * 10 + j) for j in range(10)))
        finally:
            await publisher.stop()

    run_coro(scenario())
    records = run_coro(consume_records(kafka_bootstrap, topics + "provider-events"))
    assert len(records) == 50 * 50
    partitioner = DefaultPartitioner()
    seen: dict[bytes, list[int]] = {}
    for partition, key, value in records:
        assert partition == partitioner(key, [0, 1, 2, 3], [0, 1, 2, 3]), key
        seen.setdefault(key, []).append(orjson.loads(value)["req"])
    for key, reqs in seen.items():
        # requests of one wave run concurrently; waves are sequential, so a key's waves come in order
        assert [r // 10 for r in reqs] == sorted(r // 10 for r in reqs), key
        assert sorted(reqs) == list(range(50)), key


def test_publisher_under_staggered_concurrent_load_acknowledges_everything(kafka_bootstrap, topics):
    """Publishes arriving while a partition's batch is being handed over are never stranded."""
    import random

    rng = random.Random(7)

    async def scenario():
        publisher = Publisher(kafka_bootstrap, topics, timeout=20.0)
        await publisher.start(wait=True)
        try:
            async def one(req: int):
                await asyncio.sleep(rng.uniform(0, 0.5))
                await publisher.publish([("provider-events", f"s-{req}-{i}".encode(), b"{}") for i in range(20)])

            started = time.monotonic()
            await asyncio.gather(*(one(r) for r in range(300)))
            return time.monotonic() - started
        finally:
            await publisher.stop()

    elapsed = run_coro(scenario())
    assert elapsed < 20
    assert len(run_coro(consume_records(kafka_bootstrap, topics + "provider-events"))) == 300 * 20
