"""Our Parquet loader vs in-memory DataLoaders, and TorchDistributor (2 processes) vs one process.

What is measured
----------------
1. Loader throughput (rows/s over one full epoch, batch 256) on ``--rows`` rows (default 1M)
   of ``label`` (int32) + ``input_ids`` (128 int32 token ids, a fixed-length ``list<int32>``,
   the way Spark writes an array column):

   a. ours: ``models.data.make_dataloader``, ``num_workers=0``, ``shuffle=True``;
   b. ours with ``num_workers=2``;
   c. in-memory ``TensorDataset`` + ``DataLoader(batch_size=256, shuffle=True)``: the default
      path, one ``__getitem__`` per row and ``default_collate`` stacking 256 rows;
   d. in-memory, batched: a dataset with ``__getitems__`` that slices whole batches by index
      tensor, the fastest an in-memory map-style DataLoader gets without custom machinery.

   Reported with the ratios ours / (c) and ours / (d) (>1: ours is faster).

2. One epoch of LSTM training (``models.train.train_fn``: vocab 20000, embed 64, hidden 64,
   1 bidirectional layer, batch 64 per process, AdamW, no validation/test, no checkpoints) over
   ``--epoch-rows`` rows (default 20000) of ragged token ids (lengths 50..200) and 5 labels:

   - plain: ``train_fn(cfg)`` called in this process (one process, 2 torch threads);
   - ``TorchDistributor(num_processes=2, local_mode=False)``: a barrier Spark job on
     ``local[2]`` whose two tasks each launch torchrun (1 process each, 1 torch thread);
   - ``TorchDistributor(num_processes=2, local_mode=True)``: torchrun with 2 processes
     launched from the driver (1 torch thread each).

   Reported: wall seconds around the whole call (launch overhead included: that is the point),
   the ``train_seconds`` ``train_fn`` returns (model build + the epoch, measured inside rank 0),
   their difference as overhead, samples/s on both clocks, and distributed / plain ratios of
   both clocks (>1: distributed is slower).

Fairness choices
----------------
- Parquet files are written once (8 files, 64k-row row groups for the loader data) before any
  timing; the in-memory tensors are built before their timer starts. The in-memory tensors are
  int64, the dtype our loader hands out (embeddings want int64), so (c)/(d) do not pay that
  conversion and ours does, as it would in real use.
- Each loader gets one untimed warm-up pass of a few batches. A timed epoch starts at
  ``iter(loader)``, so for (b) it includes starting the two workers, as every real epoch does
  (``persistent_workers=False``). Every batch is touched (labels summed, checked against the
  data) so nothing is lazily skipped.
- Shuffling is not equal work: (c)/(d) draw a full random permutation; ours permutes row-group
  order and shuffles blocks of >= 16k rows (``shuffle_buffer``), which is cheaper and weaker.
- Both sides of (2) see the same rows once with the same per-process batch size, so the 2-process
  runs take half the optimizer steps at twice the global batch (the usual DDP comparison). The
  plain run gets 2 threads and each distributed process 1, so all runs use the 2 cores.
- The Spark session (JVM start) and one trivial Python job (starting Spark's Python workers, as
  on a long-lived cluster) are not timed; torchrun, process start, imports, gloo rendezvous and
  result pickling are. The plain run pays none of that: its imports are already done.
- Timings are wall-clock on a 2-core machine; nothing here asserts on timings.

Run: ``python benchmarks/loader_and_ddp.py [--rows 1000000] [--epoch-rows 20000] [--seed 0]
[--out benchmarks/results] [--skip-loader] [--skip-ddp]``. Results go to
``<out>/loader_and_ddp.{json,md}`` and a markdown table to stdout (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyspark
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from sparkloom.models.data import make_dataloader
from sparkloom.models.train import train_fn

NAME = "loader_and_ddp"
CORES = 2
# loader benchmark
BATCH = 256
SEQ_LEN = 128
LOADER_FILES = 8
LOADER_ROW_GROUP = 65_536
WARMUP_BATCHES = 10
# training benchmark
VOCAB = 20_000
NUM_CLASSES = 5
TRAIN_BATCH = 64
MIN_LEN, MAX_LEN = 50, 200
TRAIN_FILES = 4
TRAIN_ROW_GROUP = 2_048
PLAIN_THREADS, DIST_THREADS = 2, 1  # every run uses both cores


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


# --- data ------------------------------------------------------------------------------------


def write_lists(
    path: Path, values: np.ndarray, offsets: np.ndarray, labels: np.ndarray, files: int, rg: int
) -> str:
    """Rows (list<int32> input_ids, int32 label) split over `files` Parquet files."""
    path.mkdir(parents=True)
    n = len(labels)
    for f in range(files):
        lo, hi = n * f // files, n * (f + 1) // files
        start, stop = offsets[lo], offsets[hi]
        ids = pa.ListArray.from_arrays(
            pa.array((offsets[lo : hi + 1] - start).astype(np.int32)), pa.array(values[start:stop])
        )
        table = pa.table({"input_ids": ids, "label": pa.array(labels[lo:hi])})
        pq.write_table(table, path / f"part-{f:03d}.parquet", row_group_size=rg)
    return str(path)


def fixed_token_data(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, VOCAB, size=(rows, SEQ_LEN), dtype=np.int32)
    labels = rng.integers(0, NUM_CLASSES, size=rows, dtype=np.int32)
    return ids, labels


def ragged_token_parquet(path: Path, rows: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(MIN_LEN, MAX_LEN + 1, size=rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = rng.integers(2, VOCAB, size=int(offsets[-1]), dtype=np.int32)
    labels = rng.integers(0, NUM_CLASSES, size=rows, dtype=np.int32)
    return write_lists(path, values, offsets, labels, TRAIN_FILES, TRAIN_ROW_GROUP)


# --- 1. loader throughput --------------------------------------------------------------------


class BatchedTensors(Dataset):
    """In-memory rows that the DataLoader fetches a whole batch at a time (`__getitems__`)."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor):
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "label": self.labels[i]}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices)
        return {"input_ids": self.ids[idx], "label": self.labels[idx]}


