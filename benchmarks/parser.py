"""Parser throughput: decode + validate N valid mixed events (bytes).

    python -m benchmarks.parser [--events 200000] [--seed 1]

Prints progress lines, then as the LAST line one JSON object:
{"benchmark": "parser", "events": N, "events_per_s": ..., "us_per_event": ...,
 "orjson_loads_per_s": ..., "rejections": 0, ...}

The mix follows a realistic stream: mostly provider events and sends, some
enrollments, few automation events; every event has distinct ids and times.
``orjson_loads_per_s`` is the bare decode of the same bytes, for comparison.
"""
from __future__ import annotations

import argparse
import copy
import gc
import random
import sys
import time

import orjson

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from schemas.events import EVENTS  # noqa: E402
from schemas.examples import EXAMPLES  # noqa: E402
from schemas.parser import Rejection, parse_event, to_rfc3339  # noqa: E402

# weights per type family (relative frequency in a realistic stream)
_WEIGHTS = {"automation.": 0.2, "contact.": 2.0, "step.": 3.0, "message.": 6.0}


def make_events(n: int, seed: int = 1) -> list[bytes]:
    rnd = random.Random(seed)
    types = list(EXAMPLES)
    weights = [next(w for p, w in _WEIGHTS.items() if t.startswith(p)) for t in types]
    base_ms = 1714557600000
    out: list[bytes] = []
    for i in range(n):
        t = rnd.choices(types, weights)[0]
        e = copy.deepcopy(EXAMPLES[t])
        e["event_id"] = f"evt-{seed}-{i}"
        ts = base_ms + i * 37 + rnd.randrange(1000)
        e["occurred_at"] = to_rfc3339(ts) if i % 3 else to_rfc3339(ts)[:-1] + "+00:00"
        if "contact_id" in e:
            e["contact_id"] = f"contact-{rnd.randrange(100000)}"
        if "message_id" in e:
            e["message_id"] = f"msg-{rnd.randrange(1000000)}"
        if i % 2:
            e.pop("schema_version", None)
        out.append(orjson.dumps(e))
    return out


def run(n: int, seed: int) -> dict:
    events = make_events(n, seed)
    total_bytes = sum(map(len, events))
    sys.stdout.write(f"generated {n} events, {total_bytes / n:.0f} bytes on average\n")

    loads = orjson.loads
    gc.collect()
    t0 = time.perf_counter()
    for raw in events:
        loads(raw)
    t_loads = time.perf_counter() - t0

    best = None
    for attempt in range(3):
        gc.collect()
        t0 = time.perf_counter()
        for raw in events:
            parse_event(raw)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
        sys.stdout.write(f"run {attempt + 1}: {n / dt:,.0f} events/s\n")
    rejections = sum(1 for raw in events if isinstance(parse_event(raw), Rejection))

    topics = ["sendtrail." + EVENTS[orjson.loads(r)["type"]].topic for r in events]
    gc.collect()
    t0 = time.perf_counter()
    for raw, topic in zip(events, topics):
        parse_event(raw, topic=topic)
    t_topic = time.perf_counter() - t0

    assert best is not None
    return {
        "benchmark": "parser",
        "events": n,
        "events_per_s": round(n / best),
        "us_per_event": round(best / n * 1e6, 3),
        "events_per_s_with_topic": round(n / t_topic),
        "orjson_loads_per_s": round(n / t_loads),
        "avg_bytes": round(total_bytes / n),
        "rejections": rejections,
        "python": sys.version.split()[0],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    result = run(args.events, args.seed)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0 if result["rejections"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
