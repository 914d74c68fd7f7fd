"""Message machine: one state per message_id, provider facts merged, status derived.

Implements docs/semantics.md ("Message"). Pure: no I/O, no clock.

State layout (JSON-serializable)::

    {"message_id",
     "send": None | {automation_id, contact_id, run, step_index, mailing_id, subject, sending_user,
                     sending_email, email, name, channel, at, event_id},   # first one kept
     "f": {flag: at}, "fe": {flag: event_id},   # earliest (at, event_id) per flag (implied flags included)
     "bounce": {class: [at, event_id]},      # earliest per bounce class (hard/block/soft/unknown)
     "auto": None | [at, event_id, return_at],   # earliest auto-reply
     "opens": {event_id: 1}, "clicks": {event_id: 1},   # <= 10,000 each
     # bounce, opens and clicks only from their first use on (absent: empty)
     "email": first provider-reported address (fallback for the row),
     "status": status last emitted (None until the send is known),
     "version": int}

A flag's fact is split over two flat maps (``f`` and ``fe``) rather than kept as one
``[at, event_id]`` list per flag: maps of plain values are cheaper to (de)serialize and are not
tracked by Python's cycle collector, which otherwise walks every such list of every live state.
States written before the split (``f`` holding ``{flag: [at, event_id]}``, no ``fe``) are
converted when first read (_upgrade). For the same reasons ``bounce``, ``opens`` and ``clicks`` are
not stored while empty (most messages never get one: three fewer dicts to allocate, collect and
(de)serialize per message); states that hold them empty (written before) read the same.
"""
from __future__ import annotations

from dataclasses import dataclass

from .common import change_hasher

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

_SEND_FIELDS = ("automation_id", "contact_id", "run", "step_index", "mailing_id", "subject", "sending_user",
                "sending_email", "email", "name", "channel")

# The settling flag (delivered, bounced or dropped) a provider flag can set: opens and clicks imply delivered.
_SETTLES = {"delivered": "delivered", "opened": "delivered", "clicked": "delivered", "bounced": "bounced",
            "dropped": "dropped"}
# For each settling flag, the two other ones (the settled outcome is the earliest of the three).
_OTHER_SETTLING = {"delivered": ("bounced", "dropped"), "bounced": ("delivered", "dropped"),
                   "dropped": ("delivered", "bounced")}
# Status rank (higher wins); flags that are not statuses are absent.
_RANK = {name: len(STATUS_ORDER) - i for i, name in enumerate(STATUS_ORDER)}


@dataclass(slots=True)
class Result:
    state: dict
    changed: bool
    changes: list
    outcomes: list


def key_of(event: dict) -> str:
    return event["message_id"]


def _new_state(mid) -> dict:
    return {"message_id": mid, "send": None, "f": {}, "fe": {}, "auto": None, "email": None, "status": None, "version": 0}


def _upgrade(state: dict) -> None:
    """Convert a state of the earlier layout (``f``: {flag: [at, event_id]}, empty maps stored) in place."""
    old = state["f"]
    state["f"] = {k: v[0] for k, v in old.items()}
    state["fe"] = {k: v[1] for k, v in old.items()}
    for k in ("bounce", "opens", "clicks"):  # not stored while empty (module docstring)
        if k in state and not state[k]:
            del state[k]


def _status(f: dict):
    """(status, at) derived from the flags (``f``: {flag: at}), or (None, None)."""
    for name in STATUS_ORDER:
        v = f.get(name)
        if v is not None:
            return name, v
    return None, None


def _bounce_class(bounce: dict):
    for c in _BOUNCE_SEVERITY:
        if c in bounce:
            return c
    return None


def _bounced_fact(state, f, fe):
    """(at, event_id, reason) of the bounced outcome, or None.

    A hard (else block) bounce, or a spam report when it is earlier.
    """
    bounce = state.get("bounce")
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
    if sp is not None:
        se = fe["spam_reported"]
        if b is None or sp < b[0] or (sp == b[0] and se < b[1]):
            b = (sp, se, "spam_report")
    return b


