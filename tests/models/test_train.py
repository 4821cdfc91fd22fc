"""The worker-side training runtime over Parquet files: no Spark, real torch (and torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sparkloom.models.train import Checkpoints, load_exported, train_fn

ROOT = Path(__file__).resolve().parents[2]


def token_split(path: Path, n: int, seed: int) -> str:
    """Three classes, each with its own token range: separable, ragged lengths."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    ids = [
        (rng.integers(2 + 10 * y, 12 + 10 * y, rng.integers(3, 9))).astype(np.int32).tolist()
        for y in labels
    ]
    path.mkdir(parents=True)
    table = pa.table(
        {"id": [f"r{i}" for i in range(n)], "input_ids": ids, "label": labels.astype(np.int32)}
    )
    pq.write_table(table, path / "part-0.parquet", row_group_size=17)
    return str(path)


def config(tmp_path: Path, **over) -> dict:
    data = tmp_path / "data"
    if not data.exists():
        token_split(data / "train", 120, 0)
        token_split(data / "validation", 30, 1)
        token_split(data / "test", 30, 2)
    cfg = {
        "model": {"name": "lstm", "config": {"vocab_size": 40, "num_classes": 3, "embed_dim": 16,
                                             "hidden_dim": 16, "num_layers": 1, "dropout": 0.1}},
        "data": {"train": str(data / "train"), "validation": str(data / "validation"),
                 "test": str(data / "test")},
        "training": {"batch_size": 16, "optimizer": {"name": "adamw", "lr": 0.02},
                     "schedule": {"warmup_ratio": 0.0}, "checkpoint_every_steps": 3,
                     "epochs": 4, "seed": 7},
        "checkpoint": {"dir": str(tmp_path / "ckpt")},
    }  # fmt: skip
    cfg["training"].update(over)  # the tests vary how it trains
    return cfg


def test_trains_evaluates_checkpoints_and_exports(tmp_path):
    result = train_fn(config(tmp_path))
    assert len(result["history"]) == 4
    assert result["history"][0]["train_loss"] > result["history"][-1]["train_loss"]
    assert result["metrics"]["test_accuracy"] >= 0.9
    assert sum(map(sum, result["confusion"]["test"])) == 30
    ckpts = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "best.pt" in ckpts and "latest" in ckpts
    assert len([c for c in ckpts if c.startswith("step-")]) == 2  # keep=2
    saved = Checkpoints.load(str(tmp_path / "ckpt" / "best.pt"))  # weights_only=True
    assert {"model", "optimizer", "scheduler", "rng", "epoch", "global_step"} <= set(saved)
    model = load_exported(result["export_dir"], "lstm")
    batch = {"input_ids": torch.tensor([[2, 3, 4]]), "attention_mask": torch.tensor([[1, 1, 1]])}
    assert model(**batch).logits.argmax(-1).item() == 0


def test_early_stopping_and_optimizers(tmp_path):
    for name in ("adam", "rmsprop", "sgd"):
        result = train_fn(config(tmp_path / name, epochs=1, optimizer={"name": name, "lr": 0.01}))
        assert np.isfinite(result["history"][0]["train_loss"])
    result = train_fn(
        config(tmp_path / "es", epochs=10, optimizer={"lr": 0.0},
               early_stopping={"metric": "val_accuracy", "patience": 2})
    )  # fmt: skip
    assert result["stopped_early"] and len(result["history"]) == 3


