"""Incremental ingest: only new files read, changed files replaced, deletions reported, ids and
splits of earlier rows kept, a new label appended to the index."""

import math
import os
import time
from pathlib import Path

import pytest

from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.errors import ConfigError
from sparkloom.pipelines.ingest import run_ingest
from tests.conftest import make_config, make_docs, write_csv

DOCS = make_docs()  # 90 documents, 3 labels, 30 each


def write_docs(root: Path, docs: list[dict]) -> None:
    for d in docs:
        folder = root / d["label"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{d['id']}.txt").write_text(d["text"] + "\n")


def setup(spark, tmp_path, **ingest):
    root = tmp_path / "corpus"
    cfg = make_config(tmp_path, ingest={"format": "text_dirs", "path": str(root),
                                        "incremental": True, **ingest})  # fmt: skip
    return root, cfg, Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)


def rows(spark, catalog, name="ingested"):
    return {r["id"]: r.asDict() for r in spark.read.parquet(catalog.path(name)).collect()}


def test_batches_read_only_new_files_and_keep_ids_and_splits(spark, tmp_path):
    root, cfg, catalog = setup(spark, tmp_path)
    write_docs(root, DOCS[:20] + DOCS[30:50] + DOCS[60:80])  # 60 of 90
    first = run_ingest(spark, cfg, catalog)
    assert (first.batch, first.files["files_new"], first.rows_in, first.rows_out) == (1, 60, 60, 60)
    before = rows(spark, catalog)
    assert {r["batch"] for r in before.values()} == {1}

    write_docs(root, DOCS[20:25] + DOCS[50:55] + DOCS[80:85])
    second = run_ingest(spark, cfg, catalog)
    assert second.batch == 2
    assert second.files == {"files_new": 15, "files_changed": 0, "files_touched": 0,
                            "files_deleted": 0, "files_missing": 0, "files_unchanged": 60}  # fmt: skip
    assert (second.rows_in, second.rows_out, second.rows_quarantined) == (15, 15, 0)
    assert second.rows_total == 75
    after = rows(spark, catalog)
    assert len(after) == 75
    for id_, r in before.items():  # an earlier row keeps its id, split, label index, batch
        kept = after[id_]
        assert (kept["split"], kept["label_index"], kept["batch"], kept["text"]) == (
            r["split"], r["label_index"], 1, r["text"])  # fmt: skip
    assert sum(r["batch"] == 2 for r in after.values()) == 15
    m = catalog.manifest("ingested")
    assert [b["rows_out"] for b in m["incremental"]["batches"]] == [60, 15]
    assert len(m["incremental"]["files"]) == 75

    # nothing new: skipped
    assert run_ingest(spark, cfg, catalog).skipped
    # a touched file with the same content: its record moves on, no rows read, no new batch
    some = next(root.glob("sport/*.txt"))
    os.utime(some, (time.time() + 5, time.time() + 5))
    touched = run_ingest(spark, cfg, catalog)
    assert (touched.rows_in, touched.files["files_touched"], touched.batch) == (0, 1, 2)
    assert catalog.manifest("ingested")["data_fingerprint"] == m["data_fingerprint"]


