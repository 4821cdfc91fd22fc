"""The whole text pipeline under MLflow, on a tiny corpus, with a real sqlite store."""

from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from sparkloom.pipelines.runner import run_pipeline
from tests.conftest import make_config


@pytest.mark.slow
def test_pipeline_logs_parent_and_child_runs_and_is_idempotent(spark, tmp_path, text_dirs):
    cfg = make_config(tmp_path, ingest={"format": "text_dirs", "path": str(text_dirs)})
    outcome = run_pipeline(spark, cfg, ["ingest", "features", "baseline"])

    client = MlflowClient(cfg.mlflow.tracking_uri)
    parent = client.get_run(outcome.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["ingest.format"] == "text_dirs"
    assert parent.data.params["baseline.grid.reg_param"] == "[0.01]"
    assert "config/resolved.yaml" in [
        a.path for a in client.list_artifacts(outcome.run_id, "config")
    ]

    exp = client.get_experiment_by_name("tests")
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{outcome.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == ["baseline", "features", "ingest"]
    by_name = {r.info.run_name: r for r in children}
    assert by_name["ingest"].data.metrics["rows_in"] == 90
    assert by_name["ingest"].data.metrics["rows_quarantined"] == 0
    assert by_name["ingest"].data.params["ingest.split.seed"] == "42"
    base = by_name["baseline"]
    assert base.data.metrics["test_accuracy"] >= 0.9
    assert "test_f1" in base.data.metrics and "test_recall_sport" in base.data.metrics
    plots = [a.path for a in client.list_artifacts(base.info.run_id, "plots")]
    assert "plots/confusion_test.png" in plots
    png = client.download_artifacts(base.info.run_id, "plots/confusion_test.png", str(tmp_path))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert outcome.model_uri is not None
    model_files = [a.path for a in client.list_artifacts(base.info.run_id, "model")]
    assert "model/MLmodel" in model_files

    # the logged model loads back and scores raw text
    loaded = mlflow.spark.load_model(outcome.model_uri)
    scored = loaded.transform(spark.createDataFrame([("chef garlic pasta oven",)], "text string"))
    assert scored.first()["predicted_label"] == "food"

    # a second run with the same inputs and config skips every stage and keeps the data
    before = sorted(
        map(tuple, spark.read.parquet(f"{cfg.pipeline.data_root}/t/ingested").collect())
    )
    again = run_pipeline(spark, cfg, ["ingest", "features", "baseline"])
    assert all(r.skipped for r in again.results.values())
    after = sorted(map(tuple, spark.read.parquet(f"{cfg.pipeline.data_root}/t/ingested").collect()))
    assert before == after and len(after) == 90
    assert again.results["baseline"].metrics == outcome.results["baseline"].metrics


def test_failing_stage_marks_runs_failed(spark, tmp_path):
    cfg = make_config(tmp_path, ingest={"format": "csv", "path": str(tmp_path / "missing.csv")})
    with pytest.raises(Exception, match="does not exist"):
        run_pipeline(spark, cfg, ["ingest"])
    client = MlflowClient(cfg.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert runs and {r.info.status for r in runs} == {"FAILED"}


@pytest.mark.slow
def test_a_stage_that_failed_after_its_commit_is_redone_not_skipped(
    spark, tmp_path, text_dirs, monkeypatch
):
    """The baseline commits its model, then logging it to MLflow fails: the output is current
    but no finished run holds its metrics or model. The next run must redo that stage (and
    only it), or `register` would find nothing to register."""
    cfg = make_config(tmp_path, ingest={"format": "text_dirs", "path": str(text_dirs)})
    stages = ["ingest", "features", "baseline"]

    def unreachable(*args, **kwargs):
        raise OSError("artifact store unreachable")

    with monkeypatch.context() as m:
        m.setattr("sparkloom.pipelines.runner.tracking.log_spark_model", unreachable)
        with pytest.raises(Exception, match="stage 'baseline' failed: OSError"):
            run_pipeline(spark, cfg, stages)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name("tests").experiment_id
    failed = client.search_runs([exp], "tags.`sparkloom.stage` = 'baseline'")
    assert [r.info.status for r in failed] == ["FAILED"]
    assert (Path(cfg.pipeline.data_root) / "t" / "baseline_model" / "_manifest.json").exists()

    again = run_pipeline(spark, cfg, stages)
    skipped = {s: r.skipped for s, r in again.results.items()}
    assert skipped == {"ingest": True, "features": True, "baseline": False}
    assert again.model_uri is not None
    done = client.search_runs(
        [exp], "tags.`sparkloom.stage` = 'baseline' and attributes.status = 'FINISHED'"
    )
    assert len(done) == 1 and done[0].data.metrics["test_accuracy"] >= 0.9

    third = run_pipeline(spark, cfg, stages)  # now recorded: every stage is up to date
    assert all(r.skipped for r in third.results.values())
    # the skipped baseline points at the model of the run that made it, not a new copy
    assert third.model_uri == f"runs:/{done[0].info.run_id}/model"
    skipped_run = client.get_run(third.stage_run_ids["baseline"])
    assert not client.list_artifacts(skipped_run.info.run_id, "model")
