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
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
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
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return float(torch.nn.functional.cross_entropy(x, y))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def summary(
    validation: tuple[np.ndarray, np.ndarray] | None, test: tuple[np.ndarray, np.ndarray] | None,
    bins: int = 15,
) -> dict:  # fmt: skip
    """What calibration.json holds: the temperature fitted on validation (logits, labels),
    and on test the ECE, NLL and reliability bins before and after it; NLL on validation
    too, where T was fitted (it can only go down there). Without validation rows T is 1."""
    out: dict = {"bins": bins, "temperature": 1.0, "fitted_on": None}
    if validation is not None and len(validation[1]):
        vx, vy = validation
        t = fit_temperature(vx, vy)
        out |= {"temperature": t, "fitted_on": "validation", "validation_rows": int(len(vy)),
                "val_nll": nll(vx, vy), "val_nll_calibrated": nll(vx, vy, t),
                "val_ece": expected_calibration_error(softmax(vx), vy, bins),
                "val_ece_calibrated": expected_calibration_error(softmax(vx, t), vy, bins)}  # fmt: skip
    if test is not None and len(test[1]):
        x, y, t = *test, out["temperature"]
        before, after = reliability(softmax(x), y, bins), reliability(softmax(x, t), y, bins)
        out |= {"test_rows": int(len(y)), "test_nll": nll(x, y), "test_nll_calibrated": nll(x, y, t),
                "test_ece": before.ece, "test_ece_calibrated": after.ece,
                "reliability": {"edges": before.edges.tolist(),
                                "before": _bins(before), "after": _bins(after)}}  # fmt: skip
    return out


def _bins(r: Reliability) -> dict:
    return {"counts": r.counts.tolist(), "confidence": r.confidence.tolist(),
            "accuracy": r.accuracy.tolist()}  # fmt: skip
