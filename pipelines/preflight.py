"""Before the first stage: what would hang or fail later, found in seconds.

A cluster that cannot run a pipeline rarely says so. Executors asking for more memory than
any worker has wait forever behind `Initial job has not accepted any resources`; a barrier
stage with too few task slots waits ten minutes before Spark gives up; dynamic allocation
refuses barrier stages outright, but only after the data is written; an unwritable data
root, an unreachable tracking server or executors without the code fail a stage that may
be an hour in. `run_preflight` checks each of these against the pipeline's plan (its stages
and their settings) and the running SparkContext, and returns one `Finding` per check;
`require` raises `PreflightError` naming the first problem and the setting to change.

Local masters get the cheap checks only (no Spark job): their executors are the driver.
On a cluster the checks cost one tiny job on one executor (a file written to the data
root; sparkloom and torch imported; a file beside the checkpoints read and written through
pyarrow.fs) and a wait of at most `preflight.timeout_s` for executors to register.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import sys
import time
import uuid
from dataclasses import dataclass

from pyspark.sql import SparkSession

from sparkloom.models import storage
from sparkloom.pipelines import compat
from sparkloom.pipelines.catalog import Catalog, local_path
from sparkloom.pipelines.config import Config
from sparkloom.pipelines.deep import barrier_refusal, dynamic_allocation, trained_section
from sparkloom.pipelines.errors import SparkloomError
from sparkloom.pipelines.secrets import mask
from sparkloom.pipelines.stages import DEEP_STAGES

log = logging.getLogger(__name__)

SETTLE_S = 5.0  # executors whose count has not changed for this long are all there will be


class PreflightError(SparkloomError):
    """The cluster or the config cannot run the planned stages; nothing has started."""

    exit_code = 6


@dataclass
class Finding:
    check: str
    found: str
    problem: str | None = None  # one line naming the setting to change; None: fine
    warning: bool = False  # a problem that does not stop the run


def require(spark: SparkSession, cfg: Config, stages: list[str]) -> list[Finding]:
    """Run the checks; log the table; raise PreflightError on the first problem."""
    started = time.monotonic()
    findings = run_preflight(spark, cfg, stages)
    log.info("preflight (%.1fs):\n%s", time.monotonic() - started, table(findings))
    for f in findings:
        if f.problem and f.warning:
            log.warning("preflight: %s", f.problem)
    problems = [f for f in findings if f.problem and not f.warning]
    if problems:
        more = f" (and {len(problems) - 1} more: see the preflight table)"
        raise PreflightError(
            f"preflight: {problems[0].problem}" + (more if len(problems) > 1 else "")
        )
    return findings


def table(findings: list[Finding]) -> str:
    width = max(len(f.check) for f in findings)
    rows = []
    for f in findings:
        verdict = "ok" if not f.problem else ("WARNING" if f.warning else "PROBLEM")
        rows.append(f"  {f.check:<{width}}  {verdict:<7}  {f.found}")
    return "\n".join(rows)


def run_preflight(spark: SparkSession, cfg: Config, stages: list[str]) -> list[Finding]:
    master = compat.master(spark)
    local = master.startswith("local")
    deep = [s for s in stages if s in DEEP_STAGES]
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    where = " over Spark Connect" if compat.is_connect(spark) else ""
    findings = [Finding("master", f"{master} (application {compat.application_id(spark)}){where}")]
    findings.append(_driver_memory(spark, cfg))
    slots = _executors(spark, cfg, deep, local, findings)
    findings += _barrier(spark, cfg, deep, slots)
    findings.append(_data_root_from_driver(catalog))
    shared = None  # a probe folder beside the checkpoints, when the driver could write it
    if deep:
        shared, finding = _checkpoints(catalog, deep)
        findings.append(finding)
    try:
        if not local and slots:
            findings += _from_an_executor(spark, cfg, catalog, deep, shared)
    finally:
        if shared is not None:
            with contextlib.suppress(Exception):
                storage.rmtree(shared)
    findings.append(_mlflow(cfg))
    return findings


# --- the checks ------------------------------------------------------------------------------


def _driver_memory(spark: SparkSession, cfg: Config) -> Finding:
    """spark.driver.memory in the config sizes a JVM the config starts, not one spark-submit
    started first (client mode): say so when the heap is well below what was asked."""
    heap_mb = compat.driver_heap_mb(spark)
    if heap_mb is None:
        return Finding("driver memory", "the Connect server's (not visible to a client)")
    found = f"heap {heap_mb:,.0f} MB"
    asked = cfg.spark.conf.get("spark.driver.memory")
    wanted_mb = _megabytes(str(asked)) if asked is not None else None
    if wanted_mb is None or heap_mb >= 0.8 * wanted_mb:
        return Finding("driver memory", found)
    return Finding(
        "driver memory",
        f"{found}, config asks {asked}",
        f"spark.driver.memory={asked} from the config had no effect: the driver JVM was already "
        f"running with a {heap_mb:,.0f} MB heap (spark-submit starts it before the config is "
        f"read); pass spark-submit --driver-memory {asked}",
        warning=True,
    )


def _executors(
    spark: SparkSession, cfg: Config, deep: list[str], local: bool, findings: list[Finding]
) -> int:
    """Task slots the application has (executors x cores / spark.task.cpus), after waiting up
    to preflight.timeout_s for them: until enough for the widest barrier stage are there, or
    their number has settled."""
    if not local and dynamic_allocation(spark):  # executors come when tasks wait: no waiting
        slots = compat.task_slots(spark)
        findings.append(Finding("executors", f"on demand (dynamic allocation), {slots} task "
                                "slots now"))  # fmt: skip
        return slots
    barrier = [_distributor(cfg, s) for s in deep if not _distributor(cfg, s).local_mode]
    need = max((dc.num_processes for dc in barrier), default=1)
    timeout = cfg.preflight.timeout_s
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        if compat.context_stopped(spark):
            findings.append(Finding(
                "executors", "the SparkContext stopped",
                f"the SparkContext stopped while waiting for executors: the master at "
                f"{compat.master(spark)} refused or lost the application (its reason is in "
                "the driver's log above)",
            ))  # fmt: skip
            return 0
        slots = compat.task_slots(spark)
        executors = 1 if local else compat.registered_executors(spark)
        if executors is None:  # a Connect client: the server's executors are its business
            break
        now = time.monotonic()
        if executors != last:
            last, since = executors, now
        settled = executors > 0 and now - since >= SETTLE_S
        if local or slots >= need or settled or now >= deadline:
            break
        time.sleep(0.5)
    conf = spark.conf
    memory = conf.get("spark.executor.memory", "1g")
    cores = conf.get("spark.executor.cores", "all of a worker's")
    if local:
        findings.append(
            Finding("executors", f"the driver, {slots} task slots ({compat.master(spark)})")
        )
        return slots
    if executors is None:
        findings.append(Finding("executors", f"the Connect server's, {slots} task slots (its "
                                "default parallelism)"))  # fmt: skip
        return slots
    if executors == 0:
        findings.append(Finding(
            "executors", f"none within {timeout}s",
            f"no executor registered within {timeout}s: no worker could give one "
            f"spark.executor.memory={memory} and spark.executor.cores={cores} (Spark would wait "
            "forever); ask for what a worker has (spark-submit --executor-memory/--executor-"
            "cores, or spark.conf), or raise preflight.timeout_s if the cluster scales up slowly",
        ))  # fmt: skip
        return 0
    findings.append(Finding(
        "executors", f"{executors} ({memory} each, cores: {cores}), {slots} task slots"
    ))  # fmt: skip
    return slots


def wait_for_slots(spark: SparkSession, need: int, timeout_s: float) -> int:
    """The application's task slots, once there are `need` or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (
        (slots := compat.task_slots(spark)) < need
        and time.monotonic() < deadline
        and not compat.context_stopped(spark)
    ):
        time.sleep(0.5)
    return slots


