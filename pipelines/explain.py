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


# --- deep models: Integrated Gradients on chosen test rows ---------------------------------------


def chosen_test_rows(spark, predictions: str, correct: int, wrong: int) -> list[dict]:
    """The `correct` most confident right and `wrong` most confident wrong test predictions
    (id, label), from the stage's predictions (pipelines.audit's layout): the model's
    clearest successes and its most confident mistakes."""
    import numpy as np

    from sparkloom.pipelines.audit import read_predictions

    test = read_predictions(spark, predictions).filter(F.col("split") == "test").toPandas()
    if test.empty:
        return []
    logits = np.stack(test["logits"].map(np.asarray))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    test["pred"], test["prob"] = probs.argmax(1), probs.max(1)
    test = test.sort_values(["prob", "id"], ascending=[False, True])
    right = test[test["pred"] == test["label"]].head(correct)
    mistaken = test[test["pred"] != test["label"]].head(wrong)
    return [
        {"id": r.id, "label": int(r.label)} for r in (*right.itertuples(), *mistaken.itertuples())
    ]


def text_attributions(spark, cfg, catalog, stage: str, model_name: str, predictions: str,
                      labels: list[str]) -> list[dict]:  # fmt: skip
    """Token attributions (pipelines.attributions.explain_token_rows) of the chosen test
    rows, with the ids the model was tested on: the features stage's token ids and the
    model's vocab.txt (lstm, textcnn, their distilled students), or the model's own
    tokenizer.json on the ingested text (bert)."""
    import json
    import os

    from sparkloom.models.train import load_exported
    from sparkloom.pipelines.attributions import explain_token_rows
    from sparkloom.pipelines.stages import SPECS

    ec = cfg.evaluation
    chosen = chosen_test_rows(spark, predictions, ec.examples_correct, ec.examples_wrong)
    if not chosen:
        return []
    model_dir = catalog.local_path(f"{stage}_model")
    model = load_exported(model_dir, model_name)
    ids = [c["id"] for c in chosen]
    if SPECS[stage].token_ids:
        with open(os.path.join(model_dir, "vocab.txt")) as f:
            vocab = f.read().split("\n")[:-1]
        found = catalog.read("features", "features").filter(F.col("id").isin(ids))
        token_ids = {
            r["id"]: list(r["token_ids"]) for r in found.select("id", "token_ids").collect()
        }
        pad, keep = 0, None
        tokens_of = lambda seq: [vocab[i] for i in seq]  # noqa: E731
    else:
        from sparkloom.pipelines.subword import tokenizer_from_json

        with open(os.path.join(model_dir, "tokenizer.json")) as f:
            tok = tokenizer_from_json(f.read())
        info = {}
        if os.path.exists(info_path := os.path.join(model_dir, "tokenizer_info.json")):
            with open(info_path) as f:
                info = json.load(f)
        tok.no_padding()
        tok.enable_truncation(info.get("max_length", cfg.bert.max_length))
        pad = info.get("pad_token_id", tok.token_to_id("[PAD]") or 0)
        keep = {
            i for t in ("[CLS]", "[SEP]", "<s>", "</s>") if (i := tok.token_to_id(t)) is not None
        }
        found = (
            catalog.read("ingested", "ingest").filter(F.col("id").isin(ids)).select("id", "text")
        )
        token_ids = {r["id"]: tok.encode(r["text"] or "").ids for r in found.collect()}
        tokens_of = lambda seq: [tok.id_to_token(i) for i in seq]  # noqa: E731
    rows = [{"id": c["id"], "ids": token_ids[c["id"]], "label": c["label"]}
            for c in chosen if token_ids.get(c["id"])]  # fmt: skip
    return explain_token_rows(model, rows, tokens_of, labels, pad, keep, ec.attribution_steps,
                              ec.attribution_tolerance, ec.attribution_max_steps)  # fmt: skip
