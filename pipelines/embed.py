"""The `embed` stage: every ingested text through a pretrained encoder, in Spark.

The encoder directory (`embed.model`, a local Hugging Face folder) goes to the executors
with `ship_files`; each Python worker rebuilds it from the shipped files and loads it once
(`predict_batch_udf` caches the predict function per worker), then embeds batches of texts
with `models.embed.TextEncoder`. Every load writes a marker file (host, pid, uuid) under
the stage's work area, so the stage reports how many times the model was really loaded and
by how many Python workers.

Output, in one commit: dataset `embeddings` (id, label, label_index, split, embedding as an
ML vector), `embeddings_quarantine` (texts that are blank even by Unicode's measure:
`empty_text`) and `embedder`, a PipelineModel of one `Embedder` (raw text -> vector) that
the embedding baselines put in front of their classifier. Rows in = rows out + quarantined,
checked on what was written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass

from pyspark import keyword_only
from pyspark.ml import PipelineModel, Transformer
from pyspark.ml.functions import array_to_vector, predict_batch_udf
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasInputCol, HasOutputCol
from pyspark.ml.util import (
    DefaultParamsReadable,
    DefaultParamsReader,
    DefaultParamsWritable,
    DefaultParamsWriter,
)
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkloom.models import storage
from sparkloom.models.embed import EncoderSettings
from sparkloom.models.hf import WEIGHT_FILES, check_hf_directory, load_tokenizer
from sparkloom.pipelines import compat
from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.config import Config, EmbedConfig
from sparkloom.pipelines.context import StageContext, stage
from sparkloom.pipelines.errors import ConfigError, DataError
from sparkloom.pipelines.spark import ship_files

log = logging.getLogger(__name__)

# (?U): Unicode whitespace too (no-break and ideographic spaces), which ingest's check lets by
BLANK = r"(?U)^\s*$"
# texts per predict call: sorted by length inside it, so each batch_size forward pads little
SORT_WINDOW = 16
ROWS_PER_PARTITION = 100_000  # at least one partition per core; more for large inputs
MODEL_EXTENSIONS = (".json", ".txt", ".model")  # config, tokenizer files, SentencePiece


# --- the model directory: what ships, and its fingerprint -------------------------------------


def model_files(path: str) -> tuple[str, ...]:
    """The files of a local HF directory an encoder loads: config, tokenizer files and one
    set of weights (safetensors first; a sharded index with its shards)."""
    names = sorted(os.listdir(path))
    kept = [n for n in names if n.endswith(MODEL_EXTENSIONS) and os.path.isfile(f"{path}/{n}")]
    weights = next(w for w in WEIGHT_FILES if w in names)
    if weights.endswith(".index.json"):
        with open(os.path.join(path, weights)) as f:
            kept += sorted(set(json.load(f)["weight_map"].values()))
    elif weights not in kept:
        kept.append(weights)
    return tuple(dict.fromkeys(kept))


def model_fingerprint(path: str) -> str:
    """Content hash of every file the model loads (config, tokenizer, weights): another
    checkpoint at the same path, even of the same sizes, re-embeds. About 1 s per GB."""
    h = hashlib.sha256()
    for name in model_files(path):
        h.update(f"{name}\n".encode())
        with open(os.path.join(path, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):  # noqa: B023
                h.update(chunk)
    return h.hexdigest()[:16]


def checked_model(ec: EmbedConfig) -> str:
    """`embed.model` as an absolute path, once it holds an encoder; else one line naming
    the setting and what the directory must hold."""
    need = ("a local Hugging Face encoder directory (config.json, model.safetensors or "
            "pytorch_model.bin, tokenizer.json or vocab.txt), as save_pretrained writes it")  # fmt: skip
    if not ec.model:
        raise ConfigError(f"embed.model is not set: give {need}")
    path = os.path.abspath(os.path.expanduser(ec.model))
    try:
        check_hf_directory(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"embed.model={ec.model}: {e}; give {need}") from None
    from sparkloom.models.hf import TOKENIZER_FILES

    if not any(all(os.path.isfile(os.path.join(path, f)) for f in g) for g in TOKENIZER_FILES):
        raise ConfigError(f"embed.model={ec.model} has no tokenizer files; give {need}")
    return path


def settings_of(ec: EmbedConfig) -> EncoderSettings:
    return EncoderSettings(ec.pooling, ec.normalize, ec.max_length, ec.batch_size, ec.dtype,
                           ec.device)  # fmt: skip


# --- the UDF: one model load per Python worker --------------------------------------------------


def embed_udf(
    path: str, prefix: str, names: tuple[str, ...], s: EncoderSettings, loads: str | None = None
):  # fmt: skip
    """string column -> array<float> embedding. The model is built from the shipped files
    once per Python worker (the tokenizer comes along from the driver, read from `path`
    here); with `loads` (a folder URI) each load writes a marker there."""
    tokenizer = load_tokenizer(path)

    def make_predict_fn():
        import socket
        import tempfile

        import numpy as np
        import torch
        from pyspark import TaskContext

        from sparkloom.models.embed import TextEncoder
        from sparkloom.pipelines.compat import shipped_files_root

        root = shipped_files_root()
        local = tempfile.mkdtemp(prefix="sparkloom-embed-")  # the plain names HF looks for
        for name in names:
            os.symlink(os.path.join(root, f"{prefix}{name}"), os.path.join(local, name))
        task = TaskContext.get()
        if s.device != "cuda" and not torch.cuda.is_available():  # a task's share of cores
            torch.set_num_threads(max(1, task.cpus() if task else 1))
        encoder = TextEncoder(local, s, tokenizer)
        if loads:
            marker = {"host": socket.gethostname(), "pid": os.getpid(), "uuid": uuid.uuid4().hex}
            storage.write_text(storage.join(loads, f"{marker['uuid']}.json"), json.dumps(marker))

        def predict(texts: np.ndarray) -> np.ndarray:
            return encoder.encode([str(t) for t in texts], s.batch_size)

        return predict

    return predict_batch_udf(
        make_predict_fn, return_type=T.ArrayType(T.FloatType()),
        batch_size=s.batch_size * SORT_WINDOW,
    )  # fmt: skip


def count_loads(loads: str) -> tuple[int, int]:
    """(model loads, distinct Python workers) from the markers under `loads`."""
    markers = [json.loads(storage.read_text(storage.join(loads, n)))
               for n in storage.listdir(loads) if n.endswith(".json")]  # fmt: skip
    return len(markers), len({(m["host"], m["pid"]) for m in markers})


# --- Embedder: the Spark ML stage ---------------------------------------------------------------


class Embedder(
    Transformer, HasInputCol, HasOutputCol, DefaultParamsReadable, DefaultParamsWritable
):
    """Spark ML stage: text -> embedding vector with a local Hugging Face encoder.

    Saved with a copy of the encoder's files (`<stage path>/model`), so a PipelineModel
    holding it (the embedding baselines' scoring model, an MLflow model) scores raw text
    anywhere. A null text is embedded as the empty one.
    """

    modelPath = Param(Params._dummy(), "modelPath", "local HF encoder directory",
                      TypeConverters.toString)  # fmt: skip
    pooling = Param(Params._dummy(), "pooling", "mean or cls", TypeConverters.toString)
    normalize = Param(Params._dummy(), "normalize", "L2-normalize", TypeConverters.toBoolean)
    maxLength = Param(Params._dummy(), "maxLength", "tokens per text", TypeConverters.toInt)
    batchSize = Param(Params._dummy(), "batchSize", "texts per forward", TypeConverters.toInt)
    dtype = Param(Params._dummy(), "dtype", "float32, bfloat16, float16", TypeConverters.toString)
    device = Param(Params._dummy(), "device", "auto, cpu or cuda", TypeConverters.toString)

    @keyword_only
    def __init__(
        self, *, inputCol="text", outputCol="embedding", modelPath=None, pooling="mean",
        normalize=False, maxLength=256, batchSize=32, dtype="float32", device="auto",
    ):  # fmt: skip
        super().__init__()
        self._setDefault(inputCol="text", outputCol="embedding", pooling="mean",
                         normalize=False, maxLength=256, batchSize=32, dtype="float32",
                         device="auto")  # fmt: skip
        self._set(**self._input_kwargs)

    def settings(self) -> EncoderSettings:
        g = self.getOrDefault
        return EncoderSettings(g(self.pooling), g(self.normalize), g(self.maxLength),
                               g(self.batchSize), g(self.dtype), g(self.device))  # fmt: skip

    def local_model(self) -> str:
        """The encoder's files in a local directory (copied once when they are remote)."""
        url = self.getOrDefault(self.modelPath)
        key = hashlib.sha256(url.encode()).hexdigest()[:16]
        return storage.local_copy(url, f"embedder-{key}")

    def _transform(self, df: DataFrame) -> DataFrame:
        path = self.local_model()
        names = model_files(path)
        prefix = ship_files(df.sparkSession, path, names)
        text = F.coalesce(F.col(self.getInputCol()).cast("string"), F.lit(""))
        vector = array_to_vector(embed_udf(path, prefix, names, self.settings())(text))
        return df.withColumn(self.getOutputCol(), vector)

    def write(self) -> _EmbedderWriter:
        return _EmbedderWriter(self)

    @classmethod
    def read(cls) -> _EmbedderReader:
        return _EmbedderReader(cls)


class _EmbedderWriter(DefaultParamsWriter):
    """The params, plus the encoder's files under `<path>/model` (any filesystem)."""

    def saveImpl(self, path: str) -> None:
        super().saveImpl(path)
        src = self.instance.local_model()
        for name in model_files(src):
            storage.copy(os.path.join(src, name), storage.join(path, "model", name))


class _EmbedderReader(DefaultParamsReader):
    """An Embedder whose modelPath is the copy saved with it."""

    def load(self, path: str) -> Embedder:
        instance = super().load(path)
        copy = storage.join(path, "model")
        if storage.exists(storage.join(copy, "config.json")):
            instance._set(modelPath=copy)
        return instance


def load_embedder(catalog: Catalog) -> PipelineModel:
    """The embed stage's text -> embedding PipelineModel."""
    catalog.require("embedder", "embed")
    return PipelineModel.load(catalog.path("embedder"))


# --- the stage ----------------------------------------------------------------------------------


@dataclass
class EmbedResult:
    rows_in: int
    rows_out: int
    quarantined: int  # reason empty_text
    dimension: int
    pooling: str
    model: str  # the encoder directory
    model_fingerprint: str
    seconds: float  # the embedding job: UDF, Parquet write
    docs_per_s: float
    model_loads: int  # counted by marker files, one per load
    python_workers: int  # distinct host + pid among the loads
    partitions: int
    skipped: bool = False

    def metrics(self) -> dict[str, float]:
        return {"rows_in": self.rows_in, "rows_embedded": self.rows_out,
                "rows_quarantined": self.quarantined, "dimension": self.dimension,
                "embed_seconds": self.seconds, "docs_per_s": self.docs_per_s,
                "model_loads": self.model_loads, "python_workers": self.python_workers,
                "partitions": self.partitions}  # fmt: skip

    def summary(self) -> str:
        return (
            f"{self.rows_out} texts embedded ({self.dimension} dimensions, {self.pooling} "
            f"pooling, {os.path.basename(self.model.rstrip('/'))}), {self.quarantined} "
            f"quarantined (empty_text); {self.docs_per_s:.1f} docs/s over {self.partitions} "
            f"partitions; model loaded {self.model_loads} time(s) by {self.python_workers} "
            "Python worker(s)"
        )


def model_parts(spark: SparkSession, cfg: Config, catalog: Catalog) -> list[str]:
    """The encoder directory's fingerprint joins the stage's: a new checkpoint at the same
    path re-embeds. Checked here, before any Spark work; the body reads the hash back from
    ctx.parts instead of reading the weights again."""
    return [model_fingerprint(checked_model(cfg.embed))]


@stage("embed", EmbedResult, extra=model_parts)
def run_embed(ctx: StageContext) -> EmbedResult:
    """Called as run_embed(spark, cfg, catalog, force=False)."""
    spark, catalog, ec = ctx.spark, ctx.catalog, ctx.cfg.embed
    path, (fp,) = checked_model(ec), ctx.parts  # hashed once, by model_parts
    names, s = model_files(path), settings_of(ec)
    data = catalog.read("ingested", "ingest").select("id", "text", "label", "label_index", "split")
    blank = F.col("text").isNull() | F.col("text").rlike(BLANK)
    quarantine = data.filter(blank).select("id", "text", "label", "split",
                                           F.lit("empty_text").alias("reason"))  # fmt: skip
    rows_in = data.count()
    cores = compat.default_parallelism(spark)
    partitions = max(cores, -(-rows_in // ROWS_PER_PARTITION))
    loads = storage.join(catalog.uri("embed_work"), "loads", uuid.uuid4().hex)
    prefix = ship_files(spark, path, names)
    vector = embed_udf(path, prefix, names, s, loads)(F.col("text"))
    out = (
        data.filter(~blank)
        .repartition(partitions)
        .select("id", "label", "label_index", "split", array_to_vector(vector).alias("embedding"))
    )
    embedder = Embedder(modelPath=path, pooling=ec.pooling, normalize=ec.normalize,
                        maxLength=ec.max_length, batchSize=ec.batch_size, dtype=ec.dtype,
                        device=ec.device)  # fmt: skip
    common = ctx.common(labels=ctx.upstream["labels"], model=path, model_fingerprint=fp,
                        pooling=ec.pooling, normalize=ec.normalize)  # fmt: skip
    log.info("embed: %d texts through %s (%s pooling, max_length %d, batch %d, %s) in %d "
             "partitions", rows_in, path, ec.pooling, ec.max_length, ec.batch_size, ec.dtype,
             partitions)  # fmt: skip
    try:
        with catalog.commit() as tx:  # vectors, quarantine and the Embedder: all or none
            tx.write_parquet("embeddings_quarantine", quarantine, common)
            tx.write("embedder", PipelineModel(stages=[embedder]).save, common)
            started = time.perf_counter()

            def manifest(tmp: str) -> dict:
                seconds = time.perf_counter() - started
                written = spark.read.parquet(tmp)
                rows_out = written.count()
                quarantined = spark.read.parquet(tx.path("embeddings_quarantine")).count()
                if rows_in != rows_out + quarantined:
                    raise DataError(f"embed lost rows: {rows_in} in, {rows_out} embedded + "
                                    f"{quarantined} quarantined; nothing was committed")  # fmt: skip
                first = written.select("embedding").first()
                dim = len(first[0]) if first else 0
                n_loads, workers = count_loads(loads)
                result = EmbedResult(
                    rows_in, rows_out, quarantined, dim, ec.pooling, path, fp, round(seconds, 3),
                    round(rows_out / max(seconds, 1e-9), 1), n_loads, workers, partitions,
                )  # fmt: skip
                return {**common, "dimension": dim, "result": asdict(result)}

            made = tx.write_parquet("embeddings", out, manifest, partition_by=["split"])
    finally:
        storage.rmtree(loads)
    return EmbedResult(**made["result"])
