from pathlib import Path

import pytest
from pyspark.sql import functions as F

from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.config import SplitConfig
from sparkloom.pipelines.errors import DataError
from sparkloom.pipelines.ingest import run_ingest, with_ids, with_split
from sparkloom.pipelines.sources import resolve_input_path
from tests.conftest import make_config, make_docs, write_csv, write_jsonl

DOCS = make_docs()  # 90 documents, 3 labels
GOOD = 20  # good rows of two labels, so every split of a tiny input has both classes
GOOD_CSV_ROWS = b"".join(
    b"g%d,good words %d,%s\n" % (i, i, b"ab"[i % 2 : i % 2 + 1]) for i in range(GOOD)
)


def ingest(spark, tmp_path, **ingest_cfg):
    cfg = make_config(tmp_path, ingest=ingest_cfg)
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    return run_ingest(spark, cfg, catalog), catalog


def rows(spark, catalog, name):
    return {r["id"]: r.asDict() for r in spark.read.parquet(catalog.path(name)).collect()}


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "parquet", "text_dirs"])
def test_each_reader_gives_the_same_clean_rows(spark, tmp_path, text_dirs, fmt):
    if fmt == "csv":
        path = write_csv(tmp_path / "in.csv", DOCS)
    elif fmt == "tsv":
        path = write_csv(tmp_path / "in.tsv", DOCS, sep="\t")
    elif fmt == "json":
        path = write_jsonl(tmp_path / "in.jsonl", DOCS)
    elif fmt == "parquet":
        path = tmp_path / "in.parquet"
        spark.createDataFrame(DOCS).write.parquet(str(path))
    else:
        path = text_dirs
    has_ids = fmt != "text_dirs"
    result, catalog = ingest(
        spark, tmp_path, format=fmt, path=str(path), columns={"id": "id" if has_ids else None}
    )
    assert (result.rows_in, result.rows_out, result.rows_quarantined) == (90, 90, 0)
    assert result.labels == ["food", "sport", "tech"]
    got = rows(spark, catalog, "ingested")
    expected_ids = {d["id"] if has_ids else f"{d['label']}/{d['id']}.txt" for d in DOCS}
    assert set(got) == expected_ids
    texts = {(r["label"], r["text"].strip()) for r in got.values()}
    assert texts == {(d["label"], d["text"]) for d in DOCS}
    assert {r["label_index"] for r in got.values()} == {0.0, 1.0, 2.0}
    assert sum(result.splits.values()) == 90


def test_reader_takes_a_file_uri_and_renamed_columns(spark, tmp_path):
    docs = [{"doc": d["id"], "body": d["text"], "topic": d["label"]} for d in DOCS]
    path = write_jsonl(tmp_path / "in.jsonl", docs)
    result, _ = ingest(
        spark, tmp_path, format="json", path=path.as_uri(),
        columns={"id": "doc", "text": "body", "label": "topic"},
    )  # fmt: skip
    assert result.rows_out == 90


def test_generated_ids_are_deterministic_and_keep_duplicates(spark, tmp_path):
    docs = [{"text": "same words here", "label": "a"}] * 3 + [{"text": "other", "label": "b"}]
    write_jsonl(tmp_path / "in.jsonl", docs)
    r1, catalog = ingest(spark, tmp_path, format="json", path=str(tmp_path / "in.jsonl"))
    ids1 = sorted(rows(spark, catalog, "ingested"))
    r2, catalog = ingest(spark, tmp_path / "again", format="json", path=str(tmp_path / "in.jsonl"))
    ids2 = sorted(rows(spark, catalog, "ingested"))
    assert ids1 == ids2 and len(set(ids1)) == 4
    assert sum(i.endswith(("-2", "-3")) for i in ids1) == 2
    # exact duplicates share a split, so no test document has a copy in training
    splits = {r["split"] for r in rows(spark, catalog, "ingested").values() if r["label"] == "a"}
    assert len(splits) == 1


