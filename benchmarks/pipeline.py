"""End-to-end throughput and latency of the worker, beside bare Kafka consumers (SPEC section 6).

    python -m benchmarks.pipeline [--events 500000] [--partitions 4] [--bootstrap HOST:PORT]
                                  [--latency-seconds 60] [--skip-scaling] [--keep]

Starts its own local Kafka (``deploy/local/kafka start --port 0``) unless
``--bootstrap`` is given, generates a workload with ``streams.generator`` (at
least ``--events`` events), produces it under fresh topic prefixes and measures:

a. ``aiokafka``: a bare aiokafka consume-and-decode loop (``orjson.loads`` of
   every value) over the four input topics;
b. ``faust``: a bare Faust agent (subprocess; one agent over the same topics,
   ``orjson.loads`` per value, no tables);
c. ``full``: the real worker (``python -m sendtrail.cli worker`` subprocess with
   its own data dir, chDB path, web port and topic prefix). Events/s = input
   events committed by the consumer group per second, measured from the first
   commit the group makes (so start-up, migrations and the join are excluded)
   until every consumed topic, internal ones included, is committed to its end;
   then ``latency``: a fresh worker fed at half the measured full rate (Kafka
   timestamp = produce time), p50/p99 of its
   ``sendtrail_event_to_clickhouse_latency_seconds`` histogram (linear
   interpolation inside buckets; the histogram counts every consumed event,
   internal hops included);
d. ``scaling``: 1 worker, then 2 workers, on 2x the partitions. The embedded
   chDB allows one process per path, so each worker writes its own chDB path:
   that measures the streaming side's scaling, not a shared ClickHouse server's.
   Scaling factor = 2 workers' rate / 1 worker's rate, same partition count.

All rates are "steady state": aiokafka from its assignment to its last message,
bare Faust from its first message to its last, the workers from the group's first commit (all workers ready)
to fully committed. Every process shares this machine's cores with Kafka,
so the core count and load averages are printed. Workers inherit any
``SENDTRAIL_*`` tuning variable set in the environment (e.g.
``SENDTRAIL_BATCH_SIZE``). The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from schemas.topics import INPUT_TOPICS, TOPICS, topic_names  # noqa: E402
from sendtrail.settings import Settings  # noqa: E402

CONSUMED = [name for name, t in TOPICS.items() if t.role in ("input", "internal")]
EVENTS_PER_CONTACT = 17.0  # about what streams.generator makes with 8 automations
LATENCY_METRIC = "sendtrail_event_to_clickhouse_latency_seconds"


def _n(x) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def say(msg: str) -> None:
    print(msg, flush=True)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- Kafka -----------------------------------------------------------------------------------------


class LocalKafka:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.script = ROOT / "deploy" / "local" / "kafka"

    def start(self) -> str:
        out = subprocess.run([sys.executable, str(self.script), "start", "--port", "0", "--dir", str(self.dir)],
                             check=True, stdout=subprocess.PIPE, text=True)
        return out.stdout.strip().splitlines()[-1].strip()

    def stop(self) -> None:
        subprocess.run([sys.executable, str(self.script), "stop", "--dir", str(self.dir)], check=False,
                       stdout=subprocess.DEVNULL)


async def create_topics(bootstrap: str, prefix: str, partitions: int) -> Settings:
    from agents.worker import ensure_topics

    settings = Settings(kafka=bootstrap, topic_prefix=prefix, partitions=partitions)
    await ensure_topics(settings)
    return settings


async def produce_all(bootstrap: str, prefix: str, events) -> float:
    """Produce as fast as possible; returns events/s of the producer."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1 << 20,
                                enable_idempotence=True)
    await producer.start()
    started = time.perf_counter()
    try:
        futures = []
        for topic, key, value in events:
            futures.append(await producer.send(prefix + topic, value=value,
                                               key=key.encode() if isinstance(key, str) else key))
            if len(futures) >= 20_000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return len(events) / (time.perf_counter() - started)


