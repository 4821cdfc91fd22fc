"""MLflow runs: one parent run per pipeline run, one child run per stage.

Only the driver logs. The resolved config goes to the parent run as flattened
params and as `config/resolved.yaml`; each stage logs its metrics and artifacts
to its child run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus

from sparkloom.pipelines.config import Config, flatten
from sparkloom.pipelines.errors import Terminated, TrackingUnavailable
from sparkloom.pipelines.secrets import MASK, is_secret, mask  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


class MaskSecrets(logging.Filter):
    """Masks passwords in URIs (scheme://user:***@host) and secret `name=value` settings in
    every record a handler emits, its traceback included: data paths, tracking URIs, Spark
    settings and error messages name them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask("message", message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            # the handler would format the exception itself, after every filter has run
            record.exc_text = mask("message", logging.Formatter().formatException(record.exc_info))
        return True


def masked_params(cfg: Config) -> dict[str, str]:
    return {k: mask(k, v) for k, v in flatten(cfg).items()}


def masked_yaml(cfg: Config) -> str:
    import yaml

    def walk(key: str, node: Any) -> Any:
        if isinstance(node, dict):
            return {k: walk(f"{key}.{k}" if key else str(k), v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(key, v) for v in node]
        if isinstance(node, str):
            return mask(key, node)
        # a numeric password (keyStorePassword: 123456) is as secret as a string one
        return MASK if node is not None and is_secret(key) else node

    return yaml.safe_dump(walk("", cfg.model_dump(mode="json")), sort_keys=False)


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Several processes opening a fresh sqlite store at once crash in MLflow's schema
    migration, and racing set_experiment calls can put runs in the wrong experiment: the
    first use of a local sqlite store (and of an experiment in it) is serialized by a file
    lock beside the database."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = uri.removeprefix("sqlite:///")
    os.makedirs(os.path.dirname(os.path.abspath(db)) or ".", exist_ok=True)
    with open(f"{db}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def configure(cfg: Config) -> str:
    """Point MLflow at the configured store and experiment, creating them once (under a lock
    for sqlite); returns the experiment id, which everything after uses."""
    _reset_outage(cfg.mlflow.tracking_uri)
    return ensure_experiment(cfg.mlflow.tracking_uri, cfg.experiment)


# MLflow retries each HTTP call MLFLOW_HTTP_REQUEST_MAX_RETRIES times with exponential backoff
# (2 s, 4 s, ...): its default of 7 is about 4 minutes a call. Ours is 5 (about a minute),
# which rides out a server restart; a user's own setting is kept. Once one call has spent
# its retries the server is down for this run: every later call (tags, the stage's and its
# parent's end_run) gets none, so the run ends in seconds instead of minutes a call.
RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
DEFAULT_RETRIES = "5"
_before_outage: list[str] = []  # the retries setting before the server went down


def _reset_outage(uri: str) -> None:
    if _before_outage:
        os.environ[RETRIES_ENV] = _before_outage.pop()
    if uri.startswith(("http:", "https:")):
        os.environ.setdefault(RETRIES_ENV, DEFAULT_RETRIES)


def unavailable(e: BaseException, uri: str) -> TrackingUnavailable | None:
    """An MLflow call that could not reach its tracking server, as one line naming it and the
    fix; None for any other error. From here on MLflow calls in this process fail fast."""
    import requests

    text = str(e)
    cut = isinstance(e, requests.exceptions.ConnectionError) or (
        type(e).__name__ == "MlflowException" and text.startswith("API request to")
        and " failed with " in text
    )  # fmt: skip
    if not cut:
        return None
    if not _before_outage:
        _before_outage.append(os.environ.get(RETRIES_ENV, DEFAULT_RETRIES))
        os.environ[RETRIES_ENV] = "0"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return TrackingUnavailable(
        f"the MLflow tracking server at {mask('tracking_uri', uri)} is unreachable "
        f"({mask('error', first)[:300]}; {_before_outage[0]} retries, {RETRIES_ENV}): start it "
        "again (or fix mlflow.tracking_uri) and rerun: the runs left RUNNING are then marked "
        "KILLED and the stages it did not record are redone"
    )


def _end(run_id: str, status: str, error: BaseException | None) -> None:
    """end_run for the active run; while another error is on its way out, a failure to end
    the run is logged and that error kept: the first error is the one that says what went
    wrong (the run stays RUNNING and the next start marks it KILLED)."""
    try:
        mlflow.end_run(status)
    except Exception as e:
        if error is None:
            raise
        log.warning("could not mark MLflow run %s %s (%s); the next start of this pipeline "
                    "marks it KILLED", run_id, status, str(e).splitlines()[0] if str(e) else e)  # fmt: skip


def ensure_experiment(uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    if not uri.startswith("databricks") and not os.environ.get("MLFLOW_REGISTRY_URI"):
        # MLflow's default registry is the tracking store, but it looks first for a Spark
        # conf, over Py4J, on every client it builds: end_run too. After a stop, that call
        # can fail (the JVM is gone, or the connection was cut mid-answer), and the runs
        # would stay RUNNING. Said explicitly, it never touches the JVM. set_registry_uri
        # also exports it to the environment, where it would outlive this store: a later
        # pipeline in the process, or a child process, would take it for the user's own
        # MLFLOW_REGISTRY_URI (which is respected) and register in the wrong store.
        mlflow.set_registry_uri(uri)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)
    with _store_lock(uri):
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(name)
        if found is None:
            try:
                experiment_id = client.create_experiment(name)
            except MlflowException:  # created meanwhile by a process that holds no lock
                experiment_id = client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = found.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks (Linux), so a reused pid is not mistaken for it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(host: str, pid: str, started: str) -> bool | None:
    """Whether the process that owns a run still runs; None when it is on another host."""
    if host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return not started or _process_start(int(pid)) == started


def close_stale_runs(experiment_id: str, pipeline: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this pipeline (and their stage runs) whose process is
    gone: what SIGKILL, os._exit or a lost machine left behind. Runs on other hosts, or
    whose process still runs, are left alone. Returns the run ids closed."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    running = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`sparkloom.pipeline` = '{pipeline}' and attributes.status = 'RUNNING'"
        ),  # fmt: skip
        max_results=1000,
    )
    closed = []
    for run in running:
        t = run.data.tags
        alive = _alive(t.get("sparkloom.host", ""), t.get("sparkloom.pid", ""),
                       t.get("sparkloom.pid_start", ""))  # fmt: skip
        if alive is None:
            log.warning("run %s of pipeline %s is RUNNING on host %s; left as it is",
                        run.info.run_id, pipeline, t.get("sparkloom.host"))  # fmt: skip
            continue
        if alive:
            continue
        children = client.search_runs(
            [experiment_id],
            filter_string=(
                f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and attributes.status = 'RUNNING'"
            ),  # fmt: skip
        )
        for r in [*children, run]:
            client.set_tag(r.info.run_id, "sparkloom.closed_as_stale", "true")
            client.set_terminated(r.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            closed.append(r.info.run_id)
    if closed:
        log.warning("marked %d runs of pipeline %s KILLED: their process had died without "
                    "closing them (SIGKILL, os._exit)", len(closed), pipeline)  # fmt: skip
    return closed


def _ended(error: BaseException | None) -> str:
    from sparkloom.pipelines.spark import terminating

    if error is None:
        return RunStatus.to_string(RunStatus.FINISHED)
    # after SIGTERM, whatever surfaces (a cancelled job, a Py4J connection cut mid-call) is
    # the stop itself
    if isinstance(error, KeyboardInterrupt | Terminated) or terminating():
        return RunStatus.to_string(RunStatus.KILLED)
    return RunStatus.to_string(RunStatus.FAILED)  # exceptions and sys.exit alike


def making_run(experiment_id: str, stage: str, fingerprint: str) -> Any | None:
    """The latest finished run of `stage` that made (not skipped) the output with this
    fingerprint: the run whose model `register` takes, and which a stage skipped as up to
    date must have."""
    from mlflow.tracking import MlflowClient

    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`sparkloom.stage` = '{stage}' and "
            f"tags.`sparkloom.output_fingerprint` = '{fingerprint}' and "
            "tags.`sparkloom.skipped` = 'false' and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


@contextmanager
def pipeline_run(cfg: Config, command: str) -> Iterator[mlflow.ActiveRun]:
    """The parent run: ends FINISHED on success, KILLED on SIGINT/SIGTERM, FAILED on any
    other exception or sys.exit. Stale runs of the same pipeline are closed first."""
    experiment_id = configure(cfg)
    close_stale_runs(experiment_id, cfg.pipeline.name)
    tags = {"sparkloom.pipeline": cfg.pipeline.name, "sparkloom.command": command,
            "sparkloom.host": socket.gethostname(), "sparkloom.pid": str(os.getpid()),
            "sparkloom.pid_start": _process_start(os.getpid())}  # fmt: skip
    run = mlflow.start_run(experiment_id=experiment_id, run_name=f"{cfg.pipeline.name}:{command}",
                           tags=tags)  # fmt: skip
    error: BaseException | None = None
    try:
        mlflow.log_params(masked_params(cfg))
        mlflow.log_text(masked_yaml(cfg), "config/resolved.yaml")
        log.info(
            "MLflow run %s in experiment '%s' (%s)",
            run.info.run_id,
            cfg.experiment,
            mask("tracking_uri", cfg.mlflow.tracking_uri),
        )
        yield run
    except BaseException as e:
        error = e
        raise
    finally:
        status = _ended(error)
        # close any stage run left open, then the parent
        while (active := mlflow.active_run()) is not None and active.info.run_id != run.info.run_id:
            _end(active.info.run_id, status, error)
        if mlflow.active_run() is not None:
            _end(run.info.run_id, status, error)


@contextmanager
def stage_run(name: str, params: dict[str, Any] | None = None) -> Iterator[mlflow.ActiveRun]:
    """A child run of the active pipeline run, ended like its parent (FINISHED, KILLED or
    FAILED)."""
    run = mlflow.start_run(run_name=name, nested=True, tags={"sparkloom.stage": name})
    error: BaseException | None = None
    try:
        if params:
            mlflow.log_params({k: mask(k, str(v)) for k, v in params.items()})
        yield run
    except BaseException as e:
        error = e
        raise
    finally:
        if mlflow.active_run() is not None and mlflow.active_run().info.run_id == run.info.run_id:
            _end(run.info.run_id, _ended(error), error)


def log_metrics(metrics: dict[str, float], prefix: str = "") -> None:
    mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items() if v is not None})


def log_figure(fig, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def log_spark_model(
    saved: str,
    artifact_path: str,
    labels: list[str],
    input_col: tuple[str, str] = ("string", "text"),
    extras: dict[str, str] | None = None,
) -> str:
    """Log the Spark PipelineModel saved at `saved` (a catalog URI) as an MLflow `spark` model,
    with its label index (and `extras`, name -> text, beside it); returns the model URI.
    `input_col`: (MLflow type, name) of the column the model reads.

    mlflow.spark.log_model saves the model again and copies it through Hadoop's FileSystem over
    Py4J, which a Spark Connect client does not have: the files are copied from the catalog
    with pyarrow.fs instead, and the MLmodel is the one mlflow.spark writes (the same flavors,
    so mlflow.spark.load_model and mlflow.pyfunc take it)."""
    from mlflow.models import Model
    from mlflow.models.signature import ModelSignature
    from mlflow.types import ColSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec(*input_col)]),
        outputs=Schema([ColSpec("double", "prediction")]),
    )
    info = Model.log(artifact_path, flavor=_SavedSparkModel, saved=saved, signature=signature)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "labels.txt").write_text("\n".join(labels) + "\n")
        for name, text in (extras or {}).items():
            (Path(d) / name).write_text(text)
        mlflow.log_artifacts(d, artifact_path=f"{artifact_path}-extras")
    return info.model_uri