def test_changed_file_replaces_its_row_and_deleted_file_is_reported(spark, tmp_path):
    root, cfg, catalog = setup(spark, tmp_path)
    write_docs(root, DOCS)
    run_ingest(spark, cfg, catalog)
    target = root / "food" / f"{DOCS[60]['id']}.txt"
    assert DOCS[60]["label"] == "food"
    target.write_text("chef garlic pasta soup oven bread, an edited recipe\n")
    os.utime(target, (time.time() + 10, time.time() + 10))
    gone = root / "tech" / f"{DOCS[31]['id']}.txt"
    assert DOCS[31]["label"] == "tech"
    gone.unlink()
    second = run_ingest(spark, cfg, catalog)
    assert (second.files["files_changed"], second.files["files_deleted"]) == (1, 1)
    assert (second.rows_in, second.rows_out, second.rows_replaced) == (1, 1, 1)
    after = rows(spark, catalog)
    assert len(after) == 90  # replaced, not duplicated; the deleted file's row kept
    edited = [r for r in after.values() if "edited recipe" in r["text"]]
    assert len(edited) == 1 and edited[0]["batch"] == 2
    assert f"tech/{DOCS[31]['id']}.txt" in after
    files = catalog.manifest("ingested")["incremental"]["files"]
    edited_rec = next(r for p, r in files.items() if p.endswith(f"food/{DOCS[60]['id']}.txt"))
    gone_rec = next(r for p, r in files.items() if p.endswith(f"tech/{DOCS[31]['id']}.txt"))
    assert edited_rec["batch"] == 2 and gone_rec["deleted"] and gone_rec["batch"] == 1

    # on_deleted=drop in a later run: the row goes; the section changes, so batch 1 again
    cfg_drop = make_config(tmp_path, ingest={"format": "text_dirs", "path": str(root),
                                             "incremental": True, "on_deleted": "drop"})  # fmt: skip
    first = run_ingest(spark, cfg_drop, catalog)
    assert first.batch == 1 and first.rows_out == 89


def test_dropping_a_deleted_file_rewrites_only_its_batch(spark, tmp_path):
    root, cfg, catalog = setup(spark, tmp_path, on_deleted="drop")
    write_docs(root, DOCS[:45])
    run_ingest(spark, cfg, catalog)
    write_docs(root, DOCS[45:])
    run_ingest(spark, cfg, catalog)
    (root / DOCS[0]["label"] / f"{DOCS[0]['id']}.txt").unlink()
    third = run_ingest(spark, cfg, catalog)
    assert (third.files["files_deleted"], third.rows_replaced, third.rows_in) == (1, 1, 0)
    after = rows(spark, catalog)
    assert len(after) == 89 and third.rows_total == 89
    assert sorted({r["batch"] for r in after.values()}) == [1, 2]


def test_new_label_is_appended_to_the_index(spark, tmp_path):
    root, cfg, catalog = setup(spark, tmp_path)
    write_docs(root, [d for d in DOCS if d["label"] != "food"])  # sport, tech
    first = run_ingest(spark, cfg, catalog)
    assert first.labels == ["sport", "tech"]
    write_docs(root, [d for d in DOCS if d["label"] == "food"])
    second = run_ingest(spark, cfg, catalog)
    # alphabetical would put food first and move every earlier index
    assert second.labels == ["sport", "tech", "food"] and second.new_labels == ["food"]
    idx = {r["label"]: r["label_index"] for r in rows(spark, catalog).values()}
    assert idx == {"sport": 0.0, "tech": 1.0, "food": 2.0}


def test_csv_without_ids_numbers_repeats_across_batches(spark, tmp_path):
    folder = tmp_path / "csvs"
    folder.mkdir()
    docs = [{k: v for k, v in d.items()} for d in DOCS[:30] + DOCS[30:60]]
    write_csv(folder / "a.csv", docs)
    cfg = make_config(tmp_path, ingest={"format": "csv", "path": str(folder),
                                        "incremental": True, "columns": {"id": None}})  # fmt: skip
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    run_ingest(spark, cfg, catalog)
    before = rows(spark, catalog)
    write_csv(folder / "b.csv", DOCS[:2] + DOCS[60:70])  # two exact repeats of a.csv's rows
    second = run_ingest(spark, cfg, catalog)
    assert (second.rows_in, second.rows_out) == (12, 12)
    after = rows(spark, catalog)
    assert len(after) == 72  # no id given twice
    repeats = [r for r in after.values() if r["batch"] == 2 and r["id"].endswith("-2")]
    assert len(repeats) == 2
    for r in repeats:  # a copy lands in its original's split
        assert r["split"] == before[r["id"][:-2]]["split"]


