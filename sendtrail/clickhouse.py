"""ClickHouse access: one ``connect`` for the embedded engine and for servers,
one ``insert`` with the idempotence settings, and the column order of every
sendtrail table.

URLs
----
``chdb://PATH``
    Embedded engine (clickhouse-connect's chDB backend, chdb 4.x / ClickHouse
    26.x). ``PATH`` is a directory, relative paths are resolved against the
    current directory (``chdb://./data/clickhouse``, ``chdb://data/ch`` and
    ``chdb:///abs/dir`` all work) and the directory is created.
``http(s)://[user:pass@]host:port[/db][?query]``
    A ClickHouse server over HTTP. The path, if any, names the database.

The database is, first match wins: the ``database`` argument, the URL path,
``sendtrail``. ``connect`` creates it when it is missing (``migrate`` does so
too), so a fresh install can connect before it migrates.

chDB constraints (measured with chdb 4.4 / clickhouse-connect 1.12; see
``deploy/clickhouse/README.md``)
-----------------------------------------------------------------------
* **One process per path.** The engine locks ``PATH/status``; a second process
  that opens the same path fails with ``Cannot lock file .../status. Another
  server instance in same directory is already running``. So with ``chdb://``
  only one sendtrail process (the worker) can use the data: ``sendtrail
  migrate``/``export`` run inside it or while it is stopped, and several worker
  processes need a ClickHouse server (``http://``).
* **One path per process.** A process hosts one engine; connecting to another
  path while any client of the first is open raises (``EmbeddedServer already
  initialized with path ...``). Once every client of a path is closed the
  engine shuts down and another path can be opened (tests rely on this: close
  your clients).
* **Many clients per path are fine.** Each clickhouse-connect chDB client owns
  its own chdb connection handle (its own ``USE``/``SET`` session state and a
  lock that serializes calls on that handle); handles of one engine run
  queries in parallel from different threads. Opening the engine costs about
  1.5 s, each further client about 15 ms. Therefore ``connect`` does *not*
  cache: it returns a new client per call, so the sink's insert thread and the
  API do not serialize on one handle lock. Close clients you no longer need.
* One client must not be used while a streaming query on it is still open
  (the backend raises ``ProgrammingError``); use a second client to query
  while streaming an export.
* Inserts through the chDB backend go through a temporary Native file and
  ``INSERT ... FROM INFILE ... SETTINGS ...``: the per-insert settings below
  are applied to that statement.

Idempotent inserts
------------------
Every insert sets ``async_insert=0`` (the insert is in the table when the call
returns, so Kafka offsets may be committed after it), ``insert_deduplicate=1``
and the caller's ``insert_deduplication_token``. Non-replicated MergeTree
tables deduplicate inserts only when the table has
``non_replicated_deduplication_window`` > 0, which every sendtrail table sets;
a retried insert with the same token is then dropped by ClickHouse. The token
must identify the rows' content: two inserts with the same token and
different rows lose the second one. Replays that batch rows differently are
absorbed by the ReplacingMergeTree engines (see the README).

All statements with values from outside take server-side parameters
(``{name:Type}``); identifiers (database names) are validated and quoted.
"""
from __future__ import annotations

import logging
import operator
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit, unquote

logger = logging.getLogger(__name__)

DEFAULT_DATABASE = "sendtrail"

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")

