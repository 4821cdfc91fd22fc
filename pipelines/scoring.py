"""Batch scoring with a logged classifier: `models:/NAME@alias` or `runs:/ID/model`.

The model's run says which stage made it (tag `sparkloom.stage`); its preprocessing comes
from that run's own artifacts and its pipeline's resolved config, never from the catalog:

- baseline: the logged Spark `PipelineModel` goes from raw text to `probability`.
- lstm, textcnn: RegexTokenizer + StopWordsRemover rebuilt from the pipeline's `features`
  section (they need no fitting), then the model's own `vocab.txt` -> token ids.
- bert: the model's own `tokenizer.json` -> WordPiece ids, in a pandas UDF.
- images (baseline, cnn, alexnet): encoded files or pixel arrays are decoded and resized as
  the pipeline's ingest did (`ingest.image`), the baseline's PipelineModel standardizes
  them itself, the CNNs through `ImageScorer` with the model's `preprocess.json`.

Torch models run in `pyspark.ml.functions.predict_batch_udf`: `state_dict.pt` and
`model.json` go to the executors with SparkContext.addFile, and each Python worker builds
the model once from them (weights_only: nothing unpickled as code) and scores padded id
or image batches. Rows with a null or blank text go to quarantine with reason `empty_text`,
images that cannot be used with ingest's reasons (`empty_file`, `undecodable`, ...);
rows in = rows scored + rows quarantined.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import yaml
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkloom.pipelines import compat
from sparkloom.pipelines.audit import CALIBRATION_FILE
from sparkloom.pipelines.config import IMAGE_FORMATS, ImageConfig
from sparkloom.pipelines.context import StageContext, stage
from sparkloom.pipelines.errors import DataError, exception_text
from sparkloom.pipelines.spark import ship_files, write_with_quarantine
from sparkloom.pipelines.stages import CLASSIFIERS, SPARK_MODELS


@dataclass
class ModelRef:
    run_id: str
    stage: str
    files: str  # local directory of the run's model-files (torch) or model (spark)
    labels: list[str]
    config: dict  # the pipeline's resolved config (as plain data)
    allow_pickle: bool = False  # load weights files that hold pickled objects (trusted only)
    quantized: dict | None = None  # int8 (quantize stage): its recipe; `stage` is then the
    # source model's
    # what scoring divides the logits by: the temperature fitted on validation when the
    # model's run had evaluation.calibrate=temperature (its calibration.json), else 1
    temperature: float = 1.0

    @property
    def max_length(self) -> int:
        """Token ids per row: what the model was trained with (a checkpoint's tokenizer
        records it), BERT's own setting, else the features stage's sequence length."""
        if "max_length" in self.tokenizer_info:
            return self.tokenizer_info["max_length"]
        if self.stage == "bert":
            return self.config["bert"]["max_length"]
        return self.config["features"]["sequence"]["max_length"]

    @property
    def pad_token_id(self) -> int:
        """What ids are right-padded with: the checkpoint tokenizer's padding id, else 0."""
        return self.tokenizer_info.get("pad_token_id", 0)

    @functools.cached_property
    def tokenizer_info(self) -> dict:
        path = os.path.join(self.files, "tokenizer_info.json")
        if self.stage != "bert" or not os.path.isfile(path):
            return {}
        with open(path) as f:
            return json.load(f)

    @property
    def modality(self) -> str:
        return "image" if self.config["ingest"]["format"] in IMAGE_FORMATS else "text"


