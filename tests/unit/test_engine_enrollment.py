"""Enrollment machine: every status, reason and transition of docs/semantics.md from short sequences."""
from __future__ import annotations

import itertools

import orjson
import pytest

from streams.engine import enrollment as E
from streams.engine.common import change_id

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MIN = 60_000
DAY = 86_400_000

ONCE = {"automation_id": "a1", "name": "Seq", "participation": "once",
        "steps": [{"index": 0, "name": "s0", "kind": "email", "day": 0},
                  {"index": 1, "name": "s1", "kind": "email", "day": 2},
                  {"index": 2, "name": "s2", "kind": "email", "day": 5}]}
UNLIMITED = dict(ONCE, participation="unlimited")

_ids = itertools.count()


def ev(etype: str, at: int = 0, eid: str | None = None, aid: str = "a1", cid: str = "c1", **fields) -> dict:
    """A parsed event: absolute ms when ``at`` is large, else minutes after T0."""
    d = {"event_id": eid or f"ev{next(_ids)}", "type": etype,
         "occurred_at": at if at > 10**11 else T0 + at * MIN, "schema_version": 1,
         "automation_id": aid, "contact_id": cid}
    if etype == "contact.enrolled":
        d.update(user_id="u1", name="Ann", email="ann@x.io", company=None, attributes={}, needs_enrichment=False)
    if etype.startswith("step."):
        d.update(step_index=0, reason=None, due_at=None)
    if etype == "step.sent":
        d.update(message_id=f"m{next(_ids)}", channel="email", mailing_id=None, subject="Hi",
                 sending_user="u9", sending_email="me@x.io", step_details={"day": 0, "inactive_days": 0},
                 metadata={})
    if etype in ("contact.paused",):
        d.update(reason="manual", resume_at=None)
    if etype.startswith("contact.") and "reason" not in d:
        d["reason"] = None
    if etype.startswith("outcome."):
        d.update(run=0, step_index=0, message_id="m0", reason=None, return_at=None)
    d.update(fields)
    return d


def run_seq(events, automation=ONCE, state=None, now_ms=None):
    changes, regs = [], []
    for e in events:
        r = E.apply(state, e, automation, now_ms)
        state = r.state
        changes.extend(r.changes)
        regs.extend(r.registrations)
    return state, changes, regs


def status(state, automation=ONCE, run=-1):
    v = E.view(state, automation)[run]
    return v["status"], v["reason"]


def nodes(state, automation=ONCE, run=-1):
    return {n["step_index"]: n["state"] for n in E.view(state, automation)[run]["nodes"]}


def enrolled(**kw):
    return ev("contact.enrolled", 0, **kw)


# --------------------------------------------------------------------------- basic statuses

def test_ready_on_enrollment_without_enrichment():
    s, ch, _ = run_seq([enrolled()])
    assert status(s) == ("ready", None)
    assert nodes(s) == {0: "waiting"}
    assert [(c["kind"], c["from"], c["to"]) for c in ch] == [("contact_status", None, "ready"),
                                                            ("node_state", None, "waiting")]
    v = E.view(s, ONCE)[0]
    assert v["current_step"] == 0 and v["run"] == 0 and v["enrolled_at"] == T0
    assert v["name"] == "Ann" and v["email"] == "ann@x.io" and v["user_id"] == "u1"


def test_waiting_enrichment_then_ready_then_in_progress():
    s, _, _ = run_seq([enrolled(needs_enrichment=True)])
    assert status(s) == ("waiting_enrichment", None)
    assert nodes(s) == {0: "waiting"}
    s, ch, _ = run_seq([ev("contact.enriched", 1)], state=s)
    assert status(s) == ("ready", None)
    assert [(c["from"], c["to"]) for c in ch] == [("waiting_enrichment", "ready")]
    s, ch, _ = run_seq([ev("step.scheduled", 2, due_at=T0)], state=s)
    assert status(s) == ("in_progress", None)
    assert [(c["from"], c["to"]) for c in ch] == [("ready", "in_progress")]


def test_step_events_while_waiting_enrichment_stay_waiting_enrichment():
    s, _, _ = run_seq([enrolled(needs_enrichment=True), ev("step.scheduled", 1)])
    assert status(s) == ("waiting_enrichment", None)


def test_enrichment_failure_is_failed():
    s, ch, _ = run_seq([enrolled(needs_enrichment=True), ev("contact.enrichment_failed", 1, reason="no_email")])
    assert status(s) == ("failed", "no_email")
    assert nodes(s) == {0: "stopped"}
    assert ch[-2]["reason"] == "no_email" and ch[-2]["to"] == "failed"


@pytest.mark.parametrize("kind,expected", [("active", "active_limit"), ("coworkers", "coworkers_limit")])
def test_limits_and_release(kind, expected):
    s, _, _ = run_seq([enrolled(), ev("contact.limit_reached", 1, limit=kind)])
    assert status(s) == (expected, None)
    assert nodes(s) == {0: "waiting"}
    s, _, _ = run_seq([ev("contact.limit_released", 2)], state=s)
    assert status(s) == ("ready", None)
    s, _, _ = run_seq([ev("step.scheduled", 3), ev("contact.limit_reached", 4, limit=kind)], state=s)
    assert status(s) == (expected, None)
    s, _, _ = run_seq([ev("contact.limit_released", 5)], state=s)
    assert status(s) == ("in_progress", None)


def test_limit_latest_wins_out_of_order():
    s, _, _ = run_seq([enrolled(), ev("contact.limit_released", 5), ev("contact.limit_reached", 3, limit="active")])
    assert status(s) == ("ready", None)


def test_waiting_enrichment_precedes_limit():
    s, _, _ = run_seq([enrolled(needs_enrichment=True), ev("contact.limit_reached", 1, limit="active")])
    assert status(s) == ("waiting_enrichment", None)


