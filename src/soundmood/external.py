"""External evaluation sets (evaluate.external): score the served forward pass on class-labelled
image folders kept outside the data tree (soundmood.data.labelled reads them), decoding each image
as the served model does, and write reports/external.json (always, `"sets": {}` when none are
configured, since DVC declares it) and the `external_<set>_*` metrics MLflow and the registry keep.

An absent folder is skipped with a warning, never a failure; an unreadable file is skipped with a
warning and listed; with detect_faces an image without a face counts as a miss (wrong).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from omegaconf import DictConfig
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

from soundmood import tracking
from soundmood.data.images import ImageError, load_face
from soundmood.data.labelled import LabelledFolder, LabelledImages, list_images, parse_sets
from soundmood.fileio import write_json
from soundmood.forward import Forward, tta_probabilities
from soundmood.inference.detect import detect_faces, load_photo
from soundmood.model_card import EXTERNAL_FILE as REPORT_FILE
from soundmood.model_card import external_figures

log = logging.getLogger(__name__)

KEY = "evaluate.external"
CONTEXT = "external"  # the MLflow dataset input's context
NO_FACE = "no_face"  # the confusion matrix's extra column with detect_faces
MISS = -1  # the predicted label of an image without a detected face


def decode(path: Path, size: int, detect: bool, inference: Any = None) -> np.ndarray | None:
    """One image as the served model takes it: the whole image (serving's `face`), or with
    `detect` the most confident detected face aligned (None: no face). ImageError: unreadable."""
    if not detect:
        return load_face(path, size)
    faces = detect_faces(load_photo(path), inference)
    if not faces:
        return None
    return max(faces, key=lambda face: face.confidence).crop(size)


def set_report(
    images: LabelledImages,
    y_pred: np.ndarray,
    y_true: np.ndarray,
    unreadable: list[str],
) -> dict[str, Any]:
    """A scored set's figures: macro-F1 over the classes present, recall per class (None for a
    missing one), the confusion matrix (rows: true class; with detect_faces a last `no_face`
    column of the images without a face)."""
    classes, folder = list(images.classes), images.folder
    labels = list(range(len(classes)))
    present = sorted(set(y_true.tolist()))
    columns = classes + ([NO_FACE] if folder.detect_faces else [])
    scored = len(y_true) > 0  # every file unreadable: no figures
    matrix = np.zeros((len(labels), len(columns)), dtype=np.int64)
    recalls = np.zeros(len(labels))
    if scored:
        matrix = confusion_matrix(y_true, y_pred, labels=[*labels, MISS])[: len(labels)]
        matrix = matrix[:, : len(columns)]
        recalls = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
        macro_f1 = f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
    report: dict[str, Any] = {
        "path": str(folder.path),
        "digest": images.digest,
        "detect_faces": folder.detect_faces,
        "images": len(y_true),
        "accuracy": _round(accuracy_score(y_true, y_pred)) if scored else None,
        "macro_f1": _round(macro_f1) if scored else None,
        "recall": {
            name: (_round(recalls[i]) if i in present else None) for i, name in enumerate(classes)
        },
        "confusion": {"labels": columns, "matrix": matrix.tolist()},
        "missing_classes": list(images.missing),
        "unreadable": unreadable,
    }
    if folder.detect_faces:
        report["detected"] = _round(np.mean(y_pred != MISS)) if scored else None
    return report


def _round(value: float) -> float:
    return round(float(value), 4)


@dataclass(frozen=True)
class Scorer:
    """How every set is scored: the served forward pass and how images are fed to it."""

    forward: Forward
    classes: Sequence[str]
    image_size: int
    batch_size: int
    tta_flip: bool
    inference: Any = None  # the inference config detect_faces uses (None: its defaults)

    def score(self, folder: LabelledFolder) -> dict[str, Any]:
        """One set's report; `{"skipped": why, "path": ...}` when its folder does not exist."""
        if not folder.path.is_dir():
            message = f"{folder.key or folder.name}: {folder.path} does not exist; set skipped"
            warnings.warn(message, stacklevel=2)
            log.warning(message)
            return {"skipped": "folder does not exist", "path": str(folder.path)}
        images = list_images(folder, self.classes)
        unreadable = [f"{path}: {why}" for path, why in images.refused]
        faces, kept, found = [], [], []
        for path, label in zip(images.paths, images.labels, strict=True):
            try:
                face = decode(path, self.image_size, folder.detect_faces, self.inference)
            except ImageError as exc:
                unreadable.append(str(exc))
                continue
            kept.append(label)
            found.append(face is not None)
            if face is not None:
                faces.append(face)
        for line in unreadable:
            warnings.warn(f"{folder.key or folder.name}: skipped {line}", stacklevel=2)
        y_true = np.asarray(kept, dtype=np.int64)
        y_pred = np.full(len(kept), MISS, dtype=np.int64)
        if faces:
            probs = tta_probabilities(self.forward, np.stack(faces), self.batch_size, self.tta_flip)
            y_pred[np.asarray(found)] = probs.argmax(axis=1)
        return set_report(images, y_pred, y_true, unreadable)

    def score_all(self, sets: Sequence[LabelledFolder]) -> dict[str, Any]:
        """Every set's report, by name: external.json's content."""
        return {"sets": {folder.name: self.score(folder) for folder in sets}}


def write_report(result: Mapping[str, Any], reports: Path) -> Path:
    """reports/external.json, written atomically."""
    return write_json(Path(reports) / REPORT_FILE, result)


def log_to_mlflow(result: Mapping[str, Any], path: Path) -> None:
    """Into the active run: each scored set as its own dataset input (context `external`, its
    digest), its metrics, and external.json as an artifact."""
    for name, report in result.get("sets", {}).items():
        if "skipped" not in report:
            tracking.log_folder(report["path"], f"external-{name}", report["digest"], CONTEXT)
    mlflow.log_metrics(external_figures(result))
    mlflow.log_artifact(str(path), artifact_path="evaluation")


def configured(cfg: DictConfig) -> list[LabelledFolder]:
    """evaluate.external checked (ConfigError naming the key); call before any work."""
    return parse_sets(cfg.evaluate.get("external"), KEY, list(cfg.data.classes))


def run(cfg: DictConfig, forward: Forward) -> tuple[dict[str, Any], Path]:
    """Score every configured set through `forward` (the served graph) as evaluate configures
    predictions, and write reports/external.json; returns its content and path."""
    scorer = Scorer(
        forward,
        list(cfg.data.classes),
        int(cfg.data.image_size),
        int(cfg.evaluate.batch_size),
        bool(cfg.evaluate.tta_flip),
        cfg.get("inference"),
    )
    result = scorer.score_all(configured(cfg))
    return result, write_report(result, Path(cfg.evaluate.reports_dir))


def summary(report: Mapping[str, Any]) -> str:
    """One line of a set's report for the console."""
    if "skipped" in report:
        return f"skipped ({report['skipped']}: {report['path']})"
    if report["accuracy"] is None:
        return f"no readable image ({len(report['unreadable'])} unreadable)"
    line = (
        f"accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f} on "
        f"{report['images']} images"
    )
    if "detected" in report:
        line += f", faces detected in {report['detected']:.1%}"
    return line