def test_incremental_needs_files(spark, tmp_path):
    with pytest.raises(ConfigError, match="ingest.incremental reads new files"):
        make_config(tmp_path, ingest={"format": "table", "table": "t", "incremental": True})
    with pytest.raises(ConfigError, match="bert trains its own tokenizer, so set it to none"):
        make_config(tmp_path, bert={"training": {"warm_start": "champion"}})


def features_config(tmp_path, root, **features):
    return make_config(tmp_path, ingest={"format": "text_dirs", "path": str(root),
                                         "incremental": True},
                       features={"idf": {"min_doc_freq": 0}, **features})  # fmt: skip


def test_features_transform_only_the_new_batch_with_the_kept_model(spark, tmp_path):
    from sparkloom.pipelines.text import run_features

    root = tmp_path / "corpus"
    cfg = features_config(tmp_path, root, refit="never",
                          sequence={"vocab_size": 50, "min_df": 1})  # fmt: skip
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    write_docs(root, DOCS[:60])
    run_ingest(spark, cfg, catalog)
    first = run_features(spark, cfg, catalog)
    assert (first.refit, first.rows) == (True, 60)
    before = {r["id"]: r for r in spark.read.parquet(catalog.path("features")).collect()}
    model_files = sorted(p.name for p in Path(catalog.path("feature_model")).rglob("part-*"))
    write_docs(root, DOCS[60:])  # the third topic: words the vocabulary has never seen
    run_ingest(spark, cfg, catalog)
    second = run_features(spark, cfg, catalog)
    assert (second.refit, second.rows_transformed, second.rows) == (False, 30, 90)
    assert second.oov_rate > 0.5 and "features.refit=never" in second.refit_reason
    after = {r["id"]: r for r in spark.read.parquet(catalog.path("features")).collect()}
    assert len(after) == 90
    for id_, r in before.items():  # earlier rows untouched: same vectors, same token ids
        assert (after[id_]["features"], after[id_]["token_ids"]) == (r["features"], r["token_ids"])
    new = [r for r in after.values() if r["batch"] == 2]
    assert all(set(r["token_ids"]) <= {0, 1} for r in new)  # unknown words: [UNK]
    assert model_files == sorted(
        p.name for p in Path(catalog.path("feature_model")).rglob("part-*")
    )
    assert run_features(spark, cfg, catalog).skipped


def test_features_refit_when_the_new_batch_drifts(spark, tmp_path):
    from sparkloom.pipelines.text import run_features

    root = tmp_path / "corpus"
    cfg = features_config(tmp_path, root, refit="when_drift", max_oov_increase=0.2)
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    write_docs(root, DOCS[:20] + DOCS[30:50])  # sport and tech
    run_ingest(spark, cfg, catalog)
    run_features(spark, cfg, catalog)
    write_docs(root, DOCS[20:25] + DOCS[50:55])  # more of the same topics: no drift
    run_ingest(spark, cfg, catalog)
    same = run_features(spark, cfg, catalog)
    assert same.refit is False and same.rows_transformed == 10 and same.oov_rate < 0.2
    write_docs(root, DOCS[60:])  # a new topic: drift
    run_ingest(spark, cfg, catalog)
    drift = run_features(spark, cfg, catalog)
    assert drift.refit is True and drift.refit_reason.startswith("drift")
    assert drift.rows_transformed == drift.rows == 80


LSTM = {
    "model": {"embed_dim": 16, "hidden_dim": 16, "num_layers": 1},
    "training": {"epochs": 3, "batch_size": 8, "optimizer": {"lr": 0.02},
                 "warm_start": "last", "replay_ratio": 0.5},
}  # fmt: skip


