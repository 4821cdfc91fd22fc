"""Scores are matched back to their rows by id: `sparkloom score` and the score stage refuse
an id column that names a row twice (or not at all) before anything is scored, and the
stage commits `scores` with `scores_quarantine`, both or neither."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch

from sparkloom.pipelines import tracking
from sparkloom.pipelines.catalog import ArrowFS, Catalog
from sparkloom.pipelines.errors import DataError
from sparkloom.pipelines.scoring import ModelRef, run_score, write_scores
from tests.conftest import make_config

VOCAB = ["<pad>", "<unk>", "goal", "match", "vote", "party"]
LABELS = ["politics", "sport"]


def tiny_lstm(tmp_path, **sections):
    """An untrained 2-class LSTM exported as the lstm stage does, and its pipeline config."""
    from sparkloom.models.registry import build_model
    from sparkloom.models.train import export

    torch.manual_seed(0)
    cfg = make_config(
        tmp_path,
        ingest={"format": "csv", "path": str(tmp_path / "unused.csv")},
        features={"sequence": {"min_df": 1, "max_length": 8}},
        **sections,
    )
    model = build_model("lstm", {"vocab_size": len(VOCAB), "num_classes": 2, "embed_dim": 4,
                                 "hidden_dim": 4, "num_layers": 1})  # fmt: skip
    export(model, str(tmp_path))
    files = tmp_path / "export"
    (files / "vocab.txt").write_text("".join(w + "\n" for w in VOCAB))
    (files / "labels.json").write_text(json.dumps(LABELS))
    return files, cfg


def test_score_refuses_an_id_column_with_repeats_and_nulls(spark, tmp_path):
    files, cfg = tiny_lstm(tmp_path)
    ref = ModelRef("", "lstm", str(files), LABELS, cfg.model_dump(mode="json"))
    rows = [("a", "goal match"), ("b", "vote"), ("a", "party vote"), ("c", "goal"),
            ("a", "match"), ("d", "vote party"), ("d", "goal"), (None, "vote")]  # fmt: skip
    df = spark.createDataFrame(rows, "doc string, text string")
    out = tmp_path / "scores"
    with pytest.raises(DataError) as e:
        write_scores(df, ref, str(out), id_col="doc")
    assert str(e.value) == (
        "--id-column 'doc' does not name each row once: 2 ids appear more than once (5 rows), "
        "e.g. 'a' on 3 rows; 1 row has no id; scores could not be matched back to their rows, "
        "so nothing was scored. Fix: give --id-column a column with one value per row, or "
        "--id-column none to number the rows"
    )
    assert e.value.exit_code == 3
    assert not out.exists() and not (tmp_path / "scores_quarantine").exists()


def test_score_without_an_id_column_numbers_the_rows_in_input_order(spark, tmp_path):
    files, cfg = tiny_lstm(tmp_path)
    ref = ModelRef("", "lstm", str(files), LABELS, cfg.model_dump(mode="json"))
    texts = ["goal match", "vote", "  ", "party vote", "goal", "match", None, "vote party"]
    df = spark.createDataFrame([(t,) for t in texts], "text string").repartition(2)
    order = [r["text"] for r in df.collect()]  # the order the scorer sees them in
    out = tmp_path / "scores"
    r = write_scores(df, ref, str(out), id_col=None)
    assert (r.rows_in, r.rows_out, r.quarantined) == (8, 6, 2)
    quarantined = spark.read.parquet(f"{out}_quarantine").collect()
    assert sorted(int(q["id"]) for q in quarantined) == sorted(
        i for i, t in enumerate(order) if t is None or not t.strip()
    )
    scored = sorted(int(s["id"]) for s in spark.read.parquet(str(out)).collect())
    assert scored == [i for i, t in enumerate(order) if t and t.strip()]


def score_stage(spark, tmp_path):
    """The score stage's inputs: the tiny LSTM as a logged run of an lstm stage under a
    pipeline run, and a config whose score.model names it."""
    files, cfg = tiny_lstm(tmp_path)
    tracking.ensure_experiment(cfg.mlflow.tracking_uri, "ids")
    with mlflow.start_run():
        mlflow.log_text(cfg.to_yaml(), "config/resolved.yaml")
        with mlflow.start_run(nested=True) as child:
            mlflow.set_tag("sparkloom.stage", "lstm")
            mlflow.log_artifacts(str(files), "model-files")
    _, cfg = tiny_lstm(tmp_path, score={"model": f"runs:/{child.info.run_id}/model"})
    return cfg, Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)


def ingested(spark, catalog, rows, fp):
    df = spark.createDataFrame([(i, t, "sport", "test") for i, t in rows],
                               "id string, text string, label string, split string")  # fmt: skip
    catalog.write_parquet("ingested", df, {"fingerprint": fp}, partition_by=["split"])


def test_the_score_stage_refuses_repeated_ids_and_commits_nothing(spark, tmp_path):
    cfg, catalog = score_stage(spark, tmp_path)
    ingested(spark, catalog, [("1", "goal"), ("2", "vote"), ("2", "match"), ("3", "  ")], "v1")
    with pytest.raises(DataError) as e:
        run_score(spark, cfg, catalog)
    assert str(e.value) == (
        "dataset 'ingested', column 'id', does not name each row once: 1 id appears more "
        "than once (2 rows), e.g. '2' on 2 rows; scores could not be matched back to their "
        "rows, so nothing was scored. Fix: run the ingest stage again with --force: it "
        "quarantines repeated ids (duplicate_id)"
    )
    assert catalog.manifest("scores") is None and catalog.manifest("scores_quarantine") is None


def test_the_score_stage_commits_scores_and_quarantine_together(spark, tmp_path, monkeypatch):
    cfg, catalog = score_stage(spark, tmp_path)
    ingested(spark, catalog, [("1", "goal"), ("2", "vote"), ("3", "  ")], "v1")
    first = run_score(spark, cfg, catalog)
    assert (first.rows_in, first.rows_out, first.quarantined) == (3, 2, 1)

    # a second run whose `scores` fails as it is written: its quarantine (now 2 rows) must
    # not be committed beside the first run's scores
    ingested(spark, catalog, [("1", "goal"), ("2", " "), ("3", "  "), ("4", "vote")], "v2")
    real = ArrowFS.write_text

    def disk_full(self, path, text):
        if "/scores.__tmp-" in path and path.endswith("/_manifest.json"):
            raise OSError("disk full")
        return real(self, path, text)

    with monkeypatch.context() as m:
        m.setattr(ArrowFS, "write_text", disk_full)
        with pytest.raises(OSError, match="disk full"):
            run_score(spark, cfg, catalog)
    fresh = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    assert fresh.manifest("scores")["result"]["rows_in"] == 3
    assert sorted(r["id"] for r in fresh.read("scores_quarantine", "score").collect()) == ["3"]
    assert sorted(r["id"] for r in fresh.read("scores", "score").collect()) == ["1", "2"]
    second = run_score(spark, cfg, fresh)
    assert (second.rows_in, second.rows_out, second.quarantined) == (4, 2, 2)
    assert sorted(r["id"] for r in fresh.read("scores_quarantine", "score").collect()) == [
        "2",
        "3",
    ]
