"""Run the real worker as a subprocess, feed it a generated workload, and read ClickHouse back.

ClickHouse is read in a child process: an embedded chDB path belongs to one
process at a time, and the test process may hold another one open.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

from sendtrail.api.queries import COMPLETED_RUN, LEFT_RUN
from sendtrail.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    """``sendtrail worker`` in a subprocess with its own data dir, chDB path and port."""

    def __init__(self, tmp: Path, bootstrap: str, prefix: str, partitions: int = 4, extra_env: dict | None = None):
        self.tmp = tmp
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SENDTRAIL_")}
        self.env.update({
            "SENDTRAIL_KAFKA": bootstrap,
            "SENDTRAIL_TOPIC_PREFIX": prefix,
            "SENDTRAIL_PARTITIONS": str(partitions),
            "SENDTRAIL_DATA_DIR": str(tmp / "data"),
            "SENDTRAIL_CLICKHOUSE_URL": f"chdb://{tmp / 'clickhouse'}",
            "SENDTRAIL_WEB_HOST": "127.0.0.1",
            "SENDTRAIL_WEB_PORT": str(self.port),
            "SENDTRAIL_RESUME_CHECK_SECONDS": "1",
            "SENDTRAIL_WAITS_CLEANUP_SECONDS": "2",  # node_waits cleaned while the pipeline writes
            "SENDTRAIL_LOG_LEVEL": "info",
        })
        self.env.update(extra_env or {})
        self.settings = Settings.from_env(self.env)
        self.proc: subprocess.Popen | None = None
        self.log_path = tmp / "worker.log"
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"\n===== start {self.starts} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen([sys.executable, "-m", "sendtrail.cli", "worker"], cwd=self.tmp, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_http(self, path: str = "/healthz", timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"worker HTTP {path} not up in {timeout}s; log: {self.tail()}")

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}; log: {self.tail()}")

    def wait_caught_up(self, timeout: float = 300.0) -> None:
        from agents.offsets import wait_caught_up

        self._check_alive()
        asyncio.run(wait_caught_up(self.settings, timeout=timeout, stable_checks=3, interval=1.0))
        self._check_alive()

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.proc = None

    def notable(self, n: int = 80) -> str:
        """The worker log's starts, assignments, recoveries, warnings, errors and recounts (for a failure
        message), without the client's coordinator retries."""
        marks = ("=====", "WARNING", "ERROR", "recount", "Traceback", "assigned", "recovered")
        noise = ("GroupCoordinatorNotAvailable", "Marking the coordinator dead", "NotLeaderForPartition")
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join([ln for ln in lines if any(m in ln for m in marks)
                          and not any(x in ln for x in noise)][-n:])

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def query_clickhouse(path: Path, queries: dict[str, str]) -> dict[str, list[list]]:
    """Run SELECTs against a chDB path in a child process; returns rows per query name."""
    script = (
        "import json, sys\n"
        "from sendtrail.clickhouse import connect\n"
        "qs = json.loads(sys.stdin.read())\n"
        "c = connect('chdb://' + sys.argv[1])\n"
        "out = {k: [list(r) for r in c.query(q).result_rows] for k, q in qs.items()}\n"
        "c.close()\n"
        "sys.stdout.write(json.dumps(out, default=str))\n"
    )
    res = subprocess.run([sys.executable, "-c", script, str(path)], input=json.dumps(queries), capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"query failed: {res.stderr[-3000:]}")
    return json.loads(res.stdout)


FLAG_COLUMNS = ("sent", "delivered", "deferred", "opened", "clicked", "bounced", "dropped", "spam_reported",
                "unsubscribed", "resubscribed", "replied", "auto_replied")

