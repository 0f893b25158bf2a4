"""One mood per photo from the probabilities of its faces: what `soundmood predict` and the served
model's detect_faces option both report. Needs only numpy, so the served model imports it."""

from __future__ import annotations

import numpy as np

MOOD_WEIGHTINGS = ("area", "uniform", "largest")


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
