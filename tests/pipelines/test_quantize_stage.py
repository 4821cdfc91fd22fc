"""The quantize stage on a trained LSTM: an int8 copy measured beside the float model on the
test split, listed in the comparison, and scored in batch like the in-process int8 model."""

from __future__ import annotations

import json
import os

import mlflow
import numpy as np
import pytest
import torch

from sparkloom.models.quantize import quantize
from sparkloom.models.registry import Scorer
from sparkloom.models.train import load_exported
from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.runner import run_pipeline
from sparkloom.pipelines.scoring import score
from tests.conftest import make_config


def _test_split_ids(catalog: Catalog, length: int = 32) -> tuple[list, torch.Tensor]:
    """The test split's rows of the features stage and their token ids, right-padded."""
    feats = catalog.read("features", "features").filter("split = 'test'").collect()
    ids = torch.zeros(len(feats), length, dtype=torch.int64)
    for i, r in enumerate(feats):
        ids[i, : len(r["token_ids"])] = torch.tensor(r["token_ids"])
    return feats, ids


@pytest.mark.slow
def test_quantize_stage_measures_logs_compares_and_scores(spark, tmp_path, text_dirs):
    cfg = make_config(
        tmp_path,
        pipeline={"stages": ["ingest", "features", "lstm", "quantize", "register", "compare"]},
        ingest={"format": "text_dirs", "path": str(text_dirs)},
        features={"sequence": {"min_df": 1, "max_length": 32}},
        lstm={"model": {"embed_dim": 16, "hidden_dim": 16, "num_layers": 1},
              "training": {"epochs": 4, "batch_size": 8, "optimizer": {"lr": 0.02}}},
        quantize={"source": "lstm"},
        register={"name": "tiny-int8", "metric": "test_f1", "candidates": ["quantize"]},
    )  # fmt: skip
    outcome = run_pipeline(spark, cfg, list(cfg.pipeline.stages))
    q = outcome.results["quantize"]
    m = q.metrics
    lstm = outcome.results["lstm"]
    assert q.name == "lstm-int8" and m["rows"] == sum(map(sum, lstm.confusion["test"]))
    assert m["float_test_accuracy"] == pytest.approx(lstm.metrics["test_accuracy"], abs=1e-9)
    assert abs(m["accuracy_delta"]) <= 0.05 and m["agreement"] >= 0.9
    assert m["int8_bytes"] < m["float_bytes"] and m["int8_rows_per_s"] > 0
    assert sum(map(sum, m["confusion"])) == m["rows"] and 0 < m["test_f1"] <= 1

    # the int8 model is a registry candidate like any classifier, ranked on its own F1
    reg = outcome.results["register"]
    assert reg.promoted and [c["stage"] for c in reg.candidates] == ["quantize"]
    assert reg.candidates[0]["run_id"] == outcome.stage_run_ids["quantize"]
    assert reg.candidates[0]["value"] == pytest.approx(m["test_f1"])

    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    int8_dir = catalog.local_path("lstm_int8")
    with open(os.path.join(int8_dir, "quantization.json")) as f:
        recipe = json.load(f)
    assert recipe["source"] == "lstm" and recipe["method"] == "dynamic"
    torch.load(os.path.join(int8_dir, "state_dict.pt"), weights_only=True)  # plain weights

    report = outcome.results["compare"].report
    names = {r.stage: r for r in report.rows}
    assert {"lstm", "lstm-int8"} <= set(names)
    assert names["lstm-int8"].metrics["accuracy"] == pytest.approx(m["test_accuracy"])
    assert run_pipeline(spark, cfg, ["quantize"]).results["quantize"].skipped

    # batch scoring of the champion, the int8 model, built once per executor
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    test = catalog.read("ingested", "ingest").filter("split = 'test'").select("id", "text")
    scored, _, ref = score(test, "models:/tiny-int8@champion")
    assert ref.run_id == outcome.stage_run_ids["quantize"]
    assert ref.quantized["method"] == "dynamic" and ref.stage == "lstm"
    got = {r["id"]: r["probabilities"] for r in scored.collect()}
    int8 = Scorer(quantize(load_exported(int8_dir, "lstm"))).eval()
    feats, ids = _test_split_ids(catalog)
    with torch.no_grad():
        want = int8(ids).numpy()
    # dynamic quantization scales activations per batch, so Spark's 64-row batches give
    # slightly other probabilities than one in-process batch: close, same predictions
    have = np.array([got[r["id"]] for r in feats])
    assert np.allclose(have, want, atol=0.02)
    assert (have.argmax(-1) == want.argmax(-1)).mean() >= 0.95


