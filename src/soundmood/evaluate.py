"""evaluate stage: the one place the test split is read. Exports models/model.keras to the ONNX
graph the served model runs, scores that graph (after checking it predicts what the .keras
does), writes the reports DVC shows (metrics.json, classification_report.json,
plots/confusion.csv) and logs test metrics, the confusion matrix and the model to the
pipeline's MLflow run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import keras
import matplotlib
import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
)

from soundmood import robustness, serving, tracking
from soundmood.data.prepare import load_split
from soundmood.fileio import atomic_path, write_bytes, write_json
from soundmood.forward import Forward, OnnxForward, onnx_model, tta_probabilities
from soundmood.train import MODEL_FILE

matplotlib.use("Agg")

ONNX_FILE = "model.onnx"
EXPORT_TOLERANCE = 1e-4  # float32 kernels differ by ~1e-6; a broken conversion by far more


def predict_proba(
    model: keras.Model | Forward, x: np.ndarray, batch_size: int, tta_flip: bool
) -> np.ndarray:
    """Class probabilities of a Keras model or a Forward (the served ONNX graph); with
    `tta_flip` averaged with those of the mirrored faces."""
    forward = model.predict_on_batch if isinstance(model, keras.Model) else model
    return tta_probabilities(forward, x, batch_size, tta_flip)


def score(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> tuple[dict, dict]:
    """Flat metrics (accuracy, macro/weighted F1, per-class P/R/F1) and sklearn's full report."""
    labels = list(range(len(classes)))
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=classes, output_dict=True, zero_division=0
    )
    flat = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
    }
    for name in classes:
        for stat in ("precision", "recall", "f1-score"):
            flat[f"{name}_{stat.replace('-score', '')}"] = float(report[name][stat])
    return {k: round(v, 4) for k, v in flat.items()}, report


def confusion_png(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], out: Path) -> None:
    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    display = ConfusionMatrixDisplay(cm, display_labels=classes)
    display.plot(cmap="Blues", colorbar=False, xticks_rotation=30)
    display.figure_.tight_layout()
    with atomic_path(out) as partial:
        display.figure_.savefig(partial, dpi=120, format="png")
    matplotlib.pyplot.close(display.figure_)


def write_reports(
    reports: Path,
    metrics: dict,
    report: dict,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    classes: list[str],
) -> list[Path]:
    plots = reports / "plots"
    paths = [
        reports / "metrics.json",
        reports / "classification_report.json",
        plots / "confusion.csv",
        plots / "confusion.png",
    ]
    write_json(paths[0], metrics)
    write_json(paths[1], report)
    pairs = {"actual": [classes[i] for i in y_true], "predicted": [classes[i] for i in y_pred]}
    with atomic_path(paths[2]) as partial:
        pd.DataFrame(pairs).to_csv(partial, index=False)
    confusion_png(y_true, y_pred, classes, paths[3])
    return paths


def export_served(model: keras.Model, folder: Path) -> tuple[Path, Path]:
    """The served model's files in `folder`: a .keras copy without optimizer state (which
    serving never uses and which would triple its size) and the ONNX graph it runs."""
    keras_path, onnx_path = folder / MODEL_FILE, folder / ONNX_FILE
    served = keras.Model.from_config(model.get_config())  # uncompiled: no optimizer
    served.set_weights(model.get_weights())
    with atomic_path(keras_path) as partial:
        served.save(partial)
    write_bytes(onnx_path, onnx_model(served))
    return keras_path, onnx_path


def check_export(model: keras.Model, forward: Forward, faces: np.ndarray) -> None:
    """Refuse an ONNX graph that does not predict what the trained model predicts."""
    gap = float(np.abs(forward(faces) - model.predict_on_batch(faces)).max())
    if not gap <= EXPORT_TOLERANCE:  # NaN fails too
        raise RuntimeError(
            f"the ONNX export differs from the trained {MODEL_FILE} by {gap:.2g} in probability "
            f"on {len(faces)} faces (tolerance {EXPORT_TOLERANCE}); nothing was logged"
        )


