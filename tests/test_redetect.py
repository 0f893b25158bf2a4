"""The detection path as a capture condition: real RAF-DB test faces re-embedded by each context,
found again by the real face detector, aligned and scored (soundmood.inference.redetect and
the `redetected` condition of soundmood.robustness)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from soundmood import robustness
from soundmood.conditions import REDETECT_CONTEXTS, REDETECTED
from soundmood.config import validate
from soundmood.data.images import load_face
from soundmood.data.layout import list_split
from soundmood.errors import ConfigError
from soundmood.inference.redetect import CONTEXTS, background, margin, redetect, sample
from soundmood.inference.settings import from_config
from soundmood.registry.gate import condition_floor_failure

from .conftest import compose_config

SIZE = 100  # RAF-DB's side: crops compare pixel for pixel with the originals


@pytest.fixture(scope="module")
def faces(data_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Eight real test faces, two per class of the first four, at RAF-DB's 100 px."""
    cfg = compose_config()
    samples = list_split(data_root, "test", list(cfg.data.classes))
    picked = [s for label in range(4) for s in [x for x in samples if x.label == label][:2]]
    x = np.stack([load_face(s.path, SIZE) for s in picked])
    return x, np.array([s.label for s in picked])


def test_contexts_place_the_face_where_they_say(faces) -> None:
    face = Image.fromarray(faces[0][0])
    picture, (cx, cy, side) = background(face, random.Random(0), [80, 80], 2.0)
    assert picture.size == (160, 160) and side == 80
    pasted = np.asarray(picture)[int(cy - 40) : int(cy + 40), int(cx - 40) : int(cx + 40)]
    expected = np.asarray(face.resize((80, 80), Image.Resampling.BILINEAR))
    assert np.array_equal(pasted, expected)
    picture, (cx, cy, side) = margin(face, random.Random(0), [90, 90])
    assert picture.size == (180, 180) and (cx, cy, side) == (90, 90, 90)
    # the same seed gives the same picture: every model meets the same faces
    again, _ = margin(face, random.Random(0), [60, 120])
    assert np.array_equal(
        np.asarray(again), np.asarray(margin(face, random.Random(0), [60, 120])[0])
    )


@pytest.mark.slow
def test_margin_faces_are_found_again_and_framed_like_raf_db(faces) -> None:
    x, _ = faces
    settings = from_config(None)
    again = redetect(x, "margin", {"face_side": [100, 100]}, settings, seed=0)
    assert again.found.sum() >= 6, again.found  # the detector's score floor drops a few
    assert again.crops.shape == (again.found.sum(), SIZE, SIZE, 3)
    error = np.abs(again.crops.astype(float) - x[again.found].astype(float)).mean(axis=(1, 2, 3))
    assert np.median(error) < 25, error  # aligned back close to the original crop (0-255 scale)


def test_a_face_too_small_to_detect_is_a_miss(faces) -> None:
    x, _ = faces
    again = redetect(x[:2], "webcam", {"face_side": [4, 4], "grey": True}, from_config(None), 0)
    assert not again.found.any() and again.crops.shape == (0, SIZE, SIZE, 3)


def test_sample_is_the_same_faces_every_run() -> None:
    assert np.array_equal(sample(100, 10, 0), sample(100, 10, 0))
    assert len(set(sample(100, 10, 0))) == 10 and not np.array_equal(
        sample(100, 10, 0), sample(100, 10, 1)
    )
    assert len(sample(5, 10, 0)) == 5


@pytest.mark.slow
def test_redetected_condition_counts_misses_as_wrong(faces) -> None:
    x, y = faces
    cfg = compose_config()
    cfg.evaluate.redetect = {
        "faces": len(x),
        "contexts": {
            "margin": {"face_side": [100, 100]},
            "webcam": {"face_side": [4, 4], "grey": False},
        },
    }

    def always_first_class(images: np.ndarray) -> np.ndarray:
        probs = np.zeros((len(images), len(cfg.data.classes)))
        probs[:, 0] = 1.0
        return probs

    scores = robustness.redetected_scores(always_first_class, x, y, cfg, min_confidence=0.5)
    margin_found = redetect(x, "margin", {"face_side": [100, 100]}, from_config(cfg.inference), 0)
    assert scores["contexts"]["webcam"] == {"detected": 0.0, "accuracy": 0.0}
    found_first = int((y[margin_found.found] == 0).sum())
    assert scores["contexts"]["margin"]["accuracy"] == round(found_first / len(x), 4)
    assert scores["accuracy"] == round(found_first / (2 * len(x)), 4)  # both contexts, misses wrong
    assert scores["detected"] == round(margin_found.found.sum() / (2 * len(x)), 4)
    on_found = found_first / margin_found.found.sum()
    assert scores["accuracy_on_detected"] == round(on_found, 4)
    assert scores["faces"] == len(x)
    metrics = robustness.mlflow_metrics(
        {"conditions": {REDETECTED: scores}, "worst_accuracy": 0, "mean_drop": 0}
    )
    assert metrics["robust_redetected_detected"] == scores["detected"]
    assert metrics["robust_redetected_accuracy"] == scores["accuracy"]


def test_off_when_no_faces_or_no_context(faces) -> None:
    x, y = faces
    cfg = compose_config(["evaluate.redetect.faces=0"])
    assert robustness.redetected_scores(lambda im: im, x, y, cfg, None) is None
    cfg = compose_config(
        [
            "evaluate.redetect.contexts.margin=null",
            "evaluate.redetect.contexts.background=null",
            "evaluate.redetect.contexts.rotation=null",
            "evaluate.redetect.contexts.webcam=null",
        ]
    )
    assert robustness.redetected_scores(lambda im: im, x, y, cfg, None) is None


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("evaluate.redetect.faces=-1", "evaluate.redetect.faces"),
        (
            "evaluate.redetect.contexts.rotation.degrees=90",
            "evaluate.redetect.contexts.rotation.degrees",
        ),
        (
            "evaluate.redetect.contexts.margin.face_side=[200,80]",
            "evaluate.redetect.contexts.margin.face_side",
        ),
        ("+evaluate.redetect.contexts.margin.zoom=2", "evaluate.redetect.contexts.margin.zoom"),
        (
            "+evaluate.redetect.contexts.fisheye={face_side: [80, 100]}",
            "evaluate.redetect.contexts.fisheye",
        ),
    ],
)
def test_a_bad_redetect_value_is_named(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_config([override]))


def test_a_condition_may_not_take_the_detection_path_s_name() -> None:
    cfg = compose_config()
    cfg.evaluate.conditions = OmegaConf.create({REDETECTED: {"transform": "grey"}})
    with pytest.raises(ConfigError, match=f"evaluate.conditions.{REDETECTED}"):
        validate(cfg)


def test_every_context_is_configured_and_declared() -> None:
    assert set(compose_config().evaluate.redetect.contexts) == set(CONTEXTS)
    assert set(REDETECT_CONTEXTS) == set(CONTEXTS)


def test_the_gate_reads_the_detection_path_back_from_the_metrics() -> None:
    """robust_redetected_accuracy is a condition's figure for the promotion floor, unlike the
    summaries (robust_worst_accuracy) and the on-found accuracy."""
    metrics = {
        "robust_redetected_accuracy": 0.55,
        "robust_redetected_accuracy_on_detected": 0.9,
        "robust_dark_accuracy": 0.86,
        "robust_worst_accuracy": 0.55,
    }
    assert robustness.condition_accuracies(metrics) == {"redetected": 0.55, "dark": 0.86}
    assert "redetected 0.5500" in (condition_floor_failure(metrics, 0.6) or "")
