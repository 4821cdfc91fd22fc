"""The transfer-learning demo (conf/transfer.yaml) vs what one machine would do without Spark.

What is compared, on the same BBC News split and the same 2 cores
--------------------------------------------------------------------
1. sparkloom: `sparkloom run --conf conf/transfer.yaml` in a scratch data root and MLflow
   store (a fresh run, nothing reused), timed as a whole: the demo's wall time. Its
   figures come from the catalog's manifests: TF-IDF baseline, MLlib LR on the MiniLM
   embeddings (embed + embed_baseline), MiniLM fine-tuned through TorchDistributor with
   2 processes (bert).
2. plain transformers: the same checkpoint fine-tuned in one process, torch threads = the
   cores, the loop a user writes from the transformers docs: AutoTokenizer (truncation,
   padding per batch), AutoModelForSequenceClassification, AdamW (no decay on biases and
   norms), linear warmup + cosine, gradient clipping, the config's epochs, learning rate and
   global batch (per-process batch x processes); the best epoch on validation accuracy is
   kept, as sparkloom does.
3. scikit-learn: LogisticRegression on sparkloom's own embeddings dataset (the same vectors,
   C picked on validation), and TfidfVectorizer + LogisticRegression on the raw text.

    python benchmarks/transfer_vs_single_machine.py [--conf conf/transfer.yaml]

Writes benchmarks/results/transfer_vs_single_machine.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "transfer_vs_single_machine"
ROOT = Path(__file__).resolve().parent.parent


def run_sparkloom(conf: str, scratch: Path) -> dict:
    """The whole demo as a user runs it, in `scratch`; its wall time and peak RSS."""
    cmd = [sys.executable, "-m", "sparkloom.jobs.cli", "run", "--conf", conf,
           f"pipeline.data_root={scratch / 'data'}",
           f"mlflow.tracking_uri=sqlite:///{scratch / 'mlflow.db'}"]  # fmt: skip
    started = time.perf_counter()
    with open(scratch / "sparkloom.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child
    return {"wall_seconds": seconds, "peak_rss_mb_largest_process": rss}


def finetune_with_seed(conf: str, scratch: Path, seed: int) -> dict:
    """The bert stage alone with another training seed, in a catalog of its own."""
    name = f"seed{seed}"
    cmd = [sys.executable, "-m", "sparkloom.jobs.cli", "run", "--conf", conf,
           f"pipeline.data_root={scratch / 'data'}", f"pipeline.name={name}",
           "pipeline.stages=[ingest,bert]", f"bert.training.seed={seed}",
           f"mlflow.tracking_uri=sqlite:///{scratch / 'mlflow.db'}"]  # fmt: skip
    with open(scratch / f"{name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return sparkloom_models(scratch / "data" / name, only=("bert",))["bert"]


def manifest(catalog: Path, name: str) -> dict:
    return json.loads((catalog / name / "_manifest.json").read_text())


def split_rows(catalog: Path) -> dict[str, tuple[list[str], list[str], np.ndarray]]:
    """split -> (ids, texts, label indices) of the ingested dataset."""
    import pyarrow.dataset as ds

    table = ds.dataset(str(catalog / "ingested"), format="parquet", partitioning="hive").to_table(
        columns=["id", "text", "label_index", "split"]
    )
    out = {}
    for split in ("train", "validation", "test"):
        t = table.filter(ds.field("split") == split).sort_by("id")
        out[split] = (t["id"].to_pylist(), t["text"].to_pylist(),
                      np.asarray(t["label_index"].to_pylist(), dtype=np.int64))  # fmt: skip
    return out


def scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, average="macro"))}  # fmt: skip


def plain_finetune(checkpoint: str, rows: dict, bert: dict, threads: int) -> dict:
    """The transformers-docs fine-tuning loop, one process."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(threads)
    t = bert["training"]
    epochs, lr = t["epochs"], t["optimizer"]["lr"]
    batch = t["batch_size"] * bert["distributor"]["num_processes"]  # the same global batch
    max_length = bert["max_length"]
    torch.manual_seed(t["seed"])
    tok = AutoTokenizer.from_pretrained(checkpoint)
    labels = int(max(rows["train"][2].max(), rows["test"][2].max())) + 1
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=labels)

    def batches(split: str, shuffle: bool, seed: int = 0):
        _, texts, y = rows[split]
        order = (
            np.random.default_rng(seed).permutation(len(texts))
            if shuffle
            else np.arange(len(texts))
        )
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            enc = tok([texts[j] for j in idx], truncation=True, max_length=max_length,
                      padding=True, return_tensors="pt")  # fmt: skip
            yield enc, torch.from_numpy(y[idx])

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t["optimizer"]["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)  # fmt: skip
    steps = epochs * math.ceil(len(rows["train"][1]) / batch)
    warmup = int(t["schedule"]["warmup_ratio"] * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def predict(split: str) -> np.ndarray:
        model.eval()
        out = []
        with torch.no_grad():
            for enc, _ in batches(split, shuffle=False):
                out.append(model(**enc).logits.argmax(-1).numpy())
        model.train()
        return np.concatenate(out)

    started = time.perf_counter()
    best, best_state, history = -1.0, None, []
    for epoch in range(epochs):
        model.train()
        for enc, y in batches("train", shuffle=True, seed=t["seed"] + epoch):
            loss = model(**enc, labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
        val = scores(rows["validation"][2], predict("validation"))["accuracy"]
        history.append({"epoch": epoch + 1, "val_accuracy": val,
                        "seconds": time.perf_counter() - started})  # fmt: skip
        print(f"plain transformers: epoch {epoch + 1} val accuracy {val:.4f}", flush=True)
        if val > best:
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
    train_seconds = time.perf_counter() - started
    model.load_state_dict(best_state)
    test = scores(rows["test"][2], predict("test"))
    return {**{f"test_{k}": v for k, v in test.items()}, "val_accuracy": best,
            "train_seconds": train_seconds, "history": history,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def sklearn_on_embeddings(catalog: Path) -> dict:
    """LogisticRegression on sparkloom's embeddings, C picked on validation."""
    import pyarrow.dataset as ds
    from sklearn.linear_model import LogisticRegression

    t = (
        ds.dataset(str(catalog / "embeddings"), format="parquet", partitioning="hive")
        .to_table()
        .to_pandas()
    )

    def xy(split):
        part = t[t["split"] == split].sort_values("id")
        x = np.stack([np.asarray(v["values"] if isinstance(v, dict) else v.toArray())
                      for v in part["embedding"]])  # fmt: skip
        return x, part["label_index"].to_numpy().astype(int)

    (xt, yt), (xv, yv), (xs, ys) = xy("train"), xy("validation"), xy("test")
    started = time.perf_counter()
    fits = [
        (c, LogisticRegression(C=c, max_iter=2000).fit(xt, yt)) for c in (0.1, 1, 10, 100, 1000)
    ]
    c, best = max(fits, key=lambda f: (scores(yv, f[1].predict(xv))["accuracy"], -f[0]))
    return {**{f"test_{k}": v for k, v in scores(ys, best.predict(xs)).items()}, "C": c,
            "fit_seconds": time.perf_counter() - started}  # fmt: skip


def sklearn_tfidf(rows: dict) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    started = time.perf_counter()
    vec = TfidfVectorizer(sublinear_tf=True, min_df=2, stop_words="english")
    xt = vec.fit_transform(rows["train"][1])
    xv, xs = vec.transform(rows["validation"][1]), vec.transform(rows["test"][1])
    fits = [(c, LogisticRegression(C=c, max_iter=2000).fit(xt, rows["train"][2]))
            for c in (0.1, 1, 10, 100, 1000)]  # fmt: skip
    c, best = max(
        fits, key=lambda f: (scores(rows["validation"][2], f[1].predict(xv))["accuracy"], -f[0])
    )
    return {**{f"test_{k}": v for k, v in scores(rows["test"][2], best.predict(xs)).items()},
            "C": c, "fit_seconds": time.perf_counter() - started}  # fmt: skip


def sparkloom_models(catalog: Path, only: tuple[str, ...] | None = None) -> dict:
    out = {}
    for stage in ("baseline", "embed_baseline") if only is None else ():
        r = manifest(catalog, f"{stage}_model")["result"]
        out[stage] = {"test_accuracy": r["metrics"]["test"]["accuracy"],
                      "test_macro_f1": r["metrics"]["test"]["macro_f1"]}  # fmt: skip
    r = manifest(catalog, "bert_model")["result"]
    cm = np.array(r["confusion"]["test"])
    pred = np.repeat(np.tile(np.arange(len(cm)), len(cm)), cm.flatten())
    true = np.repeat(np.repeat(np.arange(len(cm)), len(cm)), cm.flatten())
    out["bert"] = {**{f"test_{k}": v for k, v in scores(true, pred).items()},
                   "val_accuracy": r["metrics"].get("val_accuracy"),
                   "train_seconds": r["train_seconds"], "stage_seconds": r["wall_seconds"],
                   "epochs": len(r["history"]), "num_parameters": r["num_parameters"]}  # fmt: skip
    if only is not None:
        return out
    e = manifest(catalog, "embeddings")["result"]
    out["embed"] = {k: e[k] for k in ("rows_out", "dimension", "seconds", "docs_per_s",
                                      "model_loads", "python_workers")}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conf", default="conf/transfer.yaml")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--scratch", default=None, help="keep the scratch run here")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="take the demo's outputs and time from a previous run in --scratch",
    )
    p.add_argument("--seeds", default="",
                   help="more training seeds for both fine-tuning loops, e.g. 1,2: one seed "
                   "per side cannot tell a better loop from another data order")  # fmt: skip
    args = p.parse_args(argv)
    from sparkloom.pipelines.config import load_config

    cfg = load_config(args.conf).model_dump(mode="json")
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="sparkloom-transfer-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    timing = scratch / "demo.json"
    if args.reuse and timing.exists():  # the demo ran in this folder before: its figures
        demo = json.loads(timing.read_text())
    else:
        print(f"sparkloom: {args.conf} in {scratch} ...", flush=True)
        demo = run_sparkloom(args.conf, scratch)
        timing.write_text(json.dumps(demo))
    catalog = scratch / "data" / cfg["pipeline"]["name"]
    ours = sparkloom_models(catalog)
    rows = split_rows(catalog)
    print("scikit-learn ...", flush=True)
    sk_emb, sk_tfidf = sklearn_on_embeddings(catalog), sklearn_tfidf(rows)
    print("plain transformers fine-tuning ...", flush=True)
    checkpoint = str((ROOT / cfg["bert"]["init_from"]).resolve())
    before = RESULTS / f"{NAME}.json"
    kept = json.loads(before.read_text()) if args.reuse and before.exists() else {}
    if kept.get("conf") == args.conf and "transformers_plain_finetune" in kept:
        plain = kept["transformers_plain_finetune"]  # measured beside this very demo run
    else:
        plain = plain_finetune(checkpoint, rows, cfg["bert"], args.threads)
    seed0 = cfg["bert"]["training"]["seed"]
    seeds = [{"seed": seed0, "sparkloom": ours["bert"]["test_accuracy"],
              "plain": plain["test_accuracy"]}]  # fmt: skip
    for seed in [int(x) for x in args.seeds.split(",") if x.strip()]:
        print(f"seed {seed}: sparkloom, then plain transformers ...", flush=True)
        ours_s = finetune_with_seed(args.conf, scratch, seed)
        bert = {**cfg["bert"], "training": {**cfg["bert"]["training"], "seed": seed}}
        plain_s = plain_finetune(checkpoint, rows, bert, args.threads)
        seeds.append({"seed": seed, "sparkloom": ours_s["test_accuracy"],
                      "plain": plain_s["test_accuracy"]})  # fmt: skip
    result = {"conf": args.conf, "threads": args.threads, "cpu_count": os.cpu_count(),
              "rows": {s: len(r[0]) for s, r in rows.items()}, "demo": demo,
              "sparkloom": ours, "sklearn_embeddings_lr": sk_emb, "sklearn_tfidf_lr": sk_tfidf,
              "transformers_plain_finetune": plain, "seeds": seeds}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{NAME}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    s, b = r["sparkloom"], r["sparkloom"]["bert"]
    plain = r["transformers_plain_finetune"]
    lines = [
        f"# {NAME}", "",
        f"BBC News, the ingest split of {r['conf']} ({r['rows']['train']} train, "
        f"{r['rows']['validation']} validation, {r['rows']['test']} test documents), "
        f"{r['cpu_count']} cores. Written by benchmarks/{NAME}.py.", "",
        "| model | sparkloom test acc | macro-F1 | single machine | test acc | macro-F1 |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
        f"| TF-IDF + LR | {s['baseline']['test_accuracy']:.4f} | {s['baseline']['test_macro_f1']:.4f} "
        f"| scikit-learn | {r['sklearn_tfidf_lr']['test_accuracy']:.4f} | {r['sklearn_tfidf_lr']['test_macro_f1']:.4f} |",
        f"| MiniLM embeddings + LR | {s['embed_baseline']['test_accuracy']:.4f} | "
        f"{s['embed_baseline']['test_macro_f1']:.4f} | scikit-learn on the same vectors | "
        f"{r['sklearn_embeddings_lr']['test_accuracy']:.4f} | {r['sklearn_embeddings_lr']['test_macro_f1']:.4f} |",
        f"| MiniLM fine-tuned | {b['test_accuracy']:.4f} | {b['test_macro_f1']:.4f} | plain transformers loop "
        f"| {plain['test_accuracy']:.4f} | {plain['test_macro_f1']:.4f} |", "",
        f"Fine-tuning time: sparkloom {b['train_seconds']:.0f} s of training ({b['stage_seconds']:.0f} s "
        f"with data preparation and launch, 2 processes x {r['threads'] // 2} threads) vs plain "
        f"transformers {plain['train_seconds']:.0f} s (1 process x {r['threads']} threads): "
        f"ratio {b['train_seconds'] / plain['train_seconds']:.2f}.",
        f"Embedding (the embed stage, max_length 256): {s['embed']['rows_out']} documents in "
        f"{s['embed']['seconds']:.0f} s, {s['embed']['docs_per_s']:.1f} docs/s, the model loaded "
        f"{s['embed']['model_loads']} times by {s['embed']['python_workers']} Python workers; "
        f"scikit-learn's fit on those vectors: {r['sklearn_embeddings_lr']['fit_seconds']:.1f} s "
        f"for 5 values of C. The whole demo: {r['demo']['wall_seconds']:.0f} s.", "",
    ]  # fmt: skip
    if len(r.get("seeds", [])) > 1:
        lines += ["Fine-tuned test accuracy by training seed (data order, head init, dropout):", "",
                  "| seed | sparkloom (TorchDistributor, 2 processes) | plain transformers |",
                  "| ---: | ---: | ---: |"]  # fmt: skip
        lines += [f"| {x['seed']} | {x['sparkloom']:.4f} | {x['plain']:.4f} |" for x in r["seeds"]]
        mean = {k: float(np.mean([x[k] for x in r["seeds"]])) for k in ("sparkloom", "plain")}
        lines += [f"| mean | {mean['sparkloom']:.4f} | {mean['plain']:.4f} |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
