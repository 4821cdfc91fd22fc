"""Issue 16: ingest reads input the way its writers wrote it, counts the true records and
never trains on a silently wrong row. Each test writes its minimal input; each failed on the
code before the issue (noted per test)."""

from __future__ import annotations

import csv
import gzip
import json
import os

import pytest

from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.errors import DataError
from sparkloom.pipelines.ingest import run_ingest
from tests.conftest import make_config

WORDS = ["goal", "match", "chip", "cloud", "bread", "soup", "team", "code"]


def ingest(spark, tmp_path, **section):
    cfg = make_config(tmp_path, ingest=section)
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    return run_ingest(spark, cfg, catalog), catalog


def table(spark, catalog, name="ingested"):
    return {r["id"]: r.asDict() for r in catalog.read(name, "ingest").collect()}


def records(n: int, labels=("sport", "tech")) -> list[dict]:
    """Records the way real exports hold them: commas, doubled quotes, line breaks inside."""
    out = []
    for i in range(n):
        text = f'{WORDS[i % 8]} {i}, said "the {WORDS[(i + 3) % 8]}"'
        if i % 3 == 0:
            text += "\nMore on this story, later"
        out.append({"id": str(i), "text": text, "label": labels[i % len(labels)]})
    return out


def write_python_csv(path, rows, **fmt) -> None:
    with open(path, "w", newline="", encoding=fmt.pop("encoding", "utf-8")) as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "label"], **fmt)
        w.writeheader()
        w.writerows(rows)


# --- 1-3, 19: CSV as pandas, Excel and Python write it ------------------------------------------


@pytest.mark.parametrize("bom,crlf", [(False, False), (True, True)])
def test_rfc4180_csv_ingests_exactly_with_no_options(spark, tmp_path, bom, crlf):
    """Before: escape defaulted to a backslash and multiline to false; this file came out
    with fragments of text as rows and labels."""
    rows = records(60)
    path = tmp_path / "export.csv"
    write_python_csv(path, rows, lineterminator="\r\n" if crlf else "\n",
                     encoding="utf-8-sig" if bom else "utf-8")  # fmt: skip
    result, catalog = ingest(spark, tmp_path, format="csv", path=str(path), columns={"id": "id"})
    assert (result.rows_in, result.rows_out, result.rows_quarantined) == (60, 60, 0)
    assert result.labels == ["sport", "tech"]
    got = table(spark, catalog)
    assert {k: v["text"] for k, v in got.items()} == {r["id"]: r["text"] for r in rows}


def test_the_same_file_read_with_backslash_escape_fails_instead_of_training(spark, tmp_path):
    rows = records(300)
    for r in rows[::7]:
        r["text"] = r["text"] + ' ends with "a quote",'
    rows[10]["text"] = 'a path C:\\new\\"quoted"\\ here'
    path = tmp_path / "export.csv"
    write_python_csv(path, rows)
    with pytest.raises(DataError, match=r"ingest\.csv"):
        ingest(spark, tmp_path, format="csv", path=str(path), columns={"id": "id"},
               csv={"escape": "\\"})  # fmt: skip


def test_multiline_false_on_a_quoted_line_break_fails_naming_multiline(spark, tmp_path):
    """Before: `1,"first line\\nMore on this story, later",sport` became a clean row with id
    `More on this story` and label `sport`; 3 records were 4 rows in."""
    path = tmp_path / "three.csv"
    path.write_text('id,text,label\n1,"first line\nMore on this story, later",sport\n'
                    "2,second,tech\n3,third,sport\n")  # fmt: skip
    with pytest.raises(
        DataError, match=r"scan finds 3 records but the CSV parser read 4.*multiline"
    ):
        ingest(spark, tmp_path, format="csv", path=str(path), columns={"id": "id"},
               csv={"multiline": False})  # fmt: skip


