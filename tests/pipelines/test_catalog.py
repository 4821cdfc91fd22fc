import os
import time

import pyarrow.fs as pafs
import pytest
from pyspark.sql import functions as F

from sparkloom.models import storage
from sparkloom.pipelines.catalog import ArrowFS, Catalog
from sparkloom.pipelines.errors import DataError


def test_atomic_write_replaces_and_leaves_no_temporaries(spark, tmp_path):
    catalog = Catalog(spark, str(tmp_path), "p")
    catalog.write_parquet("d", spark.range(10), {"fingerprint": "v1"})
    catalog.write_parquet("d", spark.range(5), {"fingerprint": "v2"})
    assert spark.read.parquet(catalog.path("d")).count() == 5
    assert catalog.manifest("d")["fingerprint"] == "v2"
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["d"]


def test_failed_write_keeps_previous_version(spark, tmp_path):
    catalog = Catalog(spark, str(tmp_path), "p")
    catalog.write_parquet("d", spark.range(500), {"fingerprint": "good"})

    @F.udf("long")
    def explode_on_400(x):
        if x == 400:
            raise RuntimeError("disk on fire")
        return x

    bad = spark.range(1000).repartition(4).select(explode_on_400("id").alias("id"))
    with pytest.raises(Exception, match="disk on fire"):
        catalog.write_parquet("d", bad, {"fingerprint": "bad"})
    assert spark.read.parquet(catalog.path("d")).count() == 500
    assert catalog.manifest("d")["fingerprint"] == "good"
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["d"]


def test_manifest_check_failure_commits_nothing(spark, tmp_path):
    catalog = Catalog(spark, str(tmp_path), "p")
    catalog.write_parquet("d", spark.range(3), {"fingerprint": "v1"})

    def refuse(tmp):
        raise DataError("counts do not balance")

    with pytest.raises(DataError):
        catalog.write_parquet("d", spark.range(7), refuse)
    assert spark.read.parquet(catalog.path("d")).count() == 3


def test_interrupted_commit_is_recovered(spark, tmp_path):
    catalog = Catalog(spark, str(tmp_path), "p")
    catalog.write_parquet("d", spark.range(4), {"fingerprint": "v1"})
    # a crash between "move old aside" and "move new in" leaves only the old copy
    (tmp_path / "p" / "d").rename(tmp_path / "p" / "d.__old-deadbeef")
    assert catalog.manifest("d")["fingerprint"] == "v1"
    assert spark.read.parquet(catalog.path("d")).count() == 4


def test_reading_a_missing_dataset_names_the_stage(spark, tmp_path):
    catalog = Catalog(spark, str(tmp_path), "p")
    with pytest.raises(
        DataError, match="dataset 'features' not found .* run the 'features' stage first"
    ):
        catalog.read("features", "features")


def test_fingerprint_sees_added_and_changed_files(spark, tmp_path):
    catalog = Catalog(spark, str(tmp_path), "p")
    d = tmp_path / "raw"
    d.mkdir()
    (d / "a.txt").write_text("one")
    f1 = catalog.fs.fingerprint(str(d))
    assert catalog.fs.fingerprint(str(d)) == f1
    (d / "b.txt").write_text("")
    f2 = catalog.fs.fingerprint(str(d))
    (d / "a.txt").write_text("one more")
    f3 = catalog.fs.fingerprint(str(d))
    assert len({f1, f2, f3}) == 3
    (d / ".hidden").write_text("x")
    assert catalog.fs.fingerprint(str(d)) == f3


def test_arrowfs_names_local_paths_as_hadoop_does(tmp_path, monkeypatch):
    """Spark's own paths are compared with these: `file:/abs`, one slash, no trailing one."""
    fs = ArrowFS()
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("x")
    (d / ".hidden").write_text("x")
    forms = (str(d), f"{d}/", f"file://{d}", f"file:{d}", f"file://{d}/", f"{tmp_path}/./dir")
    for form in forms:
        assert fs.qualify(form) == f"file:{d}"
        assert fs.list_dir(form) == [f"file:{d}/.hidden", f"file:{d}/b.txt", f"file:{d}/sub"]
        assert fs.is_dir(form) and fs.exists(form)
    monkeypatch.chdir(tmp_path)
    assert fs.qualify("dir") == f"file:{d}"
    assert fs.qualify("hdfs://nn:8020/data/x/") == "hdfs://nn:8020/data/x"
    assert fs.qualify("s3a://bucket/x") == "s3a://bucket/x"
    assert [rel for rel, _, _ in fs.list_files(f"file://{d}")] == ["b.txt"]
    assert not fs.is_dir(f"file:{d}/b.txt") and not fs.exists(f"file:{d}/nope")


