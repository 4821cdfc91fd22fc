"""The one SparkSession builder every job uses."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator

from pyspark.sql import SparkSession

from sparkloom.pipelines import compat
from sparkloom.pipelines.config import SparkConfig
from sparkloom.pipelines.errors import ConfigError, ResourceError, SparkloomError, exception_text

log = logging.getLogger(__name__)


def check_java() -> None:
    """Spark 4 needs Java 17+; without one, pyspark's own error is about a gateway port."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.path.exists(os.path.join(java_home, "bin", "java")):
        return
    if shutil.which("java") is None:
        raise SparkloomError(
            "no Java found: Spark 4 needs Java 17 or newer; install a JDK 17 "
            "(e.g. apt-get install openjdk-17-jdk-headless) and set JAVA_HOME"
        )


def get_spark(cfg: SparkConfig) -> SparkSession:
    """Build (or join) the SparkSession described by the `spark` config section.

    `master` is only set when the config names one, so `spark-submit --master ...`
    decides where the job runs; plain `python`/`sparkloom` falls back to local[*].
    With `remote` (or SPARK_REMOTE) the session is a Spark Connect client: `sc://...` needs
    no JVM here at all; `local[N]` starts a Connect server in this process.
    """
    remote = cfg.connect_url()
    if remote and cfg.master:
        raise ConfigError(
            f"spark.master={cfg.master} and a Spark Connect address ({remote}, from "
            f"{'spark.remote' if cfg.remote else 'SPARK_REMOTE'}) are both set; a Connect "
            "client has no master: unset one of them"
        )
    launched_by_submit = "PYSPARK_GATEWAY_PORT" in os.environ
    jvm_here = not launched_by_submit and not (remote or "").startswith("sc://")
    if jvm_here:
        check_java()
    if jvm_here and (remote or cfg.master or "local").startswith("local"):
        # local Python workers run this interpreter (the venv); on a cluster the user
        # points spark.pyspark.python / PYSPARK_PYTHON at the executors' environment
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    if (remote or "").startswith("sc://"):
        check_reachable(remote)
    builder = SparkSession.builder.appName(cfg.app_name)
    if remote:
        builder = builder.remote(remote)
    elif cfg.master:
        builder = builder.master(cfg.master)
    for key, value in {**DEFAULT_CONF, **cfg.conf}.items():
        builder = builder.config(key, str(value).lower() if isinstance(value, bool) else str(value))
    before = len(_LAUNCHED)
    try:
        with _recording_jvm_launch(), warnings.catch_warnings(record=True) as refused:
            warnings.simplefilter("always")
            spark = builder.getOrCreate()
        _report_refused_conf(remote, refused)
        compat.set_log_level(spark, cfg.log_level)
    except BaseException:
        # Ctrl-C, SIGTERM or a failure while the JVM boots: pyspark drops the process it
        # launched, and that JVM outlives us holding our stdout/stderr, so `sparkloom ... | tee`
        # and CI steps hang. Only this call's launch: a session joined here is not ours to end.
        kill_jvm(_LAUNCHED[before:])
        raise
    return spark


def connect_server_command(master: str, port: int, conf: dict) -> tuple[list[str], dict]:
    """(command, environment) that start a Spark Connect server from the jars pip's pyspark
    ships, on `master`, listening on `port`: what tests and benchmarks run a client against."""
    import pyspark

    home = os.path.dirname(pyspark.__file__)
    conf = {"spark.connect.grpc.binding.port": port, **conf}
    cmd = [os.path.join(home, "bin", "spark-submit"), "--master", master,
           "--class", "org.apache.spark.sql.connect.service.SparkConnectServer",
           *[a for k, v in conf.items() for a in ("--conf", f"{k}={v}")]]  # fmt: skip
    return cmd, {**os.environ, "SPARK_HOME": home, "PYSPARK_PYTHON": sys.executable}


