"""Shared pytest fixtures for sendtrail.

* Network guard: a test under tests/unit that is not marked ``@pytest.mark.network``
  may not open sockets (connect/connect_ex/bind on anything but AF_UNIX, or
  socket.create_connection); it gets :class:`NetworkAccessBlocked` instead.
  Tests under tests/integration and tests/e2e are marked ``network`` automatically.
* ``kafka_cluster`` / ``kafka_bootstrap`` (session): real Apache Kafka started
  with ``deploy/local/kafka start --port 0 --dir <tmp>`` once per session and
  stopped at the end. Set ``TEST_KAFKA_BOOTSTRAP`` to reuse a running broker
  instead (and optionally ``TEST_KAFKA_DIR`` to its state folder).
* ``topic_prefix`` (function): a fresh ``t<hex8>.`` prefix per test.
* ``create_topics``: ``create_topics(names, partitions=4, replication_factor=1,
  configs=None)`` creates topics and waits until every partition has a leader.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
KAFKA_SCRIPT = ROOT / "deploy" / "local" / "kafka"
NETWORK_DIRS = ("integration", "e2e")


# --------------------------------------------------------------------------- network guard

class NetworkAccessBlocked(RuntimeError):
    """Raised when a unit test without @pytest.mark.network tries to use the network."""


def _in_dir(item: pytest.Item, *names: str) -> bool:
    try:
        rel = Path(str(item.path)).resolve().relative_to(TESTS)
    except ValueError:
        return False
    return bool(rel.parts) and rel.parts[0] in names


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _in_dir(item, *NETWORK_DIRS):
            item.add_marker(pytest.mark.network)


def _blocked(what: str, nodeid: str) -> NetworkAccessBlocked:
    return NetworkAccessBlocked(
        f"{what} attempted by unit test {nodeid}: unit tests may not open sockets. "
        "Mark the test @pytest.mark.network (and prefer tests/integration) if it really needs the network."
    )


@pytest.fixture(autouse=True)
def _network_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    item = request.node
    if not _in_dir(item, "unit") or item.get_closest_marker("network") is not None:
        yield
        return
    nodeid = item.nodeid
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_bind = socket.socket.bind
    unix = getattr(socket, "AF_UNIX", None)

    def connect(self, address, *a, **kw):
        if self.family == unix:
            return real_connect(self, address, *a, **kw)
        raise _blocked(f"socket.connect({address!r})", nodeid)

    def connect_ex(self, address, *a, **kw):
        if self.family == unix:
            return real_connect_ex(self, address, *a, **kw)
        raise _blocked(f"socket.connect_ex({address!r})", nodeid)

    def bind(self, address, *a, **kw):
        if self.family == unix:
            return real_bind(self, address, *a, **kw)
        raise _blocked(f"socket.bind({address!r})", nodeid)

    def create_connection(address, *a, **kw):
        raise _blocked(f"socket.create_connection({address!r})", nodeid)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket.socket, "bind", bind)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    yield


# --------------------------------------------------------------------------- real Kafka

@dataclass(frozen=True)
class KafkaCluster:
    bootstrap: str
    dir: Path | None  # state folder of deploy/local/kafka; None when reusing TEST_KAFKA_BOOTSTRAP
    started_by_us: bool


def run_kafka_script(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run deploy/local/kafka with `args`; raise with its stderr when it fails and `check` is set."""
    proc = subprocess.run(
        [sys.executable, str(KAFKA_SCRIPT), *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"deploy/local/kafka {' '.join(args)} failed (exit {proc.returncode}):\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    reuse = os.environ.get("TEST_KAFKA_BOOTSTRAP", "").strip()
    if reuse:
        d = os.environ.get("TEST_KAFKA_DIR")
        yield KafkaCluster(bootstrap=reuse, dir=Path(d) if d else None, started_by_us=False)
        return
    if shutil.which("java") is None:
        pytest.skip("real Kafka needs `java` on PATH (or set TEST_KAFKA_BOOTSTRAP to a running broker)")
    state = tmp_path_factory.mktemp("kafka")
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            run_kafka_script("stop", "--dir", str(state), timeout=120, check=False)

    request.addfinalizer(stop)  # registered before start: a half-started cluster is stopped too
    t0 = time.monotonic()
    try:
        # --owner-pid: if this pytest dies without running finalizers, the brokers stop anyway
        proc = run_kafka_script("start", "--port", "0", "--dir", str(state), "--owner-pid", str(os.getpid()))
    except BaseException:
        stop()
        raise
    bootstrap = proc.stdout.strip().splitlines()[-1]
    sys.stderr.write(f"\n[kafka_cluster] {bootstrap} started in {time.monotonic() - t0:.1f}s, state in {state}\n")
    yield KafkaCluster(bootstrap=bootstrap, dir=state, started_by_us=True)
    stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_cluster: KafkaCluster) -> str:
    return kafka_cluster.bootstrap


@pytest.fixture
def topic_prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}."


def run_coro(coro):
    """Run a coroutine to completion, even when called from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name="run_coro")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


TOPIC_ALREADY_EXISTS = 36


async def create_topics_async(bootstrap: str, names: list[str], partitions: int = 4,
                              replication_factor: int = 1, configs: dict[str, str] | None = None,
                              timeout: float = 60.0) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    await admin.start()
    try:
        resp = await admin.create_topics(
            [NewTopic(n, partitions, replication_factor, topic_configs=dict(configs or {})) for n in names],
            timeout_ms=int(timeout * 1000),
        )
        errors = [(t[0], t[1], t[2] if len(t) > 2 else "") for t in resp.topic_errors
                  if t[1] not in (0, TOPIC_ALREADY_EXISTS)]
        if errors:
            raise RuntimeError(f"create_topics failed: {errors}")
        deadline = time.monotonic() + timeout
        while True:
            ready = set()
            for t in await admin.describe_topics(list(names)):
                parts = t.get("partitions") or []
                if t.get("error_code") == 0 and len(parts) >= partitions and all(
                        p.get("leader", -1) >= 0 for p in parts):
                    ready.add(t["topic"])
            if ready >= set(names):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics not ready after {timeout}s: {sorted(set(names) - ready)}")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


@pytest.fixture
def create_topics(kafka_bootstrap: str) -> Callable[..., None]:
    def _create(names: list[str], partitions: int = 4, replication_factor: int = 1,
                configs: dict[str, str] | None = None) -> None:
        run_coro(create_topics_async(kafka_bootstrap, list(names), partitions, replication_factor, configs))

    return _create
