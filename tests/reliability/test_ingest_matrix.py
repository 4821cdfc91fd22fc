"""Trap 8: Spark's readers lose rows quietly. Reproduced first: DROPMALFORMED keeps or drops
a CSV row depending on which columns a query reads, `ignoreCorruptFiles` drops a whole
file, and the binaryFile source skips zero-byte files. Then every input row or file given
to our ingest ends up in the output or in quarantine, with exact counts per reason."""

from __future__ import annotations

import gzip
import io

import pytest
from PIL import Image

from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.errors import DataError
from sparkloom.pipelines.ingest import run_ingest
from tests.conftest import make_config

CSV = (
    b"id,text,label,extra\n"
    b"1,good text one,a,x\n"
    b"2,short row,b\n"  # a field missing: malformed
    b"3,long,row,a,x,y\n"  # fields too many: malformed (read as label 'row' otherwise)
    b"4,four,fields,a,x,y,z\n"  # malformed
    b"5,,b,x\n"  # null text
    b'6,"   ",b,x\n'  # empty text
    b"7,bad \xff\xfe bytes,a,x\n"  # invalid UTF-8
    b"8,no label here,,x\n"  # null label
    b"9,good text two,b,y\n"
)
PADDED_CSV = CSV + b"".join(
    b"g%d,good words %d,%s,x\n" % (i, i, b"ab"[i % 2 : i % 2 + 1]) for i in range(16)
)
GOOD = 16  # good rows of two labels in every case, so every split has both classes


def test_spark_readers_lose_rows_quietly(spark, tmp_path):
    """The traps, reproduced."""
    path = tmp_path / "t.csv"
    path.write_bytes(CSV)
    schema = "id string, text string, label string, extra string"
    reader = spark.read.option("header", True).option("mode", "DROPMALFORMED").schema(schema)
    assert len(reader.csv(str(path)).select("id").collect()) == 9  # id alone: nothing dropped
    assert len(reader.csv(str(path)).collect()) == 6  # every column read: 2, 3 and 4 dropped

    good = gzip.compress(b"a,b\n1,2\n")
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "good.csv.gz").write_bytes(good)
    (tmp_path / "gz" / "bad.csv.gz").write_bytes(b"\x1f\x8b" + b"\x00garbage" * 50)
    lenient = spark.read.option("ignoreCorruptFiles", True).csv(str(tmp_path / "gz"))
    assert lenient.count() == 2  # the corrupt file vanished without a word

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.txt").write_text("x")
    (tmp_path / "bin" / "empty.txt").write_bytes(b"")
    assert spark.read.format("binaryFile").load(str(tmp_path / "bin")).count() == 1


def ingest(spark, tmp_path, **ingest_section):
    cfg = make_config(tmp_path, ingest=ingest_section)
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    return run_ingest(spark, cfg, catalog), catalog


def png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, format="PNG")
    return buf.getvalue()


def write_tree(root, files: dict[str, bytes]):
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


JSONL = (
    b'{"id": "1", "text": "good one", "label": "a"}\n'
    b"this line is not json\n"  # malformed
    b'{"id": "3", "text": null, "label": "a"}\n'  # null text
    b'{"id": "4", "text": "  ", "label": "b"}\n'  # empty text
    b'{"id": "5", "text": "no label"}\n'  # null label
    b'{"id": "6", "text": "bad \xff bytes", "label": "a"}\n'  # invalid UTF-8: not JSON either
    b'{"id": "7", "text": "good two", "label": "b"}\n'
) + b"".join(b'{"id": "g%d", "text": "good %d", "label": "%s"}\n' % (i, i, b"ab"[i % 2 : i % 2 + 1])
             for i in range(GOOD))  # fmt: skip

CASES = {
    "csv": (lambda root: write_tree(root, {"t.csv": PADDED_CSV}) / "t.csv", {"columns": {"id": "id"}},
            9 + GOOD, {"malformed_record": 3, "null_text": 1, "empty_text": 1, "invalid_utf8": 1,
                "null_label": 1}),
    "json": (lambda root: write_tree(root, {"t.jsonl": JSONL}) / "t.jsonl", {"columns": {"id": "id"}},
             7 + GOOD, {"malformed_record": 2, "null_text": 1, "empty_text": 1, "null_label": 1}),
    "text_dirs": (lambda root: write_tree(root, {
        "a/ok.txt": b"fine words", "b/ok.txt": b"more fine words", "a/empty.txt": b"",
        "b/latin1.txt": "caf\xe9".encode("latin-1"), "stray.txt": b"no label folder",
        "a/blank.txt": b" \t\n\r\n", **{f"{'ab'[i % 2]}/g{i}.txt": b"good %d" % i for i in range(GOOD)}}),
        {}, 6 + GOOD, {"empty_text": 2, "invalid_utf8": 1, "null_label": 1}),
    "image_dirs": (lambda root: write_tree(root, {
        "0/a.png": png(10), "0/b.png": png(20), "1/c.png": png(200), "1/empty.png": b"",
        "1/notes.png": b"not an image", "0/cut.png": png(30, 40)[:60], "stray.png": png(40),
        **{f"{i % 2}/g{i}.png": png(50 + i) for i in range(GOOD)}}),
        {"image": {"height": 8, "width": 8}}, 7 + GOOD,
        {"empty_file": 1, "undecodable": 1, "truncated": 1, "null_label": 1}),
}  # fmt: skip


@pytest.mark.parametrize("fmt", list(CASES))
def test_every_row_or_file_is_in_the_output_or_in_quarantine(spark, tmp_path, fmt):
    make, extra, given, reasons = CASES[fmt]
    path = make(tmp_path / "input")
    result, catalog = ingest(spark, tmp_path, format=fmt, path=str(path), **extra)
    quarantined = sum(reasons.values())
    assert (result.rows_in, result.rows_out, result.rows_quarantined) == (
        given, given - quarantined, quarantined)  # fmt: skip
    assert result.reasons == reasons
    assert catalog.read("ingested", "ingest").count() == given - quarantined
    assert catalog.read("quarantine", "ingest").count() == quarantined


def test_a_corrupt_file_fails_ingest_instead_of_vanishing(spark, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.csv").write_bytes(b"text,label\nfine words,a\nmore words,b\n")
    (tmp_path / "in" / "bad.csv.gz").write_bytes(b"\x1f\x8b" + b"\x00garbage" * 50)
    with pytest.raises(DataError, match=r"cannot read .*bad.csv.gz: .*; fix or remove the file"):
        ingest(spark, tmp_path, format="csv", path=str(tmp_path / "in"))
    catalog = Catalog(spark, str(tmp_path / "data"), "t")
    assert catalog.manifest("ingested") is None  # nothing committed
