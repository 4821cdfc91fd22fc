"""Ingest: validate what the sources read, quarantine, make ids, split, index labels.

The readers (pipelines.sources) turn every format into one shape, so validation is
one function per modality. Rows that fail validation go to the quarantine dataset
with a reason; rows in = rows out + rows quarantined, checked after writing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

from pyspark.ml.feature import StringIndexer, StringIndexerModel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.config import SPLITS, Config, ImageConfig, IngestConfig, SplitConfig
from sparkloom.pipelines.context import StageContext, stage
from sparkloom.pipelines.errors import DataError
from sparkloom.pipelines.images import channel_stats, prepare_images
from sparkloom.pipelines.sources import (
    csv_scans,
    input_fingerprint,
    input_listing,
    is_utf8,
    read_errors,
    read_raw,
    resolve_input_path,
    with_record_lines,
)

log = logging.getLogger(__name__)

SPLIT_KEY = "_split_key"


# --- validation, ids, split: pure DataFrame -> DataFrame --------------------------------------


def with_reason(raw: DataFrame, has_id: bool, encoding: str = "utf-8") -> DataFrame:
    """Adds `reason`: null for a good row, else the first problem found."""
    undecodable = "invalid_utf8" if is_utf8(encoding) else "undecodable_text"
    reason = (
        F.when(F.col("malformed"), "malformed_record")
        .when(F.col("problem").isNotNull(), F.col("problem"))
        .when(F.col("text").isNull(), "null_text")
        .when(F.col("text").rlike(r"^\s*$"), "empty_text")  # F.trim strips spaces only
        .when(F.col("bad_text"), undecodable)
    )
    return raw.withColumn("reason", _label_and_id(reason, has_id))


def _label_and_id(reason: Column, has_id: bool) -> Column:
    """The checks every row shares, after the payload's own: a label, and an id if given."""
    reason = reason.when(F.col("label").isNull() | F.col("label").rlike(r"^\s*$"), "null_label")
    if has_id:
        reason = reason.when(F.col("id").isNull() | (F.length(F.col("id")) == 0), "null_id")
    return reason


def normalized_labels(df: DataFrame) -> DataFrame:
    """Labels as one value each: surrounding whitespace off, integral numbers as integers
    (`1.0` and `1` are one class; a column with a missing value makes pandas write `1.0`)."""
    label = F.regexp_replace(F.col("label"), r"^\s+|\s+$", "")
    label = F.regexp_replace(label, r"^([+-]?[0-9]+)\.0*$", "$1")
    return df.withColumn("label", label)


def with_duplicate_ids(df: DataFrame) -> DataFrame:
    """Rows whose id an earlier good row (in file, then input order) already has get
    `duplicate_id`: a repeated id would fan out every join on it, and scores could not be
    matched back to their inputs."""
    bad_first = F.col("reason").isNotNull()  # good rows first: the first *good* row is kept
    nth = F.row_number().over(Window.partitionBy("id").orderBy(bad_first, "source", "pos"))
    dup = F.col("reason").isNull() & (nth > 1)
    return df.withColumn("reason", F.when(dup, "duplicate_id").otherwise(F.col("reason")))


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


def with_split(df: DataFrame, split: SplitConfig, given: bool = False,
               carve_validation: bool = False) -> DataFrame:  # fmt: skip
    """train/validation/test by a hash of the id: stable across runs, engines and row order;
    or the data's own split (`given_split`), with `validation_ratio` of its training rows
    moved to validation by the same hash when it has no validation rows.

    Made-up ids hash their content, so exact duplicates land in the same split
    (no copies of a test document in training).
    """
    key = F.col(SPLIT_KEY) if SPLIT_KEY in df.columns else F.col("id")
    u = F.pmod(F.xxhash64(key, F.lit(split.seed)), F.lit(1_000_000)) / 1_000_000.0
    if given and carve_validation:
        carved = (F.col("given_split") == "train") & (u < split.validation_ratio)
        return df.withColumn("split", F.when(carved, "validation").otherwise(F.col("given_split")))
    if given:
        return df.withColumn("split", F.col("given_split"))
    return df.withColumn(
        "split",
        F.when(u < split.train, "train")
        .when(u < split.train + split.validation, "validation")
        .otherwise("test"),
    )


