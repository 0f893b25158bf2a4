"""How the model holds up on faces as cameras deliver them: evaluate.conditions (parsed by
soundmood.conditions) are deterministic, seeded degradations (soundmood.degradations) of a
prepared split, predicted as evaluate predicts (forward.tta_probabilities) and scored for
accuracy, calibration (ECE) and the confident answers' coverage and accuracy. The same condition
gives the same images on every run, so validation and test variants are comparable across models.
The `redetected` condition (evaluate.redetect) is the detection path: faces re-embedded in
pictures and found again by the face detector (soundmood.inference.redetect), a face not found
scored wrong.
Results go to reports/robustness.json, reports/plots/robustness.csv (dvc.yaml draws it) and
MLflow; the registry's promotion floor reads them back (condition_accuracies).

No TensorFlow at import: the registry imports this module to read reports.
"""

from __future__ import annotations

import math
import re
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig
from sklearn.metrics import accuracy_score, f1_score, recall_score

from soundmood import fileio
from soundmood.calibration import expected_calibration_error, selective_curve
from soundmood.conditions import (
    CLEAN,
    CONFIDENT_SUFFIX,
    DETECTION_STATS,
    REDETECTED,
    SUMMARY_NAMES,
    Condition,
    check_config,
)
from soundmood.degradations import degrade
from soundmood.forward import tta_probabilities
from soundmood.inference.redetect import redetect, sample
from soundmood.inference.settings import from_config

if TYPE_CHECKING:
    import keras


def condition_images(condition: Condition, images: np.ndarray, seed: int) -> np.ndarray:
    """The condition's variant of a split: the same images for the same seed, always."""
    rng = np.random.default_rng([seed, zlib.crc32(condition.name.encode())])
    draws = rng.random(len(images))
    return degrade(condition.degradation, images, condition.params, draws)


# --- evaluation ----------------------------------------------------------------------------------


