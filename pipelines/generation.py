"""Text generation with a trained GPT-2: load it from anywhere we save it, sample from
prompts on the driver, or over a Spark DataFrame of prompts in batch.

A model is found from any of: a model directory (`state_dict.pt`, `model.json`,
`tokenizer.json`, as the `gpt2_model` dataset holds it); an MLflow artifact URI of such a
directory (`runs:/RUN_ID/model-files`, or a bare run id); or a training checkpoint `.pt`
file (from `<stage>_work/.../checkpoints`) with the tokenizer given apart. Weights load with
`torch.load(weights_only=True)`: nothing is unpickled as code.

Sampling is seeded per row, from (seed, row key): a row's completion depends on its prompt,
key and the settings, not on which other rows share its batch or partition.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkloom.pipelines.errors import DataError
from sparkloom.pipelines.spark import ship_files, write_with_quarantine


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 60
    temperature: float = 0.8  # 0: greedy
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1: off
    seed: int = 0
    batch_size: int = 16  # prompts per forward pass


RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve_model(model: str, tracking_uri: str | None = None, tokenizer: str | None = None) -> str:
    """A local model directory for `model` (see the module docstring); MLflow artifacts are
    downloaded to a temporary directory, a checkpoint is unpacked next to its tokenizer."""
    if RUN_ID.match(model):
        model = f"runs:/{model}/model-files"
    scheme = urlparse(model).scheme
    if len(scheme) > 1 and scheme != "file":  # runs:/, models:/, s3://, ...; not C:\ paths
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        try:
            return mlflow.artifacts.download_artifacts(artifact_uri=model)
        except Exception as e:  # MlflowException, OSError: say what was asked and where
            raise DataError(
                f"cannot fetch model {model} from MLflow at {mlflow.get_tracking_uri()}: "
                f"{str(e).splitlines()[0]}; pass --tracking-uri, or a local model directory"
            ) from None
    path = model.removeprefix("file://").removeprefix("file:")
    if os.path.isfile(path) and path.endswith(".pt"):
        return _from_checkpoint(path, tokenizer)
    if not os.path.isdir(path):
        raise DataError(
            f"no model at {model}: give a model directory (state_dict.pt, model.json, "
            "tokenizer.json), runs:/RUN_ID/model-files, a run id, or a checkpoint .pt file"
        )
    missing = [f for f in ("model.json", "tokenizer.json")
               if not os.path.isfile(os.path.join(path, f))]  # fmt: skip
    if not _weights_file(path):
        missing.append("state_dict.pt or model.safetensors")
    if missing:
        raise DataError(f"{path} is not a GPT-2 model directory: it lacks {missing}")
    return path


def _from_checkpoint(path: str, tokenizer: str | None) -> str:
    import torch

    if not tokenizer or not os.path.isfile(tokenizer):
        raise DataError(
            f"a checkpoint ({path}) holds no tokenizer: pass --tokenizer path/to/tokenizer.json "
            "(the gpt2_model dataset has it)"
        )
    from sparkloom.models.weights import load_weights

    saved = load_weights(path)
    run = json.loads(saved["config"])
    if run["model"]["name"] != "gpt2":
        raise DataError(f"{path} is a checkpoint of '{run['model']['name']}', not of gpt2")
    out = tempfile.mkdtemp(prefix="sparkloom-gpt2-")
    torch.save(saved["model"], os.path.join(out, "state_dict.pt"))
    # the config that built the model: the checkpoint's, completed by the model's own defaults
    from sparkloom.models.gpt2 import GPT2Config

    # the built model's own config (exact also for a run started from a Hugging Face model);
    # checkpoints older than that field have only the run's model section
    config = saved.get("model_config") or asdict(GPT2Config(**run["model"]["config"]))
    with open(os.path.join(out, "model.json"), "w") as f:
        json.dump({"config": config}, f)
    with open(tokenizer) as src, open(os.path.join(out, "tokenizer.json"), "w") as dst:
        dst.write(src.read())
    return out


WEIGHTS = ("model.safetensors", "state_dict.pt")  # a transformers directory, or a checkpoint's
_LOADED: dict[tuple, tuple] = {}


def _weights_file(model_dir: str, prefix: str = "") -> str | None:
    return next((f"{prefix}{w}" for w in WEIGHTS
                 if os.path.isfile(os.path.join(model_dir, f"{prefix}{w}"))), None)  # fmt: skip


def model_files(model_dir: str) -> tuple[str, ...]:
    """What generating needs from a model directory: its weights, model.json, tokenizer.json
    (config.json too when the weights are a transformers directory's)."""
    weights = _weights_file(model_dir)
    extra = ("config.json",) if weights == "model.safetensors" else ()
    return (weights, "model.json", "tokenizer.json", *extra)


def load(model_dir: str, device: str = "cpu", prefix: str = ""):
    """(GPT2LM in eval mode on `device`, tokenizer) from `prefix`+model_files() in model_dir,
    once per process per model version (path and the weights' modification time: a
    retrained model reloads)."""
    weights = os.path.join(model_dir, _weights_file(model_dir, prefix) or f"{prefix}state_dict.pt")
    key = (os.path.abspath(weights), os.path.getmtime(weights), device)
    if key not in _LOADED:
        from sparkloom.models.train import load_exported
        from sparkloom.pipelines.subword import tokenizer_from_json

        with open(os.path.join(model_dir, f"{prefix}tokenizer.json")) as f:
            tok = tokenizer_from_json(f.read())
        _LOADED[key] = (load_exported(model_dir, "gpt2", prefix).to(device), tok)
    return _LOADED[key]


def complete(
    model_dir: str, prompts: list[str], s: Sampling, keys: list[str] | None = None,
    device: str = "cpu", prefix: str = "",
):  # fmt: skip
    """Completions (text after the prompt) and their lengths in tokens, one per prompt."""
    from sparkloom.models.generate import generate
    from sparkloom.pipelines.subword import EOT

    model, tok = load(model_dir, device, prefix)
    eot = tok.token_to_id(EOT)
    keys = keys if keys is not None else [str(i) for i in range(len(prompts))]
    texts, lengths = [], []
    for i in range(0, len(prompts), s.batch_size):
        chunk = prompts[i : i + s.batch_size]
        ids = [e.ids or [eot] for e in tok.encode_batch(chunk, add_special_tokens=False)]
        new = generate(
            model, ids, s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
            top_p=s.top_p, seed=s.seed, keys=keys[i : i + s.batch_size],
            eos_token_id=eot,
        )  # fmt: skip
        for row in new:
            text_ids = row[:-1] if row and row[-1] == eot else row
            texts.append(tok.decode(text_ids))
            lengths.append(len(row))
    return texts, lengths


OUTPUT = T.StructType(
    [
        T.StructField("id", T.StringType()),
        T.StructField("prompt", T.StringType()),
        T.StructField("completion", T.StringType()),
        T.StructField("new_tokens", T.IntegerType()),
    ]
)


@dataclass
class GenerateResult:
    rows_in: int
    rows_out: int
    quarantined: int
    output: str


def generate_dataframe(
    df: DataFrame, model_dir: str, s: Sampling, prompt_col: str = "prompt",
    id_col: str | None = None,
) -> tuple[DataFrame, DataFrame]:  # fmt: skip
    """(completions, quarantine): one row of id, prompt, completion, new_tokens per prompt;
    null or blank prompts go to quarantine with reason `empty_prompt`. Every executor loads
    the model once from the files Spark ships to it (SparkContext.addFile)."""
    if prompt_col not in df.columns:
        raise DataError(f"no column '{prompt_col}' among {df.columns}; set --prompt-column")
    if id_col and id_col not in df.columns:
        raise DataError(f"no column '{id_col}' among {df.columns}; set --id-column")
    spark = df.sparkSession
    prefix = ship_files(spark, model_dir, model_files(model_dir))  # once per executor, by content
    threads = int(spark.conf.get("spark.task.cpus", "1"))
    # no id column: the prompt itself is the key (equal prompts get equal completions)
    rid = F.col(id_col).cast("string") if id_col else F.sha2(F.col(prompt_col), 256)
    rows = df.select(rid.alias("id"), F.col(prompt_col).cast("string").alias("prompt"))
    blank = F.col("prompt").isNull() | F.col("prompt").rlike(r"^\s*$")
    quarantine = rows.filter(blank).withColumn("reason", F.lit("empty_prompt"))

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import torch
        from pyspark import TaskContext

        from sparkloom.pipelines.compat import shipped_files_root

        torch.set_num_threads(threads)  # one task's cores, not the whole machine's
        gpus = TaskContext.get().resources().get("gpu") if TaskContext.get() else None
        device = f"cuda:{gpus.addresses[0]}" if gpus and torch.cuda.is_available() else "cpu"
        for pdf in batches:
            texts, lengths = complete(
                shipped_files_root(), pdf["prompt"].tolist(), s, pdf["id"].tolist(),
                device, prefix=prefix,
            )  # fmt: skip
            yield pd.DataFrame({"id": pdf["id"], "prompt": pdf["prompt"], "completion": texts,
                                "new_tokens": pd.Series(lengths, dtype="int32")})  # fmt: skip

    return rows.filter(~blank).mapInPandas(run, OUTPUT), quarantine


def write_generations(
    df: DataFrame, model_dir: str, s: Sampling, output: str, prompt_col: str = "prompt",
    id_col: str | None = None,
) -> GenerateResult:  # fmt: skip
    """Completions as Parquet at `output`, quarantine at `output`_quarantine; counts checked."""
    output = output.rstrip("/")
    df = df.localCheckpoint()  # the counts and the written rows come from the same input
    out, quarantine = generate_dataframe(df, model_dir, s, prompt_col, id_col)
    rows_in, rows_out, quarantined = write_with_quarantine(
        df, out, quarantine, output, "generation"
    )
    return GenerateResult(rows_in, rows_out, quarantined, output)
