"""Hypothesis properties of the engine: idempotent replay, order independence, per-key isolation, node counts."""
from __future__ import annotations

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.engine import enrollment as E
from streams.engine import message as M

T0 = 1_767_225_600_000
MIN = 60_000
STEPS = [{"index": i, "name": f"s{i}", "kind": "email", "day": i} for i in range(3)]
ONCE = {"automation_id": "a1", "participation": "once", "steps": STEPS}
UNLIMITED = {"automation_id": "a1", "participation": "unlimited", "steps": STEPS}
MIDS = ["mA", "mB", "mC"]

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Kinds whose facts merge order-independently (no fan-outs, one enrollment: see the permutation property).
FACT_KINDS = ["enriched", "enrichment_failed", "duplicate", "limit_reached", "limit_released", "paused",
              "resumed", "finished", "canceled", "failed", "removed", "scheduled", "sent", "filtered", "not_sent",
              "step_failed", "o_settled", "o_bounced", "o_unsub", "o_replied", "o_auto"]
ALL_KINDS = FACT_KINDS + ["enrolled", "a_paused", "a_resumed", "a_archived"]


@st.composite
def contact_event(draw, kind, eid, at, aid="a1", cid="c1"):
    base = {"event_id": eid, "occurred_at": T0 + at * MIN, "schema_version": 1, "automation_id": aid,
            "contact_id": cid}
    k = draw(st.integers(0, 2))
    mid = draw(st.sampled_from(MIDS))
    later = st.one_of(st.none(), st.integers(-5, 60).map(lambda d: T0 + (at + d) * MIN))
    if kind == "enrolled":
        return dict(base, type="contact.enrolled", user_id="u", name=f"N{eid}", email="x@y.z", company=None,
                    attributes={}, needs_enrichment=draw(st.booleans()))
    simple = {"enriched": "contact.enriched", "duplicate": "contact.duplicate", "removed": "contact.removed",
              "resumed": "contact.resumed", "limit_released": "contact.limit_released"}
    if kind in simple:
        return dict(base, type=simple[kind], reason=None)
    if kind in ("enrichment_failed", "finished", "canceled", "failed"):
        return dict(base, type=f"contact.{kind}", reason=draw(st.sampled_from(["manual", "r1", "meeting_booked"])))
    if kind == "limit_reached":
        return dict(base, type="contact.limit_reached", limit=draw(st.sampled_from(["active", "coworkers"])))
    if kind == "paused":
        return dict(base, type="contact.paused", reason=draw(st.sampled_from(["manual", "out_of_office"])),
                    resume_at=draw(later))
    if kind in ("scheduled", "sent", "filtered", "not_sent", "step_failed"):
        t = "step.failed" if kind == "step_failed" else f"step.{kind}"
        d = dict(base, type=t, step_index=k, reason="why", due_at=None)
        if kind == "sent":
            d.update(message_id=mid, channel="email", mailing_id=None, subject="s", sending_user="u",
                     sending_email="e@x", step_details={}, metadata={})
        return d
    if kind.startswith("o_"):
        t = {"o_settled": "outcome.settled", "o_bounced": "outcome.bounced", "o_unsub": "outcome.unsubscribed",
             "o_replied": "outcome.replied", "o_auto": "outcome.auto_replied"}[kind]
        return dict(base, type=t, run=draw(st.integers(0, 1)) if kind != "o_settled" else 0, step_index=k,
                    message_id=mid,
                    reason=draw(st.sampled_from(["hard_bounce", "block", "spam_report"])) if kind == "o_bounced" else None,
                    return_at=draw(later) if kind == "o_auto" else None)
    t = {"a_paused": "automation.paused", "a_resumed": "automation.resumed", "a_archived": "automation.archived"}[kind]
    return dict(base, type=t)


