"""The CLI's one-line errors and its stops, as a user meets them (real processes, real JVMs)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import make_docs, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def conf_file(tmp_path: Path, app_name: str = "sparkloom") -> Path:
    write_jsonl(tmp_path / "docs.jsonl", make_docs(10))
    conf = tmp_path / "tiny.yaml"
    conf.write_text(
        f"extends: {ROOT / 'conf' / 'defaults.yaml'}\n"
        "pipeline: {name: tiny}\n"
        f"mlflow: {{tracking_uri: 'sqlite:///{tmp_path / 'mlflow.db'}'}}\n"
        f"spark: {{master: 'local[1]', app_name: {app_name}, conf: {{spark.driver.memory: 1g}}}}\n"
        f"ingest: {{format: json, path: {tmp_path / 'docs.jsonl'}, columns: {{id: id}}}}\n"
    )
    return conf


# --- a stop while the JVM starts ---------------------------------------------------------------


def processes_with(marker: str) -> dict[int, str]:
    """Live processes whose command line holds `marker` (zombies have none)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            found[int(pid)] = cmd
    return found


def spark_submit_jvm(app: str) -> dict[int, str]:
    """The JVM that will hold the SparkContext (not spark-class's short-lived launcher)."""
    return {pid: cmd for pid, cmd in processes_with(app).items()
            if "deploy.SparkSubmit" in cmd and "launcher.Main" not in cmd}  # fmt: skip


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_while_the_jvm_starts_kills_it_and_frees_the_pipes(tmp_path, signum):
    """Before: the JVM outlived the CLI forever, holding its stdout/stderr (`| tee` hung)."""
    app = f"stop-at-start-{uuid.uuid4().hex[:12]}"
    conf = conf_file(tmp_path, app)
    proc = subprocess.Popen(
        [str(BIN / "sparkloom"), "ingest", "--conf", str(conf)], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        end = time.monotonic() + 60
        while not (jvm := spark_submit_jvm(app)):
            assert proc.poll() is None and time.monotonic() < end, "no JVM started"
            time.sleep(0.05)
        time.sleep(0.5)  # the JVM is booting; pyspark waits for its gateway port
        proc.send_signal(signum)
        sent = time.monotonic()
        try:
            out, err = proc.communicate(timeout=30)  # EOF on both pipes: nothing holds them
        except subprocess.TimeoutExpired:
            pytest.fail(f"no EOF on the CLI's pipes 30 s after {signum.name}")
        seconds = time.monotonic() - sent
        assert proc.returncode == 128 + signum, err[-3000:]
        assert seconds < 15, seconds
        assert err.strip().splitlines()[-1] == (
            f"sparkloom: stopped by {signum.name}; its MLflow runs are marked KILLED"
        )
        assert "Traceback" not in err
        assert processes_with(app) == {}, f"left running: {jvm}"
    finally:
        for pid in [*processes_with(app), proc.pid]:  # never leave a JVM on a shared machine
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


# --- score, generate: the one-line errors of `sparkloom <stage>` ------------------------------


def sparkloom(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "sparkloom"), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def store(tmp_path) -> str:
    """A real sqlite MLflow store with one experiment and one finished run, no models."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("tiny"))
    client.set_terminated(run.info.run_id)
    return uri


UNKNOWN_RUN = "0123456789abcdef0123456789abcdef"


def test_score_with_an_unknown_run_id_is_one_line_naming_the_uri_and_exit_3(tmp_path, store):
    """Before: a 47-line traceback (MlflowException from get_run), after a JVM start."""
    write_jsonl(tmp_path / "docs.jsonl", make_docs(2))
    model = f"runs:/{UNKNOWN_RUN}/model"
    p = sparkloom("score", "--model", model, "--input", str(tmp_path / "docs.jsonl"),
                  "--output", str(tmp_path / "scores"), "--tracking-uri", store, cwd=tmp_path)  # fmt: skip
    assert p.returncode == 3
    assert p.stderr.strip().splitlines() == [
        f"sparkloom score: error: model {model} is not in MLflow at {store}: Run with "
        f"id={UNKNOWN_RUN} not found; check the run id (`mlflow runs list --experiment-id ID`, "
        "or the MLflow UI), the registered model's name and alias or version (the UI's Models "
        "page), and --tracking-uri"
    ]
    assert p.stdout == "" and not (tmp_path / "scores").exists()


def test_score_with_an_unknown_registered_model_is_one_line_before_spark(tmp_path, store):
    write_jsonl(tmp_path / "docs.jsonl", make_docs(2))
    p = sparkloom("score", "--model", "models:/NoSuch@champion", "--input",
                  str(tmp_path / "docs.jsonl"), "--output", str(tmp_path / "scores"),
                  "--tracking-uri", store, cwd=tmp_path)  # fmt: skip
    assert p.returncode == 3
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines[0].startswith("sparkloom score: error: ") and "models:/NoSuch@champion" in lines[0]
    assert "NoSuch not found" in lines[0]


def test_score_verbose_adds_the_traceback_and_keeps_the_exit_code(tmp_path, store):
    write_jsonl(tmp_path / "docs.jsonl", make_docs(2))
    model = f"runs:/{UNKNOWN_RUN}/model"
    p = sparkloom("score", "--model", model, "--input", str(tmp_path / "docs.jsonl"), "--output",
                  str(tmp_path / "scores"), "--tracking-uri", store, "--verbose", cwd=tmp_path)  # fmt: skip
    assert p.returncode == 3
    assert p.stderr.startswith("Traceback") or "\nTraceback" in p.stderr
    assert "mlflow.exceptions.MlflowException: Run with id=" in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"sparkloom score: error: model {model}")


def test_generate_with_a_broken_model_folder_is_one_line_not_a_traceback(tmp_path):
    """Before: the tokenizers library's traceback; an error that is not ours is one line
    with the way to the traceback, as for `sparkloom <stage>`."""
    model = tmp_path / "gpt2_model"
    model.mkdir()
    for name, text in {"state_dict.pt": "", "model.json": "{}", "tokenizer.json": "{}"}.items():
        (model / name).write_text(text)
    p = sparkloom("generate", "--model", str(model), "--prompt", "The match", cwd=tmp_path)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines[0].startswith("sparkloom: generate failed: Exception: ")  # the tokenizer's
    assert lines[0].endswith(" (rerun with --verbose for the full traceback)")
    assert p.stdout == ""


@pytest.mark.slow
def test_a_driver_out_of_memory_is_one_line_naming_the_settings_and_nothing_follows(
    spark, tmp_path
):
    """An MLlib fit whose coefficients cannot fit a 512 MB driver: 100 classes x ~90k
    used hashed features of random words. The last line of stderr names the fix."""
    import numpy as np

    from sparkloom.pipelines.catalog import Catalog
    from sparkloom.pipelines.ingest import run_ingest
    from sparkloom.pipelines.text import run_features
    from tests.conftest import make_config

    rng = np.random.default_rng(0)
    vocab = np.array([f"w{i}x" for i in range(300_000)])
    docs = [{"id": f"d{i}", "label": f"c{i % 100}", "text": " ".join(rng.choice(vocab, 60))}
            for i in range(3000)]  # fmt: skip
    write_jsonl(tmp_path / "in.jsonl", docs)
    cfg = make_config(
        tmp_path,
        ingest={"format": "json", "path": str(tmp_path / "in.jsonl"), "columns": {"id": "id"}},
        features={"tf": {"num_features": 1 << 18}, "sequence": {"enabled": False}},
        baseline={"tuning": "none", "grid": {"reg_param": [0.01], "max_iter": [20]}},
    )  # fmt: skip
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    run_ingest(spark, cfg, catalog)
    run_features(spark, cfg, catalog)
    conf = tmp_path / "pipeline.yaml"
    conf.write_text(cfg.to_yaml())

    p = sparkloom("baseline", "--conf", str(conf), "spark.conf.spark.driver.memory=512m",
                  cwd=tmp_path)  # fmt: skip
    assert p.returncode == 5, p.stderr[-3000:]
    last = p.stderr.rstrip().splitlines()[-1]
    assert last.startswith("sparkloom: error: stage 'baseline' failed: the JVM ran out of memory")
    assert "spark.driver.memory=512m" in last and "spark.conf.spark.driver.memory" in last
    assert "features.tf.num_features" in last and "baseline.parallelism" in last
    # no Py4J or JVM trace anywhere: the line is the whole story without --verbose
    for noise in ("Traceback", "py4j", "\tat ", "Exception in thread"):
        assert noise not in p.stderr, p.stderr[-3000:]


def test_only_a_jvm_failure_is_reported_as_one(spark):
    """An out-of-memory text names the driver's memory; a refused connection from
    anything else (an MLflow server that is down) is not taken for a dead JVM."""
    import time

    from sparkloom.pipelines.config import SparkConfig
    from sparkloom.pipelines.spark import JVM_EXIT_WAIT_S, jvm_failure

    cfg = SparkConfig(conf={"spark.driver.memory": "2g"})
    oom = jvm_failure(RuntimeError("java.lang.OutOfMemoryError: Java heap space"), "baseline", cfg)
    assert oom is not None and oom.exit_code == 5
    assert "(Java heap space)" in str(oom) and "spark.driver.memory=2g" in str(oom)
    mlflow_down = RuntimeError("API request to http://mlflow:5000/api failed: Connection refused")
    assert jvm_failure(mlflow_down, "baseline", cfg) is None
    assert jvm_failure(ValueError("a bad label"), "baseline", cfg) is None
    started = time.perf_counter()  # the JVM answers, so it is not waited on as one exiting
    refused = ConnectionRefusedError(111, "Connection refused")
    assert jvm_failure(refused, "baseline", cfg) is None
    assert time.perf_counter() - started < JVM_EXIT_WAIT_S / 2  # not waited on for an exit


def test_a_refused_connection_is_the_gateway_only_when_py4j_raised_it():
    """A JVM that is exiting after a task's OutOfMemoryError refuses Py4J's next connection
    while a pooled one still says the context is not stopped: the py4j frame decides."""
    from sparkloom.pipelines.spark import _raised_in_py4j

    def raise_in(filename: str) -> BaseException:
        code = compile("raise ConnectionRefusedError(111, 'Connection refused')", filename, "exec")
        try:
            exec(code)
        except ConnectionRefusedError as e:
            return e
        raise AssertionError("did not raise")

    gateway = raise_in("/venv/lib/python3.11/site-packages/py4j/clientserver.py")
    assert _raised_in_py4j(gateway)
    try:  # what MLlib's fit re-raises from the gateway's error
        raise RuntimeError("fit failed") from gateway
    except RuntimeError as wrapped:
        assert _raised_in_py4j(wrapped)
    assert not _raised_in_py4j(raise_in("/venv/lib/python3.11/site-packages/urllib3/connection.py"))

    def raise_in_function(filename: str, name: str) -> BaseException:
        src = (
            f"def {name}():\n    raise ConnectionRefusedError(111, 'Connection refused')\n{name}()"
        )
        try:
            exec(compile(src, filename, "exec"))
        except ConnectionRefusedError as e:
            return e
        raise AssertionError("did not raise")

    # a collect() reading its rows from the socket the JVM serves: pyspark's, not Py4J's
    util = "/venv/lib/python3.11/site-packages/pyspark/util.py"
    assert _raised_in_py4j(raise_in_function(util, "local_connect_and_auth"))
    connect = "/venv/lib/python3.11/site-packages/pyspark/sql/connect/client/core.py"
    assert not _raised_in_py4j(raise_in_function(connect, "_execute"))  # a Connect server
