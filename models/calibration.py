"""Calibration: do a classifier's probabilities mean what they say?

Expected calibration error (Guo et al. 2017, "On Calibration of Modern Neural Networks"):
split the predictions into equal-width bins of confidence (the top probability), and average
|accuracy - mean confidence| over the bins, each weighted by its share of the rows. Temperature
scaling divides the logits by one scalar T > 0, fitted on validation rows by minimising the
negative log-likelihood; it changes the probabilities, never the predicted class.

Pure numpy and torch, so the Spark side and the training processes compute it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Reliability:
    """Per confidence bin: the bin's edges, rows, mean confidence and accuracy."""

    edges: np.ndarray  # (bins + 1,)
    counts: np.ndarray  # (bins,)
    confidence: np.ndarray  # (bins,) mean top probability; 0 for an empty bin
    accuracy: np.ndarray  # (bins,) share of rows whose top class is the label

    @property
    def ece(self) -> float:
        n = self.counts.sum()
        if not n:
            return 0.0
        return float((self.counts / n * np.abs(self.accuracy - self.confidence)).sum())


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> Reliability:
    """`probs` (N, C) rows summing to 1, `labels` (N,) class indices. A confidence on an
    edge goes to the bin below it (bins are (lo, hi]), as in Guo et al."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    conf = probs.max(axis=1)
    right = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(counts, np.bincount(which, conf, bins) / counts, 0.0)
        acc = np.where(counts, np.bincount(which, right.astype(float), bins) / counts, 0.0)
    return Reliability(edges, counts, mean_conf, acc)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    return reliability(probs, labels, bins).ece


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> float:
    """The T > 0 that minimises the mean NLL of softmax(logits / T) on these rows (LBFGS on
    log T, so T stays positive). Log-probabilities work as logits too."""
    x = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    x = torch.as_tensor(np.asarray(logits), dtype=torch.float64) / temperature
    return float(torch.nn.functional.cross_entropy(x, torch.as_tensor(np.asarray(labels))))
