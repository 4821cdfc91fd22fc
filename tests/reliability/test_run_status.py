"""Trap 6: MLflow leaves runs RUNNING after SIGTERM, SIGKILL or os._exit, and marks an
exception outside a `with` block FINISHED. Ours end FAILED (exception, sys.exit) or KILLED
(SIGINT, SIGTERM) on every path that can be caught, and the next start of the pipeline
marks what SIGKILL left RUNNING as KILLED.

The signals go to a real `sparkloom run` process while its LSTM stage trains."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from sparkloom.pipelines import runner
from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.deep import text_inputs, write_splits
from sparkloom.pipelines.runner import run_pipeline
from tests.conftest import make_config


def statuses(cfg) -> dict[str, list[str]]:
    client = MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    out: dict[str, list[str]] = {}
    for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]):
        out.setdefault(r.info.run_name, []).append(r.info.status)
    return out


def ingest_config(tmp_path, text_dirs, **sections):
    return make_config(
        tmp_path,
        pipeline={"stages": ["ingest", "features"]},
        ingest={"format": "text_dirs", "path": str(text_dirs)},
        **sections,
    )


@pytest.mark.parametrize(
    "fault, status",
    [
        (lambda: (_ for _ in ()).throw(ValueError("bad")), "FAILED"),
        (lambda: sys.exit(3), "FAILED"),
        (lambda: (_ for _ in ()).throw(KeyboardInterrupt()), "KILLED"),
    ],
    ids=["exception", "sys.exit", "SIGINT"],
)
def test_a_stage_that_raises_exits_or_is_interrupted_ends_its_runs(
    spark, tmp_path, text_dirs, monkeypatch, fault, status
):
    cfg = ingest_config(tmp_path, text_dirs)

    def features(*args):
        fault()

    monkeypatch.setitem(runner._STAGES, "features", features)
    with pytest.raises(BaseException):  # noqa: B017 - each kind of exit, as it is
        run_pipeline(spark, cfg, ["ingest", "features"])
    assert mlflow.active_run() is None
    got = statuses(cfg)
    assert got["ingest"] == ["FINISHED"]
    assert got["features"] == [status] and got["t:run"] == [status]


def start_run(tmp_path, cfg) -> subprocess.Popen:
    conf = tmp_path / "pipeline.yaml"
    conf.write_text(cfg.to_yaml())
    return subprocess.Popen(
        [sys.executable, "-m", "sparkloom.jobs.cli", "run", "--conf", str(conf)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def wait_for(proc: subprocess.Popen, text: str, limit: float = 300) -> list[str]:
    lines, end = [], time.monotonic() + limit
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
        assert time.monotonic() < end, "".join(lines[-30:])
    raise AssertionError(f"exited before '{text}':\n{''.join(lines[-30:])}")


def long_lstm(tmp_path, text_dirs):
    return make_config(
        tmp_path,
        pipeline={"stages": ["ingest", "features", "lstm"]},
        spark={"conf": {"spark.sql.shuffle.partitions": 2}},  # as the test session's
        ingest={"format": "text_dirs", "path": str(text_dirs)},
        features={"sequence": {"min_df": 1}},
        lstm={"model": {"embed_dim": 16, "hidden_dim": 16, "num_layers": 1},
              "training": {"epochs": 3000, "batch_size": 8,
                           "early_stopping": {"patience": 3000}}},
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, group",
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGTERM", "SIGINT-to-the-process-group"],
)
def test_a_signal_to_a_running_stage_ends_its_runs_killed(tmp_path, text_dirs, signum, group):
    """`kill PID`, and Ctrl-C, which a terminal sends to the whole group, as a scheduler
    does with SIGTERM: the JVM and the training processes die with the driver, and
    stopping Spark then fails, quietly. (SIGTERM to the group takes the same handler as
    SIGTERM, and the group's death as SIGINT: one variant fewer, 80 s less of CI.)"""
    cfg = long_lstm(tmp_path, text_dirs)
    proc = start_run(tmp_path, cfg)
    wait_for(proc, "epoch 2/3000")  # the LSTM is training
    sent = time.monotonic()
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    seconds = time.monotonic() - sent
    print(f"\n{signal.Signals(signum).name} (group={group}): exited {proc.returncode} after "
          f"{seconds:.1f}s")  # fmt: skip
    assert proc.returncode == 128 + signum, out[-6000:]
    assert "its MLflow runs are marked KILLED" in out
    got = statuses(cfg)
    assert got["ingest"] == got["features"] == ["FINISHED"]
    assert got["lstm"] == ["KILLED"] and got["t:run"] == ["KILLED"]


@pytest.mark.slow
def test_the_next_start_closes_the_runs_sigkill_left_running(spark, tmp_path, text_dirs, caplog):
    cfg = long_lstm(tmp_path, text_dirs)
    proc = start_run(tmp_path, cfg)
    wait_for(proc, "epoch 2/3000")
    os.killpg(proc.pid, signal.SIGKILL)  # the job and everything it started: nothing can react
    proc.communicate(timeout=60)
    got = statuses(cfg)
    assert got["lstm"] == ["RUNNING"] and got["t:run"] == ["RUNNING"]  # the trap, reproduced

    run_pipeline(spark, cfg, ["ingest"])  # the next start of the same pipeline
    got = statuses(cfg)
    assert got["lstm"] == ["KILLED"] and got["t:run"] == ["KILLED", "FINISHED"]
    assert got["ingest"] == ["FINISHED", "FINISHED"]
    client = MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    stale = client.search_runs([exp.experiment_id], "tags.`sparkloom.closed_as_stale` = 'true'")
    assert sorted(r.info.run_name for r in stale) == ["lstm", "t:run"]

    # The LSTM's data the killed process wrote through the converter is this process's
    # cache too: another JVM, the same keys (semanticHash differed in every session).
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    cache = Path(catalog.local_path("converter_cache"))
    written = sorted(p.name for p in cache.iterdir())
    labels = catalog.require("features", "features")["labels"]
    with caplog.at_level(logging.INFO, logger="sparkloom.pipelines.converter"):
        paths = write_splits(spark, cfg, catalog, "lstm", text_inputs(catalog, labels))
    assert caplog.text.count("converter: reusing the cache") == 3, caplog.text
    assert len(written) == 3 and sorted(p.name for p in cache.iterdir()) == written
    assert sorted(Path(p).name for p in paths.values()) == written
