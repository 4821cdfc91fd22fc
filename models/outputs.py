"""What the models return: one dataclass per kind of model, not dicts of agreed keys.

A training task (models/train/tasks.py) reads the fields of the output its model makes;
DDP finds the tensors in a dataclass output as it does in a dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ClassifierOutput:
    """The text and image classifiers, BERT fine-tuned."""

    logits: torch.Tensor  # (B, C)
    loss: torch.Tensor | None = None  # mean cross-entropy, when labels were given


@dataclass
class PretrainingOutput:
    """BERT pretraining: masked-LM over the vocabulary and next-sentence prediction. `loss` is
    the sum of the losses whose labels were given (None without any)."""

    logits: torch.Tensor  # NSP (B, 2): is B the sentence after A
    prediction_logits: torch.Tensor  # MLM (B, T, V)
    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None  # mean over the masked tokens
    mlm_correct: torch.Tensor | None = None  # masked tokens predicted right
    mlm_count: torch.Tensor | None = None  # masked tokens
    nsp_loss: torch.Tensor | None = None
    nsp_correct: torch.Tensor | None = None


@dataclass
class CausalLMOutput:
    """GPT-2: each of T positions predicts the next token."""

    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor  # mean next-token cross-entropy, in float32
    correct: torch.Tensor  # next tokens predicted right (argmax)
    count: torch.Tensor  # next tokens predicted: B * T