def run_id_of(model_uri: str) -> str:
    """The MLflow run behind models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/..."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if model_uri.startswith("models:/"):
        name, _, alias = model_uri.removeprefix("models:/").partition("@")
        try:
            mv = (client.get_model_version_by_alias(name, alias) if alias
                  else client.get_model_version(*name.split("/", 1)))  # fmt: skip
        except Exception as e:
            raise DataError(
                f"no model {model_uri} in the registry: {str(e).splitlines()[0]}"
            ) from None
        run_id = mv.run_id
    elif model_uri.startswith("runs:/"):
        run_id = model_uri.removeprefix("runs:/").split("/", 1)[0]
    else:
        raise DataError(f"model {model_uri}: give models:/NAME@ALIAS or runs:/RUN_ID/model")
    return run_id


def resolve(model_uri: str, allow_pickle: bool = False) -> ModelRef:
    """Find the run behind a model URI, download what scoring needs."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run_id = run_id_of(model_uri)
    run = client.get_run(run_id)
    stage = run.data.tags.get("sparkloom.stage")
    if stage not in CLASSIFIERS:
        raise DataError(
            f"run {run_id} was made by stage '{stage}'; batch scoring takes the classifiers "
            f"{', '.join(CLASSIFIERS)}"
        )
    parent = run.data.tags.get("mlflow.parentRunId")
    if not parent:
        raise DataError(f"run {run_id} has no parent pipeline run, so no config to rebuild from")
    resolved = mlflow.artifacts.download_artifacts(
        run_id=parent, artifact_path="config/resolved.yaml"
    )
    with open(resolved) as f:
        config = yaml.safe_load(f)
    quantized: dict | None = None  # the recipe of an int8 model of the quantize stage
    if stage in SPARK_MODELS:
        files = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model")
        extras = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model-extras")
        with open(os.path.join(extras, "labels.txt")) as f:
            labels = f.read().split("\n")[:-1]
        temperature = _temperature(extras)
    else:
        files = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model-files")
        with open(os.path.join(files, "labels.json")) as f:
            labels = json.load(f)
        temperature = _temperature(files)
        if os.path.exists(os.path.join(files, "distill.json")):  # a distilled student
            with open(os.path.join(files, "distill.json")) as f:
                stage = json.load(f)["student"]
        if os.path.exists(os.path.join(files, "quantization.json")):
            with open(os.path.join(files, "quantization.json")) as f:  # the float files plus
                how = json.load(f)  # the recipe; the model is built from its source
            stage, quantized = how["source"], how
        from sparkloom.models.quantize import INT8_WEIGHTS
        from sparkloom.models.weights import UnsafeWeights, load_weights

        weights = (
            [os.path.join(files, "state_dict.pt")]
            if os.path.exists(os.path.join(files, "state_dict.pt"))
            else []
        )  # safetensors: tensors only
        if os.path.exists(os.path.join(files, INT8_WEIGHTS)):  # a static int8 model's
            weights.append(os.path.join(files, INT8_WEIGHTS))
        try:  # on the driver, so an unsafe file is refused before any executor opens it
            for path in weights if not allow_pickle else []:
                load_weights(path)
        except UnsafeWeights as e:
            raise DataError(f"model {model_uri}: {e}") from None
    return ModelRef(run_id, stage, files, labels, config, allow_pickle, quantized, temperature)


def _temperature(folder: str) -> float:
    path = os.path.join(folder, CALIBRATION_FILE)
    if not os.path.isfile(path):  # a model from before calibration, or one logged by hand
        return 1.0
    with open(path) as f:
        saved = json.load(f)
    return float(saved["temperature"]) if saved.get("applied") else 1.0


def _token_ids(ref: ModelRef, text: DataFrame, max_length: int) -> DataFrame:
    """(id, text) -> (id, ids padded with 0 to max_length)."""
    if ref.stage == "bert":
        from sparkloom.pipelines import subword

        with open(os.path.join(ref.files, "tokenizer.json")) as f:
            enc = subword.encode(f.read(), max_length, F.col("text"))
        ids = text.select("id", enc["input_ids"].alias("ids"))
    else:
        from sparkloom.pipelines.config import FeaturesConfig
        from sparkloom.pipelines.text import build_feature_pipeline, token_ids

        fc = FeaturesConfig(**ref.config.get("features", {}))
        tokenize = build_feature_pipeline(fc).getStages()[:2]  # RegexTokenizer, stopwords
        with open(os.path.join(ref.files, "vocab.txt")) as f:
            vocabulary = f.read().split("\n")[:-1]
        tokens = text
        for stage in tokenize:
            tokens = stage.transform(tokens)
        ids = tokens.select("id", token_ids(F.col("tokens"), vocabulary, max_length).alias("ids"))
    pad = F.array_repeat(F.lit(ref.pad_token_id), F.lit(max_length) - F.size("ids"))
    return ids.select("id", F.concat("ids", pad).alias("ids"))