#: Column order of every table, exactly as the migrations create them. Rows
#: given to :func:`insert` / ``agents.sink.BatchWriter`` as tuples follow this
#: order; dict rows are mapped onto it. The integration test checks it against
#: ``system.columns`` after migrating.
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "automations": (
        "automation_id", "name", "description", "participation", "start_at", "end_at",
        "published_by", "version", "steps", "status", "updated_at", "_version",
    ),
    "contacts": (
        "contact_id", "user_id", "name", "email", "company", "attributes", "updated_at", "_version",
    ),
    "recipients": (
        "recipient_id", "automation_id", "run", "contact_id", "user_id", "user_name", "email",
        "step_index", "step_details", "message_id", "channel", "mailing_id", "sent_time",
        "metadata", "_partition", "_offset", "_version",
    ),
    "enrollments": (
        "automation_id", "contact_id", "run", "status", "reason", "current_step", "name", "email",
        "user_id", "enrolled_at", "status_at", "resume_at", "updated_at", "ignored_enrollments",
        "_version",
    ),
    "node_states": (
        "automation_id", "contact_id", "run", "step_index", "state", "at", "_version",
    ),
    "messages": (
        "message_id", "mailing_id", "automation_id", "run", "contact_id", "step_index", "subject",
        "sending_user", "sending_email", "email", "name", "channel", "status", "status_at",
        "sent_at", "delivered_at", "deferred_at", "opened_at", "clicked_at", "bounced_at",
        "dropped_at", "spam_reported_at", "unsubscribed_at", "resubscribed_at", "replied_at",
        "auto_replied_at", "bounce_class", "return_at", "opens", "clicks", "updated_at", "_version",
    ),
    "message_events": (
        "event_id", "message_id", "type", "occurred_at", "email", "provider", "automation_id",
        "contact_id", "step_index", "bounce_class", "reason", "url", "_partition", "_offset",
    ),
    "status_changes": (
        "change_id", "kind", "automation_id", "contact_id", "run", "step_index", "message_id",
        "from_status", "to_status", "reason", "event_id", "event_type", "occurred_at",
    ),
    # steps that may have been sent twice (migration 011; rows from the engine's Result.repeats)
    "repeat_sends": ("automation_id", "contact_id", "run", "step_index", "message_ids", "verify"),
    # waits of nodes, opened and closed (migration 012; rows from the engine's Result.waits)
    "node_waits": ("automation_id", "since", "contact_id", "run", "step_index", "closed", "_version"),
    "static_lists": (
        "list_id", "name", "automation_id", "step_index", "state", "status", "count", "created_at",
    ),
    "static_list_members": (
        "list_id", "contact_id", "name", "email",
    ),
    # report counters (migration 009; rows built by streams.counters, written by the worker)
    "mailing_counters": (
        "mailing_id", "channel", "automation_id", "step_index", "partition", "total_sent", "delivered",
        "opened", "clicked", "bounced", "dropped", "deferred", "spam_reports", "unsubscribed", "_version",
    ),
    "node_counters": (
        "automation_id", "step_index", "partition", "done", "waiting", "filtered", "stopped", "_version",
    ),
    "status_counters": (
        "automation_id", "status", "partition", "runs", "contacts", "ignored_enrollments", "completed",
        "in_progress", "not_started", "left_runs", "_version",
    ),
    "counter_coverage": ("counters", "partition", "partitions", "_version"),
}

#: Settings sent with every insert (the dedup token is added per insert).
INSERT_SETTINGS: Mapping[str, Any] = {"async_insert": 0, "insert_deduplicate": 1}


class ClickHouseURLError(ValueError):
    """The ClickHouse URL or database name is malformed."""


def check_identifier(name: str) -> str:
    """Return ``name`` if it is a plain identifier (letters, digits, ``_``), else raise."""
    if not isinstance(name, str) or not _IDENT_RE.match(name):
        raise ClickHouseURLError(f"invalid ClickHouse identifier {name!r}: letters, digits and '_' only")
    return name


def chdb_path(url: str) -> Path:
    """The absolute directory of a ``chdb://PATH`` URL (``chdb:///abs``, ``chdb://rel``, ``chdb://./rel``)."""
    if not url.startswith("chdb://"):
        raise ClickHouseURLError(f"not a chdb:// URL: {url!r}")
    raw = unquote(url[len("chdb://"):].split("?", 1)[0])
    if raw in ("", "memory", ":memory:"):
        raise ClickHouseURLError(f"{url!r}: sendtrail needs an on-disk chdb path, e.g. chdb://./data/clickhouse")
    # realpath: chdb compares engine paths literally, so every spelling of one
    # directory must become the same string.
    return Path(os.path.realpath(os.path.abspath(raw)))


