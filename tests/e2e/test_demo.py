"""The README's first command, ``deploy/local/demo``, as a user runs it: its own Kafka, the worker,
generated traffic, the report on screen (checked against the generator's oracle), the API left up;
then ``deploy/local/demo stop`` stops all of it."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import urllib.request

from tests.e2e.harness import ROOT, free_port

DEMO = ROOT / "deploy" / "local" / "demo"
KAFKA = ROOT / "deploy" / "local" / "kafka"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kafka_running(kafka_dir) -> bool:
    return subprocess.run([str(KAFKA), "status", "--dir", str(kafka_dir)], capture_output=True).returncode == 0


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_demo_reports_what_the_oracle_expects_right_away_and_stops_cleanly(tmp_path):
    port = free_port()
    data = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDTRAIL_", "DEMO_"))}
    # DEMO_INSTALL=0: the tests run in the .venv the demo would install into
    env.update({"DEMO_DIR": str(data), "DEMO_CONTACTS": "600", "DEMO_SEED": "3", "DEMO_INSTALL": "0",
                "SENDTRAIL_WEB_PORT": str(port)})
    try:
        run = subprocess.run([str(DEMO)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-6000:]
        # the report is read right after `sendtrail wait`: the worker's last counter rows are in by then
        assert "Checked against the oracle:" in out and "NOT as the oracle expects" not in out, out[-6000:]
        assert "\nMailings\n" in out
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/automations", timeout=10) as resp:
            assert resp.status == 200
        worker_pid = int((data / "worker.pid").read_text())
        kafka_port = int(re.search(r"^Kafka: 127\.0\.0\.1:(\d+)$", out, re.M).group(1))
        assert _alive(worker_pid) and _kafka_running(data / "kafka") and _listening(kafka_port)
    finally:
        stop = subprocess.run([str(DEMO), "stop"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not _alive(worker_pid)
    assert not _kafka_running(data / "kafka") and not _listening(kafka_port)
    assert not _listening(port)


def test_demo_stops_with_the_workers_error_when_the_worker_cannot_start(tmp_path):
    data = tmp_path / "demo"
    with socket.socket() as taken:  # the API's port is taken: the worker exits at once
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDTRAIL_", "DEMO_"))}
        env.update({"DEMO_DIR": str(data), "DEMO_CONTACTS": "50", "DEMO_INSTALL": "0",
                    "SENDTRAIL_WEB_PORT": str(port)})
        try:
            run = subprocess.run([str(DEMO)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        finally:
            subprocess.run([str(DEMO), "stop"], cwd=ROOT, env=env, capture_output=True, timeout=180)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "error: the worker exited" in run.stderr
    assert "address already in use" in run.stderr  # the end of the worker's log says why
    assert "generating" not in run.stdout  # no traffic sent to a worker that is not there
    assert not _kafka_running(data / "kafka")
