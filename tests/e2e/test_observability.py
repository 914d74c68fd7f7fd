"""Observability end to end: Debian's real ``prometheus`` scraping the real worker, ``promtool check
metrics`` on its /metrics, and /readyz while Kafka or ClickHouse is unreachable.

One worker processes a generated workload (with invalid events) while Prometheus (loopback, free
port, its own storage, a generated config that scrapes every second and loads the alert rules of
``deploy/prometheus/alerts.yml``) scrapes it; every assertion on metric values goes through
Prometheus' HTTP API (``/api/v1/query``), so names, labels and types are checked as Prometheus sees them.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from agents.offsets import CONSUMED
from sendtrail.cli import produce
from sendtrail.metrics import SINK_TABLES
from streams.generator import generate
from tests.conftest import run_kafka_script
from tests.e2e.harness import ROOT, WorkerProcess, free_port

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
ALERT_RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
INPUT_TOPICS = ("automations", "enrollments", "sends", "provider-events")
CONTACTS = 500
INVALID = 3  # of each dead-letter reason
PARTITIONS = 4

needs_prometheus = pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None,
                                      reason="needs Debian's prometheus and promtool (apt-get install prometheus)")


class PrometheusProcess:
    """``prometheus`` on 127.0.0.1:<free port> with its own storage, scraping one target every second."""

    def __init__(self, tmp: Path, target: str, rule_files: tuple[Path, ...] = ()) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.target = target
        self.rule_files = rule_files
        self.proc: subprocess.Popen | None = None
        self.log_path = tmp / "prometheus.log"
        self.config_path = tmp / "prometheus.yml"

    def start(self) -> None:
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{"job_name": "sendtrail", "scrape_interval": "1s", "scrape_timeout": "1s",
                                "static_configs": [{"targets": [self.target]}]}],
        }
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        (self.tmp / "tsdb").mkdir(exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"],
            cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"prometheus not ready: {self.tail()}")

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as resp:
            doc = json.loads(resp.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[tuple[dict, float]]:
        """An instant vector: (labels, value) per series."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: more than one series: {result}"
        return result[0][1] if result else None

    def by(self, expr: str, label: str) -> dict[str, float]:
        return {labels.get(label, ""): v for labels, v in self.query(expr)}

    def wait_value(self, expr: str, ok, timeout: float = 90.0) -> float | None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.value(expr)
            if ok(last):
                return last
            time.sleep(0.5)
        raise AssertionError(f"{expr} = {last} after {timeout}s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def _post(port: int, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                                 headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


async def _end_offsets_sum(bootstrap: str, topic: str) -> int:
    """Records in a topic only the worker writes to (no transactions, no deletion): the sum of its end offsets."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        assert tps, f"no partitions for {topic}"
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


def _readyz(worker: WorkerProcess) -> tuple[int, dict]:
    status, body = worker.get("/readyz")
    return status, json.loads(body)


def _wait_readyz(worker: WorkerProcess, ok, timeout: float) -> tuple[int, dict]:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        worker._check_alive()
        try:
            last = _readyz(worker)
            if ok(*last):
                return last
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"/readyz never matched in {timeout}s; last {last}; log: {worker.tail(30)}")


# ---------------------------------------------------------------------------- one observed run


@pytest.fixture(scope="module")
def observed(tmp_path_factory, kafka_bootstrap):
    """A worker that processed a generated workload, scraped by a real Prometheus."""
    if PROMETHEUS is None or PROMTOOL is None:
        pytest.skip("needs Debian's prometheus and promtool (apt-get install prometheus)")
    from agents.worker import ensure_topics

    tmp = tmp_path_factory.mktemp("observability")
    prefix = f"t{uuid.uuid4().hex[:8]}."
    # the resume timer sends a tick to every internal.to-contacts partition each RESUME_CHECK_SECONDS, which
    # keeps that topic's lag at 1-2 between tick and commit; rare ticks let every partition's lag read 0
    worker = WorkerProcess(tmp, kafka_bootstrap, prefix, partitions=PARTITIONS,
                           extra_env={"SENDTRAIL_RESUME_CHECK_SECONDS": "3600"})
    prom = PrometheusProcess(tmp, f"127.0.0.1:{worker.port}", rule_files=(ALERT_RULES,))
    now_ms = int(time.time() * 1000)
    workload = generate(21, automations=3, contacts=CONTACTS, base_ms=now_ms - 10 * 86_400_000, now_ms=now_ms,
                        invalid=INVALID)
    try:
        asyncio.run(ensure_topics(worker.settings))
        asyncio.run(produce(worker.settings, workload.events))
        worker.start()
        worker.wait_http("/healthz")
        prom.start()
        webhook = _post(worker.port, "/webhooks/sendgrid", b'[{"event": "delivered", "sg_message_id": "x"}]')
        worker.wait_caught_up(timeout=400)
        _wait_readyz(worker, lambda status, _: status == 200, timeout=60)
        yield {"worker": worker, "prom": prom, "workload": workload, "webhook": webhook, "tmp": tmp}
    finally:
        prom.stop()
        worker.stop()


def _valid_events(workload) -> int:
    oracle = workload.oracle
    return sum(oracle["event_counts"].values()) - sum(oracle["dead_letters"].values())


@needs_prometheus
def test_prometheus_scrapes_the_worker_and_loads_the_alert_rules(observed):
    prom = observed["prom"]
    prom.wait_value('up{job="sendtrail"}', lambda v: v == 1.0, timeout=30)
    assert prom.value('sendtrail_worker_up{job="sendtrail"}') == 1.0
    assert prom.value('sendtrail_build_info{job="sendtrail"}') == 1.0
    targets = prom.api("targets")["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets
    # every recording and alerting rule of deploy/prometheus/alerts.yml evaluates without error
    deadline = time.monotonic() + 30
    while True:
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        if rules and all(r.get("health") == "ok" for r in rules):
            break
        if time.monotonic() > deadline:
            raise AssertionError([(r["name"], r.get("health"), r.get("lastError")) for r in rules
                                  if r.get("health") != "ok"])
        time.sleep(1)


@needs_prometheus
def test_events_consumed_summed_over_topics_equals_the_valid_events_produced(observed):
    prom, workload = observed["prom"], observed["workload"]
    expected = _valid_events(workload)
    assert expected > CONTACTS
    prom.wait_value('sum(sendtrail_events_consumed_total{job="sendtrail"})', lambda v: v == expected)
    topics = prom.by('sum by (topic) (sendtrail_events_consumed_total{job="sendtrail"})', "topic")
    assert set(topics) == set(INPUT_TOPICS), topics
    for topic, n in topics.items():
        assert 0 < n <= workload.oracle["event_counts"][topic], (topic, n)
    types = prom.by('sum by (type) (sendtrail_events_consumed_total{job="sendtrail"})', "type")
    assert {"automation.published", "contact.enrolled"} <= set(types), types
    assert any(t.startswith("message.") for t in types) and any(t.startswith("step.") for t in types), types


@needs_prometheus
def test_rejected_events_are_counted_by_reason(observed):
    prom, workload = observed["prom"], observed["workload"]
    expected = {reason: float(n) for reason, n in workload.oracle["dead_letters"].items()}
    assert len(expected) >= 10 and all(n == INVALID for n in expected.values()), expected
    prom.wait_value('sum(sendtrail_events_rejected_total{job="sendtrail"})', lambda v: v == sum(expected.values()))
    assert prom.by('sum by (reason) (sendtrail_events_rejected_total{job="sendtrail"})', "reason") == expected
    topics = prom.by('sum by (topic) (sendtrail_events_rejected_total{job="sendtrail"})', "topic")
    assert set(topics) <= set(INPUT_TOPICS), topics


@needs_prometheus
def test_status_transitions_by_kind_from_and_to(observed, kafka_bootstrap):
    prom, worker = observed["prom"], observed["worker"]
    kinds = prom.by('sum by (kind) (sendtrail_status_transitions_total{job="sendtrail"})', "kind")
    assert set(kinds) == {"contact_status", "node_state", "message_status"}, kinds
    assert all(v > 0 for v in kinds.values()), kinds
    series = prom.query('sendtrail_status_transitions_total{job="sendtrail"}')
    pairs = {(s["kind"], s["from_status"], s["to_status"]) for s, v in series if v > 0}
    assert ("contact_status", "none", "in_progress") in pairs or any(
        k == "contact_status" and f == "none" for k, f, _ in pairs), pairs
    assert any(k == "message_status" and t == "delivered" for k, _, t in pairs), pairs
    assert not [p for p in pairs if "other" in p], [p for p in pairs if "other" in p]
    # one counted transition per record on the status-changes topic
    records = asyncio.run(_end_offsets_sum(kafka_bootstrap, worker.settings.topic("status-changes")))
    assert sum(kinds.values()) == records


@needs_prometheus
def test_event_to_clickhouse_latency_and_sink_metrics(observed):
    prom, worker = observed["prom"], observed["worker"]
    count = prom.value('sendtrail_event_to_clickhouse_latency_seconds_count{job="sendtrail"}')
    assert count and count > 0
    inf = prom.value('sendtrail_event_to_clickhouse_latency_seconds_bucket{job="sendtrail", le="+Inf"}')
    assert inf == count
    assert prom.value('sendtrail_event_to_clickhouse_latency_seconds_sum{job="sendtrail"}') >= 0
    written = prom.by('sum by (table) (sendtrail_sink_rows_written_total{job="sendtrail"})', "table")
    assert set(SINK_TABLES) <= set(written), written  # every table's series exists from the start
    for table in ("automations", "contacts", "recipients", "enrollments", "node_states", "messages",
                  "message_events", "status_changes"):
        assert written[table] > 0, (table, written)
    batches = prom.by('sum by (table) (sendtrail_sink_batch_rows_count{job="sendtrail"})', "table")
    rows = prom.by('sum by (table) (sendtrail_sink_batch_rows_sum{job="sendtrail"})', "table")
    flushes = prom.by('sum by (table) (sendtrail_sink_flush_duration_seconds_count{job="sendtrail"})', "table")
    for table, n in written.items():
        if n > 0:
            assert batches[table] > 0 and flushes[table] == batches[table], (table, batches, flushes)
            assert rows[table] == n, (table, rows[table], n)
    failures = prom.by('sum by (table) (sendtrail_sink_failures_total{job="sendtrail"})', "table")
    assert set(failures) >= set(SINK_TABLES) and sum(failures.values()) == 0, failures
    assert prom.value('sendtrail_sink_backlog_limit_rows{job="sendtrail"}') == worker.settings.sink_max_backlog_rows
    prom.wait_value('sendtrail_sink_backlog_rows{job="sendtrail"}', lambda v: v == 0, timeout=30)
    processed = prom.value('sendtrail_events_processed_total{job="sendtrail"}')
    assert processed and processed >= _valid_events(observed["workload"])
    assert prom.value('sendtrail_last_event_processed_timestamp_seconds{job="sendtrail"}') > time.time() - 3600


@needs_prometheus
def test_consumer_lag_per_partition_reaches_zero(observed):
    prom, workload = observed["prom"], observed["workload"]
    expected_series = len(CONSUMED) * PARTITIONS
    prom.wait_value('count(sendtrail_consumer_lag{job="sendtrail"})', lambda v: v == expected_series, timeout=60)
    inputs = "|".join(INPUT_TOPICS)
    try:
        prom.wait_value('max(sendtrail_consumer_lag{job="sendtrail"})', lambda v: v == 0, timeout=60)
    except AssertionError as exc:
        lagging = prom.query('sendtrail_consumer_lag{job="sendtrail"} > 0')
        raise AssertionError(f"{exc}; lagging now: {lagging}") from None
    assert set(prom.by('count by (topic) (sendtrail_consumer_lag{job="sendtrail"})', "topic")) == set(CONSUMED)
    partitions = prom.by('count by (partition) (sendtrail_consumer_lag{job="sendtrail"})', "partition")
    assert set(partitions) == {str(p) for p in range(PARTITIONS)}, partitions
    produced = sum(workload.oracle["event_counts"].values())
    assert prom.value(f'sum(sendtrail_consumer_end_offset{{job="sendtrail", topic=~"{inputs}"}})') == produced
    assert prom.value(f'sum(sendtrail_consumer_committed_offset{{job="sendtrail", topic=~"{inputs}"}})') == produced
    prom.wait_value('job:sendtrail_consumer_lag:sum{job="sendtrail"}', lambda v: v == 0, timeout=30)  # recording rule


@needs_prometheus
def test_state_table_keys(observed):
    prom = observed["prom"]
    keys = prom.by('sendtrail_state_table_keys{job="sendtrail"}', "table")
    assert keys.get("enrollments", 0) > 0 and keys.get("messages", 0) > 0, keys
    assert set(keys) >= {"enrollments", "messages", "parked", "resume-index", "automation-replicas"}, keys


@needs_prometheus
def test_runtime_metrics(observed):
    prom = observed["prom"]
    assert prom.value('sum(sendtrail_batches_total{job="sendtrail", outcome="committed"})') > 0
    assert not prom.value('sum(sendtrail_batches_total{job="sendtrail", outcome="failed"})')
    assert prom.value('sendtrail_batch_duration_seconds_count{job="sendtrail"}') > 0
    # every state change reaches the changelogs: at least one record per table that holds keys
    keys = prom.by('sendtrail_state_table_keys{job="sendtrail"}', "table")
    assert prom.value('sendtrail_changelog_records_written_total{job="sendtrail"}') >= sum(
        1 for v in keys.values() if v > 0)
    assert prom.value('sum(sendtrail_rebalances_total{job="sendtrail", phase="assigned"})') >= 1
    assert prom.value('sendtrail_state_recovery_duration_seconds_count{job="sendtrail"}') >= 1


@needs_prometheus
def test_webhook_without_a_configured_secret_is_counted_not_configured(observed):
    prom = observed["prom"]
    status, body = observed["webhook"]
    assert status == 503, body
    assert body["error"]["code"] == "provider_not_configured", body
    got = prom.value('sendtrail_webhook_requests_total{job="sendtrail", provider="sendgrid", outcome="not_configured"}')
    assert got == 1.0
    assert prom.value('sendtrail_webhook_request_duration_seconds_count{job="sendtrail", provider="sendgrid"}') == 1.0
    prom.wait_value('sum(sendtrail_api_requests_total{job="sendtrail", route="/readyz"})',
                    lambda v: v is not None and v >= 1, timeout=30)
    # a scrape counts itself only in the next scrape's figures
    prom.wait_value('sum(sendtrail_api_requests_total{job="sendtrail", route="/metrics"})',
                    lambda v: v is not None and v >= 1, timeout=30)
    api = prom.by('sum by (route) (sendtrail_api_requests_total{job="sendtrail"})', "route")
    assert api.get("/webhooks/{provider}") == 1 and api.get("/metrics", 0) >= 1, api


@needs_prometheus
def test_dead_letters_produced_are_counted(observed):
    prom, workload = observed["prom"], observed["workload"]
    assert prom.value('sum(sendtrail_dead_letters_produced_total{job="sendtrail"})') == sum(
        workload.oracle["dead_letters"].values())


@needs_prometheus
def test_ignored_enrollments_are_counted(observed):
    prom, workload = observed["prom"], observed["workload"]
    expected = workload.oracle["ignored_enrollments"]
    assert expected > 0
    assert prom.value('sum(sendtrail_ignored_enrollments_total{job="sendtrail"})') == expected


@needs_prometheus
def test_promtool_check_metrics_reports_nothing_on_the_worker_metrics(observed):
    worker = observed["worker"]
    status, body = worker.get("/metrics")
    assert status == 200
    assert b"sendtrail_events_consumed_total" in body and b"sendtrail_batches_total" in body
    res = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), (
        res.returncode, res.stdout.decode(), res.stderr.decode())


# ---------------------------------------------------------------------------- readiness


def test_readyz_says_kafka_is_unreachable_then_ready_once_kafka_starts(tmp_path):
    if shutil.which("java") is None:
        pytest.skip("starting Kafka needs java")
    port = free_port()
    kafka_dir = tmp_path / "kafka"
    worker = WorkerProcess(tmp_path, f"127.0.0.1:{port}", f"t{uuid.uuid4().hex[:8]}.")
    try:
        worker.start()
        t0 = time.monotonic()
        worker.wait_http("/healthz", timeout=30)
        assert time.monotonic() - t0 < 30
        status, body = _wait_readyz(
            worker, lambda s, b: s == 503 and any(r.startswith("kafka: not reachable") for r in b["reasons"]),
            timeout=30)
        assert body["status"] == "not_ready"
        assert worker.get("/healthz")[0] == 200
        assert worker.get("/metrics")[0] == 200
        run_kafka_script("start", "--port", str(port), "--dir", str(kafka_dir), "--owner-pid", str(os.getpid()))
        status, body = _wait_readyz(worker, lambda s, b: s == 200, timeout=180)
        assert body == {"status": "ready"}
    finally:
        worker.stop()
        run_kafka_script("stop", "--dir", str(kafka_dir), timeout=120, check=False)


def test_readyz_says_clickhouse_is_unreachable_and_the_worker_keeps_running(tmp_path, kafka_bootstrap):
    closed = free_port()
    worker = WorkerProcess(tmp_path, kafka_bootstrap, f"t{uuid.uuid4().hex[:8]}.",
                           extra_env={"SENDTRAIL_CLICKHOUSE_URL": f"http://127.0.0.1:{closed}"})
    try:
        worker.start()
        worker.wait_http("/healthz", timeout=30)
        _wait_readyz(worker, lambda s, b: s == 503 and any(r.startswith("clickhouse:") for r in b["reasons"])
                     and not any(r.startswith("kafka:") for r in b["reasons"]), timeout=60)
        time.sleep(5)  # migrations are retried with backoff; the worker neither crashes nor becomes ready
        worker._check_alive()
        status, body = _readyz(worker)
        assert status == 503 and any(r.startswith("clickhouse:") for r in body["reasons"]), body
        assert worker.get("/healthz")[0] == 200
    finally:
        worker.stop()
