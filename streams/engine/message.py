"""Message machine: one state per message_id, provider facts merged, status derived.

Implements docs/semantics.md ("Message"). Pure: no I/O, no clock.

State layout (JSON-serializable)::

    {"message_id",
     "send": None | {automation_id, contact_id, run, step_index, mailing_id, subject, sending_user,
                     sending_email, email, name, channel, at, event_id},   # first one kept
     "f": {flag: [at, event_id]},            # earliest per flag (implied flags included)
     "bounce": {class: [at, event_id]},      # earliest per bounce class (hard/block/soft/unknown)
     "auto": None | [at, event_id, return_at],   # earliest auto-reply
     "opens": {event_id: 1}, "clicks": {event_id: 1},   # <= 10,000 each
     "email": first provider-reported address (fallback for the row),
     "status": status last emitted (None until the send is known),
     "version": int}
"""
from __future__ import annotations

from dataclasses import dataclass

from .common import make_change

__all__ = ["Result", "apply", "view", "key_of", "STATUS_ORDER"]

COUNT_CAP = 10_000

# Highest first.
STATUS_ORDER = ("dropped", "bounced", "spam_reported", "unsubscribed", "clicked", "opened",
                "delivered", "deferred", "sent")
FLAGS = ("sent", "delivered", "deferred", "opened", "clicked", "bounced", "dropped", "spam_reported",
         "unsubscribed", "resubscribed", "replied", "auto_replied")
_BOUNCE_SEVERITY = ("hard", "block", "soft")

_TYPE_FLAG = {
    "message.sent": "sent",
    "message.delivered": "delivered",
    "message.deferred": "deferred",
    "message.bounced": "bounced",
    "message.dropped": "dropped",
    "message.opened": "opened",
    "message.clicked": "clicked",
    "message.spam_reported": "spam_reported",
    "message.unsubscribed": "unsubscribed",
    "message.resubscribed": "resubscribed",
    "message.replied": "replied",
    "message.auto_replied": "auto_replied",
}
# Provider event types that cannot change an outcome (skip the outcome comparison).
_NO_OUTCOME = frozenset({"message.sent", "message.deferred", "message.resubscribed"})

_SEND_FIELDS = ("automation_id", "contact_id", "run", "step_index", "mailing_id", "subject", "sending_user",
                "sending_email", "email", "name", "channel")


@dataclass(slots=True)
class Result:
    state: dict
    changed: bool
    changes: list
    outcomes: list


def key_of(event: dict) -> str:
    return event["message_id"]


def _new_state(mid) -> dict:
    return {"message_id": mid, "send": None, "f": {}, "bounce": {}, "auto": None, "opens": {}, "clicks": {},
            "email": None, "status": None, "version": 0}


def _flag(f: dict, name: str, at: int, eid: str) -> bool:
    cur = f.get(name)
    if cur is None or at < cur[0] or (at == cur[0] and eid < cur[1]):
        f[name] = [at, eid]
        return True
    return False


def _status(f: dict):
    for name in STATUS_ORDER:
        v = f.get(name)
        if v is not None:
            return name, v[0]
    return None, None


def _bounce_class(bounce: dict):
    for c in _BOUNCE_SEVERITY:
        if c in bounce:
            return c
    return None


def _earliest(*facts):
    best = None
    for x in facts:
        if x is not None and (best is None or x[0] < best[0] or (x[0] == best[0] and x[1] < best[1])):
            best = x
    return best


def _outcome_facts(state) -> dict:
    """{outcome type: (at, source event_id, reason, return_at)} derivable now (send must be known)."""
    f = state["f"]
    out = {}
    s = _earliest(f.get("delivered"), f.get("bounced"), f.get("dropped"))
    if s is not None:
        out["outcome.settled"] = (s[0], s[1], None, None)
    bounce = state["bounce"]
    b = None
    if "hard" in bounce:
        h = bounce["hard"]
        b = (h[0], h[1], "hard_bounce")
    elif "block" in bounce:
        h = bounce["block"]
        b = (h[0], h[1], "block")
    sp = f.get("spam_reported")
    if sp is not None and (b is None or sp[0] < b[0] or (sp[0] == b[0] and sp[1] < b[1])):
        b = (sp[0], sp[1], "spam_report")
    if b is not None:
        out["outcome.bounced"] = (b[0], b[1], b[2], None)
    u = f.get("unsubscribed")
    if u is not None:
        out["outcome.unsubscribed"] = (u[0], u[1], None, None)
    r = f.get("replied")
    if r is not None:
        out["outcome.replied"] = (r[0], r[1], None, None)
    a = state["auto"]
    if a is not None:
        out["outcome.auto_replied"] = (a[0], a[1], None, a[2])
    return out


