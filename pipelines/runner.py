"""Runs stages in order under one MLflow parent run, one child run per stage."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import mlflow
import numpy as np
from pyspark.sql import SparkSession

from sparkloom.pipelines import tracking
from sparkloom.pipelines.audit import CALIBRATION_FILE
from sparkloom.pipelines.baseline import BaselineResult, run_baseline, run_embed_baseline
from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.config import Config, flatten, stage_output
from sparkloom.pipelines.deep import DeepResult, run_deep, student_and_teacher
from sparkloom.pipelines.embed import EmbedResult, run_embed
from sparkloom.pipelines.errors import SparkloomError, Terminated, exception_text
from sparkloom.pipelines.images import ImageFeaturesResult, decode_grid, run_image_features
from sparkloom.pipelines.ingest import IngestResult, run_ingest
from sparkloom.pipelines.model_registry import RegisterResult, register
from sparkloom.pipelines.quantize import QuantizeResult, run_quantize
from sparkloom.pipelines.report import (
    classification_metrics,
    classification_report,
    confusion_figure,
    learning_curves_figure,
    misclassified_figure,
    reliability_figure,
    slices_markdown,
)
from sparkloom.pipelines.scoring import ScoreStageResult, run_score
from sparkloom.pipelines.spark import jvm_failure, terminating
from sparkloom.pipelines.stages import DEEP_STAGES, IMAGE_MODELS, LANGUAGE_MODELS
from sparkloom.pipelines.text import FeaturesResult, run_features

log = logging.getLogger(__name__)


class StageFailed(SparkloomError):
    """A stage raised: names the stage, keeps the reason's first line and its exit code."""

    def __init__(self, stage: str, cause: BaseException):
        text = exception_text(cause)
        first = tracking.mask("error", next((ln for ln in text.splitlines() if ln.strip()), ""))
        if isinstance(cause, SparkloomError):  # ours already say what is wrong and the fix
            super().__init__(f"stage '{stage}' failed: {first}")
        else:  # Spark/Py4J/torch: the first line; --verbose shows the whole traceback
            super().__init__(f"stage '{stage}' failed: {type(cause).__name__}: {first} "
                             "(rerun with --verbose for the full traceback)")  # fmt: skip
        self.stage, self.cause = stage, cause
        self.exit_code = getattr(cause, "exit_code", 1)


@dataclass
class PipelineOutcome:
    run_id: str
    stage_run_ids: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    model_uri: str | None = None  # the last model a stage logged


def run_pipeline(
    spark: SparkSession, cfg: Config, stages: list[str], force: bool = False, command: str = "run"
) -> PipelineOutcome:
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    with tracking.pipeline_run(cfg, command) as parent:
        outcome = PipelineOutcome(parent.info.run_id)
        for stage in stages:
            started = time.perf_counter()
            log.info("[%s] started", stage)
            try:
                result = _run_stage(spark, cfg, catalog, stage, force, parent, outcome, started)
            except StageFailed:
                raise
            except Exception as e:  # MLflow around the stage: its run's start, tags or end
                if terminating():
                    raise Terminated(terminating()) from e
                raise StageFailed(
                    stage, tracking.unavailable(e, cfg.mlflow.tracking_uri) or e
                ) from e
            seconds = time.perf_counter() - started
            note = " (up to date, skipped; --force redoes it)" if result.skipped else ""
            log.info("[%s] done in %.1fs%s: %s", stage, seconds, note, result.summary())
    return outcome