def test_a_static_int8_alexnet_is_logged_as_a_model_mlflow_loads(tmp_path):
    """The FX graph modules of a static int8 AlexNet do not pickle; it is logged as
    TorchScript and scores raw pixels like the int8 model it was made from."""
    from sparkloom.models.quantize import INT8_WEIGHTS, recipe, static_quantize
    from sparkloom.models.registry import ImageScorer, build_model
    from sparkloom.models.train import export
    from sparkloom.pipelines import tracking

    torch.manual_seed(0)
    cfg = {"in_channels": 1, "height": 16, "width": 16, "num_classes": 4, "width_mult": 0.25}
    model = build_model("alexnet", cfg).eval()
    how = {**recipe("alexnet"), "source": "alexnet"}
    int8 = static_quantize(model, how, torch.randn(32, 1, 16, 16))
    export(model, str(tmp_path))
    files = tmp_path / "export"
    torch.save(int8.state_dict(), files / INT8_WEIGHTS)
    (files / "quantization.json").write_text(json.dumps(how))
    pre = {"shape": [1, 16, 16], "mean": [0.1], "std": [0.3]}
    (files / "preprocess.json").write_text(json.dumps(pre))

    # its own store and experiment: an earlier test's active experiment id is not in it
    tracking.ensure_experiment(f"sqlite:///{tmp_path / 'mlflow.db'}", "int8")
    with mlflow.start_run():
        uri = tracking.log_torch_model(str(files), "alexnet", "model")
    logged = mlflow.pytorch.load_model(uri)
    pixels = torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        want = ImageScorer(int8, pre["mean"], pre["std"]).eval()(pixels)
        assert torch.allclose(logged(pixels), want, atol=1e-6)


@pytest.mark.slow
def test_a_static_int8_textcnn_is_measured_logged_and_scored(spark, tmp_path, text_dirs):
    """quantize.method=static on a TextCNN: calibrated on training rows, its int8 weights
    stored; batch scoring rebuilds exactly that model, and the model MLflow logged
    (TorchScript) scores sequences of another length the same."""
    from sparkloom.models.quantize import load_int8

    cfg = make_config(
        tmp_path,
        pipeline={"stages": ["ingest", "features", "textcnn", "quantize"]},
        ingest={"format": "text_dirs", "path": str(text_dirs)},
        features={"sequence": {"min_df": 1, "max_length": 32}},
        textcnn={"model": {"embed_dim": 16, "num_filters": 8},
                 "training": {"epochs": 4, "batch_size": 8, "optimizer": {"lr": 0.02}}},
        quantize={"source": "textcnn", "method": "static", "calibration_rows": 40},
    )  # fmt: skip
    outcome = run_pipeline(spark, cfg, list(cfg.pipeline.stages))
    m = outcome.results["quantize"].metrics
    assert outcome.results["quantize"].name == "textcnn-int8"
    assert m["float_test_accuracy"] == pytest.approx(
        outcome.results["textcnn"].metrics["test_accuracy"], abs=1e-9
    )
    assert abs(m["accuracy_delta"]) <= 0.05 and m["agreement"] >= 0.9

    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    int8_dir = catalog.local_path("textcnn_int8")
    with open(os.path.join(int8_dir, "quantization.json")) as f:
        how = json.load(f)
    assert how["method"] == "static" and how["calibration_rows"] == 40

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    test = catalog.read("ingested", "ingest").filter("split = 'test'").select("id", "text")
    scored, _, ref = score(test, f"runs:/{outcome.stage_run_ids['quantize']}/model")
    assert ref.quantized["method"] == "static" and ref.stage == "textcnn"
    got = {r["id"]: r["probabilities"] for r in scored.collect()}
    int8 = Scorer(load_int8(load_exported(int8_dir, "textcnn"), how, int8_dir)).eval()
    feats, ids = _test_split_ids(catalog)
    with torch.no_grad():
        want = int8(ids).numpy()
        logged = mlflow.pytorch.load_model(outcome.model_uri)
        assert torch.allclose(logged(ids[:5, :20]), int8(ids[:5, :20]), atol=1e-6)
    have = np.array([got[r["id"]] for r in feats])
    assert np.allclose(have, want, atol=1e-5)  # fixed scales: the same in any batch