END_STATE_QUERIES = {
    "enrollments": "SELECT automation_id, contact_id, run, status, ifNull(reason, ''), current_step "
                   "FROM sendtrail.enrollments FINAL",
    "ignored": "SELECT sum(m) FROM (SELECT max(ignored_enrollments) AS m FROM sendtrail.enrollments FINAL "
               "GROUP BY automation_id, contact_id)",
    "nodes": "SELECT automation_id, contact_id, run, step_index, state FROM sendtrail.node_states FINAL "
             "WHERE state != 'none'",
    "recipients": "SELECT automation_id, contact_id, run, step_index, message_id FROM sendtrail.recipients FINAL",
    # health's duplicate sends as the API reads them: the worker's repeat_sends, their ids from send_index
    # for the keys it marked for verification
    "duplicate_sends": "WITH named AS (SELECT automation_id AS a, contact_id AS c, run AS r, step_index AS s, "
                       "groupUniqArrayArray(message_ids) AS ids, max(verify) AS v FROM sendtrail.repeat_sends "
                       "GROUP BY a, c, r, s) SELECT a, c, r, s, arraySort(ids) FROM (SELECT a, c, r, s, ids FROM named "
                       "WHERE v = 0 UNION ALL SELECT automation_id, contact_id, run, step_index, "
                       "groupUniqArrayArray(message_ids) FROM sendtrail.send_index WHERE (automation_id, contact_id, "
                       "run, step_index) IN (SELECT a, c, r, s FROM named WHERE v = 1) "
                       "GROUP BY automation_id, contact_id, run, step_index) WHERE length(ids) > 1",
    "messages": "SELECT message_id, status, opens, clicks, bounce_class, "
                + ", ".join(f"{f}_at IS NOT NULL" for f in FLAG_COLUMNS) + " FROM sendtrail.messages FINAL",
    "status_changes": "SELECT count(), uniqExact(change_id) FROM sendtrail.status_changes FINAL",
    # the worker's report counters (migration 009) against the latest state they count
    "node_counters": "SELECT automation_id, step_index, sum(done), sum(waiting), sum(filtered), sum(stopped) "
                     "FROM sendtrail.node_counters FINAL GROUP BY automation_id, step_index "
                     "HAVING sum(done) + sum(waiting) + sum(filtered) + sum(stopped) > 0",
    "node_final": "SELECT automation_id, step_index, countIf(state = 'done'), countIf(state = 'waiting'), "
                  "countIf(state = 'filtered'), countIf(state = 'stopped') FROM sendtrail.node_states FINAL "
                  "WHERE state != 'none' GROUP BY automation_id, step_index",
    "status_counters": "SELECT automation_id, status, sum(runs), sum(contacts), sum(ignored_enrollments), "
                       "sum(completed), sum(in_progress), sum(not_started), sum(left_runs) "
                       "FROM sendtrail.status_counters FINAL GROUP BY automation_id, status HAVING sum(runs) > 0",
    "status_final": "SELECT automation_id, status, count(), countIf(run = 0), sum(ignored_enrollments), "
                    f"countIf({COMPLETED_RUN}), countIf(current_step > 0), countIf(current_step = 0), "
                    f"countIf({LEFT_RUN}) FROM sendtrail.enrollments FINAL GROUP BY automation_id, status",
    "mailing_counters": "SELECT mailing_id, channel, automation_id, step_index, sum(total_sent), sum(delivered), "
                        "sum(opened), sum(clicked), sum(bounced), sum(dropped), sum(deferred), sum(spam_reports), "
                        "sum(unsubscribed) FROM sendtrail.mailing_counters FINAL "
                        "GROUP BY mailing_id, channel, automation_id, step_index HAVING sum(total_sent) > 0",
    "mailing_final": "SELECT mailing_id, channel, automation_id, step_index, count(), countIf(delivered_at IS NOT NULL), "
                     "countIf(opened_at IS NOT NULL), countIf(clicked_at IS NOT NULL), "
                     "countIf(bounced_at IS NOT NULL), countIf(dropped_at IS NOT NULL), "
                     "countIf(deferred_at IS NOT NULL), countIf(spam_reported_at IS NOT NULL), "
                     "countIf(unsubscribed_at IS NOT NULL) FROM sendtrail.messages FINAL "
                     "GROUP BY mailing_id, channel, automation_id, step_index",
    "coverage": "SELECT counters, partition, partitions FROM sendtrail.counter_coverage FINAL",
    # health's stuck contacts as the API reads them (queries._open_waits: node_waits, migration 012),
    # against the waiting nodes of the latest state
    "waits": "SELECT w.automation_id, w.contact_id, w.run, w.step_index, toUnixTimestamp64Milli(w.since) FROM ("
             "SELECT automation_id, contact_id, run, step_index, since, _version FROM sendtrail.node_waits FINAL "
             "WHERE since > toDateTime64(0, 3, 'UTC')) AS w LEFT ANY JOIN (SELECT automation_id, contact_id, run, "
             "step_index, _version AS reset FROM sendtrail.node_waits FINAL WHERE since = toDateTime64(0, 3, 'UTC')) "
             "AS r USING (automation_id, contact_id, run, step_index) WHERE w._version >= r.reset "
             "SETTINGS join_use_nulls = 0",
    "waits_final": "SELECT automation_id, contact_id, run, step_index, toUnixTimestamp64Milli(at) "
                   "FROM sendtrail.node_states FINAL WHERE state = 'waiting'",
}


