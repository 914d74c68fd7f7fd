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


def test_a_step_sent_twice_writes_a_repeat_row_once():
    r = steps.contact_step(None, None, enrolled(), AUTOMATION, 0, 1)
    r = steps.contact_step(r.state, r.parked, sent(0, "m0", "2026-01-01T01:00:00Z"), AUTOMATION, 0, 2)
    assert "repeat_sends" not in r.output.rows
    again = sent(0, "m0b", "2026-01-01T02:00:00Z")
    r = steps.contact_step(r.state, r.parked, again, AUTOMATION, 0, 3)
    assert r.output.rows["repeat_sends"] == [{"automation_id": "a1", "contact_id": "c1", "run": 0, "step_index": 0,
                                              "message_ids": ["m0", "m0b"], "verify": 0}]
    assert [row["message_id"] for row in r.output.rows["recipients"]] == ["m0b"]
    replay = steps.contact_step(r.state, r.parked, again, AUTOMATION, 0, 3)
    assert not replay.output.rows
    # step 1 is sent; then an earlier report of m0b says step 1: no status or node changes, but steps 0
    # and 1 are named for verification (m0b's step moved from 0 to 1)
    r = steps.contact_step(r.state, r.parked, sent(1, "m1", "2026-01-02T01:00:00Z"), AUTOMATION, 0, 4)
    earlier = parsed("step.sent", event_id="sent-m0b-early", step_index=1, message_id="m0b",
                     occurred_at="2026-01-01T00:30:00Z", mailing_id=None)
    r = steps.contact_step(r.state, r.parked, earlier, AUTOMATION, 0, 5)
    assert r.state_changed and not r.output.changes
    assert r.output.rows == {"repeat_sends": [
        {"automation_id": "a1", "contact_id": "c1", "run": 0, "step_index": k, "message_ids": [], "verify": 1}
        for k in (0, 1)]}


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


def test_insert_tokens_are_unique_per_write_and_process():
    from agents.app import _TOKEN_SALT, write_token

    tokens = [write_token("messages") for _ in range(1000)] + [write_token("recipients")]
    assert len(set(tokens)) == len(tokens)  # a token never stands for two different writes
    assert all(t.startswith(f"messages:{_TOKEN_SALT}:") for t in tokens[:-1])
    assert tokens[-1].startswith(f"recipients:{_TOKEN_SALT}:")


def _fold(*row_batches: dict) -> dict:
    """ReplacingMergeTree(_version) in Python: per key the highest version wins; ``none`` nodes are skipped."""
    keys = {"enrollments": ("automation_id", "contact_id", "run"),
            "node_states": ("automation_id", "contact_id", "run", "step_index")}
    best: dict = {}
    for batch in row_batches:
        for table, cols in keys.items():
            for row in batch.get(table, ()):
                k = (table,) + tuple(row[c] for c in cols)
                if k not in best or row["_version"] >= best[k]["_version"]:
                    best[k] = row
    return {k: ((r["status"], r["reason"]) if k[0] == "enrollments" else r["state"])
            for k, r in best.items() if not (k[0] == "node_states" and r["state"] == "none")}


def _open_waits(*row_batches: dict) -> set:
    """node_waits (migration 012) read as health reads it, in Python: per key the highest version wins
    (the later row on a tie), closed waits are dropped, and so are waits below their node's reset."""
    best: dict = {}
    for batch in row_batches:
        for row in batch.get("node_waits", ()):
            k = (row["automation_id"], row["since"], row["contact_id"], row["run"], row["step_index"])
            if k not in best or row["_version"] >= best[k]["_version"]:
                best[k] = row
    resets = {(a, c, r, i): row["_version"] for (a, since, c, r, i), row in best.items()
              if since == 0 and not row["closed"]}
    return {(a, c, r, i, since) for (a, since, c, r, i), row in best.items()
            if since and not row["closed"] and row["_version"] >= resets.get((a, c, r, i), 0)}


def _waiting_nodes(*row_batches: dict) -> set:
    """The waiting nodes of the latest node_states rows, with their ``at``."""
    best: dict = {}
    for batch in row_batches:
        for row in batch.get("node_states", ()):
            k = (row["automation_id"], row["contact_id"], row["run"], row["step_index"])
            if k not in best or row["_version"] >= best[k]["_version"]:
                best[k] = row
    return {(*k, row["at"]) for k, row in best.items() if row["state"] == "waiting"}


def _apply_all(state, events, automation):
    out = steps.Output()
    for ev in events:
        res = steps.contact_step(state, None, ev, automation, 0, 0, T0 + 400 * 86_400_000)
        state = res.state
        for table, table_rows in res.output.rows.items():
            out.add_rows(table, table_rows)
    return state, out.rows


