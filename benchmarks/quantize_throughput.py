"""Int8 vs float CPU scoring: rows/s and model size, side by side in one run.

What is measured
----------------
For each model, the float model and its int8 copy made by the ``quantize`` stage's recipe
(``models.quantize.recipe``: dynamic int8 of Linear and LSTM layers with 8-bit embeddings for
the text models; static int8 of the convolutions and dense layers for the CNNs, TextCNN
included, calibrated on 256 rows; those also with dynamic, to show what static adds) score
the same ``--rows`` inputs in batches of ``--batch-size`` with ``torch.no_grad``,
at 1 thread and at all cores, alternating float / int8 ``--repeats`` times; the report
gives the best pass of each and the ratio int8 / float. Size is the state dict as
``torch.save`` writes it. Inputs are random token ids (padded after a random length) or
random images: throughput does not depend on what the weights learned.

  python benchmarks/quantize_throughput.py [--out benchmarks/results/quantize_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparkloom.models.quantize import (  # noqa: E402
    STATIC_TRUNK,
    quantize,
    recipe,
    serialized_bytes,
    static_quantize,
)
from sparkloom.models.registry import build_model  # noqa: E402

MODELS = {
    "bert mini (4x256)": ("bert", {"vocab_size": 30522, "num_classes": 5, "preset": "mini",
                                   "max_position_embeddings": 512}, "text"),
    "bert small (4x512)": ("bert", {"vocab_size": 30522, "num_classes": 5, "preset": "small",
                                    "max_position_embeddings": 512}, "text"),
    "lstm (demo size)": ("lstm", {"vocab_size": 20000, "num_classes": 5}, "text"),
    "textcnn": ("textcnn", {"vocab_size": 20000, "num_classes": 5}, "text"),
    "cnn (28x28, demo size)": ("cnn", {"num_classes": 10, "in_channels": 1, "height": 28,
                                       "width": 28, "conv1_channels": 32, "conv2_channels": 64,
                                       "kernel_size": 5, "hidden_dim": 128}, "image"),
    "alexnet 0.5 (28x28)": ("alexnet", {"num_classes": 10, "in_channels": 1, "height": 28,
                                        "width": 28, "width_mult": 0.5}, "image"),
}  # fmt: skip


def int8_versions(name: str, kind: str, model, seq: int, gen: torch.Generator) -> dict:
    """method -> the int8 model: dynamic for every model, and static for the CNNs (image
    and text) as well, calibrated on 256 rows of the same kind as the measured ones."""
    versions = {"dynamic": quantize(model, recipe(name, "dynamic")["modules"])}
    if name in STATIC_TRUNK:
        _, calibration = inputs(kind, 256, seq, gen)
        versions = {"static": static_quantize(model, recipe(name, "static"), calibration),
                    **versions}  # fmt: skip
    return versions


def inputs(kind: str, rows: int, seq: int, gen: torch.Generator) -> tuple[str, torch.Tensor]:
    if kind == "image":
        return "images", torch.randn(rows, 1, 28, 28, generator=gen)
    ids = torch.randint(5, 20000, (rows, seq), generator=gen)
    lengths = torch.randint(seq // 4, seq + 1, (rows,), generator=gen)
    ids[torch.arange(seq)[None, :] >= lengths[:, None]] = 0
    return "input_ids", ids


def best_rows_per_s(model, key, x, batch_size: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            model(**{key: x[i : i + batch_size]})
    return len(x) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/quantize_throughput.json")
    args = p.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    threads_all = torch.get_num_threads()
    rows = []
    for label, (name, cfg, kind) in MODELS.items():
        model = build_model(name, cfg).eval()
        key, x = inputs(kind, args.rows, args.seq, gen)
        for method, int8 in int8_versions(name, kind, model, args.seq, gen).items():
            for threads in sorted({1, threads_all}):
                torch.set_num_threads(threads)
                best = {"float": 0.0, "int8": 0.0}
                for m in (model, int8):  # warm-up
                    best_rows_per_s(m, key, x[: args.batch_size], args.batch_size)
                for _ in range(args.repeats):  # alternate, so drift hits both alike
                    best["float"] = max(
                        best["float"], best_rows_per_s(model, key, x, args.batch_size)
                    )
                    best["int8"] = max(best["int8"], best_rows_per_s(int8, key, x, args.batch_size))
                rows.append({
                    "model": label, "method": method, "threads": threads,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "float_mb": serialized_bytes(model) / 1e6,
                    "int8_mb": serialized_bytes(int8) / 1e6,
                    "float_rows_per_s": best["float"], "int8_rows_per_s": best["int8"],
                    "speedup": best["int8"] / best["float"],
                })  # fmt: skip
                r = rows[-1]
                print(f"{label:24s} {method:7s} threads={threads} size {r['float_mb']:.1f} -> "
                      f"{r['int8_mb']:.1f} MB  rows/s {r['float_rows_per_s']:.0f} -> "
                      f"{r['int8_rows_per_s']:.0f}  ({r['speedup']:.2f}x)", flush=True)  # fmt: skip
        torch.set_num_threads(threads_all)
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
               "python": platform.python_version(), "torch": torch.__version__,
               "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "machine": machine, "rows": rows}, f, indent=2)
    md = ["# quantize_throughput", "", f"Machine: {machine}", "",
          f"{args.rows} rows, sequence {args.seq}, batch {args.batch_size}, best of "
          f"{args.repeats} alternating passes.", "",
          "| model | int8 method | threads | parameters | float MB | int8 MB | float rows/s | "
          "int8 rows/s | int8 / float |",
          "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    md += [f"| {r['model']} | {r['method']} | {r['threads']} | {r['parameters']:,} | "
           f"{r['float_mb']:.1f} | "
           f"{r['int8_mb']:.1f} | {r['float_rows_per_s']:.0f} | {r['int8_rows_per_s']:.0f} | "
           f"{r['speedup']:.2f} |" for r in rows]  # fmt: skip
    with open(args.out.removesuffix(".json") + ".md", "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
