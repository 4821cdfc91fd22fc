import math

import pytest
from pyspark.ml.linalg import SparseVector

from sparkloom.pipelines.config import FeaturesConfig
from sparkloom.pipelines.text import build_feature_pipeline


def featurize(spark, rows, **features):
    cfg = FeaturesConfig.model_validate(features)
    df = spark.createDataFrame([(i, t) for i, t in enumerate(rows)], "id int, text string")
    model = build_feature_pipeline(cfg).fit(df)
    return model, {r["id"]: r for r in model.transform(df).collect()}


def test_tokenizer_lowercases_splits_and_drops_short_tokens_and_stopwords(spark):
    _, out = featurize(spark, ["The cat sat on THE mat!", "A dog, the DOG barked..."])
    assert out[0]["raw_tokens"] == ["the", "cat", "sat", "on", "the", "mat"]
    assert out[0]["tokens"] == ["cat", "sat", "mat"]
    assert out[1]["raw_tokens"] == ["dog", "the", "dog", "barked"]  # "a" is below min length 2
    assert out[1]["tokens"] == ["dog", "dog", "barked"]


def test_custom_stopwords_and_no_stopwords(spark):
    _, out = featurize(spark, ["the cat said hello"], stopwords={"extra": ["said"]})
    assert out[0]["tokens"] == ["cat", "hello"]
    _, out = featurize(spark, ["the cat said hello"], stopwords={"enabled": False})
    assert out[0]["tokens"] == ["the", "cat", "said", "hello"]


def test_count_vectorizer_tfidf_values(spark):
    model, out = featurize(
        spark, ["cat sat mat", "dog dog barked"], tf={"method": "count", "num_features": 100}
    )
    vocab = model.stages[2].vocabulary
    assert sorted(vocab) == ["barked", "cat", "dog", "mat", "sat"]
    idf = math.log((2 + 1) / (1 + 1))  # Spark's smoothed idf: log((m + 1) / (df + 1))
    v1: SparseVector = out[1]["features"]
    assert v1[vocab.index("dog")] == pytest.approx(2 * idf)
    assert v1[vocab.index("barked")] == pytest.approx(idf)
    assert v1[vocab.index("cat")] == 0.0
    assert out[1]["tf"][vocab.index("dog")] == 2.0


def test_term_in_every_document_gets_zero_idf(spark):
    model, out = featurize(
        spark, ["cat dog", "cat bird"], tf={"method": "count", "num_features": 10}
    )
    vocab = model.stages[2].vocabulary
    assert out[0]["features"][vocab.index("cat")] == pytest.approx(0.0)


def test_ngrams_add_to_words(spark):
    model, out = featurize(
        spark,
        ["quick brown fox"],
        ngram={"n": 2},
        tf={"method": "count", "num_features": 100},
        idf={"enabled": False},
    )
    assert out[0]["terms"] == ["quick", "brown", "fox", "quick brown", "brown fox"]
    vocab = [s for s in model.stages if hasattr(s, "vocabulary")][0].vocabulary
    assert set(vocab) == {"quick", "brown", "fox", "quick brown", "brown fox"}


def test_hashing_tf_size_and_word2vec(spark):
    _, out = featurize(
        spark, ["cat sat mat", "dog sat mat"], tf={"num_features": 64},
        word2vec={"enabled": True, "vector_size": 8, "min_count": 1},
    )  # fmt: skip
    assert out[0]["features"].size == 64
    assert len(out[0]["word2vec"]) == 8


def test_token_ids_use_the_training_vocabulary(spark):
    from sparkloom.pipelines.config import SequenceConfig
    from sparkloom.pipelines.text import fit_vocabulary, token_ids

    df = spark.createDataFrame(
        [(["cat", "dog", "cat"],), (["dog", "bird"],), ([],), (["cat"] * 10,)],
        "tokens array<string>",
    )
    vocab = fit_vocabulary(df, SequenceConfig(vocab_size=4, min_df=1, max_length=3))
    assert vocab == ["[PAD]", "[UNK]", "cat", "dog"]  # by document frequency, capped at 4
    out = [r[0] for r in df.select(token_ids(df["tokens"], vocab, 3)).collect()]
    assert out == [[2, 3, 2], [3, 1], [1], [2, 2, 2]]
