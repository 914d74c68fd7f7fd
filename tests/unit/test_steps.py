"""The per-event step layer: parking, unparking, and the rows and messages each event produces."""
from __future__ import annotations

from schemas.examples import EXAMPLES
from schemas.parser import parse_object
from streams import steps

T0 = 1_767_225_600_000


def parsed(kind: str, **fields) -> dict:
    raw = dict(EXAMPLES[kind])
    raw.update({"automation_id": "a1", "contact_id": "c1"} if not kind.startswith("message.") else {})
    raw.update(fields)
    ev = parse_object(raw)
    assert isinstance(ev, dict), ev
    return ev


AUTOMATION = parsed("automation.published", steps=[
    {"index": 0, "name": "Intro", "kind": "email", "day": 0},
    {"index": 1, "name": "Follow-up", "kind": "email", "day": 3},
])


def enrolled(at: str = "2026-01-01T00:00:00Z") -> dict:
    return parsed("contact.enrolled", event_id="enr", occurred_at=at, needs_enrichment=False)


def sent(step: int, mid: str, at: str) -> dict:
    return parsed("step.sent", event_id=f"sent-{mid}", step_index=step, message_id=mid, occurred_at=at,
                  mailing_id=None)


def test_step_events_before_the_enrollment_wait_and_are_applied_with_it():
    s1 = steps.contact_step(None, None, sent(0, "m0", "2026-01-01T01:00:00Z"), AUTOMATION, 1, 10)
    assert s1.state is None and s1.parked_changed and len(s1.parked) == 1
    assert not s1.output.rows and not s1.output.to_messages
    s2 = steps.contact_step(s1.state, s1.parked, enrolled(), AUTOMATION, 0, 5)
    assert s2.parked is None and s2.parked_changed and s2.state_changed
    recipients = s2.output.rows["recipients"]
    assert [(r["message_id"], r["user_name"], r["email"], r["_partition"], r["_offset"]) for r in recipients] == [
        ("m0", EXAMPLES["contact.enrolled"]["name"], EXAMPLES["contact.enrolled"]["email"], 1, 10)]
    assert [m["message_id"] for m in s2.output.to_messages] == ["m0"]
    assert s2.output.rows["contacts"][0]["contact_id"] == "c1"


def test_events_of_an_unknown_automation_wait_for_its_definition_in_arrival_order():
    r = steps.contact_step(None, None, sent(0, "m0", "2026-01-01T01:00:00Z"), None, 0, 1)
    r = steps.contact_step(r.state, r.parked, enrolled(), None, 0, 2)
    assert r.state is None and len(r.parked) == 2
    done = steps.contact_unpark(r.state, r.parked, AUTOMATION)
    assert done.parked is None
    assert [row["message_id"] for row in done.output.rows["recipients"]] == ["m0"]
    statuses = [(c["from"], c["to"]) for c in done.output.changes if c["kind"] == "contact_status"]
    assert statuses[-1][1] == "in_progress"


def test_node_rows_follow_the_engine_changes_and_mark_left_nodes_none():
    r = steps.contact_step(None, None, enrolled(), AUTOMATION, 0, 1)
    assert {(n["step_index"], n["state"]) for n in r.output.rows["node_states"]} == {(0, "waiting")}
    r = steps.contact_step(r.state, r.parked, sent(0, "m0", "2026-01-01T01:00:00Z"), AUTOMATION, 0, 2)
    assert {(n["step_index"], n["state"]) for n in r.output.rows["node_states"]} == {(0, "done"), (1, "waiting")}
    versions = {n["_version"] for n in r.output.rows["node_states"]}
    assert versions == {r.state["version"]}
    r2 = steps.contact_step(r.state, r.parked, sent(1, "m1", "2026-01-02T01:00:00Z"), AUTOMATION, 0, 3)
    assert r2.output.rows["enrollments"][-1]["status"] == "finished"
    assert r2.output.rows["enrollments"][-1]["reason"] == "completed"


def test_a_replayed_event_produces_nothing():
    r = steps.contact_step(None, None, enrolled(), AUTOMATION, 0, 1)
    r = steps.contact_step(r.state, r.parked, sent(0, "m0", "2026-01-01T01:00:00Z"), AUTOMATION, 0, 2)
    again = steps.contact_step(r.state, r.parked, sent(0, "m0", "2026-01-01T01:00:00Z"), AUTOMATION, 0, 2)
    assert not again.state_changed and not again.output.rows and not again.output.changes


def test_archive_known_from_the_automation_ends_open_runs_and_stops_their_node():
    r = steps.contact_step(None, None, enrolled(), AUTOMATION, 0, 1)
    archived = dict(AUTOMATION, archived_at=T0 + 86_400_000)
    lifecycle = {"event_id": "arch", "type": "automation.archived", "occurred_at": T0 + 86_400_000,
                 "automation_id": "a1"}
    r = steps.contact_step(r.state, r.parked, lifecycle, archived, 0, 2)
    assert r.output.rows["enrollments"][-1]["status"] == "canceled"
    assert {(n["step_index"], n["state"]) for n in r.output.rows["node_states"]} == {(0, "stopped")}


def test_message_step_logs_provider_events_and_writes_the_message_once_registered():
    delivered = parsed("message.delivered", message_id="m0", event_id="d1", occurred_at="2026-01-01T02:00:00Z")
    m = steps.message_step(None, delivered, 3, 7)
    assert [r["event_id"] for r in m.output.rows["message_events"]] == ["d1"]
    assert "messages" not in m.output.rows and not m.output.changes
    r = steps.contact_step(None, None, enrolled(), AUTOMATION, 0, 1)
    r = steps.contact_step(r.state, r.parked, sent(0, "m0", "2026-01-01T01:00:00Z"), AUTOMATION, 0, 2)
    registration = r.output.to_messages[0]
    m2 = steps.message_step(m.state, registration, 3, 8)
    row = m2.output.rows["messages"][0]
    assert row["status"] == "delivered" and row["contact_id"] == "c1" and row["mailing_id"] == "a1:0"
    assert "message_events" not in m2.output.rows
    assert [o["type"] for o in m2.output.to_contacts] == ["outcome.settled"]


def test_insert_tokens_identify_row_content():
    from agents.app import content_token

    rows = [{"a": 1, "b": "x"}, {"a": 2, "b": None}]
    assert content_token("t", rows) == content_token("t", [dict(r) for r in rows])
    assert content_token("t", rows) != content_token("t", rows[:1])
    assert content_token("t", rows) != content_token("u", rows)
    assert content_token("t", rows) != content_token("t", [rows[0], {"a": 2, "b": "y"}])
