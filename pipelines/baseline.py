"""MLlib baseline: multinomial LogisticRegression, tuned over a grid, evaluated on test.

Tuning sees only the training split (and, with `tuning: validation`, the validation
split ingest made); test is scored once with the chosen model. The saved model is the
whole text -> label PipelineModel (features + feature selection + classifier +
IndexToString), so scoring needs nothing else.

Where the memory goes, and why the features are compacted first: MLlib keeps the
coefficients as a dense classes x features matrix, and one L-BFGS fit holds about 25
copies of it (10 pairs of history vectors, the gradient, the line search's points, the
per-task aggregation buffers). 20 classes x 2^18 hashed features is 42 MB a copy, about
1.1 GB a fit, measured; tuning runs several fits at once. Hashed or counted text uses a
small share of its buckets (BBC News: 22% of 2^16; 20,000 synthetic documents: 8% of
2^18), and an unused feature's coefficient is zero at the optimum of an L2-penalised fit
anyway, so the classifier is fitted on the used ones only (a VectorSlicer kept in the
saved model): the same model, a fraction of the memory and of the time per iteration.

Two stages run this code, each with its own section: `baseline` (features_col: features by
default) and `embed_baseline` (embedding by default: the embed stage's vectors, every index
used; features+embedding joins both by id with a VectorAssembler). The embedding models'
saved PipelineModel starts with the embed stage's `Embedder`, so it too goes from raw text.
"""

from __future__ import annotations

import logging
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
from pyspark.ml import PipelineModel
from pyspark.ml.classification import LogisticRegression, LogisticRegressionModel
from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.ml.feature import IDFModel, IndexToString, VectorAssembler, VectorSlicer
from pyspark.ml.tuning import CrossValidator, ParamGridBuilder, TrainValidationSplit
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkloom.pipelines import compat
from sparkloom.pipelines.audit import calibrate, predictions_dir, write_spark_predictions
from sparkloom.pipelines.compat import blas_in_use, default_parallelism
from sparkloom.pipelines.config import BaselineConfig
from sparkloom.pipelines.context import StageContext, stage
from sparkloom.pipelines.errors import DataError
from sparkloom.pipelines.report import classification_metrics, confusion_from_counts
from sparkloom.pipelines.text import load_feature_model

log = logging.getLogger(__name__)

INPUT_COL = "baseline_input"  # the used features, what the classifier sees
EMBEDDING = "embedding"  # the embed stage's dense vectors: every index is used
JOINED = "features_embedding"  # features_col=features+embedding: both, side by side
# live copies of the coefficient matrix per fit (measured: 26 at 20 x 2^18), with room
COPIES_PER_FIT = 32
# share of the driver heap the fits' coefficient copies may take together
HEAP_SHARE = 0.4


@dataclass
class BaselineResult:
    labels: list[str]
    best_params: dict[str, float]
    tuning_metric: float
    metrics: dict[str, dict[str, float]]  # split -> metric -> value
    confusion: dict[str, list[list[int]]]  # split -> matrix[true][predicted]
    grid: list[dict[str, float]] = field(default_factory=list)  # params + tuning metric
    skipped: bool = False
    features_used: int = 0  # of features_total, the ones the training split has
    features_total: int = 0
    iterations: int = 0  # L-BFGS iterations of the chosen model
    converged: bool = True  # False: it stopped at max_iter
    fits_at_once: int = 1
    partitions: int = 1
    train_seconds: float = 0.0  # the tuning: every fit of the grid and its scoring
    train_rows: int = 0
    num_parameters: int = 0  # the chosen model's coefficients and intercepts
    calibration: dict = field(default_factory=dict)  # pipelines.audit.calibrate
    predictions: str | None = None  # validation and test logits (pipelines.audit's layout)

    def summary(self) -> str:
        t = self.metrics["test"]
        return (
            f"test accuracy {t['accuracy']:.4f}, weighted F1 {t['f1']:.4f} "
            f"(majority class {t['majority_class_accuracy']:.4f}, n={int(t['num_examples'])}); "
            f"best {self.best_params}; {self.features_used} of {self.features_total} features "
            f"used; {self.iterations} iterations"
            + ("" if self.converged else " (not converged: raise baseline.grid.max_iter)")
        )


