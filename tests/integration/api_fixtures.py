"""A small hand-built dataset with known figures, for the API tests.

``open_database(path)`` opens (creates) an embedded chDB at ``path``;
``load_dataset(client, database)`` migrates ``database`` and inserts the rows
below. Every figure the tests assert is written out in ``EXPECTED`` (worked
out by hand from the tables here), and period figures are recomputed by the
tiny pure-Python helpers at the end (independent of the SQL under test).

Automation A1 "Welcome Series / Q1" (unlimited, 3 e-mail steps), runs:

===== ===  ====================  ============  ==========  ==================
cid   run  status / reason       current_step  done steps  current node state
===== ===  ====================  ============  ==========  ==================
c01   0    finished / completed  -1            0 1 2       -
c01   1    in_progress           1             0           waiting@1
c02   0    finished / completed  -1            0 1 2       -
c03   0    in_progress           2             0 1         waiting@2
c04   0    in_progress           1             0           waiting@1
c05   0    bounced / hard_bounce 1             0           stopped@1
c06   0    ready                 0             -           waiting@0
c07   0    waiting_enrichment    0             -           waiting@0
c08   0    finished / filtered   -1            0           filtered@1
c09   0    unsubscribed          2             0 1         stopped@2
c10   0    paused / manual       1             0           waiting@1
c11   0    canceled / removed    0             -           stopped@0
c12   0    in_progress           1             0 (2 sends) waiting@1
===== ===  ====================  ============  ==========  ==================

Automation A2 "Re-engage" (once, step 0 e-mail, step 1 task): c13..c20 and c01.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from sendtrail.clickhouse import connect, insert
from sendtrail.migrate import migrate
from streams.rows import repeat_send_row, wait_row

UTC = dt.timezone.utc
T0 = dt.datetime(2024, 3, 1, 0, 0, 0)          # naive UTC, as ClickHouse returns it
NOW = T0 + dt.timedelta(days=60)               # the API's clock in the tests
DAY = dt.timedelta(days=1)
HOUR = dt.timedelta(hours=1)

A1, A2 = "a1", "a2"
A1_NAME = "Welcome Series / Q1"
A2_NAME = "Re-engage"

STEPS = {
    A1: [{"index": 0, "name": "Welcome", "kind": "email", "day": 0},
         {"index": 1, "name": "Tips", "kind": "email", "day": 3},
         {"index": 2, "name": "Offer", "kind": "email", "day": 7}],
    A2: [{"index": 0, "name": "Come back", "kind": "email", "day": 0},
         {"index": 1, "name": "Call", "kind": "task", "day": 2}],
}
SUBJECTS = {(A1, 0): "Welcome!", (A1, 1): '=HYPERLINK("http://evil")', (A1, 2): "Last chance",
            (A2, 0): "We miss you"}

NAMES = {
    "c01": "Ann Archer", "c02": "Bob Baker", "c03": "Cy Cole", "c04": "=cmd|' /C calc'!A0",
    "c05": "Eve Evans", "c06": 'Smith, "Bob"', "c07": "Zoë Ångström", "c08": "Hal Hunt",
    "c09": "Ivy Irwin", "c10": "Jo Jones", "c11": "Kim Kent", "c12": "Lu Lane",
    "c13": "Mo Moss", "c14": "Ned Nash", "c15": "Oz Ortiz", "c16": "Pia Park", "c17": "Quinn Q",
    "c18": "Rae Ross", "c19": "Sam Soto", "c20": "Tia Tran",
}


def email(cid: str) -> str:
    return f"{cid}@example.com"


@dataclass
class Run:
    automation_id: str
    contact_id: str
    run: int
    status: str
    reason: str | None
    current_step: int
    done: list[int]
    node_state: str | None          # state at current_step (or the filtered node)
    enrolled_at: dt.datetime
    extra_sends: dict[int, int] = field(default_factory=dict)  # step -> additional duplicate sends
    resume_at: dt.datetime | None = None  # a held run's own resume date

    def sent_time(self, step: int, copy: int = 0) -> dt.datetime:
        return self.enrolled_at + step * 2 * DAY + HOUR + copy * dt.timedelta(minutes=5)

    @property
    def last_time(self) -> dt.datetime:
        return self.sent_time(max(self.done)) if self.done else self.enrolled_at

    @property
    def state_node(self) -> int | None:
        if self.node_state == "filtered":
            return max(self.done) + 1 if self.done else 0
        return self.current_step if self.current_step >= 0 else None

    @property
    def state_at(self) -> dt.datetime:
        """Time of the current node's state (waiting: last done; stopped/filtered: one hour later)."""
        return self.last_time + (HOUR if self.node_state in ("stopped", "filtered") else dt.timedelta(0))

    @property
    def status_at(self) -> dt.datetime:
        if self.status == "finished" and self.reason == "completed":
            return self.last_time
        return self.state_at


