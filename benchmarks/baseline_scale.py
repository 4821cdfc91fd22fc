"""The MLlib baseline from 100k to 1M documents: cost per document, peak heap, accuracy,
and scikit-learn on the same documents and cores.

What is measured
----------------
One synthetic corpus (pipelines.synthetic: 20 classes, a Zipf vocabulary of 100,000
made-up words, class-dependent word distributions); its first N documents are the
N-document corpus, written the way pandas writes a CSV. For each N, in a fresh driver
JVM (a child process, so one size's garbage is not the next one's heap):

- sparkloom: ingest (the CSV reader), then the `features` and `baseline` stages with the
  default config except `features.tf.num_features: 2^18` (so: validation tuning, 12 fits,
  the default 8g local driver). Timed are features + baseline (all fits and scoring),
  the part that grows with N; ingest is reported on its own.
- scikit-learn: the recipe of benchmarks/baseline_vs_sklearn.py (TfidfVectorizer +
  LogisticRegression, C picked on validation) on the same ingested split, in its own
  child process.

Per N: seconds, microseconds per document (of the whole corpus), that cost relative to
the smallest N (flat = 1.0), the driver's peak heap (live after GC, polled every 0.5 s,
and the pools' raw peak, garbage included), test accuracy of both, and the time ratio.

    python benchmarks/baseline_scale.py --docs 100000 300000 1000000 --label java-blas

Results merge into benchmarks/results/baseline_scale.{json,md}, one table per --label
(run it again with a native BLAS installed under another label to measure the speed-up).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
NAME = "baseline_scale"
sys.path.insert(0, str(HERE))


def one_size(n: int, seed: int) -> dict:
    """Ingest, features and baseline on the first n documents; sklearn on the same split."""
    from baseline_vs_sklearn import HeapWatch, sklearn_side

    from sparkloom.pipelines.baseline import run_baseline
    from sparkloom.pipelines.catalog import Catalog
    from sparkloom.pipelines.compat import blas_in_use
    from sparkloom.pipelines.config import load_config
    from sparkloom.pipelines.ingest import run_ingest
    from sparkloom.pipelines.spark import get_spark
    from sparkloom.pipelines.synthetic import Corpus
    from sparkloom.pipelines.text import run_features

    with tempfile.TemporaryDirectory(prefix=NAME) as tmp:
        csv = Path(tmp) / "docs.csv"
        t0 = time.perf_counter()
        Corpus(classes=20, vocab_size=100_000, seed=seed).docs(n).to_csv(csv, index=False)
        generate_s = time.perf_counter() - t0
        cfg = load_config(
            [str(ROOT / "conf" / "defaults.yaml")],
            [f"pipeline.data_root={tmp}/data", "pipeline.name=scale",
             "ingest.format=csv", f"ingest.path={csv}",
             f"features.tf.num_features={1 << 18}", "features.sequence.enabled=false"],
        )  # fmt: skip
        spark = get_spark(cfg.spark)
        catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
        t0 = time.perf_counter()
        run_ingest(spark, cfg, catalog)
        ingest_s = time.perf_counter() - t0
        watch = HeapWatch(spark)
        t0 = time.perf_counter()
        run_features(spark, cfg, catalog)
        features_s = time.perf_counter() - t0
        result = run_baseline(spark, cfg, catalog)
        total_s = time.perf_counter() - t0
        heap = watch.stop()
        blas = blas_in_use(spark)[0].rsplit(".", 1)[-1]
        ingested = catalog.local_path("ingested")
        counts = spark.read.parquet(ingested).groupBy("split").count().collect()
        spark.stop()

        queue: mp.Queue = mp.get_context("spawn").Queue()
        child = mp.get_context("spawn").Process(target=sklearn_side, args=(ingested, queue))
        child.start()
        sk = queue.get()
        child.join()

    return {
        "docs": n,
        "split": {r["split"]: r["count"] for r in counts},
        "generate_s": round(generate_s, 1),
        "ingest_s": round(ingest_s, 1),
        "features_s": round(features_s, 1),
        "sparkloom_s": round(total_s, 1),
        "sparkloom_us_per_doc": round(1e6 * total_s / n, 1),
        "sparkloom_docs_per_s": round(n / total_s),
        **heap,
        "sparkloom_accuracy": round(result.metrics["test"]["accuracy"], 4),
        "best": f"regParam={result.best_params['reg_param']:g} "
        f"standardization={result.best_params['standardization']}",
        "fits": len(result.grid),
        "iterations": result.iterations,
        "features_used": result.features_used,
        "partitions": result.partitions,
        "fits_at_once": result.fits_at_once,
        "blas": blas,
        "sklearn_s": sk["seconds"],
        "sklearn_docs_per_s": round(n / sk["seconds"]),
        "sklearn_accuracy": sk["test_accuracy"],
        "sklearn_best": sk["best"],
        "sklearn_peak_rss_mb": sk["peak_memory_mb"],
        "time_ratio": round(total_s / sk["seconds"], 2),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--label", default="java-blas", help="the results table's name")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: one size
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one_size(args.one, args.seed)), flush=True)
        return

    rows = []
    for n in sorted(args.docs):
        p = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--seed", str(args.seed)],
            stdout=subprocess.PIPE, text=True, check=True,
        )  # fmt: skip
        row = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        rows.append(row)
        print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    store = RESULTS / f"{NAME}.json"
    data = json.loads(store.read_text()) if store.exists() else {}
    # sizes run in separate invocations merge under one label; a size run again replaces
    kept = {r["docs"]: r for r in data.get(args.label, {}).get("rows", [])}
    kept.update({r["docs"]: r for r in rows})
    rows = [kept[n] for n in sorted(kept)]
    for row in rows:
        row["cost_vs_smallest"] = round(
            row["sparkloom_us_per_doc"] / rows[0]["sparkloom_us_per_doc"], 2
        )
    data[args.label] = {"cores": os.cpu_count(), "seed": args.seed, "rows": rows}
    store.write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{NAME}.md").write_text(to_markdown(data))
    print(to_markdown({args.label: data[args.label]}))


def to_markdown(data: dict) -> str:
    cols = ["docs", "sparkloom_s", "sparkloom_us_per_doc", "cost_vs_smallest",
            "heap_live_peak_mb", "heap_raw_peak_mb", "sparkloom_accuracy", "best",
            "iterations", "features_used", "sklearn_s", "sklearn_accuracy",
            "sklearn_peak_rss_mb", "time_ratio", "ingest_s"]  # fmt: skip
    lines = [
        f"# {NAME}",
        "",
        "20 synthetic classes, 2^18 hashed features, the default config (validation tuning, "
        "12 fits, 8g local driver). sparkloom_s = features + baseline stages; cost_vs_smallest "
        "= microseconds per document relative to the smallest corpus (1.0 is flat); "
        "time_ratio = sparkloom_s / sklearn_s on the same split and cores. Heap: live after "
        "GC (polled) and the raw peak (garbage included).",
    ]
    for label, entry in data.items():
        blas = entry["rows"][0].get("blas", "?") if entry["rows"] else "?"
        lines += ["", f"## {label} ({entry['cores']} cores; BLAS: {blas})", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]  # fmt: skip
        for r in entry["rows"]:
            lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
