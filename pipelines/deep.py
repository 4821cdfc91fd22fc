"""Deep models (text and image) through TorchDistributor: data to Parquet, launch, collect, store.

The driver writes each split once through the converter, builds the plain
config `models.train.train_fn` takes, launches it with TorchDistributor and
stores the exported weights (a state dict and the config that builds the model),
the vocabulary and the label index as the `<stage>_model` dataset.

MLflow: the driver logs the history that `train_fn` returns, after training.
Ranks never talk to MLflow: `models/` stays free of it, executors need no
tracking credentials, and nothing races on the store (several processes opening
a fresh sqlite store at once crash in its migration). The cost is that metrics
reach MLflow at the end of the stage; progress shows live as rank 0's per-epoch
lines, which TorchDistributor streams to the driver's output.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkloom.models import storage
from sparkloom.models.masking import IGNORE_INDEX
from sparkloom.pipelines import compat, lm, subword
from sparkloom.pipelines.audit import CALIBRATION_FILE, calibrate, predictions_dir
from sparkloom.pipelines.catalog import Catalog, fingerprint
from sparkloom.pipelines.config import Config, DistributorConfig
from sparkloom.pipelines.context import StageContext, context, run_stage
from sparkloom.pipelines.converter import make_spark_converter
from sparkloom.pipelines.errors import (
    ConfigError,
    DataError,
    SparkloomError,
    Terminated,
    exception_text,
)
from sparkloom.pipelines.spark import terminating
from sparkloom.pipelines.stages import IMAGE_MODELS, SPECS
from sparkloom.pipelines.text import load_vocabulary
from sparkloom.pipelines.warm import BATCHES_FILE, data_batches, init_spec
from sparkloom.pipelines.warm import plan as warm_plan

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


class TrainingError(SparkloomError):
    """Distributed training failed: the message (one line) names the rank and what it raised;
    `tail` holds the last lines of that rank's traceback."""

    exit_code = 4

    def __init__(self, message: str, tail: str = "", attempts: int = 1):
        super().__init__(message)
        self.tail, self.attempts = tail, attempts


@dataclass
class DeepResult:
    model: str
    labels: list[str]
    history: list[dict[str, float]]
    confusion: dict[str, list[list[int]]]
    metrics: dict[str, float]
    best_epoch: int | None
    stopped_early: bool
    resumed_from: dict[str, Any] | None
    num_parameters: int
    world_size: int
    train_seconds: float
    wall_seconds: float
    model_config: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)  # misclassified test examples
    initial: dict[str, float] = field(default_factory=dict)  # validation metrics before training
    steps: list[dict[str, float]] = field(default_factory=list)  # every log_every_steps
    evals: list[dict[str, float]] = field(default_factory=list)  # every eval_every_steps
    data_stats: dict[str, float] = field(default_factory=dict)  # what the data step counted
    attempts: int = 1  # launcher tries it took (retries resume from the last checkpoint)
    init_report: dict[str, Any] = field(default_factory=dict)  # a checkpoint's weights
    warm_start: dict[str, Any] | None = None  # pipelines.warm: where from, rows trained on
    calibration: dict[str, Any] = field(default_factory=dict)  # pipelines.audit.calibrate
    predictions: str | None = None  # validation and test logits (pipelines.audit's layout)
    skipped: bool = False

    def summary(self) -> str:
        m = self.metrics
        if not self.labels:  # a language model
            return (
                f"{self.model}: test loss {m.get('test_loss', float('nan')):.4f} "
                f"(perplexity {m.get('test_perplexity', float('nan')):.1f}), val loss "
                f"{m.get('val_loss', float('nan')):.4f}, {len(self.history)} epochs, "
                f"{self.num_parameters:,} parameters, {self.world_size} processes, "
                f"{self.train_seconds:.1f}s training"
            )
        resumed = f", resumed from step {self.resumed_from['step']}" if self.resumed_from else ""
        return (
            f"{self.model}: test accuracy {m.get('test_accuracy', float('nan')):.4f}, "
            f"val accuracy {m.get('val_accuracy', float('nan')):.4f}, "
            f"{len(self.history)} epochs (best {self.best_epoch}){resumed}, "
            f"{self.num_parameters:,} parameters, {self.world_size} processes, "
            f"{self.train_seconds:.1f}s training / {self.wall_seconds:.1f}s with launch"
        )


def run_config(
    cfg: Config, stage: str, paths: dict[str, str], model_extra: dict[str, Any],
    data_extra: dict[str, Any], checkpoint_dir: str, status_dir: str, cpu_threads: int | None,
) -> dict[str, Any]:  # fmt: skip
    """The plain dict `train_fn` takes (everything picklable, nothing Spark).

    model_extra: what the data decides about the model (vocabulary size, image shape,
    number of classes); data_extra: how batches map to model inputs.
    """
    section = getattr(cfg, stage)
    model = asdict(section.model) if hasattr(section, "model") else {}
    return {
        "model": {"name": stage, "config": {**model, **model_extra}},
        "data": {"train": paths["train"], "validation": paths.get("validation"),
                 "test": paths.get("test"), **data_extra},
        "training": asdict(section.training),
        "checkpoint": {"dir": checkpoint_dir},
        "cpu_threads": cpu_threads,
        "timeout_s": section.distributor.timeout_s,
        "status_dir": status_dir,
        # test hook: "rank=R,step=S,mode=exit|raise|hang" (see models/train/distributed.py)
        "fault": os.environ.get("SPARKLOOM_FAULT"),
    }  # fmt: skip


