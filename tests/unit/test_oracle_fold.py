"""Fold generated workloads through the pure state machines and compare with the oracle.

The oracle (streams/oracle.py, filled by streams/generator.py from its plan)
is computed without the machines; this test runs the machines the way the
pipeline does and demands an exact match.

How the fold mimics the pipeline:

- every message is parsed with ``schemas.parser.parse_event(value,
  topic=topic)``; rejections are counted per reason (dead letters);
- ``automations`` events are applied in production order as *barriers*:
  everything produced before them (and everything it caused on the internal
  flows) is processed first; ``automation.published`` stores the definition,
  ``automation.paused``/``resumed``/``archived`` are fanned out to every
  existing enrollment key of the automation;
- between barriers, five flows are consumed round-robin, each in its own
  order, with different batch sizes so that they drift apart: the input
  topics ``enrollments`` and ``sends`` (enrollment machine), ``provider-events``
  (message machine), and the internal flows of registrations (to the message
  machine) and outcomes (to the enrollment machine);
- at the end every enrollment key is ticked at the oracle's ``now_ms``.
"""
from __future__ import annotations

import time
from collections import Counter, deque

import pytest

parser = pytest.importorskip("schemas.parser")
enrollment = pytest.importorskip("streams.engine.enrollment")
message = pytest.importorskip("streams.engine.message")

from streams.generator import generate  # noqa: E402

DAY = 86_400_000
BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
NOW_MS = BASE_MS + 60 * DAY
CONTACTS = 10_000

_FLOW_ORDER = ("enrollments", "sends", "provider-events", "to-messages", "to-contacts")


class Fold:
    def __init__(self, batches: dict[str, int]) -> None:
        self.batches = batches
        self.automations: dict[str, dict] = {}
        self.enr: dict[str, dict] = {}
        self.keys_by_automation: dict[str, dict[str, None]] = {}
        self.msgs: dict[str, dict] = {}
        self.dead: Counter = Counter()
        self.flows: dict[str, deque] = {name: deque() for name in _FLOW_ORDER}

    # -- machines
    def contact(self, ev: dict) -> None:
        key = enrollment.key_of(ev)
        aid = ev["automation_id"]
        r = enrollment.apply(self.enr.get(key), ev, self.automations.get(aid))
        self.enr[key] = r.state
        self.keys_by_automation.setdefault(aid, {})[key] = None
        self.flows["to-messages"].extend(r.registrations)

    def message(self, ev: dict) -> None:
        key = message.key_of(ev)
        r = message.apply(self.msgs.get(key), ev)
        self.msgs[key] = r.state
        self.flows["to-contacts"].extend(r.outcomes)

    def fan_out(self, ev: dict) -> None:
        aid = ev["automation_id"]
        automation = self.automations.get(aid)
        for key in list(self.keys_by_automation.get(aid, ())):
            r = enrollment.apply(self.enr[key], ev, automation)
            self.enr[key] = r.state
            self.flows["to-messages"].extend(r.registrations)

    # -- flows
    def drain(self) -> None:
        handlers = {
            "enrollments": self.contact,
            "sends": self.contact,
            "provider-events": self.message,
            "to-messages": self.message,
            "to-contacts": self.contact,
        }
        flows = self.flows
        while any(flows.values()):
            for name in _FLOW_ORDER:
                q = flows[name]
                for _ in range(self.batches[name]):
                    if not q:
                        break
                    handlers[name](q.popleft())

    def run(self, events) -> None:
        for topic, _key, raw in events:
            ev = parser.parse_event(raw, topic=topic)
            if isinstance(ev, parser.Rejection):
                self.dead[ev.reason] += 1
                continue
            if topic == "automations":
                self.drain()
                if ev["type"] == "automation.published":
                    self.automations[ev["automation_id"]] = ev
                else:
                    self.fan_out(ev)
                    self.drain()
            else:
                self.flows[topic].append(ev)
        self.drain()

    def finish(self, now_ms: int) -> None:
        for key, state in self.enr.items():
            r = enrollment.tick(state, self.automations.get(state["automation_id"]), now_ms)
            self.enr[key] = r.state
            self.flows["to-messages"].extend(r.registrations)
        self.drain()

    # -- results in the oracle's shapes
    def results(self) -> dict:
        enrollments: dict[str, dict] = {}
        node_counts: dict[str, dict] = {}
        status_counts: dict[str, dict] = {}
        ignored = 0
        for state in self.enr.values():
            automation = self.automations.get(state["automation_id"])
            views = enrollment.view(state, automation)
            if views:
                ignored += views[0]["ignored_enrollments"]
            for v in views:
                aid = v["automation_id"]
                nodes = {str(n["step_index"]): n["state"] for n in v["nodes"]}
                cur = v["current_step"]
                enrollments[f"{aid}|{v['contact_id']}|{v['run']}"] = {
                    "status": v["status"],
                    "reason": v["reason"],
                    "current_step": -1 if cur is None else cur,
                    "nodes": nodes,
                }
                nc = node_counts.setdefault(aid, {})
                if automation is not None:
                    for s in automation["steps"]:
                        nc.setdefault(str(s["index"]), {"done": 0, "waiting": 0, "filtered": 0, "stopped": 0})
                for k, st in nodes.items():
                    nc.setdefault(k, {"done": 0, "waiting": 0, "filtered": 0, "stopped": 0})[st] += 1
                sc = status_counts.setdefault(aid, {})
                sc[v["status"]] = sc.get(v["status"], 0) + 1
        messages: dict[str, dict] = {}
        recipients = []
        mailings: dict[str, dict] = {}
        mailing_flags = (("delivered", "delivered"), ("opened", "opened"), ("clicked", "clicked"),
                         ("bounced", "bounced"), ("dropped", "dropped"), ("deferred", "deferred"),
                         ("spam_reports", "spam_reported"), ("unsubscribed", "unsubscribed"))
        for mid, state in self.msgs.items():
            v = message.view(state)
            if v is None:
                continue
            flags = sorted(f for f in message.FLAGS if v.get(f + "_at") is not None)
            messages[mid] = {"status": v["status"], "opens": v["opens"], "clicks": v["clicks"],
                             "bounce_class": v["bounce_class"], "flags": flags}
            recipients.append([v["automation_id"], v["contact_id"], v["run"], v["step_index"], mid])
            row = mailings.setdefault(v["mailing_id"], {"total_sent": 0, **{k: 0 for k, _ in mailing_flags}})
            row["total_sent"] += 1
            for k, f in mailing_flags:
                if f in flags:
                    row[k] += 1
        return {
            "enrollments": enrollments,
            "node_counts": node_counts,
            "status_counts": status_counts,
            "recipients": sorted(recipients),
            "messages": messages,
            "mailings": mailings,
            "ignored_enrollments": ignored,
            "dead_letters": dict(self.dead),
        }


