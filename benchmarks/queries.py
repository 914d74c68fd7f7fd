"""Report-query and export benchmark over 10 million recipient rows (embedded chDB).

    python benchmarks/queries.py [--rows 10000000] [--runs 20] [--path DIR] [--keep] [--reuse] [--counters]

(``--path DIR --keep`` keeps the dataset; ``--path DIR --reuse`` measures it
again without loading, after applying any pending migration to it.)

Loads a synthetic dataset with ``INSERT ... SELECT FROM numbers()`` into a
fresh chDB path (migrated with ``sendtrail.migrate``):

* recipients and messages: ``--rows`` rows each (one message per recipient),
  4 steps per contact, so ``rows / 4`` contacts and enrollments;
* automations: ``a0`` holds half the rows, ``a1`` 1,000,000 rows (the export),
  ``a2`` 100,000 rows (the small export), ``a3``..``a9`` the rest;
* node_states: every step done, except every 5th contact waits at step 3;
* with ``--counters``: the worker's report counters (migration 009) over 8
  partitions, every partition covered, as a worker that counted from the start
  holds them (the report, automation totals, contact totals and mailings then
  read them); the live phase then also writes, after each small insert, the
  counter rows of the keys it changed at a higher version, as the worker does
  after each batch. Without it the counter tables are emptied (so a reused
  dataset counts the latest state).

Then prints the median latency (``--runs`` runs, after one warm-up) of each
endpoint's queries as the API runs them (``sendtrail.api.queries.Queries``,
including the ``total`` count), three times: as loaded (parts not merged),
after ``OPTIMIZE ... FINAL``, and after small inserts of new versions as a
running worker makes between merges (``--live-parts`` x ``--live-keys``
contacts); the ZIP export of 1,000,000 and of 100,000 rows
and 5,000,000 rows through the real HTTP route after a warm-up (rows/s,
bytes, RSS growth over the start of each export, sampled every 10 ms; the
process hosts the embedded ClickHouse, whose query buffers count too), and
the Python side alone (synthetic stream of 1M and 10M rows) to show its
memory does not follow the row count.
The last line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sendtrail.api.queries import COMPLETED_RUN, LEFT_RUN, Page, Period, Queries  # noqa: E402
from sendtrail.api.routes import add_routes, make_deps_for_client  # noqa: E402
from sendtrail.clickhouse import connect  # noqa: E402
from sendtrail.migrate import migrate  # noqa: E402

DB = "bench"
# merged by the "after OPTIMIZE FINAL" phase: the big tables and the derived ones (migrations 007, 008)
OPTIMIZED_TABLES = ("recipients", "messages", "enrollments", "node_states", "status_changes", "mailing_info",
                    "send_index", "mailing_sort", "node_waits")
COUNTER_PARTITIONS = 8
TARGET_MS = 100.0
TARGET_EXPORT_ROWS_S = 300_000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    def __init__(self, every: float = 0.01):
        self.every = every
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def load(client, rows: int) -> dict:
    contacts = load_contacts(rows)
    a0_end = contacts // 2
    a1_end = a0_end + 250_000
    a2_end = a1_end + 25_000
    # automation of contact k
    auto = (f"multiIf(k < {a0_end}, 'a0', k < {a1_end}, 'a1', k < {a2_end}, 'a2', "
            "concat('a', toString(3 + k % 7)))")
    base = "toDateTime64('2024-01-01 00:00:00', 3, 'UTC')"
    t = time.perf_counter()
    steps = json.dumps([{"index": i, "name": f"Step {i}", "kind": "email", "day": 3 * i} for i in range(4)])
    client.command(
        f"INSERT INTO {DB}.automations SELECT concat('a', toString(number)), concat('Automation ', toString(number)), "
        f"NULL, 'unlimited', {base}, NULL, 'bench', 1, {{steps:String}}, 'active', {base}, 1 FROM numbers(10)",
        parameters={"steps": steps})
    # recipients: n -> contact k = n / 4, step = n % 4; contacts k % 1000 = 7 got step 1 twice: a second
    # message ("<id>b"), sent after every other send of the load (as a repeat is sent later and lands in
    # a recent part), which the worker lists in repeat_sends (health's duplicate sends)
    def recipients(source: str, suffix: str, sent: str = "k * 2 + step * 259200") -> None:
        client.command(
            f"INSERT INTO {DB}.recipients SELECT concat('r', toString(n), '{suffix}') AS recipient_id, "
            f"{auto} AS automation_id, 0, concat('c', toString(k)), concat('u', toString(k)), "
            "concat('User ', toString(cityHash64(k) % 1000000)), concat('c', toString(k), '@example.com'), step, "
            "concat('{\"day\":', toString(step * 3), ',\"inactive_days\":0}'), "
            f"concat('m', toString(n), '{suffix}'), 'email', concat(automation_id, ':', toString(step)), "
            f"{base} + toIntervalSecond({sent}), '{{\"campaign\":\"bench\"}}', 0, n, 1 "
            f"FROM ({source})", settings={"max_insert_threads": 2})

    recipients(f"SELECT number AS n, intDiv(number, 4) AS k, number % 4 AS step FROM numbers({rows})", "")
    twice = f"SELECT number * 4 + 1 AS n, number AS k, 1 AS step FROM numbers({contacts}) WHERE number % 1000 = 7"
    recipients(twice, "b", f"{contacts * 2 + 4 * 259200} + k")
    client.command(f"INSERT INTO {DB}.repeat_sends SELECT {auto}, concat('c', toString(k)), 0, step, "
                   f"[concat('m', toString(n)), concat('m', toString(n), 'b')], 0 FROM ({twice})")
    t_rec = time.perf_counter() - t
    client.command(
        f"INSERT INTO {DB}.messages SELECT concat('m', toString(n)), concat(automation_id, ':', toString(step)), "
        f"{auto} AS automation_id, 0, concat('c', toString(k)), step, concat('Subject ', toString(step)), 'alice', "
        "'alice@example.com', concat('c', toString(k), '@example.com'), concat('User ', toString(cityHash64(k) % 1000000)), "
        "'email', multiIf(n % 50 = 0, 'bounced', n % 7 = 0, 'clicked', n % 3 = 0, 'opened', 'delivered'), "
        f"sent + toIntervalHour(1), sent, if(n % 50 = 0, NULL, sent + toIntervalMinute(5)), "
        "if(n % 97 = 0, sent, NULL), if(n % 3 = 0 OR n % 7 = 0, sent + toIntervalHour(1), NULL), "
        "if(n % 7 = 0, sent + toIntervalHour(1), NULL), if(n % 50 = 0, sent + toIntervalMinute(1), NULL), "
        "NULL, NULL, NULL, NULL, NULL, NULL, if(n % 50 = 0, 'hard', NULL), NULL, "
        "if(n % 3 = 0, 1, 0), if(n % 7 = 0, 1, 0), sent, 1 "
        f"FROM (SELECT number AS n, intDiv(number, 4) AS k, number % 4 AS step, "
        f"{base} + toIntervalSecond(intDiv(number, 4) * 2 + (number % 4) * 259200) AS sent FROM numbers({rows}))",
        settings={"max_insert_threads": 2})
    client.command(
        f"INSERT INTO {DB}.enrollments SELECT {auto}, concat('c', toString(k)), 0, "
        "if(k % 5 = 0, 'in_progress', 'finished'), if(k % 5 = 0, NULL, 'completed'), if(k % 5 = 0, 3, -1), "
        "concat('User ', toString(cityHash64(k) % 1000000)), concat('c', toString(k), '@example.com'), "
        f"concat('u', toString(k)), {base} + toIntervalSecond(k * 2), {base} + toIntervalSecond(k * 2 + 800000), NULL, "
        f"{base} + toIntervalSecond(k * 2 + 800000), 0, 1 FROM (SELECT number AS k FROM numbers({contacts}))")
    client.command(
        f"INSERT INTO {DB}.node_states SELECT {auto}, concat('c', toString(k)), 0, step, "
        "if(k % 5 = 0 AND step = 3, 'waiting', 'done'), "
        f"{base} + toIntervalSecond(k * 2 + step * 259200), 1 "
        f"FROM (SELECT intDiv(number, 4) AS k, number % 4 AS step FROM numbers({rows}))")
    # the open waits the worker wrote for the waiting nodes (health's stuck contacts; the closed ones are
    # removed by its periodic cleanup)
    client.command(f"INSERT INTO {DB}.node_waits SELECT automation_id, at, contact_id, run, step_index, 0, _version "
                   f"FROM {DB}.node_states WHERE state = 'waiting'")
    client.command(
        f"INSERT INTO {DB}.contacts SELECT concat('c', toString(number)), concat('u', toString(number)), "
        "concat('User ', toString(cityHash64(number) % 1000000)), concat('c', toString(number), '@example.com'), "
        f"NULL, '{{}}', {base}, 1 FROM numbers({contacts})")
    client.command(
        f"INSERT INTO {DB}.status_changes SELECT concat('ch', toString(number)), 'contact_status', {auto}, "
        "concat('c', toString(k)), 0, NULL, NULL, NULL, 'in_progress', NULL, concat('e', toString(number)), "
        f"'step.sent', {base} + toIntervalSecond(number) FROM (SELECT number, number AS k FROM numbers({contacts}))")
    return {"load_seconds": round(time.perf_counter() - t, 1), "recipients_insert_seconds": round(t_rec, 1),
            "contacts": contacts}


# counters table -> (source table FINAL, key columns, column whose hash gives the partition, counter columns
# with their count over the source's latest rows): what streams/counters.py counts per (key, partition)
COUNTERS = {
    "mailing_counters": ("messages", ("mailing_id", "channel", "automation_id", "step_index"), "message_id", (
        ("total_sent", "count()"), ("delivered", "countIf(delivered_at IS NOT NULL)"),
        ("opened", "countIf(opened_at IS NOT NULL)"), ("clicked", "countIf(clicked_at IS NOT NULL)"),
        ("bounced", "countIf(bounced_at IS NOT NULL)"), ("dropped", "countIf(dropped_at IS NOT NULL)"),
        ("deferred", "countIf(deferred_at IS NOT NULL)"), ("spam_reports", "countIf(spam_reported_at IS NOT NULL)"),
        ("unsubscribed", "countIf(unsubscribed_at IS NOT NULL)"))),
    "node_counters": ("node_states", ("automation_id", "step_index"), "contact_id", (
        ("done", "countIf(state = 'done')"), ("waiting", "countIf(state = 'waiting')"),
        ("filtered", "countIf(state = 'filtered')"), ("stopped", "countIf(state = 'stopped')"))),
    "status_counters": ("enrollments", ("automation_id", "status"), "contact_id", (
        ("runs", "count()"), ("contacts", "countIf(run = 0)"), ("ignored_enrollments", "sum(ignored_enrollments)"),
        ("completed", f"countIf({COMPLETED_RUN})"), ("in_progress", "countIf(current_step > 0)"),
        ("not_started", "countIf(current_step = 0)"),
        ("left_runs", f"countIf({LEFT_RUN})"))),
}


def count_counters(client, table: str, partitions: int, version: int, where: str = "", params: dict | None = None
                   ) -> None:
    """Insert ``table``'s counter rows (``version``) per (key, partition) counted from the source's latest
    state (FINAL) matching ``where`` (a condition on the key columns and ``p``, the partition). With
    ``where``, the keys the counters table holds there get a row too (zeros when nothing counts there any
    more): the worker writes a key it counted before even when its counts went to 0."""
    source, keys, hashed, counts = COUNTERS[table]
    key_sql = ", ".join(keys)
    names = ", ".join(name for name, _ in counts)
    aliases = [f"_n{i}" for i in range(len(counts))]  # (an alias equal to a column inside its aggregate is ambiguous)
    counted = (f"SELECT {key_sql}, toUInt32(cityHash64({hashed}) % {partitions}) AS p, "
               + ", ".join(f"toUInt64({expr}) AS {a}" for (_, expr), a in zip(counts, aliases))
               + f" FROM {DB}.{source} FINAL {'WHERE ' + where if where else ''} GROUP BY {key_sql}, p")
    if where:
        held = (f"SELECT {key_sql}, partition AS p, " + ", ".join(f"toUInt64(0) AS {a}" for a in aliases)
                + f" FROM {DB}.{table} FINAL WHERE {where}")
        body = (f"SELECT {key_sql}, p, " + ", ".join(f"sum({a})" for a in aliases)
                + f", {version} FROM ({counted} UNION ALL {held}) GROUP BY {key_sql}, p")
    else:
        body = f"SELECT {key_sql}, p, {', '.join(aliases)}, {version} FROM ({counted})"
    client.command(f"INSERT INTO {DB}.{table} ({key_sql}, partition, {names}, _version) {body}",
                   parameters=params or None)


def load_counters(client, partitions: int = COUNTER_PARTITIONS) -> dict:
    """The worker's report counters (migration 009) as a worker that counted from the start holds them: per
    (key, partition) over ``partitions`` partitions (by a hash of the message / contact id, the topics'
    keys), counted from the latest state, and every partition covered."""
    t = time.perf_counter()
    clear_counters(client)
    for table in COUNTERS:
        count_counters(client, table, partitions, 1)
    client.command(
        f"INSERT INTO {DB}.counter_coverage SELECT c, number, {partitions}, 1 FROM numbers({partitions}) "
        "ARRAY JOIN ['mailing_counters', 'node_counters', 'status_counters'] AS c")
    return {"counters_seconds": round(time.perf_counter() - t, 1), "counter_partitions": partitions}


def clear_counters(client) -> None:
    for table in (*COUNTERS, "counter_coverage"):
        client.command(f"TRUNCATE TABLE {DB}.{table}")


def live_writes(client, parts: int, keys_per_part: int, counters: bool = False) -> dict:
    """What a running worker adds between merges: ``parts`` small inserts, each with new versions of
    ``keys_per_part`` contacts of ``a0`` (their step-3 node, step-0 message and enrollment: a waiting
    contact moves on, another one starts waiting, a message gets opened). They land in small parts
    beside the merged ones, so the reports' latest-state reads meet keys outside the largest part.

    With ``counters``, after each insert the counter rows of the keys it changed (a0's statuses, a0's
    step-3 node, mailing a0:0) are counted again from the tables' latest state in the partitions of the
    changed contacts / messages and written at the next version, as the worker writes them after each
    batch."""
    t = time.perf_counter()
    counter_seconds = 0.0
    for i in range(parts):
        lo, hi = i * keys_per_part, (i + 1) * keys_per_part
        contacts = f"(SELECT concat('c', toString(number)) FROM numbers({lo}, {hi - lo}))"
        # the waits of these changes: a waiting node moving on closes its wait, a node starting to wait opens one
        client.command(
            f"INSERT INTO {DB}.node_waits SELECT automation_id, w.1, contact_id, run, step_index, w.2, _version + 1 "
            f"FROM {DB}.node_states ARRAY JOIN arrayConcat(if(state = 'waiting', [(at, toUInt8(1))], []), "
            "if(state != 'waiting' AND cityHash64(contact_id) % 5 = 1, [(at + toIntervalDay(1), toUInt8(0))], [])) AS w "
            f"WHERE automation_id = 'a0' AND step_index = 3 AND contact_id IN {contacts}")
        client.command(
            f"INSERT INTO {DB}.node_states SELECT * REPLACE ("
            "if(state = 'waiting', 'done', if(cityHash64(contact_id) % 5 = 1, 'waiting', state)) AS state, "
            "at + toIntervalDay(1) AS at, _version + 1 AS _version) "
            f"FROM {DB}.node_states WHERE automation_id = 'a0' AND step_index = 3 AND contact_id IN {contacts}")
        client.command(
            f"INSERT INTO {DB}.messages SELECT * REPLACE ("
            "coalesce(opened_at, sent_at + toIntervalHour(2)) AS opened_at, _version + 1 AS _version) "
            f"FROM {DB}.messages WHERE mailing_id = 'a0:0' AND contact_id IN {contacts}")
        client.command(
            f"INSERT INTO {DB}.enrollments SELECT * REPLACE ("
            "if(status = 'in_progress', 'finished', status) AS status, "
            "if(status = 'in_progress', 'completed', reason) AS reason, "
            "if(status = 'in_progress', -1, current_step) AS current_step, _version + 1 AS _version) "
            f"FROM {DB}.enrollments WHERE automation_id = 'a0' AND contact_id IN {contacts}")
        if counters:
            tc = time.perf_counter()
            n = COUNTER_PARTITIONS
            version = 2 + i  # the load wrote version 1
            (of_contacts,), = client.query(
                f"SELECT groupUniqArray(toUInt32(cityHash64(concat('c', toString(number))) % {n})) "
                f"FROM numbers({lo}, {hi - lo})").result_rows
            (of_messages,), = client.query(
                f"SELECT groupUniqArray(toUInt32(cityHash64(message_id) % {n})) FROM {DB}.messages "
                f"WHERE mailing_id = 'a0:0' AND contact_id IN {contacts}").result_rows
            count_counters(client, "node_counters", n, version,
                           "automation_id = 'a0' AND step_index = 3 AND p IN {ps:Array(UInt32)}",
                           {"ps": of_contacts})
            count_counters(client, "status_counters", n, version,
                           "automation_id = 'a0' AND p IN {ps:Array(UInt32)}", {"ps": of_contacts})
            count_counters(client, "mailing_counters", n, version,
                           "mailing_id = 'a0:0' AND p IN {ps:Array(UInt32)}", {"ps": of_messages})
            counter_seconds += time.perf_counter() - tc
    out = {"parts": parts, "keys_per_part": keys_per_part, "seconds": round(time.perf_counter() - t, 1)}
    if counters:
        out["counters_seconds"] = round(counter_seconds, 1)
    return out


def parts(client) -> dict:
    rows = client.query(
        "SELECT table, count() FROM system.parts WHERE database = {db:String} AND active GROUP BY table",
        parameters={"db": DB}).result_rows
    return dict(rows)


def load_contacts(rows: int) -> int:
    return rows // 4


def bench_queries(deps, runs: int, rows: int) -> dict:
    q = Queries(deps)
    cases = {
        "recipients_page_step_sent_time_desc": lambda: q.recipients(
            "a0", step=2, contact_id=None, q=None, period=Period(), page=Page(50, 0, "sent_time", "DESC")),
        "recipients_page_sent_time_desc": lambda: q.recipients(
            "a0", step=None, contact_id=None, q=None, period=Period(), page=Page(50, 0, "sent_time", "DESC")),
        "recipients_contact_lookup": lambda: q.recipients(
            "a0", step=None, contact_id="c777", q=None, period=Period(), page=Page(50, 0, "sent_time", "DESC")),
        "report_nodes": lambda: q.report("a0", Period()),
        "mailings_table": lambda: q.mailings(automation_id=None, step=None, q=None, period=Period(),
                                             page=Page(50, 0, "date", "DESC")),
        "mailings_of_automation": lambda: q.mailings(automation_id="a0", step=None, q=None, period=Period(),
                                                     page=Page(50, 0, "date", "DESC")),
        "mailing_recipients_by_name": lambda: q.mailing_recipients(
            "a0:0", status=None, q=None, page=Page(50, 0, "name", "ASC")),
        "contact_card": lambda: q.contact_automations("c777", page=Page(50, 0)),
        "automation_contacts": lambda: q.contacts("a0", status=None, q=None, run=None,
                                                  page=Page(50, 0, "updated_at", "DESC")),
        "node_contacts_waiting": lambda: q.node_contacts("a0", 3, state="waiting", period=Period(),
                                                         page=Page(50, 0, "at", "DESC"), sort_key="at"),
        "automation_detail": lambda: q.automation_detail("a0"),
        "health": lambda: q.health("a0", cutoff=__import__("datetime").datetime(2024, 6, 1),
                                   page=Page(50, 0)),
    }

    async def run_all() -> dict:
        out = {}
        for name, fn in cases.items():
            first = await fn()  # warm-up
            if name == "health":  # the load sent step 1 twice to a0's contacts k % 1000 = 7
                expected = len(range(7, (load_contacts(rows) // 2), 1000))
                assert first["duplicate_sends_total"] == expected, (first["duplicate_sends_total"], expected)
                (stuck,), = await deps.query(
                    f"SELECT count() FROM {DB}.node_states FINAL WHERE automation_id = 'a0' AND state = 'waiting' "
                    "AND at < '2024-06-01'", {})
                assert first["stuck_total"] == stuck, (first["stuck_total"], stuck)  # node_waits as node_states
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                await fn()
                times.append((time.perf_counter() - t) * 1000)
            out[name] = round(statistics.median(times), 1)
            print(f"  {name:45s} median {out[name]:8.1f} ms  (min {min(times):.1f}, max {max(times):.1f})",
                  flush=True)
        return out

    return asyncio.run(run_all())


def bench_export(deps, automation_id: str) -> dict:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    async def run() -> dict:
        app = web.Application()
        add_routes(app, deps)
        async with TestClient(TestServer(app, host="127.0.0.1")) as c:
            with RssSampler() as rss:
                t = time.perf_counter()
                resp = await c.get(f"/api/v1/automations/{automation_id}/recipients/export")
                assert resp.status == 200, await resp.text()
                size = 0
                tail = b""
                async for chunk in resp.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    tail = (tail + chunk)[-(1 << 16):]
                seconds = time.perf_counter() - t
        return {"seconds": seconds, "bytes": size, "rss_growth": rss.peak - rss.base, "rss_peak": rss.peak,
                "tail": tail}

    return asyncio.run(run())


def bench_export_pipeline(deps, rows: int) -> dict:
    """The same route with a synthetic ClickHouse stream: the Python side alone (CSV chunks -> ZIP -> HTTP)."""
    import dataclasses

    line = (b'"r123456","u12345","User 123456","c12345@example.com",2,"{""day"":6,""inactive_days"":0}",'
            b'"2024-01-01 00:00:00.000","{""campaign"":""bench""}","a0",0,"c12345","m123456","a0:2","email"\r\n')

    async def stream_raw(sql, params):
        chunk = line * 5000
        for _ in range(rows // 5000):
            yield chunk

    r = bench_export(dataclasses.replace(deps, stream_raw=stream_raw), "a0")
    return {"rows": rows, "seconds": round(r["seconds"], 2), "rows_per_s": round(rows / r["seconds"]),
            "rss_growth_mb": round(r["rss_growth"] / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--path", default=None, help="chDB directory (default: a fresh temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the chDB directory")
    ap.add_argument("--skip-optimize", action="store_true")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the dataset already at --path (loaded by an earlier run with --keep): "
                         "apply pending migrations to it and skip the load")
    ap.add_argument("--counters", action="store_true",
                    help="fill the worker's report counters (migration 009) after the load as a worker that "
                         "counted from the start would, every partition covered, and keep them up to date in the "
                         "live phase (without: the counter tables are emptied and the queries count the latest "
                         "state)")
    ap.add_argument("--live-parts", type=int, default=10,
                    help="after the merged phase: small inserts of new versions, as a running worker makes (0: skip)")
    ap.add_argument("--live-keys", type=int, default=5_000, help="contacts of a0 updated per live insert")
    args = ap.parse_args()

    path = args.path or tempfile.mkdtemp(prefix="sendtrail-bench-")
    reuse = args.reuse and args.path and Path(path).exists() and any(Path(path).iterdir())
    if Path(path).exists() and any(Path(path).iterdir()) and not reuse:
        shutil.rmtree(path)
    url = f"chdb://{path}"
    result: dict = {"rows": args.rows, "runs": args.runs, "cpus": os.cpu_count(),
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    client = connect(url, database=DB)
    try:
        t = time.perf_counter()
        result["migrations_applied"] = migrate(client, DB)
        result["migrate_seconds"] = round(time.perf_counter() - t, 1)
        if reuse:
            print(f"reusing the dataset at {path}", flush=True)
            result["reused"] = True
        else:
            print(f"loading {args.rows:,} recipient rows into {path} ...", flush=True)
            result.update(load(client, args.rows))
        if args.counters:
            result.update(load_counters(client))
            print(f"counters filled in {result['counters_seconds']} s", flush=True)
        else:
            clear_counters(client)
        result["counters"] = bool(args.counters)
        counts = dict(client.query(
            "SELECT 'recipients', count() FROM bench.recipients UNION ALL SELECT 'messages', count() FROM bench.messages "
            "UNION ALL SELECT 'enrollments', count() FROM bench.enrollments UNION ALL SELECT 'node_states', count() "
            "FROM bench.node_states").result_rows)
        result["table_rows"] = counts
        print(f"loaded in {result.get('load_seconds')} s: {counts}", flush=True)
        deps = make_deps_for_client(client, DB, client_factory=lambda: connect(url, database=DB),
                                    now=lambda: 1717200000.0)

        result["parts_as_loaded"] = parts(client)
        print(f"query medians as loaded (parts: {result['parts_as_loaded']}):", flush=True)
        result["query_ms_as_loaded"] = bench_queries(deps, args.runs, args.rows)

        if not args.skip_optimize:
            t = time.perf_counter()
            for table in OPTIMIZED_TABLES:
                client.command(f"OPTIMIZE TABLE {DB}.{table} FINAL")
            result["optimize_seconds"] = round(time.perf_counter() - t, 1)
            result["parts_merged"] = parts(client)
            print(f"query medians after OPTIMIZE FINAL ({result['optimize_seconds']} s):", flush=True)
            result["query_ms_merged"] = bench_queries(deps, args.runs, args.rows)
            if args.live_parts:
                result["live_writes"] = live_writes(client, args.live_parts, args.live_keys, args.counters)
                result["parts_live"] = parts(client)
                print(f"query medians with live writes ({result['live_writes']}; parts: {result['parts_live']}):",
                      flush=True)
                result["query_ms_live"] = bench_queries(deps, args.runs, args.rows)

        exports = {}
        # warm-up (threads, allocator caches), then 100k, 1M and 5M rows: RSS growth must not follow the rows
        bench_export(deps, "a2")
        bench_export(deps, "a1")
        for automation_id in ("a2", "a1", "a0"):
            n = client.query("SELECT count() FROM bench.recipients FINAL WHERE automation_id = {a:String}",
                             parameters={"a": automation_id}).result_rows[0][0]
            r = bench_export(deps, automation_id)
            assert r["tail"][-22:-18] == b"PK\x05\x06" or b"PK\x05\x06" in r["tail"], "ZIP end record missing"
            exports[str(n)] = {
                "rows": n, "seconds": round(r["seconds"], 2), "rows_per_s": round(n / r["seconds"]),
                "zip_mb": round(r["bytes"] / 1e6, 1), "rss_growth_mb": round(r["rss_growth"] / 1e6, 1),
                "rss_peak_mb": round(r["rss_peak"] / 1e6, 1),
            }
            print(f"export {n:,} rows: {exports[str(n)]}", flush=True)
        result["export"] = exports
        pipeline = {}
        for n in (1_000_000, 10_000_000):
            pipeline[str(n)] = bench_export_pipeline(deps, n)
            print(f"export pipeline only (synthetic ClickHouse stream) {n:,} rows: {pipeline[str(n)]}", flush=True)
        result["export_pipeline_only"] = pipeline
        final = result.get("query_ms_merged") or result["query_ms_as_loaded"]
        result["slow_queries_merged"] = {k: v for k, v in final.items() if v >= TARGET_MS}
        result["slow_queries_as_loaded"] = {k: v for k, v in result["query_ms_as_loaded"].items() if v >= TARGET_MS}
        if "query_ms_live" in result:
            result["slow_queries_live"] = {k: v for k, v in result["query_ms_live"].items() if v >= TARGET_MS}
        one_m = exports.get("1000000") or max(exports.values(), key=lambda e: e["rows"])
        result["export_1m_rows_per_s"] = one_m["rows_per_s"]
        result["export_1m_seconds"] = one_m["seconds"]
        result["export_target_met"] = one_m["rows_per_s"] >= TARGET_EXPORT_ROWS_S
        result["export_rss_growth_mb_by_rows"] = {k: v["rss_growth_mb"] for k, v in exports.items()}
    finally:
        client.close()
        if not args.keep and not args.path:
            shutil.rmtree(path, ignore_errors=True)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]  # other processes share the 2 cores
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