def launch(
    spark: SparkSession, train_config: dict[str, Any], dc: DistributorConfig
) -> dict[str, Any]:
    """Run `train_fn` with TorchDistributor, retrying a failed run up to
    `distributor.max_retries` times; each try resumes from the last checkpoint. Spark never
    retries a failed barrier stage, and TorchDistributor's own error says only that training
    failed: a failure becomes one TrainingError that names the rank and carries the tail of
    its traceback. The result (rank 0's) says how many tries it took (`attempts`)."""
    from pyspark.ml.torch.distributor import TorchDistributor

    use_gpu = dc.use_gpu
    if use_gpu is None:
        use_gpu = float(spark.conf.get("spark.task.resource.gpu.amount", "0") or 0) > 0
    status_dir = train_config["status_dir"]
    tries = 1 + dc.max_retries
    for attempt in range(1, tries + 1):
        storage.rmtree(status_dir)
        distributor = TorchDistributor(
            num_processes=dc.num_processes, local_mode=dc.local_mode, use_gpu=use_gpu
        )
        started = time.monotonic()
        try:
            result = distributor.run(rank_entry(spark), {**train_config, "attempt": attempt})
            return {**result, "attempts": attempt}
        except Exception as e:
            if terminating():  # SIGTERM cancelled the job: stop, do not retry
                raise Terminated(terminating()) from e
            message, tail = explain_failure(status_dir, dc.num_processes, e)
            seconds = time.monotonic() - started
            if attempt == tries:
                suffix = f" (try {attempt} of {tries})" if tries > 1 else ""
                raise TrainingError(message + suffix, tail, attempt) from e
            short = _slots_short(spark, dc)
            if short:  # Spark would wait 10 minutes for them, then fail the retry anyway
                raise TrainingError(f"{message}; not retried: {short}", tail, attempt) from e
            log.warning("training try %d of %d failed after %.1fs: %s; retrying from the last "
                        "checkpoint", attempt, tries, seconds, message)  # fmt: skip
    raise AssertionError("unreachable")


SLOTS_WAIT_S = 60  # for lost executors to come back before a retry


def _slots_short(spark: SparkSession, dc: DistributorConfig) -> str | None:
    """Why a retry's barrier stage cannot start (too few task slots once lost executors have
    had SLOTS_WAIT_S to come back), or None."""
    if dc.local_mode:
        return None
    from sparkloom.pipelines.preflight import wait_for_slots

    slots = wait_for_slots(spark, dc.num_processes, SLOTS_WAIT_S)
    if slots >= dc.num_processes:
        return None
    return (f"the application has {slots} task slots left and the barrier stage needs "
            f"{dc.num_processes} (lost executors did not come back within {SLOTS_WAIT_S}s); "
            "rerun when the cluster has them, or lower distributor.num_processes")  # fmt: skip


def trained_section(cfg: Config, stage: str) -> str:
    """The config section whose model a deep stage trains (distill: the student's)."""
    return cfg.distill.student if stage == "distill" else stage


def dynamic_allocation(spark: SparkSession) -> bool:
    return spark.conf.get("spark.dynamicAllocation.enabled", "false").strip().lower() == "true"


def barrier_refusal(master: str, dynamic: bool, local_mode: bool) -> str | None:
    """Why Spark would refuse this run's barrier stage, or None. TorchDistributor runs one
    rank per task of a barrier stage (unless local_mode), and Spark refuses barrier stages
    under dynamic allocation (SPARK-24942; it ignores dynamic allocation on local masters).
    Caught before any data is written, instead of as a launch that fails every try with
    Spark's reason only in the JVM's log."""
    if local_mode or master.startswith("local") or not dynamic:
        return None
    return (
        "distributed training runs its ranks as a Spark barrier stage, which Spark refuses "
        "under dynamic allocation (SPARK-24942): set spark.dynamicAllocation.enabled=false "
        "(spark.conf in the config, or spark-submit --conf), or distributor.local_mode=true "
        "to run the ranks on the driver"
    )


def check_barrier(spark: SparkSession, dc: DistributorConfig) -> None:
    why = barrier_refusal(compat.master(spark), dynamic_allocation(spark), dc.local_mode)
    if why:
        raise ConfigError(why)


def rank_entry(spark: SparkSession):
    """`train_fn` as a rank can import it where sparkloom is not installed.

    TorchDistributor starts every rank as a new Python (torchrun) that inherits the
    executor's environment but not the sys.path where Spark put the --py-files, so
    `import sparkloom` fails there. This closure is pickled by value (cloudpickle cannot
    import a local function) and puts those files on the path first: by name (an
    executor keeps them in its working directory, which the ranks inherit) or in the
    driver's SparkFiles folder (local masters).
    """
    submitted = spark.conf.get("spark.submit.pyFiles", "") or ""
    names = [os.path.basename(p) for p in submitted.split(",") if p]
    root = compat.driver_files_root(spark)
    paths = [p for n in names for p in (n, *([os.path.join(root, n)] if root else []))]

    def run(config: dict[str, Any]) -> dict[str, Any]:
        import os
        import sys

        for path in paths:
            path = os.path.abspath(path)
            if os.path.exists(path) and path not in sys.path:
                sys.path.insert(0, path)
        from sparkloom.models.train import train_fn

        return train_fn(config)

    return run


_PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                 "remote process exited", "ProcessGroupGloo", "NCCL communicator was aborted",
                 "stopped by SIGTERM from its launcher")  # fmt: skip


_TIMEOUT = ("Timed out", "timed out", "Timeout", "DistBackendError")
_STOPPED = "stopped by SIGTERM from its launcher"  # models.train.STOPPED


def explain_failure(status_dir: str, world_size: int, error: Exception) -> tuple[str, str]:
    """(one line: which rank failed first and why, the tail of its traceback), read from the
    ranks' status files (rank-N.started/.done/.error)."""
    state: dict[int, tuple[str, str]] = {}
    for name in storage.listdir(status_dir):
        if not name.startswith("rank-") or ".tmp" in name:
            continue
        rank, what = name.removeprefix("rank-").split(".", 1)
        text = storage.read_text(storage.join(status_dir, name))
        if what == "error" or int(rank) not in state:
            state[int(rank)] = (what, text)
    silent = [r for r in range(world_size) if state.get(r, ("",))[0] == "started"]
    raised = {r: t for r, (w, t) in state.items() if w == "error"}
    stopped = [r for r, t in sorted(raised.items()) if _STOPPED in t]  # by torchrun/Spark
    timed_out = {r: t for r, t in raised.items() if any(p in t for p in _TIMEOUT)}
    own = {r: t for r, t in raised.items()
           if r not in timed_out and not any(p in t for p in _PEER_FAILURE)}  # fmt: skip
    never = [r for r in range(world_size) if r not in state]
    hung = sorted(set(silent + stopped) - set(timed_out)) if timed_out else []
    lost_executor = _lost_executor(exception_text(error))
    tail = ""
    if own:
        r, text = sorted(own.items())[0]
        lines = [ln for ln in text.strip().splitlines()[1:] if ln.strip()]  # 1st: pid, host
        culprit, tail = f"rank {r} raised {lines[-1].strip()}", "\n".join(lines[-12:])
    elif hung:  # it made no progress, its peers timed out, then it was killed or stopped
        waiting = sorted(timed_out)
        culprit = (f"rank {hung[0]} hung: ranks {waiting} timed out waiting for it in a "
                   "collective (distributor.timeout_s)")  # fmt: skip
        tail = "\n".join(timed_out[waiting[0]].strip().splitlines()[-6:])
        silent = []
    elif silent and lost_executor:
        culprit = f"rank {silent[0]} died with its executor: Spark lost {lost_executor}"
    elif silent:
        culprit = (f"rank {silent[0]} died without a Python error (killed, out of memory, or "
                   f"os._exit)")  # fmt: skip
    elif raised:
        r, text = sorted(raised.items())[0]
        culprit = f"rank {r} lost its peers: {[ln for ln in text.splitlines() if ln.strip()][-1]}"
    elif never:
        culprit = (
            f"ranks {never} never started (no free task slots, the Python workers failed, or "
            "the ranks could not import sparkloom: see their output above; on a cluster ship "
            "it with --py-files)"
        )
    else:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        culprit = f"TorchDistributor failed: {first}"
    others = sorted(set(raised) - set(own)) if (silent or own) else []
    lost = f"; ranks {others} then lost their peer" if others else ""
    return f"training failed: {culprit}{lost} (status files in {storage.shown(status_dir)})", tail


def write_splits(
    spark: SparkSession, cfg: Config, catalog: Catalog, stage: str, inputs: DeepInputs
) -> dict[str, str]:
    """Each non-empty split of the stage's data through the converter's Parquet cache:
    split -> the folder the ranks read. The same data (in any session) reuses its cache."""
    cache = cfg.pipeline.cache_dir or catalog.path("converter_cache")
    # what the Python functions in the data's plan (tokenizers, image decoding) depend on:
    # the stage's settings and the files it keeps (a tokenizer trained or loaded here)
    udf_inputs = fingerprint(cfg.stage_hash(stage), sorted(inputs.files.items()))
    # A canonical layout: rows hashed to partitions by id and sorted by id, so the files the
    # loader reads (and the training order its seeded shuffle makes) do not depend on how
    # the input happened to be listed or partitioned: the same data trains the same model.
    files = int(spark.conf.get("spark.sql.shuffle.partitions", "8"))
    paths = {}
    for split in SPLITS:
        part = (
            inputs.data.filter(F.col("split") == split)
            .drop("split")
            .repartition(files, "id")
            .sortWithinPartitions("id")
        )
        converter = make_spark_converter(part, cache, shapes=inputs.shapes, udf_inputs=udf_inputs)
        if len(converter):
            paths[split] = converter.local_path
    return paths


_EXECUTOR_LOST = re.compile(r"ExecutorLostFailure \((executor \S+)[^)]*\)(?: Reason: ([^\n]+))?")


