"""One commit per stage: the datasets a commit writes become visible together, through an
exception, a failed rename at any point, or a process that dies (os._exit) on the way."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from pyspark.sql import functions as F

from sparkloom.pipelines.catalog import ArrowFS, Catalog

NAMES = ("quarantine", "label_index", "ingested")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(params=["path", "file-uri"])
def root(request, tmp_path) -> str:
    """The data root as a plain local path and as a `file://` URI: one catalog either way."""
    return str(tmp_path) if request.param == "path" else f"file://{tmp_path}"


def commit_text(catalog: Catalog, version: str) -> None:
    """Three small datasets in one commit, each a text file holding `version`."""

    def save(tmp: str) -> None:
        catalog.fs.write_text(f"{tmp}/part.txt", version)

    with catalog.commit() as tx:
        for name in NAMES:
            tx.write(name, save, {"version": version})


def seen(catalog: Catalog) -> dict[str, tuple[str, str]]:
    """What a reader sees of each dataset: (manifest version, data)."""
    out = {}
    for name in NAMES:
        m = catalog.require(name, "ingest")
        out[name] = (m["version"], catalog.fs.read_text(f"{catalog.path(name)}/part.txt"))
    return out


def listing(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "p").iterdir())


def test_a_commit_replaces_every_dataset_and_manifests_come_at_once(spark, tmp_path, root):
    catalog = Catalog(spark, root, "p")
    with catalog.commit() as tx:
        tx.write_parquet("quarantine", spark.range(2), {"fingerprint": "v1"})
        tx.write_parquet("ingested", spark.range(8), {"fingerprint": "v1"})

    with catalog.commit() as tx:
        q = tx.write_parquet("quarantine", spark.range(3), {"fingerprint": "v2"})
        assert q["fingerprint"] == "v2" and q["path"] == catalog.path("quarantine")
        # staged, not visible: readers still get the previous version
        assert catalog.manifest("quarantine")["fingerprint"] == "v1"

        def manifest(tmp: str) -> dict:  # a later manifest reads an earlier dataset's copy
            rows_out = spark.read.parquet(tmp).count()
            quarantined = spark.read.parquet(tx.path("quarantine")).count()
            return {"fingerprint": "v2", "counts": [rows_out, quarantined]}

        m = tx.write_parquet("ingested", spark.range(5).withColumn("split", F.lit("train")),
                             manifest, partition_by=["split"])  # fmt: skip
        assert m["counts"] == [5, 3]
        assert spark.read.parquet(catalog.path("ingested")).count() == 8

    fresh = Catalog(spark, root, "p")
    assert fresh.manifest("quarantine")["fingerprint"] == "v2"
    assert fresh.manifest("ingested")["counts"] == [5, 3]
    assert spark.read.parquet(fresh.path("quarantine")).count() == 3
    assert spark.read.parquet(fresh.path("ingested")).count() == 5
    assert listing(tmp_path) == ["ingested", "quarantine"]


def test_an_exception_in_the_block_commits_nothing(spark, tmp_path):
    catalog = Catalog(spark, str(tmp_path), "p")
    commit_text(catalog, "v1")
    with pytest.raises(RuntimeError, match="stage failed"), catalog.commit() as tx:
        tx.write_parquet("quarantine", spark.range(3), {"version": "v2"})
        tx.write_parquet("label_index", spark.range(3), {"version": "v2"})
        raise RuntimeError("stage failed")
    assert seen(Catalog(spark, str(tmp_path), "p")) == {n: ("v1", "v1") for n in NAMES}
    assert listing(tmp_path) == sorted(NAMES)


def test_a_failed_write_caught_inside_the_block_is_not_committed(spark, tmp_path):
    catalog = Catalog(spark, str(tmp_path), "p")
    commit_text(catalog, "v1")

    def refuse(tmp: str) -> dict:
        raise ValueError("counts do not balance")

    with catalog.commit() as tx:
        tx.write_parquet("quarantine", spark.range(3), {"version": "v2"})
        with pytest.raises(ValueError):
            tx.write_parquet("ingested", spark.range(3), refuse)
    assert catalog.manifest("quarantine")["version"] == "v2"
    assert catalog.manifest("ingested")["version"] == "v1"
    assert listing(tmp_path) == sorted(NAMES)


def failing_rename(monkeypatch, when):
    """ArrowFS.rename raises on the first call `when(src, dst, n)` accepts; n counts the
    renames of datasets (not of journal files) so far."""
    real, count = ArrowFS.rename, {"n": 0}

    def rename(self, src, dst):
        if "/_commits/" not in src:
            count["n"] += 1
        if when(src, dst, count["n"]):
            raise RuntimeError(f"crash at rename {src} -> {dst}")
        return real(self, src, dst)

    monkeypatch.setattr(ArrowFS, "rename", rename)


# 3 datasets with previous versions: 6 renames (old aside, new in); failing rename N stops
# the commit after its journal, with N-1 renames done
@pytest.mark.parametrize("n", range(1, 7))
def test_a_commit_cut_after_its_journal_is_finished_by_the_next_reader(
    spark, tmp_path, root, monkeypatch, n
):
    commit_text(Catalog(spark, root, "p"), "v1")
    with monkeypatch.context() as m:
        failing_rename(m, lambda src, dst, k: "/_commits/" not in src and k == n)
        with pytest.raises(RuntimeError, match="crash at rename"):
            commit_text(Catalog(spark, root, "p"), "v2")
    assert any(p.name.endswith(".json") for p in (tmp_path / "p" / "_commits").iterdir())
    assert seen(Catalog(spark, root, "p")) == {nm: ("v2", "v2") for nm in NAMES}
    assert listing(tmp_path) == sorted(NAMES)


def test_a_commit_whose_journal_fails_keeps_every_previous_version(
    spark, tmp_path, root, monkeypatch
):
    commit_text(Catalog(spark, root, "p"), "v1")
    with monkeypatch.context() as m:
        failing_rename(m, lambda src, dst, k: dst.endswith(".json"))
        with pytest.raises(RuntimeError, match="crash at rename"):
            commit_text(Catalog(spark, root, "p"), "v2")
    assert seen(Catalog(spark, root, "p")) == {nm: ("v1", "v1") for nm in NAMES}
    assert listing(tmp_path) == sorted(NAMES)


CHILD = """
import os, sys
from pyspark.sql import SparkSession
from sparkloom.pipelines.catalog import ArrowFS, Catalog
from tests.pipelines.test_catalog_commit import NAMES