async def produce_paced(bootstrap: str, prefix: str, events, rate: float) -> float:
    """Produce at ``rate`` events/s, Kafka timestamp = send time; returns the achieved rate."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2, enable_idempotence=True)
    await producer.start()
    started = time.perf_counter()
    sent = 0
    futures = []
    try:
        while sent < len(events):
            due = min(len(events), int((time.perf_counter() - started) * rate) + 1)
            while sent < due:
                topic, key, value = events[sent]
                futures.append(await producer.send(prefix + topic, value=value, timestamp_ms=int(time.time() * 1000),
                                                   key=key.encode() if isinstance(key, str) else key))
                sent += 1
            if len(futures) >= 5_000:
                await asyncio.gather(*futures)
                futures.clear()
            await asyncio.sleep(0.005)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return sent / (time.perf_counter() - started)


# ---- a. bare aiokafka ----------------------------------------------------------------------------


async def bare_aiokafka(bootstrap: str, prefix: str) -> dict:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest", fetch_max_bytes=64 << 20,
                                max_partition_fetch_bytes=8 << 20)
    await consumer.start()
    try:
        tps = []
        for base in INPUT_TOPICS:
            for p in sorted(await _partitions(consumer, prefix + base)):
                tps.append(TopicPartition(prefix + base, p))
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        begins = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        total = sum(ends[tp] - begins[tp] for tp in tps)
        loads = orjson.loads
        count = 0
        t_start = time.perf_counter()  # partitions assigned and positioned: the first fetch is measured
        cpu0 = time.process_time()
        while count < total:
            batch = await consumer.getmany(timeout_ms=1000, max_records=20_000)
            for records in batch.values():
                for record in records:
                    loads(record.value)
                count += len(records)
        elapsed = time.perf_counter() - t_start
        cpu = time.process_time() - cpu0
        return {"events": count, "seconds": round(elapsed, 3),
                "events_per_s": round(count / elapsed, 1) if elapsed > 0 else None,
                "cpu_ms_per_event": round(cpu * 1000 / count, 4) if count else None}
    finally:
        await consumer.stop()


async def _partitions(consumer, topic: str) -> set[int]:
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic)
    return parts or set()


# ---- b. bare Faust -------------------------------------------------------------------------------


def bare_faust_child(bootstrap: str, prefix: str, expect: int, partitions: int, out: Path, datadir: Path) -> None:
    """Runs in a subprocess: one Faust agent decoding every value; writes a JSON result when done."""
    import faust

    app = faust.App(f"{prefix}bench-bare-faust", broker=f"kafka://{bootstrap}", store="memory://",
                    datadir=str(datadir), web_enabled=False, topic_partitions=partitions,
                    key_serializer="raw", value_serializer="raw", consumer_auto_offset_reset="earliest",
                    topic_disable_leader=True)
    topic = app.topic(*(prefix + t for t in INPUT_TOPICS), key_type=bytes, value_type=bytes)
    state = {"n": 0, "first": 0.0}

    @app.agent(topic, name="bare")
    async def bare(stream):
        loads = orjson.loads
        async for value in stream:
            loads(value)
            n = state["n"] = state["n"] + 1
            if n == 1:
                state["first"] = time.time()
                state["cpu"] = _cpu_seconds(os.getpid())
            if n == expect:
                now = time.time()
                elapsed = now - state["first"]
                cpu = _cpu_seconds(os.getpid()) - state["cpu"]
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps({"events": n, "seconds": round(elapsed, 3),
                                           "events_per_s": round((n - 1) / elapsed, 1) if elapsed > 0 else None,
                                           "cpu_ms_per_event": round(cpu * 1000 / (n - 1), 4) if n > 1 else None}))
                tmp.rename(out)

    worker = faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


def bare_faust(bootstrap: str, prefix: str, expect: int, partitions: int, work: Path, timeout: float) -> dict:
    out = work / "bare-faust.json"
    log = open(work / "bare-faust.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.pipeline", "--bare-faust-child",
                             "--bootstrap", bootstrap, "--prefix", prefix, "--expect", str(expect),
                             "--partitions", str(partitions), "--out", str(out)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not out.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"bare Faust exited with {proc.returncode}; see {work / 'bare-faust.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"bare Faust did not consume {expect} events in {timeout:.0f}s")
            time.sleep(0.2)
        return json.loads(out.read_text())
    finally:
        stop_process(proc)
        log.close()


def stop_process(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---- c/d. the worker -----------------------------------------------------------------------------


class Worker:
    """``sendtrail worker`` in a subprocess with its own data dir, chDB path and port."""

    def __init__(self, work: Path, name: str, bootstrap: str, prefix: str, partitions: int) -> None:
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.env = dict(os.environ)
        self.env.update({
            "SENDTRAIL_KAFKA": bootstrap,
            "SENDTRAIL_TOPIC_PREFIX": prefix,
            "SENDTRAIL_PARTITIONS": str(partitions),
            "SENDTRAIL_DATA_DIR": str(self.dir / "data"),
            "SENDTRAIL_CLICKHOUSE_URL": f"chdb://{self.dir / 'clickhouse'}",
            "SENDTRAIL_WEB_HOST": "127.0.0.1",
            "SENDTRAIL_WEB_PORT": str(self.port),
        })
        self.proc: subprocess.Popen | None = None
        self.log = None

    def start(self) -> None:
        self.log = open(self.dir / "worker.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "sendtrail.cli", "worker"], cwd=self.dir, env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}; log: {self.dir / 'worker.log'}")

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except OSError:
            return 0, b""

    def ready(self) -> bool:
        self.check()
        return self.get("/readyz")[0] == 200

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None


class GroupWatch:
    """Committed offsets of the worker's group against the end of every consumed topic."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.group = f"{prefix}{Settings().consumer_group}"
        self.names = topic_names(prefix)

    async def __aenter__(self) -> "GroupWatch":
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.admin import AIOKafkaAdminClient

        self.admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await self.admin.start()
        await self.consumer.start()
        self.tps = []
        for base in CONSUMED:
            for p in sorted(await _partitions(self.consumer, self.names[base])):
                self.tps.append(TopicPartition(self.names[base], p))
        self.inputs = {self.names[b] for b in INPUT_TOPICS}
        return self

    async def __aexit__(self, *exc) -> None:
        await self.consumer.stop()
        await self.admin.close()

    async def poll(self) -> tuple[int, int]:
        """(input events committed, messages not yet committed on all consumed topics)."""
        try:
            committed = await self.admin.list_consumer_group_offsets(self.group)
        except Exception:
            return 0, -1
        ends = await self.consumer.end_offsets(self.tps)
        done_inputs = 0
        lag = 0
        for tp in self.tps:
            meta = committed.get(tp)
            done = meta.offset if meta is not None and meta.offset >= 0 else 0
            lag += max(0, ends[tp] - done)
            if tp.topic in self.inputs:
                done_inputs += done
        return done_inputs, lag


