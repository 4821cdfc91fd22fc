"""The `drift` stage: how the newest incremental batch differs from what the models trained on.

Reference: the training rows of the earlier batches. New: every labelled row of the newest
batch. Reported: the label distribution's population stability index (PSI), document lengths
(PSI over the reference's deciles) and the out-of-vocabulary rate against the fitted features
for text, per-channel pixel mean and std for images, and the registered champion's accuracy on
the new rows beside its accuracy on the frozen evaluation set. A JSON and a PNG go to MLflow;
each threshold crossed (`drift.*`) is a warning line.

PSI = sum over bins of (new - ref) * ln(new / ref), shares smoothed by 1e-4 so an empty bin
stays finite; below 0.1 is usually read as stable, above 0.25 as a major shift.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sparkloom.pipelines.context import StageContext, stage
from sparkloom.pipelines.errors import DataError

log = logging.getLogger(__name__)

EPS = 1e-4


def psi(ref: dict[Any, float], new: dict[Any, float]) -> float:
    """Population stability index of two count (or share) tables over the same bins."""
    keys = sorted(set(ref) | set(new), key=str)
    r_total, n_total = sum(ref.values()), sum(new.values())
    if not r_total or not n_total:
        return 0.0
    out = 0.0
    for k in keys:
        r = max(ref.get(k, 0) / r_total, EPS)
        n = max(new.get(k, 0) / n_total, EPS)
        out += (n - r) * math.log(n / r)
    return out


def shares(counts: dict[Any, int]) -> dict[str, float]:
    total = sum(counts.values()) or 1
    return {str(k): v / total for k, v in sorted(counts.items(), key=lambda kv: str(kv[0]))}


@dataclass
class DriftResult:
    batch: int
    rows_reference: int
    rows_new: int
    label_psi: float | None = None
    labels_reference: dict[str, float] = field(default_factory=dict)
    labels_new: dict[str, float] = field(default_factory=dict)
    length_psi: float | None = None
    length_bins: list[float] = field(default_factory=list)  # the reference's decile edges
    length_reference: list[float] = field(default_factory=list)  # share per bin
    length_new: list[float] = field(default_factory=list)
    mean_length_reference: float | None = None
    mean_length_new: float | None = None
    oov_rate_reference: float | None = None
    oov_rate_new: float | None = None
    pixel_mean_reference: list[float] | None = None
    pixel_mean_new: list[float] | None = None
    pixel_std_reference: list[float] | None = None
    pixel_std_new: list[float] | None = None
    champion: dict[str, Any] | None = None  # version, accuracy_new, accuracy_frozen, rows
    warnings: list[str] = field(default_factory=list)
    skipped: bool = False

    def metrics(self) -> dict[str, float]:
        m: dict[str, float | None] = {
            "drift_batch": self.batch, "drift_rows_new": self.rows_new,
            "drift_rows_reference": self.rows_reference, "label_psi": self.label_psi,
            "length_psi": self.length_psi, "oov_rate_reference": self.oov_rate_reference,
            "oov_rate_new": self.oov_rate_new, "drift_warnings": len(self.warnings),
        }  # fmt: skip
        if self.pixel_mean_new is not None:
            shift = max(abs(a - b) for a, b in zip(self.pixel_mean_new, self.pixel_mean_reference,
                                                    strict=True))  # fmt: skip
            m["pixel_mean_shift"] = shift
        if self.champion:
            m["champion_accuracy_new"] = self.champion["accuracy_new"]
            m["champion_accuracy_frozen"] = self.champion.get("accuracy_frozen")
        return {k: float(v) for k, v in m.items() if v is not None}

    def summary(self) -> str:
        if not self.rows_reference:
            return f"batch {self.batch} is the first: nothing earlier to compare with"
        parts = [f"batch {self.batch} ({self.rows_new} rows) vs {self.rows_reference} earlier "
                 f"training rows: label PSI {self.label_psi:.3f}"]  # fmt: skip
        if self.length_psi is not None:
            parts.append(f"length PSI {self.length_psi:.3f}")
        if self.oov_rate_new is not None:
            parts.append(f"OOV {self.oov_rate_new:.3f} (was {self.oov_rate_reference:.3f})")
        if self.pixel_mean_new is not None:
            parts.append(f"pixel mean {_fmt(self.pixel_mean_new)} (was "
                         f"{_fmt(self.pixel_mean_reference)})")  # fmt: skip
        if self.champion:
            c = self.champion
            frozen = c.get("accuracy_frozen")
            parts.append(f"champion v{c['version']} accuracy {c['accuracy_new']:.4f} on the new "
                         f"rows" + (f" ({frozen:.4f} on the frozen set)" if frozen is not None
                                    else ""))  # fmt: skip
        parts.append(f"{len(self.warnings)} warning(s)")
        return ", ".join(parts)


def _fmt(xs: list[float] | None) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in xs or []) + "]"


def _counts(df: DataFrame, col: str) -> dict[Any, int]:
    return {r[col]: r["count"] for r in df.groupBy(col).count().collect()}


def length_drift(
    ref: DataFrame, new: DataFrame
) -> tuple[float, list[float], list, list, float, float]:
    """Words per document: PSI over the reference's deciles, the edges, each side's share per
    bin, and the two means."""
    from pyspark.ml.feature import Bucketizer

    words = F.size(F.split(F.trim(F.col("text")), r"\s+")).cast("double")
    ref, new = ref.select(words.alias("n")), new.select(words.alias("n"))
    edges = sorted(set(ref.approxQuantile("n", [i / 10 for i in range(1, 10)], 0.001)))
    splits = [-math.inf, *edges, math.inf]
    bucket = Bucketizer(splits=splits, inputCol="n", outputCol="b")
    r, n = _counts(bucket.transform(ref), "b"), _counts(bucket.transform(new), "b")
    bins = range(len(splits) - 1)
    r_total, n_total = sum(r.values()) or 1, sum(n.values()) or 1
    mean_r = ref.agg(F.avg("n")).first()[0]
    mean_n = new.agg(F.avg("n")).first()[0]
    return (psi(r, n), edges, [r.get(float(b), 0) / r_total for b in bins],
            [n.get(float(b), 0) / n_total for b in bins], mean_r, mean_n)  # fmt: skip


def champion_on(ctx: StageContext, new: DataFrame, image: bool) -> dict[str, Any] | None:
    """The registered champion's accuracy on the new rows, and on the frozen set (its tag)."""
    from mlflow.tracking import MlflowClient

    from sparkloom.pipelines.scoring import resolve, score

    rc = ctx.cfg.register
    name = rc.name or ctx.cfg.pipeline.name
    uri = f"models:/{name}@{rc.alias}"
    try:
        ref = resolve(uri)
    except DataError as e:
        log.info("drift: no champion to score (%s)", str(e).splitlines()[0])
        return None
    col = "image" if image else "text"
    rows = new.select("id", col, "label")
    scored, _, _ = score(rows, ref, col, "id", prepared=image)
    got = (
        scored.join(rows.select("id", "label"), "id")
        .agg(
            F.count(F.lit(1)).alias("n"),
            F.sum((F.col("predicted_label") == F.col("label")).cast("int")),
        )
        .first()
    )
    mv = MlflowClient().get_model_version_by_alias(name, rc.alias)
    frozen = mv.tags.get("sparkloom.frozen_test_accuracy") or mv.tags.get("sparkloom.test_accuracy")
    return {"version": str(mv.version), "stage": ref.stage, "rows": got[0],
            "accuracy_new": (got[1] or 0) / max(got[0], 1),
            "accuracy_frozen": float(frozen) if frozen else None}  # fmt: skip


