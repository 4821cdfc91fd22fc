"""End to end: the text pipeline with a rank killed (os._exit) mid-epoch on the first try
finishes through the launcher's retry, resumes from the last checkpoint in the same MLflow
run, and ends with the weights and metrics of an uninterrupted run with the same seed."""

from __future__ import annotations

import os

import pytest
import torch
from mlflow.tracking import MlflowClient

from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.runner import run_pipeline
from tests.conftest import make_config

LSTM = {
    "model": {"embed_dim": 16, "hidden_dim": 16, "num_layers": 1, "dropout": 0.2},
    "training": {"epochs": 3, "batch_size": 8, "optimizer": {"lr": 0.02},
                 "checkpoint_every_steps": 2},
    "distributor": {"max_retries": 1},
}  # fmt: skip


def pipeline(tmp_path, text_dirs):
    return make_config(
        tmp_path,
        pipeline={"stages": ["ingest", "features", "baseline", "lstm"]},
        ingest={"format": "text_dirs", "path": str(text_dirs)},
        features={"sequence": {"min_df": 1}},
        lstm=LSTM,
    )


def final_weights(spark, cfg) -> dict[str, torch.Tensor]:
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    model_dir = catalog.local_path("lstm_model")
    return torch.load(os.path.join(model_dir, "state_dict.pt"), weights_only=True)


@pytest.mark.slow
def test_a_rank_killed_mid_epoch_is_retried_and_ends_like_an_uninterrupted_run(
    spark, tmp_path, text_dirs, monkeypatch
):
    clean_cfg = pipeline(tmp_path / "clean", text_dirs)
    clean = run_pipeline(spark, clean_cfg, list(clean_cfg.pipeline.stages)).results["lstm"]

    cfg = pipeline(tmp_path / "faulty", text_dirs)
    # rank 1 dies after global step 5 (mid-epoch 2; the last checkpoint is step 4)
    monkeypatch.setenv("SPARKLOOM_FAULT", "rank=1,step=5,mode=exit,attempt=1")
    outcome = run_pipeline(spark, cfg, list(cfg.pipeline.stages))
    retried = outcome.results["lstm"]
    assert retried.attempts == 2
    assert retried.resumed_from is not None and retried.resumed_from["step"] == 4

    want, got = final_weights(spark, clean_cfg), final_weights(spark, cfg)
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=0), name
    assert retried.metrics == pytest.approx(clean.metrics, abs=1e-6)
    assert [h["val_loss"] for h in retried.history] == pytest.approx(
        [h["val_loss"] for h in clean.history], abs=1e-6
    )

    # one MLflow run for the stage, finished, that says it took two tries
    client = MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`sparkloom.stage` = 'lstm'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["train_attempts"] == 2
    assert runs[0].data.tags["sparkloom.resumed_from_step"] == "4"


@pytest.mark.slow
def test_a_resumed_bert_pretraining_keeps_its_vocabulary(spark, tmp_path, text_dirs, monkeypatch):
    """WordPiece training breaks ties differently from run to run; a rerun that resumes
    must tokenize with the vocabulary its checkpoint was trained on, not a new one."""
    import json

    from sparkloom.pipelines.runner import StageFailed

    cfg = make_config(
        tmp_path,
        pipeline={"stages": ["ingest", "bert_pretrain"]},
        ingest={"format": "text_dirs", "path": str(text_dirs)},
        bert_pretrain={
            "tokenizer": {"vocab_size": 120, "min_frequency": 1},
            "model": {"preset": "tiny", "max_position_embeddings": 64},
            "max_length": 32,
            "training": {"batch_size": 16, "epochs": 2, "checkpoint_every_steps": 2},
            "distributor": {"max_retries": 0},
        },
    )  # fmt: skip
    monkeypatch.setenv("SPARKLOOM_FAULT", "rank=1,step=3,mode=exit")
    with pytest.raises(StageFailed):
        run_pipeline(spark, cfg, list(cfg.pipeline.stages))
    work = tmp_path / "data" / "t" / "bert_pretrain_work"
    (kept,) = list(work.glob("*/tokenizer.json"))
    first = json.loads(kept.read_text())["tokenizer"]

    monkeypatch.delenv("SPARKLOOM_FAULT")
    result = run_pipeline(spark, cfg, list(cfg.pipeline.stages)).results["bert_pretrain"]
    assert result.resumed_from is not None and result.resumed_from["step"] == 2
    model_dir = tmp_path / "data" / "t" / "bert_pretrain_model"
    assert (model_dir / "tokenizer.json").read_text() == first
