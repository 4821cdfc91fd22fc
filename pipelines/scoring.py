"""Batch scoring of text with a logged classifier: `models:/NAME@alias` or `runs:/ID/model`.

The model's run says which stage made it (tag `sparkloom.stage`); its preprocessing comes
from that run's own artifacts and its pipeline's resolved config, never from the catalog:

- baseline: the logged Spark `PipelineModel` goes from raw text to `probability`.
- lstm, textcnn: RegexTokenizer + StopWordsRemover rebuilt from the pipeline's `features`
  section (they need no fitting), then the model's own `vocab.txt` -> token ids.
- bert: the model's own `tokenizer.json` -> WordPiece ids, in a pandas UDF.

Torch models run in `pyspark.ml.functions.predict_batch_udf`: `state_dict.pt` and
`model.json` go to the executors with SparkContext.addFile, and each Python worker builds
the model once from them (weights_only: nothing unpickled as code) and scores padded id
batches. Rows with a null or blank text go to quarantine with reason
`empty_text`; rows in = rows scored + rows quarantined.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import yaml
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipelines.errors import DataError
from pipelines.spark import ship_files, write_with_quarantine

TEXT_TORCH = ("lstm", "textcnn", "bert")


@dataclass
class ModelRef:
    run_id: str
    stage: str
    files: str  # local directory of the run's model-files (torch) or model (spark)
    labels: list[str]
    config: dict  # the pipeline's resolved config (as plain data)


def resolve(model_uri: str) -> ModelRef:
    """Find the run behind a model URI, download what scoring needs."""
    import mlflow
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
    run = client.get_run(run_id)
    stage = run.data.tags.get("sparkloom.stage")
    if stage not in ("baseline", *TEXT_TORCH):
        raise DataError(
            f"run {run_id} was made by stage '{stage}'; batch text scoring takes baseline, "
            f"{', '.join(TEXT_TORCH)}"
        )
    parent = run.data.tags.get("mlflow.parentRunId")
    if not parent:
        raise DataError(f"run {run_id} has no parent pipeline run, so no config to rebuild from")
    resolved = mlflow.artifacts.download_artifacts(
        run_id=parent, artifact_path="config/resolved.yaml"
    )
    with open(resolved) as f:
        config = yaml.safe_load(f)
    if stage == "baseline":
        files = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model")
        extras = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model-extras")
        with open(os.path.join(extras, "labels.txt")) as f:
            labels = f.read().split("\n")[:-1]
    else:
        files = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model-files")
        with open(os.path.join(files, "labels.json")) as f:
            labels = json.load(f)
    return ModelRef(run_id, stage, files, labels, config)


def _token_ids(ref: ModelRef, text: DataFrame, max_length: int) -> DataFrame:
    """(id, text) -> (id, ids padded with 0 to max_length)."""
    if ref.stage == "bert":
        from pipelines import subword

        with open(os.path.join(ref.files, "tokenizer.json")) as f:
            enc = subword.encode(f.read(), max_length, F.col("text"))
        ids = text.select("id", enc["input_ids"].alias("ids"))
    else:
        from pipelines.config import FeaturesConfig
        from pipelines.text import build_feature_pipeline, token_ids

        fc = FeaturesConfig(**ref.config.get("features", {}))
        tokenize = build_feature_pipeline(fc).getStages()[:2]  # RegexTokenizer, stopwords
        with open(os.path.join(ref.files, "vocab.txt")) as f:
            vocabulary = f.read().split("\n")[:-1]
        tokens = text
        for stage in tokenize:
            tokens = stage.transform(tokens)
        ids = tokens.select("id", token_ids(F.col("tokens"), vocabulary, max_length).alias("ids"))
    pad = F.array_repeat(F.lit(0), F.lit(max_length) - F.size("ids"))
    return ids.select("id", F.concat("ids", pad).alias("ids"))


def score(
    df: DataFrame, model_uri: str, text_col: str = "text", id_col: str = "id"
) -> tuple[DataFrame, DataFrame, ModelRef]:
    """(scored: id, predicted_label, probabilities; quarantine: id, text, reason; the model)."""
    for c in (text_col, id_col):
        if c not in df.columns:
            raise DataError(f"no column '{c}' among {df.columns}; set --text-column/--id-column")
    ref = resolve(model_uri)
    rows = df.select(F.col(id_col).cast("string").alias("id"), F.col(text_col).alias("text"))
    blank = F.col("text").isNull() | (F.trim(F.col("text")) == "")
    quarantine = rows.filter(blank).withColumn("reason", F.lit("empty_text"))
    good = rows.filter(~blank)
    labels = F.array(*[F.lit(x) for x in ref.labels])
    if ref.stage == "baseline":
        import mlflow.spark
        from pyspark.ml.functions import vector_to_array

        model = mlflow.spark.load_model(ref.files)
        out = model.transform(good).select(
            "id", vector_to_array("probability").alias("probabilities")
        )
    else:
        max_length = (
            ref.config["bert"]["max_length"]
            if ref.stage == "bert"
            else ref.config["features"]["sequence"]["max_length"]
        )
        out = _token_ids(ref, good, max_length)
        prefix = ship_files(df.sparkSession, ref.files, ("state_dict.pt", "model.json"))
        predict = _predict_udf(prefix, ref.stage, max_length)
        out = out.select("id", predict("ids").alias("probabilities"))
    best = F.array_position(
        F.col("probabilities"), F.array_max("probabilities")
    )  # 1-based, first maximum
    scored = out.select(
        "id", F.element_at(labels, best.cast("int")).alias("predicted_label"), "probabilities"
    )
    return scored, quarantine, ref


def _predict_udf(prefix: str, stage: str, max_length: int):
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import types as T

    def make_predict_fn():
        import numpy as np
        import torch
        from pyspark import SparkFiles

        from models.registry import Scorer
        from models.train import load_exported

        # the files Spark shipped to this executor; built once per Python worker
        model = Scorer(load_exported(SparkFiles.getRootDirectory(), stage, prefix)).eval()

        def predict(ids: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                x = torch.from_numpy(ids.astype(np.int64).reshape(len(ids), max_length))
                return model(x).float().numpy()

        return predict

    return predict_batch_udf(
        make_predict_fn,
        return_type=T.ArrayType(T.FloatType()),
        batch_size=64,
        input_tensor_shapes=[[max_length]],
    )


@dataclass
class ScoreResult:
    rows_in: int
    rows_out: int
    quarantined: int
    output: str
    stage: str


def write_scores(
    df: DataFrame, model_uri: str, output: str, text_col: str = "text", id_col: str = "id"
) -> ScoreResult:
    """Scores as Parquet at `output`, quarantine beside it at `output`_quarantine; the counts
    are checked on what was written."""
    output = output.rstrip("/")
    df = df.localCheckpoint()  # the counts and the written rows come from the same input
    scored, quarantine, ref = score(df, model_uri, text_col, id_col)
    rows_in, rows_out, quarantined = write_with_quarantine(
        df, scored, quarantine, output, "scoring"
    )
    return ScoreResult(rows_in, rows_out, quarantined, output, ref.stage)