def _lost_executor(text: str) -> str | None:
    """'executor 1 (Worker shutdown)' from Spark's ExecutorLostFailure in a job's error."""
    m = _EXECUTOR_LOST.search(text)
    if m is None:
        return None
    reason = (m.group(2) or "").strip().rstrip(".")
    return f"{m.group(1)} ({reason[:200]})" if reason else m.group(1)


NUM_ERRORS = 64  # misclassified test examples a run returns (shown as a grid of images)


@dataclass
class DeepInputs:
    """What one kind of data gives a deep stage: rows, model/data settings, files to keep."""

    data: Any  # DataFrame of id, the model's input columns, label, split
    shapes: dict[str, list[int]]
    model_extra: dict[str, Any]
    data_extra: dict[str, Any]
    files: dict[str, str]  # name -> text, saved with the model
    init: dict[str, str] | None = None  # weights to start from (see models.registry.build_model)
    stats: dict[str, float] = field(default_factory=dict)  # counts from the data step (metrics)
    run_extra: dict[str, Any] = field(default_factory=dict)  # more of the run: distillation
    model_name: str | None = None  # the registry's model, when not the stage's own


def text_inputs(catalog: Catalog, labels: list[str]) -> DeepInputs:
    vocabulary = load_vocabulary(catalog)
    data = catalog.read("features", "features")
    if "token_ids" not in data.columns:
        raise DataError("the features dataset has no token_ids; set features.sequence.enabled=true")
    data = data.select(
        "id", F.col("token_ids").alias("input_ids"), F.col("label_index").cast("int").alias("label"),
        "split", *(["batch"] if "batch" in data.columns else []),
    )  # fmt: skip
    return DeepInputs(
        data, {}, {"vocab_size": len(vocabulary), "num_classes": len(labels)}, {},
        {"vocab.txt": "".join(w + "\n" for w in vocabulary)},
    )  # fmt: skip


def distill_json(cfg: Config) -> dict:
    """What distill.json beside a distilled student records."""
    d = cfg.distill
    return {"teacher": d.teacher, "student": d.student, "temperature": d.temperature,
            "alpha": d.alpha, "teacher_logits": d.teacher_logits}  # fmt: skip


def student_and_teacher(cfg: Config, catalog: Catalog, threads: int = 1) -> dict[str, float]:
    """What the distilled student costs beside its teacher: parameters, state-dict bytes and
    CPU scoring rows/s (`threads` threads, best of 3) on the test split, each model on its
    own inputs (BERT: WordPiece ids)."""
    from sparkloom.models.quantize import rows_per_second, serialized_bytes
    from sparkloom.models.train import load_exported
    from sparkloom.pipelines.quantize import test_inputs

    d, out = cfg.distill, {}
    for role, stage, name in (("student", "distill", d.student), ("teacher", d.teacher, d.teacher)):
        model_dir = catalog.local_path(f"{stage}_model")
        model = load_exported(model_dir, name)
        x, _, key = test_inputs(cfg, catalog, name, model_dir)
        out[f"{role}_parameters"] = float(sum(p.numel() for p in model.parameters()))
        out[f"{role}_bytes"] = float(serialized_bytes(model))
        out[f"{role}_rows_per_s"] = rows_per_second(model, x, key=key, threads=threads)
    out["student_speedup_vs_teacher"] = out["student_rows_per_s"] / out["teacher_rows_per_s"]
    out["student_size_vs_teacher"] = out["student_bytes"] / out["teacher_bytes"]
    return out


def distill_inputs(cfg: Config, catalog: Catalog, labels: list[str]) -> DeepInputs:
    """The student's token ids, and how it learns from the teacher: with
    teacher_logits=precomputed, the teacher's logits for every row of every split, computed
    once in Spark by batch scoring the teacher's current model with its own preprocessing
    (pipelines.scoring), stored as `teacher_logits` (log-probabilities); on_the_fly, the
    teacher's model directory, which the ranks load and run on the student's own ids."""
    from sparkloom.pipelines.scoring import ModelRef, score

    d = cfg.distill
    student = text_inputs(catalog, labels)
    student.files["distill.json"] = json.dumps(distill_json(cfg))
    spec: dict[str, Any] = {"temperature": d.temperature, "alpha": d.alpha}
    if d.teacher_logits == "on_the_fly":
        spec["teacher"] = {"name": d.teacher, "dir": catalog.uri(f"{d.teacher}_model")}
        student.run_extra = {"distill": spec}
        return student
    teacher_dir = catalog.local_path(f"{d.teacher}_model")
    ref = ModelRef("", d.teacher, teacher_dir, labels, cfg.model_dump(mode="json"))
    text = catalog.read("ingested", "ingest").select("id", "text")
    scored, quarantine, _ = score(text, ref)
    logits = scored.select(
        "id",
        F.transform("probabilities", lambda p: F.log(F.greatest(p, F.lit(1e-12)))).alias(
            "teacher_logits"
        ),
    ).localCheckpoint()  # the teacher scores every row once; the counts below reuse it
    data = student.data.join(logits, "id", "inner")
    stats = {
        "teacher_rows": float(logits.count()),
        "teacher_quarantined": float(quarantine.count()),
    }
    missing = student.data.join(logits, "id", "left_anti").count()
    if missing:
        raise DataError(
            f"distill: the teacher '{d.teacher}' scored no logits for {missing} training rows "
            "(blank after its own preprocessing); nothing was trained"
        )
    data_extra = {**student.data_extra, "extra_columns": ["teacher_logits"]}
    return DeepInputs(data, {}, student.model_extra, data_extra, student.files, stats=stats,
                      run_extra={"distill": {**spec, "column": "teacher_logits"}})  # fmt: skip


