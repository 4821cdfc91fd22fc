"""Deep stage through a real TorchDistributor (gloo, 2 processes) on the shared local[2] session."""

from __future__ import annotations

import json
import os
import time

import pytest
from mlflow.tracking import MlflowClient

from sparkloom.pipelines.deep import TrainingError
from sparkloom.pipelines.runner import StageFailed, run_pipeline
from tests.conftest import make_config

LSTM = {
    "model": {"embed_dim": 16, "hidden_dim": 16, "num_layers": 1},
    "training": {
        "epochs": 4,
        "batch_size": 8,
        "optimizer": {"lr": 0.02},
        "checkpoint_every_steps": 2,
    },
}


def deep_config(tmp_path, text_dirs, **lstm):
    return make_config(
        tmp_path,
        pipeline={"stages": ["ingest", "features", "lstm"]},
        ingest={"format": "text_dirs", "path": str(text_dirs)},
        features={"idf": {"min_doc_freq": 0}, "sequence": {"min_df": 1}},
        lstm={**LSTM, **lstm},
    )


def test_converter_loader_gives_each_rank_its_share_under_torchdistributor(spark, tmp_path):
    """Every row once per epoch across 2 ranks x 2 workers, 101 rows (not divisible)."""
    from pyspark.ml.torch.distributor import TorchDistributor

    from sparkloom.pipelines.converter import make_spark_converter

    df = spark.range(101).selectExpr("id", "id % 3 AS label")
    converter = make_spark_converter(df, str(tmp_path / "cache"))
    out_dir = str(tmp_path / "seen")

    def read_shard(path: str, out_dir: str) -> int:
        import json
        import os

        from sparkloom.models.data import make_dataloader

        loader = make_dataloader(path, 10, num_workers=2, shuffle=True, seed=3)
        ids = []
        for epoch in range(2):
            loader.dataset.set_epoch(epoch)
            ids.append([int(i) for b in loader for i in b["id"]])
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"rank-{os.environ['RANK']}.json"), "w") as f:
            json.dump({"ids": ids, "batches": len(loader.dataset)}, f)
        return len(ids[0])

    TorchDistributor(num_processes=2, local_mode=False, use_gpu=False).run(
        read_shard, converter.local_path, out_dir
    )
    ranks = [json.loads((tmp_path / "seen" / f"rank-{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        seen = sorted(i for r in ranks for i in r["ids"][epoch])
        assert seen == list(range(101))
    assert ranks[0]["ids"][0] != ranks[0]["ids"][1]  # reshuffled between epochs
    assert ranks[0]["batches"] == ranks[1]["batches"] == 6
    # the same DataFrame reuses the cache; delete() removes it
    again = make_spark_converter(df, str(tmp_path / "cache"))
    assert again.cache_dir_url == converter.cache_dir_url and len(again) == 101
    other = make_spark_converter(df.filter("id < 50"), str(tmp_path / "cache"))
    assert other.cache_dir_url != converter.cache_dir_url
    converter.delete()
    assert not os.path.exists(converter.local_path)


@pytest.mark.slow
def test_lstm_trains_through_torchdistributor_and_logs_to_mlflow(spark, tmp_path, text_dirs):
    cfg = deep_config(tmp_path, text_dirs)
    outcome = run_pipeline(spark, cfg, list(cfg.pipeline.stages))
    result = outcome.results["lstm"]
    assert result.world_size == 2
    assert result.metrics["test_accuracy"] >= 0.8
    assert len(result.history) == 4
    client = MlflowClient(cfg.mlflow.tracking_uri)
    child = client.get_run(outcome.stage_run_ids["lstm"])
    assert child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == outcome.run_id
    assert child.data.metrics["test_accuracy"] >= 0.8
    losses = client.get_metric_history(child.info.run_id, "epoch_train_loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    arts = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
    assert {"plots/learning_curves.png", "plots/confusion_test.png"} <= arts
    files = {a.path for a in client.list_artifacts(child.info.run_id, "model-files")}
    assert {"model-files/state_dict.pt", "model-files/model.json", "model-files/vocab.txt"} <= files

    import mlflow.pyfunc
    import numpy as np

    vocab = (tmp_path / "data" / "t" / "vocabulary" / "vocab.txt").read_text().split("\n")
    ids = np.array([[vocab.index(w) for w in ["chef", "garlic", "pasta", "oven"]]], dtype=np.int64)
    probs = mlflow.pyfunc.load_model(outcome.model_uri).predict(ids)
    labels = json.loads((tmp_path / "data" / "t" / "lstm_model" / "labels.json").read_text())
    assert labels[int(np.argmax(probs[0]))] == "food"


@pytest.mark.slow
def test_killed_rank_fails_clearly_and_the_rerun_resumes(spark, tmp_path, text_dirs, monkeypatch):
    clean_cfg = deep_config(tmp_path / "clean", text_dirs)
    clean = run_pipeline(spark, clean_cfg, list(clean_cfg.pipeline.stages)).results["lstm"]

    # no retry: here the second run resumes (tests/reliability covers the launcher's retry)
    cfg = deep_config(tmp_path / "faulty", text_dirs, distributor={"max_retries": 0})
    monkeypatch.setenv("SPARKLOOM_FAULT", "rank=1,step=3,mode=exit")  # after the step-2 checkpoint
    with pytest.raises(StageFailed) as err:
        run_pipeline(spark, cfg, list(cfg.pipeline.stages))
    assert err.value.stage == "lstm" and isinstance(err.value.cause, TrainingError)
    assert err.value.exit_code == TrainingError.exit_code
    message = str(err.value)
    assert "rank 1 died without a Python error" in message
    client = MlflowClient(cfg.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    status = {r.info.run_name: r.info.status for r in runs}
    assert status["lstm"] == "FAILED" and status["t:run"] == "FAILED"
    assert status["ingest"] == status["features"] == "FINISHED"

    monkeypatch.delenv("SPARKLOOM_FAULT")
    again = run_pipeline(spark, cfg, list(cfg.pipeline.stages))
    resumed = again.results["lstm"]
    assert again.results["ingest"].skipped and again.results["features"].skipped
    assert resumed.resumed_from is not None and resumed.resumed_from["step"] == 2
    assert resumed.metrics["test_accuracy"] == pytest.approx(
        clean.metrics["test_accuracy"], abs=1e-6
    )
    assert resumed.metrics["val_loss"] == pytest.approx(clean.metrics["val_loss"], abs=1e-4)


def test_converter_round_trips_spark_column_types_exactly(spark, tmp_path):
    from pyspark.ml.linalg import DenseVector, SparseVector, VectorUDT
    from pyspark.sql import types as T

    from sparkloom.pipelines.converter import make_spark_converter

    schema = T.StructType([
        T.StructField("id", T.LongType()),
        T.StructField("x", T.DoubleType()),
        T.StructField("ids", T.ArrayType(T.IntegerType())),
        T.StructField("img", T.ArrayType(T.ArrayType(T.DoubleType()))),
        T.StructField("vec", VectorUDT()),
        T.StructField("sparse", VectorUDT()),
    ])  # fmt: skip
    rows = [
        (0, 0.5, [1, 2, 3], [[0.0, 1.0], [2.0, 3.0]], DenseVector([1.0, 2.0, 3.0]), SparseVector(5, [1], [4.0])),
        (1, -1.25, [4], [[4.0, 5.0], [6.0, 7.0]], SparseVector(3, [2], [9.0]), SparseVector(5, [0, 4], [1.0, 2.0])),
    ]  # fmt: skip
    df = spark.createDataFrame(rows, schema)
    converter = make_spark_converter(
        df, str(tmp_path / "cache"), vector_format={"sparse": "sparse"}
    )
    with converter.make_torch_dataloader(batch_size=2, shuffle=False, num_epochs=1) as loader:
        batches = list(loader)
    assert len(batches) == 1 and len(loader) == 1
    b = batches[0]
    assert b["id"].tolist() == [0, 1]
    assert b["x"].dtype.is_floating_point and b["x"].tolist() == [0.5, -1.25]
    assert b["ids"].tolist() == [[1, 2, 3], [4, 0, 0]] and b["ids_mask"].tolist() == [
        [1, 1, 1],
        [1, 0, 0],
    ]
    assert b["img"].shape == (2, 2, 2) and b["img"][1].tolist() == [[4.0, 5.0], [6.0, 7.0]]
    assert b["vec"].tolist() == [[1.0, 2.0, 3.0], [0.0, 0.0, 9.0]]  # dense and sparse rows mixed
    import torch

    assert b["sparse"].layout == torch.sparse_csr
    assert b["sparse"].to_dense().tolist() == [[0, 4, 0, 0, 0], [1, 0, 0, 0, 2]]


def test_converter_cache_keeps_the_most_recently_used_entries(spark, tmp_path):
    from sparkloom.models.data import META_FILE
    from sparkloom.pipelines.converter import make_spark_converter

    cache = str(tmp_path / "cache")
    old = make_spark_converter(spark.range(10), cache)
    recent = make_spark_converter(spark.range(20), cache)
    two_hours_ago = time.time() - 2 * 3600
    os.utime(os.path.join(old.local_path, META_FILE), (two_hours_ago, two_hours_ago))
    newest = make_spark_converter(spark.range(30), cache, keep=1)
    assert not os.path.exists(old.local_path)  # beyond `keep` and unused for 2 h
    assert os.path.exists(recent.local_path)  # beyond `keep`, but used within the hour
    assert os.path.exists(newest.local_path) and len(os.listdir(cache)) == 2
    again = make_spark_converter(spark.range(20), cache)
    assert again.cache_dir_url == recent.cache_dir_url and len(again) == 20


def test_converter_keys_last_a_session_where_the_plan_does_not_decide_the_rows(spark):
    """A plan over files or a range is keyed by its canonical tree (the same in any session);
    rows held in memory, and Python functions nobody vouched for, by semanticHash."""
    from pyspark.sql import functions as F

    from sparkloom.pipelines.converter import _plan_key

    ranged = spark.range(10).withColumn("y", F.col("id") * 2)
    assert _plan_key(ranged, None)[0] == "plan"
    assert _plan_key(ranged, None) == _plan_key(
        spark.range(10).withColumn("y", F.col("id") * 2), None
    )
    assert _plan_key(ranged, None) != _plan_key(
        spark.range(10).withColumn("y", F.col("id") * 3), None
    )
    assert _plan_key(spark.createDataFrame([(1,)], "x long"), "settings")[0] == "session"
    doubled = F.pandas_udf(lambda s: s * 2, "long")
    with_udf = spark.range(10).select(doubled("id").alias("y"))
    assert _plan_key(with_udf, None)[0] == "session"
    assert _plan_key(with_udf, "settings")[0] == "plan"
    assert _plan_key(with_udf, "settings") != _plan_key(with_udf, "other settings")


def test_a_rank_that_died_with_its_executor_is_named_so(tmp_path):
    """The driver knows when an executor is lost (a worker shut down, a node gone): the line
    says so instead of 'died without a Python error'."""
    from sparkloom.pipelines.deep import explain_failure

    status = tmp_path / "status"
    status.mkdir()
    (status / "rank-0.started").write_text("pid 11 on node-a")
    (status / "rank-1.started").write_text("pid 12 on node-b")
    (status / "rank-1.error").write_text(
        "pid 12 on node-b\nTraceback (most recent call last):\n"
        "RuntimeError: [../gloo/transport/tcp/pair.cc:534] Connection closed by peer"
    )
    error = RuntimeError(
        "org.apache.spark.SparkException: Job aborted due to stage failure: Task 0 in stage 3.0 "
        "failed 1 times, most recent failure: Lost task 0.0 in stage 3.0 (TID 7) (127.0.0.1 "
        "executor 0): ExecutorLostFailure (executor 0 exited unrelated to the running tasks) "
        "Reason: Worker shutdown\nDriver stacktrace:"
    )
    message, _ = explain_failure(str(status), 2, error)
    assert message.startswith(
        "training failed: rank 0 died with its executor: Spark lost executor 0 (Worker shutdown); "
        "ranks [1] then lost their peer"
    ), message