def score(
    df: DataFrame, model_uri: str | ModelRef, input_col: str | None = None, id_col: str = "id",
    prepared: bool = False, allow_pickle: bool = False,
) -> tuple[DataFrame, DataFrame, ModelRef]:  # fmt: skip
    """(scored: id, predicted_label, probabilities; quarantine: id, reason[, text]; the model).

    `input_col` is the text column (default `text`) or, for image models, a binary column of
    encoded image files or raw pixels with a `shape` column (default `content`), or an array
    of pixel values. `prepared=True` takes the pipeline's own ingested `image` bytes
    ((C, H, W) uint8 at the model's size), as the `score` stage does.
    """
    ref = model_uri if isinstance(model_uri, ModelRef) else resolve(model_uri, allow_pickle)
    if ref.modality == "image":
        col = input_col or ("image" if prepared else "content")
        _require(df, col, id_col)
        good, quarantine = _image_rows(df, ref, col, id_col, prepared)
    else:
        col = input_col or "text"
        _require(df, col, id_col)
        rows = df.select(F.col(id_col).cast("string").alias("id"), F.col(col).alias("text"))
        blank = F.col("text").isNull() | F.col("text").rlike(r"^\s*$")
        quarantine = rows.filter(blank).withColumn("reason", F.lit("empty_text"))
        good = rows.filter(~blank)
    out = with_temperature(_probabilities(ref, good), ref.temperature)
    labels = F.array(*[F.lit(x) for x in ref.labels])
    best = F.array_position(
        F.col("probabilities"), F.array_max("probabilities")
    )  # 1-based, first maximum
    scored = out.select(
        "id", F.element_at(labels, best.cast("int")).alias("predicted_label"), "probabilities"
    )
    return scored, quarantine, ref


def with_temperature(out: DataFrame, t: float) -> DataFrame:
    """probabilities -> softmax(log p / T), the same as softmax(logits / T): a row's log
    probabilities differ from its logits by one constant, which the softmax drops."""
    if t == 1.0:
        return out
    powered = F.transform("probabilities", lambda p: F.pow(p.cast("double"), F.lit(1.0 / t)))
    total = F.aggregate(powered, F.lit(0.0), lambda acc, x: acc + x)
    scaled = F.transform(powered, lambda x: (x / total).cast("float"))
    return out.withColumn("probabilities", scaled)


CLI_ID_FIX = (
    "give --id-column a column with one value per row, or --id-column none to number the rows"
)
STAGE_ID_FIX = "run the ingest stage again with --force: it quarantines repeated ids (duplicate_id)"


def require_unique_ids(df: DataFrame, id_col: str, fix: str, what: str = "--id-column") -> None:
    """Fail unless `id_col` names each row once. Scores are matched back to their rows by
    id (the score stage joins them to the labels), so a repeated id fans out there and an
    output row could belong to any of its inputs."""
    ids = df.select(F.col(id_col).cast("string").alias("id"))
    bad = ids.groupBy("id").count().filter(F.col("id").isNull() | (F.col("count") > 1))
    named = F.col("id").isNotNull()
    s = bad.agg(
        F.count("id").alias("repeated"),
        F.sum(F.when(named, F.col("count"))).alias("rows"),
        F.sum(F.when(~named, F.col("count"))).alias("nulls"),
        F.min("id").alias("example"),
        F.min_by(F.col("count"), F.when(named, F.col("id"))).alias("times"),
    ).first()
    if not s["repeated"] and not s["nulls"]:
        return
    problems = []
    if s["repeated"]:
        ids = "1 id appears" if s["repeated"] == 1 else f"{s['repeated']} ids appear"
        problems.append(f"{ids} more than once ({s['rows']} rows), "
                        f"e.g. '{s['example'][:80]}' on {s['times']} rows")  # fmt: skip
    if s["nulls"]:
        problems.append("1 row has no id" if s["nulls"] == 1 else f"{s['nulls']} rows have no id")
    where = f"{what} '{id_col}'" if what == "--id-column" else f"{what}, column '{id_col}',"
    raise DataError(
        f"{where} does not name each row once: {'; '.join(problems)}; scores could not be "
        f"matched back to their rows, so nothing was scored. Fix: {fix}"
    )