@st.composite
def contact_stream(draw, kinds=ALL_KINDS, max_size=20, distinct_times=False, aid="a1", cid="c1", prefix="e",
                   one_enrollment=False):
    chosen = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=max_size))
    if one_enrollment:
        chosen = ["enrolled"] + chosen
    times = draw(st.lists(st.integers(0, 200), min_size=len(chosen), max_size=len(chosen), unique=distinct_times))
    return [draw(contact_event(k, f"{prefix}{i}", t, aid, cid)) for i, (k, t) in enumerate(zip(chosen, times))]


def run_all(events, automation, state=None):
    changes = []
    for e in events:
        r = E.apply(state, e, automation)
        state = r.state
        changes.extend(r.changes)
    return state, changes


def dumps(state):
    return orjson.dumps(state, option=orjson.OPT_SORT_KEYS)


def strip(views, drop=("version",)):
    return [{k: v for k, v in view.items() if k not in drop} for view in views]


# --------------------------------------------------------------------------- replay

@PROPS
@given(events=contact_stream(), automation=st.sampled_from([ONCE, UNLIMITED]), data=st.data())
def test_replaying_any_event_or_suffix_changes_nothing(events, automation, data):
    state, _ = run_all(events, automation)
    if state is None:
        return
    snap = dumps(state)
    i = data.draw(st.integers(0, len(events) - 1))
    for e in events[i:]:
        r = E.apply(state, dict(e), automation)
        assert not r.changed and r.changes == [] and r.registrations == [] and not r.repeats
        state = r.state
    assert dumps(state) == snap
    one = data.draw(st.sampled_from(events))
    r = E.apply(state, dict(one), automation)
    assert not r.changed and r.changes == [] and dumps(r.state) == snap


@PROPS
@given(events=contact_stream(), automation=st.sampled_from([ONCE, UNLIMITED]))
def test_emitted_changes_fold_to_the_view(events, automation):
    """Every change is emitted: folding contact_status/node_state changes gives the current view."""
    state, changes = run_all(events, automation)
    status, node_state = {}, {}
    for c in changes:
        if c["kind"] == "contact_status":
            assert c["from"] == status.get(c["run"])
            status[c["run"]] = c["to"]
        else:
            key = (c["run"], c["step_index"])
            assert c["from"] == node_state.get(key)
            node_state[key] = None if c["to"] == "none" else c["to"]
    for v in E.view(state, automation):
        assert status.get(v["run"]) == v["status"]
        assert {k[1]: s for k, s in node_state.items() if k[0] == v["run"] and s is not None} == {
            n["step_index"]: n["state"] for n in v["nodes"]}


@PROPS
@given(events=contact_stream(kinds=["sent", "sent", "sent", "enrolled", "finished"], max_size=12, one_enrollment=True),
       automation=st.sampled_from([ONCE, UNLIMITED]), data=st.data())
def test_every_step_registered_twice_is_named_a_repeat(events, automation, data):
    """Health lists duplicate sends from ``Result.repeats``: in any order, with replays, each (run, step)
    that got two messages registered (two recipient rows) is named; a step never named with ``verify``
    is named with exactly the messages registered at it."""
    order = data.draw(st.permutations(events + data.draw(st.lists(st.sampled_from(events), max_size=6))))
    state, registered, named, verify = None, {}, {}, set()
    for e in order:
        r = E.apply(state, dict(e), automation)
        state = r.state
        for reg in r.registrations:
            registered.setdefault((reg["run"], reg["step_index"]), set()).add(reg["message_id"])
        for run, step, ids, check in r.repeats:
            named.setdefault((run, step), set()).update(ids)
            if check:
                verify.add((run, step))
    twice = {key for key, mids in registered.items() if len(mids) > 1}
    assert twice <= set(named)
    for key, ids in named.items():
        if key not in verify:
            assert ids == registered[key] and len(ids) > 1
    steps_of = {}
    for e in events:
        if e["type"] == "step.sent":
            steps_of.setdefault(e["message_id"], set()).add(e["step_index"])
    if all(len(steps) == 1 for steps in steps_of.values()):  # no message changes its step
        assert set(named) == twice and not verify