@stage("drift", DriftResult)
def run_drift(ctx: StageContext) -> DriftResult:
    """Called as run_drift(spark, cfg, catalog, force=False); writes dataset `drift_report`
    (drift.json, drift.png)."""
    catalog = ctx.catalog
    inc = ctx.upstream.get("incremental")
    if not inc:
        raise DataError(
            "drift compares the newest batch with the earlier ones: set ingest.incremental=true "
            "(or remove drift from pipeline.stages)"
        )
    data = catalog.read("ingested", "ingest")
    newest = max(b["batch"] for b in inc["batches"])
    ref = data.filter((F.col("batch") < newest) & (F.col("split") == "train")).localCheckpoint()
    new = data.filter(F.col("batch") == newest).localCheckpoint()
    result = DriftResult(newest, ref.count(), new.count())
    if result.rows_reference and result.rows_new:
        _compare(ctx, ref, new, result)
    for w in result.warnings:
        log.warning("drift: %s", w)
    report = asdict(result)

    def save(tmp: str) -> None:
        from sparkloom.pipelines.report import drift_figure

        catalog.fs.mkdirs(tmp)
        catalog.fs.write_text(f"{tmp}/drift.json", json.dumps(report, indent=2))
        if result.rows_reference:
            import io

            import matplotlib.pyplot as plt

            fig = drift_figure(report)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
            plt.close(fig)
            from sparkloom.models import storage

            storage.write_bytes(f"{catalog.fs.qualify(tmp)}/drift.png", buf.getvalue())

    catalog.write("drift_report", save, ctx.common(result=report))
    return result


