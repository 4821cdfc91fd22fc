"""Model builders by name: the training runtime and the scoring side build models the same way."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from models.lstm import LSTMClassifier, LSTMConfig
from models.textcnn import TextCNN, TextCNNConfig

MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "lstm": (LSTMConfig, LSTMClassifier),
    "textcnn": (TextCNNConfig, TextCNN),
}


def build_model(name: str, config: dict[str, Any]) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of {sorted(MODELS)}")
    config_cls, model_cls = MODELS[name]
    try:
        cfg = config_cls(**config)
    except TypeError as e:
        raise ValueError(f"bad config for model '{name}': {e}") from None
    return model_cls(cfg)


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
        return self.model(input_ids=input_ids)["logits"].softmax(-1)