def check_given_split(good: DataFrame, ing: IngestConfig) -> bool:
    """The data's own split holds only train/validation/test, and train and test; returns
    whether validation rows must be carved from train (it has none)."""
    counts = {r["given_split"]: r["count"] for r in good.groupBy("given_split").count().collect()}
    wrong = {k: v for k, v in counts.items() if k not in SPLITS}
    if wrong:
        value, n = sorted(wrong.items(), key=lambda kv: -kv[1])[0]
        raise DataError(
            f"ingest.split.column '{ing.split.column}' holds {value!r} in {n} row(s) "
            f"({len(wrong)} value(s) other than train/validation/test); map them to "
            "train/validation/test in the data, or set ingest.split.column=null to split by "
            "ingest.split ratios"
        )
    for need in ("train", "test"):
        if not counts.get(need):
            raise DataError(
                f"the data's own split has no {need} rows (found {counts}); give {need} rows "
                "(ingest.path.{need} or the split column), or split by ratios"
            )
    return not counts.get("validation") and ing.split.validation_ratio > 0


# free text, not a class: a mis-read CSV puts a fragment of a document in the label column
LONG_LABEL = 100


def check_labels(good: DataFrame, ing: IngestConfig) -> list[str]:
    """Fails when the labels cannot be right: too many, free text, one class written two
    ways, fewer than two classes to train on. Returns warnings (classes missing from train)."""
    label_col = ing.columns.label
    fix_read = (
        "check how the file quotes text (ingest.csv.quote/escape/multiline) and which column "
        f"holds the label (ingest.columns.label={label_col!r})"
    )
    # one job: (split, label) counts, at most 3 per label, so a mis-read file with a million
    # "labels" stops at 3 x max_labels + 1 rows
    bound = 3 * ing.max_labels
    rows = good.groupBy("split", "label").count().limit(bound + 1).collect()
    per_split = {(r["split"], r["label"]): r["count"] for r in rows}
    distinct = sorted({lab for _, lab in per_split})
    if len(distinct) > ing.max_labels or len(rows) > bound:
        raise DataError(
            f"more than {ing.max_labels} distinct labels (ingest.max_labels): the labels are "
            f"probably mis-read; {fix_read}, or raise ingest.max_labels"
        )
    text_like = [x for x in distinct if len(x) > LONG_LABEL or "\n" in x or len(x.split()) > 8]
    if text_like:
        shown = text_like[0][:60].replace("\n", "\\n")
        raise DataError(
            f"{len(text_like)} label(s) look like free text, e.g. {shown!r}...: {fix_read}"
        )
    if not ing.labels.case_sensitive:
        groups: dict[str, list[str]] = {}
        for x in sorted(distinct):
            groups.setdefault(x.casefold().strip(), []).append(x)
        clash = [v for v in groups.values() if len(v) > 1]
        if clash:
            raise DataError(
                f"labels {clash[0]} differ only in case ({len(clash)} such group(s)); make them "
                "one label in the data, or set ingest.labels.case_sensitive=true if they are "
                "different classes"
            )
    train = {lab for (sp, lab) in per_split if sp == "train"}
    if len(train) < 2:
        raise DataError(
            f"the training split has {len(train)} class(es) ({sorted(train)}); a classifier "
            "needs at least two: check ingest.columns.label and the input"
        )
    warnings = []
    for lab in sorted(set(distinct) - train):
        n = {sp: c for (sp, x), c in per_split.items() if x == lab}
        warnings.append(f"label {lab!r} is not in the training split ({n}): no model can learn it")
    return warnings


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
    raw = normalized_labels(read_raw(spark, ing))
    # text_dirs, image_dirs: the file path; idx: file and position
    has_id = ing.columns.id is not None or ing.format in ("text_dirs", "image_dirs", "idx")
    if ing.modality == "image":
        df = with_image_reason(raw, ing.image, has_id)
    else:
        df = with_reason(raw, has_id, ing.encoding)
    if ing.columns.id is not None:
        df = with_duplicate_ids(df)
    return df, has_id


def _files(spark: SparkSession, cfg: Config, catalog: Catalog) -> list[str]:
    return [input_fingerprint(spark, cfg.require_ingest())]


