"""`sparkloom score`: score a file of texts with a logged classifier.

  sparkloom score --model models:/text_classification@champion \\
      --input texts.parquet --output scores/ [--text-column text --id-column id]

--model takes models:/NAME@ALIAS (or models:/NAME/VERSION) or runs:/RUN_ID/model of a
baseline, lstm, textcnn or bert stage run. Input: Parquet, CSV with a header, JSON lines, or
.txt with one text per line.
Output: Parquet of id, predicted_label, probabilities (in the model's label order), and
blank texts at <output>_quarantine.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sparkloom score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS or runs:/RUN_ID/model")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--text-column", default="text")
    p.add_argument("--id-column", default="id")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: --conf's, else sqlite:///mlflow.db)")  # fmt: skip
    p.add_argument("--conf", action="append", default=[], metavar="FILE",
                   help="pipeline YAML: its Spark and MLflow settings")  # fmt: skip
    p.add_argument("--verbose", "-v", action="store_true")
    return p.parse_args(argv)


def run(argv: list[str]) -> int:
    from jobs.cli import _setup_logging

    args = parse_args(argv)
    _setup_logging(args.verbose)
    from pipelines.errors import SparkloomError

    spark = None
    try:
        import mlflow

        from pipelines.config import SparkConfig, load_config
        from pipelines.scoring import write_scores
        from pipelines.spark import get_spark, read_table

        cfg = load_config(args.conf) if args.conf else None
        mlflow.set_tracking_uri(
            args.tracking_uri or (cfg.mlflow.tracking_uri if cfg else "sqlite:///mlflow.db")
        )
        spark = get_spark(cfg.spark if cfg else SparkConfig())
        df = read_table(spark, args.input, args.text_column)
        r = write_scores(df, args.model, args.output, args.text_column, args.id_column)
        print(f"scored {r.rows_out} rows with {args.model} ({r.stage}) -> {r.output}; "
              f"{r.quarantined} quarantined (blank text) -> {r.output}_quarantine; "
              f"{r.rows_in} in")  # fmt: skip
        return 0
    except SparkloomError as e:
        print(f"sparkloom score: error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        if spark is not None:
            spark.stop()