def test_quarantine_bad_csv_with_exact_counts(spark, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(
        b"id,text,label\n"
        b"1,good text one,a\n"
        b"2,a field short\n"  # malformed
        b"3,,b\n"  # null text
        b'4,"   ",b\n'  # empty text
        b"5,bad \xff\xfe bytes,a\n"  # invalid UTF-8
        b"6,no label here,\n"  # null label
        b"7,too,many,fields,a\n"  # malformed
        b'8,"good text two, with a comma\nand a line break",b\n' + GOOD_CSV_ROWS
    )
    result, catalog = ingest(spark, tmp_path, format="csv", path=str(bad), columns={"id": "id"})
    assert (result.rows_in, result.rows_out, result.rows_quarantined) == (8 + GOOD, 2 + GOOD, 6)
    assert result.reasons == {
        "empty_text": 1, "invalid_utf8": 1, "malformed_record": 2, "null_label": 1, "null_text": 1,
    }  # fmt: skip
    q = rows(spark, catalog, "quarantine")
    assert {k: (v["reason"], v["lines"]) for k, v in q.items()} == {
        "2": ("malformed_record", "3"), "3": ("null_text", "4"), "4": ("empty_text", "5"),
        "5": ("invalid_utf8", "6"), "6": ("null_label", "7"), "7": ("malformed_record", "8"),
    }  # fmt: skip
    assert all(v["source"].endswith("bad.csv") for v in q.values())
    got = rows(spark, catalog, "ingested")
    assert {"1", "8"} <= set(got)
    assert got["8"]["text"] == "good text two, with a comma\nand a line break"
    manifest = catalog.manifest("ingested")
    assert manifest["result"]["rows_quarantined"] == 6


def test_quarantine_text_dirs(spark, tmp_path):
    root = tmp_path / "docs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "ok.txt").write_text("fine document")
    (root / "b" / "ok.txt").write_text("another fine one")
    (root / "a" / "empty.txt").write_bytes(b"")
    (root / "b" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "stray.txt").write_text("a file outside any label folder")
    for i in range(GOOD):
        (root / "ab"[i % 2] / f"good{i}.txt").write_text(f"good words {i}")
    result, catalog = ingest(spark, tmp_path, format="text_dirs", path=str(root))
    assert (result.rows_in, result.rows_out) == (5 + GOOD, 2 + GOOD)
    assert result.reasons == {"empty_text": 1, "invalid_utf8": 1, "null_label": 1}
    assert {"a/ok.txt", "b/ok.txt"} <= set(rows(spark, catalog, "ingested"))


def test_malformed_json_line_goes_to_quarantine(spark, tmp_path):
    p = tmp_path / "in.jsonl"
    good = "".join(f'{{"text": "ok {i}", "label": "{"xy"[i % 2]}"}}\n' for i in range(GOOD))
    p.write_text(good + 'not json at all\n{"text": null, "label": "y"}\n')
    result, _ = ingest(spark, tmp_path, format="json", path=str(p))
    assert result.reasons == {"malformed_record": 1, "null_text": 1}
    assert result.rows_out == GOOD


def test_missing_path_and_missing_column_are_clear_errors(spark, tmp_path):
    with pytest.raises(DataError, match=r"input path .*nowhere does not exist; set ingest.path"):
        ingest(spark, tmp_path, format="csv", path=str(tmp_path / "nowhere"))
    path = write_csv(tmp_path / "in.csv", DOCS)
    with pytest.raises(
        DataError, match=r"column 'body' \(ingest.columns.text\) is not in the CSV header"
    ):
        ingest(spark, tmp_path, format="csv", path=str(path), columns={"text": "body"})
    spark.createDataFrame([(1, "a")], "text int, label string").write.parquet(str(tmp_path / "p"))
    with pytest.raises(DataError, match="holds int, not text"):
        ingest(spark, tmp_path, format="parquet", path=str(tmp_path / "p"))


def test_all_rows_bad_is_an_error_not_an_empty_dataset(spark, tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text('{"text": "", "label": "x"}\n{"text": "t", "label": null}\n')
    with pytest.raises(DataError, match="no usable rows"):
        ingest(spark, tmp_path, format="json", path=str(p))


def test_split_is_deterministic_disjoint_and_close_to_ratios(spark):
    ids = spark.range(20_000).select(F.concat(F.lit("id-"), F.col("id").cast("string")).alias("id"))
    split = SplitConfig(train=0.7, validation=0.2, test=0.1, seed=3)
    a = {r["id"]: r["split"] for r in with_split(ids.repartition(7), split).collect()}
    b = {r["id"]: r["split"] for r in with_split(ids.coalesce(1), split).collect()}
    assert a == b  # independent of partitioning and row order
    assert len(a) == 20_000  # each id in exactly one split
    share = {s: sum(v == s for v in a.values()) / len(a) for s in ("train", "validation", "test")}
    assert share["train"] == pytest.approx(0.7, abs=0.015)
    assert share["validation"] == pytest.approx(0.2, abs=0.015)
    assert share["test"] == pytest.approx(0.1, abs=0.015)
    reseeded = {
        r["id"]: r["split"]
        for r in with_split(ids, SplitConfig(train=0.7, validation=0.2, test=0.1, seed=4)).collect()
    }
    assert reseeded != a


def test_with_ids_numbers_repeats(spark):
    df = spark.createDataFrame(
        [("a", "x", "s1"), ("a", "x", "s2"), ("b", "y", "s1")],
        "text string, label string, source string",
    )
    ids = sorted(r["id"] for r in with_ids(df).collect())
    assert len(set(ids)) == 3
    repeats = [i for i in ids if i.endswith("-2")]
    assert len(repeats) == 1 and repeats[0].removesuffix("-2") in ids  # the copy of ("a", "x")


def test_pkg_paths_resolve_to_installed_package_data():
    path = resolve_input_path("pkg://pyspark/python/lib")
    assert Path(path).is_dir()
    with pytest.raises(DataError, match="package 'no_such_pkg' is not installed"):
        resolve_input_path("pkg://no_such_pkg/data")
