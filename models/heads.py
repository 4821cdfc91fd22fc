"""Pieces every text classifier shares: the padding mask and the classification head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparkloom.models.outputs import ClassifierOutput


def padding_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, padding_idx: int
) -> torch.Tensor:
    """(B, T) bool: the given mask, or every position whose id is not padding."""
    if attention_mask is None:
        return input_ids != padding_idx  # (B, T)
    return attention_mask.bool()  # (B, T)


class ClassificationHead(nn.Module):
    """Dropout -> Linear -> logits, plus cross-entropy (ignore_index=-100) when labels are given."""

    def __init__(self, in_features: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_features, num_classes)
        # A small head starts predictions near uniform, so the initial loss is ~ln(num_classes).
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor | None = None
    ) -> ClassifierOutput:
        logits = self.classifier(self.dropout(features))  # (B, C)
        loss = None if labels is None else F.cross_entropy(logits, labels, ignore_index=-100)
        return ClassifierOutput(logits, loss)
