"""Spark ML vs scikit-learn on the same text-classification work, at several corpus sizes.

What is measured
----------------
For each size (default 20000 and 200000 documents) both engines build hashed TF-IDF
features and fit a multinomial logistic regression on the same synthetic documents, then
predict those same documents. Three spans are timed: features (fit + transform, materialised),
LR fit, and predict (+ the accuracy reduction that forces Spark's lazy transform to run). We
report seconds, documents/s per span and overall, and spark/sklearn ratios, so the cost curve
shows how Spark's fixed overhead amortises as the corpus grows. Train accuracy is only a
sanity check that both sides learned something; nothing here asserts on timings.

- Spark (``local[2]``): sparkloom's own feature stage, ``pipelines.text.build_feature_pipeline``
  (RegexTokenizer(\\W+, min length 2, lowercase) -> StopWordsRemover(English) ->
  HashingTF(2**16, the project default) -> IDF), then LogisticRegression(multinomial,
  maxIter=50, regParam=0.01).
- scikit-learn: HashingVectorizer(2**16, 2+ char tokens, lowercase, English stop words,
  non-negative, unnormalised counts) -> TfidfTransformer(norm=None) -> LogisticRegression(
  max_iter=50, C = 1 / (regParam * n_docs)).

How the two models are matched: sklearn minimises C * sum(loss) + ||w||^2 / 2; divided by
C * n that is Spark's mean(loss) + regParam/2 * ||w||^2, hence C = 1 / (regParam * n).
TfidfTransformer's default L2 row normalisation is switched off because Spark's IDF does not
normalise; with it on, this C regularises so hard that lbfgs stops after ~6 iterations at
~0.8 train accuracy, i.e. sklearn would be timed on far less work than Spark. The match is
still only rough: Spark standardises features before penalising (its default, kept), stops on
a tighter tolerance, the IDF formulas differ slightly (sklearn adds 1), and the two English
stop-word lists differ (the stop words mixed into the documents are in both). The LR iteration
counts are reported so the amount of optimiser work on each side is visible.

Data
----
Documents are generated deterministically from ``--seed``: a ~20k-word made-up lowercase
vocabulary with Zipfian frequencies, 5 classes that each boost their own subset of words,
~40 words per document, with common English stop words mixed in. The largest corpus is
generated once and smaller sizes are its prefixes.

Fairness choices
----------------
- The pandas DataFrame is written once per size to Parquet in a temp dir; Spark reads that,
  repartitions to 2 * cores partitions (one small file would otherwise be one partition and
  use one core), caches and counts it *before* the timer starts. So the Python -> JVM transfer
  and the Parquet read are not timed; sklearn likewise starts from in-memory Python strings.
- One untimed warm-up fit per engine on a small corpus, so JVM start-up / JIT and first-call
  import costs are not counted.
- sklearn runs with default threading (sparse lbfgs runs mostly on one core); Spark
  gets both cores. That asymmetry is part of what this benchmark shows.

Run: ``python benchmarks/text_features_vs_sklearn.py [--sizes 20000,200000] [--seed 0]``.
Results go to ``<out>/text_features_vs_sklearn.{json,md}`` and a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyspark
import sklearn
from pyspark.ml.classification import LogisticRegression as SparkLR
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import (
    HashingVectorizer,
    TfidfTransformer,
)
from sklearn.linear_model import LogisticRegression as SkLR
from sklearn.pipeline import make_pipeline

from sparkloom.pipelines.config import FeaturesConfig
from sparkloom.pipelines.synthetic import Corpus
from sparkloom.pipelines.text import build_feature_pipeline

NAME = "text_features_vs_sklearn"
N_FEATURES = FeaturesConfig().tf.num_features  # the project default, 2**16
MAX_ITER = 50
REG_PARAM = 0.01
N_CLASSES = 5
WARMUP_DOCS = 2_000
CORES = 2


def make_corpus(n_docs: int, seed: int) -> pd.DataFrame:
    """Synthetic labelled documents (columns ``text``, ``label``): pipelines.synthetic's
    generator, 5 classes over a 20k-word Zipfian vocabulary, stop words mixed in."""
    return Corpus(classes=N_CLASSES, seed=seed).docs(n_docs)


def start_spark() -> SparkSession:
    spark = (
        SparkSession.builder.master(f"local[{CORES}]")
        .appName(NAME)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")  # progress bars garble the output
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.driver.memory", "4g")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def spark_features():
    """sparkloom's own feature stage (pipelines.text), configured like the sklearn side."""
    return build_feature_pipeline(
        FeaturesConfig.model_validate(
            {
                "tokenizer": {
                    "pattern": r"\W+",
                    "gaps": True,
                    "lowercase": True,
                    "min_token_length": 2,
                },
                "stopwords": {"enabled": True, "language": "english"},
                "tf": {"method": "hashing", "num_features": N_FEATURES},
                "idf": {"enabled": True, "min_doc_freq": 0},
            }
        )
    )


