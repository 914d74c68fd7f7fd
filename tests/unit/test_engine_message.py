"""Message machine: flags, first times, counts, status precedence, implications, registration, outcomes."""
from __future__ import annotations

import itertools

import orjson
import pytest

from streams.engine import enrollment as E
from streams.engine import message as M
from streams.engine.common import change_id

T0 = 1_767_225_600_000
MIN = 60_000
_ids = itertools.count()


def pev(kind: str, at: int = 0, eid: str | None = None, mid: str = "m1", **fields) -> dict:
    d = {"event_id": eid or f"p{next(_ids)}", "type": f"message.{kind}", "occurred_at": T0 + at * MIN,
         "schema_version": 1, "message_id": mid, "email": "ann@x.io", "provider": "sendgrid",
         "automation_id": None, "contact_id": None, "step_index": None, "reason": None,
         "bounce_class": None, "url": None, "return_at": None}
    d.update(fields)
    return d


def reg(at: int = 0, eid: str = "send1", mid: str = "m1", **fields) -> dict:
    d = {"event_id": eid, "type": "message.registered", "occurred_at": T0 + at * MIN, "schema_version": 1,
         "message_id": mid, "automation_id": "a1", "contact_id": "c1", "run": 0, "step_index": 0,
         "mailing_id": "a1:0", "subject": "Hello", "sending_user": "u9", "sending_email": "me@x.io",
         "email": "ann@x.io", "name": "Ann", "channel": "email"}
    d.update(fields)
    return d


def feed(events, state=None):
    changes, outcomes = [], []
    for e in events:
        r = M.apply(state, e)
        state = r.state
        changes.extend(r.changes)
        outcomes.extend(r.outcomes)
    return state, changes, outcomes


def test_view_none_until_registered_and_registration_sets_sent():
    s, ch, out = feed([pev("delivered", 1)])
    assert M.view(s) is None and ch == [] and out == []
    s, ch, out = feed([reg(0)], s)
    v = M.view(s)
    assert v["status"] == "delivered" and v["sent_at"] == T0 and v["delivered_at"] == T0 + MIN
    assert [(c["kind"], c["from"], c["to"], c["message_id"], c["run"], c["step_index"]) for c in ch] == [
        ("message_status", None, "delivered", "m1", 0, 0)]
    assert [o["type"] for o in out] == ["outcome.settled"]


def test_view_fields():
    s, _, _ = feed([reg(0), pev("opened", 3), pev("clicked", 4)])
    v = M.view(s)
    assert set(v) == {"message_id", "mailing_id", "automation_id", "run", "contact_id", "step_index", "subject",
                      "sending_user", "sending_email", "email", "name", "channel", "status", "status_at",
                      "sent_at", "delivered_at", "deferred_at", "opened_at", "clicked_at", "bounced_at",
                      "dropped_at", "spam_reported_at", "unsubscribed_at", "resubscribed_at", "replied_at",
                      "auto_replied_at", "bounce_class", "opens", "clicks", "version"}
    assert (v["mailing_id"], v["subject"], v["sending_user"], v["sending_email"], v["name"]) == (
        "a1:0", "Hello", "u9", "me@x.io", "Ann")


def test_statuses_in_order_of_arrival():
    s, ch, _ = feed([reg(0), pev("sent", 0), pev("deferred", 1), pev("delivered", 2), pev("opened", 3),
                     pev("clicked", 4), pev("unsubscribed", 5)])
    assert [c["to"] for c in ch] == ["sent", "deferred", "delivered", "opened", "clicked", "unsubscribed"]
    assert M.view(s)["status_at"] == T0 + 5 * MIN


@pytest.mark.parametrize("high,low", [
    ("dropped", "bounced"), ("bounced", "spam_reported"), ("spam_reported", "unsubscribed"),
    ("unsubscribed", "clicked"), ("clicked", "opened"), ("opened", "delivered"), ("delivered", "deferred"),
    ("deferred", "sent"),
])
def test_status_precedence(high, low):
    for order in ((high, low), (low, high)):
        s, _, _ = feed([reg(0)] + [pev(k, i + 1, bounce_class="hard") for i, k in enumerate(order)])
        v = M.view(s)
        assert v["status"] == high
        assert v["status_at"] == v[f"{high}_at"]


