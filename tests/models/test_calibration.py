"""Calibration: ECE equals its formula on hand-made probabilities; temperature scaling lowers
the NLL of an overconfident model without changing a prediction."""

import numpy as np
import pytest

from sparkloom.models.calibration import (
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability,
    softmax,
    summary,
)


def test_ece_on_hand_made_probabilities_equals_the_formula():
    probs = np.array([
        [0.95, 0.05],  # bin (0.9, 1.0]: right
        [0.92, 0.08],  # bin (0.9, 1.0]: wrong
        [0.30, 0.70],  # bin (0.6, 0.8] with 5 bins: right
        [0.65, 0.35],  # bin (0.6, 0.8]: wrong
        [0.55, 0.45],  # bin (0.4, 0.6]: right
    ])  # fmt: skip
    labels = np.array([0, 1, 1, 1, 0])
    # by hand, 5 bins of width 0.2: (|1/2 - 0.935| * 2 + |1/2 - 0.675| * 2 + |1 - 0.55|) / 5
    expected = (abs(0.5 - 0.935) * 2 + abs(0.5 - 0.675) * 2 + abs(1 - 0.55) * 1) / 5
    assert expected_calibration_error(probs, labels, bins=5) == pytest.approx(expected)
    r = reliability(probs, labels, bins=5)
    assert r.counts.tolist() == [0, 0, 1, 2, 2]
    assert r.accuracy[4] == 0.5 and r.confidence[4] == pytest.approx(0.935)


def test_a_perfectly_calibrated_set_has_zero_ece():
    probs = np.array([[0.5, 0.5]] * 4)
    assert expected_calibration_error(probs, np.array([0, 1, 0, 1]), bins=10) == 0.0
    assert expected_calibration_error(probs, np.array([0, 0, 0, 0]), bins=10) == 0.5


def test_temperature_scaling_lowers_nll_and_keeps_every_prediction():
    rng = np.random.default_rng(0)
    n, c = 2000, 4
    labels = rng.integers(0, c, n)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), labels] += 1.5  # some signal
    overconfident = logits * 4.0  # the same ranking, far too sharp
    t = fit_temperature(overconfident, labels)
    assert 1.5 < t < 6.0  # the logits were sharpened 4x
    best = nll(overconfident, labels, t)
    assert best < nll(overconfident, labels) - 0.2
    grid = [nll(overconfident, labels, x) for x in np.linspace(1.0, 8.0, 57)]
    assert best <= min(grid) + 1e-9  # the minimum, not just lower
    soft = np.exp(overconfident / t)
    soft /= soft.sum(axis=1, keepdims=True)
    assert (soft.argmax(1) == overconfident.argmax(1)).all()
    sharp = np.exp(overconfident - overconfident.max(1, keepdims=True))
    sharp /= sharp.sum(axis=1, keepdims=True)
    assert expected_calibration_error(soft, labels) < expected_calibration_error(sharp, labels)


def test_summary_fits_on_validation_and_measures_test_before_and_after():
    rng = np.random.default_rng(1)

    def split(n):
        labels = rng.integers(0, 3, n)
        logits = rng.normal(0, 1, (n, 3))
        logits[np.arange(n), labels] += 1.0
        return logits * 5.0, labels  # overconfident

    val, test = split(600), split(400)
    s = summary(val, test, bins=10)
    assert s["fitted_on"] == "validation" and s["temperature"] == pytest.approx(
        fit_temperature(*val)
    )
    assert s["val_nll_calibrated"] < s["val_nll"] and s["test_ece_calibrated"] < s["test_ece"]
    assert s["test_ece"] == pytest.approx(expected_calibration_error(softmax(test[0]), test[1], 10))
    assert sum(s["reliability"]["before"]["counts"]) == 400 == s["test_rows"]
    # no validation rows: nothing to fit, T stays 1 and before == after
    s = summary(None, test, bins=10)
    assert s["temperature"] == 1.0 and s["fitted_on"] is None
    assert s["test_ece"] == s["test_ece_calibrated"]
