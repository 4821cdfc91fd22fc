"""The distill stage: a TextCNN student trained through TorchDistributor (2 processes) on an
LSTM teacher's logits, computed once in Spark by batch scoring the teacher."""

from __future__ import annotations

import json
import os

import mlflow
import pytest

from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.errors import ConfigError
from sparkloom.pipelines.runner import run_pipeline
from sparkloom.pipelines.scoring import score
from tests.conftest import make_config

SMALL = {"training": {"epochs": 3, "batch_size": 8, "optimizer": {"lr": 0.02}}}


def distill_config(tmp_path, text_dirs, stages: list[str], mode: str = "precomputed"):
    return make_config(
        tmp_path,
        pipeline={"stages": stages},
        ingest={"format": "text_dirs", "path": str(text_dirs)},
        features={"sequence": {"min_df": 1, "max_length": 32}},
        lstm={"model": {"embed_dim": 16, "hidden_dim": 16, "num_layers": 1}, **SMALL},
        textcnn={"model": {"embed_dim": 16, "num_filters": 8}, **SMALL},
        distill={"teacher": "lstm", "student": "textcnn", "temperature": 2.0, "alpha": 0.7,
                 "teacher_logits": mode},
    )  # fmt: skip


@pytest.mark.slow
def test_a_student_trains_on_the_teachers_logits_precomputed_or_on_the_fly(
    spark, tmp_path, text_dirs
):
    """Precomputed: the LSTM teacher's logits come from Spark batch scoring. On the fly: the
    teacher runs inside the 2 training processes on the student's batches and gives the
    soft targets Spark stored (log-probabilities: the same up to a constant per row, which
    softmax does not see), so the same seed trains the same student. One teacher serves
    both (the second run finds it current)."""
    stages = ["ingest", "features", "lstm", "textcnn", "distill", "compare"]
    cfg = distill_config(tmp_path, text_dirs, stages)
    outcome = run_pipeline(spark, cfg, stages)
    plain, student = outcome.results["textcnn"], outcome.results["distill"]
    assert student.model == "textcnn" and student.world_size == 2
    assert student.num_parameters == plain.num_parameters  # the same architecture and config
    assert student.data_stats["teacher_rows"] == sum(
        outcome.results["ingest"].splits.values()
    )  # one teacher pass per example, every split
    # another objective from the same start: the training losses differ (soft targets)
    assert student.history[0]["train_loss"] != pytest.approx(plain.history[0]["train_loss"])
    assert student.metrics["test_accuracy"] >= 0.5  # 3 topics: a guess gets ~0.33

    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    model_dir = catalog.local_path("distill_model")
    with open(os.path.join(model_dir, "distill.json")) as f:
        assert json.load(f) == {"teacher": "lstm", "student": "textcnn", "temperature": 2.0,
                                "alpha": 0.7, "teacher_logits": "precomputed"}  # fmt: skip
    # its size and scoring speed beside the teacher's, in its run
    logged = mlflow.tracking.MlflowClient(cfg.mlflow.tracking_uri).get_run(
        outcome.stage_run_ids["distill"]).data.metrics  # fmt: skip
    assert logged["student_parameters"] == student.num_parameters
    assert logged["teacher_parameters"] == outcome.results["lstm"].num_parameters
    assert logged["student_rows_per_s"] > 0 and logged["teacher_rows_per_s"] > 0
    assert logged["student_size_vs_teacher"] == pytest.approx(
        logged["student_bytes"] / logged["teacher_bytes"])  # fmt: skip
    names = {r.stage for r in outcome.results["compare"].report.rows}
    assert {"lstm", "textcnn", "textcnn-distilled"} <= names

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    test = catalog.read("ingested", "ingest").filter("split = 'test'").select("id", "text")
    scored, _, ref = score(test, f"runs:/{outcome.stage_run_ids['distill']}/model")
    assert ref.stage == "textcnn" and scored.count() == test.count()

    pre = student
    cfg = distill_config(tmp_path, text_dirs, ["ingest", "features", "lstm", "distill"],
                         "on_the_fly")  # fmt: skip
    again = run_pipeline(spark, cfg, list(cfg.pipeline.stages)).results
    assert again["lstm"].skipped  # the same teacher
    fly = again["distill"]
    assert not fly.skipped and "teacher_rows" not in fly.data_stats  # no scoring pass in Spark
    assert fly.world_size == 2
    for a, b in zip(pre.history, fly.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    assert fly.metrics["test_accuracy"] == pre.metrics["test_accuracy"]
    with open(os.path.join(model_dir, "distill.json")) as f:
        assert json.load(f)["teacher_logits"] == "on_the_fly"


def test_on_the_fly_needs_a_teacher_that_reads_the_students_ids(tmp_path):
    with pytest.raises(ConfigError, match="use teacher_logits=precomputed"):
        make_config(tmp_path, pipeline={"stages": ["ingest"]},
                    distill={"teacher": "bert", "teacher_logits": "on_the_fly"})  # fmt: skip