def test_first_times_kept_and_counts():
    s, ch, _ = feed([reg(0), pev("opened", 10, eid="o1"), pev("opened", 5, eid="o2"), pev("opened", 7, eid="o3"),
                     pev("opened", 10, eid="o1")])
    v = M.view(s)
    assert v["opened_at"] == T0 + 5 * MIN and v["opens"] == 3
    assert v["delivered_at"] == T0 + 5 * MIN  # implied, at the earliest open


def test_implied_delivered_and_opened_do_not_count():
    s, _, out = feed([reg(0), pev("clicked", 4, eid="k1")])
    v = M.view(s)
    assert v["status"] == "clicked" and v["clicks"] == 1 and v["opens"] == 0
    assert v["opened_at"] == v["delivered_at"] == v["clicked_at"] == T0 + 4 * MIN
    s, _, _ = feed([pev("delivered", 2)], s)
    assert M.view(s)["delivered_at"] == T0 + 2 * MIN
    assert M.view(s)["opened_at"] == T0 + 4 * MIN


def test_duplicates_change_nothing():
    events = [reg(0), pev("delivered", 1), pev("opened", 2), pev("bounced", 3, bounce_class="soft")]
    s, _, _ = feed(events)
    snap = orjson.dumps(s)
    for e in events:
        r = M.apply(s, e)
        assert not r.changed and r.changes == [] and r.outcomes == []
    assert orjson.dumps(s) == snap


def test_bounce_class_most_severe():
    s, _, _ = feed([reg(0), pev("bounced", 3, bounce_class="soft"), pev("bounced", 5, bounce_class="block")])
    assert M.view(s)["bounce_class"] == "block" and M.view(s)["bounced_at"] == T0 + 3 * MIN
    s, _, _ = feed([pev("bounced", 9, bounce_class="hard"), pev("bounced", 1, bounce_class="soft")], s)
    assert M.view(s)["bounce_class"] == "hard" and M.view(s)["bounced_at"] == T0 + MIN


def test_bounced_change_carries_class():
    _, ch, _ = feed([reg(0), pev("bounced", 3, bounce_class="hard")])
    assert (ch[-1]["to"], ch[-1]["reason"]) == ("bounced", "hard")


def test_provider_events_before_registration_applied_on_registration():
    s, ch, out = feed([pev("opened", 3), pev("clicked", 4), pev("unsubscribed", 6), pev("replied", 7)])
    assert ch == [] and out == []
    assert s["version"] == 4
    s, ch, out = feed([reg(1)], s)
    v = M.view(s)
    assert v["status"] == "unsubscribed" and v["opens"] == 1 and v["clicks"] == 1 and v["replied_at"] == T0 + 7 * MIN
    assert [c["to"] for c in ch] == ["unsubscribed"]
    assert sorted(o["type"] for o in out) == ["outcome.replied", "outcome.settled", "outcome.unsubscribed"]


def test_outcomes_carry_send_identity():
    _, _, out = feed([reg(0, run=2, step_index=1, automation_id="a7", contact_id="c9"), pev("delivered", 1)])
    o = out[0]
    assert o["type"] == "outcome.settled" and o["run"] == 2 and o["step_index"] == 1
    assert o["automation_id"] == "a7" and o["contact_id"] == "c9" and o["message_id"] == "m1"
    assert o["occurred_at"] == T0 + MIN


@pytest.mark.parametrize("kind,cls,reason", [("bounced", "hard", "hard_bounce"), ("bounced", "block", "block"),
                                             ("spam_reported", None, "spam_report")])
def test_bounced_outcome(kind, cls, reason):
    _, _, out = feed([reg(0), pev(kind, 2, bounce_class=cls)])
    bounced = [o for o in out if o["type"] == "outcome.bounced"]
    assert len(bounced) == 1 and bounced[0]["reason"] == reason


def test_soft_bounce_settles_but_does_not_bounce_contact():
    _, _, out = feed([reg(0), pev("bounced", 2, bounce_class="soft")])
    assert [o["type"] for o in out] == ["outcome.settled"]


