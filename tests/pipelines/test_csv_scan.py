import csv
import gzip
import io
import tracemalloc
from pathlib import Path

import pytest

from sparkloom.pipelines.csv_scan import scan_files, scan_path, scan_records
from sparkloom.pipelines.errors import ConfigError, DataError


def python_csv(lineterminator: str = "\r\n") -> bytes:
    """What pandas, Excel and Python write: doubled quotes, commas and newlines in fields."""
    out = io.StringIO()
    w = csv.writer(out, quoting=csv.QUOTE_MINIMAL, lineterminator=lineterminator)
    w.writerow(["id", "text", "label"])
    for i in range(30):
        kinds = [f"plain {i}", f'she said "hi" {i}', f"one, two {i}", f"first line\nsecond {i}"]
        text = kinds[i % 4]
        w.writerow([i, text, "abc"[i % 3]])
    return out.getvalue().encode()


def scanned(data: bytes, **options):
    r = scan_records(io.BytesIO(data), **options)
    return r.records, r.start_lines.tolist(), r.end_lines.tolist(), r.unclosed_quote_line


# name, file name, contents, reader options, header, the data rows Spark and the scan agree on
CASES = [
    ("python_csv_crlf", "a.csv", python_csv(), {}, True, 30),
    ("python_csv_lf", "a.csv", python_csv("\n"), {}, True, 30),
    ("bom", "a.csv", b'\xef\xbb\xbf"id",text\n1,"two\nlines"\n2,b\n', {}, True, 2),
    ("crlf", "a.csv", b"id,text\r\n1,a\r\n2,b\r\n3,c\r\n", {}, True, 3),
    ("bare_cr", "a.csv", b'id,text\r1,"a\rb"\r2,c\r', {}, True, 2),
    ("trailing_blank_line", "a.csv", b"id,text\n1,a\n2,b\n\n", {}, True, 2),
    ("blank_lines_in_middle", "a.csv", b"id,text\n1,a\n\n\n2,b\n\n3,c\n", {}, True, 3),
    ("whitespace_line_is_a_row", "a.csv", b"id,text\n1,a\n   \n2,b\n", {}, True, 3),
    ("quote_inside_unquoted_field", "a.csv", b'id,text\n1,b"c\n2,"d\ne"\n3,f"\n', {}, True, 3),
    ("no_trailing_newline", "a.csv", b'id,text\n1,a\n2,"b\nc"', {}, True, 2),
    (
        "backslash_escape",
        "a.csv",
        b'id,text\n1,"say \\"hi\\"\nthen go"\n2,"C:\\\\dir\\\\"\n3,"a""b"\n',
        {"escape": "\\"},
        True,
        3,
    ),
    ("tsv", "a.tsv", b'id\ttext\n1\t"a\tb\nc"\n2\td\n', {"sep": "\t"}, True, 2),
    (
        "latin1",
        "a.csv",
        'id,text\n1,"café\nnaïve"\n2,"ÿ, ü"\n'.encode("latin-1"),
        {"encoding": "ISO-8859-1"},  # Spark knows only 7 charsets by name
        True,
        2,
    ),
    (
        "utf16",
        "a.csv",
        'id,text\n1,"é\nb"\n2,c\n'.encode("utf-16"),
        {"encoding": "utf-16"},
        True,
        2,
    ),
    ("gzip", "a.csv.gz", gzip.compress(python_csv()), {}, True, 30),
    ("no_header", "a.csv", b'1,"a\n\nb"\n2,c\n', {}, False, 2),
]


@pytest.mark.parametrize(
    "name, filename, data, options, header, rows", CASES, ids=[c[0] for c in CASES]
)
def test_scan_counts_the_records_spark_reads(
    spark, tmp_path, name, filename, data, options, header, rows
):
    path = tmp_path / filename
    path.write_bytes(data)
    opts = {"quote": '"', "escape": '"', "sep": ",", "encoding": "utf-8", **options}
    scan = scan_path(str(path), **opts)
    df = spark.read.csv(str(path), header=header, multiLine=True, **opts)
    assert (scan.rows(header), df.count()) == (rows, rows)
    assert scan.unclosed_quote_line is None


