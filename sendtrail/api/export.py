"""CSV and ZIP output that streams: memory stays flat however many rows.

CSV (RFC 4180, UTF-8, CRLF line ends, fields quoted when needed) with
spreadsheet-formula neutralization: a text cell that starts with ``=``, ``+``,
``-``, ``@`` (or a tab / carriage return, which some spreadsheets skip before
reading a formula) gets a leading apostrophe, so opening an export in Excel or
Google Sheets never runs a formula that a contact put into their name.

Two ways to produce rows:

* in Python: :func:`csv_row` (used for header rows and small tables);
* in ClickHouse: :func:`sql_csv_line` builds a ``formatRow('CSV', ...)``
  expression that renders (and neutralizes) each row inside the engine, so an
  export costs Python only a join and the compression. Run such queries with
  :data:`CSV_QUERY_SETTINGS` (CRLF line ends, empty NULLs).

ZIP: :class:`ZipStream` writes one entry incrementally (data descriptors,
ZIP64) to an unseekable sink and hands back the bytes produced so far, for
an aiohttp ``StreamResponse``.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import re
import unicodedata
import zipfile
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterable, Iterator, Sequence

import orjson

#: First characters that make a spreadsheet read a cell as a formula.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")

#: Settings for queries that render rows with :func:`sql_csv_line`.
CSV_QUERY_SETTINGS = "SETTINGS output_format_csv_crlf_end_of_line = 1, format_csv_null_representation = ''"


def neutralize(text: str) -> str:
    """``text`` with a leading apostrophe when a spreadsheet would read it as a formula."""
    if text and text[0] in FORMULA_PREFIXES:
        return "'" + text
    return text


def _to_text(value: Any) -> tuple[str, bool]:
    """(text, is_textual): textual values are neutralized, numbers are not."""
    if value is None:
        return "", False
    if isinstance(value, bool):
        return ("true" if value else "false"), False
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value), False
    if isinstance(value, _dt.datetime):
        return format_time(value), False
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode(), True
    return str(value), True


def format_time(value: _dt.datetime | None) -> str:
    """``YYYY-MM-DD HH:MM:SS.fff`` in UTC (the form ClickHouse writes in CSV)."""
    if value is None:
        return ""
    if value.tzinfo is not None:
        value = value.astimezone(_dt.timezone.utc).replace(tzinfo=None)
    return value.strftime("%Y-%m-%d %H:%M:%S.") + f"{value.microsecond // 1000:03d}"


_NEEDS_QUOTES = re.compile(r'[",\r\n]|^\s|\s$')


def csv_field(value: Any) -> str:
    """One RFC 4180 field: neutralized when textual, quoted when it holds ``"``, ``,``, CR, LF or edge spaces."""
    text, textual = _to_text(value)
    if textual:
        text = neutralize(text)
    if _NEEDS_QUOTES.search(text):
        return '"' + text.replace('"', '""') + '"'
    return text


def csv_row(values: Iterable[Any]) -> str:
    """One CSV record with its CRLF line end (a lone empty field is written ``""``, as it would be lost)."""
    fields = [csv_field(v) for v in values]
    if fields == [""]:
        fields = ['""']
    return ",".join(fields) + "\r\n"


