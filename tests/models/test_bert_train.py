"""BERT pretraining through the shared runtime (`train_fn`), over Parquet, no Spark."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparkloom.models.train import train_fn

VOCAB, CLS, SEP, MASK = 60, 2, 3, 4


def pairs(n: int, seed: int) -> pa.Table:
    """[CLS] A [SEP] B [SEP]: B continues A's counting sequence (label 0) or is random (1)."""
    rng = np.random.default_rng(seed)
    ids, types, labels = [], [], []
    for _ in range(n):
        start = int(rng.integers(5, VOCAB - 20))
        a = list(range(start, start + 6))
        is_random = bool(rng.integers(0, 2))
        b = list(rng.integers(5, VOCAB, 5)) if is_random else list(range(start + 6, start + 11))
        ids.append([CLS, *a, SEP, *map(int, b), SEP])
        types.append([0] * 8 + [1] * 6)
        labels.append(int(is_random))
    return pa.table({"input_ids": ids, "token_type_ids": types, "label": labels})


def test_pretraining_reports_mlm_and_nsp_metrics_and_learns(tmp_path):
    paths = {}
    for split, n, seed in (("train", 512, 0), ("validation", 128, 1), ("test", 128, 2)):
        pq.write_table(pairs(n, seed), tmp_path / f"{split}.parquet")
        paths[split] = str(tmp_path / f"{split}.parquet")
    cfg = {
        "model": {"name": "bert_pretrain",
                  "config": {"vocab_size": VOCAB, "preset": None, "num_hidden_layers": 2,
                             "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
                             "max_position_embeddings": 32, "hidden_dropout": 0.0,
                             "attention_dropout": 0.0}},
        "data": {**paths,
                 "inputs": {"input_ids": "input_ids", "token_type_ids": "token_type_ids",
                            "attention_mask": "input_ids_mask", "mlm_labels": "mlm_labels",
                            "next_sentence_label": "label"},
                 "mlm": {"mask_token_id": MASK, "vocab_size": VOCAB, "special_ids": [0, CLS, SEP],
                         "first_normal_id": 5, "probability": 0.15}},
        "training": {"batch_size": 32, "eval_batch_size": 128, "optimizer": {"lr": 3e-3},
                     "schedule": {"warmup_ratio": 0.1},
                     "early_stopping": {"metric": "val_loss", "mode": "min", "patience": 30},
                     "epochs": 30, "seed": 0},
        "checkpoint": {"dir": str(tmp_path / "ckpt")},
    }  # fmt: skip
    out = train_fn(cfg)
    first, last = out["history"][0], out["history"][-1]
    assert abs(first["train_loss"] - (math.log(VOCAB) + math.log(2))) < 0.6  # MLM + NSP at init
    assert abs(out["initial"]["val_mlm_loss"] - math.log(VOCAB)) < 0.2
    assert last["val_mlm_loss"] < first["val_mlm_loss"] - 1.0
    assert last["val_perplexity"] == math.exp(last["val_mlm_loss"])
    m = out["metrics"]
    assert m["test_mlm_accuracy"] > 0.3  # counting sequences: masked numbers are predictable
    assert m["test_accuracy"] > 0.7  # NSP: a continuation is easy to tell from noise here
