"""Enrollment machine: one state per (automation_id, contact_id), facts merged, status derived.

Implements docs/semantics.md ("Enrollment" and "Node states"). Pure: no I/O, no
clock; time comes from events and from an explicit ``now_ms``.

State layout (plain JSON-serializable dicts and lists; int keys stored as str)::

    {"automation_id", "contact_id",
     "runs": [run, ...],          # oldest first, run["run"] == its position
     "now": ms,                   # monotone max of event times and given now_ms
     "version": int,
     # each of these three only from its first use on (absent: empty)
     "ignored": [event_id, ...],  # ignored enrollments (<= 1000)
     "orphans": [outcome, ...],   # outcomes for runs that do not exist yet (<= 1000)
     "fanouts": [event_id, ...]}  # automation.paused/resumed/archived applied here (<= 100, newest kept)

    run = {"run": n,
           "enrolled": None | {"event_id", "at", "user_id", "name", "email", "company", "attributes"},
           "needs_enrichment": bool,
           "enriched_at": None | ms,                              # earliest
           "terminal": None | [at, event_id, status, reason, step_index, event_type],   # earliest
           "hold": None | [at, event_id, status, reason, resume_at],                  # latest
           "resumed": None | [at, event_id],                                          # latest
           "ap": [at, event_id], "ar": [at, event_id],   # the automation's pause and resume, latest
                                                         # each (absent until the first fan-out)
           "limit": None | [at, event_id, kind],                                      # latest
           "started_at": None | ms,                               # earliest
           "claim_from": None | ms, "last_at": ms,                # run choice of run-less events
           "done": {"k": ms},                                     # per step index earliest
           "max_done": int (-1 when nothing is done),
           "sends": {message_id: step_index},                     # union; per id the earliest send
           "send_at": {message_id: ms},                           # ((at, event_id) order): its step,
           "send_eid": {message_id: event_id},                    # time and event id
           "settled": {message_id: ms},                           # per id earliest
           "archived_at": ms (absent until the automation's archive reached this key; earliest),
           "ds": None | status, "dr": None | reason,              # derivation last emitted
           "dn": None | {"k": node_state},                        # (dn None: nothing emitted yet)
           "dw": None | [step_index, since]}                      # the emitted open wait (absent
                                                                  # until the run's first wait)

Layout choices are about cost: every live state is walked by Python's cycle collector and every
stored one is (de)serialized per event, so empty lists are not stored, and sends and the last
emitted derivation are flat maps and plain values rather than one more list per send and per run
(maps of plain values are not tracked by the collector). States of the earlier layout (``"d":
None | [status, reason, nodes]``, ``"sends": {message_id: [step_index, at, event_id]}``, the three
lists always present) are converted when first read (_upgrade).

The automation's pause is a fact of its own, apart from the contact's hold: resuming the
automation ends its pause and leaves the contact's own hold (out of office, bounce, manual pause,
not sent) in place; resuming the contact does not end the automation's pause. States written
before that kept the automation's pause as their hold (reason ``automation_paused``): such a hold
is also released by the automation's resume (_released).

Auto-resume (out-of-office) is *derived*: a hold whose ``resume_at <= now`` is
not active. ``now`` only grows, so this is order-independent (see the module
report / DECISIONS below).
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from schemas.statuses import ENDED, WAITING

from .common import change_hasher, later, max_opt

__all__ = ["Result", "apply", "tick", "next_resume_at", "view", "key_of", "AUTO_RESUME_TYPE"]

AUTO_RESUME_TYPE = "contact.auto_resumed"
IGNORED_CAP = 1000
ORPHAN_CAP = 1000
FANOUT_CAP = 100


@dataclass(slots=True)
class Result:
    state: dict
    changed: bool
    changes: list
    registrations: list
    # Steps of a run sent more than once, as (run, step_index, message_ids, verify): a message registered
    # while other messages of the run have its step gives its id and theirs (verify False); a message
    # whose step changes (an earlier report of it said another step) gives its old and new step with
    # verify True and no ids: the ids registered at those steps are then read from send_index.
    # Every step that got two messages registered in a run is named, and for a step never named with
    # verify the union of the ids named is exactly the messages registered at it.
    repeats: list | tuple = ()
    # Waits that opened or closed, as (run, step_index, since, closed): a node that starts waiting opens
    # one (since: the change's time, the ``at`` of its node_states row); a node that stops waiting
    # closes the one it opened (since None when unknown: a state emitted before the engine kept it).
    waits: list | tuple = ()


def key_of(event: dict) -> str:
    return f"{event['automation_id']}\x1f{event['contact_id']}"


# --------------------------------------------------------------------------- automation steps

_steps_cache: dict = {}


def _steps(automation):
    """Step info of an automation, or None when it is unknown, computed once per automation object:

    (sorted step indices, last index, archived_at, {index or -1: (next index, its str) or None}, str(last),
    paused_at).
    The map gives the node after the last done one (_current) without a bisect for every known index.
    """
    if automation is None:
        return None
    hit = _steps_cache.get(id(automation))
    if hit is not None and hit[0] is automation:
        return hit[1]
    idx = sorted({int(s["index"]) for s in (automation.get("steps") or ())})
    nxt = {}
    for pos, m in enumerate([-1] + idx):
        nxt[m] = (idx[pos], str(idx[pos])) if pos < len(idx) else None
    last = idx[-1] if idx else None
    info = (idx, last, automation.get("archived_at"), nxt, None if last is None else str(last),
            automation.get("paused_at"))
    if len(_steps_cache) > 512:
        _steps_cache.clear()
    _steps_cache[id(automation)] = (automation, info)
    return info


# --------------------------------------------------------------------------- state construction

def _new_state(event: dict) -> dict:
    return {
        "automation_id": event.get("automation_id"),
        "contact_id": event.get("contact_id"),
        "runs": [],
        "now": 0,
        "version": 0,
    }


def _upgrade(state: dict) -> None:
    """Convert a state of the earlier layout (``d`` per run) in place; see the module docstring."""
    for run in state["runs"]:
        if "d" in run:
            d = run.pop("d")
            run["ds"], run["dr"], run["dn"] = d if d is not None else (None, None, None)
            sends = run["sends"]
            run["sends"] = {mid: s[0] for mid, s in sends.items()}
            run["send_at"] = {mid: s[1] for mid, s in sends.items()}
            run["send_eid"] = {mid: s[2] for mid, s in sends.items()}


def _blank_run(n: int) -> dict:
    return {
        "run": n,
        "enrolled": None,
        "needs_enrichment": False,
        "enriched_at": None,
        "terminal": None,
        "hold": None,
        "resumed": None,
        "limit": None,
        "started_at": None,
        "claim_from": None,
        "last_at": -1,
        "done": {},
        "max_done": -1,
        "sends": {},
        "send_at": {},
        "send_eid": {},
        "settled": {},
        "ds": None,
        "dr": None,
        "dn": None,
    }


def _add_run(state: dict) -> dict:
    runs = state["runs"]
    run = _blank_run(len(runs))
    runs.append(run)
    orphans = state.get("orphans")
    if orphans:
        keep = []
        n = run["run"]
        for ev in orphans:
            if ev.get("run") == n:
                _merge_outcome(run, ev)
            else:
                keep.append(ev)
        state["orphans"] = keep
    return run


def _latest(state: dict, at: int) -> dict:
    """The run a contact/step event (which carries no run) belongs to.

    The latest run whose ``claim_from`` is at or before the event's time (run 0
    claims from the beginning of time). A re-enrollment run claims from
    max(its enrollment time, 1 + the latest event time already applied to the
    previous run), fixed at creation. With one run (the usual case) that is
    the latest run, as the doc says; with several, a late event of an older run
    does not leak into a newer one, and a replayed event always finds the run
    it was first applied to (replay stays a no-op).
    """
    runs = state["runs"]
    if not runs:
        return _add_run(state)
    if len(runs) == 1:
        return runs[0]
    for run in reversed(runs):
        cf = run["claim_from"]
        if cf is None or cf <= at:
            return run
    return runs[0]


# --------------------------------------------------------------------------- fact merges (each returns True if it changed)

def _set_terminal(run, at, eid, status, reason, step_index, etype) -> bool:
    cur = run["terminal"]
    if cur is None or at < cur[0] or (at == cur[0] and eid < cur[1]):
        run["terminal"] = [at, eid, status, reason, step_index, etype]
        return True
    return False


def _set_hold(run, at, eid, status, reason, resume_at) -> bool:
    cur = run["hold"]
    if cur is None or at > cur[0] or (at == cur[0] and eid > cur[1]):
        run["hold"] = [at, eid, status, reason, resume_at]
        return True
    return False


def _set_latest(run, name, at, eid) -> bool:
    """Keep the later (at, event_id) as ``run[name]`` (contact.resumed, the automation's pause and resume)."""
    cur = run.get(name)
    if cur is None or at > cur[0] or (at == cur[0] and eid > cur[1]):
        run[name] = [at, eid]
        return True
    return False


def _set_limit(run, at, eid, kind) -> bool:
    cur = run["limit"]
    if cur is None or at > cur[0] or (at == cur[0] and eid > cur[1]):
        run["limit"] = [at, eid, kind]
        return True
    return False


def _set_started(run, at) -> bool:
    cur = run["started_at"]
    if cur is None or at < cur:
        run["started_at"] = at
        return True
    return False


def _merge_outcome(run, ev) -> bool:
    t = ev["type"]
    at = ev["occurred_at"]
    eid = ev["event_id"]
    if t == "outcome.settled":
        mid = ev.get("message_id")
        settled = run["settled"]
        if mid in settled and settled[mid] <= at:
            return False
        settled[mid] = at
        return True
    if t == "outcome.bounced":
        return _set_hold(run, at, eid, "bounced", ev.get("reason") or "hard_bounce", None)
    if t == "outcome.auto_replied":
        return _set_hold(run, at, eid, "paused", "out_of_office", ev.get("return_at"))
    if t == "outcome.unsubscribed":
        return _set_terminal(run, at, eid, "unsubscribed", "unsubscribed", ev.get("step_index"), t)
    if t == "outcome.replied":
        return _set_terminal(run, at, eid, "finished", "replied", ev.get("step_index"), t)
    return False


# --------------------------------------------------------------------------- derivation

def _hold_active(h, resumed, now) -> bool:
    if resumed is not None and not later(h, resumed):
        return False
    ra = h[4]
    return ra is None or ra > now


def _released(run, h):
    """What releases the contact's hold ``h``: the latest ``contact.resumed``; for a hold of the
    earlier layout that is the automation's pause (reason automation_paused), the automation's
    resume too."""
    r = run["resumed"]
    if h[3] == "automation_paused":
        ar = run.get("ar")
        if ar is not None and (r is None or later(ar, r)):
            return ar
    return r


def _held(run, now, steps):
    """(at, event_id, status, reason, resume_at) of what holds the run, or None: the contact's active
    hold or the automation's active pause, the later of the two when both are.

    The automation's pause is active on a run when the fan-out paused it and no later resume
    reached it, or when the definition says the automation is paused now (``paused_at``, from the
    worker's replica) and the run has not completed its steps: that covers runs whose events came
    after the fan-out (enrolled while the automation is paused, or reordered past it)."""
    h = run["hold"]
    if h is not None and not _hold_active(h, _released(run, h), now):
        h = None
    ap = run.get("ap")
    if ap is not None:
        ar = run.get("ar")
        if ar is not None and not later(ap, ar):
            ap = None
    if steps is not None and steps[5] is not None and (ap is None or steps[5] < ap[0]) and not (
            steps[1] is not None and run["max_done"] >= steps[1] and steps[4] in run["done"]):
        ap = [steps[5], ""]
    if ap is not None and (h is None or later(ap, h)):
        return [ap[0], ap[1], "paused", "automation_paused", None]
    return h


def _archive_terminal(run, steps):
    """The archive's effect on a run, derived from facts so that it does not depend on arrival order.

    An automation archived at ``archived_at`` ends every run that had not ended
    by then: ``failed`` when a send made before the archive had no settled
    outcome (delivered, bounced, dropped) by then — a step in flight —, else
    ``canceled``. A run that completed (and is not held) is not touched: see _status.
    """
    archived_at = run.get("archived_at")
    if steps is not None and steps[2] is not None and (archived_at is None or steps[2] < archived_at):
        archived_at = steps[2]
    if archived_at is None:
        return None
    settled = run["settled"]
    sends = run.get("send_at")
    if sends is None:  # earlier layout, read by view() without converting (see _upgrade)
        sends = {mid: send[1] for mid, send in run["sends"].items()}
    in_flight = False
    for mid, sent_at in sends.items():
        if sent_at <= archived_at:
            settled_at = settled.get(mid)
            if settled_at is None or settled_at > archived_at:
                in_flight = True
                break
    status = "failed" if in_flight else "canceled"
    return [archived_at, "automation.archived", status, "automation_archived", None, "automation.archived"]


def _status(run, steps, now):
    """(status, reason, source) of a run; source: a(rchived) t(erminal) h(old) c(ompleted) w l p r."""
    t = run["terminal"]
    arch = _archive_terminal(run, steps)
    if arch is not None and (t is None or later(t, arch)):
        inner = _open_status(run, steps, now)
        if inner[2] == "c":
            return inner  # finished all its steps: nothing left for the archive to end
        return arch[2], arch[3], "a"
    if t is not None:
        return t[2], t[3], "t"
    return _open_status(run, steps, now)


def _open_status(run, steps, now):
    """Status of a run without a terminal fact (rules 2-7 of docs/semantics.md)."""
    h = _held(run, now, steps)
    if h is not None:
        return h[2], h[3], "h"
    if steps is not None and steps[1] is not None and run["max_done"] >= steps[1] and steps[4] in run["done"]:
        return "finished", "completed", "c"
    if run["needs_enrichment"] and run["enriched_at"] is None:
        return "waiting_enrichment", None, "w"
    lim = run["limit"]
    if lim is not None and lim[2] is not None:
        return ("coworkers_limit" if lim[2] == "coworkers" else "active_limit"), None, "l"
    if run["started_at"] is not None:
        return "in_progress", None, "p"
    return "ready", None, "r"


def _current(run, steps):
    """Index of the node the run stands at, or None (no steps left / filtered / none known)."""
    t = run["terminal"]
    if t is not None and t[5] == "step.filtered":
        return None
    m = run["max_done"]
    if steps is None:
        return m + 1
    idx = steps[0]
    pos = bisect_right(idx, m)
    return idx[pos] if pos < len(idx) else None


def _nodes(run, steps, status) -> dict:
    nodes = dict.fromkeys(run["done"], "done")
    t = run["terminal"]
    if t is not None and t[5] == "step.filtered":
        if t[4] is not None:
            nodes[str(t[4])] = "filtered"
        return nodes
    c = _current(run, steps)
    if c is not None:
        nodes[str(c)] = "waiting" if status in WAITING else "stopped"
    return nodes


def _refresh(state, run, steps, now, eid, etype, at, out, waits) -> bool:
    """Re-derive a run; append the changes against the last emitted derivation. True if it differs.

    The waits the node changes open and close (``Result.waits``, see _waits) go to ``waits``.

    Same derivation as _status and _nodes (inlined, _open_status and _hold_active included: this
    runs for most events).
    """
    t = run["terminal"]
    if (steps is not None and steps[2] is not None) or "archived_at" in run:
        status, reason, _src = _status(run, steps, now)
    elif t is not None:
        status = t[2]
        reason = t[3]
    else:
        if "ap" in run or (steps is not None and steps[5] is not None):
            h = _held(run, now, steps)
        else:  # no pause of the automation: the contact's own hold only (as _held)
            h = run["hold"]
            if h is not None:
                r = run["resumed"] if h[3] != "automation_paused" else _released(run, h)
                if not ((r is None or h[0] > r[0] or (h[0] == r[0] and h[1] > r[1])) and (
                        h[4] is None or h[4] > now)):
                    h = None
        if h is not None:
            status = h[2]
            reason = h[3]
        elif steps is not None and steps[1] is not None and run["max_done"] >= steps[1] and steps[4] in run["done"]:
            status = "finished"
            reason = "completed"
        else:
            reason = None
            if run["needs_enrichment"] and run["enriched_at"] is None:
                status = "waiting_enrichment"
            else:
                lim = run["limit"]
                if lim is not None and lim[2] is not None:
                    status = "coworkers_limit" if lim[2] == "coworkers" else "active_limit"
                elif run["started_at"] is not None:
                    status = "in_progress"
                else:
                    status = "ready"
    done = run["done"]
    nodes = dict.fromkeys(done, "done")
    if t is not None and t[5] == "step.filtered":
        if t[4] is not None:
            nodes[str(t[4])] = "filtered"
    else:
        m = run["max_done"]
        if steps is None:
            nodes[str(m + 1)] = "waiting" if status in WAITING else "stopped"
        else:
            nx = steps[3].get(m, _MISSING)
            if nx is _MISSING:
                idx = steps[0]
                pos = bisect_right(idx, m)
                nx = (idx[pos], str(idx[pos])) if pos < len(idx) else None
            if nx is not None:
                nodes[nx[1]] = "waiting" if status in WAITING else "stopped"
    onodes = run["dn"]
    ostatus = run["ds"]
    oreason = run["dr"]
    if onodes is None:  # nothing emitted yet
        onodes = {}
    elif ostatus == status and oreason == reason and onodes == nodes:
        return False
    run["ds"] = status
    run["dr"] = reason
    run["dn"] = nodes
    aid = state["automation_id"]
    cid = state["contact_id"]
    rn = run["run"]
    if ostatus != status or oreason != reason:
        h = change_hasher()
        h.update(f"{eid}\x1fcontact_status\x1f{aid}\x1f{cid}\x1f{rn}\x1fNone\x1fNone\x1f{status}".encode())
        out.append({
            "kind": "contact_status", "automation_id": aid, "contact_id": cid, "run": rn, "step_index": None,
            "message_id": None, "from": ostatus, "to": status, "reason": reason,
            "event_id": eid, "event_type": etype, "occurred_at": at, "change_id": h.hexdigest(),
        })
    if onodes != nodes:
        # nodes entered or changed, then nodes left; in step order
        get = onodes.get
        diff = [k for k, v in nodes.items() if get(k) != v]
        if not onodes.keys() <= nodes.keys():
            diff.extend(onodes.keys() - nodes.keys())
        if len(diff) > 1:
            diff.sort(key=int)
        prefix = f"{eid}\x1fnode_state\x1f{aid}\x1f{cid}\x1f{rn}\x1f"
        opened = left = None
        for k in diff:
            to = nodes.get(k) or "none"
            ki = int(k)
            if to == "waiting":
                opened = ki
            elif get(k) == "waiting":
                left = ki
            h = change_hasher()
            h.update(f"{prefix}{ki}\x1fNone\x1f{to}".encode())
            out.append({
                "kind": "node_state", "automation_id": aid, "contact_id": cid, "run": rn, "step_index": ki,
                "message_id": None, "from": get(k), "to": to,
                "reason": reason if (to == "stopped" or to == "filtered") else None,
                "event_id": eid, "event_type": etype, "occurred_at": at, "change_id": h.hexdigest(),
            })
        if opened is not None or left is not None:
            _waits(run, rn, opened, left, at, waits)
    return True


def _waits(run, rn, opened, left, at, waits) -> None:
    """The waits of a node change of run ``rn``: the node ``left`` stopped waiting, ``opened`` started.

    ``run["dw"]`` is the open wait, ``[step_index, since]``: a node that leaves closes it (a node
    whose wait is not known there, a state from before the engine kept it, gives since None: its
    reset), and a new wait closes one the change did not (a run waits at one node at a time).
    """
    dw = run.get("dw")
    if left is not None:
        if dw is not None and dw[0] == left:
            waits.append((rn, left, dw[1], True))
            dw = None
        else:
            waits.append((rn, left, None, True))
    if opened is not None:
        if dw is not None:
            waits.append((rn, dw[0], dw[1], True))
        dw = [opened, at]
        waits.append((rn, opened, at, False))
    run["dw"] = dw


_MISSING = object()


# --------------------------------------------------------------------------- event handlers
# Contact and step events carry no run: the engine picks it (_latest) and hands it to their handler,
# ``handler(run, event, regs)``, which returns 0 (no fact changed), _CHANGED (a fact changed that the
# derivation does not see) or _REFRESH (re-derive the run). The others (enrollments, outcomes,
# fan-outs) return (facts_changed, runs_touched).

_NONE = ()
_CHANGED = 1
_REFRESH = 2


def _h_enrolled(state, ev, automation, steps, now, regs, run):
    eid = ev["event_id"]
    runs = state["runs"]
    for r in runs:
        e = r["enrolled"]
        if e is not None and e["event_id"] == eid:
            return False, _NONE
    ignored = state.get("ignored")
    if ignored and eid in ignored:
        return False, _NONE
    if runs and runs[-1]["enrolled"] is None:
        run = runs[-1]
    elif not runs:
        run = _add_run(state)
    else:
        latest = runs[-1]
        status = _status(latest, steps, now)[0]
        if status in ENDED and automation is not None and automation.get("participation") == "unlimited":
            run = _add_run(state)
            run["claim_from"] = max(ev["occurred_at"], latest["last_at"] + 1)
        else:
            if ignored is None:
                state["ignored"] = ignored = []
            if len(ignored) < IGNORED_CAP:
                ignored.append(eid)
                return True, _NONE
            return False, _NONE
    g = ev.get
    run["enrolled"] = {
        "event_id": eid,
        "at": ev["occurred_at"],
        "user_id": g("user_id"),
        "name": g("name"),
        "email": g("email"),
        "company": g("company"),
        "attributes": g("attributes") or {},
    }
    run["needs_enrichment"] = bool(g("needs_enrichment"))
    return True, (run,)


def _h_enriched(run, ev, regs):
    at = ev["occurred_at"]
    cur = run["enriched_at"]
    if cur is None or at < cur:
        run["enriched_at"] = at
        return _REFRESH
    return 0


def _terminal_handler(status, fixed_reason, default_reason):
    def handler(run, ev, regs):
        reason = fixed_reason or ev.get("reason") or default_reason
        if _set_terminal(run, ev["occurred_at"], ev["event_id"], status, reason, None, ev["type"]):
            return _REFRESH
        return 0
    return handler


def _h_limit_reached(run, ev, regs):
    return _REFRESH if _set_limit(run, ev["occurred_at"], ev["event_id"], ev.get("limit") or "active") else 0


def _h_limit_released(run, ev, regs):
    return _REFRESH if _set_limit(run, ev["occurred_at"], ev["event_id"], None) else 0


def _h_paused(run, ev, regs):
    if _set_hold(run, ev["occurred_at"], ev["event_id"], "paused", ev.get("reason") or "manual", ev.get("resume_at")):
        return _REFRESH
    return 0


def _h_resumed(run, ev, regs):
    return _REFRESH if _set_latest(run, "resumed", ev["occurred_at"], ev["event_id"]) else 0


def _h_scheduled(run, ev, regs):
    at = ev["occurred_at"]
    cur = run["started_at"]
    if cur is None:
        run["started_at"] = at
        return _REFRESH
    if at < cur:  # an earlier start: the derivation only depends on whether the run started
        run["started_at"] = at
        return _CHANGED
    return 0


def _h_sent(run, ev, regs):
    at = ev["occurred_at"]
    k = int(ev["step_index"])
    cur = run["started_at"]
    if cur is None or at < cur:
        run["started_at"] = at
        changed = _REFRESH
    else:
        changed = 0
    done = run["done"]
    sk = str(k)
    cur = done.get(sk)
    if cur is None or at < cur:
        done[sk] = at
        if k > run["max_done"]:
            run["max_done"] = k
        changed = _REFRESH
    mid = ev["message_id"]
    send_at = run["send_at"]
    s = send_at.get(mid)
    if s is None:
        eid = ev["event_id"]
        run["sends"][mid] = k
        send_at[mid] = at
        run["send_eid"][mid] = eid
        aid = ev["automation_id"]
        enrolled = run["enrolled"]
        g = ev.get
        regs.append({
            "event_id": eid,
            "type": "message.registered",
            "occurred_at": at,
            "schema_version": 1,
            "message_id": mid,
            "automation_id": aid,
            "contact_id": ev["contact_id"],
            "run": run["run"],
            "step_index": k,
            "mailing_id": g("mailing_id") or f"{aid}:{k}",
            "subject": g("subject"),
            "sending_user": g("sending_user"),
            "sending_email": g("sending_email"),
            "email": None if enrolled is None else enrolled.get("email"),
            "name": None if enrolled is None else enrolled.get("name"),
            "channel": g("channel") or "email",
        })
        return _REFRESH
    if at < s:
        eid = ev["event_id"]
    elif at == s and (eid := ev["event_id"]) < run["send_eid"][mid]:
        pass
    else:
        return changed
    run["sends"][mid] = k
    send_at[mid] = at
    run["send_eid"][mid] = eid
    return _REFRESH


def _repeats(run, mid, step_before) -> list | tuple:
    """``Result.repeats`` of a ``step.sent`` of message ``mid`` (its step before: ``step_before``)."""
    sends = run["sends"]
    step = sends.get(mid)
    if step_before is None:  # registered now (or not at all: a send the run's choice did not take)
        if step is None:
            return ()
        ids = [other for other, s in sends.items() if s == step]
        return [(run["run"], step, sorted(ids), False)] if len(ids) > 1 else ()
    if step != step_before:
        return [(run["run"], step_before, (), True), (run["run"], step, (), True)]
    return ()


def _h_filtered(run, ev, regs):
    at = ev["occurred_at"]
    changed = _set_started(run, at)
    k = ev.get("step_index")
    if _set_terminal(run, at, ev["event_id"], "finished", "filtered", None if k is None else int(k), "step.filtered"):
        changed = True
    return _REFRESH if changed else 0


def _h_not_sent(run, ev, regs):
    at = ev["occurred_at"]
    changed = _set_started(run, at)
    if _set_hold(run, at, ev["event_id"], "not_sent", ev.get("reason") or "not_sent", None):
        changed = True
    return _REFRESH if changed else 0


def _h_step_failed(run, ev, regs):
    at = ev["occurred_at"]
    changed = _set_started(run, at)
    k = ev.get("step_index")
    if _set_terminal(run, at, ev["event_id"], "failed", ev.get("reason") or "step_failed",
                     None if k is None else int(k), "step.failed"):
        changed = True
    return _REFRESH if changed else 0


def _h_outcome(state, ev, automation, steps, now, regs, run):
    runs = state["runs"]
    n = ev.get("run")
    if n is None:
        run = runs[-1] if runs else None
    else:
        n = int(n)
        run = runs[n] if 0 <= n < len(runs) else None
    if run is None:
        orphans = state.get("orphans")
        if orphans is None:
            state["orphans"] = orphans = []
        eid = ev["event_id"]
        for o in orphans:
            if o["event_id"] == eid:
                return False, _NONE
        if len(orphans) >= ORPHAN_CAP:
            return False, _NONE
        orphans.append({
            "event_id": eid, "type": ev["type"], "occurred_at": ev["occurred_at"],
            "run": n, "step_index": ev.get("step_index"), "message_id": ev.get("message_id"),
            "reason": ev.get("reason"), "return_at": ev.get("return_at"),
        })
        return True, _NONE
    if ev["type"] == "outcome.settled":  # as _merge_outcome
        mid = ev.get("message_id")
        at = ev["occurred_at"]
        settled = run["settled"]
        cur = settled.get(mid, _MISSING)
        if cur is not _MISSING and cur <= at:
            return False, _NONE
        settled[mid] = at
        if "archived_at" not in run and (steps is None or steps[2] is None) and run["dn"] is not None:
            return True, _NONE  # settled outcomes only matter to an archive (_archive_terminal): none here
        return True, (run,)
    if _merge_outcome(run, ev):
        return True, (run,)
    return False, _NONE


def _open_runs(state, steps, now):
    return [r for r in state["runs"] if _status(r, steps, now)[0] not in ENDED]


def _h_automation_paused(state, ev, automation, steps, now, regs, run):
    """The automation's pause holds the runs open when it is processed (an ended run stays ended)."""
    touched = []
    for run in _open_runs(state, steps, now):
        if _set_latest(run, "ap", ev["occurred_at"], ev["event_id"]):
            touched.append(run)
    return bool(touched), touched


def _h_automation_resumed(state, ev, automation, steps, now, regs, run):
    """The automation's resume ends its pause on every run (on an ended one it changes nothing
    visible); the contacts' own holds stay."""
    touched = []
    for run in state["runs"]:
        if _set_latest(run, "ar", ev["occurred_at"], ev["event_id"]):
            touched.append(run)
    return bool(touched), touched


def _h_automation_archived(state, ev, automation, steps, now, regs, run):
    """Record the archive time on every run (earliest wins); its effect is derived (_archive_terminal)."""
    at = ev["occurred_at"]
    touched = []
    for run in state["runs"]:
        current = run.get("archived_at")
        if current is None or at < current:
            run["archived_at"] = at
            touched.append(run)
    return bool(touched), touched


# Contact and step events (they carry no run, the engine picks it: _latest).
_RUN_HANDLERS = {
    "contact.enriched": _h_enriched,
    "contact.enrichment_failed": _terminal_handler("failed", None, "enrichment_failed"),
    "contact.duplicate": _terminal_handler("duplicate", "duplicate", None),
    "contact.finished": _terminal_handler("finished", None, "manual"),
    "contact.canceled": _terminal_handler("canceled", None, "manual"),
    "contact.failed": _terminal_handler("failed", None, "unknown"),
    "contact.removed": _terminal_handler("canceled", "removed", None),
    "contact.limit_reached": _h_limit_reached,
    "contact.limit_released": _h_limit_released,
    "contact.paused": _h_paused,
    "contact.resumed": _h_resumed,
    "step.scheduled": _h_scheduled,
    "step.sent": _h_sent,
    "step.filtered": _h_filtered,
    "step.not_sent": _h_not_sent,
    "step.failed": _h_step_failed,
}

_HANDLERS = {
    "contact.enrolled": _h_enrolled,
    "outcome.settled": _h_outcome,
    "outcome.bounced": _h_outcome,
    "outcome.unsubscribed": _h_outcome,
    "outcome.replied": _h_outcome,
    "outcome.auto_replied": _h_outcome,
    "automation.paused": _h_automation_paused,
    "automation.resumed": _h_automation_resumed,
    "automation.archived": _h_automation_archived,
}

_FAN_OUT = frozenset({"automation.paused", "automation.resumed", "automation.archived"})


def _fan_out(inner):
    """Fan-outs apply to the runs open when processed; their ids are kept so a replay is a no-op."""
    def handler(state, ev, automation, steps, now, regs, run):
        seen = state.get("fanouts")
        eid = ev["event_id"]
        if seen is None:
            state["fanouts"] = seen = []
        elif eid in seen:
            return False, _NONE
        seen.append(eid)
        if len(seen) > FANOUT_CAP:
            del seen[0]
        _changed, touched = inner(state, ev, automation, steps, now, regs, None)
        return True, touched
    return handler


for _t in _FAN_OUT:
    _HANDLERS[_t] = _fan_out(_HANDLERS[_t])


# --------------------------------------------------------------------------- API

def _auto_resume(state, steps, old_now, now, out, waits, inclusive_all=False) -> bool:
    changed = False
    for run in state["runs"]:
        h = run["hold"]
        if h is None:
            continue
        ra = h[4]
        if ra is not None and ra <= now and (inclusive_all or ra > old_now):
            if _refresh(state, run, steps, now, "auto:" + h[1], AUTO_RESUME_TYPE, ra, out, waits):
                changed = True
    return changed


def apply(state: dict | None, event: dict, automation: dict | None, now_ms: int | None = None) -> Result:
    etype = event["type"]
    if state is None:
        state = _new_state(event)
        runs = state["runs"]
    else:
        runs = state["runs"]
        if runs and "d" in runs[0]:
            _upgrade(state)
    at = event["occurred_at"]
    old_now = state["now"]
    now = at if at > old_now else old_now
    if now_ms is not None and now_ms > now:
        now = now_ms
    run_handler = _RUN_HANDLERS.get(etype)
    if run_handler is None:
        handler = _HANDLERS.get(etype)
        if handler is None:
            state["now"] = now
            return Result(state, False, [], [])
    if automation is None:
        steps = None
    else:
        hit = _steps_cache.get(id(automation))
        steps = hit[1] if hit is not None and hit[0] is automation else _steps(automation)
    changes: list = []
    regs: list = []
    waits: list = []
    changed = False
    if now != old_now:
        state["now"] = now
        for r in runs:
            h = r["hold"]
            if h is not None:  # auto-resume holds whose resume_at passed (as _auto_resume)
                ra = h[4]
                if ra is not None and old_now < ra <= now:
                    if _refresh(state, r, steps, now, "auto:" + h[1], AUTO_RESUME_TYPE, ra, changes, waits):
                        changed = True
    repeats: list | tuple = ()
    if run_handler is not None:
        n_runs = len(runs)
        run = runs[0] if n_runs == 1 else _latest(state, at)
        if run_handler is _h_sent:
            mid = event["message_id"]
            step_before = run["sends"].get(mid)
            code = _h_sent(run, event, regs)
            repeats = _repeats(run, mid, step_before)
        else:
            code = run_handler(run, event, regs)
        if len(runs) != n_runs:  # _latest created the run (maybe with orphan outcomes merged into it)
            code = _REFRESH
        if at > run["last_at"]:
            run["last_at"] = at
            changed = True
        if code:
            changed = True
            if code == _REFRESH:
                _refresh(state, run, steps, now, event["event_id"], etype, at, changes, waits)
    else:
        n_runs = len(runs)
        facts_changed, touched = handler(state, event, automation, steps, now, regs, None)
        if len(runs) != n_runs:  # a run was created (maybe with orphan outcomes merged into it)
            facts_changed = True
            touched = list(touched)
            for r in runs[n_runs:]:
                if r not in touched:
                    touched.append(r)
        if facts_changed:
            changed = True
            if touched:
                eid = event["event_id"]
                for r in touched:
                    _refresh(state, r, steps, now, eid, etype, at, changes, waits)
    if changed:
        state["version"] += 1
    return Result(state, changed, changes, regs, repeats, waits)


def tick(state: dict, automation: dict | None, now_ms: int) -> Result:
    """Wall-clock timer: auto-resume holds whose ``resume_at <= now_ms``."""
    runs = state["runs"]
    if runs and "d" in runs[0]:
        _upgrade(state)
    old_now = state["now"]
    now = now_ms if now_ms > old_now else old_now
    state["now"] = now
    changes: list = []
    waits: list = []
    changed = _auto_resume(state, _steps(automation), old_now, now, changes, waits, inclusive_all=True)
    if changed:
        state["version"] += 1
    return Result(state, changed, changes, [], (), waits)


def next_resume_at(state: dict) -> int | None:
    """Earliest ``resume_at`` of an active hold (a run with no terminal fact), for a timer index."""
    now = state["now"]
    best = None
    for run in state["runs"]:
        h = run["hold"]
        if h is None or h[4] is None or run["terminal"] is not None:
            continue
        if _hold_active(h, _released(run, h), now) and (best is None or h[4] < best):
            best = h[4]
    return best


def _status_at(run, src, now, steps=None):
    """Since when the run has its status, for every source but a hold (the held fact's own time)."""
    if src == "a":
        return _archive_terminal(run, steps)[0]
    t = run["terminal"]
    if src == "t":
        return t[0]
    h = run["hold"]
    res = run["resumed"]
    rel = res[0] if res is not None else None
    if h is not None and h[4] is not None and h[4] <= now and (res is None or later(h, res)):
        rel = max_opt(rel, h[4])
    ar = run.get("ar")
    if ar is not None:
        ap = run.get("ap")
        if ap is not None:
            ended_pause = later(ar, ap)
        else:
            # No pause fact: the run had ended or completed its steps when the fan-out paused the
            # others (the resume changed nothing for it), or only the definition paused it (it was
            # enrolled during the pause, or its events came after the fan-out).
            ended_pause = src != "c" or (h is not None and h[3] == "automation_paused" and later(ar, h))
        if ended_pause:
            rel = max_opt(rel, ar[0])  # the automation's resume ended its pause
    lim = run["limit"]
    lim_at = lim[0] if lim is not None else None
    enrolled = run["enrolled"]
    enrolled_at = enrolled["at"] if enrolled is not None else None
    if src == "c":
        done = run["done"]
        return max_opt(max(done.values()) if done else None, rel)
    if src == "w":
        return max_opt(enrolled_at, rel)
    if src == "l":
        return max_opt(lim_at, rel)
    if src == "p":
        return max_opt(run["started_at"], run["enriched_at"], lim_at, rel)
    return max_opt(enrolled_at, run["enriched_at"], lim_at, rel)


def view(state: dict, automation: dict | None) -> list[dict]:
    """One dict per run (see the module docstring of the API in docs)."""
    steps = _steps(automation)
    now = state["now"]
    out = []
    ignored = len(state.get("ignored") or ())
    for run in state["runs"]:
        status, reason, src = _status(run, steps, now)
        if src == "h":
            # held since the hold's time; it resumes by itself at the hold's resume date (out of
            # office with a return date, a pause with a resume date); the automation's pause has
            # none: it lasts until the automation is resumed
            held = _held(run, now, steps)
            status_at, resume_at = held[0], held[4]
        else:
            status_at = _status_at(run, src, now, steps)
            resume_at = None
        done = run["done"]
        nodes = []
        for k in sorted(done, key=int):
            nodes.append({"step_index": int(k), "state": "done", "at": done[k]})
        t = run["terminal"]
        current = -1
        if t is not None and t[5] == "step.filtered":
            if t[4] is not None:
                k = t[4]
                nodes = [n for n in nodes if n["step_index"] != k]
                nodes.append({"step_index": k, "state": "filtered", "at": t[0]})
                nodes.sort(key=lambda n: n["step_index"])
        else:
            c = _current(run, steps)
            if c is not None:
                current = c
                prev = done.get(str(run["max_done"])) if run["max_done"] >= 0 else None
                nodes.append({
                    "step_index": c,
                    "state": "waiting" if status in WAITING else "stopped",
                    "at": max_opt(status_at, prev),
                })
        e = run["enrolled"] or {}
        out.append({
            "automation_id": state["automation_id"],
            "contact_id": state["contact_id"],
            "run": run["run"],
            "status": status,
            "reason": reason,
            "status_at": status_at,
            "resume_at": resume_at,
            "current_step": current,
            "nodes": nodes,
            "enrolled_at": e.get("at"),
            "user_id": e.get("user_id"),
            "name": e.get("name"),
            "email": e.get("email"),
            "company": e.get("company"),
            "attributes": e.get("attributes") or {},
            "ignored_enrollments": ignored,
            "version": state["version"],
        })
    return out
