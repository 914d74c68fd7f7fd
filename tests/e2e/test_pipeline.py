"""The whole pipeline against its oracle: real Kafka, the real worker process, real (embedded) ClickHouse."""
from __future__ import annotations

import asyncio
import random
import shutil
import time
from collections import Counter

import orjson
import pytest

from agents.runtime import CLEAN
from sendtrail.cli import produce
from sendtrail.report import fetch_report, oracle_differences
from streams.generator import generate
from tests.e2e.harness import WorkerProcess, compare_with_oracle, consume_all, read_end_state

CONTACTS = 800


def _workload(seed: int, invalid: int = 0):
    now_ms = int(time.time() * 1000)
    return generate(seed, automations=3, contacts=CONTACTS, base_ms=now_ms - 10 * 86_400_000, now_ms=now_ms,
                    invalid=invalid)


def _produce(worker: WorkerProcess, events) -> None:
    from agents.worker import ensure_topics

    asyncio.run(ensure_topics(worker.settings))
    asyncio.run(produce(worker.settings, events))


def _assert_exact(worker: WorkerProcess, oracle: dict) -> dict:
    state = read_end_state(worker.tmp / "clickhouse")
    diffs = compare_with_oracle(state, oracle)
    assert not diffs, (f"{len(diffs)} differences from the oracle, first ones:\n" + "\n".join(diffs[:25])
                       + f"\nworker log (starts, warnings, errors, recounts):\n{worker.notable()}")
    return state


@pytest.fixture
def worker(tmp_path, kafka_bootstrap, topic_prefix):
    w = WorkerProcess(tmp_path, kafka_bootstrap, topic_prefix)
    yield w
    w.stop()


def test_generated_workload_matches_the_oracle_exactly(worker):
    workload = _workload(seed=11)
    _produce(worker, workload.events)
    worker.start()
    worker.wait_caught_up(timeout=400)
    status, body = worker.get("/readyz")
    assert status == 200, body
    automations, reports, mailings = fetch_report(f"http://127.0.0.1:{worker.port}", None)  # live, before any stop
    diffs = oracle_differences(automations, reports, mailings, workload.oracle)
    assert not diffs, f"{len(diffs)} differences, first ones:\n" + "\n".join(diffs[:25])
    # the same with a period: counted from the latest rows (SQL), not from the worker's counters
    period = "?from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z"
    counted = {aid: orjson.loads(worker.get(f"/api/v1/automations/{aid}/report{period}")[1]) for aid in reports}
    diffs = oracle_differences(automations, counted, mailings, workload.oracle)
    assert not diffs, f"{len(diffs)} differences, first ones:\n" + "\n".join(diffs[:25])
    worker.stop()
    state = _assert_exact(worker, workload.oracle)
    assert len(state["recipients"]) > CONTACTS  # a real workload, not an empty one
    assert state["duplicate_sends"]  # with steps sent twice, found through the worker's repeat_sends
    # a clean stop says so in its commits: its successor replays nothing
    commits = _commits(worker)
    assert commits and all(meta == CLEAN for _, meta in commits.values()), commits


def _commits(worker: WorkerProcess) -> dict:
    from agents.offsets import committed_metadata

    return asyncio.run(committed_metadata(worker.settings))


def _processed(worker: WorkerProcess) -> float:
    """Records this worker process has fully processed (its sendtrail_events_processed_total)."""
    try:
        status, body = worker.get("/metrics")
    except OSError:
        return 0.0
    for line in body.decode().splitlines():
        if line.startswith("sendtrail_events_processed_total "):
            return float(line.split()[1])
    return 0.0


def _kill_mid_batch(worker: WorkerProcess, target: float, timeout: float = 120.0) -> float:
    """SIGKILL the worker as soon as it has processed ``target`` records (so, mid-stream)."""
    deadline = time.monotonic() + timeout
    done = 0.0
    while time.monotonic() < deadline:
        done = _processed(worker)
        if done >= target:
            break
        time.sleep(0.02)
    worker.kill()
    assert done >= target, f"the worker processed only {done} records in {timeout}s"
    return done


@pytest.fixture
def small_batch_worker(tmp_path, kafka_bootstrap, topic_prefix):
    """A worker whose batches are smaller than a quarter of the workload (about 3,400 records): each
    kill then lands after some batches' state reached the changelogs, which the recovery reads.
    With the default (5,000) a quarter is one batch, killed before its state is committed."""
    w = WorkerProcess(tmp_path, kafka_bootstrap, topic_prefix, extra_env={"SENDTRAIL_BATCH_SIZE": "2000"})
    yield w
    w.stop()


