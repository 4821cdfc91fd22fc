"""A real Spark standalone cluster and a real MLflow tracking server, both on 127.0.0.1.

Each test starts its services as subprocesses in their own process groups and stops
them in teardown, also when the test fails.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import make_docs, write_jsonl

if TYPE_CHECKING:
    from mlflow.entities import Run

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SITE = next(p for p in sys.path if p.endswith("site-packages"))
CLUSTER_YAML = ROOT / "conf" / "spark" / "cluster.yaml"
STAGE_DATASETS = {"ingest": "ingested", "features": "features", "baseline": "baseline_model",
                  "lstm": "lstm_model"}  # fmt: skip


# --- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return f"--- {path.name} ---\n" + "\n".join(text.splitlines()[-lines:])


@dataclass
class Service:
    """A background process in its own process group, its output in one log file."""

    name: str
    proc: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, name: str, cmd: list[str], log: Path, env: dict, cwd: Path) -> Service:
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    start_new_session=True)  # fmt: skip
        return cls(name, proc, log)

    def stop(self) -> None:
        """SIGTERM to the whole group (a worker's executors are its children), then SIGKILL."""
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def wait_until(
    check: Callable[[], bool], what: str, services: list[Service], timeout: float
) -> None:
    """Poll `check` until it holds; fail with the services' log tails if one exits first."""
    deadline = time.monotonic() + timeout
    while True:
        dead = [s.name for s in services if s.proc.poll() is not None]
        if dead:
            why = f"{dead} exited"
            break
        try:
            if check():
                return
        except (OSError, ValueError):  # not listening yet, or half-started
            pass
        if time.monotonic() > deadline:
            why = f"not within {timeout:.0f}s"
            break
        time.sleep(0.5)
    pytest.fail(f"{what}: {why}\n" + "\n".join(tail(s.log) for s in services))


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def run_logged(
    cmd: list[str], env: dict, cwd: Path, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Like subprocess.run, but a timeout kills the whole group (spark-submit's JVM and its Python)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[0]} ran past {timeout}s\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# --- what the cluster runs --------------------------------------------------------------------


def cluster_python(tmp_path: Path) -> Path:
    """A Python with the libraries but not the editable install: like a cluster node's.

    A fresh venv plus PYTHONPATH=site-packages (PYTHONPATH does not run .pth files).
    `python -S`, as test_cli uses, would not reach the training ranks: TorchDistributor
    starts them with sys.executable, which is the venv's python without -S.
    """
    env_dir = tmp_path / "node-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    return env_dir / "bin" / "python"


def build_bundle(tmp_path: Path) -> Path:
    """The wheel as dist/sparkloom.zip, what `make dist` ships with --py-files."""
    wheel_dir = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    bundle = wheel_dir / "sparkloom.zip"
    shutil.copy(next(wheel_dir.glob("sparkloom-*.whl")), bundle)
    return bundle


def tiny_conf(tmp_path: Path, stages: list[str], **sections) -> Path:
    """A few dozen documents, tiny models, every path absolute (executors share this disk)."""
    write_jsonl(tmp_path / "docs.jsonl", make_docs(15))
    conf = {
        "extends": str(ROOT / "conf" / "defaults.yaml"),
        "pipeline": {"name": "tiny", "data_root": str(tmp_path / "data"), "stages": stages},
        "spark": {"conf": {"spark.sql.shuffle.partitions": 2}},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tiny"},
        "ingest": {"format": "json", "path": str(tmp_path / "docs.jsonl"), "columns": {"id": "id"}},
        "features": {"idf": {"min_doc_freq": 0}, "sequence": {"min_df": 1, "max_length": 16}},
        "baseline": {"tuning": "none", "grid": {"reg_param": [0.01], "max_iter": [50]}},
        "lstm": {
            "model": {"embed_dim": 8, "hidden_dim": 8, "num_layers": 1},
            "training": {"epochs": 2, "batch_size": 8, "optimizer": {"lr": 0.02}},
            "distributor": {"num_processes": 2, "local_mode": False, "timeout_s": 300},
        },
    }
    for key, value in sections.items():
        conf[key] = {**conf[key], **value}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    return path


def stage_runs(client, experiment: str) -> tuple[Run, dict[str, Run]]:
    """The one parent run of the experiment and its child runs by stage."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "sparkloom.stage" not in r.data.tags]
    assert len(parents) == 1, [(r.info.run_name, r.info.status) for r in runs]
    parent = parents[0]
    children = {r.data.tags["sparkloom.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}  # fmt: skip
    return parent, children


# --- a Spark standalone cluster ---------------------------------------------------------------


@dataclass
class Cluster:
    url: str  # spark://127.0.0.1:PORT
    ui: str  # the master's web UI
    work_dir: Path  # the worker's: one folder per application, one per executor
    python: Path  # the nodes' Python
    services: list[Service]

    def state(self) -> dict:
        return get_json(f"{self.ui}/json/")


@pytest.fixture
def standalone_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """One master and ONE worker from pyspark's own jars: 2 cores and 10g to give, so the
    documented 4g executors of one core fit twice (a worker's memory is a quota: the JVMs
    take from this machine only what they use)."""
    from pyspark.find_spark_home import _find_spark_home

    spark_class = str(Path(_find_spark_home()) / "bin" / "spark-class")
    python = cluster_python(tmp_path)
    logs, work = tmp_path / "cluster-logs", tmp_path / "cluster-work"
    logs.mkdir()
    work.mkdir()
    # The nodes' environment: the executors inherit the worker's. Its REST submission
    # server would take the fixed port 6066, so it is off.
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONPATH": SITE,
           "PYSPARK_PYTHON": str(python), "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false"}  # fmt: skip
    port, ui_port, worker_ui_port = free_port(), free_port(), free_port()
    url, ui = f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{ui_port}"
    services: list[Service] = []
    try:
        services.append(Service.start("master", [
            spark_class, "org.apache.spark.deploy.master.Master",
            "--host", "127.0.0.1", "--port", str(port), "--webui-port", str(ui_port),
        ], logs / "master.log", env, tmp_path))  # fmt: skip
        services.append(Service.start("worker", [
            spark_class, "org.apache.spark.deploy.worker.Worker", url,
            "--cores", "2", "--memory", "10g", "--host", "127.0.0.1",
            "--webui-port", str(worker_ui_port), "--work-dir", str(work),
        ], logs / "worker.log", env, tmp_path))  # fmt: skip
        cluster = Cluster(url, ui, work, python, services)
        wait_until(lambda: cluster.state()["aliveworkers"] == 1,
                   f"the worker did not register with the master at {url}", services, 120)  # fmt: skip
        yield cluster
    finally:
        for service in reversed(services):  # the worker (and its executors) first
            service.stop()


def submit(cluster: Cluster, tmp_path: Path, bundle: Path, args: list[str],
           timeout: int = 600) -> subprocess.CompletedProcess:  # fmt: skip
    """spark-submit to the cluster with the node's Python and --py-files, as docs/cluster.md
    says; its output is kept in tmp_path/spark-submit.log."""
    python = str(cluster.python)
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONPATH": SITE,
           "PYSPARK_PYTHON": python, "PYSPARK_DRIVER_PYTHON": python}  # fmt: skip
    p = run_logged([
        str(BIN / "spark-submit"), "--master", cluster.url, "--py-files", str(bundle),
        "--conf", f"spark.pyspark.python={python}", "--conf", "spark.driver.host=127.0.0.1",
        *args,
    ], env, tmp_path, timeout)  # fmt: skip
    # spark-submit's PythonRunner merges the script's stderr (our log lines, the ranks'
    # streamed output) into its stdout; its own stderr is the JVM's log
    with open(tmp_path / "spark-submit.log", "a") as log:
        log.write(p.stdout + "\n--- stderr ---\n" + p.stderr)
    return p


def documented_command() -> list[list[str]]:
    """The commands of docs/cluster.md's first bash block, each as its argv."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.slow
def test_the_documented_cluster_command_trains_the_lstm(
    tmp_path, standalone_cluster, mlflow_server
):
    """docs/cluster.md's spark-submit line, as written (cluster.yaml layered, 4g executors of
    one core, --py-files, the nodes' Python, a URI data root, an MLflow server), with only
    its hosts and paths replaced: ingest -> features -> baseline -> lstm; the LSTM's 2 ranks
    are a barrier stage on the worker's 2 one-core executors, the code reaches them only
    through --py-files, and rank 0 writes its checkpoints through the data root's URI."""
    cluster = standalone_cluster
    make, submit_cmd = documented_command()
    assert make == ["make", "dist"]
    conf = tiny_conf(tmp_path, ["ingest", "features", "baseline", "lstm"])
    bundle = build_bundle(tmp_path)  # what make dist writes as dist/sparkloom.zip
    data_root = f"file://{tmp_path / 'data'}"
    replace = {
        "spark://master:7077": cluster.url,
        "dist/sparkloom.zip": str(bundle),
        "spark.pyspark.python=/opt/envs/sparkloom/bin/python": f"spark.pyspark.python={cluster.python}",
        "jobs/submit.py": str(ROOT / "jobs" / "submit.py"),
        "conf/text_classification.yaml": str(conf),  # BBC News is the demo's; tests make their data
        "conf/spark/cluster.yaml": str(CLUSTER_YAML),
        "pipeline.data_root=hdfs:///sparkloom": f"pipeline.data_root={data_root}",
        "mlflow.tracking_uri=http://mlflow:5000": f"mlflow.tracking_uri={mlflow_server}",
    }  # fmt: skip
    for placeholder in replace:
        assert placeholder in submit_cmd, f"docs/cluster.md no longer has {placeholder}"
    assert submit_cmd[0] == "spark-submit"
    argv = [str(BIN / "spark-submit"), "--conf", "spark.driver.host=127.0.0.1",  # loopback
            *(replace.get(a, a) for a in submit_cmd[1:]),
            "spark.app_name=sparkloom-cluster-test",
            "spark.conf.spark.sql.shuffle.partitions=2",  # cluster.yaml's 200 is for real data
            "preflight.timeout_s=180",  # two 4g executor JVMs starting while CI's other worker runs
            ]  # fmt: skip
    python = str(cluster.python)
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONPATH": SITE,
           "PYSPARK_PYTHON": python, "PYSPARK_DRIVER_PYTHON": python}  # fmt: skip
    p = run_logged(argv, env, tmp_path)
    (tmp_path / "spark-submit.log").write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    errors = [ln for ln in p.stdout.splitlines() if "Error" in ln or "error:" in ln]
    # on failure, what the worker saw of its executors (a launch that failed under load)
    nodes = "\n".join(tail(s.log) for s in cluster.services)
    assert p.returncode == 0, "\n".join([*errors[:20], p.stdout[-3000:], nodes])
    assert "45 rows in = 45 out" in p.stdout
    # the preflight ran first: two executors, the checkpoints shared with them
    assert p.stdout.index("preflight (") < p.stdout.index("[ingest] started")
    assert re.search(r"checkpoints from executors +ok +file:\S+: shared", p.stdout), p.stdout[:3000]
    assert "preflight: spark.driver.memory" not in p.stdout  # --driver-memory sized the JVM

    data = tmp_path / "data" / "tiny"
    for stage, dataset in STAGE_DATASETS.items():
        assert (data / dataset / "_manifest.json").is_file(), f"{stage}: no {dataset} manifest"
    (checkpoints,) = (data / "lstm_work").glob("*/checkpoints")
    assert (checkpoints / "latest").is_file() and list(checkpoints.glob("step-*.pt"))

    from mlflow.tracking import MlflowClient

    parent, children = stage_runs(MlflowClient(mlflow_server), "tiny")
    assert parent.info.status == "FINISHED"
    statuses = {s: r.info.status for s, r in children.items()}
    assert statuses == dict.fromkeys(STAGE_DATASETS, "FINISHED")
    lstm = children["lstm"].data.metrics
    assert lstm["world_size"] == 2 and "test_accuracy" in lstm
    # the server's proxied artifact store holds the models
    assert list((tmp_path / "artifacts").rglob("MLmodel"))

    # The application ran on this cluster and ended cleanly (SparkContext.stop).
    def finished() -> bool:
        state = cluster.state()
        return not state["activeapps"] and any(
            a["name"] == "sparkloom-cluster-test" for a in state["completedapps"]
        )

    wait_until(finished, "the application did not complete", cluster.services, 30)
    (app,) = cluster.state()["completedapps"]
    assert app["state"] == "FINISHED", app
    executor_dirs = sorted((cluster.work_dir / app["id"]).iterdir())
    assert [e.name for e in executor_dirs] == ["0", "1"]
    for e in executor_dirs:  # each fetched the bundle and ran one rank's barrier task
        assert (e / "sparkloom.zip").is_file()
        assert "BarrierTaskContext" in (e / "stderr").read_text(), tail(e / "stderr")

    # batch scoring through the same entry point, on the cluster, with the logged baseline
    model = f"runs:/{children['baseline'].info.run_id}/model"
    scored = submit(cluster, tmp_path, bundle, [
        "--conf", "spark.executor.cores=1", str(ROOT / "jobs" / "submit.py"), "score", "--model", model,
        "--input", str(tmp_path / "docs.jsonl"), "--output", str(tmp_path / "scores"),
        "--tracking-uri", mlflow_server,
    ])  # fmt: skip
    assert scored.returncode == 0, scored.stdout[-3000:]
    assert f"scored 45 rows with {model} (baseline)" in scored.stdout
    assert pq.read_table(tmp_path / "scores").num_rows == 45


@pytest.mark.slow
def test_preflight_stops_what_the_cluster_cannot_run_before_any_stage(tmp_path, standalone_cluster):
    """Dynamic allocation under a barrier stage, and executors larger than any worker (Spark
    alone would wait forever): each is one line and exit code 6 within a minute, and no
    stage has started."""
    cluster = standalone_cluster
    conf = tiny_conf(tmp_path, ["ingest", "features", "lstm"])
    bundle = build_bundle(tmp_path)
    run = [
        str(ROOT / "jobs" / "submit.py"),
        "run",
        "--conf",
        str(conf),
        "--conf",
        str(CLUSTER_YAML),
    ]
    cases = {
        "dynamic allocation": (
            ["--conf", "spark.executor.cores=1", *run,
             "spark.conf.spark.dynamicAllocation.enabled=true",
             "spark.conf.spark.dynamicAllocation.shuffleTracking.enabled=true"],
            "which Spark refuses under dynamic allocation (SPARK-24942): set "
            "spark.dynamicAllocation.enabled=false",
        ),
        "executor memory": (
            ["--conf", "spark.executor.memory=16g", *run, "preflight.timeout_s=15"],
            "no executor registered within 15s: no worker could give one "
            "spark.executor.memory=16g and spark.executor.cores=all of a worker's",
        ),
    }  # fmt: skip
    for name, (args, line) in cases.items():
        started = time.monotonic()
        p = submit(cluster, tmp_path, bundle, args, timeout=180)
        seconds = time.monotonic() - started
        errors = [ln for ln in p.stdout.splitlines() if "error:" in ln]
        assert p.returncode == 6, f"{name}: exit {p.returncode}\n{p.stdout[-3000:]}"
        assert len(errors) == 1 and errors[0].startswith("sparkloom: error: preflight: "), errors
        assert line in errors[0], f"{name}: {errors[0]}"
        assert seconds < 90, f"{name}: {seconds:.0f}s"
        assert "[ingest] started" not in p.stdout
        assert not (tmp_path / "data" / "tiny" / "ingested").exists()


# --- an MLflow tracking server ----------------------------------------------------------------


def start_mlflow_server(tmp_path: Path, port: int) -> Service:
    """`mlflow server` on `port`: sqlite backend, artifacts proxied over HTTP; the same
    tmp_path and port start it again on the same store."""
    (tmp_path / "server").mkdir(exist_ok=True)
    service = Service.start("mlflow server", [
        str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
        "--artifacts-destination", str(tmp_path / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ], tmp_path / f"mlflow-server-{time.monotonic_ns()}.log", dict(os.environ),
       tmp_path / "server")  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status == 200

    try:
        wait_until(healthy, f"mlflow server at {url} is not healthy", [service], 120)
    except BaseException:
        service.stop()
        raise
    return service


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    service = start_mlflow_server(tmp_path, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        service.stop()


@pytest.mark.slow
def test_pipeline_logs_to_an_mlflow_tracking_server(tmp_path, mlflow_server):
    """Runs, params and metrics go through the REST API; artifacts go over HTTP into the
    server's --artifacts-destination, never straight to a path the client can see."""
    from mlflow.tracking import MlflowClient

    conf = tiny_conf(tmp_path, ["ingest", "features", "baseline"], spark={"master": "local[2]"},
                     mlflow={"tracking_uri": mlflow_server})  # fmt: skip
    p = run_logged([str(BIN / "sparkloom"), "run", "--conf", str(conf)], {**os.environ}, tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    # MLflow first tries to save the Spark model straight to the artifact URI, which Hadoop
    # cannot write (mlflow-artifacts:), then uploads it: that try's Java trace stays hidden
    assert "UnsupportedFileSystemException" not in p.stdout + p.stderr, p.stderr[-6000:]

    client = MlflowClient(mlflow_server)
    parent, children = stage_runs(client, "tiny")
    assert parent.info.status == "FINISHED"
    assert {s: r.info.status for s, r in children.items()} == {
        "ingest": "FINISHED", "features": "FINISHED", "baseline": "FINISHED",
    }  # fmt: skip
    assert parent.data.params["ingest.split.train"] == "0.8"
    assert parent.data.params["pipeline.name"] == "tiny"
    baseline = children["baseline"].data
    assert baseline.params["baseline.tuning"] == "none"
    assert baseline.params["best.reg_param"] == "0.01"
    assert 0.0 <= baseline.metrics["test_accuracy"] <= 1.0
    assert baseline.metrics["test_num_examples"] > 0
    assert children["ingest"].data.metrics["rows_out"] == 45

    # proxied artifacts: the run's URI is mlflow-artifacts:, the files land under the server's folder
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:"), parent.info.artifact_uri
    artifacts = tmp_path / "artifacts"
    (resolved,) = artifacts.rglob("config/resolved.yaml")
    assert parent.info.run_id in resolved.parts
    local = client.download_artifacts(parent.info.run_id, "config/resolved.yaml", str(tmp_path))
    assert Path(local).read_text() == resolved.read_text()
    assert yaml.safe_load(resolved.read_text())["mlflow"]["tracking_uri"] == mlflow_server
    mlmodels = [yaml.safe_load(m.read_text()) for m in artifacts.rglob("MLmodel")]
    assert any("spark" in m["flavors"] for m in mlmodels), mlmodels
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "server" / "mlartifacts").exists()


@pytest.mark.slow
def test_a_tracking_server_lost_during_a_stage_ends_the_run_with_its_own_error(tmp_path):
    """The server stops as the baseline starts: the run ends in seconds (one call spends its
    retries, the rest get none) with the stage's one line and exit code 7, not with
    end_run's error after minutes a call. Back up, the rerun closes the runs it left RUNNING
    and redoes the unrecorded stage."""
    from mlflow.tracking import MlflowClient

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    try:
        conf = tiny_conf(tmp_path, ["ingest", "features", "baseline"],
                         spark={"master": "local[2]"}, mlflow={"tracking_uri": url})  # fmt: skip
        cmd = [str(BIN / "sparkloom"), "run", "--conf", str(conf)]
        env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}  # ours (5) is a minute
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=tmp_path, start_new_session=True)  # fmt: skip
        seen, stopped = [], None
        try:
            for line in proc.stdout:
                seen.append(line)
                if "[baseline] started" in line:
                    server.stop()
                    stopped = time.monotonic()
                    break
            seen.append(proc.communicate(timeout=300)[0])
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        out = "".join(seen)
        (tmp_path / "run.log").write_text(out)
        assert stopped is not None, out[-3000:]
        seconds = time.monotonic() - stopped
        errors = [ln for ln in out.splitlines() if "error:" in ln]
        assert proc.returncode == 7, out[-3000:]
        assert len(errors) == 1, errors
        assert errors[0].startswith(
            f"sparkloom: error: stage 'baseline' failed: the MLflow tracking server at {url} "
            "is unreachable"
        ), errors[0]
        assert seconds < 60, f"{seconds:.0f}s from the stop to the exit"
        assert "Traceback" not in out

        server = start_mlflow_server(tmp_path, port)
        p = run_logged(cmd, env, tmp_path)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        client = MlflowClient(url)
        (exp,) = [e for e in client.search_experiments() if e.name == "tiny"]
        runs = client.search_runs([exp.experiment_id])
        assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
        lost = [r for r in runs if r.data.tags.get("sparkloom.closed_as_stale") == "true"]
        assert lost and {r.info.status for r in lost} == {"KILLED"}
        redone = [r for r in runs if r.data.tags.get("sparkloom.stage") == "baseline"
                  and r.info.status == "FINISHED"]  # fmt: skip
        assert len(redone) == 1 and redone[0].data.tags["sparkloom.skipped"] == "false"
    finally:
        server.stop()
