"""Helpers shared by the pure engine machines (no I/O, no clock)."""
from __future__ import annotations

from hashlib import blake2b

#: A fresh blake2b (16-byte digest) hasher, as ``blake2b(digest_size=16)``: copying an empty one is
#: cheaper than the constructor's keyword parsing, and the machines hash every change they emit.
change_hasher = blake2b(digest_size=16).copy


def change_id(event_id, kind, automation_id, contact_id, run, step_index, message_id, to) -> str:
    """Stable hex id of a change: the same change re-emitted after a crash has the same id.

    blake2b (16 bytes) of the fields joined by \x1f (None renders as ``None``).
    """
    return blake2b(
        f"{event_id}\x1f{kind}\x1f{automation_id}\x1f{contact_id}\x1f{run}\x1f{step_index}\x1f{message_id}\x1f{to}"
        .encode(), digest_size=16).hexdigest()


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
