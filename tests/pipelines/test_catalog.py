import pytest
from pyspark.sql import functions as F

from sparkloom.pipelines.catalog import Catalog
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