# --------------------------------------------------------------------------- permutations

@PROPS
@given(events=contact_stream(kinds=FACT_KINDS, distinct_times=True, one_enrollment=True), data=st.data())
def test_permuting_fact_events_gives_same_derivation(events, data):
    perm = data.draw(st.permutations(events))
    s1, _ = run_all(events, ONCE)
    s2, _ = run_all(perm, ONCE)
    v1, v2 = E.view(s1, ONCE), E.view(s2, ONCE)
    assert [(v["status"], v["reason"]) for v in v1] == [(v["status"], v["reason"]) for v in v2]
    assert strip(v1) == strip(v2)


def _where(views):
    return [(v["status"], v["reason"], v["current_step"], [(n["step_index"], n["state"]) for n in v["nodes"]])
            for v in views]


@PROPS
@given(events=contact_stream(kinds=FACT_KINDS, one_enrollment=True), data=st.data())
def test_an_automation_paused_then_resumed_leaves_every_contact_where_it_was(events, data):
    """Seed 004: the master switch pauses the contacts until it is flipped back on. A pause and a later
    resume of the automation, processed anywhere among a contact's events (the resume after the pause,
    as they come in order from the automations topic), leave each run's status, reason and nodes as
    they are without them: the contact's own holds (out of office, bounce, pause, not sent) survive."""
    t1 = data.draw(st.integers(0, 199))
    t2 = data.draw(st.integers(t1 + 1, 200))
    pause = {"event_id": "fan-p", "type": "automation.paused", "occurred_at": T0 + t1 * MIN, "schema_version": 1,
             "automation_id": "a1", "contact_id": None}
    resume = dict(pause, event_id="fan-r", type="automation.resumed", occurred_at=T0 + t2 * MIN)
    i = data.draw(st.integers(0, len(events)))
    j = data.draw(st.integers(i, len(events)))
    with_fan_outs = events[:i] + [pause] + events[i:j] + [resume] + events[j:]
    without, _ = run_all(events, ONCE)
    paused, _ = run_all(with_fan_outs, ONCE)
    # the fan-outs' times move the key's clock too (timed holds resume by it): compare at one clock
    paused["now"] = without["now"] = max(paused["now"], without["now"])
    assert _where(E.view(paused, ONCE)) == _where(E.view(without, ONCE))


@st.composite
def message_stream(draw):
    kinds = draw(st.lists(st.sampled_from(["sent", "delivered", "deferred", "bounced", "dropped", "opened", "clicked",
                                           "spam_reported", "unsubscribed", "resubscribed", "replied",
                                           "auto_replied"]), max_size=15))
    out = []
    for i, k in enumerate(kinds):
        at = draw(st.integers(0, 50))
        eid = f"p{i}"
        out.append({"event_id": eid, "type": f"message.{k}", "occurred_at": T0 + at * MIN, "schema_version": 1,
                    "message_id": "m1", "email": "a@b.c", "provider": "x", "automation_id": None,
                    "contact_id": None, "step_index": None, "reason": None,
                    "bounce_class": draw(st.sampled_from(["hard", "soft", "block"])) if k == "bounced" else None,
                    "url": None, "return_at": T0 + draw(st.integers(0, 99)) * MIN if k == "auto_replied" else None})
    # duplicates of some events
    dups = draw(st.lists(st.sampled_from(out), max_size=4)) if out else []
    reg = {"event_id": "s1", "type": "message.registered", "occurred_at": T0, "schema_version": 1,
           "message_id": "m1", "automation_id": "a1", "contact_id": "c1", "run": 0, "step_index": 0,
           "mailing_id": "a1:0", "subject": "S", "sending_user": "u", "sending_email": "e@x", "email": "a@b.c",
           "name": "N", "channel": "email"}
    return out + [dict(d) for d in dups] + [reg]