root, point = sys.argv[1], sys.argv[2]
spark = (SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false")
         .getOrCreate())
catalog = Catalog(spark, root, "p")
real, renames = ArrowFS.rename, []

def rename(self, src, dst):
    if "/_commits/" not in src and "v2" in done:
        renames.append(src)
        if point == "renaming" and len(renames) == 4:
            os._exit(9)  # the first dataset moved in, the second aside, not yet in
    return real(self, src, dst)

ArrowFS.rename = rename

def save_text(version):
    def save(tmp):
        if point == "staging" and version == "v2" and tmp.rsplit("/", 1)[-1].startswith(NAMES[2]):
            catalog.fs.write_text(f"{tmp}/part.txt", "half")
            os._exit(9)  # killed while the last dataset is written: no journal yet
        catalog.fs.write_text(f"{tmp}/part.txt", version)
    return save

done = []
for version in ("v1", "v2"):
    done.append(version)
    with catalog.commit() as tx:
        for name in NAMES:
            tx.write(name, save_text(version), {"version": version})
"""


@pytest.mark.slow  # a JVM of its own
@pytest.mark.parametrize("point, visible", [("staging", "v1"), ("renaming", "v2")])
def test_a_killed_writer_leaves_all_old_or_all_new(spark, tmp_path, root, point, visible):
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), root, point],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT},
    )  # fmt: skip
    assert child.returncode == 9, child.stderr[-2000:]
    assert any(".__tmp-" in p.name for p in (tmp_path / "p").iterdir())  # it did die midway
    assert seen(Catalog(spark, root, "p")) == {n: (visible, visible) for n in NAMES}
    assert listing(tmp_path) == sorted(NAMES)


def test_skip_logic_sees_one_dataset_whichever_form_names_the_root(spark, tmp_path, root):
    catalog = Catalog(spark, root, "p")
    catalog.write_parquet("d", spark.range(4), {"fingerprint": "f1"})
    assert catalog.uri("d") == f"file:{tmp_path}/p/d"
    assert catalog.current("d", "f1")["fingerprint"] == "f1"
    assert catalog.current("d", "f2") is None  # other inputs or config: the stage reruns
    for other in (str(tmp_path), f"file://{tmp_path}", f"file:{tmp_path}/"):
        again = Catalog(spark, other, "p")
        assert again.current("d", "f1")["path"] == catalog.path("d")
        assert again.read("d", "ingest").count() == 4
    catalog.write_parquet("d", spark.range(2), {"fingerprint": "f2"})
    assert catalog.current("d", "f1") is None and catalog.current("d", "f2") is not None
    assert listing(tmp_path) == ["d"]
    # an input's fingerprint does not depend on how its folder is named, only on its files
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("one")
    prints = {catalog.fs.fingerprint(f) for f in (str(raw), f"file://{raw}", f"file:{raw}/")}
    assert len(prints) == 1
    (raw / "a.txt").write_text("one more")
    assert catalog.fs.fingerprint(f"file://{raw}") not in prints


def test_a_rename_cut_in_two_is_restored_by_the_next_reader(spark, tmp_path, root):
    catalog = Catalog(spark, root, "p")
    catalog.write_parquet("d", spark.range(4), {"fingerprint": "v1"})
    # a crash between "move old aside" and "move new in" leaves only the old copy
    (tmp_path / "p" / "d").rename(tmp_path / "p" / "d.__old-deadbeef")
    fresh = Catalog(spark, root, "p")
    assert fresh.current("d", "v1")["fingerprint"] == "v1"
    assert fresh.read("d", "ingest").count() == 4
    assert listing(tmp_path) == ["d"]


def test_a_journal_cut_while_it_was_written_is_cleared(spark, tmp_path, root):
    """A writer killed inside write_text leaves the journal's own temporary
    (`<tag>.json.tmp.tmp-<pid>`): the commit never happened, and the next writer clears it."""
    catalog = Catalog(spark, root, "p")
    commit_text(catalog, "v1")
    commits = tmp_path / "p" / "_commits"
    commits.mkdir()
    (commits / "0123456789ab.json.tmp.tmp-4242").write_text('{"datas')
    (tmp_path / "p" / "ingested.__tmp-0123456789ab").mkdir()
    commit_text(Catalog(spark, root, "p"), "v2")
    assert seen(Catalog(spark, root, "p")) == {n: ("v2", "v2") for n in NAMES}
    assert listing(tmp_path) == sorted(NAMES)
