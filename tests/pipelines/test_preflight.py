"""The preflight on a real local SparkSession: what passes, and each problem as one line that
names the setting to change, before any stage has run. The cluster's own checks (executors
that never register, dynamic allocation) are in tests/jobs/test_cluster.py."""

from __future__ import annotations

import socket
import time

import pytest

from sparkloom.pipelines.deep import barrier_refusal
from sparkloom.pipelines.preflight import PreflightError, require, run_preflight
from tests.conftest import make_config

TEXT_STAGES = ["ingest", "features", "baseline", "lstm"]


def test_a_local_pipeline_passes_every_check_and_leaves_nothing_behind(spark, tmp_path):
    cfg = make_config(tmp_path, pipeline={"stages": TEXT_STAGES})
    findings = require(spark, cfg, TEXT_STAGES)
    checks = {f.check: f for f in findings}
    assert {"master", "executors", "lstm: ranks", "data root", "checkpoints", "mlflow"} <= set(
        checks
    )
    assert [f.check for f in findings if f.problem and not f.warning] == []
    assert "2 task slots" in checks["executors"].found
    assert "2 ranks as one barrier stage, 2 task slots" in checks["lstm: ranks"].found
    root = tmp_path / "data" / "t"
    assert root.is_dir() and list(root.iterdir()) == []  # the probe file is gone
    assert not (tmp_path / "mlflow.db").exists()  # MLflow makes the store, under its lock


def test_more_ranks_than_task_slots_is_one_line_naming_the_setting(spark, tmp_path):
    cfg = make_config(tmp_path, pipeline={"stages": TEXT_STAGES},
                      lstm={"distributor": {"num_processes": 3}})  # fmt: skip
    with pytest.raises(PreflightError) as e:
        require(spark, cfg, TEXT_STAGES)
    message = str(e.value)
    assert "\n" not in message and e.value.exit_code == 6
    assert "'lstm' trains 3 ranks as one barrier stage" in message
    assert "the application has 2" in message
    assert "lower lstm.distributor.num_processes to 2" in message


def test_an_unreachable_tracking_server_is_found_in_seconds_not_minutes(spark, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = make_config(tmp_path, mlflow={"tracking_uri": f"http://127.0.0.1:{port}"})
    started = time.monotonic()
    with pytest.raises(PreflightError) as e:
        require(spark, cfg, ["ingest"])
    assert time.monotonic() - started < 30  # MLflow's own retries would take about 4 minutes
    assert f"the MLflow tracking server at http://127.0.0.1:{port} is unreachable" in str(e.value)
    assert "mlflow.tracking_uri" in str(e.value)


def test_an_unwritable_data_root_is_one_line(spark, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    root = tmp_path / "a-file" / "data"
    cfg = make_config(tmp_path, pipeline={"data_root": str(root)})
    with pytest.raises(PreflightError) as e:
        require(spark, cfg, ["ingest"])
    assert f"pipeline.data_root {root}/t is not writable from the driver" in str(e.value)
    assert "\n" not in str(e.value)


def test_gpu_ranks_without_gpus_for_tasks_name_the_spark_setting(spark, tmp_path):
    cfg = make_config(tmp_path, lstm={"distributor": {"use_gpu": True}})
    with pytest.raises(PreflightError) as e:
        require(spark, cfg, ["lstm"])
    assert "lstm.distributor.use_gpu=true but spark.task.resource.gpu.amount is not set" in str(
        e.value
    )


def test_every_problem_is_counted_and_the_first_is_the_line(spark, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    cfg = make_config(tmp_path, pipeline={"data_root": str(tmp_path / "a-file")},
                      lstm={"distributor": {"num_processes": 4}})  # fmt: skip
    with pytest.raises(PreflightError) as e:
        require(spark, cfg, ["lstm"])
    assert str(e.value).startswith("preflight: 'lstm' trains 4 ranks")
    # the data root, and the checkpoints beside it (written through pyarrow.fs), are not writable
    assert str(e.value).endswith("(and 2 more: see the preflight table)")
    found = {f.check: f for f in run_preflight(spark, cfg, ["lstm"])}
    assert found["checkpoints"].problem.startswith("the deep stages' checkpoints at ")
    assert "cannot be written through pyarrow.fs" in found["checkpoints"].problem


def test_barrier_stages_are_refused_under_dynamic_allocation_on_a_cluster_only():
    why = barrier_refusal("spark://host:7077", True, local_mode=False)
    assert why is not None and "SPARK-24942" in why
    assert "set spark.dynamicAllocation.enabled=false" in why
    assert barrier_refusal("yarn", True, local_mode=False) is not None
    assert barrier_refusal("local[2]", True, local_mode=False) is None  # Spark ignores it
    assert barrier_refusal("spark://host:7077", True, local_mode=True) is None  # no barrier
    assert barrier_refusal("spark://host:7077", False, local_mode=False) is None
