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

from hashlib import blake2b as _b2


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


# The settling flag (delivered, bounced or dropped) a provider flag can set: opens and clicks imply delivered.
_SETTLES = {"delivered": "delivered", "opened": "delivered", "clicked": "delivered", "bounced": "bounced",
            "dropped": "dropped"}
# Status rank (higher wins); flags that are not statuses are absent.
_RANK = {name: len(STATUS_ORDER) - i for i, name in enumerate(STATUS_ORDER)}


def _earliest3(a, b, c):
    """Earliest of three optional [at, event_id] facts (the first one on a tie), or None."""
    best = a
    if b is not None and (best is None or b[0] < best[0] or (b[0] == best[0] and b[1] < best[1])):
        best = b
    if c is not None and (best is None or c[0] < best[0] or (c[0] == best[0] and c[1] < best[1])):
        best = c
    return best


def _bounced_fact(state, f):
    """(at, event_id, reason) of the bounced outcome, or None (as in _outcome_facts)."""
    bounce = state["bounce"]
    b = None
    if bounce:
        h = bounce.get("hard")
        if h is not None:
            b = (h[0], h[1], "hard_bounce")
        else:
            h = bounce.get("block")
            if h is not None:
                b = (h[0], h[1], "block")
    sp = f.get("spam_reported")
    if sp is not None and (b is None or sp[0] < b[0] or (sp[0] == b[0] and sp[1] < b[1])):
        b = (sp[0], sp[1], "spam_report")
    return b


def _status_change(state, send, old, status, event, etype) -> dict:
    """The message_status change row (same fields and change_id as common.make_change)."""
    eid = event["event_id"]
    mid = state["message_id"]
    aid = send["automation_id"]
    cid = send["contact_id"]
    run = send["run"]
    k = send["step_index"]
    return {
        "kind": "message_status",
        "automation_id": aid,
        "contact_id": cid,
        "run": run,
        "step_index": k,
        "message_id": mid,
        "from": old,
        "to": status,
        "reason": _bounce_class(state["bounce"]) if status == "bounced" else None,
        "event_id": eid,
        "event_type": etype,
        "occurred_at": event["occurred_at"],
        "change_id": _b2(f"{eid}\x1fmessage_status\x1f{aid}\x1f{cid}\x1f{run}\x1f{k}\x1f{mid}\x1f{status}".encode(),
                         digest_size=16).hexdigest(),
    }


def _apply_registration(state, event) -> Result:
    had_send = state["send"] is not None
    if not _merge_registration(state, event):
        return Result(state, False, [], [])
    state["version"] += 1
    send = state["send"]
    changes = []
    status, _ = _status(state["f"])
    old = state["status"]
    if status != old:
        state["status"] = status
        changes.append(_status_change(state, send, old, status, event, "message.registered"))
    outcomes = []
    if not had_send:
        # The send became known: every outcome derivable now is new (nothing was forwarded before).
        # With the send already known, a registration changes no outcome fact (only ``sent`` and the
        # send's fields), so nothing is forwarded.
        for otype, fact in _outcome_facts(state).items():
            outcomes.append(_outcome_event(state, otype, fact))
    return Result(state, True, changes, outcomes)


