"""Model builders by name: the training runtime and the scoring side build models the same way."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

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
