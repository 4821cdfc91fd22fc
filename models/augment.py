"""uint8 image batches -> standardised float batches, with optional training-time augmentation.

Works on whole (B, C, H, W) tensors, so it can run in the training-side data loader with no
per-image Python. All randomness comes from the caller's torch.Generator: seeded per epoch and
worker, the same seed gives the same batch, and the global RNG is never touched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparkloom.models.hparams import AugmentConfig


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad each side by `padding`, then crop back to (H, W) at a random offset per image."""
    b, c, h, w = x.shape
    dev = generator.device
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev).to(x.device)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev).to(x.device)
    x = F.pad(x, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    rows = top[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = left[:, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]  # (B, 1, 1, 1)
    channel = torch.arange(c, device=x.device)[None, :, None, None]  # (1, C, 1, 1)
    return x[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


def random_horizontal_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5  # (B,)
    flip = flip.to(x.device)[:, None, None, None]  # (B, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)  # (B, C, H, W)


class ImageBatchTransform:
    """uint8 (B, C, H, W) -> float32 (B, C, H, W): scale to [0, 1], augment (train only),
    standardise per channel.

    `mean` and `std` are per-channel statistics of x / 255. Evaluation batches (train=False)
    are only scaled and standardised.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        mean: list[float],
        std: list[float],
        augment: AugmentConfig | None = None,
        train: bool = False,
    ):
        if len(shape) != 3 or any(int(n) < 1 for n in shape):
            raise ValueError(f"shape must be (C, H, W) with every size >= 1, got {shape}")
        self.shape = tuple(int(n) for n in shape)
        channels = self.shape[0]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"mean and std need one value per channel (C={channels}), got {len(mean)} and "
                f"{len(std)} values"
            )
        if any(not s > 0 for s in std):
            raise ValueError(f"std must be > 0 for every channel, got {list(std)}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(channels, 1, 1)  # (C, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(channels, 1, 1)  # (C, 1, 1)
        self.augment = augment or AugmentConfig()
        self.train = train

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images (raw pixels), got {images.dtype}")
        if images.ndim != 4 or tuple(images.shape[1:]) != self.shape:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, self.shape))}), "
                f"got {tuple(images.shape)}"
            )
        aug = self.augment
        x = images.float() / 255  # (B, C, H, W)
        if self.train and (aug.crop_padding > 0 or aug.horizontal_flip):
            if generator is None:
                # Falling back to the global RNG would make runs irreproducible and let
                # DataLoader workers repeat each other's crops.
                raise ValueError(
                    "training-time augmentation needs a torch.Generator; pass one seeded "
                    "from (seed, epoch, rank, worker)"
                )
            # Padding before standardisation makes the fill black, as in the raw images.
            if aug.crop_padding > 0:
                x = random_crop(x, aug.crop_padding, generator)  # (B, C, H, W)
            if aug.horizontal_flip:
                x = random_horizontal_flip(x, generator)  # (B, C, H, W)
        if aug.standardize:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)  # (B, C, H, W)
        return x