async def run_workers(bootstrap: str, prefix: str, partitions: int, n_workers: int, work: Path, label: str,
                      total: int, timeout: float) -> dict:
    """Workers over already produced topics: input events/s from the first commit to fully committed."""
    workers = [Worker(work, f"{label}-{i}", bootstrap, prefix, partitions) for i in range(n_workers)]
    for w in workers:
        w.start()
    try:
        async with GroupWatch(bootstrap, prefix) as watch:
            deadline = time.monotonic() + timeout
            all_ready = False
            t0 = c0 = None
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{label}: not caught up in {timeout:.0f}s")
                if not all_ready:
                    all_ready = all(w.ready() for w in workers)
                else:
                    for w in workers:
                        w.check()
                now = time.perf_counter()
                done, lag = await watch.poll()
                if t0 is None and all_ready and done > 0:
                    t0, c0 = now, done
                    cpu0 = sum(_cpu_seconds(w.proc.pid) for w in workers)
                if t0 is not None and lag == 0 and done >= total:
                    t_end = now
                    cpu = sum(_cpu_seconds(w.proc.pid) for w in workers) - cpu0
                    break
                await asyncio.sleep(0.25)
            load = loadavg()
            metrics = workers[0].get("/metrics")[1].decode(errors="replace")
        elapsed = t_end - t0
        rate = (total - c0) / elapsed if elapsed > 0 else None
        return {"workers": n_workers, "partitions": partitions, "events": total, "measured_events": total - c0,
                "seconds": round(elapsed, 2), "events_per_s": round(rate, 1) if rate else None, "loadavg": load,
                "cpu_ms_per_event": round(cpu * 1000 / (total - c0), 4) if total > c0 else None,
                "producer_buffer_full_warnings": sum(
                    (w.dir / "worker.log").read_text(errors="replace").count("buffer full") for w in workers),
                "_metrics": metrics}
    finally:
        for w in workers:
            w.stop()


