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
    # incremental ingest: whether the feature model was fitted again, why, the rows
    # transformed this run, and the out-of-vocabulary rates the decision compared
    refit: bool | None = None
    refit_reason: str | None = None
    rows_transformed: int | None = None
    oov_rate: float | None = None  # of the new rows' tokens
    base_oov_rate: float | None = None  # of the training rows' tokens, at the fit

    def metrics(self) -> dict[str, float]:
        m = {
            "rows": self.rows,
            "vocabulary_size": self.vocabulary_size,
            "mean_tokens": self.mean_tokens,
        }
        if self.refit is not None:
            m |= {"refit": float(self.refit), "rows_transformed": self.rows_transformed or 0}
            m |= {k: v for k, v in (("oov_rate", self.oov_rate),
                                    ("base_oov_rate", self.base_oov_rate)) if v is not None}  # fmt: skip
        return m

    def summary(self) -> str:
        text = (
            f"{self.rows} rows featurized, {self.vocabulary_size} features, "
            f"{self.mean_tokens:.1f} tokens per document after stopwords"
        )
        if self.refit is None:
            return text
        how = "refitted" if self.refit else "reused"
        return f"{text}; feature model {how} ({self.refit_reason}), {self.rows_transformed} rows transformed"


@stage("features", FeaturesResult)
def run_features(ctx: StageContext) -> FeaturesResult:
    """Called as run_features(spark, cfg, catalog, force=False). On incrementally ingested
    data, the fitted model is kept for the new batches unless `features.refit` says to fit
    again (see `refit_decision`)."""
    spark, cfg, catalog = ctx.spark, ctx.cfg, ctx.catalog
    data = catalog.read("ingested", "ingest")
    inc = ctx.upstream.get("incremental")
    decision = refit_decision(ctx, data) if inc else None
    if decision is not None and not decision.refit:
        return _transform_batches(ctx, data, decision)
    model = build_feature_pipeline(cfg.features).fit(data.filter(F.col("split") == "train"))
    out = model.transform(data)
    common = ctx.common(labels=ctx.upstream["labels"])
    sc = cfg.features.sequence
    vocabulary = None
    if sc.enabled:
        vocabulary = fit_vocabulary(out.filter(F.col("split") == "train"), sc)
        out = out.withColumn("token_ids", token_ids(F.col("tokens"), vocabulary, sc.max_length))
    out = out.select(*feature_columns(cfg.features), *(["batch"] if inc else []))
    known = coverage_vocabulary(model, cfg.features, vocabulary, out)
    if inc:
        base = oov_rate(out.filter(F.col("split") == "train"), known)
        common["incremental"] = {"batches": _versions(inc), "base_oov_rate": base,
                                 "fitted_at_batch": max(b["batch"] for b in inc["batches"])}  # fmt: skip
        decision = decision or Refit(True, "first fit", None, base)
        decision.base = base

    def manifest(tmp: str) -> dict:
        written = spark.read.parquet(tmp)
        stats = written.agg(F.count("*").alias("n"), F.avg(F.size("tokens")).alias("t")).first()
        result = FeaturesResult(
            stats["n"], _vocabulary_size(model, cfg.features), float(stats["t"] or 0)
        )
        if decision is not None:
            decision.fill(result, stats["n"])
        return {**common, "result": asdict(result)}

    def save_model(tmp: str) -> None:
        model.save(tmp)
        catalog.fs.write_text(f"{tmp}/{KNOWN_TERMS}", "".join(w + "\n" for w in known))

    # one commit: features never sit beside another run's model or vocabulary
    with catalog.commit() as tx:
        if vocabulary is not None:
            tx.write("vocabulary", _vocabulary_writer(catalog, vocabulary),
                     {**common, "size": len(vocabulary), "max_length": sc.max_length})  # fmt: skip
        tx.write("feature_model", save_model, common)
        m = tx.write_parquet("features", out, manifest,
                             partition_by=["batch", "split"] if inc else ["split"])  # fmt: skip
    return FeaturesResult(**m["result"])


def _vocabulary_writer(catalog: Catalog, vocabulary: list[str]):
    def save(tmp: str) -> None:
        catalog.fs.mkdirs(tmp)
        catalog.fs.write_text(f"{tmp}/vocab.txt", "".join(w + "\n" for w in vocabulary))

    return save


# --- features for new batches only -------------------------------------------------------------

KNOWN_TERMS = "known_terms.txt"  # beside the feature model: the words its fit saw


def coverage_vocabulary(model: PipelineModel, fc: FeaturesConfig, vocabulary: list[str] | None,
                        out: DataFrame) -> list[str]:  # fmt: skip
    """The words the fitted features know, to measure a batch's out-of-vocabulary rate
    against: the sequence vocabulary, else CountVectorizer's, else (hashing, where every word
    has a bucket) the training rows' words seen in at least idf.min_doc_freq documents."""
    if vocabulary is not None:
        return vocabulary[len(SPECIAL_TOKENS) :]
    if fc.tf.method == "count":
        return list(next(s for s in model.stages if hasattr(s, "vocabulary")).vocabulary)
    train = out.filter(F.col("split") == "train").select(
        F.explode(F.array_distinct("tokens")).alias("w")
    )
    floor = max(1, fc.idf.min_doc_freq if fc.idf.enabled else 1)
    return [r["w"] for r in train.groupBy("w").count().filter(F.col("count") >= floor).collect()]


