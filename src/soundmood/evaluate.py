"""evaluate stage: the one place the test split is read. Exports models/model.keras to the ONNX
graph the served model runs, scores that graph (after checking it predicts what the .keras
does): accuracy, calibration before and after the temperature train folded into the head, the
confident answers at the threshold in force, size and latency. Writes the reports DVC shows
(metrics.json, classification_report.json, plots/confusion.csv, plots/reliability.csv,
plots/selective.csv) and logs test metrics, the plots and the model to the pipeline's MLflow
run."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import matplotlib
import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
)

from soundmood import calibration, external, robustness, serving, tracking
from soundmood.calibration import Reliability, Selective
from soundmood.conditions import CLEAN, check_config
from soundmood.data.prepare import load_split
from soundmood.export import ONNX_FILE, export_served, served_forward
from soundmood.fileio import atomic_path, write_json, write_text
from soundmood.forward import Forward, tta_probabilities
from soundmood.models import MODEL_FILE

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # after the backend is chosen

LATENCY_REQUESTS = 30  # single-face requests timed for latency_ms (after LATENCY_WARMUP)
LATENCY_WARMUP = 3
SELECTIVE_POINTS = 50  # points kept per selective-accuracy curve in plots/selective.csv
RELIABILITY_CSV = "plots/reliability.csv"
RELIABILITY_PNG = "plots/reliability.png"
SELECTIVE_CSV = "plots/selective.csv"
SELECTIVE_PNG = "plots/selective.png"


def predict_proba(
    model: keras.Model | Forward, x: np.ndarray, batch_size: int, tta_flip: bool
) -> np.ndarray:
    """Class probabilities of a Keras model or a Forward (the served ONNX graph); with
    `tta_flip` averaged with those of the mirrored faces."""
    forward = model.predict_on_batch if isinstance(model, keras.Model) else model
    return tta_probabilities(forward, x, batch_size, tta_flip)


def served_views(
    forward: Forward, x: np.ndarray, batch_size: int, tta_flip: bool
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The served probabilities of `x` (exactly predict_proba's: the same tta_probabilities
    call) and, from that same single pass, the per-view probabilities they average (the faces,
    then their mirrors with `tta_flip`), which calibration needs to undo the temperature."""
    outputs: list[np.ndarray] = []

    def recorded(batch: np.ndarray) -> np.ndarray:
        out = forward(batch)
        outputs.append(out)
        return out

    probs = tta_probabilities(recorded, x, batch_size, tta_flip)
    if not tta_flip:
        return probs, [np.concatenate(outputs)]
    # each call held a chunk of faces followed by their mirrors (tta_probabilities)
    halves = [np.split(out, 2) for out in outputs]
    return probs, [np.concatenate([h[view] for h in halves]) for view in (0, 1)]


def untempered(views: list[np.ndarray], temperature: float) -> np.ndarray:
    """The view-averaged probabilities the served graph gave before train folded `temperature`
    into its head: each view's log-probabilities times T, softmax, then the flip average."""
    return np.mean([calibration.tempered(v, 1.0 / temperature) for v in views], axis=0)


def threshold_in_force(cfg: DictConfig, train_run: dict) -> tuple[float, str]:
    """The top-probability threshold of the confident answers and where it comes from:
    inference.min_confidence when set, else the one train chose on validation
    (train_run.json), else 0.0 (a model trained before thresholds existed: every face counts)."""
    override = cfg.get("inference", {}).get("min_confidence")
    if override is not None:
        return float(override), "inference.min_confidence"
    if train_run.get("min_confidence") is not None:
        return float(train_run["min_confidence"]), "train_run.json (chosen on validation)"
    return 0.0, "none in train_run.json: 0.0, every face counts as confident"


@dataclass(frozen=True)
class Trust:
    """Calibration and the confident answers on test, for metrics.json and the plots."""

    before: Reliability  # the served forward pass with the temperature undone
    after: Reliability  # the served probabilities
    metrics: dict[str, float | None]


def trust(
    probs: np.ndarray,
    views: list[np.ndarray],
    y: np.ndarray,
    n_classes: int,
    temperature: float,
    min_confidence: float,
) -> Trust:
    """ece, nll, brier of the served probabilities, the same *_before_temperature, and
    confident_coverage / confident_accuracy at `min_confidence` (accuracy None when no face
    reaches it)."""
    before_probs = untempered(views, temperature)
    after = calibration.calibration_scores(probs, y, n_classes)
    before = calibration.calibration_scores(before_probs, y, n_classes)
    coverage, accuracy = calibration.selective_curve(probs, y).at(min_confidence)
    metrics: dict[str, float | None] = {
        **{k: round(v, 4) for k, v in after.items()},
        **{f"{k}_before_temperature": round(v, 4) for k, v in before.items()},
        "min_confidence": float(min_confidence),
        "confident_coverage": round(coverage, 4),
        "confident_accuracy": None if math.isnan(accuracy) else round(accuracy, 4),
    }
    return Trust(
        calibration.reliability(before_probs, y),
        calibration.reliability(probs, y),
        metrics,
    )


