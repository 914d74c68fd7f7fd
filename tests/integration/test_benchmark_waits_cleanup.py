"""benchmarks/waits_cleanup.py keeps working: its figures come from a cleanup that did its job."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[2]


def test_waits_cleanup_benchmark_prints_a_cleanup_that_kept_the_open_waits_only():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "waits_cleanup.py"), "--sizes", "2000:3000"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    figures = orjson.loads(out.strip().splitlines()[-1])
    (run,) = figures["runs"]
    # 2,000 open + 3,000 closed (merged to their closed rows) + 300 closed since, as an open and a closed row
    assert run["rows_before"] == 2000 + 3000 + 2 * 300
    assert run["rows_after"] == 2000
    assert run["optimize_seconds"] > 0 and run["cpu_seconds"] > 0