def number_rows(df: DataFrame, name: str) -> DataFrame:
    """`df` with `name` = 0..N-1 in its order, without moving it to one partition. `df` must
    be pinned (localCheckpoint): the numbers come from its partitions as they are."""
    part, mono = F.spark_partition_id(), F.monotonically_increasing_id()
    sizes = sorted(tuple(r) for r in df.groupBy(part.alias("p")).count().collect())
    offsets, start = {}, 0
    for p, n in sizes:
        offsets[p], start = start, start + n
    first = F.create_map(*[F.lit(x) for kv in offsets.items() for x in kv]) if offsets else None
    within = mono - F.shiftleft(part.cast("long"), 33)  # the id is (partition << 33) + position
    number = (first[part] + within) if first is not None else within
    return df.withColumn(name, number.cast("string"))


def _require(df: DataFrame, col: str, id_col: str) -> None:
    for c in (col, id_col):
        if c not in df.columns:
            raise DataError(f"no column '{c}' among {df.columns}; set --input-column/--id-column")


def _image_rows(
    df: DataFrame, ref: ModelRef, col: str, id_col: str, prepared: bool
) -> tuple[DataFrame, DataFrame]:
    """(id, image) decoded and resized as the model's ingest did; (id, reason) for the rest."""
    from sparkloom.pipelines.images import prepare_images

    ident = F.col(id_col).cast("string").alias("id")
    if prepared:
        rows = df.select(ident, F.col(col).alias("image"))
        bad = F.col("image").isNull()
        quarantine = rows.filter(bad).select("id", F.lit("null_image").alias("reason"))
        return rows.filter(~bad), quarantine
    kind = df.schema[col].dataType
    none = F.lit(None)
    if isinstance(kind, T.ArrayType):
        content, pixels = none, F.col(col)
    elif isinstance(kind, T.BinaryType):
        content, pixels = F.col(col), none
    else:
        raise DataError(
            f"image column '{col}' is {kind.simpleString()}; give binary (an encoded image "
            "file, or raw uint8 pixels with a 'shape' column) or an array of pixel values"
        )
    shape = F.col("shape") if "shape" in df.columns else none
    raw = df.select(
        ident,
        content.cast("binary").alias("content"),
        pixels.cast(T.ArrayType(T.DoubleType())).alias("pixels"),
        shape.cast(T.ArrayType(T.IntegerType())).alias("shape"),
    )
    made = prepare_images(raw, ImageConfig(**ref.config["ingest"].get("image", {})))
    bad = F.col("image_reason").isNotNull()
    quarantine = made.filter(bad).select("id", F.col("image_reason").alias("reason"))
    return made.filter(~bad).select("id", "image"), quarantine


def _spark_model(spark: SparkSession, ref: ModelRef):
    """The PipelineModel of a downloaded MLflow `spark` model. A classic session goes through
    mlflow.spark, which copies it to the cluster's filesystem over Py4J. A Connect server
    cannot read the client's download, so it is copied (pyarrow.fs, once per run) under the
    run's own data root, which client and server share, and the server loads it there."""
    if not compat.is_connect(spark):
        import mlflow.spark

        return mlflow.spark.load_model(ref.files)
    from pyspark.ml import PipelineModel

    from sparkloom.models import storage
    from sparkloom.pipelines.catalog import absolute_uri

    pipe = ref.config["pipeline"]
    base = absolute_uri(pipe["data_root"]).rstrip("/")
    staged = storage.join(base, pipe["name"], "_scoring_models", ref.run_id)
    try:
        if not storage.exists(storage.join(staged, "_COMPLETE")):  # a copy cut short is redone
            storage.rmtree(staged)
            storage.copy_tree(os.path.join(ref.files, "sparkml"), staged)
            storage.write_text(storage.join(staged, "_COMPLETE"), ref.run_id)
        return PipelineModel.load(staged)
    except Exception as e:
        raise DataError(
            f"the Spark Connect server cannot load the model from {staged} "
            f"({exception_text(e).splitlines()[0][:160]}); the run's pipeline.data_root "
            f"({pipe['data_root']}) must be storage this client and the server both reach"
        ) from e