def _compare(ctx: StageContext, ref: DataFrame, new: DataFrame, result: DriftResult) -> None:
    dc = ctx.cfg.drift
    r_labels, n_labels = _counts(ref, "label"), _counts(new, "label")
    result.label_psi = psi(r_labels, n_labels)
    result.labels_reference, result.labels_new = shares(r_labels), shares(n_labels)
    if result.label_psi > dc.max_label_psi:
        result.warnings.append(f"label distribution shifted: PSI {result.label_psi:.3f} > "
                               f"drift.max_label_psi {dc.max_label_psi:g}")  # fmt: skip
    unseen = sorted(set(n_labels) - set(r_labels))
    if unseen:
        result.warnings.append(f"labels not in the earlier training rows: {unseen}")
    image = "image" in new.columns
    if image:
        from sparkloom.pipelines.images import channel_stats

        shape = ctx.upstream["image"]["shape"]
        a, b = channel_stats(ref, *shape), channel_stats(new, *shape)
        result.pixel_mean_reference, result.pixel_std_reference = a["mean"], a["std"]
        result.pixel_mean_new, result.pixel_std_new = b["mean"], b["std"]
        shift = max(abs(x - y) for x, y in zip(a["mean"], b["mean"], strict=True))
        if shift > dc.max_pixel_shift:
            result.warnings.append(f"pixel means moved by {shift:.3f} > drift.max_pixel_shift "
                                   f"{dc.max_pixel_shift:g}")  # fmt: skip
    else:
        (result.length_psi, result.length_bins, result.length_reference, result.length_new,
         result.mean_length_reference, result.mean_length_new) = length_drift(ref, new)  # fmt: skip
        if result.length_psi > dc.max_length_psi:
            result.warnings.append(f"document lengths shifted: PSI {result.length_psi:.3f} > "
                                   f"drift.max_length_psi {dc.max_length_psi:g}")  # fmt: skip
        _oov(ctx, ref, new, result)
    if dc.champion:
        result.champion = champion_on(ctx, new, image)
        c = result.champion
        if c and c["accuracy_frozen"] is not None:
            drop = c["accuracy_frozen"] - c["accuracy_new"]
            if drop > dc.max_accuracy_drop:
                result.warnings.append(
                    f"the champion (v{c['version']}) scores {c['accuracy_new']:.4f} on the new "
                    f"rows, {drop:.4f} below its {c['accuracy_frozen']:.4f} on the frozen set "
                    f"(drift.max_accuracy_drop {dc.max_accuracy_drop:g})"
                )


def _oov(ctx: StageContext, ref: DataFrame, new: DataFrame, result: DriftResult) -> None:
    """Against the words the fitted features know, when the features stage has run."""
    from sparkloom.pipelines.text import KNOWN_TERMS, _tokens, oov_rate

    catalog, dc = ctx.catalog, ctx.cfg.drift
    terms = f"{catalog.path('feature_model')}/{KNOWN_TERMS}"
    if not catalog.fs.exists(terms):
        return
    known = catalog.fs.read_text(terms).split("\n")[:-1]
    result.oov_rate_reference = oov_rate(_tokens(catalog, ref), known)
    result.oov_rate_new = oov_rate(_tokens(catalog, new), known)
    rise = result.oov_rate_new - result.oov_rate_reference
    if rise > dc.max_oov_increase:
        result.warnings.append(f"out-of-vocabulary rate rose from {result.oov_rate_reference:.3f} "
                               f"to {result.oov_rate_new:.3f} (drift.max_oov_increase "
                               f"{dc.max_oov_increase:g})")  # fmt: skip