def _outcome_facts(state) -> dict:
    """{outcome type: (at, source event_id, reason, return_at)} derivable now (send must be known)."""
    f = state["f"]
    fe = state["fe"]
    out = {}
    s = None
    for name in ("delivered", "bounced", "dropped"):
        at = f.get(name)
        if at is not None:
            eid = fe[name]
            if s is None or at < s[0] or (at == s[0] and eid < s[1]):
                s = (at, eid)
    if s is not None:
        out["outcome.settled"] = (s[0], s[1], None, None)
    b = _bounced_fact(state, f, fe)
    if b is not None:
        out["outcome.bounced"] = (b[0], b[1], b[2], None)
    u = f.get("unsubscribed")
    if u is not None:
        out["outcome.unsubscribed"] = (u, fe["unsubscribed"], None, None)
    r = f.get("replied")
    if r is not None:
        out["outcome.replied"] = (r, fe["replied"], None, None)
    a = state["auto"]
    if a is not None:
        out["outcome.auto_replied"] = (a[0], a[1], None, a[2])
    return out


def _outcome_event(state, send, otype, at, source, reason, return_at) -> dict:
    return {
        "event_id": f"{otype}:{source}",
        "type": otype,
        "occurred_at": at,
        "schema_version": 1,
        "automation_id": send["automation_id"],
        "contact_id": send["contact_id"],
        "run": send["run"],
        "step_index": send["step_index"],
        "message_id": state["message_id"],
        "reason": reason,
        "return_at": return_at,
    }


def _status_change(state, send, old, status, event, etype) -> dict:
    """The message_status change row (same fields and change_id as common.make_change)."""
    eid = event["event_id"]
    mid = state["message_id"]
    aid = send["automation_id"]
    cid = send["contact_id"]
    run = send["run"]
    k = send["step_index"]
    h = change_hasher()
    h.update(f"{eid}\x1fmessage_status\x1f{aid}\x1f{cid}\x1f{run}\x1f{k}\x1f{mid}\x1f{status}".encode())
    return {
        "kind": "message_status",
        "automation_id": aid,
        "contact_id": cid,
        "run": run,
        "step_index": k,
        "message_id": mid,
        "from": old,
        "to": status,
        "reason": _bounce_class(state.get("bounce") or ()) if status == "bounced" else None,
        "event_id": eid,
        "event_type": etype,
        "occurred_at": event["occurred_at"],
        "change_id": h.hexdigest(),
    }


