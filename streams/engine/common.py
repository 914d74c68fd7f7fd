"""Helpers shared by the pure engine machines (no I/O, no clock)."""
from __future__ import annotations

from hashlib import blake2b

# Statuses that end a run (docs/semantics.md).
ENDED = frozenset({"finished", "canceled", "failed", "unsubscribed", "duplicate"})
# Node state of the current node: waiting for these statuses, stopped for any other.
WAITING = frozenset({"waiting_enrichment", "ready", "active_limit", "coworkers_limit", "in_progress", "paused"})

_SEP = "\x1f"


def change_id(event_id, kind, automation_id, contact_id, run, step_index, message_id, to) -> str:
    """Stable hex id of a change: the same change re-emitted after a crash has the same id."""
    raw = _SEP.join((
        str(event_id), kind, str(automation_id), str(contact_id),
        "" if run is None else str(run),
        "" if step_index is None else str(step_index),
        "" if message_id is None else str(message_id),
        str(to),
    ))
    return blake2b(raw.encode(), digest_size=16).hexdigest()


def make_change(kind, automation_id, contact_id, run, step_index, message_id, frm, to, reason,
                event_id, event_type, occurred_at) -> dict:
    return {
        "kind": kind,
        "automation_id": automation_id,
        "contact_id": contact_id,
        "run": run,
        "step_index": step_index,
        "message_id": message_id,
        "from": frm,
        "to": to,
        "reason": reason,
        "event_id": event_id,
        "event_type": event_type,
        "occurred_at": occurred_at,
        "change_id": change_id(event_id, kind, automation_id, contact_id, run, step_index, message_id, to),
    }


def later(a, b) -> bool:
    """(at, event_id) of fact ``a`` is strictly after that of ``b`` (lists/tuples, first two items)."""
    return a[0] > b[0] or (a[0] == b[0] and a[1] > b[1])


def max_opt(*values):
    best = None
    for v in values:
        if v is not None and (best is None or v > best):
            best = v
    return best