def _diff(name: str, expected, got, out: list[str], limit: int = 40) -> None:
    if len(out) >= limit:
        return
    if isinstance(expected, dict) and isinstance(got, dict):
        for k in sorted(set(expected) | set(got), key=str):
            if len(out) >= limit:
                return
            if k not in got:
                out.append(f"{name}[{k!r}]: missing in fold, oracle {_short(expected[k])}")
            elif k not in expected:
                out.append(f"{name}[{k!r}]: not in oracle, fold {_short(got[k])}")
            elif expected[k] != got[k]:
                _diff(f"{name}[{k!r}]", expected[k], got[k], out, limit)
    elif isinstance(expected, list) and isinstance(got, list) and expected and isinstance(expected[0], list):
        e, g = {tuple(x) for x in expected}, {tuple(x) for x in got}
        for x in sorted(e - g)[:10]:
            out.append(f"{name}: oracle row {list(x)} missing in fold")
        for x in sorted(g - e)[:10]:
            out.append(f"{name}: fold row {list(x)} not in oracle")
        if not (e - g) and not (g - e) and len(expected) != len(got):
            out.append(f"{name}: {len(expected)} rows in oracle, {len(got)} in fold")
    else:
        out.append(f"{name}: oracle {_short(expected)} != fold {_short(got)}")


def _short(x) -> str:
    s = repr(x)
    return s if len(s) < 300 else s[:300] + "..."


def _compare(oracle: dict, got: dict) -> list[str]:
    out: list[str] = []
    for section in ("enrollments", "node_counts", "status_counts", "recipients", "messages", "mailings",
                    "ignored_enrollments", "dead_letters"):
        if oracle[section] != got[section]:
            _diff(section, oracle[section], got[section], out)
    return out


def _check(seed: int, batches: dict[str, int], invalid: int = 1) -> None:
    t0 = time.perf_counter()
    w = generate(seed, contacts=CONTACTS, base_ms=BASE_MS, now_ms=NOW_MS, invalid=invalid)
    t1 = time.perf_counter()
    fold = Fold(batches)
    fold.run(w.events)
    fold.finish(w.oracle["now_ms"])
    got = fold.results()
    t2 = time.perf_counter()
    mismatches = _compare(w.oracle, got)
    print(f"seed {seed}: {len(w.events)} events, generate {t1 - t0:.1f}s, fold {t2 - t1:.1f}s, "
          f"{len(w.oracle['enrollments'])} runs, {len(w.oracle['messages'])} messages")
    if mismatches:
        pytest.fail(f"seed {seed}: fold and oracle differ ({len(mismatches)}+ mismatches, first ones):\n  "
                    + "\n  ".join(mismatches))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fold_matches_oracle(seed: int) -> None:
    # round-robin with drifting batch sizes; seed-dependent so the three seeds interleave differently
    batches = {
        "enrollments": 1 + seed % 3,
        "sends": 2 + seed % 2,
        "provider-events": 3,
        "to-messages": 1 + seed,
        "to-contacts": 2,
    }
    _check(seed, batches)


def test_fold_topic_skew_small() -> None:
    """A harsher interleaving (sends far ahead of enrollments, outcomes late) on a smaller workload."""
    global CONTACTS
    saved = CONTACTS
    CONTACTS = 2_000
    try:
        _check(7, {"enrollments": 1, "sends": 50, "provider-events": 20, "to-messages": 1, "to-contacts": 1})
    finally:
        CONTACTS = saved
