"""One mood per photo from the probabilities of its faces: what `soundmood predict` and the served
model's detect_faces option both report. Needs only numpy, so the served model imports it.

A face's answer is *confident* when its top probability reaches `min_confidence`, the threshold
train chose on validation so that confident answers reach `inference.confident_precision`
accuracy (not the detector's face score, `inference.detector.min_confidence`). A photo's mood
combines its confident faces only; with none, the mood is withheld and a reason given.
"""

from __future__ import annotations

import numpy as np

# No threshold known (a model logged before calibration, a .keras without reports/train.json):
# every answer counts as confident, since every top probability is >= 0.
NO_THRESHOLD = 0.0
NO_FACE = "no face found"


def combine_mood(probs: np.ndarray, areas: np.ndarray, weighting: str) -> np.ndarray | None:
    """One probability vector for the photo (None without faces).

    area: mean weighted by box area (a face the photo is about outweighs one in the background);
    uniform: plain mean; largest: the largest face alone.
    """
    if len(probs) == 0:
        return None
    if weighting == "largest":
        return probs[int(np.argmax(areas))]
    weights = np.asarray(areas, dtype=np.float64) if weighting == "area" else np.ones(len(probs))
    return (weights[:, None] * probs).sum(axis=0) / weights.sum()


def confident(probs: np.ndarray, min_confidence: float) -> np.ndarray:
    """Per row of `probs` (N, C): whether its top probability reaches `min_confidence`."""
    if len(probs) == 0:
        return np.zeros(0, dtype=bool)
    return np.asarray(probs, dtype=np.float64).max(axis=1) >= float(min_confidence)


def confident_mood(
    probs: np.ndarray, areas: np.ndarray, weighting: str, min_confidence: float
) -> tuple[np.ndarray | None, str | None]:
    """The photo's mood from its confident faces, or (None, why not): "no face found" or
    "no confident face: top probability 0.61 < min_confidence 0.78"."""
    if len(probs) == 0:
        return None, NO_FACE
    keep = confident(probs, min_confidence)
    if not keep.any():
        top = float(np.asarray(probs, dtype=np.float64).max())
        low, high = _distinct(top, float(min_confidence))
        return None, f"no confident face: top probability {low} < min_confidence {high}"
    return combine_mood(probs[keep], np.asarray(areas)[keep], weighting), None


def _distinct(low: float, high: float) -> tuple[str, str]:
    """Both numbers with the fewest decimals (at least 2) that tell them apart, so a reason never
    reads "0.78 < 0.78"."""
    for digits in range(2, 8):
        a, b = f"{low:.{digits}f}", f"{high:.{digits}f}"
        if a != b:
            return a, b
    return f"{low!r}", f"{high!r}"
