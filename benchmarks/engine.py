"""Throughput of the pure engine machines on one core.

Generates a realistic mixed stream (enrollments, enrichment, limits, pauses,
step events, send registrations, provider events with duplicates and jitter,
forwarded outcomes) and measures events/s for:

- the enrollment machine (contact + step events and outcomes),
- the message machine (registrations + provider events),
- both combined (external events in, registrations and outcomes routed between
  the machines in process),

each once with states kept as dicts, and once with an orjson
deserialize/serialize of the state around every event, as a Faust table
changelog would. The last line of output is one JSON object with all figures.

The box's load varies, so the same run also measures a baseline that does no
engine work: an orjson loads + dumps of each event's (final) state, keyed the
same way (``*_roundtrip_eps``). ``*_vs_roundtrip`` is the engine's cost per
event in units of that round-trip (engine time / round-trip time; lower is
better, comparable across runs on a loaded box). Every rate is also given per
second of this process's CPU time (``*_cpu_eps``, ``time.process_time``): time
the process waits for a busy core does not count there. ``loadavg`` is the
1-minute load average before and after the run.

The generated streams (and the first combined pass's tables) stay alive
during the timed runs, and the cycle collector's full passes, triggered by the
states the engine keeps, walk them too. ``--freeze-inputs`` drops those tables
and moves the rest out of the collector's reach (``gc.freeze``) first, so that
only what the engine allocates is walked; the default keeps the earlier
measurement.

    python benchmarks/engine.py [--contacts 20000] [--seed 7] [--repeat 3] [--freeze-inputs]
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams.engine import enrollment, message  # noqa: E402

T0 = 1_767_225_600_000
MIN = 60_000
DAY = 86_400_000


def make_automations(n: int, rnd: random.Random) -> dict[str, dict]:
    out = {}
    for i in range(n):
        steps = [{"index": k, "name": f"Step {k}", "kind": "email", "day": 2 * k} for k in range(rnd.randint(3, 6))]
        out[f"aut{i}"] = {"automation_id": f"aut{i}", "name": f"Automation {i}",
                          "participation": "unlimited" if i % 3 == 0 else "once", "steps": steps}
    return out


def generate(contacts: int, seed: int):
    """(contact_stream, provider_stream, automations) with ``event["_t"]`` for the global order."""
    rnd = random.Random(seed)
    autos = make_automations(10, rnd)
    names = list(autos)
    cstream, pstream = [], []
    seq = 0

    def nid(p):
        nonlocal seq
        seq += 1
        return f"{p}{seq}"

    def cev(t, etype, aid, cid, **kw):
        d = {"event_id": nid("e"), "type": etype, "occurred_at": t, "schema_version": 1,
             "automation_id": aid, "contact_id": cid}
        d.update(kw)
        cstream.append(d)
        return d

    def pev(t, kind, mid, **kw):
        d = {"event_id": nid("p"), "type": f"message.{kind}", "occurred_at": t, "schema_version": 1,
             "message_id": mid, "email": "x@example.com", "provider": "sendgrid", "automation_id": None,
             "contact_id": None, "step_index": None, "reason": None, "bounce_class": None, "url": None,
             "return_at": None}
        d.update(kw)
        pstream.append(d)
        if rnd.random() < 0.03:  # the provider retries a webhook
            pstream.append(dict(d))
        return d

    for c in range(contacts):
        aid = rnd.choice(names)
        steps = autos[aid]["steps"]
        cid = f"c{c}"
        t = T0 + rnd.randint(0, 5 * DAY)
        needs = rnd.random() < 0.3
        cev(t, "contact.enrolled", aid, cid, user_id=f"u{c % 50}", name=f"Contact {c}", email=f"c{c}@example.com",
            company=None, attributes={"tier": c % 3}, needs_enrichment=needs)
        if needs:
            t += rnd.randint(1, 60) * MIN
            if rnd.random() < 0.05:
                cev(t, "contact.enrichment_failed", aid, cid, reason="not_found")
                continue
            cev(t, "contact.enriched", aid, cid)
        if rnd.random() < 0.1:
            cev(t + MIN, "contact.limit_reached", aid, cid, limit=rnd.choice(["active", "coworkers"]))
            t += rnd.randint(60, 600) * MIN
            cev(t, "contact.limit_released", aid, cid)
        for step in steps:
            k = step["index"]
            t += step["day"] * DAY // 4 + rnd.randint(1, 120) * MIN
            cev(t - MIN, "step.scheduled", aid, cid, step_index=k, due_at=t, reason=None)
            if rnd.random() < 0.02:
                cev(t, "step.filtered", aid, cid, step_index=k, reason="condition_false")
                break
            mid = nid("m")
            cev(t, "step.sent", aid, cid, step_index=k, message_id=mid, channel="email", mailing_id=None,
                subject=f"Subject {k}", sending_user="u1", sending_email="me@example.com",
                step_details={"day": step["day"], "inactive_days": 0}, metadata={}, reason=None)
            pt = t + rnd.randint(1, 30) * 1000
            pev(pt, "sent", mid)
            r = rnd.random()
            if r < 0.03:
                pev(pt + 5000, "bounced", mid, bounce_class=rnd.choice(["hard", "block", "soft"]))
                break
            pev(pt + rnd.randint(5, 60) * 1000, "delivered", mid)
            if rnd.random() < 0.45:
                ot = pt + rnd.randint(1, 600) * MIN
                for _ in range(rnd.randint(1, 4)):
                    pev(ot, "opened", mid)
                    ot += rnd.randint(1, 120) * MIN
                if rnd.random() < 0.3:
                    pev(ot, "clicked", mid, url="https://x.io")
            r = rnd.random()
            if r < 0.02:
                pev(pt + DAY, "unsubscribed", mid)
                break
            if r < 0.06:
                pev(pt + DAY, "replied", mid)
                break
            if r < 0.08:
                pev(pt + 2 * MIN, "auto_replied", mid, return_at=pt + 3 * DAY)
                t += 3 * DAY
            if rnd.random() < 0.02:
                cev(t + MIN, "contact.paused", aid, cid, reason="manual", resume_at=None)
                cev(t + DAY, "contact.resumed", aid, cid)
        if rnd.random() < 0.05:
            cev(t + DAY, "contact.finished", aid, cid, reason="meeting_booked")
    # provider events: arrival jitter (a few seconds to minutes out of order)
    for e in pstream:
        e["_t"] = e["occurred_at"] + rnd.randint(-120, 120) * 1000
    for e in cstream:
        e["_t"] = e["occurred_at"]
    return cstream, pstream, autos


# --------------------------------------------------------------------------- runners

def run_combined(stream, autos, serialize: bool, collect=None):
    """Apply the merged stream; route registrations to messages and outcomes to contacts."""
    etable: dict = {}
    mtable: dict = {}
    e_apply = enrollment.apply
    m_apply = message.apply
    dumps, loads = orjson.dumps, orjson.loads
    applies = 0
    pending = []
    for ev in stream:
        pending.append(ev)
        while pending:
            e = pending.pop()
            applies += 1
            if e["type"].startswith("message."):
                key = e["message_id"]
                st = mtable.get(key)
                if serialize and st is not None:
                    st = loads(st)
                r = m_apply(st, e)
                if r.changed:
                    mtable[key] = dumps(r.state) if serialize else r.state
                elif not serialize:
                    mtable[key] = r.state
                if r.outcomes:
                    pending.extend(r.outcomes)
                    if collect is not None:
                        collect.extend(r.outcomes)
            else:
                key = f"{e['automation_id']}\x1f{e['contact_id']}"
                st = etable.get(key)
                if serialize and st is not None:
                    st = loads(st)
                r = e_apply(st, e, autos.get(e["automation_id"]))
                if r.changed:
                    etable[key] = dumps(r.state) if serialize else r.state
                elif not serialize:
                    etable[key] = r.state
                if r.registrations:
                    pending.extend(r.registrations)
                    if collect is not None:
                        collect.extend(r.registrations)
    return applies, etable, mtable


def run_enrollment(stream, autos, serialize: bool):
    table: dict = {}
    apply = enrollment.apply
    dumps, loads = orjson.dumps, orjson.loads
    for e in stream:
        key = f"{e['automation_id']}\x1f{e['contact_id']}"
        st = table.get(key)
        if serialize:
            if st is not None:
                st = loads(st)
            r = apply(st, e, autos.get(e["automation_id"]))
            if r.changed:
                table[key] = dumps(r.state)
        else:
            table[key] = apply(st, e, autos.get(e["automation_id"])).state
    return table


def run_message(stream, serialize: bool):
    table: dict = {}
    apply = message.apply
    dumps, loads = orjson.dumps, orjson.loads
    for e in stream:
        key = e["message_id"]
        st = table.get(key)
        if serialize:
            if st is not None:
                st = loads(st)
            r = apply(st, e)
            if r.changed:
                table[key] = dumps(r.state)
        else:
            table[key] = apply(st, e).state
    return table


def run_roundtrip(stream, table: dict, key_fn):
    """Baseline without the engine: orjson loads + dumps of each event's state (serialized in ``table``)."""
    dumps, loads = orjson.dumps, orjson.loads
    for e in stream:
        dumps(loads(table[key_fn(e)]))


