"""Helpers shared by the dashboard, Prometheus and compose tests."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sendtrail.metrics import HISTOGRAMS, METRIC_NAMES


def load_yaml(path: Path):
    """PyYAML if importable, else the system python3's PyYAML (Debian ships it with docker-compose);
    skip when neither exists. No new dependency."""
    try:
        import yaml  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        return yaml.safe_load(path.read_text())
    code = "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)"
    for py in ("/usr/bin/python3", shutil.which("python3")):
        if not py or not Path(py).exists() or Path(py).resolve() == Path(sys.executable).resolve():
            continue
        proc = subprocess.run([py, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            return json.loads(proc.stdout)
    pytest.skip("no YAML parser: PyYAML is installed neither here nor in the system python3")


def known_metric(name: str) -> bool:
    """A metric name defined in sendtrail/metrics.py (histograms with their _bucket/_sum/_count series)."""
    if name in METRIC_NAMES:
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return True
    return False
