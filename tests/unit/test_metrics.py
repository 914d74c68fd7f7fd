"""sendtrail.metrics: the catalogue, naming conventions, bounded labels and
the exposition (checked by ``promtool check metrics`` when it is installed)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sendtrail import metrics as m
from sendtrail.metrics import HISTOGRAMS, METRIC_DEFS, METRIC_NAMES, Metrics, render

REQUIRED = {
    "sendtrail_events_consumed_total": ("counter", {"topic", "type"}),
    "sendtrail_events_rejected_total": ("counter", {"topic", "reason"}),
    "sendtrail_dead_letters_produced_total": ("counter", {"topic"}),
    "sendtrail_status_transitions_total": ("counter", {"kind", "from_status", "to_status"}),
    "sendtrail_event_to_clickhouse_latency_seconds": ("histogram", set()),
    "sendtrail_sink_batch_rows": ("histogram", {"table"}),
    "sendtrail_sink_flush_duration_seconds": ("histogram", {"table"}),
    "sendtrail_sink_rows_written_total": ("counter", {"table"}),
    "sendtrail_sink_failures_total": ("counter", {"table"}),
    "sendtrail_sink_retries_total": ("counter", {"table"}),
    "sendtrail_sink_backlog_rows": ("gauge", set()),
    "sendtrail_consumer_lag": ("gauge", {"topic", "partition"}),
    "sendtrail_consumer_committed_offset": ("gauge", {"topic", "partition"}),
    "sendtrail_consumer_end_offset": ("gauge", {"topic", "partition"}),
    "sendtrail_state_table_keys": ("gauge", {"table"}),
    "sendtrail_webhook_requests_total": ("counter", {"provider", "outcome"}),
    "sendtrail_webhook_request_duration_seconds": ("histogram", {"provider"}),
    "sendtrail_webhook_events_total": ("counter", {"provider", "type"}),
    "sendtrail_api_requests_total": ("counter", {"route", "status_class"}),
    "sendtrail_api_request_duration_seconds": ("histogram", {"route"}),
    "sendtrail_ignored_enrollments_total": ("counter", {"reason"}),
    "sendtrail_worker_up": ("gauge", set()),
    "sendtrail_build_info": ("gauge", {"version"}),
    "sendtrail_events_processed_total": ("counter", set()),
    "sendtrail_last_event_processed_timestamp_seconds": ("gauge", set()),
    "sendtrail_rebalances_total": ("counter", {"phase"}),
    "sendtrail_state_recovered_records_total": ("counter", {"table"}),
    "sendtrail_state_recovery_duration_seconds": ("histogram", set()),
    "sendtrail_changelog_records_written_total": ("counter", set()),
    "sendtrail_batches_total": ("counter", {"outcome"}),
    "sendtrail_report_recounts_total": ("counter", {"partitions", "cause"}),
    "sendtrail_batch_duration_seconds": ("histogram", set()),
}

UNIT_SUFFIXES = ("_seconds", "_rows", "_bytes", "_total", "_info", "_keys", "_offset", "_lag", "_up", "_ratio")
FORBIDDEN_LABELS = {"event_id", "contact_id", "message_id", "automation_id", "user_id", "id", "path", "email"}


def exercise(metrics: Metrics) -> None:
    """Touch every family through the public methods (so every series exists)."""
    metrics.consumed("sendtrail.enrollments", "contact.enrolled")
    metrics.consumed("sends", "step.sent", 3)
    metrics.rejected("sendtrail.sends", "missing_field")
    metrics.dead_letter_produced("sendtrail.sends")
    metrics.transition("contact_status", None, "ready")
    metrics.transition("message_status", "delivered", "opened")
    metrics.transition("node_state", "waiting", "done")
    metrics.ignored_enrollment("run_open")
    metrics.touch_sink_tables()
    metrics.sink_flushed("recipients", 500, 0.02)
    metrics.sink_failed("messages")
    metrics.sink_retried("messages")
    metrics.set_sink_backlog(1200, limit=200_000)
    metrics.processed(500, now=1_700_000_000.0)
    metrics.observe_latency(0.3)
    metrics.observe_latencies([1_700_000_000.0, 1_699_999_999.0], written_at=1_700_000_001.5)
    metrics.set_consumer_offsets("sendtrail.provider-events", 3, committed=10, end=50)
    metrics.set_state_table_keys("enrollments", 42)
    metrics.set_up(True)
    metrics.webhook_request("sendgrid", "accepted", 0.004)
    metrics.webhook_event("sendgrid", "message.delivered", 2)
    metrics.api_request("/api/v1/automations/{id}", 200, 0.01)
    metrics.rebalanced("assigned")
    metrics.state_recovered("enrollments", 12)
    metrics.counters_recounted("contacts", "unclean")
    metrics.observe_recovery(0.2)
    metrics.changelog_written(7)
    metrics.batch_done(0.05)
    metrics.batch_failed()


def families(registry: CollectorRegistry) -> dict:
    body, _ = render(registry)
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry(), version="1.2.3")


def test_no_side_effects_at_import_and_fresh_registries_do_not_collide():
    from prometheus_client import REGISTRY

    assert not any(n.startswith("sendtrail_") for n in REGISTRY._names_to_collectors)
    a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    a.consumed("enrollments", "contact.enrolled")
    assert b.events_consumed.labels(topic="enrollments", type="contact.enrolled")._value.get() == 0
    assert not any(n.startswith("sendtrail_") for n in REGISTRY._names_to_collectors)


def test_every_required_family_exists_with_its_type_and_labels(metrics):
    exercise(metrics)
    fams = families(metrics.registry)
    for name, (kind, labels) in REQUIRED.items():
        assert name in METRIC_NAMES, name
        base = name[: -len("_total")] if kind == "counter" else name
        assert base in fams, f"{name} not exposed"
        fam = fams[base]
        assert fam.type == kind, (name, fam.type)
        sample_labels = set()
        for s in fam.samples:
            sample_labels |= set(s.labels) - {"le"}
        assert sample_labels == labels, (name, sample_labels)


def test_catalogue_matches_exposition(metrics):
    exercise(metrics)
    exposed = {(name, f.type) for name, f in families(metrics.registry).items()
               if name.startswith("sendtrail_") and not name.endswith("_created")}
    expected = {(d.name[: -len("_total")] if d.type == "counter" else d.name, d.type) for d in METRIC_DEFS}
    assert exposed == expected
    for d in METRIC_DEFS:
        assert hasattr(metrics, d.attr), d.attr


def test_naming_conventions():
    for d in METRIC_DEFS:
        assert re.fullmatch(r"sendtrail_[a-z][a-z0-9_]*[a-z0-9]", d.name), d.name
        assert "__" not in d.name
        if d.type == "counter":
            assert d.name.endswith("_total"), d.name
        else:
            assert not d.name.endswith("_total"), d.name
        assert d.name.endswith(UNIT_SUFFIXES), f"{d.name}: no unit suffix"
        if "duration" in d.name or "latency" in d.name or "timestamp" in d.name:
            assert d.name.endswith("_seconds"), d.name
        assert not (set(d.labels) & FORBIDDEN_LABELS), (d.name, d.labels)
        assert d.help and d.help[0].isupper(), d.name


def test_latency_buckets_span_5ms_to_60s_and_contain_the_slo(metrics):
    fams = families(metrics.registry)
    les = [s.labels["le"] for s in fams["sendtrail_event_to_clickhouse_latency_seconds"].samples
           if s.name.endswith("_bucket")]
    bounds = [float(x) for x in les if x != "+Inf"]
    assert bounds[0] == 0.005 and bounds[-1] == 60.0
    assert m.LATENCY_SLO_SECONDS in bounds
    assert bounds == sorted(bounds)


@pytest.mark.parametrize("p99", [1.2, 1.7, 2.2, 2.8, 3.5])
def test_latency_p99_near_the_slo_is_read_to_half_a_second(metrics, p99):
    """p99 read from /metrics as benchmarks/pipeline.py and histogram_quantile read it (linear inside a
    bucket): around the 2 s SLO its error stays under 0.5 s.

    With buckets at 1, 2 and 5 s only, a p99 of 2.2 s read as 3.3 s (benchmarks/pipeline.py printed
    p99 4.9 s for runs where finer buckets show 1.8-3.4 s).
    """
    from benchmarks.pipeline import LATENCY_METRIC, histogram_buckets, quantile

    for _ in range(980):
        metrics.observe_latency(0.6)
    for i in range(20):  # the slowest 2 %, spread evenly over p99 +- 0.25 s
        metrics.observe_latency(p99 - 0.25 + 0.5 * (i + 0.5) / 20)
    body, _ = render(metrics.registry)
    assert abs(quantile(histogram_buckets(body.decode(), LATENCY_METRIC), 0.99) - p99) < 0.5


def test_hot_path_values(metrics):
    exercise(metrics)
    reg = metrics.registry
    v = reg.get_sample_value
    assert v("sendtrail_events_consumed_total", {"topic": "enrollments", "type": "contact.enrolled"}) == 1
    assert v("sendtrail_events_consumed_total", {"topic": "sends", "type": "step.sent"}) == 3
    assert v("sendtrail_events_rejected_total", {"topic": "sends", "reason": "missing_field"}) == 1
    assert v("sendtrail_status_transitions_total",
             {"kind": "contact_status", "from_status": "none", "to_status": "ready"}) == 1
    assert v("sendtrail_sink_rows_written_total", {"table": "recipients"}) == 500
    assert v("sendtrail_sink_rows_written_total", {"table": "contacts"}) == 0  # touched at start
    assert v("sendtrail_sink_batch_rows_count", {"table": "recipients"}) == 1
    assert v("sendtrail_sink_failures_total", {"table": "messages"}) == 1
    assert v("sendtrail_sink_retries_total", {"table": "messages"}) == 1
    assert v("sendtrail_sink_backlog_rows") == 1200
    assert v("sendtrail_sink_backlog_limit_rows") == 200_000
    assert v("sendtrail_events_processed_total") == 500
    assert v("sendtrail_last_event_processed_timestamp_seconds") == 1_700_000_000.0
    assert v("sendtrail_event_to_clickhouse_latency_seconds_count") == 3
    assert v("sendtrail_event_to_clickhouse_latency_seconds_sum") == pytest.approx(0.3 + 1.5 + 2.5)
    lag = {"topic": "provider-events", "partition": "3"}
    assert v("sendtrail_consumer_lag", lag) == 40
    assert v("sendtrail_consumer_committed_offset", lag) == 10
    assert v("sendtrail_consumer_end_offset", lag) == 50
    assert v("sendtrail_state_table_keys", {"table": "enrollments"}) == 42
    assert v("sendtrail_worker_up") == 1
    assert v("sendtrail_build_info", {"version": "1.2.3"}) == 1
    assert v("sendtrail_webhook_requests_total", {"provider": "sendgrid", "outcome": "accepted"}) == 1
    assert v("sendtrail_webhook_request_duration_seconds_count", {"provider": "sendgrid"}) == 1
    assert v("sendtrail_webhook_events_total", {"provider": "sendgrid", "type": "message.delivered"}) == 2
    assert v("sendtrail_api_requests_total", {"route": "/api/v1/automations/{id}", "status_class": "2xx"}) == 1
    assert v("sendtrail_ignored_enrollments_total", {"reason": "run_open"}) == 1

    metrics.rejected("api", "not_an_object")
    assert v("sendtrail_events_rejected_total", {"topic": "api", "reason": "not_an_object"}) == 1
    metrics.set_sink_backlog_limit(5000)
    assert v("sendtrail_sink_backlog_limit_rows") == 5000

    metrics.forget_partition("sendtrail.provider-events", 3)
    assert v("sendtrail_consumer_lag", lag) is None
    metrics.forget_partition("sendtrail.provider-events", 3)  # idempotent
    metrics.set_consumer_offsets("sends", 0, committed=None, end=7)
    assert v("sendtrail_consumer_lag", {"topic": "sends", "partition": "0"}) == 7
    metrics.set_consumer_offsets("sends", 0, committed=9, end=7)
    assert v("sendtrail_consumer_lag", {"topic": "sends", "partition": "0"}) == 0


def test_labels_stay_bounded(metrics):
    reg = metrics.registry
    for i in range(1000):
        metrics.rejected("sends", f"reason-{i}")
        metrics.consumed("sends", f"step.x{i}")
        metrics.transition("contact_status", f"weird{i}", f"weird{i}")
        metrics.api_request(f"/api/v1/automations/{i}", 200)
        metrics.webhook_request(f"provider{i}", f"outcome{i}")
        metrics.set_state_table_keys(f"table{i}", i)
    metrics.consumed("acme-staging.enrollments", "contact.enrolled")
    metrics.consumed("some-other-topic", "contact.enrolled")
    metrics.transition("bogus_kind", "a", "b")
    metrics.rejected("sends", "free text with spaces")
    metrics.api_request("/x", 999)
    fams = families(reg)
    for name, fam in fams.items():
        assert len(fam.samples) <= 2000, (name, len(fam.samples))
    assert len(fams["sendtrail_events_rejected"].samples) <= m._Bounded(limit=100)._limit + 2
    assert reg.get_sample_value("sendtrail_events_rejected_total", {"topic": "sends", "reason": "other"}) > 0
    statuses = {s.labels["to_status"] for s in fams["sendtrail_status_transitions"].samples}
    assert statuses <= set(m.CONTACT_STATUSES) | {"other"}
    topics = {s.labels["topic"] for s in fams["sendtrail_events_consumed"].samples}
    assert topics == {"sends", "enrollments", "other"}
    providers = {s.labels["provider"] for s in fams["sendtrail_webhook_requests"].samples}
    outcomes = {s.labels["outcome"] for s in fams["sendtrail_webhook_requests"].samples}
    assert providers <= set(m.WEBHOOK_PROVIDERS) | {"other"}
    assert outcomes <= set(m.WEBHOOK_OUTCOMES)
    classes = {s.labels["status_class"] for s in fams["sendtrail_api_requests"].samples}
    assert classes == {"2xx", "other"}


def test_render_content_types(metrics):
    body, ctype = render(metrics.registry)
    assert ctype.startswith("text/plain; version=0.0.4")
    assert b"# TYPE sendtrail_events_consumed_total counter" in body
    body, ctype = render(metrics.registry, "application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_create_adds_process_collectors():
    metrics = Metrics.create()
    body, _ = render(metrics.registry)
    assert b"python_info" in body
    assert b"sendtrail_build_info" in body


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_check_metrics(metrics):
    exercise(metrics)
    body, _ = render(metrics.registry)
    proc = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
    assert not proc.stdout.strip() and not proc.stderr.strip(), (proc.stdout + proc.stderr).decode()


def test_multiprocess_mode(tmp_path):
    """Two processes write with PROMETHEUS_MULTIPROC_DIR; one registry merges them."""
    code = textwrap.dedent(
        """
        import sys
        from prometheus_client import CollectorRegistry
        from sendtrail.metrics import Metrics
        m = Metrics(CollectorRegistry())
        m.webhook_request("mailgun", "accepted", 0.01)
        m.webhook_event("mailgun", "message.opened", int(sys.argv[1]))
        m.set_up(True)
        """
    )
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    for n in ("2", "3"):
        subprocess.run([sys.executable, "-c", code, n], env=env, check=True, timeout=60)
    merge = textwrap.dedent(
        """
        from sendtrail.metrics import Metrics, render
        reg = Metrics.multiprocess_registry()
        print(reg.get_sample_value("sendtrail_webhook_requests_total", {"provider": "mailgun", "outcome": "accepted"}))
        print(reg.get_sample_value("sendtrail_webhook_events_total", {"provider": "mailgun", "type": "message.opened"}))
        body, ctype = render(reg)
        assert b"sendtrail_webhook_request_duration_seconds_bucket" in body
        """
    )
    out = subprocess.run([sys.executable, "-c", merge], env=env, check=True, timeout=60,
                         capture_output=True, text=True).stdout.split()
    assert out == ["2.0", "5.0"]


def test_multiprocess_registry_needs_the_directory(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    with pytest.raises(RuntimeError, match="PROMETHEUS_MULTIPROC_DIR"):
        Metrics.multiprocess_registry()


def test_histogram_names_are_known():
    assert HISTOGRAMS == {n for n, (k, _) in REQUIRED.items() if k == "histogram"}
