"""Slice metrics: accuracy, F1 and count per group of inputs, and the worst group flagged.

A slice is a column of the scored rows (a source, a language) or a Spark SQL expression over
them (`length(text) > 2000`); `length_quartile` buckets documents by words at the quartiles
of the rows given. A slice whose accuracy is more than `max_gap` below the overall accuracy
is flagged, so one badly served group shows even when the average looks fine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from sparkloom.pipelines.report import classification_metrics

LENGTH_QUARTILE = "length_quartile"


def length_quartile(df: DataFrame, text_col: str = "text") -> Column:
    """Q1..Q4 by words per document, at the quartiles of `df`'s rows."""
    words = F.size(F.split(F.trim(F.col(text_col)), r"\s+"))
    q1, q2, q3 = df.select(words.alias("n")).approxQuantile("n", [0.25, 0.5, 0.75], 0.001)
    return (
        F.when(words <= q1, f"Q1 (<= {q1:.0f} words)")
        .when(words <= q2, f"Q2 ({q1:.0f}-{q2:.0f})")
        .when(words <= q3, f"Q3 ({q2:.0f}-{q3:.0f})")
        .otherwise(f"Q4 (> {q3:.0f} words)")
    )


@dataclass
class SliceReport:
    name: str  # the slice's column or expression
    overall_accuracy: float
    rows: list[dict] = field(default_factory=list)  # value, count, accuracy, f1, gap, flagged
    max_gap: float = 0.05

    @property
    def flagged(self) -> list[dict]:
        return [r for r in self.rows if r["flagged"]]


def slice_metrics(scored: DataFrame, name: str, by: Column | str, labels: list[str],
                  max_gap: float = 0.05) -> SliceReport:  # fmt: skip
    """`scored` has `label` and `predicted_label` (names); `by` is the slice (a column name,
    a SQL expression, or a Column). One Spark job: counts per (slice, label, prediction)."""
    col = by if isinstance(by, Column) else F.expr(by)
    counts = (
        scored.select(col.cast("string").alias("slice"), "label", "predicted_label")
        .groupBy("slice", "label", "predicted_label")
        .count()
        .collect()
    )
    names = list(labels)
    for r in counts:  # a prediction outside the label list still counts, as an error
        for x in (r["label"], r["predicted_label"]):
            if x not in names:
                names.append(x)
    at = {x: i for i, x in enumerate(names)}
    per: dict[str, np.ndarray] = {}
    total = np.zeros((len(names), len(names)))
    for r in counts:
        cm = per.setdefault(r["slice"], np.zeros((len(names), len(names))))
        cm[at[r["label"]], at[r["predicted_label"]]] += r["count"]
        total[at[r["label"]], at[r["predicted_label"]]] += r["count"]
    overall = classification_metrics(total, names)["accuracy"]
    report = SliceReport(name, overall, max_gap=max_gap)
    for value, cm in sorted(per.items(), key=lambda kv: str(kv[0])):
        m = classification_metrics(cm, names)
        gap = overall - m["accuracy"]
        report.rows.append({"value": value, "count": int(cm.sum()), "accuracy": m["accuracy"],
                            "f1": m["f1"], "gap": gap, "flagged": gap > max_gap})  # fmt: skip
    return report