def test_an_unclosed_quote_fails_with_the_line_where_it_opens(spark, tmp_path):
    """Before: with multiline the quote swallowed 199 records and the counts shrank to match
    (`101 rows in = 100 out + 1 quarantined`, exit 0)."""
    lines = ["id,text,label"] + [f"{i},words {i},{'ab'[i % 2]}" for i in range(300)]
    lines[101] = '100,"this quote never closes,a'
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        DataError, match=r"in\.csv: the quote that opens at line 102 is never closed"
    ):
        ingest(spark, tmp_path, format="csv", path=str(tmp_path / "in.csv"), columns={"id": "id"})


def test_a_stray_file_in_a_csv_folder_is_not_data(spark, tmp_path):
    """Before: README.txt beside part-1.csv added the class ' label' and lost its first line."""
    folder = tmp_path / "exports"
    folder.mkdir()
    write_python_csv(folder / "part-1.csv", records(20))
    write_python_csv(folder / "part-2.csv.gz", [])
    with gzip.open(folder / "part-2.csv.gz", "wt", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "label"])
        w.writeheader()
        w.writerows({**r, "id": f"b{r['id']}"} for r in records(10))
    (folder / "README.txt").write_text("Columns: id, text, label\nExported 2026-12-01\n")
    result, _ = ingest(spark, tmp_path, format="csv", path=str(folder), columns={"id": "id"})
    assert (result.rows_in, result.rows_out) == (30, 30)
    assert result.labels == ["sport", "tech"]


def test_a_csv_name_with_spaces_plus_and_percent_counts_and_names_its_file(spark, tmp_path):
    """Spark's _metadata.file_path is a URI (`my%20export`): compared as is, it named no file
    of the listing."""
    folder = tmp_path / "exports"
    folder.mkdir()
    lines = ["id,text,label", *[f"{i},w {i},{'ab'[i % 2]}" for i in range(20)], "x,too,many,f"]
    (folder / "my export+1%.csv").write_text("\n".join(lines) + "\n")
    result, catalog = ingest(spark, tmp_path, format="csv", path=str(folder), columns={"id": "id"})
    assert (result.rows_in, result.rows_out, result.reasons) == (21, 20, {"malformed_record": 1})
    (q,) = table(spark, catalog, "quarantine").values()
    assert (q["source"].rsplit("/", 1)[-1], q["lines"]) == ("my export+1%.csv", "22")


def test_a_csv_file_whose_header_differs_from_the_first_fails(spark, tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "a.csv").write_text(
        "id,text,label\n" + "".join(f"{i},w {i},{'ab'[i % 2]}\n" for i in range(20))
    )
    (folder / "b.csv").write_text(
        "id,label,text\n" + "".join(f"b{i},{'ab'[i % 2]},w {i}\n" for i in range(20))
    )
    with pytest.raises(DataError, match=r"b\.csv: its header .*label.*text.* differs from"):
        ingest(spark, tmp_path, format="csv", path=str(folder), columns={"id": "id"})


def test_latin1_csv_reads_with_encoding_and_fails_clearly_without(spark, tmp_path):
    """Before: no encoding option; the rows with accents (here a whole class) vanished into
    quarantine as invalid UTF-8, exit 0."""
    rows = [{"id": str(i), "text": f"caf\xe9 cr\xe8me {i}" if i % 3 == 0 else f"plain {i}",
             "label": "fran\xe7ais" if i % 3 == 0 else "english"} for i in range(60)]  # fmt: skip
    path = tmp_path / "latin1.csv"
    write_python_csv(path, rows, encoding="latin-1")
    with pytest.raises(DataError, match=r"20 of 60 rows are not valid utf-8.*set ingest\.encoding"):
        ingest(spark, tmp_path, format="csv", path=str(path), columns={"id": "id"})
    result, catalog = ingest(spark, tmp_path / "2", format="csv", path=str(path),
                             columns={"id": "id"}, encoding="latin-1")  # fmt: skip
    assert (result.rows_in, result.rows_out) == (60, 60)
    assert result.labels == ["english", "fran\xe7ais"]
    assert table(spark, catalog)["0"]["text"] == "caf\xe9 cr\xe8me 0"


