"""The console script and spark-submit, as a user runs them (separate processes, real JVMs)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import make_docs, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def sparkloom(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "sparkloom"), *args], cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def tiny_conf(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "docs.jsonl", make_docs(10))
    conf = tmp_path / "tiny.yaml"
    conf.write_text(
        f"extends: {ROOT / 'conf' / 'defaults.yaml'}\n"
        "pipeline: {name: tiny}\n"
        "spark: {master: 'local[2]', conf: {spark.sql.shuffle.partitions: 2}}\n"
        f"ingest: {{format: json, path: {tmp_path / 'docs.jsonl'}, columns: {{id: id}}}}\n"
    )
    return conf


def test_bad_config_key_is_one_line_and_exit_2(tmp_path):
    conf = tiny_conf(tmp_path)
    p = sparkloom("ingest", "--conf", str(conf), "ingest.splt.seed=3", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "sparkloom: error: bad config: unknown key 'ingest.splt'; did you mean 'ingest.split'? "
        "(keys allowed under ingest: format, path, table, query, columns, csv, encoding, "
        "file_glob, image, split, labels, max_labels, incremental, on_deleted)"
    ]
    assert p.stdout == ""


def test_missing_input_is_one_line_before_spark_starts(tmp_path):
    conf = tiny_conf(tmp_path)
    p = sparkloom("run", "--conf", str(conf), f"ingest.path={tmp_path}/nope.jsonl", cwd=tmp_path)
    assert p.returncode == 3
    lines = p.stderr.strip().splitlines()
    assert lines == [
        f"sparkloom: error: input path {tmp_path}/nope.jsonl does not exist; "
        "set ingest.path to an existing file or folder"
    ]
    assert "Exception" not in p.stderr and "at org.apache" not in p.stderr


def test_preflight_prints_its_table_and_a_failed_check_stops_the_run_before_any_stage(tmp_path):
    conf = tiny_conf(tmp_path)
    ok = sparkloom("preflight", "--conf", str(conf), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    lines = ok.stdout.splitlines()
    assert lines[0] == "preflight for ['ingest', 'features', 'baseline']: all checks passed"
    assert any(ln.split()[:3] == ["data", "root", "ok"] for ln in lines), ok.stdout
    assert not (tmp_path / "data" / "tiny" / "ingested").exists()

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = sparkloom("run", "--conf", str(conf), f"mlflow.tracking_uri=http://127.0.0.1:{port}",
                  cwd=tmp_path)  # fmt: skip
    assert p.returncode == 6, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"sparkloom: error: preflight: the MLflow tracking server at http://127.0.0.1:{port} "
        "is unreachable"
    )
    assert "[ingest] started" not in p.stderr
    assert not (tmp_path / "data" / "tiny" / "ingested").exists()


def test_missing_upstream_dataset_names_the_stage(tmp_path):
    conf = tiny_conf(tmp_path)
    p = sparkloom("baseline", "--conf", str(conf), cwd=tmp_path)
    assert p.returncode == 3
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "sparkloom: error: stage 'baseline' failed: dataset 'features' not found"
    )
    assert "run the 'features' stage first" in last


def test_run_takes_the_pipeline_file_and_a_failed_stage_fails_the_parent_run(tmp_path):
    from mlflow.tracking import MlflowClient

    conf = tiny_conf(tmp_path)
    p = sparkloom("run", str(conf), "--from", "lstm", cwd=tmp_path)  # before any JVM
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "sparkloom: error: ['lstm'] not in pipeline.stages ['ingest', 'features', 'baseline']; "
        "pick from those"
    ]
    p = sparkloom("run", str(conf), "--only", "baseline", cwd=tmp_path)
    assert p.returncode == 3
    assert (
        p.stderr.strip()
        .splitlines()[-1]
        .startswith("sparkloom: error: stage 'baseline' failed: dataset 'features' not found")
    )
    assert "[baseline] failed after" in p.stderr and "[ingest] started" not in p.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id], order_by=["start_time ASC"]
    )
    assert {(r.data.tags.get("sparkloom.stage"), r.info.status) for r in runs} == {
        (None, "FAILED"),
        ("baseline", "FAILED"),
    }  # the parent and its stage


@pytest.mark.slow
def test_spark_submit_runs_a_stage_like_the_console_script(tmp_path):
    """The code reaches the driver and executors only through --py-files."""
    conf = tiny_conf(tmp_path)
    p = sparkloom("ingest", "--conf", str(conf), f"pipeline.data_root={tmp_path}/a", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "90 rows in" not in p.stdout and "30 rows in = 30 out" in p.stdout

    wheel_dir = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    wheel = next(wheel_dir.glob("sparkloom-*.whl"))
    bundle = wheel_dir / "sparkloom.zip"
    shutil.copy(wheel, bundle)
    assert "sparkloom/pipelines/ingest.py" in zipfile.ZipFile(bundle).namelist()

    # Python without site-packages' .pth files: the editable install is invisible,
    # the libraries are on PYTHONPATH, and our code comes from the zip alone.
    site = next(p for p in sys.path if p.endswith("site-packages"))
    python = tmp_path / "python-nosite"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python.chmod(0o755)
    env = {
        **os.environ,
        "PYSPARK_PYTHON": str(python),
        "PYSPARK_DRIVER_PYTHON": str(python),
        "PYTHONPATH": site,
    }

    def submit(*extra: str) -> subprocess.CompletedProcess:
        cmd = [str(BIN / "spark-submit"), "--master", "local[2]", *extra, str(ROOT / "jobs" / "submit.py"),
               "ingest", "--conf", str(conf), f"pipeline.data_root={tmp_path}/b"]  # fmt: skip
        return subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )

    without = submit()
    # spark-submit's PythonRunner merges the script's stderr into its stdout
    assert without.returncode != 0 and "No module named 'sparkloom'" in without.stdout
    p = submit("--py-files", str(bundle))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "30 rows in = 30 out" in p.stdout

    from pyspark.sql import SparkSession

    spark = SparkSession.getActiveSession() or SparkSession.builder.master("local[2]").getOrCreate()
    a = sorted(map(tuple, spark.read.parquet(f"{tmp_path}/a/tiny/ingested").collect()))
    b = sorted(map(tuple, spark.read.parquet(f"{tmp_path}/b/tiny/ingested").collect()))
    assert a == b and len(a) == 30


APP = """
import json, sys

