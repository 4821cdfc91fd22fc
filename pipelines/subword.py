"""Subword tokens for the transformer models, and BERT's pretraining pairs, in Spark.

- A WordPiece vocabulary is trained with Hugging Face `tokenizers` on the driver, on a
  sample of documents that Spark draws (or an existing BERT `vocab.txt` is loaded).
- Encoding runs in pandas UDFs with the tokenizer's batched Rust encoder; the tokenizer
  travels to the executors as its JSON string and is built once per Python worker.
- Pretraining pairs: each document is cut into sentences and packed into chunks of up
  to `max_length - 3` tokens; a chunk of two or more sentences splits at a seeded point
  into A and its true continuation B. Half the examples (by a seeded hash of their id)
  get a B from another document instead: the A segment of a partner example chosen by
  a seeded offset over a dense index, never the example itself, never the same document.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator

import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkloom.pipelines.errors import DataError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4 in vocabularies we train
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")  # a sentence ends at . ! ? or a blank line


# --- the tokenizer --------------------------------------------------------------------------


def _bert_pipeline(tok, lowercase: bool):
    from tokenizers import decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def _with_template(tok):
    from tokenizers import processors

    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise DataError("the vocabulary has no [CLS] or [SEP] token; a BERT vocabulary needs both")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tok


def train_wordpiece(
    texts: Iterable[str], vocab_size: int, lowercase: bool = True, min_frequency: int = 2
):
    """A BERT-style WordPiece tokenizer trained on `texts`; special tokens get ids 0-4."""
    from tokenizers import Tokenizer, models, trainers

    tok = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")), lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS
    )
    tok.train_from_iterator(texts, trainer)
    return _with_template(tok)


def load_wordpiece(vocab_file: str, lowercase: bool = True):
    """An existing BERT vocabulary (`vocab.txt`, one token per line) from a local path."""
    import os

    from tokenizers import Tokenizer, models

    if not os.path.isfile(vocab_file):
        raise DataError(f"vocabulary file {vocab_file} does not exist; give a local vocab.txt")
    tok = Tokenizer(models.WordPiece.from_file(vocab_file, unk_token="[UNK]"))
    return _with_template(_bert_pipeline(tok, lowercase))


def sample_texts(df: DataFrame, column: str, max_docs: int, seed: int) -> list[str]:
    """Up to `max_docs` texts drawn by Spark (the driver trains the vocabulary on them)."""
    total = df.count()
    if total == 0:
        raise DataError("no documents to train a vocabulary on")
    fraction = min(1.0, 1.2 * max_docs / total)
    sample = (
        df.select(column)
        if fraction >= 1.0
        else df.select(column).sample(fraction=fraction, seed=seed)
    )
    return [r[0] for r in sample.limit(max_docs).collect() if r[0]]


EOT = "<|endoftext|>"  # GPT-2's document separator; id 0 in byte-level vocabularies we train


def _byte_level(tok):
    from tokenizers import decoders, pre_tokenizers, processors

    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bytelevel_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """A GPT-2-style byte-level BPE tokenizer trained on `texts`: any text encodes (the 256
    byte symbols are always in the vocabulary, nothing is ever unknown); EOT gets id 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise DataError(
            f"a byte-level vocabulary needs more than 257 entries (256 bytes + {EOT}); got "
            f"vocab_size={vocab_size}"
        )
    tok = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return tok


def load_bytelevel_bpe(path: str):
    """An existing GPT-2 vocabulary from a local path: a directory (or file) with
    tokenizer.json, or a directory with vocab.json + merges.txt. It must have EOT."""
    from tokenizers import Tokenizer, models

    p = path.rstrip("/")
    if os.path.isfile(p):
        tok = Tokenizer.from_file(p)
    elif os.path.isfile(os.path.join(p, "tokenizer.json")):
        tok = Tokenizer.from_file(os.path.join(p, "tokenizer.json"))
    elif all(os.path.isfile(os.path.join(p, f)) for f in ("vocab.json", "merges.txt")):
        bpe = models.BPE.from_file(os.path.join(p, "vocab.json"), os.path.join(p, "merges.txt"))
        tok = _byte_level(Tokenizer(bpe))
        tok.add_special_tokens([EOT])
    else:
        raise DataError(
            f"no GPT-2 vocabulary at {path}: give a tokenizer.json, or a directory with "
            "tokenizer.json or vocab.json + merges.txt"
        )
    if tok.token_to_id(EOT) is None:
        raise DataError(f"the vocabulary at {path} has no {EOT} token; GPT-2 packing needs it")
    return tok


_CACHE: dict[str, object] = {}


def tokenizer_from_json(json_str: str):
    """Built once per Python worker process, keyed by the tokenizer's content."""
    key = hashlib.sha1(json_str.encode()).hexdigest()
    if key not in _CACHE:
        from tokenizers import Tokenizer

        _CACHE[key] = Tokenizer.from_str(json_str)
    return _CACHE[key]