def test_cp1252_csv_reads_with_its_encoding(spark, tmp_path):
    """Spark 4 takes seven charsets by name; cp1252 (Excel on Windows) needs its legacy switch."""
    rows = [{"id": str(i), "text": f"\u201cquoted\u201d \u20ac{i}", "label": "ab"[i % 2]}
            for i in range(20)]  # fmt: skip
    write_python_csv(tmp_path / "excel.csv", rows, encoding="cp1252")
    result, catalog = ingest(spark, tmp_path, format="csv", path=str(tmp_path / "excel.csv"),
                             columns={"id": "id"}, encoding="cp1252")  # fmt: skip
    assert (result.rows_in, result.rows_out) == (20, 20)
    assert table(spark, catalog)["3"]["text"] == "\u201cquoted\u201d \u20ac3"


# --- 5, 6: labels ------------------------------------------------------------------------------


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_integral_float_labels_and_padded_labels_are_one_class(spark, tmp_path):
    """Before: JSON labels 1 and 1.0 were two classes, `sport` and `sport ` two more."""
    rows = [{"id": str(i), "text": f"words {i}", "label": [1, 1.0, "1", " 2", 2.0][i % 5]}
            for i in range(50)]  # fmt: skip
    write_jsonl(tmp_path / "in.jsonl", rows)
    result, _ = ingest(spark, tmp_path, format="json", path=str(tmp_path / "in.jsonl"),
                       columns={"id": "id"})  # fmt: skip
    assert result.labels == ["1", "2"]
    assert result.rows_out == 50


def test_labels_that_differ_only_in_case_are_an_error_unless_case_sensitive(spark, tmp_path):
    rows = [{"id": str(i), "text": f"words {i}", "label": ["sport", "Sport", "tech"][i % 3]}
            for i in range(60)]  # fmt: skip
    write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(
        DataError, match=r"labels \['Sport', 'sport'\] differ only in case.*case_sensitive=true"
    ):
        ingest(
            spark, tmp_path, format="json", path=str(tmp_path / "in.jsonl"), columns={"id": "id"}
        )
    result, _ = ingest(spark, tmp_path / "2", format="json", path=str(tmp_path / "in.jsonl"),
                       columns={"id": "id"}, labels={"case_sensitive": True})  # fmt: skip
    assert result.labels == ["Sport", "sport", "tech"]


def test_a_single_class_fails_and_a_class_missing_from_train_is_warned(spark, tmp_path):
    """Before: one class trained to test accuracy 1.0 and register would promote it."""
    rows = [{"id": str(i), "text": f"words {i}", "label": "only"} for i in range(30)]
    write_jsonl(tmp_path / "one.jsonl", rows)
    with pytest.raises(DataError, match=r"training split has 1 class\(es\) \(\['only'\]\)"):
        ingest(
            spark, tmp_path, format="json", path=str(tmp_path / "one.jsonl"), columns={"id": "id"}
        )
    rows = [{"id": str(i), "text": f"w {i}", "label": "ab"[i % 2]} for i in range(40)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", [{"id": "t1", "text": "w", "label": "a"},
                                          {"id": "t2", "text": "rare", "label": "rare"}])  # fmt: skip
    result, catalog = ingest(spark, tmp_path / "2", format="json", columns={"id": "id"},
                             path={"train": str(tmp_path / "train.jsonl"),
                                   "test": str(tmp_path / "test.jsonl")})  # fmt: skip
    warnings = catalog.manifest("ingested")["warnings"]
    assert warnings == [
        "label 'rare' is not in the training split ({'test': 1}): no model can learn it"
    ]


