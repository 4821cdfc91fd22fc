"""TextCNN from Kim (2014), "Convolutional Neural Networks for Sentence Classification"."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparkloom.models.heads import ClassificationHead, padding_mask
from sparkloom.models.hparams import TextCNNParams, at_least_one, index_below
from sparkloom.models.outputs import ClassifierOutput


@dataclass(kw_only=True)
class TextCNNConfig(TextCNNParams):
    """What builds the model: the hyper-parameters and what the data decides."""

    vocab_size: int
    num_classes: int
    padding_idx: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least_one(self, "vocab_size", "num_classes")
        index_below(self, "padding_idx", "vocab_size")


class ConvMaxPool(nn.Module):
    """One Conv1d per filter size, ReLU, then max over the windows that start on a real token.

    Each conv sees the sequence right-padded with k-1 zero vectors, so every real position
    starts a window: short sequences (shorter than k) work, and how much padding a batch
    carries never changes which windows exist.
    """

    def __init__(self, cfg: TextCNNConfig):
        super().__init__()
        self.filter_sizes = cfg.filter_sizes
        self.convs = nn.ModuleList(
            nn.Conv1d(cfg.embed_dim, cfg.num_filters, kernel_size=k) for k in cfg.filter_sizes
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)  # (B, E, T)
        starts_real = mask.unsqueeze(1)  # (B, 1, T)
        pooled = []
        for k, conv in zip(self.filter_sizes, self.convs, strict=True):
            c = F.relu(conv(F.pad(x, (0, k - 1))))  # (B, F, T)
            c = c.masked_fill(~starts_real, float("-inf"))
            pooled.append(c.amax(dim=2))  # (B, F)
        return torch.cat(pooled, dim=1)  # (B, F * len(filter_sizes))


class TextCNN(nn.Module):
    """Embedding, parallel convolutions with max-over-time pooling, dropout, linear classifier."""

    def __init__(self, cfg: TextCNNConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=cfg.padding_idx)
        self.features = ConvMaxPool(cfg)
        self.head = ClassificationHead(
            cfg.num_filters * len(cfg.filter_sizes), cfg.num_classes, cfg.dropout
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        mask = padding_mask(input_ids, attention_mask, self.cfg.padding_idx)  # (B, T)
        # Zeroed pads make windows that run past the true end see exactly the k-1 zero
        # vectors F.pad appends, whatever ids the pads carry.
        x = self.embedding(input_ids) * mask.unsqueeze(-1)  # (B, T, E)
        # A row with no real tokens pools its first (all-zero) window instead of -inf.
        mask = mask.clone()
        mask[:, 0] |= ~mask.any(dim=1)
        features = self.features(x, mask)  # (B, F * len(filter_sizes))
        return self.head(features, labels)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
