"""What one event does: state in, state and outputs out (pure; the agents only store and send).

The contact step owns the per-enrollment state (key ``automation_id\\x1fcontact_id``);
the message step owns the per-message state (key ``message_id``). Both call the
engine, then turn its changes and views into status changes, forwarded
internal events and ClickHouse rows.

Parking: contact and step events can be consumed before the enrollment they
belong to (they travel on different topics), and an enrollment before its
automation's definition reaches this worker. Such events are parked in the
key's parked list and applied, in arrival order, right after the enrollment
is applied. The engine would converge without this, but the recipient rows
and message registrations need the contact's details from the enrollment.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from streams import rows
from streams.engine import enrollment, message


@dataclass(slots=True)
class Output:
    changes: list[dict] = field(default_factory=list)
    to_messages: list[dict] = field(default_factory=list)
    to_contacts: list[dict] = field(default_factory=list)
    rows: dict[str, list[dict]] = field(default_factory=dict)

    def add_rows(self, table: str, new_rows: list[dict]) -> None:
        if new_rows:
            self.rows.setdefault(table, []).extend(new_rows)

    def extend(self, other: "Output") -> None:
        self.changes.extend(other.changes)
        self.to_messages.extend(other.to_messages)
        self.to_contacts.extend(other.to_contacts)
        for table, table_rows in other.rows.items():
            self.add_rows(table, table_rows)


@dataclass(slots=True)
class ContactResult:
    state: dict | None
    parked: list[dict] | None
    state_changed: bool
    parked_changed: bool
    output: Output


def needs_parking(state: dict | None, event: dict, automation: dict | None) -> bool:
    kind = event["type"]
    if kind == "contact.enrolled":
        return automation is None
    if kind.startswith("contact.") or kind.startswith("step."):
        return state is None or automation is None
    return False


def _apply_one(state: dict | None, event: dict, automation: dict | None, out: Output,
               partition: int, offset: int, now_ms: int | None) -> tuple[dict | None, bool]:
    res = enrollment.apply(state, event, automation, now_ms)
    if not res.changed and not res.changes:
        return res.state, False
    _emit(res, event, automation, out, partition, offset)
    return res.state, True


#: Events after which every run of the key gets its enrollments row, changes or not: an enrollment
#: (its contact fields), and the holds that carry a resume date (a new date under the same status
#: and reason is no change, yet the row's resume_at moves).
_EVERY_RUN_ROW = frozenset({"contact.enrolled", "contact.paused", "outcome.auto_replied"})


def _emit(res, event: dict, automation: dict | None, out: Output, partition: int, offset: int) -> None:
    """Rows and messages for what the engine reports changed.

    The engine compares each run with what it last emitted (so changes that come
    from the automation itself, e.g. its archive, are reported too); node rows
    come straight from its ``node_state`` changes.
    """
    changes = res.changes
    out.changes.extend(changes)
    out.add_rows("status_changes", [rows.status_change_row(c) for c in changes])
    if res.repeats:
        aid, cid = res.state["automation_id"], res.state["contact_id"]
        out.add_rows("repeat_sends", [rows.repeat_send_row(aid, cid, run, step, ids, verify)
                                      for run, step, ids, verify in res.repeats])
    if res.waits:
        aid, cid, version = res.state["automation_id"], res.state["contact_id"], res.state.get("version", 0)
        out.add_rows("node_waits", [rows.wait_row(aid, cid, run, step, since, closed, version)
                                    for run, step, since, closed in res.waits])
    runs = {c["run"] for c in changes}
    if event["type"] in _EVERY_RUN_ROW or res.registrations:
        runs.update(range(len(res.state.get("runs") or ())))
    if not runs and not res.registrations:
        return
    views = {v["run"]: v for v in enrollment.view(res.state, automation)}
    updated_at = event["occurred_at"]
    out.add_rows("enrollments", [rows.enrollment_row(views[r], updated_at) for r in sorted(runs) if r in views])
    version = res.state.get("version", 0)
    out.add_rows("node_states", [rows.node_change_row(c, version) for c in changes if c["kind"] == "node_state"])
    for reg in res.registrations:
        out.to_messages.append(reg)
        if event["type"] == "step.sent" and event.get("message_id") == reg["message_id"]:
            run_view = views.get(reg["run"]) or {"run": reg["run"]}
            out.add_rows("recipients", [rows.recipient_row(event, run_view, partition, offset)])
    if event["type"] == "contact.enrolled":
        out.add_rows("contacts", [rows.contact_row(event)])


def _drain(state: dict | None, parked: list[dict], automation: dict | None, out: Output,
           now_ms: int | None) -> tuple[dict | None, list[dict]]:
    """Apply the parked events that can go now, in arrival order, until none can."""
    remaining = parked
    progress = True
    while remaining and progress:
        progress = False
        still = []
        for item in remaining:
            ev = item["event"]
            if needs_parking(state, ev, automation):
                still.append(item)
                continue
            state, _ = _apply_one(state, ev, automation, out, item["partition"], item["offset"], now_ms)
            progress = True
        remaining = still
    return state, remaining


def contact_step(state: dict | None, parked: list[dict] | None, event: dict, automation: dict | None,
                 partition: int, offset: int, now_ms: int | None = None) -> ContactResult:
    """Apply one event of ``enrollments``, ``sends`` or ``internal.to-contacts`` to one key.

    Events parked before this one go first when they can: they arrived first. (A recovery can give
    a key parked events and a known definition before the replayed definition has unparked them;
    a re-enrollment applied ahead of them would be judged against a run whose end is still parked.)
    """
    out = Output()
    drained = False
    if parked and automation is not None:
        state, remaining = _drain(state, parked, automation, out, now_ms)
        drained = len(remaining) != len(parked)
        parked = remaining or None
    if needs_parking(state, event, automation):
        parked = list(parked or [])
        parked.append({"event": event, "partition": partition, "offset": offset})
        return ContactResult(state, parked, drained, True, out)
    new_state, state_changed = _apply_one(state, event, automation, out, partition, offset, now_ms)
    if not parked:
        return ContactResult(new_state, parked, state_changed or drained, drained, out)
    # The enrollment (or the definition) arrived: apply what waited for it.
    new_state, remaining = _drain(new_state, parked, automation, out, now_ms)
    return ContactResult(new_state, remaining or None, True, True, out)


def contact_unpark(state: dict | None, parked: list[dict], automation: dict, now_ms: int | None = None) -> ContactResult:
    """An automation definition became known: apply the key's parked events that can go now."""
    out = Output()
    state, remaining = _drain(state, parked, automation, out, now_ms)
    return ContactResult(state, remaining or None, True, True, out)


