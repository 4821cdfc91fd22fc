"""Integrated Gradients (Sundararajan et al., 2017, "Axiomatic Attribution for Deep Networks").

IG integrates the gradient of one class's logit along the straight path from a baseline input
to the real one. Its completeness axiom makes the attributions add up to
logit(input) - logit(baseline); `delta` is how far the Riemann sum is from that, so a reader
knows how much to trust a map.

Tokens: the path runs in the model's input-embedding space (captum's LayerIntegratedGradients on
the embedding layer), from the padding embedding at every real position (special ids kept) to
the real embeddings. The attention mask and lengths always come from the real ids, passed
explicitly: the baseline is "same text length, no word content", not an empty text, and the
endpoint of the path is exactly the baseline whose logits are reported.

Images: the path runs in pixel space from an all-zero standardized image, i.e. the training
split's mean image (see `standardize`, which is ImageScorer's transform).

Pure torch + captum + numpy, so workers and the driver compute it the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import IntegratedGradients, LayerIntegratedGradients
from torch import nn

from sparkloom.models.bert import BertClassifier
from sparkloom.models.cnn import AlexNet, SmallCNN
from sparkloom.models.hf import HFClassifier
from sparkloom.models.lstm import LSTMClassifier
from sparkloom.models.textcnn import TextCNN

# What one forward + backward pass along the IG paths may hold: rows x tokens x embedding dim
# for text, rows x C*H*W for images. Activations grow with these (BERT-base: ~1 GB at the
# text budget), so memory stays bounded whatever the batch, the steps or the lengths.
TEXT_BUDGET = 2**20
IMAGE_BUDGET = 2**19


@dataclass
class TokenAttributions:
    """IG of the target class's logit per token; every array is numpy, on the CPU."""

    attributions: np.ndarray  # (B, T) summed over the embedding dim; 0 at pads and kept ids
    delta: np.ndarray  # (B,) attributions.sum(1) - (logit - baseline logit) of the target
    logits: np.ndarray  # (B, C) of the input
    baseline_logits: np.ndarray  # (B, C) of the baseline: pad embeddings, the real mask
    targets: np.ndarray  # (B,) the class attributed

    @property
    def logit_gap(self) -> np.ndarray:
        """(B,) logit(input) - logit(baseline) of the target: what the attributions add up to."""
        rows = np.arange(len(self.targets))
        return self.logits[rows, self.targets] - self.baseline_logits[rows, self.targets]


@dataclass
class ImageAttributions:
    """IG of the target class's logit per pixel, from the zero (mean) image."""

    maps: np.ndarray  # (B, H, W) sum over channels of |attribution|: where the evidence is
    signed: np.ndarray  # (B, H, W) sum over channels: what completeness adds up
    delta: np.ndarray  # (B,) signed.sum((1, 2)) - (logit - baseline logit) of the target
    logits: np.ndarray  # (B, C)
    baseline_logits: np.ndarray  # (B, C) of the zero image
    targets: np.ndarray  # (B,)


def embedding_layer(model: nn.Module) -> nn.Module:
    """The module whose output is the token embeddings that IG interpolates."""
    if isinstance(model, LSTMClassifier):
        return model.encoder.embedding
    if isinstance(model, TextCNN):
        return model.embedding
    if isinstance(model, BertClassifier):
        # word embeddings only: position and segment embeddings (added after it) stay real
        return model.bert.get_input_embeddings()
    if isinstance(model, HFClassifier):
        return model.hf.get_input_embeddings()
    raise TypeError(
        f"token attributions support LSTMClassifier, TextCNN, BertClassifier and HFClassifier, "
        f"not {type(model).__name__}; pass the classifier itself (a Scorer's .model)"
    )


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[torch.device]:
    """Eval mode (no dropout) and no parameter gradients (IG needs only the path's, and none
    may leak into .grad); both restored after. Yields the model's device."""
    params = list(model.parameters())
    wrong = {str(p.dtype) for p in params if p.dtype != torch.float32}
    if wrong:
        raise TypeError(
            f"IG needs a float32 model, this one has {sorted(wrong)} parameters; attribute the "
            "float model (model.float()), not a half or int8 one"
        )
    training, grads = model.training, [p.requires_grad for p in params]
    device = params[0].device
    # cuDNN's RNN backward refuses eval mode; the native kernels compute the same thing.
    rnn_on_gpu = device.type == "cuda" and any(isinstance(m, nn.RNNBase) for m in model.modules())
    cudnn = torch.backends.cudnn.enabled
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        torch.backends.cudnn.enabled = cudnn and not rnn_on_gpu
        yield device
    finally:
        torch.backends.cudnn.enabled = cudnn
        model.train(training)
        for p, g in zip(params, grads, strict=True):
            p.requires_grad_(g)


