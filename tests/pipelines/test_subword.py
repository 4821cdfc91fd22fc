"""WordPiece tokenizer, Spark-side encoding and BERT's NSP pairs, on tiny made-up documents."""

from __future__ import annotations

import random

import pytest
from pyspark.sql import functions as F

from sparkloom.pipelines.deep import static_masked
from sparkloom.pipelines.errors import DataError
from sparkloom.pipelines.subword import (
    SPECIAL_TOKENS,
    encode,
    load_wordpiece,
    pretraining_examples,
    sample_texts,
    train_wordpiece,
)
from tests.conftest import TOPICS

WORDS = [w for ws in TOPICS.values() for w in ws]


def make_doc(k: int, sentences: int = 6) -> str:
    rng = random.Random(k)
    out = []
    for _ in range(sentences):
        out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + ".")
    return " ".join(out)


@pytest.fixture(scope="module")
def docs(spark):
    return spark.createDataFrame(
        [(f"d{k:03d}", make_doc(k)) for k in range(120)], "id string, text string"
    )


@pytest.fixture(scope="module")
def tokenizer(docs):
    return train_wordpiece(sample_texts(docs, "text", 200, seed=1), vocab_size=120)


def test_vocabulary_has_special_tokens_first(tokenizer):
    assert [tokenizer.id_to_token(i) for i in range(5)] == SPECIAL_TOKENS
    assert tokenizer.get_vocab_size() <= 120


def test_spark_udf_and_python_tokenizer_give_identical_ids(spark, docs, tokenizer):
    js = tokenizer.to_str()
    pairs = docs.select("id", F.col("text").alias("a"), F.lit("Chef and the robot.").alias("b"))
    got = pairs.select("id", "a", "b", encode(js, 32, F.col("a"), F.col("b")).alias("e")).collect()
    tokenizer.enable_truncation(32)
    for r in got:
        want = tokenizer.encode(r["a"], r["b"])
        assert r["e"]["input_ids"] == want.ids and r["e"]["token_type_ids"] == want.type_ids
        assert len(want.ids) <= 32 and want.ids[0] == tokenizer.token_to_id("[CLS]")
    single = docs.select(encode(js, 16, F.col("text")).alias("e")).first()["e"]
    assert single["input_ids"][-1] == tokenizer.token_to_id("[SEP]") and set(
        single["token_type_ids"]
    ) == {0}


def test_a_saved_bert_vocabulary_loads(tmp_path, tokenizer):
    vocab = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    loaded = load_wordpiece(str(tmp_path / "vocab.txt"))
    assert loaded.encode("the chef cooks pasta").ids == tokenizer.encode("the chef cooks pasta").ids
    with pytest.raises(DataError, match="does not exist"):
        load_wordpiece(str(tmp_path / "nope.txt"))


def test_nsp_pairs_are_half_random_never_self_and_deterministic(spark, docs, tokenizer):
    js = tokenizer.to_str()
    ex = pretraining_examples(docs, js, max_length=48, seed=7)
    rows = ex.collect()
    assert len(rows) > 200
    positives = sum(r["next_sentence_label"] == 0 for r in rows) / len(rows)
    assert 0.4 <= positives <= 0.6
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    for r in rows:
        ids, types = r["input_ids"], r["token_type_ids"]
        assert len(ids) == len(types) <= 48 and ids[0] == cls and ids[-1] == sep
        first_sep = ids.index(sep)
        assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
    # the same seed gives the same examples, also from a differently partitioned input
    again = pretraining_examples(docs.repartition(5), js, max_length=48, seed=7).collect()
    key = lambda r: r["example_id"]  # noqa: E731
    assert sorted(map(tuple, rows), key=lambda t: t[0]) == sorted(
        map(tuple, again), key=lambda t: t[0]
    )
    assert sorted(rows, key=key)[0]["example_id"] == sorted(again, key=key)[0]["example_id"]


