"""One validated settings object, read from ``SENDTRAIL_*`` environment variables.

Nothing here reads the environment at import: call :func:`Settings.from_env`
(or build a :class:`Settings` directly in tests) and pass it down. Unknown
``SENDTRAIL_*`` variables are an error, because a misspelled setting that is
silently ignored is worse than a worker that refuses to start.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

PREFIX = "SENDTRAIL_"


class SettingsError(ValueError):
    """A setting is missing, misspelled or malformed; the message says which and why."""


_TOPIC_PREFIX_RE = re.compile(r"^[A-Za-z0-9._-]{0,100}$")
_HOSTPORT_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


def _int(name: str, raw: str, lo: int, hi: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{PREFIX}{name}={raw!r}: expected an integer") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{PREFIX}{name}={value}: expected a value from {lo} to {hi}")
    return value


def _float(name: str, raw: str, lo: float, hi: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{PREFIX}{name}={raw!r}: expected a number") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{PREFIX}{name}={value}: expected a value from {lo} to {hi}")
    return value


def _bool(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{PREFIX}{name}={raw!r}: expected true or false")


@dataclass(frozen=True)
class Settings:
    """Every knob of a sendtrail process. Field name ``x`` is read from ``SENDTRAIL_X``."""

    kafka: str = "localhost:9092"
    clickhouse_url: str = "chdb://./data/clickhouse"
    topic_prefix: str = "sendtrail."
    partitions: int = 4
    replication_factor: int = 1
    data_dir: Path = Path("./data")
    web_host: str = "0.0.0.0"
    web_port: int = 6066
    api_token: str | None = None
    sendgrid_public_key: str | None = None
    mailgun_signing_key: str | None = None
    postmark_auth: str | None = None
    ses_cert_file: Path | None = None
    webhook_max_age_seconds: int = 600
    max_body_bytes: int = 5 * 1024 * 1024
    max_event_bytes: int = 256 * 1024
    consumer_group: str = "sendtrail"
    # Records per batch at most. A batch takes what arrived while the one before was processed,
    # so the cap binds only under a backlog, where each batch's fixed cost (an insert per
    # ClickHouse table) decides: 5000 instead of 2000 gave 8 % more events/s and a 16 % lower
    # latency p99 at 2,500 events/s (benchmarks/pipeline.py, alternating runs; README).
    batch_size: int = 5000
    batch_seconds: float = 0.5
    sink_max_backlog_rows: int = 200_000
    sink_retry_max_seconds: float = 30.0
    stuck_after_seconds: int = 7 * 24 * 3600
    resume_check_seconds: float = 30.0
    #: How often the worker removes the closed waits of node_waits (sendtrail/maintenance.py).
    waits_cleanup_seconds: float = 300.0
    log_level: str = "info"
    #: Chaos switch for game days and the outage test: while this file exists, every
    #: ClickHouse insert of the sink fails as if the server were down.
    sink_fault_file: Path | None = None
    migrate_on_start: bool = True

    def __post_init__(self) -> None:
        if not _TOPIC_PREFIX_RE.match(self.topic_prefix):
            raise SettingsError(
                f"{PREFIX}TOPIC_PREFIX={self.topic_prefix!r}: only letters, digits, '.', '_' and '-' (at most 100)"
            )
        for server in self.kafka.split(","):
            if not _HOSTPORT_RE.match(server.strip()):
                raise SettingsError(f"{PREFIX}KAFKA={self.kafka!r}: expected host:port[,host:port...]")
        url = self.clickhouse_url
        if not (url.startswith("chdb://") or url.startswith("http://") or url.startswith("https://")):
            raise SettingsError(
                f"{PREFIX}CLICKHOUSE_URL={url!r}: expected chdb://PATH or http(s)://[user:pass@]host:port[/db]"
            )
        if self.postmark_auth is not None and ":" not in self.postmark_auth:
            raise SettingsError(f"{PREFIX}POSTMARK_AUTH: expected user:password")
        if self.log_level not in ("crit", "error", "warn", "info", "debug"):
            raise SettingsError(f"{PREFIX}LOG_LEVEL={self.log_level!r}: expected crit, error, warn, info or debug")

    @property
    def embedded_clickhouse(self) -> bool:
        return self.clickhouse_url.startswith("chdb://")

    def topic(self, name: str) -> str:
        """Full topic name for a contract name such as ``enrollments``."""
        return f"{self.topic_prefix}{name}"

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        known = {PREFIX + name.upper(): name for name in fields}
        unknown = sorted(k for k in env if k.startswith(PREFIX) and k not in known)
        if unknown:
            raise SettingsError(
                "unknown setting(s) " + ", ".join(unknown) + "; known: " + ", ".join(sorted(known))
            )
        values: dict[str, object] = {}
        for var, name in known.items():
            if var not in env:
                continue
            raw = env[var]
            default = fields[name].default
            if name in ("partitions", "replication_factor"):
                values[name] = _int(name.upper(), raw, 1, 10_000)
            elif name == "web_port":
                values[name] = _int(name.upper(), raw, 0, 65535)
            elif name in ("batch_size", "sink_max_backlog_rows", "max_body_bytes", "max_event_bytes",
                          "webhook_max_age_seconds", "stuck_after_seconds"):
                values[name] = _int(name.upper(), raw, 1, 10**12)
            elif name in ("batch_seconds", "sink_retry_max_seconds", "resume_check_seconds",
                          "waits_cleanup_seconds"):
                values[name] = _float(name.upper(), raw, 0.001, 86_400.0)
            elif name == "migrate_on_start":
                values[name] = _bool(name.upper(), raw)
            elif name in ("data_dir", "ses_cert_file", "sink_fault_file"):
                values[name] = Path(raw) if raw else default
            elif name in ("api_token", "sendgrid_public_key", "mailgun_signing_key", "postmark_auth"):
                values[name] = raw or None
            else:
                values[name] = raw
        return cls(**values)
