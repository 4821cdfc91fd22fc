"""sparkloom's MLlib baseline vs scikit-learn on the same split of an ingested dataset.

What is compared
----------------
Both sides start from the pipeline's own `ingested` dataset (ids, text, label, split),
so they see the same training, validation and test documents:

- sparkloom: the `features` and `baseline` stages exactly as the config runs them, in a
  scratch copy of the catalog (the pipeline's own outputs are not touched), with the
  config's tuning (by default: 12 fits on train, scored on validation).
- scikit-learn: TfidfVectorizer(sublinear_tf=True, min_df=2, stop_words="english") +
  LogisticRegression(lbfgs), C in 0.1 .. 1000 picked on the validation split, the
  recipe a user would write on one machine. It runs in a child process, so its peak
  memory (ru_maxrss) is its own.

Reported per side: test accuracy and macro-F1, the tuning's wall time (features + all
fits + scoring), and peak memory (sparkloom: the driver JVM's heap pools, peak usage
over the stage; sklearn: the child's peak RSS). Both run on the same cores.

    sparkloom run --conf conf/text_classification.yaml --only ingest
    python benchmarks/baseline_vs_sklearn.py --conf conf/text_classification.yaml --name bbc

Results are merged into benchmarks/results/baseline_vs_sklearn.{json,md}, one row per
--name.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "baseline_vs_sklearn"
C_GRID = [0.1, 1.0, 10.0, 100.0, 1000.0]


class HeapWatch:
    """The driver JVM's heap: live bytes after the latest GC, polled; and the raw peak."""

    def __init__(self, spark, every_s: float = 0.5):
        mf = spark.sparkContext._jvm.java.lang.management.ManagementFactory
        self.pools = [p for p in mf.getMemoryPoolMXBeans() if str(p.getType()) == "Heap memory"]
        for p in self.pools:
            p.resetPeakUsage()
        self.live_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(every_s,), daemon=True)
        self._thread.start()

    def _poll(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            live = sum(u.getUsed() for p in self.pools if (u := p.getCollectionUsage()))
            self.live_peak = max(self.live_peak, live)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {
            "heap_live_peak_mb": round(self.live_peak / 2**20),
            "heap_raw_peak_mb": round(sum(p.getPeakUsage().getUsed() for p in self.pools) / 2**20),
        }


def sklearn_side(parquet: str, out: mp.Queue) -> None:
    import resource

    import pandas as pd
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    df = pd.read_parquet(parquet, columns=["text", "label", "split"])
    train, val, test = (df[df.split == s] for s in ("train", "validation", "test"))
    t0 = time.perf_counter()
    vec = TfidfVectorizer(sublinear_tf=True, min_df=2, stop_words="english")
    x_train, x_val = vec.fit_transform(train.text), vec.transform(val.text)
    scored = []
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=1000).fit(x_train, train.label)
        scored.append((accuracy_score(val.label, model.predict(x_val)), -c, c, model))
    _, _, best_c, best = max(scored, key=lambda s: s[:2])  # ties: the smaller C
    predicted = best.predict(vec.transform(test.text))
    seconds = time.perf_counter() - t0
    out.put({
        "test_accuracy": round(float(accuracy_score(test.label, predicted)), 4),
        "test_macro_f1": round(float(f1_score(test.label, predicted, average="macro")), 4),
        "best": f"C={best_c:g}",
        "fits": len(C_GRID),
        "seconds": round(seconds, 1),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    })  # fmt: skip


def sparkloom_side(cfg, spark) -> dict:
    from sparkloom.pipelines.baseline import run_baseline
    from sparkloom.pipelines.catalog import Catalog
    from sparkloom.pipelines.text import run_features

    watch = HeapWatch(spark)
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    t0 = time.perf_counter()
    run_features(spark, cfg, catalog, force=True)
    result = run_baseline(spark, cfg, catalog, force=True)
    seconds = time.perf_counter() - t0
    heap = watch.stop()
    test = result.metrics["test"]
    best = result.best_params
    return {
        "test_accuracy": round(test["accuracy"], 4),
        "test_macro_f1": round(test["macro_f1"], 4),
        "best": f"regParam={best['reg_param']:g} standardization={best['standardization']}",
        "fits": max(1, len(result.grid)),
        "seconds": round(seconds, 1),
        "peak_memory_mb": heap["heap_raw_peak_mb"],
        "features_used": f"{result.features_used} of {result.features_total}",
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--conf", action="append", required=True)
    ap.add_argument("--name", required=True, help="the row's name in the results")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    from sparkloom.pipelines.catalog import Catalog
    from sparkloom.pipelines.config import load_config
    from sparkloom.pipelines.spark import get_spark

    cfg = load_config(args.conf, args.overrides)
    spark = get_spark(cfg.spark)
    source = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    source.require("ingested", "ingest")
    ingested = source.local_path("ingested")
    rows = []
    with tempfile.TemporaryDirectory(prefix=NAME) as tmp:
        # a scratch catalog holding a copy of the ingested dataset: the stages run as
        # configured without replacing the pipeline's own features and model
        scratch = cfg.model_copy(
            update={"pipeline": cfg.pipeline.model_copy(update={"data_root": tmp})}
        )
        shutil.copytree(ingested, Path(tmp) / cfg.pipeline.name / "ingested")
        queue: mp.Queue = mp.get_context("spawn").Queue()
        child = mp.get_context("spawn").Process(target=sklearn_side, args=(ingested, queue))
        child.start()
        sk = queue.get()
        child.join()
        sl = sparkloom_side(scratch, spark)
    counts = spark.read.parquet(ingested).groupBy("split").count().collect()
    split = {r["split"]: r["count"] for r in counts}
    labels = len(source.manifest("ingested")["labels"])
    spark.stop()
    for engine, r in (("sparkloom", sl), ("scikit-learn", sk)):
        rows.append({"dataset": args.name, "engine": engine, **r})
    entry = {
        "dataset": args.name,
        "classes": labels,
        "split": split,
        "cores": os.cpu_count(),
        "accuracy_gap_points": round(100 * (sl["test_accuracy"] - sk["test_accuracy"]), 2),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    store = RESULTS / f"{NAME}.json"
    data = json.loads(store.read_text()) if store.exists() else {}
    data[args.name] = entry
    store.write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{NAME}.md").write_text(to_markdown(data))
    print(to_markdown({args.name: entry}))


def to_markdown(data: dict) -> str:
    cols = ["dataset", "engine", "test_accuracy", "test_macro_f1", "best", "fits", "seconds",
            "peak_memory_mb", "features_used"]  # fmt: skip
    lines = [
        f"# {NAME}",
        "",
        "The same split of each ingested dataset; sparkloom's features + baseline stages "
        "as configured vs TfidfVectorizer(sublinear_tf, min_df=2, English stop words) + "
        "LogisticRegression with C picked on validation. Gap = sparkloom - scikit-learn "
        "test accuracy, in points.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for entry in data.values():
        for r in entry["rows"]:
            lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    lines.append("")
    for entry in data.values():
        lines.append(
            f"- {entry['dataset']}: {entry['classes']} classes, split {entry['split']}, "
            f"{entry['cores']} cores; gap {entry['accuracy_gap_points']:+.2f} points"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