async def run_latency(bootstrap: str, prefix: str, partitions: int, work: Path, events, rate: float,
                      timeout: float) -> dict:
    await create_topics(bootstrap, prefix, partitions)
    w = Worker(work, "latency", bootstrap, prefix, partitions)
    w.start()
    try:
        deadline = time.monotonic() + 180
        while not w.ready():
            if time.monotonic() > deadline:
                raise TimeoutError("latency worker not ready in 180s")
            await asyncio.sleep(0.5)
        achieved = await produce_paced(bootstrap, prefix, events, rate)
        load = loadavg()
        async with GroupWatch(bootstrap, prefix) as watch:
            deadline = time.monotonic() + timeout
            while True:
                w.check()
                done, lag = await watch.poll()
                if lag == 0 and done >= len(events):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("latency worker not caught up")
                await asyncio.sleep(0.5)
        text = w.get("/metrics")[1].decode(errors="replace")
        (w.dir / "metrics.txt").write_text(text)
    finally:
        w.stop()
    buckets = histogram_buckets(text, LATENCY_METRIC)
    batches = histogram_buckets(text, "sendtrail_batch_duration_seconds")
    return {"target_rate": round(rate, 1), "achieved_rate": round(achieved, 1), "events": len(events),
            "observations": int(buckets[-1][1]) if buckets else 0,
            "p50_s": quantile(buckets, 0.50), "p99_s": quantile(buckets, 0.99), "loadavg": load,
            "batches": int(batches[-1][1]) if batches else 0,
            "batch_p50_s": quantile(batches, 0.50), "batch_p99_s": quantile(batches, 0.99)}


