"""`sparkloom score`: score texts or images with a logged classifier.

  sparkloom score --model models:/text_classification@champion \\
      --input texts.parquet --output scores/ [--input-column text --id-column id]
  sparkloom score --model models:/digits@champion --images --input photos/ --output scores/

--model takes models:/NAME@ALIAS (or models:/NAME/VERSION) or runs:/RUN_ID/model of a
baseline, lstm, textcnn, bert, cnn or alexnet stage run. Input: Parquet, CSV with a header,
JSON lines, or .txt with one text per line; with --images, a folder of image files (the id
is the path under it). Image models also take Parquet with a binary column of encoded files
(default `content`) or an array of pixel values, decoded and resized as their ingest did.
Output: Parquet of id, predicted_label, probabilities (in the model's label order), and the
rows that could not be scored, with a reason, at <output>_quarantine.
"""

from __future__ import annotations

import argparse

from sparkloom.jobs.runtime import Session


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS or runs:/RUN_ID/model")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--input-column", "--text-column", default=None,
                   help="text column (default text), or image column (default content)")  # fmt: skip
    p.add_argument("--allow-pickle", action="store_true",
                   help="load a weights file that holds pickled objects (it can run code: "
                        "only for files you trust)")  # fmt: skip
    p.add_argument("--images", action="store_true",
                   help="--input is a folder of image files (png, jpeg, ...)")  # fmt: skip
    p.add_argument("--id-column", default="id",
                   help="a column with one value per row; 'none' numbers the rows in input order")  # fmt: skip
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: --conf's, else sqlite:///mlflow.db)")  # fmt: skip
    p.add_argument("--conf", action="append", default=[], metavar="FILE",
                   help="pipeline YAML: its Spark and MLflow settings")  # fmt: skip


def main(args: argparse.Namespace, session: Session) -> int:
    import mlflow
    from mlflow.tracking import MlflowClient

    from sparkloom.pipelines.config import SparkConfig, load_config
    from sparkloom.pipelines.scoring import run_id_of, write_scores
    from sparkloom.pipelines.spark import read_images, read_table

    cfg = load_config(args.conf) if args.conf else None
    mlflow.set_tracking_uri(
        args.tracking_uri or (cfg.mlflow.tracking_uri if cfg else "sqlite:///mlflow.db")
    )
    MlflowClient().get_run(run_id_of(args.model))  # a wrong id fails before the JVM starts
    spark = session.spark(cfg.spark if cfg else SparkConfig())
    if args.images:
        df = read_images(spark, args.input)
    else:
        df = read_table(spark, args.input, args.input_column or "text")
    r = write_scores(df, args.model, args.output, args.input_column,
                     None if args.id_column.lower() == "none" else args.id_column,
                     args.allow_pickle)  # fmt: skip
    print(f"scored {r.rows_out} rows with {args.model} ({r.stage}) -> {r.output}; "
          f"{r.quarantined} quarantined -> {r.output}_quarantine; {r.rows_in} in")  # fmt: skip
    return 0
