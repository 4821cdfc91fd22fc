"""Ingest: validate what the sources read, quarantine, make ids, split, index labels.

The readers (pipelines.sources) turn every format into one shape, so validation is
one function per modality. Rows that fail validation go to the quarantine dataset
with a reason; rows in = rows out + rows quarantined, checked after writing.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import asdict, dataclass

from pyspark.ml.feature import StringIndexer, StringIndexerModel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.catalog import Catalog, HadoopFS, fingerprint
from pipelines.config import Config, ImageConfig, IngestConfig, SplitConfig
from pipelines.errors import DataError
from pipelines.images import channel_stats, prepare_images
from pipelines.sources import read_raw, require_input

log = logging.getLogger(__name__)

SPLIT_KEY = "_split_key"


# --- validation, ids, split: pure DataFrame -> DataFrame --------------------------------------


def with_reason(raw: DataFrame, has_id: bool) -> DataFrame:
    """Adds `reason`: null for a good row, else the first problem found."""
    reason = (
        F.when(F.col("malformed"), "malformed_record")
        .when(F.col("text").isNull(), "null_text")
        .when(F.col("text").rlike(r"^\s*$"), "empty_text")  # F.trim strips spaces only
        .when(F.col("bad_utf8"), "invalid_utf8")
    )
    return raw.withColumn("reason", _label_and_id(reason, has_id))


def _label_and_id(reason: Column, has_id: bool) -> Column:
    """The checks every row shares, after the payload's own: a label, and an id if given."""
    reason = reason.when(F.col("label").isNull() | F.col("label").rlike(r"^\s*$"), "null_label")
    if has_id:
        reason = reason.when(F.col("id").isNull() | (F.length(F.col("id")) == 0), "null_id")
    return reason


def with_image_reason(raw: DataFrame, ic: ImageConfig, has_id: bool) -> DataFrame:
    """Decodes and resizes `raw` images (pipelines.images); adds `reason` like `with_reason`."""
    df = prepare_images(raw, ic)
    found = F.coalesce(F.col("reason"), F.col("image_reason"))
    reason = _label_and_id(F.when(found.isNotNull(), found), has_id)
    return df.withColumn("reason", reason).drop("image_reason")


def with_ids(df: DataFrame, content: str = "text") -> DataFrame:
    """Deterministic ids for data without one: hash of label and content, `-k` on repeats.

    Independent of file order and partitioning, so a re-run gives the same ids.
    """
    body = F.col(content)
    if isinstance(df.schema[content].dataType, T.BinaryType):
        base = F.sha2(F.concat(F.encode(F.col("label"), "UTF-8"), F.lit(b"\x1f"), body), 256)
    else:
        base = F.sha2(F.concat_ws("\u001f", F.col("label"), body), 256)
    base = F.substring(base, 1, 20)
    df = df.withColumn(SPLIT_KEY, base)
    nth = F.row_number().over(Window.partitionBy(SPLIT_KEY).orderBy("source"))
    return df.withColumn(
        "id", F.when(nth == 1, F.col(SPLIT_KEY)).otherwise(F.concat_ws("-", SPLIT_KEY, nth))
    )


def with_split(df: DataFrame, split: SplitConfig) -> DataFrame:
    """train/validation/test by a hash of the id: stable across runs, engines and row order.

    Made-up ids hash their content, so exact duplicates land in the same split
    (no copies of a test document in training).
    """
    key = F.col(SPLIT_KEY) if SPLIT_KEY in df.columns else F.col("id")
    u = F.pmod(F.xxhash64(key, F.lit(split.seed)), F.lit(1_000_000)) / 1_000_000.0
    return df.withColumn(
        "split",
        F.when(u < split.train, "train")
        .when(u < split.train + split.validation, "validation")
        .otherwise("test"),
    )


def fit_label_index(clean: DataFrame) -> StringIndexerModel:
    """Alphabetical label order: the same labels always get the same indices."""
    return StringIndexer(
        inputCol="label", outputCol="label_index", stringOrderType="alphabetAsc"
    ).fit(clean)


# --- the stage --------------------------------------------------------------------------------


@dataclass
class IngestResult:
    rows_in: int
    rows_out: int
    rows_quarantined: int
    reasons: dict[str, int]
    splits: dict[str, int]
    labels: list[str]
    skipped: bool = False

    def summary(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in self.reasons.items()) or "none"
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.splits.items()))
        return (
            f"{self.rows_in} rows in = {self.rows_out} out ({parts}) + "
            f"{self.rows_quarantined} quarantined ({why})"
        )

    def metrics(self) -> dict[str, float]:
        m = {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_quarantined": self.rows_quarantined,
        }
        m |= {f"quarantined_{k}": v for k, v in self.reasons.items()}
        m |= {f"rows_{k}": v for k, v in self.splits.items()}
        return m