def condition_scores(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and the lowest per-class recall (with its class), to 4 decimals as
    evaluate.score gives them."""
    labels = list(range(len(classes)))  # a prediction of -1 (no face found) is wrong for any
    recalls = np.round(
        recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0), 4
    )
    weakest = int(np.argmin(recalls))  # the first of equals
    macro_f1 = f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
        "macro_f1": round(float(macro_f1), 4),
        "min_recall": float(recalls[weakest]),
        "min_recall_class": classes[weakest],
    }


def trust_scores(
    probs: np.ndarray, y_true: np.ndarray, min_confidence: float | None
) -> dict[str, float | None]:
    """How far the probabilities can be trusted: the expected calibration error and, with a
    threshold, the share of faces whose top probability reaches it (confident_coverage) and the
    accuracy of those (confident_accuracy; None when no face reaches it)."""
    scores: dict[str, float | None] = {"ece": round(expected_calibration_error(probs, y_true), 4)}
    if min_confidence is not None:
        coverage, accuracy = selective_curve(probs, y_true).at(min_confidence)
        scores["confident_coverage"] = round(coverage, 4)
        scores["confident_accuracy"] = None if math.isnan(accuracy) else round(accuracy, 4)
    return scores


def split_scores(
    probs: np.ndarray, y_true: np.ndarray, classes: list[str], min_confidence: float | None
) -> dict[str, Any]:
    """condition_scores of the argmax labels, then trust_scores."""
    scores = condition_scores(y_true, probs.argmax(axis=1), classes)
    return {**scores, **trust_scores(probs, y_true, min_confidence)}


def evaluate_conditions(
    model: keras.Model | Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    cfg: DictConfig,
    clean_pred: np.ndarray | None = None,
    *,
    clean_probs: np.ndarray | None = None,
    min_confidence: float | None = None,
    on_predicted: Callable[[str, np.ndarray], None] | None = None,
) -> dict[str, Any]:
    """Score the clean split and every configured condition of it.

    `model`: a Keras model or a forward.Forward (evaluate passes the served ONNX graph).
    Predictions go through forward.tta_probabilities with evaluate.batch_size and
    evaluate.tta_flip, as the clean test score does. The clean pass can be reused: pass
    `clean_probs` (its probabilities) or `clean_pred` (only its argmax labels: the clean scores
    then have no ece nor confident_*). `min_confidence`: the top-probability threshold of
    confident_coverage / confident_accuracy (None: no threshold, those keys are left out).
    `on_predicted(name, probabilities)` sees every split's probabilities (clean when known, then
    each condition but `redetected`, whose faces are a sample), e.g. for a plot, without this
    result holding them.
    Returns {images, seconds, clean: scores, conditions: {name: scores}, worst_condition,
    worst_accuracy, mean_drop}; mean_drop is the mean of clean minus condition accuracy.
    """
    conditions = check_config(cfg)  # before any work
    classes, ev = list(cfg.data.classes), cfg.evaluate
    seed = int(ev.get("condition_seed", 0))
    forward = getattr(model, "predict_on_batch", model)  # a Keras model, or a Forward itself
    start = time.perf_counter()

    def scored(name: str, probs: np.ndarray) -> dict[str, Any]:
        if on_predicted is not None:
            on_predicted(name, probs)
        return split_scores(probs, y, classes, min_confidence)

    def predicted(images: np.ndarray) -> np.ndarray:
        return tta_probabilities(forward, images, ev.batch_size, ev.tta_flip)

    if clean_probs is None and clean_pred is not None:
        clean = condition_scores(y, clean_pred, classes)
    else:
        clean = scored(CLEAN, predicted(x) if clean_probs is None else clean_probs)
    scores = {c.name: scored(c.name, predicted(condition_images(c, x, seed))) for c in conditions}
    redetected = redetected_scores(predicted, x, y, cfg, min_confidence)
    if redetected is not None:
        scores[REDETECTED] = redetected
    result: dict[str, Any] = {"images": len(y), "clean": clean, "conditions": scores}
    result.update(summarise(clean, scores))
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def redetected_scores(
    predicted: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    cfg: DictConfig,
    min_confidence: float | None,
) -> dict[str, Any] | None:
    """The `redetected` condition: evaluate.redetect.faces sampled faces of the split through
    every configured context (soundmood.inference.redetect), detected and aligned with
    cfg.inference, then `predicted`. accuracy, macro_f1 and min_recall count a face not found
    again as wrong; `detected` is the share found, accuracy_on_detected and the trust scores are
    over the found ones; `contexts` gives each context's detected and accuracy. None when off."""
    spec = cfg.evaluate.get("redetect")
    if not spec or not spec.get("faces"):
        return None
    settings, seed = from_config(cfg.get("inference")), int(cfg.evaluate.get("condition_seed", 0))
    classes, picked = list(cfg.data.classes), sample(len(x), int(spec.faces), seed)
    faces, truth = x[picked], y[picked]
    y_all, pred_all, found_probs, found_y, per_context = [], [], [], [], {}
    for name, params in spec.contexts.items():
        if params is None:
            continue
        again = redetect(faces, str(name), params, settings, seed)
        probs = predicted(again.crops) if len(again.crops) else np.zeros((0, len(classes)))
        pred = np.full(len(faces), -1)
        pred[again.found] = probs.argmax(axis=1)
        per_context[str(name)] = {
            "detected": round(float(again.found.mean()), 4),
            "accuracy": round(float(accuracy_score(truth, pred)), 4),
        }
        y_all.append(truth)
        pred_all.append(pred)
        found_probs.append(probs)
        found_y.append(truth[again.found])
    if not per_context:
        return None
    y_true, y_pred = np.concatenate(y_all), np.concatenate(pred_all)
    probs, y_found = np.concatenate(found_probs), np.concatenate(found_y)
    found = y_pred >= 0
    scores = condition_scores(y_true, y_pred, classes)
    if len(y_found):
        scores.update(trust_scores(probs, y_found, min_confidence))
    scores["detected"] = round(float(found.mean()), 4)
    scores["accuracy_on_detected"] = (
        round(float(accuracy_score(y_found, probs.argmax(axis=1))), 4) if len(y_found) else None
    )
    return {**scores, "faces": len(picked), "contexts": per_context}