import models  # the application's own package of that name
from pyspark.sql import SparkSession

from sparkloom.jobs.cli import main as sparkloom


def probe(_):
    import models
    import sparkloom.models.train

    return [(models.WHO, sparkloom.models.train.__file__)]


spark = SparkSession.builder.getOrCreate()
seen = spark.sparkContext.parallelize(range(2), 2).mapPartitions(probe).collect()
print("SEEN " + json.dumps({"driver": models.WHO, "executors": seen}))
sys.exit(sparkloom(["ingest", "--conf", sys.argv[1]]))
"""


@pytest.mark.slow
def test_an_app_with_its_own_models_package_keeps_it_and_sparkloom_works(tmp_path):
    """The wheel installs `sparkloom` alone (`import models` fails after installing it), and
    an application with its own `models/`, shipped with sparkloom's zip by --py-files, imports
    its own `models` on the driver and the executors while sparkloom runs a stage. (With
    top-level `models`, the first zip on the path won on each side.)"""
    wheel_dir = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
         str(wheel_dir), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    wheel = next(wheel_dir.glob("sparkloom-*.whl"))
    site = next(p for p in sys.path if p.endswith("site-packages"))  # the libraries, not us
    python = tmp_path / "python-nosite"  # no .pth files: the editable install is invisible
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python.chmod(0o755)

    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)  # fmt: skip
    top = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
    assert top - {"bin"} == {"sparkloom"}, top  # bin/: the console script
    env = {**os.environ, "PYTHONPATH": f"{target}:{site}"}
    ok = subprocess.run([str(python), "-c", "import sparkloom.models.train, sparkloom.pipelines.runner, "
                         "sparkloom.jobs.cli"], cwd=tmp_path, env=env, capture_output=True,
                        text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    for old in ("models", "pipelines", "jobs"):
        gone = subprocess.run([str(python), "-c", f"import {old}"], cwd=tmp_path, env=env,
                              capture_output=True, text=True)  # fmt: skip
        assert f"No module named '{old}'" in gone.stderr

    app = tmp_path / "app"
    (app / "models").mkdir(parents=True)
    (app / "models" / "__init__.py").write_text("WHO = 'app'\n")
    (app / "main.py").write_text(APP)
    shutil.make_archive(str(tmp_path / "app_models"), "zip", app, "models")
    bundle = wheel_dir / "sparkloom.zip"
    shutil.copy(wheel, bundle)
    conf = tiny_conf(tmp_path)
    cmd = [str(BIN / "spark-submit"), "--master", "local[2]", "--py-files",
           f"{bundle},{tmp_path / 'app_models.zip'}", str(app / "main.py"), str(conf)]  # fmt: skip
    env = {**os.environ, "PYSPARK_PYTHON": str(python), "PYSPARK_DRIVER_PYTHON": str(python),
           "PYTHONPATH": site}  # fmt: skip
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    import json

    seen = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("SEEN "))[5:])
    assert seen["driver"] == "app"
    assert [who for who, _ in seen["executors"]] == ["app", "app"]
    assert all("sparkloom.zip" in where for _, where in seen["executors"])
    assert "30 rows in = 30 out" in p.stdout


def test_a_file_spark_fails_to_read_is_one_line_naming_it_and_exit_3(tmp_path):
    """Issue 16.14: a Parquet file whose footer reads but whose data pages are corrupt failed
    with 78-110 JVM stack-frame lines and exit 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    docs = make_docs(10)
    pq.write_table(pa.Table.from_pylist(docs), folder / "good.parquet")
    pq.write_table(pa.Table.from_pylist(docs), folder / "bad.parquet", compression="snappy")
    data = bytearray((folder / "bad.parquet").read_bytes())
    data[4:400] = b"\xff" * 396  # the data pages; the footer at the end still reads
    (folder / "bad.parquet").write_bytes(bytes(data))
    conf = tiny_conf(tmp_path)
    p = sparkloom("ingest", "--conf", str(conf), "ingest.format=parquet", f"ingest.path={folder}",
                  cwd=tmp_path)  # fmt: skip
    assert p.returncode == 3, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if "sparkloom: error" in ln]
    assert len(errors) == 1 and "bad.parquet" in errors[0] and "fix or remove the file" in errors[0]
    assert not [
        ln for ln in p.stderr.splitlines() if ln.lstrip().startswith("at ")
    ]  # no JVM frames


