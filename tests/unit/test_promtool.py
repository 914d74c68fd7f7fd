"""deploy/prometheus: promtool accepts the config and the rules, the rule unit
tests pass, every alert is documented and tested, and every metric the rules
use is defined in sendtrail/metrics.py."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest


from tests.unit.yaml_metrics_helpers import known_metric, load_yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
CONFIG = PROM / "prometheus.yml"
RULES = PROM / "alerts.yml"
RULE_TESTS = PROM / "alerts_test.yml"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")

#: a sendtrail_* metric name, not part of a recording rule name (level:metric:ops)
METRIC_RE = re.compile(r"(?<![\w:])sendtrail_[A-Za-z0-9_]+(?![\w:])")
#: a recording rule name used in an expression
RECORDED_RE = re.compile(r"(?<![\w:\"])[a-zA-Z_]\w*:[\w:]*\w(?![\w:])")
RECORD_NAME_RE = re.compile(r"^[a-z_]+:sendtrail_[a-z0-9_]+:[a-z0-9_]+$")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.fixture(scope="module")
def rules():
    doc = load_yaml(RULES)
    return [r for g in doc["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def alerts(rules):
    return [r for r in rules if "alert" in r]


# ------------------------------------------------------------------ promtool


@needs_promtool
def test_promtool_check_config():
    proc = run("check", "config", str(CONFIG))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_check_rules():
    proc = run("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_test_rules():
    proc = run("test", "rules", str(RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


# ------------------------------------------------------------ static checks


REQUIRED_ALERTS = {
    "SendtrailConsumerLagGrowing",
    "SendtrailSinkFailing",
    "SendtrailDeadLettersSpiking",
    "SendtrailWorkerDown",
    "SendtrailWorkerAbsent",
    "SendtrailLatencyP99High",
    "SendtrailLatencySLOBurnFast",
    "SendtrailLatencySLOBurnSlow",
}


def test_required_alerts_exist(alerts):
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert REQUIRED_ALERTS <= set(names), REQUIRED_ALERTS - set(names)


def test_every_alert_is_documented(alerts):
    for a in alerts:
        ann = a.get("annotations") or {}
        for key in ("summary", "description", "runbook"):
            assert isinstance(ann.get(key), str) and ann[key].strip(), f"{a['alert']}: no {key}"
        assert "\n" not in ann["runbook"].strip(), f"{a['alert']}: runbook should be one line"
        assert a.get("labels", {}).get("severity") in ("critical", "warning", "info"), a["alert"]
        assert a.get("for"), f"{a['alert']}: no `for` (alerts on a single scrape are noisy)"


def test_rule_expressions_use_only_defined_metrics(rules):
    records = {r["record"] for r in rules if "record" in r}
    used_metrics: set[str] = set()
    for r in rules:
        expr = r["expr"]
        for name in METRIC_RE.findall(expr):
            assert known_metric(name), f"{r.get('alert') or r.get('record')}: unknown metric {name}"
            used_metrics.add(name)
        for name in RECORDED_RE.findall(expr):
            assert name in records, f"{r.get('alert') or r.get('record')}: undefined recording rule {name}"
    for name in records:
        assert RECORD_NAME_RE.match(name), f"recording rule {name} is not level:metric:operations"
    # the alerts look at the core signals
    for must in ("sendtrail_consumer_lag", "sendtrail_sink_failures_total", "sendtrail_sink_rows_written_total",
                 "sendtrail_events_rejected_total", "sendtrail_event_to_clickhouse_latency_seconds_bucket"):
        assert must in used_metrics, must


def test_latency_slo_matches_a_bucket(rules):
    from sendtrail.metrics import LATENCY_BUCKETS, LATENCY_SLO_SECONDS

    assert LATENCY_SLO_SECONDS in LATENCY_BUCKETS
    exprs = " ".join(r["expr"] for r in rules)
    assert 'le=~"2|2\\\\.0"' in exprs  # matches the client's "2.0" and Prometheus 3's "2"


def test_every_alert_has_firing_and_quiet_unit_tests(alerts):
    doc = load_yaml(RULE_TESTS)
    assert doc["rule_files"] == ["alerts.yml"]
    cases: dict[str, set[bool]] = {}
    for t in doc["tests"]:
        for c in t.get("alert_rule_test", []):
            cases.setdefault(c["alertname"], set()).add(bool(c.get("exp_alerts")))
    for a in alerts:
        assert cases.get(a["alert"]) == {True, False}, f"{a['alert']}: needs a firing and a quiet test case"


def test_scrape_config_targets_the_workers():
    doc = load_yaml(CONFIG)
    assert "alerts.yml" in doc["rule_files"]
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    assert "prometheus" in jobs
    job = jobs["sendtrail"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job.get("static_configs", []) for t in sc["targets"]]
    targets += [f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
    assert "worker:6066" in targets, targets
    compose = (ROOT / "docker-compose.yml").read_text()
    assert re.search(r"^  worker:$", compose, re.M), "docker-compose.yml has no `worker` service"