def _apply_registration(state, event) -> Result:
    at = event["occurred_at"]
    eid = event["event_id"]
    f = state["f"]
    fe = state["fe"]
    cur = f.get("sent")
    if cur is None or at < cur or (at == cur and eid < fe["sent"]):
        f["sent"] = at
        fe["sent"] = eid
        changed = True
    else:
        changed = False
    send = state["send"]
    had_send = send is not None
    if not had_send:
        g = event.get
        state["send"] = send = {
            "automation_id": g("automation_id"), "contact_id": g("contact_id"), "run": g("run"),
            "step_index": g("step_index"), "mailing_id": g("mailing_id"), "subject": g("subject"),
            "sending_user": g("sending_user"), "sending_email": g("sending_email"), "email": g("email"),
            "name": g("name"), "channel": g("channel"), "at": at, "event_id": eid,
        }
    else:
        # First registration kept; fields it lacked are filled from a later one (same send).
        for k in _SEND_FIELDS:
            if send[k] is None:
                v = event.get(k)
                if v is not None:
                    send[k] = v
                    changed = True
        if not changed:
            return Result(state, False, [], [])
    state["version"] += 1
    changes = []
    # ``sent`` is set: the status is at least that.
    status = "sent" if len(f) == 1 else _status(f)[0]
    old = state["status"]
    if status != old:
        state["status"] = status
        changes.append(_status_change(state, send, old, status, event, "message.registered"))
    outcomes = []
    if not had_send and (len(f) > 1 or state["auto"] is not None):
        # The send became known: every outcome derivable now is new (nothing was forwarded before).
        # With the send already known, a registration changes no outcome fact (only ``sent`` and the
        # send's fields), so nothing is forwarded. With ``sent`` as the only flag (and no
        # auto-reply, no bounce without its flag) there is no outcome.
        for otype, fact in _outcome_facts(state).items():
            outcomes.append(_outcome_event(state, send, otype, *fact))
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
    elif "fe" not in state:
        _upgrade(state)
    if etype == "message.registered":
        return _apply_registration(state, event)
    flag = _TYPE_FLAG.get(etype)
    if flag is None:
        return Result(state, False, [], [])
    f = state["f"]
    fe = state["fe"]
    at = event["occurred_at"]
    eid = event["event_id"]
    if flag == "spam_reported":
        b0 = _bounced_fact(state, f, fe)  # the bounced outcome fact before the merge
    # ---- merge: each fact only appears or gets earlier ((at, event_id) order)
    cur = f.get(flag)
    if cur is None or at < cur or (at == cur and eid < fe[flag]):
        f[flag] = at
        fe[flag] = eid
        changed = flag_changed = True
    else:
        changed = flag_changed = False
    sflag = _SETTLES.get(flag)
    settle_moved = flag_changed and sflag is not None  # the settling flag got earlier
    if flag == "opened" or flag == "clicked":
        skey = "opens" if flag == "opened" else "clicks"
        seen = state.get(skey)
        if seen is None:
            state[skey] = seen = {}
        if eid not in seen and len(seen) < COUNT_CAP:
            seen[eid] = 1
            changed = True
        if flag == "clicked":
            cur = f.get("opened")
            if cur is None or at < cur or (at == cur and eid < fe["opened"]):
                f["opened"] = at
                fe["opened"] = eid
                changed = True
        cur = f.get("delivered")
        if cur is None or at < cur or (at == cur and eid < fe["delivered"]):
            f["delivered"] = at
            fe["delivered"] = eid
            changed = settle_moved = True
        else:
            settle_moved = False
    elif flag == "bounced":
        bounce = state.get("bounce")
        if bounce is None:
            state["bounce"] = bounce = {}
        cls = event.get("bounce_class")
        if cls not in _BOUNCE_SEVERITY:
            cls = "unknown"
        cur = bounce.get(cls)
        if cur is None or at < cur[0] or (at == cur[0] and eid < cur[1]):
            b0 = _bounced_fact(state, f, fe) if state["send"] is not None else None
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
        if settle_moved:
            # The settled fact is the earliest of the three settling flags; only ``sflag`` moved (to this
            # event), so it changed iff the new one is strictly earlier than both others.
            s_at = f[sflag]
            s_eid = fe[sflag]
            for o in _OTHER_SETTLING[sflag]:
                o_at = f.get(o)
                if o_at is not None and (o_at < s_at or (o_at == s_at and fe[o] <= s_eid)):
                    break
            else:
                outcomes.append(_outcome_event(state, send, "outcome.settled", s_at, s_eid, None, None))
        if flag == "bounced" and bounce_changed:
            b = _bounced_fact(state, f, fe)
            if b != b0:
                outcomes.append(_outcome_event(state, send, "outcome.bounced", b[0], b[1], b[2], None))
    elif flag == "unsubscribed" or flag == "replied":
        if flag_changed:  # the fact is the flag itself
            outcomes.append(_outcome_event(state, send, "outcome." + flag, at, eid, None, None))
    elif flag == "spam_reported":
        if flag_changed:
            b = _bounced_fact(state, f, fe)
            if b != b0:
                outcomes.append(_outcome_event(state, send, "outcome.bounced", b[0], b[1], b[2], None))
    elif flag == "auto_replied":
        if auto_changed:
            a = state["auto"]
            outcomes.append(_outcome_event(state, send, "outcome.auto_replied", a[0], a[1], None, a[2]))
    return Result(state, True, changes, outcomes)


def view(state: dict) -> dict | None:
    send = state["send"]
    if send is None:
        return None
    f = state["f"]
    if "fe" not in state:  # earlier layout (read without converting: a view does not change the state)
        f = {k: v[0] for k, v in f.items()}
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
        row[name + "_at"] = f.get(name)
    row["bounce_class"] = _bounce_class(state.get("bounce") or ())
    row["opens"] = len(state.get("opens") or ())
    row["clicks"] = len(state.get("clicks") or ())
    row["version"] = state["version"]
    return row