def summarise(clean: Mapping[str, Any], scores: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    if not scores:
        return {"worst_condition": None, "worst_accuracy": clean["accuracy"], "mean_drop": 0.0}
    worst = min(scores, key=lambda name: scores[name]["accuracy"])
    drops = [clean["accuracy"] - s["accuracy"] for s in scores.values()]
    return {
        "worst_condition": worst,
        "worst_accuracy": scores[worst]["accuracy"],
        "mean_drop": round(float(np.mean(drops)), 4),
    }


STATS = ("accuracy", "macro_f1", "min_recall")
TRUST_STATS = ("ece", "confident_coverage", "confident_accuracy")  # absent from older reports


def mlflow_metrics(result: Mapping[str, Any], prefix: str = "robust_") -> dict[str, float]:
    """robust_<condition>_{accuracy,macro_f1,min_recall} and, where scored,
    robust_<condition>_{ece,confident_coverage,confident_accuracy} (and the redetected
    condition's robust_redetected_{detected,accuracy_on_detected}); robust_worst_accuracy,
    robust_mean_drop (use prefix="val_robust_" for the validation variants)."""
    metrics = {}
    for name, scores in result["conditions"].items():
        for stat in STATS:
            metrics[f"{prefix}{name}_{stat}"] = float(scores[stat])
        for stat in TRUST_STATS + DETECTION_STATS:
            if scores.get(stat) is not None:
                metrics[f"{prefix}{name}_{stat}"] = float(scores[stat])
    metrics[f"{prefix}worst_accuracy"] = float(result["worst_accuracy"])
    metrics[f"{prefix}mean_drop"] = float(result["mean_drop"])
    if "seconds" in result:  # robustness.json leaves timings out
        metrics[f"{prefix}seconds"] = float(result["seconds"])
    return metrics


REPORT_FILE = "robustness.json"
PLOT_CSV = "plots/robustness.csv"


def write_reports(result: Mapping[str, Any], reports_dir: str | Path) -> list[Path]:
    """reports/robustness.json (DVC metrics: no timings, so `dvc metrics diff` shows only model
    changes) and reports/plots/robustness.csv (one bar per condition, clean first), which
    dvc.yaml draws as a bar chart."""
    reports = Path(reports_dir)
    paths = [reports / REPORT_FILE, reports / PLOT_CSV]
    write_json(result, paths[0])
    rows = _bars(result)
    fileio.write_text(
        paths[1], "condition,accuracy\n" + "".join(f"{name},{acc:.4f}\n" for name, acc in rows)
    )
    return paths


def write_json(result: Mapping[str, Any], path: Path) -> None:
    """The scores without their timing, so `dvc metrics diff` shows only model changes."""
    fileio.write_json(path, {k: v for k, v in result.items() if k != "seconds"})


def _bars(result: Mapping[str, Any]) -> list[tuple[str, float]]:
    return [
        (CLEAN, result["clean"]["accuracy"]),
        *((name, s["accuracy"]) for name, s in result["conditions"].items()),
    ]


def log_to_mlflow(result: Mapping[str, Any], paths: list[Path], prefix: str = "robust_") -> None:
    """Metrics and report files to the active MLflow run (artifact folder `robustness/`)."""
    import mlflow  # deferred: seconds to import, and the registry reads reports without it

    mlflow.log_metrics(mlflow_metrics(result, prefix))
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path="robustness")


# --- promotion gate ------------------------------------------------------------------------------

_RUN_METRIC = re.compile(r"^robust_(?P<name>[a-z][a-z0-9_]*)_accuracy$")


def condition_accuracies(robust_metrics: Mapping[str, Any]) -> dict[str, float]:
    """Per-condition accuracy from robustness.json's content or from a run's flat MLflow metrics."""
    if "conditions" in robust_metrics:
        return {n: float(s["accuracy"]) for n, s in robust_metrics["conditions"].items()}
    found = {}
    for key, value in robust_metrics.items():
        match = _RUN_METRIC.match(key)
        if (
            match
            and match["name"] not in SUMMARY_NAMES  # the redetected condition is gated too
            and not match["name"].endswith(CONFIDENT_SUFFIX)
        ):
            found[match["name"]] = float(value)
    return found