def test_random_b_comes_from_another_document(spark, tokenizer):
    """Every document uses its own words, so a B from elsewhere is recognisable."""
    words = {k: [f"w{k}x{j}" for j in range(6)] for k in range(40)}
    rows = [(f"doc{k}", " ".join(f"{' '.join(words[k])}." for _ in range(4))) for k in range(40)]
    docs = spark.createDataFrame(rows, "id string, text string")
    tok = train_wordpiece([t for _, t in rows], vocab_size=400, min_frequency=1)
    ex = pretraining_examples(docs, tok.to_str(), max_length=20, seed=3).collect()
    for r in ex:
        doc = int(r["example_id"].split("#")[0][3:])
        sep = tok.token_to_id("[SEP]")
        b = r["input_ids"][r["input_ids"].index(sep) + 1 : -1]
        text_b = tok.decode(b)
        own = all(w in words[doc] for w in text_b.replace(".", " ").split())
        assert own == (r["next_sentence_label"] == 0), (r["example_id"], text_b)


def test_static_masks_follow_bert_rates_and_do_not_depend_on_partitioning(spark, docs, tokenizer):
    js = tokenizer.to_str()
    ex = pretraining_examples(docs, js, max_length=48, seed=7).select(
        F.col("example_id").alias("id"), "input_ids", "token_type_ids",
        F.col("next_sentence_label").alias("label"),
        F.when(F.crc32("example_id") % 4 == 0, "test").otherwise("train").alias("split"),
    )  # fmt: skip
    special = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    mask_id, vocab = tokenizer.token_to_id("[MASK]"), tokenizer.get_vocab_size()
    mlm = {"mask_token_id": mask_id, "vocab_size": vocab, "special_ids": special,
           "first_normal_id": 5, "probability": 0.15}  # fmt: skip
    out = static_masked(ex, mlm, copies=3, seed=11)
    original = {r["id"]: r["input_ids"] for r in ex.collect()}
    splits = {r["id"]: r["split"] for r in ex.collect()}
    rows = out.collect()
    n_train = sum(s == "train" for s in splits.values())
    assert len(rows) == 3 * n_train + (len(original) - n_train)  # copies of train only
    assert len({r["id"] for r in rows}) == len(rows)

    chosen = eligible = masked = same = 0
    copies: dict[str, list[list[int]]] = {}
    for r in rows:
        base = r["id"].split("@copy")[0]
        ids, labels, orig = r["input_ids"], r["mlm_labels"], original[base]
        assert len(ids) == len(labels) == len(orig) == len(r["token_type_ids"])
        copies.setdefault(base, []).append(labels)
        for tok, lab, o in zip(ids, labels, orig, strict=True):
            if o in special:
                assert lab == -100 and tok == o  # [CLS]/[SEP] never chosen
                continue
            eligible += 1
            if lab == -100:
                assert tok == o  # not chosen: left as it was
                continue
            assert lab == o  # the label is the original token
            chosen += 1
            masked += tok == mask_id
            same += tok == o
    assert eligible > 5000
    assert chosen / eligible == pytest.approx(0.15, abs=0.02)
    assert masked / chosen == pytest.approx(0.8, abs=0.04)
    # unchanged: the 10% kept plus random draws that hit the same token (1 in ~115)
    assert same / chosen == pytest.approx(0.1, abs=0.03)
    # the copies of a training example carry different masks
    multi = [v for v in copies.values() if len(v) == 3]
    assert (
        len(multi) == n_train
        and sum(len({tuple(x) for x in v}) == 3 for v in multi) > 0.9 * n_train
    )

    again = static_masked(ex.repartition(5), mlm, copies=3, seed=11).collect()
    assert sorted(map(tuple, rows)) == sorted(map(tuple, again))
    other_seed = static_masked(ex, mlm, copies=3, seed=12).collect()
    assert sorted(map(tuple, rows)) != sorted(map(tuple, other_seed))


def test_dense_index_numbers_rows_in_order_whatever_the_partitioning(spark):
    """zipWithIndex without an RDD: 0..n-1 in the order column's order, over many partitions
    of different sizes (and none for an empty frame)."""
    from sparkloom.pipelines.subword import dense_index

    keys = [f"k{i:04d}" for i in range(0, 3000, 7)]
    df = spark.createDataFrame([(k,) for k in reversed(keys)], "key string").repartition(5)
    got = dense_index(df, "key", "idx").collect()
    assert sorted((r["idx"], r["key"]) for r in got) == list(enumerate(keys))
    assert dense_index(df.limit(0), "key", "idx").count() == 0
