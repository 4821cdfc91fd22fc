"""The distillation loss against a value worked out by hand on a two-row batch."""

from __future__ import annotations

import math

import pytest
import torch

from sparkloom.models.distill import distillation_loss


def softmax(xs, t):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def test_distillation_loss_equals_the_hand_computed_value():
    student = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]
    teacher = [[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]]
    labels = [0, 2]
    t, alpha = 2.0, 0.3
    kl = ce = 0.0
    for s, tt, y in zip(student, teacher, labels, strict=True):
        ps, pt = softmax(s, t), softmax(tt, t)
        kl += sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
        ce += -math.log(softmax(s, 1.0)[y])
    want = alpha * t * t * kl / 2 + (1 - alpha) * ce / 2
    got = distillation_loss(
        torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), t, alpha
    )
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_teacher_logits_up_to_a_constant_and_the_limits():
    s = torch.tensor([[1.0, -1.0, 0.5]])
    tlog = torch.tensor([[2.0, 0.0, 1.0]])
    y = torch.tensor([1])
    a = distillation_loss(s, tlog, y, 3.0, 0.7)
    b = distillation_loss(s, tlog.log_softmax(-1) + 5.0, y, 3.0, 0.7)  # log-probs, shifted
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert distillation_loss(s, s, y, 2.0, 1.0).item() == pytest.approx(0.0, abs=1e-7)
    ce = torch.nn.functional.cross_entropy(s, y)
    assert distillation_loss(s, tlog, y, 2.0, 0.0).item() == pytest.approx(ce.item(), rel=1e-6)
    with pytest.raises(ValueError):
        distillation_loss(s, tlog, y, 0.0, 0.5)
