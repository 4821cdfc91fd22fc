"""`sparkloom compare`: compare the models an MLflow experiment has trained.

  sparkloom compare --experiment text_classification [--conf conf/text.yaml]
      [--tracking-uri URI] [--out DIR] [--split test|validation] [--include-skipped] [--log]

Prints one table per data split (tag sparkloom.data: only runs on the same test split are
compared), ranked by accuracy, and writes comparison.md/.html/.json and PNG charts to --out
(default comparison/<experiment>). --log records them in MLflow as a run named
compare:<experiment> in the same experiment.
"""

from __future__ import annotations

import argparse

from sparkloom.jobs.runtime import Session


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", help="MLflow experiment name (default: --conf's experiment)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: --conf's, else sqlite:///mlflow.db)")  # fmt: skip
    p.add_argument("--conf", action="append", default=[], metavar="FILE",
                   help="pipeline YAML: its MLflow store and experiment")  # fmt: skip
    p.add_argument("--out", help="output folder (default: comparison/<experiment>)")
    p.add_argument("--split", default="test", choices=["test", "validation"])
    p.add_argument("--include-skipped", action="store_true",
                   help="keep stage runs that reused an earlier run's model")  # fmt: skip
    p.add_argument("--log", action="store_true",
                   help="log the report as a run compare:<experiment> in the experiment")  # fmt: skip


def check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.experiment and not args.conf:
        p.error("give --experiment NAME (or --conf FILE to use its experiment)")


def main(args: argparse.Namespace, session: Session) -> int:
    cfg = None
    if args.conf:
        from sparkloom.pipelines.config import load_config

        cfg = load_config(args.conf)
    from sparkloom.pipelines.compare import compare_experiment, log_report, safe_name

    experiment = args.experiment or cfg.experiment
    tracking = args.tracking_uri or (cfg.mlflow.tracking_uri if cfg else "sqlite:///mlflow.db")
    out = args.out or f"comparison/{safe_name(experiment)}"
    report = compare_experiment(experiment, out, tracking, args.split, args.include_skipped)
    print(report.terminal_table())
    for name, path in report.paths.items():
        print(f"{name:>15}: {path}")
    if args.log:
        import mlflow

        mlflow.set_tracking_uri(tracking)
        tags = {"sparkloom.command": "compare"}
        with mlflow.start_run(experiment_id=report.experiment_id, tags=tags,
                              run_name=f"compare:{experiment}") as r:  # fmt: skip
            mlflow.log_params({"compare.split": args.split,
                               "compare.include_skipped": args.include_skipped})  # fmt: skip
            log_report(report)
        print(f"logged to MLflow run {r.info.run_id} (compare:{experiment}), under comparison/")
    return 0
