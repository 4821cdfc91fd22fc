"""GPT-2 end to end on the tiny corpus: Spark trains the byte-level BPE and packs the
blocks per split, TorchDistributor (gloo, 2 processes) trains the causal LM, MLflow gets the
per-step metrics and samples, and `sparkloom generate` samples from the logged model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from pyspark.sql import functions as F

from sparkloom.jobs.cli import main
from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.deep import gpt2_inputs
from sparkloom.pipelines.runner import run_pipeline
from tests.conftest import make_config

TRAINING = {
    "epochs": 3, "batch_size": 8, "optimizer": {"lr": 0.003}, "log_every_steps": 2,
    "eval_every_steps": 4, "early_stopping": {"patience": 5},
}  # fmt: skip


@pytest.mark.slow
def test_gpt2_trains_through_torchdistributor_and_generates(spark, tmp_path, text_dirs, capsys):
    cfg = make_config(
        tmp_path,
        pipeline={"stages": ["ingest", "gpt2"]},
        ingest={"format": "text_dirs", "path": str(text_dirs)},
        gpt2={
            "tokenizer": {"vocab_size": 300, "min_frequency": 1},
            "model": {"preset": "tiny", "n_positions": 64},
            "block_size": 16,
            "training": TRAINING,
            "generate": {"prompts": ["The match", "Goal"], "max_new_tokens": 8},
        },
    )
    outcome = run_pipeline(spark, cfg, list(cfg.pipeline.stages))
    r = outcome.results["gpt2"]
    vocab = r.model_config["vocab_size"]
    start = r.initial["val_loss"]
    assert abs(start - math.log(vocab)) < 0.3  # the untrained model guesses uniformly
    assert r.metrics["val_loss"] < start - 1.0  # the tiny corpus repeats a few words
    assert r.metrics["test_perplexity"] == pytest.approx(math.exp(r.metrics["test_loss"]))
    assert r.world_size == 2 and r.labels == []
    for split in ("train", "validation", "test"):  # nothing lost but the documented tail
        st = r.data_stats
        assert st[f"{split}_tokens"] == st[f"{split}_blocks"] * 17 + st[f"{split}_tail_tokens"]
        assert 0 <= st[f"{split}_tail_tokens"] < 17
    steps_per_epoch = r.history[0]["step"]
    assert len(r.steps) == 3 * steps_per_epoch // 2
    assert all(s["tokens_per_s"] > 0 for s in r.steps) and r.evals[0]["step"] == 4

    # blocks are per split: a split's blocks hold only its own documents' tokens
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    inputs = gpt2_inputs(cfg, catalog)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(inputs.files["tokenizer.json"])
    docs = catalog.read("ingested", "ingest").collect()
    for split in ("validation", "test"):
        own = {t for d in docs if d["split"] == split for t in tok.encode(d["text"]).ids}
        got = {
            t for b in inputs.data.filter(F.col("split") == split).collect() for t in b["tokens"]
        }
        assert got and got <= own | {0}

    client = MlflowClient(cfg.mlflow.tracking_uri)
    run_id = outcome.stage_run_ids["gpt2"]
    m = client.get_run(run_id).data.metrics
    assert m["init_val_loss"] == pytest.approx(start) and "test_token_accuracy" in m
    history = client.get_metric_history(run_id, "step_train_loss")
    assert [h.step for h in history] == [s["step"] for s in r.steps]
    assert len(client.get_metric_history(run_id, "step_val_loss")) == len(r.evals)
    dl = Path(client.download_artifacts(run_id, "", str(tmp_path / "dl")))
    samples = json.loads((dl / "samples.json").read_text())["samples"]
    assert [s["prompt"] for s in samples] == ["The match", "Goal"]
    assert all(0 < s["new_tokens"] <= 8 for s in samples)
    assert (dl / "tokenizer" / "vocab.json").exists() and (dl / "tokenizer" / "merges.txt").exists()

    # sparkloom generate: from the run, printed; seeded, so twice the same
    argv = ["generate", "--model", run_id, "--tracking-uri", cfg.mlflow.tracking_uri,
            "--prompt", "The team", "--max-new-tokens", "6", "--seed", "3"]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first and "The team" in first

    # from a training checkpoint (weights_only), which needs the tokenizer given apart
    ckpt = sorted(Path(cfg.pipeline.data_root, cfg.pipeline.name, "gpt2_work").rglob("best.pt"))
    model_dir = dl / "model-files"
    argv = ["generate", "--model", str(ckpt[0]), "--prompt", "The team", "--max-new-tokens", "6",
            "--seed", "3"]  # fmt: skip
    assert main(argv) == 3 and "--tokenizer" in capsys.readouterr().err
    assert main([*argv, "--tokenizer", str(model_dir / "tokenizer.json")]) == 0
    assert capsys.readouterr().out == first  # best.pt holds the weights the run exported

    # batch generation over a DataFrame: one row per prompt, blank ones quarantined
    prompts = spark.createDataFrame(
        [(str(i), p) for i, p in enumerate(["The", "Goal", None, "  ", "The coach"] * 4)],
        "id string, prompt string",
    )
    src = tmp_path / "prompts.parquet"
    prompts.write.parquet(str(src))
    out = tmp_path / "completions"
    argv = ["generate", "--model", str(model_dir), "--input", str(src), "--output", str(out),
            "--id-column", "id", "--max-new-tokens", "5"]  # fmt: skip
    # in its own process: the CLI stops its SparkSession when done, and this one is shared
    done = subprocess.run(
        [sys.executable, "-m", "sparkloom.jobs.cli", *argv], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "generated 12 completions" in done.stdout and "8 prompts quarantined" in done.stdout
    got = {r["id"]: r for r in spark.read.parquet(str(out)).collect()}
    assert len(got) == 12 and spark.read.parquet(f"{out}_quarantine").count() == 8
    assert all(0 < r["new_tokens"] <= 5 for r in got.values())
    # the same rows, repartitioned, give the same completions (seeded per row id)
    from sparkloom.pipelines.generation import Sampling, generate_dataframe

    again, _ = generate_dataframe(
        spark.read.parquet(str(src)).repartition(3), str(model_dir), Sampling(max_new_tokens=5),
        "prompt", "id",
    )  # fmt: skip
    assert {r["id"]: r["completion"] for r in again.collect()} == {
        k: v["completion"] for k, v in got.items()
    }