def annotate(spark: SparkSession, ing: IngestConfig) -> tuple[DataFrame, bool]:
    """Every input row with `reason` (null when usable); and whether rows come with ids."""
    raw = read_raw(spark, ing)
    # text_dirs, image_dirs: the file path; idx: file and position
    has_id = ing.columns.id is not None or ing.format in ("text_dirs", "image_dirs", "idx")
    if ing.modality == "image":
        return with_image_reason(raw, ing.image, has_id), has_id
    return with_reason(raw, has_id=has_id), has_id


def run_ingest(
    spark: SparkSession, cfg: Config, catalog: Catalog, force: bool = False
) -> IngestResult:
    ing = cfg.require_ingest()
    path = require_input(spark, ing)
    fp = fingerprint(cfg.stage_hash("ingest"), HadoopFS(spark).fingerprint(path))
    m = None if force else catalog.current("ingested", fp)
    if m is not None:
        log.info("ingest: output is current (same inputs and config); skipped")
        return IngestResult(**{**m["result"], "skipped": True})

    payload = "image" if ing.modality == "image" else "text"
    annotated, has_id = annotate(spark, ing)
    annotated = annotated.persist()
    common = {"fingerprint": fp, "config_hash": cfg.stage_hash("ingest"), "input": path}
    try:
        rows_in = annotated.count()
        if ing.format in ("text_dirs", "image_dirs"):  # one row per file: none may go missing
            listed = sum(1 for rel, _, _ in HadoopFS(spark).list_files(path)
                         if fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], ing.file_glob))  # fmt: skip
            if listed != rows_in:
                raise DataError(
                    f"{path}: {listed} files match '{ing.file_glob}' but {rows_in} were read; "
                    "files changed during the read, or the file source skipped some. Nothing "
                    "was committed; run ingest again"
                )
        good = annotated.filter(F.col("reason").isNull())
        if not has_id:
            good = with_ids(good, payload)
        good = with_split(good, ing.split)
        if good.isEmpty():
            raise DataError(
                f"no usable rows in {path}: all {rows_in} would go to quarantine "
                f"(reasons: {_reason_counts(annotated)}); check ingest.format and ingest.columns"
            )
        indexer = fit_label_index(good)
        labels = list(indexer.labels)
        clean = indexer.transform(good).select("id", payload, "label", "label_index", "split")
        kept = ["text"] if payload == "text" else []  # undecodable images: the source says where
        quarantine = annotated.filter(F.col("reason").isNotNull()).select(
            "id", *kept, "label", "source", "reason"
        )
        reasons: dict[str, int] = {}

        def quarantine_manifest(tmp: str) -> dict:
            reasons.update(_reason_counts(spark.read.parquet(tmp)))
            return {**common, "rows": sum(reasons.values()), "reasons": reasons}

        def ingested_manifest(tmp: str) -> dict:
            # counted from what was written, so the books balance on the data as stored
            d = spark.read.parquet(tmp)
            splits = {r["split"]: r["count"] for r in d.groupBy("split").count().collect()}
            result = IngestResult(
                rows_in, sum(splits.values()), sum(reasons.values()), reasons, splits, labels
            )
            if result.rows_in != result.rows_out + result.rows_quarantined:
                raise DataError(
                    f"row accounting failed: {result.rows_in} in != {result.rows_out} out + "
                    f"{result.rows_quarantined} quarantined; nothing was committed. Please report this"
                )
            extra = {}
            if payload == "image":
                extra["image"] = image_manifest(d, ing.image)
            return {**common, "labels": labels, "result": asdict(result), **extra}

        catalog.write_parquet("quarantine", quarantine, quarantine_manifest)
        catalog.write("label_index", indexer.save, {**common, "labels": labels})
        # the data is committed last: its manifest is what marks the stage as done
        m = catalog.write_parquet("ingested", clean, ingested_manifest, partition_by=["split"])
    finally:
        annotated.unpersist()
    return IngestResult(**m["result"])


def image_manifest(data: DataFrame, ic: ImageConfig) -> dict:
    """Shape and the training split's per-channel mean/std (of x/255), stored with the data
    so training, evaluation and scoring standardize the same way."""
    train = data.filter(F.col("split") == "train")
    stats = channel_stats(train, ic.channels, ic.height, ic.width)
    return {"shape": [ic.channels, ic.height, ic.width], **stats}


def _reason_counts(df: DataFrame) -> dict[str, int]:
    rows = df.filter(F.col("reason").isNotNull()).groupBy("reason").count().collect()
    return {r["reason"]: r["count"] for r in sorted(rows)}


def load_label_index(catalog: Catalog) -> StringIndexerModel:
    catalog.require("label_index", "ingest")
    return StringIndexerModel.load(catalog.path("label_index"))
