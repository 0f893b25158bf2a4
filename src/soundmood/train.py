"""train stage: fit the configured model on train (soundmood.fitting), pick the epoch on
validation, fold the logit adjustment and temperature chosen on validation into its head, score
the validation capture conditions and save models/model.keras. The test split is never read here.
"""

from __future__ import annotations

import json
import resource
import shutil
import tempfile
from pathlib import Path

import keras
import mlflow
import numpy as np
import yaml
from omegaconf import DictConfig

from soundmood import logit_adjustment, robustness, temperature, tracking
from soundmood.config import validate, with_values
from soundmood.data.prepare import load_index, load_split
from soundmood.errors import ConfigError
from soundmood.export import served_forward
from soundmood.fileio import atomic_path, write_json
from soundmood.fitting import WORK_DIR, FitResult, fit
from soundmood.forward import Forward, tta_probabilities
from soundmood.logit_adjustment import view_logits
from soundmood.models import MODEL_FILE
from soundmood.training_checkpoint import config_digest


def apply_tuned(cfg: DictConfig) -> tuple[DictConfig, dict[str, object]]:
    """Overlay reports/best_params.yaml (dotted keys from the tune stage) when train.use_tuned."""
    path = Path(cfg.tune.best_params_path)
    if not (cfg.train.use_tuned and path.exists()):
        return cfg, {}
    tuned = yaml.safe_load(path.read_text()) or {}
    try:
        cfg = with_values(cfg, tuned, where=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{exc} (stale? rerun the tune stage)") from exc
    try:
        validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path}: the tuned values make an invalid config: {exc}") from exc
    return cfg, tuned


VAL_ROBUSTNESS_FILE = "robustness_val.json"


def score_validation_conditions(
    model: keras.Model | Forward,
    val: tuple[np.ndarray, np.ndarray],
    cfg: DictConfig,
    reports: Path,
    clean_probs: np.ndarray | None = None,
    min_confidence: float | None = None,
) -> dict:
    """evaluate's capture conditions on the validation split, for the kept model: what
    augmentation and tuning choices are compared on (reports/robustness_val.json, MLflow
    val_robust_*), so that no choice reads the test split. With no conditions configured the
    file still holds the clean validation scores: dvc.yaml declares it as train's output.
    `clean_probs` (the served validation probabilities) saves the clean prediction pass; with
    `min_confidence` every split gains the confident answers' coverage and accuracy."""
    result = robustness.evaluate_conditions(
        model, *val, cfg, clean_probs=clean_probs, min_confidence=min_confidence
    )
    robustness.write_json(result, reports / VAL_ROBUSTNESS_FILE)
    mlflow.log_metrics(robustness.mlflow_metrics(result, prefix="val_robust_"))
    return result


def adjust_and_score_validation(
    model: keras.Model,
    train_labels: np.ndarray,
    val: tuple[np.ndarray, np.ndarray],
    cfg: DictConfig,
) -> tuple[logit_adjustment.Adjustment | None, temperature.Calibration, dict]:
    """Logit adjustment, then the temperature (both folded into `model`'s head), the confidence
    threshold and the validation capture conditions, predicted by `model`'s ONNX graph, as
    evaluate predicts: about twice Keras' speed on 2 cores."""

    threads, check_faces = int(cfg.train.threads), val[0][:32]
    batch, flip, reports = cfg.evaluate.batch_size, cfg.evaluate.tta_flip, cfg.evaluate.reports_dir
    with tempfile.TemporaryDirectory(prefix="soundmood-train-") as tmp:
        forward = served_forward(model, Path(tmp), threads, check_faces)
        adjustment = logit_adjustment.adjust(model, forward, train_labels, val, cfg)
        views = adjustment.logits if adjustment else view_logits(forward, val[0], batch, flip)
        fitted = temperature.fit_and_fold(model, views, val[1], cfg)
        if fitted is not None or (adjustment and adjustment.tau):  # the graph predates the fold
            forward = served_forward(model, Path(tmp), threads, check_faces)
        served = tta_probabilities(forward, val[0], batch, flip)
        calibrated = temperature.assess(views, fitted, served, val[1], cfg)
        conditions = score_validation_conditions(
            forward, val, cfg, Path(reports), served, calibrated.min_confidence
        )
        return adjustment, calibrated, conditions


