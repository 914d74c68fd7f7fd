"""docker-compose.yml, Dockerfile and .dockerignore.

The compose file is validated by the real CLI (`docker compose` or Debian's
`docker-compose` 1.29, both offline for `config`); without either the CLI
tests skip. No Docker engine is needed. The Dockerfile is checked as text."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sendtrail.settings import Settings

from tests.unit.yaml_metrics_helpers import load_yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SERVICES = {"kafka", "clickhouse", "migrate", "worker", "prometheus", "grafana"}


def _compose_cli() -> list[str] | None:
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cmd in candidates:
        try:
            proc = subprocess.run([*cmd, "version"], capture_output=True, timeout=60, cwd=ROOT)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if proc.returncode == 0:
            return cmd
    return None


@pytest.fixture(scope="module")
def cli() -> list[str]:
    cmd = _compose_cli()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` works (apt-get install docker-compose)")
    return cmd


def compose(cli: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*cli, "-f", str(COMPOSE), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def load_yaml_text(text: str, tmp_path: Path):
    path = tmp_path / "normalized.yml"
    path.write_text(text)
    return load_yaml(path)


@pytest.fixture(scope="module")
def normalized(cli) -> str:
    proc = compose(cli, "config")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# ------------------------------------------------------------------ compose


def test_compose_config_accepts_the_file(normalized):
    assert "services:" in normalized


def test_compose_services(cli):
    proc = compose(cli, "config", "--services")
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.split()) == SERVICES


def test_compose_normalized_content(normalized, tmp_path):
    doc = load_yaml_text(normalized, tmp_path)
    services = doc["services"]
    for name, svc in services.items():
        if "image" in svc and name != "worker":
            image = svc["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"
    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")

    kafka = {k: str(v) for k, v in services["kafka"]["environment"].items()}
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{kafka['KAFKA_NODE_ID']}@kafka:9093"
    assert "PLAINTEXT://kafka:9092" in kafka["KAFKA_ADVERTISED_LISTENERS"]
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        assert kafka[key] == "1", key

    ch = {k: str(v) for k, v in services["clickhouse"]["environment"].items()}
    worker = services["worker"]
    env = {k: str(v) for k, v in worker["environment"].items()}
    # every SENDTRAIL_* variable is a real setting with a valid value
    settings = Settings.from_env(env)
    assert settings.kafka == "kafka:9092"
    assert settings.clickhouse_url == (
        f"http://{ch['CLICKHOUSE_USER']}:{ch['CLICKHOUSE_PASSWORD']}@clickhouse:8123/{ch['CLICKHOUSE_DB']}"
    )
    assert str(settings.data_dir) == "/data"
    assert settings.partitions == 8
    assert worker["command"] in (["worker"], "worker")
    assert "build" in worker
    assert any(str(p.get("target")) == "6066" for p in worker["ports"])
    for dep in ("kafka", "clickhouse"):
        assert worker["depends_on"][dep]["condition"] == "service_healthy", dep
        assert "healthcheck" in services[dep], dep
    assert "healthcheck" in worker
    # migrations run once, in their own service, before any worker starts (migration 010 rebuilds a table)
    assert settings.migrate_on_start is False
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    migrate_svc = services["migrate"]
    assert migrate_svc["command"] in (["migrate"], "migrate") and migrate_svc["image"] == worker["image"]
    assert Settings.from_env({k: str(v) for k, v in migrate_svc["environment"].items()}).clickhouse_url == (
        settings.clickhouse_url)

    prom_mounts = json.dumps(services["prometheus"]["volumes"])
    assert "deploy/prometheus" in prom_mounts and "/etc/prometheus" in prom_mounts
    graf = services["grafana"]
    assert "/etc/grafana/provisioning" in json.dumps(graf["volumes"])
    assert str(graf["environment"]["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "true"


# --------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = dockerfile_instructions()
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last_from:]


def test_dockerfile_runtime_stage():
    stage = final_stage()
    words = {}
    for w, rest in stage:
        words.setdefault(w, []).append(rest)
    assert words["FROM"][0].split()[0] == "python:3.11-slim"
    assert all(r.split()[0] == "python:3.11-slim" for w, r in dockerfile_instructions() if w == "FROM")
    user = words["USER"][-1].split(":")[0]
    assert user not in ("root", "0"), user
    assert json.loads(words["ENTRYPOINT"][-1]) == ["sendtrail"]
    assert json.loads(words["CMD"][-1]) == ["worker"]
    assert "6066" in words["EXPOSE"][-1].split()
    health = words["HEALTHCHECK"][-1]
    assert "/healthz" in health and "urllib" in health and "python" in health
    # the HEALTHCHECK command is valid Python
    cmd = json.loads(health[health.index("CMD") + 3:].strip())
    compile(cmd[cmd.index("-c") + 1], "<healthcheck>", "exec")


def test_dockerfile_installs_the_package_and_env_is_valid():
    ins = dockerfile_instructions()
    runs = " ".join(r for w, r in ins if w == "RUN")
    assert re.search(r"pip install (--no-deps )?\.", runs)
    env: dict[str, str] = {}
    for w, rest in final_stage():
        if w == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", rest):
                env[key] = value
    sendtrail_env = {k: v for k, v in env.items() if k.startswith("SENDTRAIL_")}
    assert sendtrail_env, "the image should set its SENDTRAIL_* defaults"
    Settings.from_env(sendtrail_env)  # no unknown or malformed setting


def test_dockerignore_keeps_the_package():
    patterns = {l.strip() for l in DOCKERIGNORE.read_text().splitlines() if l.strip() and not l.startswith("#")}
    for needed in ("pyproject.toml", "README.md", "sendtrail", "schemas", "streams", "agents"):
        assert needed not in patterns and f"/{needed}" not in patterns, needed
    assert ".venv" in patterns and ".git" in patterns