def _enrolled(i: int, days: float = 0) -> dt.datetime:
    return T0 + i * DAY + dt.timedelta(days=days)


RUNS: list[Run] = [
    Run(A1, "c01", 0, "finished", "completed", -1, [0, 1, 2], None, _enrolled(1)),
    Run(A1, "c01", 1, "in_progress", None, 1, [0], "waiting", _enrolled(20)),
    Run(A1, "c02", 0, "finished", "completed", -1, [0, 1, 2], None, _enrolled(2)),
    Run(A1, "c03", 0, "in_progress", None, 2, [0, 1], "waiting", _enrolled(3)),
    Run(A1, "c04", 0, "in_progress", None, 1, [0], "waiting", _enrolled(4)),
    Run(A1, "c05", 0, "bounced", "hard_bounce", 1, [0], "stopped", _enrolled(5)),
    Run(A1, "c06", 0, "ready", None, 0, [], "waiting", _enrolled(6)),
    Run(A1, "c07", 0, "waiting_enrichment", None, 0, [], "waiting", _enrolled(7)),
    Run(A1, "c08", 0, "finished", "filtered", -1, [0], "filtered", _enrolled(8)),
    Run(A1, "c09", 0, "unsubscribed", "unsubscribed", 2, [0, 1], "stopped", _enrolled(9)),
    Run(A1, "c10", 0, "paused", "manual", 1, [0], "waiting", _enrolled(10),
        resume_at=dt.datetime(2024, 4, 1, 9, 0, tzinfo=dt.timezone.utc)),
    Run(A1, "c11", 0, "canceled", "removed", 0, [], "stopped", _enrolled(11)),
    Run(A1, "c12", 0, "in_progress", None, 1, [0], "waiting", _enrolled(12), extra_sends={0: 1}),
    # A2: sends only for step 0 (step 1 is a task)
    Run(A2, "c13", 0, "in_progress", None, 1, [0], "waiting", _enrolled(13)),
    Run(A2, "c14", 0, "finished", "completed", -1, [0, 1], None, _enrolled(14)),
    Run(A2, "c15", 0, "ready", None, 0, [], "waiting", _enrolled(15)),
    Run(A2, "c16", 0, "failed", "enrichment_failed", 0, [], "stopped", _enrolled(16)),
    Run(A2, "c17", 0, "in_progress", None, 1, [0], "waiting", _enrolled(17)),
    Run(A2, "c18", 0, "duplicate", "duplicate", 0, [], "stopped", _enrolled(18)),
    Run(A2, "c19", 0, "finished", "replied", 1, [0], "stopped", _enrolled(19)),
    Run(A2, "c20", 0, "in_progress", None, 1, [0], "waiting", _enrolled(20)),
    Run(A2, "c01", 0, "ready", None, 0, [], "waiting", _enrolled(21)),
]

# message flags per (automation, contact, run, step, copy): flag -> hours after the send
DEFAULT_FLAGS = {"sent": 0, "delivered": 1}
FLAGS: dict[tuple, dict[str, float]] = {
    (A1, "c01", 0, 0, 0): {"sent": 0, "delivered": 1, "opened": 2, "clicked": 3},
    (A1, "c02", 0, 0, 0): {"sent": 0, "delivered": 1, "opened": 2},
    (A1, "c03", 0, 0, 0): {"sent": 0, "delivered": 1, "opened": 5},
    (A1, "c05", 0, 0, 0): {"sent": 0, "bounced": 1},
    (A1, "c10", 0, 0, 0): {"sent": 0, "deferred": 0.5, "delivered": 2},
    (A1, "c12", 0, 0, 1): {"sent": 0, "dropped": 0.1},
    (A1, "c01", 1, 0, 0): {"sent": 0},
    (A1, "c02", 0, 1, 0): {"sent": 0, "delivered": 1, "spam_reported": 4},
    (A1, "c03", 0, 1, 0): {"sent": 0, "delivered": 1, "opened": 2},
    (A1, "c09", 0, 1, 0): {"sent": 0, "delivered": 1, "unsubscribed": 3},
    (A1, "c01", 0, 2, 0): {"sent": 0, "delivered": 1, "opened": 2},
    (A2, "c14", 0, 0, 0): {"sent": 0, "delivered": 1, "opened": 2, "clicked": 2.5},
    (A2, "c19", 0, 0, 0): {"sent": 0, "delivered": 1, "replied": 6},
    (A2, "c20", 0, 0, 0): {"sent": 0},
}
STATUS_ORDER = ["dropped", "bounced", "spam_reported", "unsubscribed", "clicked", "opened", "delivered",
                "deferred", "sent"]
