"""What every `sparkloom` command shares, written once: logging, SIGTERM handling, one line
and an exit code for an error, and Spark stopped (or its JVM killed) at the end.

    def main(args, session: Session) -> int:
        spark = session.spark(cfg.spark)  # started on first use, stopped by `execute`
        ...
    sys.exit(execute("score", args.verbose, lambda s: main(args, s), model=args.model))
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any

log = logging.getLogger("sparkloom")

PIPELINE_COMMANDS = ("run", "preflight", "stage")  # and each stage's own: they take a config


class Session:
    """The SparkSession a command starts, if it starts one."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.started: Any = None

    def spark(self, spark_config: Any) -> Any:
        if self.started is None:
            from sparkloom.pipelines.compat import quiet_task_failures
            from sparkloom.pipelines.spark import get_spark

            self.started = get_spark(spark_config)
            if not self.verbose:
                quiet_task_failures(self.started)
        return self.started


def execute(
    command: str, verbose: bool, body: Callable[[Session], int], model: str | None = None
) -> int:
    """`body(session)`'s exit code; an error ends as one line on stderr and its code."""
    setup_logging(verbose)
    from sparkloom.pipelines.errors import Terminated
    from sparkloom.pipelines.spark import handle_termination

    handle_termination()  # SIGTERM ends the MLflow runs KILLED, as Ctrl-C does
    session = Session(verbose)
    try:
        return body(session)
    except (Exception, KeyboardInterrupt, Terminated) as e:
        if session.started is not None and _jvm_broken(e) and not verbose:
            # out of memory or a dead context: what the JVM and Py4J would print from here
            # on (other threads' failures, a refused stop) repeats the one line below
            logging.getLogger("py4j").setLevel(logging.CRITICAL + 1)
            from sparkloom.pipelines.spark import kill_jvm

            kill_jvm()
        return fail(e, command, verbose, model)
    finally:
        if session.started is not None:
            stop_spark(session.started)


def _jvm_broken(e: BaseException) -> bool:
    from sparkloom.pipelines.errors import ResourceError

    return isinstance(getattr(e, "cause", None), ResourceError)


def fail(e: BaseException, command: str, verbose: bool, model: str | None = None) -> int:
    """How every command ends on an error: one line on stderr that names the problem and the
    fix, and the exit code: SparkloomError's own, 3 for a `model` MLflow does not have, 128+N
    for a stop, 1 for anything else. --verbose adds the traceback where the error is not one
    of ours."""
    from sparkloom.pipelines.errors import SparkloomError, Terminated
    from sparkloom.pipelines.spark import terminating
    from sparkloom.pipelines.tracking import mask

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
        print(f"{prog(command)}: error: {mask('error', str(shown))}", file=sys.stderr)
        return shown.exit_code
    # Spark/Py4J/MLflow errors: the first line; the traceback with --verbose
    first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    hint = "" if verbose else " (rerun with --verbose for the full traceback)"
    print(f"sparkloom: {command} failed: {type(e).__name__}: {mask('error', first)}{hint}",
          file=sys.stderr)  # fmt: skip
    return 1


def _pipeline(command: str) -> bool:
    from sparkloom.pipelines.stages import STAGE_COMMANDS

    return command in (*STAGE_COMMANDS, *PIPELINE_COMMANDS)


def prog(command: str) -> str:
    """How error lines name the command: `sparkloom` for the pipeline's, else `sparkloom X`."""
    return "sparkloom" if _pipeline(command) else f"sparkloom {command}"


def _not_in_mlflow(e: BaseException, model: str | None):
    """MLflow's "not found" (an unknown run id, registered model, version or alias) as a
    DataError naming the model asked for and where to look; None for any other error."""
    errors = sys.modules.get("mlflow.exceptions")  # an MLflow error means MLflow is imported
    if errors is None or not isinstance(e, errors.MlflowException):
        return None
    if getattr(e, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
        return None
    import mlflow

    from sparkloom.pipelines.errors import DataError

    what = f"model {model}" if model else "what was asked for"
    first = next((ln for ln in str(e).splitlines() if ln.strip()), "not found")
    return DataError(
        f"{what} is not in MLflow at {mlflow.get_tracking_uri()}: {first}; check the run id "
        "(`mlflow runs list --experiment-id ID`, or the MLflow UI), the registered model's "
        "name and alias or version (the UI's Models page), and --tracking-uri"
    )


def _killed(e: BaseException, command: str = "run") -> int:
    why = str(e) if not isinstance(e, KeyboardInterrupt) else "stopped by SIGINT"
    if _pipeline(command) and command != "preflight":
        why += "; its MLflow runs are marked KILLED"
    print(f"{prog(command)}: {why}", file=sys.stderr)
    return getattr(e, "exit_code", 130)


def stop_spark(spark) -> None:
    """Stop the session; if the JVM is already gone (a kill of the whole process group), say
    so in the debug log instead of replacing the run's own outcome with a Py4J traceback.
    When stop() cannot run (or a second Ctrl-C cuts it), the JVM we launched is killed: it
    would otherwise outlive us, holding our stdout/stderr."""
    from sparkloom.pipelines.errors import Terminated
    from sparkloom.pipelines.spark import kill_jvm

    try:
        spark.stop()
    except (Exception, KeyboardInterrupt, Terminated) as e:  # the outcome stays the run's own
        kill_jvm()
        log.debug("SparkSession.stop failed (%s: %s); the JVM was already gone or is now "
                  "killed", type(e).__name__, e)  # fmt: skip


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    from sparkloom.pipelines.tracking import MaskSecrets

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