def run(cfg: DictConfig) -> FitResult:
    """The `train` stage."""
    cfg, tuned = apply_tuned(cfg)
    reports = Path(cfg.evaluate.reports_dir)
    index = load_index(cfg.data.prepared_dir)
    train = load_split(cfg.data.prepared_dir, "train")
    val = load_split(cfg.data.prepared_dir, "val")
    tracking.setup(cfg)
    tune_report = reports / "tune.json"
    tune_run = (
        json.loads(tune_report.read_text()).get("mlflow_run_id") if tune_report.exists() else None
    )
    with mlflow.start_run(run_name=f"{cfg.model.name}-{cfg.get('profile', '')}") as active:
        mlflow.set_tags(tracking.run_tags(cfg, "train"))
        if tune_run:
            mlflow.set_tag("soundmood.tune_run_id", tune_run)
        tracking.log_config(cfg)
        if tuned:
            mlflow.log_params({f"tuned.{k}": str(v) for k, v in tuned.items()})
            print("train: tuned values applied: " + ", ".join(f"{k}={v}" for k, v in tuned.items()))
        tracking.log_dataset(cfg, "train", "training")
        mlflow.log_dict(index["counts"], "data/split_counts.json")
        work = WORK_DIR / f"train-{config_digest(cfg)}-{index['data_version'][:8]}"
        result = fit(cfg, train, val, work, csv_log=reports / "plots" / "training_curves.csv")
        mlflow.log_metrics(
            {
                f"best_{cfg.train.monitor}": result.best_value,
                "best_epoch": result.best_epoch,
                "train_seconds": result.seconds,
                "train_images_per_second": result.images_per_second,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
        adjustment, calibrated, val_robust = adjust_and_score_validation(
            result.model, train[1], val, cfg
        )
        adjusted = (
            {
                "logit_adjustment_tau": adjustment.tau,
                f"val_adjusted_{cfg.train.logit_adjustment.objective}": adjustment.value,
            }
            if adjustment is not None
            else {}
        )
        mlflow.log_metrics({**adjusted, **calibrated.metrics()})
        # a killed run leaves the previous model or the new one, never half of one
        with atomic_path(Path(cfg.train.model_dir) / MODEL_FILE) as partial:
            result.model.save(partial)
        run_id = active.info.run_id
    shutil.rmtree(work, ignore_errors=True)
    summary = {
        "best_epoch": result.best_epoch,
        f"best_{cfg.train.monitor}": round(result.best_value, 4),
        "epochs_run": len(result.history),
        "train_seconds": round(result.seconds, 1),
        "train_images_per_second": round(result.images_per_second, 1),
        "parameters": int(result.model.count_params()),
        **{k: round(v, 4) for k, v in adjusted.items()},
        **calibrated.report(),
    }
    write_json(reports / "train.json", summary)
    served = {"temperature": calibrated.temperature, "min_confidence": calibrated.min_confidence}
    write_json(
        reports / "train_run.json", {"mlflow_run_id": run_id, "tuned": tuned, **served}, default=str
    )
    if adjustment is not None:
        print(
            f"train: logit adjustment tau {adjustment.tau:g} chosen on validation "
            f"({cfg.train.logit_adjustment.objective} {adjustment.gain:+.4f} against tau 0; "
            + ", ".join(f"{t:g}: {v:.4f}" for t, v in adjustment.scores.items())
            + ")"
        )
    print(calibrated.summary())
    if val_robust["conditions"]:
        print(
            f"train: validation capture conditions: worst {val_robust['worst_condition']} "
            f"{val_robust['worst_accuracy']:.4f} (clean {val_robust['clean']['accuracy']:.4f}), "
            f"mean drop {val_robust['mean_drop']:.4f}"
        )
    print(
        # 1-based, like the epoch lines above it (train.json keeps the 0-based history index).
        f"train: best epoch {result.best_epoch + 1} of {len(result.history)} "
        f"{cfg.train.monitor}={result.best_value:.4f} "
        f"in {result.seconds:.0f}s ({result.images_per_second:.0f} img/s); run {run_id}"
    )
    return result