def _outcome_event(state, otype, fact) -> dict:
    send = state["send"]
    return {
        "event_id": f"{otype}:{fact[1]}",
        "type": otype,
        "occurred_at": fact[0],
        "schema_version": 1,
        "automation_id": send["automation_id"],
        "contact_id": send["contact_id"],
        "run": send["run"],
        "step_index": send["step_index"],
        "message_id": state["message_id"],
        "reason": fact[2],
        "return_at": fact[3],
    }


def _merge_provider(state, event, etype) -> bool:
    flag = _TYPE_FLAG.get(etype)
    if flag is None:
        return False
    at = event["occurred_at"]
    eid = event["event_id"]
    f = state["f"]
    changed = _flag(f, flag, at, eid)
    if flag == "opened":
        opens = state["opens"]
        if eid not in opens and len(opens) < COUNT_CAP:
            opens[eid] = 1
            changed = True
        if _flag(f, "delivered", at, eid):
            changed = True
    elif flag == "clicked":
        clicks = state["clicks"]
        if eid not in clicks and len(clicks) < COUNT_CAP:
            clicks[eid] = 1
            changed = True
        if _flag(f, "opened", at, eid):
            changed = True
        if _flag(f, "delivered", at, eid):
            changed = True
    elif flag == "bounced":
        bounce = state["bounce"]
        cls = event.get("bounce_class")
        if cls not in _BOUNCE_SEVERITY:
            cls = "unknown"
        cur = bounce.get(cls)
        if cur is None or at < cur[0] or (at == cur[0] and eid < cur[1]):
            bounce[cls] = [at, eid]
            changed = True
    elif flag == "auto_replied":
        cur = state["auto"]
        if cur is None or at < cur[0] or (at == cur[0] and eid < cur[1]):
            state["auto"] = [at, eid, event.get("return_at")]
            changed = True
    if state["email"] is None and event.get("email"):
        state["email"] = event["email"]
        changed = True
    return changed


def _merge_registration(state, event) -> bool:
    changed = _flag(state["f"], "sent", event["occurred_at"], event["event_id"])
    send = state["send"]
    if send is None:
        send = {k: event.get(k) for k in _SEND_FIELDS}
        send["at"] = event["occurred_at"]
        send["event_id"] = event["event_id"]
        state["send"] = send
        return True
    # First registration kept; fields it lacked are filled from a later one (same send).
    for k in _SEND_FIELDS:
        if send[k] is None:
            v = event.get(k)
            if v is not None:
                send[k] = v
                changed = True
    return changed


def apply(state: dict | None, event: dict) -> Result:
    etype = event["type"]
    if state is None:
        state = _new_state(event["message_id"])
    had_send = state["send"] is not None
    registration = etype == "message.registered"
    check_outcomes = registration or (had_send and etype not in _NO_OUTCOME)
    before = _outcome_facts(state) if (check_outcomes and had_send) else {}
    if registration:
        changed = _merge_registration(state, event)
    else:
        changed = _merge_provider(state, event, etype)
    if not changed:
        return Result(state, False, [], [])
    state["version"] += 1
    send = state["send"]
    if send is None:
        return Result(state, True, [], [])
    changes = []
    status, _ = _status(state["f"])
    old = state["status"]
    if status != old:
        state["status"] = status
        changes.append(make_change(
            "message_status", send["automation_id"], send["contact_id"], send["run"], send["step_index"],
            state["message_id"], old, status,
            _bounce_class(state["bounce"]) if status == "bounced" else None,
            event["event_id"], etype, event["occurred_at"]))
    outcomes = []
    if check_outcomes:
        after = _outcome_facts(state)
        for otype, fact in after.items():
            if before.get(otype) != fact:
                outcomes.append(_outcome_event(state, otype, fact))
    return Result(state, True, changes, outcomes)


def view(state: dict) -> dict | None:
    send = state["send"]
    if send is None:
        return None
    f = state["f"]
    status, status_at = _status(f)
    row = {
        "message_id": state["message_id"],
        "mailing_id": send["mailing_id"],
        "automation_id": send["automation_id"],
        "run": send["run"],
        "contact_id": send["contact_id"],
        "step_index": send["step_index"],
        "subject": send["subject"],
        "sending_user": send["sending_user"],
        "sending_email": send["sending_email"],
        "email": send["email"] or state["email"],
        "name": send["name"],
        "channel": send["channel"],
        "status": status,
        "status_at": status_at,
    }
    for name in FLAGS:
        v = f.get(name)
        row[name + "_at"] = v[0] if v is not None else None
    row["bounce_class"] = _bounce_class(state["bounce"])
    row["opens"] = len(state["opens"])
    row["clicks"] = len(state["clicks"])
    row["version"] = state["version"]
    return row
