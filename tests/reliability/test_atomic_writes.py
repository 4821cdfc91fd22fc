"""Trap 4: a write that fails midway must leave the previous output readable.

Spark's plain `mode("overwrite")` deletes the target before the job runs, so a job that
fails on its last partition leaves nothing (reproduced first). Stage outputs (Catalog) and
the score/generate outputs (write_with_quarantine) write to a temporary path and are
committed only when complete and balanced; writing the same output twice replaces it.
"""

from __future__ import annotations

import os

import pytest
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.spark import write_with_quarantine

ROWS = 500


def failing_on_last_partition(spark):
    """500 rows in 4 partitions; a UDF raises on the last one (ids 375-499), so the write
    job fails after the other partitions were written."""

    @F.udf(T.LongType())
    def boom(i):
        if i >= 375:
            raise ValueError("injected failure on the last partition")
        return i

    return spark.range(ROWS, numPartitions=4).select(boom("id").alias("id"))


def readable_rows(spark, path: str) -> int:
    try:
        return spark.read.parquet(path).count()
    except Exception:  # AnalysisException: no such path / unable to infer schema
        return 0


def test_a_plain_overwrite_that_fails_midway_loses_the_previous_output(spark, tmp_path):
    """The trap, reproduced: 500 rows -> 0 readable."""
    target = str(tmp_path / "plain")
    spark.range(ROWS).write.parquet(target)
    with pytest.raises(Exception, match="injected failure"):
        failing_on_last_partition(spark).write.mode("overwrite").parquet(target)
    assert readable_rows(spark, target) == 0


def test_a_failed_stage_output_write_keeps_the_previous_version(spark, tmp_path):
    catalog = Catalog(spark, str(tmp_path / "data"), "p")
    catalog.write_parquet("scores", spark.range(ROWS), {"fingerprint": "v1"})
    with pytest.raises(Exception, match="injected failure"):
        catalog.write_parquet("scores", failing_on_last_partition(spark), {"fingerprint": "v2"})
    assert catalog.read("scores", "score").count() == ROWS
    assert catalog.manifest("scores")["fingerprint"] == "v1"
    assert sorted(os.listdir(tmp_path / "data" / "p")) == ["scores"]  # no temporary left over

    catalog.write_parquet("scores", spark.range(ROWS), {"fingerprint": "v3"})  # written twice:
    assert catalog.read("scores", "score").count() == ROWS  # replaced, never doubled


def test_a_failed_scoring_write_keeps_the_previous_output_and_quarantine(spark, tmp_path):
    output = str(tmp_path / "scores")
    pinned = spark.range(ROWS).localCheckpoint()
    good, bad = pinned.filter("id < 490"), pinned.filter("id >= 490")
    assert write_with_quarantine(pinned, good, bad, output, "scoring") == (ROWS, 490, 10)

    failing = failing_on_last_partition(spark)
    with pytest.raises(Exception, match="injected failure"):
        write_with_quarantine(pinned, failing, bad, output, "scoring")
    assert (
        readable_rows(spark, output) == 490 and readable_rows(spark, f"{output}_quarantine") == 10
    )

    # unbalanced books (rows lost between input and outputs) are never committed either
    from sparkloom.pipelines.errors import DataError

    with pytest.raises(DataError, match="500 in, 400 out \\+ 10 quarantined"):
        write_with_quarantine(pinned, pinned.filter("id < 400"), bad, output, "scoring")
    assert readable_rows(spark, output) == 490
    assert sorted(os.listdir(tmp_path)) == ["scores", "scores_quarantine"]

    for _ in range(2):  # the same output twice: replaced, not appended
        write_with_quarantine(pinned, good, bad, output, "scoring")
    assert (
        readable_rows(spark, output) == 490 and readable_rows(spark, f"{output}_quarantine") == 10
    )