@pytest.mark.slow
def test_lstm_warm_starts_on_the_new_batch_with_replay_and_a_new_label(spark, tmp_path):
    from mlflow.tracking import MlflowClient

    from sparkloom.pipelines.runner import run_pipeline

    root = tmp_path / "corpus"
    cfg = make_config(
        tmp_path, pipeline={"stages": ["ingest", "features", "lstm"]},
        ingest={"format": "text_dirs", "path": str(root), "incremental": True},
        features={"idf": {"min_doc_freq": 0}, "sequence": {"min_df": 1}, "refit": "never"},
        lstm=LSTM,
    )  # fmt: skip
    write_docs(root, [d for d in DOCS if d["label"] != "food"])  # sport, tech: 60 rows
    first = run_pipeline(spark, cfg, list(cfg.pipeline.stages)).results["lstm"]
    assert first.warm_start["source"] is None  # nothing to start from
    write_docs(root, [d for d in DOCS if d["label"] == "food"])  # a new label: 30 rows
    outcome = run_pipeline(spark, cfg, list(cfg.pipeline.stages))
    second = outcome.results["lstm"]
    ws = second.warm_start
    ingested = Catalog(spark, cfg.pipeline.data_root, "t").manifest("ingested")
    new_train = ingested["incremental"]["batches"][1]["splits"]["train"]
    old_train = ingested["incremental"]["batches"][0]["splits"]["train"]
    assert (ws["source"], ws["new_batches"], ws["rows_new"]) == ("last", ["2"], new_train)
    assert ws["rows_earlier"] == old_train and 0 < ws["rows_replay"] < old_train
    assert second.labels == ["sport", "tech", "food"]
    assert second.init_report["labels_new"] == ["food"]
    assert second.metrics["test_accuracy"] >= 0.8  # the new class is learned, the old kept
    run = MlflowClient(cfg.mlflow.tracking_uri).get_run(outcome.stage_run_ids["lstm"])
    assert run.data.tags["sparkloom.warm_start"].startswith("last: from the last run's model")
    assert run.data.metrics["warm_rows_new"] == new_train


GOOD = {"grid": {"reg_param": [0.01], "max_iter": [50]}}
BAD = {"grid": {"reg_param": [1000.0], "max_iter": [1]}}  # near-zero weights: a poor model


def test_champion_is_judged_on_the_frozen_set_and_kept_when_the_candidate_is_worse(spark, tmp_path):
    from mlflow.tracking import MlflowClient

    from sparkloom.pipelines.runner import run_pipeline

    root = tmp_path / "corpus"

    def run(baseline):
        cfg = make_config(
            tmp_path, pipeline={"stages": ["ingest", "features", "baseline", "register"]},
            ingest={"format": "text_dirs", "path": str(root), "incremental": True},
            baseline=baseline, register={"name": "inc", "min_delta": 0.01},
        )  # fmt: skip
        return run_pipeline(spark, cfg, list(cfg.pipeline.stages)).results

    write_docs(root, DOCS[:20] + DOCS[30:50] + DOCS[60:80])
    first = run(GOOD)
    reg = first["register"]
    test_rows = first["ingest"].splits["test"]
    assert reg.promoted and reg.version == "1"
    assert reg.extra["eval_set"]["rows"] == test_rows and reg.extra["eval_set"]["batch"] == 1
    good = reg.candidates[0]["frozen"]

    write_docs(root, DOCS[20:30] + DOCS[50:60] + DOCS[80:90])
    second = run(BAD)  # the second batch, and a worse model
    reg = second["register"]
    assert second["ingest"].batch == 2 and second["baseline"].skipped is False
    assert reg.extra["eval_set"]["rows"] == test_rows  # the yardstick did not move
    bad = reg.candidates[0]["frozen"]
    assert bad < good and not reg.promoted and reg.version == "2"
    assert f"{bad:.4f} vs champion v1 {good:.4f}" in reg.reason and "kept" in reg.reason
    assert reg.champion_before["frozen"] == good
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("inc", "champion").version) == "1"

    write_docs(root, [{**DOCS[0], "id": "extra-0"}])  # a third batch; as good a model again
    reg = run(GOOD)["register"]
    assert not reg.promoted and "not better by more than min_delta 0.01" in reg.reason
    assert str(client.get_model_version_by_alias("inc", "champion").version) == "1"
    again = run(GOOD)  # nothing new: every stage is skipped, register too
    assert {k: r.skipped for k, r in again.items()} == dict.fromkeys(again, True)


