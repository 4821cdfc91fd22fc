"""Synthetic labelled documents for scale tests and benchmarks, deterministic in a seed.

Real corpora of a million labelled documents do not ship in any package, so the
scale benchmark and the many-class tests make their own:

- a made-up lowercase vocabulary (no real English stop words among it) with Zipfian
  frequencies, the background every document draws most of its words from;
- per class, a set of words it uses more often than the others (`class_words`);
  with `family_size > 1` classes come in families that share most of those words
  (`family_share` of a class's own draws come from the family's set), which makes
  many similar classes, the case where the best regularisation is small;
- real English stop words mixed in, and sentence capitalisation and a full stop,
  so tokenising, lowercasing and stop-word removal all have work to do.

Documents are generated in chunks of 100,000, each from its own seed, so the first
N documents are the same whatever the total: a 100k corpus is a prefix of the 1M one.

    python -m pipelines.synthetic data/raw/docs20 --docs 20000 --classes 20 --format csv
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

CHUNK = 100_000
# Every word here is in both Spark's and scikit-learn's English stop-word lists, so both
# engines drop exactly the same tokens from the documents.
_STOPWORD_TEXT = (
    "the and of to in is it that for was on with as by at from this be are or an but not have "
    "had were which their there been its into more other some than then these will would about "
    "after all can has he her his if no our out so they we what when who you"
)
STOPWORDS = _STOPWORD_TEXT.split()
_RESERVED = set(STOPWORDS) | {"doing", "having", "ought", "theirs"}


@dataclass(frozen=True)
class Corpus:
    """The shape of a synthetic corpus; `docs(n)` makes its first n documents."""

    classes: int = 5
    vocab_size: int = 20_000
    class_words: int = 400  # words each class (or family) favours
    p_class_word: float = 0.10  # share of a document's tokens drawn from its class's words
    p_stopword: float = 0.20
    min_length: int = 30
    max_length: int = 50  # tokens per document, uniform in [min_length, max_length]
    family_size: int = 1  # classes per family of similar classes
    family_share: float = 0.0  # share of class-word draws taken from the family's words
    zipf_exponent: float = 1.07
    seed: int = 0

    def __post_init__(self) -> None:
        if self.classes < 2 or self.classes % self.family_size:
            raise ValueError(
                f"classes={self.classes} must be >= 2 and a multiple of family_size="
                f"{self.family_size}"
            )
        if not 0 <= self.family_share < 1 or self.p_class_word + self.p_stopword >= 1:
            raise ValueError("family_share must be in [0, 1), p_class_word + p_stopword < 1")

    def docs(self, n: int) -> pd.DataFrame:
        """Columns `text` and `label` (an int in [0, classes)), one row per document."""
        rng = np.random.default_rng(self.seed)
        words = np.array(_vocabulary(rng, self.vocab_size) + STOPWORDS, dtype=object)
        zipf = 1.0 / np.arange(1, self.vocab_size + 1) ** self.zipf_exponent
        zipf /= zipf.sum()
        # class subsets skip the head of the Zipf curve so they stay distinctive
        pool = np.arange(min(200, self.vocab_size // 10), self.vocab_size)
        own = np.stack(
            [rng.choice(pool, self.class_words, replace=False) for _ in range(self.classes)]
        )
        family = np.stack(
            [
                rng.choice(pool, self.class_words, replace=False)
                for _ in range(self.classes // self.family_size)
            ]
        )
        chunks = [
            self._chunk(
                np.random.default_rng([self.seed, i]),
                min(CHUNK, n - start),
                words,
                zipf,
                own,
                family,
            )  # fmt: skip
            for i, start in enumerate(range(0, n, CHUNK))
        ]
        return pd.concat(chunks, ignore_index=True) if chunks else _empty()

    def _chunk(self, rng, n, words, zipf, own, family) -> pd.DataFrame:
        labels = rng.integers(0, self.classes, size=n)
        lengths = rng.integers(self.min_length, self.max_length + 1, size=n)
        token_label = np.repeat(labels, lengths)
        ids = rng.choice(self.vocab_size, size=token_label.size, p=zipf)
        kind = rng.random(token_label.size)
        is_class = kind < self.p_class_word
        is_stop = (kind >= self.p_class_word) & (kind < self.p_class_word + self.p_stopword)
        who = token_label[is_class]
        pick = rng.integers(0, self.class_words, size=who.size)
        from_family = rng.random(who.size) < self.family_share
        ids[is_class] = np.where(from_family, family[who // self.family_size, pick], own[who, pick])
        ids[is_stop] = self.vocab_size + rng.integers(0, len(STOPWORDS), size=is_stop.sum())
        tokens = words[ids]
        ends = np.cumsum(lengths)
        texts = [
            " ".join(tokens[end - k : end]).capitalize() + "."
            for end, k in zip(ends.tolist(), lengths.tolist(), strict=True)
        ]
        return pd.DataFrame({"text": texts, "label": labels})


def _vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    """Unique made-up words of 4-10 letters; real stop words are excluded."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    seen: dict[str, None] = {}  # an insertion-ordered set keeps it deterministic
    while len(seen) < size:
        for length in rng.integers(4, 11, size=size):
            word = "".join(rng.choice(letters, size=length))
            if word not in _RESERVED:
                seen[word] = None
    return list(seen)[:size]


def _empty() -> pd.DataFrame:
    return pd.DataFrame({"text": pd.Series(dtype=object), "label": pd.Series(dtype=np.int64)})


def write(df: pd.DataFrame, dest: str | Path, fmt: str, files: int = 1) -> list[Path]:
    """Write documents as `files` CSV (RFC 4180, header) or Parquet files under `dest`."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, part in enumerate(np.array_split(np.arange(len(df)), files)):
        path = dest / f"part-{i:03d}.{fmt}"
        chunk = df.iloc[part]
        if fmt == "csv":
            chunk.to_csv(path, index=False)
        else:
            chunk.to_parquet(path, index=False)
        out.append(path)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("dest", help="folder to write (left alone if it already holds data)")
    p.add_argument("--docs", type=int, default=20_000)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--vocab-size", type=int, default=20_000)
    p.add_argument("--family-size", type=int, default=1)
    p.add_argument("--family-share", type=float, default=0.0)
    p.add_argument("--class-words", type=int, default=400)
    p.add_argument("--p-class-word", type=float, default=0.10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["csv", "parquet"], default="csv")
    p.add_argument("--files", type=int, default=1)
    args = p.parse_args(argv)
    if os.path.isdir(args.dest) and os.listdir(args.dest):
        print(f"{args.dest} already holds data; leaving it as it is")
        return
    corpus = Corpus(classes=args.classes, vocab_size=args.vocab_size,
                    family_size=args.family_size, family_share=args.family_share,
                    class_words=args.class_words, p_class_word=args.p_class_word,
                    seed=args.seed)  # fmt: skip
    paths = write(corpus.docs(args.docs), args.dest, args.format, args.files)
    print(f"wrote {args.docs} documents in {len(paths)} {args.format} file(s) to {args.dest}")


if __name__ == "__main__":
    main()
