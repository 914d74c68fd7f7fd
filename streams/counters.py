"""Exact report counters kept by the worker, one row per (key, source partition).

The all-mailings table and the report's per-node and per-status counts must be
exact, and the tables they count are written at least once: a replay re-emits
rows at a bumped version, so ClickHouse cannot sum inserted rows (a
materialized view summing them would count a replay twice), and counting the
latest state (``messages FINAL``, ``node_states FINAL``) reads every message
or node state of the automation, slower the more unmerged parts there are.

So the worker counts what it writes. Every key (a message; an enrollment key
with its runs) keeps in its own state what it last counted (``cc``): for a
message its mailing and flags, for an enrollment key each run's status class
and node states. The rows a key emits are compared with its ``cc``: the
difference goes to the partition's totals, and ``cc`` becomes what the rows
say. Since the latest row per row key in ClickHouse is the last one emitted
(versions only grow), the totals are exactly what ``FINAL`` would count, and
``cc`` is written in the same record as the key's state, so the two never
disagree. A partition's totals are a separate record: after an unclean stop
they are recounted from the ``cc`` of every key (:func:`contact_totals`,
:func:`message_totals`).

* ``mailing_counters``: per (mailing_id, channel, automation_id, step_index):
  total_sent and the messages with each flag.
* ``node_counters``: per (automation_id, step_index): the runs done,
  waiting, filtered, stopped at that node.
* ``status_counters``: per (automation_id, status): the runs with that
  status, the contacts among them (run 0), their ignored enrollments, and the
  report's completion classes (completed, in_progress, not_started, left).

Pure: rows and dicts in, dicts out.
"""
from __future__ import annotations

from typing import Iterable, Mapping

#: counter column -> messages row field whose being set counts the message
MAILING_FLAG_COUNTERS: tuple[tuple[str, str], ...] = (
    ("delivered", "delivered_at"), ("opened", "opened_at"), ("clicked", "clicked_at"),
    ("bounced", "bounced_at"), ("dropped", "dropped_at"), ("deferred", "deferred_at"),
    ("spam_reports", "spam_reported_at"), ("unsubscribed", "unsubscribed_at"),
)
MAILING_COUNTERS: tuple[str, ...] = ("total_sent",) + tuple(c for c, _ in MAILING_FLAG_COUNTERS)
NODE_COUNTERS: tuple[str, ...] = ("done", "waiting", "filtered", "stopped")
STATUS_COUNTERS: tuple[str, ...] = ("runs", "contacts", "ignored_enrollments", "completed", "in_progress",
                                    "not_started", "left_runs")

#: counters table -> its counter columns, in row order
COUNTER_NAMES: dict[str, tuple[str, ...]] = {
    "mailing_counters": MAILING_COUNTERS, "node_counters": NODE_COUNTERS, "status_counters": STATUS_COUNTERS,
}
COUNTER_TABLES: tuple[str, ...] = tuple(COUNTER_NAMES)

MailingKey = tuple[str, str, str, int]   # (mailing_id, channel, automation_id, step_index)
NodeKey = tuple[str, int]                # (automation_id, step_index)
StatusKey = tuple[str, str]              # (automation_id, status)
Totals = dict  # key -> list of counts, in the order of the table's counter names

_NODE_SLOT = {name: i for i, name in enumerate(NODE_COUNTERS)}
_FLAG_FIELDS = tuple(field for _, field in MAILING_FLAG_COUNTERS)
_N_MAILING = len(MAILING_COUNTERS)
_N_STATUS = len(STATUS_COUNTERS)
_N_NODE = len(NODE_COUNTERS)


def _bump(acc: Totals, key: tuple, slot_values: Iterable[tuple[int, int]], size: int) -> None:
    counts = acc.get(key)
    if counts is None:
        counts = acc[key] = [0] * size
    for slot, value in slot_values:
        counts[slot] += value


# --------------------------------------------------------------------------- messages

def _message_entry(row: Mapping) -> list:
    """What one ``messages`` row counts: [mailing_id, channel, automation_id, step_index, flag bits]."""
    bits = 0
    for i, field in enumerate(_FLAG_FIELDS):
        if row.get(field) is not None:
            bits |= 1 << i
    return [row.get("mailing_id") or "", row.get("channel") or "email", row.get("automation_id") or "",
            int(row.get("step_index") or 0), bits]


def _add_message(acc: Totals, entry: list, sign: int) -> None:
    bits = entry[4]
    values = [(0, sign)] + [(i + 1, sign) for i in range(len(_FLAG_FIELDS)) if bits >> i & 1]
    _bump(acc, (entry[0], entry[1], entry[2], entry[3]), values, _N_MAILING)


def count_message_rows(cc: list | None, rows: Iterable[Mapping], acc: Totals) -> list | None:
    """Count the ``messages`` rows one message emitted (in order): their differences from ``cc`` (what the
    message counted before, None: nothing) are added to ``acc``; returns the new ``cc``."""
    for row in rows:
        new = _message_entry(row)
        if new == cc:
            continue
        if cc is not None:
            _add_message(acc, cc, -1)
        _add_message(acc, new, 1)
        cc = new
    return cc


def message_totals(entries: Iterable[list | None], acc: Totals) -> Totals:
    """Add what each message counts (its ``cc``) to ``acc``: a partition's totals from its messages."""
    for entry in entries:
        if entry is not None:
            _add_message(acc, entry, 1)
    return acc


# --------------------------------------------------------------------------- enrollments

