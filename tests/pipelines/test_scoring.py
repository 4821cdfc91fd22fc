"""Batch scoring from MLflow model URIs: the baseline and the LSTM score a DataFrame of raw
text with their own preprocessing, and agree with the models run in process (with the
temperature each fitted on validation applied, evaluation.calibrate=temperature)."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from pyspark.sql import functions as F

from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.runner import run_pipeline
from sparkloom.pipelines.scoring import score
from tests.conftest import TOPICS, make_config


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


LSTM = {"model": {"embed_dim": 16, "hidden_dim": 16, "num_layers": 1},
        "training": {"epochs": 3, "batch_size": 8, "optimizer": {"lr": 0.02}}}  # fmt: skip


@pytest.mark.slow
def test_scores_equal_the_in_process_models(spark, tmp_path, text_dirs, monkeypatch):
    cfg = make_config(
        tmp_path,
        pipeline={"stages": ["ingest", "features", "baseline", "lstm", "register", "score"]},
        ingest={"format": "text_dirs", "path": str(text_dirs)},
        features={"idf": {"min_doc_freq": 0}, "sequence": {"min_df": 1, "max_length": 32}},
        lstm=LSTM,
        evaluation={"calibrate": "temperature", "slices": ["length_quartile", "label"]},
    )
    outcome = run_pipeline(spark, cfg, list(cfg.pipeline.stages))
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    client = mlflow.tracking.MlflowClient()
    temperature = {}
    for stage in ("baseline", "lstm"):  # calibrated on validation, audited on test, logged
        cal = outcome.results[stage].calibration
        assert cal["applied"] and cal["fitted_on"] == "validation" and cal["temperature"] > 0
        assert cal["val_nll_calibrated"] <= cal["val_nll"] + 1e-9
        temperature[stage] = cal["temperature"]
        run = client.get_run(outcome.stage_run_ids[stage])
        assert run.data.metrics["temperature"] == pytest.approx(cal["temperature"])
        assert {"test_ece", "test_ece_calibrated"} <= set(run.data.metrics)
        logged = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert "plots/reliability_test.png" in logged
        slices = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/slices.json")["slices"]
        assert [r["name"] for r in slices] == ["length_quartile", "label"]
        n_test = sum(map(sum, outcome.results[stage].confusion["test"]))
        assert all(sum(row["count"] for row in r["rows"]) == n_test for r in slices)
        labels = outcome.results[stage].labels  # one slice per label
        assert sorted(row["value"] for row in slices[1]["rows"]) == sorted(labels)
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    test = catalog.read("ingested", "ingest").filter("split = 'test'").select("id", "text")

    # the baseline's top terms per class are its topic's words
    terms = mlflow.artifacts.load_dict(
        f"runs:/{outcome.stage_run_ids['baseline']}/explain/top_terms.json"
    )
    for label, words in TOPICS.items():
        top = terms["per_class"][label]["positive"][0]["words"]
        assert set(top) & set(words), (label, top)
    # the LSTM's attributions: the chosen test rows, each summing to its logit gap
    lstm_run = outcome.stage_run_ids["lstm"]
    att = mlflow.artifacts.load_dict(f"runs:/{lstm_run}/explain/attributions.json")
    assert 2 <= len(att["examples"]) <= 4  # examples_correct 2, examples_wrong up to 2
    for e in att["examples"]:
        assert len(e["tokens"]) == len(e["attributions"]) > 0
        assert abs(sum(e["attributions"]) - e["logit_gap"]) == pytest.approx(
            abs(e["delta"]), abs=1e-5
        )
        assert abs(e["delta"]) <= 0.05 * max(1.0, abs(e["logit_gap"]))
    # the champion's model card, logged to its run by register, and by the CLI
    champion_run = outcome.results["register"].candidates[0]["run_id"]
    card = mlflow.artifacts.load_text(f"runs:/{champion_run}/model_card/model_card.md")
    for heading in ("## Data", "## Training", "## Metrics", "## Calibration", "## Slices",
                    "## Champion decision"):  # fmt: skip
        assert heading in card
    assert "length_quartile" in card and "champion" in card

    # the score stage: the champion scores the test split from raw text, as its run measured
    champion = outcome.results["register"].candidates[0]
    s = outcome.results["score"]
    assert (s.model_uri, s.run_id, s.model_stage) == (
        "models:/t@champion", champion["run_id"], champion["stage"])  # fmt: skip
    assert (s.rows_in, s.rows_out, s.quarantined) == (test.count(), test.count(), 0)
    assert s.accuracy == pytest.approx(champion["value"], abs=1e-9) == s.model_accuracy
    stored = catalog.read("scores", "score")
    assert stored.count() == s.rows_out and set(stored.columns) >= {
        "id",
        "label",
        "predicted_label",
    }

    def no_download(*args, **kwargs):
        raise AssertionError(f"an up-to-date score stage downloaded {kwargs or args}")

    with monkeypatch.context() as m:  # same data, section and champion: skipped, and the
        m.setattr("mlflow.artifacts.download_artifacts", no_download)  # model not fetched
        again = run_pipeline(spark, cfg, ["score"])
    assert again.results["score"].skipped and again.results["score"].accuracy == s.accuracy
    extra = spark.createDataFrame([("blank", "  "), ("null", None)], "id string, text string")
    df = test.unionByName(extra)
    n_test = test.count()

    # baseline: the logged PipelineModel, against the catalog's copy run in process
    scored, quarantine, ref = score(df, f"runs:/{outcome.stage_run_ids['baseline']}/model")
    got = {r["id"]: r for r in scored.collect()}
    assert ref.stage == "baseline" and len(got) == n_test
    assert sorted(r["id"] for r in quarantine.collect()) == ["blank", "null"]
    from pyspark.ml import PipelineModel

    local = PipelineModel.load(catalog.path("baseline_model")).transform(test).collect()
    for r in local:  # the stored model's probabilities at the fitted temperature
        assert got[r["id"]]["predicted_label"] == r["predicted_label"]
        want = softmax(np.log(r["probability"].toArray()) / temperature["baseline"])
        assert np.allclose(got[r["id"]]["probabilities"], want, atol=1e-6)

    # lstm: Spark-side tokens -> the model's vocab.txt -> predict_batch_udf
    scored, quarantine, ref = score(df, f"runs:/{outcome.stage_run_ids['lstm']}/model")
    got = {r["id"]: r for r in scored.collect()}
    assert ref.stage == "lstm" and len(got) == n_test and quarantine.count() == 2
    from sparkloom.models.registry import Scorer
    from sparkloom.models.train import load_exported

    model = Scorer(load_exported(catalog.local_path("lstm_model"), "lstm"))
    feats = catalog.read("features", "features").filter("split = 'test'").select("id", "token_ids")
    rows = feats.collect()
    ids = torch.zeros(len(rows), 32, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r["token_ids"])] = torch.tensor(r["token_ids"])
    with torch.no_grad():
        want = softmax(np.log(model.eval()(ids).numpy()) / temperature["lstm"])
    labels = ref.labels
    for r, p in zip(rows, want, strict=True):
        assert np.allclose(got[r["id"]]["probabilities"], p, atol=1e-5)
        assert got[r["id"]]["predicted_label"] == labels[int(np.argmax(p))]
    assert scored.filter(F.size("probabilities") != len(labels)).count() == 0

    # the CLI, in its own process (it stops its SparkSession): the registered champion
    import subprocess
    import sys

    client.create_registered_model("scoring-test")
    v = mlflow.register_model(f"runs:/{outcome.stage_run_ids['lstm']}/model", "scoring-test")
    client.set_registered_model_alias("scoring-test", "champion", v.version)
    src, out = tmp_path / "texts.parquet", tmp_path / "scores"
    df.write.parquet(str(src))
    done = subprocess.run(
        [sys.executable, "-m", "sparkloom.jobs.cli", "score", "--model", "models:/scoring-test@champion",
         "--input", str(src), "--output", str(out), "--tracking-uri", cfg.mlflow.tracking_uri],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"scored {n_test} rows" in done.stdout and "2 quarantined" in done.stdout
    written = {r["id"]: r["predicted_label"] for r in spark.read.parquet(str(out)).collect()}
    assert written == {k: v["predicted_label"] for k, v in got.items()}
    done = subprocess.run(
        [sys.executable, "-m", "sparkloom.jobs.cli", "card", "models:/t@champion",
         "--out", str(tmp_path / "card"), "--tracking-uri", cfg.mlflow.tracking_uri],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    html = (tmp_path / "card" / "model_card.html").read_text()
    assert "<h2>Calibration</h2>" in html and "data:image/png;base64," in html


@pytest.mark.slow
def test_image_models_score_files_like_the_in_process_scorer(spark, tmp_path):
    """A PNG folder (with a zero-byte file and a non-image among the digits) scored by the
    baseline and the CNN: one row per good file, the bad ones quarantined with ingest's
    reasons, probabilities equal to ImageScorer's on the ingested pixels."""
    from sparkloom.models.registry import ImageScorer
    from sparkloom.models.train import load_exported
    from sparkloom.pipelines.sample_data import digits, write_png_tree
    from sparkloom.pipelines.spark import read_images

    images, labels = digits()
    pngs = tmp_path / "pngs"
    write_png_tree(images[:300], labels[:300], pngs)
    cfg = make_config(
        tmp_path,
        pipeline={"stages": ["ingest", "features", "baseline", "cnn", "register", "score"]},
        ingest={"format": "image_dirs", "path": str(pngs),
                "image": {"height": 8, "width": 8, "channels": 1}},
        baseline={"tuning": "none", "grid": {"reg_param": [0.01], "max_iter": [50]}},
        cnn={"model": {"conv1_channels": 8, "conv2_channels": 8, "kernel_size": 3,
                       "hidden_dim": 16},
             "training": {"epochs": 2, "batch_size": 32}},
    )  # fmt: skip
    outcome = run_pipeline(spark, cfg, list(cfg.pipeline.stages))
    s = outcome.results["score"]
    assert s.rows_out == s.rows_in > 0 and s.quarantined == 0
    assert s.accuracy == pytest.approx(s.model_accuracy, abs=1e-9)

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    (pngs / "3" / "empty.png").write_bytes(b"")
    (pngs / "3" / "notes.png").write_bytes(b"not an image")
    df = read_images(spark, str(pngs))
    n_files = sum(1 for p in pngs.rglob("*") if p.is_file())
    ingested = {r["id"]: bytes(r["image"]) for r in catalog.read("ingested", "ingest").collect()}
    model_dir = catalog.local_path("cnn_model")
    pre = catalog.manifest("ingested")["image"]
    scorer = ImageScorer(load_exported(model_dir, "cnn"), pre["mean"], pre["std"]).eval()
    for stage in ("baseline", "cnn"):
        scored, quarantine, ref = score(df, f"runs:/{outcome.stage_run_ids[stage]}/model")
        got = {r["id"]: r for r in scored.collect()}
        bad = {r["id"]: r["reason"] for r in quarantine.collect()}
        assert len(got) + len(bad) == n_files and set(got) == set(ingested)
        assert bad == {"3/empty.png": "empty_file", "3/notes.png": "undecodable"}
        if stage == "cnn":
            ids = sorted(got)
            pixels = np.stack([np.frombuffer(ingested[i], np.uint8) for i in ids])
            with torch.no_grad():
                want = scorer(torch.from_numpy(pixels.reshape(-1, 1, 8, 8).copy())).numpy()
            have = np.array([got[i]["probabilities"] for i in ids])
            assert np.allclose(have, want, atol=1e-5)
            assert [got[i]["predicted_label"] for i in ids] == [
                ref.labels[k] for k in want.argmax(-1)
            ]