def _run_stage(
    spark: SparkSession, cfg: Config, catalog: Catalog, stage: str, force: bool, parent,
    outcome: PipelineOutcome, started: float,
) -> Any:  # fmt: skip
    """One stage in its child run: the stage's own failure is a StageFailed naming it (and
    the fix, for a JVM or tracking-server failure); the caller wraps MLflow's around it."""
    section = {k: v for k, v in flatten(cfg).items() if k.startswith(f"{stage}.")}
    redo = not force and _unrecorded(cfg, catalog, stage, parent.info.experiment_id)
    with tracking.stage_run(stage, params=section) as child:
        outcome.stage_run_ids[stage] = child.info.run_id
        try:
            result = _STAGES[stage](spark, cfg, catalog, force or redo, outcome)
        except Exception as e:
            if terminating():  # a job cancelled by SIGTERM: the stop, not a failure
                raise Terminated(terminating()) from e
            seconds = time.perf_counter() - started
            log.error("[%s] failed after %.1fs", stage, seconds)
            if getattr(e, "tail", ""):  # a training rank's traceback, last lines
                log.error("[%s] traceback of the failing rank (last lines):\n%s", stage, e.tail)
            cause = (jvm_failure(e, stage, cfg.spark)
                     or tracking.unavailable(e, cfg.mlflow.tracking_uri) or e)  # fmt: skip
            raise StageFailed(stage, cause) from e
        outcome.results[stage] = result
        mlflow.set_tag("sparkloom.skipped", str(result.skipped).lower())
        output = stage_output(cfg, stage)
        if output:
            mlflow.set_tag("sparkloom.output", tracking.mask("output", catalog.path(output)))
        ingested = catalog.manifest("ingested")
        if ingested:  # which data and split the metrics are on: comparable runs match
            mlflow.set_tag("sparkloom.data", ingested["fingerprint"])
        made = catalog.manifest(output) if output else None
        if made:  # a skipped stage's model is in the run that has this and skipped=false
            mlflow.set_tag("sparkloom.output_fingerprint", made["fingerprint"])
    return result


def _unrecorded(cfg: Config, catalog: Catalog, stage: str, experiment_id: str) -> bool:
    """The stage's output is committed, but no finished run of it logged that output: it
    failed or was killed after the commit, while logging its metrics or model. Skipping it
    as up to date would leave MLflow without them (and `register` without a model), so the
    stage is redone."""
    output = stage_output(cfg, stage)
    made = catalog.manifest(output) if output else None
    if made is None or tracking.making_run(experiment_id, stage, made["fingerprint"]):
        return False
    log.warning("[%s] its output %s was committed by a run that did not finish (no finished "
                "run logged it); redoing the stage so MLflow has its metrics and model",
                stage, output)  # fmt: skip
    return True


def _ingest(spark, cfg: Config, catalog: Catalog, force: bool, outcome) -> IngestResult:
    result = run_ingest(spark, cfg, catalog, force)
    tracking.log_metrics(result.metrics())
    mlflow.log_dict({"labels": result.labels}, "labels.json")
    return result


def _features(
    spark, cfg: Config, catalog: Catalog, force: bool, outcome
) -> FeaturesResult | ImageFeaturesResult:
    image = cfg.modality == "image"
    result = (run_image_features if image else run_features)(spark, cfg, catalog, force)
    tracking.log_metrics(result.metrics())
    if getattr(result, "refit_reason", None):  # incremental data: kept or fitted again, and why
        mlflow.set_tag("sparkloom.refit_reason", result.refit_reason)
    return result


def _embed(spark, cfg: Config, catalog: Catalog, force: bool, outcome) -> EmbedResult:
    result = run_embed(spark, cfg, catalog, force)
    tracking.log_metrics(result.metrics())
    mlflow.set_tag("sparkloom.embed_model", f"{result.model} ({result.model_fingerprint})")
    return result


def _baseline(stage: str):
    """The MLlib classifier stages (baseline, embed_baseline): one code, their own sections."""
    trained = {"baseline": run_baseline, "embed_baseline": run_embed_baseline}[stage]

    def run(
        spark, cfg: Config, catalog: Catalog, force: bool, outcome: PipelineOutcome
    ) -> BaselineResult:
        result = trained(spark, cfg, catalog, force)
        _log_audit(spark, cfg, catalog, stage, result)
        if not result.skipped and getattr(cfg, stage).features_col == "features" \
                and cfg.modality == "text":  # fmt: skip
            _log_top_terms(spark, cfg, catalog, stage, result)
        return _log_baseline(stage, cfg, catalog, outcome, result)

    return run


