"""GPT-2 training throughput of the worker-side runtime, on one device: tokens/s and MFU.

What is measured
----------------
``models.train.train_fn``, the function TorchDistributor runs on each executor, called
directly in this process (no Spark: a GPU box without Java can run it), training
``GPT2LM`` over Parquet blocks of ``block_size + 1`` token ids, written here before timing:
random ids, since throughput does not depend on the text. The run is one epoch of
``--steps`` optimizer steps; ``train_fn`` records train loss, tokens/s and (on a GPU it knows)
MFU every ``--log-every`` steps. The first ``--warmup`` steps (allocation, cuDNN/cuBLAS
autotuning, torch.compile) are dropped; the report gives the median of the rest.

MFU = 6 x parameters x tokens/s / the device's dense bf16 peak (Kaplan et al. 2020's 6N
FLOPs per token for forward + backward, attention FLOPs left out as nanoGPT does; the peak
comes from ``models.train.PEAK_BF16_TFLOPS`` by GPU name, or ``--peak-tflops``).

Defaults are GPT-2 small (124M parameters, context 1024, vocabulary 50,257), batch 8 x
gradient accumulation 4 (32 x 1024 = 32,768 tokens a step), AdamW, bf16 autocast, flash /
memory-efficient SDPA, ``torch.compile`` on. On a CPU, try ``--preset tiny --block-size 128
--batch-size 8 --grad-accum 1 --steps 30 --warmup 5 --no-compile``.

  python benchmarks/gpt2_throughput.py [--out benchmarks/results/gpt2_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparkloom.models.hparams import GPT2_PRESETS  # noqa: E402
from sparkloom.models.train import train_fn  # noqa: E402


def write_blocks(path: str, rows: int, span: int, vocab: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (rows, span), dtype=np.int32)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), span)
    # a plain list<int32> column, as Spark writes an array column
    table = pa.table({"tokens": arr.cast(pa.list_(pa.int32()))})
    pq.write_table(table, path, row_group_size=max(1, min(rows, 4096)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", choices=sorted(GPT2_PRESETS))
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args()
    if args.warmup >= args.steps:
        p.error("--warmup must be below --steps")

    span = args.block_size + 1
    micro = args.steps * args.grad_accum
    with tempfile.TemporaryDirectory() as tmp:
        train = os.path.join(tmp, "train.parquet")
        t0 = time.perf_counter()
        write_blocks(train, micro * args.batch_size, span, args.vocab_size, seed=0)
        write_s = time.perf_counter() - t0
        cfg = {
            "model": {"name": "gpt2", "config": {
                "vocab_size": args.vocab_size, "preset": args.preset,
                "n_positions": max(args.block_size, GPT2_PRESETS[args.preset].n_positions),
                "dropout": 0.0}},
            "data": {"train": train, "inputs": {"tokens": "tokens"}, "shuffle_buffer": 0},
            "training": {
                "batch_size": args.batch_size,
                "optimizer": {"lr": 6e-4, "weight_decay": 0.1, "betas": (0.9, 0.95)},
                "schedule": {"warmup_steps": 10, "warmup_ratio": 0.0},
                "epochs": 1, "grad_accum": args.grad_accum, "precision": args.precision,
                "log_every_steps": args.log_every, "compile": not args.no_compile},
            "eval_at_start": False, "peak_tflops": args.peak_tflops,
            "checkpoint": {"dir": None},
        }  # fmt: skip
        started = time.perf_counter()
        out = train_fn(cfg)
        wall = time.perf_counter() - started

    steady = [s for s in out["steps"] if s["step"] > args.warmup]
    tps = [s["tokens_per_s"] for s in steady]
    mfu = [s["mfu"] for s in steady if "mfu" in s]
    cuda = torch.cuda.is_available()
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor()})",
        "torch": torch.__version__,
        "preset": args.preset,
        "parameters": out["num_parameters"],
        "block_size": args.block_size,
        "tokens_per_step": args.batch_size * args.grad_accum * args.block_size,
        "precision": args.precision,
        "compile": not args.no_compile,
        "steps": args.steps,
        "steady_steps": len(steady) * args.log_every,
        "tokens_per_s_median": statistics.median(tps) if tps else None,
        "tokens_per_s_min_max": [min(tps), max(tps)] if tps else None,
        "mfu_median": statistics.median(mfu) if mfu else None,
        "final_train_loss": out["steps"][-1]["train_loss"] if out["steps"] else None,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "wall_seconds": wall,
        "data_write_seconds": write_s,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