ENCODED = T.StructType(
    [
        T.StructField("input_ids", T.ArrayType(T.IntegerType())),
        T.StructField("token_type_ids", T.ArrayType(T.IntegerType())),
    ]
)


def encode(tokenizer_json: str, max_length: int, a: Column, b: Column | None = None) -> Column:
    """`[CLS] A [SEP]` (or `[CLS] A [SEP] B [SEP]`) ids and segment ids, truncated to max_length."""

    def run(first: pd.Series, second: pd.Series | None) -> pd.DataFrame:
        tok = tokenizer_from_json(tokenizer_json)
        tok.no_padding()  # a checkpoint's tokenizer.json may pad to a fixed length
        tok.enable_truncation(max_length)
        items = list(first) if second is None else list(zip(first, second, strict=True))
        encs = tok.encode_batch([x if x is not None else "" for x in items])
        return pd.DataFrame(
            {"input_ids": [e.ids for e in encs], "token_type_ids": [e.type_ids for e in encs]}
        )

    if b is None:
        return F.pandas_udf(lambda s: run(s, None), ENCODED)(a)
    return F.pandas_udf(lambda s1, s2: run(s1, s2), ENCODED)(a, b)


# --- BERT pretraining pairs -----------------------------------------------------------------

CHUNKS = T.StructType(
    [
        T.StructField("example_id", T.StringType()),
        T.StructField("doc_id", T.StringType()),
        T.StructField("a_ids", T.ArrayType(T.IntegerType())),
        T.StructField("b_ids", T.ArrayType(T.IntegerType())),
    ]
)


