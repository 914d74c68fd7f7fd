"""streams.counters: exact report counters from the rows each key emits."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from streams import counters as C

FLAGS = [field for _, field in C.MAILING_FLAG_COUNTERS]


def msg(mid: str, mailing: str = "a1:0", **flags) -> dict:
    row = {"message_id": mid, "mailing_id": mailing, "channel": "email", "automation_id": mailing.split(":")[0],
           "step_index": int(mailing.split(":")[1])}
    for field in FLAGS:
        row[field] = flags.get(field)
    return row


def enr(status: str, step: int, run: int = 0, reason: str | None = None, ignored: int = 0, aid: str = "a1") -> dict:
    return {"automation_id": aid, "contact_id": "c1", "run": run, "status": status, "reason": reason,
            "current_step": step, "ignored_enrollments": ignored}


def node(step: int, state: str, run: int = 0, aid: str = "a1") -> dict:
    return {"automation_id": aid, "contact_id": "c1", "run": run, "step_index": step, "state": state}


def named(acc: dict, names: tuple[str, ...]) -> dict:
    """Non-zero totals as {key: {name: count}}."""
    return {k: {n: v for n, v in zip(names, counts) if v} for k, counts in acc.items() if any(counts)}


def test_a_message_counts_once_with_its_flags_and_a_replay_adds_nothing():
    acc: dict = {}
    cc = C.count_message_rows(None, [msg("m1", delivered_at=5)], acc)
    assert named(acc, C.MAILING_COUNTERS) == {("a1:0", "email", "a1", 0): {"total_sent": 1, "delivered": 1}}
    cc = C.count_message_rows(cc, [msg("m1", delivered_at=4, opened_at=6), msg("m1", delivered_at=4, opened_at=6,
                                                                                clicked_at=7)], acc)
    assert named(acc, C.MAILING_COUNTERS) == {("a1:0", "email", "a1", 0): {
        "total_sent": 1, "delivered": 1, "opened": 1, "clicked": 1}}
    before = {k: list(v) for k, v in acc.items()}
    # the same row again (a replay or a snapshot): nothing moves
    assert C.count_message_rows(cc, [msg("m1", delivered_at=4, opened_at=6, clicked_at=7)], acc) == cc
    assert acc == before
    # what the message counts, counted again from scratch, is the same
    assert named(C.message_totals([cc, None], {}), C.MAILING_COUNTERS) == named(acc, C.MAILING_COUNTERS)


def test_a_run_moves_between_statuses_and_nodes():
    nodes: dict = {}
    statuses: dict = {}
    cc = C.count_contact_rows(None, {"enrollments": [enr("ready", 0)], "node_states": [node(0, "waiting")]},
                              nodes, statuses)
    assert named(statuses, C.STATUS_COUNTERS) == {("a1", "ready"): {"runs": 1, "contacts": 1, "not_started": 1}}
    assert named(nodes, C.NODE_COUNTERS) == {("a1", 0): {"waiting": 1}}
    cc = C.count_contact_rows(cc, {
        "enrollments": [enr("in_progress", 1), enr("finished", -1, reason="completed", ignored=2)],
        "node_states": [node(0, "done"), node(1, "waiting"), node(1, "done")]}, nodes, statuses)
    assert named(statuses, C.STATUS_COUNTERS) == {("a1", "finished"): {
        "runs": 1, "contacts": 1, "ignored_enrollments": 2, "completed": 1}}
    assert named(nodes, C.NODE_COUNTERS) == {("a1", 0): {"done": 1}, ("a1", 1): {"done": 1}}
    # a second run: not a contact; filtered at a node, then that node leaves ('none' counts nowhere)
    cc = C.count_contact_rows(cc, {"enrollments": [enr("finished", -1, run=1, reason="filtered")],
                                   "node_states": [node(0, "filtered", run=1), node(0, "none", run=1)]},
                              nodes, statuses)
    assert named(statuses, C.STATUS_COUNTERS)[("a1", "finished")] == {
        "runs": 2, "contacts": 1, "ignored_enrollments": 2, "completed": 1, "left_runs": 1}
    assert named(nodes, C.NODE_COUNTERS) == {("a1", 0): {"done": 1}, ("a1", 1): {"done": 1}}
    again_nodes: dict = {}
    again_statuses: dict = {}
    C.contact_totals([("a1", cc)], again_nodes, again_statuses)
    assert named(again_nodes, C.NODE_COUNTERS) == named(nodes, C.NODE_COUNTERS)
    assert named(again_statuses, C.STATUS_COUNTERS) == named(statuses, C.STATUS_COUNTERS)


def test_merge_reports_totals_that_would_go_below_zero():
    changed, negative = C.merge({("a1", 0): [1, 0, 0, 0]}, {("a1", 0): [-1, 1, 0, 0], ("a1", 1): [0, -1, 0, 0],
                                                            ("a1", 2): [0, 0, 0, 0]})
    assert changed == {("a1", 0): [0, 1, 0, 0], ("a1", 1): [0, -1, 0, 0]}
    assert negative == [("a1", 1)]


# ---- property: the totals are what a FINAL read of the emitted rows counts ---------------------------

def test_completion_is_positional_every_step_done_is_completed_whatever_the_status():
    statuses: dict = {}
    C.count_contact_rows(None, {"enrollments": [
        enr("finished", -1, run=0, reason="completed"),
        enr("finished", -1, run=1, reason="replied"),  # replied to the last e-mail: every step done
        enr("unsubscribed", -1, run=2, reason="unsubscribed"),
        enr("finished", -1, run=3, reason="filtered"),  # filtered out before the end: left
        enr("finished", 1, run=4, reason="replied"),  # replied with steps left: stopped at step 1
    ]}, {}, statuses)
    got = named(statuses, C.STATUS_COUNTERS)
    assert got[("a1", "finished")] == {"runs": 4, "contacts": 1, "completed": 2, "left_runs": 1, "in_progress": 1}
    assert got[("a1", "unsubscribed")] == {"runs": 1, "completed": 1}


STATUSES = ["ready", "in_progress", "paused", "finished", "unsubscribed"]
STATES = ["done", "waiting", "filtered", "stopped", "none"]

enrollment_rows = st.builds(
    lambda aid, run, status, step, reason, ignored: enr(status, step, run=run, reason=reason, ignored=ignored,
                                                        aid=aid),
    st.sampled_from(["a1", "a2"]), st.integers(0, 2), st.sampled_from(STATUSES), st.integers(-1, 3),
    st.sampled_from([None, "completed", "filtered", "replied"]), st.integers(0, 2))
node_rows = st.builds(lambda aid, run, step, state: node(step, state, run=run, aid=aid),
                      st.sampled_from(["a1", "a2"]), st.integers(0, 2), st.integers(0, 3), st.sampled_from(STATES))
message_rows = st.builds(lambda mid, mailing, flags: msg(mid, mailing, **{f: 1 for f in flags}),
                         st.sampled_from(["m1", "m2", "m3"]), st.sampled_from(["a1:0", "a1:1", "a2:0"]),
                         st.sets(st.sampled_from(FLAGS)))


def final_counts(rows: list[dict], key_fields: tuple[str, ...]) -> dict:
    """The latest row per row key: rows are emitted in version order, so the last one."""
    latest = {}
    for row in rows:
        latest[tuple(row[f] for f in key_fields)] = row
    return latest


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["k1", "k2"]), st.lists(enrollment_rows, max_size=3),
                          st.lists(node_rows, max_size=4)), max_size=12))
def test_contact_totals_equal_the_count_of_the_latest_rows(batches):
    """Whatever rows keys emit (each key its own runs), summing the differences gives the count of the
    latest rows, and counting the keys' cc again gives the same totals."""
    nodes: dict = {}
    statuses: dict = {}
    ccs: dict = {}
    emitted: dict = {"enrollments": [], "node_states": []}
    for key, enrollments, node_states in batches:
        # a key's rows are its own: the key's name stands in for its contact
        enrollments = [{**r, "contact_id": key, "automation_id": key} for r in enrollments]
        node_states = [{**r, "contact_id": key, "automation_id": key} for r in node_states]
        ccs[key] = C.count_contact_rows(ccs.get(key), {"enrollments": enrollments, "node_states": node_states},
                                        nodes, statuses)
        emitted["enrollments"] += enrollments
        emitted["node_states"] += node_states
    expected_nodes: dict = {}
    for row in final_counts(emitted["node_states"], ("automation_id", "contact_id", "run", "step_index")).values():
        if row["state"] != "none":
            slot = expected_nodes.setdefault((row["automation_id"], row["step_index"]), {})
            slot[row["state"]] = slot.get(row["state"], 0) + 1
    assert named(nodes, C.NODE_COUNTERS) == expected_nodes
    expected_statuses: dict = {}
    for row in final_counts(emitted["enrollments"], ("automation_id", "contact_id", "run")).values():
        slot = expected_statuses.setdefault((row["automation_id"], row["status"]), {})
        step = row["current_step"]
        completed = step < 0 and not (row["status"] == "finished" and row["reason"] == "filtered")
        for name, value in (("runs", 1), ("contacts", int(row["run"] == 0)),
                            ("ignored_enrollments", row["ignored_enrollments"]), ("completed", int(completed)),
                            ("in_progress", int(step > 0)), ("not_started", int(step == 0)),
                            ("left_runs", int(step < 0 and not completed))):
            if value:
                slot[name] = slot.get(name, 0) + value
    assert named(statuses, C.STATUS_COUNTERS) == {k: v for k, v in expected_statuses.items() if v}
    again_nodes: dict = {}
    again_statuses: dict = {}
    C.contact_totals([(k, cc) for k, cc in ccs.items()], again_nodes, again_statuses)
    assert named(again_nodes, C.NODE_COUNTERS) == named(nodes, C.NODE_COUNTERS)
    assert named(again_statuses, C.STATUS_COUNTERS) == named(statuses, C.STATUS_COUNTERS)
    assert all(min(v) >= 0 for v in nodes.values()) and all(min(v) >= 0 for v in statuses.values())