def best_rates(fn, n_events: int, repeat: int) -> tuple[float, float]:
    """(events per second of wall time, events per second of CPU time), each the best of ``repeat`` runs."""
    best = best_cpu = float("inf")
    for _ in range(repeat):
        c = time.process_time()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        best_cpu = min(best_cpu, time.process_time() - c)
    return n_events / best, n_events / best_cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contacts", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--freeze-inputs", action="store_true",
                    help="gc.freeze() the generated streams before timing (see the module docstring)")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        pinned = True
    except (AttributeError, OSError):
        pinned = False

    cstream, pstream, autos = generate(args.contacts, args.seed)
    merged = sorted(cstream + pstream, key=lambda e: (e["_t"], e["event_id"]))
    # A first combined pass yields the internal events each machine sees (registrations, outcomes).
    internal: list = []
    applies, etable, mtable = run_combined(merged, autos, False, collect=internal)
    regs = [e for e in internal if e["type"] == "message.registered"]
    outs = [e for e in internal if e["type"].startswith("outcome.")]
    e_stream = sorted(cstream + outs, key=lambda e: (e["occurred_at"], e["event_id"]))
    m_stream = sorted(regs + pstream, key=lambda e: (e.get("_t", e["occurred_at"]), e["event_id"]))

    statuses: dict = {}
    for st in etable.values():
        for v in enrollment.view(st, autos.get(st["automation_id"])):
            statuses[v["status"]] = statuses.get(v["status"], 0) + 1
    print(f"stream: {len(cstream)} contact/step events, {len(pstream)} provider events, "
          f"{len(regs)} registrations, {len(outs)} outcomes; {len(etable)} enrollment keys, {len(mtable)} messages")
    print(f"final statuses: {dict(sorted(statuses.items()))}")

    figures = {
        "contacts": args.contacts,
        "pinned_one_core": pinned,
        "inputs_frozen": args.freeze_inputs,
        "enrollment_events": len(e_stream),
        "message_events": len(m_stream),
        "combined_external_events": len(merged),
        "combined_applies": applies,
    }
    if args.freeze_inputs:
        del etable, mtable, internal
        gc.collect()
        gc.freeze()

    def measure(name: str, fn, n_events: int) -> None:
        figures[name], figures[name.replace("_eps", "_cpu_eps")] = best_rates(fn, n_events, args.repeat)

    measure("enrollment_eps", lambda: run_enrollment(e_stream, autos, False), len(e_stream))
    measure("message_eps", lambda: run_message(m_stream, False), len(m_stream))
    measure("combined_eps", lambda: run_combined(merged, autos, False), len(merged))
    figures["combined_applies_per_s"] = figures["combined_eps"] * applies / len(merged)
    measure("enrollment_eps_orjson", lambda: run_enrollment(e_stream, autos, True), len(e_stream))
    measure("message_eps_orjson", lambda: run_message(m_stream, True), len(m_stream))
    measure("combined_eps_orjson", lambda: run_combined(merged, autos, True), len(merged))
    # Baseline in the same run: state round-trip alone (final states, the largest each key reaches).
    e_final = {k: orjson.dumps(v) for k, v in run_enrollment(e_stream, autos, False).items()}
    m_final = {k: orjson.dumps(v) for k, v in run_message(m_stream, False).items()}
    measure("enrollment_roundtrip_eps",
            lambda: run_roundtrip(e_stream, e_final, lambda e: f"{e['automation_id']}\x1f{e['contact_id']}"),
            len(e_stream))
    measure("message_roundtrip_eps", lambda: run_roundtrip(m_stream, m_final, lambda e: e["message_id"]),
            len(m_stream))
    for k in ("enrollment", "message"):
        rt = figures[k + "_roundtrip_eps"]
        figures[k + "_vs_roundtrip"] = round(rt / figures[k + "_eps"], 2)
        figures[k + "_orjson_vs_roundtrip"] = round(rt / figures[k + "_eps_orjson"], 2)
        rt = figures[k + "_roundtrip_cpu_eps"]
        figures[k + "_cpu_vs_roundtrip"] = round(rt / figures[k + "_cpu_eps"], 2)
    figures["loadavg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    for k in ("enrollment", "message", "combined"):
        print(f"{k:>10}: {figures[k + '_eps']:>10,.0f} events/s   with orjson state round-trip: "
              f"{figures[k + '_eps_orjson']:>10,.0f} events/s   (per CPU second: {figures[k + '_cpu_eps']:,.0f}, "
              f"{figures[k + '_cpu_eps_orjson']:,.0f})")
    for k in ("enrollment", "message"):
        print(f"{k:>10}: engine costs {figures[k + '_vs_roundtrip']:.2f}x an orjson state round-trip "
              f"({figures[k + '_roundtrip_eps']:,.0f}/s); with its own round-trip "
              f"{figures[k + '_orjson_vs_roundtrip']:.2f}x")
    figures = {k: (round(v) if isinstance(v, float) and not k.endswith("_vs_roundtrip") else v)
               for k, v in figures.items()}
    print(orjson.dumps(figures).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
