"""Dynamic masking for masked language modelling (Devlin et al., 2019; Liu et al., 2019).

Runs on whole (B, T) batches in the training-side data loader, so each epoch sees a new mask
(RoBERTa's dynamic masking) at no Spark cost. All randomness comes from the caller's
torch.Generator: seeded per batch by the loader, the same seed gives the same mask, and the
global RNG is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100  # cross_entropy's ignore_index: positions the MLM loss skips


@dataclass
class MaskingConfig:
    probability: float = 0.15  # of the eligible positions, how many the model must predict
    mask_fraction: float = 0.8  # of those, replaced by [MASK]
    random_fraction: float = 0.1  # of those, replaced by a random token; the rest stay as they are

    def __post_init__(self) -> None:
        if not 0.0 < self.probability < 1.0:
            raise ValueError(f"MaskingConfig.probability must be in (0, 1), got {self.probability}")
        for name in ("mask_fraction", "random_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"MaskingConfig.{name} must be in [0, 1], got {getattr(self, name)}"
                )
        if self.mask_fraction + self.random_fraction > 1.0:
            raise ValueError(
                f"MaskingConfig.mask_fraction + random_fraction must be <= 1 (the rest is left "
                f"unchanged), got {self.mask_fraction} + {self.random_fraction}"
            )


def mask_tokens(
    input_ids: torch.Tensor,
    special: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    cfg: MaskingConfig,
    generator: torch.Generator,
    first_normal_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids -> (masked ids, MLM labels), both (B, T); `input_ids` is left as it is.

    Each position where `special` is False is chosen with probability cfg.probability; a chosen
    position becomes [MASK] (mask_fraction), a random id from [first_normal_id, vocab_size)
    (random_fraction) or stays (the rest). Labels hold the original id where chosen, -100
    elsewhere.
    """
    if special.shape != input_ids.shape or special.dtype != torch.bool:
        raise ValueError(
            f"special must be a bool tensor shaped like input_ids {tuple(input_ids.shape)}, "
            f"got {special.dtype} {tuple(special.shape)}"
        )
    if not 0 <= first_normal_id < vocab_size:
        raise ValueError(
            f"first_normal_id must be in [0, vocab_size={vocab_size}), got {first_normal_id}"
        )
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(
            f"mask_token_id must be in [0, vocab_size={vocab_size}), got {mask_token_id}"
        )
    shape, dev = input_ids.shape, generator.device
    # Three draws of the full shape, always in this order: the generator advances the same way
    # whatever the ids, so a seed fixes the mask of a batch.
    pick = torch.rand(shape, generator=generator, device=dev).to(input_ids.device)  # (B, T)
    kind = torch.rand(shape, generator=generator, device=dev).to(input_ids.device)  # (B, T)
    random_ids = torch.randint(
        first_normal_id, vocab_size, shape, generator=generator, device=dev
    ).to(input_ids.device, input_ids.dtype)  # (B, T)

    chosen = (pick < cfg.probability) & ~special  # (B, T)
    to_mask = chosen & (kind < cfg.mask_fraction)
    to_random = (
        chosen & (kind >= cfg.mask_fraction) & (kind < cfg.mask_fraction + cfg.random_fraction)
    )
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


class MLMBatchTransform:
    """Loader transform: masks `input_column` and adds `label_column` (picklable, for workers).

    Never chosen: ids in `special_ids` ([CLS], [SEP], [PAD], ...) and, when the batch has
    `mask_column` (the loader's padding mask, 1 = real token), its padding positions.
    """

    def __init__(
        self,
        mask_token_id: int,
        vocab_size: int,
        special_ids: list[int],
        cfg: MaskingConfig | None = None,
        first_normal_id: int = 0,
        input_column: str = "input_ids",
        label_column: str = "mlm_labels",
        mask_column: str | None = "input_ids_mask",
    ):
        self.mask_token_id = int(mask_token_id)
        self.vocab_size = int(vocab_size)
        self.special_ids = sorted({int(i) for i in special_ids})
        self.cfg = cfg or MaskingConfig()
        self.first_normal_id = int(first_normal_id)
        self.input_column = input_column
        self.label_column = label_column
        self.mask_column = mask_column

    def __call__(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        ids = batch[self.input_column]  # (B, T)
        special_ids = torch.tensor(self.special_ids, dtype=ids.dtype, device=ids.device)
        special = torch.isin(ids, special_ids)  # (B, T)
        if self.mask_column is not None and self.mask_column in batch:
            special |= batch[self.mask_column].to(ids.device) == 0  # (B, T)
        masked, labels = mask_tokens(
            ids, special, self.mask_token_id, self.vocab_size, self.cfg, generator,
            first_normal_id=self.first_normal_id,
        )  # fmt: skip
        return {**batch, self.input_column: masked, self.label_column: labels}
