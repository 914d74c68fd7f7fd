"""The pipeline: topics, state tables and the per-batch processing around ``streams.steps``.

Flow (all input and internal topics have the same partition count, so that a contact's
enrollments, sends and forwarded outcomes land on one partition and one worker; state is
kept per partition of the records that changed it):

    automations ──► automations state ──► fan-out (definition, lifecycle) ──┐
    enrollments, sends, internal.to-contacts ──► contacts ◄─────────────────┘
        tables enrollments (automation_id␟contact_id), parked, resume-index, automation-replicas
        ──► status-changes, internal.to-messages (send registrations), ClickHouse rows
    provider-events, internal.to-messages ──► messages
        table messages (message_id)
        ──► status-changes, internal.to-contacts (outcomes), ClickHouse rows

:meth:`Pipeline.process` takes one fetched batch: parse, apply the pure steps, send the outputs
and write the rows (and wait for both), then stage each changed key once. The runtime
(``agents.runtime``) then commits the staged state (changelog, then local RocksDB) and the
offsets. So a crash replays at most the uncommitted batch, and replays are idempotent (facts
merge; rows are ReplacingMergeTree with stable keys and versions).
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import orjson

from agents.sink import BatchWriter
from agents.state import StateTables
from schemas.parser import Rejection, parse_event, to_rfc3339
from schemas.topics import topic_names
from sendtrail.metrics import Metrics
from sendtrail.settings import Settings
from streams import counters as counterlib
from streams import rows as rowlib
from streams import steps
from streams.engine import enrollment

log = logging.getLogger(__name__)

SEP = "\x1f"
DEAD_LETTER_MAX_ORIGINAL = 512 * 1024  # base64 of this stays well under Kafka's default 1 MB message limit
DEAD_LETTER_MAX_TEXT = 64 * 1024
INPUT_KIND = {  # contract topic name -> role
    "enrollments": "contact",
    "sends": "contact",
    "internal.to-contacts": "contact-internal",
    "provider-events": "message",
    "internal.to-messages": "message-internal",
    "automations": "automation",
}


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def _keep_latest(rows_by_table: dict, table: str, rows: Iterable[tuple]) -> None:
    """Add counter rows to ``rows_by_table`` (table -> total's key -> row), a later row replacing an earlier."""
    kept = rows_by_table.setdefault(table, {})
    width = COUNTER_ROW_KEY[table]
    for row in rows:
        kept[row[:width]] = row


@dataclass
class Batch:
    """What one batch of one agent produces, sent and written when the batch ends."""

    sends: list = field(default_factory=list)
    rows: dict = field(default_factory=dict)
    replica_writes: dict = field(default_factory=dict)  # (partition, automation_id) -> replica
    events: list = field(default_factory=list)  # the records of the batch, for the latency metric
    replay_until: dict = field(default_factory=dict)  # TopicPartition -> first offset not replayed
    state_writers: list = field(default_factory=list)  # stage the batch's state, once it is processed
    consumed: dict = field(default_factory=dict)  # (topic, event type) -> valid events, for the metrics
    transitions: dict = field(default_factory=dict)  # (kind, from, to) -> status changes, for the metrics
    counts: dict = field(default_factory=dict)  # (counters table, partition) -> key -> count differences
    pending_rows: dict | None = None  # counter rows carried by this batch (a copy of Pipeline.pending_rows)
    #: the counter rows of the totals this batch changed: pending once its state is committed
    #: (:meth:`Pipeline.state_committed`), never written before
    counter_rows: dict = field(default_factory=dict)


TABLES_BY_KIND = {
    "contact": ("enrollments", "parked", "resume-index", "automation-replicas", "contact-counters"),
    "message": ("messages", "message-counters"),
    "automation": ("automations",),
}

#: kind of partition -> (state table of its keys, state table of its totals, the counters tables it writes)
COUNTED = {
    "contact": ("enrollments", "contact-counters", ("node_counters", "status_counters")),
    "message": ("messages", "message-counters", ("mailing_counters",)),
}
#: counters table -> kind of partition that writes it
KIND_OF_COUNTERS = {table: kind for kind, (_, _, tables) in COUNTED.items() for table in tables}
#: counters table -> (prefix of its totals' keys in the totals table, row builder)
COUNTER_KEYS = {
    "node_counters": (b"n", counterlib.node_counter_row),
    "status_counters": (b"s", counterlib.status_counter_row),
    "mailing_counters": (b"m", counterlib.mailing_counter_row),
}
#: the totals table's record saying its partition's totals count every key (from its first batch, or
#: recounted); its value is the counting rule they follow. Totals of an earlier rule are recounted when
#: the partition is assigned, every key's ``cc`` again from its snapshot. Rule 2: a run with every step
#: done is completed whatever its status (rule 1 counted finished/completed runs only).
COUNTED_MARK = b"counted"
COUNTING_RULE = b"2"
#: how often counter rows are written: each batch changes totals, the last value per total is written
#: at most this often (every chDB insert has a fixed cost, 3 more tables per batch would add it)
COUNTER_FLUSH_SECONDS = 1.0
#: counters table -> width of the rows' key (the counter's key and its partition)
COUNTER_ROW_KEY = {"node_counters": 3, "status_counters": 3, "mailing_counters": 5, "counter_coverage": 2}

def commit_phase(table: str, delete: bool) -> int:
    """The order in which a batch's state reaches the changelogs (``StateTables.commit_layer``).

    A kill while a batch's state is sent leaves part of it in the changelogs; a recovery from
    them must find nothing it cannot redo. So an automation's replica, a new resume-index entry and
    the messages go first, then the enrollments, then the parked events and removed resume-index
    entries. Left behind, the first ones are harmless (a replica without the enrollments applied
    under it; a resume-index entry whose pause is not there, which a tick checks against the
    state); an enrollment written while the parked events it applied are not yet deleted applies
    them again as no-ops (event ids). The other way round, a parked event, or the entry that makes
    a tick resume a pause, could be lost.
    """
    if table == "enrollments":
        return 1
    if table == "parked" or (table == "resume-index" and delete):
        return 2
    return 0


class Pipeline:
    """The worker's streaming half: its topics, state tables and batch processing, and the sink."""

    def __init__(self, settings: Settings, metrics: Metrics, sink: BatchWriter) -> None:
        self.settings = settings
        self.metrics = metrics
        self.sink = sink
        self.producer: Any = None  # an agents.produce.BatchProducer, set by the runtime before the first batch
        names = topic_names(settings.topic_prefix)
        self.topic_names = names
        self.group_id = f"{settings.topic_prefix}{settings.consumer_group}"
        self.kind_of_topic = {full: INPUT_KIND.get(name) for name, full in names.items()}
        self.contract_name = {full: name for name, full in names.items()}
        self.input_topics = [names[name] for name in INPUT_KIND]
        self.to_contacts = names["internal.to-contacts"]
        self.to_messages = names["internal.to-messages"]
        self.status_out = names["status-changes"]
        self.dead_out = names["dead-letters"]
        all_tables = [t for kind in ("contact", "message", "automation") for t in TABLES_BY_KIND[kind]]
        self.tables = StateTables(settings.data_dir / "state" / self.group_id, self.group_id, all_tables,
                                  commit_phase)
        #: counter rows not written yet, the latest per (table, total): they go with a batch every
        #: ``counter_flush_seconds`` (and with the first batch after an assignment) until one is durable
        self.pending_rows: dict[str, dict[tuple, tuple]] = {}
        self.counter_flush_seconds = COUNTER_FLUSH_SECONDS
        self._next_counter_flush = 0.0
        self._counter_version = 0

    def tables_of_topic(self, topic: str) -> tuple[str, ...]:
        """The state tables partitioned like ``topic`` (owned with its partitions)."""
        kind = self.kind_of_topic.get(topic)
        if kind is None:
            return ()
        return TABLES_BY_KIND[kind.replace("-internal", "")]

    # ---- a batch ------------------------------------------------------------------------------

    def prepare(self, fetched: dict[Any, list], replay_until: dict | None = None) -> "Batch":
        """Apply one fetched batch: its outputs and rows collected in the returned batch, its
        state staged in ``self.tables``' open layer. Nothing leaves the process here: the caller
        makes the effects durable (:meth:`finish`) before it commits the staged state.

        ``replay_until`` (topic partition -> offset): records below it may have had their effects
        emitted before, by a run that crashed or a batch that failed, without their state being
        committed. The keys they touch re-emit all their rows (``steps.*_snapshot``), so rows of
        the earlier attempt cannot outrank the replay's.
        """
        ctx = Batch(replay_until=replay_until or {})
        by_kind: dict[str, list] = {"contact": [], "message": [], "automation": []}
        for tp, records in fetched.items():
            kind = self.kind_of_topic.get(tp.topic)
            if kind is None:
                raise RuntimeError(f"record from an unexpected topic {tp.topic!r}")
            by_kind[kind.replace("-internal", "")].extend(records)
            ctx.events.extend(records)
        if by_kind["automation"]:
            self.process_automations(ctx, by_kind["automation"])
        if by_kind["contact"]:
            self.process_contacts(ctx, by_kind["contact"])
        if by_kind["message"]:
            self.process_messages(ctx, by_kind["message"])
        for write_state in ctx.state_writers:
            write_state()
        self._settle_counters(ctx)
        if self.pending_rows and time.monotonic() >= self._next_counter_flush:
            ctx.pending_rows = self._pending_copy()
            for table, table_rows in ctx.pending_rows.items():
                ctx.rows.setdefault(table, []).extend(table_rows.values())
            self._next_counter_flush = time.monotonic() + self.counter_flush_seconds
        metrics = self.metrics
        for (topic, type_), n in ctx.consumed.items():
            metrics.consumed(topic, type_, n)
        for (kind, from_status, to_status), n in ctx.transitions.items():
            metrics.transition(kind, from_status, to_status, n)
        return ctx

    @staticmethod
    def _replayed(ctx: "Batch", rec: Any) -> bool:
        if not ctx.replay_until:
            return False
        until = ctx.replay_until.get((rec.topic, rec.partition))  # TopicPartition is a (topic, partition) tuple
        return until is not None and rec.offset < until

    async def send_ticks(self, assignment: Iterable[Any], now_ms: int) -> None:
        """One auto-resume tick per assigned contacts partition (through the partition's own topic,
        so it is ordered with, and replayed like, everything else of the partition)."""
        sends = [(self.to_contacts, b"tick", _dumps({"type": "tick", "now_ms": now_ms}), tp.partition)
                 for tp in assignment if tp.topic == self.to_contacts]
        if sends:
            await self._send_all(sends)

    # ---- shared helpers -------------------------------------------------------------------------

    def _parse(self, ctx: "Batch", rec: Any, contract_topic: str) -> dict | None:
        parsed = parse_event(rec.value, topic=contract_topic, max_bytes=self.settings.max_event_bytes)
        if isinstance(parsed, Rejection):
            self._dead_letter(ctx, rec, contract_topic, parsed)
            return None
        key = (contract_topic, parsed["type"])
        ctx.consumed[key] = ctx.consumed.get(key, 0) + 1
        return parsed

    def _dead_letter(self, ctx: "Batch", rec: Any, contract_topic: str, rejection: Rejection) -> None:
        raw: bytes = rec.value if isinstance(rec.value, bytes) else bytes(rec.value or b"")
        doc = {
            "reason": rejection.reason,
            "detail": rejection.detail,
            "field": rejection.field,
            "topic": contract_topic,
            "partition": rec.partition,
            "offset": rec.offset,
            "original_size": len(raw),
        }
        # The original bytes travel along, within Kafka's message size limit: text when it is
        # small UTF-8, base64 always; an oversized original is cut (it stays at topic/partition/offset).
        kept = raw[:DEAD_LETTER_MAX_ORIGINAL]
        doc["original_base64"] = base64.b64encode(kept).decode()
        if len(kept) < len(raw):
            doc["original_truncated"] = True
        elif len(raw) <= DEAD_LETTER_MAX_TEXT:
            try:
                doc["original_text"] = raw.decode("utf-8")
            except UnicodeDecodeError:
                pass
        ctx.sends.append((self.dead_out, rec.key, _dumps(doc), None))
        self.metrics.rejected(contract_topic, rejection.reason)
        self.metrics.dead_letter_produced(contract_topic)

    def _queue_output(self, ctx: "Batch", out: steps.Output) -> None:
        transitions = ctx.transitions
        for change in out.changes:
            key = (change["kind"], change.get("from"), change["to"])
            transitions[key] = transitions.get(key, 0) + 1
            ctx.sends.append((self.status_out, (change.get("contact_id") or "").encode(),
                              _dumps(_wire_change(dict(change))), None))
        for reg in out.to_messages:
            ctx.sends.append((self.to_messages, reg["message_id"].encode(), _dumps(reg), None))
        for outcome in out.to_contacts:
            ctx.sends.append((self.to_contacts, outcome["contact_id"].encode(), _dumps(outcome), None))
        for table_name, table_rows in out.rows.items():
            ctx.rows.setdefault(table_name, []).extend(table_rows)

    async def _send_all(self, sends: list) -> None:
        """Produce ``(topic, key, value, partition)`` messages and wait until Kafka acknowledged them all.

        The key picks the partition with Kafka's default (murmur2) partitioner when ``partition``
        is None, as every producer of the contract topics does. Raises if any send failed, so
        the batch is retried instead of committed.
        """
        if sends:
            await self.producer.send_all(sends)

    async def _write_rows(self, rows: dict[str, list]) -> None:
        if rows:
            for table_name, table_rows in rows.items():
                await self.sink.write(table_name, table_rows, write_token(table_name))
            await self.sink.flush()

    async def finish(self, ctx: "Batch") -> None:
        """Make the batch's effects durable: Kafka outputs acknowledged and ClickHouse rows written.

        The batch's staged state is committed only after this returns. A crash before the
        state commit replays the batch and re-emits the same (idempotent) effects; a crash
        after it finds the effects already durable. Committing the state first would lose
        effects: the replay would see "already applied" and emit nothing.
        """
        # The two are independent: Kafka acknowledges while ClickHouse inserts. Both must succeed.
        await asyncio.gather(self._send_all(ctx.sends), self._write_rows(ctx.rows))
        self.counter_rows_written(ctx.pending_rows)
        now_ms = time.time() * 1000.0
        observe = self.metrics.observe_latency
        for rec in ctx.events:
            ts = rec.timestamp
            if ts and ts > 0:
                observe(max(0.0, (now_ms - ts) / 1000.0))
        self.metrics.processed(len(ctx.events), now_ms / 1000.0)

    # ---- contacts -------------------------------------------------------------------------------

    def _replica(self, partition: int, automation_id: str, cache: dict) -> dict | None:
        """The automation as this partition knows it (each partition holds its own replica)."""
        ck = (partition, automation_id)
        if ck in cache:
            return cache[ck]
        raw = self.tables.get("automation-replicas", partition, automation_id.encode())
        value = orjson.loads(raw) if raw else None
        cache[ck] = value
        return value

    def process_contacts(self, ctx: "Batch", records: list[Any]) -> None:
        now_ms = int(time.time() * 1000)  # out-of-office holds whose date has passed resume right away
        # key -> (partition, state, parked, state changed, parked changed)
        dirty: dict[bytes, tuple[int, dict | None, list | None, bool, bool]] = {}
        states: dict[bytes, dict | None] = {}
        parked: dict[bytes, list | None] = {}
        ignored: dict[bytes, int] = {}  # ignored re-enrollments per key, for the counter
        replicas: dict[tuple[int, str], dict | None] = {}
        replayed: dict[bytes, int] = {}  # keys touched by replayed records -> partition
        in_replay = False
        tables = self.tables

        def load(partition: int, key: bytes) -> tuple[dict | None, list | None]:
            """State and parked events of a key (batch cache first)."""
            if key not in states:
                raw = tables.get("enrollments", partition, key)
                states[key] = orjson.loads(raw) if raw else None
                ignored[key] = len(states[key].get("ignored", ())) if states[key] else 0
                rawp = tables.get("parked", partition, key)
                parked[key] = orjson.loads(rawp) if rawp else None
            return states[key], parked[key]

        def store(partition: int, key: bytes, res: steps.ContactResult) -> None:
            count = len(res.state.get("ignored", ())) if res.state else 0
            if count > ignored.get(key, 0):
                self.metrics.ignored_enrollment("other", count - ignored.get(key, 0))
            ignored[key] = count
            self._count_contact(ctx, partition, res.state, res.output)
            states[key] = res.state
            parked[key] = res.parked
            old = dirty.get(key)
            s_dirty = res.state_changed or (old[3] if old else False)
            p_dirty = res.parked_changed or (old[4] if old else False)
            dirty[key] = (partition, res.state, res.parked, s_dirty, p_dirty)
            if in_replay:
                replayed[key] = partition
            self._queue_output(ctx, res.output)

        contract_name = self.contract_name
        for rec in records:
            partition = rec.partition
            in_replay = self._replayed(ctx, rec)
            contract = contract_name[rec.topic]
            if contract == "internal.to-contacts":
                internal = orjson.loads(rec.value)
                kind = internal["type"]
                if kind == "tick":
                    self._tick_partition(partition, internal["now_ms"], replicas, dirty, store, load)
                    continue
                if kind.startswith("automation."):
                    self._fan_out(ctx, rec, internal, replicas, dirty, store, load, replayed if in_replay else None)
                    continue
                ev = internal
            else:
                ev = self._parse(ctx, rec, contract)
                if ev is None:
                    continue
            key = f"{ev['automation_id']}{SEP}{ev['contact_id']}".encode()
            state, park = load(partition, key)
            defn = engine_automation(self._replica(partition, ev["automation_id"], replicas))
            res = steps.contact_step(state, park, ev, defn, partition, rec.offset, now_ms)
            store(partition, key, res)
        for key, partition in replayed.items():
            state, park = load(partition, key)
            if state is None:
                continue
            aid = key.split(SEP.encode(), 1)[0].decode()
            replica = self._replica(partition, aid, replicas)
            defn = engine_automation(replica)
            if defn is None:
                # The definition's write was lost with the crashed attempt's state (a changelog
                # holds part of a batch when a kill lands while it is written): its fan-out is
                # replayed too, and snapshots the automation's keys then (see _fan_out). A
                # snapshot now would guess the nodes without the steps.
                continue
            snapshot = steps.contact_snapshot(state, defn, node_span(replica))
            self._count_contact(ctx, partition, state, snapshot)
            self._queue_output(ctx, snapshot)
            entry = dirty.get(key)
            dirty[key] = (partition, state, park, True, entry[4] if entry else False)

        def write_state() -> None:
            self._stage_contacts(dirty)
            for (partition, aid), replica in ctx.replica_writes.items():
                tables.put("automation-replicas", partition, aid.encode(), _dumps(replica))

        ctx.state_writers.append(write_state)

    def _stage_contacts(self, dirty: dict) -> None:
        """Stage each changed key once, in the partition of the records that changed it."""
        put = self.tables.put
        for key, (partition, state, park, s_dirty, p_dirty) in dirty.items():
            if s_dirty:
                put("enrollments", partition, key, None if state is None else _dumps(state))
                self._update_resume_index(partition, key, state)
            if p_dirty:
                put("parked", partition, key, _dumps(park) if park else None)

    def _update_resume_index(self, partition: int, key: bytes, state: dict | None) -> None:
        due = enrollment.next_resume_at(state) if state is not None else None
        current = self.tables.get("resume-index", partition, key)
        if due is None:
            if current is not None:
                self.tables.put("resume-index", partition, key, None)
        else:
            value = str(due).encode()
            if current != value:
                self.tables.put("resume-index", partition, key, value)

    @staticmethod
    def _batch_keys(dirty: dict, partition: int, prefix: bytes, stored: Iterable[bytes]) -> list[bytes]:
        """Keys of a partition with a prefix: those stored in RocksDB and those changed in this batch."""
        keys = dict.fromkeys(stored)
        for key, entry in dirty.items():
            if key.startswith(prefix) and entry[0] == partition:
                keys[key] = None
        return list(keys)

    def _fan_out(self, ctx: "Batch", rec: Any, internal: dict, replicas: dict, dirty: dict, store: Callable,
                 load: Callable, replayed: dict | None) -> None:
        """An automation's definition or lifecycle reached this partition: apply it to its keys.

        ``replayed`` (keys to snapshot at the batch's end) is given when the record is replayed.
        A replayed definition may not be the one the crashed attempt used for the keys it
        touched (or the attempt's write of it may be lost while its keys' writes are not): every
        key of the automation in the partition is snapshotted with it.
        """
        partition = rec.partition
        aid = internal["automation_id"]
        replica = internal["replica"]
        previous = self._replica(partition, aid, replicas)
        replicas[(partition, aid)] = replica
        ctx.replica_writes[(partition, aid)] = replica
        defn = engine_automation(replica)
        prefix = f"{aid}{SEP}".encode()
        if internal["type"] == "automation.published":
            stored = (key for key, _ in self.tables.items("parked", partition, prefix))
            for key in self._batch_keys(dirty, partition, prefix, stored):
                state, park = load(partition, key)
                if park:
                    store(partition, key, steps.contact_unpark(state, park, defn))
            if replayed is not None and (previous or {}).get("defn") != replica.get("defn"):
                stored = (key for key, _ in self.tables.items("enrollments", partition, prefix))
                for key in self._batch_keys(dirty, partition, prefix, stored):
                    replayed[key] = partition
            return
        lifecycle = internal["event"]
        stored = (key for key, _ in self.tables.items("enrollments", partition, prefix))
        for key in self._batch_keys(dirty, partition, prefix, stored):
            state, park = load(partition, key)
            if state is None:
                continue
            res = steps.contact_step(state, park, lifecycle, defn, partition, rec.offset)
            store(partition, key, res)

    def _tick_partition(self, partition: int, now_ms: int, replicas: dict, dirty: dict, store: Callable,
                        load: Callable) -> None:
        stored = (key for key, due in self.tables.items("resume-index", partition) if int(due) <= now_ms)
        for key in self._batch_keys(dirty, partition, b"", stored):
            state, park = load(partition, key)
            if state is None:
                continue
            due = enrollment.next_resume_at(state)
            if due is None or due > now_ms:
                continue
            aid = key.split(SEP.encode(), 1)[0].decode()
            defn = engine_automation(self._replica(partition, aid, replicas))
            if defn is None:
                continue  # see process_contacts: the definition is replayed; a later tick resumes it
            store(partition, key, steps.contact_tick(state, defn, now_ms))

    # ---- messages -------------------------------------------------------------------------------

    def process_messages(self, ctx: "Batch", records: list[Any]) -> None:
        states: dict[bytes, dict | None] = {}
        dirty: dict[bytes, int] = {}  # key -> partition
        replayed: set[bytes] = set()
        tables = self.tables
        contract_name = self.contract_name
        for rec in records:
            partition = rec.partition
            in_replay = self._replayed(ctx, rec)
            contract = contract_name[rec.topic]
            if contract == "internal.to-messages":
                ev = orjson.loads(rec.value)
            else:
                ev = self._parse(ctx, rec, contract)
                if ev is None:
                    continue
            key = ev["message_id"].encode()
            if key not in states:
                raw = tables.get("messages", partition, key)
                states[key] = orjson.loads(raw) if raw else None
            res = steps.message_step(states[key], ev, partition, rec.offset)
            states[key] = res.state
            self._count_message(ctx, partition, res.state, res.output)
            if res.changed or in_replay:
                dirty[key] = partition
            if in_replay:
                replayed.add(key)
            self._queue_output(ctx, res.output)
        for key in replayed:
            state = states.get(key)
            if state is not None:
                snapshot = steps.message_snapshot(state)
                self._count_message(ctx, dirty[key], state, snapshot)
                self._queue_output(ctx, snapshot)

        def write_state() -> None:
            for key, partition in dirty.items():
                if states[key] is not None:
                    tables.put("messages", partition, key, _dumps(states[key]))

        ctx.state_writers.append(write_state)

    # ---- report counters (streams.counters) ------------------------------------------------------

    def _pend(self, table: str, rows: Iterable[tuple]) -> None:
        _keep_latest(self.pending_rows, table, rows)

    def state_committed(self, ctx: "Batch") -> None:
        """The batch's state (its totals) is durable: its counter rows may be written now.

        Why not earlier: a batch's rows are written before its state is committed. A counter row
        written by a batch whose state a crash then lost can name a total the recovered state never
        had (contacts that entered a status in that batch); the replay, in other batches, may change
        that total by nothing, so no later row and no recount would ever replace it."""
        for table, rows in ctx.counter_rows.items():
            self._pend(table, rows.values())

    def _pending_copy(self) -> dict[str, dict[tuple, tuple]]:
        return {table: dict(rows) for table, rows in self.pending_rows.items() if rows}

    def counter_rows_written(self, written: dict | None) -> None:
        """Counter rows are durable: drop them from the pending ones (unless a newer row replaced them)."""
        for table, rows in (written or {}).items():
            pending = self.pending_rows.get(table)
            if not pending:
                continue
            for key, row in rows.items():
                if pending.get(key) is row:
                    del pending[key]

    @property
    def has_pending_rows(self) -> bool:
        return any(self.pending_rows.values())

    async def flush_counter_rows(self) -> None:
        """Write the pending counter rows now (when the worker is idle, and before a clean stop)."""
        if self.has_pending_rows:
            rows = self._pending_copy()
            await self._write_rows({table: list(r.values()) for table, r in rows.items()})
            self.counter_rows_written(rows)

    @staticmethod
    def _acc(ctx: "Batch", table: str, partition: int) -> dict:
        acc = ctx.counts.get((table, partition))
        if acc is None:
            acc = ctx.counts[(table, partition)] = {}
        return acc

    def _count_contact(self, ctx: "Batch", partition: int, state: dict | None, out: steps.Output) -> None:
        """Count the enrollment and node rows a key emits (``state["cc"]``: what it counted before)."""
        emitted = out.rows
        if state is None or ("enrollments" not in emitted and "node_states" not in emitted):
            return
        state["cc"] = counterlib.count_contact_rows(
            state.get("cc"), emitted, self._acc(ctx, "node_counters", partition),
            self._acc(ctx, "status_counters", partition))

    def _count_message(self, ctx: "Batch", partition: int, state: dict | None, out: steps.Output) -> None:
        """Count the messages rows a message emits (``state["cc"]``: what it counted before)."""
        emitted = out.rows.get("messages")
        if state is None or not emitted:
            return
        state["cc"] = counterlib.count_message_rows(state.get("cc"), emitted,
                                                    self._acc(ctx, "mailing_counters", partition))

    def counter_version(self) -> int:
        """The version of counter rows written now: the wall clock in microseconds, strictly increasing
        in this process. A partition's next owner (after a crash or a rebalance) starts later than
        its predecessor wrote, so its rows win (workers' clocks are assumed to agree within the
        seconds a handover takes)."""
        version = max(self._counter_version + 1, time.time_ns() // 1000)
        self._counter_version = version
        return version

    def _settle_counters(self, ctx: "Batch") -> None:
        """Add the batch's count differences to the partitions' totals (staged with the batch's state)
        and queue a row per changed total. A total that would go below zero (totals that do not match
        the keys' ``cc``; a bug) is logged and its partition recounted."""
        if not ctx.counts:
            return
        version = self.counter_version()
        tables = self.tables
        recount = set()
        for (table, partition), deltas in ctx.counts.items():
            kind = KIND_OF_COUNTERS[table]
            totals_table = COUNTED[kind][1]
            prefix, build = COUNTER_KEYS[table]
            current = {}
            for key in deltas:
                raw = tables.get(totals_table, partition, prefix + _dumps(key))
                if raw is not None:
                    current[key] = orjson.loads(raw)
            changed, negative = counterlib.merge(current, deltas)
            if negative:
                log.error("report counters of %s partition %d would go below zero (%s); recounting the partition",
                          table, partition, negative[:3])
                recount.add((kind, partition))
                continue
            for key, counts in changed.items():
                tables.put(totals_table, partition, prefix + _dumps(key), _dumps(counts))
            _keep_latest(ctx.counter_rows, table, [build(key, partition, counts, version)
                                                   for key, counts in changed.items()])
        for kind, partition in sorted(recount):
            for table, table_rows in self.recount(kind, partition, "mismatch").items():
                _keep_latest(ctx.counter_rows, table, table_rows)

    def recount(self, kind: str, partition: int, cause: str, rebuild: bool = False) -> dict[str, list]:
        """Count a partition's totals again from every key's ``cc`` (staged writes included), stage them
        and return their rows (a zero row for a total that no key counts any more) and the coverage
        rows. A key stored before the counters existed (no ``cc``), or every key with ``rebuild`` (its
        ``cc`` follows an earlier counting rule), is counted as its snapshot would be written, and its
        ``cc`` staged."""
        keys_table, totals_table, counter_tables = COUNTED[kind]
        tables = self.tables
        accs: dict[str, dict] = {t: {} for t in counter_tables}
        if kind == "contact":
            counterlib.contact_totals(self._contact_ccs(partition, rebuild), accs["node_counters"],
                                      accs["status_counters"])
        else:
            counterlib.message_totals(self._message_ccs(partition), accs["mailing_counters"])
        stale = {key for key, _ in tables.items(totals_table, partition) if key != COUNTED_MARK}
        version = self.counter_version()
        out: dict[str, list] = {}
        by_prefix = {COUNTER_KEYS[t][0]: t for t in counter_tables}
        for table in counter_tables:
            prefix, build = COUNTER_KEYS[table]
            rows_out = out.setdefault(table, [])
            for key, counts in accs[table].items():
                record = prefix + _dumps(key)
                stale.discard(record)
                tables.put(totals_table, partition, record, _dumps(counts))
                rows_out.append(build(key, partition, counts, version))
        for record in sorted(stale):
            table = by_prefix[record[:1]]
            prefix, build = COUNTER_KEYS[table]
            zero = [0] * len(counterlib.COUNTER_NAMES[table])
            # kept at zero: every later recount writes its zero row again, in case a crash kept this
            # one from being written
            tables.put(totals_table, partition, record, _dumps(zero))
            out[table].append(build(tuple(orjson.loads(record[1:])), partition, zero, version))
        tables.put(totals_table, partition, COUNTED_MARK, COUNTING_RULE)
        out["counter_coverage"] = [counterlib.coverage_row(t, partition, self.settings.partitions, version)
                                   for t in counter_tables]
        self.metrics.counters_recounted(f"{kind}s", cause)
        return out

    def _contact_ccs(self, partition: int, rebuild: bool = False) -> Iterable[tuple[str, dict | None]]:
        sep = SEP.encode()
        replicas: dict = {}
        for key, raw in self.tables.items("enrollments", partition):
            state = orjson.loads(raw)
            aid = key.split(sep, 1)[0].decode()
            if (rebuild or "cc" not in state) and state.get("runs"):
                replica = self._replica(partition, aid, replicas)
                defn = engine_automation(replica)
                if defn is None:  # no rows without the definition (see process_contacts)
                    if "cc" in state:
                        yield aid, state["cc"]
                    continue
                snapshot = steps.contact_snapshot(orjson.loads(raw), defn, node_span(replica))
                state["cc"] = counterlib.count_contact_rows(None, snapshot.rows, {}, {})
                self.tables.put("enrollments", partition, key, _dumps(state))
            yield aid, state.get("cc")

    def _message_ccs(self, partition: int) -> Iterable[list | None]:
        for key, raw in self.tables.items("messages", partition):
            state = orjson.loads(raw)
            if "cc" not in state:
                snapshot = steps.message_snapshot(orjson.loads(raw))
                state["cc"] = counterlib.count_message_rows(None, snapshot.rows.get("messages") or (), {})
                self.tables.put("messages", partition, key, _dumps(state))
            yield state.get("cc")

    def counters_assigned(self, assigned: Iterable[Any], unclean: set) -> None:
        """After a recovery: recount the totals of every assigned partition whose last owner did not stop
        cleanly (``unclean``: its changelogs may hold part of a batch, keys without their totals) or
        that was never counted, and queue its rows; queue a coverage row for every other one. They go
        with the next batch. The caller commits the staged totals."""
        parts: dict[tuple[str, int], bool] = {}
        for tp in assigned:
            kind = (self.kind_of_topic.get(tp.topic) or "").replace("-internal", "")
            if kind in COUNTED:
                parts[(kind, tp.partition)] = parts.get((kind, tp.partition), False) or tp in unclean
        version = self.counter_version()
        for (kind, partition), dirty in sorted(parts.items()):
            totals_table, counter_tables = COUNTED[kind][1], COUNTED[kind][2]
            rule = self.tables.get(totals_table, partition, COUNTED_MARK)
            if dirty or rule != COUNTING_RULE:
                cause = "unclean" if dirty else "first" if rule is None else "rule"
                found = self.recount(kind, partition, cause, rebuild=rule is not None and rule != COUNTING_RULE)
            else:
                found = {"counter_coverage": [counterlib.coverage_row(t, partition, self.settings.partitions, version)
                                              for t in counter_tables]}
            for table, table_rows in found.items():
                self._pend(table, table_rows)
        self._next_counter_flush = 0.0

    # ---- automations ----------------------------------------------------------------------------

    def process_automations(self, ctx: "Batch", records: list[Any]) -> None:
        replicas: dict[str, tuple[int, dict | None]] = {}  # automation_id -> (partition, replica)
        for rec in records:
            if not rec.value:
                continue  # a tombstone on the compacted topic: the definition we hold stays
            ev = self._parse(ctx, rec, "automations")
            if ev is None:
                continue
            aid = ev["automation_id"]
            if aid in replicas:
                current = replicas[aid][1]
            else:
                raw = self.tables.get("automations", rec.partition, aid.encode())
                current = orjson.loads(raw) if raw else None
            replica = apply_automation_event(current, ev)
            if replica is None or replica == current:
                continue
            replicas[aid] = (rec.partition, replica)
            if replica.get("defn") is None:
                continue  # lifecycle before the definition: kept, sent along once it arrives
            ctx.rows.setdefault("automations", []).append(
                rowlib.automation_row(replica["defn"], replica["status"], replica["updated_at"], replica["version"]))
            first_definition = current is None or current.get("defn") is None
            fan_type = "automation.published" if first_definition else ev["type"]
            message = {"type": fan_type, "automation_id": aid, "replica": replica, "event": {
                "event_id": ev["event_id"], "type": ev["type"], "occurred_at": ev["occurred_at"],
                "automation_id": aid}}
            for partition in range(self.settings.partitions):
                ctx.sends.append((self.to_contacts, aid.encode(), _dumps(message), partition))

        def write_state() -> None:
            for aid, (partition, replica) in replicas.items():
                self.tables.put("automations", partition, aid.encode(), _dumps(replica))

        ctx.state_writers.append(write_state)


#: Salts insert tokens per process. ClickHouse records a token in its deduplication log before
#: the inserted part is committed; a process killed in between leaves a token whose rows are not
#: there, and a replay with identical rows and the same token would be dropped (rows lost; seen
#: in the SIGKILL test). A fresh salt per process makes the replay insert them again; the
#: tables are ReplacingMergeTree, so rows inserted twice fold into one.
_TOKEN_SALT = os.urandom(8).hex()


_WRITE_SEQ = itertools.count(1)


def write_token(table: str) -> str:
    """The insert deduplication token of one write: unique in this process (salt and sequence).

    ClickHouse drops an insert whose token it has seen, whatever its rows, so a token must never
    stand for two different contents. The sink reuses a batch's token when it retries the same
    rows (an insert whose answer was lost is then dropped); anything written again by a replay
    is a new write with a new token (the rows are idempotent: stable keys and versions). The
    salt keeps a restarted process from meeting a token its predecessor logged for a part
    that a SIGKILL lost.
    """
    return f"{table}:{_TOKEN_SALT}:{next(_WRITE_SEQ)}"


_LIFECYCLE_DEFNS: dict[int, tuple[dict, dict]] = {}  # id(replica) -> (replica, its engine definition)


def engine_automation(replica: dict | None) -> dict | None:
    """What the engine is given: the definition, plus the archive time once archived, and the time
    of the pause while the automation is paused (``paused_at``).

    The same replica object gives the same definition object (the engine caches per-automation
    step metadata by definition object): an archived or paused one is built once, not per event.
    """
    if replica is None or replica.get("defn") is None:
        return None
    archived_at = replica.get("archived_at")
    paused_at = replica.get("lifecycle_at") if replica.get("status") == "paused" else None
    if archived_at is None and paused_at is None:
        return replica["defn"]
    cached = _LIFECYCLE_DEFNS.get(id(replica))
    if cached is not None and cached[0] is replica:  # the entry holds the replica: its id is not reused
        return cached[1]
    if len(_LIFECYCLE_DEFNS) >= 1024:
        _LIFECYCLE_DEFNS.clear()
    defn = dict(replica["defn"])
    if archived_at is not None:
        defn["archived_at"] = archived_at
    if paused_at is not None:
        defn["paused_at"] = paused_at
    _LIFECYCLE_DEFNS[id(replica)] = (replica, defn)
    return defn


def node_span(replica: dict | None) -> int:
    """How many node indices the automation's definitions have used (the largest index + 1, over
    every definition the replica held): a snapshot covers them all, since an earlier attempt may
    have emitted node rows under an earlier definition."""
    if not replica:
        return 0
    return max(replica.get("node_span") or 0, steps.node_span(replica.get("defn")))


def apply_automation_event(current: dict | None, ev: dict) -> dict | None:
    """Fold an ``automation.*`` event into the automation's replica (definition + lifecycle)."""
    replica = dict(current) if current else {"defn": None, "status": "active", "updated_at": 0, "version": 0,
                                              "lifecycle_at": 0}
    kind = ev["type"]
    at = ev["occurred_at"]
    if kind == "automation.published":
        old = replica.get("defn")
        if old is not None and (old.get("version", 0), old.get("occurred_at", 0)) >= (ev.get("version", 0), at):
            return current
        replica["defn"] = ev
        replica["node_span"] = max(node_span(replica), steps.node_span(ev))
    else:
        status = {"automation.paused": "paused", "automation.resumed": "active",
                  "automation.archived": "archived"}[kind]
        if replica.get("status") == "archived" or at < replica.get("lifecycle_at", 0):
            return current
        replica["status"] = status
        replica["lifecycle_at"] = at
        if kind == "automation.archived":
            replica["archived_at"] = at
    replica["updated_at"] = max(replica.get("updated_at", 0), at)
    replica["version"] = replica.get("version", 0) + 1
    return replica


def _wire_change(change: dict) -> dict:
    change["occurred_at"] = to_rfc3339(change["occurred_at"])
    return change