def _seeded(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def document_chunks(tokenizer_json: str, max_length: int, seed: int):
    """mapInPandas: (id, text) -> one row per chunk with A and its true continuation B."""
    budget = max_length - 3  # [CLS] A [SEP] B [SEP]

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        tok = tokenizer_from_json(tokenizer_json)
        tok.no_truncation()  # whole sentences; pairs are trimmed to max_length when assembled
        for pdf in batches:
            rows = []
            for doc_id, text in zip(pdf["id"], pdf["text"], strict=True):
                sents = [s for s in SENTENCE_END.split(text or "") if s.strip()]
                if not sents:
                    continue
                ids = [e.ids for e in tok.encode_batch(sents, add_special_tokens=False)]
                chunk: list[list[int]] = []
                n, c = 0, 0
                for k, s in enumerate(ids):
                    chunk.append(s)
                    n += len(s)
                    if n >= budget or k == len(ids) - 1:
                        rows.append((f"{doc_id}#{c}", doc_id, *_split(chunk, seed, doc_id, k)))
                        chunk, n, c = [], 0, c + 1
            yield pd.DataFrame(rows, columns=["example_id", "doc_id", "a_ids", "b_ids"])

    return run


def _split(chunk: list[list[int]], *seed) -> tuple[list[int], list[int]]:
    """A = the first sentences, B = the rest, at a seeded cut; one sentence is cut inside
    (its tail is still the true continuation), so every chunk can be a positive example."""
    if len(chunk) == 1:
        toks = chunk[0]
        cut = 1 + _seeded(*seed) % (len(toks) - 1) if len(toks) > 1 else len(toks)
        return toks[:cut], toks[cut:]
    cut = 1 + _seeded(*seed) % (len(chunk) - 1)
    return [t for s in chunk[:cut] for t in s], [t for s in chunk[cut:] for t in s]


def dense_index(df: DataFrame, order: str, name: str) -> DataFrame:
    """`df` with `name` = 0, 1, 2... in `order`'s order (zipWithIndex without an RDD): a
    range-partitioned sort, row numbers within each partition from
    monotonically_increasing_id, and each partition's offset from one small count."""
    ordered = (
        df.orderBy(order)
        .select(
            "*",
            F.spark_partition_id().alias("_part"),
            F.monotonically_increasing_id().alias("_mono"),
        )
        .localCheckpoint()
    )  # the ids the counts describe are the ones the offsets are added to
    counts = sorted(ordered.groupBy("_part").count().collect())
    offsets, total = [], 0
    for part, count in counts:
        offsets += [F.lit(part), F.lit(total)]
        total += count
    # monotonically_increasing_id is (partition << 33) + the row's number in its partition
    within = F.col("_mono") - F.shiftleft(F.col("_part").cast("long"), 33)
    start = F.create_map(*offsets)[F.col("_part")] if offsets else F.lit(0)
    return ordered.select(*df.columns, (start + within).alias(name))


def nsp_pairs(chunks: DataFrame, seed: int, max_length: int, cls_id: int, sep_id: int) -> DataFrame:
    """(example_id, input_ids, token_type_ids, next_sentence_label): label 0 = B follows A,
    1 = B is from another document (Hugging Face's convention)."""
    # a dense index in example-id order: the same for any partitioning of the input;
    # dense_index checkpoints, so the tokenizing scan runs once for the three uses below
    indexed = dense_index(chunks, "example_id", "idx")
    n = indexed.count()
    if indexed.select("doc_id").distinct().limit(2).count() < 2:
        raise DataError("next sentence prediction needs at least two documents")
    h = F.abs(F.xxhash64(F.col("example_id"), F.lit(seed)))
    # a partner other than itself: idx + 1 + (h mod n-1), and the one after as a fallback
    step = F.lit(1) + h % F.lit(max(1, n - 1))
    base = indexed.select(
        "*",
        ((F.col("idx") + step) % n).alias("p1"),
        ((F.col("idx") + step + 1) % n).alias("p2"),
        (F.abs(F.xxhash64(F.col("example_id"), F.lit(seed + 1))) % 2 == 1).alias("want_random"),
    )

    def partner(k: int) -> DataFrame:  # the candidate's doc and A segment, keyed by p<k>
        return indexed.select(F.col("idx").alias(f"p{k}"), F.col("doc_id").alias(f"d{k}"),
                              F.col("a_ids").alias(f"a{k}"))  # fmt: skip

    j = base.join(partner(1), "p1", "left").join(partner(2), "p2", "left")
    random_b = F.when(F.col("d1") != F.col("doc_id"), F.col("a1")).when(
        F.col("d2") != F.col("doc_id"), F.col("a2")
    )
    has_true = F.size("b_ids") > 0
    use_random = (F.col("want_random") | ~has_true) & random_b.isNotNull()
    b = F.when(use_random, random_b).otherwise(F.col("b_ids"))
    out = j.select(
        "example_id",
        "a_ids",
        b.alias("b"),
        F.when(use_random, 1).otherwise(0).alias("next_sentence_label"),
    ).filter(F.size("b") > 0)
    return _assemble(out, max_length, cls_id, sep_id)


def _assemble(df: DataFrame, max_length: int, cls_id: int, sep_id: int) -> DataFrame:
    budget = max_length - 3

    @F.pandas_udf(ENCODED)
    def build(a: pd.Series, b: pd.Series) -> pd.DataFrame:
        ids, types = [], []
        for x, y in zip(a, b, strict=True):
            x, y = list(x), list(y)
            while len(x) + len(y) > budget:  # trim the longer segment from its end (BERT's rule)
                (x if len(x) >= len(y) else y).pop()
            ids.append([cls_id, *x, sep_id, *y, sep_id])
            types.append([0] * (len(x) + 2) + [1] * (len(y) + 1))
        return pd.DataFrame({"input_ids": ids, "token_type_ids": types})

    e = build("a_ids", "b")
    return df.select(
        "example_id",
        e["input_ids"].alias("input_ids"),
        e["token_type_ids"].alias("token_type_ids"),
        "next_sentence_label",
    )


def pretraining_examples(
    docs: DataFrame, tokenizer_json: str, max_length: int, seed: int
) -> DataFrame:
    """Documents (id, text) -> BERT pretraining examples, deterministic for a seed."""
    tok = tokenizer_from_json(tokenizer_json)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    chunks = docs.select("id", "text").mapInPandas(
        document_chunks(tokenizer_json, max_length, seed), CHUNKS
    )
    return nsp_pairs(chunks, seed, max_length, cls_id, sep_id)


# --- static masking -------------------------------------------------------------------------

MASKED = T.StructType(
    [
        T.StructField("input_ids", T.ArrayType(T.IntegerType())),
        T.StructField("mlm_labels", T.ArrayType(T.IntegerType())),
    ]
)


def static_masks(ids: Column, key: Column, mlm: dict, seed: int) -> Column:
    """Masked ids and MLM labels (-100 off the chosen positions), drawn once in Spark.

    The same rule as the loader's dynamic masking (`models.masking.mask_tokens`), with the
    random draws seeded by (seed, key) per row: the result does not depend on partitioning.
    `mlm` holds mask_token_id, vocab_size, special_ids, first_normal_id and probability.
    """

    def run(id_lists: pd.Series, keys: pd.Series) -> pd.DataFrame:
        import numpy as np
        import torch

        from sparkloom.models.masking import MaskingConfig, mask_tokens

        cfg = MaskingConfig(probability=mlm["probability"])
        special_ids = torch.tensor(mlm["special_ids"], dtype=torch.int64)
        masked, labels = [], []
        for row, k in zip(id_lists, keys, strict=True):
            t = torch.from_numpy(np.asarray(row, dtype=np.int64)).unsqueeze(0)  # (1, T)
            g = torch.Generator().manual_seed(_seeded(seed, k) >> 1)
            m, y = mask_tokens(
                t, torch.isin(t, special_ids), mlm["mask_token_id"], mlm["vocab_size"], cfg, g,
                first_normal_id=mlm["first_normal_id"],
            )  # fmt: skip
            masked.append(m[0].tolist())
            labels.append(y[0].tolist())
        return pd.DataFrame({"input_ids": masked, "mlm_labels": labels})

    return F.pandas_udf(run, MASKED)(ids, key)
