"""The image pipeline end to end on scikit-learn's digits: IDX files -> Spark ingest ->
pixel baseline -> a small CNN through a real TorchDistributor (gloo, 2 processes) -> MLflow."""

from __future__ import annotations

import json
import math
import os

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from sparkloom.models.data import make_dataloader
from sparkloom.models.quantize import load_int8
from sparkloom.models.registry import ImageScorer
from sparkloom.models.train import load_exported
from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.converter import make_spark_converter
from sparkloom.pipelines.runner import run_pipeline
from sparkloom.pipelines.sample_data import digits, write_idx
from sparkloom.pipelines.scoring import score
from tests.conftest import make_config

CNN = {
    "model": {"conv1_channels": 16, "conv2_channels": 32, "kernel_size": 3, "hidden_dim": 64,
              "dropout": 0.1},
    "augment": {"crop_padding": 1},
    "training": {"epochs": 12, "batch_size": 32, "optimizer": {"lr": 0.01},
                 "early_stopping": {"patience": 12}},
}  # fmt: skip


def digits_config(tmp_path, stages, **sections):
    images, labels = digits()
    write_idx(images, labels, tmp_path / "idx")
    return make_config(
        tmp_path,
        pipeline={"stages": stages},
        ingest={"format": "idx", "path": str(tmp_path / "idx"),
                "image": {"height": 8, "width": 8, "channels": 1}},
        baseline={"tuning": "none", "grid": {"reg_param": [0.01], "max_iter": [100]}},
        **sections,
    )  # fmt: skip


@pytest.mark.slow
def test_digits_baseline_and_cnn_through_torchdistributor(spark, tmp_path):
    cfg = digits_config(tmp_path, ["ingest", "features", "baseline", "cnn", "quantize"], cnn=CNN,
                        quantize={"source": "cnn", "calibration_rows": 256})  # fmt: skip
    outcome = run_pipeline(spark, cfg, list(cfg.pipeline.stages))

    ingest = outcome.results["ingest"]
    assert (ingest.rows_in, ingest.rows_out, ingest.rows_quarantined) == (1797, 1797, 0)
    baseline, cnn = outcome.results["baseline"], outcome.results["cnn"]
    assert baseline.metrics["test"]["accuracy"] >= 0.90
    assert cnn.metrics["test_accuracy"] >= 0.90  # a 10-class guess gets 0.10
    assert cnn.world_size == 2
    # loss at initialisation: the first epoch's training loss starts from ~ln(10)
    assert cnn.history[0]["train_loss"] < math.log(10) + 0.3

    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = outcome.stage_run_ids["cnn"]
    files = {a.path for a in client.list_artifacts(run, "plots")}
    assert {"plots/confusion_test.png", "plots/misclassified_test.png",
            "plots/learning_curves.png"} <= files  # fmt: skip
    # the misclassified images' Integrated Gradients maps, their completeness error logged
    assert "explain/saliency.png" in {a.path for a in client.list_artifacts(run, "explain")}
    metrics = client.get_run(run).data.metrics
    assert 0 <= metrics["attribution_relative_delta"] < 0.2
    assert metrics["test_accuracy"] == pytest.approx(cnn.metrics["test_accuracy"])
    cm = np.array(cnn.confusion["test"])  # per-class metrics are the confusion matrix's
    assert metrics["test_recall_3"] == pytest.approx(cm[3, 3] / cm[3].sum())
    assert metrics["test_precision_7"] == pytest.approx(cm[7, 7] / cm[:, 7].sum())
    errors = cnn.errors
    wrong = round((1 - cnn.metrics["test_accuracy"]) * sum(map(sum, cnn.confusion["test"])))
    assert len(errors) == min(wrong, 64) and all(e["label"] != e["pred"] for e in errors)

    # the stored model scores raw pixels the way training standardized them
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    model_dir = catalog.local_path("cnn_model")
    with open(os.path.join(model_dir, "preprocess.json")) as f:
        pre = json.load(f)
    assert (
        pre["shape"] == [1, 8, 8] and pre["mean"] == catalog.manifest("ingested")["image"]["mean"]
    )
    scorer = ImageScorer(load_exported(model_dir, "cnn"), pre["mean"], pre["std"]).eval()
    test = catalog.read("ingested", "ingest").filter("split = 'test'").orderBy("id").collect()
    pixels = torch.from_numpy(
        np.frombuffer(b"".join(bytes(r["image"]) for r in test), np.uint8).reshape(-1, 1, 8, 8).copy()
    )  # fmt: skip
    with torch.no_grad():
        predicted = scorer(pixels).argmax(-1).numpy()
    truth = np.array([r["label_index"] for r in test])
    assert (predicted == truth).mean() == pytest.approx(cnn.metrics["test_accuracy"], abs=1e-9)

    # static int8: the conv trunk runs quantized kernels, ranges from 256 training images
    q = outcome.results["quantize"].metrics
    assert q["float_test_accuracy"] == pytest.approx(cnn.metrics["test_accuracy"], abs=1e-6)
    assert abs(q["accuracy_delta"]) <= 0.02 and q["agreement"] >= 0.95, q
    assert q["int8_bytes"] < 0.5 * q["float_bytes"]  # a 58 KB model: headers weigh; ~1/4 at size
    int8_dir = catalog.local_path("cnn_int8")
    with open(os.path.join(int8_dir, "quantization.json")) as f:
        how = json.load(f)
    assert how["method"] == "static" and how["static"] == [
        "conv1",
        "conv2",
        "fc1",
        "head.classifier",
    ]
    assert how["calibration_rows"] == 256
    int8 = load_int8(load_exported(int8_dir, "cnn"), how, int8_dir)
    assert any(type(m).__name__ == "ConvReLU2d" for m in int8.modules())  # BN folded, ReLU fused
    in_process = ImageScorer(int8, pre["mean"], pre["std"]).eval()
    with torch.no_grad():
        want = in_process(pixels).numpy()
    assert (want.argmax(-1) == truth).mean() == pytest.approx(q["test_accuracy"], abs=1e-6)

    # batch scoring of the quantize run: the same int8 model, built once per executor; static
    # scales are fixed, so Spark's batches give the in-process probabilities
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    rows = catalog.read("ingested", "ingest").filter("split = 'test'").select("id", "image")
    uri = f"runs:/{outcome.stage_run_ids['quantize']}/model"
    scored, quarantine, ref = score(rows, uri, input_col="image", prepared=True)
    assert ref.quantized["method"] == "static" and quarantine.count() == 0
    got = {r["id"]: r["probabilities"] for r in scored.collect()}
    assert np.allclose([got[r["id"]] for r in test], want, atol=1e-6)