FLAG_NAMES = ["sent", "delivered", "deferred", "opened", "clicked", "bounced", "dropped", "spam_reported",
              "unsubscribed", "resubscribed", "replied", "auto_replied"]


@dataclass
class Send:
    run: Run
    step: int
    copy: int

    @property
    def message_id(self) -> str:
        return f"m-{self.run.automation_id}-{self.run.contact_id}-r{self.run.run}-s{self.step}-{self.copy}"

    @property
    def sent_time(self) -> dt.datetime:
        return self.run.sent_time(self.step, self.copy)

    @property
    def flags(self) -> dict[str, dt.datetime]:
        spec = FLAGS.get((self.run.automation_id, self.run.contact_id, self.run.run, self.step, self.copy),
                         DEFAULT_FLAGS)
        return {f: self.sent_time + dt.timedelta(hours=h) for f, h in spec.items()}

    @property
    def status(self) -> str:
        return next(s for s in STATUS_ORDER if s in self.flags)

    @property
    def mailing_id(self) -> str:
        return f"{self.run.automation_id}:{self.step}"


def sends() -> list[Send]:
    out = []
    for r in RUNS:
        for step in r.done:
            if r.automation_id == A2 and step == 1:
                continue  # a task: no message
            for copy in range(1 + r.extra_sends.get(step, 0)):
                out.append(Send(r, step, copy))
    return out


def node_rows() -> list[tuple[Run, int, str, dt.datetime]]:
    """(run, step_index, state, at) of every node state row."""
    out = []
    for r in RUNS:
        for step in r.done:
            out.append((r, step, "done", r.sent_time(step)))
        if r.node_state is not None and r.state_node is not None:
            out.append((r, r.state_node, r.node_state, r.state_at))
    return out


# ------------------------------------------------------------------ loading

def open_database(path: str, database: str = "sendtrail"):
    """A client on an embedded chDB at ``path`` (created), default database ``database``."""
    return connect(f"chdb://{path}", database=database)


def _ins(client, table: str, rows: list[dict], database: str) -> None:
    token = hashlib.sha256(orjson.dumps([table, database, rows], default=str)).hexdigest()
    insert(client, table, rows, dedup_token=token, database=database)


def write_waits(client, database: str) -> None:
    """The ``node_waits`` rows (migration 012) the worker writes with the ``node_states`` rows in the
    table: walking each node's rows by version, a row that leaves 'waiting' closes the wait of the row
    before it and a 'waiting' row opens one (rows of a version already written are written again, as a
    replay does)."""
    history: dict[tuple, list[dict]] = {}
    for row in client.query(f"SELECT * FROM {database}.node_states ORDER BY _version, _part").named_results():
        history.setdefault((row["automation_id"], row["contact_id"], row["run"], row["step_index"]), []).append(row)
    waits = []
    for (aid, cid, run, step), node_rows in history.items():
        before = None
        for row in node_rows:
            if before is not None and before["state"] == "waiting" and (
                    row["state"] != "waiting" or row["at"] != before["at"]):
                waits.append(wait_row(aid, cid, run, step, before["at"], True, row["_version"]))
            if row["state"] == "waiting":
                waits.append(wait_row(aid, cid, run, step, row["at"], False, row["_version"]))
            before = row
    _ins(client, "node_waits", waits, database)