def apply(state: dict | None, event: dict) -> Result:
    """Merge one provider event or send registration; the status change and outcomes it causes.

    Equivalent to comparing the full derivation (status, _outcome_facts) before and after the merge,
    but only the parts this event's flag can move are compared: flags only appear or get earlier, so
    the status can only move up to this event's flag (implied flags rank below the flag implying them,
    and ``state["status"]`` is the derived status whenever the send is known), and each outcome fact
    depends on a known set of flags.
    """
    etype = event["type"]
    if state is None:
        state = _new_state(event["message_id"])
    if etype == "message.registered":
        return _apply_registration(state, event)
    flag = _TYPE_FLAG.get(etype)
    if flag is None:
        return Result(state, False, [], [])
    f = state["f"]
    at = event["occurred_at"]
    eid = event["event_id"]
    # ---- merge (as _merge_provider)
    sflag = _SETTLES.get(flag)
    s0 = f.get(sflag) if sflag is not None else None  # the settling flag before the merge
    if flag == "spam_reported":
        b0 = _bounced_fact(state, f)  # the bounced outcome fact before the merge
    cur = f.get(flag)
    if cur is None or at < cur[0] or (at == cur[0] and eid < cur[1]):
        f[flag] = [at, eid]
        changed = flag_changed = True
    else:
        changed = flag_changed = False
    if flag == "opened":
        opens = state["opens"]
        if eid not in opens and len(opens) < COUNT_CAP:
            opens[eid] = 1
            changed = True
        if s0 is None or at < s0[0] or (at == s0[0] and eid < s0[1]):
            f["delivered"] = [at, eid]
            changed = True
    elif flag == "clicked":
        clicks = state["clicks"]
        if eid not in clicks and len(clicks) < COUNT_CAP:
            clicks[eid] = 1
            changed = True
        if _flag(f, "opened", at, eid):
            changed = True
        if s0 is None or at < s0[0] or (at == s0[0] and eid < s0[1]):
            f["delivered"] = [at, eid]
            changed = True
    elif flag == "bounced":
        bounce = state["bounce"]
        cls = event.get("bounce_class")
        if cls not in _BOUNCE_SEVERITY:
            cls = "unknown"
        cur = bounce.get(cls)
        if cur is None or at < cur[0] or (at == cur[0] and eid < cur[1]):
            b0 = _bounced_fact(state, f) if state["send"] is not None else None
            bounce[cls] = [at, eid]
            changed = bounce_changed = True
        else:
            bounce_changed = False
    elif flag == "auto_replied":
        cur = state["auto"]
        if cur is None or at < cur[0] or (at == cur[0] and eid < cur[1]):
            state["auto"] = [at, eid, event.get("return_at")]
            changed = auto_changed = True
        else:
            auto_changed = False
    if state["email"] is None:
        email = event.get("email")
        if email:
            state["email"] = email
            changed = True
    if not changed:
        return Result(state, False, [], [])
    state["version"] += 1
    send = state["send"]
    if send is None:
        return Result(state, True, [], [])
    # ---- status
    changes = []
    old = state["status"]
    rank = _RANK.get(flag)
    if rank is not None and (old is None or rank > _RANK[old]):
        state["status"] = flag
        changes.append(_status_change(state, send, old, flag, event, etype))
    # ---- outcomes (in the order of _outcome_facts: settled, bounced, unsubscribed, replied, auto_replied)
    outcomes = []
    if sflag is not None:
        s1 = f[sflag]
        if s1 is not s0:  # the settling flag got earlier: the settled fact may have too
            if sflag == "delivered":
                before = _earliest3(s0, f.get("bounced"), f.get("dropped"))
            elif sflag == "bounced":
                before = _earliest3(f.get("delivered"), s0, f.get("dropped"))
            else:
                before = _earliest3(f.get("delivered"), f.get("bounced"), s0)
            after = _earliest3(f.get("delivered"), f.get("bounced"), f.get("dropped"))
            if after != before:
                outcomes.append(_outcome_event(state, "outcome.settled", (after[0], after[1], None, None)))
        if flag == "bounced" and bounce_changed:
            b = _bounced_fact(state, f)
            if b != b0:
                outcomes.append(_outcome_event(state, "outcome.bounced", (b[0], b[1], b[2], None)))
    elif flag == "spam_reported":
        if flag_changed:
            b = _bounced_fact(state, f)
            if b != b0:
                outcomes.append(_outcome_event(state, "outcome.bounced", (b[0], b[1], b[2], None)))
    elif flag == "unsubscribed" or flag == "replied":
        if flag_changed:  # the fact is the flag itself
            outcomes.append(_outcome_event(state, "outcome." + flag, (at, eid, None, None)))
    elif flag == "auto_replied":
        if auto_changed:
            a = state["auto"]
            outcomes.append(_outcome_event(state, "outcome.auto_replied", (a[0], a[1], None, a[2])))
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
