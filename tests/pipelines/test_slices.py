"""Slice metrics: per-slice accuracy, F1 and count; a slice far below the overall is flagged."""

import pytest
from pyspark.sql import functions as F

from sparkloom.pipelines.slices import length_quartile, slice_metrics


def test_a_slice_with_bad_accuracy_is_flagged(spark):
    rows = [("web", "a", "a")] * 18 + [("web", "b", "b")] * 18 + [("web", "a", "b")] * 4
    rows += [("scan", "a", "b")] * 6 + [("scan", "b", "b")] * 4  # 4 of 10 right
    df = spark.createDataFrame(rows, "source string, label string, predicted_label string")
    report = slice_metrics(df, "source", "source", ["a", "b"], max_gap=0.1)
    assert report.overall_accuracy == pytest.approx(40 / 50)
    got = {r["value"]: r for r in report.rows}
    assert (got["web"]["count"], got["web"]["accuracy"]) == (40, pytest.approx(36 / 40))
    assert (got["scan"]["count"], got["scan"]["accuracy"]) == (10, pytest.approx(0.4))
    # scan, weighted F1: class a (6 rows) F1 0, class b (4 rows) P 4/10, R 1, F1 4/7
    assert got["scan"]["f1"] == pytest.approx(0.4 * (2 * 0.4 * 1 / 1.4))
    assert [r["value"] for r in report.flagged] == ["scan"]
    assert got["scan"]["gap"] == pytest.approx(0.4)


def test_expressions_and_length_quartiles_are_slices(spark):
    texts = [" ".join(["w"] * n) for n in range(1, 41)]
    df = spark.createDataFrame([(t, "a", "a" if len(t) < 40 else "b") for t in texts],
                               "text string, label string, predicted_label string")  # fmt: skip
    by_expr = slice_metrics(df, "long", "length(text) >= 40", ["a", "b"])
    assert {r["value"]: r["count"] for r in by_expr.rows} == {"false": 20, "true": 20}  # 2n-1 chars
    q = slice_metrics(df, "length_quartile", length_quartile(df), ["a", "b"])
    assert [r["count"] for r in q.rows] == [10, 10, 10, 10]
    assert [r["flagged"] for r in q.rows] == [False, False, True, True]
    assert (
        df.select(length_quartile(df).alias("q")).filter(F.col("q").startswith("Q1")).count() == 10
    )
