"""Apply the ClickHouse migrations in ``schemas/migrations/`` (``NNN_name.sql``).

``migrate(client)`` creates the database and a ``schema_migrations`` table
(name, checksum, applied_at), then applies every file not recorded there, in
name order, and records it. A file that was applied and has changed since
(checksum differs) is refused with :class:`MigrationError`: applied migrations
are immutable, write a new numbered file instead. Running it again applies
nothing.

A file may hold several statements; a statement ends with a line that ends
in ``;``. Every statement is written to be idempotent (``IF NOT EXISTS``), so
a file interrupted half-way is simply re-run on the next start. Statements
run with the client's database switched to the target database, so the SQL
names tables without a database.

A step that SQL cannot make idempotent (rebuilding a table with storage
settings that only apply at creation: it must look before it acts) is a
``NNN_name.py`` file defining ``apply(client)``. It runs like a SQL file (same
database switch, same checksum rule) and must also be safe to run again after
an interruption at any point.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

from sendtrail.clickhouse import DEFAULT_DATABASE, check_identifier, ensure_database

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^\d{3}_[A-Za-z0-9_]+\.(sql|py)$")


class MigrationError(RuntimeError):
    """A migration cannot be applied (changed after it was applied, malformed, or failed)."""


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str  # the file's text (SQL, or the Python of a ``.py`` migration)

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()

    @property
    def is_python(self) -> bool:
        return self.name.endswith(".py")

    @property
    def statements(self) -> list[str]:
        return [] if self.is_python else split_statements(self.sql)

    def apply(self, client) -> None:
        """Run the migration on ``client`` (whose database is the target one)."""
        if self.is_python:
            spec = importlib.util.spec_from_loader(f"sendtrail_migration_{self.name[:3]}", loader=None)
            module = importlib.util.module_from_spec(spec)
            try:
                exec(compile(self.sql, self.name, "exec"), module.__dict__)
                apply = module.apply
            except Exception as exc:
                raise MigrationError(f"migration {self.name} cannot be loaded (it defines apply(client)): "
                                     f"{type(exc).__name__}: {exc}") from exc
            try:
                apply(client)
            except Exception as exc:
                raise MigrationError(f"migration {self.name}: {exc}") from exc
            return
        statements = self.statements
        if not statements:
            raise MigrationError(f"migration {self.name} has no statements")
        for i, stmt in enumerate(statements, 1):
            try:
                client.command(stmt)
            except Exception as exc:
                raise MigrationError(f"migration {self.name}, statement {i}: {exc}") from exc


def split_statements(sql: str) -> list[str]:
    """Split on lines ending with ``;`` (comment lines never end a statement); drop comment-only pieces."""
    statements: list[str] = []
    current: list[str] = []
    for line in sql.splitlines():
        current.append(line)
        stripped = line.strip()
        if stripped.endswith(";") and not stripped.startswith("--"):
            statements.append("\n".join(current))
            current = []
    if current:
        statements.append("\n".join(current))
    out = []
    for stmt in statements:
        code = [ln for ln in stmt.splitlines() if ln.strip() and not ln.strip().startswith("--")]
        if not code:
            continue
        text = stmt.strip()
        if text.endswith(";"):
            text = text[:-1].rstrip()
        out.append(text)
    return out


def migrations_dir() -> Path:
    return Path(str(resources.files("schemas") / "migrations"))


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """Every ``NNN_name.sql`` and ``NNN_name.py`` of the migrations folder, in name order."""
    folder = directory or migrations_dir()
    found = []
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".sql", ".py")):
        if not _NAME_RE.match(path.name):
            raise MigrationError(f"{path.name}: migration files are named NNN_name.sql or NNN_name.py")
        found.append(Migration(path.name, path.read_text(encoding="utf-8")))
    numbers = [m.name[:3] for m in found]
    dup = sorted({n for n in numbers if numbers.count(n) > 1})
    if dup:
        raise MigrationError(f"two migrations share the number(s) {dup}")
    return found


def ddl_snapshot(directory: Path | None = None) -> str:
    """The concatenated migrations, as compared with the committed snapshot."""
    parts = []
    for m in load_migrations(directory):
        parts.append(f"-- >>> {m.name}\n{m.sql.rstrip()}\n")
    return "\n".join(parts)


@contextmanager
def _using_database(client, database: str) -> Iterator[None]:
    previous = client.database
    client.database = database
    try:
        yield
    finally:
        # The chDB client cannot go back to "no database" (USE is handle
        # state), so only restore a previous explicit database.
        if previous:
            client.database = previous


_TABLE_DDL = """
CREATE TABLE IF NOT EXISTS {table}
(
    name        String,
    checksum    String,
    applied_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(applied_at)
ORDER BY name
"""


def applied_migrations(client, database: str = DEFAULT_DATABASE) -> dict[str, str]:
    """name -> checksum of the migrations recorded in ``database``."""
    check_identifier(database)
    rows = client.query(
        f"SELECT name, argMax(checksum, applied_at) FROM `{database}`.schema_migrations GROUP BY name"
    ).result_rows
    return {name: checksum for name, checksum in rows}


def migrate(client, database: str = DEFAULT_DATABASE, *, directory: Path | None = None) -> list[str]:
    """Apply pending migrations to ``database``; return the names applied (empty when up to date)."""
    check_identifier(database)
    migrations = load_migrations(directory)
    ensure_database(client, database)
    client.command(_TABLE_DDL.format(table=f"`{database}`.schema_migrations"), use_database=False)
    applied = applied_migrations(client, database)

    on_disk = {m.name for m in migrations}
    for name, checksum in applied.items():
        if name not in on_disk:
            logger.warning("migration %s is recorded in %s.schema_migrations but not on disk", name, database)
    for m in migrations:
        if m.name in applied and applied[m.name] != m.checksum:
            raise MigrationError(
                f"migration {m.name} was applied with checksum {applied[m.name][:12]}… but the file now has "
                f"{m.checksum[:12]}…: applied migrations must not change; add a new numbered migration instead"
            )

    done: list[str] = []
    with _using_database(client, database):
        for m in migrations:
            if m.name in applied:
                continue
            logger.info("applying migration %s to %s", m.name, database)
            m.apply(client)
            client.command(
                f"INSERT INTO `{database}`.schema_migrations (name, checksum) VALUES ({{name:String}}, {{checksum:String}})",
                parameters={"name": m.name, "checksum": m.checksum},
                use_database=False,
            )
            done.append(m.name)
    return done
