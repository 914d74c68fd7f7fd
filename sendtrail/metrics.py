"""Every Prometheus metric of sendtrail, defined in one place.

Style follows arroyo's ``metric_defs``: the full catalogue lives in this
module (:data:`METRIC_DEFS` documents each family; the alert rules, the
Grafana dashboard and ``tests/unit`` check their queries against it), and the
rest of the code records through the methods of :class:`Metrics` instead of
creating metrics of its own.

Rules kept here:

* Nothing happens at import: no metric is created and no global registry is
  touched. ``Metrics(registry)`` creates the families on *that* registry, so
  tests (and several workers in one process) never collide.
* Names carry their unit (``_seconds``, ``_rows``, ``_bytes``) and counters
  end in ``_total`` (prometheus_client adds the suffix; the family name given
  to ``Counter`` has none).
* Label values are bounded. Ids (contact, message, automation, event) are
  never labels. Topics are reduced to their contract base name, statuses to
  their enum, and free text such as a dead-letter reason goes through
  :class:`_Bounded`, which lets at most a fixed number of distinct values
  through and reports the rest as ``other``.

Hot path: the ``consumed``/``transition``/... methods cache the bound child
per label tuple, so a call costs a dict lookup and an ``inc``.

Multiprocess mode (webhook gateway with several processes, e.g. gunicorn):
set ``PROMETHEUS_MULTIPROC_DIR`` to an empty, writable directory *before*
``prometheus_client`` is imported by any process; record through
``Metrics(CollectorRegistry())`` (a private registry that is never scraped);
serve ``/metrics`` from :meth:`Metrics.multiprocess_registry`; call
:func:`mark_process_dead` when a child exits. Gauges declare a
``multiprocess_mode`` so they aggregate sensibly (``livesum``/``livemax``).
Without the variable everything is plain single-process metrics.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Iterable, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from schemas.statuses import CONTACT_STATUSES, MESSAGE_STATUSES, NODE_STATES

__all__ = [
    "Metrics",
    "MetricDef",
    "METRIC_DEFS",
    "METRIC_NAMES",
    "HISTOGRAMS",
    "TRANSITION_KINDS",
    "CONTACT_STATUSES",
    "NODE_STATES",
    "MESSAGE_STATUSES",
    "WEBHOOK_PROVIDERS",
    "WEBHOOK_OUTCOMES",
    "LATENCY_BUCKETS",
    "LATENCY_SLO_SECONDS",
    "render",
    "mark_process_dead",
]

# --------------------------------------------------------------------------
# Bounded label vocabularies
# --------------------------------------------------------------------------

#: Base topic names (SPEC section 2 plus the internal ones), and the two HTTP
#: entry points (``api`` for POST /api/v1/events, ``webhooks``) as sources of
#: rejected events; a prefixed name is reduced to its base, anything else
#: becomes ``other``.
TOPICS: tuple[str, ...] = (
    "api",
    "webhooks",
    "automations",
    "enrollments",
    "sends",
    "provider-events",
    "status-changes",
    "dead-letters",
    "internal.to-contacts",
    "internal.to-messages",
)

TRANSITION_KINDS: tuple[str, ...] = ("contact_status", "node_state", "message_status")
# status label values come from the contract: CONTACT_STATUSES, NODE_STATES, MESSAGE_STATUSES

#: ``from_status`` of the first status a key gets.
NO_STATUS = "none"
_STATUSES_BY_KIND: dict[str, frozenset[str]] = {
    "contact_status": frozenset(CONTACT_STATUSES),
    # a node whose state goes away (the run moved on) changes to "none" (streams/engine/enrollment.py)
    "node_state": frozenset(NODE_STATES) | {NO_STATUS},
    "message_status": frozenset(MESSAGE_STATUSES),
}

WEBHOOK_PROVIDERS: tuple[str, ...] = ("sendgrid", "mailgun", "ses", "postmark")
WEBHOOK_OUTCOMES: tuple[str, ...] = (
    "accepted",
    "rejected_auth",
    "bad_request",
    "unsupported_media",
    "not_configured",
    "error",
)
IGNORED_ENROLLMENT_REASONS: tuple[str, ...] = ("run_open", "participation_once", "other")

SINK_TABLES: tuple[str, ...] = (
    "automations",
    "contacts",
    "recipients",
    "enrollments",
    "node_states",
    "messages",
    "message_events",
    "status_changes",
    "repeat_sends",
    "node_waits",
    "static_lists",
    "static_list_members",
    "mailing_counters",
    "node_counters",
    "status_counters",
    "counter_coverage",
)

OTHER = "other"

# --------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------

#: Latency SLO: events visible in ClickHouse within this many seconds (the
#: bucket boundary must exist so alerts can count "slower than the SLO").
LATENCY_SLO_SECONDS = 2.0
#: Event time to visible in ClickHouse: 5 ms .. 60 s, 0.25-0.5 s apart around the SLO so that
#: histogram_quantile reads a p99 near it to a fraction of a second (with 1, 2, 5 only, a p99 of
#: 2.2 s read as 3.3 s: tests/unit/test_metrics.py).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 10.0, 30.0, 60.0,
)
FLUSH_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
BATCH_ROWS_BUCKETS: tuple[float, ...] = (
    1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 50000, 200000,
)
HTTP_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)

# --------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------

MetricType = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricDef:
    """One family as exposed: ``name`` is the full sample name (with ``_total``
    for counters); ``attr`` the :class:`Metrics` attribute holding it."""

    name: str
    type: MetricType
    labels: tuple[str, ...]
    help: str
    attr: str


METRIC_DEFS: tuple[MetricDef, ...] = (
    # -- consumption / validation
    MetricDef("sendtrail_events_consumed_total", "counter", ("topic", "type"),
              "Valid events read from Kafka, by base topic and event type (rejected ones are counted "
              "in sendtrail_events_rejected_total only).", "events_consumed"),
    MetricDef("sendtrail_events_rejected_total", "counter", ("topic", "reason"),
              "Invalid events sent to dead-letters, by base topic and machine-readable reason.", "events_rejected"),
    MetricDef("sendtrail_dead_letters_produced_total", "counter", ("topic",),
              "Records produced to the dead-letters topic, by the base topic they came from.", "dead_letters_produced"),
    MetricDef("sendtrail_ignored_enrollments_total", "counter", ("reason",),
              "Re-enrollments (contact.enrolled) ignored: run still open, or participation once.", "ignored_enrollments"),
    MetricDef("sendtrail_status_transitions_total", "counter", ("kind", "from_status", "to_status"),
              "Status changes derived and emitted on status-changes (kind contact_status|node_state|message_status).",
              "status_transitions"),
    MetricDef("sendtrail_events_processed_total", "counter", (),
              "Events fully processed: their rows were flushed to ClickHouse.", "events_processed"),
    MetricDef("sendtrail_last_event_processed_timestamp_seconds", "gauge", (),
              "Unix time at which the last event was fully processed.", "last_event_processed"),
    MetricDef("sendtrail_event_to_clickhouse_latency_seconds", "histogram", (),
              "Time from an event's occurred_at (or Kafka timestamp) until its rows were written to ClickHouse.",
              "event_to_clickhouse_latency"),
    # -- Kafka consumer
    MetricDef("sendtrail_consumer_lag", "gauge", ("topic", "partition"),
              "Messages between the committed offset and the end of the partition (assigned partitions only).",
              "consumer_lag"),
    MetricDef("sendtrail_consumer_committed_offset", "gauge", ("topic", "partition"),
              "Last committed offset of an assigned partition.", "consumer_committed_offset"),
    MetricDef("sendtrail_consumer_end_offset", "gauge", ("topic", "partition"),
              "High watermark (end offset) of an assigned partition.", "consumer_end_offset"),
    MetricDef("sendtrail_state_table_keys", "gauge", ("table",),
              "Keys held in a local state table (this process's partitions).", "state_table_keys"),
    MetricDef("sendtrail_rebalances_total", "counter", ("phase",),
              "Consumer group rebalances seen by this worker, by phase (revoked|assigned).", "rebalances"),
    MetricDef("sendtrail_state_recovered_records_total", "counter", ("table",),
              "Changelog records applied to local state tables while recovering assigned partitions.",
              "state_recovered_records"),
    MetricDef("sendtrail_state_recovery_duration_seconds", "histogram", (),
              "Time to bring the assigned state partitions up to their changelogs after a rebalance.",
              "state_recovery_duration"),
    MetricDef("sendtrail_changelog_records_written_total", "counter", (),
              "State-table changes written to the changelog topics (one per changed key per batch).",
              "changelog_records_written"),
    MetricDef("sendtrail_report_recounts_total", "counter", ("partitions", "cause"),
              "Partitions (contacts|messages) whose report counters were counted from their keys (cause: "
              "unclean, after a stop that was not clean; first, never counted before; rule, counted under an "
              "earlier counting rule; mismatch, totals that did not match their keys).",
              "report_recounts"),
    MetricDef("sendtrail_batches_total", "counter", ("outcome",),
              "Batches of consumed records by outcome (committed|failed; a failed batch is retried "
              "from the committed offsets).", "batches"),
    MetricDef("sendtrail_batch_duration_seconds", "histogram", (),
              "Time to process and commit one batch (outputs, rows, state and offsets).", "batch_duration"),
    # -- ClickHouse sink
    MetricDef("sendtrail_sink_batch_rows", "histogram", ("table",),
              "Rows per batch inserted into a ClickHouse table.", "sink_batch_rows"),
    MetricDef("sendtrail_sink_flush_duration_seconds", "histogram", ("table",),
              "Duration of one successful batch insert into a ClickHouse table.", "sink_flush_duration"),
    MetricDef("sendtrail_sink_rows_written_total", "counter", ("table",),
              "Rows written to a ClickHouse table.", "sink_rows_written"),
    MetricDef("sendtrail_sink_failures_total", "counter", ("table",),
              "Failed batch inserts into a ClickHouse table (each is retried).", "sink_failures"),
    MetricDef("sendtrail_sink_retries_total", "counter", ("table",),
              "Retried batch inserts into a ClickHouse table.", "sink_retries"),
    MetricDef("sendtrail_sink_backlog_rows", "gauge", (),
              "Rows buffered in the sink, not yet written to ClickHouse.", "sink_backlog"),
    MetricDef("sendtrail_sink_backlog_limit_rows", "gauge", (),
              "Backlog size at which the sink pauses consumption (SENDTRAIL_SINK_MAX_BACKLOG_ROWS).",
              "sink_backlog_limit"),
    # -- webhook gateway
    MetricDef("sendtrail_webhook_requests_total", "counter", ("provider", "outcome"),
              "Webhook requests by provider and outcome "
              "(accepted|rejected_auth|bad_request|unsupported_media|not_configured|error).",
              "webhook_requests"),
    MetricDef("sendtrail_webhook_request_duration_seconds", "histogram", ("provider",),
              "Time to handle one webhook request.", "webhook_request_duration"),
    MetricDef("sendtrail_webhook_events_total", "counter", ("provider", "type"),
              "Canonical message.* events produced from webhooks, by provider and event type.", "webhook_events"),
    # -- HTTP API
    MetricDef("sendtrail_api_requests_total", "counter", ("route", "status_class"),
              "API requests by route template (not the path) and status class (2xx..5xx).", "api_requests"),
    MetricDef("sendtrail_api_request_duration_seconds", "histogram", ("route",),
              "API request duration by route template.", "api_request_duration"),
    # -- process
    MetricDef("sendtrail_worker_up", "gauge", (),
              "Whether the worker's agents and sink run: 1 running, 0 starting or stopping.", "worker_up"),
    MetricDef("sendtrail_build_info", "gauge", ("version",),
              "Always 1; the label carries the sendtrail version.", "build_info"),
)

METRIC_NAMES: frozenset[str] = frozenset(d.name for d in METRIC_DEFS)
HISTOGRAMS: frozenset[str] = frozenset(d.name for d in METRIC_DEFS if d.type == "histogram")

_GAUGE_MP_MODE: dict[str, str] = {
    "sendtrail_last_event_processed_timestamp_seconds": "max",
    "sendtrail_consumer_lag": "livemax",
    "sendtrail_consumer_committed_offset": "livemax",
    "sendtrail_consumer_end_offset": "livemax",
    "sendtrail_state_table_keys": "livesum",
    "sendtrail_sink_backlog_rows": "livesum",
    "sendtrail_sink_backlog_limit_rows": "livemax",
    "sendtrail_worker_up": "livesum",
    "sendtrail_build_info": "livemax",
}

_BUCKETS: dict[str, tuple[float, ...]] = {
    "sendtrail_event_to_clickhouse_latency_seconds": LATENCY_BUCKETS,
    "sendtrail_sink_batch_rows": BATCH_ROWS_BUCKETS,
    "sendtrail_sink_flush_duration_seconds": FLUSH_BUCKETS,
    "sendtrail_state_recovery_duration_seconds": FLUSH_BUCKETS,
    "sendtrail_batch_duration_seconds": FLUSH_BUCKETS,
    "sendtrail_webhook_request_duration_seconds": HTTP_BUCKETS,
    "sendtrail_api_request_duration_seconds": HTTP_BUCKETS,
}


# --------------------------------------------------------------------------
# Label bounding
# --------------------------------------------------------------------------

_LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9_.:/{}\-]{1,100}$")


class _Bounded:
    """Lets at most ``limit`` distinct, well-formed values through; the rest
    (and anything that looks like free text) become ``other``."""

    __slots__ = ("_allowed", "_seen", "_limit")

    def __init__(self, allowed: Iterable[str] = (), limit: int = 0) -> None:
        self._allowed = frozenset(allowed)
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, value: object) -> str:
        v = value if isinstance(value, str) else str(value)
        if v in self._allowed or v in self._seen:
            return v
        if len(self._seen) < self._limit and _LABEL_VALUE_RE.match(v):
            self._seen.add(v)
            return v
        return OTHER


def _topic_label(topic: str) -> str:
    if topic in TOPICS:
        return topic
    best = None
    for name in TOPICS:
        if topic.endswith(name) and (best is None or len(name) > len(best)):
            best = name
    return best or OTHER


def _status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else OTHER


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("sendtrail")
    except Exception:  # not installed (source checkout)
        return "unknown"


_CACHE_LIMIT = 4096


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


class Metrics:
    """All sendtrail metrics, created on ``registry``.

    Attributes are the raw families (named by :attr:`MetricDef.attr`); prefer
    the methods, which bound the label values and cache children.
    """

    def __init__(self, registry: CollectorRegistry, *, version: str | None = None) -> None:
        self.registry = registry
        for d in METRIC_DEFS:
            setattr(self, d.attr, self._create(d, registry))
        self.build_info.labels(version=version or _version()).set(1)

        self._event_type = _Bounded(limit=200)
        self._reason = _Bounded(limit=100)
        self._table = _Bounded(SINK_TABLES, limit=50)
        self._route = _Bounded(limit=100)
        self._msg_type = _Bounded(limit=100)
        self._c_consumed: dict[tuple, object] = {}
        self._c_rejected: dict[tuple, object] = {}
        self._c_transition: dict[tuple, object] = {}
        self._c_table: dict[str, tuple] = {}
        self._c_lag: dict[tuple, tuple] = {}

    @staticmethod
    def _create(d: MetricDef, registry: CollectorRegistry):
        if d.type == "counter":
            assert d.name.endswith("_total"), d.name
            return Counter(d.name[: -len("_total")], d.help, d.labels, registry=registry)
        if d.type == "gauge":
            return Gauge(d.name, d.help, d.labels, registry=registry,
                         multiprocess_mode=_GAUGE_MP_MODE.get(d.name, "livesum"))
        return Histogram(d.name, d.help, d.labels, registry=registry, buckets=_BUCKETS[d.name])

    # ---------------------------------------------------------- construction

    @classmethod
    def create(cls, *, process_collectors: bool = True, version: str | None = None) -> "Metrics":
        """A fresh registry (with process/platform/GC collectors unless told
        otherwise) and the metrics on it: what a worker serves on /metrics."""
        registry = CollectorRegistry(auto_describe=True)
        if process_collectors:
            from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        return cls(registry, version=version)

    @staticmethod
    def multiprocess_enabled() -> bool:
        return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"))

    @staticmethod
    def multiprocess_registry(path: str | None = None) -> CollectorRegistry:
        """A registry that merges the values of every process writing to
        ``PROMETHEUS_MULTIPROC_DIR`` (or ``path``): serve this on /metrics.

        Record through ``Metrics(CollectorRegistry())`` in each process (the
        multiprocess value files are selected by the environment variable,
        which must be set before prometheus_client is first imported)."""
        from prometheus_client import multiprocess

        path = path or os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")
        if not path:
            raise RuntimeError("multiprocess metrics need PROMETHEUS_MULTIPROC_DIR (a writable, empty directory)")
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
        return registry

    # ----------------------------------------------------------- hot path

    def consumed(self, topic: str, type: str, n: int = 1) -> None:
        """``n`` valid events of ``type`` read from ``topic`` (base or prefixed
        name). Rejected records go to :meth:`rejected` only; the dead-letter
        ratio is rejected / (consumed + rejected)."""
        key = (topic, type)
        child = self._c_consumed.get(key)
        if child is None:
            child = self.events_consumed.labels(topic=_topic_label(topic), type=self._event_type(type))
            if len(self._c_consumed) < _CACHE_LIMIT:
                self._c_consumed[key] = child
        child.inc(n)

    def rejected(self, topic: str, reason: str, n: int = 1) -> None:
        """``n`` invalid events from ``topic`` sent to dead-letters for ``reason``."""
        key = (topic, reason)
        child = self._c_rejected.get(key)
        if child is None:
            child = self.events_rejected.labels(topic=_topic_label(topic), reason=self._reason(reason))
            if len(self._c_rejected) < _CACHE_LIMIT:
                self._c_rejected[key] = child
        child.inc(n)

    def dead_letter_produced(self, topic: str, n: int = 1) -> None:
        """``n`` records written to the dead-letters topic, coming from ``topic``."""
        self.dead_letters_produced.labels(topic=_topic_label(topic)).inc(n)

    def transition(self, kind: str, from_status: str | None, to_status: str, n: int = 1) -> None:
        """A status change; ``from_status`` None (first status) is ``none``."""
        key = (kind, from_status, to_status)
        child = self._c_transition.get(key)
        if child is None:
            allowed = _STATUSES_BY_KIND.get(kind)
            if allowed is None:
                kind_l, f, t = OTHER, OTHER, OTHER
            else:
                kind_l = kind
                f = NO_STATUS if from_status is None or from_status == NO_STATUS else (
                    from_status if from_status in allowed else OTHER)
                t = to_status if to_status in allowed else OTHER
            child = self.status_transitions.labels(kind=kind_l, from_status=f, to_status=t)
            if len(self._c_transition) < _CACHE_LIMIT:
                self._c_transition[key] = child
        child.inc(n)

    def ignored_enrollment(self, reason: str = "other", n: int = 1) -> None:
        """A re-enrollment ignored: ``run_open`` or ``participation_once``."""
        r = reason if reason in IGNORED_ENROLLMENT_REASONS else OTHER
        self.ignored_enrollments.labels(reason=r).inc(n)

    def _table_children(self, table: str) -> tuple:
        children = self._c_table.get(table)
        if children is None:
            t = self._table(table)
            children = (
                self.sink_batch_rows.labels(table=t),
                self.sink_flush_duration.labels(table=t),
                self.sink_rows_written.labels(table=t),
                self.sink_failures.labels(table=t),
                self.sink_retries.labels(table=t),
            )
            if len(self._c_table) < _CACHE_LIMIT:
                self._c_table[table] = children
        return children

    def sink_flushed(self, table: str, rows: int, seconds: float) -> None:
        """A successful insert of ``rows`` rows into ``table`` that took ``seconds``."""
        batch, duration, written, _, _ = self._table_children(table)
        batch.observe(rows)
        duration.observe(seconds)
        written.inc(rows)

    def sink_failed(self, table: str) -> None:
        """An insert into ``table`` failed (it will be retried)."""
        self._table_children(table)[3].inc()

    def sink_retried(self, table: str) -> None:
        """An insert into ``table`` is being retried."""
        self._table_children(table)[4].inc()

    def touch_sink_tables(self, tables: Iterable[str] = SINK_TABLES) -> None:
        """Create the per-table series at 0 at start, so rates and the
        "sink failing" alert see a written counter even before the first row."""
        for t in tables:
            self._table_children(t)

    def set_sink_backlog_limit(self, rows: int) -> None:
        """SENDTRAIL_SINK_MAX_BACKLOG_ROWS, once at start (the backlog alert
        compares the backlog with it)."""
        self.sink_backlog_limit.set(rows)

    def set_sink_backlog(self, rows: int, limit: int | None = None) -> None:
        self.sink_backlog.set(rows)
        if limit is not None:
            self.sink_backlog_limit.set(limit)

    def processed(self, n: int = 1, now: float | None = None) -> None:
        """``n`` events fully processed (rows flushed)."""
        if n:
            self.events_processed.inc(n)
            self.last_event_processed.set(time.time() if now is None else now)

    def observe_latency(self, seconds: float) -> None:
        """Event time to visible in ClickHouse for one event (clamped at 0)."""
        self.event_to_clickhouse_latency.observe(seconds if seconds > 0 else 0.0)

    def observe_latencies(self, event_times: Iterable[float], written_at: float | None = None) -> None:
        """Latencies of a flushed batch: ``event_times`` in unix seconds."""
        now = time.time() if written_at is None else written_at
        observe = self.event_to_clickhouse_latency.observe
        for t in event_times:
            d = now - t
            observe(d if d > 0 else 0.0)

    def _lag_children(self, topic: str, partition: int) -> tuple:
        key = (topic, partition)
        children = self._c_lag.get(key)
        if children is None:
            labels = {"topic": _topic_label(topic), "partition": str(int(partition))}
            children = (
                self.consumer_lag.labels(**labels),
                self.consumer_committed_offset.labels(**labels),
                self.consumer_end_offset.labels(**labels),
            )
            self._c_lag[key] = children
        return children

    def set_consumer_offsets(self, topic: str, partition: int, committed: int | None, end: int) -> None:
        """Offsets of an assigned partition; lag = end - committed (all of
        ``end`` when nothing was committed yet), never negative."""
        lag_g, committed_g, end_g = self._lag_children(topic, partition)
        end_g.set(end)
        if committed is None or committed < 0:
            committed = 0
        committed_g.set(committed)
        lag_g.set(max(end - committed, 0))

    def set_consumer_lag(self, topic: str, partition: int, lag: int) -> None:
        self._lag_children(topic, partition)[0].set(max(lag, 0))

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop the series of a revoked partition (another worker reports it now)."""
        labels = (_topic_label(topic), str(int(partition)))
        self._c_lag.pop((topic, partition), None)
        for g in (self.consumer_lag, self.consumer_committed_offset, self.consumer_end_offset):
            try:
                g.remove(*labels)
            except KeyError:
                pass

    def rebalanced(self, phase: str) -> None:
        self.rebalances.labels(phase=phase if phase in ("revoked", "assigned") else OTHER).inc()

    def state_recovered(self, table: str, records: int) -> None:
        self.state_recovered_records.labels(table=self._reason(table)).inc(records)

    def observe_recovery(self, seconds: float) -> None:
        self.state_recovery_duration.observe(max(seconds, 0.0))

    def counters_recounted(self, partitions: str, cause: str) -> None:
        self.report_recounts.labels(partitions=self._reason(partitions), cause=self._reason(cause)).inc()

    def changelog_written(self, records: int) -> None:
        self.changelog_records_written.inc(records)

    def batch_done(self, seconds: float) -> None:
        self.batches.labels(outcome="committed").inc()
        self.batch_duration.observe(max(seconds, 0.0))

    def batch_failed(self) -> None:
        self.batches.labels(outcome="failed").inc()

    def set_state_table_keys(self, table: str, keys: int) -> None:
        self.state_table_keys.labels(table=self._table(table)).set(keys)

    def set_up(self, up: bool = True) -> None:
        self.worker_up.set(1 if up else 0)

    # ------------------------------------------------------------- HTTP

    def webhook_request(self, provider: str, outcome: str, seconds: float | None = None) -> None:
        p = provider if provider in WEBHOOK_PROVIDERS else OTHER
        o = outcome if outcome in WEBHOOK_OUTCOMES else "error"
        self.webhook_requests.labels(provider=p, outcome=o).inc()
        if seconds is not None:
            self.webhook_request_duration.labels(provider=p).observe(seconds)

    def webhook_event(self, provider: str, type: str, n: int = 1) -> None:
        p = provider if provider in WEBHOOK_PROVIDERS else OTHER
        self.webhook_events.labels(provider=p, type=self._msg_type(type)).inc(n)

    def api_request(self, route: str, status: int, seconds: float | None = None) -> None:
        """``route`` is the route template (``/api/v1/automations/{id}``), never
        the concrete path; unmatched requests should pass ``unmatched``."""
        r = self._route(route)
        self.api_requests.labels(route=r, status_class=_status_class(status)).inc()
        if seconds is not None:
            self.api_request_duration.labels(route=r).observe(seconds)


# --------------------------------------------------------------------------
# Exposition
# --------------------------------------------------------------------------


def render(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """Body and Content-Type for /metrics; ``accept`` (the request's Accept
    header) may select OpenMetrics; the default is text format 0.0.4, which
    every Prometheus version parses."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def mark_process_dead(pid: int, path: str | None = None) -> None:
    """Multiprocess mode: forget the live gauges of an exited child process."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)
