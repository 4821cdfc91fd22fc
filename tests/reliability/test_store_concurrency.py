"""Trap 7: several processes opening a fresh sqlite MLflow store at once crash in its schema
migration (measured: 8 of 8 processes, 3 trials of 3). `tracking.ensure_experiment`
creates the store and the experiment once, under a file lock, and everything after uses the
experiment id."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from mlflow.tracking import MlflowClient

PLAIN = textwrap.dedent(
    """
    import sys, mlflow
    uri, name, i = sys.argv[1:4]
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(name)
    with mlflow.start_run(run_name=f"p{i}"):
        mlflow.log_metric("i", float(i))
    """
)
OURS = textwrap.dedent(
    """
    import sys, mlflow
    from sparkloom.pipelines.tracking import ensure_experiment
    uri, name, i = sys.argv[1:4]
    experiment_id = ensure_experiment(uri, name)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"p{i}"):
        mlflow.log_metric("i", float(i))
    """
)


def start_eight(code: str, uri: str) -> list[int]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, uri, "shared", str(i)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for i in range(8)
    ]
    return [p.wait(timeout=300) for p in procs]


def test_eight_processes_on_a_fresh_sqlite_store(tmp_path):
    plain = start_eight(PLAIN, f"sqlite:///{tmp_path / 'plain.db'}")
    print(f"\nplain mlflow.set_experiment: {sum(rc != 0 for rc in plain)} of 8 processes failed")
    assert any(rc != 0 for rc in plain)  # the trap, reproduced

    uri = f"sqlite:///{tmp_path / 'ours.db'}"
    assert start_eight(OURS, uri) == [0] * 8
    client = MlflowClient(uri)
    experiments = [e for e in client.search_experiments() if e.name == "shared"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"p{i}" for i in range(8)]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.data.metrics["i"] for r in runs) == [float(i) for i in range(8)]
