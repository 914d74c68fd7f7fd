"""Cost of the worker's node_waits cleanup (sendtrail/maintenance.py) as the table grows.

For each size OPEN:CLOSED it fills ``node_waits`` (embedded chDB, migrated from scratch) with
OPEN open waits and CLOSED waits that were opened and closed, merges the table as an earlier
cleanup would have left it, adds the waits closed since (a tenth of CLOSED, each an open and a
closed row), then runs one ``clean_waits`` and prints its seconds (reset pass, ``OPTIMIZE ...
FINAL CLEANUP``), the process CPU seconds it used and the rows before and after. The worker runs
it every ``SENDTRAIL_WAITS_CLEANUP_SECONDS`` (300 by default). The last line is one JSON object.

    python benchmarks/waits_cleanup.py [--sizes 100000:100000 1000000:1000000 5000000:1000000]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sendtrail.clickhouse import connect  # noqa: E402
from sendtrail.maintenance import clean_waits  # noqa: E402
from sendtrail.migrate import migrate  # noqa: E402

INSERT = ("INSERT INTO node_waits SELECT concat('aut', toString(number % 100)), "
          "toDateTime64(1767225600 + number % 8640000, 3, 'UTC'), concat('{prefix}', toString(number + {base})), "
          "0, number % 5, {closed}, {version} FROM numbers({n})")


def fill(client, open_waits: int, closed_waits: int, base: int) -> None:
    """``open_waits`` open rows and ``closed_waits`` waits of other keys, each opened then closed."""
    settings = {"async_insert": 0}
    if open_waits:
        client.command(INSERT.format(prefix="c", base=base, closed=0, version=1, n=open_waits), settings=settings)
    if closed_waits:
        client.command(INSERT.format(prefix="x", base=base, closed=0, version=1, n=closed_waits), settings=settings)
        client.command(INSERT.format(prefix="x", base=base, closed=1, version=2, n=closed_waits), settings=settings)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["100000:100000", "1000000:1000000", "5000000:1000000"],
                    help="OPEN:CLOSED waits per measurement")
    args = ap.parse_args(argv)
    sizes = [tuple(int(x) for x in s.split(":")) for s in args.sizes]
    figures: dict = {"cpu_count": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                     "runs": []}
    with tempfile.TemporaryDirectory(prefix="sendtrail-waits-cleanup-") as tmp:
        client = connect(f"chdb://{tmp}/clickhouse")
        try:
            migrate(client)
            for open_waits, closed_waits in sizes:
                client.command("TRUNCATE TABLE node_waits")
                fill(client, open_waits, closed_waits, 0)
                client.command("OPTIMIZE TABLE node_waits FINAL")  # as an earlier cleanup left it ...
                fill(client, 0, closed_waits // 10, 10**9)  # ... plus the waits closed since
                before = int(client.command("SELECT count() FROM node_waits"))
                cpu = cpu_seconds()
                took = clean_waits(client)
                cpu = cpu_seconds() - cpu
                after = int(client.command("SELECT count() FROM node_waits"))
                run = {"open_waits": open_waits, "closed_waits": closed_waits, "rows_before": before,
                       "rows_after": after, **took, "cpu_seconds": round(cpu, 3)}
                figures["runs"].append(run)
                print(f"open {open_waits:>10,} closed {closed_waits:>10,}: rows {before:,} -> {after:,}; "
                      f"resets {took['resets_seconds']:.3f} s, optimize {took['optimize_seconds']:.3f} s, "
                      f"CPU {cpu:.2f} s", flush=True)
        finally:
            client.close()
    figures["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(orjson.dumps(figures).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