def contact_tick(state: dict, automation: dict | None, now_ms: int) -> ContactResult:
    """Wall-clock tick: auto-resume out-of-office pauses whose date has passed."""
    out = Output()
    res = enrollment.tick(state, automation, now_ms)
    if res.changed or res.changes:
        _emit(res, {"occurred_at": now_ms, "type": "tick"}, automation, out, 0, 0)
    return ContactResult(res.state, None, res.changed, False, out)


@dataclass(slots=True)
class MessageResult:
    state: dict | None
    changed: bool
    output: Output


def message_step(state: dict | None, event: dict, partition: int, offset: int) -> MessageResult:
    """Apply one provider event or send registration to one message."""
    out = Output()
    if event["type"] != "message.registered":
        out.add_rows("message_events", [rows.message_event_row(event, partition, offset)])
    res = message.apply(state, event)
    if res.changed:
        view = message.view(res.state)
        if view is not None:
            out.add_rows("messages", [rows.message_row(view, event["occurred_at"])])
    out.changes.extend(res.changes)
    out.add_rows("status_changes", [rows.status_change_row(c) for c in res.changes])
    out.to_contacts.extend(res.outcomes)
    return MessageResult(res.state, res.changed, out)


#: Added to a key's version when its rows are re-emitted after a crash or a failed batch
#: (:func:`contact_snapshot`, :func:`message_snapshot`): larger than the version increments of
#: the uncommitted batches that may have emitted rows before (one per applied event at most).
SNAPSHOT_VERSION_BUMP = 1 << 32


def node_span(automation: dict | None) -> int:
    """The largest step index of a definition + 1 (0 when unknown or empty)."""
    indices = [int(s["index"]) for s in ((automation or {}).get("steps") or ())]
    return max(indices) + 1 if indices else 0


def contact_snapshot(state: dict, automation: dict | None, span: int = 0) -> Output:
    """Every row of an enrollment key, at a version above any it used before.

    Why: rows are emitted per change with the key's version, and a batch's rows are written
    before its state is committed. After a crash (or a failed batch) the replay can interleave
    the same events of different topics otherwise (e.g. a lifecycle fan-out before or after the
    contact's failure); the final state is the same (facts merge), but the intermediate changes
    and their versions are not, so a row of the attempt that crashed can outrank the replay's
    (tests/unit/test_steps.py shows one). Re-emitting the whole key above them settles it:
    enrollment rows of every run, and a row for every node of every run (``none`` where the run
    does not stand), at the key's bumped version (which the state keeps). ``span``: node indices
    to cover beyond the definition's (those of earlier definitions of the automation).
    """
    state["version"] = state.get("version", 0) + SNAPSHOT_VERSION_BUMP
    out = Output()
    views = enrollment.view(state, automation)
    if not views:
        return out
    version = state["version"]
    n_steps = max(node_span(automation), span)
    node_rows = []
    wait_rows = []
    for v in views:
        at = v.get("status_at") or v.get("enrolled_at") or 0
        out.add_rows("enrollments", [rows.enrollment_row(v, at)])
        known = {n["step_index"]: n for n in v["nodes"]}
        aid, cid, rn = v["automation_id"], v["contact_id"], v["run"]
        run_state = state["runs"][rn]
        dw = run_state.get("dw")
        for index in range(max(n_steps, max(known, default=-1) + 1)):
            node = known.get(index)
            node_at = node["at"] if node and node["at"] is not None else at
            if node and node["state"] == "waiting" and dw and dw[0] == index and dw[1] is not None:
                node_at = dw[1]  # the start the wait was written with: replaying the key moves no "since"
            row = rows.node_change_row({
                "automation_id": aid, "contact_id": cid, "run": rn, "step_index": index,
                "to": node["state"] if node else None, "occurred_at": node_at,
            }, version)
            node_rows.append(row)
            # the attempt that crashed may have opened waits the replay does not close: reset the node's
            # waits, then open its current one again (where the next close will find it)
            wait_rows.append(rows.wait_reset_row(aid, cid, rn, index, version))
            if row["state"] == "waiting":
                wait_rows.append(rows.wait_row(aid, cid, rn, index, row["at"], False, version))
                run_state["dw"] = [index, row["at"]]
    out.add_rows("node_states", node_rows)
    out.add_rows("node_waits", wait_rows)
    return out


def message_snapshot(state: dict) -> Output:
    """The message's row at a version above any it used before (see :func:`contact_snapshot`)."""
    state["version"] = state.get("version", 0) + SNAPSHOT_VERSION_BUMP
    out = Output()
    view = message.view(state)
    if view is not None:
        out.add_rows("messages", [rows.message_row(view, view.get("status_at") or 0)])
    return out
