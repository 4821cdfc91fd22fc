"""MLflow runs: one parent run per pipeline run, one child run per stage.

Only the driver logs. The resolved config goes to the parent run as flattened
params and as `config/resolved.yaml`; each stage logs its metrics and artifacts
to its child run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus

from pipelines.config import Config, flatten

log = logging.getLogger(__name__)


def configure(cfg: Config) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id."""
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    return mlflow.set_experiment(cfg.experiment).experiment_id


@contextmanager
def pipeline_run(cfg: Config, command: str) -> Iterator[mlflow.ActiveRun]:
    """The parent run: ends FINISHED on success, FAILED on any exception or exit."""
    configure(cfg)
    tags = {"sparkloom.pipeline": cfg.pipeline.name, "sparkloom.command": command}
    run = mlflow.start_run(run_name=f"{cfg.pipeline.name}:{command}", tags=tags)
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        mlflow.log_params(flatten(cfg))
        mlflow.log_text(cfg.to_yaml(), "config/resolved.yaml")
        log.info(
            "MLflow run %s in experiment '%s' (%s)",
            run.info.run_id,
            cfg.experiment,
            cfg.mlflow.tracking_uri,
        )
        yield run
        status = RunStatus.to_string(RunStatus.FINISHED)
    except KeyboardInterrupt:
        status = RunStatus.to_string(RunStatus.KILLED)
        raise
    finally:
        # close any stage run left open by an exception, then the parent
        while (
            mlflow.active_run() is not None and mlflow.active_run().info.run_id != run.info.run_id
        ):
            mlflow.end_run(status)
        mlflow.end_run(status)


@contextmanager
def stage_run(name: str, params: dict[str, Any] | None = None) -> Iterator[mlflow.ActiveRun]:
    """A child run of the active pipeline run."""
    with mlflow.start_run(run_name=name, nested=True, tags={"sparkloom.stage": name}) as run:
        if params:
            mlflow.log_params({k: str(v) for k, v in params.items()})
        yield run


def log_metrics(metrics: dict[str, float], prefix: str = "") -> None:
    mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items() if v is not None})


def log_figure(fig, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def log_spark_model(
    model, artifact_path: str, labels: list[str], input_col: tuple[str, str] = ("string", "text")
) -> str:
    """Log a fitted Spark PipelineModel with its label index; returns the model URI.
    `input_col`: (MLflow type, name) of the column the model reads."""
    import pyspark
    from mlflow.models.signature import ModelSignature
    from mlflow.types import ColSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec(*input_col)]),
        outputs=Schema([ColSpec("double", "prediction")]),
    )
    info = mlflow.spark.log_model(
        model,
        artifact_path,
        signature=signature,
        # pinned explicitly: inferring requirements would load the model in a subprocess
        pip_requirements=[f"pyspark=={pyspark.__version__}"],
    )
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "labels.txt"
        path.write_text("\n".join(labels) + "\n")
        mlflow.log_artifact(str(path), artifact_path=f"{artifact_path}-extras")
    return info.model_uri


def ui_hint(cfg: Config) -> str:
    uri = cfg.mlflow.tracking_uri
    if uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)"
    if os.path.isdir(uri) or uri.startswith("file:"):
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {uri} in a browser"


def log_history(history: list[dict[str, float]]) -> None:
    """Per-epoch values as metric series (step = epoch), so MLflow draws the curves."""
    for h in history:
        mlflow.log_metrics(
            {f"epoch_{k}": float(v) for k, v in h.items() if k != "epoch"}, step=int(h["epoch"])
        )


def log_steps(steps: list[dict[str, float]], evals: list[dict[str, float]]) -> None:
    """Per-step records as metric series over the global step: step_train_loss, step_lr,
    step_tokens_per_s, step_mfu; and step_val_loss/perplexity at each evaluation interval."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(f"step_{k}", float(v), now, int(rec["step"]))
               for rec in [*steps, *evals] for k, v in rec.items() if k != "step"]  # fmt: skip
    client, run_id = mlflow.tracking.MlflowClient(), mlflow.active_run().info.run_id
    for i in range(0, len(metrics), 1000):  # MLflow's batch limit: one call per 1000 values
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def log_torch_model(model_dir: str, name: str, artifact_path: str) -> str:
    """Log a trained model two ways: the safe files (state dict, config, vocab, labels)
    as artifacts, and an `mlflow.pytorch` model for pyfunc scoring. Returns its URI."""
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from models.registry import ImageScorer, Scorer
    from models.train import load_exported

    mlflow.log_artifacts(model_dir, artifact_path=f"{artifact_path}-files")
    model = load_exported(model_dir, name)
    preprocess = Path(model_dir) / "preprocess.json"
    if preprocess.exists():  # images: raw 0-255 pixels in, standardized inside the scorer
        p = json.loads(preprocess.read_text())
        scorer = ImageScorer(model, p["mean"], p["std"]).eval()
        example = np.random.default_rng(0).integers(0, 256, (2, *p["shape"]), dtype=np.uint8)
    else:
        scorer = Scorer(model).eval()
        example = np.array([[2, 3, 4, 0], [5, 6, 0, 0]], dtype=np.int64)
    with torch.no_grad():
        probs = scorer(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        scorer,
        name=artifact_path,
        signature=infer_signature(example, probs),
        input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        # torch.export (pt2) cannot trace packed LSTMs; the safe copy is the state dict above
        serialization_format="pickle",
    )
    return info.model_uri


def log_tokenizer(model_dir: str) -> None:
    """The subword tokenizer saved with a model, as the run's `tokenizer/` artifact:
    tokenizer.json (what the code loads), the vocabulary in the files other tools read
    (WordPiece: vocab.txt in id order; byte-level BPE: vocab.json + merges.txt) and
    tokenizer_info.json (where it came from), when present."""
    from tokenizers import Tokenizer

    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return
    tok = Tokenizer.from_file(path)
    with tempfile.TemporaryDirectory() as tmp:
        for written in tok.model.save(tmp):
            mlflow.log_artifact(written, "tokenizer")
    mlflow.log_artifact(path, "tokenizer")
    info = os.path.join(model_dir, "tokenizer_info.json")
    if os.path.isfile(info):
        mlflow.log_artifact(info, "tokenizer")
    mlflow.log_metric("tokenizer_vocab_size", tok.get_vocab_size())
