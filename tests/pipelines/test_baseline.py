from pyspark.sql import functions as F

from pipelines.baseline import run_baseline
from pipelines.catalog import Catalog
from pipelines.ingest import run_ingest
from pipelines.text import run_features
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
    result, model = run_baseline(spark, cfg, catalog)
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
        tuning="cross_validation", num_folds=2, grid={"reg_param": [0.0, 10.0], "max_iter": [20]},
    )  # fmt: skip
    result, _ = run_baseline(spark, cfg, catalog)
    assert len(result.grid) == 2
    assert {g["regParam"] for g in result.grid} == {0.0, 10.0}
    assert result.best_params["reg_param"] in (0.0, 10.0)
    assert result.tuning_metric == max(g["score"] for g in result.grid)


def test_rerun_is_skipped_and_force_refits(spark, tmp_path):
    cfg, catalog = prepare(spark, tmp_path, make_docs(10))
    first, _ = run_baseline(spark, cfg, catalog)
    again, _ = run_baseline(spark, cfg, catalog)
    assert again.skipped and again.metrics == first.metrics
    forced, _ = run_baseline(spark, cfg, catalog, force=True)
    assert (
        not forced.skipped
        and forced.metrics["test"]["accuracy"] == first.metrics["test"]["accuracy"]
    )
    assert spark.read.parquet(catalog.path("features")).filter(
        F.col("split") == "test"
    ).count() == int(first.metrics["test"]["num_examples"])
