"""The synthetic workload generator: determinism, contract form, rates, disorder, oracle consistency."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from datetime import datetime

import pytest

from streams.generator import DEAD_LETTER_REASONS, TOPICS, generate, read_jsonl, write_jsonl
from streams.oracle import ENDED, FLAGS, STATUS_PRIORITY

HOUR = 3_600_000
DAY = 24 * HOUR
BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
NOW_MS = BASE_MS + 60 * DAY

STATUSES = {"waiting_enrichment", "ready", "active_limit", "coworkers_limit", "in_progress", "paused",
            "not_sent", "bounced", "finished", "canceled", "failed", "unsubscribed", "duplicate"}

_C = ("automation_id", "contact_id")
_S = _C + ("step_index",)
_M = ("message_id", "email", "provider")
REQUIRED = {
    "automation.published": ("automation_id", "name", "participation", "start_at", "published_by", "version",
                             "steps"),
    "automation.paused": ("automation_id",),
    "automation.resumed": ("automation_id",),
    "automation.archived": ("automation_id",),
    "contact.enrolled": _C + ("user_id", "name", "email"),
    "contact.enriched": _C,
    "contact.enrichment_failed": _C + ("reason",),
    "contact.duplicate": _C,
    "contact.limit_reached": _C + ("limit",),
    "contact.limit_released": _C,
    "contact.paused": _C + ("reason",),
    "contact.resumed": _C,
    "contact.finished": _C + ("reason",),
    "contact.canceled": _C,
    "contact.failed": _C + ("reason",),
    "contact.removed": _C,
    "step.scheduled": _S + ("due_at",),
    "step.sent": _S + ("message_id",),
    "step.filtered": _S + ("reason",),
    "step.not_sent": _S + ("reason",),
    "step.failed": _S + ("reason",),
    "message.sent": _M,
    "message.delivered": _M,
    "message.deferred": _M,
    "message.bounced": _M + ("bounce_class",),
    "message.dropped": _M,
    "message.opened": _M,
    "message.clicked": _M + ("url",),
    "message.spam_reported": _M,
    "message.unsubscribed": _M,
    "message.resubscribed": _M,
    "message.replied": _M,
    "message.auto_replied": _M,
}
TOPIC_OF = {"automation": "automations", "contact": "enrollments", "step": "sends", "message": "provider-events"}
KEY_OF = {"automations": "automation_id", "enrollments": "contact_id", "sends": "contact_id",
          "provider-events": "message_id"}
TS_FIELDS = ("occurred_at", "start_at", "end_at", "due_at", "resume_at", "return_at")


def _ms(s: str) -> int:
    assert isinstance(s, str) and "T" in s and (s.endswith("Z") or s[-6] in "+-"), s
    d = datetime.fromisoformat(s.replace("Z", "+00:00"))
    assert d.tzinfo is not None, s
    return round(d.timestamp() * 1000)


def _gen(seed: int, **kw):
    kw.setdefault("contacts", 3_000)
    return generate(seed, base_ms=BASE_MS, now_ms=NOW_MS, **kw)


@pytest.fixture(scope="module")
def w():
    return _gen(11, invalid=2)


@pytest.fixture(scope="module")
def decoded(w):
    """(topic, key, event) of every valid event, in production order."""
    out = []
    for topic, key, raw in w.events:
        try:
            ev = json.loads(raw)
        except ValueError:
            continue
        if isinstance(ev, dict) and ev.get("type") in REQUIRED and not str(key).startswith("bad-"):
            out.append((topic, key, ev))
    return out


def test_same_seed_same_bytes():
    a = _gen(5, contacts=400, invalid=1)
    b = _gen(5, contacts=400, invalid=1)
    assert a.events == b.events
    assert a.oracle == b.oracle
    c = _gen(6, contacts=400, invalid=1)
    assert c.events != a.events


def test_events_follow_the_contract(w, decoded):
    ids = set()
    for topic, key, ev in decoded:
        assert topic == TOPIC_OF[ev["type"].split(".")[0]]
        assert key == ev[KEY_OF[topic]]
        assert isinstance(ev["event_id"], str) and ev["event_id"]
        assert ev.get("schema_version", 1) == 1
        for f in REQUIRED[ev["type"]]:
            assert f in ev and ev[f] is not None, (ev["type"], f)
        for f in TS_FIELDS:
            if ev.get(f) is not None:
                _ms(ev[f])
        t = _ms(ev["occurred_at"])
        assert BASE_MS <= t <= NOW_MS - 2 * HOUR
        if ev["type"] == "automation.published":
            assert ev["participation"] in ("once", "unlimited")
            assert [s["index"] for s in ev["steps"]] == list(range(len(ev["steps"])))
            assert {s["kind"] for s in ev["steps"]} <= {"email", "linkedin_connect", "linkedin_message", "task",
                                                        "wait", "condition"}
        if "step_index" in ev and ev["step_index"] is not None:
            assert isinstance(ev["step_index"], int) and ev["step_index"] >= 0
        ids.add(ev["event_id"])
    # event ids are unique per distinct event (replays repeat the same bytes)
    by_id = defaultdict(set)
    for topic, key, raw in w.events:
        try:
            ev = json.loads(raw)
        except ValueError:
            continue
        if isinstance(ev, dict) and "event_id" in ev and not key.startswith("bad-"):
            by_id[ev["event_id"]].add(raw)
    assert all(len(v) == 1 for v in by_id.values())


def test_parser_accepts_valid_and_rejects_invalid(w):
    parser = pytest.importorskip("schemas.parser")
    dead = Counter()
    for topic, key, raw in w.events:
        r = parser.parse_event(raw, topic=topic)
        if isinstance(r, parser.Rejection):
            assert key.startswith("bad-"), (topic, key, r.reason, r.detail)
            dead[r.reason] += 1
        else:
            assert not key.startswith("bad-"), (topic, key, raw[:200])
    assert dict(dead) == w.oracle["dead_letters"]
    assert dict(dead) == {r: 2 for r in DEAD_LETTER_REASONS}


def test_event_counts(w):
    counts = Counter(t for t, _, _ in w.events)
    assert w.oracle["event_counts"] == {t: counts.get(t, 0) for t in TOPICS}


def test_contact_events_in_time_order(decoded):
    last: dict[str, tuple[int, str]] = {}
    for topic, key, ev in decoded:
        if topic not in ("enrollments", "sends"):
            continue
        k = f"{ev['automation_id']}|{key}"
        t = _ms(ev["occurred_at"])
        prev = last.get(k)
        if prev is not None and prev[1] == ev["event_id"]:
            continue  # a replay right after itself
        assert prev is None or prev[0] <= t, (k, ev)
        last[k] = (t, ev["event_id"])


def test_rates_roughly_as_configured(w, decoded):
    emails = [mid for mid in w.oracle["messages"] if mid.startswith("msg-")]
    n = len(emails)
    assert n > 3_000
    msgs = w.oracle["messages"]
    frac = lambda pred: sum(1 for mid in emails if pred(msgs[mid])) / n  # noqa: E731
    assert 0.90 <= frac(lambda m: "delivered" in m["flags"]) <= 0.99
    assert 0.30 <= frac(lambda m: "opened" in m["flags"]) <= 0.50
    assert 0.01 <= frac(lambda m: "clicked" in m["flags"]) <= 0.08
    assert 0.008 <= frac(lambda m: "bounced" in m["flags"]) <= 0.04
    assert 0.001 <= frac(lambda m: "dropped" in m["flags"]) <= 0.015
    assert 0.01 <= frac(lambda m: "deferred" in m["flags"]) <= 0.06
    assert 0.015 <= frac(lambda m: "replied" in m["flags"]) <= 0.05
    assert 0.003 <= frac(lambda m: "auto_replied" in m["flags"]) <= 0.02
    assert 0.003 <= frac(lambda m: "unsubscribed" in m["flags"]) <= 0.02
    types = Counter(ev["type"] for _, _, ev in decoded)
    for t in REQUIRED:
        assert types[t] > 0, f"no {t} event generated"
    statuses = Counter()
    for sc in w.oracle["status_counts"].values():
        statuses.update(sc)
    assert set(statuses) == STATUSES, set(STATUSES) - set(statuses)
    runs = sum(statuses.values())
    assert 0.1 <= sum(1 for ev in (e for _, _, e in decoded) if ev["type"] == "contact.enrolled"
                      and ev.get("needs_enrichment")) / runs <= 0.3
    assert w.oracle["ignored_enrollments"] > 0
    assert any(k.endswith("|1") for k in w.oracle["enrollments"]), "no re-enrollment run"
    # duplicate sends: the same step sent twice for one run
    per_step = Counter((a, c, r, s) for a, c, r, s, _ in w.oracle["recipients"])
    assert any(v > 1 for v in per_step.values())


def test_duplicates_share_event_id_and_bytes(w):
    seen: dict[str, bytes] = {}
    dups = 0
    prov = 0
    for topic, key, raw in w.events:
        if topic != "provider-events" or key.startswith("bad-"):
            continue
        ev = json.loads(raw)
        eid = ev["event_id"]
        if eid in seen:
            assert seen[eid] == raw
            dups += 1
        else:
            seen[eid] = raw
            prov += 1
    assert 0.03 <= dups / prov <= 0.07


@pytest.mark.parametrize("window", [0, 5, 20])
def test_provider_reordering_stays_within_window(window):
    wl = _gen(3, contacts=600, reorder_window=window, duplicate_rate=0.05)
    firsts = []
    seen = set()
    step_sent_pos = {}
    early = 0
    for pos, (topic, key, raw) in enumerate(wl.events):
        ev = json.loads(raw)
        if topic == "sends" and ev["type"] == "step.sent":
            step_sent_pos.setdefault(ev["message_id"], pos)
        if topic != "provider-events" or ev["event_id"] in seen:
            continue
        seen.add(ev["event_id"])
        firsts.append((_ms(ev["occurred_at"]), ev["event_id"]))
        if ev["message_id"] in wl.oracle["messages"] and ev["message_id"] not in step_sent_pos:
            early += 1
    ranked = {x: i for i, x in enumerate(sorted(firsts))}
    disp = max(abs(ranked[x] - i) for i, x in enumerate(firsts))
    if window == 0:
        assert disp == 0
    else:
        assert 0 < disp < window
        assert early > 0, "no provider event produced before its step.sent"


def test_oracle_is_internally_consistent(w):
    o = w.oracle
    runs_by_auto = Counter(k.split("|")[0] for k in o["enrollments"])
    nodes = defaultdict(Counter)
    for k, e in o["enrollments"].items():
        aid = k.split("|")[0]
        assert e["status"] in STATUSES
        cur = e["current_step"]
        if cur >= 0:
            assert e["nodes"][str(cur)] in ("waiting", "stopped")
            assert (e["nodes"][str(cur)] == "stopped") == (e["status"] not in
                                                            {"waiting_enrichment", "ready", "active_limit",
                                                             "coworkers_limit", "in_progress", "paused"})
        else:
            assert all(v in ("done", "filtered") for v in e["nodes"].values())
        if "filtered" in e["nodes"].values():
            assert (e["status"], e["reason"]) == ("finished", "filtered")
        for i, st in e["nodes"].items():
            nodes[(aid, i)][st] += 1
    for aid, per_node in o["node_counts"].items():
        for i, counts in per_node.items():
            assert counts == {s: nodes[(aid, i)].get(s, 0) for s in ("done", "waiting", "filtered", "stopped")}
        # a run is at (or past) node 0 unless it ended before entering the flow
        assert sum(o["status_counts"][aid].values()) == runs_by_auto[aid]
        assert sum(o["completion"][aid].values()) == runs_by_auto[aid]
        # nobody reaches node k+1 without passing node k
        idx = sorted(per_node, key=int)
        for a, b in zip(idx, idx[1:]):
            reach_b = sum(per_node[b].values())
            assert per_node[a]["done"] >= reach_b
    # messages and recipients
    assert len(o["recipients"]) == len(o["messages"])
    assert {r[4] for r in o["recipients"]} == set(o["messages"])
    for m in o["messages"].values():
        assert set(m["flags"]) <= set(FLAGS) and "sent" in m["flags"]
        assert m["status"] == next(s for s in STATUS_PRIORITY if s in m["flags"])
        if "clicked" in m["flags"]:
            assert "opened" in m["flags"]
        if "opened" in m["flags"]:
            assert "delivered" in m["flags"]
        assert (m["bounce_class"] is not None) == ("bounced" in m["flags"])
        assert m["opens"] >= 0 and m["clicks"] >= 0
    total = sum(mm["total_sent"] for mm in o["mailings"].values())
    assert total == len(o["messages"])
    for mm in o["mailings"].values():
        assert mm["total_sent"] >= mm["delivered"] >= mm["opened"] >= mm["clicked"]
        assert all(v <= mm["total_sent"] for v in mm.values())
    assert sum(mm["bounced"] for mm in o["mailings"].values()) == sum(
        1 for m in o["messages"].values() if "bounced" in m["flags"])
    # lifecycle: the archived automation has no waiting contact left
    for aid, sc in o["status_counts"].items():
        if sc.get("canceled", 0) and all(s in ENDED for s in sc):
            break
    else:
        pytest.fail("the archived automation still has open runs")
    assert o["now_ms"] == NOW_MS


def test_jsonl_round_trip(w, tmp_path):
    paths = write_jsonl(w, tmp_path)
    assert {p.name for p in paths.values()} == {f"{t}.jsonl" for t in TOPICS} | {"oracle.json"}
    for t in TOPICS:
        for line in (tmp_path / f"{t}.jsonl").read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            assert set(rec) >= {"key", "value"}
    back = read_jsonl(tmp_path)
    assert back.events == w.events
    assert back.oracle == json.loads(json.dumps(w.oracle))


def test_bad_arguments():
    with pytest.raises(ValueError):
        generate(1, contacts=10, base_ms=BASE_MS, now_ms=BASE_MS + HOUR)
