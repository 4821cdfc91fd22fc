"""What a model is trained to do, one object per kind of training: the loss `fit` minimises
on a batch, the tokens it counts for throughput, and what `evaluate` sums over a split and
reports, read from the typed output its model returns (models/outputs.py). `fit` and
`evaluate` ask the task; they never look inside a model's output.

- `Classify`: cross-entropy over classes (the text and image classifiers, BERT fine-tuning)
- `Pretrain`: BERT's MLM + NSP; NSP is scored as a classification, MLM per masked token
- `CausalLM`: GPT-2's next-token loss, per predicted token; perplexity
- `Distill`: a classifier that learns from a teacher's soft targets as well as the labels
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sparkloom.models.distill import distillation_loss
from sparkloom.models.outputs import CausalLMOutput, ClassifierOutput, PretrainingOutput

MLM_KEYS = ("mlm_loss", "mlm_accuracy", "perplexity")


class Classify:
    language_model = False  # throughput in samples/s (a language model adds tokens/s, MFU)
    label = "labels"  # the model input that holds the classes

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def loss(self, out: ClassifierOutput, x: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        return out.loss

    def tokens(self, out: ClassifierOutput) -> torch.Tensor | float:
        return 0.0

    def sums(self, device: torch.device) -> dict[str, torch.Tensor]:
        """What evaluation adds up over a split (then across ranks)."""
        c = self.num_classes
        return {"loss": torch.zeros(1, dtype=torch.float64, device=device),
                "confusion": torch.zeros(c * c, dtype=torch.int64, device=device)}  # fmt: skip

    def add(self, sums: dict[str, torch.Tensor], out: ClassifierOutput, x: dict[str, Any]) -> None:
        labels, c = x[self.label], self.num_classes
        sums["loss"] += out.loss.double() * labels.numel()
        pred = out.logits.argmax(-1)
        sums["confusion"] += torch.bincount(labels * c + pred, minlength=c * c)

    def report(self, sums: dict[str, torch.Tensor]) -> dict[str, Any]:
        cm = sums["confusion"].view(self.num_classes, self.num_classes).cpu()
        n = int(cm.sum())
        return {"loss": float(sums["loss"].item() / max(1, n)),
                "accuracy": float(cm.diag().sum().item() / max(1, n)),
                "confusion": cm.tolist(), "examples": n}  # fmt: skip


class Pretrain(Classify):
    """MLM + NSP: the loss is their sum; evaluation scores NSP as two classes and reports MLM
    loss and accuracy per masked token, and perplexity = exp(MLM loss)."""

    label = "next_sentence_label"

    def __init__(self):
        super().__init__(2)

    def sums(self, device: torch.device) -> dict[str, torch.Tensor]:
        # MLM: loss sum, correct, masked tokens
        return super().sums(device) | {"mlm": torch.zeros(3, dtype=torch.float64, device=device)}

    def add(self, sums: dict[str, torch.Tensor], out: PretrainingOutput, x: dict[str, Any]) -> None:
        super().add(sums, out, x)
        n = out.mlm_count.double()
        sums["mlm"] += torch.stack([out.mlm_loss.double() * n, out.mlm_correct.double(), n])

    def report(self, sums: dict[str, torch.Tensor]) -> dict[str, Any]:
        loss_sum, correct, count = (float(v) for v in sums["mlm"].tolist())
        mlm = {}
        if count:
            loss = loss_sum / count
            mlm = {"mlm_loss": loss, "mlm_accuracy": correct / count,
                   "perplexity": math.exp(min(loss, 50))}  # fmt: skip
        return super().report(sums) | mlm


class CausalLM:
    """Next-token prediction: every target position counts; no classes."""

    language_model = True
    num_classes = 0

    def loss(self, out: CausalLMOutput, x: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        return out.loss

    def tokens(self, out: CausalLMOutput) -> torch.Tensor | float:
        return out.count

    def sums(self, device: torch.device) -> dict[str, torch.Tensor]:
        # loss sum, correct, target tokens, rows
        return {"lm": torch.zeros(4, dtype=torch.float64, device=device)}

    def add(self, sums: dict[str, torch.Tensor], out: CausalLMOutput, x: dict[str, Any]) -> None:
        n = out.count.double()
        sums["lm"] += torch.stack([out.loss.double() * n, out.correct.double(), n,
                                   n.new_tensor(float(out.logits.shape[0]))])  # fmt: skip

    def report(self, sums: dict[str, torch.Tensor]) -> dict[str, Any]:
        loss_total, correct, count, rows = (float(v) for v in sums["lm"].tolist())
        loss = loss_total / max(1.0, count)
        return {"loss": loss, "accuracy": correct / max(1.0, count), "confusion": [],
                "examples": int(rows), "tokens": int(count),
                "perplexity": math.exp(min(loss, 50))}  # fmt: skip


class Distill(Classify):
    """alpha x KL(teacher || student at temperature T) + (1 - alpha) x cross-entropy. The soft
    targets come from a teacher run in this process on the same batch, or from a column the
    launcher precomputed; evaluation is the student's own classification."""

    def __init__(self, num_classes: int, spec: dict[str, Any], teacher: nn.Module | None,
                 device: torch.device):  # fmt: skip
        super().__init__(num_classes)
        self.spec, self.teacher, self.device = spec, teacher, device

    def loss(self, out: ClassifierOutput, x: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        if self.teacher is not None:
            with torch.no_grad():
                soft = self.teacher(**{k: v for k, v in x.items() if k != "labels"}).logits
        else:
            soft = batch[self.spec["column"]].to(self.device, non_blocking=True)
        return distillation_loss(out.logits, soft, x["labels"], self.spec["temperature"],
                                 self.spec["alpha"])  # fmt: skip


def task_for(model: nn.Module, distill: dict[str, Any] | None, device: torch.device,
             load_teacher: Any = None):  # fmt: skip
    """The task `model` is trained on: from its `task` attribute, or distillation when the run
    says so (`load_teacher(name, dir)` builds the teacher when it runs in this process)."""
    kind = getattr(model, "task", "classify")
    if kind == "lm":
        return CausalLM()
    if kind == "pretrain":
        return Pretrain()
    num_classes = getattr(model, "num_labels", None) or model.cfg.num_classes
    if distill:
        teacher = None
        if distill.get("teacher"):
            t = distill["teacher"]
            teacher = load_teacher(t["dir"], t["name"]).to(device).requires_grad_(False)
        return Distill(num_classes, distill, teacher, device)
    return Classify(num_classes)
