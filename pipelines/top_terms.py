"""The MLlib baseline's strongest words per class: its top positive and negative coefficients.

The coefficients shown are the fitted `LogisticRegressionModel`'s own, on the features as the
classifier sees them (term frequencies, times IDF where the model has an IDF stage). MLlib
standardizes internally but reports coefficients on that original scale, so a coefficient is
the change in a class's logit per unit of that feature's TF-IDF value: a rare word (high IDF,
large values) needs a smaller coefficient for the same effect than a common one. They rank what
the model does with its inputs, not how important a word is in the corpus.

With CountVectorizer a feature is a vocabulary word. With HashingTF it is a bucket; its words
come from the training rows (`explain.bucket_terms`), and a bucket several words share is
shown as `a/b` and marked, because the coefficient belongs to all of them together.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from matplotlib.figure import Figure
from pyspark.ml import PipelineModel
from pyspark.ml.classification import LogisticRegressionModel
from pyspark.ml.feature import CountVectorizerModel, HashingTF, IDFModel, VectorSlicer
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sparkloom.pipelines.explain import bucket_terms

SHARED = "\u2020"  # marks a hashed bucket that several training words share
POSITIVE, NEGATIVE = "#4c72b0", "#dd8452"


@dataclass
class Term:
    words: list[str]  # the vocabulary word, or the bucket's training words, most frequent first
    coef: float
    index: int  # in the feature vector (before the VectorSlicer)
    collisions: int = 0  # distinct training words in the bucket beyond the first

    @property
    def label(self) -> str:
        more = "/\u2026" if self.collisions + 1 > len(self.words) else ""
        text = "/".join(self.words) + more if self.words else f"#{self.index}"
        return text + (SHARED if self.collisions else "")


@dataclass
class TopTerms:
    labels: list[str]
    per_class: dict[str, dict[str, list[Term]]]  # label -> "positive"/"negative" -> terms
    hashed: bool
    num_features: int

    @property
    def shared(self) -> bool:
        """Whether a shown term is a hashed bucket several training words share."""
        return any(t.collisions for s in self.per_class.values() for ts in s.values() for t in ts)

    def to_dict(self) -> dict:
        per_class = {name: {side: [{**asdict(t), "label": t.label} for t in ts]
                            for side, ts in sides.items()}
                     for name, sides in self.per_class.items()}  # fmt: skip
        return {**asdict(self), "per_class": per_class}

    def markdown(self) -> str:
        """One table: class | top positive terms | top negative terms, as `word (coef)`."""

        def cell(terms: list[Term]) -> str:
            return ", ".join(f"{t.label} ({t.coef:.3g})" for t in terms).replace("|", "\\|")

        lines = ["| class | top positive terms | top negative terms |", "| --- | --- | --- |"]
        for name in self.labels:
            sides = self.per_class[name]
            lines.append(f"| {name} | {cell(sides['positive'])} | {cell(sides['negative'])} |")
        if self.shared:
            lines += ["", f"{SHARED} a hashed bucket several training words share (its most "
                          "frequent shown); the coefficient is theirs together."]  # fmt: skip
        return "\n".join(lines)


def top_terms(model: PipelineModel, train_text: DataFrame, labels: list[str], k: int = 10,
              terms_per_bucket: int = 3) -> TopTerms:  # fmt: skip
    """The `k` largest and `k` most negative coefficients of each class, as words.

    `model` is the baseline's scoring model (feature stages, VectorSlicer, classifier,
    IndexToString); `train_text` its training rows with their raw text column. Hashed buckets
    are named from `train_text`, by one Spark job over the buckets shown."""
    stages = model.stages
    term_stages = (HashingTF, CountVectorizerModel)
    at = next((i for i, s in enumerate(stages) if isinstance(s, term_stages)), None)
    lr = next((s for s in stages if isinstance(s, LogisticRegressionModel)), None)
    if at is None or lr is None:
        raise ValueError(
            "top_terms explains a logistic regression on HashingTF or CountVectorizer features; "
            f"this model's stages are {[type(s).__name__ for s in stages]}"
        )
    tf = stages[at]
    slicer = next((s for s in stages if isinstance(s, VectorSlicer)), None)
    idf = next((s for s in stages if isinstance(s, IDFModel)), None)
    features = (idf if idf and idf.getInputCol() == tf.getOutputCol() else tf).getOutputCol()
    read = slicer.getInputCol() if slicer else lr.getFeaturesCol()
    if read != features:
        raise ValueError(
            f"the classifier reads {read!r}, not the term features {features!r}: top_terms "
            "explains the TF or TF-IDF baseline (baseline.features_col=features)"
        )
    if len(labels) != lr.numClasses:
        raise ValueError(f"{len(labels)} labels given for a model of {lr.numClasses} classes")
    keep = np.asarray(slicer.getIndices() if slicer else range(lr.numFeatures), dtype=np.int64)
    coef = lr.coefficientMatrix.toArray()  # (classes or 1, used features)
    if coef.shape[0] == 1:  # binomial: the row is class 1's logit, class 0 is its negation
        coef = np.vstack([-coef[0], coef[0]])

    chosen = {}
    for c, name in enumerate(labels):
        w = coef[c]
        pos = [j for j in np.argsort(-w, kind="stable")[:k] if w[j] > 0]
        neg = [j for j in np.argsort(w, kind="stable")[:k] if w[j] < 0]
        chosen[name] = {"positive": pos, "negative": neg}
    wanted = sorted({int(keep[j]) for s in chosen.values() for js in s.values() for j in js})

    hashed = isinstance(tf, HashingTF)
    if hashed:
        num_features = tf.getNumFeatures()
        terms = PipelineModel(stages=stages[:at]).transform(train_text)  # the model's own tokens
        buckets = bucket_terms(terms, num_features, terms_per_bucket, tf.getInputCol())
        # a filter on `bucket` alone is pushed below the aggregations, where bucket_terms'
        # hashing UDF then runs on every (document, word) row, not once per distinct word;
        # tied to an aggregated column it stays on top
        shown = F.when(F.col("collisions") >= 0, F.col("bucket")).isin(wanted)
        rows = buckets.filter(shown).collect() if wanted else []
        names = {r["bucket"]: (list(r["terms"]), int(r["collisions"])) for r in rows}
    else:
        vocabulary = tf.vocabulary
        num_features = len(vocabulary)
        names = {i: ([vocabulary[i]], 0) for i in wanted}

    def term(c: int, j: int) -> Term:
        i = int(keep[j])
        words, collisions = names.get(i, ([], 0))
        return Term(words, float(coef[c, j]), i, collisions)

    per_class = {
        name: {side: [term(c, j) for j in js] for side, js in chosen[name].items()}
        for c, name in enumerate(labels)
    }
    return TopTerms(list(labels), per_class, hashed, num_features)


def top_terms_figure(tt: TopTerms, k: int = 10) -> Figure:
    """One horizontal bar panel per class: its top positive coefficients (blue, largest on
    top) over its most negative (orange), labelled with the words; four panels a row."""
    n = len(tt.labels)
    cols = min(4, max(1, n))
    rows = math.ceil(n / cols) if n else 1
    bars = max((min(k, len(s["positive"])) + min(k, len(s["negative"]))
                for s in tt.per_class.values()), default=1)  # fmt: skip
    panel = 0.9 + 0.2 * max(bars, 1)  # inches: room for one readable label a bar
    fig = Figure(figsize=(4.4 * cols, panel * rows + 0.5), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    for ax, name in zip(axes.flat, tt.labels, strict=False):
        sides = tt.per_class[name]
        shown = sides["positive"][:k] + sides["negative"][:k][::-1]  # most negative at the bottom
        y = np.arange(len(shown))
        ax.barh(y, [t.coef for t in shown], color=[POSITIVE if t.coef > 0 else NEGATIVE
                                                     for t in shown])  # fmt: skip
        ax.set_yticks(y, labels=[_short(t.label) for t in shown], fontsize=7)
        ax.set_ylim(len(shown) - 0.5 if shown else 1, -0.5)  # first term on top
        ax.axvline(0, color="grey", linewidth=0.6)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(name, fontsize=9)
        if not shown:
            ax.text(0.5, 0.5, "no non-zero coefficient", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)  # fmt: skip
    features = "hashed buckets" if tt.hashed else "vocabulary words"
    note = f"; {SHARED}: a bucket several words share" if tt.shared else ""
    fig.suptitle(f"Logistic-regression coefficients per class ({features}{note})", fontsize=10)
    return fig


def _short(label: str, width: int = 28) -> str:
    return label if len(label) <= width else label[: width - 1] + "\u2026"