def feed_messages(events):
    state = None
    outs = []
    for e in events:
        r = M.apply(state, e)
        state = r.state
        outs.extend(r.outcomes)
    return state, outs


@PROPS
@given(events=message_stream(), data=st.data())
def test_message_view_independent_of_order(events, data):
    perm = data.draw(st.permutations(events))
    s1, o1 = feed_messages(events)
    s2, o2 = feed_messages(perm)
    v1, v2 = M.view(s1), M.view(s2)
    assert v1 is not None
    v1.pop("version"), v2.pop("version")
    assert v1 == v2
    # the last forwarded outcome of each type is the same whatever the order
    assert {o["type"]: o for o in o1} == {o["type"]: o for o in o2}
    # and replaying any suffix changes nothing
    i = data.draw(st.integers(0, len(perm) - 1))
    snap = dumps(s2)
    for e in perm[i:]:
        r = M.apply(s2, dict(e))
        assert not r.changed and r.changes == [] and r.outcomes == []
    assert dumps(s2) == snap


# --------------------------------------------------------------------------- keys and interleaving

@PROPS
@given(a=contact_stream(cid="c1", prefix="a"), b=contact_stream(cid="c2", prefix="b"),
       c=contact_stream(aid="a2", cid="c1", prefix="c"), data=st.data())
def test_interleaving_contacts_is_invisible(a, b, c, data):
    automations = {"a1": UNLIMITED, "a2": dict(ONCE, automation_id="a2")}
    seqs = [a, b, c]
    # route an interleaving through key_of
    order = data.draw(st.permutations([i for i, s in enumerate(seqs) for _ in s]))
    pos = [0, 0, 0]
    table: dict = {}
    for i in order:
        e = seqs[i][pos[i]]
        pos[i] += 1
        key = E.key_of(e)
        table[key] = E.apply(table.get(key), e, automations[e["automation_id"]]).state
    assert set(table) == {"a1\x1fc1", "a1\x1fc2", "a2\x1fc1"}
    for seq in seqs:
        alone, _ = run_all(seq, automations[seq[0]["automation_id"]])
        key = E.key_of(seq[0])
        assert dumps(table[key]) == dumps(alone)
        st_ = table[key]
        assert (st_["automation_id"], st_["contact_id"]) == (seq[0]["automation_id"], seq[0]["contact_id"])


# --------------------------------------------------------------------------- node counts

@PROPS
@given(streams=st.lists(st.integers(0, 10**6), min_size=1, max_size=5), data=st.data())
def test_node_counts_sum_to_runs_that_reached_each_node(streams, data):
    views = []
    for n, _ in enumerate(streams):
        seq = data.draw(contact_stream(cid=f"c{n}", prefix=f"x{n}_"))
        state, _ = run_all(seq, UNLIMITED)
        views.extend(E.view(state, UNLIMITED))
    for step in STEPS:
        k = step["index"]
        counts = {"done": 0, "waiting": 0, "filtered": 0, "stopped": 0}
        reached = 0
        for v in views:
            states = [nd["state"] for nd in v["nodes"] if nd["step_index"] == k]
            assert len(states) <= 1
            if states:
                reached += 1
                counts[states[0]] += 1
        assert sum(counts.values()) == reached
    for v in views:
        current = [nd for nd in v["nodes"] if nd["state"] in ("waiting", "stopped")]
        assert len(current) <= 1
        if current:
            assert current[0]["step_index"] == v["current_step"]
            assert (current[0]["state"] == "waiting") == (v["status"] in (
                "waiting_enrichment", "ready", "active_limit", "coworkers_limit", "in_progress", "paused"))
        else:
            assert v["current_step"] == -1
        if v["status"] == "finished" and v["reason"] in ("completed", "filtered"):
            assert not current
