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

ZIP: :class:`ZipWriter` writes one ZIP64 entry as a stream (data
descriptor, no seeking); :func:`azip_chunks` deflates pieces on several
threads at once and yields the archive's bytes in order, for an aiohttp
``StreamResponse``.
"""
from __future__ import annotations

import asyncio
import collections
import datetime as _dt
import os
import re
import struct
import unicodedata
import zlib
from concurrent.futures import ThreadPoolExecutor
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


class ZipWriter:
    """A one-entry ZIP64 archive written as a stream (no seeking, no buffering of the data).

    The entry is deflated in independent pieces (like ``pigz --independent``):
    each piece is compressed by its own ``zlib`` compressor and ends with a
    sync flush, the last with an empty final block, so the concatenation is a
    valid deflate stream and pieces can be compressed on several threads at
    once (``zlib`` releases the GIL). The CRC and sizes go into a data
    descriptor and the central directory, so nothing needs to be known ahead.
    """

    def __init__(self, entry_name: str, *, compresslevel: int = 1,
                 date_time: tuple[int, int, int, int, int, int] | None = None):
        self.name = entry_name.encode("utf-8")
        self.level = compresslevel
        y, mo, d, h, mi, sec = date_time or _dt.datetime.now(_dt.timezone.utc).timetuple()[:6]
        self._dos_date = ((max(y, 1980) - 1980) << 9) | (mo << 5) | d
        self._dos_time = (h << 11) | (mi << 5) | (sec // 2)
        self.crc = 0
        self.raw_size = 0
        self.compressed_size = 0
        self.offset = 0  # bytes written so far
        self._flags = 0x0808  # data descriptor + UTF-8 name

    def compress_piece(self, data: bytes) -> bytes:
        """``data`` deflated on its own, ending byte-aligned (thread-safe: no shared state)."""
        co = zlib.compressobj(self.level, zlib.DEFLATED, -15)
        return co.compress(data) + co.flush(zlib.Z_SYNC_FLUSH)

    def header(self) -> bytes:
        extra = struct.pack("<HHQQ", 1, 16, 0, 0)
        out = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, self._flags, 8, self._dos_time, self._dos_date,
                          0, 0xFFFFFFFF, 0xFFFFFFFF, len(self.name), len(extra)) + self.name + extra
        self.offset += len(out)
        return out

    def piece(self, data: bytes, compressed: bytes) -> bytes:
        """Account for one piece (``data`` and its :meth:`compress_piece`); returns the bytes to send."""
        self.crc = zlib.crc32(data, self.crc)
        self.raw_size += len(data)
        self.compressed_size += len(compressed)
        self.offset += len(compressed)
        return compressed

    def finish(self) -> bytes:
        final_block = b"\x03\x00"  # an empty final deflate block ends the stream
        self.compressed_size += len(final_block)
        data_end = self.offset + len(final_block)
        descriptor = struct.pack("<IIQQ", 0x08074B50, self.crc, self.compressed_size, self.raw_size)
        cd_offset = data_end + len(descriptor)
        extra = struct.pack("<HHQQQ", 1, 24, self.raw_size, self.compressed_size, 0)
        central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | 45, 45, self._flags, 8,
                              self._dos_time, self._dos_date, self.crc, 0xFFFFFFFF, 0xFFFFFFFF, len(self.name),
                              len(extra), 0, 0, 0, 0o100644 << 16, 0xFFFFFFFF) + self.name + extra
        zip64_end_offset = cd_offset + len(central)
        zip64_end = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, 1, 1, len(central), cd_offset)
        locator = struct.pack("<IIQI", 0x07064B50, 0, zip64_end_offset, 1)
        end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), min(cd_offset, 0xFFFFFFFF), 0)
        out = final_block + descriptor + central + zip64_end + locator + end
        self.offset += len(out)
        return out


def _batches(chunks: Iterable[bytes], flush_bytes: int) -> Iterator[bytes]:
    pending: list[bytes] = []
    size = 0
    for chunk in chunks:
        pending.append(chunk)
        size += len(chunk)
        if size >= flush_bytes:
            yield b"".join(pending)
            pending.clear()
            size = 0
    if pending:
        yield b"".join(pending)


def zip_chunks(entry_name: str, chunks: Iterable[bytes], *, flush_bytes: int = 1 << 20,
               date_time: tuple[int, int, int, int, int, int] | None = None,
               compresslevel: int = 1) -> Iterator[bytes]:
    """A ZIP (one entry holding the concatenated ``chunks``) as an iterator of byte strings.

    Holds about ``flush_bytes`` of input at a time.
    """
    z = ZipWriter(entry_name, date_time=date_time, compresslevel=compresslevel)
    yield z.header()
    for data in _batches(chunks, flush_bytes):
        out = z.piece(data, z.compress_piece(data))
        if out:
            yield out
    yield z.finish()


_COMPRESSORS: ThreadPoolExecutor | None = None


def _compressors() -> ThreadPoolExecutor:
    global _COMPRESSORS
    if _COMPRESSORS is None:
        _COMPRESSORS = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)),
                                          thread_name_prefix="zip-deflate")
    return _COMPRESSORS


async def azip_chunks(entry_name: str, chunks: AsyncIterator[bytes], *, flush_bytes: int = 1 << 20,
                      date_time: tuple[int, int, int, int, int, int] | None = None,
                      compresslevel: int = 1, parallel: int = 3) -> AsyncIterator[bytes]:
    """:func:`zip_chunks` for an async source, deflating up to ``parallel`` pieces at once on threads.

    Memory: about ``(parallel + 1) * flush_bytes`` of input in flight.
    """
    loop = asyncio.get_running_loop()
    z = ZipWriter(entry_name, date_time=date_time, compresslevel=compresslevel)
    yield z.header()
    in_flight: collections.deque = collections.deque()
    pending: list[bytes] = []
    size = 0

    def submit(data: bytes) -> None:
        in_flight.append((data, loop.run_in_executor(_compressors(), z.compress_piece, data)))

    async def drain(keep: int) -> AsyncIterator[bytes]:
        while len(in_flight) > keep:
            data, fut = in_flight.popleft()
            out = z.piece(data, await fut)
            if out:
                yield out

    try:
        async for chunk in chunks:
            pending.append(chunk)
            size += len(chunk)
            if size >= flush_bytes:
                submit(b"".join(pending))
                pending.clear()
                size = 0
                async for out in drain(parallel - 1):
                    yield out
        if pending:
            submit(b"".join(pending))
        async for out in drain(0):
            yield out
    finally:
        for _, fut in in_flight:
            fut.cancel()
    yield z.finish()