def served_forward(
    model: keras.Model, folder: Path, threads: int, check_faces: np.ndarray
) -> OnnxForward:
    """The served model's files written to `folder` (export_served) and a session over its ONNX
    graph, refused unless it predicts what `model` does on `check_faces`. evaluate scores the
    test split through it, train the validation split: about twice Keras' speed on 2 cores."""
    _, onnx_path = export_served(model, folder)
    forward = OnnxForward(onnx_path, threads=threads)
    check_export(model, forward, check_faces)
    return forward


def log_model(
    model: keras.Model, cfg: DictConfig, examples: np.ndarray, exported: Path | None = None
) -> str:
    """Log the served model (soundmood.serving: encoded images in, class probabilities out) and
    return its models:/ URI. `exported`: a folder export_served wrote (None: export here)."""
    from omegaconf import OmegaConf

    with tempfile.TemporaryDirectory() as tmp:
        files = (
            (exported / MODEL_FILE, exported / ONNX_FILE)
            if exported
            else export_served(model, Path(tmp))
        )
        inference = cfg.get("inference")
        info = serving.log_pyfunc(
            *files,
            list(cfg.data.classes),
            cfg.evaluate.tta_flip,
            cfg.evaluate.batch_size,
            examples,
            detect_faces=bool(cfg.registry.get("detect_faces", False)),
            inference=OmegaConf.to_container(inference) if inference else None,
        )
    return info.model_uri


def run(cfg: DictConfig) -> dict:
    """The `evaluate` stage."""
    robustness.check_config(cfg)  # a bad condition fails before the model is even loaded
    model = keras.models.load_model(Path(cfg.train.model_dir) / MODEL_FILE)
    x, y = load_split(cfg.data.prepared_dir, "test")
    with tempfile.TemporaryDirectory(prefix="soundmood-served-") as exported:
        return scored_and_logged(cfg, model, x, y, Path(exported))


def scored_and_logged(
    cfg: DictConfig, model: keras.Model, x: np.ndarray, y: np.ndarray, exported: Path
) -> dict:
    """Score the served graph on the test split and its capture conditions, and log it all."""
    classes = list(cfg.data.classes)
    reports = Path(cfg.evaluate.reports_dir)
    # the graph the served model runs is the one scored: same predictions, ~2x faster
    forward = served_forward(model, exported, cfg.train.threads, x[:32])
    probs = predict_proba(forward, x, cfg.evaluate.batch_size, cfg.evaluate.tta_flip)
    y_pred = probs.argmax(axis=1)
    metrics, report = score(y, y_pred, classes)
    paths = write_reports(reports, metrics, report, y, y_pred, classes)
    # The capture conditions are variants of the same test images, read in this same single pass.
    robust = robustness.evaluate_conditions(forward, x, y, cfg, clean_pred=y_pred)
    robust_paths = robustness.write_reports(robust, reports)

    tracking.setup(cfg)
    run_id = json.loads((reports / "train_run.json").read_text())["mlflow_run_id"]
    with mlflow.start_run(run_id=run_id):
        tracking.log_dataset(cfg, "test", "evaluation")
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items()})
        for path in paths:
            mlflow.log_artifact(str(path), artifact_path="evaluation")
        robustness.log_to_mlflow(robust, robust_paths)
        curves = reports / "plots" / "training_curves.csv"
        if curves.exists():
            mlflow.log_artifact(str(curves), artifact_path="evaluation")
        model_uri = log_model(model, cfg, x[:2], exported)
    write_json(
        reports / "evaluation.json",
        {"mlflow_run_id": run_id, "model_uri": model_uri, "test_images": len(y)},
    )
    print(
        f"evaluate: test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
        f"on {len(y)} images; model {model_uri}"
    )
    if robust["conditions"]:
        print(
            f"evaluate: worst capture condition {robust['worst_condition']} accuracy "
            f"{robust['worst_accuracy']:.4f}, mean drop {robust['mean_drop']:.4f} over "
            f"{len(robust['conditions'])} conditions"
        )
    return metrics