def _log_baseline(
    stage: str, cfg: Config, catalog: Catalog, outcome: PipelineOutcome, result: BaselineResult
) -> BaselineResult:
    bc = getattr(cfg, stage)
    mlflow.log_params({f"best.{k}": v for k, v in result.best_params.items()})
    tracking.log_metrics(
        {"features_used": result.features_used, "lr_iterations": result.iterations,
         "lr_converged": float(result.converged), "fits_at_once": result.fits_at_once,
         "num_parameters": result.num_parameters, "train_seconds": result.train_seconds,
         # every fit of the tuning grid counts: the rows/s of getting this model
         "train_rows_per_s": result.train_rows * max(1, len(result.grid)) / max(result.train_seconds, 1e-9)}
    )  # fmt: skip
    if result.grid:
        tracking.log_metrics({f"tuning_{bc.metric}": result.tuning_metric})
        mlflow.log_text(json.dumps(result.grid, indent=2), "tuning/grid_scores.json")
    report = []
    for split, metrics in result.metrics.items():
        tracking.log_metrics(metrics, prefix=f"{split}_")
        cm = np.array(result.confusion[split])
        title = f"{stage} LR, {split} split"
        tracking.log_figure(
            confusion_figure(cm, result.labels, title), f"plots/confusion_{split}.png"
        )
        report.append(classification_report(cm, result.labels, title))
    mlflow.log_text("\n".join(report), "classification_report.md")
    if result.skipped:  # the model is in the run that made it: not logged again
        made = catalog.manifest(stage_output(cfg, stage))
        run = made and tracking.making_run(
            mlflow.active_run().info.experiment_id, stage, made["fingerprint"]
        )
        outcome.model_uri = f"runs:/{run.info.run_id}/model" if run else None
    elif cfg.mlflow.log_models:  # the model the catalog holds, as written
        col = ("binary", "image") if cfg.modality == "image" else ("string", "text")
        saved = catalog.uri(stage_output(cfg, stage))
        extras = {CALIBRATION_FILE: json.dumps(result.calibration)} if result.calibration else {}
        outcome.model_uri = tracking.log_spark_model(saved, "model", result.labels, col, extras)
    return result


def _log_top_terms(spark, cfg: Config, catalog: Catalog, stage: str, result) -> None:
    """The baseline's largest positive and negative coefficients per class, as words:
    explain/top_terms.md, .json and .png."""
    from pyspark.ml import PipelineModel
    from pyspark.sql import functions as F

    from sparkloom.pipelines.top_terms import top_terms, top_terms_figure

    model = PipelineModel.load(catalog.uri(stage_output(cfg, stage)))
    train = catalog.read("ingested", "ingest").filter(F.col("split") == "train")
    k = cfg.evaluation.top_terms
    tt = top_terms(model, train, result.labels, k=k)
    table = tt.markdown()
    mlflow.log_text(table, "explain/top_terms.md")
    mlflow.log_dict({**tt.to_dict(), "markdown": table}, "explain/top_terms.json")
    tracking.log_figure(top_terms_figure(tt, k), "explain/top_terms.png")
    for label in result.labels:
        words = [t.label for t in tt.per_class[label]["positive"][:6]]
        log.info("[%s] %s: %s", stage, label, ", ".join(words))


def _log_audit(spark, cfg: Config, catalog: Catalog, stage: str, result) -> None:
    """A classifier's calibration (ECE before/after the temperature, reliability diagram)
    and slice metrics (evaluation.slices), from its held-out predictions."""
    from sparkloom.models import storage
    from sparkloom.pipelines import audit

    mlflow.log_dict(data_card(catalog), "data.json")  # what the model card says of the data
    cal = result.calibration
    if cal.get("reliability"):
        tracking.log_metrics({k: cal[k] for k in AUDIT_METRICS if k in cal})
        mlflow.log_dict(cal, CALIBRATION_FILE)
        tracking.log_figure(reliability_figure(cal, f"{stage}, test split"),
                            "plots/reliability_test.png")  # fmt: skip
    if not cfg.evaluation.slices or not result.predictions:
        return
    if not storage.exists(result.predictions):
        log.warning("%s: no predictions at %s (work folder cleaned?); slices not reported; "
                    "rerun the stage with --force", stage, storage.shown(result.predictions))  # fmt: skip
        return
    reports = audit.slices(spark, cfg, catalog, result.predictions, result.labels)
    mlflow.log_dict({"slices": reports}, "slices.json")
    mlflow.log_text(slices_markdown(reports), "slices.md")
    for r in reports:
        worst = min(r["rows"], key=lambda row: row["accuracy"]) if r["rows"] else None
        if worst:
            key = re.sub(r"[^0-9A-Za-z_]+", "_", r["name"]).strip("_")[:60]
            tracking.log_metrics({f"slice_{key}_worst_accuracy": worst["accuracy"],
                                  f"slice_{key}_flagged": len(r["flagged"])})  # fmt: skip


