"""GPT-2's data in Spark: byte-level BPE, and documents packed into fixed-length blocks."""

from __future__ import annotations

import random

import pytest
from pyspark.sql import functions as F

from sparkloom.pipelines.errors import DataError
from sparkloom.pipelines.lm import pack
from sparkloom.pipelines.subword import EOT, load_bytelevel_bpe, train_bytelevel_bpe
from tests.conftest import TOPICS

WORDS = [w for ws in TOPICS.values() for w in ws]


def make_text(k: int) -> str:
    rng = random.Random(k)
    n = rng.randint(0, 60)  # some documents are empty: they still end with EOT
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ("." if n else "")


@pytest.fixture(scope="module")
def docs(spark):
    rows = [(f"d{k:03d}", make_text(k)) for k in range(150)] + [("dnull", None)]
    return spark.createDataFrame(rows, "id string, text string")


@pytest.fixture(scope="module")
def tokenizer(docs):
    return train_bytelevel_bpe([r["text"] for r in docs.collect() if r["text"]], vocab_size=400)


def test_byte_level_bpe_encodes_any_text_and_round_trips(tokenizer):
    assert tokenizer.token_to_id(EOT) == 0 and tokenizer.get_vocab_size() <= 400
    for text in ["The match ended 2-1.", "café naïve — 東京 🚀", "  leading spaces\n\ttabs"]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.token_to_id("<unk>") is None and tokenizer.decode(ids) == text
    with pytest.raises(DataError, match="more than 257"):
        train_bytelevel_bpe(["x"], vocab_size=200)


def test_a_local_gpt2_vocabulary_loads_from_either_layout(tmp_path, tokenizer):
    text = "The coach praised the team after the match."
    want = tokenizer.encode(text).ids
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert load_bytelevel_bpe(str(tmp_path)).encode(text).ids == want
    split = tmp_path / "split"
    split.mkdir()
    tokenizer.model.save(str(split))  # vocab.json + merges.txt, GPT-2's own files
    loaded = load_bytelevel_bpe(str(split))
    assert loaded.encode(text).ids == want and loaded.token_to_id(EOT) == 0
    with pytest.raises(DataError, match="no GPT-2 vocabulary at"):
        load_bytelevel_bpe(str(tmp_path / "missing"))


def test_packing_loses_no_tokens_and_keeps_stream_order(spark, docs, tokenizer):
    js, span = tokenizer.to_str(), 17
    packed = pack(docs, js, block_size=span - 1, seed=5)
    blocks = sorted(packed.blocks.collect(), key=lambda r: r["block"])

    # the stream the blocks must cut: documents in seeded-hash order, each + EOT
    order = docs.select("id", "text", F.xxhash64(F.lit(5), "id").alias("o")).orderBy("o", "id")
    stream = []
    for r in order.collect():
        stream += tokenizer.encode(r["text"] or "", add_special_tokens=False).ids + [0]
    assert packed.documents == 151 and packed.tokens == len(stream)
    assert packed.num_blocks == len(stream) // span and 0 <= packed.tail < span
    assert packed.tokens == packed.num_blocks * span + packed.tail  # nothing else is dropped
    assert [r["block"] for r in blocks] == list(range(packed.num_blocks))
    assert all(len(r["tokens"]) == span for r in blocks)
    assert [t for r in blocks for t in r["tokens"]] == stream[: packed.num_blocks * span]

    # the same blocks from any partitioning; another seed orders the documents differently
    again = pack(docs.repartition(7), js, block_size=span - 1, seed=5, partitions=3)
    assert sorted(map(tuple, again.blocks.collect())) == sorted(map(tuple, blocks))
    other = pack(docs, js, block_size=span - 1, seed=6).blocks.collect()
    assert sorted(map(tuple, other)) != sorted(map(tuple, blocks))


def test_a_corpus_smaller_than_one_block_packs_to_nothing_but_counts_it(spark, tokenizer):
    df = spark.createDataFrame([("a", "Goal.")], "id string, text string")
    packed = pack(df, tokenizer.to_str(), block_size=64, seed=0)
    assert packed.num_blocks == 0 and packed.tail == packed.tokens > 0
    assert packed.blocks.count() == 0