@pytest.mark.parametrize("seed", [12, 21])
def test_sigkill_mid_stream_is_still_exact(small_batch_worker, seed):
    """Killed three times while consuming, each time after a random share of what it had to do;
    before the last restart the local state directory is lost too (a new machine), so the state
    comes back from the changelogs alone."""
    worker = small_batch_worker
    workload = _workload(seed=seed)
    rng = random.Random(seed)
    events = workload.events
    quarter = len(events) // 4
    for i in range(3):
        _produce(worker, events[i * quarter:(i + 1) * quarter])
        worker.start()
        _kill_mid_batch(worker, rng.uniform(0.4, 1.2) * quarter)
        commits = _commits(worker)
        assert commits and not any(meta == CLEAN for _, meta in commits.values()), commits  # a crash is no clean stop
        if i == 2:
            shutil.rmtree(worker.tmp / "data" / "state")
    _produce(worker, events[3 * quarter:])
    worker.start()
    worker.wait_caught_up(timeout=400)
    worker.stop()
    _assert_exact(worker, workload.oracle)
    recovered = [line for line in worker.tail(100_000).splitlines() if "state recovered from changelogs" in line]
    assert recovered and "'messages'" in recovered[-1], recovered
    assert "'enrollments'" in recovered[-1] or "'parked'" in recovered[-1], recovered


def test_replaying_everything_changes_no_query_result(worker, kafka_bootstrap):
    workload = _workload(seed=13)
    _produce(worker, workload.events)
    worker.start()
    worker.wait_caught_up(timeout=400)
    worker.stop()
    before = read_end_state(worker.tmp / "clickhouse")
    _reset_group_when_empty(worker)
    worker.start()
    worker.wait_caught_up(timeout=400)
    worker.stop()
    after = read_end_state(worker.tmp / "clickhouse")
    assert after == before
    assert not compare_with_oracle(after, workload.oracle)


def test_invalid_events_go_to_dead_letters_and_valid_ones_are_processed(worker, kafka_bootstrap):
    workload = _workload(seed=14, invalid=100)
    expected = workload.oracle["dead_letters"]
    assert sum(expected.values()) >= 1000
    _produce(worker, workload.events)
    worker.start()
    worker.wait_caught_up(timeout=400)
    assert worker.get("/healthz")[0] == 200
    letters = asyncio.run(consume_all(kafka_bootstrap, worker.settings.topic("dead-letters")))
    worker.stop()
    reasons = Counter(orjson.loads(v)["reason"] for _, v in letters)
    assert dict(reasons) == expected
    for _, value in letters[:50]:
        doc = orjson.loads(value)
        assert doc["topic"] in ("automations", "enrollments", "sends", "provider-events")
        assert "original_base64" in doc and isinstance(doc["offset"], int)
    _assert_exact(worker, workload.oracle)


def _reset_group_when_empty(worker: WorkerProcess, timeout: float = 150.0) -> None:
    """Rewind the group once Kafka lets us (the stopped worker's membership may still be expiring)."""
    from aiokafka.errors import CommitFailedError, KafkaError

    deadline = time.monotonic() + timeout
    while True:
        try:
            asyncio.run(_reset_group(worker))
            return
        except (CommitFailedError, KafkaError):
            if time.monotonic() > deadline:
                raise
            time.sleep(3.0)


async def _reset_group(worker: WorkerProcess) -> None:
    """Rewind the worker's consumer group to the start of every topic it consumes."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from agents.offsets import CONSUMED
    from schemas.topics import topic_names

    names = topic_names(worker.settings.topic_prefix)
    group = f"{worker.settings.topic_prefix}{worker.settings.consumer_group}"
    consumer = AIOKafkaConsumer(bootstrap_servers=worker.settings.kafka, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(names[b], p) for b in CONSUMED for p in range(worker.settings.partitions)]
        consumer.assign(tps)
        beginnings = await consumer.beginning_offsets(tps)
        await consumer.commit({tp: off for tp, off in beginnings.items()})
    finally:
        await consumer.stop()


def test_clickhouse_outage_mid_stream_holds_back_and_loses_nothing(tmp_path, kafka_bootstrap, topic_prefix):
    fault = tmp_path / "clickhouse-down"
    worker = WorkerProcess(tmp_path, kafka_bootstrap, topic_prefix,
                           extra_env={"SENDTRAIL_SINK_FAULT_FILE": str(fault)})
    try:
        workload = _workload(seed=15)
        events = workload.events
        half = len(events) // 2
        worker.start()
        worker.wait_http("/healthz")
        _produce(worker, events[:half])
        time.sleep(3.0)
        fault.touch()  # every ClickHouse insert fails from now on
        _produce(worker, events[half:])
        deadline = time.monotonic() + 60
        failures = 0.0
        while time.monotonic() < deadline and failures == 0:
            time.sleep(1.0)
            status, body = worker.get("/metrics")
            assert status == 200
            failures = sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                           if line.startswith("sendtrail_sink_failures_total{"))
        assert failures > 0, "the sink never saw the outage"
        assert worker.get("/healthz")[0] == 200  # held back, not crashed
        time.sleep(3.0)
        fault.unlink()  # ClickHouse is back
        worker.wait_caught_up(timeout=400)
        worker.stop()
        _assert_exact(worker, workload.oracle)
    finally:
        worker.stop()
