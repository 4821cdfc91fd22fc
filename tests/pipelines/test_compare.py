"""Experiment comparison over a real sqlite MLflow store with runs laid out as the runner logs
them: a parent run per pipeline invocation, a nested child run per stage."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from sparkloom.jobs.cli import main
from sparkloom.pipelines import compare
from sparkloom.pipelines.compare import compare_experiment, log_report
from sparkloom.pipelines.errors import DataError

T0 = 1_700_000_000_000  # ms
HOUR = 3_600_000
DATA_A = hashlib.sha256(b"split a").hexdigest()
DATA_B = hashlib.sha256(b"split b").hexdigest()
LSTM = {"lstm.training.epochs": "3", "lstm.model.hidden_dim": "32"}
CURVE = {"epoch_train_loss": [1.0, 0.6, 0.4], "epoch_val_loss": [0.9, 0.7, 0.65],
         "epoch_val_accuracy": [0.6, 0.75, 0.8]}  # fmt: skip


def classifier(acc: float, loss: float | None = None, **extra) -> dict[str, float]:
    m = {"test_accuracy": acc, "test_f1": acc - 0.01, "test_macro_f1": acc - 0.02,
         "validation_accuracy": acc + 0.01, "validation_f1": acc, **extra}  # fmt: skip
    return m if loss is None else {**m, "test_loss": loss, "val_loss": loss - 0.05}


class Store:
    """Creates runs the way pipelines.tracking does, at chosen start times."""

    def __init__(self, client: MlflowClient, experiment_id: str):
        self.client, self.exp = client, experiment_id

    def pipeline(self, start: int, name: str = "demo", command: str = "run") -> str:
        tags = {"sparkloom.pipeline": name, "sparkloom.command": command}
        r = self.client.create_run(self.exp, start, tags, run_name=f"{name}:{command}")
        self.client.set_terminated(r.info.run_id, "FINISHED", start + HOUR // 2)
        return r.info.run_id

    def stage(self, parent: str, stage: str, start: int, data: str, metrics=None, params=None,
              curves=None, skipped=False, status="FINISHED") -> str:  # fmt: skip
        tags = {"mlflow.parentRunId": parent, "sparkloom.stage": stage,
                "sparkloom.skipped": str(skipped).lower(), "sparkloom.data": data,
                "sparkloom.output": f"/data/demo/{stage}_model"}  # fmt: skip
        rid = self.client.create_run(self.exp, start, tags, run_name=stage).info.run_id
        values = [Metric(k, v, start, 0) for k, v in (metrics or {}).items()]
        values += [Metric(k, v, start + e, e + 1) for k, vs in (curves or {}).items()
                   for e, v in enumerate(vs)]  # fmt: skip
        self.client.log_batch(rid, metrics=values,
                              params=[Param(k, v) for k, v in (params or {}).items()])  # fmt: skip
        self.client.set_terminated(rid, status, start + 60_000)
        return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three pipeline invocations; `ids` maps a name to each run created."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("demo", artifact_location=str(root / "artifacts"))
    client.create_experiment("other", artifact_location=str(root / "artifacts"))
    s, ids = Store(client, exp), {}

    p1 = ids["parent1"] = s.pipeline(T0)
    s.stage(p1, "ingest", T0 + 1, DATA_A, {"rows_in": 300.0})
    s.stage(p1, "features", T0 + 2, DATA_A, {"vocab_size": 500.0})
    ids["baseline"] = s.stage(p1, "baseline", T0 + 3, DATA_A, classifier(0.90),
                              {"baseline.reg_param": "0.01", "best.reg_param": "0.01"})  # fmt: skip
    lstm = {**LSTM, "lstm.training.optimizer.lr": "0.01"}
    metrics = classifier(0.85, 0.40, num_parameters=12345.0, train_seconds=12.5,
                         train_rows_per_s=250.0)  # fmt: skip
    ids["lstm_lr01"] = s.stage(p1, "lstm", T0 + 4, DATA_A, metrics, lstm, CURVE)
    ids["bert"] = s.stage(p1, "bert", T0 + 5, DATA_A,
                          classifier(0.93, 0.30, num_parameters=99999.0, train_seconds=40.0),
                          {"bert.training.epochs": "2"}, CURVE)  # fmt: skip
    ids["bert_pretrain"] = s.stage(p1, "bert_pretrain", T0 + 6, DATA_A,
                                   {"test_accuracy": 0.99, "test_loss": 7.1, "test_perplexity": 680.0,
                                    "test_mlm_accuracy": 0.11}, curves=CURVE)  # fmt: skip

    p2 = ids["parent2"] = s.pipeline(T0 + HOUR, command="lstm")
    lstm = {**LSTM, "lstm.training.optimizer.lr": "0.002"}
    metrics = classifier(0.88, 0.35, num_parameters=12345.0, train_seconds=11.0)
    ids["lstm_lr002"] = s.stage(p2, "lstm", T0 + HOUR + 1, DATA_A, metrics, lstm, CURVE)
    ids["skipped"] = s.stage(p2, "baseline", T0 + HOUR + 2, DATA_A, classifier(0.90),
                             {"baseline.reg_param": "0.01"}, skipped=True)  # fmt: skip
    ids["failed"] = s.stage(p2, "textcnn", T0 + HOUR + 3, DATA_A, classifier(0.99),
                            status="FAILED")  # fmt: skip
    ids["gpt2"] = s.stage(p2, "gpt2", T0 + HOUR + 4, DATA_A,
                          {"test_loss": 3.2, "test_perplexity": 24.5, "test_token_accuracy": 0.31,
                           "val_loss": 3.3, "num_parameters": 5e6}, {"gpt2.block_size": "64"},
                          CURVE)  # fmt: skip

    p3 = ids["parent3"] = s.pipeline(T0 + 2 * HOUR)  # another dataset: newest, its own table
    ids["textcnn_b"] = s.stage(p3, "textcnn", T0 + 2 * HOUR + 1, DATA_B, classifier(0.70, 0.8))
    return {"uri": uri, "ids": ids, "client": client, "root": root}


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    return compare_experiment("demo", str(tmp_path_factory.mktemp("out")), store["uri"])


def test_every_comparable_run_once_in_accuracy_order(report, store):
    ids = store["ids"]
    group_a = [ids[k] for k in ("bert", "baseline", "lstm_lr002", "lstm_lr01")]
    assert [r.run_id for r in report.rows] == [ids["textcnn_b"], *group_a]
    assert [r.run_id for r in report.groups[1].rows] == group_a  # best test accuracy first
    assert [r.run_id for r in report.language_models] == [ids["bert_pretrain"], ids["gpt2"]]
    lstm = next(r for r in report.rows if r.run_id == ids["lstm_lr01"])
    assert (lstm.stage, lstm.parent_run_id, lstm.data) == ("lstm", ids["parent1"], DATA_A)
    assert lstm.metrics == {
        "accuracy": 0.85, "f1": 0.84, "macro_f1": 0.83, "loss": 0.40, "val_accuracy": 0.86,
        "perplexity": None, "token_accuracy": None, "num_parameters": 12345.0,
        "train_seconds": 12.5, "train_rows_per_s": 250.0,
    }  # fmt: skip
    assert lstm.curves["epoch_val_loss"] == [(1, 0.9), (2, 0.7), (3, 0.65)]
    gpt2 = report.language_models[1]
    assert (gpt2.metrics["perplexity"], gpt2.metrics["token_accuracy"]) == (24.5, 0.31)


def test_best_values_marked_per_group(report, store):
    ids = store["ids"]
    best = {r.run_id: r.best for r in report.groups[1].rows}
    assert best[ids["bert"]] == ["accuracy", "f1", "macro_f1", "loss", "val_accuracy"]
    assert best[ids["lstm_lr01"]] == []
    assert report.groups[0].rows[0].best == []  # alone in its table: nothing to beat
    assert "**0.9300**" in Path(report.paths["markdown"]).read_text()


def test_only_differing_params_are_shown(report, store):
    group = report.groups[1]
    assert group.differing == {"lstm": ["lstm.training.optimizer.lr"]}
    lstm = {r.run_id: r.differing_params for r in group.rows if r.stage == "lstm"}
    assert lstm == {store["ids"]["lstm_lr01"]: {"lstm.training.optimizer.lr": "0.01"},
                    store["ids"]["lstm_lr002"]: {"lstm.training.optimizer.lr": "0.002"}}  # fmt: skip
    md = Path(report.paths["markdown"]).read_text()
    assert "lstm.training.optimizer.lr" in md and "0.002" in md
    assert "lstm.training.epochs" not in md and "lstm.model.hidden_dim" not in md


def test_other_split_is_its_own_group_newest_first(report, store):
    assert [g.data for g in report.groups] == [DATA_B, DATA_A]
    assert [r.run_id for r in report.groups[0].rows] == [store["ids"]["textcnn_b"]]
    assert report.groups[0].language_models == []
    assert any("2 different data splits" in n for n in report.notes)
    text = report.terminal_table()
    assert text.index(f"data {DATA_B[:12]}") < text.index(f"data {DATA_A[:12]}")


def test_skipped_and_failed_runs_are_left_out_unless_asked(report, store, tmp_path):
    ids, shown = store["ids"], {r.run_id for r in [*report.rows, *report.language_models]}
    assert ids["skipped"] not in shown and ids["failed"] not in shown
    assert any("1 skipped" in n and "1 FAILED" in n for n in report.notes)
    with_skipped = compare_experiment("demo", str(tmp_path), store["uri"], include_skipped=True)
    rows = [r.run_id for r in with_skipped.rows]
    assert sorted(rows) == sorted([*(r.run_id for r in report.rows), ids["skipped"]])
    assert ids["failed"] not in rows
    assert "baseline (skipped)" in with_skipped.terminal_table()


def test_files_are_written_and_charts_are_pngs(report, store):
    assert set(report.paths) == {"markdown", "html", "json", "metric_bars", "learning_curves"}
    for name in ("metric_bars", "learning_curves"):
        path = report.paths[name]
        assert os.path.basename(path) == f"{name}.png"
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width > 200 and img.height > 200
    page = Path(report.paths["html"]).read_text()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    for r in [*report.rows, *report.language_models]:
        assert r.run_id in page
    data = json.loads(Path(report.paths["json"]).read_text())
    assert [r["run_id"] for r in data["rows"]] == [r.run_id for r in report.rows]
    assert data["groups"][1]["differing_params"] == {"lstm": ["lstm.training.optimizer.lr"]}


def test_pages_through_search_results(report, store, tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "_PAGE_SIZE", 2)
    paged = compare_experiment("demo", str(tmp_path), store["uri"])
    assert [r.run_id for r in paged.rows] == [r.run_id for r in report.rows]


def test_unknown_experiment_names_the_existing_ones(store, tmp_path):
    with pytest.raises(DataError, match=r"experiment 'dmeo' not found .*demo, other"):
        compare_experiment("dmeo", str(tmp_path), store["uri"])
    with pytest.raises(DataError, match="no MLflow store at"):
        compare_experiment("demo", str(tmp_path), f"sqlite:///{tmp_path}/missing.db")
    assert not (tmp_path / "missing.db").exists()


def test_no_model_runs_says_which_stages_to_run(store, tmp_path):
    s = Store(store["client"], store["client"].get_experiment_by_name("other").experiment_id)
    parent = s.pipeline(T0)
    s.stage(parent, "ingest", T0 + 1, DATA_A)
    with pytest.raises(DataError, match=r"stage runs found: ingest x1.*baseline, lstm"):
        compare_experiment("other", str(tmp_path), store["uri"])


def test_log_report_needs_an_active_run(report):
    with pytest.raises(RuntimeError, match="active MLflow run"):
        log_report(report)


def test_cli_prints_the_table_and_logs_the_report(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri())  # --log sets it
    previous = mlflow.get_tracking_uri()
    out = tmp_path / "cmp"
    try:
        code = main(["compare", "--experiment", "demo", "--tracking-uri", store["uri"],
                     "--out", str(out), "--log"])  # fmt: skip
    finally:
        mlflow.set_tracking_uri(previous)
    printed = capsys.readouterr().out
    assert code == 0
    assert "test accuracy" in printed and store["ids"]["bert"][:8] in printed
    assert f"metric_bars: {out / 'metric_bars.png'}" in printed
    client = store["client"]
    logged = client.search_runs([client.get_experiment_by_name("demo").experiment_id],
                                "tags.`sparkloom.command` = 'compare'")  # fmt: skip
    assert [r.info.run_name for r in logged] == ["compare:demo"]
    files = {a.path for a in client.list_artifacts(logged[0].info.run_id, "comparison")}
    assert {"comparison/comparison.html", "comparison/metric_bars.png"} <= files


def test_cli_errors_are_one_line(store, tmp_path, capsys):
    code = main(
        ["compare", "--experiment", "nope", "--tracking-uri", store["uri"], "--out", str(tmp_path)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == DataError.exit_code
    assert len(err) == 1 and err[0].startswith("sparkloom compare: error: experiment 'nope'")
