"""GPT-2 through the shared runtime (`train_fn`) over Parquet blocks, no Spark: causal-LM
metrics, per-step records, and a mid-run resume that continues exactly."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparkloom.models.train import train_fn

VOCAB, SPAN = 50, 17


def blocks(n: int, seed: int) -> pa.Table:
    """Counting runs modulo VOCAB from random starts: the next token is predictable."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, VOCAB, n)
    return pa.table({"tokens": [[int((s + i) % VOCAB) for i in range(SPAN)] for s in starts]})


def config(tmp_path, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n, seed in (("train", 192, 0), ("validation", 48, 1), ("test", 48, 2)):
        pq.write_table(blocks(n, seed), tmp_path / f"{split}.parquet")
        paths[split] = str(tmp_path / f"{split}.parquet")
    return {
        "model": {"name": "gpt2", "config": {"vocab_size": VOCAB, "preset": "tiny",
                                             "n_positions": 32, "dropout": 0.1}},
        "data": {**paths, "inputs": {"tokens": "tokens"}},
        "training": {"batch_size": 16, "eval_batch_size": 48, "optimizer": {"lr": 3e-3},
                     "schedule": {"warmup_ratio": 0.0},
                     "early_stopping": {"metric": "val_loss", "mode": "min", "patience": 5},
                     "epochs": 2, "seed": 0, "log_every_steps": 1, "eval_every_steps": 5,
                     "checkpoint_every_steps": 4, **extra},
        "checkpoint": {"dir": str(tmp_path / "ckpt")},
    }  # fmt: skip


def test_causal_lm_trains_with_per_step_records(tmp_path):
    out = train_fn(config(tmp_path))
    assert abs(out["initial"]["val_loss"] - math.log(VOCAB)) < 0.3  # uniform at init
    last = out["history"][-1]
    assert last["val_loss"] < out["initial"]["val_loss"] - 1.0
    assert last["val_perplexity"] == pytest.approx(math.exp(last["val_loss"]))
    assert out["metrics"]["test_perplexity"] == pytest.approx(math.exp(out["metrics"]["test_loss"]))
    assert out["confusion"] == {} and out["errors"] == []
    # 12 steps an epoch (192 blocks / 16), one record each; an evaluation every 5 steps
    assert [s["step"] for s in out["steps"]] == list(range(1, 25))
    assert [e["step"] for e in out["evals"]] == [5, 10, 15, 20]
    assert all(s["tokens_per_s"] > 0 and "mfu" not in s for s in out["steps"])  # no MFU on CPU
    assert out["history"][0]["tokens_per_s"] > 0


def test_a_run_resumed_mid_epoch_continues_with_the_same_losses(tmp_path, monkeypatch):
    # records every 3 steps, checkpoints every 4: the record at step 6 spans the checkpoint
    # at step 4, so the running sums must travel in the checkpoint
    clean = train_fn(config(tmp_path / "a", epochs=1, log_every_steps=3))
    monkeypatch.setenv("SPARKLOOM_FAULT", "rank=0,step=6,mode=raise")
    with pytest.raises(RuntimeError, match="injected fault"):
        train_fn(config(tmp_path / "b", epochs=1, log_every_steps=3))
    monkeypatch.delenv("SPARKLOOM_FAULT")
    resumed = train_fn(config(tmp_path / "b", epochs=1, log_every_steps=3))
    assert resumed["resumed_from"]["step"] == 4  # the last checkpoint before the fault
    want = {s["step"]: s["train_loss"] for s in clean["steps"]}
    got = {s["step"]: s["train_loss"] for s in resumed["steps"]}
    assert list(got) == [3, 6, 9, 12]
    assert got == pytest.approx(want, abs=1e-6)
    assert resumed["history"][0]["train_loss"] == pytest.approx(
        clean["history"][0]["train_loss"], abs=1e-6
    )  # the epoch's mean over all its batches, also those before the checkpoint
    assert resumed["metrics"] == pytest.approx(clean["metrics"], abs=1e-6)


def test_mfu_counts_gpt2_small_flops_and_knows_the_gpus():
    import torch

    from sparkloom.models.gpt2 import GPT2LM, GPT2Config
    from sparkloom.models.train import peak_tflops_for

    with torch.device("meta"):
        model = GPT2LM(GPT2Config(vocab_size=50257, preset="small"))
    # 6 x (124,439,808 - 1024 x 768 position embeddings) + 12 x 12 layers x 768 x 1024 context
    assert model.flops_per_token(1024) == 6 * 123_653_376 + 113_246_208 == 855_166_464
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA L40") == 181.0 and peak_tflops_for("NVIDIA L4") == 121.0
    assert peak_tflops_for("NVIDIA GeForce GTX 1080") is None  # unknown: no MFU, not a guess
