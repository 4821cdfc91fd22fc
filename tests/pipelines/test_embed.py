"""The embed stage and the baselines on its vectors, through the runner and MLflow, with a
tiny BERT the test writes (nothing downloaded). One pipeline run serves the module."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from pyspark.ml import PipelineModel
from pyspark.sql import functions as F

from sparkloom.pipelines.baseline import run_baseline
from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.context import context
from sparkloom.pipelines.embed import model_parts, run_embed
from sparkloom.pipelines.errors import ConfigError
from sparkloom.pipelines.runner import run_pipeline
from sparkloom.pipelines.scoring import score
from tests.conftest import make_config, make_docs
from tests.models.test_embed import reference, tiny_encoder

# looks empty, but ingest's ASCII check (\s) lets no-break and ideographic spaces by
BLANK_DOC = "\u00a0 \u3000\n"
STAGES = ["ingest", "features", "embed", "embed_baseline"]


@pytest.fixture(scope="module")
def run(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embed")
    corpus = tmp / "corpus"
    for d in make_docs(20):
        (corpus / d["label"]).mkdir(parents=True, exist_ok=True)
        (corpus / d["label"] / f"{d['id']}.txt").write_text(d["text"] + "\n")
    (corpus / "sport" / "blank.txt").write_text(BLANK_DOC)
    model = tiny_encoder(tmp / "encoder")
    cfg = make_config(
        tmp,
        pipeline={"stages": STAGES},
        ingest={"format": "text_dirs", "path": str(corpus)},
        features={"sequence": {"enabled": False}},
        embed={"model": str(model), "batch_size": 4, "max_length": 32},
        embed_baseline={"tuning": "none", "grid": {"reg_param": [0.001], "max_iter": [100]}},
    )
    outcome = run_pipeline(spark, cfg, STAGES)
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    return cfg, catalog, outcome, model


@pytest.mark.slow
def test_every_text_is_embedded_or_quarantined_and_equals_a_transformers_forward(spark, run):
    cfg, catalog, outcome, model = run
    r = outcome.results["embed"]
    ingested = catalog.read("ingested", "ingest")
    assert r.rows_in == ingested.count() == 61 and (r.rows_out, r.quarantined) == (60, 1)
    q = catalog.read("embeddings_quarantine", "embed").collect()
    assert [(row["text"], row["reason"]) for row in q] == [(BLANK_DOC, "empty_text")]
    emb = catalog.read("embeddings", "embed")
    assert set(emb.columns) == {"id", "label", "label_index", "split", "embedding"}
    manifest = catalog.manifest("embeddings")
    assert manifest["dimension"] == r.dimension == 16 and manifest["pooling"] == "mean"
    rows = emb.join(ingested.select("id", "text"), "id").orderBy("id").collect()
    got = np.array([row["embedding"].toArray() for row in rows])
    np.testing.assert_allclose(got, reference(model, [row["text"] for row in rows], "mean"),
                               atol=1e-5)  # fmt: skip


@pytest.mark.slow
def test_the_model_is_loaded_once_per_python_worker(run):
    r = run[2].results["embed"]
    assert 1 <= r.model_loads == r.python_workers <= r.partitions == 2
    assert r.docs_per_s > 0 and r.seconds > 0
    assert run[1].manifest("embeddings")["result"]["model_loads"] == r.model_loads


@pytest.mark.slow
def test_a_rerun_is_skipped_and_a_changed_model_directory_is_not_current(spark, run, tmp_path):
    cfg, catalog, _, model = run
    again = run_embed(spark, cfg, catalog)
    assert again.skipped and again.model_loads == run[2].results["embed"].model_loads
    copy = Path(shutil.copytree(model, tmp_path / "encoder"))
    moved = cfg.model_copy(update={"embed": cfg.embed.model_copy(update={"model": str(copy)})})
    before = context(spark, moved, catalog, "embed", extra=model_parts).fingerprint
    tiny_encoder(copy, seed=1)  # other weights at the same path
    assert context(spark, moved, catalog, "embed", extra=model_parts).fingerprint != before
    gone = cfg.model_copy(update={"embed": cfg.embed.model_copy(update={"model": str(tmp_path)})})
    with pytest.raises(ConfigError, match=r"embed\.model=.*no config\.json.*tokenizer\.json"):
        context(spark, gone, catalog, "embed", extra=model_parts)


@pytest.mark.slow
def test_embed_baseline_trains_on_the_vectors_and_its_logged_model_scores_raw_text(spark, run):
    cfg, catalog, outcome, _ = run
    b = outcome.results["embed_baseline"]
    test = catalog.read("embeddings", "embed").filter(F.col("split") == "test")
    assert b.metrics["test"]["num_examples"] == test.count()
    assert b.metrics["test"]["accuracy"] > b.metrics["test"]["majority_class_accuracy"]
    assert b.features_used == b.features_total == 16
    saved = PipelineModel.load(catalog.path("embed_baseline_model"))
    names = [type(s).__name__ for s in saved.stages]
    assert names == ["Embedder", "VectorSlicer", "LogisticRegressionModel", "IndexToString"]
    # scoring takes it from MLflow, from raw text, as the stage measured on the test split
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    texts = catalog.read("ingested", "ingest").filter(F.col("split") == "test")
    scored, quarantine, ref = score(
        texts.select("id", "text"), f"runs:/{outcome.stage_run_ids['embed_baseline']}/model"
    )
    right = scored.join(texts.select("id", "label"), "id").filter(
        F.col("predicted_label") == F.col("label")
    )
    assert ref.stage == "embed_baseline" and quarantine.count() == 0
    assert right.count() / scored.count() == pytest.approx(b.metrics["test"]["accuracy"])


@pytest.mark.slow
def test_the_baseline_on_tfidf_and_embedding_together(spark, run):
    cfg, catalog, _, _ = run
    both = cfg.model_copy(
        update={"baseline": cfg.baseline.model_copy(update={"features_col": "features+embedding"})}
    )
    assert list(context(spark, both, catalog, "baseline").inputs) == ["features", "embeddings"]
    r = run_baseline(spark, both, catalog)
    assert r.features_total == 65536 + 16 and 16 < r.features_used < r.features_total
    assert r.metrics["test"]["accuracy"] >= 0.9
    model = PipelineModel.load(catalog.path("baseline_model"))
    scored = model.transform(spark.createDataFrame([("coach goal striker cup",)], "text string"))
    assert scored.first()["predicted_label"] == "sport"


def test_the_embed_stage_needs_a_model_directory(tmp_path):
    with pytest.raises(Exception, match=r"stage embed needs embed\.model"):
        make_config(tmp_path, pipeline={"stages": ["ingest", "embed"]})


def test_half_precision_on_cpu_executors_is_refused_before_spark(tmp_path):
    with pytest.raises(Exception, match=r"embed\.dtype=bfloat16 runs on CUDA only.*float32"):
        make_config(tmp_path, embed={"model": "m", "dtype": "bfloat16", "device": "cpu"})