def _distributor(cfg: Config, stage: str):
    return getattr(cfg, trained_section(cfg, stage)).distributor


def _barrier(spark: SparkSession, cfg: Config, deep: list[str], slots: int) -> list[Finding]:
    out = []
    dynamic = dynamic_allocation(spark)
    gpus = float(spark.conf.get("spark.task.resource.gpu.amount", "0") or 0)
    for stage in deep:
        dc = _distributor(cfg, stage)
        if dc.local_mode:
            out.append(Finding(f"{stage}: ranks", f"{dc.num_processes} on the driver (local_mode)"))
            continue
        found = f"{dc.num_processes} ranks as one barrier stage, {slots} task slots"
        problem = barrier_refusal(compat.master(spark), dynamic, dc.local_mode)
        if problem is None and slots and dc.num_processes > slots:
            problem = (
                f"'{stage}' trains {dc.num_processes} ranks as one barrier stage, which needs "
                f"{dc.num_processes} task slots at once, and the application has {slots} "
                f"(executors x spark.executor.cores / spark.task.cpus): lower "
                f"{trained_section(cfg, stage)}.distributor.num_processes to {slots} or give the "
                "application more executors or cores"
            )
        if problem is None and dc.use_gpu and gpus < 1:
            problem = (
                f"{trained_section(cfg, stage)}.distributor.use_gpu=true but spark.task.resource.gpu."
                "amount is not set: give tasks GPUs (spark.task.resource.gpu.amount=1 and "
                "spark.executor.resource.gpu.amount with a discovery script) or set use_gpu=false"
            )
        out.append(Finding(f"{stage}: ranks", found, problem))
    return out