def image_inputs(cfg: Config, stage: str, catalog: Catalog, upstream: dict) -> DeepInputs:
    stats = upstream.get("image")
    if not stats:
        raise DataError(
            "the ingested dataset holds no images; set ingest.format to an image format"
        )
    c, h, w = stats["shape"]
    data = catalog.read("ingested", "ingest")
    data = data.select(
        "id", "image", F.col("label_index").cast("int").alias("label"), "split",
        *(["batch"] if "batch" in data.columns else []),
    )  # fmt: skip
    preprocess = {"column": "image", "shape": stats["shape"], "mean": stats["mean"],
                  "std": stats["std"]}  # fmt: skip
    return DeepInputs(
        data,
        {"image": stats["shape"]},
        {"in_channels": c, "height": h, "width": w, "num_classes": len(upstream["labels"])},
        {
            "inputs": {"images": "image", "labels": "label"},
            "image": {**preprocess, "augment": asdict(getattr(cfg, stage).augment)},
            "id_column": "id",
            "num_errors": NUM_ERRORS,
        },
        {"preprocess.json": json.dumps(preprocess, indent=2)},
    )


NSP_LABELS = ["is_next", "random_next"]  # BERT pretraining's classes (Hugging Face's order)
BERT_INPUTS = {"input_ids": "input_ids", "token_type_ids": "token_type_ids",
               "attention_mask": "input_ids_mask"}  # fmt: skip


def keep_tokenizer(path: str | None, make) -> tuple[str, dict]:
    """The tokenizer `make()` trains, kept at `path` beside the stage's checkpoints, so a run
    that resumes tokenizes with the vocabulary its checkpoint learned. Retraining is not
    the same: the trainers of Hugging Face tokenizers break frequency ties differently from
    run to run (the same texts gave 4 token sets and 8 id orders in 8 runs here)."""
    if path and storage.exists(path):
        kept = json.loads(storage.read_text(path))
        log.info("reusing the tokenizer this stage's checkpoints were trained with (%s)", path)
        return kept["tokenizer"], kept["info"]
    tokenizer_json, info = make()
    if path:
        storage.write_text(path, json.dumps({"tokenizer": tokenizer_json, "info": info}))
    return tokenizer_json, info


def bert_tokenizer(spark: SparkSession, cfg: Config, catalog: Catalog) -> tuple[str, dict]:
    """The WordPiece tokenizer as JSON, and where it came from: a local vocab.txt, or trained
    on a sample of the training split. Saved with the model as tokenizer.json (fine-tuning and
    scoring reuse it) and logged to MLflow as the `tokenizer/` artifact."""
    tc = cfg.bert_pretrain.tokenizer
    if tc.vocab_file:
        tok = subword.load_wordpiece(tc.vocab_file, tc.lowercase)
        info = {"source": "vocab_file", "vocab_file": tc.vocab_file}
    else:
        train = catalog.read("ingested", "ingest").filter(F.col("split") == "train")
        texts = subword.sample_texts(train, "text", tc.sample_docs, cfg.bert_pretrain.training.seed)
        tok = subword.train_wordpiece(texts, tc.vocab_size, tc.lowercase, tc.min_frequency)
        info = {"source": "trained", "documents": len(texts), "min_frequency": tc.min_frequency,
                "requested_vocab_size": tc.vocab_size}  # fmt: skip
        log.info("bert_pretrain: WordPiece vocabulary of %d trained on %d documents",
                 tok.get_vocab_size(), len(texts))  # fmt: skip
    return tok.to_str(), {**info, "vocab_size": tok.get_vocab_size(), "lowercase": tc.lowercase}