# --------------------------------------------------------------------------- holds

def test_manual_pause_until_resumed():
    s, _, _ = run_seq([enrolled(), ev("step.sent", 1), ev("contact.paused", 2, reason="manual")])
    assert status(s) == ("paused", "manual")
    assert nodes(s) == {0: "done", 1: "waiting"}  # paused counts as waiting
    s, _, _ = run_seq([ev("contact.paused", 3 + 10 * DAY // MIN, eid="late")], state=s, now_ms=T0 + 100 * DAY)
    assert status(s) == ("paused", "manual")  # no resume_at: stays paused whatever the time
    s, ch, _ = run_seq([ev("contact.resumed", 20 * DAY // MIN)], state=s)
    assert status(s) == ("in_progress", None)
    assert [(c["from"], c["to"]) for c in ch if c["kind"] == "contact_status"] == [("paused", "in_progress")]


def test_resume_before_pause_by_time_does_not_resume():
    s, _, _ = run_seq([enrolled(), ev("contact.resumed", 5), ev("contact.paused", 3)])
    assert status(s) == ("ready", None)
    s, _, _ = run_seq([enrolled(), ev("contact.paused", 3), ev("contact.resumed", 5)])
    assert status(s) == ("ready", None)


def test_out_of_office_pause_auto_resumes_via_tick():
    resume = T0 + 2 * DAY
    s, _, _ = run_seq([enrolled(), ev("step.sent", 1),
                       ev("contact.paused", 2, eid="p1", reason="out_of_office", resume_at=resume)])
    assert status(s) == ("paused", "out_of_office")
    assert E.next_resume_at(s) == resume
    r = E.tick(s, ONCE, resume - 1)
    assert not r.changed and r.changes == []
    assert status(r.state) == ("paused", "out_of_office")
    r = E.tick(r.state, ONCE, resume)
    assert r.changed
    assert status(r.state) == ("in_progress", None)
    sc = [c for c in r.changes if c["kind"] == "contact_status"]
    assert [(c["from"], c["to"], c["event_id"], c["occurred_at"], c["event_type"]) for c in sc] == [
        ("paused", "in_progress", "auto:p1", resume, E.AUTO_RESUME_TYPE)]
    assert E.next_resume_at(r.state) is None
    assert E.view(r.state, ONCE)[0]["status_at"] == resume
    again = E.tick(r.state, ONCE, resume + DAY)
    assert not again.changed and again.changes == []


def test_out_of_office_auto_resumes_via_later_event():
    resume = T0 + DAY
    s, _, _ = run_seq([enrolled(), ev("step.sent", 1),
                       ev("outcome.auto_replied", 2, eid="ar", return_at=resume)])
    assert status(s) == ("paused", "out_of_office")
    s, ch, _ = run_seq([ev("contact.limit_released", resume + 5)], state=s)
    assert status(s) == ("in_progress", None)
    sc = [c for c in ch if c["kind"] == "contact_status"]
    assert sc[0]["from"] == "paused" and sc[0]["to"] == "in_progress" and sc[0]["event_id"] == "auto:ar"


def test_out_of_office_auto_resumes_via_now_ms():
    resume = T0 + DAY
    s, _, _ = run_seq([enrolled(), ev("contact.paused", 2, reason="out_of_office", resume_at=resume)])
    s, _, _ = run_seq([ev("contact.enriched", 3)], state=s, now_ms=resume)
    assert status(s) == ("ready", None)


def test_auto_reply_without_return_date_paused_until_resumed():
    s, _, _ = run_seq([enrolled(), ev("step.sent", 1), ev("outcome.auto_replied", 2, return_at=None)])
    assert status(s) == ("paused", "out_of_office")
    assert E.next_resume_at(s) is None
    r = E.tick(s, ONCE, T0 + 365 * DAY)
    assert not r.changed and status(r.state) == ("paused", "out_of_office")
    s, _, _ = run_seq([ev("contact.resumed", 3)], state=r.state)
    assert status(s) == ("in_progress", None)


def test_manual_pause_during_out_of_office_is_not_auto_resumed():
    # Decision: only the latest hold decides; its resume_at (none here) governs.
    resume = T0 + DAY
    evs = [enrolled(), ev("outcome.auto_replied", 1, return_at=resume), ev("contact.paused", 2, reason="manual")]
    s, _, _ = run_seq(evs + [ev("contact.enriched", resume + MIN)])
    assert status(s) == ("paused", "manual")
    s2, _, _ = run_seq([evs[0], evs[2], ev("contact.enriched", resume + MIN), evs[1]])
    assert status(s2) == ("paused", "manual")


def test_not_sent_waits_for_resume():
    s, ch, _ = run_seq([enrolled(), ev("step.sent", 1, step_index=0),
                        ev("step.not_sent", 2, step_index=1, reason="do_not_contact_stage")])
    assert status(s) == ("not_sent", "do_not_contact_stage")
    assert nodes(s) == {0: "done", 1: "stopped"}
    node_ch = [c for c in ch if c["kind"] == "node_state"][-1]
    assert (node_ch["from"], node_ch["to"], node_ch["reason"]) == ("waiting", "stopped", "do_not_contact_stage")
    s, ch, _ = run_seq([ev("contact.resumed", 3)], state=s)
    assert status(s) == ("in_progress", None)
    assert nodes(s) == {0: "done", 1: "waiting"}
    assert [(c["kind"], c["from"], c["to"]) for c in ch] == [("contact_status", "not_sent", "in_progress"),
                                                            ("node_state", "stopped", "waiting")]


@pytest.mark.parametrize("reason", ["hard_bounce", "block", "spam_report"])
def test_bounced_reasons_and_resume(reason):
    s, _, _ = run_seq([enrolled(), ev("step.sent", 1, message_id="m0"),
                       ev("outcome.bounced", 2, reason=reason)])
    assert status(s) == ("bounced", reason)
    assert nodes(s) == {0: "done", 1: "stopped"}
    s, _, _ = run_seq([ev("contact.resumed", 3)], state=s)
    assert status(s) == ("in_progress", None)
    assert nodes(s) == {0: "done", 1: "waiting"}


def test_bounce_on_last_step_then_resume_is_completed():
    s, _, _ = run_seq([enrolled()] + [ev("step.sent", i + 1, step_index=i, message_id=f"m{i}") for i in range(3)])
    assert status(s) == ("finished", "completed")
    s, _, _ = run_seq([ev("outcome.bounced", 9, step_index=2, message_id="m2", reason="hard_bounce")], state=s)
    assert status(s) == ("bounced", "hard_bounce")
    s, _, _ = run_seq([ev("contact.resumed", 10)], state=s)
    assert status(s) == ("finished", "completed")


# --------------------------------------------------------------------------- terminals

def _complete(n=3):
    return [enrolled()] + [ev("step.sent", i + 1, step_index=i) for i in range(n)]


def test_finished_completed_when_last_step_done():
    s, ch, _ = run_seq(_complete())
    assert status(s) == ("finished", "completed")
    assert nodes(s) == {0: "done", 1: "done", 2: "done"}
    v = E.view(s, ONCE)[0]
    assert v["current_step"] == -1
    assert ch[-2]["to"] == "finished" and ch[-2]["reason"] == "completed"
    assert (ch[-1]["step_index"], ch[-1]["from"], ch[-1]["to"]) == (2, "waiting", "done")


def test_completed_not_derived_without_automation_then_derived_with_it():
    s, _, _ = run_seq(_complete(), automation=None)
    assert status(s, None) == ("in_progress", None)
    assert status(s, ONCE) == ("finished", "completed")
    s, ch, _ = run_seq([ev("contact.enriched", 10)], state=s)  # next touch catches up
    assert ("in_progress", "finished") in [(c["from"], c["to"]) for c in ch]


def test_finished_replied_from_outcome():
    s, _, _ = run_seq([enrolled(), ev("step.sent", 1, message_id="m0"), ev("outcome.replied", 2)])
    assert status(s) == ("finished", "replied")
    assert nodes(s) == {0: "done", 1: "stopped"}


@pytest.mark.parametrize("reason", ["meeting_booked", "manual", "replied"])
def test_finished_by_contact_event(reason):
    s, _, _ = run_seq([enrolled(), ev("contact.finished", 1, reason=reason)])
    assert status(s) == ("finished", reason)
    assert nodes(s) == {0: "stopped"}


def test_finished_filtered_marks_node_filtered():
    s, ch, _ = run_seq([enrolled(), ev("step.sent", 1, step_index=0),
                        ev("step.filtered", 2, step_index=1, reason="condition_false")])
    assert status(s) == ("finished", "filtered")
    assert nodes(s) == {0: "done", 1: "filtered"}
    v = E.view(s, ONCE)[0]
    assert v["current_step"] == -1
    assert (ch[-1]["step_index"], ch[-1]["from"], ch[-1]["to"]) == (1, "waiting", "filtered")


@pytest.mark.parametrize("etype,reason,expected", [
    ("contact.canceled", "manual", ("canceled", "manual")),
    ("contact.canceled", "sender_deleted", ("canceled", "sender_deleted")),
    ("contact.removed", None, ("canceled", "removed")),
    ("contact.failed", "linkedin_error", ("failed", "linkedin_error")),
    ("contact.duplicate", None, ("duplicate", "duplicate")),
])
def test_terminal_contact_events(etype, reason, expected):
    s, _, _ = run_seq([enrolled(), ev("step.sent", 1), ev(etype, 2, reason=reason)])
    assert status(s) == expected
    assert nodes(s) == {0: "done", 1: "stopped"}


def test_step_failed():
    s, _, _ = run_seq([enrolled(), ev("step.failed", 1, step_index=0, reason="no_email")])
    assert status(s) == ("failed", "no_email")
    assert nodes(s) == {0: "stopped"}


def test_unsubscribed_from_outcome():
    s, _, _ = run_seq([enrolled(), ev("step.sent", 1, message_id="m0"), ev("outcome.unsubscribed", 2)])
    assert status(s) == ("unsubscribed", "unsubscribed")


def test_earliest_terminal_wins_even_when_late():
    s, _, _ = run_seq([enrolled(), ev("contact.canceled", 5, reason="manual"), ev("outcome.replied", 3)])
    assert status(s) == ("finished", "replied")
    s, ch, _ = run_seq([ev("contact.failed", 9, reason="x")], state=s)
    assert status(s) == ("finished", "replied")
    assert ch == []


def test_terminal_beats_hold_and_resume_does_not_reopen():
    s, _, _ = run_seq([enrolled(), ev("contact.paused", 1), ev("contact.finished", 2, reason="manual"),
                       ev("contact.resumed", 3)])
    assert status(s) == ("finished", "manual")


# --------------------------------------------------------------------------- fan-outs

def test_automation_paused_and_resumed_fan_out():
    s, _, _ = run_seq([enrolled(), ev("step.sent", 1)])
    s, ch, _ = run_seq([ev("automation.paused", 2, cid=None)], state=s)
    assert status(s) == ("paused", "automation_paused")
    assert ch[0]["to"] == "paused" and ch[0]["reason"] == "automation_paused"
    s, _, _ = run_seq([ev("automation.resumed", 3, cid=None)], state=s)
    assert status(s) == ("in_progress", None)


HOLDS = {
    "out_of_office": (ev("outcome.auto_replied", 2, eid="h", message_id="m0"), ("paused", "out_of_office")),
    "bounce": (ev("outcome.bounced", 2, eid="h", message_id="m0", reason="hard_bounce"), ("bounced", "hard_bounce")),
    "manual pause": (ev("contact.paused", 2, eid="h", reason="vacation"), ("paused", "vacation")),
    "not sent": (ev("step.not_sent", 2, eid="h", step_index=1, reason="no_email"), ("not_sent", "no_email")),
}


@pytest.mark.parametrize("hold", list(HOLDS))
@pytest.mark.parametrize("order", ["hold first", "pause first"])
def test_resuming_the_automation_leaves_the_contacts_own_hold(hold, order):
    """Seed 004: the master switch pauses the contacts until it is flipped back on; a contact held
    for its own reason (out of office, bounce, manual pause, not sent) stays held after that."""
    held_event, held = HOLDS[hold]
    pause = ev("automation.paused", 1 if order == "pause first" else 3, eid="ap", cid=None)
    resume = ev("automation.resumed", 4, eid="ar", cid=None)
    s, _, _ = run_seq([enrolled(), ev("step.sent", 1, message_id="m0")])
    for events in itertools.permutations([dict(held_event), dict(pause)]):
        t, _, _ = run_seq(events, state=orjson.loads(orjson.dumps(s)))
        # while both hold the contact, the later one shows
        assert status(t) == (held if order == "pause first" else ("paused", "automation_paused"))
        t, ch, _ = run_seq([dict(resume)], state=t)
        assert status(t) == held
        assert [(c["from"], c["to"], c["reason"]) for c in ch if c["kind"] == "contact_status"] == (
            [] if order == "pause first" else [("paused", held[0], held[1])])
        t, _, _ = run_seq([ev("contact.resumed", 5)], state=t)
        assert status(t) == ("in_progress", None)


def test_resuming_the_contact_does_not_end_the_automations_pause():
    s, _, _ = run_seq([enrolled(), ev("step.sent", 1), ev("automation.paused", 2, cid=None),
                       ev("contact.resumed", 3)])
    assert status(s) == ("paused", "automation_paused")
    s, ch, _ = run_seq([ev("automation.resumed", 4, cid=None)], state=s)
    assert status(s) == ("in_progress", None)
    assert E.view(s, ONCE)[0]["status_at"] == T0 + 4 * MIN
    assert [(c["from"], c["to"]) for c in ch if c["kind"] == "contact_status"] == [("paused", "in_progress")]


def test_view_gives_the_date_a_held_run_resumes_by_itself():
    back = T0 + 2 * DAY
    s, _, _ = run_seq([enrolled(), ev("step.sent", 1, message_id="m0"),
                       ev("outcome.auto_replied", 2, message_id="m0", return_at=back)])
    assert E.view(s, ONCE)[0]["resume_at"] == back
    s, _, _ = run_seq([ev("automation.paused", 3, cid=None)], state=s)
    assert E.view(s, ONCE)[0]["resume_at"] is None  # paused until the automation is resumed
    s, _, _ = run_seq([ev("automation.resumed", 4, cid=None)], state=s)
    assert E.view(s, ONCE)[0]["resume_at"] == back
    r = E.tick(s, ONCE, back)
    assert status(r.state) == ("in_progress", None) and E.view(r.state, ONCE)[0]["resume_at"] is None
    s, _, _ = run_seq([enrolled(), ev("contact.paused", 1, reason="manual")])
    assert E.view(s, ONCE)[0]["resume_at"] is None  # until resumed by hand


def test_out_of_office_return_date_passing_during_the_automations_pause():
    back = T0 + 2 * DAY
    s, _, _ = run_seq([enrolled(), ev("step.sent", 1, message_id="m0"),
                       ev("outcome.auto_replied", 2, message_id="m0", return_at=back),
                       ev("automation.paused", 3, cid=None)])
    assert status(s) == ("paused", "automation_paused") and E.next_resume_at(s) == back
    r = E.tick(s, ONCE, back + 1)
    assert r.changes == [] and status(r.state) == ("paused", "automation_paused")
    s, _, _ = run_seq([ev("automation.resumed", back + 5 * MIN, cid=None)], state=r.state)
    assert status(s) == ("in_progress", None)


def test_automation_pause_kept_as_a_hold_by_earlier_states_is_released_by_the_automations_resume():
    """Before the automation's pause was a fact of its own, the fan-out stored it as the run's hold
    (reason automation_paused); a resume of the automation processed after the upgrade releases it."""
    legacy = [enrolled(), ev("step.sent", 1), ev("contact.paused", 2, eid="ap", reason="automation_paused")]
    s, _, _ = run_seq(legacy)
    assert s["runs"][0]["hold"][3] == "automation_paused" and "ap" not in s["runs"][0]
    assert status(s) == ("paused", "automation_paused")
    t, ch, _ = run_seq([ev("automation.resumed", 3, cid=None)], state=orjson.loads(orjson.dumps(s)))
    assert status(t) == ("in_progress", None) and E.view(t, ONCE)[0]["status_at"] == T0 + 3 * MIN
    assert [(c["from"], c["to"]) for c in ch if c["kind"] == "contact_status"] == [("paused", "in_progress")]
    t, _, _ = run_seq([ev("automation.resumed", 1, cid=None)], state=orjson.loads(orjson.dumps(s)))
    assert status(t) == ("paused", "automation_paused")  # a resume before the pause releases nothing


def test_a_contact_enrolled_while_the_automation_is_paused_is_paused_until_it_is_resumed():
    """The definition the worker passes says since when the automation is paused: runs whose events
    come after the fan-out (enrolled during the pause, or reordered past it) are paused too."""
    paused = dict(ONCE, paused_at=T0 + 1 * MIN)
    s, ch, _ = run_seq([enrolled()], automation=paused)
    assert status(s, paused) == ("paused", "automation_paused")
    assert E.view(s, paused)[0]["status_at"] == T0 + 1 * MIN
    assert [(c["to"], c["reason"]) for c in ch if c["kind"] == "contact_status"] == [("paused", "automation_paused")]
    # the resume fan-out reaches the run; the definition no longer says paused
    s, ch, _ = run_seq([ev("automation.resumed", 4, cid=None)], automation=ONCE, state=s)
    assert status(s) == ("ready", None)
    assert E.view(s, ONCE)[0]["status_at"] == T0 + 4 * MIN  # ready since the resume
    assert [(c["from"], c["to"]) for c in ch if c["kind"] == "contact_status"] == [("paused", "ready")]
    # a contact's own hold still shows when it is later than the pause, and after the resume
    s, _, _ = run_seq([enrolled(), ev("step.sent", 1, message_id="m0"),
                       ev("outcome.bounced", 2, message_id="m0", reason="block")], automation=paused)
    assert status(s, paused) == ("bounced", "block")
    assert status(s, ONCE) == ("bounced", "block")


def test_a_run_that_completed_its_steps_is_not_paused_by_the_definition():
    paused = dict(ONCE, paused_at=T0 + 9 * MIN)
    done = [enrolled()] + [ev("step.sent", 1 + k, step_index=k) for k in range(3)]
    s, _, _ = run_seq(done, automation=paused)
    assert status(s, paused) == ("finished", "completed")
    s, _, _ = run_seq([ev("automation.resumed", 12, cid=None)], state=s)  # the resume reaches it
    assert status(s) == ("finished", "completed")
    assert E.view(s, ONCE)[0]["status_at"] == T0 + 3 * MIN  # completed with its last step, not resumed
    s, _, _ = run_seq(done[:2], automation=paused)
    assert status(s, paused) == ("paused", "automation_paused")


def test_fan_out_skips_ended_runs():
    s, _, _ = run_seq([enrolled(), ev("contact.finished", 1, reason="manual")])
    for t in ("automation.paused", "automation.archived"):
        e = ev(t, 2)
        r = E.apply(s, e, ONCE)
        assert r.changes == [] and r.state["runs"][0]["hold"] is None
        assert r.state["runs"][0]["terminal"][2] == "finished"
        assert not E.apply(r.state, e, ONCE).changed  # replay
    assert status(s) == ("finished", "manual")


def test_fan_out_replay_does_not_reach_a_later_run():
    s, _, _ = run_seq([enrolled(eid="en1"), ev("automation.paused", 1, eid="ap")], automation=UNLIMITED)
    s, _, _ = run_seq([ev("contact.finished", 2, reason="manual"), ev("contact.enrolled", 3, eid="en2")],
                      automation=UNLIMITED, state=s)
    r = E.apply(s, ev("automation.paused", 1, eid="ap"), UNLIMITED)
    assert not r.changed and r.changes == []
    assert status(r.state, UNLIMITED, 1) == ("ready", None)


def test_late_step_event_of_older_run_stays_in_that_run():
    s, _, _ = run_seq([enrolled(eid="en1"), ev("contact.finished", 5, reason="manual"),
                       ev("contact.enrolled", 10, eid="en2"), ev("step.sent", 3, step_index=0)],
                      automation=UNLIMITED)
    assert nodes(s, UNLIMITED, 0) == {0: "done", 1: "stopped"}
    assert nodes(s, UNLIMITED, 1) == {0: "waiting"}


def test_fan_out_on_unseen_key_creates_no_run_and_is_remembered():
    e = ev("automation.paused", 1)
    r = E.apply(None, e, ONCE)
    assert r.changes == [] and r.state["runs"] == [] and E.view(r.state, ONCE) == []
    s, _, _ = run_seq([enrolled()], state=r.state)
    assert status(s) == ("ready", None)
    r = E.apply(s, e, ONCE)  # replayed after the run exists: still nothing
    assert not r.changed and status(r.state) == ("ready", None)


def test_archived_cancels_waiting_contact():
    s, _, _ = run_seq([enrolled(), ev("automation.archived", 1)])
    assert status(s) == ("canceled", "automation_archived")


def test_archived_fails_contact_with_step_in_flight_and_cancels_once_settled():
    base = [enrolled(), ev("step.sent", 1, message_id="m0")]
    s, _, _ = run_seq(base + [ev("automation.archived", 2)])
    assert status(s) == ("failed", "automation_archived")
    s, _, _ = run_seq(base + [ev("outcome.settled", 2, message_id="m0"), ev("automation.archived", 3)])
    assert status(s) == ("canceled", "automation_archived")


def test_archived_does_not_touch_paused_contact_differently():
    s, _, _ = run_seq([enrolled(), ev("contact.paused", 1), ev("automation.archived", 2)])
    assert status(s) == ("canceled", "automation_archived")


# --------------------------------------------------------------------------- runs and participation

def test_once_reenrollment_is_ignored_and_counted():
    s, _, _ = run_seq([enrolled(eid="en1"), ev("contact.finished", 1, reason="manual")])
    r = E.apply(s, ev("contact.enrolled", 5, eid="en2"), ONCE)
    assert r.changed and r.changes == []
    views = E.view(r.state, ONCE)
    assert len(views) == 1 and views[0]["ignored_enrollments"] == 1
    again = E.apply(r.state, ev("contact.enrolled", 5, eid="en2"), ONCE)
    assert not again.changed and E.view(again.state, ONCE)[0]["ignored_enrollments"] == 1
    replay = E.apply(again.state, enrolled(eid="en1"), ONCE)
    assert not replay.changed


def test_unlimited_reenrollment_while_open_is_ignored():
    s, _, _ = run_seq([enrolled(eid="en1"), ev("contact.enrolled", 1, eid="en2")], automation=UNLIMITED)
    views = E.view(s, UNLIMITED)
    assert len(views) == 1 and views[0]["ignored_enrollments"] == 1


def test_unlimited_reenrollment_after_end_starts_new_run():
    s, _, _ = run_seq(_complete(), automation=UNLIMITED)
    s, ch, _ = run_seq([ev("contact.enrolled", 100, eid="en2", name="Ann B")], automation=UNLIMITED, state=s)
    views = E.view(s, UNLIMITED)
    assert [v["run"] for v in views] == [0, 1]
    assert views[0]["status"] == "finished" and views[1]["status"] == "ready"
    assert views[1]["name"] == "Ann B" and views[1]["nodes"] == [{"step_index": 0, "state": "waiting", "at": T0 + 100 * MIN}]
    assert [(c["run"], c["to"]) for c in ch] == [(1, "ready"), (1, "waiting")]
    # contact/step events go to the latest run
    s, _, _ = run_seq([ev("step.sent", 101, step_index=0)], automation=UNLIMITED, state=s)
    assert nodes(s, UNLIMITED, 1) == {0: "done", 1: "waiting"}
    assert nodes(s, UNLIMITED, 0) == {0: "done", 1: "done", 2: "done"}


def test_unknown_automation_reenrollment_is_ignored():
    s, _, _ = run_seq([enrolled(eid="en1"), ev("contact.finished", 1, reason="manual"),
                       ev("contact.enrolled", 2, eid="en2")], automation=None)
    assert len(s["runs"]) == 1 and len(s["ignored"]) == 1


def test_ignored_enrollments_capped():
    s, _, _ = run_seq([enrolled(eid="en0")])
    for i in range(E.IGNORED_CAP + 5):
        s = E.apply(s, ev("contact.enrolled", 1, eid=f"x{i}"), ONCE).state
    assert E.view(s, ONCE)[0]["ignored_enrollments"] == E.IGNORED_CAP


def test_outcome_for_old_run_applies_to_that_run():
    s, _, _ = run_seq([enrolled(eid="en1"), ev("step.sent", 1, message_id="mA"),
                       ev("contact.finished", 2, reason="manual"), ev("contact.enrolled", 3, eid="en2")],
                      automation=UNLIMITED)
    s, _, _ = run_seq([ev("outcome.bounced", 4, run=1, message_id="mB", reason="block"),
                       ev("outcome.replied", 1 + 0, run=0, message_id="mA")], automation=UNLIMITED, state=s)
    assert status(s, UNLIMITED, 0) == ("finished", "replied")
    assert status(s, UNLIMITED, 1) == ("bounced", "block")


def test_events_before_enrollment_create_run_zero_and_enrollment_fills_it():
    s, _, _ = run_seq([ev("step.sent", 2, step_index=0), enrolled(eid="en1")])
    views = E.view(s, ONCE)
    assert len(views) == 1 and views[0]["enrolled_at"] == T0 and views[0]["name"] == "Ann"
    assert views[0]["status"] == "in_progress"


def test_outcome_before_run_exists_is_kept_and_applied():
    r = E.apply(None, ev("outcome.unsubscribed", 5, run=0), ONCE)
    assert r.changed and E.view(r.state, ONCE) == []
    s, _, _ = run_seq([enrolled()], state=r.state)
    assert status(s) == ("unsubscribed", "unsubscribed")
    assert s["orphans"] == []


# --------------------------------------------------------------------------- nodes, sends, registrations

def test_node_moves_emit_leave_and_enter():
    s, _, _ = run_seq([enrolled(), ev("step.sent", 1, step_index=0)])
    s, ch, regs = run_seq([ev("step.sent", 2, step_index=1, message_id="m1")], state=s)
    assert [(c["kind"], c["step_index"], c["from"], c["to"]) for c in ch] == [
        ("node_state", 1, "waiting", "done"), ("node_state", 2, None, "waiting")]
    assert len(regs) == 1 and regs[0]["message_id"] == "m1" and regs[0]["run"] == 0


def test_bounced_stops_current_node_and_resume_makes_it_waiting():
    s, _, _ = run_seq([enrolled(), ev("step.sent", 1, step_index=0, message_id="m0")])
    s, ch, _ = run_seq([ev("outcome.bounced", 2, message_id="m0", reason="hard_bounce")], state=s)
    assert [(c["kind"], c["step_index"], c["from"], c["to"], c["reason"]) for c in ch] == [
        ("contact_status", None, "in_progress", "bounced", "hard_bounce"),
        ("node_state", 1, "waiting", "stopped", "hard_bounce")]


def test_duplicate_sends_recorded_node_done_once():
    s, _, _ = run_seq([enrolled()])
    s, ch1, regs1 = run_seq([ev("step.sent", 1, step_index=0, message_id="mA")], state=s)
    s, ch2, regs2 = run_seq([ev("step.sent", 2, step_index=0, message_id="mB")], state=s)
    assert set(s["runs"][0]["sends"]) == {"mA", "mB"}
    assert [r["message_id"] for r in regs1 + regs2] == ["mA", "mB"]
    assert ch2 == []  # node 0 already done: nothing changes visibly
    assert nodes(s) == {0: "done", 1: "waiting"}
    assert E.view(s, ONCE)[0]["nodes"][0]["at"] == T0 + MIN


def test_a_step_sent_twice_in_a_run_is_named_a_repeat():
    s, _, _ = run_seq([enrolled()])
    first = ev("step.sent", 1, step_index=0, message_id="mA")
    r = E.apply(s, first, ONCE)
    assert r.repeats == ()
    r = E.apply(r.state, dict(first, event_id="again"), ONCE)  # the same message reported again
    assert r.repeats == ()
    r = E.apply(r.state, ev("step.sent", 2, step_index=1, message_id="mB"), ONCE)  # another step
    assert r.repeats == ()
    r = E.apply(r.state, ev("step.sent", 3, step_index=0, message_id="mC"), ONCE)  # step 0 again
    assert r.repeats == [(0, 0, ["mA", "mC"], False)]
    r = E.apply(r.state, ev("step.sent", 4, step_index=0, message_id="mD"), ONCE)  # and a third time
    assert r.repeats == [(0, 0, ["mA", "mC", "mD"], False)]
    # an earlier report of mB says step 2: mB's step changes; both steps are named for verification
    # (the recipients keep mB at step 1, its first row; a message registered at 2 would see mB there)
    r = E.apply(r.state, ev("step.sent", 0, step_index=2, message_id="mB"), ONCE)
    assert r.repeats == [(0, 1, (), True), (0, 2, (), True)] and r.state["runs"][0]["sends"]["mB"] == 2
    r = E.apply(r.state, ev("step.sent", 5, step_index=2, message_id="mE"), ONCE)
    assert r.repeats == [(0, 2, ["mB", "mE"], False)] and len(r.registrations) == 1


def test_registration_fields():
    s, _, regs = run_seq([enrolled(), ev("step.sent", 1, eid="sx", step_index=1, message_id="mZ", subject="S",
                                         sending_user="u9", sending_email="me@x.io", channel="email")])
    assert regs == [{"event_id": "sx", "type": "message.registered", "occurred_at": T0 + MIN, "schema_version": 1,
                     "message_id": "mZ", "automation_id": "a1", "contact_id": "c1", "run": 0, "step_index": 1,
                     "mailing_id": "a1:1", "subject": "S", "sending_user": "u9", "sending_email": "me@x.io",
                     "email": "ann@x.io", "name": "Ann", "channel": "email"}]
    r = E.apply(s, ev("step.sent", 1, eid="sx", step_index=1, message_id="mZ"), ONCE)
    assert r.registrations == [] and not r.changed


def test_out_of_order_steps_current_node_after_highest_done():
    s, _, _ = run_seq([enrolled(), ev("step.sent", 2, step_index=1)])
    assert nodes(s) == {1: "done", 2: "waiting"}
    s, ch, _ = run_seq([ev("step.sent", 1, step_index=0)], state=s)
    assert nodes(s) == {0: "done", 1: "done", 2: "waiting"}
    assert [(c["step_index"], c["from"], c["to"]) for c in ch if c["kind"] == "node_state"] == [(0, None, "done")]


# --------------------------------------------------------------------------- change ids, versions, replay, keys

def test_change_fields_and_ids_are_stable():
    e = enrolled(eid="stable")
    r1 = E.apply(None, e, ONCE)
    r2 = E.apply(None, dict(e), ONCE)
    assert [c["change_id"] for c in r1.changes] == [c["change_id"] for c in r2.changes]
    assert len({c["change_id"] for c in r1.changes}) == len(r1.changes)
    for c in r1.changes:
        assert set(c) == {"kind", "automation_id", "contact_id", "run", "step_index", "message_id", "from", "to",
                          "reason", "event_id", "event_type", "occurred_at", "change_id"}
        assert c["event_id"] == "stable" and c["event_type"] == "contact.enrolled" and c["occurred_at"] == T0
        assert len(c["change_id"]) == 32 and int(c["change_id"], 16) >= 0


def test_version_grows_on_change_only_and_replay_is_noop():
    events = [enrolled(), ev("step.sent", 1), ev("contact.paused", 2), ev("contact.resumed", 3)]
    s, _, _ = run_seq(events)
    v = E.view(s, ONCE)[0]["version"]
    assert v == 4
    snapshot = orjson.loads(orjson.dumps(s))
    for e in events:
        r = E.apply(s, e, ONCE)
        assert not r.changed and r.changes == [] and r.registrations == []
    assert orjson.loads(orjson.dumps(s)) == snapshot


def test_state_survives_json_roundtrip():
    events = [enrolled(), ev("step.sent", 1), ev("outcome.auto_replied", 2, return_at=T0 + DAY),
              ev("contact.limit_reached", 3, limit="active")]
    s1, _, _ = run_seq(events)
    s2 = None
    for e in events:
        s2 = E.apply(s2, e, ONCE).state
        s2 = orjson.loads(orjson.dumps(s2))
    assert s2 == orjson.loads(orjson.dumps(s1))
    tail = ev("contact.enriched", DAY // MIN + 5)
    assert E.apply(s1, tail, ONCE).changes == E.apply(s2, dict(tail), ONCE).changes


# A state as the engine stored it before the layout change (``d`` per run, sends as lists, the
# ignored/orphans/fanouts lists always present): enrolled (en1), step 0 sent (s1, mA), finished (f1),
# re-enrolled (en2), step 0 sent (s2, mB), out-of-office auto-reply on run 1 (o1) returning at T0 + 60 min.
EARLIER_LAYOUT_STATE = (
    '{"automation_id":"a1","contact_id":"c1","runs":[{"run":0,"enrolled":{"event_id":"en1","at":1767225600000,'
    '"user_id":"u1","name":"Ann","email":"ann@x.io","company":null,"attributes":{}},"needs_enrichment":false,'
    '"enriched_at":null,"terminal":[1767225720000,"f1","finished","manual",null,"contact.finished"],"hold":null,'
    '"resumed":null,"limit":null,"started_at":1767225660000,"claim_from":null,"last_at":1767225720000,'
    '"done":{"0":1767225660000},"max_done":0,"sends":{"mA":[0,1767225660000,"s1"]},"settled":{},'
    '"d":["finished","manual",{"0":"done","1":"stopped"}]},{"run":1,"enrolled":{"event_id":"en2",'
    '"at":1767225780000,"user_id":"u1","name":"Ann","email":"ann@x.io","company":null,"attributes":{}},'
    '"needs_enrichment":false,"enriched_at":null,"terminal":null,"hold":[1767225900000,"o1","paused",'
    '"out_of_office",1767229200000],"resumed":null,"limit":null,"started_at":1767225840000,'
    '"claim_from":1767225780000,"last_at":1767225840000,"done":{"0":1767225840000},"max_done":0,'
    '"sends":{"mB":[0,1767225840000,"s2"]},"settled":{},"d":["paused","out_of_office",{"0":"done","1":"waiting"}]}],'
    '"ignored":[],"orphans":[],"fanouts":[],"now":1767225900000,"version":6}')


def _earlier_layout_events():
    return [enrolled(eid="en1"), ev("step.sent", 1, eid="s1", step_index=0, message_id="mA"),
            ev("contact.finished", 2, eid="f1", reason="manual"), ev("contact.enrolled", 3, eid="en2"),
            ev("step.sent", 4, eid="s2", step_index=0, message_id="mB"),
            ev("outcome.auto_replied", 5, eid="o1", run=1, message_id="mB", return_at=T0 + 60 * MIN)]


def _without_empty_lists(state):
    """The state without empty lists and without the runs' open waits (``dw``: a state of the earlier
    layout does not know them)."""
    runs = [{k: v for k, v in run.items() if k != "dw"} for run in state["runs"]]
    return orjson.dumps({k: v for k, v in dict(state, runs=runs).items() if v != []},
                        option=orjson.OPT_SORT_KEYS)


@pytest.mark.parametrize("tail", [
    [ev("outcome.settled", 6, eid="t1", run=1, message_id="mB"), ev("step.sent", 7, eid="t2", step_index=0,
                                                                    message_id="mB"),
     ev("contact.enrolled", 8, eid="en1"), ev("automation.archived", 9, eid="t3")],
    [ev("step.sent", 90, eid="t4", step_index=1, message_id="mC"), ev("contact.enrolled", 91, eid="en3")],
    [ev("automation.paused", 6, eid="t5"), ev("outcome.bounced", 7, eid="t6", run=0, message_id="mA")],
])
def test_state_of_the_earlier_layout_is_converted_when_read(tail):
    fresh, _, _ = run_seq(_earlier_layout_events(), automation=UNLIMITED)
    old = orjson.loads(EARLIER_LAYOUT_STATE)
    for automation in (UNLIMITED, dict(UNLIMITED, archived_at=T0 + 5 * MIN), None):
        assert E.view(old, automation) == E.view(fresh, automation)
    assert orjson.loads(EARLIER_LAYOUT_STATE) == old  # a view does not convert
    assert E.next_resume_at(old) == E.next_resume_at(fresh)
    for e in tail:
        r_old = E.apply(old, dict(e), UNLIMITED)
        r_new = E.apply(fresh, dict(e), UNLIMITED)
        assert (r_old.changed, r_old.changes, r_old.registrations) == (
            r_new.changed, r_new.changes, r_new.registrations)
        # the same waits, but a wait opened before the conversion closes with an unknown start (its reset)
        assert [(run, step, closed) for run, step, _, closed in r_old.waits] == [
            (run, step, closed) for run, step, _, closed in r_new.waits]
        for (_, _, since_old, closed), (_, _, since_new, _) in zip(r_old.waits, r_new.waits):
            assert since_old == since_new or (closed and since_old is None)
        old, fresh = r_old.state, r_new.state
    assert E.view(old, UNLIMITED) == E.view(fresh, UNLIMITED)
    assert _without_empty_lists(old) == _without_empty_lists(fresh)


def test_earlier_layout_ticked():
    old = orjson.loads(EARLIER_LAYOUT_STATE)
    fresh, _, _ = run_seq(_earlier_layout_events(), automation=UNLIMITED)
    r_old, r_new = E.tick(old, UNLIMITED, T0 + 61 * MIN), E.tick(fresh, UNLIMITED, T0 + 61 * MIN)
    assert r_old.changes and r_old.changes == r_new.changes
    assert _without_empty_lists(r_old.state) == _without_empty_lists(r_new.state)


def test_change_ids_are_common_change_id():
    """The machine builds change ids inline; they are common.change_id of the change's fields."""
    s, ch, _ = run_seq([enrolled(), ev("step.sent", 1, step_index=0), ev("step.sent", 2, step_index=1),
                        ev("outcome.bounced", 3, message_id="m0", reason="block"),
                        ev("contact.paused", 4, reason="manual", resume_at=T0 + 10 * MIN)])
    assert {c["kind"] for c in ch} == {"contact_status", "node_state"}
    for c in ch:
        assert c["change_id"] == change_id(c["event_id"], c["kind"], c["automation_id"], c["contact_id"], c["run"],
                                           c["step_index"], c["message_id"], c["to"])


def test_key_of():
    assert E.key_of(ev("contact.enrolled", aid="a9", cid="c7")) == "a9\x1fc7"


def test_view_does_not_mutate_state():
    s, _, _ = run_seq(_complete(2))
    before = orjson.dumps(s)
    E.view(s, ONCE)
    E.view(s, None)
    E.next_resume_at(s)
    assert orjson.dumps(s) == before


def test_unknown_event_type_is_ignored():
    s, _, _ = run_seq([enrolled()])
    r = E.apply(s, ev("contact.something_new", 1), ONCE)
    assert not r.changed and r.changes == []


def test_event_applied_before_a_reenrollment_replays_as_noop():
    # step.sent at 10 reaches run 0 before the re-enrollment at 5 is processed; replaying it must not move it.
    sent = ev("step.sent", 10, eid="late", step_index=0)
    s, _, _ = run_seq([enrolled(eid="en1"), ev("contact.finished", 1, reason="manual"), sent,
                       ev("contact.enrolled", 5, eid="en2")], automation=UNLIMITED)
    snap = orjson.dumps(s)
    r = E.apply(s, dict(sent), UNLIMITED)
    assert not r.changed and r.changes == [] and orjson.dumps(r.state) == snap
    # later events of the new run go to it
    s, _, _ = run_seq([ev("step.sent", 20, step_index=0)], automation=UNLIMITED, state=s)
    assert nodes(s, UNLIMITED, 1) == {0: "done", 1: "waiting"}
