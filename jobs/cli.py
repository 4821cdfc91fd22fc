"""`sparkloom <stage> --conf FILE [key.sub=value ...]`: parse, load config, run, clean up.
`sparkloom generate --model ... --prompt ...`: sample from a trained GPT-2 (jobs/generate.py)."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from pipelines.stages import STAGE_COMMANDS, names  # imports nothing heavy: --help stays fast

log = logging.getLogger("sparkloom")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sparkloom", description=__doc__)
    p.add_argument("command", choices=[*STAGE_COMMANDS, "run", "preflight"],
                   help="one stage, 'run' for the pipeline's stages in order, or 'preflight' to "
                        "check that Spark, the data root and MLflow can run them")  # fmt: skip
    p.add_argument("--conf", action="append", default=[], metavar="FILE",
                   help="YAML config; repeat to layer files (later wins); `sparkloom run "
                        "conf/pipelines/NAME.yaml` takes the pipeline file directly")  # fmt: skip
    p.add_argument("--force", action="store_true", help="redo stages whose output is current")
    p.add_argument("--from", dest="from_stage", metavar="STAGE",
                   help="run: start at this stage of pipeline.stages (earlier ones must be done)")  # fmt: skip
    p.add_argument("--only", action="append", default=[], metavar="STAGE",
                   help="run: only these stages (repeatable), in pipeline order")  # fmt: skip
    p.add_argument("--verbose", "-v", action="store_true", help="full tracebacks and debug logs")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = p.parse_intermixed_args(argv)
    # `sparkloom run conf/pipelines/text.yaml`: a YAML positional is the config, not an override
    files = [a for a in args.overrides if "=" not in a and a.endswith((".yaml", ".yml"))]
    args.overrides = [a for a in args.overrides if a not in files]
    args.conf = [*files, *args.conf]
    if not args.conf:
        p.error("give the pipeline's YAML: `sparkloom run conf/pipelines/NAME.yaml` or --conf FILE")
    if args.command not in ("run", "preflight") and (args.from_stage or args.only):
        p.error("--from and --only go with `run`; a single stage is `sparkloom STAGE --conf ...`")
    if args.from_stage and args.only:
        p.error("give --from or --only, not both")
    return args


def select_stages(pipeline: list[str], from_stage: str | None, only: list[str]) -> list[str]:
    """The stages `run` runs: all of pipeline.stages, from one on, or only some (in order)."""
    from pipelines.errors import ConfigError

    wanted = [from_stage] if from_stage else only
    unknown = [s for s in wanted if s not in pipeline]
    if unknown:
        raise ConfigError(f"{unknown} not in pipeline.stages {pipeline}; pick from those")
    if from_stage:
        return pipeline[pipeline.index(from_stage) :]
    return [s for s in pipeline if s in only] if only else list(pipeline)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["generate"]:  # sampling from a trained GPT-2: its own options
        from jobs.generate import run

        return run(argv[1:])
    if argv[:1] == ["score"]:  # batch scoring with a logged classifier
        from jobs.score import run as score

        return score(argv[1:])
    if argv[:1] == ["compare"]:  # a report over MLflow, no Spark (in a pipeline: a stage)
        from jobs.compare import run as compare

        return compare(argv[1:])
    args = parse_args(argv)
    _setup_logging(args.verbose)
    from pipelines.errors import Terminated
    from pipelines.spark import handle_termination

    handle_termination()  # SIGTERM ends the MLflow runs KILLED, as Ctrl-C does
    spark = None
    try:
        from pipelines.config import load_config
        from pipelines.sources import check_local_input

        cfg = load_config(args.conf, args.overrides)
        stages = (
            select_stages(list(cfg.pipeline.stages), args.from_stage, args.only)
            if args.command in ("run", "preflight")
            else [args.command]
        )
        if "ingest" in stages:
            check_local_input(cfg.require_ingest())  # before paying for a JVM

        from pipelines.runner import run_pipeline
        from pipelines.spark import get_spark, quiet_task_failures

        spark = get_spark(cfg.spark)
        if not args.verbose:
            quiet_task_failures(spark)
        if args.command == "preflight" or cfg.preflight.enabled:
            from pipelines.preflight import require

            findings = require(spark, cfg, stages)
            if args.command == "preflight":
                from pipelines.preflight import table

                print(f"preflight for {stages}: all checks passed\n{table(findings)}")
                return 0
        outcome = run_pipeline(spark, cfg, stages, force=args.force, command=args.command)
        _print_outcome(cfg, outcome)
        return 0
    except (Exception, KeyboardInterrupt, Terminated) as e:
        if spark is not None and _jvm_broken(e) and not args.verbose:
            # out of memory or a dead context: what the JVM and Py4J would print from here
            # on (other threads' failures, a refused stop) repeats the one line below
            logging.getLogger("py4j").setLevel(logging.CRITICAL + 1)
            from pipelines.spark import kill_jvm

            kill_jvm()
        return fail(e, args.command, args.verbose)
    finally:
        if spark is not None:
            stop_spark(spark)


def _jvm_broken(e: BaseException) -> bool:
    from pipelines.errors import ResourceError

    return isinstance(getattr(e, "cause", None), ResourceError)


def fail(e: BaseException, command: str, verbose: bool, model: str | None = None) -> int:
    """How every entry point (stages, run, score, generate, compare) ends on an error: one
    line on stderr that names the problem and the fix, and the exit code: SparkloomError's
    own, 3 for a `model` MLflow does not have, 128+N for a stop, 1 for anything else.
    --verbose adds the traceback where the error is not one of ours."""
    from pipelines.errors import SparkloomError, Terminated
    from pipelines.spark import terminating
    from pipelines.tracking import mask

    if isinstance(e, (KeyboardInterrupt, Terminated)):
        return _killed(e, command)
    if terminating():  # after a stop, what surfaces is the stop: a stage failed by the
        # cancelled job, a Py4J call cut mid-answer
        log.debug("after the stop signal: %s", e, exc_info=e)
        return _killed(Terminated(terminating()), command)
    cause = getattr(e, "cause", None)  # a failed stage: its own error's traceback
    ours = isinstance(e, SparkloomError) and isinstance(cause, SparkloomError | None)
    if verbose and (not ours or _jvm_broken(e)):
        traceback.print_exception(e, file=sys.stderr)
    shown = _not_in_mlflow(e, model) or e
    if isinstance(shown, SparkloomError):
        print(f"{_prog(command)}: error: {mask('error', str(shown))}", file=sys.stderr)
        return shown.exit_code
    # Spark/Py4J/MLflow errors: the first line; the traceback with --verbose
    first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    hint = "" if verbose else " (rerun with --verbose for the full traceback)"
    print(f"sparkloom: {command} failed: {type(e).__name__}: {mask('error', first)}{hint}",
          file=sys.stderr)  # fmt: skip
    return 1


def _prog(command: str) -> str:
    return (
        "sparkloom" if command in (*STAGE_COMMANDS, "run", "preflight") else f"sparkloom {command}"
    )


def _not_in_mlflow(e: BaseException, model: str | None):
    """MLflow's "not found" (an unknown run id, registered model, version or alias) as a
    DataError naming the model asked for and where to look; None for any other error."""
    errors = sys.modules.get("mlflow.exceptions")  # an MLflow error means MLflow is imported
    if errors is None or not isinstance(e, errors.MlflowException):
        return None
    if getattr(e, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
        return None
    import mlflow

    from pipelines.errors import DataError

    what = f"model {model}" if model else "what was asked for"
    first = next((ln for ln in str(e).splitlines() if ln.strip()), "not found")
    return DataError(
        f"{what} is not in MLflow at {mlflow.get_tracking_uri()}: {first}; check the run id "
        "(`mlflow runs list --experiment-id ID`, or the MLflow UI), the registered model's "
        "name and alias or version (the UI's Models page), and --tracking-uri"
    )


def _print_outcome(cfg, outcome) -> None:
    import numpy as np

    from pipelines.report import classification_report
    from pipelines.tracking import ui_hint

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
    baseline = outcome.results.get("baseline")
    if baseline is not None and "test" in baseline.metrics:
        cm = np.array(baseline.confusion["test"])
        print()
        print(
            classification_report(
                cm, baseline.labels, "Baseline (MLlib logistic regression), test split"
            )
        )
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

    from pipelines.report import classification_metrics

    rows = []
    for stage, result in outcome.results.items():
        cm = getattr(result, "confusion", {}).get("test")
        if cm is not None and stage not in ("ingest", "bert_pretrain"):  # NSP is no classifier
            m = classification_metrics(np.array(cm), result.labels)
            rows.append(
                f"| {stage} | {m['accuracy']:.4f} | {m['f1']:.4f} | {int(m['num_examples'])} |"
            )
    if len(rows) > 1:
        print("\n| model | test accuracy | test weighted F1 | n |\n| --- | ---: | ---: | ---: |")
        print("\n".join(rows) + "\n")


def _killed(e: BaseException, command: str = "run") -> int:
    why = str(e) if not isinstance(e, KeyboardInterrupt) else "stopped by SIGINT"
    if command in (*STAGE_COMMANDS, "run"):
        why += "; its MLflow runs are marked KILLED"
    print(f"{_prog(command)}: {why}", file=sys.stderr)
    return getattr(e, "exit_code", 130)


def stop_spark(spark) -> None:
    """Stop the session; if the JVM is already gone (a kill of the whole process group), say
    so in the debug log instead of replacing the run's own outcome with a Py4J traceback.
    When stop() cannot run (or a second Ctrl-C cuts it), the JVM we launched is killed: it
    would otherwise outlive us, holding our stdout/stderr."""
    from pipelines.errors import Terminated
    from pipelines.spark import kill_jvm

    try:
        spark.stop()
    except (Exception, KeyboardInterrupt, Terminated) as e:  # the outcome stays the run's own
        kill_jvm()
        log.debug("SparkSession.stop failed (%s: %s); the JVM was already gone or is now "
                  "killed", type(e).__name__, e)  # fmt: skip


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    from pipelines.tracking import MaskSecrets

    for handler in logging.getLogger().handlers:  # no password in a URI reaches the log
        handler.addFilter(MaskSecrets())
        if not verbose:  # Py4J logs each call cut by a dying JVM, traceback and all
            handler.addFilter(
                lambda r: not str(r.msg).startswith("Exception while sending command")
            )
    for noisy in ("py4j", "alembic", "mlflow", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        # pyspark logs every analysis error with its whole JVM trace; we print one line instead
        for name in ("DataFrameQueryContextLogger", "SQLQueryContextLogger"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


if __name__ == "__main__":
    sys.exit(main())
