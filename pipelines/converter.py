"""DataFrame -> Parquet cache -> torch DataLoader, with petastorm's API shape.

    converter = make_spark_converter(df)
    with converter.make_torch_dataloader(batch_size=64, num_epochs=2) as loader:
        for batch in loader:        # dict of tensors
            ...
    converter.delete()

The DataFrame is written once under a cache directory (a local path or any
Hadoop filesystem URI, from `cache_dir`, the Spark conf
`sparkloom.converter.cacheDir`, or a temp folder for local masters). The cache
key is the DataFrame's canonical plan plus its input files' sizes and times, so
converting the same DataFrame again reuses the files, in this session or a later one.
The `keep` most recently used entries stay; older ones go once unused for an hour.
The reader is `models.data.ParquetBatches`, which also runs without Spark (torchrun,
GPU boxes).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyspark.ml.linalg import VectorUDT
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkloom.models.data import META_FILE, make_dataloader
from sparkloom.pipelines import compat
from sparkloom.pipelines.catalog import ArrowFS, fingerprint, local_path

log = logging.getLogger(__name__)

CACHE_CONF = "sparkloom.converter.cacheDir"
DEFAULT_ROW_GROUP_BYTES = 32 * 1024 * 1024
KEEP = 32  # cache entries kept (most recently used first); a pipeline run uses 3 per stage
IDLE_S = 3600  # an entry beyond `keep` is removed only when unused for this long
# Plan nodes whose tree does not show their data (local rows, RDDs, caches), and Python
# functions, whose tree shows a name but not the code or the files it reads
_IN_MEMORY = ("LogicalRDD", "LocalRelation", "InMemoryRelation", "ExternalRDD")
_PYTHON = ("EvalPython", "MapInPandas", "MapInArrow", "InPandas", "PythonUDF", "pythonUDF")


class SparkDatasetConverter:
    """A materialised DataFrame that hands out torch DataLoaders over its Parquet cache."""

    def __init__(self, cache_dir_url: str, meta: dict[str, Any], fs: ArrowFS):
        self.cache_dir_url = cache_dir_url
        self.meta = meta
        self._fs = fs

    def __len__(self) -> int:
        return int(self.meta["num_rows"])

    @property
    def local_path(self) -> str:
        """The path pyarrow reads (file: URIs become plain paths)."""
        return local_path(self.cache_dir_url)

    @contextmanager
    def make_torch_dataloader(
        self,
        batch_size: int = 32,
        num_epochs: int | None = 1,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> Iterator[EpochLoader]:
        """Yields an iterable of batches over `num_epochs` epochs (None: forever).

        Each epoch reshuffles with (seed, epoch); under DDP each rank reads its own
        shard (RANK/WORLD_SIZE or the initialised process group).
        """
        loader = make_dataloader(
            self.local_path,
            batch_size,
            num_workers=num_workers,
            shuffle=shuffle,
            seed=seed,
            **kwargs,
        )
        yield EpochLoader(loader, num_epochs)

    def delete(self) -> None:
        if self._fs.exists(self.cache_dir_url):
            self._fs.delete(self.cache_dir_url)


class EpochLoader:
    def __init__(self, loader, num_epochs: int | None):
        self.loader, self.num_epochs = loader, num_epochs

    def __len__(self) -> int:
        if self.num_epochs is None:
            raise TypeError("an endless loader (num_epochs=None) has no length")
        return len(self.loader.dataset) * self.num_epochs

    def __iter__(self):
        epoch = 0
        while self.num_epochs is None or epoch < self.num_epochs:
            self.loader.dataset.set_epoch(epoch)
            yield from self.loader
            epoch += 1


def make_spark_converter(
    df: DataFrame,
    cache_dir: str | None = None,
    *,
    dtype: str | None = "float32",
    vector_format: dict[str, str] | None = None,
    shapes: dict[str, list[int]] | None = None,
    row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
    udf_inputs: Any = None,
    keep: int = KEEP,
) -> SparkDatasetConverter:
    """Materialise `df` once as Parquet and return a converter over it.

    dtype: doubles (scalars and arrays) are stored as this ("float32" like
    petastorm; None keeps float64). vector_format: per ML-vector column, "dense"
    (default) or "sparse" (torch CSR batches). shapes: per array column, the
    per-row shape to reshape to (e.g. an image as [1, 28, 28]). udf_inputs: what the
    plan's Python functions depend on (their settings, the text of the files they read);
    with it such a plan's cache is reused across sessions, without it only in this one.
    keep: cache entries kept under the cache root.
    """
    spark = df.sparkSession
    fs = ArrowFS()
    root = _cache_root(spark, cache_dir)
    df = _cast_doubles(df, dtype)
    meta = {
        "vectors": {
            f.name: (vector_format or {}).get(f.name, "dense")
            for f in df.schema.fields
            if isinstance(f.dataType, VectorUDT)
        },
        "shapes": shapes or {},
        "schema": df.schema.jsonValue(),
    }
    key = fingerprint(
        _plan_key(df, udf_inputs),
        _input_fingerprint(df, fs),
        meta,
        row_group_bytes,
        "sparkloom-converter-2",
    )
    url = f"{root.rstrip('/')}/{key}"
    meta_url = f"{url}/{META_FILE}"
    if fs.exists(meta_url):
        log.info("converter: reusing the cache at %s", url)
        fs.touch(meta_url)  # most recently used
        return SparkDatasetConverter(url, json.loads(fs.read_text(meta_url)), fs)

    tmp = f"{url}.__tmp-{uuid.uuid4().hex[:8]}"
    try:
        df.write.option("parquet.block.size", row_group_bytes).parquet(tmp)
        meta["num_rows"] = spark.read.parquet(tmp).count()
        fs.write_text(f"{tmp}/{META_FILE}", json.dumps(meta, indent=2))
        if fs.exists(url):  # a half-written cache from a killed run
            fs.delete(url)
        fs.rename(tmp, url)
    finally:
        if fs.exists(tmp):
            fs.delete(tmp)
    log.info("converter: wrote %d rows to %s", meta["num_rows"], url)
    _prune(fs, root, keep)
    return SparkDatasetConverter(url, meta, fs)


def _plan_key(df: DataFrame, udf_inputs: Any) -> tuple[Any, ...]:
    """What the plan computes, the same in every session: its canonical tree (expression ids
    numbered from 0, no object identities), which with the input files' fingerprint decides
    the rows. `semanticHash()` would not do: it hashes the file index object, so it differs
    in every session and a cache keyed by it was never reused. Plans whose tree does not
    decide their rows (in-memory data; Python functions without `udf_inputs`) fall back to
    it: their cache lasts the session."""
    try:
        plan = df._jdf.queryExecution().optimizedPlan().canonicalized()
        tree = plan.treeString(True, False, 2**31 - 1, False, False)  # every field, no ids
    except Exception:  # noqa: BLE001 - a plan Py4J cannot print (Spark Connect): this session
        return ("session", df.semanticHash())
    python = any(node in tree for node in _PYTHON)
    if any(node in tree for node in _IN_MEMORY) or (python and udf_inputs is None):
        return ("session", df.semanticHash())
    return ("plan", tree, udf_inputs) if python else ("plan", tree)


def _prune(fs: ArrowFS, root: str, keep: int) -> None:
    """Keep the `keep` most recently used entries; remove older ones unused for IDLE_S (a run
    may still be reading one). A half-written or foreign folder is left alone."""
    entries = []
    for url in fs.list_dir(root):
        meta = f"{url}/{META_FILE}"
        if ".__tmp-" not in url and fs.exists(meta):
            entries.append((fs.mtime_ms(meta), url))
    entries.sort(reverse=True)
    now_ms = time.time() * 1000
    for used_ms, url in entries[keep:]:
        if now_ms - used_ms > IDLE_S * 1000:
            log.info("converter: removing the cache entry %s (unused for %.0f h)",
                     url, (now_ms - used_ms) / 3.6e6)  # fmt: skip
            fs.delete(url)


def _cache_root(spark, cache_dir: str | None) -> str:
    root = cache_dir or spark.conf.get(CACHE_CONF, None)
    master = compat.master(spark)
    if root is None:
        if not master.startswith("local"):
            raise ValueError(
                f"set the converter cache directory ({CACHE_CONF} or deep.cache_dir) to a "
                "filesystem every executor can read (hdfs://, s3a://, a shared mount)"
            )
        root = os.path.join(tempfile.gettempdir(), "sparkloom-converter")
    return ArrowFS().qualify(
        root if "://" in root or root.startswith("file:") else os.path.abspath(root)
    )


def _cast_doubles(df: DataFrame, dtype: str | None) -> DataFrame:
    if dtype is None:
        return df
    target = {"float32": T.FloatType(), "float64": T.DoubleType()}[dtype]
    cols = []
    for f in df.schema.fields:
        if isinstance(f.dataType, T.DoubleType):
            cols.append(F.col(f.name).cast(target).alias(f.name))
        elif isinstance(f.dataType, T.ArrayType) and isinstance(
            f.dataType.elementType, T.DoubleType
        ):
            cols.append(F.col(f.name).cast(T.ArrayType(target)).alias(f.name))
        else:
            cols.append(F.col(f.name))
    return df.select(*cols)


def _input_fingerprint(df: DataFrame, fs: ArrowFS) -> str:
    """Sizes and times of the files the plan reads: same plan over changed files -> new key."""
    try:
        files = sorted(df.inputFiles())
    except Exception:  # plans without file sources
        return ""
    entries = []
    for f in files[:10_000]:
        local = f.removeprefix("file:")
        if f.startswith("file:") and os.path.exists(local):
            st = os.stat(local)
            entries.append((f, st.st_size, st.st_mtime_ns))
        else:
            entries.append((f,))
    return fingerprint(entries, len(files))
