"""A seeded synthetic workload (SPEC section 2 events) with its expected end state.

:func:`generate` plans, for every contact in every automation, a *story*
(enrolled, enriched, steps sent, what the provider said about each message,
pauses, limits, replies, ...), emits the contract events of that story in the
raw contract form (RFC 3339 strings, JSON bytes), and records the facts of the
story in :mod:`streams.oracle` structures, from which the oracle (the expected
end state) is derived. The oracle never runs the state machines of
``streams/engine``.

Design rules that make the expected end state independent of how the input
topics are interleaved by a consumer (``enrollments``, ``sends`` and
``provider-events`` are separate topics; only the order *within* a topic is
kept):

- a contact's ``contact.*`` and ``step.*`` events are produced in time order;
  facts merge by time (docs/semantics.md), so their cross-topic interleaving
  does not matter;
- contact and step events carry no run, so re-enrollment into an
  ``unlimited`` automation (a second run) is only planned for contacts whose
  runs have ``contact.*`` events only (all on one topic, in order). Ignored
  re-enrollment attempts are planned into ``once`` automations (always
  ignored) and into open contact-only runs that can only end on the
  ``enrollments`` topic;
- ``automation.paused``/``resumed`` are fanned out by the pipeline to the
  enrollments that exist *when they are processed*; the plan makes that
  invisible in the end state: nothing of a paused automation happens during
  its pause window, and the resume ends the pause of every run that got it,
  leaving the runs' own holds (paused, not_sent, bounced, out of office) as
  they were, so the pause and the resume cancel out whether a run is reached
  or not;
- ``automation.archived`` cannot be made order-independent under the
  fan-out rule (it cancels the runs that are open when it is processed): it
  is produced last, after every event of the automation's contacts, when
  every message has settled (its steps are all e-mails), and a consumer must
  process it after everything produced before it (a barrier), as
  ``tests/unit/test_oracle_fold.py`` does, to reach the oracle exactly.

Provider events (``provider-events``) are produced out of order within a
bounded window (``reorder_window`` positions of that topic) and retried
(the same bytes, same ``event_id``) at rate ``duplicate_rate``. Because of the
reordering a provider event occasionally comes before the ``step.sent`` of
its message. A few ``contact.*``/``step.*`` events are replayed right after
themselves, and a few provider events concern message ids that were never
sent (not in the oracle).
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import orjson

from streams.oracle import MessagePlan, RunPlan, build_oracle, derive_run, ENDED

__all__ = ["Workload", "generate", "write_jsonl", "read_jsonl", "format_ts", "TOPICS", "DEAD_LETTER_REASONS"]

AUTOMATIONS = "automations"
ENROLLMENTS = "enrollments"
SENDS = "sends"
PROVIDER_EVENTS = "provider-events"
TOPICS = (AUTOMATIONS, ENROLLMENTS, SENDS, PROVIDER_EVENTS)

#: Reason codes of the invalid messages ``invalid=N`` adds (N of each).
DEAD_LETTER_REASONS = (
    "too_large",
    "invalid_json",
    "not_an_object",
    "missing_type",
    "unknown_type",
    "wrong_topic",
    "missing_field",
    "wrong_type",
    "bad_timestamp",
    "bad_enum",
    "bad_value",
)

#: Bigger than the parser's default limit (256 KiB).
_TOO_LARGE_BYTES = 300 * 1024

MIN = 60_000
HOUR = 3_600_000
DAY = 24 * HOUR

_FIRST = ("Ada", "Ben", "Chloe", "Dmitri", "Elif", "Farah", "Gus", "Hana", "Ivan", "Jun", "Kemi", "Luis",
          "Mira", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sven", "Tara", "Uma", "Viktor", "Wen", "Yara")
_LAST = ("Adams", "Berg", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Huang", "Ivanova", "Jensen",
         "Kowalski", "Lopez", "Moreau", "Novak", "Okafor", "Petrov", "Rossi", "Schmidt", "Tanaka", "Weber")
_COMPANIES = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Tyrell", "Soylent", "Cyberdyne")
_DOMAINS = ("example.com", "example.org", "mail.example.net", "corp.example")
_PROVIDERS = ("sendgrid", "mailgun", "ses", "postmark")
_KINDS = ("email", "linkedin_connect", "linkedin_message", "task", "wait", "condition")
_KIND_W = (0.55, 0.08, 0.08, 0.08, 0.11, 0.10)
_OFFSETS = (60, -300, 330, 120)


_DATE_CACHE: dict[int, str] = {}


def format_ts(ms: int, offset_min: int = 0) -> str:
    """RFC 3339 with milliseconds: ``2026-01-05T10:00:00.123Z`` (or with ``+hh:mm``)."""
    secs, milli = divmod(int(ms), 1000)
    secs += offset_min * 60
    day, rem = divmod(secs, 86400)
    date = _DATE_CACHE.get(day)
    if date is None:
        date = _DATE_CACHE[day] = time.strftime("%Y-%m-%d", time.gmtime(day * 86400))
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    s = f"{date}T{h:02d}:{m:02d}:{sec:02d}.{milli:03d}"
    if offset_min == 0:
        return s + "Z"
    sign = "+" if offset_min > 0 else "-"
    oh, om = divmod(abs(offset_min), 60)
    return f"{s}{sign}{oh:02d}:{om:02d}"


def _dumps(obj: Any) -> bytes:
    """Compact JSON, UTF-8, keys in insertion order (same bytes as json.dumps(separators=(",", ":")))."""
    return orjson.dumps(obj)


@dataclass
class Workload:
    """``events``: (contract topic, key, value bytes) in production order; ``oracle``: see streams.oracle."""

    events: list[tuple[str, str, bytes]]
    oracle: dict


@dataclass(slots=True)
class _Item:
    t: int
    seq: int
    topic: str
    key: str
    obj: Any  # dict (event) or bytes (invalid raw)
    kind: str = "event"  # event | invalid


@dataclass
class _Automation:
    aid: str
    index: int
    participation: str
    steps: list[dict]
    provider: str
    lifecycle: str | None  # None | "pause" | "archive"
    t_end: int
    clock: Callable[[float], int]
    pause: tuple[int, int] | None = None
    archive_at: int | None = None
    runs: list[RunPlan] = field(default_factory=list)


@dataclass
class _Contact:
    cid: str
    user_id: str
    name: str
    email: str
    company: str | None
    attributes: dict


class _Stop(Exception):
    """The story ran past the automation's end of time."""


