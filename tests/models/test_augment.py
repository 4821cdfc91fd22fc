"""ImageBatchTransform: determinism, untouched evaluation batches, crop and flip geometry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparkloom.models.augment import AugmentConfig, ImageBatchTransform

SHAPE = (3, 8, 8)
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.1]


def images(n: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8)


def transform(train: bool = True, **augment) -> ImageBatchTransform:
    return ImageBatchTransform(SHAPE, MEAN, STD, AugmentConfig(**augment), train=train)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (x.float() / 255 - mean) / std


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """image moved down dy and right dx, zero-filled."""
    p = max(abs(dy), abs(dx))
    padded = F.pad(image, (p, p, p, p))  # (C, H+2p, W+2p)
    _, h, w = image.shape
    return padded[:, p - dy : p - dy + h, p - dx : p - dx + w]  # (C, H, W)


def test_same_seed_same_batch_different_seed_differs():
    t, x = transform(crop_padding=2, horizontal_flip=True), images()
    assert torch.equal(t(x, gen(1)), t(x, gen(1)))
    assert not torch.equal(t(x, gen(1)), t(x, gen(2)))


@pytest.mark.parametrize("generator", [None, 0, 1])
def test_evaluation_is_only_scaled_and_standardised(generator):
    t, x = transform(train=False, crop_padding=2, horizontal_flip=True), images()
    out = t(x, None if generator is None else gen(generator))
    assert out.dtype == torch.float32
    assert torch.equal(out, reference(x))


def test_train_without_augmentation_equals_evaluation():
    x = images()
    assert torch.equal(transform(crop_padding=0, horizontal_flip=False)(x, gen(0)), reference(x))
    assert torch.equal(transform()(x), reference(x))


def test_crop_is_a_zero_filled_shift_within_the_padding():
    p, x = 2, images()
    out = transform(crop_padding=p, standardize=False)(x, gen(3))
    offsets = set()
    for i in range(len(x)):
        image = x[i].float() / 255
        matches = [
            (dy, dx)
            for dy in range(-p, p + 1)
            for dx in range(-p, p + 1)
            if torch.equal(out[i], shifted(image, dy, dx))
        ]
        assert len(matches) == 1, f"image {i} is no single shift within {p}: {matches}"
        offsets.add(matches[0])
    assert len(offsets) > 1  # offsets are drawn per image


def test_crop_fill_is_black_before_standardisation():
    x = torch.full((64, *SHAPE), 200, dtype=torch.uint8)
    out = transform(crop_padding=3)(x, gen(0))
    black = reference(torch.zeros(1, *SHAPE, dtype=torch.uint8))[0]  # (C, H, W)
    filled = (out == black.expand_as(out)).any(dim=(0, 2, 3))
    assert filled.all()
    assert torch.isin(out, torch.cat([black.flatten(), reference(x[:1]).flatten()])).all()


def test_horizontal_flip_mirrors_about_half_the_images():
    x = images(1000, seed=4)
    out = transform(horizontal_flip=True, standardize=False)(x, gen(5))
    plain = x.float() / 255
    same = (out == plain).flatten(1).all(dim=1)
    mirrored = (out == plain.flip(-1)).flatten(1).all(dim=1)
    assert (same ^ mirrored).all()
    assert 400 <= mirrored.sum().item() <= 600


def test_global_rng_is_untouched():
    state = torch.get_rng_state()
    transform(crop_padding=2, horizontal_flip=True)(images(), gen(0))
    assert torch.equal(torch.get_rng_state(), state)


def test_augmenting_without_a_generator_is_refused():
    with pytest.raises(ValueError, match="needs a torch.Generator"):
        transform(crop_padding=2)(images())


def test_rejects_non_uint8_images():
    with pytest.raises(TypeError, match="uint8"):
        transform(train=False)(images().float() / 255)


@pytest.mark.parametrize(
    ("mean", "std", "message"),
    [
        ([0.5, 0.5], STD, "one value per channel"),
        (MEAN, [0.2, 0.2], "one value per channel"),
        (MEAN, [0.2, 0.0, 0.2], "std must be > 0"),
    ],
)
def test_rejects_bad_statistics(mean, std, message):
    with pytest.raises(ValueError, match=message):
        ImageBatchTransform(SHAPE, mean, std)


def test_rejects_wrong_image_shape():
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\)"):
        transform(train=False)(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
