"""`sparkloom COMMAND ...`: the pipeline, its stages, and the commands around the models.

  sparkloom run conf/pipelines/NAME.yaml [key.sub=value ...]   pipeline.stages, in order
  sparkloom preflight --conf FILE        can Spark, the data root and MLflow run them?
  sparkloom STAGE --conf FILE            one stage: ingest, features, baseline, lstm, ...
  sparkloom stage NAME --conf FILE       any stage by name, `score` and `compare` included
  sparkloom score | compare | generate   batch scoring, an experiment's comparison, GPT-2 text
  sparkloom card models:/NAME@ALIAS      a registered version's model card

`sparkloom COMMAND --help` gives each one's options. Every command shares one runtime
(jobs/runtime.py): its logging, exit codes and Spark teardown.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sparkloom.jobs.runtime import Session, execute
from sparkloom.pipelines.stages import (  # nothing heavy: --help stays fast
    STAGE_COMMANDS,
    STAGES,
    names,
)

# the commands that are not the pipeline's: each module has add_arguments, check and main
MODEL_COMMANDS = {
    "score": "sparkloom.jobs.score",
    "compare": "sparkloom.jobs.compare",
    "generate": "sparkloom.jobs.generate",
    "card": "sparkloom.jobs.card",
}


def _pipeline_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conf", action="append", default=[], metavar="FILE",
                   help="YAML config; repeat to layer files (later wins); `sparkloom run "
                        "conf/pipelines/NAME.yaml` takes the pipeline file directly")  # fmt: skip
    p.add_argument("--force", action="store_true", help="redo stages whose output is current")
    p.add_argument("--from", dest="from_stage", metavar="STAGE",
                   help="run: start at this stage of pipeline.stages (earlier ones must be done)")  # fmt: skip
    p.add_argument("--only", action="append", default=[], metavar="STAGE",
                   help="run: only these stages (repeatable), in pipeline order")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (for --help) and each command's own."""
    top = argparse.ArgumentParser(prog="sparkloom", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = top.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    parsers: dict[str, argparse.ArgumentParser] = {}

    def add(name: str, summary: str, description: str | None = None) -> argparse.ArgumentParser:
        parsers[name] = sub.add_parser(
            name, help=summary, description=description or summary,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        return parsers[name]

    _pipeline_arguments(add("run", "the pipeline's stages in order (pipeline.stages)"))
    _pipeline_arguments(add("preflight", "check that Spark, the data root and MLflow can run "
                            "the pipeline's stages, before any starts"))  # fmt: skip
    stage = add("stage", "one stage by name, score and compare included")
    stage.add_argument("name", choices=STAGES, metavar="NAME", help=f"one of {', '.join(STAGES)}")
    _pipeline_arguments(stage)
    for name in STAGE_COMMANDS:
        _pipeline_arguments(add(name, f"the {name} stage alone (as `stage {name}`)"))
    for name, module in MODEL_COMMANDS.items():
        doc = importlib.import_module(module).__doc__ or ""
        importlib.import_module(module).add_arguments(
            add(name, doc.split(":", 1)[-1].strip().splitlines()[0], doc)
        )
    for p in parsers.values():
        p.add_argument("--verbose", "-v", action="store_true", help="full tracebacks, debug logs")
    return top, parsers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    top, parsers = build_parser()
    if not argv or argv[0] not in parsers:
        top.parse_args(argv)  # --help, or argparse's own error naming the choices
        top.error("give a command; `sparkloom --help` lists them")
    command, p = argv[0], parsers[argv[0]]
    if command in MODEL_COMMANDS:
        args = p.parse_args(argv[1:])
        check = getattr(importlib.import_module(MODEL_COMMANDS[command]), "check", None)
        if check is not None:  # what argparse cannot say: options that go together
            check(p, args)
        args.command = command
        return args
    args = p.parse_intermixed_args(argv[1:])
    args.command = command
    # `sparkloom run conf/pipelines/text.yaml`: a YAML positional is the config, not an override
    files = [a for a in args.overrides if "=" not in a and a.endswith((".yaml", ".yml"))]
    args.overrides = [a for a in args.overrides if a not in files]
    args.conf = [*files, *args.conf]
    if not args.conf:
        p.error("give the pipeline's YAML: `sparkloom run conf/pipelines/NAME.yaml` or --conf FILE")
    if command not in ("run", "preflight") and (args.from_stage or args.only):
        p.error("--from and --only go with `run`; a single stage is `sparkloom STAGE --conf ...`")
    if args.from_stage and args.only:
        p.error("give --from or --only, not both")
    return args


def select_stages(pipeline: list[str], from_stage: str | None, only: list[str]) -> list[str]:
    """The stages `run` runs: all of pipeline.stages, from one on, or only some (in order)."""
    from sparkloom.pipelines.errors import ConfigError

    wanted = [from_stage] if from_stage else only
    unknown = [s for s in wanted if s not in pipeline]
    if unknown:
        raise ConfigError(f"{unknown} not in pipeline.stages {pipeline}; pick from those")
    if from_stage:
        return pipeline[pipeline.index(from_stage) :]
    return [s for s in pipeline if s in only] if only else list(pipeline)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command in MODEL_COMMANDS:
        module = importlib.import_module(MODEL_COMMANDS[args.command])
        return execute(args.command, args.verbose, lambda s: module.main(args, s),
                       model=getattr(args, "model", None))  # fmt: skip
    return execute(args.command, args.verbose, lambda s: pipeline(args, s))


def pipeline(args: argparse.Namespace, session: Session) -> int:
    """run, preflight, or one stage: the config, the preflight, the stages, the summary."""
    from sparkloom.pipelines.config import load_config
    from sparkloom.pipelines.sources import check_local_input

    cfg = load_config(args.conf, args.overrides)
    command = args.name if args.command == "stage" else args.command
    stages = (
        select_stages(list(cfg.pipeline.stages), args.from_stage, args.only)
        if command in ("run", "preflight")
        else [command]
    )
    if "ingest" in stages:
        check_local_input(cfg.require_ingest())  # before paying for a JVM

    from sparkloom.pipelines.runner import run_pipeline

    spark = session.spark(cfg.spark)
    if command == "preflight" or cfg.preflight.enabled:
        from sparkloom.pipelines.preflight import require, table

        findings = require(spark, cfg, stages)
        if command == "preflight":
            print(f"preflight for {stages}: all checks passed\n{table(findings)}")
            return 0
    outcome = run_pipeline(spark, cfg, stages, force=args.force, command=command)
    _print_outcome(cfg, outcome)
    return 0


def _print_outcome(cfg, outcome) -> None:
    import numpy as np

    from sparkloom.pipelines.report import classification_report
    from sparkloom.pipelines.tracking import ui_hint

    print()
    for stage, result in outcome.results.items():
        print(f"{stage:>9}: {result.summary()}{' [skipped: up to date]' if result.skipped else ''}")
    for stage in names(kind="classifier", torch=True):  # the distilled student too
        deep = outcome.results.get(stage)
        if deep is not None and "test" in deep.confusion:
            print()
            print(
                classification_report(
                    np.array(deep.confusion["test"]), deep.labels, f"{stage}, test split"
                )
            )
    titles = {"baseline": "Baseline (MLlib logistic regression)",
              "embed_baseline": "MLlib logistic regression on embeddings"}  # fmt: skip
    for stage in names(spark_model=True):
        lr = outcome.results.get(stage)
        if lr is not None and "test" in lr.metrics:
            cm = np.array(lr.confusion["test"])
            print()
            print(classification_report(cm, lr.labels, f"{titles.get(stage, stage)}, test split"))
    baseline = outcome.results.get("baseline")
    if baseline is not None and "test" in baseline.metrics:
        t = baseline.metrics["test"]
        print(f"TEST accuracy={t['accuracy']:.4f} weighted_f1={t['f1']:.4f}")
    compared = outcome.results.get("compare")
    if compared is not None:
        print()
        print(compared.report.terminal_table())
    else:
        _print_comparison(outcome)
    print(f"MLflow parent run {outcome.run_id} in experiment '{cfg.experiment}'")
    if outcome.model_uri:
        print(f"model: {outcome.model_uri}")
    print(f"browse: {ui_hint(cfg)}")


def _print_comparison(outcome) -> None:
    """One line per model trained in this run, on the same test split."""
    import numpy as np

    from sparkloom.pipelines.report import classification_metrics

    rows = []
    for stage, result in outcome.results.items():
        cm = getattr(result, "confusion", {}).get("test")
        if cm is not None and stage not in ("ingest", "bert_pretrain"):  # NSP is no classifier
            m = classification_metrics(np.array(cm), result.labels)
            rows.append(f"| {stage} | {m['accuracy']:.4f} | {m['f1']:.4f} | {m['macro_f1']:.4f} "
                        f"| {int(m['num_examples'])} |")  # fmt: skip
    if len(rows) > 1:
        print("\n| model | test accuracy | test weighted F1 | test macro F1 | n |\n"
              "| --- | ---: | ---: | ---: | ---: |")  # fmt: skip
        print("\n".join(rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
