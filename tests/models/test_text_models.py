"""LSTMClassifier and TextCNN: shapes, initial loss, padding handling, ignore_index, overfitting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparkloom.models.lstm import LSTMClassifier, LSTMConfig
from sparkloom.models.textcnn import TextCNN, TextCNNConfig

VOCAB, CLASSES, PAD = 50, 3, 0


def lstm(pooling: str):
    def build(**overrides):
        kw = dict(vocab_size=VOCAB, num_classes=CLASSES, embed_dim=16, hidden_dim=16)
        return LSTMClassifier(LSTMConfig(**{**kw, "pooling": pooling, **overrides}))

    return build


def textcnn(**overrides):
    kw = dict(vocab_size=VOCAB, num_classes=CLASSES, embed_dim=16, filter_sizes=(2, 3, 4))
    return TextCNN(TextCNNConfig(**{**kw, "num_filters": 8, **overrides}))


BUILDERS = {
    "lstm-max": lstm("max"),
    "lstm-mean": lstm("mean"),
    "lstm-last": lstm("last"),
    "textcnn": textcnn,
}


@pytest.fixture(params=list(BUILDERS), ids=list(BUILDERS))
def build(request):
    torch.manual_seed(0)
    return BUILDERS[request.param]


def make_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids with no pad id among real tokens, and the 0/1 mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(max(lengths), 1)), PAD)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, VOCAB, (n,), generator=g)
    return ids, (ids != PAD).long()


# Length 1 is shorter than every TextCNN filter but the first.
LENGTHS = [7, 1, 4, 9, 3]


def test_output_shapes(build):
    model = build()
    ids, mask = make_batch(LENGTHS)
    out = model(ids, mask)
    assert out.logits.shape == (len(LENGTHS), CLASSES)
    assert out.loss is None
    out = model(ids, mask, labels=torch.zeros(len(LENGTHS), dtype=torch.long))
    assert out.loss.ndim == 0


def test_padding_embedding_row_is_zero(build):
    model = build()
    emb = model.embedding if isinstance(model, TextCNN) else model.encoder.embedding
    assert torch.count_nonzero(emb.weight[PAD]) == 0


def test_initial_loss_is_near_log_num_classes(build):
    model = build().eval()
    ids, mask = make_batch([5, 8, 3, 6] * 4, seed=1)
    labels = torch.arange(16) % CLASSES
    loss = model(ids, mask, labels=labels).loss.item()
    assert abs(loss - math.log(CLASSES)) < 0.3


@torch.no_grad()
def test_extra_padding_does_not_change_logits(build):
    model = build().eval()
    ids, mask = make_batch(LENGTHS)
    ref = model(ids, mask).logits
    more_ids = F.pad(ids, (0, 6), value=PAD)
    more_mask = F.pad(mask, (0, 6), value=0)
    torch.testing.assert_close(model(more_ids, more_mask).logits, ref, atol=1e-5, rtol=0)
    # No mask: pads are inferred from padding_idx.
    torch.testing.assert_close(model(more_ids).logits, ref, atol=1e-5, rtol=0)
    # The mask, not the id, decides what is padding.
    junk_ids = more_ids.masked_fill(more_mask == 0, 7)
    torch.testing.assert_close(model(junk_ids, more_mask).logits, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(ids, mask.bool()).logits, ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_each_row_matches_running_it_alone_unpadded(build):
    model = build().eval()
    ids, mask = make_batch(LENGTHS)
    batched = model(ids, mask).logits
    for row, n in enumerate(LENGTHS):
        alone = model(ids[row : row + 1, :n]).logits
        torch.testing.assert_close(alone[0], batched[row], atol=1e-5, rtol=0)


def test_all_pad_row_gives_finite_logits_and_grads(build):
    model = build().eval()
    ids, mask = make_batch([4, 0, 6])
    out = model(ids, mask, labels=torch.tensor([0, 1, 2]))
    assert torch.isfinite(out.logits).all()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # The empty row leaves its neighbours alone.
    with torch.no_grad():
        rest = model(ids[[0, 2]], mask[[0, 2]]).logits
    torch.testing.assert_close(out.logits[[0, 2]].detach(), rest, atol=1e-5, rtol=0)


@torch.no_grad()
def test_labels_of_minus_100_are_ignored(build):
    model = build().eval()
    ids, mask = make_batch(LENGTHS)
    labels = torch.tensor([0, -100, 2, -100, 1])
    out = model(ids, mask, labels=labels)
    keep = labels != -100
    expected = F.cross_entropy(out.logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, expected)
    ignored_all_but_one = torch.tensor([-100, -100, 2, -100, -100])
    loss_one = model(ids, mask, labels=ignored_all_but_one).loss
    torch.testing.assert_close(loss_one, F.cross_entropy(out.logits[2:3], labels[2:3]))


def test_overfits_a_tiny_batch(build):
    model = build(dropout=0.1)
    ids, mask = make_batch([6, 3, 8, 5, 2, 7, 4, 8], seed=2)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(100):
        opt.zero_grad()
        model(ids, mask, labels=labels).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(ids, mask, labels=labels)
    assert (out.logits.argmax(dim=1) == labels).float().mean().item() == 1.0
    assert out.loss.item() < 0.1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pooling": "attention"}, "pooling must be one of"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"hidden_dim": 0}, "hidden_dim must be >= 1"),
        ({"num_layers": 0}, "num_layers must be >= 1"),
        ({"vocab_size": 0}, "vocab_size must be >= 1"),
        ({"padding_idx": 50}, "padding_idx must be in"),
    ],
)
def test_lstm_config_rejects_bad_values(overrides, message):
    kw = {"vocab_size": VOCAB, "num_classes": CLASSES, **overrides}
    with pytest.raises(ValueError, match=message):
        LSTMConfig(**kw)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"filter_sizes": ()}, "filter_sizes must be a non-empty tuple"),
        ({"filter_sizes": (3, 0)}, "filter_sizes must be a non-empty tuple"),
        ({"num_filters": 0}, "num_filters must be >= 1"),
        ({"num_classes": 0}, "num_classes must be >= 1"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
        ({"padding_idx": -1}, "padding_idx must be in"),
    ],
)
def test_textcnn_config_rejects_bad_values(overrides, message):
    kw = {"vocab_size": VOCAB, "num_classes": CLASSES, **overrides}
    with pytest.raises(ValueError, match=message):
        TextCNNConfig(**kw)
