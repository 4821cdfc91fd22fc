"""Fine-tuning a local Hugging Face checkpoint end to end: ingest -> bert (init_from a tiny
DistilBERT directory the test writes) through TorchDistributor (gloo, 2 processes) ->
register -> score; the model dataset loads in plain transformers and gives the scorer's
probabilities."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.runner import run_pipeline
from sparkloom.pipelines.scoring import score
from tests.conftest import FILLER, TOPICS, make_config

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_distilbert(path) -> str:
    """A 2-layer DistilBERT with a WordPiece vocabulary of the corpus' words, saved as
    save_pretrained writes a checkpoint (its weights are random: what is tested is the path)."""
    words = SPECIALS + sorted({w for ws in TOPICS.values() for w in ws} | set(FILLER))
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=512,
    ).save_pretrained(path)  # fmt: skip
    torch.manual_seed(0)
    transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=len(words), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
        max_position_embeddings=64)).save_pretrained(path)  # fmt: skip
    return str(path)


@pytest.mark.slow
def test_a_checkpoint_fine_tunes_and_scores_exactly_as_plain_transformers(
    spark, tmp_path, text_dirs
):
    checkpoint = tiny_distilbert(tmp_path / "distilbert")
    cfg = make_config(
        tmp_path,
        pipeline={"stages": ["ingest", "bert", "register", "score"]},
        ingest={"format": "text_dirs", "path": str(text_dirs)},
        bert={"init_from": checkpoint, "max_length": 512,
              "training": {"batch_size": 8, "epochs": 3, "optimizer": {"lr": 3e-3},
                           "layer_lr_decay": 0.9}},
    )  # fmt: skip
    outcome = run_pipeline(spark, cfg, list(cfg.pipeline.stages))
    fine = outcome.results["bert"]
    assert fine.world_size == 2 and fine.model_config["hf_config"]["model_type"] == "distilbert"
    assert fine.history[-1]["train_loss"] < fine.history[0]["train_loss"]
    # a new head, and every encoder weight from the checkpoint, reported by name
    assert (
        fine.init_report["new_head"]
        == sorted(
            ["classifier.bias", "classifier.weight", "pre_classifier.bias", "pre_classifier.weight"]
        )
        and fine.init_report["missing_encoder"] == []
    )

    # the model dataset is a transformers directory, with our label index
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    model_dir = catalog.local_path("bert_model")
    files = set(os.listdir(model_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "labels.json"} <= files and "state_dict.pt" not in files  # fmt: skip
    labels = json.loads(Path(model_dir, "labels.json").read_text())
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert hf.config.id2label == dict(enumerate(labels))
    info = json.loads(Path(model_dir, "tokenizer_info.json").read_text())
    assert info["max_length"] == 64  # 512 asked for, capped at the checkpoint's positions

    # the registered champion through batch scoring == plain transformers, same rows
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    test = catalog.read("ingested", "ingest").filter("split = 'test'").select("id", "text")
    scored, quarantine, ref = score(test, "models:/t@champion")
    assert ref.stage == "bert" and quarantine.count() == 0
    rows = sorted(scored.collect(), key=lambda r: r.id)
    texts = {r.id: r.text for r in test.collect()}
    enc = tok([texts[r.id] for r in rows], truncation=True, max_length=64, padding=True,
              return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        expected = hf(**enc).logits.softmax(-1).numpy()
    np.testing.assert_allclose(np.array([r.probabilities for r in rows]), expected, atol=1e-5)
    assert [r.predicted_label for r in rows] == [labels[i] for i in expected.argmax(1)]

    s = outcome.results["score"]  # the score stage measures what the training run measured
    assert s.accuracy == pytest.approx(s.model_accuracy, abs=1e-9)
    assert s.accuracy == pytest.approx(fine.metrics["test_accuracy"], abs=1e-9)
