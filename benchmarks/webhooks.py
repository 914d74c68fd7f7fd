"""Webhook gateway throughput: signed SendGrid batches over real HTTP into a ``sendtrail gateway`` process.

    python benchmarks/webhooks.py [--seconds 20] [--connections 16] [--batch 100] [--bootstrap HOST:PORT]

Starts local Kafka (``deploy/local/kafka start --port 0 --dir /tmp/wh-kafka``,
stopped at the end) unless ``--bootstrap`` is given, starts ``python -m
sendtrail.cli gateway`` as a subprocess with a freshly generated SendGrid
verification key, and posts signed batches of ``--batch`` events from an aiohttp
ClientSession with ``--connections`` concurrent keep-alive connections on
loopback for ``--seconds`` (after ``--warmup``), or until ``--max-requests``.
Every 200 answer means Kafka acknowledged all events of the batch (acks=all);
at the end the benchmark checks that the ``provider-events`` end offsets grew
by exactly the number of accepted events.

Prints accepted events/s, request latency percentiles, the CPU time per
accepted event of the gateway, of this HTTP client and of the broker (when
started here or found in ``--kafka-dir``), how busy the machine was and the
load average; the last line is one JSON object with every figure. The machine
may be shared: throughput then depends on the CPU other processes leave to the
gateway, the client and the broker, the CPU time per event much less (it still
grows somewhat on a crowded machine: caches, context switches).
Target: >= 20,000 events/s on one gateway process.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.harness import free_port  # noqa: E402
from tests.unit.provider_helpers import sendgrid_keys, sendgrid_sign  # noqa: E402

KAFKA = ROOT / "deploy" / "local" / "kafka"
KINDS = ("processed", "delivered", "open", "click", "bounce", "spamreport", "unsubscribe", "deferred")


def make_batch(n: int, seq: int, ts: int) -> list[dict]:
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        mid = f"bm{seq:06d}x{i:03d}"
        ev = {"email": f"user{seq}-{i}@example.com", "timestamp": ts - 30, "event": kind,
              "smtp-id": f"<{mid}@geopod-ismtpd-4>", "category": ["automation"],
              "sg_event_id": f"{uuid.uuid4().hex}", "sg_message_id": f"{mid}.filterdrecv-p3mdw1-756b745b58-18-0",
              "automation_id": f"aut-{seq % 7}", "contact_id": f"c-{seq}-{i}", "step_index": str(i % 3),
              "ip": "168.1.1.1", "tls": 1}
        if kind == "click":
            ev["url"] = "https://www.example.com/pricing?utm_source=sendtrail"
            ev["useragent"] = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/119.0"
        elif kind == "open":
            ev["useragent"] = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/119.0"
        elif kind == "bounce":
            ev.update(type="bounce", reason="550 5.1.1 The email account does not exist.", status="5.1.1",
                      bounce_classification="Invalid Address")
        elif kind == "deferred":
            ev["response"] = "421 4.7.0 Try again later"
        out.append(ev)
    return out


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100 * (len(sorted_values) - 1)))))
    return sorted_values[k]


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


def cpu_snapshot(gateway_pid: int, broker_pids: list[int]) -> dict:
    """CPU seconds used so far by the gateway, this process (the HTTP client), the brokers and the machine."""
    busy, total = machine_cpu_seconds()
    return {"t": time.monotonic(), "gateway": cpu_seconds(gateway_pid), "client": time.process_time(),
            "broker": sum(cpu_seconds(pid) for pid in broker_pids), "busy": busy, "total": total}


def broker_pids(kafka_dir: str, bootstrap: str) -> list[int]:
    """The pids of the brokers ``deploy/local/kafka`` runs in ``kafka_dir`` for ``bootstrap`` (empty when unknown)."""
    try:
        state = json.loads((Path(kafka_dir) / "state.json").read_text())
    except FileNotFoundError:
        return []
    if state.get("bootstrap") != bootstrap:
        return []
    return [int(n["pid"]) for n in state.get("nodes", []) if n.get("pid")]


async def provider_events_end(bootstrap: str, topic: str) -> int:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        parts = cluster.partitions_for_topic(topic) or set()
        if not parts:
            return 0
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in parts])
        return sum(ends.values())
    finally:
        await consumer.stop()


async def load(port: int, bodies: list[tuple[bytes, dict]], connections: int, seconds: float, warmup: float,
               max_requests: int, on_measure_start: Callable[[], None]) -> dict:
    """Post the bodies from ``connections`` concurrent keep-alive connections; figures count the requests
    sent after the warm-up (``on_measure_start`` is called when it ends)."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/webhooks/sendgrid"
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    stats = {"latencies": [], "accepted": 0, "requests": 0, "errors": {}, "all_accepted": 0}
    counter = {"next": 0}
    t_start = time.perf_counter()
    measure_from = t_start + warmup
    stop_at = measure_from + seconds
    loop = asyncio.get_running_loop()
    loop.call_at(loop.time() + warmup, on_measure_start)

    async with aiohttp.ClientSession(connector=connector) as session:
        async def client() -> None:
            while True:
                now = time.perf_counter()
                if now >= stop_at or counter["next"] >= max_requests:
                    return
                i = counter["next"]
                counter["next"] += 1
                body, headers = bodies[i % len(bodies)]
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        payload = await resp.read()
                        status = resp.status
                except aiohttp.ClientError as exc:
                    status, payload = type(exc).__name__, b""
                t1 = time.perf_counter()
                if status == 200:
                    n = json.loads(payload)["accepted"]
                    stats["all_accepted"] += n
                    if t0 >= measure_from:
                        stats["accepted"] += n
                        stats["requests"] += 1
                        stats["latencies"].append(t1 - t0)
                else:
                    stats["errors"][str(status)] = stats["errors"].get(str(status), 0) + 1
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(client() for _ in range(connections)))
    stats["wall"] = min(time.perf_counter(), stop_at) - measure_from
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, help="seconds of load before measuring (default 10 when the benchmark "
                    "starts Kafka, whose JIT needs them, else 3)")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--bodies", type=int, default=400, help="distinct signed batches to cycle through")
    ap.add_argument("--max-requests", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--bootstrap", help="use this Kafka instead of starting deploy/local/kafka")
    ap.add_argument("--kafka-dir", default="/tmp/wh-kafka")
    args = ap.parse_args()

    started_kafka = False
    bootstrap = args.bootstrap
    if args.warmup is None:
        args.warmup = 3.0 if bootstrap else 10.0
    gateway = None
    try:
        if not bootstrap:
            proc = subprocess.run([sys.executable, str(KAFKA), "start", "--port", "0", "--dir", args.kafka_dir],
                                  capture_output=True, text=True, timeout=300, cwd=ROOT)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout + proc.stderr)
                return 1
            started_kafka = True
            bootstrap = proc.stdout.strip().splitlines()[-1]
        prefix = f"bench{uuid.uuid4().hex[:6]}."
        port = free_port()
        _, public_key = sendgrid_keys()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SENDTRAIL_")}
        env.update({"SENDTRAIL_KAFKA": bootstrap, "SENDTRAIL_TOPIC_PREFIX": prefix,
                    "SENDTRAIL_PARTITIONS": str(args.partitions), "SENDTRAIL_WEB_HOST": "127.0.0.1",
                    "SENDTRAIL_WEB_PORT": str(port), "SENDTRAIL_SENDGRID_PUBLIC_KEY": public_key,
                    "SENDTRAIL_LOG_LEVEL": "warn"})
        log_path = Path(f"/tmp/wh-gateway-{port}.log")
        gateway = subprocess.Popen([sys.executable, "-m", "sendtrail.cli", "gateway"], cwd=ROOT, env=env,
                                   stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        import urllib.request

        deadline = time.monotonic() + 120
        while True:
            if gateway.poll() is not None:
                sys.stderr.write(f"gateway exited: {log_path.read_text()[-3000:]}\n")
                return 1
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.stderr.write(f"gateway not ready: {log_path.read_text()[-3000:]}\n")
                return 1
            time.sleep(0.3)

        ts = int(time.time())
        bodies = []
        for seq in range(args.bodies):
            body = json.dumps(make_batch(args.batch, seq, ts)).encode()
            bodies.append((body, sendgrid_sign(body, timestamp=ts)))
        topic = prefix + "provider-events"
        before = asyncio.run(provider_events_end(bootstrap, topic))
        brokers = broker_pids(args.kafka_dir, bootstrap)  # empty for a --bootstrap not run from --kafka-dir
        marks: dict[str, dict] = {}

        def measure_start() -> None:
            marks["start"] = cpu_snapshot(gateway.pid, brokers)
            marks["load_before"] = os.getloadavg()

        stats = asyncio.run(load(port, bodies, args.connections, args.seconds, args.warmup, args.max_requests,
                                 measure_start))
        end = cpu_snapshot(gateway.pid, brokers)
        if "start" not in marks:
            sys.stderr.write("the run ended before the warm-up did (raise --max-requests or lower --warmup)\n")
            return 1
        load_before, load_after = marks["load_before"], os.getloadavg()
        start = marks["start"]
        used = {k: end[k] - start[k] for k in start}
        after = asyncio.run(provider_events_end(bootstrap, topic))
        lat = sorted(stats["latencies"])
        wall = stats["wall"] if stats["wall"] > 0 else float("nan")
        events = max(stats["accepted"], 1)
        others = used["busy"] - used["gateway"] - used["client"] - used["broker"]
        result = {
            "benchmark": "webhooks",
            "provider": "sendgrid",
            "events_per_request": args.batch,
            "connections": args.connections,
            "seconds": round(wall, 2),
            "requests": stats["requests"],
            "accepted_events": stats["accepted"],
            "events_per_second": round(stats["accepted"] / wall, 1),
            "requests_per_second": round(stats["requests"] / wall, 1),
            "latency_ms": {p: round(percentile(lat, q) * 1000, 2) for p, q in
                           (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
            "p99_ms": round(percentile(lat, 99) * 1000, 2),
            "errors": stats["errors"],
            "kafka_records_written": after - before,
            "kafka_matches_accepted": (after - before) == stats["all_accepted"],
            # CPU figures cover the measured window only (after the warm-up, which also warms up a freshly
            # started broker's JIT). CPU time per accepted event depends far less than events/s on how busy
            # the machine is; 1e6 / gateway_cpu_us_per_event is what one gateway core could carry at 100%.
            "gateway_cpu_percent": round(100 * used["gateway"] / used["t"], 1),
            "gateway_cpu_us_per_event": round(1e6 * used["gateway"] / events, 1),
            "client_cpu_us_per_event": round(1e6 * used["client"] / events, 1),
            "broker_cpu_us_per_event": round(1e6 * used["broker"] / events, 1) if brokers else None,
            # how busy all cores were, and how much of that was neither gateway, client nor broker
            "machine_busy_percent": round(100 * used["busy"] / used["total"], 1) if used["total"] > 0 else None,
            "other_processes_cpu_percent_of_machine": round(100 * others / used["total"], 1)
            if used["total"] > 0 and brokers else None,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
            "cpus": os.cpu_count(),
            "target_events_per_second": 20_000,
        }
        result["cpu_bound_events_per_second_per_core"] = round(1e6 / max(result["gateway_cpu_us_per_event"], 0.1))
        result["meets_target"] = result["events_per_second"] >= 20_000
        print(f"accepted {result['accepted_events']} events in {result['requests']} requests over "
              f"{result['seconds']}s with {args.connections} connections")
        print(f"  {result['events_per_second']:.0f} events/s ({result['requests_per_second']:.0f} requests/s); "
              f"latency p50 {result['latency_ms']['p50']} ms, p99 {result['p99_ms']} ms, "
              f"max {result['latency_ms']['max']} ms")
        print(f"  errors {stats['errors'] or 'none'}; Kafka got {after - before} records for "
              f"{stats['all_accepted']} accepted events (incl. warm-up): "
              f"{'match' if result['kafka_matches_accepted'] else 'MISMATCH'}")
        print(f"  gateway CPU {result['gateway_cpu_us_per_event']} us per event (one core at 100% would carry "
              f"~{result['cpu_bound_events_per_second_per_core']} events/s)")
        print(f"  gateway CPU {result['gateway_cpu_percent']}% of one core; load average {load_before[0]:.2f} -> "
              f"{load_after[0]:.2f} on {os.cpu_count()} CPUs")
        print(f"  client CPU {result['client_cpu_us_per_event']} us per event, broker CPU "
              f"{result['broker_cpu_us_per_event']} us per event; all cores {result['machine_busy_percent']}% busy, "
              f"{result['other_processes_cpu_percent_of_machine']}% by other processes")
        print(json.dumps(result))
        return 0 if result["kafka_matches_accepted"] else 1
    finally:
        if gateway is not None and gateway.poll() is None:
            os.killpg(gateway.pid, signal.SIGTERM)
            try:
                gateway.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(gateway.pid, signal.SIGKILL)
        if started_kafka:
            subprocess.run([sys.executable, str(KAFKA), "stop", "--dir", args.kafka_dir], capture_output=True,
                           timeout=120, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