def read_end_state(path: Path) -> dict:
    raw = query_clickhouse(path, END_STATE_QUERIES)
    state: dict = {"enrollments": {}, "nodes": {}, "messages": {}}
    for aid, cid, run, status, reason, current in raw["enrollments"]:
        state["enrollments"][f"{aid}|{cid}|{run}"] = {"status": status, "reason": reason or None,
                                                        "current_step": current}
    for aid, cid, run, step, node_state in raw["nodes"]:
        state["nodes"].setdefault(f"{aid}|{cid}|{run}", {})[str(step)] = node_state
    state["recipients"] = sorted([list(r) for r in raw["recipients"]])
    state["duplicate_sends"] = sorted((*r[:4], tuple(r[4])) for r in raw["duplicate_sends"])
    for row in raw["messages"]:
        mid, status, opens, clicks, bounce_class = row[:5]
        flags = sorted(f for f, on in zip(FLAG_COLUMNS, row[5:]) if on in (1, True, "1", "true"))
        state["messages"][mid] = {"status": status, "opens": opens, "clicks": clicks,
                                  "bounce_class": bounce_class or None, "flags": flags}
    state["ignored_enrollments"] = int(raw["ignored"][0][0] or 0)
    state["status_changes"] = raw["status_changes"][0]
    for name in ("node", "status", "mailing"):
        for source in ("counters", "final"):
            state[f"{name}_{source}"] = sorted(tuple(int(v) if isinstance(v, (int, float)) else v for v in r)
                                               for r in raw[f"{name}_{source}"])
    state["coverage"] = sorted(tuple(r) for r in raw["coverage"])
    for name in ("waits", "waits_final"):
        state[name] = sorted(tuple(r) for r in raw[name])
    return state