def _data_root_from_driver(catalog: Catalog) -> Finding:
    root = catalog.base
    shown = mask("data_root", root)
    probe = f"{root}/_preflight-{uuid.uuid4().hex[:8]}"
    fs = catalog.fs
    try:
        fs.mkdirs(root)
        fs.write_text(probe, "sparkloom preflight\n")
        fs.delete(probe)
    except Exception as e:  # noqa: BLE001 - any refusal is the finding
        return Finding(
            "data root", f"{shown}: not writable",
            f"pipeline.data_root {shown} is not writable from the driver ({_short(e)}); point "
            "pipeline.data_root at a folder this user can write",
        )  # fmt: skip
    return Finding("data root", f"{shown}: writable from the driver")


def _checkpoints(catalog: Catalog, deep: list[str]) -> tuple[str | None, Finding]:
    """(a probe folder beside the deep stages' work dirs, the finding): rank 0 writes
    checkpoints and the exported model there through pyarrow.fs (models.storage), the
    driver reads them back, so the driver must reach that filesystem the same way."""
    work = catalog.uri(f"{deep[0]}_work")
    folder = work.rstrip("/").rsplit("/", 1)[0]
    shown = mask("data_root", folder)
    probe = storage.join(folder, f"_preflight-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_text(storage.join(probe, "driver"), "sparkloom preflight")
        storage.read_text(storage.join(probe, "driver"))
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        with contextlib.suppress(Exception):
            storage.rmtree(probe)
        return None, Finding(
            "checkpoints", f"{shown}: not writable",
            f"the deep stages' checkpoints at {shown} cannot be written through pyarrow.fs "
            f"({_short(e)}): for hdfs:// the driver and executors need libhdfs (HADOOP_HOME, "
            "CLASSPATH=$(hadoop classpath --glob)); for s3a:// AWS credentials in the "
            "environment; or point pipeline.data_root at a folder this user can write",
        )  # fmt: skip
    return probe, Finding("checkpoints", f"{shown}: writable from the driver")


def _from_an_executor(
    spark: SparkSession, cfg: Config, catalog: Catalog, deep: list[str], shared: str | None
) -> list[Finding]:
    """One task on one executor: import sparkloom and torch, read the file the driver wrote
    beside the checkpoints (`shared`) and write one back, count CUDA devices; and a one-row
    write to the data root."""
    report = _probe(spark, shared)
    out = []
    if "error" in report:
        what = report["error"]
        missing_torch = "torch" in what and "No module" in what
        fix = (
            "install the dependencies in the executors' Python (spark.pyspark.python or "
            "PYSPARK_PYTHON names it)" if missing_torch else
            "ship it with spark-submit --py-files dist/sparkloom.zip (make dist builds it)"
        )  # fmt: skip
        out.append(Finding(
            "code on executors", what,
            f"the executors cannot import {'torch' if missing_torch else 'sparkloom'} ({what}); "
            f"{fix}",
        ))  # fmt: skip
    else:
        driver_py = "{}.{}".format(*sys.version_info[:2])
        found = (f"python {report['python']}, torch {report['torch']}, sparkloom from "
                 f"{report['sparkloom']}")  # fmt: skip
        problem = None
        if report["python"] != driver_py:
            problem = (
                f"the executors run Python {report['python']} and the driver {driver_py}; "
                "PySpark needs the same minor version: point spark.pyspark.python at a matching "
                "interpreter"
            )
        out.append(Finding("code on executors", found, problem))
        if shared is not None:
            seen = report.get("shared") == "yes" and storage.exists(
                storage.join(shared, "executor")
            )
            shown = mask("data_root", shared.rsplit("/", 1)[0])
            out.append(Finding(
                "checkpoints from executors", f"{shown}: {'shared' if seen else 'not shared'}",
                None if seen else
                f"an executor cannot read and write the driver's checkpoint folder {shown} "
                f"({report.get('shared', 'no')}): rank 0 writes checkpoints and the exported "
                "model there and the driver reads them, so set pipeline.data_root to one "
                "filesystem for every node (hdfs://, s3a://, or a path all of them mount)",
            ))  # fmt: skip
        uses_gpu = any(_distributor(cfg, s).use_gpu for s in deep)
        if uses_gpu and report.get("cuda") == "0":
            out.append(Finding(
                "GPUs on executors", "no CUDA device",
                "the deep stages ask for GPUs (use_gpu) but an executor sees no CUDA device: "
                "check the executors' GPU discovery and a CUDA build of torch there",
            ))  # fmt: skip
    out.append(_data_root_from_executor(spark, catalog))
    return out


def _probe(spark: SparkSession, shared: str | None) -> dict[str, str]:
    """Run on one executor; a failure is reported, not raised (the task is not retried)."""
    import pandas as pd

    def probe(batches):
        import importlib
        import os
        import sys

        row = {"python": "{}.{}".format(*sys.version_info[:2])}
        try:
            pipelines = importlib.import_module("sparkloom.pipelines")
            importlib.import_module("sparkloom.models.train")
            torch = importlib.import_module("torch")
            row["torch"] = torch.__version__
            row["sparkloom"] = os.path.dirname(os.path.dirname(pipelines.__file__))
            row["cuda"] = str(torch.cuda.device_count())
        except Exception as e:  # noqa: BLE001 - reported to the driver
            row["error"] = f"{type(e).__name__}: {e}"
        if shared is not None:
            try:
                from sparkloom.models import storage

                storage.read_text(storage.join(shared, "driver"))
                storage.write_text(storage.join(shared, "executor"), "sparkloom preflight")
                row["shared"] = "yes"
            except Exception as e:  # noqa: BLE001 - reported to the driver
                row["shared"] = f"{type(e).__name__}: {e}"[:300]
        for _ in batches:
            pass
        yield pd.DataFrame({"key": list(row), "value": list(row.values())})

    rows = spark.range(1, numPartitions=1).mapInPandas(probe, "key string, value string").collect()
    return {r["key"]: r["value"] for r in rows}


def _data_root_from_executor(spark: SparkSession, catalog: Catalog) -> Finding:
    root = catalog.base
    probe = f"{root}/_preflight-{uuid.uuid4().hex[:8]}"
    shown = mask("data_root", root)
    try:
        spark.range(1, numPartitions=1).selectExpr("'sparkloom preflight' AS value").write.text(
            probe
        )
    except Exception as e:  # noqa: BLE001 - any refusal is the finding
        return Finding(
            "data root from executors", f"{shown}: not writable",
            f"pipeline.data_root {shown} is not writable from the executors, or is not one "
            f"folder for every node ({_short(e)}): give the executors' user write access, or "
            "point pipeline.data_root at a shared filesystem they can write",
        )  # fmt: skip
    finally:
        with contextlib.suppress(Exception):
            catalog.fs.delete(probe)
    return Finding("data root from executors", f"{shown}: writable from a task")


def _mlflow(cfg: Config) -> Finding:
    uri = cfg.mlflow.tracking_uri
    shown = mask("tracking_uri", uri)
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    if scheme in ("http", "https"):
        return _mlflow_server(uri, shown)
    if scheme == "sqlite":
        path = uri.removeprefix("sqlite:///")
        folder = os.path.dirname(os.path.abspath(path)) or "."
        try:
            os.makedirs(folder, exist_ok=True)
            if os.path.exists(path):  # read-only: a new store is made by MLflow, under our lock
                uri_ro = f"file:{os.path.abspath(path)}?mode=ro"
                with contextlib.closing(sqlite3.connect(uri_ro, uri=True, timeout=10)) as db:
                    db.execute("PRAGMA user_version")
        except (OSError, sqlite3.Error) as e:
            return Finding(
                "mlflow", shown,
                f"the MLflow store {shown} cannot be opened ({e}); set mlflow.tracking_uri to a "
                "file this user can write",
            )  # fmt: skip
        if not os.access(folder, os.W_OK):
            return Finding("mlflow", shown, f"the MLflow store's folder {folder} is not writable; "
                           "set mlflow.tracking_uri to a file this user can write")  # fmt: skip
        return Finding("mlflow", f"{shown}: opens")
    if scheme in ("", "file"):
        folder = local_path(uri) if scheme else uri
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            return Finding("mlflow", shown, f"the MLflow folder {shown} cannot be made ({e}); "
                           "set mlflow.tracking_uri to a folder this user can write")  # fmt: skip
        return Finding("mlflow", f"{shown}: a local folder")
    return Finding("mlflow", f"{shown}: not checked (scheme {scheme})")


def _mlflow_server(uri: str, shown: str) -> Finding:
    """One API call with no retries and a short timeout: a server that does not answer now
    would cost MLflow's whole retry budget (minutes) on every call later."""
    from mlflow.tracking import MlflowClient

    saved = {k: os.environ.get(k) for k in _NO_RETRIES}
    os.environ.update(_NO_RETRIES)
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        return Finding(
            "mlflow", f"{shown}: no answer",
            f"the MLflow tracking server at {shown} is unreachable ({_short(e)}): start it, or fix "
            "mlflow.tracking_uri (credentials: MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN)",
        )  # fmt: skip
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Finding("mlflow", f"{shown}: answers")


_NO_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _megabytes(size: str) -> float | None:
    """A JVM memory string (512m, 8g, 1024) in MB; None when it is not one."""
    units = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}
    s = size.strip().lower().removesuffix("b")
    try:
        if s and s[-1] in units:
            return float(s[:-1]) * units[s[-1]]
        return float(s) / 2**20  # bytes
    except ValueError:
        return None


def _short(e: BaseException) -> str:
    from sparkloom.pipelines.errors import exception_text

    lines = [ln.strip() for ln in exception_text(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]