def data_card(catalog: Catalog) -> dict:
    """The ingested data as a model card describes it: source, rows, split, labels, batches."""
    m = catalog.manifest("ingested") or {}
    r = m.get("result", {})
    keep = ("rows_in", "rows_out", "rows_quarantined", "reasons", "splits", "labels")
    batches = (m.get("incremental") or {}).get("batches")  # incremental: one record per batch
    return {"input": m.get("input"), "split_by": m.get("split_by"),
            "fingerprint": m.get("data_fingerprint", m.get("fingerprint")),
            **{k: r.get(k) for k in keep}, "batches": len(batches) if batches else None}  # fmt: skip


# calibration.json's numbers that are also metrics (MLflow compares runs by them)
AUDIT_METRICS = ("temperature", "test_ece", "test_ece_calibrated", "test_nll",
                 "test_nll_calibrated", "val_nll", "val_nll_calibrated")  # fmt: skip


def _drift(spark, cfg: Config, catalog: Catalog, force: bool, outcome):
    from sparkloom.pipelines.drift import run_drift

    result = run_drift(spark, cfg, catalog, force)
    tracking.log_metrics(result.metrics())
    folder = catalog.local_path("drift_report")
    mlflow.log_artifacts(folder, artifact_path="drift")
    return result


def _register(spark, cfg: Config, catalog: Catalog, force: bool, outcome) -> RegisterResult:
    from dataclasses import asdict

    result = register(cfg, catalog, force)
    tracking.log_metrics({f"candidate_{c['stage']}_{result.metric}": c["value"]
                          for c in result.candidates})  # fmt: skip
    tracking.log_metrics({f"frozen_{c['stage']}_{result.metric}": c["frozen"]
                          for c in result.candidates if "frozen" in c})  # fmt: skip
    if result.extra.get("eval_set"):
        tracking.log_metrics({"eval_set_rows": result.extra["eval_set"]["rows"]})
    tracking.log_metrics(
        {"promoted": int(result.promoted), "registered_version": int(result.version)}
    )
    if result.champion_before and result.champion_before["value"] is not None:
        tracking.log_metrics({f"previous_{cfg.register.alias}_{result.metric}":
                              result.champion_before["value"]})  # fmt: skip
    mlflow.set_tag("sparkloom.register_decision", result.reason)
    mlflow.log_dict(asdict(result), "register.json")
    if not result.skipped and result.version:  # the version's card, in its run and this one
        from mlflow.tracking import MlflowClient

        from sparkloom.pipelines.card import log_card

        card = log_card(MlflowClient(), result.name, result.version, asdict(result))
        log.info("register: model card of %s v%s logged to run %s (model_card/)", result.name,
                 result.version, card.run_id)  # fmt: skip
    outcome.model_uri = f"models:/{result.name}@{cfg.register.alias}"
    return result


def _quantize(spark, cfg: Config, catalog: Catalog, force: bool, outcome) -> QuantizeResult:
    result = run_quantize(spark, cfg, catalog, force)
    mlflow.set_tag("sparkloom.model", result.name)  # how the comparison names it
    mlflow.set_tag("sparkloom.quantized_from", result.source)
    tracking.log_metrics({k: v for k, v in result.metrics.items() if isinstance(v, int | float)})
    if not result.skipped:
        model_dir = catalog.local_path(stage_output(cfg, "quantize"))
        if cfg.mlflow.log_models:  # files, and a model the registry can take
            outcome.model_uri = tracking.log_torch_model(model_dir, result.source, "model")
        else:
            mlflow.log_artifacts(model_dir, artifact_path="model-files")
        mlflow.log_dict(result.metrics, "quantization.json")
    return result


def _score(spark, cfg: Config, catalog: Catalog, force: bool, outcome) -> ScoreStageResult:
    result = run_score(spark, cfg, catalog, force)
    tracking.log_metrics(result.metrics())
    mlflow.set_tag("sparkloom.scored_model", f"{result.model_uri} (run {result.run_id})")
    own = result.model_accuracy
    if own is not None and abs(own - result.accuracy) > 1e-9:
        log.warning(
            "score: batch scoring gives %s accuracy %.6f, the model's own run %.6f; scoring's "
            "preprocessing differs from training's", result.split, result.accuracy, own,
        )  # fmt: skip
    return result


