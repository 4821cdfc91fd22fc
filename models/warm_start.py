"""Warm start: a new model begins from an earlier one's weights, matched by name.

Incremental training keeps the earlier model's knowledge and grows it where the data grew:
a label never seen before adds a row to the classification head (initialised small, as the
head initialises every row, so the old classes' logits are unchanged at step 0), and a
vocabulary fitted again maps each embedding row by its word (new words keep their fresh
initialisation). Every other tensor must match in shape: a changed architecture is an error
that names the tensor, not a silent partial load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# the classification head's output rows (one per label) and the token embeddings (one per
# vocabulary entry), by the suffixes every classifier here uses for them
HEAD_SUFFIXES = ("classifier.weight", "classifier.bias")
EMBEDDING_SUFFIXES = ("embedding.weight", "word_embeddings.weight")


@dataclass
class WarmStartReport:
    """What was carried over: `summary()` is the log line, the fields go to MLflow."""

    source: str
    tensors_copied: int = 0
    labels_kept: int = 0
    labels_new: list[str] = field(default_factory=list)
    labels_dropped: list[str] = field(default_factory=list)
    words_kept: int | None = None
    words_new: int | None = None

    def summary(self) -> str:
        text = f"{self.tensors_copied} tensors copied; {self.labels_kept} labels kept"
        if self.labels_new:
            text += f", new head rows for {self.labels_new}"
        if self.labels_dropped:
            text += f", rows of {self.labels_dropped} dropped"
        if self.words_new is not None:
            text += f"; embeddings: {self.words_kept} words kept, {self.words_new} new"
        return text


def _rows(new: torch.Tensor, old: torch.Tensor, index: list[int | None]) -> torch.Tensor:
    """`new` with row i replaced by `old[index[i]]` where that is not None."""
    out = new.detach().clone()
    for i, j in enumerate(index):
        if j is not None:
            out[i] = old[j]
    return out


def warm_start(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    labels: tuple[list[str], list[str]],
    vocab: tuple[list[str], list[str]] | None = None,
    source: str = "",
) -> WarmStartReport:
    """Load `state` (the earlier model's state dict) into `model` (built for the new data):
    `labels` = (earlier, now), `vocab` = (earlier, now) when the model reads token ids."""
    old_labels, new_labels = labels
    label_index = [old_labels.index(x) if x in old_labels else None for x in new_labels]
    word_index = None
    report = WarmStartReport(source)
    report.labels_kept = sum(j is not None for j in label_index)
    report.labels_new = [x for x, j in zip(new_labels, label_index, strict=True) if j is None]
    report.labels_dropped = [x for x in old_labels if x not in new_labels]
    if vocab is not None and vocab[0] != vocab[1]:
        where = {w: i for i, w in enumerate(vocab[0])}
        word_index = [where.get(w) for w in vocab[1]]
        report.words_kept = sum(j is not None for j in word_index)
        report.words_new = len(word_index) - report.words_kept
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    if missing:
        raise ValueError(
            f"the earlier model has no {missing[0]} ({len(missing)} tensors missing): its "
            "architecture differs; train from scratch (training.warm_start=none)"
        )
    loaded = {}
    for name, new in target.items():
        old = state[name]
        if name.endswith(HEAD_SUFFIXES) and old.shape[0] == len(old_labels):
            loaded[name] = _rows(new, old, label_index)
        elif name.endswith(EMBEDDING_SUFFIXES) and word_index is not None:
            loaded[name] = _rows(new, old, word_index)
        elif old.shape != new.shape:
            raise ValueError(
                f"{name} is {tuple(old.shape)} in the earlier model and {tuple(new.shape)} "
                "now: the model's settings changed; train from scratch "
                "(training.warm_start=none)"
            )
        else:
            loaded[name] = old
    model.load_state_dict(loaded)
    report.tensors_copied = len(loaded)
    return report
