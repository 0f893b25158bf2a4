"""Post-hoc logit adjustment (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021).

`train.class_weight` trains the head as if the five classes were more equally common than they
are (`balanced`: equally; `sqrt`: half way in log space), which lifts angry's recall but makes the
model under-predict the common classes (happy is 42 % of the faces). Adding tau * log(prior) to
the head's logits, with the train split's class prior, moves its decisions back toward the real
class mix: tau = 0 leaves the model as trained, tau = 1 undoes `balanced` entirely (`sqrt` at
0.5). tau is picked on the validation split, predicted exactly as evaluate predicts (flip TTA
included), and folded into the softmax head's bias, so the saved and served models carry the
adjustment with no extra layer or code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np
from omegaconf import DictConfig
from scipy.special import softmax
from sklearn.metrics import accuracy_score, f1_score

from soundmood.forward import Forward, tta_probabilities

TINY = np.finfo(np.float32).tiny  # a probability that underflowed to 0 stays finite in log space
HEAD_LAYER = "probs"  # every builder in soundmood.models names its softmax Dense head so


@dataclass
class Adjustment:
    tau: float
    scores: dict[float, float] = field(default_factory=dict)  # tau -> validation objective
    # the validation labels the adjusted model predicts (argmax, views averaged): the clean
    # validation score needs no second prediction pass
    predictions: np.ndarray | None = None
    # the adjusted model's validation logits, one array per view (tau * prior added): the
    # temperature is fitted on them with no second prediction pass
    logits: list[np.ndarray] | None = None

    @property
    def value(self) -> float:
        """The chosen tau's validation objective."""
        return self.scores[self.tau]

    @property
    def gain(self) -> float:
        """The objective's change on validation against the unadjusted model (tau 0)."""
        return self.value - self.scores.get(0.0, self.value)


def log_prior(y_train: np.ndarray, n_classes: int) -> np.ndarray:
    """log of the train split's class frequencies (a class with no face counts as one)."""
    counts = np.maximum(np.bincount(y_train, minlength=n_classes), 1).astype(np.float64)
    return np.log(counts / counts.sum())


def view_logits(
    forward: Forward, x: np.ndarray, batch_size: int, tta_flip: bool
) -> list[np.ndarray]:
    """The model's logits for `x` (and its mirror with `tta_flip`), one array per view, up to a
    constant per face: the log of the probabilities `forward` predicts. Softmax ignores such a
    constant, so shifting these and taking the softmax gives what the shifted head predicts,
    and any Forward works, the ONNX graph train scores validation with included."""
    views = [x, x[:, :, ::-1]] if tta_flip else [x]
    return [
        np.log(np.maximum(tta_probabilities(forward, v, batch_size, False), TINY).astype(float))
        for v in views
    ]


def adjusted_prediction(logits: list[np.ndarray], shift: np.ndarray) -> np.ndarray:
    """Argmax of the view-averaged softmax of the shifted logits (as evaluate averages TTA)."""
    probs = [softmax(view + shift, axis=1) for view in logits]
    return np.mean(probs, axis=0).argmax(axis=1)


def choose_tau(
    logits: list[np.ndarray],
    y_val: np.ndarray,
    prior: np.ndarray,
    taus: list[float],
    objective: str,
) -> Adjustment:
    """The tau of `taus` with the best validation objective; ties go to the one listed first."""
    scores = {
        float(t): _objective(y_val, adjusted_prediction(logits, t * prior), objective) for t in taus
    }
    tau = max(scores, key=scores.get)  # max keeps the first of equals
    shifted = [view + tau * prior for view in logits]
    return Adjustment(tau, scores, adjusted_prediction(logits, tau * prior), shifted)


def fold_into_head(model: keras.Model, shift: np.ndarray) -> None:
    """Add `shift` to the head's bias: softmax(Wx + b + shift) is the adjusted posterior."""
    head = model.get_layer(HEAD_LAYER)
    head.bias.assign(keras.ops.convert_to_numpy(head.bias) + shift.astype("float32"))


def adjust(
    model: keras.Model,
    forward: Forward,
    train_labels: np.ndarray,
    val: tuple[np.ndarray, np.ndarray],
    cfg: DictConfig,
) -> Adjustment | None:
    """Pick tau on validation (train.logit_adjustment) and fold it into `model`; None when the
    grid is only tau 0 (adjustment off). `forward` predicts what `model` predicts before the
    fold (its ONNX graph, or `model.predict_on_batch`)."""
    settings = cfg.train.logit_adjustment
    taus = [float(t) for t in settings.taus]
    if not any(taus):
        return None
    n_classes = len(cfg.data.classes)
    prior = log_prior(train_labels, n_classes)
    logits = view_logits(forward, val[0], cfg.evaluate.batch_size, cfg.evaluate.tta_flip)
    chosen = choose_tau(logits, val[1], prior, taus, settings.objective)
    if chosen.tau:
        fold_into_head(model, chosen.tau * prior)
    return chosen


def _objective(y_true: np.ndarray, y_pred: np.ndarray, objective: str) -> float:
    if objective == "accuracy":
        return float(accuracy_score(y_true, y_pred))
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))
