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

from sparkloom.pipelines.catalog import Catalog, fingerprint
from sparkloom.pipelines.config import SPLITS, Config, ImageConfig, IngestConfig, SplitConfig
from sparkloom.pipelines.context import StageContext, stage
from sparkloom.pipelines.errors import DataError
from sparkloom.pipelines.images import channel_stats, prepare_images
from sparkloom.pipelines.incremental import start_batch
from sparkloom.pipelines.sources import (
    csv_scans,
    input_fingerprint,
    input_listings,
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


def with_ids(df: DataFrame, content: str = "text", earlier: DataFrame | None = None) -> DataFrame:
    """Deterministic ids for data without one: hash of label and content, `-k` on repeats.

    Independent of file order and partitioning, so a re-run gives the same ids. With
    `earlier` (an incremental run's rows of earlier batches), a repeat of an earlier row
    numbers on from the highest `-k` there, so no id is given twice.
    """
    body = F.col(content)
    if isinstance(df.schema[content].dataType, T.BinaryType):
        base = F.sha2(F.concat(F.encode(F.col("label"), "UTF-8"), F.lit(b"\x1f"), body), 256)
    else:
        base = F.sha2(F.concat_ws("\u001f", F.col("label"), body), 256)
    base = F.substring(base, 1, 20)
    df = df.withColumn(SPLIT_KEY, base)
    nth = F.row_number().over(Window.partitionBy(SPLIT_KEY).orderBy("source"))
    if earlier is not None:
        suffix = F.when(F.length("id") > 20, F.substring_index("id", "-", -1).cast("int"))
        taken = earlier.groupBy(F.substring("id", 1, 20).alias(SPLIT_KEY)).agg(
            F.max(F.coalesce(suffix, F.lit(1))).alias("_taken")
        )
        df = df.join(taken, SPLIT_KEY, "left")
        nth = nth + F.coalesce(F.col("_taken"), F.lit(0))
    df = df.withColumn(
        "id", F.when(nth == 1, F.col(SPLIT_KEY)).otherwise(F.concat_ws("-", SPLIT_KEY, nth))
    )
    return df.drop("_taken") if earlier is not None else df


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
    # incremental: the batch this run appended (rows_* count it), its files, and the totals
    batch: int | None = None
    files: dict[str, int] | None = None
    rows_replaced: int = 0  # earlier rows of changed (or dropped) files, removed
    rows_total: int | None = None
    new_labels: list[str] | None = None

    def summary(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in self.reasons.items()) or "none"
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.splits.items()))
        text = (
            f"{self.rows_in} rows in = {self.rows_out} out ({parts}) + "
            f"{self.rows_quarantined} quarantined ({why})"
        )
        if self.batch is None:
            return text
        f = self.files or {}
        text = (f"batch {self.batch}: {f.get('files_new', 0)} new and {f.get('files_changed', 0)} "
                f"changed files read ({f.get('files_unchanged', 0)} unchanged, "
                f"{f.get('files_touched', 0)} touched, {f.get('files_deleted', 0)} deleted); "
                f"{text}; {self.rows_total} rows in all")  # fmt: skip
        if self.rows_replaced:
            text += f" ({self.rows_replaced} earlier rows replaced or dropped)"
        return text

    def metrics(self) -> dict[str, float]:
        m = {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_quarantined": self.rows_quarantined,
        }
        m |= {f"quarantined_{k}": v for k, v in self.reasons.items()}
        m |= {f"rows_{k}": v for k, v in self.splits.items()}
        if self.batch is not None:
            m |= {"batch": self.batch, "rows_replaced": self.rows_replaced,
                  "rows_total": self.rows_total or 0, **(self.files or {})}  # fmt: skip
        return m


