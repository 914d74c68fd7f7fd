"""What a native engine would cost at the engine's Python boundary alone (issue #3's 200k bar).

The engine's contract is: an event dict in, a result out holding the change dicts (13 keys, a
blake2b change id) and the follow-up event dicts (send registrations from the enrollment
machine, forwarded outcomes from the message machine). ``engine_floor/`` is a PyO3 module that
does only that: it reads the event's fields, updates a per-key state kept in a Rust map (as an
engine owning its states would) and builds exactly as many outputs as the real engine gave for
that event, with no status logic at all. Its rate is therefore an upper bound for any engine,
native or not, that keeps this contract.

The run builds the module with cargo (``--release``, target dir under ``--cache``), generates
the stream of benchmarks/engine.py (same generator, seed and sizes), records per event how many
changes and follow-ups the Python machines emit, then times on one core (best of ``--repeat``):

- ``python``: the Python machine (the loop of benchmarks/engine.py, states as dicts);
- ``floor``: the boundary-only module with those outputs;
- ``floor_no_outputs``: the same module building no outputs (reading the event, the state map
  and the result object);
- ``combined``: both machines over the merged external stream, the follow-ups routed between
  them in Python as ``benchmarks/engine.py`` does (events/s of external events): the Python
  machines, and the probe routing its own follow-ups.

    python benchmarks/engine_floor.py [--contacts 20000] [--seed 7] [--repeat 3]

Needs cargo (crates from crates.io). The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import gc
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine import generate, run_combined  # noqa: E402
from streams.engine import enrollment, message  # noqa: E402

CRATE = Path(__file__).resolve().parent / "engine_floor"


def build(cache: Path):
    """Build the probe and import it (the module is never installed)."""
    target = cache / "target"
    if shutil.which("cargo") is None:
        raise SystemExit("engine_floor.py needs cargo (Rust) to build its probe: https://rustup.rs")
    subprocess.run(["cargo", "build", "--release", "--quiet", "--manifest-path", str(CRATE / "Cargo.toml")],
                   check=True, env={**os.environ, "CARGO_TARGET_DIR": str(target),
                                     "PYO3_PYTHON": sys.executable})  # built for this interpreter
    lib = target / "release" / "libengine_floor.so"
    loader = importlib.machinery.ExtensionFileLoader("engine_floor", str(lib))
    spec = importlib.util.spec_from_file_location("engine_floor", lib, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def check_probe(floor_mod, name: str, work: list, registrations: bool, shape: tuple) -> None:
    """The probe must build what the machine builds: as many outputs, with the same keys."""
    f = floor_mod.Floor().apply
    changes = follow = 0
    for e, nc, nf in work:
        r = f(e, nc, nf, registrations)
        changes += len(r.changes)
        follow += len(r.follow_ups)
        if r.changes and set(r.changes[0]) != shape[0]:
            raise SystemExit(f"{name}: the probe's change keys differ from the machine's")
        if r.follow_ups and set(r.follow_ups[0]) != shape[1]:
            raise SystemExit(f"{name}: the probe's follow-up keys differ from the machine's")
    if (changes, follow) != (sum(w[1] for w in work), sum(w[2] for w in work)):
        raise SystemExit(f"{name}: the probe built {changes} changes and {follow} follow-ups, not the machine's")


def best(fn, n: int, repeat: int) -> float:
    """Events per second, best of ``repeat`` runs."""
    t = float("inf")
    for _ in range(repeat):
        gc.collect()
        began = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - began)
    return n / t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contacts", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sendtrail" / "engine-floor")
    args = ap.parse_args(argv)
    floor_mod = build(args.cache)
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        pinned = True
    except (AttributeError, OSError):
        pinned = False
    load_before = os.getloadavg()[0]

    cstream, pstream, autos = generate(args.contacts, args.seed)
    merged = sorted(cstream + pstream, key=lambda e: (e["_t"], e["event_id"]))
    internal: list = []
    run_combined(merged, autos, False, collect=internal)
    regs = [e for e in internal if e["type"] == "message.registered"]
    outs = [e for e in internal if e["type"].startswith("outcome.")]
    e_stream = sorted(cstream + outs, key=lambda e: (e["occurred_at"], e["event_id"]))
    m_stream = sorted(regs + pstream, key=lambda e: (e.get("_t", e["occurred_at"]), e["event_id"]))

    # What the real machines emit for each event (the floor builds as many outputs).
    shapes: dict = {}  # machine -> (change keys, follow-up keys) of the real outputs
    e_work, table = [], {}
    for e in e_stream:
        key = f"{e['automation_id']}\x1f{e['contact_id']}"
        r = enrollment.apply(table.get(key), e, autos.get(e["automation_id"]))
        table[key] = r.state
        e_work.append((e, len(r.changes), len(r.registrations)))
        if r.changes and r.registrations and "enrollment" not in shapes:
            shapes["enrollment"] = (set(r.changes[0]), set(r.registrations[0]))
    m_work, table = [], {}
    for e in m_stream:
        r = message.apply(table.get(e["message_id"]), e)
        table[e["message_id"]] = r.state
        m_work.append((e, len(r.changes), len(r.outcomes)))
        if r.changes and r.outcomes and "message" not in shapes:
            shapes["message"] = (set(r.changes[0]), set(r.outcomes[0]))
    del table
    # Both machines on the merged external stream, the follow-ups routed in process as in
    # benchmarks/engine.py's run_combined: per apply, in that order, what the machine emitted.
    combined: list = []
    etable: dict = {}
    mtable: dict = {}
    pending: list = []
    for ev in merged:
        pending.append(ev)
        while pending:
            e = pending.pop()
            if e["type"].startswith("message."):
                r = message.apply(mtable.get(e["message_id"]), e)
                mtable[e["message_id"]] = r.state
                follow = r.outcomes
            else:
                key = f"{e['automation_id']}\x1f{e['contact_id']}"
                r = enrollment.apply(etable.get(key), e, autos.get(e["automation_id"]))
                etable[key] = r.state
                follow = r.registrations
            combined.append((len(r.changes), len(follow)))
            pending.extend(follow)
    del etable, mtable
    for name, work, regs_kind in (("enrollment", e_work, True), ("message", m_work, False)):
        check_probe(floor_mod, name, work, regs_kind, shapes[name])
    gc.collect()
    gc.freeze()

    def py_enrollment():
        t: dict = {}
        apply, get = enrollment.apply, autos.get
        for e in e_stream:
            key = f"{e['automation_id']}\x1f{e['contact_id']}"
            t[key] = apply(t.get(key), e, get(e["automation_id"])).state

    def py_message():
        t: dict = {}
        apply = message.apply
        for e in m_stream:
            key = e["message_id"]
            t[key] = apply(t.get(key), e).state

    def floor(work, registrations: bool, outputs: bool):
        def run():
            f = floor_mod.Floor().apply
            if outputs:
                for e, nc, nf in work:
                    f(e, nc, nf, registrations)
            else:
                for e, _, _ in work:
                    f(e, 0, 0, registrations)
        return run

    def floor_combined():
        on_contact, on_message = floor_mod.Floor().apply, floor_mod.Floor().apply
        counts = iter(combined)
        stack: list = []
        for ev in merged:
            stack.append(ev)
            while stack:
                e = stack.pop()
                nc, nf = next(counts, (None, None))
                if nc is None:
                    raise SystemExit("combined: the probe routed more follow-ups than the machines")
                if e["type"].startswith("message."):
                    stack.extend(on_message(e, nc, nf, False).follow_ups)
                else:
                    stack.extend(on_contact(e, nc, nf, True).follow_ups)
        if next(counts, None) is not None:
            raise SystemExit("combined: the probe routed fewer follow-ups than the machines")

    fig: dict = {"contacts": args.contacts, "seed": args.seed, "pinned_one_core": pinned,
                 "enrollment_events": len(e_work), "message_events": len(m_work)}
    for name, work, regs_kind, py in (("enrollment", e_work, True, py_enrollment),
                                      ("message", m_work, False, py_message)):
        n = len(work)
        fig[f"{name}_changes_per_event"] = round(sum(w[1] for w in work) / n, 3)
        fig[f"{name}_follow_ups_per_event"] = round(sum(w[2] for w in work) / n, 3)
        fig[f"{name}_python_eps"] = round(best(py, n, args.repeat))
        fig[f"{name}_floor_eps"] = round(best(floor(work, regs_kind, True), n, args.repeat))
        fig[f"{name}_floor_no_outputs_eps"] = round(best(floor(work, regs_kind, False), n, args.repeat))
        fig[f"{name}_floor_over_python"] = round(fig[f"{name}_floor_eps"] / fig[f"{name}_python_eps"], 2)
        print(f"{name}: {n} events, {fig[f'{name}_changes_per_event']} changes and "
              f"{fig[f'{name}_follow_ups_per_event']} follow-ups per event; python {fig[f'{name}_python_eps']:,} "
              f"events/s; boundary floor {fig[f'{name}_floor_eps']:,} events/s "
              f"({fig[f'{name}_floor_no_outputs_eps']:,} without building outputs)")
    n = len(merged)
    fig["combined_external_events"] = n
    fig["combined_applies"] = len(combined)
    fig["combined_python_eps"] = round(best(lambda: run_combined(merged, autos, False), n, args.repeat))
    fig["combined_floor_eps"] = round(best(floor_combined, n, args.repeat))
    fig["combined_floor_over_python"] = round(fig["combined_floor_eps"] / fig["combined_python_eps"], 2)
    print(f"combined: {n} external events ({len(combined)} applies with the routed follow-ups); python "
          f"{fig['combined_python_eps']:,} events/s; boundary floor {fig['combined_floor_eps']:,} events/s")
    fig["loadavg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(fig, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
