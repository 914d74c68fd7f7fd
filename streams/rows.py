"""Build ClickHouse rows (plain dicts keyed by column name) from events and engine views.

Pure: values in, values out. Times stay integer milliseconds here; the sink
converts them to DateTime64 at the edge. Every row carries the fields its
ReplacingMergeTree table needs to stay idempotent: a stable unique key and a
``_version`` that only grows for the same key.
"""
from __future__ import annotations

import hashlib
from typing import Any

import orjson


def _json(value: Any) -> str:
    return orjson.dumps(value if value is not None else {}).decode()


def recipient_id(automation_id: str, message_id: str) -> str:
    """Stable id of a recipient row: the same send always gets the same id."""
    return hashlib.blake2b(f"{automation_id}\x1f{message_id}".encode(), digest_size=8).hexdigest()


def automation_row(defn: dict, status: str, updated_at: int, version: int) -> dict:
    return {
        "automation_id": defn["automation_id"],
        "name": defn.get("name") or "",
        "description": defn.get("description"),
        "participation": defn.get("participation") or "once",
        "start_at": defn.get("start_at") or 0,
        "end_at": defn.get("end_at"),
        "published_by": defn.get("published_by") or "",
        "version": int(defn.get("version") or 0),
        "steps": orjson.dumps(
            [{"index": s["index"], "name": s.get("name"), "kind": s.get("kind"), "day": s.get("day")}
             for s in sorted(defn.get("steps") or [], key=lambda s: s["index"])]
        ).decode(),
        "status": status,
        "updated_at": updated_at,
        "_version": version,
    }


def contact_row(enrolled: dict) -> dict:
    """From a parsed ``contact.enrolled``; the latest enrollment's details win (version = its time)."""
    return {
        "contact_id": enrolled["contact_id"],
        "user_id": enrolled.get("user_id") or "",
        "name": enrolled.get("name") or "",
        "email": enrolled.get("email") or "",
        "company": enrolled.get("company"),
        "attributes": _json(enrolled.get("attributes")),
        "updated_at": enrolled["occurred_at"],
        "_version": enrolled["occurred_at"],
    }


def recipient_row(sent: dict, run_view: dict, partition: int, offset: int) -> dict:
    """One recipient row per ``step.sent`` (the recipients page of the seed article)."""
    return {
        "recipient_id": recipient_id(sent["automation_id"], sent["message_id"]),
        "automation_id": sent["automation_id"],
        "run": run_view["run"],
        "contact_id": sent["contact_id"],
        "user_id": run_view.get("user_id") or "",
        "user_name": run_view.get("name") or "",
        "email": run_view.get("email") or "",
        "step_index": sent["step_index"],
        "step_details": _json(sent.get("step_details")),
        "message_id": sent["message_id"],
        "channel": sent.get("channel") or "email",
        "mailing_id": sent.get("mailing_id") or f"{sent['automation_id']}:{sent['step_index']}",
        "sent_time": sent["occurred_at"],
        "metadata": _json(sent.get("metadata")),
        "_partition": partition,
        "_offset": offset,
        "_version": 1,
    }


def repeat_send_row(automation_id: str, contact_id: str, run: int, step_index: int, message_ids, verify: bool
                    ) -> dict:
    """A step of a run sent more than once (the engine's ``Result.repeats``): health lists the duplicate
    sends from these rows (the ids of a key are united; a key with ``verify`` takes its ids from
    ``send_index`` instead)."""
    return {"automation_id": automation_id, "contact_id": contact_id, "run": run, "step_index": step_index,
            "message_ids": list(message_ids), "verify": 1 if verify else 0}


def wait_row(automation_id: str, contact_id: str, run: int, step_index: int, since: int | None, closed: bool,
             version: int) -> dict:
    """A wait of one node of one run (the engine's ``Result.waits``) for ``node_waits`` (migration 012),
    keyed by its start ``since``: open, or closed (the same key at a later version, which removes it).

    ``since`` None (a close whose start is unknown) gives the node's reset row instead (``since`` 0): it
    removes every wait of the node at a lower version, as :func:`wait_reset_row`.
    """
    if since is None:
        return wait_reset_row(automation_id, contact_id, run, step_index, version)
    return {"automation_id": automation_id, "since": since, "contact_id": contact_id, "run": run,
            "step_index": step_index, "closed": 1 if closed else 0, "_version": version}