def _as_is(batch: Any) -> Any:
    return batch  # __getitems__ already returns a finished batch


def consume(
    loader: Iterable, label_of: Callable[[Any], torch.Tensor], max_batches: int | None = None
) -> dict[str, Any]:
    """Iterate (part of) an epoch, summing labels; the clock starts before workers do."""
    gc.collect()
    rows = batches = checksum = 0
    t0 = time.perf_counter()
    it = iter(loader)
    for batch in it:
        labels = label_of(batch)
        checksum += int(labels.sum())
        rows += len(labels)
        batches += 1
        if max_batches and batches >= max_batches:
            break
    seconds = time.perf_counter() - t0
    del it  # shuts down DataLoader workers of a pass cut short
    return {"rows": rows, "batches": batches, "seconds": seconds, "checksum": checksum}


def time_loader(name: str, loader: DataLoader, label_of: Callable, expect: int) -> dict[str, Any]:
    consume(loader, label_of, WARMUP_BATCHES)
    r = consume(loader, label_of)
    if r["checksum"] != expect:
        raise RuntimeError(f"{name}: label sum {r['checksum']} != {expect}; rows lost or doubled")
    row = {"variant": name, "rows": r["rows"], "batches": r["batches"],
           "seconds": round(r["seconds"], 3), "rows_per_s": round(r["rows"] / r["seconds"], 1)}  # fmt: skip
    log(str(row))
    return row


