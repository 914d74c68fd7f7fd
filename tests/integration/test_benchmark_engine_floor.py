"""benchmarks/engine_floor.py keeps working: its probe builds and does the machines' boundary work.

The benchmark exits non-zero when the probe's outputs differ from the machines' in number or
keys (its ``check_probe``), so a change to the engine's outputs that the probe does not follow
fails here instead of silently bounding the wrong work. Needs cargo and crates.io (the probe's
pyo3 and blake2 crates); skipped without cargo.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.network,  # cargo fetches the probe's crates
    pytest.mark.skipif(shutil.which("cargo") is None, reason="cargo is not installed"),
]


def test_engine_floor_benchmark_bounds_the_machines_own_outputs():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engine_floor.py"), "--contacts", "300",
                          "--repeat", "1"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = orjson.loads(out.stdout.strip().splitlines()[-1])
    for machine in ("enrollment", "message"):
        assert figures[f"{machine}_events"] > 1000
        # the probe built outputs for this stream: the machines emit changes and follow-ups here
        assert figures[f"{machine}_changes_per_event"] > 0.3
        assert figures[f"{machine}_follow_ups_per_event"] > 0.1
        assert figures[f"{machine}_python_eps"] > 0
        assert figures[f"{machine}_floor_no_outputs_eps"] > 0 and figures[f"{machine}_floor_eps"] > 0
    # the routed run applied the follow-ups too (the benchmark exits non-zero if the probe routed
    # more or fewer of them than the machines)
    assert figures["combined_applies"] > figures["combined_external_events"] > 1000
    assert figures["combined_python_eps"] > 0 and figures["combined_floor_eps"] > 0