def connect(url: str, *, database: str | None = None, settings: Mapping[str, Any] | None = None):
    """A clickhouse-connect client for ``url`` whose default database is ``database``.

    ``chdb://PATH`` gives an embedded-engine client (a new client per call; see
    the module doc for the one-process-per-path rule), ``http(s)://...`` a
    server client. The database (argument, else URL path, else ``sendtrail``)
    is created if missing.
    """
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import ProgrammingError

    if url.startswith("chdb://"):
        path = chdb_path(url)
        db = check_identifier(database or DEFAULT_DATABASE)
        path.mkdir(parents=True, exist_ok=True)
        try:
            client = clickhouse_connect.get_client(
                interface="chdb", path=str(path), settings=dict(settings or {})
            )
        except ProgrammingError as exc:
            raise ProgrammingError(
                f"cannot open the embedded ClickHouse at {path}: {exc}. chDB allows one data path "
                "per process (close all clients of another path first) and one process per path "
                "(is a sendtrail worker already running on it? use a ClickHouse server for several "
                "processes)."
            ) from exc
    elif url.startswith("http://") or url.startswith("https://"):
        parts = urlsplit(url)
        url_db = unquote(parts.path.strip("/")) or None
        db = check_identifier(database or url_db or DEFAULT_DATABASE)
        dsn = urlunsplit((parts.scheme, parts.netloc, "", parts.query, ""))
        client = clickhouse_connect.get_client(dsn=dsn, settings=dict(settings or {}))
    else:
        raise ClickHouseURLError(
            f"unsupported ClickHouse URL {url!r}: expected chdb://PATH or http(s)://[user:pass@]host:port[/db]"
        )
    try:
        ensure_database(client, db)
        client.database = db
    except Exception:
        client.close()
        raise
    return client


def ensure_database(client, database: str) -> None:
    """Create ``database`` unless it exists (checked first, for users without CREATE rights)."""
    check_identifier(database)
    exists = client.query(
        "SELECT count() FROM system.databases WHERE name = {db:String}", parameters={"db": database}
    ).result_rows[0][0]
    if not exists:
        client.command(f"CREATE DATABASE IF NOT EXISTS `{database}`", use_database=False)


def insert_settings(dedup_token: str) -> dict[str, Any]:
    """The settings of one idempotent insert."""
    if not dedup_token:
        raise ValueError("an insert needs a non-empty insert_deduplication_token")
    return {**INSERT_SETTINGS, "insert_deduplication_token": dedup_token}


def insert(
    client,
    table: str,
    rows: Sequence[Sequence[Any]] | Sequence[Mapping[str, Any]],
    column_names: Sequence[str] | None = None,
    dedup_token: str = "",
    *,
    database: str | None = None,
    column_type_names: Sequence[str] | None = None,
    column_oriented: bool = False,
):
    """Insert ``rows`` into ``table`` synchronously with the idempotence settings.

    ``rows`` are tuples/lists in ``column_names`` order (default
    ``TABLE_COLUMNS[table]``), dicts (mapped onto ``column_names``; a missing
    key is NULL, an unknown key is an error), or columns when
    ``column_oriented``. ``dedup_token`` becomes ``insert_deduplication_token``:
    pass the same token when retrying the same rows. Returns the
    clickhouse-connect ``QuerySummary``. Blocking: call it off the event loop.
    """
    check_identifier(table)
    names = tuple(column_names) if column_names is not None else TABLE_COLUMNS[table]
    data: Any = rows
    if not column_oriented and rows and isinstance(rows[0], Mapping):
        data = rows_from_dicts(names, rows)  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    if column_type_names is not None:
        kwargs["column_type_names"] = list(column_type_names)
    return client.insert(
        table,
        data,
        column_names=list(names),
        database=database,
        column_oriented=column_oriented,
        settings=insert_settings(dedup_token),
        **kwargs,
    )


def rows_from_dicts(names: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[tuple]:
    """Dict rows as tuples in ``names`` order. Missing keys are ``None``; unknown keys raise ``ValueError``."""
    known = frozenset(names)
    names = tuple(names)
    width = len(names)
    whole = operator.itemgetter(*names) if width > 1 else None
    out = []
    append = out.append
    for row in rows:
        if whole is not None and len(row) == width:
            try:
                append(whole(row))  # every column present, so no unknown key either
                continue
            except KeyError:
                pass
        if not row.keys() <= known:
            extra = set(row) - known
            raise ValueError(f"unknown column(s) {sorted(extra)}; expected some of {list(names)}")
        append(tuple(map(row.get, names)))
    return out


def column_type_names(client, table: str, database: str | None = None,
                      column_names: Sequence[str] | None = None) -> list[str]:
    """ClickHouse type names of ``column_names`` (default ``TABLE_COLUMNS[table]``), from ``system.columns``."""
    names = tuple(column_names) if column_names is not None else TABLE_COLUMNS[table]
    db = database or client.database or DEFAULT_DATABASE
    result = client.query(
        "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {t:String}",
        parameters={"db": db, "t": table},
    )
    types = dict(result.result_rows)
    missing = [n for n in names if n not in types]
    if missing:
        raise LookupError(f"{db}.{table} has no column(s) {missing}; run `sendtrail migrate`")
    return [types[n] for n in names]