def test_dropped_settles():
    _, _, out = feed([reg(0), pev("dropped", 2)])
    assert [o["type"] for o in out] == ["outcome.settled"]


def test_auto_reply_outcome_with_return_at():
    ret = T0 + 86_400_000
    s, _, out = feed([reg(0), pev("auto_replied", 2, return_at=ret)])
    assert [(o["type"], o["return_at"]) for o in out] == [("outcome.auto_replied", ret)]
    assert M.view(s)["auto_replied_at"] == T0 + 2 * MIN
    assert M.view(s)["status"] == "sent"  # a flag, not a status


def test_outcomes_not_forwarded_twice_for_later_same_kind_events():
    s, _, out = feed([reg(0), pev("delivered", 2)])
    _, _, out2 = feed([pev("opened", 5)], s)
    assert out2 == []  # settled already at 2; the open at 5 changes nothing for the contact


def test_earlier_fact_reforwards_outcome():
    s, _, _ = feed([reg(0), pev("delivered", 5)])
    _, _, out = feed([pev("delivered", 2, eid="d-early")], s)
    assert [(o["type"], o["occurred_at"]) for o in out] == [("outcome.settled", T0 + 2 * MIN)]


def test_resubscribed_is_flag_only():
    s, _, _ = feed([reg(0), pev("unsubscribed", 2), pev("resubscribed", 3)])
    v = M.view(s)
    assert v["status"] == "unsubscribed" and v["resubscribed_at"] == T0 + 3 * MIN


def test_registration_replay_and_first_kept():
    s, _, _ = feed([reg(0)])
    r = M.apply(s, reg(0))
    assert not r.changed
    r = M.apply(s, reg(0, eid="other", subject="Other"))
    assert M.view(r.state)["subject"] == "Hello"


def test_registration_missing_fields_filled_and_email_from_provider():
    s, _, _ = feed([pev("delivered", 1, email="p@x.io"), reg(0, email=None, name=None)])
    assert M.view(s)["email"] == "p@x.io"
    s, _, _ = feed([reg(0, eid="again", name="Ann")], s)
    assert M.view(s)["name"] == "Ann"


def test_open_count_cap(monkeypatch):
    monkeypatch.setattr(M, "COUNT_CAP", 3)
    s, _, _ = feed([reg(0)] + [pev("opened", i, eid=f"o{i}") for i in range(6)])
    assert M.view(s)["opens"] == 3


def test_version_and_change_ids():
    s, ch, _ = feed([reg(0), pev("delivered", 1, eid="d1")])
    assert M.view(s)["version"] == 2
    _, ch2, _ = feed([reg(0), pev("delivered", 1, eid="d1")])
    assert [c["change_id"] for c in ch] == [c["change_id"] for c in ch2]
    assert M.key_of(pev("delivered", mid="zz")) == "zz"


# A state as the engine stored it before the layout change (``f``: {flag: [at, event_id]}, no ``fe``):
# registered (send1), delivered (d1) and opened (o1).
EARLIER_LAYOUT_STATE = (
    '{"message_id":"m1","send":{"automation_id":"a1","contact_id":"c1","run":0,"step_index":0,"mailing_id":"a1:0",'
    '"subject":"Hello","sending_user":"u9","sending_email":"me@x.io","email":"ann@x.io","name":"Ann",'
    '"channel":"email","at":1767225600000,"event_id":"send1"},"f":{"sent":[1767225600000,"send1"],'
    '"delivered":[1767225660000,"d1"],"opened":[1767225720000,"o1"]},"bounce":{},"auto":null,"opens":{"o1":1},'
    '"clicks":{},"email":"ann@x.io","status":"opened","version":3}')