def compare_with_oracle(state: dict, oracle: dict) -> list[str]:
    """Every difference between the ClickHouse end state and the oracle, as readable lines."""
    diffs: list[str] = []
    exp_enr = oracle["enrollments"]
    for key in sorted(set(exp_enr) | set(state["enrollments"])):
        exp, got = exp_enr.get(key), state["enrollments"].get(key)
        if exp is None or got is None:
            diffs.append(f"enrollment {key}: expected {exp}, got {got}")
            continue
        for f in ("status", "reason", "current_step"):
            if exp.get(f) != got.get(f):
                diffs.append(f"enrollment {key} {f}: expected {exp.get(f)!r}, got {got.get(f)!r}")
        exp_nodes = {str(k): v for k, v in (exp.get("nodes") or {}).items()}
        got_nodes = state["nodes"].get(key, {})
        if exp_nodes != got_nodes:
            diffs.append(f"enrollment {key} nodes: expected {exp_nodes}, got {got_nodes}")
    exp_rec = sorted([list(r) for r in oracle["recipients"]])
    if exp_rec != state["recipients"]:
        missing = [r for r in exp_rec if r not in state["recipients"]][:5]
        extra = [r for r in state["recipients"] if r not in exp_rec][:5]
        diffs.append(f"recipients: expected {len(exp_rec)}, got {len(state['recipients'])}; "
                     f"missing {missing}, extra {extra}")
    sent = {}
    for aid, cid, run, step, mid in exp_rec:
        sent.setdefault((aid, cid, run, step), set()).add(mid)
    exp_dups = sorted((*key, tuple(sorted(mids))) for key, mids in sent.items() if len(mids) > 1)
    if exp_dups != state["duplicate_sends"]:
        diffs.append(f"duplicate sends: expected {len(exp_dups)}, got {len(state['duplicate_sends'])}; "
                     f"missing {sorted(set(exp_dups) - set(state['duplicate_sends']))[:5]}, "
                     f"extra {sorted(set(state['duplicate_sends']) - set(exp_dups))[:5]}")
    exp_msg = oracle["messages"]
    for mid in sorted(set(exp_msg) | set(state["messages"])):
        exp, got = exp_msg.get(mid), state["messages"].get(mid)
        if exp is None or got is None:
            diffs.append(f"message {mid}: expected {exp}, got {got}")
            continue
        for f in ("status", "opens", "clicks", "bounce_class", "flags"):
            e = exp.get(f)
            if f == "flags":
                e = sorted(e or [])
            if e != got.get(f):
                diffs.append(f"message {mid} {f}: expected {e!r}, got {got.get(f)!r}")
    if oracle.get("ignored_enrollments", 0) != state["ignored_enrollments"]:
        diffs.append(f"ignored enrollments: expected {oracle.get('ignored_enrollments')}, "
                     f"got {state['ignored_enrollments']}")
    total, unique = state["status_changes"]
    if total != unique:
        diffs.append(f"status_changes: {total} rows but {unique} distinct change ids (a change counted twice)")
    diffs.extend(compare_counters(state))
    return diffs


def compare_counters(state: dict) -> list[str]:
    """The worker's report counters must count exactly the latest state, and cover every partition."""
    diffs = []
    for name in ("node", "status", "mailing"):
        got, want = set(state[f"{name}_counters"]), set(state[f"{name}_final"])
        for row in sorted(got - want, key=str)[:10]:
            diffs.append(f"{name}_counters: counted {row}")
        for row in sorted(want - got, key=str)[:10]:
            diffs.append(f"{name}_counters: the latest state counts {row}")
    got, want = set(state["waits"]), set(state["waits_final"])
    for row in sorted(got - want, key=str)[:10]:
        diffs.append(f"node_waits: open wait {row} is not a waiting node")
    for row in sorted(want - got, key=str)[:10]:
        diffs.append(f"node_waits: waiting node {row} has no open wait")
    if len(state["waits"]) != len(got):
        diffs.append("node_waits: a wait listed twice")
    partitions = {n for _, _, n in state["coverage"]}
    covered = {(c, p) for c, p, _ in state["coverage"]}
    n = max(partitions, default=0)
    expected = {(c, p) for c in ("mailing_counters", "node_counters", "status_counters") for p in range(n)}
    if len(partitions) != 1 or covered != expected:
        diffs.append(f"counter_coverage: {state['coverage']}")
    return diffs


def node_counts(state: dict) -> dict:
    counts: dict = {}
    for key, nodes in state["nodes"].items():
        aid = key.split("|", 1)[0]
        for step, node_state in nodes.items():
            counts.setdefault(aid, {}).setdefault(step, Counter())[node_state] += 1
    return counts


async def consume_all(bootstrap: str, topic: str, timeout: float = 10.0) -> list[tuple[bytes, bytes]]:
    """Every message of a topic from the beginning (keys and values)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    out: list[tuple[bytes, bytes]] = []
    try:
        parts = consumer.assignment()
        deadline = time.monotonic() + timeout
        while not parts and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            parts = consumer.assignment()
        ends = await consumer.end_offsets(list(parts))
        while time.monotonic() < deadline:
            positions = {tp: await consumer.position(tp) for tp in ends}
            if all(positions[tp] >= end for tp, end in ends.items()):
                break
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for records in batch.values():
                out.extend((r.key, r.value) for r in records)
    finally:
        await consumer.stop()
    return out