def bert_pretrain_inputs(
    spark: SparkSession, cfg: Config, catalog: Catalog, kept: str | None = None
) -> DeepInputs:
    bc = cfg.bert_pretrain
    tokenizer_json, tokenizer_info = keep_tokenizer(
        kept, lambda: bert_tokenizer(spark, cfg, catalog)
    )
    tok = subword.tokenizer_from_json(tokenizer_json)
    docs = catalog.read("ingested", "ingest")
    parts = []
    for split in SPLITS:  # pairs never cross splits
        ex = subword.pretraining_examples(
            docs.filter(F.col("split") == split), tokenizer_json, bc.max_length, bc.training.seed
        )
        parts.append(ex.withColumn("split", F.lit(split)))
    data = parts[0].unionByName(parts[1]).unionByName(parts[2]).select(
        F.col("example_id").alias("id"), "input_ids", "token_type_ids",
        F.col("next_sentence_label").alias("label"), "split",
    )  # fmt: skip
    special = [tok.token_to_id(t) for t in subword.SPECIAL_TOKENS if tok.token_to_id(t) is not None]
    vocab = tok.get_vocab_size()
    mlm = {"mask_token_id": tok.token_to_id("[MASK]"), "vocab_size": vocab,
           "special_ids": special, "first_normal_id": max(special) + 1,
           "probability": bc.mask_probability}  # fmt: skip
    data_extra: dict[str, Any] = {
        "inputs": {**BERT_INPUTS, "mlm_labels": "mlm_labels", "next_sentence_label": "label"}
    }
    if bc.masking == "static":
        data = static_masked(data, mlm, bc.static_copies, bc.training.seed)
        data_extra["pad_values"] = {"mlm_labels": IGNORE_INDEX}  # padding is never predicted
    else:
        data_extra["mlm"] = mlm
    return DeepInputs(
        data, {},
        {"vocab_size": vocab, "num_classes": 0, "pad_token_id": tok.token_to_id("[PAD]")},
        data_extra,
        {"tokenizer.json": tokenizer_json, "tokenizer_info.json": json.dumps(tokenizer_info)},
    )  # fmt: skip


def static_masked(data: DataFrame, mlm: dict, copies: int, seed: int) -> DataFrame:
    """Static masking: `copies` differently-masked copies of each training example (one of
    each validation/test example), masks seeded by (seed, split, id, copy)."""
    n = F.when(F.col("split") == "train", F.lit(copies)).otherwise(F.lit(1))
    data = data.withColumn("copy", F.explode(F.sequence(F.lit(0), n - 1)))
    key = F.concat_ws("/", "split", "id", F.col("copy").cast("string"))
    masked = subword.static_masks(F.col("input_ids"), key, mlm, seed)
    return data.select(
        F.when(F.col("copy") == 0, F.col("id"))
        .otherwise(F.concat(F.col("id"), F.lit("@copy"), F.col("copy").cast("string")))
        .alias("id"),
        masked["input_ids"].alias("input_ids"), masked["mlm_labels"].alias("mlm_labels"),
        "token_type_ids", "label", "split",
    )  # fmt: skip


def bert_finetune_inputs(cfg: Config, catalog: Catalog, labels: list[str]) -> DeepInputs:
    """Sequence classification from our bert_pretrain model, or from any local Hugging Face
    encoder directory (`hf_inputs`)."""
    bc = cfg.bert
    if bc.init_from != "bert_pretrain":
        return hf_classifier_inputs(bc, catalog, labels)
    pre = catalog.require("bert_pretrain_model", "bert_pretrain")
    model_dir = catalog.uri("bert_pretrain_model")
    tokenizer_json = storage.read_text(storage.join(model_dir, "tokenizer.json"))
    config = {**pre["result"]["model_config"], "num_classes": len(labels),
              "hidden_dropout": bc.dropout}  # fmt: skip
    init = {"kind": "bert_pretraining", "path": storage.join(model_dir, "state_dict.pt")}
    enc = subword.encode(tokenizer_json, bc.max_length, F.col("text"))
    data = catalog.read("ingested", "ingest").select(
        "id", enc["input_ids"].alias("input_ids"), enc["token_type_ids"].alias("token_type_ids"),
        F.col("label_index").cast("int").alias("label"), "split",
    )  # fmt: skip
    return DeepInputs(
        data, {}, config, {"inputs": {**BERT_INPUTS, "labels": "label"}},
        {"tokenizer.json": tokenizer_json}, init,
    )  # fmt: skip


def hf_classifier_inputs(bc, catalog: Catalog, labels: list[str]) -> DeepInputs:
    """A local Hugging Face encoder (any model_type AutoModelForSequenceClassification takes)
    fine-tuned with its own tokenizer, padding id and position limit. The model dataset is
    then a directory `transformers` loads as it is: config.json (our label names as
    id2label), model.safetensors, the tokenizer's files, plus labels.json."""
    from sparkloom.models.hf import check_hf_directory, hf_config, load_tokenizer, tokenizer_files

    path = os.path.abspath(os.path.expanduser(bc.init_from))  # the ranks' cwd is not ours
    try:
        check_hf_directory(path)
        tokenizer_json, tok = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise DataError(f"bert.init_from={path}: {e}") from None
    max_length = bc.max_length
    if tok.max_length and tok.max_length < max_length:
        log.info("bert: max_length %d exceeds what %s takes; using its %d", max_length, path,
                 tok.max_length)  # fmt: skip
        max_length = tok.max_length
    model_type = hf_config(path).get("model_type")
    log.info("bert: fine-tuning the %s checkpoint at %s (tokenizer from %s, padding id %d, "
             "max_length %d)", model_type, path, " + ".join(tok.files), tok.pad_token_id,
             max_length)  # fmt: skip
    enc = subword.encode(tokenizer_json, max_length, F.col("text"))
    data = catalog.read("ingested", "ingest").select(
        "id", enc["input_ids"].alias("input_ids"),
        F.col("label_index").cast("int").alias("label"), "split",
    )  # fmt: skip
    info = {"source": "init_from", "path": path, "model_type": model_type, "files": tok.files,
            "max_length": max_length, "pad_token_id": tok.pad_token_id}  # fmt: skip
    return DeepInputs(
        data, {},
        {"num_classes": len(labels), "pad_token_id": tok.pad_token_id, "labels": labels},
        {"inputs": {"input_ids": "input_ids", "attention_mask": "input_ids_mask",
                    "labels": "label"},
         "pad_values": {"input_ids": tok.pad_token_id}},
        {**tokenizer_files(path), "tokenizer_info.json": json.dumps(info)},
        {"kind": "hf_directory", "path": path},
        model_name="hf_classifier",
    )  # fmt: skip