def _status_entry(row: Mapping) -> list:
    """What one ``enrollments`` row counts: [status, completed, step class, ignored enrollments] with
    the report's completion classes (queries.report): step class 1 = in progress (current_step > 0),
    0 = not started (current_step 0), -1 = no current step; completed = no current step and not
    filtered out, i.e. every step done (whatever the status: a reply to the last e-mail too)."""
    step = row.get("current_step")
    step = -1 if step is None else int(step)
    completed = step < 0 and not (row.get("status") == "finished" and row.get("reason") == "filtered")
    return [row.get("status") or "", int(completed), (step > 0) - (step < 0), int(row.get("ignored_enrollments") or 0)]


def _add_status(acc: Totals, automation_id: str, run: int, entry: list, sign: int) -> None:
    status, completed, klass, ignored = entry
    _bump(acc, (automation_id, status), (
        (0, sign), (1, sign if run == 0 else 0), (2, sign * ignored), (3, sign * completed),
        (4, sign if klass > 0 else 0), (5, sign if klass == 0 else 0),
        (6, sign if klass < 0 and not completed else 0)), _N_STATUS)


def count_contact_rows(cc: dict | None, rows: Mapping[str, list], nodes_acc: Totals, status_acc: Totals
                       ) -> dict | None:
    """Count the ``enrollments`` and ``node_states`` rows one enrollment key emitted (each table's rows in
    order): the differences from ``cc`` (``{"r": {run: status entry}, "n": {run: {step: state}}}``, what
    the key counted before; None: nothing) go to the accumulators; returns the new ``cc``.
    ``none`` node states count nowhere."""
    enrollments = rows.get("enrollments")
    node_rows = rows.get("node_states")
    if not enrollments and not node_rows:
        return cc
    if cc is None:
        cc = {"r": {}, "n": {}}
    runs = cc["r"]
    for row in enrollments or ():
        run = row["run"]
        new = _status_entry(row)
        old = runs.get(str(run))
        if old == new:
            continue
        aid = row["automation_id"]
        if old is not None:
            _add_status(status_acc, aid, run, old, -1)
        _add_status(status_acc, aid, run, new, 1)
        runs[str(run)] = new
    all_nodes = cc["n"]
    for row in node_rows or ():
        run = str(row["run"])
        nodes = all_nodes.get(run)
        if nodes is None:
            nodes = all_nodes[run] = {}
        step = str(row["step_index"])
        new_state = row["state"]
        old_state = nodes.get(step, "none")
        if old_state == new_state:
            continue
        key = (row["automation_id"], int(row["step_index"]))
        if old_state in _NODE_SLOT:
            _bump(nodes_acc, key, ((_NODE_SLOT[old_state], -1),), _N_NODE)
        if new_state in _NODE_SLOT:
            _bump(nodes_acc, key, ((_NODE_SLOT[new_state], 1),), _N_NODE)
            nodes[step] = new_state
        else:
            del nodes[step]
    return cc


def contact_totals(keyed: Iterable[tuple[str, dict | None]], nodes_acc: Totals, status_acc: Totals) -> None:
    """Add what each enrollment key counts (``(automation_id, cc)``) to the accumulators: a partition's
    totals from its keys."""
    for automation_id, cc in keyed:
        if not cc:
            continue
        for run, entry in cc["r"].items():
            _add_status(status_acc, automation_id, int(run), entry, 1)
        for nodes in cc["n"].values():
            for step, state in nodes.items():
                _bump(nodes_acc, (automation_id, int(step)), ((_NODE_SLOT[state], 1),), _N_NODE)


# --------------------------------------------------------------------------- totals and rows

def merge(totals: Mapping[tuple, list], deltas: Mapping[tuple, list]) -> tuple[dict[tuple, list], list[tuple]]:
    """``totals`` plus ``deltas`` for the keys of ``deltas``: (the new counts of the keys that changed,
    the keys whose count would go below zero). A count below zero means a difference without the
    earlier one it undoes (the totals do not match the keys' ``cc``): the caller recounts."""
    changed: dict[tuple, list] = {}
    negative = []
    for key, delta in deltas.items():
        if not any(delta):
            continue
        current = totals.get(key)
        new = list(delta) if current is None else [a + b for a, b in zip(current, delta)]
        if min(new) < 0:
            negative.append(key)
        changed[key] = new
    return changed, negative


def mailing_counter_row(key: MailingKey, partition: int, counts: list, version: int) -> tuple:
    """A ``mailing_counters`` row (migration 009), in ``TABLE_COLUMNS`` order."""
    return (*key, partition, *counts, version)


def node_counter_row(key: NodeKey, partition: int, counts: list, version: int) -> tuple:
    """A ``node_counters`` row (migration 009), in ``TABLE_COLUMNS`` order."""
    return (*key, partition, *counts, version)


def status_counter_row(key: StatusKey, partition: int, counts: list, version: int) -> tuple:
    """A ``status_counters`` row (migration 009), in ``TABLE_COLUMNS`` order."""
    return (*key, partition, *counts, version)


def coverage_row(counters: str, partition: int, partitions: int, version: int) -> tuple:
    """A ``counter_coverage`` row: ``counters`` (a table name) counts every key of ``partition`` (of
    ``partitions``). The API trusts a counters table only when every partition is covered."""
    if counters not in COUNTER_TABLES:
        raise ValueError(f"unknown counters table {counters!r}")
    return (counters, partition, partitions, version)