def load_dataset(client, database: str) -> None:
    migrate(client, database)
    v = 1
    _ins(client, "automations", [
        dict(automation_id=A1, name=A1_NAME, description="New sign-ups", participation="unlimited",
             start_at=T0, end_at=None, published_by="alice", version=2, steps=orjson.dumps(STEPS[A1]).decode(),
             status="active", updated_at=T0, _version=v),
        dict(automation_id=A2, name=A2_NAME, description=None, participation="once",
             start_at=T0, end_at=T0 + 90 * DAY, published_by="bob", version=1,
             steps=orjson.dumps(STEPS[A2]).decode(), status="paused", updated_at=T0 + HOUR, _version=v),
    ], database)
    _ins(client, "contacts", [
        dict(contact_id=cid, user_id=f"u{cid[1:]}", name=name, email=email(cid), company=None,
             attributes='{"plan": "pro"}', updated_at=T0, _version=v)
        for cid, name in NAMES.items()
    ], database)
    all_sends = sends()
    recipient_rows = [
        dict(recipient_id=f"r-{s.message_id}", automation_id=s.run.automation_id, run=s.run.run,
             contact_id=s.run.contact_id, user_id=f"u{s.run.contact_id[1:]}", user_name=NAMES[s.run.contact_id],
             email=email(s.run.contact_id), step_index=s.step,
             step_details=orjson.dumps({"day": STEPS[s.run.automation_id][s.step]["day"], "inactive_days": 0}).decode(),
             message_id=s.message_id, channel="email", mailing_id=s.mailing_id, sent_time=s.sent_time,
             metadata=orjson.dumps({"campaign": "spring", "n": i}).decode(), _partition=0, _offset=i, _version=v)
        for i, s in enumerate(all_sends)
    ]
    _ins(client, "recipients", recipient_rows, database)
    # a replayed batch: identical rows in another part (FINAL must fold them)
    client_rows = recipient_rows[:5]
    insert(client, "recipients", client_rows, dedup_token="replay-" + database, database=database)
    # the worker's candidates for duplicate sends: one row per step registered a second time
    _ins(client, "repeat_sends", [
        repeat_send_row(s.run.automation_id, s.run.contact_id, s.run.run, s.step,
                        [Send(s.run, s.step, c).message_id for c in range(s.copy + 1)], False)
        for s in all_sends if s.copy
    ], database)

    enrollment_rows = [
        dict(automation_id=r.automation_id, contact_id=r.contact_id, run=r.run, status=r.status, reason=r.reason,
             current_step=r.current_step, name=NAMES[r.contact_id], email=email(r.contact_id),
             user_id=f"u{r.contact_id[1:]}", enrolled_at=r.enrolled_at, status_at=r.status_at, resume_at=r.resume_at,
             updated_at=r.status_at, ignored_enrollments=1 if r.contact_id == "c02" else 0, _version=v + 1)
        for r in RUNS
    ]
    _ins(client, "enrollments", enrollment_rows, database)
    # an older version of c04's row (must lose to the newer one)
    _ins(client, "enrollments", [dict(enrollment_rows[4], status="ready", current_step=0, _version=v)], database)

    node_state_rows = [
        dict(automation_id=r.automation_id, contact_id=r.contact_id, run=r.run, step_index=step, state=state,
             at=at, _version=v + 1)
        for r, step, state, at in node_rows()
    ]
    # c04 once waited at node 0 (older version, now done) and an obsolete 'none' row elsewhere
    node_state_rows.append(dict(automation_id=A1, contact_id="c02", run=0, step_index=5, state="none",
                                at=T0, _version=v))
    _ins(client, "node_states", node_state_rows, database)
    _ins(client, "node_states", [dict(automation_id=A1, contact_id="c04", run=0, step_index=0, state="waiting",
                                      at=_enrolled(4), _version=v)], database)
    write_waits(client, database)

    message_rows = []
    for s in all_sends:
        flags = s.flags
        row = dict(message_id=s.message_id, mailing_id=s.mailing_id, automation_id=s.run.automation_id,
                   run=s.run.run, contact_id=s.run.contact_id, step_index=s.step,
                   subject=SUBJECTS[(s.run.automation_id, s.step)], sending_user="alice",
                   sending_email="alice@example.com", email=email(s.run.contact_id), name=NAMES[s.run.contact_id],
                   channel="email", status=s.status, status_at=flags[s.status],
                   bounce_class="hard" if "bounced" in flags else None, return_at=None,
                   opens=1 if "opened" in flags else 0, clicks=1 if "clicked" in flags else 0,
                   updated_at=max(flags.values()), _version=v + 1)
        for f in FLAG_NAMES:
            row[f"{f}_at"] = flags.get(f)
        message_rows.append(row)
    _ins(client, "messages", message_rows, database)
    # an older version of one message (status sent only)
    old = dict(message_rows[0], status="sent", status_at=message_rows[0]["sent_at"], delivered_at=None,
               opened_at=None, clicked_at=None, _version=v)
    _ins(client, "messages", [old], database)

    changes = []
    for i, (kind, to, at) in enumerate([
        ("contact_status", "ready", _enrolled(1)),
        ("contact_status", "in_progress", _enrolled(1) + HOUR),
        ("node_state", "done", _enrolled(1) + HOUR),
        ("message_status", "delivered", _enrolled(1) + 2 * HOUR),
        ("contact_status", "finished", _enrolled(1) + 4 * DAY + HOUR),
    ]):
        changes.append(dict(change_id=f"ch{i}", kind=kind, automation_id=A1, contact_id="c01", run=0,
                            step_index=0 if kind == "node_state" else None,
                            message_id="m-a1-c01-r0-s0-0" if kind == "message_status" else None,
                            from_status=None, to_status=to, reason=None, event_id=f"e{i}",
                            event_type="step.sent", occurred_at=at))
    _ins(client, "status_changes", changes, database)
    insert(client, "status_changes", changes[:2], dedup_token="replay-sc-" + database, database=database)