def check_reachable(url: str, timeout_s: float = 10.0) -> None:
    """A Connect client retries a server that is not there for minutes before it fails: one
    TCP connect first, and a line that names the address."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url.split(";", 1)[0].replace("sc://", "http://", 1))
    host, port = parsed.hostname or "localhost", parsed.port or 15002
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as e:
        raise ResourceError(
            f"cannot reach the Spark Connect server at {host}:{port} ({e.strerror or e}); start "
            "it (pyspark's sbin/start-connect-server.sh, or the cluster's endpoint) or fix "
            "spark.remote / SPARK_REMOTE"
        ) from None


def _report_refused_conf(remote: str | None, caught: list[warnings.WarningMessage]) -> None:
    """A Connect client sets spark.conf as runtime settings, and the server refuses its static
    ones (spark.driver.memory, spark.ui.enabled) with a warning each. A local server got them
    at its start, so those say nothing; a remote server kept its own values: one line."""
    refused = [w for w in caught if "Failed to set" in str(w.message)]
    for w in caught:
        if w not in refused:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if refused and (remote or "").startswith("sc://"):
        keys = [str(w.message).split(" to ", 1)[0].removeprefix("Failed to set ") for w in refused]
        log.warning("the Spark Connect server kept its own values of %s (static settings: set "
                    "them where the server starts)", ", ".join(keys))  # fmt: skip


_LAUNCHED: list[subprocess.Popen] = []  # the spark-submit processes this process started
_LAUNCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _recording_jvm_launch() -> Iterator[None]:
    """Keep the Popen that pyspark's launch_gateway makes the moment it exists: a stop during
    its wait for the gateway port would otherwise lose it (launch_gateway has no hook, and
    SparkContext._gateway.proc is set only once the JVM answers)."""
    from pyspark import java_gateway

    original = getattr(java_gateway, "Popen", None)
    if original is None:  # a pyspark that launches differently: nothing to record
        yield
        return

    class Recorded(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _LAUNCHED.append(self)

    with _LAUNCH_LOCK:  # two threads patching at once could leave the wrapper in place
        java_gateway.Popen = Recorded
        try:
            yield
        finally:
            java_gateway.Popen = original


def kill_jvm(procs: list[subprocess.Popen] | None = None, grace_s: float = 3.0) -> None:
    """End the JVMs `get_spark` launched (default: all), with everything they started:
    SIGTERM (Spark's shutdown hooks remove its temp folders), then SIGKILL after `grace_s`.
    For a stop during start-up, or one after which SparkSession.stop() cannot run; a JVM that
    spark-submit started for us (PYSPARK_GATEWAY_PORT) is not ours and is left alone."""
    import signal

    with _stops_ignored():
        for proc in list(_LAUNCHED if procs is None else procs):
            _LAUNCHED.remove(proc)
            if proc.poll() is not None:
                continue
            tree = [(proc.pid, _start_time(proc.pid)), *_descendants(proc.pid)]
            _signal_all(tree, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
            _signal_all(tree, getattr(signal, "SIGKILL", signal.SIGTERM))
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)


@contextlib.contextmanager
def _stops_ignored() -> Iterator[None]:
    """A second Ctrl-C (users press it again when the first seems slow) must not cut the
    cleanup short and leave the JVM behind after all; the process is stopping anyway."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    stops = [signal.SIGINT, signal.SIGTERM]
    before = {s: signal.getsignal(s) for s in stops}
    for s in stops:
        signal.signal(s, signal.SIG_IGN)
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), so a pid reused by an unrelated
    process is never signalled; None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _descendants(pid: int) -> list[tuple[int, str | None]]:
    """Children, grandchildren... of `pid` from /proc (spark-class's launcher JVM, Python
    workers); none where there is no /proc, where killing `pid` is all we can do."""
    try:
        names = [n for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []
    parent_of = {}
    for name in names:
        try:
            with open(f"/proc/{name}/stat") as f:
                parent_of[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parent_of.items() if p in frontier]
        found += kids
        frontier = kids
    return [(c, _start_time(c)) for c in found]


def _signal_all(tree: list[tuple[int, str | None]], signum: int) -> None:
    for pid, started in tree:
        if started is not None and _start_time(pid) != started:
            continue  # gone, and the pid already someone else's
        with contextlib.suppress(OSError):
            os.kill(pid, signum)


# Settings that make small and medium jobs behave; a conf file or --conf overrides each.
DEFAULT_CONF = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
}