def spark_lr() -> SparkLR:
    return SparkLR(family="multinomial", maxIter=MAX_ITER, regParam=REG_PARAM)


def sklearn_features():
    return make_pipeline(
        HashingVectorizer(
            n_features=N_FEATURES,
            token_pattern=r"(?u)\b\w\w+\b",
            lowercase=True,
            stop_words="english",
            alternate_sign=False,
            norm=None,
        ),
        # Spark's IDF output is not row-normalised; see the module docstring for why it matters.
        TfidfTransformer(norm=None),
    )


def sklearn_lr(n_docs: int) -> SkLR:
    return SkLR(max_iter=MAX_ITER, C=1.0 / (REG_PARAM * n_docs))


def load_spark_input(spark: SparkSession, docs: pd.DataFrame, tmp: Path):
    """Parquet round-trip, then cache + count so the timed span starts from materialised rows."""
    path = tmp / f"docs_{len(docs)}.parquet"
    docs.to_parquet(path, index=False)
    df = (
        spark.read.parquet(str(path))
        .withColumn("label", F.col("label").cast("double"))
        .repartition(2 * CORES)
        .cache()
    )
    df.count()
    return df


def time_spark(spark: SparkSession, docs: pd.DataFrame, tmp: Path) -> dict:
    df = load_spark_input(spark, docs, tmp)
    gc.collect()
    t0 = time.perf_counter()
    features = spark_features().fit(df)
    # cached and counted, so the features are computed once and inside this span
    feats = features.transform(df).select("features", "label").cache()
    feats.count()
    t1 = time.perf_counter()
    model = spark_lr().fit(feats)
    t2 = time.perf_counter()
    # the accuracy aggregate is the action that makes the lazy transform actually run
    accuracy = (
        model.transform(feats)
        .select(F.avg((F.col("prediction") == F.col("label")).cast("double")))
        .first()[0]
    )
    t3 = time.perf_counter()
    iterations = model.summary.totalIterations
    feats.unpersist(blocking=True)
    df.unpersist(blocking=True)
    return result("spark", len(docs), t1 - t0, t2 - t1, t3 - t2, accuracy, iterations)


def time_sklearn(docs: pd.DataFrame) -> dict:
    texts, y = docs["text"].tolist(), docs["label"].to_numpy()
    gc.collect()
    with warnings.catch_warnings():
        # max_iter=50 is deliberately the same budget as Spark; not converging is expected.
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        x = sklearn_features().fit_transform(texts)
        t1 = time.perf_counter()
        model = sklearn_lr(len(docs)).fit(x, y)
        t2 = time.perf_counter()
        accuracy = float((model.predict(x) == y).mean())
        t3 = time.perf_counter()
    iterations = int(model.n_iter_.max())
    return result("sklearn", len(docs), t1 - t0, t2 - t1, t3 - t2, accuracy, iterations)


