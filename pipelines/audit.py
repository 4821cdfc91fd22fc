"""What every classifier stage reports beyond accuracy: calibration and slice metrics.

A classifier stage writes its validation and test predictions (id, label index, logits) as
Parquet partitioned by `split=` under its work folder: the deep stages from their final
evaluation (every rank writes its own rows), the MLlib baselines from `transform`, with the
log of the probability as logits (softmax(log p) = p, and a temperature scales both alike).
From that one layout:

- `calibration` fits the temperature on validation and measures ECE and NLL on test
  (models/calibration.py); the stage stores the result with its model, so scoring can apply
  it (`evaluation.calibrate: temperature`).
- `slices` joins the test predictions to the ingested rows by id and reports accuracy, F1
  and count per value of each `evaluation.slices` entry (pipelines/slices.py).

Both collect to the driver only what they need: calibration the logits of validation and
test (rows x classes floats: 200,000 test rows of 20 classes is 16 MB), slices a count per
(slice, label, prediction).
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import numpy as np
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkloom.models import calibration
from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.config import Config
from sparkloom.pipelines.errors import ConfigError
from sparkloom.pipelines.slices import LENGTH_QUARTILE, length_quartile, slice_metrics

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"  # beside a model: what scoring applies


def predictions_dir(catalog: Catalog, stage: str, fingerprint: str) -> str:
    """Where `stage`'s predictions of the model with this fingerprint go."""
    from sparkloom.models import storage

    return storage.join(catalog.uri(f"{stage}_work"), fingerprint, "predictions")


def write_spark_predictions(scored: DataFrame, path: str) -> None:
    """Validation and test rows scored by an MLlib model (id, split, label_index,
    probability) as the predictions layout: log-probabilities as logits."""
    from pyspark.ml.functions import vector_to_array

    logits = F.transform(
        vector_to_array("probability"), lambda p: F.log(F.greatest(p, F.lit(1e-12)))
    )
    scored.select(
        F.col("id").cast("string").alias("id"), F.col("label_index").cast("int").alias("label"),
        logits.alias("logits"), "split",
    ).write.mode("overwrite").partitionBy("split").parquet(path)  # fmt: skip


def read_predictions(spark: SparkSession, path: str) -> DataFrame:
    return spark.read.parquet(path)


def _arrays(df: DataFrame, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    rows = df.filter(F.col("split") == split).select("label", "logits").toPandas()
    if rows.empty:
        return None
    return np.stack(rows["logits"].map(np.asarray)), rows["label"].to_numpy(dtype=np.int64)


def calibrate(spark: SparkSession, path: str, bins: int, method: str) -> dict:
    """calibration.summary of the predictions at `path`, and whether scoring applies T."""
    df = read_predictions(spark, path)
    out = calibration.summary(_arrays(df, "validation"), _arrays(df, "test"), bins)
    out["applied"] = method == "temperature" and out["fitted_on"] is not None
    if method == "temperature" and not out["applied"]:
        log.warning(
            "evaluation.calibrate=temperature: no validation rows to fit the temperature on; "
            "the model is stored uncalibrated (set ingest.split.validation > 0)"
        )
    if "test_ece" in out:
        log.info(
            "calibration: test ECE %.4f -> %.4f at temperature %.3f (fitted on %d validation rows)%s",
            out["test_ece"], out["test_ece_calibrated"], out["temperature"],
            out.get("validation_rows", 0), "; applied by scoring" if out["applied"] else "",
        )  # fmt: skip
    return out


def slices(
    spark: SparkSession, cfg: Config, catalog: Catalog, path: str, labels: list[str]
) -> list[dict]:
    """One SliceReport (as a dict) per `evaluation.slices` entry, over the test rows."""
    ec = cfg.evaluation
    if not ec.slices:
        return []
    test = read_predictions(spark, path).filter(F.col("split") == "test")
    names = F.array(*[F.lit(x) for x in labels])
    pred = F.array_position(F.col("logits"), F.array_max("logits")) - 1  # argmax, 0-based
    test = test.select(
        "id", F.element_at(names, F.col("label") + 1).alias("label"),
        F.element_at(names, pred.cast("int") + 1).alias("predicted_label"),
    )  # fmt: skip
    ingested = catalog.read("ingested", "ingest")
    rows = test.join(ingested.drop("label", "label_index", "split"), "id")
    out = []
    for spec in ec.slices:
        by = length_quartile(rows) if spec == LENGTH_QUARTILE else spec
        if spec == LENGTH_QUARTILE and "text" not in rows.columns:
            raise ConfigError("evaluation.slices: length_quartile counts the words of `text`; "
                              "this data has no text column")  # fmt: skip
        try:
            report = slice_metrics(rows, spec, by, labels, ec.max_gap)
        except AnalysisException:  # not a column or expression of the ingested rows
            raise ConfigError(
                f"evaluation.slices: '{spec}' is not a column or expression of the ingested "
                f"data (columns: {', '.join(c for c in ingested.columns)})"
            ) from None
        for r in report.flagged:
            log.warning(
                "slice %s=%s: accuracy %.4f on %d test rows, %.4f below overall %.4f "
                "(evaluation.max_gap %.2f)", spec, r["value"], r["accuracy"], r["count"],
                r["gap"], report.overall_accuracy, ec.max_gap,
            )  # fmt: skip
        out.append({**asdict(report), "flagged": report.flagged})
    return out
