"""Temperature scaling folded into the softmax head, and the confidence threshold behind an
honest "not sure".

A network trained with cross-entropy is usually too sure of itself: its top probability runs
ahead of its accuracy. One temperature T, fitted on the validation split, divides the head's
logits (Guo et al., "On calibration of modern neural networks", ICML 2017); dividing the Dense
"probs" head's kernel and bias by T does exactly that, so the saved .keras, its ONNX export and
the served model all output calibrated probabilities with no extra layer or serving code. T is
fitted on what is served: each view's logits (the face and, with flip TTA, its mirror) after the
logit adjustment, divided by T, softmaxed and averaged (calibration.fit_view_temperature).

The threshold is then chosen on the calibrated validation predictions: the lowest top probability
whose kept answers are `inference.confident_precision` accurate (calibration.selective_curve),
the `min_confidence` the served model marks answers `confident` with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
from omegaconf import DictConfig

from soundmood import calibration
from soundmood.logit_adjustment import HEAD_LAYER


@dataclass(frozen=True)
class Calibration:
    """The fitted temperature, the validation calibration before and after it, and the chosen
    confidence threshold with the share of validation faces it keeps and their accuracy."""

    temperature: float
    fitted: bool  # False: train.calibrate off, temperature 1
    before: dict[str, float]  # calibration_scores at T = 1 (ece, nll, brier)
    after: dict[str, float]  # calibration_scores of the calibrated (served) predictions
    min_confidence: float
    coverage: float
    accuracy: float  # NaN when the threshold keeps no face

    def metrics(self) -> dict[str, float]:
        """The train stage's report and MLflow keys (issue 37's contract)."""
        return {
            "temperature": self.temperature,
            "min_confidence": self.min_confidence,
            "val_ece_before_temperature": self.before["ece"],
            "val_ece": self.after["ece"],
            "val_nll_before_temperature": self.before["nll"],
            "val_nll": self.after["nll"],
            "val_confident_coverage": self.coverage,
            "val_confident_accuracy": self.accuracy,
        }

    def report(self) -> dict[str, float | None]:
        """metrics() for a JSON report: rounded, None for an accuracy of no face, and the
        temperature and threshold unrounded (the served model compares with that very value)."""
        rounded = {
            key: None if math.isnan(value) else round(value, 4)
            for key, value in self.metrics().items()
        }
        return {**rounded, "temperature": self.temperature, "min_confidence": self.min_confidence}

    def summary(self) -> str:
        """One line for the train stage's output."""
        fitted = (
            f"temperature {self.temperature:.2f} fitted on validation"
            if self.fitted
            else "temperature 1 (train.calibrate off)"
        )
        kept = (
            f"keeps {self.coverage:.0%} of validation faces at {self.accuracy:.3f} accuracy"
            if self.coverage and not math.isnan(self.accuracy)
            else "keeps no validation face (target precision unreachable)"
        )
        return (
            f"train: {fitted} (NLL {self.before['nll']:.3f} -> {self.after['nll']:.3f}, "
            f"ECE {self.before['ece']:.3f} -> {self.after['ece']:.3f}); "
            f"min_confidence {self.min_confidence:.3f} {kept}"
        )


def fold_into_head(model: keras.Model, temperature: float) -> None:
    """Divide the softmax head's kernel and bias by `temperature`: its logits, Wx + b, are
    divided by it, and softmax((Wx + b) / T) is the tempered posterior."""
    head = model.get_layer(HEAD_LAYER)
    head.kernel.assign(keras.ops.convert_to_numpy(head.kernel) / np.float32(temperature))
    head.bias.assign(keras.ops.convert_to_numpy(head.bias) / np.float32(temperature))


def fit_and_fold(
    model: keras.Model, views: Sequence[np.ndarray], labels: np.ndarray, cfg: DictConfig
) -> float | None:
    """Fit the temperature on validation `views` (the per-view logits of `model` as it is, e.g.
    logit_adjustment.view_logits of its served graph) and fold it into `model`'s head; None,
    and `model` untouched, when train.calibrate is off."""
    if not cfg.train.calibrate:
        return None
    temperature = calibration.fit_view_temperature(views, labels)
    fold_into_head(model, temperature)
    return temperature


def assess(
    views: Sequence[np.ndarray],
    temperature: float | None,
    served: np.ndarray,
    labels: np.ndarray,
    cfg: DictConfig,
) -> Calibration:
    """Validation calibration at T = 1 (from `views`) and as served (`served`: the folded
    model's view-averaged probabilities), and the min_confidence chosen on `served`, the
    probabilities the served model compares with it. `temperature` None: none was fitted."""
    n_classes = len(cfg.data.classes)
    curve = calibration.selective_curve(served, labels)
    threshold = calibration.threshold_for_precision(curve, float(cfg.inference.confident_precision))
    coverage, accuracy = curve.at(threshold)
    return Calibration(
        temperature=1.0 if temperature is None else float(temperature),
        fitted=temperature is not None,
        before=calibration.calibration_scores(
            calibration.tempered_views(views, 1.0), labels, n_classes
        ),
        after=calibration.calibration_scores(served, labels, n_classes),
        min_confidence=threshold,
        coverage=coverage,
        accuracy=accuracy,
    )