def test_resume_after_a_failure_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    clean = train_fn(config(tmp_path / "clean"))
    monkeypatch.setenv("SPARKLOOM_FAULT", "rank=0,step=11,mode=raise")
    with pytest.raises(RuntimeError, match="injected fault on rank 0 at step 11"):
        train_fn(config(tmp_path / "faulty"))
    monkeypatch.delenv("SPARKLOOM_FAULT")
    resumed = train_fn(config(tmp_path / "faulty"))
    assert resumed["resumed_from"]["step"] == 9  # the last step-multiple-of-3 checkpoint
    assert resumed["metrics"] == pytest.approx(clean["metrics"], abs=1e-6)
    a = load_exported(clean["export_dir"], "lstm").state_dict()
    b = load_exported(resumed["export_dir"], "lstm").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_checkpoints_status_and_export_on_a_remote_filesystem_resume_bit_identical(
    tmp_path, monkeypatch
):
    """Everything a rank writes goes through models.storage (pyarrow.fs): here an in-memory
    filesystem stands in for hdfs:// or s3://; nothing is written to the local checkpoint dir,
    and a run that fails resumes from the remote checkpoint to the same weights."""
    from sparkloom.models import storage

    clean = train_fn(config(tmp_path / "clean"))
    root = f"memory://{tmp_path.name}"
    storage.copy_tree(str(tmp_path / "clean" / "data"), f"{root}/data")

    def remote(**over):
        cfg = config(tmp_path / "clean", **over)
        for split in ("train", "validation", "test"):
            cfg["data"][split] = f"{root}/data/{split}"
        cfg["checkpoint"] = {"dir": f"{root}/ckpt"}
        cfg["status_dir"] = f"{root}/status"
        return cfg

    monkeypatch.setenv("SPARKLOOM_FAULT", "rank=0,step=11,mode=raise")
    with pytest.raises(RuntimeError, match="injected fault on rank 0 at step 11"):
        train_fn(remote())
    monkeypatch.delenv("SPARKLOOM_FAULT")
    assert storage.read_text(f"{root}/ckpt/latest") == "step-000000009.pt"
    assert "injected fault" in storage.read_text(f"{root}/status/rank-0.error")
    resumed = train_fn(remote())
    assert resumed["resumed_from"] == {"path": f"{root}/ckpt/step-000000009.pt", "epoch": 1,
                                       "step": 9}  # fmt: skip
    assert resumed["export_dir"] == f"{root}/ckpt/export"
    assert storage.listdir(f"{root}/ckpt/export") == ["model.json", "state_dict.pt"]
    assert storage.exists(f"{root}/status/rank-0.done")
    assert resumed["metrics"] == pytest.approx(clean["metrics"], abs=1e-6)
    a = load_exported(clean["export_dir"], "lstm").state_dict()
    b = load_exported(resumed["export_dir"], "lstm").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_runs_without_pyspark_installed(tmp_path):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(config(tmp_path, epochs=1)))
    code = (
        "import sys; sys.modules['pyspark'] = None; sys.modules['mlflow'] = None\n"
        "from sparkloom.models.train import main; main([sys.argv[1]])\n"
        "assert 'pyspark' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(cfg_path)], capture_output=True, text=True, cwd=ROOT
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout[p.stdout.index("{") :])["global_step"] == 8


# Each rank trains, then names the threads it still has: gloo's must be gone before the
# interpreter exits, or they can abort a run that succeeded (SIGABRT at exit).
RANK_SCRIPT = """
import glob, os, sys
sys.path.insert(0, {root!r})
from sparkloom.models.train import main
main([sys.argv[1]])
names = sorted(open(t + "comm").read().strip() for t in glob.glob("/proc/self/task/*/"))
print("rank", os.environ["RANK"], "threads at exit:", names, file=sys.stderr)
"""


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(config(tmp_path, epochs=4)))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(root=str(ROOT)))
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
         str(script), str(cfg_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    left = [line for line in p.stderr.splitlines() if "threads at exit" in line]
    assert len(left) == 2, p.stderr[-3000:]
    assert not [line for line in left if "gloo" in line], left  # the process group was freed
    out = json.loads(p.stdout[p.stdout.index("{\n") :])
    assert out["world_size"] == 2
    assert out["global_step"] == 4 * 4  # 120 rows / 2 ranks / 16 per batch = 4 steps per epoch
    assert out["metrics"]["test_accuracy"] >= 0.8


def test_a_saved_rng_state_restores_torch_python_and_numpy_draws(tmp_path):
    """Resume draws what the uninterrupted run would have drawn next, numpy included (its
    position and cached Gaussian too), through a weights-only checkpoint file."""
    import random

    from sparkloom.models import storage
    from sparkloom.models.train import rng_state, set_rng_state
    from sparkloom.models.weights import load_weights

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    np.random.standard_normal(3)  # leave a cached Gaussian and a mid-block position
    storage.torch_save({"rng": rng_state()}, str(tmp_path / "state.pt"))

    def draws():
        return torch.rand(3).tolist(), random.random(), np.random.standard_normal(3).tolist()

    expected = draws()
    draws()  # move every generator on, as the rest of an interrupted run would
    set_rng_state(load_weights(str(tmp_path / "state.pt"))["rng"])
    assert draws() == expected
