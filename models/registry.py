"""Model builders by name: the training runtime and the scoring side build models the same way."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from sparkloom.models.bert import BertClassifier, BertConfig, BertPretrainer
from sparkloom.models.cnn import AlexNet, AlexNetConfig, CNNConfig, SmallCNN
from sparkloom.models.gpt2 import GPT2LM, GPT2Config
from sparkloom.models.hf import HFClassifier, HFClassifierConfig
from sparkloom.models.lstm import LSTMClassifier, LSTMConfig
from sparkloom.models.textcnn import TextCNN, TextCNNConfig
from sparkloom.models.weights import load_weights

MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "lstm": (LSTMConfig, LSTMClassifier),
    "textcnn": (TextCNNConfig, TextCNN),
    "cnn": (CNNConfig, SmallCNN),
    "alexnet": (AlexNetConfig, AlexNet),
    "bert_pretrain": (BertConfig, BertPretrainer),  # MLM + NSP
    "bert": (BertConfig, BertClassifier),  # sequence classification (fine-tuning)
    "gpt2": (GPT2Config, GPT2LM),  # causal language model
    # any Hugging Face encoder + sequence-classification head (bert.init_from: a directory)
    "hf_classifier": (HFClassifierConfig, HFClassifier),
}


def build_model(name: str, config: dict[str, Any], init: dict[str, str] | None = None) -> nn.Module:
    """The model `name` from its config; `init` starts it from saved weights:
    {"kind": "bert_pretraining", "path": state_dict.pt of a BertPretrainer} or
    {"kind": "hf_directory", "path": a local Hugging Face directory} (hf_classifier: any
    encoder; gpt2: a GPT-2; bert: a BERT)."""
    if init:
        return _from_weights(name, config, init)
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of {sorted(MODELS)}")
    config_cls, model_cls = MODELS[name]
    try:
        cfg = config_cls(**config)
    except TypeError as e:
        raise ValueError(f"bad config for model '{name}': {e}") from None
    return model_cls(cfg)


def _from_weights(name: str, config: dict[str, Any], init: dict[str, Any]) -> nn.Module:
    if init["kind"] == "warm_start":
        return _warm_started(name, config, init)
    if name == "hf_classifier" and init["kind"] == "hf_directory":
        return HFClassifier.from_pretrained(init["path"], **config)
    if name == "gpt2" and init["kind"] == "hf_directory":  # continued pretraining
        model = GPT2LM.from_hf_directory(init["path"])
        if "vocab_size" in config and config["vocab_size"] != model.cfg.vocab_size:
            raise ValueError(
                f"the GPT-2 at {init['path']} has a vocabulary of {model.cfg.vocab_size}, the "
                f"tokenizer {config['vocab_size']}; give the model's own tokenizer"
            )
        return model
    if name != "bert":
        raise ValueError(
            f"model '{name}' cannot start from saved weights; only bert, hf_classifier and gpt2 can"
        )
    if init["kind"] == "bert_pretraining":
        state = load_weights(init["path"])
        return BertClassifier.from_pretraining(BertConfig(**config), state)
    if init["kind"] == "hf_directory":
        return BertClassifier.from_hf_directory(init["path"], config["num_classes"])
    raise ValueError(f"unknown init kind {init['kind']!r}; use bert_pretraining or hf_directory")


def _warm_started(name: str, config: dict[str, Any], init: dict[str, Any]) -> nn.Module:
    """The model built for the new data, starting from an earlier export of the same model
    (models.warm_start): init = {"kind": "warm_start", "path": its directory, "labels": the
    labels now, "vocab": the vocabulary now (token-id models)}."""
    import json

    from sparkloom.models import storage
    from sparkloom.models.warm_start import warm_start

    path = init["path"]
    if not storage.exists(storage.join(path, "state_dict.pt")):
        raise ValueError(
            f"the earlier model in {path} has no state_dict.pt: warm start reads the exports of "
            "lstm, textcnn, cnn and alexnet; set training.warm_start=none for this model"
        )
    model = build_model(name, config)
    state = load_weights(storage.join(path, "state_dict.pt"))
    old_labels = json.loads(storage.read_text(storage.join(path, "labels.json")))
    vocab = None
    if init.get("vocab") is not None:
        old_vocab = storage.read_text(storage.join(path, "vocab.txt")).split("\n")[:-1]
        vocab = (old_vocab, list(init["vocab"]))
    model.loading = warm_start(model, state, (old_labels, list(init["labels"])), vocab, path)
    return model


def model_config(model: nn.Module) -> dict[str, Any]:
    """The plain config a model was built from (saved next to its weights)."""
    return asdict(model.cfg)


class Scorer(nn.Module):
    """Token ids (B, T), right-padded with 0 -> class probabilities (B, C).

    The one-tensor-in, one-tensor-out shape MLflow's pytorch flavour and
    predict_batch_udf expect.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # an int8 model's 8-bit embedding reads contiguous ids only (a column slice is not)
        return self.model(input_ids=input_ids.contiguous()).logits.softmax(-1)


class ImageScorer(nn.Module):
    """Raw pixels (B, C, H, W) in 0-255 (uint8 or float) -> class probabilities (B, C).

    Carries the training split's per-channel mean/std as buffers, so whoever scores
    standardizes exactly as training did.
    """

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255.0 - self.mean) / self.std  # (B, C, H, W)
        return self.model(images=x).logits.softmax(-1)
