"""Calibration figures against values computed by hand, and the temperature fit on data whose
calibration is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from soundmood.calibration import (
    calibration_scores,
    expected_calibration_error,
    fit_temperature,
    fit_view_temperature,
    reliability,
    selective_curve,
    tempered,
    tempered_views,
    threshold_for_precision,
)

# top probabilities .91 (right), .81 (wrong), .71 (right), .56 (wrong), .92 (wrong): with 15 bins
# of width 1/15 they fall in bins 13, 12, 10, 8 and 13.
PROBS = np.array([[0.91, 0.09], [0.81, 0.19], [0.29, 0.71], [0.44, 0.56], [0.92, 0.08]])
LABELS = np.array([0, 1, 1, 0, 1])


def test_ece_equals_the_hand_computed_value() -> None:
    # bin 13: confidence (.91 + .92) / 2 = .915, accuracy 1/2 -> gap .415, two answers
    # bins 12, 10, 8: gaps .81, .29, .56, one answer each
    expected = (2 * 0.415 + 0.81 + 0.29 + 0.56) / 5
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(expected)
    assert expected_calibration_error(PROBS[:4], LABELS[:4]) == pytest.approx(1.75 / 4)


def test_reliability_rows_are_the_filled_bins() -> None:
    rows = reliability(PROBS, LABELS).rows()
    assert [r["count"] for r in rows] == [1, 1, 1, 2]
    assert rows[-1]["confidence"] == pytest.approx(0.915) and rows[-1]["accuracy"] == 0.5
    assert rows[0]["bin_low"] == pytest.approx(8 / 15, abs=1e-4)  # rounded for the report


def test_a_confidence_of_one_lands_in_the_last_bin() -> None:
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    diagram = reliability(probs, np.array([0, 0]))
    assert diagram.counts[-1] == 2 and diagram.ece == pytest.approx(0.5)


def test_nll_and_brier_equal_the_hand_computed_values() -> None:
    scores = calibration_scores(PROBS, LABELS, 2)
    truth = PROBS[np.arange(5), LABELS]
    assert scores["nll"] == pytest.approx(-np.mean(np.log(truth)))
    onehot = np.eye(2)[LABELS]
    assert scores["brier"] == pytest.approx(np.mean(np.sum((PROBS - onehot) ** 2, axis=1)))


def test_temperature_keeps_the_argmax_and_sums_to_one() -> None:
    for t in (0.3, 1.0, 4.0):
        scaled = tempered(PROBS, t)
        assert np.array_equal(scaled.argmax(1), PROBS.argmax(1))
        np.testing.assert_allclose(scaled.sum(1), 1.0)
    np.testing.assert_allclose(tempered(PROBS, 1.0), PROBS)


def _sampled(logits: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = np.array([rng.choice(len(p), p=p) for p in probs])
    return probs, labels


def test_fit_temperature_finds_the_temperature_that_calibrates() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, (4000, 5))
    probs, labels = _sampled(logits, rng)  # calibrated by construction
    assert fit_temperature(probs, labels) == pytest.approx(1.0, abs=0.1)
    overconfident = tempered(probs, 0.5)  # logits doubled: too sure of itself
    t = fit_temperature(overconfident, labels)
    assert t == pytest.approx(2.0, rel=0.1)
    before = calibration_scores(overconfident, labels, 5)
    after = calibration_scores(tempered(overconfident, t), labels, 5)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"]


def test_view_temperature_is_the_one_the_tta_average_realises() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 2.0, (4000, 5))
    views = [logits + rng.normal(0.0, 1.0, logits.shape) for _ in range(2)]  # face, mirror
    truth = tempered_views(views, 1.0)  # the labels are drawn from the views' average
    labels = np.array([rng.choice(5, p=p / p.sum()) for p in truth])
    one_view = tempered(softmax(views[0], axis=1), 0.7)  # one view: tempered's probabilities
    np.testing.assert_allclose(tempered_views(views[:1], 0.7), one_view)
    overconfident = [2.0 * v for v in views]
    t = fit_view_temperature(overconfident, labels)
    assert t == pytest.approx(2.0, rel=0.1)
    before = calibration_scores(tempered_views(overconfident, 1.0), labels, 5)
    after = calibration_scores(tempered_views(overconfident, t), labels, 5)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"]
    # a temperature fitted on the averaged probabilities fits another model than the folded one
    averaged = fit_temperature(tempered_views(overconfident, 1.0), labels)
    assert abs(averaged - t) > 0.05


def test_selective_curve_and_threshold_by_hand() -> None:
    # by descending confidence: .92 wrong, .91 right, .81 wrong, .71 right, .56 wrong
    curve = selective_curve(PROBS, LABELS)
    np.testing.assert_allclose(curve.thresholds, [0.92, 0.91, 0.81, 0.71, 0.56])
    np.testing.assert_allclose(curve.coverage, [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(curve.accuracy, [0.0, 0.5, 1 / 3, 0.5, 0.4])
    assert threshold_for_precision(curve, 0.5) == pytest.approx(0.71)  # keeps the most
    assert curve.at(0.71) == pytest.approx((0.8, 0.5))
    assert threshold_for_precision(curve, 0.9) == 1.0  # unreachable: nothing is confident


def test_selective_curve_keeps_ties_together() -> None:
    probs = np.array([[0.8, 0.2], [0.8, 0.2], [0.6, 0.4]])
    curve = selective_curve(probs, np.array([0, 1, 0]))
    np.testing.assert_allclose(curve.thresholds, [0.8, 0.6])
    np.testing.assert_allclose(curve.coverage, [2 / 3, 1.0])
    np.testing.assert_allclose(curve.accuracy, [0.5, 2 / 3])
