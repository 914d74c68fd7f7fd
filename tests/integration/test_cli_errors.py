"""The CLI's helpers say what is wrong in one line, without a traceback, when what they talk to is not there."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.e2e.harness import ROOT, free_port


def _sendtrail(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SENDTRAIL_")}
    return subprocess.run([sys.executable, "-m", "sendtrail.cli", *args], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


def test_wait_names_the_unreachable_kafka_and_leaks_no_client():
    kafka = f"127.0.0.1:{free_port()}"  # nothing listens there
    run = _sendtrail("wait", "--timeout", "2", SENDTRAIL_KAFKA=kafka)
    assert run.returncode == 1
    assert f"sendtrail wait: no lag read from Kafka at {kafka} in 2s; last error: KafkaConnectionError" in run.stderr
    assert "Traceback" not in run.stderr
    assert "Unclosed" not in run.stderr  # the admin client and the consumer are closed after a failed start


def test_report_names_the_unreachable_api():
    url = f"http://127.0.0.1:{free_port()}"
    run = _sendtrail("report", "--url", url)
    assert run.returncode == 2
    assert run.stderr.startswith(f"sendtrail report: cannot reach the API at {url}: ")
    assert "Traceback" not in run.stderr


def test_report_says_which_oracle_it_cannot_read(tmp_path):
    run = _sendtrail("report", "--oracle", str(tmp_path / "missing.json"))
    assert run.returncode == 2
    assert run.stderr.startswith(f"sendtrail report: cannot read the oracle {tmp_path / 'missing.json'}: ")
