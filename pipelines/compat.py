"""The one module that knows a classic SparkSession from a Spark Connect client.

A Spark Connect client (`spark.remote: sc://host:15002`, or `local[N]` for a server in this
process) has no SparkContext, no RDDs and no JVM to call through Py4J: shared and serverless
clusters give nothing else. Everything sparkloom needs that only a classic session can answer
goes through a function here, which says what it does on Connect instead. Nowhere else in
jobs/ or pipelines/ touches `sparkContext`, `_jvm`, `_jsc` or `.rdd`.

What each classic-only call is for, and its Connect answer:
- `sparkContext.setLogLevel`: the driver's log4j level. On Connect the server owns its logs;
  only a `local[N]` server, which runs in this process, gets the level.
- `sparkContext.master`, `.applicationId`: read from the session conf (`spark.master`,
  `spark.app.id`), which a Connect server answers too.
- `sparkContext.defaultParallelism`: on Connect, the number of partitions the server gives
  `spark.range` (its leaf-node parallelism, which defaults to the same figure); one query,
  cached per session.
- `sparkContext.addFile` / `SparkFiles`: files for executors. Connect ships them with
  `addArtifacts(..., file=True)`, and a task finds them in the same place,
  `SparkFiles.getRootDirectory()` (the session's own folder on the executor).
- `_jvm` (log4j levels for task failures, netlib's BLAS, the driver heap) and `_jsc` (task
  slots, executors, whether the context stopped): facts about the driver JVM, which a Connect
  client cannot see; each function returns None or a neutral answer there, and its caller
  says so.
- `SparkContext.cancelAllJobs` on SIGTERM: `interruptAll()` on Connect.
- Worker threads (the baseline's parallel grid fits): a Connect session is thread-local in
  the client, so each thread is handed it (`inheritable_thread_target(session)`).
"""

from __future__ import annotations

import contextlib
from typing import Any

from pyspark.sql import SparkSession

_PARALLELISM: dict[str, int] = {}  # Connect session id -> its default parallelism