def test_the_count_does_not_depend_on_the_chunk_size():
    data = python_csv()
    whole = scanned(data)
    assert whole[0] == 31
    for chunk in (1, 2, 3, 7, 64):
        assert scanned(data, chunk_size=chunk) == whole
    u16 = scan_records(io.BytesIO(data.decode().encode("utf-16")), encoding="utf-16", chunk_size=5)
    assert (u16.records, u16.start_lines.tolist(), u16.end_lines.tolist()) == whole[:3]


def test_a_quoted_record_over_three_lines_has_its_line_range():
    data = b'id,text,label\n1,"first\nsecond\nthird",a\n2,"x",b\r\n3,y,c\n'
    assert scanned(data) == (4, [1, 2, 5, 6], [1, 4, 5, 6], None)


def test_an_unclosed_quote_is_reported_at_the_line_it_opened():
    lines = [b"id,text,label"] + [b"%d,text %d,a" % (i, i) for i in range(1, 301)]
    lines[101] = b'101,"text 101 never closed,a'
    r = scan_records(io.BytesIO(b"\n".join(lines) + b"\n"))
    # Spark, like this scan, makes record 101 swallow the other 199 lines
    assert (r.records, r.unclosed_quote_line) == (102, 102)
    assert (r.start_lines[-1], r.end_lines[-1]) == (102, 301)


def test_an_unclosed_quote_in_backslash_mode():
    data = b'id,text\n1,"a\\"\n2,b\n'  # \" is a literal quote there, so the field stays open
    assert scanned(data, escape="\\") == (2, [1, 2], [1, 3], 2)
    assert scanned(data) == (3, [1, 2, 3], [1, 2, 3], None)


def test_mixed_line_endings_are_counted_as_lines_and_flagged(spark, tmp_path):
    # Spark takes \r\n as this file's only line ending and reads "2,b\n3" as one field
    path = tmp_path / "mixed.csv"
    path.write_bytes(b"id,text\r\n1,a\r\n2,b\n3,c\r\n")
    r = scan_path(str(path))
    assert (r.rows(True), r.newlines, r.mixed_newlines) == (3, {"crlf": 3, "lf": 1, "cr": 0}, True)
    assert spark.read.csv(str(path), header=True, multiLine=True).count() == 2


def test_a_million_records_scan_in_constant_memory(tmp_path):
    block = b"1,some plain text,a\n" * 999 + b'2,"quoted, over\ntwo lines",b\n'
    path = tmp_path / "big.csv"
    with path.open("wb") as f:
        for _ in range(1000):
            f.write(block)
    tracemalloc.start()
    try:
        with path.open("rb") as f:
            r = scan_records(f, chunk_size=64 << 10, keep_lines=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (r.records, r.newlines["lf"]) == (1_000_000, 1_000_000)  # not the ones in quotes
    assert peak < 2 << 20, f"peak {peak} bytes for a {path.stat().st_size}-byte file"


def test_bad_options_fail_naming_the_setting():
    with pytest.raises(ConfigError, match="ingest.csv.sep"):
        scan_records(io.BytesIO(b"a::b\n"), sep="::")
    with pytest.raises(ConfigError, match="ingest.encoding"):
        scan_records(io.BytesIO(b"a,b\n"), encoding="no-such-codec")


def test_scan_files_scans_each_file_on_the_executors(spark, tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "part-1.csv").write_bytes(b'id,text\n1,"a\nb"\n2,c\n')
    (folder / "part-2.csv.gz").write_bytes(gzip.compress(b'id,text\n3,"open\n4,d\n'))
    one, two = str(folder / "part-1.csv"), f"file://{folder / 'part-2.csv.gz'}"
    got = scan_files(spark, [one, two])
    assert sorted(got) == sorted([one, two])
    a, b = got[one], got[two]
    assert (a.records, a.start_lines.tolist(), a.end_lines.tolist()) == (3, [1, 2, 4], [1, 3, 4])
    assert (b.records, b.unclosed_quote_line, b.end_lines.tolist()) == (2, 2, [1, 3])
    missing = str(folder / "gone.csv")
    with pytest.raises(DataError, match="gone.csv"):
        scan_files(spark, [one, missing])