def test_a_misread_label_column_of_free_text_fails_naming_the_csv_options(spark, tmp_path):
    lines = ["id,text,label"] + [f"{i},words,{'word ' * 12}{i}" for i in range(30)]
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        DataError, match=r"30 label\(s\) look like free text.*ingest\.csv\.quote/escape/multiline"
    ):
        ingest(spark, tmp_path, format="csv", path=str(tmp_path / "in.csv"), columns={"id": "id"})
    with pytest.raises(DataError, match=r"more than 10 distinct labels \(ingest\.max_labels\)"):
        ingest(spark, tmp_path, format="csv", path=str(tmp_path / "in.csv"), columns={"id": "id"},
               max_labels=10)  # fmt: skip


# --- 7, 8: ids and types -----------------------------------------------------------------------


def test_duplicate_ids_are_quarantined_and_the_first_good_row_kept(spark, tmp_path):
    """Before: accepted; `score` failed four stages later with a join fan-out."""
    rows = [{"id": str(i), "text": f"words {i}", "label": "ab"[i % 2]} for i in range(30)]
    rows += [{"id": "3", "text": None, "label": "a"}, {"id": "3", "text": "second 3", "label": "b"},
             {"id": "7", "text": "second 7", "label": "a"}]  # fmt: skip
    rows.insert(0, {"id": "5", "text": "", "label": "a"})  # a bad row first: not the one kept
    write_jsonl(tmp_path / "in.jsonl", rows)
    result, catalog = ingest(spark, tmp_path, format="json", path=str(tmp_path / "in.jsonl"),
                             columns={"id": "id"})  # fmt: skip
    assert (result.rows_in, result.rows_out) == (34, 30)
    assert result.reasons == {"duplicate_id": 2, "empty_text": 1, "null_text": 1}
    got = table(spark, catalog)
    assert (got["3"]["text"], got["5"]["text"], got["7"]["text"]) == (
        "words 3",
        "words 5",
        "words 7",
    )


def test_a_json_object_in_the_text_field_is_quarantined_not_stringified(spark, tmp_path):
    rows = [{"id": str(i), "text": f"words {i}", "label": "ab"[i % 2]} for i in range(20)]
    rows += [{"id": "o", "text": {"title": "T", "body": "B"}, "label": "a"},
             {"id": "l", "text": ["x", "y"], "label": "a"}, {"id": "n", "text": 42, "label": "b"}]  # fmt: skip
    write_jsonl(tmp_path / "in.jsonl", rows)
    result, catalog = ingest(spark, tmp_path, format="json", path=str(tmp_path / "in.jsonl"),
                             columns={"id": "id"})  # fmt: skip
    assert result.reasons == {"text_not_string": 3}
    assert set(table(spark, catalog, "quarantine")) == {"o", "l", "n"}


# --- 12-15: files, names, links, Parquet, ~ -----------------------------------------------------


def text_tree(root, n=20):
    for i in range(n):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        (root / "ab"[i % 2] / f"doc{i}.txt").write_text(f"words {i}")
    return root


def test_a_colon_in_a_file_name_is_quarantined_not_fatal(spark, tmp_path):
    """Before: ~100 Java stack-frame lines and exit 1 for the whole folder."""
    root = text_tree(tmp_path / "docs")
    (root / "a" / "2026-12-01T10:00:00.txt").write_text("timestamped export")
    result, catalog = ingest(spark, tmp_path, format="text_dirs", path=str(root))
    assert (result.rows_in, result.rows_out, result.reasons) == (21, 20, {"bad_file_name": 1})
    assert set(table(spark, catalog, "quarantine")) == {"a/2026-12-01T10:00:00.txt"}


def test_a_symlinked_folder_is_read_and_a_symlink_loop_is_refused(spark, tmp_path):
    """Before: a symlinked folder always failed ("files changed during the read"); a loop was
    followed 37,720 times first."""
    real = text_tree(tmp_path / "real")
    root = tmp_path / "docs"
    root.mkdir()
    os.symlink(real / "a", root / "a")
    os.symlink(real / "b", root / "b")
    result, _ = ingest(spark, tmp_path, format="text_dirs", path=str(root))
    assert (result.rows_in, result.rows_out) == (20, 20)
    os.symlink(root, real / "a" / "again")
    with pytest.raises(DataError, match=r"again links back to .*a symlink loop"):
        ingest(spark, tmp_path / "2", format="text_dirs", path=str(root))