@settings(max_examples=300, deadline=None)
@given(st.lists(message_rows, max_size=15))
def test_mailing_totals_equal_the_count_of_the_latest_rows(rows):
    acc: dict = {}
    ccs: dict = {}
    for row in rows:
        ccs[row["message_id"]] = C.count_message_rows(ccs.get(row["message_id"]), [row], acc)
    expected: dict = {}
    for row in final_counts(rows, ("message_id",)).values():
        slot = expected.setdefault((row["mailing_id"], "email", row["automation_id"], row["step_index"]), {})
        slot["total_sent"] = slot.get("total_sent", 0) + 1
        for name, field in C.MAILING_FLAG_COUNTERS:
            if row[field] is not None:
                slot[name] = slot.get(name, 0) + 1
    assert named(acc, C.MAILING_COUNTERS) == expected
    assert named(C.message_totals(ccs.values(), {}), C.MAILING_COUNTERS) == expected


def test_rows_follow_the_table_columns():
    from sendtrail.clickhouse import TABLE_COLUMNS

    assert len(C.mailing_counter_row(("m", "email", "a", 1), 0, [0] * len(C.MAILING_COUNTERS), 7)) == len(
        TABLE_COLUMNS["mailing_counters"])
    assert len(C.node_counter_row(("a", 1), 0, [0] * len(C.NODE_COUNTERS), 7)) == len(TABLE_COLUMNS["node_counters"])
    assert len(C.status_counter_row(("a", "ready"), 0, [0] * len(C.STATUS_COUNTERS), 7)) == len(
        TABLE_COLUMNS["status_counters"])
    assert C.coverage_row("node_counters", 1, 4, 7) == ("node_counters", 1, 4, 7)
    assert TABLE_COLUMNS["node_counters"][3:7] == C.NODE_COUNTERS
    assert TABLE_COLUMNS["status_counters"][3:10] == C.STATUS_COUNTERS
    assert TABLE_COLUMNS["mailing_counters"][5:14] == C.MAILING_COUNTERS