def test_psi_matches_the_formula():
    from sparkloom.pipelines.drift import psi

    ref, new = {"a": 50, "b": 50}, {"a": 80, "b": 20}
    expected = (0.8 - 0.5) * math.log(0.8 / 0.5) + (0.2 - 0.5) * math.log(0.2 / 0.5)
    assert psi(ref, new) == pytest.approx(expected)
    assert psi(ref, {"a": 5, "b": 5}) == 0.0


def test_drift_report_flags_a_new_topic_and_the_champions_drop(spark, tmp_path):
    from mlflow.tracking import MlflowClient

    from sparkloom.pipelines.runner import run_pipeline

    root = tmp_path / "corpus"
    cfg = make_config(
        tmp_path,
        pipeline={"stages": ["ingest", "drift", "features", "baseline", "register"]},
        ingest={"format": "text_dirs", "path": str(root), "incremental": True},
        baseline=GOOD, register={"name": "drifty"},
    )  # fmt: skip
    write_docs(root, [d for d in DOCS if d["label"] != "food"])
    first = run_pipeline(spark, cfg, list(cfg.pipeline.stages)).results["drift"]
    assert first.rows_reference == 0 and "first" in first.summary()
    write_docs(root, [d for d in DOCS if d["label"] == "food"])  # a new topic, new words
    outcome = run_pipeline(spark, cfg, list(cfg.pipeline.stages))
    d = outcome.results["drift"]
    assert (d.batch, d.rows_new) == (2, 30)
    assert d.labels_new == {"food": 1.0} and d.label_psi > 1.0
    assert d.oov_rate_new > 0.5 > d.oov_rate_reference
    assert d.champion["version"] == "1" and d.champion["accuracy_new"] == 0.0
    assert d.champion["accuracy_frozen"] == 1.0
    text = "\n".join(d.warnings)
    for needle in ("label distribution shifted", "labels not in the earlier training rows",
                   "out-of-vocabulary rate rose", "the champion (v1) scores 0.0000"):  # fmt: skip
        assert needle in text
    client = MlflowClient(cfg.mlflow.tracking_uri)
    run_id = outcome.stage_run_ids["drift"]
    arts = {a.path for a in client.list_artifacts(run_id, "drift")}
    assert {"drift/drift.json", "drift/drift.png"} <= arts
    assert client.get_run(run_id).data.metrics["label_psi"] == pytest.approx(d.label_psi)


def test_force_starts_over_at_batch_1_with_every_file(spark, tmp_path):
    root, cfg, catalog = setup(spark, tmp_path)
    write_docs(root, DOCS[:45])
    run_ingest(spark, cfg, catalog)
    write_docs(root, DOCS[45:])
    assert run_ingest(spark, cfg, catalog).batch == 2
    again = run_ingest(spark, cfg, catalog, force=True)
    assert (again.batch, again.rows_in, again.files["files_new"]) == (1, 90, 90)
    assert {r["batch"] for r in rows(spark, catalog).values()} == {1}


def test_a_fixed_file_leaves_quarantine_and_joins_the_data(spark, tmp_path):
    root, cfg, catalog = setup(spark, tmp_path)
    write_docs(root, DOCS[:40])
    broken = root / "sport" / "broken.txt"
    broken.write_text("   \n")  # empty text: quarantined in batch 1
    first = run_ingest(spark, cfg, catalog)
    assert (first.rows_in, first.rows_quarantined) == (41, 1)
    broken.write_text("goal keeper striker match\n")
    os.utime(broken, (time.time() + 10, time.time() + 10))
    second = run_ingest(spark, cfg, catalog)
    assert (second.files["files_changed"], second.rows_in, second.rows_out) == (1, 1, 1)
    assert "sport/broken.txt" in rows(spark, catalog)
    assert spark.read.parquet(catalog.path("quarantine")).count() == 0  # schema kept, row gone