def bench_loader(rows: int, seed: int, tmp: Path) -> dict[str, Any]:
    ids, labels = fixed_token_data(rows, seed)
    offsets = np.arange(0, rows * SEQ_LEN + 1, SEQ_LEN, dtype=np.int64)
    path = write_lists(
        tmp / "loader", ids.reshape(-1), offsets, labels, LOADER_FILES, LOADER_ROW_GROUP
    )
    expect = int(labels.sum(dtype=np.int64))
    results = []
    for workers in (0, 2):
        loader = make_dataloader(
            path, BATCH, num_workers=workers, shuffle=True, seed=seed,
            columns=["input_ids", "label"],
        )  # fmt: skip
        name = f"ours, num_workers={workers}"
        results.append(time_loader(name, loader, lambda b: b["label"], expect))

    x, y = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(labels.astype(np.int64))
    del ids, labels
    per_row = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    results.append(time_loader("in-memory TensorDataset", per_row, lambda b: b[1], expect))
    batched = DataLoader(BatchedTensors(x, y), batch_size=BATCH, shuffle=True, collate_fn=_as_is)
    results.append(time_loader("in-memory __getitems__", batched, lambda b: b["label"], expect))

    by = {r["variant"]: r["rows_per_s"] for r in results}
    ratios = [
        {
            "ours": ours,
            "over_tensordataset": round(by[ours] / by["in-memory TensorDataset"], 3),
            "over_getitems": round(by[ours] / by["in-memory __getitems__"], 3),
        }
        for ours in by
        if ours.startswith("ours")
    ]
    return {"results": results, "ratios": ratios}


# --- 2. one training epoch: TorchDistributor vs one process ----------------------------------


def train_config(path: str, threads: int, seed: int) -> dict[str, Any]:
    return {
        "model": {"name": "lstm", "config": {"vocab_size": VOCAB, "num_classes": NUM_CLASSES,
                  "embed_dim": 64, "hidden_dim": 64, "num_layers": 1, "bidirectional": True,
                  "dropout": 0.1}},
        "data": {"train": path},
        "training": {"batch_size": TRAIN_BATCH, "num_workers": 0, "epochs": 1, "seed": seed,
                     "precision": "fp32", "schedule": {"warmup_ratio": 0.0}},
        "checkpoint": {"dir": None},
        "device": "cpu",
        "cpu_threads": threads,
    }  # fmt: skip


def start_spark():
    from pyspark.sql import SparkSession

    # executors' Python and the torchrun they start must be this venv's (torch, models)
    os.environ["PYSPARK_PYTHON"] = sys.executable
    spark = (
        SparkSession.builder.master(f"local[{CORES}]")
        .appName(NAME)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    # start the Python worker daemon now, so neither distributed variant pays for it
    spark.sparkContext.parallelize(range(CORES), CORES).map(lambda x: x).collect()
    return spark


def time_training(name: str, processes: int, rows: int, run: Callable[[], dict]) -> dict[str, Any]:
    gc.collect()
    row: dict[str, Any] = {"variant": name, "processes": processes}
    t0 = time.perf_counter()
    try:
        # train_fn and torchrun log to stdout; keep stdout for the results table
        with contextlib.redirect_stdout(sys.stderr):
            result = run()
    except Exception as e:  # one failing launcher must not lose the others' results
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        log(str(row))
        return row
    wall = time.perf_counter() - t0
    train_s = result["train_seconds"]
    row |= {"wall_s": round(wall, 2), "train_s": round(train_s, 2),
            "overhead_s": round(wall - train_s, 2),
            "samples_per_s_wall": round(rows / wall, 1),
            "samples_per_s_train": round(rows / train_s, 1),
            "steps": result["global_step"], "world_size": result["world_size"],
            "train_loss": round(result["history"][-1]["train_loss"], 4)}  # fmt: skip
    log(str(row))
    return row


def distribute(local_mode: bool, cfg: dict[str, Any]) -> dict[str, Any]:
    """train_fn on 2 CPU processes; TorchDistributor cloudpickles train_fn by reference."""
    from pyspark.ml.torch.distributor import TorchDistributor

    return TorchDistributor(num_processes=2, local_mode=local_mode, use_gpu=False).run(
        train_fn, cfg
    )


def bench_ddp(rows: int, seed: int, tmp: Path) -> tuple[dict[str, Any], str | None]:
    path = ragged_token_parquet(tmp / "train", rows, seed)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(var, None)  # the plain run must see one process
    in_process = partial(train_fn, train_config(path, PLAIN_THREADS, seed))
    results = [time_training("plain process", 1, rows, in_process)]
    spark = start_spark()
    java = spark.sparkContext._jvm.System.getProperty("java.version")
    for local_mode in (False, True):
        run = partial(distribute, local_mode, train_config(path, DIST_THREADS, seed))
        results.append(time_training(f"TorchDistributor local_mode={local_mode}", 2, rows, run))
    spark.stop()

    plain = results[0]
    ratios = [
        {
            "variant": r["variant"],
            "wall_over_plain": _ratio(r.get("wall_s"), plain.get("wall_s")),
            "train_s_over_plain": _ratio(r.get("train_s"), plain.get("train_s")),
        }
        for r in results[1:]
    ]
    return {"results": results, "ratios": ratios}, java


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# --- report ----------------------------------------------------------------------------------


def machine_info(java: str | None) -> dict[str, Any]:
    info = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),  # the machine may be shared
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "pyarrow": pa.__version__,
        "pyspark": pyspark.__version__,
        "numpy": np.__version__,
    }
    if java:
        info["java"] = java
    return info