def _chunks(n: int, rows: int, steps: int) -> tuple[int, int]:
    """(examples per attribute call, captum's internal_batch_size) for at most `rows` rows a
    pass: captum never takes fewer rows than examples, so the examples are split here."""
    per = max(1, rows // steps)
    return min(n, per), min(rows, per * steps)


def token_attributions(
    model: nn.Module,
    input_ids: torch.Tensor,
    targets: torch.Tensor | None,
    pad_id: int,
    steps: int = 50,
    keep_ids: set[int] | None = None,
) -> TokenAttributions:
    """IG of the `targets` logits (None: the predicted class) for right-padded ids (B, T).

    Baseline: `pad_id` at every position whose id is not in `keep_ids` ([CLS], [SEP]), with
    the mask of the real ids, so pads and kept ids get exactly 0."""
    layer = embedding_layer(model)
    with _frozen(model) as device:
        ids = input_ids.to(device)
        mask = (ids != pad_id).long()  # (B, T), from the real ids, for every forward
        keep = torch.tensor(sorted(keep_ids or ()), dtype=ids.dtype, device=device)
        baseline = ids.masked_fill(~torch.isin(ids, keep), pad_id)  # (B, T)

        def logits_of(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return model(input_ids=ids, attention_mask=mask).logits  # (B, C)

        with torch.no_grad():
            logits = logits_of(ids, mask)
            # the path's start: the real ids and mask, the embedding output swapped for the
            # baseline's (feeding the baseline ids would change RoBERTa's position ids)
            base_emb = layer(baseline)
            hook = layer.register_forward_hook(lambda m, i, o: base_emb)
            try:
                baseline_logits = logits_of(ids, mask)
            finally:
                hook.remove()
        targets = logits.argmax(-1) if targets is None else targets.to(device)

        lig = LayerIntegratedGradients(logits_of, layer)
        per, internal = _chunks(len(ids), max(1, TEXT_BUDGET // base_emb[0].numel()), steps)
        parts = []
        for s in range(0, len(ids), per):
            part = slice(s, s + per)
            attr = lig.attribute(ids[part], baselines=baseline[part], target=targets[part],
                                 additional_forward_args=(mask[part],), n_steps=steps,
                                 internal_batch_size=internal)  # fmt: skip
            parts.append(attr.detach().sum(-1))  # (b, T, E) -> (b, T)
        attributions = torch.cat(parts) * mask if parts else mask.float()
    return TokenAttributions(**_numpy(targets, attributions.sum(1), logits, baseline_logits,
                                      attributions=attributions))  # fmt: skip


def _numpy(
    targets: torch.Tensor,
    sums: torch.Tensor,
    logits: torch.Tensor,
    baseline_logits: torch.Tensor,
    **maps: torch.Tensor,
) -> dict[str, np.ndarray]:
    """The result fields as numpy, with delta = sums - (logit - baseline logit) of the target:
    the completeness error, computed from the very logits reported."""
    rows = torch.arange(len(targets), device=logits.device)
    gap = logits[rows, targets] - baseline_logits[rows, targets]  # (B,)
    fields = dict(maps, delta=sums.to(gap.device) - gap, logits=logits,
                  baseline_logits=baseline_logits, targets=targets)  # fmt: skip
    return {k: v.detach().cpu().numpy() for k, v in fields.items()}


def standardize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Raw pixels (B, C, H, W) in 0-255 -> what the CNNs take, exactly as ImageScorer does
    (pass its `mean` and `std` buffers, (1, C, 1, 1))."""
    return (images.float() / 255.0 - mean) / std


def image_attributions(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor | None = None, steps: int = 50
) -> ImageAttributions:
    """IG of the `targets` logits (None: the predicted class) for standardized images
    (B, C, H, W), from the all-zero image: the training mean after standardization."""
    if not isinstance(model, (SmallCNN, AlexNet)):
        raise TypeError(
            f"image attributions support SmallCNN and AlexNet, not {type(model).__name__}; "
            "pass the classifier itself (an ImageScorer's .model) and standardize() the pixels"
        )
    with _frozen(model) as device:
        x = images.to(device=device, dtype=torch.float32)

        def logits_of(x: torch.Tensor) -> torch.Tensor:
            return model(images=x).logits  # (B, C)

        baseline = torch.zeros_like(x)
        with torch.no_grad():
            logits, baseline_logits = logits_of(x), logits_of(baseline)
        targets = logits.argmax(-1) if targets is None else targets.to(device)
        ig = IntegratedGradients(logits_of)
        per, internal = _chunks(len(x), max(1, IMAGE_BUDGET // x[0].numel()), steps)
        parts = [
            ig.attribute(x[s : s + per], baselines=baseline[s : s + per],
                         target=targets[s : s + per], n_steps=steps,
                         internal_batch_size=internal).detach()
            for s in range(0, len(x), per)
        ]  # fmt: skip
        attributions = torch.cat(parts) if parts else torch.zeros_like(x)  # (B, C, H, W)
    signed = attributions.sum(1)  # (B, H, W)
    return ImageAttributions(**_numpy(targets, signed.sum((1, 2)), logits, baseline_logits,
                                      maps=attributions.abs().sum(1), signed=signed))  # fmt: skip