def histogram_buckets(text: str, name: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) pairs of an unlabelled Prometheus histogram."""
    out = []
    for line in text.splitlines():
        if not line.startswith(name + "_bucket{"):
            continue
        labels, value = line.rsplit(" ", 1)
        le = labels.split('le="', 1)[1].split('"', 1)[0]
        out.append((float("inf") if le == "+Inf" else float(le), float(value)))
    out.sort()
    return out


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_n = 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return prev_le  # beyond the last finite bucket: its bound is a lower bound
            if n == prev_n:
                return le
            return round(prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n), 4)
        prev_le, prev_n = le, n
    return None


# ---- the run -------------------------------------------------------------------------------------


async def latency_only(args, work: Path, bootstrap: str, run: str, events, result: dict) -> dict:
    rate = args.latency_only
    n = min(len(events), max(1000, int(rate * args.latency_seconds)))
    lat = await run_latency(bootstrap, f"bench.{run}.latency.", args.partitions, work, events[:n], rate, args.timeout)
    result["latency"] = lat
    say(f"latency at {_n(lat['achieved_rate'])} events/s for {n} events: p50 {lat['p50_s']} s, p99 {lat['p99_s']} s "
        f"over {lat['observations']} observations (load average {lat['loadavg']}; target p99 < 2 s)")
    return result


def make_workload(target: int, seed: int):
    from streams.generator import generate

    now_ms = int(time.time() * 1000)
    contacts = max(100, int(target / EVENTS_PER_CONTACT) + 1)
    while True:
        wl = generate(seed, automations=8, contacts=contacts, base_ms=now_ms - 10 * 86_400_000, now_ms=now_ms)
        if len(wl.events) >= target:
            return wl.events, contacts
        contacts = int(contacts * target / max(1, len(wl.events)) * 1.02) + 1


async def main_async(args, work: Path, bootstrap: str) -> dict:
    result: dict = {"cpu_count": os.cpu_count(), "partitions": args.partitions, "loadavg_start": loadavg()}
    t = time.perf_counter()
    events, contacts = make_workload(args.events, args.seed)
    total = len(events)
    result.update(events=total, contacts=contacts)
    say(f"workload: {total} events ({contacts} contacts, seed {args.seed}) generated in "
        f"{time.perf_counter() - t:.1f}s; cores: {os.cpu_count()}; load average: {loadavg()}")
    run = uuid.uuid4().hex[:8]

    if args.latency_only:
        return await latency_only(args, work, bootstrap, run, events, result)

    main_prefix = f"bench.{run}.main."
    await create_topics(bootstrap, main_prefix, args.partitions)
    rate = await produce_all(bootstrap, main_prefix, events)
    say(f"produced to {main_prefix}* at {rate:,.0f} events/s")

    a = await bare_aiokafka(bootstrap, main_prefix)
    a["loadavg"] = loadavg()
    result["aiokafka"] = a
    say(f"a. bare aiokafka consume+decode: {_n(a['events_per_s'])} events/s, {a['cpu_ms_per_event']} CPU ms/event "
        f"(load average {a['loadavg']})")

    b = await asyncio.to_thread(bare_faust, bootstrap, main_prefix, total, args.partitions, work, args.timeout)
    b["loadavg"] = loadavg()
    result["faust"] = b
    say(f"b. bare Faust agent loop:        {_n(b['events_per_s'])} events/s, {b['cpu_ms_per_event']} CPU ms/event "
        f"(load average {b['loadavg']})")

    c = await run_workers(bootstrap, main_prefix, args.partitions, 1, work, "full", total, args.timeout)
    c.pop("_metrics")
    result["full"] = c
    say(f"c. full worker, end to end:      {_n(c['events_per_s'])} events/s, {c['cpu_ms_per_event']} CPU ms/event, "
        f"over {c['measured_events']} events in {c['seconds']}s (load average {c['loadavg']}; 'producer buffer full' warnings: "
        f"{c['producer_buffer_full_warnings']})")
    full = c["events_per_s"] or 0.0
    result["full_over_faust"] = round(full / b["events_per_s"], 3) if b["events_per_s"] else None
    result["full_over_aiokafka"] = round(full / a["events_per_s"], 3) if a["events_per_s"] else None
    if b.get("cpu_ms_per_event") and c.get("cpu_ms_per_event"):  # the same ratio by CPU cost, less load-sensitive
        result["full_over_faust_by_cpu"] = round(b["cpu_ms_per_event"] / c["cpu_ms_per_event"], 3)
    say(f"   full / bare Faust = {result['full_over_faust']}, full / bare aiokafka = {result['full_over_aiokafka']}"
        f"; by CPU ms/event: {result.get('full_over_faust_by_cpu')}  (target: full >= 0.70 x bare Faust)")

    if args.latency_seconds > 0 and full > 0:
        paced = full / 2
        n = min(total, max(1000, int(paced * args.latency_seconds)))
        lat = await run_latency(bootstrap, f"bench.{run}.latency.", args.partitions, work, events[:n], paced,
                                args.timeout)
        result["latency"] = lat
        say(f"   latency at ~50% load ({_n(lat['achieved_rate'])} events/s for {n} events): "
            f"p50 {lat['p50_s']} s, p99 {lat['p99_s']} s over {lat['observations']} observations "
            f"(load average {lat['loadavg']}; target p99 < 2 s)")

    if not args.skip_scaling:
        parts = args.partitions * 2
        one_prefix = f"bench.{run}.scale1."
        await create_topics(bootstrap, one_prefix, parts)
        await produce_all(bootstrap, one_prefix, events)
        one = await run_workers(bootstrap, one_prefix, parts, 1, work, "scale1", total, args.timeout)
        one.pop("_metrics")
        two_prefix = f"bench.{run}.scale2."
        await create_topics(bootstrap, two_prefix, parts)
        await produce_all(bootstrap, two_prefix, events)
        two = await run_workers(bootstrap, two_prefix, parts, 2, work, "scale2", total, args.timeout)
        two.pop("_metrics")
        factor = round(two["events_per_s"] / one["events_per_s"], 3) if one["events_per_s"] and two[
            "events_per_s"] else None
        result["scaling"] = {"partitions": parts, "one_worker": one, "two_workers": two, "factor": factor,
                             "note": "each worker writes its own embedded chDB path"}
        say(f"d. {parts} partitions: 1 worker {_n(one['events_per_s'])} events/s (load average {one['loadavg']}), "
            f"2 workers {_n(two['events_per_s'])} events/s (load average {two['loadavg']}): "
            f"scaling factor {factor} on {os.cpu_count()} cores (each worker with its own chDB path)")
    result["loadavg_end"] = loadavg()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=500_000, help="at least this many input events (default 500000)")
    ap.add_argument("--partitions", type=int, default=4, help="partitions per topic (scaling uses 2x)")
    ap.add_argument("--bootstrap", help="use this Kafka instead of starting one")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--latency-seconds", type=float, default=60.0, help="paced run length; 0 skips it")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--latency-only", type=float, metavar="RATE",
                    help="only the latency measurement, paced at RATE events/s (skips a, b, c and scaling)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per measurement")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (worker logs)")
    # internal: the bare Faust subprocess
    ap.add_argument("--bare-faust-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", help=argparse.SUPPRESS)
    ap.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.bare_faust_child:
        out = Path(args.out)
        sys.argv = [sys.argv[0], "worker"]
        bare_faust_child(args.bootstrap, args.prefix, args.expect, args.partitions, out, out.parent / "bare-faust")
        return 0

    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)  # NotLeaderForPartition retries right after creation
    work = Path(tempfile.mkdtemp(prefix="sendtrail-pipeline-bench-"))
    kafka = None
    try:
        bootstrap = args.bootstrap
        if not bootstrap:
            kafka = LocalKafka(work / "kafka")
            bootstrap = kafka.start()
            say(f"Kafka at {bootstrap}")
        result = asyncio.run(main_async(args, work, bootstrap))
    finally:
        if kafka is not None:
            kafka.stop()
        if args.keep:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