def test_arrowfs_operations_on_a_local_folder(tmp_path):
    fs = ArrowFS()
    root = f"file://{tmp_path}"
    fs.write_text(f"{root}/a/m.json", "{}")  # parents made
    assert fs.read_text(f"{tmp_path}/a/m.json") == "{}"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["m.json"]  # no .crc, no tmp
    old = time.time() - 3600
    os.utime(tmp_path / "a" / "m.json", (old, old))
    assert abs(fs.mtime_ms(f"{root}/a/m.json") / 1000 - old) < 1
    fs.touch(f"{root}/a/m.json")
    assert abs(fs.mtime_ms(f"{root}/a/m.json") / 1000 - time.time()) < 60
    fs.mkdirs(f"{root}/b")
    with pytest.raises(OSError, match="exists"):
        fs.rename(f"{root}/a", f"{root}/b")  # never into a folder already there
    assert (tmp_path / "a" / "m.json").exists() and not (tmp_path / "b" / "a").exists()
    with pytest.raises(OSError):
        fs.rename(f"{root}/nope", f"{root}/c")
    fs.rename(f"{root}/a", f"{root}/c")
    assert fs.list_dir(root) == [f"file:{tmp_path}/b", f"file:{tmp_path}/c"]
    fs.delete_empty_dir(f"{root}/c")  # not empty: stays
    fs.delete_empty_dir(f"{root}/b")
    assert fs.list_dir(root) == [f"file:{tmp_path}/c"]
    fs.write_text(f"{root}/new/m.json", "new")
    fs.replace(f"{root}/new", f"{root}/c")
    assert fs.read_text(f"{root}/c/m.json") == "new" and fs.list_dir(root) == [f"file:{tmp_path}/c"]
    fs.delete(f"{root}/c")
    fs.delete(f"{root}/c")  # absent: nothing to do
    assert fs.list_dir(root) == []


class _NoFolderMoves(pafs.FSSpecHandler):
    """An object store's limits: a folder cannot be moved."""

    def move(self, src, dest):
        if self.fs.isdir(src):
            raise NotImplementedError("cannot move a directory")
        return super().move(src, dest)


def test_arrowfs_on_a_remote_store_copies_folders_it_cannot_move(tmp_path, monkeypatch):
    import fsspec

    mem = fsspec.filesystem("memory")
    store = pafs.PyFileSystem(_NoFolderMoves(mem))
    monkeypatch.setattr(storage, "resolve", lambda url: (store, url.removeprefix("mem://")))
    fs = ArrowFS()
    root = f"mem:///{tmp_path.name}"
    fs.write_text(f"{root}/d/part-0.txt", "zero")
    fs.write_text(f"{root}/d/sub/part-1.txt", "one")
    fs.write_text(f"{root}/d/_manifest.json", "{}")
    assert fs.qualify(f"{root}/d/") == f"{root}/d"
    assert fs.list_dir(root) == [f"{root}/d"]
    assert fs.list_dir(f"{root}/d") == [f"{root}/d/_manifest.json", f"{root}/d/part-0.txt",
                                        f"{root}/d/sub"]  # fmt: skip
    assert [(rel, size) for rel, size, _ in fs.list_files(f"{root}/d")] == [
        ("part-0.txt", 4),
        ("sub/part-1.txt", 3),
    ]
    fs.rename(f"{root}/d", f"{root}/e")
    assert fs.list_dir(root) == [f"{root}/e"]
    assert fs.read_text(f"{root}/e/sub/part-1.txt") == "one"
    fs.touch(f"{root}/e/_manifest.json")  # rewritten: the same bytes
    assert fs.read_text(f"{root}/e/_manifest.json") == "{}"
    fs.delete(f"{root}/e")
    assert fs.list_dir(root) == []