def csv_lines(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Iterator[str]:
    """The header record, then one record per row (a generator: nothing is held)."""
    yield csv_row(header)
    for row in rows:
        yield csv_row(row)


def sql_safe_text(expr: str) -> str:
    """A ClickHouse expression: the string ``expr`` neutralized like :func:`neutralize`.

    ``expr`` is a trusted column expression (never user input).
    """
    return (
        f"if(substring({expr}, 1, 1) IN ('=', '+', '-', '@', '\\t', '\\r'), concat('''', {expr}), {expr})"
    )


def sql_csv_columns(columns: Sequence[tuple[str, str]]) -> list[str]:
    """The select expressions of ``columns``: (expression, kind) with kind ``text`` (neutralized) or ``raw``."""
    parts = []
    for expr, kind in columns:
        if kind == "text":
            parts.append(sql_safe_text(expr))
        elif kind == "raw":
            parts.append(expr)
        else:  # pragma: no cover - programming error
            raise ValueError(f"unknown CSV column kind {kind!r}")
    return parts


def sql_csv_line(columns: Sequence[tuple[str, str]]) -> str:
    """``formatRow('CSV', ...)`` over ``columns`` (see :func:`sql_csv_columns`): one CSV record per row."""
    return "formatRow('CSV', " + ", ".join(sql_csv_columns(columns)) + ")"


@dataclass(frozen=True)
class CsvQuery:
    """A CSV export query: ``columns`` (expression, kind), the ``body`` (FROM ... ORDER BY ...), parameters.

    ``raw_sql()`` selects the neutralized columns, for a ``FORMAT CSV`` byte
    stream (fastest: ClickHouse writes the CSV); ``row_sql()`` selects one
    ``formatRow('CSV', ...)`` string per row, for a row-block stream.
    """

    columns: Sequence[tuple[str, str]]
    body: str
    params: dict
    extra_settings: str = ""

    @property
    def settings(self) -> str:
        return CSV_QUERY_SETTINGS + (", " + self.extra_settings if self.extra_settings else "")

    def raw_sql(self) -> str:
        return f"SELECT {', '.join(sql_csv_columns(self.columns))} {self.body} {self.settings}"

    def row_sql(self) -> str:
        return f"SELECT {sql_csv_line(self.columns)} {self.body} {self.settings}"


_UNSAFE = re.compile(r'[/\\:*?"<>|]')


def safe_filename_part(name: str, *, max_length: int = 100, fallback: str = "automation") -> str:
    """``name`` made safe inside a file name.

    Path separators and characters Windows forbids become ``_``; control and
    format characters (incl. bidi overrides) are dropped; whitespace runs
    become ``_``; unicode letters stay (NFC). Leading dots are removed (no
    hidden files, no ``..``). Empty results give ``fallback``.
    """
    text = unicodedata.normalize("NFC", name or "")
    kept = []
    for ch in text:
        if ch.isspace():
            kept.append(" ")
        elif unicodedata.category(ch)[0] == "C":  # control, format (bidi), surrogate, private, unassigned
            continue
        else:
            kept.append(ch)
    text = _UNSAFE.sub("_", "".join(kept))
    text = re.sub(r"\s+", "_", text)
    text = re.sub(r"_+", "_", text).strip("_.")
    if len(text) > max_length:
        text = text[:max_length].rstrip("_.")
    return text or fallback


def recipients_zip_name(automation_name: str, now: _dt.datetime) -> str:
    """``automation_recipients_<automation_name>_<YYYYMMDD_HHMMSS>.zip`` (UTC)."""
    if now.tzinfo is not None:
        now = now.astimezone(_dt.timezone.utc)
    return f"automation_recipients_{safe_filename_part(automation_name)}_{now:%Y%m%d_%H%M%S}.zip"


def content_disposition(filename: str) -> str:
    """A ``Content-Disposition: attachment`` value with an ASCII fallback and the RFC 5987 UTF-8 name."""
    from urllib.parse import quote

    ascii_name = filename.encode("ascii", "replace").decode("ascii").replace("?", "_").replace('"', "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"


class _Sink:
    """An unseekable file for zipfile that keeps only the bytes not yet taken."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        if data:
            self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class ZipStream:
    """A one-entry ZIP written incrementally.

    ``start()`` returns the first bytes (local header), each ``write(data)``
    returns the compressed bytes ready so far, ``finish()`` the rest (data
    descriptor, central directory). ZIP64 is forced so entries over 4 GiB work.
    """

    def __init__(self, entry_name: str, *, compresslevel: int = 1,
                 date_time: tuple[int, int, int, int, int, int] | None = None):
        self._sink = _Sink()
        self._zip = zipfile.ZipFile(self._sink, mode="w", compression=zipfile.ZIP_DEFLATED,
                                    compresslevel=compresslevel, allowZip64=True)
        info = zipfile.ZipInfo(entry_name, date_time=date_time or _dt.datetime.now(_dt.timezone.utc).timetuple()[:6])
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        self._info = info
        self._entry = None

    def start(self) -> bytes:
        self._entry = self._zip.open(self._info, mode="w", force_zip64=True)
        return self._sink.take()

    def write(self, data: bytes) -> bytes:
        assert self._entry is not None, "call start() first"
        self._entry.write(data)
        return self._sink.take()

    def finish(self) -> bytes:
        if self._entry is not None:
            self._entry.close()
            self._entry = None
        self._zip.close()
        return self._sink.take()


def zip_chunks(entry_name: str, chunks: Iterable[bytes], *, flush_bytes: int = 1 << 20,
               date_time: tuple[int, int, int, int, int, int] | None = None) -> Iterator[bytes]:
    """A ZIP (one entry of the concatenated ``chunks``) as an iterator of byte strings.

    Holds at most about ``flush_bytes`` of input at a time.
    """
    z = ZipStream(entry_name, date_time=date_time)
    head = z.start()
    if head:
        yield head
    pending: list[bytes] = []
    size = 0
    for chunk in chunks:
        pending.append(chunk)
        size += len(chunk)
        if size >= flush_bytes:
            out = z.write(b"".join(pending))
            pending.clear()
            size = 0
            if out:
                yield out
    if pending:
        out = z.write(b"".join(pending))
        if out:
            yield out
    yield z.finish()


async def azip_chunks(entry_name: str, chunks: AsyncIterator[bytes], *, flush_bytes: int = 1 << 20,
                      date_time: tuple[int, int, int, int, int, int] | None = None) -> AsyncIterator[bytes]:
    """:func:`zip_chunks` for an async source."""
    z = ZipStream(entry_name, date_time=date_time)
    head = z.start()
    if head:
        yield head
    pending: list[bytes] = []
    size = 0
    async for chunk in chunks:
        pending.append(chunk)
        size += len(chunk)
        if size >= flush_bytes:
            data = b"".join(pending)
            pending.clear()
            size = 0
            out = await asyncio.to_thread(z.write, data)
            if out:
                yield out
    if pending:
        out = await asyncio.to_thread(z.write, b"".join(pending))
        if out:
            yield out
    yield z.finish()