@dataclass
class CompareResult:
    report: Any  # pipelines.compare.ComparisonReport
    skipped: bool = False

    def summary(self) -> str:
        rows = self.report.rows  # metrics under the report's column names (accuracy, f1, ...)
        best = max(rows, key=lambda r: r.metrics.get("accuracy") or 0.0) if rows else None
        top = f"; best {best.stage} (test accuracy {best.metrics['accuracy']:.4f})" if best else ""
        return f"{len(rows)} model runs compared{top}; report in {self.report.out_dir}"


def _compare(spark, cfg: Config, catalog: Catalog, force: bool, outcome) -> CompareResult:
    """Every comparable run of the experiment (this one's included), logged to this run."""
    import tempfile

    from sparkloom.pipelines.compare import compare_experiment, log_report

    out = tempfile.mkdtemp(prefix="sparkloom-compare-")
    report = compare_experiment(cfg.experiment, out, tracking_uri=cfg.mlflow.tracking_uri)
    log_report(report)
    return CompareResult(report)


def _deep(stage: str):
    def run(
        spark, cfg: Config, catalog: Catalog, force: bool, outcome: PipelineOutcome
    ) -> DeepResult:
        result = run_deep(spark, cfg, catalog, stage, force)
        if result.labels and stage != "bert_pretrain":
            _log_audit(spark, cfg, catalog, stage, result)
            if not result.skipped and stage not in IMAGE_MODELS and result.predictions:
                _log_attributions(spark, cfg, catalog, stage, result)
        tracking.log_history(result.history)
        report = []
        for split, cm in result.confusion.items():
            cm = np.array(cm)
            prefix = "val" if split == "validation" else split
            tracking.log_metrics(classification_metrics(cm, result.labels), prefix=f"{split}_")
            tracking.log_metrics({f"{prefix}_loss": result.metrics.get(f"{prefix}_loss")})
            title = f"{stage}, {split} split"
            tracking.log_figure(
                confusion_figure(cm, result.labels, title), f"plots/confusion_{split}.png"
            )
            report.append(classification_report(cm, result.labels, title))
        if result.history:
            tracking.log_figure(
                learning_curves_figure(result.history, f"{stage} learning curves"),
                "plots/learning_curves.png",
            )
        tracking.log_metrics(result.initial, prefix="init_")  # the untrained model, e.g. ~ln(C)
        tracking.log_steps(result.steps, result.evals)  # per-step train loss, lr, tokens/s, MFU
        tracking.log_metrics(result.data_stats)  # e.g. tokens, blocks and tail tokens per split
        if not result.labels:  # a language model: loss, perplexity, token accuracy per split
            tracking.log_metrics({k.replace("_accuracy", "_token_accuracy"): v
                                  for k, v in result.metrics.items()})  # fmt: skip
        else:  # masked-LM pretraining: MLM loss, accuracy on masked tokens, perplexity
            tracking.log_metrics({k: v for k, v in result.metrics.items()
                                  if k.endswith(("mlm_loss", "mlm_accuracy", "perplexity"))})  # fmt: skip
        tracking.log_metrics({
            "train_seconds": result.train_seconds, "stage_seconds": result.wall_seconds,
            "num_parameters": result.num_parameters, "world_size": result.world_size,
            "best_epoch": result.best_epoch or 0, "epochs_run": len(result.history),
            "train_attempts": result.attempts,
            "train_rows_per_s": float(np.mean([h["samples_per_s"] for h in result.history]))
            if result.history else 0.0,
        })  # fmt: skip
        if result.init_report:  # a pretrained checkpoint's weights: new, unused, resized
            mlflow.log_dict(result.init_report, "init_report.json")
            init_from = getattr(getattr(cfg, stage), "init_from", None)
            if init_from:
                mlflow.set_tag("sparkloom.init_from", str(init_from))
        if result.warm_start:  # incremental training: where from, new and replayed rows
            ws = result.warm_start
            mlflow.log_dict(ws, "warm_start.json")
            mlflow.set_tag("sparkloom.warm_start", f"{ws['source'] or 'none'}: {ws['reason']}")
            tracking.log_metrics({"warm_rows_new": ws["rows_new"],
                                  "warm_rows_replay": ws["rows_replay"]})  # fmt: skip
        if report:
            mlflow.log_text("\n".join(report), "classification_report.md")
        mlflow.log_dict(result.model_config, "model_config.json")
        if result.errors and stage in IMAGE_MODELS:
            _log_misclassified(cfg, catalog, stage, result)
        model_dir = catalog.local_path(f"{stage}_model")
        if result.resumed_from:
            mlflow.set_tag("sparkloom.resumed_from_step", str(result.resumed_from["step"]))
        if stage in _MORE_TO_LOG:
            _MORE_TO_LOG[stage](cfg, catalog, result)
        if not result.skipped:
            tracking.log_tokenizer(model_dir)  # BERT stages: the WordPiece vocabulary they used
        if cfg.mlflow.log_models and not result.skipped:
            if stage in LANGUAGE_MODELS:  # no classifier to score with: files only
                mlflow.log_artifacts(model_dir, artifact_path="model-files")
            else:
                outcome.model_uri = tracking.log_torch_model(model_dir, result.model, "model")
        return result

    return run


