"""Trap 9: unpickling runs code. Our weights files are state dicts loaded weights-only; a
file whose unpickling would call a function is refused (and the function never runs)
unless the caller passes allow_pickle (`--allow-pickle`); configs are YAML data, never
code; secrets never reach MLflow params, the resolved config artifact or the log."""

from __future__ import annotations

import json
import logging
import os

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from sparkloom.models.registry import build_model
from sparkloom.models.train import Checkpoints, load_exported
from sparkloom.models.weights import UnsafeWeights, load_weights
from sparkloom.pipelines import tracking
from sparkloom.pipelines.config import load_config
from sparkloom.pipelines.errors import ConfigError
from tests.conftest import make_config


class Payload:
    """Unpickling this touches a marker file: any code could run in its place."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


LSTM = {"vocab_size": 20, "num_classes": 3, "embed_dim": 4, "hidden_dim": 4, "num_layers": 1}


def export_lstm(directory, payload=None):
    model = build_model("lstm", LSTM)
    state = model.state_dict()
    if payload is not None:
        state["extra"] = payload
    os.makedirs(directory, exist_ok=True)
    torch.save(state, os.path.join(directory, "state_dict.pt"))
    with open(os.path.join(directory, "model.json"), "w") as f:
        json.dump({"config": LSTM}, f)
    return model


def test_a_weights_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    export_lstm(tmp_path / "bad", Payload(str(marker)))
    with pytest.raises(UnsafeWeights, match="loading it could run code .* --allow-pickle"):
        load_exported(str(tmp_path / "bad"), "lstm")
    with pytest.raises(UnsafeWeights):
        Checkpoints.load(str(tmp_path / "bad" / "state_dict.pt"))
    assert not marker.exists()  # refused before anything ran

    # the explicit opt-in does unpickle (the payload runs: that is what the flag allows)
    with pytest.raises(Exception):  # noqa: B017 - the payload is not a tensor
        load_exported(str(tmp_path / "bad"), "lstm", allow_pickle=True)
    assert marker.exists()


def test_a_plain_state_dict_loads_weights_only(tmp_path):
    model = export_lstm(tmp_path / "good")
    loaded = load_exported(str(tmp_path / "good"), "lstm")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    # a whole pickled model (torch.save(model)) is refused too; with the opt-in, its weights
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(UnsafeWeights):
        load_weights(str(tmp_path / "whole.pt"))
    assert set(load_weights(str(tmp_path / "whole.pt"), allow_pickle=True)) == set(
        model.state_dict()
    )


def test_a_config_cannot_execute_code(tmp_path):
    marker = tmp_path / "pwned"
    conf = tmp_path / "evil.yaml"
    conf.write_text(f'pipeline: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError):
        load_config(conf)
    assert not marker.exists()


def test_secrets_never_reach_params_artifacts_or_logs(tmp_path, caplog):
    cfg = make_config(
        tmp_path,
        ingest={"format": "csv", "path": "s3a://AKIAEXAMPLE:hunter2-secret@bucket/news.csv"},
        spark={"conf": {"spark.hadoop.fs.s3a.secret.key": "hunter2-secret",
                        "spark.hadoop.fs.s3a.access.key": "AKIAEXAMPLE"}},
    )  # fmt: skip
    caplog.set_level(logging.INFO)
    with tracking.pipeline_run(cfg, "run") as run:
        pass
    client = MlflowClient(cfg.mlflow.tracking_uri)
    params = client.get_run(run.info.run_id).data.params
    resolved = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config/resolved.yaml")
    for text in (json.dumps(params), resolved, caplog.text):
        assert "hunter2" not in text and "AKIAEXAMPLE" not in text.replace("AKIAEXAMPLE:***", "")
    assert params["ingest.path"] == "s3a://AKIAEXAMPLE:***@bucket/news.csv"
    assert params["spark.conf.spark.hadoop.fs.s3a.secret.key"] == "***"
    assert params["ingest.format"] == "csv"  # everything else as it was


@pytest.mark.slow
def test_the_cli_never_prints_a_password_from_a_uri(tmp_path):
    import subprocess
    import sys

    cfg = make_config(tmp_path, pipeline={"stages": ["ingest"]},
                      ingest={"format": "csv", "path": "s3a://etl:hunter2@bucket/news.csv"})  # fmt: skip
    conf = tmp_path / "p.yaml"
    conf.write_text(cfg.to_yaml())
    done = subprocess.run([sys.executable, "-m", "sparkloom.jobs.cli", "run", "--conf", str(conf)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    out = done.stdout + done.stderr
    # no S3 here: listing the input through pyarrow.fs fails, in one line naming the input
    assert done.returncode == 3 and "cannot open input path s3a://etl:***@bucket/news.csv" in out
    assert "MLflow run" in out and "hunter2" not in out