@pytest.mark.parametrize("tail", [
    [pev("clicked", 3, eid="c1"), pev("delivered", 0, eid="d0"), pev("bounced", 4, eid="b1", bounce_class="hard")],
    [pev("spam_reported", 2, eid="sp"), pev("opened", 2, eid="o0"), pev("auto_replied", 5, eid="a1",
                                                                            return_at=T0 + 99)],
    [reg(0, eid="send0"), pev("unsubscribed", 6, eid="u1"), pev("replied", 7, eid="r1")],
])
def test_state_of_the_earlier_layout_is_converted_when_read(tail):
    fresh, _, _ = feed([reg(0), pev("delivered", 1, eid="d1"), pev("opened", 2, eid="o1")])
    old = orjson.loads(EARLIER_LAYOUT_STATE)
    snapshot = orjson.dumps(old)
    assert M.view(old) == M.view(fresh)
    assert orjson.dumps(old) == snapshot  # a view does not convert
    for e in tail:
        r_old, r_new = M.apply(old, dict(e)), M.apply(fresh, dict(e))
        assert (r_old.changed, r_old.changes, r_old.outcomes) == (r_new.changed, r_new.changes, r_new.outcomes)
        old, fresh = r_old.state, r_new.state
    assert M.view(old) == M.view(fresh)
    assert orjson.dumps(old, option=orjson.OPT_SORT_KEYS) == orjson.dumps(fresh, option=orjson.OPT_SORT_KEYS)


@pytest.mark.parametrize("tail", [
    [pev("clicked", 3, eid="c1"), pev("opened", 4, eid="o2"), pev("bounced", 4, eid="b1", bounce_class="hard")],
    [pev("bounced", 2, eid="b0", bounce_class="soft"), pev("spam_reported", 3, eid="sp")],
])
def test_state_with_its_empty_maps_stored_reads_the_same(tail):
    """States written before bounce/opens/clicks were left out while empty hold them as {}."""
    fresh, _, _ = feed([reg(0), pev("delivered", 1, eid="d1")])
    assert not {"bounce", "opens", "clicks"} & fresh.keys()
    old = orjson.loads(orjson.dumps(dict(fresh, bounce={}, opens={}, clicks={})))
    assert M.view(old) == M.view(fresh)
    for e in tail:
        r_old, r_new = M.apply(old, dict(e)), M.apply(fresh, dict(e))
        assert (r_old.changed, r_old.changes, r_old.outcomes) == (r_new.changed, r_new.changes, r_new.outcomes)
        old, fresh = r_old.state, r_new.state
        assert M.view(old) == M.view(fresh)

def test_change_ids_are_common_change_id():
    """The machine builds change ids inline; they are common.change_id of the change's fields."""
    _, ch, _ = feed([pev("delivered", 1), reg(0), pev("opened", 2), pev("bounced", 3, bounce_class="block")])
    assert len(ch) == 3
    for c in ch:
        assert c["change_id"] == change_id(c["event_id"], c["kind"], c["automation_id"], c["contact_id"], c["run"],
                                           c["step_index"], c["message_id"], c["to"])


def test_outcomes_drive_the_enrollment_machine():
    automation = {"automation_id": "a1", "participation": "once", "steps": [{"index": 0}, {"index": 1}]}
    base = {"schema_version": 1, "automation_id": "a1", "contact_id": "c1"}
    es = E.apply(None, dict(base, event_id="en", type="contact.enrolled", occurred_at=T0, user_id="u", name="Ann",
                            email="ann@x.io", company=None, attributes={}, needs_enrichment=False), automation).state
    r = E.apply(es, dict(base, event_id="sent0", type="step.sent", occurred_at=T0 + MIN, step_index=0, message_id="m1",
                         channel="email", mailing_id=None, subject="Hi", sending_user="u", sending_email="me@x.io",
                         step_details={}, metadata={}), automation)
    es = r.state
    ms = None
    outs = []
    for e in [pev("bounced", 2, bounce_class="hard"), r.registrations[0]]:
        mr = M.apply(ms, e)
        ms = mr.state
        outs.extend(mr.outcomes)
    for o in outs:
        es = E.apply(es, o, automation).state
    v = E.view(es, automation)[0]
    assert (v["status"], v["reason"]) == ("bounced", "hard_bounce")
    # bounced is a hold, not an end: archiving applies, and cancels (the bounce settled the send)
    es = E.apply(es, dict(base, event_id="arch", type="automation.archived", occurred_at=T0 + 9 * MIN), automation).state
    assert (E.view(es, automation)[0]["status"], E.view(es, automation)[0]["reason"]) == (
        "canceled", "automation_archived")