def wait_reset_row(automation_id: str, contact_id: str, run: int, step_index: int, version: int) -> dict:
    """The ``node_waits`` row (``since`` 0) that removes the node's waits of lower versions: written when
    the waits the node had are not known (a close of a wait opened before the engine kept its start,
    and every node of a key re-emitted after a crash, whose attempt may have opened waits that the
    replay does not close); the snapshot opens the node's current wait again at ``version``."""
    return {"automation_id": automation_id, "since": 0, "contact_id": contact_id, "run": run,
            "step_index": step_index, "closed": 0, "_version": version}


def enrollment_row(view: dict, updated_at: int) -> dict:
    return {
        "automation_id": view["automation_id"],
        "contact_id": view["contact_id"],
        "run": view["run"],
        "status": view["status"],
        "reason": view.get("reason"),
        "current_step": view["current_step"],
        "name": view.get("name") or "",
        "email": view.get("email") or "",
        "user_id": view.get("user_id") or "",
        "enrolled_at": view.get("enrolled_at"),
        "status_at": view.get("status_at") or updated_at,
        "resume_at": view.get("resume_at"),
        "updated_at": updated_at,
        "ignored_enrollments": view.get("ignored_enrollments") or 0,
        "_version": view["version"],
    }


def node_change_row(change: dict, version: int) -> dict:
    """The latest state of one node of one run, from the engine's ``node_state`` change.

    A node the run no longer stands at comes as ``none`` so a latest-state read skips it.
    """
    return {
        "automation_id": change["automation_id"],
        "contact_id": change["contact_id"],
        "run": change["run"],
        "step_index": change["step_index"],
        "state": change["to"] or "none",
        "at": change["occurred_at"],
        "_version": version,
    }


MESSAGE_TIME_FIELDS = (
    "status_at", "sent_at", "delivered_at", "deferred_at", "opened_at", "clicked_at", "bounced_at",
    "dropped_at", "spam_reported_at", "unsubscribed_at", "resubscribed_at", "replied_at", "auto_replied_at",
)


def message_row(view: dict, updated_at: int) -> dict:
    row = {
        "message_id": view["message_id"],
        "mailing_id": view.get("mailing_id") or "",
        "automation_id": view.get("automation_id") or "",
        "run": view.get("run") or 0,
        "contact_id": view.get("contact_id") or "",
        "step_index": view.get("step_index") or 0,
        "subject": view.get("subject") or "",
        "sending_user": view.get("sending_user") or "",
        "sending_email": view.get("sending_email") or "",
        "email": view.get("email") or "",
        "name": view.get("name") or "",
        "channel": view.get("channel") or "email",
        "status": view["status"],
        "bounce_class": view.get("bounce_class") or "",
        "opens": view.get("opens") or 0,
        "clicks": view.get("clicks") or 0,
        "updated_at": updated_at,
        "_version": view["version"],
    }
    for name in MESSAGE_TIME_FIELDS:
        row[name] = view.get(name)
    if row["status_at"] is None:
        row["status_at"] = updated_at
    return row


def message_event_row(ev: dict, partition: int, offset: int) -> dict:
    return {
        "event_id": ev["event_id"],
        "message_id": ev["message_id"],
        "type": ev["type"],
        "occurred_at": ev["occurred_at"],
        "email": ev.get("email") or "",
        "provider": ev.get("provider") or "",
        "automation_id": ev.get("automation_id") or "",
        "contact_id": ev.get("contact_id") or "",
        "step_index": ev.get("step_index"),
        "bounce_class": ev.get("bounce_class") or "",
        "reason": ev.get("reason") or "",
        "url": ev.get("url") or "",
        "_partition": partition,
        "_offset": offset,
    }


def status_change_row(change: dict) -> dict:
    return {
        "change_id": change["change_id"],
        "kind": change["kind"],
        "automation_id": change.get("automation_id") or "",
        "contact_id": change.get("contact_id") or "",
        "run": change.get("run") or 0,
        "step_index": change.get("step_index"),
        "message_id": change.get("message_id"),
        "from_status": change.get("from"),
        "to_status": change["to"],
        "reason": change.get("reason"),
        "event_id": change["event_id"],
        "event_type": change["event_type"],
        "occurred_at": change["occurred_at"],
    }