def _log_attributions(spark, cfg: Config, catalog: Catalog, stage: str, result: DeepResult) -> None:
    """Integrated Gradients of a few test rows (the most confident right and wrong ones):
    explain/attributions.json, .html (tokens shaded) and .png (top tokens per example)."""
    from sparkloom.pipelines.attributions import ABOUT, attributions_figure, attributions_html
    from sparkloom.pipelines.explain import text_attributions

    started = time.perf_counter()
    examples = text_attributions(spark, cfg, catalog, stage, result.model, result.predictions,
                                 result.labels)  # fmt: skip
    if not examples:
        return
    worst = max(abs(e["delta"]) / max(1.0, abs(e["logit_gap"])) for e in examples)
    title = f"{stage}: Integrated Gradients, {len(examples)} test rows"
    mlflow.log_dict({"about": ABOUT, "steps": cfg.evaluation.attribution_steps,
                     "examples": examples}, "explain/attributions.json")  # fmt: skip
    mlflow.log_text(attributions_html(examples, title), "explain/attributions.html")
    tracking.log_figure(attributions_figure(examples, title), "explain/attributions.png")
    tracking.log_metrics({"attribution_relative_delta": worst,
                          "attribution_incomplete": sum(not e["complete"] for e in examples)})  # fmt: skip
    for e in examples:
        top = sorted(zip(e["tokens"], e["attributions"], strict=True), key=lambda p: -abs(p[1]))[:5]
        log.info("[%s] %s: true %s, predicted %s (p=%.2f): %s", stage, e["id"], e["label_name"],
                 e["pred_name"], e["prob"], ", ".join(f"{t} {a:+.2f}" for t, a in top))  # fmt: skip
    log.info("[%s] attributions of %d test rows in %.1fs; completeness |delta| <= %.3f of the "
             "logit gap", stage, len(examples), time.perf_counter() - started, worst)  # fmt: skip
    incomplete = [e["id"] for e in examples if not e["complete"]]
    if incomplete:
        log.warning(
            "[%s] the attributions of %s miss their logit gap by more than %.0f%% after %d "
            "steps (evaluation.attribution_max_steps): the logit jumps along the path, as a "
            "recurrent model's can; they are shown marked incomplete", stage, incomplete,
            100 * cfg.evaluation.attribution_tolerance, cfg.evaluation.attribution_max_steps,
        )  # fmt: skip


def _log_distill(cfg: Config, catalog: Catalog, result: DeepResult) -> None:
    """The student as the comparison names it (textcnn-distilled), its teacher, and its size
    and CPU scoring speed beside the teacher's."""
    mlflow.set_tag("sparkloom.model", f"{result.model}-distilled")
    mlflow.set_tag("sparkloom.teacher", cfg.distill.teacher)
    if result.skipped:
        return
    cost = student_and_teacher(cfg, catalog)
    tracking.log_metrics(cost)
    log.info(
        "[distill] student %s: %.0f parameters, %.2f MB, %.0f rows/s; teacher %s: "
        "%.0f parameters, %.2f MB, %.0f rows/s (1 thread, test split)",
        result.model, cost["student_parameters"], cost["student_bytes"] / 1e6,
        cost["student_rows_per_s"], cfg.distill.teacher, cost["teacher_parameters"],
        cost["teacher_bytes"] / 1e6, cost["teacher_rows_per_s"],
    )  # fmt: skip


