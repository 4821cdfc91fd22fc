"""Knowledge distillation (Hinton, Vinyals and Dean, 2015): a student learns from a teacher's
softened class distribution as well as from the labels.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           + (1 - alpha) * cross_entropy(student, labels)

T (temperature) > 1 spreads the teacher's probability over the wrong classes, which is what
carries its knowledge of which classes look alike; the T^2 keeps the soft term's gradients
on the scale of the hard term's as T changes. Teacher logits may be given up to a constant
per row (log-probabilities do): softmax does not see it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Mean over the batch of the weighted soft (KL at `temperature`) and hard (CE) losses.
    Rows labelled -100 count in the soft term only."""
    if temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need temperature > 0 and 0 <= alpha <= 1, got {temperature}, {alpha}")
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=-1),
        F.log_softmax(teacher_logits.float() / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits.float(), labels, ignore_index=-100)
    if alpha == 1.0:
        return soft * t * t
    return alpha * t * t * soft + (1.0 - alpha) * hard