def _probabilities(ref: ModelRef, good: DataFrame) -> DataFrame:
    """(id, probabilities) in the model's label order."""
    if ref.stage in SPARK_MODELS:
        from pyspark.ml.functions import vector_to_array

        model = _spark_model(good.sparkSession, ref)
        return model.transform(good).select(
            "id", vector_to_array("probability").alias("probabilities")
        )
    from sparkloom.models.train.checkpoint import exported_files

    spark = good.sparkSession
    weights = exported_files(ref.files)  # state_dict.pt or a transformers model's safetensors
    if ref.quantized and ref.quantized["method"] == "static":
        from sparkloom.models.quantize import INT8_WEIGHTS

        weights += (INT8_WEIGHTS,)
    if ref.modality == "image":
        with open(os.path.join(ref.files, "preprocess.json")) as f:
            shape = json.load(f)["shape"]  # [C, H, W]
        prefix = ship_files(spark, ref.files, (*weights, "preprocess.json"))
        return good.select(
            "id",
            _predict_udf(prefix, ref.stage, shape, ref.allow_pickle, ref.quantized)(
                _pixels("image")
            ).alias("probabilities"),
        )
    max_length = ref.max_length
    ids = _token_ids(ref, good, max_length)
    prefix = ship_files(spark, ref.files, weights)
    return ids.select(
        "id",
        _predict_udf(prefix, ref.stage, [max_length], ref.allow_pickle, ref.quantized)("ids").alias(
            "probabilities"
        ),
    )


def _pixels(col: str):
    """(C, H, W) uint8 bytes -> array<float> of the same values, for predict_batch_udf."""

    @F.pandas_udf(T.ArrayType(T.FloatType()))
    def to_array(images: pd.Series) -> pd.Series:
        return images.map(lambda b: np.frombuffer(b, dtype=np.uint8).astype(np.float32))

    return to_array(F.col(col))


