"""Faust wiring: topics, tables and agents around the pure steps of ``streams.steps``.

Flow (all input and internal topics have the same partition count, so that a
contact's enrollments, sends and forwarded outcomes land on one partition and
one worker; tables are written to the changelog partition of the event that
changed them):

    automations ──► automations agent ──► fan-out (definition, lifecycle) ─┐
    enrollments, sends, internal.to-contacts ──► contacts agent ◄──────────┘
        table enrollments (automation_id␟contact_id), parked, resume-index, automation-replicas
        ──► status-changes, internal.to-messages (send registrations), ClickHouse rows
    provider-events, internal.to-messages ──► messages agent
        table messages (message_id)
        ──► status-changes, internal.to-contacts (outcomes), ClickHouse rows

Every agent consumes in batches (``take_events``): parse, apply, write each
changed key once, send outputs, write rows and wait for ClickHouse; only then
does the batch end and Faust acknowledge (and later commit) its offsets. So a
crash replays at most the uncommitted batches, and replays are idempotent
(facts merge; rows are ReplacingMergeTree with stable keys and versions).
"""
from __future__ import annotations

import base64
import hashlib
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import faust
import orjson
from faust.streams import _current_event

from agents.sink import BatchWriter
from schemas.parser import Rejection, parse_event, to_rfc3339
from schemas.topics import topic_names
from sendtrail.metrics import Metrics
from sendtrail.settings import Settings
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


