"""Explanations of the MLlib baseline: which words a feature index stands for.

With CountVectorizer a feature index is a vocabulary entry. With HashingTF it is a bucket
that several words may share; `bucket_terms` recovers the words of each bucket from the
training rows (the most frequent first, and how many distinct words collide there), so the
baseline's top coefficients can be shown as real words.
"""

from __future__ import annotations

from pyspark.ml.feature import HashingTF
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T


def bucket_terms(tokens: DataFrame, num_features: int, top: int = 3,
                 col: str = "tokens") -> DataFrame:  # fmt: skip
    """bucket, terms (the `top` most frequent words hashed there, by document frequency),
    doc_freqs (theirs), collisions (distinct words in the bucket beyond the first).

    The bucket of each word is found by HashingTF itself, on a one-word document, so it is
    the index the fitted features use, whatever hash function this Spark version has."""
    words = (
        tokens.select(F.explode(F.array_distinct(col)).alias("term"))
        .groupBy("term")
        .agg(F.count(F.lit(1)).alias("doc_freq"))
    )
    hashed = HashingTF(inputCol="one", outputCol="v", numFeatures=num_features).transform(
        words.withColumn("one", F.array("term"))
    )
    index = F.udf(lambda v: int(v.indices[0]), T.IntegerType())
    words = hashed.select("term", "doc_freq", index("v").alias("bucket"))
    rank = F.row_number().over(Window.partitionBy("bucket").orderBy(F.desc("doc_freq"), "term"))
    ranked = words.withColumn("rank", rank)
    return ranked.groupBy("bucket").agg(
        F.transform(
            F.array_sort(
                F.collect_list(F.when(F.col("rank") <= top, F.struct("rank", "term", "doc_freq")))
            ),
            lambda s: s["term"],
        ).alias("terms"),
        F.transform(
            F.array_sort(
                F.collect_list(F.when(F.col("rank") <= top, F.struct("rank", "doc_freq")))
            ),
            lambda s: s["doc_freq"],
        ).alias("doc_freqs"),
        (F.count(F.lit(1)) - 1).alias("collisions"),
    )