def gpt2_tokenizer(cfg: Config, catalog: Catalog) -> tuple[str, dict]:
    """Byte-level BPE as JSON, and where it came from: a local GPT-2 vocabulary, or trained
    on a sample of the training split."""
    tc = cfg.gpt2.tokenizer
    vocab_path = tc.vocab_path or cfg.gpt2.init_from  # a checkpoint's own tokenizer by default
    if vocab_path:
        tok = subword.load_bytelevel_bpe(vocab_path)
        info = {"source": "vocab_path", "vocab_path": vocab_path}
    else:
        train = catalog.read("ingested", "ingest").filter(F.col("split") == "train")
        texts = subword.sample_texts(train, "text", tc.sample_docs, cfg.gpt2.training.seed)
        tok = subword.train_bytelevel_bpe(texts, tc.vocab_size, tc.min_frequency)
        info = {"source": "trained", "documents": len(texts), "min_frequency": tc.min_frequency,
                "requested_vocab_size": tc.vocab_size}  # fmt: skip
        log.info("gpt2: byte-level BPE vocabulary of %d trained on %d documents",
                 tok.get_vocab_size(), len(texts))  # fmt: skip
    return tok.to_str(), {**info, "vocab_size": tok.get_vocab_size(), "eot": subword.EOT}


def gpt2_inputs(cfg: Config, catalog: Catalog, kept: str | None = None) -> DeepInputs:
    """Packed blocks per split (ingest split documents, so no block mixes splits)."""
    from sparkloom.models.gpt2 import GPT2Config

    gc = cfg.gpt2
    tokenizer_json, tokenizer_info = keep_tokenizer(kept, lambda: gpt2_tokenizer(cfg, catalog))
    tok = subword.tokenizer_from_json(tokenizer_json)
    docs = catalog.read("ingested", "ingest")
    parts, stats = [], {}
    for split in SPLITS:
        packed = lm.pack(docs.filter(F.col("split") == split), tokenizer_json, gc.block_size,
                         gc.training.seed)  # fmt: skip
        stats |= packed.stats(split)
        log.info("gpt2: %s split: %d documents, %d tokens -> %d blocks of %d, %d tail tokens",
                 split, packed.documents, packed.tokens, packed.num_blocks, gc.block_size + 1,
                 packed.tail)  # fmt: skip
        if packed.tokens > 0 and packed.num_blocks == 0:
            raise DataError(
                f"the {split} split has {packed.tokens} tokens, less than one block of "
                f"{gc.block_size + 1}; lower gpt2.block_size or give that split more text"
            )
        parts.append(packed.blocks.select(F.col("block").cast("string").alias("id"), "tokens",
                                          F.lit(split).alias("split")))  # fmt: skip
    data = parts[0].unionByName(parts[1]).unionByName(parts[2])
    model = {k: v for k, v in asdict(gc.model).items() if v is not None}
    model |= {"vocab_size": tok.get_vocab_size(), "eos_token_id": tok.token_to_id(subword.EOT)}
    init = None
    if gc.init_from:
        init = {"kind": "hf_directory", "path": gc.init_from}
    else:
        n_positions = GPT2Config(**model).n_positions  # the preset's, unless set
        if gc.block_size > n_positions:
            raise DataError(
                f"gpt2.block_size {gc.block_size} exceeds the {gc.model.preset} preset's context "
                f"of {n_positions}; lower block_size or set gpt2.model.n_positions"
            )
    return DeepInputs(
        data, {}, model, {"inputs": {"tokens": "tokens"}},
        {"tokenizer.json": tokenizer_json, "tokenizer_info.json": json.dumps(tokenizer_info)},
        init, stats,
    )  # fmt: skip


OWN_LABELS = {"bert_pretrain": NSP_LABELS, "gpt2": []}  # the rest: the ingested labels


def stage_inputs(ctx: StageContext, labels: list[str], kept_tokenizer: str) -> DeepInputs:
    """What `ctx.stage` trains on: a classifier reads the features stage's token ids or the
    ingested images, by its modality; the stages below make their own."""
    cfg, catalog, stage = ctx.cfg, ctx.catalog, ctx.stage
    own = {
        "bert_pretrain": lambda: bert_pretrain_inputs(ctx.spark, cfg, catalog, kept_tokenizer),
        "bert": lambda: bert_finetune_inputs(cfg, catalog, labels),
        "gpt2": lambda: gpt2_inputs(cfg, catalog, kept_tokenizer),
        "distill": lambda: distill_inputs(cfg, catalog, labels),
    }
    if stage in own:
        return own[stage]()
    if stage in IMAGE_MODELS:
        return image_inputs(cfg, stage, catalog, ctx.upstream)
    return text_inputs(catalog, labels)


