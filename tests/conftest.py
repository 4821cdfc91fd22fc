"""Shared fixtures: one real local SparkSession per test session, tiny datasets the tests make."""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
from pathlib import Path

import pytest

import __main__
from sparkloom.pipelines.config import Config, _validate

# pytest-xdist's workers run under execnet, whose __main__ has neither __spec__ nor
# __file__: pyspark.sql.connect (imported by mlflow.spark) takes that for a doctest run
# and calls sys.exit(0) when grpc is not installed. Give it the file a real run has.
if getattr(__main__, "__spec__", None) is None and not hasattr(__main__, "__file__"):
    __main__.__file__ = "<pytest-xdist worker>"

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

# Three topics with disjoint vocabularies: a linear model must separate them perfectly.
TOPICS = {
    "sport": [
        "match",
        "goal",
        "team",
        "coach",
        "league",
        "striker",
        "keeper",
        "season",
        "cup",
        "referee",
        "stadium",
        "fans",
    ],
    "tech": [
        "software",
        "chip",
        "laptop",
        "network",
        "server",
        "code",
        "cloud",
        "robot",
        "phone",
        "browser",
        "data",
        "app",
    ],
    "food": [
        "recipe",
        "bread",
        "cheese",
        "tomato",
        "soup",
        "oven",
        "flavour",
        "chef",
        "garlic",
        "pasta",
        "spice",
        "dinner",
    ],
}
FILLER = ["the", "and", "of", "to", "in", "it", "is", "was", "for", "with", "on", "as"]


def make_docs(n_per_class: int = 30, seed: int = 0) -> list[dict]:
    """Deterministic short documents: topic words plus stopwords, ids doc-<label>-<k>."""
    rng = random.Random(seed)
    docs = []
    for label, words in TOPICS.items():
        for k in range(n_per_class):
            body = [rng.choice(words) for _ in range(8)] + [rng.choice(FILLER) for _ in range(4)]
            rng.shuffle(body)
            docs.append({"id": f"doc-{label}-{k:03d}", "text": " ".join(body), "label": label})
    return docs


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("sparkloom-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.default.parallelism", "2")
        .config("spark.driver.memory", "2g")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(autouse=True)
def _fresh_registry_uri():
    """A pipeline sets MLflow's process-wide registry URI to its store; each test starts
    without one, so a client it builds on its own store is not sent to the last test's."""
    import mlflow

    mlflow.set_registry_uri(None)
    yield


@pytest.fixture
def text_dirs(tmp_path: Path) -> Path:
    """The tiny corpus as one folder per label, one file per document."""
    root = tmp_path / "corpus"
    for d in make_docs():
        folder = root / d["label"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{d['id']}.txt").write_text(d["text"] + "\n")
    return root


def write_csv(path: Path, docs: list[dict], sep: str = ",") -> Path:
    lines = [sep.join(["id", "text", "label"])]
    lines += [sep.join([d["id"], d["text"], d["label"]]) for d in docs]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def make_config(tmp_path: Path, **sections) -> Config:
    """A config for tests: tiny data root and a sqlite MLflow store under tmp_path."""
    data = {
        "pipeline": {"name": "t", "data_root": str(tmp_path / "data")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"},
        "features": {"idf": {"min_doc_freq": 0}},
        "baseline": {"tuning": "none", "grid": {"reg_param": [0.01], "max_iter": [50]}},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return _validate(data)


@pytest.fixture(scope="session")
def connect_url(tmp_path_factory):
    """A real Spark Connect server (pyspark's own jars, local[2]) in its own JVM, once per test
    session: `sc://localhost:PORT`. The tests' clients run in other processes, as thin clients
    with no JVM of their own."""
    import socket
    import subprocess
    import time

    from sparkloom.pipelines.spark import connect_server_command

    pytest.importorskip("grpc", reason="Spark Connect needs pyspark[connect] (grpcio)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("connect") / "server.log"
    conf = {"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": 2,
            "spark.default.parallelism": 2, "spark.driver.memory": "2g",
            "spark.sql.session.timeZone": "UTC"}  # fmt: skip
    cmd, env = connect_server_command("local[2]", port, conf)
    with open(log, "wb") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Spark Connect server did not start:\n{log.read_text()[-3000:]}"
                )
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        yield f"sc://localhost:{port}"
    finally:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