def build_estimator(
    bc: BaselineConfig, features_col: str, num_classes: int, weight_col: str | None = None
):
    """The classifier, its grid, and the tuner around it (None for validation/none)."""
    lr = LogisticRegression(
        featuresCol=features_col,
        labelCol="label_index",
        family="multinomial" if num_classes > 2 else "auto",
    )
    if weight_col:
        lr.setWeightCol(weight_col)
    g = bc.grid
    grid = (
        ParamGridBuilder()
        .addGrid(lr.regParam, sorted(g.reg_param, reverse=True))  # strongest first: ties go to it
        .addGrid(lr.standardization, g.standardization)
        .addGrid(lr.elasticNetParam, g.elastic_net_param)
        .addGrid(lr.maxIter, g.max_iter)
        .build()
    )
    evaluator = MulticlassClassificationEvaluator(labelCol="label_index", metricName=bc.metric)
    if bc.tuning == "cross_validation":
        return lr, grid, CrossValidator(
            estimator=lr, estimatorParamMaps=grid, evaluator=evaluator,
            numFolds=bc.num_folds, parallelism=bc.parallelism, seed=bc.seed,
        )  # fmt: skip
    if bc.tuning == "train_validation_split":
        return lr, grid, TrainValidationSplit(
            estimator=lr, estimatorParamMaps=grid, evaluator=evaluator,
            trainRatio=bc.train_ratio, parallelism=bc.parallelism, seed=bc.seed,
        )  # fmt: skip
    return lr, (grid if bc.tuning == "validation" else grid[:1]), None


def evaluate(predictions: DataFrame, labels: list[str]) -> tuple[dict[str, float], np.ndarray]:
    """Metrics and confusion matrix from a DataFrame with label_index and prediction."""
    counts = predictions.groupBy("label_index", "prediction").count().collect()
    cm = confusion_from_counts([(r[0], r[1], r[2]) for r in counts], len(labels))
    return classification_metrics(cm, labels), cm


def used_features(
    train: DataFrame, feature_model: PipelineModel | None, col: str
) -> tuple[list, int]:
    """(sorted indices of the features the training split has, the vector size).

    With an IDF stage the answer is in the fitted model (a feature below its minDocFreq
    is zeroed by IDF, so it is unused too); dense embeddings use every index (one row gives
    the size); otherwise one pass over the training split.
    """
    if col == EMBEDDING:
        size = len(train.select(col).first()[0])
        return list(range(size)), size
    stages = feature_model.stages if feature_model is not None else []
    idf = next((s for s in stages if isinstance(s, IDFModel)), None)
    if col == "features" and idf is not None:
        df = np.asarray(idf.docFreq)
        keep = np.flatnonzero((df > 0) & (df >= idf.getMinDocFreq()))
        return keep.tolist(), len(df)

    @F.udf(T.ArrayType(T.IntegerType()))
    def nonzero(v):
        if v is None:
            return []
        return [int(i) for i in (v.indices if hasattr(v, "indices") else np.flatnonzero(v))]

    size = len(train.select(col).first()[0])
    rows = train.select(F.explode(nonzero(col)).alias("i")).distinct().collect()
    return sorted(r.i for r in rows), size


