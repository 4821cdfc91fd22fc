"""Top terms of the baseline: each class's marker word comes out as its strongest positive
coefficient, through hashed buckets (with a collision), a vocabulary, and a binomial model."""

import io
import random

import numpy as np
import pytest
from pyspark.ml import PipelineModel
from pyspark.ml.feature import HashingTF, IndexToString, RegexTokenizer, VectorSlicer

from sparkloom.pipelines.baseline import INPUT_COL, build_estimator, used_features
from sparkloom.pipelines.config import BaselineConfig, FeaturesConfig
from sparkloom.pipelines.text import build_feature_pipeline
from sparkloom.pipelines.top_terms import SHARED, Term, TopTerms, top_terms, top_terms_figure

MARKERS = {"sport": "goal", "politics": "vote", "business": "stock"}
NEUTRAL = ["river", "table", "window", "garden", "yellow", "pencil", "mirror", "blanket",
           "candle", "ladder", "basket", "carpet", "bottle", "pillow", "wallet", "button",
           "jacket", "bucket", "feather", "marble"]  # fmt: skip


def corpus(spark, labels: list[str], n: int = 20, seed: int = 0):
    """`n` rows per class: its marker word, two neutral words, a stopword."""
    rng = random.Random(seed)
    rows = [(f"{MARKERS[y]} {' '.join(rng.sample(NEUTRAL, 2))} the", float(c))
            for c, y in enumerate(labels) for _ in range(n)]  # fmt: skip
    return spark.createDataFrame(rows, "text string, label_index double")


def fit(train, labels: list[str], **features) -> PipelineModel:
    """The scoring model as baseline.run_classifier builds it."""
    fc = FeaturesConfig.model_validate({"idf": {"min_doc_freq": 0}, **features})
    feature_model = build_feature_pipeline(fc).fit(train)
    data = feature_model.transform(train)
    keep, _ = used_features(data, feature_model, "features")
    slicer = VectorSlicer(inputCol="features", outputCol=INPUT_COL, indices=keep)
    bc = BaselineConfig.model_validate({"tuning": "none", "grid": {"reg_param": [0.01]}})
    lr, grid, _ = build_estimator(bc, INPUT_COL, len(labels))
    lr_model = lr.copy(grid[0]).fit(slicer.transform(data))
    its = IndexToString(inputCol="prediction", outputCol="predicted_label", labels=labels)
    return PipelineModel(stages=[*feature_model.stages, slicer, lr_model, its])


def coefficient(model: PipelineModel, c: int, index: int) -> float:
    """The model's own coefficient of feature `index` for class `c`, through the slicer."""
    j = list(model.stages[-3].getIndices()).index(index)
    return float(model.stages[-2].coefficientMatrix.toArray()[c, j])


def colliding_size() -> tuple[int, dict[str, int]]:
    """A bucket count where the markers have buckets of their own but 'goal' shares one."""
    words = [*MARKERS.values(), *NEUTRAL]
    for n in range(24, 200):
        tf = HashingTF(numFeatures=n)
        where = {w: tf.indexOf(w) for w in words}
        marks = [where[m] for m in MARKERS.values()]
        if len(set(marks)) == 3 and any(where[w] == where["goal"] for w in NEUTRAL):
            return n, where
    raise AssertionError("no bucket count gives the collision")


def test_hashed_buckets_name_each_class_by_its_marker_with_the_collision_marked(spark):
    labels = list(MARKERS)
    n, where = colliding_size()
    train = corpus(spark, labels)
    model = fit(train, labels, tf={"num_features": n})
    tt = top_terms(model, train, labels, k=3)
    assert tt.hashed and tt.num_features == n
    for c, y in enumerate(labels):
        pos, neg = tt.per_class[y]["positive"], tt.per_class[y]["negative"]
        assert pos[0].words[0] == MARKERS[y] and pos[0].index == where[MARKERS[y]]
        assert {t.words[0] for t in neg[:2]} == set(MARKERS.values()) - {MARKERS[y]}
        assert all(a.coef >= b.coef > 0 for a, b in zip(pos, pos[1:], strict=False))
        assert all(t.coef == pytest.approx(coefficient(model, c, t.index)) for t in pos + neg)
    goal = tt.per_class["sport"]["positive"][0]
    shared = sorted(w for w in NEUTRAL if where[w] == where["goal"])
    assert goal.collisions == len(shared) and set(goal.words[1:]) <= set(shared)
    table = tt.markdown()
    assert f"| sport | {goal.label} ({goal.coef:.3g})" in table and SHARED in goal.label
    assert table.count("\n| ") == 1 + len(labels)  # the separator and one row a class
    assert tt.to_dict()["per_class"]["sport"]["positive"][0]["label"] == goal.label


def test_vocabulary_words_name_each_class_by_its_marker(spark):
    labels = list(MARKERS)
    train = corpus(spark, labels, seed=1)
    model = fit(train, labels, tf={"method": "count"})
    tt = top_terms(model, train, labels, k=5)
    assert not tt.hashed and tt.num_features == len(model.stages[2].vocabulary)
    for y in labels:
        top = tt.per_class[y]["positive"][0]
        assert top.words == [MARKERS[y]] and top.collisions == 0 and top.label == MARKERS[y]
    assert SHARED not in tt.markdown()
    fig = top_terms_figure(tt, k=5)
    assert [ax.get_title() for ax in fig.axes if ax.axison] == labels


def test_binomial_model_gives_class_zero_the_negated_row(spark):
    labels = ["sport", "politics"]
    train = corpus(spark, labels, seed=2)
    model = fit(train, labels)  # 2^16 buckets: the slicer keeps a few, far apart
    assert model.stages[-2].coefficientMatrix.numRows == 1  # binomial, not multinomial
    tt = top_terms(model, train, labels, k=4)
    sport, politics = tt.per_class["sport"], tt.per_class["politics"]
    assert sport["positive"][0].words[0] == "goal" and politics["positive"][0].words[0] == "vote"
    assert [(t.index, -t.coef) for t in sport["positive"]] == [
        (t.index, t.coef) for t in politics["negative"]
    ]
    top = politics["positive"][0]  # class 1: the matrix's one row, as it is
    assert top.coef == pytest.approx(coefficient(model, 0, top.index))


def test_figure_lays_twenty_classes_out_in_a_grid():
    labels = [f"class-{i}" for i in range(20)]
    coefs = np.linspace(1.0, 0.1, 10)
    per_class = {
        y: {"positive": [Term([f"w{i}", "x"], c, i, 1) for i, c in enumerate(coefs)],
            "negative": [Term([f"n{i}"], -c, 100 + i) for i, c in enumerate(coefs)]}
        for y in labels
    }  # fmt: skip
    fig = top_terms_figure(TopTerms(labels, per_class, True, 1 << 16), k=10)
    assert [ax.get_title() for ax in fig.axes] == labels  # 4 columns x 5 rows, none spare
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert ticks[0] == "w0/x" + SHARED and ticks[-1] == "n0" and len(ticks) == 20
    width, height = fig.get_size_inches()
    assert width >= 16 and height >= 5 * 20 * 0.2  # a fifth of an inch a bar
    fig.savefig(io.BytesIO(), format="png")  # the layout runs at the draw


def test_a_model_without_term_features_is_refused():
    tokenize = PipelineModel(stages=[RegexTokenizer(inputCol="text", outputCol="tokens")])
    with pytest.raises(ValueError, match="HashingTF or CountVectorizer"):
        top_terms(tokenize, None, ["a", "b"])