def _log_samples(cfg: Config, catalog: Catalog, result: DeepResult) -> None:
    """Text the trained model writes from the configured prompts, as samples.md/.json."""
    from sparkloom.pipelines.generation import Sampling, complete

    if result.skipped:
        return
    model_dir = catalog.local_path("gpt2_model")

    g = cfg.gpt2.generate
    s = Sampling(g.max_new_tokens, g.temperature, g.top_k, g.top_p, g.seed)
    texts, lengths = complete(model_dir, list(g.prompts), s)
    samples = [{"prompt": p, "completion": t, "new_tokens": n}
               for p, t, n in zip(g.prompts, texts, lengths, strict=True)]  # fmt: skip
    mlflow.log_dict({"sampling": vars(s), "samples": samples}, "samples.json")
    md = [f"Sampling: {vars(s)}\n"] + [f"**{x['prompt']}**{x['completion']}\n" for x in samples]
    mlflow.log_text("\n".join(md), "samples.md")
    for x in samples:
        log.info("gpt2 sample: %r -> %r", x["prompt"], x["completion"])


def _log_misclassified(cfg: Config, catalog: Catalog, stage: str, result: DeepResult) -> None:
    """The test images the model got wrong, as a PNG grid and a JSON list."""
    from pyspark.sql import functions as F

    mlflow.log_dict({"errors": result.errors}, "misclassified_test.json")
    ids = [e["id"] for e in result.errors]
    shape = catalog.manifest("ingested")["image"]["shape"]
    rows = catalog.read("ingested", "ingest").filter(F.col("id").isin(ids)).select("id", "image")
    by_id = {r["id"]: bytes(r["image"]) for r in rows.collect()}
    shown = [e for e in result.errors if e["id"] in by_id]
    if not shown:
        return
    grid = decode_grid([by_id[e["id"]] for e in shown], *shape)
    names = result.labels
    fig = misclassified_figure(
        grid, [names[e["label"]] for e in shown], [names[e["pred"]] for e in shown],
        [e["prob"] for e in shown], f"{stage}, test split",
    )  # fmt: skip
    tracking.log_figure(fig, "plots/misclassified_test.png")
    _log_saliency(cfg, catalog, stage, result, grid, shown)


def _log_saliency(
    cfg: Config, catalog: Catalog, stage: str, result: DeepResult, grid, shown
) -> None:
    """Integrated Gradients maps of the misclassified test images (explain/saliency.png):
    where in each image the evidence for the wrong class lies."""
    import torch

    from sparkloom.models.attribution import image_attributions, standardize
    from sparkloom.models.registry import ImageScorer
    from sparkloom.models.train import load_exported
    from sparkloom.pipelines.attributions import image_attributions_figure

    model_dir = catalog.local_path(f"{stage}_model")
    with open(f"{model_dir}/preprocess.json") as f:
        pre = json.load(f)
    model = load_exported(model_dir, result.model)
    scorer = ImageScorer(model, pre["mean"], pre["std"])
    images = torch.from_numpy(grid.transpose(0, 3, 1, 2).copy())  # (B, C, H, W), writable
    x = standardize(images, scorer.mean, scorer.std)
    steps = max(cfg.evaluation.attribution_steps, 128)  # ReLU paths need more points
    att = image_attributions(model, x, torch.tensor([e["pred"] for e in shown]), steps=steps)
    names = result.labels
    fig = image_attributions_figure(
        images.numpy(), att.maps, [names[e["label"]] for e in shown],
        [names[e["pred"]] for e in shown], [e["prob"] for e in shown], f"{stage}, test errors",
    )  # fmt: skip
    tracking.log_figure(fig, "explain/saliency.png")
    gap = np.abs(att.logits - att.baseline_logits)[np.arange(len(shown)), att.targets]
    tracking.log_metrics({"attribution_relative_delta": float(
        (np.abs(att.delta) / np.maximum(1.0, gap)).max())})  # fmt: skip


# what a deep stage logs besides what every one does
_MORE_TO_LOG = {"gpt2": _log_samples, "distill": _log_distill}

_STAGES = {
    "ingest": _ingest,
    "drift": _drift,
    "features": _features,
    "baseline": _baseline("baseline"),
    "embed": _embed,
    "embed_baseline": _baseline("embed_baseline"),
    **{stage: _deep(stage) for stage in DEEP_STAGES},
    "quantize": _quantize,
    "register": _register,
    "score": _score,
    "compare": _compare,
}