def plan_fits(spark: SparkSession, bc: BaselineConfig, classes: int, features: int) -> int:
    """How many fits run at once: baseline.parallelism, unless their coefficient copies
    would take more than HEAP_SHARE of the driver's memory."""
    per_fit = classes * features * 8 * COPIES_PER_FIT
    heap = driver_memory_bytes(spark)
    fits = max(1, min(bc.parallelism, int(HEAP_SHARE * heap // per_fit)))
    if fits < bc.parallelism:
        log.info(
            "baseline: %d fit(s) at once instead of baseline.parallelism=%d: each holds "
            "about %.0f MB of coefficients (%d classes x %d features) and the driver has %.1f GB",
            fits, bc.parallelism, per_fit / 2**20, classes, features, heap / 2**30,
        )  # fmt: skip
    return fits


def driver_memory_bytes(spark: SparkSession) -> int:
    """spark.driver.memory as bytes (Spark's default, 1g, when unset)."""
    value = spark.conf.get("spark.driver.memory", "1g") or "1g"
    m = re.fullmatch(r"(\d+)([kmgt]?)b?", value.strip().lower())
    if not m:
        return 1 << 30
    return int(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " ")


def spark_cores(spark: SparkSession) -> int:
    return default_parallelism(spark)


def training_inputs(ctx: StageContext, bc: BaselineConfig):
    """(rows with label_index, split and the vector column; the fitted stages that make
    that column from raw input; the column; a function of the training rows giving the
    used indices and the vector size), by `features_col`."""
    catalog, col = ctx.catalog, bc.features_col
    if col in ("features", "word2vec"):
        feature_model = load_feature_model(catalog)
        used = lambda train: used_features(train, feature_model, col)  # noqa: E731
        return catalog.read("features", "features"), feature_model.stages, col, used
    from sparkloom.pipelines.embed import load_embedder

    embeddings = catalog.read("embeddings", "embed")
    embedder = load_embedder(catalog)
    if col == EMBEDDING:
        used = lambda train: used_features(train, None, EMBEDDING)  # noqa: E731
        return embeddings, embedder.stages, EMBEDDING, used
    # TF-IDF and embedding side by side; a text the embed stage quarantined has no vector
    feature_model = load_feature_model(catalog)
    assembler = VectorAssembler(inputCols=["features", EMBEDDING], outputCol=JOINED)
    data = catalog.read("features", "features").join(embeddings.select("id", EMBEDDING), "id")
    dim = catalog.manifest("embeddings")["dimension"]

    def used(train: DataFrame) -> tuple[list, int]:
        keep, total = used_features(train, feature_model, "features")
        return keep + [total + i for i in range(dim)], total + dim

    stages = [*feature_model.stages, *embedder.stages, assembler]
    return assembler.transform(data), stages, JOINED, used


def run_classifier(ctx: StageContext) -> BaselineResult:
    """Fit, tune and evaluate the MLlib classifier of `ctx.stage` (its section: baseline
    or embed_baseline). The scoring model (features + classifier, raw text or image in,
    label name out) is the stage's dataset `<stage>_model`."""
    spark, cfg, catalog, upstream = ctx.spark, ctx.cfg, ctx.catalog, ctx.upstream
    bc: BaselineConfig = getattr(cfg, ctx.stage)
    labels = upstream["labels"]
    blas, native = blas_in_use(spark)
    log.info(
        "baseline: MLlib computes with %s%s", blas,
        "" if native is not False else " (no native BLAS: `apt install libopenblas0` provides libblas.so.3, "
        "which MLlib then loads; see docs/baseline.md)",
    )  # fmt: skip
    data, front, col, used = training_inputs(ctx, bc)
    # MLlib takes the class count from the label column's metadata, which Parquet keeps per
    # file: incremental batches written before a new label hold the shorter list
    nominal = {"ml_attr": {"type": "nominal", "name": "label_index", "vals": list(labels)}}
    data = data.withColumn("label_index", F.col("label_index").alias("label_index",
                                                                     metadata=nominal))  # fmt: skip
    train_all = data.filter(F.col("split") == "train")
    if train_all.isEmpty():
        raise DataError(
            "the training split is empty; check ingest.split ratios and the ingest counts"
        )
    keep, total = used(train_all)
    if not keep:
        raise DataError(
            "no feature is non-zero in the training split; check features.idf.min_doc_freq "
            "and features.tf (every document is empty after tokenizing?)"
        )
    slicer = VectorSlicer(inputCol=col, outputCol=INPUT_COL, indices=keep)
    partitions = bc.partitions or spark_cores(spark)
    weight_col = "class_weight" if bc.class_weight == "balanced" else None
    train = slicer.transform(train_all).select("label_index", INPUT_COL)
    if weight_col:
        train = with_balanced_weights(train, weight_col)
    train = train.repartition(partitions).cache()
    validation = None
    started = time.perf_counter()
    try:
        log.info(
            "%s: %d of %d features are used by the training split; fitting on those, "
            "%d partitions", ctx.stage, len(keep), total, partitions,
        )  # fmt: skip
        lr, grid, tuner = build_estimator(bc, INPUT_COL, len(labels), weight_col)
        fits = plan_fits(spark, bc, len(labels), len(keep))
        if tuner is not None:
            tuner.setParallelism(fits)
            fitted = tuner.fit(train)
            lr_model: LogisticRegressionModel = fitted.bestModel
            grid_scores = _grid_scores(fitted, grid)
        else:
            if bc.tuning == "validation":
                validation = slicer.transform(data.filter(F.col("split") == "validation"))
                validation = validation.select("label_index", INPUT_COL).cache()
                if validation.isEmpty():
                    raise DataError(
                        f"{ctx.stage}.tuning=validation needs a validation split and it is "
                        f"empty; set ingest.split.validation > 0 or {ctx.stage}.tuning="
                        "train_validation_split"
                    )
            lr_model, grid_scores = fit_grid(lr, grid, train, validation, bc.metric, fits)
        train_rows = train.count()  # cached
    finally:
        train.unpersist()
        if validation is not None:
            validation.unpersist()
    train_seconds = time.perf_counter() - started
    regs = sorted(set(bc.grid.reg_param))
    if len(regs) > 1 and lr_model.getRegParam() in (regs[0], regs[-1]):
        log.warning(
            "%s: the best reg_param, %g, is at the end of %s.grid.reg_param %s; "
            "the optimum may lie beyond it: extend the grid that way",
            ctx.stage, lr_model.getRegParam(), ctx.stage, regs,
        )  # fmt: skip
    iterations = lr_model.summary.totalIterations if lr_model.hasSummary else 0
    converged = iterations < lr_model.getMaxIter()
    if not converged:
        log.warning(
            "%s: the chosen model stopped at max_iter=%d before L-BFGS converged; "
            "raise %s.grid.max_iter", ctx.stage, lr_model.getMaxIter(), ctx.stage,
        )  # fmt: skip

    result = BaselineResult(
        labels=labels,
        best_params={
            "reg_param": lr_model.getRegParam(),
            "standardization": lr_model.getStandardization(),
            "elastic_net_param": lr_model.getElasticNetParam(),
            "max_iter": lr_model.getMaxIter(),
        },
        tuning_metric=max(g["score"] for g in grid_scores) if grid_scores else float("nan"),
        metrics={},
        confusion={},
        grid=grid_scores,
        features_used=len(keep),
        features_total=total,
        iterations=iterations,
        converged=converged,
        fits_at_once=fits,
        partitions=partitions,
        train_seconds=train_seconds,
        train_rows=train_rows,
        num_parameters=lr_model.coefficientMatrix.numRows * (len(keep) + 1),
    )
    for split in ("validation", "test"):
        scored = lr_model.transform(slicer.transform(data.filter(F.col("split") == split)))
        metrics, cm = evaluate(scored, labels)
        if not cm.sum():  # an empty split (e.g. validation ratio 0): nothing to report
            continue
        result.metrics[split] = metrics
        result.confusion[split] = cm.tolist()

    # every held-out row's log-probabilities: calibration now, slices when logged
    result.predictions = predictions_dir(catalog, ctx.stage, ctx.fingerprint)
    held_out = slicer.transform(data.filter(F.col("split").isin("validation", "test")))
    write_spark_predictions(lr_model.transform(held_out), result.predictions)
    ec = cfg.evaluation
    result.calibration = calibrate(spark, result.predictions, ec.bins, ec.calibrate)

    scoring = PipelineModel(
        stages=[
            *front,
            slicer,
            lr_model,
            IndexToString(inputCol="prediction", outputCol="predicted_label", labels=labels),
        ]
    )
    catalog.write(ctx.output, scoring.save, ctx.common(result=asdict(result)))
    return result


# the same code, two stages: TF-IDF by default, and the embeddings (embed_baseline)
run_baseline = stage("baseline", BaselineResult)(run_classifier)
run_embed_baseline = stage("embed_baseline", BaselineResult)(run_classifier)


def fit_grid(
    lr: LogisticRegression, grid: list, train: DataFrame, validation: DataFrame | None,
    metric: str, fits: int,
) -> tuple[LogisticRegressionModel, list[dict]]:  # fmt: skip
    """Fit every grid point on `train` (`fits` at a time) and keep the best on
    `validation`; ties go to the earlier point (the stronger penalty). Without a
    validation split, the one point given is the model."""
    evaluator = MulticlassClassificationEvaluator(labelCol="label_index", metricName=metric)

    def one(params):
        t0 = time.perf_counter()
        model = lr.copy(params).fit(train)
        score = evaluator.evaluate(model.transform(validation)) if validation else math.nan
        iters = model.summary.totalIterations
        log.info(
            "baseline: %s -> %s %.4f (%d iterations, %.1fs)",
            {p.name: v for p, v in params.items()}, metric, score, iters,
            time.perf_counter() - t0,
        )  # fmt: skip
        return model, score, iters

    if validation is None:
        model, _, _ = one(grid[0])
        return model, []
    with ThreadPoolExecutor(max_workers=fits) as pool:
        done = list(pool.map(compat.thread_target(train.sparkSession, one), grid))
    best = max(range(len(done)), key=lambda i: (done[i][1], -i))
    scores = [
        {**{p.name: v for p, v in params.items()}, "score": float(score), "iterations": iters}
        for params, (_, score, iters) in zip(grid, done, strict=True)
    ]
    return done[best][0], scores


def with_balanced_weights(train: DataFrame, col: str) -> DataFrame:
    """Add `col` = n / (classes * rows of the row's class), scikit-learn's 'balanced'."""
    counts = {r.label_index: r["count"] for r in train.groupBy("label_index").count().collect()}
    n, k = sum(counts.values()), len(counts)
    weights = F.create_map(
        *[x for label, c in counts.items() for x in (F.lit(label), F.lit(n / (k * c)))]
    )
    return train.withColumn(col, weights[F.col("label_index")])


def _grid_scores(fitted, grid) -> list[dict[str, float]]:
    """Mean tuning metric of every grid point (CrossValidator/TrainValidationSplit only)."""
    scores = getattr(fitted, "avgMetrics", None) or getattr(fitted, "validationMetrics", None)
    if scores is None:
        return []
    out = []
    for params, score in zip(grid, scores, strict=True):
        row = {p.name: v for p, v in params.items()}
        out.append({**row, "score": float(score)})
    return out