def run_deep(
    spark: SparkSession, cfg: Config, catalog: Catalog, stage: str, force: bool = False
) -> DeepResult:
    """Train `stage`'s model with TorchDistributor into <stage>_model; skipped when that model
    was made from the same inputs (pipelines/stages.py declares them) and config."""
    return run_stage(context(spark, cfg, catalog, stage, force), DeepResult, _train)


def _train(ctx: StageContext) -> DeepResult:
    spark, cfg, catalog, stage, fp = ctx.spark, ctx.cfg, ctx.catalog, ctx.stage, ctx.fingerprint
    force, upstream, out_name = ctx.force, ctx.upstream, ctx.output
    started = time.perf_counter()
    work = catalog.uri(f"{stage}_work")  # any filesystem: rank 0 writes it via models.storage
    checkpoint_dir = storage.join(work, fp, "checkpoints")
    kept_tokenizer = storage.join(work, fp, "tokenizer.json")
    if force:
        storage.rmtree(checkpoint_dir)
        storage.remove(kept_tokenizer)
    labels: list[str] = OWN_LABELS[stage] if stage in OWN_LABELS else upstream["labels"]
    inputs = stage_inputs(ctx, labels, kept_tokenizer)
    arch = trained_section(cfg, stage)  # the model it trains
    dc = getattr(cfg, arch).distributor
    check_barrier(spark, dc)  # before the data is written
    warm = None
    if getattr(cfg, arch).training.warm_start != "none" and not inputs.init:
        warm, inputs.data = warm_plan(ctx, arch, inputs.data, storage.join(work, fp))
        if warm.path:
            inputs.init = init_spec(warm, labels, inputs.files)
    batches = data_batches(upstream)
    if batches is not None:  # what a later warm start counts as seen
        inputs.files[BATCHES_FILE] = json.dumps(batches)
    inputs.data = inputs.data.drop("batch")
    paths = write_splits(spark, cfg, catalog, stage, inputs)
    if "train" not in paths:
        raise DataError("the train split is empty; check ingest.split")

    train_config = run_config(
        cfg, arch, paths, inputs.model_extra, inputs.data_extra, checkpoint_dir,
        storage.join(work, fp, "status"), cpu_threads(spark, dc),
    )  # fmt: skip
    train_config |= inputs.run_extra
    preds = None
    if SPECS[stage].kind == "classifier":  # every row's logits, for calibration and slices
        preds = predictions_dir(catalog, stage, fp)
        storage.rmtree(preds)
        train_config["predictions_dir"] = preds
        train_config["data"].setdefault("id_column", "id")
    if inputs.init:
        train_config["model"]["init"] = inputs.init
    if inputs.model_name:
        train_config["model"]["name"] = inputs.model_name
    log.info("%s: training with TorchDistributor (%d processes, local_mode=%s); checkpoints in %s",
             stage, dc.num_processes, dc.local_mode, storage.shown(checkpoint_dir))  # fmt: skip
    out = launch(spark, train_config, dc)
    calibrated = {}
    if preds:
        calibrated = calibrate(spark, preds, cfg.evaluation.bins, cfg.evaluation.calibrate)
        inputs.files[CALIBRATION_FILE] = json.dumps(calibrated, indent=2)
    result = DeepResult(
        model=arch,
        labels=labels,
        history=out["history"],
        confusion=out["confusion"],
        metrics=out["metrics"],
        best_epoch=out["best_epoch"],
        stopped_early=out["stopped_early"],
        resumed_from=out["resumed_from"],
        num_parameters=out["num_parameters"],
        world_size=out["world_size"],
        train_seconds=out["train_seconds"],
        wall_seconds=time.perf_counter() - started,
        model_config=out["model"]["config"],
        errors=out.get("errors", []),
        initial=out.get("initial", {}),
        steps=out.get("steps", []),
        evals=out.get("evals", []),
        data_stats=inputs.stats,
        attempts=out.get("attempts", 1),
        init_report=out.get("init_report", {}),
        warm_start=warm.as_dict() if warm else None,
        calibration=calibrated,
        predictions=preds,
    )
    export_dir = out["export_dir"]
    from sparkloom.models.train.checkpoint import exported_files  # torch: imported when used

    def save(tmp: str) -> None:
        tmp = catalog.fs.qualify(tmp)
        for name in exported_files(export_dir):
            storage.copy(storage.join(export_dir, name), storage.join(tmp, name))
        for name, text in {**inputs.files, "labels.json": json.dumps(labels)}.items():
            storage.write_text(storage.join(tmp, name), text)

    catalog.write(out_name, save, {"fingerprint": fp, "config_hash": ctx.config_hash,
                                   "result": asdict(result), "train_config": train_config})  # fmt: skip
    return result


def cpu_threads(spark: SparkSession, dc: DistributorConfig) -> int | None:
    """Threads per process, so N processes on one machine do not fight over its cores."""
    if dc.local_mode:
        return max(1, (os.cpu_count() or 1) // dc.num_processes)
    master = compat.master(spark)
    if master.startswith("local"):
        return max(1, int(spark.conf.get("spark.task.cpus", "1")))
    return int(spark.conf.get("spark.task.cpus", "1"))