_TERMINATING: list[int] = []  # the signal that asked this process to stop, once it came


def handle_termination() -> None:
    """Make SIGTERM stop a job the way Ctrl-C does: cancel the running Spark jobs and raise
    `Terminated` in the main thread, so every `finally` runs and the MLflow runs end KILLED.
    SIGKILL and os._exit cannot be caught; the next pipeline start closes what they leave
    (tracking.close_stale_runs)."""
    import signal
    import threading

    from sparkloom.pipelines.errors import Terminated

    def cancel() -> None:
        # the JVM or the server may be dying with us (a group kill)
        with contextlib.suppress(Exception):
            compat.cancel_all_jobs()

    def stop(signum, frame):
        _TERMINATING.append(signum)
        # The main thread is usually waiting in a Py4J call (a barrier training job runs to
        # its end otherwise). No JVM call here: the cancel goes over another thread's
        # connection, and cannot fail this handler if the JVM is already gone.
        threading.Thread(target=cancel, daemon=True).start()
        raise Terminated(signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def terminating() -> int | None:
    """The signal that asked this process to stop, if one did: an error that surfaces after
    it (a cancelled Spark job) is the stop, not a failure to retry or report."""
    return _TERMINATING[0] if _TERMINATING else None


def ship_files(spark: SparkSession, directory: str, names: tuple[str, ...]) -> str:
    """Send `names` from a local `directory` to every executor (compat.add_files: addFile, or
    a Connect session's artifacts). Returns the prefix the executors find them under:
    compat.shipped_files_root()/<prefix><name>. The prefix is a hash of the files' content,
    so two models in one session never clash (and Connect never refuses a name it has)."""
    import hashlib
    import tempfile

    h = hashlib.sha1()
    for name in names:
        with open(os.path.join(directory, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):  # noqa: B023
                h.update(chunk)
    tag = h.hexdigest()[:16]
    staged = os.path.join(tempfile.gettempdir(), f"sparkloom-ship-{tag}")  # same path each time
    os.makedirs(staged, exist_ok=True)
    staged_paths = []
    for name in names:
        named = os.path.join(staged, f"{tag}-{name}")
        if os.path.islink(named):  # left by an older version of this code
            os.unlink(named)
        if not os.path.exists(named):  # a hard link, or a copy across filesystems (Spark
            src = os.path.join(directory, name)  # follows a symlink, shipping the target's name)
            try:
                os.link(src, named)
            except OSError:
                shutil.copyfile(src, named)
        staged_paths.append(named)
    compat.add_files(spark, staged_paths)
    return f"{tag}-"


def read_table(spark: SparkSession, path: str, text_column: str = "text"):
    """A user's file by its extension: .csv (with a header), .json/.jsonl, .txt (one row per
    line, in `text_column`), else Parquet; a clear error when it is none of them."""
    from sparkloom.pipelines.errors import DataError

    low = path.lower().rstrip("/")
    if low.endswith(".txt"):
        return spark.read.text(path).withColumnRenamed("value", text_column)
    if low.endswith(".csv"):
        return spark.read.option("header", True).option("multiLine", True).csv(path)
    if low.endswith((".json", ".jsonl")):
        return spark.read.json(path)
    try:
        return spark.read.parquet(path)
    except Exception as e:
        raise DataError(
            f"cannot read {path} as Parquet ({type(e).__name__}); give .parquet, .csv (with a "
            "header), .json/.jsonl or .txt (one row per line)"
        ) from None


def read_images(spark: SparkSession, path: str, glob: str = "*"):
    """(id, content) for every file under the folder `path`, zero-byte files included (they
    are quarantined, not lost; so are names Spark cannot open, with null content); the id is
    the file's path under `path`."""
    from pyspark.sql import functions as F

    from sparkloom.pipelines.errors import DataError
    from sparkloom.pipelines.sources import absolute_uri, binary_files, list_input

    if not os.path.isdir(path) and "://" not in path:
        raise DataError(f"--images: {path} is not a folder of image files")
    listing = list_input(spark, absolute_uri(path), (glob,), "--images")
    return binary_files(spark, listing).select(F.col("rel").alias("id"), "content")


def write_with_quarantine(df_in, out, quarantine, output: str, what: str) -> tuple[int, int, int]:
    """Write `out` at `output` and `quarantine` beside it (`output`_quarantine), check on what
    was written that rows in = out + quarantined, and only then commit both. A failed or
    unbalanced write leaves any previous output in place and readable (a plain Parquet
    overwrite deletes it first); writing the same output again replaces it, never appends.
    `df_in` must be pinned (e.g. localCheckpoint) so the count sees the rows the outputs
    were made from."""
    import uuid

    from sparkloom.pipelines.catalog import ArrowFS
    from sparkloom.pipelines.errors import DataError

    spark = df_in.sparkSession
    fs = ArrowFS()
    output = output.rstrip("/")  # the quarantine goes beside the output, not inside it
    tag = uuid.uuid4().hex[:8]
    targets = {output: out, f"{output}_quarantine": quarantine}
    tmps = {final: f"{final}.__tmp-{tag}" for final in targets}
    try:
        for final, frame in targets.items():
            frame.write.mode("error").parquet(tmps[final])
        rows_in = df_in.count()
        rows_out, quarantined = (spark.read.parquet(t).count() for t in tmps.values())
        if rows_in != rows_out + quarantined:
            raise DataError(
                f"{what} lost rows: {rows_in} in, {rows_out} out + {quarantined} quarantined; "
                "nothing was written"
            )
    except BaseException:
        for t in tmps.values():
            if fs.exists(t):
                fs.delete(t)
        raise
    for final, t in tmps.items():
        fs.replace(t, final)
    return rows_in, rows_out, quarantined


# What a stage's memory depends on, by stage: the settings the out-of-memory line names
MEMORY_KNOBS = {
    "baseline": "features.tf.num_features, baseline.parallelism, baseline.grid",
    "features": "features.tf.num_features, features.sequence.vocab_size",
    "score": "score's batch size",
    "embed": "embed.batch_size, embed.max_length",
    "embed_baseline": "embed_baseline.parallelism, embed_baseline.grid",
}


def jvm_failure(e: BaseException, stage: str, cfg: SparkConfig) -> ResourceError | None:
    err = _jvm_failure(e, stage, cfg)
    if err is not None:
        err.__cause__ = e  # --verbose shows the JVM's trace
    return err


def _jvm_failure(e: BaseException, stage: str, cfg: SparkConfig) -> ResourceError | None:
    """A JVM resource failure as one line naming the setting to change; None otherwise.

    Py4J's error text carries the Java exception and its causes, so an OutOfMemoryError
    deep in an MLlib fit, a lost executor and a SparkContext that has stopped under the
    stage are told apart by the text, as Spark reports them."""
    from py4j.protocol import Py4JError, Py4JJavaError

    text = exception_text(e)
    if "java.lang.OutOfMemoryError" in text:
        what = next(
            (ln.strip() for ln in text.splitlines() if "java.lang.OutOfMemoryError" in ln), ""
        )
        return _out_of_memory(stage, what.split(": ", 1)[-1], cfg)

    if "ExecutorLostFailure" in text or "Lost executor" in text:
        return ResourceError(
            f"an executor was lost during stage '{stage}' (killed for memory or its host "
            "went away); raise spark.conf.spark.executor.memoryOverhead or "
            "spark.executor.memory, and see the cluster manager's log for the executor"
        )
    stopped = ("Cannot call methods on a stopped SparkContext", "SparkContext was shut down",
               "Answer from Java side is empty", "Error while sending or receiving")  # fmt: skip
    # a socket or Py4J error without a Java exception: the JVM may have exited, and its
    # exit code says why (a Py4JJavaError is an answer, so that JVM is alive: no wait).
    # A refused connection alone is no sign: an MLflow server that is down says it too.
    said = any(s in text for s in stopped)
    cut = isinstance(e, ConnectionError) or (
        isinstance(e, Py4JError) and not isinstance(e, Py4JJavaError)
    )
    # the context is gone or going: a task's OOM makes the JVM exit (code 52), and a fit
    # still running meets the torn-down context first (a Java answer, an NPE or
    # IllegalStateException that says nothing of memory) or a cut connection to a JVM
    # that no longer answers; one that answers is alive and not waited on
    # A connection to the gateway refused or cut is a JVM exiting even while a pooled
    # connection still answers "not stopped" (System.exit's shutdown hooks are running)
    gone = (cut and _raised_in_py4j(e)) or (
        (cut or isinstance(e, Py4JJavaError)) and compat.context_stopped()
    )
    code = _jvm_exit_code() if said or gone else None
    if code == JVM_OOM_EXIT:  # a task's OutOfMemoryError ends the local JVM with this code
        return _out_of_memory(stage, "java.lang.OutOfMemoryError in a task; the JVM exited", cfg)
    if code is not None or said or gone:
        memory = cfg.conf.get("spark.driver.memory", "1g (Spark's default)")
        return ResourceError(
            f"the SparkContext stopped during stage '{stage}' (the JVM exited: out of "
            f"memory or killed); spark.driver.memory is {memory}: raise "
            "spark.conf.spark.driver.memory, and rerun with --verbose for the JVM's log"
        )
    return None


def _raised_in_py4j(e: BaseException) -> bool:
    """Whether `e` (or what it was raised from) came out of Py4J's client or pyspark's own
    connections to the driver JVM (a collect() reads its rows from a local socket the JVM
    serves; a clean-clone CI saw one refused by a JVM exiting on OOM): a socket error there
    is the JVM, not some other server."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None:
            where = tb.tb_frame.f_code.co_filename
            if f"{os.sep}py4j{os.sep}" in where or (  # Spark Connect's server is not the JVM
                f"{os.sep}pyspark{os.sep}" in where and f"{os.sep}connect{os.sep}" not in where
            ):
                return True
            tb = tb.tb_next
        e = e.__cause__ or e.__context__
    return False


JVM_OOM_EXIT = 52  # SparkExitCode.OOM: what a local JVM exits with after a task's OOM


JVM_EXIT_WAIT_S = 60  # Spark's shutdown hooks run first; under CI load they outlast 15 s


def _jvm_exit_code() -> int | None:
    """The exit code of the JVM get_spark launched, once it has exited (None if alive)."""
    for proc in _LAUNCHED:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=JVM_EXIT_WAIT_S)
    return None


def _out_of_memory(stage: str, what: str, cfg: SparkConfig) -> ResourceError:
    memory = cfg.conf.get("spark.driver.memory", "1g (Spark's default)")
    if (cfg.master or "local").startswith("local"):
        where = (
            f"the driver, which is the executor too in local mode, has spark.driver.memory="
            f"{memory}: raise spark.conf.spark.driver.memory (under spark-submit: "
            "--driver-memory)"
        )
    else:
        where = (
            "raise spark.conf.spark.executor.memory (a task) or --driver-memory "
            f"(the driver, now {memory})"
        )
    knobs = MEMORY_KNOBS.get(stage)
    return ResourceError(
        f"the JVM ran out of memory in stage '{stage}' ({what}); {where}"
        + (f", or ask for less: {knobs}" if knobs else "")
    )