def _set_current(event: Any) -> None:
    """Table writes go to the changelog partition of the current event: make it this one."""
    _current_event.set(weakref.ref(event))


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def iter_partition(table: Any, partition: int, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
    """Keys and raw values of one partition of a RocksDB-backed table, optionally by key prefix."""
    store = table.data
    db = store._db_for_partition(partition)
    offset_key = getattr(store, "offset_key", None)
    items = db.items(from_key=prefix) if prefix else db.items()
    for key, value in items:
        if prefix and not key.startswith(prefix):
            break
        if key == offset_key or value is None:
            continue
        yield key, value


@dataclass
class Batch:
    """What one batch of one agent produces, sent and written when the batch ends."""

    sends: list = field(default_factory=list)
    rows: dict = field(default_factory=dict)
    replica_writes: dict = field(default_factory=dict)  # (partition, automation_id) -> replica
    replica_events: dict = field(default_factory=dict)  # (partition, automation_id) -> the fan-out event


class Pipeline:
    """The worker's streaming half: one Faust app, its tables and agents, and the ClickHouse sink."""

    def __init__(self, settings: Settings, metrics: Metrics, sink: BatchWriter) -> None:
        self.settings = settings
        self.metrics = metrics
        self.sink = sink
        names = topic_names(settings.topic_prefix)
        self.topic_names = names
        self.kind_of_topic = {full: INPUT_KIND.get(name) for name, full in names.items()}
        self.contract_name = {full: name for name, full in names.items()}
        brokers = [f"kafka://{s.strip()}" for s in settings.kafka.split(",")]
        self.app = faust.App(
            f"{settings.topic_prefix}{settings.consumer_group}",
            broker=brokers,
            store="rocksdb://",
            datadir=str(settings.data_dir / "state"),
            web_enabled=False,
            topic_partitions=settings.partitions,
            topic_replication_factor=settings.replication_factor,
            key_serializer="raw",
            value_serializer="raw",
            consumer_auto_offset_reset="earliest",
            table_standby_replicas=0,
            broker_commit_every=100_000,
            broker_commit_interval=1.0,
            stream_buffer_maxsize=max(4096, settings.batch_size * 2),
            producer_acks=-1,
            producer_linger_ms=5,
            topic_disable_leader=True,
            # A killed worker's group membership expires after this, so a restarted one joins a
            # group without ghosts (instead of a mid-stream rebalance a minute later).
            broker_session_timeout=10.0,
            broker_heartbeat_interval=3.0,
        )
        app = self.app
        parts = settings.partitions

        def topic(*contract: str, **kw: Any):
            return app.topic(*(names[c] for c in contract), key_type=bytes, value_type=bytes,
                             partitions=parts, **kw)

        self.contacts_in = topic("enrollments", "sends", "internal.to-contacts")
        self.messages_in = topic("provider-events", "internal.to-messages")
        self.automations_in = topic("automations")
        self.to_contacts = topic("internal.to-contacts")
        self.to_messages = topic("internal.to-messages")
        self.status_out = topic("status-changes")
        self.dead_out = topic("dead-letters")

        def table(name: str):
            return app.Table(name, default=None, key_type=bytes, value_type=bytes, partitions=parts)

        self.enrollments = table("enrollments")
        self.parked = table("parked")
        self.resume_index = table("resume-index")
        self.replicas = table("automation-replicas")
        self.messages = table("messages")
        self.automations = table("automations")

        app.agent(self.contacts_in, name="contacts")(self._contacts_agent)
        app.agent(self.messages_in, name="messages")(self._messages_agent)
        app.agent(self.automations_in, name="automations")(self._automations_agent)
        app.timer(settings.resume_check_seconds)(self._resume_timer)

    # ---- agents -------------------------------------------------------------------------------

    async def _contacts_agent(self, stream) -> None:
        async for batch in stream.take_events(self.settings.batch_size, self.settings.batch_seconds):
            await self.process_contacts(batch)

    async def _messages_agent(self, stream) -> None:
        async for batch in stream.take_events(self.settings.batch_size, self.settings.batch_seconds):
            await self.process_messages(batch)

    async def _automations_agent(self, stream) -> None:
        async for batch in stream.take_events(self.settings.batch_size, self.settings.batch_seconds):
            await self.process_automations(batch)

    async def _resume_timer(self) -> None:
        """Ask every partition this worker owns to auto-resume holds whose date has passed."""
        now_ms = int(time.time() * 1000)
        assigned = self.app.assignor.assigned_actives()
        target = self.topic_names["internal.to-contacts"]
        for tp in assigned:
            if tp.topic == target:
                await self.to_contacts.send(key=b"tick", value=_dumps({"type": "tick", "now_ms": now_ms}),
                                            partition=tp.partition)

    # ---- shared helpers -------------------------------------------------------------------------

    def _parse(self, ctx: "Batch", event: Any, contract_topic: str) -> dict | None:
        parsed = parse_event(event.value, topic=contract_topic, max_bytes=self.settings.max_event_bytes)
        if isinstance(parsed, Rejection):
            self._dead_letter(ctx, event, contract_topic, parsed)
            return None
        self.metrics.consumed(contract_topic, parsed["type"])
        return parsed

    def _dead_letter(self, ctx: "Batch", event: Any, contract_topic: str, rejection: Rejection) -> None:
        msg = event.message
        raw: bytes = event.value if isinstance(event.value, bytes) else bytes(event.value or b"")
        doc = {
            "reason": rejection.reason,
            "detail": rejection.detail,
            "field": rejection.field,
            "topic": contract_topic,
            "partition": msg.partition,
            "offset": msg.offset,
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
        ctx.sends.append((self.dead_out, msg.key, _dumps(doc), None))
        self.metrics.rejected(contract_topic, rejection.reason)
        self.metrics.dead_letter_produced(contract_topic)

    def _queue_output(self, ctx: "Batch", out: steps.Output) -> None:
        for change in out.changes:
            self.metrics.transition(change["kind"], change.get("from"), change["to"])
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

        Straight to the transport producer (no per-message Faust channel, future-message
        and sensor machinery: a third of the cost of a send); the key picks the partition
        with the same default partitioner when ``partition`` is None. Raises if any send
        failed, so the batch is not acknowledged.
        """
        producer = self.app.producer
        send = producer.send
        futures = []
        for topic, key, value, partition in sends:
            futures.append(await send(topic.topics[0], key, value, partition, None, None))
        await producer.flush()
        for fut in futures:
            if not fut.done():
                await fut
            fut.result()

    async def _finish_batch(self, ctx: "Batch", batch: list[Any]) -> None:
        """Make the batch's effects durable: Kafka outputs acknowledged and ClickHouse rows written.

        Callers write their tables only after this returns. A crash before the table
        writes replays the batch and re-emits the same (idempotent) effects; a crash
        after them finds the effects already durable. Writing the tables first would
        lose effects: the replay would see "already applied" and emit nothing.
        """
        if ctx.sends:
            await self._send_all(ctx.sends)
        pending_rows = ctx.rows
        if pending_rows:
            for table_name, table_rows in pending_rows.items():
                await self.sink.write(table_name, table_rows, content_token(table_name, table_rows))
            await self.sink.flush()
        now = time.time()
        for ev in batch:
            ts = ev.message.timestamp
            if ts:
                self.metrics.observe_latency(max(0.0, now - ts))
        self.metrics.processed(len(batch), now)

    # ---- contacts -------------------------------------------------------------------------------

    def _replica(self, partition: int, automation_id: str, cache: dict) -> dict | None:
        """The automation as this partition knows it (each partition holds its own replica)."""
        ck = (partition, automation_id)
        if ck in cache:
            return cache[ck]
        raw = self.replicas.get(automation_id.encode())
        value = orjson.loads(raw) if raw else None
        cache[ck] = value
        return value

    async def process_contacts(self, batch: list[Any]) -> None:
        ctx = Batch()
        now_ms = int(time.time() * 1000)  # out-of-office holds whose date has passed resume right away
        dirty: dict[bytes, tuple[Any, Any, dict | None, list | None, bool, bool]] = {}
        states: dict[bytes, dict | None] = {}
        parked: dict[bytes, list | None] = {}
        ignored: dict[bytes, int] = {}  # ignored re-enrollments per key, for the counter
        replicas: dict[tuple[int, str], dict | None] = {}

        def load(key: bytes) -> tuple[dict | None, list | None]:
            """State and parked events of a key of the current event's partition (batch cache first)."""
            if key not in states:
                raw = self.enrollments.get(key)
                states[key] = orjson.loads(raw) if raw else None
                ignored[key] = len(states[key].get("ignored", ())) if states[key] else 0
                rawp = self.parked.get(key)
                parked[key] = orjson.loads(rawp) if rawp else None
            return states[key], parked[key]

        def store(event: Any, key: bytes, res: steps.ContactResult) -> None:
            count = len(res.state.get("ignored", ())) if res.state else 0
            if count > ignored.get(key, 0):
                self.metrics.ignored_enrollment("other", count - ignored.get(key, 0))
            ignored[key] = count
            states[key] = res.state
            parked[key] = res.parked
            old = dirty.get(key)
            s_dirty = res.state_changed or (old[4] if old else False)
            p_dirty = res.parked_changed or (old[5] if old else False)
            dirty[key] = (event, None, res.state, res.parked, s_dirty, p_dirty)
            self._queue_output(ctx, res.output)

        for event in batch:
            _set_current(event)
            msg = event.message
            contract = self.contract_name[msg.topic]
            if contract == "internal.to-contacts":
                internal = orjson.loads(event.value)
                kind = internal["type"]
                if kind == "tick":
                    self._tick_partition(event, internal["now_ms"], replicas, dirty, store, load)
                    continue
                if kind.startswith("automation."):
                    self._fan_out(ctx, event, internal, replicas, dirty, store, load)
                    continue
                ev = internal
            else:
                ev = self._parse(ctx, event, contract)
                if ev is None:
                    continue
            key = f"{ev['automation_id']}{SEP}{ev['contact_id']}".encode()
            state, park = load(key)
            defn = engine_automation(self._replica(msg.partition, ev["automation_id"], replicas))
            res = steps.contact_step(state, park, ev, defn, msg.partition, msg.offset, now_ms)
            store(event, key, res)
        await self._finish_batch(ctx, batch)
        self._flush_dirty(dirty)
        for (partition, aid), replica in ctx.replica_writes.items():
            _set_current(ctx.replica_events[(partition, aid)])
            self.replicas[aid.encode()] = _dumps(replica)

    def _flush_dirty(self, dirty: dict) -> None:
        """Write each changed key once, to the changelog partition of the event that last changed it."""
        for key, (event, _, state, park, s_dirty, p_dirty) in dirty.items():
            _set_current(event)
            if s_dirty:
                if state is None:
                    self.enrollments.pop(key, None)
                else:
                    self.enrollments[key] = _dumps(state)
                    self._update_resume_index(key, state)
            if p_dirty:
                if park:
                    self.parked[key] = _dumps(park)
                else:
                    self.parked.pop(key, None)
        dirty.clear()

    def _update_resume_index(self, key: bytes, state: dict) -> None:
        due = enrollment.next_resume_at(state)
        current = self.resume_index.get(key)
        if due is None:
            if current is not None:
                self.resume_index.pop(key, None)
        else:
            value = str(due).encode()
            if current != value:
                self.resume_index[key] = value

    @staticmethod
    def _batch_keys(dirty: dict, partition: int, prefix: bytes, stored: Iterable[bytes]) -> list[bytes]:
        """Keys of a partition with a prefix: those stored in RocksDB and those changed in this batch."""
        keys = dict.fromkeys(stored)
        for key, entry in dirty.items():
            if key.startswith(prefix) and entry[0].message.partition == partition:
                keys[key] = None
        return list(keys)

    def _fan_out(self, ctx: "Batch", event: Any, internal: dict, replicas: dict, dirty: dict, store: Any,
                 load: Any) -> None:
        """An automation's definition or lifecycle reached this partition: apply it to its keys."""
        partition = event.message.partition
        aid = internal["automation_id"]
        replica = internal["replica"]
        replicas[(partition, aid)] = replica
        ctx.replica_writes[(partition, aid)] = replica
        ctx.replica_events[(partition, aid)] = event
        defn = engine_automation(replica)
        prefix = f"{aid}{SEP}".encode()
        if internal["type"] == "automation.published":
            stored = (key for key, _ in iter_partition(self.parked, partition, prefix))
            for key in self._batch_keys(dirty, partition, prefix, stored):
                state, park = load(key)
                if park:
                    store(event, key, steps.contact_unpark(state, park, defn))
            return
        lifecycle = internal["event"]
        stored = (key for key, _ in iter_partition(self.enrollments, partition, prefix))
        for key in self._batch_keys(dirty, partition, prefix, stored):
            state, park = load(key)
            if state is None:
                continue
            res = steps.contact_step(state, park, lifecycle, defn, partition, event.message.offset)
            store(event, key, res)

    def _tick_partition(self, event: Any, now_ms: int, replicas: dict, dirty: dict, store: Any, load: Any) -> None:
        partition = event.message.partition
        stored = (key for key, due in iter_partition(self.resume_index, partition) if int(due) <= now_ms)
        for key in self._batch_keys(dirty, partition, b"", stored):
            state, park = load(key)
            if state is None:
                continue
            due = enrollment.next_resume_at(state)
            if due is None or due > now_ms:
                continue
            aid = key.split(SEP.encode(), 1)[0].decode()
            replica = self._replica(partition, aid, replicas)
            res = steps.contact_tick(state, engine_automation(replica), now_ms)
            store(event, key, res)

    # ---- messages -------------------------------------------------------------------------------

    async def process_messages(self, batch: list[Any]) -> None:
        ctx = Batch()
        states: dict[bytes, dict | None] = {}
        dirty: dict[bytes, Any] = {}
        for event in batch:
            _set_current(event)
            msg = event.message
            contract = self.contract_name[msg.topic]
            if contract == "internal.to-messages":
                ev = orjson.loads(event.value)
            else:
                ev = self._parse(ctx, event, contract)
                if ev is None:
                    continue
            key = ev["message_id"].encode()
            if key not in states:
                raw = self.messages.get(key)
                states[key] = orjson.loads(raw) if raw else None
            res = steps.message_step(states[key], ev, msg.partition, msg.offset)
            states[key] = res.state
            if res.changed:
                dirty[key] = event
            self._queue_output(ctx, res.output)
        await self._finish_batch(ctx, batch)
        for key, event in dirty.items():
            _set_current(event)
            self.messages[key] = _dumps(states[key])

    # ---- automations ----------------------------------------------------------------------------

    async def process_automations(self, batch: list[Any]) -> None:
        ctx = Batch()
        replicas: dict[str, tuple[Any, dict | None]] = {}  # automation_id -> (last event, replica)
        for event in batch:
            _set_current(event)
            if not event.value:
                continue  # a tombstone on the compacted topic: the definition we hold stays
            ev = self._parse(ctx, event, "automations")
            if ev is None:
                continue
            aid = ev["automation_id"]
            if aid in replicas:
                current = replicas[aid][1]
            else:
                raw = self.automations.get(aid.encode())
                current = orjson.loads(raw) if raw else None
            replica = apply_automation_event(current, ev)
            if replica is None or replica == current:
                continue
            replicas[aid] = (event, replica)
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
        await self._finish_batch(ctx, batch)
        for aid, (event, replica) in replicas.items():
            _set_current(event)
            self.automations[aid.encode()] = _dumps(replica)


def content_token(table: str, rows: list[dict]) -> str:
    """The insert deduplication token of a write: a hash of the rows themselves.

    ClickHouse drops an insert whose token it has seen, whatever its rows, so the
    token must identify the content. Source offsets do not: a replayed batch can
    start and end at the same offsets and hold other events in between (batches mix
    topics and partitions), and its rows would be silently dropped.
    """
    return f"{table}:{hashlib.blake2b(orjson.dumps(rows), digest_size=16).hexdigest()}"


def engine_automation(replica: dict | None) -> dict | None:
    """What the engine is given: the definition, plus the archive time once archived."""
    if replica is None or replica.get("defn") is None:
        return None
    archived_at = replica.get("archived_at")
    if archived_at is None:
        return replica["defn"]
    return {**replica["defn"], "archived_at": archived_at}


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
