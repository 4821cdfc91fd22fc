import logging

import pytest
from pyspark.ml import PipelineModel
from pyspark.sql import functions as F

from sparkloom.pipelines.baseline import plan_fits, run_baseline, with_balanced_weights
from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.config import BaselineConfig
from sparkloom.pipelines.ingest import run_ingest
from sparkloom.pipelines.synthetic import Corpus
from sparkloom.pipelines.text import run_features
from tests.conftest import make_config, make_docs, write_jsonl


def prepare(spark, tmp_path, docs, **baseline):
    write_jsonl(tmp_path / "in.jsonl", docs)
    cfg = make_config(
        tmp_path,
        ingest={"format": "json", "path": str(tmp_path / "in.jsonl"), "columns": {"id": "id"},
                "split": {"train": 0.6, "validation": 0.1, "test": 0.3}},
        baseline=baseline,
    )  # fmt: skip
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    run_ingest(spark, cfg, catalog)
    run_features(spark, cfg, catalog)
    return cfg, catalog


def test_baseline_beats_majority_guess_on_separable_data(spark, tmp_path):
    # imbalanced on purpose: guessing the big class alone scores about 0.6
    docs = make_docs(60, seed=1)
    docs = [d for d in docs if d["label"] == "sport" or int(d["id"][-3:]) < 20]
    cfg, catalog = prepare(spark, tmp_path, docs)
    result = run_baseline(spark, cfg, catalog)
    model = PipelineModel.load(catalog.path("baseline_model"))
    test = result.metrics["test"]
    assert test["majority_class_accuracy"] > 0.5
    assert test["accuracy"] >= 0.95 > test["majority_class_accuracy"] + 0.3
    assert test["num_examples"] == sum(sum(r) for r in result.confusion["test"])
    # the saved model goes from raw text to a label name
    scored = model.transform(spark.createDataFrame([("coach goal striker cup",)], "text string"))
    assert scored.first()["predicted_label"] == "sport"


def test_cross_validation_picks_from_the_grid(spark, tmp_path):
    cfg, catalog = prepare(
        spark, tmp_path, make_docs(20),
        tuning="cross_validation", num_folds=2,
        grid={"reg_param": [0.0, 10.0], "max_iter": [20], "standardization": [False]},
    )  # fmt: skip
    result = run_baseline(spark, cfg, catalog)
    assert len(result.grid) == 2
    assert {g["regParam"] for g in result.grid} == {0.0, 10.0}
    assert result.best_params["reg_param"] in (0.0, 10.0)
    assert result.tuning_metric == max(g["score"] for g in result.grid)


def test_rerun_is_skipped_and_force_refits(spark, tmp_path):
    cfg, catalog = prepare(spark, tmp_path, make_docs(10))
    first = run_baseline(spark, cfg, catalog)
    again = run_baseline(spark, cfg, catalog)
    assert again.skipped and again.metrics == first.metrics
    forced = run_baseline(spark, cfg, catalog, force=True)
    assert (
        not forced.skipped
        and forced.metrics["test"]["accuracy"] == first.metrics["test"]["accuracy"]
    )
    assert spark.read.parquet(catalog.path("features")).filter(
        F.col("split") == "test"
    ).count() == int(first.metrics["test"]["num_examples"])


def test_validation_tuning_fits_each_point_once_and_keeps_the_best_on_validation(
    spark, tmp_path, caplog
):
    cfg, catalog = prepare(
        spark, tmp_path, make_docs(20),
        tuning="validation", grid={"reg_param": [1e-4, 1.0, 1e3], "max_iter": [100],
                                   "standardization": [False]},
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="sparkloom.pipelines.baseline"):
        result = run_baseline(spark, cfg, catalog)
    model = PipelineModel.load(catalog.path("baseline_model"))
    # strongest penalty first; a penalty of 1000 cannot separate anything
    assert [g["regParam"] for g in result.grid] == [1e3, 1.0, 1e-4]
    assert result.grid[0]["score"] < max(g["score"] for g in result.grid) == result.tuning_metric
    best = max(result.grid, key=lambda g: g["score"])  # ties: the first, i.e. the stronger
    assert result.best_params["reg_param"] == best["regParam"]
    assert all(g["iterations"] >= 1 for g in result.grid) and result.converged
    # only the words the training split has are fitted, and the saved model knows which
    assert 0 < result.features_used < result.features_total == 65536
    assert sum("features are used" in r.message for r in caplog.records) == 1
    names = [type(s).__name__ for s in model.stages]
    assert names[-3:] == ["VectorSlicer", "LogisticRegressionModel", "IndexToString"]
    scored = model.transform(spark.createDataFrame([("coach goal striker cup",)], "text string"))
    assert scored.first()["predicted_label"] == "sport"


def test_a_model_that_stops_at_max_iter_or_at_the_grid_edge_says_so(spark, tmp_path, caplog):
    cfg, catalog = prepare(
        spark, tmp_path, make_docs(20), tuning="validation",
        grid={"reg_param": [0.0, 1e3], "max_iter": [2], "standardization": [False]},
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="sparkloom.pipelines.baseline"):
        result = run_baseline(spark, cfg, catalog)
    assert not result.converged and result.iterations == 2
    text = caplog.text
    assert "raise baseline.grid.max_iter" in text and "extend the grid" in text


def test_balanced_class_weights_make_every_class_weigh_the_same(spark):
    rows = [(0.0,)] * 6 + [(1.0,)] * 3 + [(2.0,)] * 1
    df = with_balanced_weights(spark.createDataFrame(rows, "label_index double"), "w")
    per_class = {r.label_index: r.total for r in df.groupBy("label_index").agg(
        F.sum("w").alias("total")).collect()}  # fmt: skip
    assert per_class == pytest.approx({0.0: 10 / 3, 1.0: 10 / 3, 2.0: 10 / 3})


def test_fits_at_once_shrink_when_the_coefficients_would_not_fit_the_driver(spark, caplog):
    bc = BaselineConfig(parallelism=4)  # the test session's driver has 2g
    assert plan_fits(spark, bc, classes=5, features=20_000) == 4
    with caplog.at_level(logging.INFO, logger="sparkloom.pipelines.baseline"):
        assert plan_fits(spark, bc, classes=20, features=1 << 18) == 1  # 1.3 GB a fit
    assert "1 fit(s) at once instead of baseline.parallelism=4" in caplog.text


@pytest.mark.slow
def test_twenty_classes_and_2_18_features_train_with_the_default_tuning(spark, tmp_path):
    """The case that ran out of an 8 GB driver: 20 classes x 2^18 hashed features x 20,000
    documents, tuned over the default grid (12 fits), here in the tests' 2 GB driver."""
    docs = Corpus(classes=20, seed=3).docs(20_000)
    docs.to_csv(tmp_path / "docs.csv", index=False)
    cfg = make_config(
        tmp_path,
        ingest={"format": "csv", "path": str(tmp_path / "docs.csv")},
        features={"tf": {"num_features": 1 << 18}, "idf": {"min_doc_freq": 2},
                  "sequence": {"enabled": False}},
    )  # fmt: skip
    cfg = cfg.model_copy(update={"baseline": BaselineConfig()})  # the defaults, all of them
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    run_ingest(spark, cfg, catalog)
    run_features(spark, cfg, catalog)
    result = run_baseline(spark, cfg, catalog)
    assert len(result.grid) == 12 and result.features_total == 1 << 18
    assert result.features_used < (1 << 18) // 5
    assert result.metrics["test"]["accuracy"] > 0.8  # chance is 0.05