def result(
    engine: str, n: int, feat_s: float, fit_s: float, predict_s: float, acc: float, iters: int
) -> dict:
    total = feat_s + fit_s + predict_s
    return {
        "engine": engine,
        "docs": n,
        "features_s": round(feat_s, 3),
        "lr_fit_s": round(fit_s, 3),
        "predict_s": round(predict_s, 3),
        "total_s": round(total, 3),
        "features_docs_per_s": round(n / feat_s, 1),
        "lr_fit_docs_per_s": round(n / fit_s, 1),
        "docs_per_s": round(n / total, 1),
        "train_accuracy": round(acc, 4),
        "lr_iterations": iters,
    }


def machine_info(spark: SparkSession) -> dict:
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "spark_master": spark.sparkContext.master,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyspark": pyspark.__version__,
        "java": spark.sparkContext._jvm.System.getProperty("java.version"),
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
    }


def ratios(rows: list[dict]) -> list[dict]:
    by_key = {(r["docs"], r["engine"]): r for r in rows}
    out = []
    for n in sorted({r["docs"] for r in rows}):
        s, k = by_key[n, "spark"], by_key[n, "sklearn"]
        out.append(
            {
                "docs": n,
                "spark_docs_per_s": s["docs_per_s"],
                "sklearn_docs_per_s": k["docs_per_s"],
                "spark_over_sklearn": round(s["docs_per_s"] / k["docs_per_s"], 3),
                "features_ratio": round(s["features_docs_per_s"] / k["features_docs_per_s"], 3),
                "lr_fit_ratio": round(s["lr_fit_docs_per_s"] / k["lr_fit_docs_per_s"], 3),
            }
        )
    return out


def md_table(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[k]) for k in header) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(report: dict) -> str:
    info = ", ".join(f"{k}={v}" for k, v in report["machine"].items())
    return "\n\n".join(
        [
            f"# {NAME}",
            "Features (fit + transform), LR fit and predict (train accuracy) of hashed TF-IDF + "
            "multinomial logistic regression "
            "on the same synthetic documents; one untimed warm-up per engine. "
            f"Seed {report['config']['seed']}; total wall time {report['total_wall_s']} s.",
            f"Machine: {info}",
            "## Per engine",
            md_table(report["results"]),
            "## Ratio (docs/s, spark / sklearn)",
            md_table(report["ratios"]),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--sizes",
        default="20000,200000",
        type=lambda s: sorted(int(x) for x in s.split(",")),
        help="comma-separated corpus sizes in documents (default: 20000,200000)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data generation seed (default: 0)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help=f"output directory for {NAME}.json / .md (default: benchmarks/results)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    corpus = make_corpus(max(args.sizes + [WARMUP_DOCS]), args.seed)
    spark = start_spark()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix=NAME) as tmp_dir:
        tmp = Path(tmp_dir)
        warmup = corpus.iloc[:WARMUP_DOCS]
        time_spark(spark, warmup, tmp)
        time_sklearn(warmup)
        for n in args.sizes:
            docs = corpus.iloc[:n]
            for row in (time_spark(spark, docs, tmp), time_sklearn(docs)):
                rows.append(row)
                print(f"# {row}", file=sys.stderr, flush=True)
        report = {
            "benchmark": NAME,
            "machine": machine_info(spark),
            "config": {
                "sizes": args.sizes,
                "seed": args.seed,
                "num_features": N_FEATURES,
                "max_iter": MAX_ITER,
                "spark_reg_param": REG_PARAM,
                "sklearn_C": "1 / (reg_param * docs)",
                "spark_partitions": 2 * CORES,
            },
            "results": rows,
            "ratios": ratios(rows),
        }
    spark.stop()
    report["total_wall_s"] = round(time.perf_counter() - wall0, 1)

    markdown = to_markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{NAME}.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
