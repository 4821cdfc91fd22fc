"""Hashed-bucket term recovery: a bucket lists the words HashingTF put there, most frequent
first, and counts the collisions."""

from pyspark.ml.feature import HashingTF

from sparkloom.pipelines.explain import bucket_terms

WORDS = ["goal", "match", "chip", "cloud", "bread", "oven", "team", "code", "soup", "cup"]


def test_bucket_terms_recover_the_words_of_each_bucket_with_a_known_collision(spark):
    n = 8  # ten words in eight buckets: at least two share one
    tf = HashingTF(numFeatures=n)
    where = {w: tf.indexOf(w) for w in WORDS}  # the JVM's own answer, word by word
    shared = next(b for b in set(where.values()) if list(where.values()).count(b) > 1)
    a, b = sorted(w for w in WORDS if where[w] == shared)[:2]
    # documents: `a` in three of them, `b` in one, every other word in two
    docs = [[a, "goal" if a != "goal" else "match"], [a], [a, b]]
    docs += [[w] for w in WORDS if w not in (a, b)] * 2
    df = spark.createDataFrame([(d,) for d in docs], "tokens array<string>")
    got = {r["bucket"]: r for r in bucket_terms(df, n, top=5).collect()}
    df_of = {w: sum(w in d for d in docs) for w in WORDS}
    expected = sorted((w for w in WORDS if where[w] == shared), key=lambda w: (-df_of[w], w))
    row = got[shared]
    assert row["terms"] == expected[:5] and row["doc_freqs"] == [df_of[w] for w in expected[:5]]
    assert row["collisions"] == len(expected) - 1 >= 1
    assert row["terms"].index(a) < row["terms"].index(b)  # 3 documents before 1
    for w in WORDS:  # every word is listed under its own bucket, nowhere else
        assert w in got[where[w]]["terms"]
        assert all(w not in r["terms"] for k, r in got.items() if k != where[w])