def test_archive_fan_out_applies_to_held_runs():
    automation = {"automation_id": "a1", "participation": "once", "steps": [{"index": 0}, {"index": 1}]}
    base = {"schema_version": 1, "automation_id": "a1", "contact_id": "c1"}
    es = E.apply(None, dict(base, event_id="en", type="contact.enrolled", occurred_at=T0, user_id="u", name="Ann",
                            email="ann@x.io", company=None, attributes={}, needs_enrichment=False), automation).state
    es = E.apply(es, dict(base, event_id="h", type="outcome.bounced", occurred_at=T0 + 1, run=0, step_index=0,
                          message_id="m1", reason="block", return_at=None), automation).state
    es = E.apply(es, dict(base, event_id="arch", type="automation.archived", occurred_at=T0 + 2), automation).state
    assert (E.view(es, automation)[0]["status"], E.view(es, automation)[0]["reason"]) == ("canceled",
                                                                                           "automation_archived")


def _earliest_outcomes(outcomes: list) -> dict:
    """{outcome type: the last forwarded (occurred_at, source event id, reason, return_at)}."""
    last = {}
    for o in outcomes:
        last[o["type"]] = (o["occurred_at"], o["event_id"].split(":", 1)[1], o["reason"], o["return_at"])
    return last


@pytest.mark.parametrize("seed", range(40))
def test_incremental_status_and_outcomes_match_a_full_rederivation(seed):
    """The machine compares only what an event's flag can move; check it against the full derivation.

    Random provider events (duplicates, ties on time, every flag and bounce class) with the registration
    at a random position; after each event the emitted status and forwarded outcomes must agree with the
    state's facts derived from scratch, and replaying the whole stream must change nothing.
    """
    import random

    rnd = random.Random(seed)
    kinds = ["sent", "delivered", "deferred", "opened", "clicked", "bounced", "dropped", "spam_reported",
             "unsubscribed", "resubscribed", "replied", "auto_replied"]
    events = []
    for i in range(rnd.randint(1, 25)):
        kind = rnd.choice(kinds)
        events.append(pev(kind, rnd.randint(0, 6), eid=f"p{rnd.randint(0, 12)}",
                          bounce_class=rnd.choice([None, "hard", "block", "soft"]) if kind == "bounced" else None,
                          return_at=T0 + rnd.randint(0, 99) if kind == "auto_replied" else None,
                          email=rnd.choice([None, "ann@x.io"])))
    events.insert(rnd.randint(0, len(events)), reg(rnd.randint(0, 6)))
    state, status, outcomes = None, None, []
    for e in events:
        r = M.apply(state, e)
        state = r.state
        for c in r.changes:
            assert c["from"] == status
            status = c["to"]
        outcomes.extend(r.outcomes)
        v = M.view(state)
        if v is None:
            assert not r.changes and not r.outcomes
            continue
        assert v["status"] == status
        derived = {}
        flags = {k: (at, state["fe"][k]) for k, at in state["f"].items()}  # flag: (at, event_id)
        settled = [tuple(flags[k]) for k in ("delivered", "bounced", "dropped") if k in flags]
        if settled:
            at, eid = min(settled)
            derived["outcome.settled"] = (at, eid, None, None)
        for name in ("unsubscribed", "replied"):
            if name in flags:
                derived[f"outcome.{name}"] = (flags[name][0], flags[name][1], None, None)
        bounce = state.get("bounce") or {}  # absent while empty
        cands = []
        if "hard" in bounce:
            cands.append((bounce["hard"][0], bounce["hard"][1], "hard_bounce"))
        elif "block" in bounce:
            cands.append((bounce["block"][0], bounce["block"][1], "block"))
        if "spam_reported" in flags:
            cands.append((flags["spam_reported"][0], flags["spam_reported"][1], "spam_report"))
        if cands:
            derived["outcome.bounced"] = (*min(cands, key=lambda c: (c[0], c[1])), None)
        if state["auto"] is not None:
            derived["outcome.auto_replied"] = (state["auto"][0], state["auto"][1], None, state["auto"][2])
        assert _earliest_outcomes(outcomes) == derived
    for e in events:  # replay: nothing new
        r = M.apply(state, e)
        assert not r.changed and not r.changes and not r.outcomes