def test_image_batches_from_the_converter_are_uint8_and_standardized_once(spark, tmp_path):
    """Spark image bytes -> converter cache -> loader tensors: exact pixels, eval untouched."""
    from sparkloom.models.augment import AugmentConfig, ImageBatchTransform
    from sparkloom.models.data import ColumnTransform

    images, labels = digits()
    rows = [(f"i{k}", bytearray(images[k].tobytes()), int(labels[k])) for k in range(100)]
    df = spark.createDataFrame(rows, "id string, image binary, label int")
    conv = make_spark_converter(df, str(tmp_path / "cache"), shapes={"image": [1, 8, 8]})
    raw = next(iter(make_dataloader(conv.local_path, 100, shuffle=False)))
    assert raw["image"].dtype == torch.uint8 and raw["image"].shape == (100, 1, 8, 8)
    order = [int(i[1:]) for i in raw["id"]]
    assert torch.equal(raw["image"][:, 0], torch.from_numpy(images[order]))

    def tf(train):
        fn = ImageBatchTransform((1, 8, 8), [0.3], [0.4], AugmentConfig(crop_padding=2), train)
        return ColumnTransform("image", fn)

    def epoch(train, seed):
        loader = make_dataloader(conv.local_path, 25, shuffle=train, seed=seed, transform=tf(train))
        return torch.cat([b["image"] for b in loader])

    assert torch.equal(epoch(True, 1), epoch(True, 1))  # seeded: the same augmented epoch
    assert not torch.equal(epoch(True, 1), epoch(True, 2))
    expected = (raw["image"].float() / 255 - 0.3) / 0.4
    assert torch.equal(epoch(False, 1), expected)  # evaluation: standardized, never augmented