def test_a_truncated_or_foreign_parquet_file_fails_naming_it(spark, tmp_path):
    """Before: a truncated file gave 78-110 Java stack-frame lines and exit 1; a file with
    other column names was quarantined wholesale as null_text, exit 0."""
    folder = tmp_path / "pq"
    rows = [(str(i), f"words {i}", "ab"[i % 2]) for i in range(20)]
    spark.createDataFrame(rows, "id string, text string, label string").coalesce(1).write.parquet(
        str(folder)
    )
    other = tmp_path / "other"
    spark.createDataFrame(rows, "id string, body string, label string").coalesce(1).write.parquet(
        str(other)
    )
    part = next(p for p in os.listdir(other) if p.endswith(".parquet"))
    os.rename(other / part, folder / "from-elsewhere.parquet")
    with pytest.raises(
        DataError,
        match=r"from-elsewhere\.parquet has no column 'text' \(ingest\.columns\.text\): its columns are \['id', 'body', 'label'\]",
    ):
        ingest(spark, tmp_path, format="parquet", path=str(folder), columns={"id": "id"})
    data = (folder / "from-elsewhere.parquet").read_bytes()
    (folder / "from-elsewhere.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"from-elsewhere\.parquet is not a readable Parquet file"):
        ingest(spark, tmp_path, format="parquet", path=str(folder), columns={"id": "id"})


def test_tilde_expands_in_the_data_root_and_the_input_path(spark, tmp_path, monkeypatch):
    """Before: `~` in data_root made a literal ./~ folder; in ingest.path it did not exist."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    text_tree(tmp_path / "home" / "corpus")
    cfg = make_config(tmp_path, pipeline={"name": "t", "data_root": "~/sparkloom-data"},
                      ingest={"format": "text_dirs", "path": "~/corpus"})  # fmt: skip
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    assert run_ingest(spark, cfg, catalog).rows_out == 20
    assert (tmp_path / "home" / "sparkloom-data" / "t" / "ingested" / "_manifest.json").exists()


# --- a dataset's own split; tables and SQL -------------------------------------------------------


def test_split_by_column_keeps_the_datasets_own_split_and_carves_validation(spark, tmp_path):
    rows = [{"id": str(i), "text": f"words {i}", "label": "ab"[i % 2],
             "part": "test" if i % 4 == 0 else " Train"} for i in range(200)]  # fmt: skip
    write_jsonl(tmp_path / "in.jsonl", rows)
    result, catalog = ingest(spark, tmp_path, format="json", path=str(tmp_path / "in.jsonl"),
                             columns={"id": "id"}, split={"column": "part", "validation_ratio": 0.2})  # fmt: skip
    got = table(spark, catalog)
    assert {k for k, v in got.items() if v["split"] == "test"} == {str(i) for i in range(0, 200, 4)}
    assert result.splits["test"] == 50 and 15 <= result.splits["validation"] <= 45
    assert result.splits["train"] + result.splits["validation"] == 150
    assert (
        catalog.manifest("ingested")["split_by"]
        == "column part + validation carved from train (0.2)"
    )
    rows[5]["part"] = "dev"
    write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(DataError, match=r"ingest\.split\.column 'part' holds 'dev' in 1 row"):
        ingest(spark, tmp_path / "2", format="json", path=str(tmp_path / "in.jsonl"),
               columns={"id": "id"}, split={"column": "part"})  # fmt: skip


def test_split_by_path_per_split(spark, tmp_path):
    for part, n in (("train", 40), ("validation", 10), ("test", 10)):
        write_python_csv(
            tmp_path / f"{part}.csv", [{**r, "id": f"{part}-{r['id']}"} for r in records(n)]
        )
    paths = {p: str(tmp_path / f"{p}.csv") for p in ("train", "validation", "test")}
    result, catalog = ingest(spark, tmp_path, format="csv", path=paths, columns={"id": "id"})
    assert result.splits == {"train": 40, "validation": 10, "test": 10}
    assert all(v["split"] == k.split("-")[0] for k, v in table(spark, catalog).items())
    assert catalog.manifest("ingested")["split_by"] == "input path per split"


def test_a_managed_table_is_a_source_read_as_a_table_and_by_sql(spark, tmp_path):
    db = f"trust_{os.getpid()}"
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {db} LOCATION '{tmp_path / 'warehouse'}'")
    rows = [(i, f"words {i}", "ab"[i % 2]) for i in range(40)] + [(99, None, "a")]
    spark.createDataFrame(rows, "doc_id int, body string, topic string").write.saveAsTable(
        f"{db}.docs"
    )
    columns = {"id": "doc_id", "text": "body", "label": "topic"}
    by_table, c1 = ingest(
        spark, tmp_path / "t", format="table", table=f"{db}.docs", columns=columns
    )
    assert (by_table.rows_in, by_table.rows_out, by_table.reasons) == (41, 40, {"null_text": 1})
    by_sql, c2 = ingest(spark, tmp_path / "s", format="sql", columns=columns,
                        query=f"SELECT * FROM {db}.docs WHERE doc_id < 20")  # fmt: skip
    assert (by_sql.rows_in, by_sql.rows_out) == (20, 20)
    assert {k: v["split"] for k, v in table(spark, c2).items()} == {
        k: v["split"] for k, v in table(spark, c1).items() if int(k) < 20
    }  # the same ids land in the same split whichever way they are read
    again, _ = ingest(spark, tmp_path / "t", format="table", table=f"{db}.docs", columns=columns)
    assert again.skipped
    spark.createDataFrame([(100, "new words", "b")], "doc_id int, body string, topic string") \
        .write.mode("append").saveAsTable(f"{db}.docs")  # fmt: skip
    changed, _ = ingest(spark, tmp_path / "t", format="table", table=f"{db}.docs", columns=columns)
    assert not changed.skipped and changed.rows_in == 42
    with pytest.raises(DataError, match=r"ingest\.table 'nosuch\.table' cannot be read"):
        ingest(spark, tmp_path / "x", format="table", table="nosuch.table", columns=columns)


# --- 10: one commit per stage --------------------------------------------------------------------


def test_an_ingest_cut_between_its_commits_shows_all_new_or_all_old(spark, tmp_path, monkeypatch):
    """Before: an interrupt between ingest's three commits left the new run's quarantine
    beside the old run's ingested."""
    from sparkloom.pipelines.catalog import ArrowFS

    def run(n_bad):
        rows = [{"id": str(i), "text": f"w {i}", "label": "ab"[i % 2]} for i in range(30)]
        rows += [{"id": f"bad{k}", "text": "", "label": "a"} for k in range(n_bad)]
        write_jsonl(tmp_path / "in.jsonl", rows)
        return ingest(spark, tmp_path, format="json", path=str(tmp_path / "in.jsonl"),
                      columns={"id": "id"})  # fmt: skip

    run(1)
    real = ArrowFS.rename
    moved = []

    def rename(self, src, dst):  # dies after the first dataset is in place
        if "/_commits/" not in src and ".__tmp-" in src:
            moved.append(src)
            if len(moved) == 2:
                raise RuntimeError("killed between commits")
        return real(self, src, dst)

    with monkeypatch.context() as m:
        m.setattr(ArrowFS, "rename", rename)
        with pytest.raises(RuntimeError, match="killed between commits"):
            run(2)
    catalog = Catalog(spark, str(tmp_path / "data"), "t")  # the next reader finishes it
    fps = {n: catalog.manifest(n)["fingerprint"] for n in ("quarantine", "label_index", "ingested")}
    assert len(set(fps.values())) == 1
    assert catalog.read("quarantine", "ingest").count() == 2
    assert catalog.manifest("ingested")["result"]["rows_quarantined"] == 2