class _Gen:
    def __init__(self, seed: int, n_auto: int, n_contacts: int, base_ms: int, now_ms: int,
                 duplicate_rate: float, reorder_window: int, invalid: int) -> None:
        if n_auto < 1 or n_contacts < 0:
            raise ValueError("need at least one automation and a non-negative number of contacts")
        self.rng = random.Random(seed)
        self.seed = seed
        self.base = int(base_ms)
        self.now = int(now_ms)
        self.end = self.now - 2 * HOUR - 10 * MIN
        self.span = self.end - self.base
        if self.span < 4 * DAY:
            raise ValueError("now_ms - base_ms must be at least about 4 days")
        self.gmin = max(2 * HOUR, self.span // 400)
        self.gmax = max(self.gmin + HOUR, self.span // 25)
        self.n_auto = n_auto
        self.n_contacts = n_contacts
        self.dup_rate = duplicate_rate
        self.window = max(0, int(reorder_window))
        self.invalid = invalid
        self.items: list[_Item] = []
        self.ids: set[str] = set()
        self.msg_n = 0
        self.autos: list[_Automation] = []
        self.runs: list[RunPlan] = []
        self.messages: dict[str, MessagePlan] = {}
        self.recipients: list[tuple[str, str, int, int, str]] = []
        self.ignored = 0
        self.dead: dict[str, int] = {}

    # ------------------------------------------------------------------ helpers

    def eid(self) -> str:
        while True:
            e = f"ev-{self.rng.getrandbits(64):016x}"
            if e not in self.ids:
                self.ids.add(e)
                return e

    def ts(self, ms: int) -> str:
        if self.rng.random() < 0.03:
            return format_ts(ms, self.rng.choice(_OFFSETS))
        return format_ts(ms)

    def emit(self, topic: str, key: str, typ: str, t: int, fields: dict, *, event_id: str | None = None) -> str:
        e = event_id or self.eid()
        obj: dict[str, Any] = {"event_id": e, "type": typ, "occurred_at": self.ts(t)}
        if self.rng.random() < 0.9:
            obj["schema_version"] = 1
        obj.update(fields)
        self.items.append(_Item(int(t), len(self.items), topic, key, obj))
        return e

    def u(self, a: float, b: float) -> int:
        return int(self.rng.uniform(a, b))

    # ------------------------------------------------------------------ automations

    def make_automations(self) -> None:
        rng = self.rng
        for i in range(self.n_auto):
            aid = f"aut-{i:03d}"
            lifecycle = None
            if self.n_auto >= 3 and i % 5 == 1:
                lifecycle = "pause"
            elif self.n_auto >= 3 and i % 5 == 2:
                lifecycle = "archive"
            n = rng.randint(3, 7)
            if lifecycle == "archive":
                kinds = ["email"] * n
            else:
                kinds = [rng.choices(_KINDS, _KIND_W)[0] for _ in range(n)]
                kinds[0] = "email" if rng.random() < 0.7 else kinds[0]
                kinds[-1] = "email"
                if kinds.count("email") < 2:
                    kinds[1] = "email"
                if "condition" not in kinds and n > 3:
                    kinds[rng.randrange(1, n - 1)] = "condition"
            day = 0
            steps = []
            for k, kind in enumerate(kinds):
                day += 0 if k == 0 else rng.randint(1, 4)
                steps.append({"index": k, "name": f"{kind.replace('_', ' ').title()} {k + 1}", "kind": kind, "day": day})
            participation = "unlimited" if i % 2 == 0 else "once"
            t_end = self.end
            clock: Callable[[float], int] = lambda v: int(v)
            pause = None
            archive_at = None
            if lifecycle == "pause":
                t1 = self.base + int(self.span * rng.uniform(0.35, 0.45))
                t2 = t1 + int(self.span * 0.08)
                m = HOUR
                lo, shift = t1 - m, (t2 + m) - (t1 - m)
                clock = (lambda lo, shift: (lambda v: int(v) if v < lo else int(v) + shift))(lo, shift)
                pause = (t1, t2)
            elif lifecycle == "archive":
                t_end = self.end - int(self.span * 0.12)
                archive_at = self.end - int(self.span * 0.05)
            a = _Automation(aid, i, participation, steps, rng.choice(_PROVIDERS), lifecycle, t_end, clock,
                            pause, archive_at)
            self.autos.append(a)
            published = self.base + i * 1000 + 1
            self.emit(AUTOMATIONS, aid, "automation.published", published, {
                "automation_id": aid,
                "name": f"Outreach {i + 1} ({'once' if participation == 'once' else 'evergreen'})",
                "description": None if rng.random() < 0.3 else f"Synthetic sequence {i + 1} of seed {self.seed}",
                "participation": participation,
                "start_at": format_ts(published),
                "end_at": None if rng.random() < 0.5 else format_ts(self.now + 90 * DAY),
                "published_by": rng.choice(("alice@example.com", "bob@example.com", "ops@example.com")),
                "version": 1,
                "steps": steps,
            })

    # ------------------------------------------------------------------ contacts

    def make_contact(self, j: int) -> _Contact:
        rng = self.rng
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        company = None if rng.random() < 0.1 else rng.choice(_COMPANIES)
        return _Contact(
            cid=f"ct-{j:06d}",
            user_id=f"u-{j:06d}",
            name=f"{first} {last}",
            email=f"{first.lower()}.{last.lower()}{j}@{rng.choice(_DOMAINS)}",
            company=company,
            attributes={"title": rng.choice(("CEO", "CTO", "VP Sales", "Engineer", "Buyer")),
                        "country": rng.choice(("DE", "FR", "US", "BR", "JP", "IN"))},
        )

    def enroll_fields(self, a: _Automation, c: _Contact, needs: bool) -> dict:
        return {"automation_id": a.aid, "contact_id": c.cid, "user_id": c.user_id, "name": c.name,
                "email": c.email, "company": c.company, "attributes": c.attributes, "needs_enrichment": needs}

    def contact_event(self, a: _Automation, c: _Contact, typ: str, t: int, **fields: Any) -> str:
        return self.emit(ENROLLMENTS, c.cid, typ, t, {"automation_id": a.aid, "contact_id": c.cid, **fields})

    def step_event(self, a: _Automation, c: _Contact, typ: str, t: int, k: int, **fields: Any) -> str:
        return self.emit(SENDS, c.cid, typ, t, {"automation_id": a.aid, "contact_id": c.cid, "step_index": k, **fields})

    # ------------------------------------------------------------------ stories

    def story(self, a: _Automation, c: _Contact, v0: float) -> RunPlan | None:
        """One run of a contact through the steps (run 0)."""
        rng = self.rng
        st = {"v": float(v0)}

        def adv(dmin: float, dmax: float) -> int:
            st["v"] += rng.uniform(dmin, dmax)
            t = a.clock(st["v"])
            if t > a.t_end:
                raise _Stop
            return t

        t0 = a.clock(st["v"])
        if t0 > a.t_end - 6 * HOUR:
            return None
        needs = rng.random() < 0.2
        self.emit(ENROLLMENTS, c.cid, "contact.enrolled", t0, self.enroll_fields(a, c, needs))
        run = RunPlan(a.aid, c.cid, 0, t0, needs)
        run.story.append("enrolled")
        try:
            self._story_body(a, c, run, adv, st)
        except _Stop:
            run.story.append("time is up")
        return run

    def _story_body(self, a: _Automation, c: _Contact, run: RunPlan, adv, st) -> None:
        rng = self.rng
        if run.needs_enrichment:
            if rng.random() < 0.04:
                return  # the enrichment is still running: waiting_enrichment
            t = adv(10 * MIN, 6 * HOUR)
            if rng.random() < 0.10:
                reason = rng.choice(("no_email_found", "no_linkedin_id", "enrichment_timeout"))
                e = self.contact_event(a, c, "contact.enrichment_failed", t, reason=reason)
                run.add(t, e, "terminal", status="failed", reason=reason)
                return
            e = self.contact_event(a, c, "contact.enriched", t)
            run.add(t, e, "enriched")
        if rng.random() < 0.01:
            t = adv(MIN, HOUR)
            e = self.contact_event(a, c, "contact.duplicate", t)
            run.add(t, e, "terminal", status="duplicate", reason="duplicate")
            return
        if rng.random() < 0.02:
            if not self._limit(a, c, run, adv):
                return
        for k, step in enumerate(a.steps):
            if k == 0:
                t = adv(10 * MIN, self.gmin)
            else:
                t = adv(self.gmin, self.gmax)
            x = rng.random()
            if x < 0.004:
                e = self.contact_event(a, c, "contact.finished", t, reason="manual")
                run.add(t, e, "terminal", status="finished", reason="manual")
                return
            if x < 0.007:
                e = self.contact_event(a, c, "contact.removed", t)
                run.add(t, e, "terminal", status="canceled", reason="removed")
                return
            if x < 0.010:
                reason = rng.choice(("manual", "sender_profile_deleted"))
                e = self.contact_event(a, c, "contact.canceled", t, reason=reason)
                run.add(t, e, "terminal", status="canceled", reason=reason)
                return
            if x < 0.012:
                reason = rng.choice(("linkedin_error", "no_email"))
                e = self.contact_event(a, c, "contact.failed", t, reason=reason)
                run.add(t, e, "terminal", status="failed", reason=reason)
                return
            if x < 0.022:
                y = rng.random()
                if y < 0.5:
                    e = self.contact_event(a, c, "contact.paused", t, reason="manual", resume_at=None)
                    run.add(t, e, "hold", status="paused", reason="manual", resume_at=None)
                    if rng.random() < 0.7:
                        t = adv(HOUR, 3 * DAY)
                        e = self.contact_event(a, c, "contact.resumed", t)
                        run.add(t, e, "resumed")
                    else:
                        return
                else:
                    v_r = st["v"] + rng.uniform(HOUR, 2 * DAY)
                    ra = a.clock(v_r)
                    e = self.contact_event(a, c, "contact.paused", t, reason="manual", resume_at=format_ts(ra))
                    run.add(t, e, "hold", status="paused", reason="manual", resume_at=ra)
                    if ra > a.t_end:
                        return
                    st["v"] = v_r + rng.uniform(MIN, HOUR)
                    if a.clock(st["v"]) > a.t_end:
                        return
                t = adv(MIN, HOUR)
            elif x < 0.030:
                if not self._limit(a, c, run, adv):
                    return
                t = adv(MIN, HOUR)
            elif x < 0.040 and step["kind"] == "email":
                reason = rng.choice(("do_not_send_stage", "no_email", "sender_paused"))
                e = self.step_event(a, c, "step.not_sent", t, k, reason=reason)
                run.add(t, e, "started")
                run.add(t, e, "hold", status="not_sent", reason=reason, resume_at=None)
                if rng.random() < 0.5:
                    t = adv(HOUR, 2 * DAY)
                    e = self.contact_event(a, c, "contact.resumed", t)
                    run.add(t, e, "resumed")
                    t = adv(MIN, HOUR)
                else:
                    return
            if rng.random() < 0.3:
                e = self.step_event(a, c, "step.scheduled", t, k, due_at=format_ts(t + 30 * MIN))
                run.add(t, e, "started")
                t = adv(MIN, 30 * MIN)
            kind = step["kind"]
            if kind == "condition" and rng.random() < 0.05:
                reason = rng.choice(("condition_not_met", "no_website_visit"))
                e = self.step_event(a, c, "step.filtered", t, k, reason=reason)
                run.add(t, e, "started")
                run.add(t, e, "terminal", status="finished", reason="filtered", filtered_step=k)
                return
            if kind in ("linkedin_connect", "linkedin_message", "task") and rng.random() < 0.01:
                reason = rng.choice(("linkedin_error", "linkedin_bug", "broken_profile_link"))
                e = self.step_event(a, c, "step.failed", t, k, reason=reason)
                run.add(t, e, "started")
                run.add(t, e, "terminal", status="failed", reason=reason)
                return
            if kind == "email" and t > a.t_end - 3 * HOUR:
                raise _Stop
            mid = self.send(a, c, run, k, t)
            if rng.random() < 0.005:
                t2 = t + self.u(1000, 60_000)
                mid2 = self.send(a, c, run, k, t2)
                if kind == "email":
                    self.fate(a, c, run, mid2, st["v"] + (t2 - t), allow_effects=False)
            if kind == "email":
                effect = self.fate(a, c, run, mid, st["v"], allow_effects=True)
                if effect is not None:
                    if not self._effect(a, c, run, effect, st, adv):
                        return
        # every step done
        if rng.random() < 0.3:
            t = adv(MIN, HOUR)
            e = self.contact_event(a, c, "contact.finished", t, reason="completed")
            run.add(t, e, "terminal", status="finished", reason="completed")

    def _limit(self, a: _Automation, c: _Contact, run: RunPlan, adv) -> bool:
        t = adv(MIN, HOUR)
        kind = self.rng.choice(("active", "coworkers"))
        e = self.contact_event(a, c, "contact.limit_reached", t, limit=kind)
        run.add(t, e, "limit", limit=kind)
        if self.rng.random() < 0.6:
            t = adv(HOUR, 2 * DAY)
            e = self.contact_event(a, c, "contact.limit_released", t)
            run.add(t, e, "limit", limit=None)
            return True
        return False

    def _effect(self, a: _Automation, c: _Contact, run: RunPlan, effect: dict, st, adv) -> bool:
        """Apply a contact-affecting message outcome to the story; False ends the story."""
        rng = self.rng
        kind, t, e = effect["kind"], effect["t"], effect["event_id"]
        st["v"] = effect["v"]
        if kind == "bounced":
            run.add(t, e, "hold", status="bounced", reason=effect["reason"], resume_at=None)
            if rng.random() < 0.2:
                t = adv(HOUR, 2 * DAY)
                e = self.contact_event(a, c, "contact.resumed", t)
                run.add(t, e, "resumed")
                return True
            return False
        if kind == "unsubscribed":
            run.add(t, e, "terminal", status="unsubscribed", reason="unsubscribed")
            return False
        if kind == "replied":
            run.add(t, e, "terminal", status="finished", reason="replied")
            if rng.random() < 0.5:
                t = adv(MIN, HOUR)
                reason = "replied" if rng.random() < 0.8 else "meeting_booked"
                e = self.contact_event(a, c, "contact.finished", t, reason=reason)
                run.add(t, e, "terminal", status="finished", reason=reason)
            return False
        if kind == "auto_replied":
            ra = effect["return_at"]
            run.add(t, e, "hold", status="paused", reason="out_of_office", resume_at=ra)
            if ra is None:
                if rng.random() < 0.5:
                    t = adv(HOUR, 3 * DAY)
                    e = self.contact_event(a, c, "contact.resumed", t)
                    run.add(t, e, "resumed")
                    return True
                return False
            if ra > self.now - HOUR:
                return False
            st["v"] = effect["return_v"]
            return True
        raise AssertionError(kind)

    # ------------------------------------------------------------------ messages

    def send(self, a: _Automation, c: _Contact, run: RunPlan, k: int, t: int) -> str:
        rng = self.rng
        self.msg_n += 1
        step = a.steps[k]
        kind = step["kind"]
        prefix = {"email": "msg", "linkedin_connect": "li", "linkedin_message": "li", "task": "task",
                  "wait": "wait", "condition": "cond"}[kind]
        mid = f"{prefix}-{self.seed}-{self.msg_n:07d}"
        mailing_id = f"{a.aid}:{k}"
        fields: dict[str, Any] = {"message_id": mid, "channel": kind}
        r = rng.random()
        if r < 0.2:
            fields["mailing_id"] = mailing_id
        elif r < 0.25:
            fields["mailing_id"] = None
        if kind == "email":
            fields["subject"] = f"{step['name']}: quick question, {c.name.split()[0]}"
            fields["sending_user"] = "Alice Sender"
            fields["sending_email"] = "alice@sender.example.com"
        fields["step_details"] = {"day": step["day"], "inactive_days": rng.randint(0, 3)}
        fields["metadata"] = {"template": f"t{k}", "variant": rng.choice("AB")}
        e = self.step_event(a, c, "step.sent", t, k, **fields)
        run.add(t, e, "started")
        run.add(t, e, "done", step_index=k)
        run.add(t, e, "send", message_id=mid, step_index=k)
        self.recipients.append((a.aid, c.cid, run.run, k, mid))
        m = MessagePlan(mid, mailing_id, a.aid, c.cid, run.run, k)
        m.flag("sent", t)
        self.messages[mid] = m
        return mid

    def provider(self, a: _Automation, c: _Contact, mid: str, typ: str, t: int, k: int | None,
                 tagged: bool, **fields: Any) -> str:
        f: dict[str, Any] = {"message_id": mid, "email": c.email, "provider": a.provider}
        if tagged:
            f["automation_id"] = a.aid
            f["contact_id"] = c.cid
            f["step_index"] = k
        f.update(fields)
        return self.emit(PROVIDER_EVENTS, mid, typ, t, f)

    def fate(self, a: _Automation, c: _Contact, run: RunPlan, mid: str, v_sent: float,
             *, allow_effects: bool) -> dict | None:
        """Emit the provider events of one e-mail; return its effect on the contact, if any."""
        rng = self.rng
        m = self.messages[mid]
        k = m.step_index
        tagged = rng.random() < 0.9
        effect = None

        def T(dv: float) -> int:
            return a.clock(v_sent + dv)

        def pe(typ: str, dv: float, **fields: Any) -> tuple[str, int] | None:
            t = T(dv)
            if t > a.t_end:
                return None
            return self.provider(a, c, mid, typ, t, k, tagged, **fields), t

        if rng.random() < 0.7:
            dv = rng.uniform(1, 20) if rng.random() < 0.05 else rng.uniform(200, 2000)
            r = pe("message.sent", dv)
            if r:
                m.flag("sent", r[1])
        # a duplicate send (allow_effects=False) is simply delivered: no outcome may reach the contact
        x = rng.random() if allow_effects else 1.0
        if x < 0.005:
            r = pe("message.dropped", rng.uniform(1000, 30_000), reason=rng.choice(("suppressed", "invalid", None)))
            if r:
                m.flag("dropped", r[1])
                run.add(r[1], r[0], "settled", message_id=mid)
            return None
        if x < 0.025:
            cls = rng.choices(("hard", "soft", "block"), (0.45, 0.35, 0.2))[0]
            dv = rng.uniform(2000, 120_000)
            r = pe("message.bounced", dv, bounce_class=cls, reason=rng.choice(("550 no such user", None)))
            if r:
                m.flag("bounced", r[1])
                m.bounce_class = cls
                run.add(r[1], r[0], "settled", message_id=mid)
                if cls in ("hard", "block") and allow_effects:
                    effect = {"kind": "bounced", "t": r[1], "event_id": r[0], "v": v_sent + dv,
                              "reason": "hard_bounce" if cls == "hard" else "block"}
            return effect
        # delivered (maybe after a deferral)
        if rng.random() < 0.03:
            r = pe("message.deferred", rng.uniform(5000, 60_000), reason="421 try again later")
            if r:
                m.flag("deferred", r[1])
            dv_del = rng.uniform(10 * MIN, 90 * MIN)
        else:
            dv_del = rng.uniform(2000, 120_000)
        skip_delivered = a.lifecycle is None and rng.random() < 0.01
        if not skip_delivered:
            r = pe("message.delivered", dv_del)
            if r is None:
                return None
            m.flag("delivered", r[1])
            run.add(r[1], r[0], "settled", message_id=mid)
        elif T(dv_del) > a.t_end:
            return None
        opened = rng.random() < 0.4
        if opened:
            for _ in range(rng.choice((1, 1, 1, 2, 3))):
                dv = dv_del + rng.uniform(MIN, 2 * DAY) if not skip_delivered else dv_del + rng.uniform(MIN, HOUR)
                r = pe("message.opened", dv)
                if r:
                    m.flag("opened", r[1])
                    m.opens.add(r[0])
                    if skip_delivered:
                        run.add(r[1], r[0], "settled", message_id=mid)  # an open implies delivered
            if rng.random() < 0.1:
                for _ in range(rng.choice((1, 1, 2))):
                    r = pe("message.clicked", dv_del + rng.uniform(2 * DAY, 3 * DAY), url="https://example.com/demo")
                    if r:
                        m.flag("clicked", r[1])
                        m.clicks.add(r[0])
        elif rng.random() < 0.005:
            r = pe("message.clicked", dv_del + rng.uniform(MIN, DAY), url="https://example.com/pricing")
            if r:
                m.flag("clicked", r[1])
                m.clicks.add(r[0])
        if not allow_effects:
            return None
        y = rng.random()
        dv = dv_del + rng.uniform(5 * MIN, 0.8 * self.gmin)
        if y < 0.002:
            r = pe("message.spam_reported", dv)
            if r:
                m.flag("spam_reported", r[1])
                effect = {"kind": "bounced", "t": r[1], "event_id": r[0], "v": v_sent + dv, "reason": "spam_report"}
        elif y < 0.012:
            r = pe("message.unsubscribed", dv)
            if r:
                m.flag("unsubscribed", r[1])
                effect = {"kind": "unsubscribed", "t": r[1], "event_id": r[0], "v": v_sent + dv}
                if rng.random() < 0.1:
                    r2 = pe("message.resubscribed", dv + rng.uniform(HOUR, DAY))
                    if r2:
                        m.flag("resubscribed", r2[1])
        elif y < 0.042:
            r = pe("message.replied", dv)
            if r:
                m.flag("replied", r[1])
                effect = {"kind": "replied", "t": r[1], "event_id": r[0], "v": v_sent + dv}
        elif y < 0.052:
            t = T(dv)
            if t <= a.t_end:
                z = rng.random()
                return_v = None
                if z < 0.1:
                    ra = None
                elif z < 0.55:
                    return_v = v_sent + dv + rng.uniform(HOUR, 3 * DAY)
                    ra = min(a.clock(return_v), self.now - HOUR - MIN)
                    if ra <= t:
                        ra = None
                        return_v = None
                else:
                    ra = self.now + 30 * DAY + self.u(0, DAY)
                r = pe("message.auto_replied", dv, return_at=None if ra is None else format_ts(ra))
                if r:
                    m.flag("auto_replied", r[1])
                    effect = {"kind": "auto_replied", "t": r[1], "event_id": r[0], "v": v_sent + dv,
                              "return_at": ra, "return_v": return_v}
        return effect

    # ------------------------------------------------------------------ multi-run (contact-only) stories

    def multi_run(self, a: _Automation, c: _Contact, v0: float) -> list[RunPlan]:
        """Contact-only runs (no step events) of an unlimited automation: re-enrollments."""
        rng = self.rng
        runs: list[RunPlan] = []
        t = int(v0)
        n = rng.choice((2, 2, 3))
        for r in range(n):
            if t > a.t_end - HOUR:
                break
            needs = rng.random() < 0.3
            self.emit(ENROLLMENTS, c.cid, "contact.enrolled", t, self.enroll_fields(a, c, needs))
            run = RunPlan(a.aid, c.cid, r, t, needs)
            runs.append(run)
            t += self.u(10 * MIN, DAY)
            if rng.random() < 0.3 and t < a.t_end:
                # a re-enrollment attempt while the run is open: ignored
                self.emit(ENROLLMENTS, c.cid, "contact.enrolled", t, self.enroll_fields(a, c, False))
                self.ignored += 1
                t += self.u(10 * MIN, DAY)
            if t > a.t_end:
                break
            last = r == n - 1
            if needs:
                if rng.random() < 0.5:
                    e = self.contact_event(a, c, "contact.enrichment_failed", t, reason="no_email_found")
                    run.add(t, e, "terminal", status="failed", reason="no_email_found")
                    t += self.u(HOUR, 3 * DAY)
                    continue
                if not last or rng.random() < 0.7:
                    e = self.contact_event(a, c, "contact.enriched", t)
                    run.add(t, e, "enriched")
                    t += self.u(10 * MIN, DAY)
            if t > a.t_end:
                break
            if last and rng.random() < 0.6:
                # leave the last run open in some waiting state
                z = rng.random()
                if z < 0.3:
                    e = self.contact_event(a, c, "contact.paused", t, reason="manual", resume_at=None)
                    run.add(t, e, "hold", status="paused", reason="manual", resume_at=None)
                elif z < 0.5:
                    kind = rng.choice(("active", "coworkers"))
                    e = self.contact_event(a, c, "contact.limit_reached", t, limit=kind)
                    run.add(t, e, "limit", limit=kind)
                break
            z = rng.random()
            if z < 0.4:
                e = self.contact_event(a, c, "contact.finished", t, reason="manual")
                run.add(t, e, "terminal", status="finished", reason="manual")
            elif z < 0.6:
                e = self.contact_event(a, c, "contact.removed", t)
                run.add(t, e, "terminal", status="canceled", reason="removed")
            elif z < 0.8:
                e = self.contact_event(a, c, "contact.canceled", t, reason="manual")
                run.add(t, e, "terminal", status="canceled", reason="manual")
            else:
                e = self.contact_event(a, c, "contact.duplicate", t)
                run.add(t, e, "terminal", status="duplicate", reason="duplicate")
            t += self.u(HOUR, 3 * DAY)
        return runs

    # ------------------------------------------------------------------ lifecycle fan-outs (oracle side)

    def lifecycle(self) -> None:
        for a in self.autos:
            idx = [s["index"] for s in a.steps]
            if a.pause is not None:
                t1, t2 = a.pause
                e1 = self.emit(AUTOMATIONS, a.aid, "automation.paused", t1, {"automation_id": a.aid})
                e2 = self.emit(AUTOMATIONS, a.aid, "automation.resumed", t2, {"automation_id": a.aid})
                for run in a.runs:
                    if run.enrolled_at < t1 and derive_run(run, idx, t1, cutoff=t1)["status"] not in ENDED:
                        run.add(t1, e1, "automation_paused")
                for run in a.runs:
                    if run.enrolled_at < t2:
                        run.add(t2, e2, "automation_resumed")
            if a.archive_at is not None:
                ta = a.archive_at
                e = self.emit(AUTOMATIONS, a.aid, "automation.archived", ta, {"automation_id": a.aid})
                for run in a.runs:
                    if run.enrolled_at >= ta or derive_run(run, idx, ta, cutoff=ta)["status"] in ENDED:
                        continue
                    settled = {f.data["message_id"] for f in run.facts if f.kind == "settled" and f.at < ta}
                    sends = {f.data["message_id"] for f in run.facts if f.kind == "send" and f.at < ta}
                    status = "failed" if sends - settled else "canceled"
                    run.add(ta, e, "terminal", status=status, reason="automation_archived")

    # ------------------------------------------------------------------ invalid input

    def invalid_items(self) -> list[_Item]:
        out: list[_Item] = []
        rng = self.rng
        t = self.base + self.span // 2
        n = 0

        def ev(typ: str, **fields: Any) -> dict:
            return {"event_id": self.eid(), "type": typ, "occurred_at": format_ts(t), "schema_version": 1, **fields}

        def contact_fields() -> dict:
            return {"automation_id": "aut-000", "contact_id": f"bad-{n}"}

        def step_sent() -> dict:
            return ev("step.sent", automation_id="aut-000", contact_id=f"bad-{n}", step_index=0,
                      message_id=f"bad-msg-{n}", channel="email")

        for _ in range(self.invalid):
            for reason in DEAD_LETTER_REASONS:
                n += 1
                key = f"bad-{n}"
                if reason == "too_large":
                    topic = ENROLLMENTS
                    obj = ev("contact.enrolled", **contact_fields(), user_id="u", name="Big", email="big@example.com",
                             attributes={"blob": "x" * _TOO_LARGE_BYTES})
                    raw = _dumps(obj)
                elif reason == "invalid_json":
                    topic = rng.choice((ENROLLMENTS, SENDS, PROVIDER_EVENTS))
                    raw = rng.choice((b'{"event_id": "x", "type": "contact.enrolled", ', b"not json at all", b"{'a': 1}"))
                elif reason == "not_an_object":
                    topic = rng.choice((ENROLLMENTS, SENDS, PROVIDER_EVENTS, AUTOMATIONS))
                    raw = rng.choice((b"[1,2,3]", b'"contact.enrolled"', b"42", b"null"))
                elif reason == "missing_type":
                    topic = ENROLLMENTS
                    obj = ev("contact.enriched", **contact_fields())
                    del obj["type"]
                    raw = _dumps(obj)
                elif reason == "unknown_type":
                    topic = rng.choice((ENROLLMENTS, SENDS, PROVIDER_EVENTS))
                    raw = _dumps(ev(rng.choice(("contact.teleported", "message.eaten", "step.skipped")),
                                    **contact_fields()))
                elif reason == "wrong_topic":
                    topic = ENROLLMENTS
                    raw = _dumps(step_sent())
                elif reason == "missing_field":
                    topic = SENDS
                    obj = step_sent()
                    del obj["message_id"]
                    raw = _dumps(obj)
                elif reason == "wrong_type":
                    topic = SENDS
                    obj = step_sent()
                    obj["step_index"] = "0"
                    raw = _dumps(obj)
                elif reason == "bad_timestamp":
                    topic = PROVIDER_EVENTS
                    obj = ev("message.delivered", message_id=f"bad-msg-{n}", email="x@example.com", provider="ses")
                    obj["occurred_at"] = rng.choice(("yesterday", "2026-13-45T99:00:00Z", "2026-01-05 10:00"))
                    raw = _dumps(obj)
                elif reason == "bad_enum":
                    topic = PROVIDER_EVENTS
                    raw = _dumps(ev("message.bounced", message_id=f"bad-msg-{n}", email="x@example.com",
                                    provider="ses", bounce_class="medium"))
                else:  # bad_value
                    topic = SENDS
                    obj = step_sent()
                    obj["step_index"] = -1
                    raw = _dumps(obj)
                self.dead[reason] = self.dead.get(reason, 0) + 1
                out.append(_Item(t, -1, topic, key, raw, kind="invalid"))
        return out

    # ------------------------------------------------------------------ orphans

    def orphans(self) -> None:
        n = max(1, self.n_contacts // 1000)
        for i in range(n):
            mid = f"msg-{self.seed}-orphan-{i:04d}"
            t = self.base + self.u(HOUR, self.span - HOUR)
            for typ in ("message.delivered", "message.opened"):
                self.emit(PROVIDER_EVENTS, mid, typ, t, {"message_id": mid, "email": "ghost@example.com",
                                                         "provider": "ses"})
                t += self.u(MIN, HOUR)

    # ------------------------------------------------------------------ assembly

    def run(self) -> Workload:
        rng = self.rng
        self.make_automations()
        n_published = len(self.items)
        for j in range(self.n_contacts):
            c = self.make_contact(j)
            chosen = [rng.randrange(self.n_auto)]
            if self.n_auto > 1 and rng.random() < 0.15:
                other = rng.randrange(self.n_auto - 1)
                chosen.append(other if other < chosen[0] else other + 1)
            for ai in chosen:
                a = self.autos[ai]
                v0 = rng.uniform(self.base + HOUR, a.t_end - self.span * 0.06)
                if a.lifecycle is None and a.participation == "unlimited" and rng.random() < 0.05:
                    runs = self.multi_run(a, c, a.clock(v0))
                    a.runs.extend(runs)
                    continue
                run = self.story(a, c, v0)
                if run is None:
                    continue
                a.runs.append(run)
                if a.lifecycle is None and a.participation == "once" and rng.random() < 0.03:
                    ta = run.enrolled_at + self.u(MIN, max(2 * MIN, a.t_end - run.enrolled_at))
                    self.emit(ENROLLMENTS, c.cid, "contact.enrolled", ta, self.enroll_fields(a, c, False))
                    self.ignored += 1
        self.orphans()
        lifecycle_from = len(self.items)
        self.lifecycle()
        for a in self.autos:
            self.runs.extend(a.runs)

        published = self.items[:n_published]
        lifecycle = self.items[lifecycle_from:]
        body = self.items[n_published:lifecycle_from]
        body.sort(key=lambda it: (it.t, it.seq))
        # bounded reordering of provider-events: fill the provider slots of the time order with the
        # provider events sorted by (occurred_at, event_id) and perturbed by at most `window` places
        slots = [i for i, it in enumerate(body) if it.topic == PROVIDER_EVENTS]
        prov = sorted((body[i] for i in slots), key=lambda it: (it.t, it.obj["event_id"]))
        if self.window > 0:
            keyed = [(i + rng.uniform(0, self.window), i) for i in range(len(prov))]
            keyed.sort()
            prov = [prov[i] for _, i in keyed]
        for slot, it in zip(slots, prov):
            body[slot] = it
        placed: list[tuple[float, int, int, _Item]] = []
        for i, it in enumerate(published):
            placed.append((-1.0, 0, i, it))
        for i, it in enumerate(body):
            placed.append((float(i), 0, it.seq, it))
            if it.topic == PROVIDER_EVENTS:
                if rng.random() < self.dup_rate:
                    placed.append((i + rng.randint(1, 3 * self.window + 1) + 0.5, 1, it.seq, it))
            elif rng.random() < self.dup_rate / 10:
                placed.append((i + 0.25, 1, it.seq, it))
        times = [it.t for it in body]
        for it in lifecycle:
            # a barrier after every event that happened before it
            last_before = max((i for i, tt in enumerate(times) if tt < it.t), default=-1)
            if it.obj["type"] == "automation.archived":
                pos = len(body) + 10.0
            else:
                pos = last_before + 0.75
            placed.append((pos, 2, it.seq, it))
        for it in self.invalid_items():
            placed.append((rng.uniform(0, max(1, len(body))), 3, 0, it))
        placed.sort(key=lambda p: (p[0], p[1], p[2]))

        events: list[tuple[str, str, bytes]] = []
        counts = {t: 0 for t in TOPICS}
        cache: dict[int, bytes] = {}
        for _, _, _, it in placed:
            if it.kind == "invalid":
                raw = it.obj
            else:
                raw = cache.get(id(it))
                if raw is None:
                    raw = cache[id(it)] = _dumps(it.obj)
            events.append((it.topic, it.key, raw))
            counts[it.topic] += 1

        autos = {a.aid: [s["index"] for s in a.steps] for a in self.autos}
        oracle = build_oracle(
            automations=autos,
            runs=self.runs,
            messages=self.messages,
            recipients=self.recipients,
            ignored_enrollments=self.ignored,
            dead_letters=self.dead,
            event_counts=counts,
            now_ms=self.now,
        )
        return Workload(events, oracle)


def generate(
    seed: int,
    *,
    automations: int = 5,
    contacts: int = 10_000,
    base_ms: int,
    now_ms: int,
    duplicate_rate: float = 0.05,
    reorder_window: int = 20,
    invalid: int = 0,
) -> Workload:
    """Plan and emit a workload; the same arguments give the same bytes.

    ``automations`` automations (every 5th from the 2nd is paused and resumed
    once, every 5th from the 3rd archived at the end, when there are at least
    3), ``contacts`` contacts each in one automation (15 % in two). All event
    times lie in ``[base_ms, now_ms - 2 h]``; ``now_ms`` is the time the
    oracle is evaluated at. ``duplicate_rate``: share of provider events
    retried (same bytes); ``reorder_window``: how far (in positions of the
    provider-events topic) a provider event may move; ``invalid``: that many
    invalid messages of each reason in :data:`DEAD_LETTER_REASONS`.
    """
    return _Gen(seed, automations, contacts, base_ms, now_ms, duplicate_rate, reorder_window, invalid).run()


# ---------------------------------------------------------------------- files


def write_jsonl(workload: Workload, directory: str | os.PathLike) -> dict[str, Path]:
    """Write ``<topic>.jsonl`` per topic and ``oracle.json``; return the paths.

    Each line is ``{"seq": production index, "key": key, "value": event}``;
    ``value`` is the event object, or a string holding the raw bytes when the
    message is not a JSON object (invalid input) or would not re-encode to
    the same bytes.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = {t: open(d / f"{t}.jsonl", "w", encoding="utf-8") for t in TOPICS}
    paths = {t: d / f"{t}.jsonl" for t in TOPICS}
    try:
        for seq, (topic, key, raw) in enumerate(workload.events):
            value: Any
            try:
                obj = json.loads(raw)
                value = obj if isinstance(obj, dict) and _dumps(obj) == raw else raw.decode("utf-8")
            except ValueError:
                value = raw.decode("utf-8", errors="surrogateescape")
            files[topic].write(json.dumps({"seq": seq, "key": key, "value": value}, ensure_ascii=False,
                                          separators=(",", ":")) + "\n")
    finally:
        for f in files.values():
            f.close()
    with open(d / "oracle.json", "w", encoding="utf-8") as f:
        json.dump(workload.oracle, f, separators=(",", ":"), sort_keys=True)
    paths["oracle"] = d / "oracle.json"
    return paths


def read_jsonl(directory: str | os.PathLike) -> Workload:
    """Read what :func:`write_jsonl` wrote (production order restored from ``seq``)."""
    d = Path(directory)
    rows: list[tuple[int, str, str, bytes]] = []
    for topic in TOPICS:
        p = d / f"{topic}.jsonl"
        if not p.exists():
            continue
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                rec = json.loads(line)
                value = rec["value"]
                raw = _dumps(value) if isinstance(value, dict) else value.encode("utf-8", errors="surrogateescape")
                rows.append((rec.get("seq", n), topic, rec["key"], raw))
    rows.sort(key=lambda r: r[0])
    oracle = {}
    if (d / "oracle.json").exists():
        with open(d / "oracle.json", encoding="utf-8") as f:
            oracle = json.load(f)
    return Workload([(t, k, v) for _, t, k, v in rows], oracle)
