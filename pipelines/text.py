"""Spark ML text features: tokens -> stopwords -> n-grams -> term frequencies -> IDF.

The feature Pipeline is fitted on the training split only and saved, so the
baseline, later models and batch scoring apply exactly the same transform.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import pandas as pd
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.base import Estimator, Transformer
from pyspark.ml.feature import (
    IDF,
    CountVectorizer,
    HashingTF,
    NGram,
    RegexTokenizer,
    SQLTransformer,
    StopWordsRemover,
    Word2Vec,
)
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.config import FeaturesConfig, SequenceConfig
from sparkloom.pipelines.context import StageContext, stage

log = logging.getLogger(__name__)

FEATURE_COLUMNS = ["id", "label", "label_index", "split", "tokens", "features"]
PAD, UNK = 0, 1
SPECIAL_TOKENS = ["[PAD]", "[UNK]"]


def build_feature_pipeline(fc: FeaturesConfig, text_col: str = "text") -> Pipeline:
    """An unfitted Pipeline from `text_col` to `tokens`, `features` (and `word2vec`)."""
    t = fc.tokenizer
    stages: list[Estimator | Transformer] = [
        RegexTokenizer(
            inputCol=text_col,
            outputCol="raw_tokens",
            pattern=t.pattern,
            gaps=t.gaps,
            toLowercase=t.lowercase,
            minTokenLength=t.min_token_length,
        )
    ]
    if fc.stopwords.enabled:
        sw = fc.stopwords
        words = StopWordsRemover.loadDefaultStopWords(sw.language) + list(sw.extra)
        stages.append(
            StopWordsRemover(
                inputCol="raw_tokens",
                outputCol="tokens",
                stopWords=words,
                caseSensitive=sw.case_sensitive,
            )
        )
    else:
        stages.append(SQLTransformer(statement="SELECT *, raw_tokens AS tokens FROM __THIS__"))

    terms = "tokens"
    if fc.ngram.n > 1:
        # words plus their n-grams, so bigrams add to unigrams rather than replace them
        stages.append(NGram(n=fc.ngram.n, inputCol="tokens", outputCol="ngrams"))
        stages.append(
            SQLTransformer(statement="SELECT *, concat(tokens, ngrams) AS terms FROM __THIS__")
        )
        terms = "terms"

    tf_col = "tf" if fc.idf.enabled else "features"
    if fc.tf.method == "hashing":
        stages.append(
            HashingTF(
                inputCol=terms,
                outputCol=tf_col,
                numFeatures=fc.tf.num_features,
                binary=fc.tf.binary,
            )
        )
    else:
        stages.append(
            CountVectorizer(
                inputCol=terms,
                outputCol=tf_col,
                vocabSize=fc.tf.num_features,
                minDF=fc.tf.min_df,
                binary=fc.tf.binary,
            )
        )
    if fc.idf.enabled:
        stages.append(IDF(inputCol="tf", outputCol="features", minDocFreq=fc.idf.min_doc_freq))
    if fc.word2vec.enabled:
        w = fc.word2vec
        stages.append(
            Word2Vec(
                inputCol="tokens",
                outputCol="word2vec",
                vectorSize=w.vector_size,
                minCount=w.min_count,
                maxIter=w.max_iter,
                seed=w.seed,
            )
        )
    return Pipeline(stages=stages)


def feature_columns(fc: FeaturesConfig) -> list[str]:
    extra = (["word2vec"] if fc.word2vec.enabled else []) + (
        ["token_ids"] if fc.sequence.enabled else []
    )
    return FEATURE_COLUMNS + extra


def fit_vocabulary(train_tokens: DataFrame, sc: SequenceConfig) -> list[str]:
    """[PAD], [UNK], then the most frequent training words (the line number is the id)."""
    cv = CountVectorizer(
        inputCol="tokens",
        outputCol="_counts",
        vocabSize=sc.vocab_size - len(SPECIAL_TOKENS),
        minDF=sc.min_df,
    ).fit(train_tokens)
    return SPECIAL_TOKENS + list(cv.vocabulary)


def token_ids(tokens: Column, vocabulary: list[str], max_length: int) -> Column:
    """array<string> -> array<int> of vocabulary ids, truncated; an empty document is [UNK]."""
    index = {w: i for i, w in enumerate(vocabulary)}

    @F.pandas_udf(T.ArrayType(T.IntegerType()))
    def to_ids(docs: pd.Series) -> pd.Series:
        return docs.map(lambda ts: [index.get(t, UNK) for t in ts[:max_length]] or [UNK])

    return to_ids(tokens)


def load_vocabulary(catalog: Catalog) -> list[str]:
    catalog.require("vocabulary", "features")
    return catalog.fs.read_text(f"{catalog.path('vocabulary')}/vocab.txt").split("\n")[:-1]


@dataclass
class FeaturesResult:
    rows: int
    vocabulary_size: int
    mean_tokens: float
    skipped: bool = False

    def metrics(self) -> dict[str, float]:
        return {
            "rows": self.rows,
            "vocabulary_size": self.vocabulary_size,
            "mean_tokens": self.mean_tokens,
        }

    def summary(self) -> str:
        return (
            f"{self.rows} rows featurized, {self.vocabulary_size} features, "
            f"{self.mean_tokens:.1f} tokens per document after stopwords"
        )


@stage("features", FeaturesResult)
def run_features(ctx: StageContext) -> FeaturesResult:
    """Called as run_features(spark, cfg, catalog, force=False)."""
    spark, cfg, catalog = ctx.spark, ctx.cfg, ctx.catalog
    data = catalog.read("ingested", "ingest")
    model = build_feature_pipeline(cfg.features).fit(data.filter(F.col("split") == "train"))
    out = model.transform(data)
    common = ctx.common(labels=ctx.upstream["labels"])
    sc = cfg.features.sequence
    if sc.enabled:
        vocabulary = fit_vocabulary(out.filter(F.col("split") == "train"), sc)
        out = out.withColumn("token_ids", token_ids(F.col("tokens"), vocabulary, sc.max_length))
        text = "".join(w + "\n" for w in vocabulary)

        def save_vocabulary(tmp: str) -> None:
            catalog.fs.mkdirs(tmp)
            catalog.fs.write_text(f"{tmp}/vocab.txt", text)

        vocab_manifest = {**common, "size": len(vocabulary), "max_length": sc.max_length}
    out = out.select(*feature_columns(cfg.features))

    def manifest(tmp: str) -> dict:
        written = spark.read.parquet(tmp)
        stats = written.agg(F.count("*").alias("n"), F.avg(F.size("tokens")).alias("t")).first()
        result = FeaturesResult(
            stats["n"], _vocabulary_size(model, cfg.features), float(stats["t"] or 0)
        )
        return {**common, "result": asdict(result)}

    # one commit: features never sit beside another run's model or vocabulary
    with catalog.commit() as tx:
        if sc.enabled:
            tx.write("vocabulary", save_vocabulary, vocab_manifest)
        tx.write("feature_model", model.save, common)
        m = tx.write_parquet("features", out, manifest, partition_by=["split"])
    return FeaturesResult(**m["result"])


def load_feature_model(catalog: Catalog) -> PipelineModel:
    catalog.require("feature_model", "features")
    return PipelineModel.load(catalog.path("feature_model"))


def _vocabulary_size(model: PipelineModel, fc: FeaturesConfig) -> int:
    if fc.tf.method == "count":
        return len(
            model.stages[
                [type(s).__name__ for s in model.stages].index("CountVectorizerModel")
            ].vocabulary
        )
    return fc.tf.num_features