def latency_ms(forward: Forward, faces: np.ndarray, tta_flip: bool) -> float:
    """p50 milliseconds of a single-face request through the served forward pass (flip TTA
    included), over LATENCY_REQUESTS faces after LATENCY_WARMUP untimed ones."""
    times = []
    for i in range(LATENCY_WARMUP + LATENCY_REQUESTS):
        face = faces[i % len(faces)][None]
        start = time.perf_counter()
        tta_probabilities(forward, face, 1, tta_flip)
        if i >= LATENCY_WARMUP:
            times.append(time.perf_counter() - start)
    return round(1000.0 * float(np.median(times)), 2)


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


def thinned(curve: Selective, points: int = SELECTIVE_POINTS) -> np.ndarray:
    """Indices of about `points` of the curve's points, evenly spread in coverage (the last,
    every face kept, always among them): a plot needs no more than that."""
    grid = np.linspace(0.0, 1.0, points + 1)[1:]
    last = len(curve.coverage) - 1
    picked = np.searchsorted(curve.coverage, grid - 1e-12, side="left")
    return np.unique(np.minimum(np.r_[picked, last], last)) if last >= 0 else np.array([], int)


def write_trust_reports(
    reports: Path, found: Trust, temperature: float, curves: dict[str, Selective]
) -> list[Path]:
    """plots/reliability.{csv,png} and plots/selective.{csv,png}. The reliability CSV holds the
    served (after temperature) bins with `calibrated`, the perfect diagonal, as a second line for
    DVC; the PNG shows the bins before and after. The selective CSV has `condition` (clean
    first), coverage, accuracy and threshold, thinned to SELECTIVE_POINTS per curve."""
    paths = [reports / name for name in (RELIABILITY_CSV, RELIABILITY_PNG)]
    paths += [reports / name for name in (SELECTIVE_CSV, SELECTIVE_PNG)]
    rows = found.after.rows()
    columns = ["bin_low", "bin_high", "count", "confidence", "accuracy"]
    lines = [",".join([*columns, "calibrated"])]
    lines += [",".join([*(str(r[c]) for c in columns), str(r["confidence"])]) for r in rows]
    write_text(paths[0], "\n".join(lines) + "\n")
    reliability_png(found, temperature, paths[1])
    lines = ["condition,coverage,accuracy,threshold"]
    for name, curve in curves.items():
        lines += [
            f"{name},{curve.coverage[i]:.4f},{curve.accuracy[i]:.4f},{curve.thresholds[i]:.6f}"
            for i in thinned(curve)
        ]
    write_text(paths[2], "\n".join(lines) + "\n")
    selective_png(curves, float(found.metrics["min_confidence"]), paths[3])
    return paths


def reliability_png(found: Trust, temperature: float, out: Path) -> None:
    """Accuracy per confidence bin against the diagonal, before and after the temperature."""
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    before_label = f"before temperature (T={temperature:.3g}): ECE {found.before.ece:.3f}"
    after_label = f"served, after temperature: ECE {found.after.ece:.3f}"
    for shift, diagram, label, color in (
        (0.0, found.before, before_label, "tab:orange"),
        (0.5, found.after, after_label, "tab:blue"),
    ):
        width = np.diff(diagram.edges) / 2
        filled = diagram.counts > 0
        left = diagram.edges[:-1] + shift * 2 * width
        ax.bar(
            left[filled],
            diagram.accuracy[filled],
            width[filled],
            align="edge",
            color=color,
            alpha=0.8,
            edgecolor="white",
            label=label,
        )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfectly calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Test reliability")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    _save_png(fig, out)


def selective_png(curves: dict[str, Selective], min_confidence: float, out: Path) -> None:
    """Accuracy of the answers kept against the share kept, one line per split, the clean
    split's operating point at the threshold in force marked."""
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, curve in curves.items():
        clean = name == CLEAN
        ax.plot(
            curve.coverage,
            curve.accuracy,
            label=name,
            linewidth=2.0 if clean else 1.0,
            color="black" if clean else None,
        )
    if CLEAN in curves:
        coverage, accuracy = curves[CLEAN].at(min_confidence)
        if not math.isnan(accuracy):
            ax.plot(
                [coverage],
                [accuracy],
                "o",
                color="tab:red",
                label=f"min_confidence {min_confidence:.3g}",
            )
    ax.set_xlim(0, 1)
    ax.set_xlabel("coverage (share of faces answered)")
    ax.set_ylabel("accuracy of the answers kept")
    ax.set_title("Test selective accuracy per capture condition")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save_png(fig, out)