@pytest.mark.slow
def test_a_second_process_training_the_lstm_reuses_its_converter_cache(tmp_path):
    """The cache key is what decides the rows (the canonical plan, the input files, the
    stage's settings), not a per-session hash: `--force` in a new process retrains from the
    same Parquet files and writes none."""
    conf = tiny_conf(tmp_path)
    write_jsonl(tmp_path / "docs.jsonl", make_docs(20))  # every split has a row per rank
    lstm = ("lstm.model.embed_dim=8", "lstm.model.hidden_dim=8", "lstm.training.epochs=1",
            "lstm.training.batch_size=8", "features.sequence.max_length=16")  # fmt: skip
    first = sparkloom("run", "--conf", str(conf), "pipeline.stages=[ingest,features,lstm]",
                      *lstm, cwd=tmp_path)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    cache = tmp_path / "data" / "tiny" / "converter_cache"
    entries = sorted(p.name for p in cache.iterdir())
    wrote = first.stderr.count("converter: wrote")
    assert wrote == len(entries) == 3  # train, validation, test
    assert "converter: reusing" not in first.stderr

    second = sparkloom("lstm", "--conf", str(conf), "--force", *lstm, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("converter: reusing the cache at") == 3
    assert "converter: wrote" not in second.stderr
    assert sorted(p.name for p in cache.iterdir()) == entries
