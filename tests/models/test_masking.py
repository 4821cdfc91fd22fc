"""mask_tokens and MLMBatchTransform: rates, never-chosen positions, labels, determinism."""

from __future__ import annotations

import pickle

import pytest
import torch

from sparkloom.models.masking import MaskingConfig, MLMBatchTransform, mask_tokens

PAD, CLS, SEP, MASK = 0, 1, 2, 3
FIRST_NORMAL = 5  # 0-4 are special ids
VOCAB = 1000
B, T = 800, 256  # 204,800 positions


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def padded_batch(b: int = B, t: int = T, seed: int = 0) -> dict[str, torch.Tensor]:
    """[CLS] tokens [SEP] [PAD]..., with lengths from 8 to t, plus the loader's padding mask."""
    g = gen(seed)
    ids = torch.randint(FIRST_NORMAL, VOCAB, (b, t), generator=g)
    lengths = torch.randint(8, t + 1, (b,), generator=g)
    real = torch.arange(t)[None, :] < lengths[:, None]  # (B, T)
    ids[:, 0] = CLS
    ids[torch.arange(b), lengths - 1] = SEP
    ids[~real] = PAD
    return {"input_ids": ids, "input_ids_mask": real.long(), "label": torch.arange(b)}


def transform(**kw) -> MLMBatchTransform:
    return MLMBatchTransform(MASK, VOCAB, [PAD, CLS, SEP, MASK], first_normal_id=FIRST_NORMAL, **kw)


@pytest.fixture(scope="module")
def masked():
    batch = padded_batch()
    out = transform()(batch, gen(0))
    return batch, out


def test_rates_match_the_config(masked):
    batch, out = masked
    eligible = batch["input_ids_mask"].bool() & ~torch.isin(
        batch["input_ids"], torch.tensor([CLS, SEP])
    )
    chosen = out["mlm_labels"] != -100
    assert eligible.sum() > 100_000
    assert abs(chosen.sum().item() / eligible.sum().item() - 0.15) < 0.005

    before, after = batch["input_ids"][chosen], out["input_ids"][chosen]
    n = chosen.sum().item()
    to_mask = (after == MASK).sum().item() / n
    unchanged = (after == before).sum().item() / n
    # A random draw equal to the original id counts as unchanged: 1 in 995, within tolerance.
    random = 1 - to_mask - unchanged
    assert abs(to_mask - 0.8) < 0.01
    assert abs(random - 0.1) < 0.01
    assert abs(unchanged - 0.1) < 0.01


def test_special_and_padding_positions_are_never_chosen_nor_changed(masked):
    batch, out = masked
    ids = batch["input_ids"]
    never = (batch["input_ids_mask"] == 0) | torch.isin(ids, torch.tensor([PAD, CLS, SEP]))
    assert never.sum() > 10_000
    assert (out["mlm_labels"][never] == -100).all()
    assert torch.equal(out["input_ids"][never], ids[never])


def test_labels_are_the_original_ids_exactly_where_chosen(masked):
    batch, out = masked
    ids, labels = batch["input_ids"], out["mlm_labels"]
    chosen = labels != -100
    assert torch.equal(labels[chosen], ids[chosen])
    # Off the chosen positions nothing changes, so every change is at a labelled position.
    assert torch.equal(out["input_ids"][~chosen], ids[~chosen])


def test_random_replacements_are_normal_tokens(masked):
    batch, out = masked
    after = out["input_ids"]
    replaced = (after != batch["input_ids"]) & (after != MASK)
    assert replaced.sum() > 1000
    assert (after[replaced] >= FIRST_NORMAL).all()
    assert (after[replaced] < VOCAB).all()


def test_same_seed_same_mask_different_seed_differs():
    batch = padded_batch(64, 32)
    t = transform()
    a, b, c = t(batch, gen(7)), t(batch, gen(7)), t(batch, gen(8))
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["mlm_labels"], b["mlm_labels"])
    assert not torch.equal(a["mlm_labels"], c["mlm_labels"])


def test_inputs_are_not_modified():
    batch = padded_batch(64, 32)
    copy = {k: v.clone() for k, v in batch.items()}
    out = transform()(batch, gen(0))
    assert out is not batch
    for k, v in copy.items():
        assert torch.equal(batch[k], v)

    ids, special = batch["input_ids"], batch["input_ids_mask"] == 0
    ids_before, special_before = ids.clone(), special.clone()
    mask_tokens(ids, special, MASK, VOCAB, MaskingConfig(), gen(0), FIRST_NORMAL)
    assert torch.equal(ids, ids_before)
    assert torch.equal(special, special_before)


def test_other_columns_pass_through_untouched():
    batch = padded_batch(16, 32)
    out = transform()(batch, gen(0))
    assert set(out) == {"input_ids", "input_ids_mask", "label", "mlm_labels"}
    assert out["label"] is batch["label"]
    assert out["input_ids_mask"] is batch["input_ids_mask"]
    assert out["mlm_labels"].shape == batch["input_ids"].shape


def test_special_ids_alone_protect_a_batch_without_padding_mask():
    batch = padded_batch(200, 64)
    del batch["input_ids_mask"]
    out = transform()(batch, gen(0))
    ids = batch["input_ids"]
    protected = torch.isin(ids, torch.tensor([PAD, CLS, SEP]))
    assert (out["mlm_labels"][protected] == -100).all()
    assert (out["mlm_labels"][~protected] != -100).any()


def test_custom_columns():
    batch = {"tokens": torch.full((4, 8), 10), "tokens_mask": torch.ones(4, 8, dtype=torch.long)}
    t = MLMBatchTransform(MASK, VOCAB, [PAD], MaskingConfig(probability=0.5), input_column="tokens",
                          label_column="targets", mask_column="tokens_mask")  # fmt: skip
    out = t(batch, gen(0))
    assert set(out) == {"tokens", "tokens_mask", "targets"}
    assert (out["targets"] != -100).any()


def test_transform_survives_pickling():
    t = transform(cfg=MaskingConfig(probability=0.3))
    clone = pickle.loads(pickle.dumps(t))
    batch = padded_batch(8, 16)
    assert torch.equal(t(batch, gen(3))["input_ids"], clone(batch, gen(3))["input_ids"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"probability": 0.0}, r"probability must be in \(0, 1\)"),
        ({"probability": 1.5}, r"probability must be in \(0, 1\)"),
        ({"mask_fraction": -0.1}, r"mask_fraction must be in \[0, 1\]"),
        ({"mask_fraction": 0.95, "random_fraction": 0.1}, "must be <= 1"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        MaskingConfig(**overrides)


def test_mask_tokens_rejects_mismatched_special():
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="bool tensor shaped like input_ids"):
        mask_tokens(ids, torch.zeros(2, 4), MASK, VOCAB, MaskingConfig(), gen(0))
    with pytest.raises(ValueError, match="first_normal_id"):
        mask_tokens(ids, ids.bool(), MASK, VOCAB, MaskingConfig(), gen(0), first_normal_id=VOCAB)