def test_a_replay_snapshot_outranks_rows_of_the_attempt_that_crashed():
    """The attempt that crashed applied a pause and a resume fan-out (internal topic) before the
    contact's failure (enrollments topic) reached it; its rows were written, its state was not. The
    replay sees the failure first: same final state, fewer changes, lower versions. Without the
    snapshot the crashed attempt's 'in_progress' row wins in ClickHouse; with it, 'failed' does."""
    import copy

    automation = parsed("automation.published", steps=[
        {"index": i, "name": f"S{i}", "kind": "email", "day": i} for i in range(5)])
    lifecycle = [dict(parsed("automation.paused", event_id="p", occurred_at="2026-01-06T12:00:00Z"),
                      automation_id="a1"),
                 dict(parsed("automation.resumed", event_id="r", occurred_at="2026-01-07T00:00:00Z"),
                      automation_id="a1")]
    committed, committed_rows = _apply_all(None, [enrolled("2026-01-03T00:00:00Z")] + [
        sent(i, f"m{i}", f"2026-01-0{4 + i}T00:00:00Z") for i in range(3)], automation)
    failed = parsed("contact.failed", event_id="f", occurred_at="2026-01-08T00:00:00Z", reason="linkedin_error")
    _, crashed_rows = _apply_all(copy.deepcopy(committed), lifecycle, automation)
    final, replay_rows = _apply_all(copy.deepcopy(committed), [failed] + lifecycle, automation)
    expected = ("failed", "linkedin_error")
    assert [(v["status"], v["reason"]) for v in steps.enrollment.view(final, automation)] == [expected]
    key = ("enrollments", "a1", "c1", 0)
    assert _fold(committed_rows, crashed_rows, replay_rows)[key] != expected  # the stale row wins
    snapshot = steps.contact_snapshot(final, automation)
    folded = _fold(committed_rows, crashed_rows, replay_rows, snapshot.rows)
    assert folded[key] == expected
    assert folded[("node_states", "a1", "c1", 0, 3)] == "stopped"
    assert {k[4] for k in folded if k[0] == "node_states"} == {0, 1, 2, 3}  # step 4 was never reached
    # node_waits: the open waits, as health reads them, are the waiting nodes (here none: node 3 stopped)
    assert _open_waits(committed_rows)
    assert _open_waits(committed_rows, crashed_rows, replay_rows, snapshot.rows) == _waiting_nodes(
        committed_rows, crashed_rows, replay_rows, snapshot.rows) == set()
    assert final["version"] > max(r["_version"] for r in crashed_rows["enrollments"])


def test_a_message_snapshot_outranks_every_earlier_row_of_the_message():
    state, rows = None, []
    for ev in (
        {"type": "message.registered", "event_id": "r", "occurred_at": T0, "message_id": "m1", "automation_id": "a1",
         "contact_id": "c1", "run": 0, "step_index": 0, "mailing_id": "a1:0", "subject": "Hi", "sending_user": "u",
         "sending_email": "u@example.com", "email": "c1@example.com", "name": "C", "channel": "email"},
        parsed("message.delivered", event_id="d", message_id="m1", occurred_at="2026-01-01T00:05:00Z"),
    ):
        res = steps.message_step(state, ev, 0, 0)
        state = res.state
        rows += res.output.rows.get("messages", [])
    (row,) = steps.message_snapshot(state).rows["messages"]
    assert row["_version"] > max(r["_version"] for r in rows) and row["status"] == rows[-1]["status"]
    assert state["version"] == row["_version"]  # the state keeps the bumped version


def test_an_archived_automation_gives_the_engine_one_definition_object():
    from agents.app import engine_automation

    replica = {"defn": {"automation_id": "a1", "steps": []}, "archived_at": 5}
    first = engine_automation(replica)
    assert first == {"automation_id": "a1", "steps": [], "archived_at": 5}
    assert engine_automation(replica) is first  # built once, not per event
    other = {"defn": {"automation_id": "a1", "steps": []}, "archived_at": 9}
    assert engine_automation(other)["archived_at"] == 9
    live = {"defn": {"automation_id": "a2"}}
    assert engine_automation(live) is live["defn"] and engine_automation(None) is None


def test_a_paused_automation_gives_the_engine_its_pause_time_until_it_is_resumed():
    from agents.app import apply_automation_event, engine_automation

    published = {"type": "automation.published", "occurred_at": 1, "automation_id": "a1", "steps": [], "version": 1}
    replica = apply_automation_event(None, published)
    assert "paused_at" not in engine_automation(replica)
    paused = apply_automation_event(replica, {"type": "automation.paused", "occurred_at": 5, "automation_id": "a1"})
    defn = engine_automation(paused)
    assert defn["paused_at"] == 5 and engine_automation(paused) is defn
    resumed = apply_automation_event(paused, {"type": "automation.resumed", "occurred_at": 9, "automation_id": "a1"})
    assert "paused_at" not in engine_automation(resumed)
    # a pause older than the resume (reordered) does not pause it again
    late = apply_automation_event(resumed, {"type": "automation.paused", "occurred_at": 7, "automation_id": "a1"})
    assert "paused_at" not in engine_automation(late)


