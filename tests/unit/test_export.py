"""CSV quoting, formula neutralization, filename safety and the streaming ZIP writer."""
from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import tracemalloc
import zipfile

import pytest
from hypothesis import given, settings, strategies as st

from sendtrail.api.export import (CsvQuery, azip_chunks, content_disposition, csv_field, csv_lines, csv_row,
                                  neutralize, recipients_zip_name, safe_filename_part, sql_csv_columns,
                                  sql_safe_text, zip_chunks)


@pytest.mark.parametrize("value,expected", [
    ("plain", "plain"),
    ("a,b", '"a,b"'),
    ('say "hi"', '"say ""hi"""'),
    ("two\nlines", '"two\nlines"'),
    ("cr\rlf", '"cr\rlf"'),
    (" padded ", '" padded "'),
    ("", ""),
    (None, ""),
    (42, "42"),
    (True, "true"),
    (dt.datetime(2024, 5, 1, 10, 0, 0, 123456), "2024-05-01 10:00:00.123"),
    (dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))), "2024-05-01 10:00:00.000"),
    ({"day": 3}, '"{""day"":3}"'),
])
def test_csv_field_quoting(value, expected):
    assert csv_field(value) == expected


@pytest.mark.parametrize("text", ["=1+2", "+31 6 1234", "-2", "@SUM(A1)", "\tx", "\r=1",
                                  "=HYPERLINK(\"http://evil\",\"x\")", "=cmd|' /C calc'!A0"])
def test_formula_cells_get_an_apostrophe(text):
    assert neutralize(text) == "'" + text
    field = csv_field(text)
    parsed = next(csv.reader(io.StringIO(field + "\r\n")))
    assert parsed == ["'" + text]


def test_numbers_are_not_neutralized():
    assert csv_field(-5) == "-5"
    assert neutralize("a=b") == "a=b" and neutralize("") == ""


def test_csv_row_crlf_and_roundtrip():
    row = ["id", "Zoë Ångström", 'Smith, "Bob"', "x\ny", None, 3]
    line = csv_row(row)
    assert line.endswith("\r\n")
    assert next(csv.reader(io.StringIO(line))) == ["id", "Zoë Ångström", 'Smith, "Bob"', "x\ny", "", "3"]
    assert line.encode("utf-8").decode("utf-8") == line


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(), st.integers(), st.none()), min_size=1, max_size=6))
def test_csv_roundtrip_property(values):
    values = [v.replace("\r", "") if isinstance(v, str) else v for v in values]  # csv module folds lone CRs
    parsed = next(csv.reader(io.StringIO(csv_row(values), newline="")))
    expected = []
    for v in values:
        if v is None:
            expected.append("")
        elif isinstance(v, int):
            expected.append(str(v))
        else:
            expected.append(neutralize(v))
    assert parsed == expected


def test_csv_lines_is_lazy():
    def rows():
        yield ["a"]
        raise AssertionError("pulled too far")

    gen = csv_lines(["h"], rows())
    assert next(gen) == "h\r\n" and next(gen) == "a\r\n"


def test_sql_helpers_are_constant_text():
    expr = sql_safe_text("name")
    assert expr.startswith("if(substring(name, 1, 1) IN (") and "concat('''', name)" in expr
    cols = sql_csv_columns([("name", "text"), ("run", "raw")])
    assert cols[1] == "run"
    q = CsvQuery([("name", "text")], "FROM t WHERE x = {x:String}", {"x": "v"}, "join_use_nulls = 1")
    assert q.raw_sql().startswith("SELECT if(") and q.raw_sql().endswith("join_use_nulls = 1")
    assert "formatRow('CSV', " in q.row_sql() and "output_format_csv_crlf_end_of_line = 1" in q.row_sql()


@pytest.mark.parametrize("name,expected", [
    ("Welcome Series / Q1", "Welcome_Series_Q1"),
    ("../../etc/passwd", "etc_passwd"),
    ("a\\b:c*d?e\"f<g>h|i", "a_b_c_d_e_f_g_h_i"),
    ("bell\x07tab\tnl\nnull\x00end", "belltab_nl_nullend"),
    ("rtl\u202eoverride", "rtloverride"),
    ("Zoë Ångström — 日本語", "Zoë_Ångström_—_日本語"),
    ("   ", "automation"),
    ("...", "automation"),
    ("", "automation"),
])
def test_safe_filename_part(name, expected):
    assert safe_filename_part(name) == expected


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_safe_filename_part_property(name):
    out = safe_filename_part(name)
    assert out and len(out) <= 100
    assert "/" not in out and "\\" not in out and ".." not in out.split("_")
    assert not any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in out)
    assert not out.startswith(".")


def test_recipients_zip_name():
    now = dt.datetime(2024, 5, 1, 12, 3, 4, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert recipients_zip_name("Spring / Promo", now) == "automation_recipients_Spring_Promo_20240501_100304.zip"
    assert recipients_zip_name("x", dt.datetime(2024, 1, 2, 3, 4, 5)) == "automation_recipients_x_20240102_030405.zip"


def test_content_disposition_has_ascii_fallback_and_utf8():
    value = content_disposition("automation_recipients_Zoë_20240101_000000.zip")
    assert value.startswith('attachment; filename="automation_recipients_Zo_')
    assert "filename*=UTF-8''automation_recipients_Zo%C3%AB_20240101_000000.zip" in value


def _rows(n):
    for i in range(n):
        yield f"{i},name {i},=evil{i}\r\n".encode()


def test_zip_stream_is_valid_and_lazy():
    produced = []

    def source():
        for i, chunk in enumerate(_rows(50_000)):
            produced.append(i)
            yield chunk

    it = zip_chunks("data.csv", source(), flush_bytes=64 * 1024, date_time=(2024, 1, 2, 3, 4, 6))
    first = next(it)
    assert first.startswith(b"PK\x03\x04") and len(produced) == 0  # the header before any row
    body = first + b"".join(it)
    zf = zipfile.ZipFile(io.BytesIO(body))
    assert zf.testzip() is None and zf.namelist() == ["data.csv"]
    info = zf.getinfo("data.csv")
    assert info.date_time == (2024, 1, 2, 3, 4, 6) and info.compress_type == zipfile.ZIP_DEFLATED
    text = zf.read("data.csv").decode()
    assert text.count("\r\n") == 50_000 and text.startswith("0,name 0,")


def test_zip_stream_memory_stays_flat():
    """~20 MB of CSV through the writer while holding only the current chunk."""
    tracemalloc.start()
    total = 0
    size = 0
    for chunk in zip_chunks("big.csv", _rows(700_000), flush_bytes=256 * 1024):
        size += len(chunk)
        total += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert size > 1000 and total > 3
    assert peak < 8 * 1024 * 1024, peak


def test_async_zip_stream():
    async def source():
        for chunk in _rows(1000):
            yield chunk

    async def run():
        return [c async for c in azip_chunks("a.csv", source(), flush_bytes=1024)]

    chunks = asyncio.run(run())
    zf = zipfile.ZipFile(io.BytesIO(b"".join(chunks)))
    assert zf.read("a.csv").count(b"\r\n") == 1000


def test_empty_zip_entry():
    zf = zipfile.ZipFile(io.BytesIO(b"".join(zip_chunks("e.csv", iter([])))))
    assert zf.read("e.csv") == b""
