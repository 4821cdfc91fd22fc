"""(Bi)LSTM text classifier: embed, run a packed LSTM, pool over time, classify."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from sparkloom.models.heads import ClassificationHead, padding_mask
from sparkloom.models.hparams import LSTMParams, at_least_one, index_below
from sparkloom.models.outputs import ClassifierOutput


@dataclass(kw_only=True)
class LSTMConfig(LSTMParams):
    """What builds the model: the hyper-parameters and what the data decides."""

    vocab_size: int
    num_classes: int
    padding_idx: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least_one(self, "vocab_size", "num_classes")
        index_below(self, "padding_idx", "vocab_size")


class LSTMEncoder(nn.Module):
    """Embedding -> dropout -> (bi)LSTM over packed sequences, so pads never enter the recurrence.

    Sequences must be right-padded: the true length of a row is its number of real tokens.
    """

    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=cfg.padding_idx)
        self.dropout = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(
            cfg.embed_dim,
            cfg.hidden_dim,
            num_layers=cfg.num_layers,
            bidirectional=cfg.bidirectional,
            # PyTorch warns when inter-layer dropout is set on a single layer.
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
            batch_first=True,
        )

    def forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return per-step outputs (B, T, D*H) and final hidden states (L*D, B, H)."""
        # Zero masked positions so an all-pad row (run as length 1) sees the same input
        # whatever id its pads carry.
        x = self.embedding(input_ids) * mask.unsqueeze(-1)  # (B, T, E)
        x = self.dropout(x)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h_n, _) = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))  # (B, T, D*H)
        return out, h_n


class MaskedPooling(nn.Module):
    """Pool LSTM outputs over time, looking only at the first `length` steps of each row."""

    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.pooling = cfg.pooling
        self.num_layers = cfg.num_layers
        self.num_directions = 2 if cfg.bidirectional else 1

    def forward(self, out: torch.Tensor, h_n: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.pooling == "last":
            # Packing makes h_n each direction's state at the row's true end (forward: step
            # length-1, backward: step 0), so no gather over `out` is needed.
            batch = h_n.size(1)
            h_n = h_n.view(self.num_layers, self.num_directions, batch, -1)  # (L, D, B, H)
            top = h_n[-1].transpose(0, 1)  # (B, D, H)
            return top.reshape(batch, -1)  # (B, D*H)
        steps = torch.arange(out.size(1), device=out.device)
        valid = (steps[None, :] < lengths[:, None]).unsqueeze(-1)  # (B, T, 1)
        if self.pooling == "max":
            return out.masked_fill(~valid, float("-inf")).amax(dim=1)  # (B, D*H)
        summed = (out * valid).sum(dim=1)  # (B, D*H)
        return summed / lengths.unsqueeze(-1).to(out.dtype)


class LSTMClassifier(nn.Module):
    """(Bi)LSTM encoder, masked pooling over time, dropout, linear classifier."""

    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = LSTMEncoder(cfg)
        self.pooling = MaskedPooling(cfg)
        num_directions = 2 if cfg.bidirectional else 1
        self.head = ClassificationHead(
            num_directions * cfg.hidden_dim, cfg.num_classes, cfg.dropout
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        mask = padding_mask(input_ids, attention_mask, self.cfg.padding_idx)  # (B, T)
        # A row with no real tokens runs as length 1 rather than crashing the packer.
        lengths = mask.sum(dim=1).clamp(min=1)  # (B,)
        out, h_n = self.encoder(input_ids, mask, lengths)
        pooled = self.pooling(out, h_n, lengths)  # (B, D*H)
        return self.head(pooled, labels)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