def test_the_enrollments_row_carries_the_date_a_paused_contact_resumes_by_itself():
    """enrollments.resume_at: an out-of-office pause with a return date shows it; a later reply with
    another date moves it although status and reason stay the same; it is gone once resumed."""
    r = steps.contact_step(None, None, enrolled(), AUTOMATION, 0, 1)
    first = parsed("contact.paused", event_id="ooo1", occurred_at="2026-01-02T00:00:00Z", reason="out_of_office",
                   resume_at="2026-01-09T08:00:00Z")
    r = steps.contact_step(r.state, r.parked, first, AUTOMATION, 0, 2)
    (row,) = r.output.rows["enrollments"]
    assert (row["status"], row["reason"], row["resume_at"]) == ("paused", "out_of_office", 1767945600000)
    later = parsed("contact.paused", event_id="ooo2", occurred_at="2026-01-03T00:00:00Z", reason="out_of_office",
                   resume_at="2026-01-12T08:00:00Z")
    r = steps.contact_step(r.state, r.parked, later, AUTOMATION, 0, 3)
    assert not [c for c in r.output.changes if c["kind"] == "contact_status"]  # no status change ...
    (moved,) = r.output.rows["enrollments"]  # ... yet the row moves
    assert moved["resume_at"] == 1768204800000 and moved["_version"] > row["_version"]
    r = steps.contact_step(r.state, r.parked, parsed("contact.resumed", event_id="back",
                                                     occurred_at="2026-01-04T00:00:00Z"), AUTOMATION, 0, 4)
    (resumed,) = r.output.rows["enrollments"]
    assert (resumed["status"], resumed["resume_at"]) == ("ready", None)


def test_events_parked_earlier_go_before_a_new_one_once_the_definition_is_known():
    """A recovery can give a key the events parked while its automation was unknown together with the
    definition (the unpark that followed was lost with the crashed attempt). The next events of the key
    must not overtake them: a re-enrollment after the first run's end starts a second run."""
    unlimited = dict(AUTOMATION, participation="unlimited")
    first = parsed("contact.enrolled", event_id="e1", occurred_at="2026-01-01T00:00:00Z", needs_enrichment=False)
    end = parsed("contact.finished", event_id="f1", occurred_at="2026-01-02T00:00:00Z", reason="manual")
    again = parsed("contact.enrolled", event_id="e2", occurred_at="2026-01-03T00:00:00Z", needs_enrichment=False)
    waiting = steps.contact_step(None, None, first, None, 0, 1)  # parked: the definition is not known yet
    assert waiting.state is None and len(waiting.parked) == 1
    r = steps.contact_step(waiting.state, waiting.parked, end, unlimited, 0, 2)
    assert r.parked is None and r.state_changed and r.parked_changed
    r = steps.contact_step(r.state, r.parked, again, unlimited, 0, 3)
    views = steps.enrollment.view(r.state, unlimited)
    assert [(v["run"], v["status"], v["reason"]) for v in views] == [
        (0, "finished", "manual"), (1, "ready", None)]
    assert not r.state.get("ignored")


def test_a_snapshot_keeps_the_start_a_wait_was_written_with():
    """A replay of a key (after a crash, or a consumer group reset) snapshots it: its waiting node keeps
    the start its wait was opened with, in node_states and node_waits alike, however the view would
    date it (here the view dates node 2 from the pause that followed the send)."""
    automation = parsed("automation.published", steps=[
        {"index": i, "name": f"S{i}", "kind": "email", "day": i} for i in range(4)])
    paused = dict(parsed("automation.paused", event_id="p", occurred_at="2026-01-09T00:00:00Z"), automation_id="a1")
    state, written = _apply_all(None, [enrolled("2026-01-03T00:00:00Z")] + [
        sent(i, f"m{i}", f"2026-01-0{4 + i}T00:00:00Z") for i in range(2)] + [paused], automation)
    opened = _open_waits(written)
    assert opened == _waiting_nodes(written) and {w[3] for w in opened} == {2}
    (view,) = steps.enrollment.view(state, automation)
    assert [n["at"] for n in view["nodes"] if n["state"] == "waiting"] != [w[4] for w in opened]
    first = steps.contact_snapshot(state, automation)
    second = steps.contact_snapshot(state, automation)
    assert _open_waits(written, first.rows) == _waiting_nodes(written, first.rows) == opened
    assert _open_waits(written, first.rows, second.rows) == _waiting_nodes(written, first.rows, second.rows) == opened
