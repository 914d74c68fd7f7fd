"""The independent oracle: the expected end state of a generated workload.

The generator (:mod:`streams.generator`) writes a *plan* of what happens to
every contact run and every message; while it emits the events of the plan it
records the facts they carry into the structures below. This module turns the
plan into the expected end state, following ``docs/semantics.md`` directly
(its own small derivation, written from the document, never calling the state
machines in ``streams/engine``).

Oracle format (JSON-serialisable dict):

``enrollments``
    ``{"<automation_id>|<contact_id>|<run>": {"status", "reason",
    "current_step", "nodes": {"<step_index>": state}}}`` for every run;
    ``current_step`` is the index of the node the contact is at, ``-1`` when
    none (all steps done, or finished ``completed`` / ``filtered``); ``nodes``
    holds every node that has a state (done and filtered nodes, and the
    current node, ``waiting`` or ``stopped``).
``node_counts``
    ``{automation_id: {"<step_index>": {"done", "waiting", "filtered",
    "stopped"}}}`` over all runs (a contact with two runs counts twice); every
    step of the automation is present.
``status_counts``
    ``{automation_id: {status: count}}`` over all runs.
``completion``
    ``{automation_id: {"completed", "in_progress", "not_started"}}``, by the
    recipients-page rule of seed 000: *completed* = runs in which every step
    is done, *in_progress* = runs with at least one but not every step done,
    *not_started* = runs with no step done. Every run is in exactly one
    bucket (so the three add up to the number of runs), whatever its status.
``recipients``
    sorted list of ``[automation_id, contact_id, run, step_index,
    message_id]``, one per ``step.sent`` fact (a duplicate send gives two rows,
    a replayed event one).
``messages``
    ``{message_id: {"status", "opens", "clicks", "bounce_class", "flags"}}``
    for every message registered through ``step.sent`` (``flags``: sorted
    names of the flags set, after implications).
``mailings``
    ``{mailing_id: {"total_sent", "delivered", "opened", "clicked",
    "bounced", "dropped", "deferred", "spam_reports", "unsubscribed"}}``,
    each the number of the mailing's messages with that flag.
``ignored_enrollments``
    total number of distinct ignored ``contact.enrolled`` event ids.
``dead_letters``
    ``{reason: count}`` of invalid input messages.
``event_counts``
    ``{topic: messages produced}`` (duplicates and invalid ones included).
``now_ms``
    the ``now`` the state is evaluated at (holds whose ``resume_at <= now_ms``
    are resumed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ENDED",
    "WAITING_STATUSES",
    "STATUS_PRIORITY",
    "FLAGS",
    "Fact",
    "RunPlan",
    "MessagePlan",
    "derive_run",
    "message_result",
    "build_oracle",
    "run_key",
]

#: Statuses that end a run.
ENDED = frozenset({"finished", "canceled", "failed", "unsubscribed", "duplicate"})
#: Statuses under which the current node is ``waiting`` (else ``stopped``).
WAITING_STATUSES = frozenset({"waiting_enrichment", "ready", "active_limit", "coworkers_limit", "in_progress", "paused"})
#: Message status priority, highest first.
STATUS_PRIORITY = (
    "dropped",
    "bounced",
    "spam_reported",
    "unsubscribed",
    "clicked",
    "opened",
    "delivered",
    "deferred",
    "sent",
)
#: Every message flag.
FLAGS = (
    "sent",
    "delivered",
    "deferred",
    "opened",
    "clicked",
    "bounced",
    "dropped",
    "spam_reported",
    "unsubscribed",
    "resubscribed",
    "replied",
    "auto_replied",
)
_BOUNCE_SEVERITY = {"hard": 3, "block": 2, "soft": 1}
_MAILING_FLAGS = (
    ("delivered", "delivered"),
    ("opened", "opened"),
    ("clicked", "clicked"),
    ("bounced", "bounced"),
    ("dropped", "dropped"),
    ("deferred", "deferred"),
    ("spam_reports", "spam_reported"),
    ("unsubscribed", "unsubscribed"),
)


def run_key(automation_id: str, contact_id: str, run: int) -> str:
    return f"{automation_id}|{contact_id}|{run}"


@dataclass(slots=True)
class Fact:
    """One fact of a run, as ``docs/semantics.md`` names them.

    ``kind``: ``enriched``, ``terminal``, ``hold``, ``resumed``,
    ``automation_paused``, ``automation_resumed``, ``limit``, ``started``,
    ``done``, ``send``, ``settled``. ``data`` holds the rest
    (status, reason, resume_at, limit kind, step_index, message_id, ...).
    """

    at: int
    event_id: str
    kind: str
    data: dict = field(default_factory=dict)

    @property
    def order(self) -> tuple[int, str]:
        return (self.at, self.event_id)


@dataclass(slots=True)
class RunPlan:
    automation_id: str
    contact_id: str
    run: int
    enrolled_at: int
    needs_enrichment: bool
    facts: list[Fact] = field(default_factory=list)
    #: what the story meant to end with (documentation / debugging only)
    story: list[str] = field(default_factory=list)

    def add(self, at: int, event_id: str, kind: str, **data: Any) -> None:
        self.facts.append(Fact(at, event_id, kind, data))


@dataclass(slots=True)
class MessagePlan:
    message_id: str
    mailing_id: str
    automation_id: str
    contact_id: str
    run: int
    step_index: int
    #: flag -> earliest time (implications applied in :func:`message_result`)
    flags: dict[str, int] = field(default_factory=dict)
    opens: set[str] = field(default_factory=set)
    clicks: set[str] = field(default_factory=set)
    bounce_class: str | None = None

    def flag(self, name: str, at: int) -> None:
        prev = self.flags.get(name)
        if prev is None or at < prev:
            self.flags[name] = at


#: Fact kinds of which the latest (by (at, event_id)) counts.
LATEST_KINDS = ("hold", "resumed", "limit", "automation_paused", "automation_resumed")


def derive_run(run: RunPlan, steps: list[int], now: int, cutoff: int | None = None) -> dict:
    """Status, reason, current step and node states of ``run`` (semantics.md).

    ``steps``: the automation's step indexes. ``cutoff``: only facts with
    ``at < cutoff`` count (the state as it was at that time); ``now`` decides
    which timed holds have been resumed.
    """
    facts = run.facts if cutoff is None else [f for f in run.facts if f.at < cutoff]
    terminal = None
    latest: dict[str, Fact | None] = dict.fromkeys(LATEST_KINDS)  # kind -> its latest fact
    enriched = started = False
    done: dict[int, int] = {}
    for f in facts:
        k = f.kind
        if k == "terminal":
            if terminal is None or f.order < terminal.order:
                terminal = f
        elif k in latest:
            cur = latest[k]
            if cur is None or f.order > cur.order:
                latest[k] = f
        elif k == "enriched":
            enriched = True
        elif k == "started":
            started = True
        elif k == "done":
            i = f.data["step_index"]
            if i not in done or f.at < done[i]:
                done[i] = f.at
    hold, resumed, limit = latest["hold"], latest["resumed"], latest["limit"]
    apause, aresumed = latest["automation_paused"], latest["automation_resumed"]
    active_hold = False
    if hold is not None:
        active_hold = resumed is None or hold.order > resumed.order
        ra = hold.data.get("resume_at")
        if ra is not None and ra <= now:
            active_hold = False
    # the automation's pause holds the run until the automation is resumed, whatever the contact's
    # own hold; when both hold it, the later one shows
    paused = apause is not None and (aresumed is None or apause.order > aresumed.order)
    if paused and (not active_hold or apause.order > hold.order):
        active_hold = True
        hold = Fact(apause.at, apause.event_id, "hold", {"status": "paused", "reason": "automation_paused"})
    last = max(steps)
    if terminal is not None:
        status, reason = terminal.data["status"], terminal.data["reason"]
    elif active_hold:
        status, reason = hold.data["status"], hold.data["reason"]
    elif last in done:
        status, reason = "finished", "completed"
    elif run.needs_enrichment and not enriched:
        status, reason = "waiting_enrichment", None
    elif limit is not None and limit.data.get("limit") is not None:
        status, reason = f"{limit.data['limit']}_limit", None
    elif started:
        status, reason = "in_progress", None
    else:
        status, reason = "ready", None
    nodes: dict[str, str] = {str(i): "done" for i in sorted(done)}
    if terminal is not None and terminal.data.get("filtered_step") is not None:
        nodes[str(terminal.data["filtered_step"])] = "filtered"
    current = -1
    if not (status == "finished" and reason in ("completed", "filtered")):
        c = (max(done) + 1) if done else min(steps)
        if c <= last:
            current = c
            nodes[str(c)] = "waiting" if status in WAITING_STATUSES else "stopped"
    return {"status": status, "reason": reason, "current_step": current, "nodes": nodes}


def message_result(m: MessagePlan) -> dict:
    flags = dict(m.flags)
    # implications: a click implies opened, an open (or click) implies delivered
    if "clicked" in flags:
        if "opened" not in flags or flags["clicked"] < flags["opened"]:
            flags["opened"] = min(flags.get("opened", flags["clicked"]), flags["clicked"])
    if "opened" in flags:
        if "delivered" not in flags or flags["opened"] < flags["delivered"]:
            flags["delivered"] = min(flags.get("delivered", flags["opened"]), flags["opened"])
    status = next((s for s in STATUS_PRIORITY if s in flags), None)
    return {
        "status": status,
        "opens": len(m.opens),
        "clicks": len(m.clicks),
        "bounce_class": m.bounce_class,
        "flags": sorted(flags),
    }


def build_oracle(
    *,
    automations: dict[str, list[int]],
    runs: list[RunPlan],
    messages: dict[str, MessagePlan],
    recipients: list[tuple[str, str, int, int, str]],
    ignored_enrollments: int,
    dead_letters: dict[str, int],
    event_counts: dict[str, int],
    now_ms: int,
) -> dict:
    """The oracle dict (see the module docstring). ``automations``: id -> step indexes."""
    enrollments: dict[str, dict] = {}
    node_counts: dict[str, dict[str, dict[str, int]]] = {
        a: {str(i): {"done": 0, "waiting": 0, "filtered": 0, "stopped": 0} for i in steps}
        for a, steps in automations.items()
    }
    status_counts: dict[str, dict[str, int]] = {a: {} for a in automations}
    completion = {a: {"completed": 0, "in_progress": 0, "not_started": 0} for a in automations}
    for r in runs:
        steps = automations[r.automation_id]
        d = derive_run(r, steps, now_ms)
        enrollments[run_key(r.automation_id, r.contact_id, r.run)] = d
        for i, st in d["nodes"].items():
            node_counts[r.automation_id][i][st] += 1
        sc = status_counts[r.automation_id]
        sc[d["status"]] = sc.get(d["status"], 0) + 1
        n_done = sum(1 for st in d["nodes"].values() if st == "done")
        bucket = "not_started" if n_done == 0 else ("completed" if n_done == len(steps) else "in_progress")
        completion[r.automation_id][bucket] += 1
    msgs = {mid: message_result(m) for mid, m in sorted(messages.items())}
    mailings: dict[str, dict[str, int]] = {}
    for mid, m in sorted(messages.items()):
        row = mailings.setdefault(m.mailing_id, {"total_sent": 0, **{k: 0 for k, _ in _MAILING_FLAGS}})
        row["total_sent"] += 1
        fl = set(msgs[mid]["flags"])
        for k, flag in _MAILING_FLAGS:
            if flag in fl:
                row[k] += 1
    return {
        "enrollments": enrollments,
        "node_counts": node_counts,
        "status_counts": status_counts,
        "completion": completion,
        "recipients": sorted([list(x) for x in recipients]),
        "messages": msgs,
        "mailings": dict(sorted(mailings.items())),
        "ignored_enrollments": ignored_enrollments,
        "dead_letters": dict(sorted(dead_letters.items())),
        "event_counts": dict(sorted(event_counts.items())),
        "now_ms": now_ms,
    }
