"""deploy/grafana: the dashboard is valid JSON with queries on defined metrics
only, and the provisioning points Grafana at it and at Prometheus."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest


from tests.unit.yaml_metrics_helpers import known_metric, load_yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "sendtrail.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "sendtrail.yml"

METRIC_RE = re.compile(r"(?<![\w:])sendtrail_[A-Za-z0-9_]+(?![\w:])")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def data_panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def exprs(d: dict) -> list[str]:
    return [t["expr"] for p in data_panels(d) for t in p.get("targets", [])]


def test_dashboard_shape(dashboard):
    assert dashboard["uid"] == "sendtrail"
    assert dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]


def test_every_panel_has_prometheus_targets(dashboard):
    panels = data_panels(dashboard)
    assert len(panels) >= 8
    for p in panels:
        assert p.get("title"), p
        assert p.get("datasource", {}).get("uid") == "prometheus", p["title"]
        targets = p.get("targets") or []
        assert targets, f"panel {p['title']!r} has no targets"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), p["title"]
        for t in targets:
            assert t.get("expr", "").strip(), f"panel {p['title']!r}: empty query"
            assert t.get("datasource", {}).get("uid", "prometheus") == "prometheus"


def test_queries_use_only_defined_metrics(dashboard):
    used = set()
    for e in exprs(dashboard):
        for name in METRIC_RE.findall(e):
            assert known_metric(name), f"unknown metric {name} in {e}"
            used.add(name)
    for var in dashboard.get("templating", {}).get("list", []):
        for name in METRIC_RE.findall(json.dumps(var.get("query", ""))):
            assert known_metric(name), name
    wanted = {
        "sendtrail_events_consumed_total", "sendtrail_events_processed_total", "sendtrail_consumer_lag",
        "sendtrail_event_to_clickhouse_latency_seconds_bucket", "sendtrail_events_rejected_total",
        "sendtrail_status_transitions_total", "sendtrail_sink_rows_written_total", "sendtrail_sink_failures_total",
        "sendtrail_sink_retries_total", "sendtrail_sink_backlog_rows", "sendtrail_sink_flush_duration_seconds_bucket",
        "sendtrail_webhook_requests_total", "sendtrail_state_table_keys",
    }
    assert wanted <= used, wanted - used


def test_required_panels(dashboard):
    titles = " | ".join(p["title"].lower() for p in data_panels(dashboard))
    for word in ("throughput", "lag", "latency", "dead letters", "status transitions", "sink", "webhook",
                 "state table"):
        assert word in titles, word
    latency = next(p for p in data_panels(dashboard) if p["title"] == "Event to ClickHouse latency")
    qs = " ".join(t["expr"] for t in latency["targets"])
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}," in qs


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_queries_parse_as_promql(dashboard, tmp_path):
    """Every query (Grafana variables substituted) is valid PromQL: promtool
    parses them as recording rules."""
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, e in enumerate(exprs(dashboard)):
        q = e.replace("$__rate_interval", "5m").replace("$instance", ".*")
        lines += [f"      - record: dashboard:query_{i}:x", f"        expr: {json.dumps(q)}"]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_provisioning():
    ds = load_yaml(DATASOURCES)
    (prom,) = ds["datasources"]
    assert prom["type"] == "prometheus"
    assert prom["uid"] == "prometheus"
    assert prom["url"] == "http://prometheus:9090"
    providers = load_yaml(PROVIDERS)["providers"]
    paths = {p["options"]["path"] for p in providers}
    compose = (ROOT / "docker-compose.yml").read_text()
    for path in paths:
        assert f"./deploy/grafana/dashboards:{path}" in compose, path
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning" in compose
