"""The same pipeline in classic mode and from a thin Spark Connect client: ingest -> features
-> baseline -> LSTM (TorchDistributor, 2 processes) -> register -> score, with the same rows,
split, accuracies and losses. The client is `sparkloom run` in its own process with
`spark.remote=sc://...` against a real Connect server (tests/conftest.py: connect_url)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.config import load_config
from sparkloom.pipelines.runner import run_pipeline

pytestmark = [pytest.mark.connect, pytest.mark.slow]

STAGES = ["ingest", "features", "baseline", "lstm", "register", "score"]


def write_conf(folder: Path, corpus: Path) -> Path:
    folder.mkdir(parents=True)
    conf = {
        "pipeline": {"name": "t", "data_root": str(folder / "data"), "stages": STAGES},
        "spark": {"conf": {"spark.sql.shuffle.partitions": 2}},
        "mlflow": {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "tests"},
        "ingest": {"format": "text_dirs", "path": str(corpus)},
        "features": {"idf": {"min_doc_freq": 0}, "sequence": {"min_df": 1, "max_length": 32}},
        # validation tuning fits the grid in threads: a Connect session is thread-local
        "baseline": {"tuning": "validation", "grid": {"reg_param": [0.01, 0.1], "max_iter": [50]}},
        "lstm": {"model": {"embed_dim": 16, "hidden_dim": 16, "num_layers": 1},
                 "training": {"epochs": 3, "batch_size": 8, "optimizer": {"lr": 0.02}}},
        "register": {"name": "connect-test"},
    }  # fmt: skip
    path = folder / "conf.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def outcome(spark, conf: Path) -> dict:
    """What a run left: the catalog's counts and split, and its runs' test metrics."""
    cfg = load_config(conf)
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    ingested = catalog.require("ingested", "ingest")
    split = {r["id"]: r["split"] for r in catalog.read("ingested", "ingest").collect()}
    scores = {r["id"]: (r["predicted_label"], r["probabilities"])
              for r in catalog.read("scores", "score").collect()}  # fmt: skip
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name("tests")
    metrics = {}
    for run in client.search_runs([exp.experiment_id]):
        stage = run.data.tags.get("sparkloom.stage")
        if stage in ("baseline", "lstm"):
            metrics[stage] = {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}
    counts = {
        k: ingested["result"][k] for k in ("rows_in", "rows_out", "rows_quarantined", "splits")
    }
    return {"counts": counts, "split": split, "scores": scores, "metrics": metrics}


def test_the_pipeline_on_a_connect_server_matches_classic(spark, tmp_path, text_dirs, connect_url):
    classic_conf = write_conf(tmp_path / "classic", text_dirs)
    run_pipeline(spark, load_config(classic_conf), STAGES)

    connect_conf = write_conf(tmp_path / "connect", text_dirs)
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    env.pop("SPARK_REMOTE", None)
    # a thin client: nothing may start a JVM in this process (pyspark would need one for a
    # SparkContext, Py4J or Hadoop's FileSystem)
    env["JAVA_HOME"] = str(tmp_path / "no-java")
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not os.path.exists(os.path.join(p, "java")))  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "sparkloom.jobs.cli", "run", "--conf", str(connect_conf),
         f"spark.remote={connect_url}"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert "over Spark Connect" in done.stderr + done.stdout  # the preflight's master line

    # the champion (the MLlib baseline) was copied where the server reads it: the data root
    assert list((tmp_path / "connect" / "data" / "t" / "_scoring_models").glob("*/_COMPLETE"))

    classic, connect = outcome(spark, classic_conf), outcome(spark, connect_conf)
    assert connect["counts"] == classic["counts"] and classic["counts"]["rows_in"] == 90
    assert connect["split"] == classic["split"]
    assert connect["scores"].keys() == classic["scores"].keys() and len(classic["scores"]) == 9
    for key, (label, probabilities) in classic["scores"].items():
        assert connect["scores"][key][0] == label
        assert connect["scores"][key][1] == pytest.approx(probabilities, abs=1e-6)
    assert set(classic["metrics"]) == {"baseline", "lstm"}
    for stage, values in classic["metrics"].items():
        assert values, stage
        assert connect["metrics"][stage].keys() == values.keys(), stage
        for key, value in values.items():
            assert connect["metrics"][stage][key] == pytest.approx(value, abs=1e-6), (stage, key)