class _SavedSparkModel:
    """A flavor for mlflow.models.Model.log: a PipelineModel already saved, as mlflow.spark
    lays it out (`sparkml/` plus its flavors and pinned requirements)."""

    @staticmethod
    def save_model(path: str, mlflow_model, saved: str, signature) -> None:
        import sys

        import pyspark

        from sparkloom.models import storage

        os.makedirs(path, exist_ok=True)
        storage.copy_tree(saved, os.path.join(path, "sparkml"))
        mlflow_model.signature = signature
        mlflow_model.add_flavor(
            "spark", pyspark_version=pyspark.__version__, model_data="sparkml", code=None,
            model_class="pyspark.ml.pipeline.PipelineModel",
        )  # fmt: skip
        mlflow.pyfunc.add_to_model(
            mlflow_model, loader_module="mlflow.spark", data="sparkml", conda_env="conda.yaml",
            python_env="python_env.yaml",
        )  # fmt: skip
        mlflow_model.save(os.path.join(path, "MLmodel"))
        # pinned explicitly: inferring requirements would load the model in a subprocess
        requirement = f"pyspark=={pyspark.__version__}"
        python = ".".join(map(str, sys.version_info[:3]))
        files = {
            "requirements.txt": f"{requirement}\n",
            "python_env.yaml": f"python: {python}\nbuild_dependencies:\n- pip\n"
            "dependencies:\n- -r requirements.txt\n",
            "conda.yaml": f"name: mlflow-env\nchannels:\n- conda-forge\ndependencies:\n"
            f"- python={python}\n- pip\n- pip:\n  - {requirement}\n",
        }
        for name, text in files.items():
            with open(os.path.join(path, name), "w") as f:
                f.write(text)


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
    as artifacts, and an `mlflow.pytorch` model for pyfunc scoring (and the registry).
    An int8 model (quantization.json) is logged quantized. Returns its URI."""
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from sparkloom.models.registry import ImageScorer, Scorer
    from sparkloom.models.train import load_exported

    mlflow.log_artifacts(model_dir, artifact_path=f"{artifact_path}-files")
    model = load_exported(model_dir, name)
    recipe = Path(model_dir) / "quantization.json"
    how = json.loads(recipe.read_text()) if recipe.exists() else None
    if how:  # the quantize stage's int8 model, as it measured it
        from sparkloom.models.quantize import load_int8

        model = load_int8(model, how, model_dir)
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
        if how and how["method"] == "static":  # FX graph modules of quantized ops do not
            # pickle (their generated code imports a name torch cannot resolve); TorchScript
            # is how quantized models ship, and loads without unpickling code
            scorer = torch.jit.trace(scorer, torch.from_numpy(example), check_trace=False)
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
