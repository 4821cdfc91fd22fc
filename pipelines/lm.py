"""Causal-LM training data in Spark: documents -> byte-level BPE ids -> fixed-length blocks.

Each document is tokenized in a pandas UDF (batched Rust encoding) and followed by the
end-of-text token. The documents of a split are put in a seeded order (a hash of the seed
and the id: topics mix, and the order does not depend on partitioning) and read as one
token stream, which is cut into blocks of `block_size + 1` tokens: a block's first
`block_size` tokens are the input, its last `block_size` the targets (shifted by one).

No token is lost except a split's tail: the tokens after the last whole block, fewer than
`block_size + 1`, counted in `Packed.tail`. Splits come from ingest, which splits by
document, so no block mixes training and evaluation documents.

The stream is cut without collecting it: the documents are range-partitioned by their
order key and pinned (localCheckpoint), each partition's token count goes to the driver
(one number per partition), and from the running totals every partition knows where its
documents start. It emits (block, offset, piece) for each piece of a document that falls
in a block; a groupBy assembles the blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkloom.pipelines import compat
from sparkloom.pipelines.errors import DataError
from sparkloom.pipelines.subword import EOT, tokenizer_from_json

IDS = T.ArrayType(T.IntegerType())
PIECES = T.StructType(
    [
        T.StructField("block", T.LongType()),
        T.StructField("offset", T.IntegerType()),
        T.StructField("ids", IDS),
    ]
)


def document_ids(tokenizer_json: str, text: Column) -> Column:
    """A document's token ids followed by EOT (a null or empty text is just EOT)."""

    def run(texts: pd.Series) -> pd.Series:
        tok = tokenizer_from_json(tokenizer_json)
        tok.no_truncation()
        eot = tok.token_to_id(EOT)
        encs = tok.encode_batch([t or "" for t in texts], add_special_tokens=False)
        return pd.Series([e.ids + [eot] for e in encs])

    return F.pandas_udf(run, IDS)(text)


@dataclass
class Packed:
    blocks: DataFrame  # block (long, 0..num_blocks-1 in stream order), tokens (block_size + 1)
    documents: int
    tokens: int  # all tokens of the split's documents, one EOT each included
    num_blocks: int
    tail: int  # tokens after the last whole block, not used: tokens = num_blocks * span + tail

    def stats(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}_documents": self.documents, f"{prefix}_tokens": self.tokens,
                f"{prefix}_blocks": self.num_blocks, f"{prefix}_tail_tokens": self.tail}  # fmt: skip


def pack(
    docs: DataFrame, tokenizer_json: str, block_size: int, seed: int, partitions: int | None = None
) -> Packed:
    """Documents (id, text) -> blocks of `block_size + 1` token ids, deterministic for a seed."""
    if block_size < 1:
        raise DataError(f"block_size must be >= 1, got {block_size}")
    span = block_size + 1
    spark = docs.sparkSession
    n = partitions or compat.default_parallelism(spark)
    ordered = (
        docs.select("id", document_ids(tokenizer_json, F.col("text")).alias("ids"))
        .withColumn("order", F.xxhash64(F.lit(seed), F.col("id")))
        .repartitionByRange(n, "order", "id")
        .sortWithinPartitions("order", "id")
        .withColumn("part", F.spark_partition_id())
        .localCheckpoint()  # the partitions the counts describe are the ones the cut reads
    )
    sizes = ordered.groupBy("part").agg(F.count(F.lit(1)), F.sum(F.size("ids"))).collect()
    starts, total = {}, 0
    for part, _, tokens in sorted(sizes):
        starts[part], total = total, total + tokens
    documents = sum(d for _, d, _ in sizes)
    num_blocks = total // span

    def cut(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        """One partition's documents, in stream order, as pieces of blocks."""
        pos = None
        for pdf in batches:
            rows = []
            for part, ids in zip(pdf["part"], pdf["ids"], strict=True):
                pos = starts.get(int(part), 0) if pos is None else pos
                k = 0
                while k < len(ids) and pos + k < num_blocks * span:  # past it: the tail
                    block, offset = divmod(pos + k, span)
                    take = min(len(ids) - k, span - offset)
                    rows.append((block, offset, [int(t) for t in ids[k : k + take]]))
                    k += take
                pos += len(ids)
            yield pd.DataFrame(rows, columns=["block", "offset", "ids"])

    pieces = ordered.select("part", "ids").mapInPandas(cut, PIECES)
    blocks = pieces.groupBy("block").agg(
        # pieces sorted by offset (the struct's first field), then concatenated
        F.flatten(
            F.transform(F.array_sort(F.collect_list(F.struct("offset", "ids"))), lambda p: p["ids"])
        ).alias("tokens")
    )
    # stream order on disk too: the loader's seeded shuffle then sees the same row order
    # whatever the shuffle partitions or adaptive execution did to the groupBy's output
    blocks = blocks.repartitionByRange(n, "block").sortWithinPartitions("block")
    return Packed(blocks, documents, total, num_blocks, total - num_blocks * span)
