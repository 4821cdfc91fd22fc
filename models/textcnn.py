"""TextCNN from Kim (2014), "Convolutional Neural Networks for Sentence Classification"."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparkloom.models.heads import ClassificationHead, padding_mask


@dataclass
class TextCNNConfig:
    vocab_size: int
    num_classes: int
    embed_dim: int = 128
    filter_sizes: tuple[int, ...] = (3, 4, 5)
    num_filters: int = 100
    dropout: float = 0.5
    padding_idx: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_classes", "embed_dim", "num_filters"):
            if getattr(self, name) < 1:
                raise ValueError(f"TextCNNConfig.{name} must be >= 1, got {getattr(self, name)}")
        self.filter_sizes = tuple(self.filter_sizes)
        if not self.filter_sizes or any(k < 1 for k in self.filter_sizes):
            raise ValueError(
                f"TextCNNConfig.filter_sizes must be a non-empty tuple of ints >= 1, "
                f"got {self.filter_sizes}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TextCNNConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.padding_idx < self.vocab_size:
            raise ValueError(
                f"TextCNNConfig.padding_idx must be in [0, vocab_size={self.vocab_size}), "
                f"got {self.padding_idx}"
            )


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
    ) -> dict[str, torch.Tensor | None]:
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