@stage("ingest", IngestResult, extra=_files)
def run_ingest(ctx: StageContext) -> IngestResult:
    """Called as run_ingest(spark, cfg, catalog, force=False); skipped when `ingested` was
    made from the same files and `ingest` section."""
    spark, cfg, catalog = ctx.spark, ctx.cfg, ctx.catalog
    ing = cfg.require_ingest()
    payload = "image" if ing.modality == "image" else "text"
    source = describe_input(ing)
    with read_errors():  # Spark reads the first rows (headers, schemas) while planning
        annotated, has_id = annotate(spark, ing)
    annotated = annotated.persist()
    pinned = [annotated]
    given = bool(ing.split.column) or isinstance(ing.path, dict)
    common = ctx.common(input=source, split_by=split_method(ing))
    try:
        with read_errors():
            rows_in = annotated.count()
            scans = check_records(spark, ing, annotated, rows_in)
            found = _reason_counts(annotated)
            check_encoding(found, rows_in, ing)
            if sum(found.values()) == rows_in:
                raise DataError(
                    f"no usable rows in {source}: all {rows_in} would go to quarantine (reasons: "
                    f"{found}); check ingest.format and ingest.columns"
                )
            good = annotated.filter(F.col("reason").isNull())
            if not has_id:
                good = with_ids(good, payload)
            carve = check_given_split(good, ing) if given else False
            # the split rows feed four checks and two writes: their ids' window runs once
            good = with_split(good, ing.split, given, carve).persist()
            pinned.append(good)
            warnings = check_labels(good, ing)
            for w in warnings:
                log.warning("ingest: %s", w)
            if carve:
                common["split_by"] += (
                    f" + validation carved from train ({ing.split.validation_ratio:g})"
                )
            indexer = fit_label_index(good)
            labels = list(indexer.labels)
            clean = indexer.transform(good).select("id", payload, "label", "label_index", "split")
            kept = ["text"] if payload == "text" else []  # undecodable images: source says where
            quarantine = with_record_lines(
                annotated.filter(F.col("reason").isNotNull()), scans, ing.csv.header
            )
            quarantine = quarantine.select("id", *kept, "label", "source", "lines", "reason")
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
                        f"{result.rows_quarantined} quarantined; nothing was committed. Please "
                        "report this"
                    )
                extra = {"image": image_manifest(d, ing.image)} if payload == "image" else {}
                return {**common, "labels": labels, "warnings": warnings,
                        "result": asdict(result), **extra}  # fmt: skip

            with catalog.commit() as tx:  # quarantine, label index and data: all or none
                tx.write_parquet("quarantine", quarantine, quarantine_manifest)
                tx.write("label_index", indexer.save, {**common, "labels": labels})
                m = tx.write_parquet("ingested", clean, ingested_manifest, partition_by=["split"])
    finally:
        for df in pinned:
            df.unpersist()
    return IngestResult(**m["result"])


def check_encoding(reasons: dict[str, int], rows_in: int, ing: IngestConfig) -> None:
    """A file in another encoding than ingest.encoding shows as many undecodable rows (a
    Latin-1 file read as UTF-8 loses every row with an accent): that is the setting, not
    bad rows to quarantine."""
    n = reasons.get("invalid_utf8", 0) + reasons.get("undecodable_text", 0)
    if n >= max(10, 0.05 * rows_in):
        raise DataError(
            f"{n} of {rows_in} rows are not valid {ing.encoding}: the input is probably in "
            "another encoding; set ingest.encoding (latin-1, cp1252, utf-16, ...) to the one "
            "it was written in"
        )


def describe_input(ing: IngestConfig) -> str:
    if ing.format == "table":
        return f"table {ing.table}"
    if ing.format == "sql":
        return "ingest.query"
    paths = {s: resolve_input_path(p) for s, p in ing.paths().items()}
    return paths[None] if None in paths else json.dumps(paths)


def split_method(ing: IngestConfig) -> str:
    if isinstance(ing.path, dict):
        return "input path per split"
    if ing.split.column:
        return f"column {ing.split.column}"
    sp = ing.split
    return f"hash of id (train {sp.train:g}, validation {sp.validation:g}, test {sp.test:g}, seed {sp.seed})"


def check_records(spark: SparkSession, ing: IngestConfig, annotated: DataFrame,
                  rows_in: int) -> dict | None:  # fmt: skip
    """The parser's rows are the input's true records: for CSV, as many per file as a
    quote-aware scan finds (returned, for the line numbers of quarantined records); for the
    folder formats, one per file, none gone missing between the listing and Spark's read."""
    if ing.format in ("csv", "tsv"):
        return csv_scans(spark, ing, annotated)
    if ing.format not in ("text_dirs", "image_dirs"):
        return None
    listed = 0
    for split in ing.paths():
        listing = input_listing(spark, ing, split)
        listed += len(listing.files) + len(listing.bad_names)
    if listed != rows_in:
        raise DataError(
            f"{describe_input(ing)}: {listed} files match ingest.file_glob {list(ing.globs)} but "
            f"{rows_in} were read; files changed during the read. Nothing was committed; run "
            "ingest again"
        )
    return None


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