# ------------------------------------------------------------------ expected figures

EXPECTED: dict[str, Any] = {
    "a1_nodes": {
        0: {"done": 10, "waiting": 2, "filtered": 0, "stopped": 1},
        1: {"done": 4, "waiting": 4, "filtered": 1, "stopped": 1},
        2: {"done": 2, "waiting": 1, "filtered": 0, "stopped": 1},
    },
    "a1_statuses": {"finished": 3, "in_progress": 4, "bounced": 1, "ready": 1, "waiting_enrichment": 1,
                    "unsubscribed": 1, "paused": 1, "canceled": 1},
    "a1_completion": {"completed": 2, "in_progress": 7, "not_started": 3, "left": 1},
    "a1_runs": 13,
    "a1_contacts": 12,
    "a1_recipients": 17,
    "a1_recipients_by_step": {0: 11, 1: 4, 2: 2},
    "a2_recipients": 5,
    "mailings": {
        "a1:0": {"total_sent": 11, "delivered": 8, "opened": 3, "clicked": 1, "bounced": 1, "dropped": 1,
                 "deferred": 1, "spam_reports": 0, "unsubscribed": 0},
        "a1:1": {"total_sent": 4, "delivered": 4, "opened": 1, "clicked": 0, "bounced": 0, "dropped": 0,
                 "deferred": 0, "spam_reports": 1, "unsubscribed": 1},
        "a1:2": {"total_sent": 2, "delivered": 2, "opened": 1, "clicked": 0, "bounced": 0, "dropped": 0,
                 "deferred": 0, "spam_reports": 0, "unsubscribed": 0},
        "a2:0": {"total_sent": 5, "delivered": 4, "opened": 1, "clicked": 1, "bounced": 0, "dropped": 0,
                 "deferred": 0, "spam_reports": 0, "unsubscribed": 0},
    },
    # waiting runs of A1 (at < NOW - 7 days: all of them)
    "a1_stuck": 7,
    "a1_duplicates": [("c12", 0, 0, ["m-a1-c12-r0-s0-0", "m-a1-c12-r0-s0-1"])],
    "c01_timeline": 5,
}


def expected_nodes_in_period(automation_id: str, start: dt.datetime, end: dt.datetime) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = {}
    for r, step, state, at in node_rows():
        if r.automation_id == automation_id and start <= at < end:
            out.setdefault(step, dict.fromkeys(("done", "waiting", "filtered", "stopped"), 0))[state] += 1
    return out


def expected_statuses_in_period(automation_id: str, start: dt.datetime, end: dt.datetime) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in RUNS:
        if r.automation_id == automation_id and start <= r.enrolled_at < end:
            out[r.status] = out.get(r.status, 0) + 1
    return out