def annotate(spark: SparkSession, ing: IngestConfig,
             listings: dict | None = None) -> tuple[DataFrame, bool]:  # fmt: skip
    """Every input row with `reason` (null when usable); and whether rows come with ids."""
    raw = normalized_labels(read_raw(spark, ing, listings))
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
    made from the same files and `ingest` section. With `ingest.incremental`, only the files
    not taken in before are read, and appended as a new batch."""
    spark, cfg, catalog = ctx.spark, ctx.cfg, ctx.catalog
    ing = cfg.require_ingest()
    payload = "image" if ing.modality == "image" else "text"
    source = describe_input(ing)
    batch = listings = None
    if ing.incremental:
        listings = input_listings(spark, ing)
        batch = start_batch(spark, ing, catalog, ctx.config_hash, listings, ctx.force)
        if not batch.first:
            listings = batch.plan.read
            if not listings and not batch.removed:  # touched or deleted files only
                return _records_only(ctx, batch)
            if not listings:  # deleted files whose rows go (on_deleted=drop): no new batch
                return IngestResult(**_append_batch(ctx, batch)["result"])
    with read_errors():  # Spark reads the first rows (headers, schemas) while planning
        annotated, has_id = annotate(spark, ing, listings)
    annotated = annotated.persist()
    pinned = [annotated]
    given = bool(ing.split.column) or isinstance(ing.path, dict)
    common = ctx.common(input=source, split_by=split_method(ing))
    try:
        with read_errors():
            rows_in = annotated.count()
            scans = check_records(spark, ing, annotated, rows_in, listings)
            found = _reason_counts(annotated)
            check_encoding(found, rows_in, ing)
            if sum(found.values()) == rows_in:
                raise DataError(
                    f"no usable rows in {source}: all {rows_in} would go to quarantine (reasons: "
                    f"{found}); check ingest.format and ingest.columns"
                )
            kept = batch.kept if batch and not batch.first else None
            if kept is not None and has_id:  # an id an earlier batch holds is a duplicate
                annotated = with_earlier_ids(annotated, kept)
            good = annotated.filter(F.col("reason").isNull())
            if not has_id:
                good = with_ids(good, payload, kept)
            carve = check_given_split(good, ing) if given else False
            if kept is not None:  # the first batch decided it for all
                carve = batch.previous["incremental"]["carve"]
            # the split rows feed four checks and two writes: their ids' window runs once
            good = with_split(good, ing.split, given, carve).persist()
            pinned.append(good)
            every = good
            if kept is not None:  # the checks see every row, earlier batches' too
                every = kept.select("split", "label").unionByName(good.select("split", "label"))
            warnings = check_labels(every, ing)
            for w in warnings:
                log.warning("ingest: %s", w)
            if carve:
                common["split_by"] += (
                    f" + validation carved from train ({ing.split.validation_ratio:g})"
                )
            if batch is None or batch.first:
                indexer = fit_label_index(good)
            else:
                indexer = extend_label_index(good, batch.labels)
            labels = list(indexer.labels)
            columns = ["id", payload, "label", "label_index", "split"]
            if batch:
                good = good.withColumn("batch", F.lit(batch.number))
                columns[1:1] = ["source"]
                columns.append("batch")
            clean = indexer.transform(good).select(*columns)
            # undecodable images: source says where
            keep_text = ["text"] if payload == "text" else []
            quarantine = with_record_lines(
                annotated.filter(F.col("reason").isNotNull()), scans, ing.csv.header
            )
            quarantine = quarantine.select("id", *keep_text, "label", "source", "lines", "reason")
            if batch:
                quarantine = quarantine.withColumn("batch", F.lit(batch.number))
            reasons: dict[str, int] = {}

            def counted(d: DataFrame) -> IngestResult:
                # counted from what was written, so the books balance on the data as stored
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
                return result

            if batch is not None and not batch.first:
                m = _append_batch(ctx, batch, clean, quarantine, indexer, reasons, counted,
                                  {**common, "labels": labels, "warnings": warnings})  # fmt: skip
                return IngestResult(**m["result"])

            def quarantine_manifest(tmp: str) -> dict:
                reasons.update(_reason_counts(spark.read.parquet(tmp)))
                return {**common, "rows": sum(reasons.values()), "reasons": reasons}

            def ingested_manifest(tmp: str) -> dict:
                d = spark.read.parquet(tmp)
                result = counted(d)
                extra = {"image": image_manifest(d, ing.image)} if payload == "image" else {}
                if batch is not None:
                    result, extra["incremental"] = _first_batch(ctx, batch, result, carve)
                    common["data_fingerprint"] = _data_fingerprint(ctx, extra["incremental"])
                return {**common, "labels": labels, "warnings": warnings,
                        "result": asdict(result), **extra}  # fmt: skip

            by = ["batch"] if batch else []
            with catalog.commit() as tx:  # quarantine, label index and data: all or none
                if batch:  # one folder per batch, written even when empty (it has the schema)
                    tx.write("quarantine", _batch_writer(quarantine, batch.number),
                             lambda tmp: {"format": "parquet", **quarantine_manifest(tmp)})  # fmt: skip
                else:
                    tx.write_parquet("quarantine", quarantine, quarantine_manifest)
                tx.write("label_index", indexer.save, {**common, "labels": labels})
                m = tx.write_parquet("ingested", clean, ingested_manifest,
                                     partition_by=[*by, "split"])  # fmt: skip
    finally:
        for df in pinned:
            df.unpersist()
    return IngestResult(**m["result"])


# --- incremental batches ----------------------------------------------------------------------


def _batch_writer(df: DataFrame, number: int):
    def save(tmp: str) -> None:
        df.drop("batch").write.mode("error").parquet(f"{tmp}/batch={number}")

    return save


def with_earlier_ids(annotated: DataFrame, kept: DataFrame) -> DataFrame:
    """A good row whose id a row of an earlier batch already has gets `duplicate_id`: a new
    file cannot take over another file's row (a changed file's own rows were removed)."""
    earlier = kept.select("id", F.lit(True).alias("_earlier")).distinct()
    dup = F.col("reason").isNull() & F.col("_earlier").isNotNull()
    return (
        annotated.join(earlier, "id", "left")
        .withColumn("reason", F.when(dup, "duplicate_id").otherwise(F.col("reason")))
        .drop("_earlier")
    )


def extend_label_index(good: DataFrame, earlier: list[str]) -> StringIndexerModel:
    """Earlier labels keep their indices (a trained head's rows stay meaningful); labels not
    seen before are appended in alphabetical order."""
    found = [r["label"] for r in good.select("label").distinct().collect()]
    labels = earlier + sorted(set(found) - set(earlier))
    return StringIndexerModel.from_labels(labels, inputCol="label", outputCol="label_index")


def _data_fingerprint(ctx: StageContext, inc: dict) -> str:
    """What downstream stages are made from: the batches' contents (their versions), not the
    file listing, so a touched file or a reported deletion redoes nothing downstream."""
    versions = [(b["batch"], b["version"]) for b in inc["batches"]]
    return fingerprint(ctx.config_hash, versions)


def _batch_entry(number: int, result: IngestResult, plan, version: str) -> dict:
    return {"batch": number, "version": version, "created_at": _now(),
            "rows_in": result.rows_in, "rows_out": result.rows_out,
            "rows_quarantined": result.rows_quarantined, "splits": result.splits,
            "reasons": result.reasons, **plan.counts()}  # fmt: skip


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _first_batch(ctx: StageContext, batch, result: IngestResult,
                 carve: bool) -> tuple[IngestResult, dict]:  # fmt: skip
    plan = batch.plan
    result.batch, result.files, result.rows_total = 1, plan.counts(), result.rows_out
    result.new_labels = []
    inc = {"batches": [_batch_entry(1, result, plan, ctx.fingerprint)], "files": plan.records,
           "carve": carve, "on_deleted": ctx.cfg.require_ingest().on_deleted}  # fmt: skip
    return result, inc


def _append_batch(ctx: StageContext, batch, clean: DataFrame | None = None,
                  quarantine: DataFrame | None = None, indexer: StringIndexerModel | None = None,
                  reasons: dict | None = None, counted=None,
                  common: dict | None = None) -> dict:  # fmt: skip
    """Commit the new batch as `batch=<n>` of `ingested` and `quarantine`, rewrite the earlier
    batches that lost rows (changed or dropped files), and the manifests and label index:
    one commit. Without `clean`, only the rewrite (deleted files dropped, nothing new)."""
    spark, catalog, ing = ctx.spark, ctx.catalog, ctx.cfg.require_ingest()
    prev, plan, number = batch.previous, batch.plan, batch.number
    inc = prev["incremental"]
    gone = plan.removed_sources(ing.on_deleted)
    entries = {b["batch"]: dict(b) for b in inc["batches"]}
    with catalog.commit() as tx:
        if clean is not None:
            q_tmp = tx.write_part("quarantine", f"batch={number}", quarantine.drop("batch"))
            reasons.update(_reason_counts(spark.read.parquet(q_tmp)))
            tmp = tx.write_part("ingested", f"batch={number}", clean.drop("batch"), ["split"])
            result = counted(spark.read.parquet(tmp))
        else:
            common = ctx.common(input=prev.get("input"), split_by=prev.get("split_by"),
                                labels=prev["labels"], warnings=prev.get("warnings", []))  # fmt: skip
            result, reasons = IngestResult(0, 0, 0, {}, {}, prev["labels"]), {}
        old_q = spark.read.parquet(catalog.path("quarantine"))
        for b in sorted(batch.removed):  # earlier batches that lose rows: rewritten
            for name in ("ingested", "quarantine"):
                path = f"{catalog.path(name)}/batch={b}"
                if not catalog.fs.exists(path):
                    continue
                rest = spark.read.parquet(path).filter(~F.col("source").isin(gone))
                if name == "quarantine":  # kept even when empty: its file holds the schema
                    tx.write_part(name, f"batch={b}", rest.localCheckpoint())
                elif rest.limit(1).count():
                    tx.write_part(name, f"batch={b}", rest.localCheckpoint(), ["split"])
                else:
                    tx.drop_part(name, f"batch={b}")
            entries[b]["version"] = f"{entries[b]['version']}-{tx.tag}"
            entries[b]["rows_removed"] = entries[b].get("rows_removed", 0) + batch.removed[b]
        gone_q = old_q.filter(F.col("source").isin(gone)).select("batch").distinct().collect()
        for r in gone_q:  # quarantined rows of removed files in batches with no good rows left
            if r["batch"] not in batch.removed:
                path = f"{catalog.path('quarantine')}/batch={r['batch']}"
                rest = spark.read.parquet(path).filter(~F.col("source").isin(gone))
                tx.write_part("quarantine", f"batch={r['batch']}", rest.localCheckpoint())
        labels = list(indexer.labels) if indexer else batch.labels
        new_labels = [x for x in labels if x not in batch.labels]
        for x in new_labels:
            log.warning("ingest: batch %d brings label %r, not seen before (index %d)",
                        number, x, labels.index(x))  # fmt: skip
        if plan.deleted:
            log.warning("ingest: %d file(s) are gone since the last batch (e.g. %s); their rows "
                        "are %s (ingest.on_deleted=%s)", len(plan.deleted), plan.deleted[0],
                        "dropped" if ing.on_deleted == "drop" else "kept", ing.on_deleted)  # fmt: skip
        result.batch, result.files = number, plan.counts()
        result.rows_replaced = sum(batch.removed.values())
        result.new_labels = new_labels
        if clean is not None:
            entries[number] = _batch_entry(number, result, plan, tx.tag)
        else:
            result.batch = max(entries)
        inc = {**inc, "batches": [entries[b] for b in sorted(entries)], "files": plan.records}
        result.rows_total = sum(b["rows_out"] - b.get("rows_removed", 0) for b in inc["batches"])
        common = {**common, "data_fingerprint": _data_fingerprint(ctx, inc)}
        manifest = {**prev, **common, "result": asdict(result), "incremental": inc}
        q_manifest = {**(catalog.manifest("quarantine") or {}), **common}
        for key in ("labels", "warnings"):
            q_manifest.pop(key, None)
        if clean is not None:
            q_manifest["reasons_by_batch"] = {**q_manifest.get("reasons_by_batch", {}),
                                              str(number): reasons}  # fmt: skip
        tx.write_manifest("quarantine", q_manifest)
        if indexer is not None:
            tx.write("label_index", indexer.save, {**common})
        out = tx.write_manifest("ingested", manifest)
    return out


def _records_only(ctx: StageContext, batch) -> IngestResult:
    """No file to read (touched or deleted ones only): the file records and the fingerprint
    move on; the rows, and so every stage downstream, stay as they are."""
    catalog, plan, prev = ctx.catalog, batch.plan, batch.previous
    if plan.removed_sources(ctx.cfg.require_ingest().on_deleted):
        raise DataError("internal: rows to drop with no batch to write; please report this")
    inc = {**prev["incremental"], "files": plan.records}
    last = prev["result"]
    result = IngestResult(0, 0, 0, {}, {}, prev["labels"], batch=last.get("batch"),
                          files=plan.counts(), rows_total=last.get("rows_total"))  # fmt: skip
    if plan.deleted:
        log.warning("ingest: %d file(s) are gone since the last batch (e.g. %s); their rows are "
                    "kept (ingest.on_deleted=keep)", len(plan.deleted), plan.deleted[0])  # fmt: skip
    manifest = {**prev, "fingerprint": ctx.fingerprint, "incremental": inc,
                "result": asdict(result)}  # fmt: skip
    with catalog.commit() as tx:
        tx.write_manifest("ingested", manifest)
    return result


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
                  rows_in: int, listings: dict | None = None) -> dict | None:  # fmt: skip
    """The parser's rows are the input's true records: for CSV, as many per file as a
    quote-aware scan finds (returned, for the line numbers of quarantined records); for the
    folder formats, one per file, none gone missing between the listing and Spark's read."""
    if ing.format in ("csv", "tsv"):
        return csv_scans(spark, ing, annotated, listings)
    if ing.format not in ("text_dirs", "image_dirs"):
        return None
    listed = 0
    for listing in (listings or input_listings(spark, ing)).values():
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