def _predict_udf(
    prefix: str, stage: str, shape: list[int], allow_pickle: bool = False,
    quantized: dict | None = None,
):  # fmt: skip
    """Token ids (shape [T]) or raw pixels (shape [C, H, W]) -> class probabilities."""
    from pyspark.ml.functions import predict_batch_udf

    def make_predict_fn():
        import torch

        from sparkloom.models.registry import ImageScorer, Scorer
        from sparkloom.models.train import load_exported
        from sparkloom.pipelines.compat import shipped_files_root

        # the files Spark shipped to this executor; built once per Python worker
        root = shipped_files_root()
        model = load_exported(root, stage, prefix, allow_pickle)
        if quantized:  # the int8 model: the same recipe the quantize stage measured
            from sparkloom.models.quantize import load_int8

            model = load_int8(model, quantized, root, prefix, allow_pickle)
        if len(shape) == 3:
            with open(os.path.join(root, f"{prefix}preprocess.json")) as f:
                pre = json.load(f)
            model, dtype = ImageScorer(model, pre["mean"], pre["std"]), np.float32
        else:
            model, dtype = Scorer(model), np.int64
        model.eval()

        def predict(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                batch = torch.from_numpy(x.astype(dtype).reshape(len(x), *shape))
                return model(batch).float().numpy()

        return predict

    return predict_batch_udf(
        make_predict_fn,
        return_type=T.ArrayType(T.FloatType()),
        batch_size=64,
        input_tensor_shapes=[list(shape)],
    )


@dataclass
class ScoreResult:
    rows_in: int
    rows_out: int
    quarantined: int
    output: str
    stage: str


def write_scores(
    df: DataFrame, model_uri: str, output: str, input_col: str | None = None,
    id_col: str | None = "id", allow_pickle: bool = False,
) -> ScoreResult:  # fmt: skip
    """Scores as Parquet at `output`, quarantine beside it at `output`_quarantine; the counts
    are checked on what was written. `id_col` must name each row once; None numbers the rows
    0..N-1 in input order as `id`."""
    output = output.rstrip("/")
    df = df.localCheckpoint()  # the counts and the written rows come from the same input
    if id_col is None:
        df, id_col = number_rows(df, "id"), "id"
    else:
        if id_col not in df.columns:
            raise DataError(f"no column '{id_col}' among {df.columns}; set --id-column")
        require_unique_ids(df, id_col, CLI_ID_FIX)
    scored, quarantine, ref = score(df, model_uri, input_col, id_col, allow_pickle=allow_pickle)
    rows_in, rows_out, quarantined = write_with_quarantine(
        df, scored, quarantine, output, "scoring"
    )
    return ScoreResult(rows_in, rows_out, quarantined, output, ref.stage)


# --- the `score` stage -----------------------------------------------------------------------


@dataclass
class ScoreStageResult:
    model_uri: str
    run_id: str  # the run that logged the model scored
    model_stage: str
    split: str
    rows_in: int
    rows_out: int
    quarantined: int
    accuracy: float  # of the predicted labels against the split's labels
    model_accuracy: float | None  # what the model's own run measured on that split
    skipped: bool = False

    def metrics(self) -> dict[str, float]:
        m = {"rows_in": self.rows_in, "rows_scored": self.rows_out,
             "rows_quarantined": self.quarantined, f"scored_{self.split}_accuracy": self.accuracy}  # fmt: skip
        if self.model_accuracy is not None:
            m[f"model_{self.split}_accuracy"] = self.model_accuracy
        return m

    def summary(self) -> str:
        own = (
            f" (its run measured {self.model_accuracy:.4f})"
            if self.model_accuracy is not None
            else ""
        )
        return (
            f"{self.rows_out} {self.split} rows scored by {self.model_uri} ({self.model_stage}), "
            f"{self.quarantined} quarantined; accuracy {self.accuracy:.4f}{own}"
        )


def _scored_uri(cfg) -> str:
    sc = cfg.score
    return sc.model or f"models:/{cfg.register.name or cfg.pipeline.name}@{cfg.register.alias}"


def _scored_run(spark, cfg, catalog) -> list[str]:
    """The run behind the model scoring uses: the skip test needs it only, not the model."""
    return [run_id_of(_scored_uri(cfg))]


@stage("score", ScoreStageResult, extra=_scored_run)
def run_score(ctx: StageContext) -> ScoreStageResult:
    """Score a split of `ingested` with the model `score.model` names (default: the register
    stage's alias), through the same path as `sparkloom score`; called as run_score(spark, cfg,
    catalog, force=False). Output: dataset `scores` (id, label, predicted_label,
    probabilities) and `scores_quarantine`. Skipped when the data, the section and the model
    behind the alias are those of the last scoring."""
    from mlflow.tracking import MlflowClient

    spark, cfg, catalog = ctx.spark, ctx.cfg, ctx.catalog
    sc = cfg.score
    uri = _scored_uri(cfg)
    ref = resolve(uri)

    image = ref.modality == "image"
    col = "image" if image else "text"
    data = catalog.read("ingested", "ingest").filter(F.col("split") == sc.split)
    df = data.select("id", col, "label").localCheckpoint()  # counts and outputs: same rows
    require_unique_ids(df, "id", STAGE_ID_FIX, what="dataset 'ingested'")
    scored, quarantine, _ = score(df, ref, col, "id", prepared=image)
    scored = scored.join(df.select("id", "label"), "id", "left")
    own = MlflowClient().get_run(ref.run_id).data.metrics.get(f"{sc.split}_accuracy")
    common = ctx.common(model_uri=uri, run_id=ref.run_id)
    rows_in = df.count()
    with catalog.commit() as tx:  # scores and their quarantine: both or neither
        tx.write_parquet("scores_quarantine", quarantine, common)

        def manifest(tmp: str) -> dict:
            written = spark.read.parquet(tmp)
            rows_out = written.count()
            quarantined = spark.read.parquet(tx.path("scores_quarantine")).count()
            if rows_in != rows_out + quarantined:
                raise DataError(
                    f"score lost rows: {rows_in} in, {rows_out} scored + {quarantined} "
                    "quarantined; nothing was committed"
                )
            right = written.filter(F.col("predicted_label") == F.col("label")).count()
            result = ScoreStageResult(uri, ref.run_id, ref.stage, sc.split, rows_in, rows_out,
                                      quarantined, right / max(rows_out, 1), own)  # fmt: skip
            return {**common, "result": {k: v for k, v in vars(result).items() if k != "skipped"}}

        made = tx.write_parquet("scores", scored, manifest)
    return ScoreStageResult(**made["result"])