def is_connect(spark: Any) -> bool:
    """Whether `spark` is a Spark Connect client session (no import of the connect package:
    it needs grpc, which a classic install may lack)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def _context(spark: SparkSession):
    return None if is_connect(spark) else spark.sparkContext


def set_log_level(spark: SparkSession, level: str) -> None:
    """The driver's log level; for Connect, only a `local[N]` server in this process has one
    the client may set (a remote server's logging is its own)."""
    if (sc := _context(spark)) is not None:
        sc.setLogLevel(level)
        return
    from pyspark import SparkContext

    if (local_server := SparkContext._active_spark_context) is not None:
        local_server.setLogLevel(level)


def master(spark: SparkSession) -> str:
    """The cluster manager URL the application runs on (`local[2]`, `spark://...`, `yarn`)."""
    if (sc := _context(spark)) is not None:
        return sc.master
    return spark.conf.get("spark.master", "") or ""


def application_id(spark: SparkSession) -> str:
    if (sc := _context(spark)) is not None:
        return sc.applicationId
    return spark.conf.get("spark.app.id", "") or "unknown"


def default_parallelism(spark: SparkSession) -> int:
    """Spark's default number of partitions (the task slots of a static cluster)."""
    if (sc := _context(spark)) is not None:
        return max(1, sc.defaultParallelism)
    key = spark.session_id
    if key not in _PARALLELISM:
        from pyspark.sql import functions as F

        parts = spark.range(0, 1 << 16).select(F.spark_partition_id().alias("p"))
        last = parts.agg(F.max("p")).first()[0]
        _PARALLELISM[key] = max(1, int(last) + 1)
    return _PARALLELISM[key]


def thread_target(spark: SparkSession, fn):
    """`fn` for a worker thread of this session. A Connect session is thread-local on the
    client (pyspark.ml finds it with getActiveSession), so the thread is given it; classic
    threads share the one SparkContext as they are."""
    if not is_connect(spark):
        return fn
    from pyspark.util import inheritable_thread_target

    return inheritable_thread_target(spark)(fn)


def add_files(spark: SparkSession, paths: list[str]) -> None:
    """Send local files to every executor; a task finds each by its name under
    `shipped_files_root()`. Connect uploads them as the session's artifacts."""
    if (sc := _context(spark)) is not None:
        for path in paths:  # addFile takes no local directory outside local mode
            sc.addFile(path)
    elif paths:
        spark.addArtifacts(*paths, file=True)


def shipped_files_root() -> str:
    """In a task: the folder holding the files `add_files` shipped (classic or Connect)."""
    from pyspark import SparkFiles

    return SparkFiles.getRootDirectory()


def driver_files_root(spark: SparkSession) -> str | None:
    """The driver's own SparkFiles folder (where local masters keep --py-files), or None on
    Connect, whose driver is a server the client cannot see into."""
    if _context(spark) is None:
        return None
    from pyspark import SparkFiles

    return SparkFiles.getRootDirectory()


# Who logs a failed task, with its whole JVM stack, once per attempt, before the job's error
# reaches the driver: the stage's one-line error says what failed; --verbose keeps them
TASK_FAILURE_LOGGERS = (
    "org.apache.spark.executor.Executor",
    "org.apache.spark.ml.util.Instrumentation",  # MLlib logs a failed fit's error again
    "org.apache.spark.util.SparkUncaughtExceptionHandler",
    "org.apache.spark.scheduler.TaskSetManager",
    "org.apache.spark.scheduler.TaskSchedulerImpl",
    "org.apache.spark.storage.BlockManager",
    # a JVM exiting on OutOfMemoryError while the job's error reaches us: its shutdown
    # fails to remove cached RDDs and logs each with a stack (seen once in CI)
    "org.apache.spark.storage.BlockManagerMaster",
)


def quiet_task_failures(spark: SparkSession) -> None:
    """Silence the JVM's per-task failure logs in this driver (local mode: the executors
    too). A Connect server's logs are the server's."""
    if (sc := _context(spark)) is None:
        return
    jvm = sc._jvm
    off = jvm.org.apache.logging.log4j.Level.OFF
    for name in TASK_FAILURE_LOGGERS:
        jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(name, off)


def blas_in_use(spark: SparkSession) -> tuple[str, bool | None]:
    """(the BLAS MLlib computes with, whether it is native), from netlib's own lookup:
    NativeBLAS when a libblas.so.3 loads (OpenBLAS, MKL), else VectorBLAS or JavaBLAS."""
    if (sc := _context(spark)) is None:
        return "the Connect server's BLAS (not visible to a client)", None
    netlib = sc._jvm.dev.ludovic.netlib.blas
    with contextlib.suppress(Exception):
        return netlib.NativeBLAS.getInstance().getClass().getName(), True
    with contextlib.suppress(Exception):
        return netlib.BLAS.getInstance().getClass().getName(), False
    return "unknown", False


def driver_heap_mb(spark: SparkSession) -> float | None:
    """The driver JVM's maximum heap, or None on Connect."""
    if (sc := _context(spark)) is None:
        return None
    return sc._jvm.java.lang.Runtime.getRuntime().maxMemory() / 2**20


def task_slots(spark: SparkSession) -> int:
    """The tasks the application can run at once: what Spark checks a barrier stage against.
    On Connect, the default parallelism (the same figure on a static cluster)."""
    if (sc := _context(spark)) is None:
        return default_parallelism(spark)
    jsc = sc._jsc.sc()
    rp = jsc.resourceProfileManager().defaultResourceProfile()
    return int(jsc.maxNumConcurrentTasks(rp))


def registered_executors(spark: SparkSession) -> int | None:
    """Executors the scheduler has registered (the same source as the task slots), or None
    where the client cannot tell (Connect). The block managers, which getExecutorMemoryStatus
    counts, register a moment later: counting those, two executors that had given their
    slots still read as none."""
    if (sc := _context(spark)) is None:
        return None
    jsc = sc._jsc.sc()
    with contextlib.suppress(Exception):
        if n := int(jsc.getExecutorIds().size()):  # empty where not an allocation client
            return n
    return max(0, jsc.getExecutorMemoryStatus().size() - 1)


def context_stopped(spark: SparkSession | None = None) -> bool:
    """Whether the classic SparkContext is gone or stopping (one Py4J call on a live JVM).
    Always False for a Connect session: the server outlives a client's errors."""
    if spark is not None and is_connect(spark):
        return False
    from pyspark import SparkContext

    sc = SparkContext._active_spark_context  # a Python attribute: no JVM call
    if sc is None:
        return True
    try:
        return bool(sc._jsc.sc().isStopped())
    except Exception:  # the JVM no longer answers
        return True


def cancel_all_jobs() -> None:
    """Cancel every running Spark job of this process's session (from a signal handler's
    thread): the SparkContext's jobs, or the Connect session's operations."""
    from pyspark import SparkContext

    sc = SparkContext._active_spark_context  # a Python attribute: no JVM call
    if sc is not None:  # a classic session, or the server of a local Connect one
        sc.cancelAllJobs()
    connect = _active_connect_session()
    if connect is not None:
        connect.interruptAll()


def _active_connect_session():
    import sys

    module = sys.modules.get("pyspark.sql.connect.session")  # imported only if Connect is used
    if module is None:
        return None
    try:  # active() falls back to the default session: the signal's thread has no active one
        return module.SparkSession.active()
    except Exception:  # noqa: BLE001 - none, or stopped
        return None