def oov_rate(rows: DataFrame, known: list[str]) -> float:
    """The fraction of the rows' tokens (after stopwords) that are not in `known`."""
    spark = rows.sparkSession
    words = spark.createDataFrame([(w, True) for w in known] or [("", True)], "w string, k boolean")
    tokens = rows.select(F.explode("tokens").alias("w"))
    got = (
        tokens.join(F.broadcast(words), "w", "left")
        .agg(F.count(F.lit(1)).alias("n"), F.count("k").alias("known"))
        .first()
    )
    return 1.0 - got["known"] / got["n"] if got["n"] else 0.0


@dataclass
class Refit:
    refit: bool
    reason: str
    oov: float | None  # the new rows' rate
    base: float | None  # the training rows' rate at the fit
    batches: list[int] | None = None  # batches to transform (reuse)

    def fill(self, result: FeaturesResult, transformed: int) -> None:
        result.refit, result.refit_reason, result.rows_transformed = (
            self.refit,
            self.reason,
            transformed,
        )
        result.oov_rate, result.base_oov_rate = self.oov, self.base


def _versions(inc: dict) -> dict[str, str]:
    return {str(b["batch"]): b["version"] for b in inc["batches"]}


def refit_decision(ctx: StageContext, data: DataFrame) -> Refit | None:
    """Whether to fit the features again for the ingested batches (None: a first fit)."""
    catalog, fc = ctx.catalog, ctx.cfg.features
    prev = catalog.manifest("features")
    done = (prev or {}).get("incremental")
    if ctx.force or done is None or prev.get("config_hash") != ctx.config_hash:
        return None  # a first fit
    now = _versions(ctx.upstream["incremental"])
    todo = sorted(int(b) for b, v in now.items() if done["batches"].get(b) != v)
    if not todo:  # the batches are those the features hold (e.g. only a file touched)
        return Refit(False, "no batch changed", None, done["base_oov_rate"], [])
    new = _tokens(catalog, data.filter(F.col("batch").isin(todo)))
    known = catalog.fs.read_text(f"{catalog.path('feature_model')}/{KNOWN_TERMS}").split("\n")[:-1]
    oov, base = oov_rate(new, known), done["base_oov_rate"]
    over = oov - base > fc.max_oov_increase
    why = (f"new rows' out-of-vocabulary rate {oov:.4f} vs {base:.4f} at the fit "
           f"(features.max_oov_increase {fc.max_oov_increase:g})")  # fmt: skip
    if fc.refit == "always":
        return Refit(True, "features.refit=always; " + why, oov, base)
    if fc.refit == "never":
        return Refit(False, "features.refit=never; " + why, oov, base, todo)
    return Refit(
        over, ("drift: " if over else "no drift: ") + why, oov, base, None if over else todo
    )


def _tokens(catalog: Catalog, rows: DataFrame) -> DataFrame:
    tokenize = PipelineModel(stages=load_feature_model(catalog).stages[:2])  # words, stopwords
    return tokenize.transform(rows).select("tokens")


def _transform_batches(ctx: StageContext, data: DataFrame, decision: Refit) -> FeaturesResult:
    """The kept feature model (and vocabulary) applied to the batches that are new or were
    rewritten since; batches ingest no longer has are dropped. One commit."""
    spark, cfg, catalog = ctx.spark, ctx.cfg, ctx.catalog
    prev = catalog.manifest("features")
    model = load_feature_model(catalog)
    sc = cfg.features.sequence
    now = _versions(ctx.upstream["incremental"])
    common = ctx.common(labels=ctx.upstream["labels"])
    common["incremental"] = {**prev["incremental"], "batches": now}
    vocabulary = load_vocabulary(catalog) if sc.enabled else None
    transformed, t = 0, 0.0  # rows and tokens written this run
    with catalog.commit() as tx:
        for b in decision.batches:
            out = model.transform(data.filter(F.col("batch") == b))
            if vocabulary is not None:
                out = out.withColumn("token_ids", token_ids(F.col("tokens"), vocabulary,
                                                            sc.max_length))  # fmt: skip
            tmp = tx.write_part("features", f"batch={b}", out.select(*feature_columns(cfg.features)),
                                ["split"])  # fmt: skip
            got = spark.read.parquet(tmp).agg(F.count("*"), F.sum(F.size("tokens"))).first()
            transformed, t = transformed + got[0], t + float(got[1] or 0)
        for b in set(prev["incremental"]["batches"]) - set(now):
            tx.drop_part("features", f"batch={b}")
        # the rows the features hold after this commit: the kept batches and the new ones
        kept = spark.read.parquet(catalog.path("features")).filter(
            ~F.col("batch").isin([int(b) for b in decision.batches])
            & F.col("batch").isin([int(b) for b in now])
        )
        stats = kept.agg(F.count("*").alias("n"), F.sum(F.size("tokens")).alias("t")).first()
        n, t = stats["n"] + transformed, t + float(stats["t"] or 0)
        result = FeaturesResult(n, prev["result"]["vocabulary_size"], t / max(n, 1))
        decision.fill(result, transformed)
        for name in ("feature_model", "vocabulary"):  # the same model, made from these inputs
            m = catalog.manifest(name)
            if m is not None:
                tx.write_manifest(name, {**m, **common})
        tx.write_manifest("features", {**prev, **common, "result": asdict(result)})
    return result


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
