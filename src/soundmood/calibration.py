"""How far the served probabilities can be trusted: calibration measures, one fitted temperature,
and the coverage / selective-accuracy trade-off behind an honest "not sure".

Pure numpy on (N, C) probabilities and integer labels, so evaluation, training and the registry
share one definition of each figure. sklearn.metrics' log-loss warns about float32 probabilities
that miss a sum of one by rounding, and its Brier score halves the two-class case, so both are
written out (a line each); it has no top-label expected calibration error nor a
selective-accuracy curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import softmax

ECE_BINS = 15  # equal-width bins of the top probability, as in Guo et al. (2017)
TEMPERATURE_BOUNDS = (0.05, 20.0)
EPSILON = 1e-12


@dataclass(frozen=True)
class Reliability:
    """The top-label reliability diagram: per equal-width confidence bin, how many answers fell
    in it, their mean confidence and their accuracy (NaN for an empty bin)."""

    edges: np.ndarray  # (bins + 1,)
    counts: np.ndarray  # (bins,)
    confidence: np.ndarray  # (bins,)
    accuracy: np.ndarray  # (bins,)

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean |accuracy - confidence|."""
        filled = self.counts > 0
        if not filled.any():
            return 0.0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float(np.sum(self.counts[filled] * gaps) / self.counts.sum())

    def rows(self) -> list[dict[str, float]]:
        """One row per non-empty bin, for a DVC plot or a JSON report."""
        return [
            {
                "bin_low": round(float(self.edges[i]), 4),
                "bin_high": round(float(self.edges[i + 1]), 4),
                "count": int(self.counts[i]),
                "confidence": round(float(self.confidence[i]), 4),
                "accuracy": round(float(self.accuracy[i]), 4),
            }
            for i in range(len(self.counts))
            if self.counts[i]
        ]


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Bin the top probability into `bins` equal-width bins (right-closed, so 1.0 falls in the
    last and a confidence exactly on an edge in the lower bin)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    top = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, top, side="left") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(which, weights=top, minlength=bins) / counts
        accuracy = np.bincount(which, weights=correct, minlength=bins) / counts
    return Reliability(edges, counts, confidence, accuracy)


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    return reliability(probs, labels, bins).ece


def calibration_scores(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, float]:
    """ECE (15 bins, top label), negative log-likelihood and the multiclass Brier score (the
    squared distance to the one-hot label summed over classes, in [0, 2])."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(n_classes)[np.asarray(labels)]
    return {
        "ece": expected_calibration_error(probs, labels),
        "nll": negative_log_likelihood(probs, labels),
        "brier": float(np.mean(np.sum((probs - onehot) ** 2, axis=1))),
    }


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    """The mean -log probability of the true class (sklearn's log_loss, without its warning
    that float32 probabilities do not sum to one exactly)."""
    labels = np.asarray(labels)
    picked = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, EPSILON, 1.0))))


def tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities with their logits divided by `temperature` (the argmax never changes).
    Works on probabilities because the served graph ends in a softmax: log p is the logit up to
    a per-row constant, which the softmax removes."""
    return tempered_views([_log(probs)], temperature)


def tempered_views(views: Sequence[np.ndarray], temperature: float) -> np.ndarray:
    """The view-averaged softmax of each view's logits divided by `temperature`: what a model
    whose softmax head has its kernel and bias divided by `temperature` serves with flip TTA
    (one softmax per view, then the mean). `views` are (N, C) logits, or log-probabilities,
    which differ from them by a per-row constant the softmax removes."""
    return np.mean(
        [softmax(np.asarray(v, dtype=np.float64) / temperature, axis=1) for v in views], axis=0
    )


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The one temperature that minimises the negative log-likelihood of `labels` (searched on
    log T, a convex one-dimensional problem)."""
    return fit_view_temperature([_log(probs)], labels)


def fit_view_temperature(views: Sequence[np.ndarray], labels: np.ndarray) -> float:
    """The one temperature whose tempered_views best predict `labels` (least negative
    log-likelihood, searched on log T in TEMPERATURE_BOUNDS): fitted on the views a TTA model
    averages, it is the temperature the head folded with it realises, which a temperature
    fitted on the averaged probabilities is not."""
    labels = np.asarray(labels)
    views = [np.asarray(v, dtype=np.float64) for v in views]

    def nll(log_t: float) -> float:
        return negative_log_likelihood(tempered_views(views, float(np.exp(log_t))), labels)

    low, high = np.log(TEMPERATURE_BOUNDS)
    result = minimize_scalar(nll, bounds=(low, high), method="bounded")
    return float(np.exp(result.x))


def _log(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), EPSILON, 1.0))


@dataclass(frozen=True)
class Selective:
    """Answers kept when the top probability is at least a threshold: for every distinct
    threshold (descending), the share of faces kept and the accuracy of the kept answers."""

    thresholds: np.ndarray
    coverage: np.ndarray
    accuracy: np.ndarray

    def at(self, threshold: float) -> tuple[float, float]:
        """(coverage, accuracy) of the answers whose top probability is >= threshold."""
        kept = self.thresholds >= threshold
        if not kept.any():
            return 0.0, float("nan")
        i = int(np.flatnonzero(kept)[-1])
        return float(self.coverage[i]), float(self.accuracy[i])


def selective_curve(probs: np.ndarray, labels: np.ndarray) -> Selective:
    probs, labels = np.asarray(probs), np.asarray(labels)
    top = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    order = np.argsort(-top, kind="stable")
    top, correct = top[order], correct[order]
    # the last index of each run of equal confidences: a threshold keeps ties together
    last = np.r_[np.flatnonzero(np.diff(top) != 0), len(top) - 1] if len(top) else np.array([])
    kept = last + 1
    hits = np.cumsum(correct)[last] if len(top) else np.array([])
    return Selective(top[last], kept / max(len(top), 1), hits / np.maximum(kept, 1))


def threshold_for_precision(curve: Selective, target: float) -> float:
    """The lowest threshold whose kept answers are at least `target` accurate (so the most
    faces are kept); 1.0 when no threshold reaches it. Chosen on validation, never on test."""
    reaching = curve.accuracy >= target
    if not reaching.any():
        return 1.0
    return float(curve.thresholds[np.flatnonzero(reaching)[-1]])