def md_table(rows: list[dict]) -> str:
    header = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in header) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(report: dict) -> str:
    cfg = report["config"]
    info = ", ".join(f"{k}={v}" for k, v in report["machine"].items())
    parts = [
        f"# {NAME}",
        f"Seed {cfg['seed']}; total wall time {report['total_wall_s']} s.",
        f"Machine: {info}",
    ]
    if "loader" in report:
        parts += [
            f"## Loader: one shuffled epoch of {cfg['rows']} rows (label + {SEQ_LEN} token ids), "
            f"batch {BATCH}",
            md_table(report["loader"]["results"]),
            "### Ratio (rows/s, ours / in-memory)",
            md_table(report["loader"]["ratios"]),
        ]
    if "ddp" in report:
        parts += [
            f"## One LSTM epoch over {cfg['epoch_rows']} ragged rows "
            f"(lengths {MIN_LEN}..{MAX_LEN}), batch {TRAIN_BATCH} per process",
            md_table(report["ddp"]["results"]),
            "### Ratio (seconds, distributed / plain)",
            md_table(report["ddp"]["ratios"]),
        ]
    return "\n\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="loader rows (default 1M)")
    parser.add_argument(
        "--epoch-rows", type=int, default=20_000, help="training rows (default 20000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="data and training seed (default 0)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help=f"output directory for {NAME}.json / .md (default: benchmarks/results)",
    )
    parser.add_argument("--skip-loader", action="store_true", help="skip the loader benchmark")
    parser.add_argument("--skip-ddp", action="store_true", help="skip the training benchmark")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": NAME,
        "config": {
            "rows": args.rows,
            "epoch_rows": args.epoch_rows,
            "seed": args.seed,
            "loader_batch": BATCH,
            "seq_len": SEQ_LEN,
            "loader_files": LOADER_FILES,
            "loader_row_group": LOADER_ROW_GROUP,
            "warmup_batches": WARMUP_BATCHES,
            "train_config": train_config("<parquet>", None, args.seed),
            "cpu_threads": {"plain": PLAIN_THREADS, "per_distributed_process": DIST_THREADS},
        },
    }
    java = None
    with tempfile.TemporaryDirectory(prefix=NAME) as tmp_dir:
        tmp = Path(tmp_dir)
        if not args.skip_loader:
            report["loader"] = bench_loader(args.rows, args.seed, tmp)
        if not args.skip_ddp:
            report["ddp"], java = bench_ddp(args.epoch_rows, args.seed, tmp)
    report["machine"] = machine_info(java)
    report["total_wall_s"] = round(time.perf_counter() - wall0, 1)

    markdown = to_markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{NAME}.md").write_text(markdown + "\n")
    print(markdown)
    if any("error" in r for r in report.get("ddp", {}).get("results", [])):
        sys.exit(1)


if __name__ == "__main__":
    main()
