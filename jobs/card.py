"""`sparkloom card`: the model card of a registered model version.

  sparkloom card models:/NAME@ALIAS | models:/NAME/VERSION [--tracking-uri URI]
      [--conf FILE] [--out DIR]

Prints the card as Markdown; with --out, writes model_card.md (images in images/),
model_card.html (self-contained) and model_card.json there. Everything is read from MLflow:
the version's run and the decision `register` stored with the card it logged.
"""

from __future__ import annotations

import argparse

from sparkloom.jobs.runtime import Session


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="models:/NAME@ALIAS",
                   help="a registered version: models:/NAME@ALIAS or models:/NAME/VERSION")  # fmt: skip
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: --conf's, else sqlite:///mlflow.db)")  # fmt: skip
    p.add_argument("--conf", action="append", default=[], metavar="FILE",
                   help="pipeline YAML: its MLflow store")  # fmt: skip
    p.add_argument("--out", help="write model_card.md/.html/.json to this folder")


def check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.model.startswith("models:/"):
        p.error(f"give a registered model as models:/NAME@ALIAS or models:/NAME/VERSION, not "
                f"{args.model!r}")  # fmt: skip


def main(args: argparse.Namespace, session: Session) -> int:
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    from sparkloom.pipelines import card as cards
    from sparkloom.pipelines.errors import DataError

    tracking = args.tracking_uri
    if tracking is None and args.conf:
        from sparkloom.pipelines.config import load_config

        tracking = load_config(args.conf).mlflow.tracking_uri
    mlflow.set_tracking_uri(tracking or "sqlite:///mlflow.db")
    mlflow.set_registry_uri(tracking or "sqlite:///mlflow.db")
    client = MlflowClient()
    name, _, alias = args.model.removeprefix("models:/").partition("@")
    try:
        if alias:
            version = str(client.get_model_version_by_alias(name, alias).version)
        else:
            name, version = name.split("/", 1)
            client.get_model_version(name, version)
    except Exception as e:
        raise DataError(f"no model {args.model} in the registry at {mlflow.get_tracking_uri()}: "
                        f"{str(e).splitlines()[0]}") from None  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        card = cards.build(client, name, version, tmp)
        if args.out:
            for kind, path in cards.write(card, args.out).items():
                print(f"{kind:>8}: {path}")
        else:
            print(cards.markdown(card))
    return 0