def _save_png(fig: Any, out: Path) -> None:
    with atomic_path(out) as partial:
        fig.savefig(partial, dpi=120, format="png")
    plt.close(fig)


def log_model(
    model: keras.Model,
    cfg: DictConfig,
    examples: np.ndarray,
    exported: Path | None = None,
    min_confidence: float | None = None,
) -> str:
    """Log the served model (soundmood.serving: encoded images in, class probabilities out) and
    return its models:/ URI. `exported`: a folder export_served wrote (None: export here).
    `min_confidence`: the threshold its `confident` column applies (None: serving's default)."""
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
            min_confidence=min_confidence,
        )
    return info.model_uri


def run(cfg: DictConfig) -> dict:
    """The `evaluate` stage."""
    check_config(cfg)  # a bad condition or external set fails before the model is even loaded
    external.configured(cfg)
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
    train_run = json.loads((reports / "train_run.json").read_text())
    temperature = float(train_run.get("temperature", 1.0))  # 1.0: trained before calibration
    threshold, threshold_source = threshold_in_force(cfg, train_run)
    batch_size, tta_flip = cfg.evaluate.batch_size, cfg.evaluate.tta_flip
    # the graph the served model runs is the one scored: same predictions, ~2x faster
    forward = served_forward(model, exported, cfg.train.threads, x[:32])
    probs, views = served_views(forward, x, batch_size, tta_flip)  # the one pass over test
    y_pred = probs.argmax(axis=1)
    metrics, report = score(y, y_pred, classes)
    found = trust(probs, views, y, len(classes), temperature, threshold)
    metrics.update(found.metrics)
    metrics["model_mb"] = round(os.path.getsize(exported / ONNX_FILE) / 2**20, 3)
    metrics["latency_ms"] = latency_ms(forward, x[:LATENCY_REQUESTS], tta_flip)
    paths = write_reports(reports, metrics, report, y, y_pred, classes)
    # The capture conditions are variants of the same test images, read in this same single pass.
    curves: dict[str, Selective] = {}
    robust = robustness.evaluate_conditions(
        forward,
        x,
        y,
        cfg,
        clean_probs=probs,
        min_confidence=threshold,
        on_predicted=lambda name, p: curves.__setitem__(name, calibration.selective_curve(p, y)),
    )
    robust_paths = robustness.write_reports(robust, reports)
    paths += write_trust_reports(reports, found, temperature, curves)
    outside, outside_path = external.run(cfg, forward)  # evaluate.external's sets

    tracking.setup(cfg)
    run_id = train_run["mlflow_run_id"]
    with mlflow.start_run(run_id=run_id):
        tracking.log_dataset(cfg, "test", "evaluation")
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items() if v is not None})
        for path in paths:
            mlflow.log_artifact(str(path), artifact_path="evaluation")
        robustness.log_to_mlflow(robust, robust_paths)
        external.log_to_mlflow(outside, outside_path)
        curves_csv = reports / "plots" / "training_curves.csv"
        if curves_csv.exists():
            mlflow.log_artifact(str(curves_csv), artifact_path="evaluation")
        model_uri = log_model(model, cfg, x[:2], exported, min_confidence=threshold)
    write_json(
        reports / "evaluation.json",
        {
            "mlflow_run_id": run_id,
            "model_uri": model_uri,
            "test_images": len(y),
            "temperature": temperature,
            "min_confidence": threshold,
            "min_confidence_source": threshold_source,
        },
    )
    print(
        f"evaluate: test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
        f"on {len(y)} images; model {model_uri}"
    )
    confident = metrics["confident_accuracy"]
    print(
        f"evaluate: ECE {metrics['ece_before_temperature']:.4f} before temperature "
        f"(T={temperature:.3g}), {metrics['ece']:.4f} served; min_confidence {threshold:.4g} "
        f"({threshold_source}) keeps {metrics['confident_coverage']:.1%} of faces at accuracy "
        + ("n/a" if confident is None else f"{confident:.4f}")
    )
    if robust["conditions"]:
        print(
            f"evaluate: worst capture condition {robust['worst_condition']} accuracy "
            f"{robust['worst_accuracy']:.4f}, mean drop {robust['mean_drop']:.4f} over "
            f"{len(robust['conditions'])} conditions"
        )
    for name, found_set in outside["sets"].items():
        print(f"evaluate: external set {name}: {external.summary(found_set)}")
    return metrics
