"""MLlib baseline: multinomial LogisticRegression, tuned over a grid, evaluated on test.

Tuning (CrossValidator or TrainValidationSplit) sees only the training split;
validation and test are scored once with the chosen model. The saved model is
the whole text -> label PipelineModel (features + classifier + IndexToString),
so scoring needs nothing else.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
from pyspark.ml import PipelineModel
from pyspark.ml.classification import LogisticRegression, LogisticRegressionModel
from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.ml.feature import IndexToString
from pyspark.ml.tuning import CrossValidator, ParamGridBuilder, TrainValidationSplit
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.catalog import Catalog, fingerprint
from pipelines.config import BaselineConfig, Config
from pipelines.errors import DataError
from pipelines.report import classification_metrics, confusion_from_counts
from pipelines.text import load_feature_model

log = logging.getLogger(__name__)


@dataclass
class BaselineResult:
    labels: list[str]
    best_params: dict[str, float]
    tuning_metric: float
    metrics: dict[str, dict[str, float]]  # split -> metric -> value
    confusion: dict[str, list[list[int]]]  # split -> matrix[true][predicted]
    grid: list[dict[str, float]] = field(default_factory=list)  # params + mean tuning metric
    skipped: bool = False

    def summary(self) -> str:
        t = self.metrics["test"]
        return (
            f"test accuracy {t['accuracy']:.4f}, weighted F1 {t['f1']:.4f} "
            f"(majority class {t['majority_class_accuracy']:.4f}, n={int(t['num_examples'])}); "
            f"best {self.best_params}"
        )


def build_estimator(bc: BaselineConfig, features_col: str, num_classes: int):
    """The classifier wrapped in its tuner, from config."""
    lr = LogisticRegression(
        featuresCol=features_col,
        labelCol="label_index",
        family="multinomial" if num_classes > 2 else "auto",
    )
    grid = (
        ParamGridBuilder()
        .addGrid(lr.regParam, bc.grid.reg_param)
        .addGrid(lr.elasticNetParam, bc.grid.elastic_net_param)
        .addGrid(lr.maxIter, bc.grid.max_iter)
        .build()
    )
    evaluator = MulticlassClassificationEvaluator(labelCol="label_index", metricName=bc.metric)
    if bc.tuning == "cross_validation":
        return CrossValidator(
            estimator=lr, estimatorParamMaps=grid, evaluator=evaluator,
            numFolds=bc.num_folds, parallelism=bc.parallelism, seed=bc.seed,
        ), grid  # fmt: skip
    if bc.tuning == "train_validation_split":
        return TrainValidationSplit(
            estimator=lr, estimatorParamMaps=grid, evaluator=evaluator,
            trainRatio=bc.train_ratio, parallelism=bc.parallelism, seed=bc.seed,
        ), grid  # fmt: skip
    return lr.copy(grid[0]), grid[:1]


def evaluate(predictions: DataFrame, labels: list[str]) -> tuple[dict[str, float], np.ndarray]:
    """Metrics and confusion matrix from a DataFrame with label_index and prediction."""
    counts = predictions.groupBy("label_index", "prediction").count().collect()
    cm = confusion_from_counts([(r[0], r[1], r[2]) for r in counts], len(labels))
    return classification_metrics(cm, labels), cm


def run_baseline(
    spark: SparkSession, cfg: Config, catalog: Catalog, force: bool = False
) -> tuple[BaselineResult, PipelineModel | None]:
    """Fit, tune and evaluate; returns the result and the scoring model (None when skipped)."""
    upstream = catalog.require("features", "features")
    fp = fingerprint(cfg.stage_hash("baseline"), upstream["fingerprint"])
    m = None if force else catalog.current("baseline_model", fp)
    if m is not None:
        log.info("baseline: model is current (same inputs and config); skipped")
        return BaselineResult(**{**m["result"], "skipped": True}), PipelineModel.load(
            catalog.path("baseline_model")
        )

    bc = cfg.baseline
    labels = upstream["labels"]
    data = catalog.read("features", "features")
    train = data.filter(F.col("split") == "train").cache()
    try:
        if train.isEmpty():
            raise DataError(
                "the training split is empty; check ingest.split ratios and the ingest counts"
            )
        tuner, grid = build_estimator(bc, bc.features_col, len(labels))
        fitted = tuner.fit(train)
    finally:
        train.unpersist()
    lr_model: LogisticRegressionModel = getattr(fitted, "bestModel", fitted)
    grid_scores = _grid_scores(fitted, grid)

    result = BaselineResult(
        labels=labels,
        best_params={
            "reg_param": lr_model.getRegParam(),
            "elastic_net_param": lr_model.getElasticNetParam(),
            "max_iter": lr_model.getMaxIter(),
        },
        tuning_metric=max(g["score"] for g in grid_scores) if grid_scores else float("nan"),
        metrics={},
        confusion={},
        grid=grid_scores,
    )
    for split in ("validation", "test"):
        metrics, cm = evaluate(lr_model.transform(data.filter(F.col("split") == split)), labels)
        if not cm.sum():  # an empty split (e.g. validation ratio 0): nothing to report
            continue
        result.metrics[split] = metrics
        result.confusion[split] = cm.tolist()

    scoring = PipelineModel(
        stages=[
            *load_feature_model(catalog).stages,
            lr_model,
            IndexToString(inputCol="prediction", outputCol="predicted_label", labels=labels),
        ]
    )
    catalog.write(
        "baseline_model",
        scoring.save,
        {"fingerprint": fp, "config_hash": cfg.stage_hash("baseline"), "result": asdict(result)},
    )
    return result, scoring


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
