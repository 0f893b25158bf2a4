"""train stage: fit the configured model on train, pick the epoch on validation, save models/model.keras.

Pretrained models first train their head with the backbone frozen (`train.warmup_epochs`), then
fine-tune. The epoch kept is the best on `train.monitor` over the validation split; the test split
is never read here.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
import yaml
from omegaconf import DictConfig, OmegaConf

from soundmood import tracking
from soundmood.data.prepare import load_index, load_split
from soundmood.models import backbone_of, build, set_backbone_trainable

WORK_DIR = Path(".work")
MODEL_FILE = "model.keras"


def configure_tensorflow(threads: int, seed: int) -> None:
    """Pin thread pools (2-core machines thrash with TF's defaults) and seed every RNG."""
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # already initialised in this process (tests, tuning)
            pass
    keras.utils.set_random_seed(seed)


def augmentation(aug: DictConfig, seed: int) -> keras.Sequential:
    """Random, label-preserving transforms as Keras preprocessing layers (train batches only)."""
    steps: list[keras.layers.Layer] = []
    if aug.flip:
        steps.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if aug.rotation:
        steps.append(keras.layers.RandomRotation(aug.rotation, fill_mode="reflect", seed=seed))
    if aug.zoom:
        steps.append(keras.layers.RandomZoom(aug.zoom, fill_mode="reflect", seed=seed))
    if aug.translation:
        steps.append(keras.layers.RandomTranslation(
            aug.translation, aug.translation, fill_mode="reflect", seed=seed))
    if aug.contrast:
        steps.append(keras.layers.RandomContrast(aug.contrast, value_range=(0, 255), seed=seed))
    if aug.brightness:
        steps.append(keras.layers.RandomBrightness(aug.brightness, value_range=(0, 255), seed=seed))
    return keras.Sequential(steps, name="augment")


def make_dataset(
    x: np.ndarray, y: np.ndarray, n_classes: int, batch_size: int,
    augment: keras.Sequential | None = None, seed: int = 0,
) -> tf.data.Dataset:
    """Batches of (uint8 images, one-hot labels); shuffled and augmented when `augment` is given."""
    ds = tf.data.Dataset.from_tensor_slices((x, keras.utils.to_categorical(y, n_classes)))
    if augment is not None:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        def apply(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            out = augment(tf.cast(images, tf.float32), training=True)
            return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8), labels

        ds = ds.map(apply, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def class_weights(y: np.ndarray, n_classes: int, mode: str) -> dict[int, float] | None:
    """'balanced' weighs each class by n / (k * count): angry (the rarest) counts ~4x happy."""
    if mode == "none":
        return None
    counts = np.bincount(y, minlength=n_classes).astype(float)
    return {k: float(len(y) / (n_classes * max(c, 1.0))) for k, c in enumerate(counts)}


def make_optimizer(train: DictConfig, decay_steps: int) -> keras.optimizers.Optimizer:
    lr: float | keras.optimizers.schedules.LearningRateSchedule = train.lr
    if train.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(train.lr, max(decay_steps, 1), alpha=0.01)
    if train.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=train.weight_decay)
    if train.optimizer == "adam":
        return keras.optimizers.Adam(lr)
    return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True)


def compile_model(model: keras.Model, train: DictConfig, n_classes: int, decay_steps: int) -> None:
    model.compile(
        optimizer=make_optimizer(train, decay_steps),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=train.label_smoothing),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.F1Score(average="macro", name="macro_f1"),
        ],
    )


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the optimizer's current learning rate to the epoch logs as `lr`."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class MlflowEpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics (loss, accuracy, macro_f1, val_*, lr) to the active MLflow run."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs and mlflow.active_run():
            mlflow.log_metrics({k: float(v) for k, v in logs.items()}, step=epoch)


@dataclass
class FitResult:
    model: keras.Model
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_value: float = float("nan")
    seconds: float = 0.0
    images_seen: int = 0

    @property
    def images_per_second(self) -> float:
        return self.images_seen / self.seconds if self.seconds else 0.0


def monitor_mode(monitor: str) -> str:
    return "min" if monitor.endswith("loss") else "max"


def fit(
    cfg: DictConfig,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    work_dir: Path,
    extra_callbacks: list[keras.callbacks.Callback] | None = None,
    epochs: int | None = None,
    csv_log: Path | None = None,
    verbose: int = 2,
) -> FitResult:
    """Build and train the configured model; returns it with the best validation epoch's weights."""
    t, m = cfg.train, cfg.model
    n_classes, epochs = len(cfg.data.classes), epochs or t.epochs
    configure_tensorflow(t.threads, cfg.seed)
    model = build(m, cfg.data.image_size, n_classes)
    train_ds = make_dataset(*train, n_classes, t.batch_size, augmentation(t.augment, cfg.seed),
                            cfg.seed)
    val_ds = make_dataset(*val, n_classes, t.batch_size)
    steps = int(np.ceil(len(train[0]) / t.batch_size))
    work_dir.mkdir(parents=True, exist_ok=True)
    best_path = work_dir / "best.weights.h5"
    mode = monitor_mode(t.monitor)
    checkpoint = keras.callbacks.ModelCheckpoint(
        best_path, monitor=t.monitor, mode=mode, save_best_only=True, save_weights_only=True)
    callbacks = [LearningRateLogger(), checkpoint, keras.callbacks.TerminateOnNaN(),
                 MlflowEpochLogger()]
    if csv_log:
        csv_log.parent.mkdir(parents=True, exist_ok=True)
        csv_log.unlink(missing_ok=True)
        callbacks.append(keras.callbacks.CSVLogger(csv_log, append=True))
    callbacks += extra_callbacks or []
    weights = class_weights(train[1], n_classes, t.class_weight)
    history: list[dict[str, float]] = []
    start = time.perf_counter()

    warmup = min(t.warmup_epochs, epochs - 1) if backbone_of(model) is not None else 0
    if warmup > 0:
        set_backbone_trainable(model, False)
        compile_model(model, OmegaConf.merge(t, {"schedule": "constant"}), n_classes, steps)
        h = model.fit(train_ds, validation_data=val_ds, epochs=warmup, class_weight=weights,
                      callbacks=callbacks, verbose=verbose)
        history += _rows(h)
    if not getattr(model, "stop_training", False):  # set only once fit() ran
        set_backbone_trainable(model, True, m.get("frozen_layers", 0))
        compile_model(model, t, n_classes, steps * (epochs - warmup))
        stopper = keras.callbacks.EarlyStopping(
            monitor=t.monitor, mode=mode, patience=t.early_stopping_patience)
        resume = keras.callbacks.BackupAndRestore(work_dir / "backup")
        h = model.fit(train_ds, validation_data=val_ds, epochs=epochs, initial_epoch=warmup,
                      class_weight=weights, callbacks=[*callbacks, stopper, resume],
                      verbose=verbose)
        history += _rows(h)
    seconds = time.perf_counter() - start
    if best_path.exists():
        model.load_weights(best_path)
    values = [row.get(t.monitor, float("nan")) for row in history]
    best = int(np.nanargmax(values) if mode == "max" else np.nanargmin(values)) if history else -1
    return FitResult(model, history, best, values[best] if history else float("nan"), seconds,
                     len(train[0]) * len(history))


def _rows(history: keras.callbacks.History) -> list[dict[str, float]]:
    keys = list(history.history)
    n = len(history.history[keys[0]]) if keys else 0
    return [{k: float(history.history[k][i]) for k in keys} for i in range(n)]


def apply_tuned(cfg: DictConfig) -> tuple[DictConfig, dict[str, object]]:
    """Overlay reports/best_params.yaml (dotted keys from the tune stage) when train.use_tuned."""
    path = Path(cfg.tune.best_params_path)
    if not (cfg.train.use_tuned and path.exists()):
        return cfg, {}
    tuned = yaml.safe_load(path.read_text()) or {}
    cfg = cfg.copy()
    for key, value in tuned.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg, tuned


def config_digest(cfg: DictConfig) -> str:
    blob = json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def save_model_atomically(model: keras.Model, target: Path) -> None:
    """Write to a temporary file and rename, so a killed run never leaves half a model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".partial-{os.getpid()}-{target.name}")
    model.save(partial)
    os.replace(partial, target)


def run(cfg: DictConfig) -> FitResult:
    """The `train` stage."""
    cfg, tuned = apply_tuned(cfg)
    reports = Path(cfg.evaluate.reports_dir)
    index = load_index(cfg.data.prepared_dir)
    train, val = load_split(cfg.data.prepared_dir, "train"), load_split(cfg.data.prepared_dir, "val")
    tracking.setup(cfg)
    tune_report = reports / "tune.json"
    tune_run = json.loads(tune_report.read_text()).get("mlflow_run_id") if tune_report.exists() else None
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
        mlflow.log_metrics({
            f"best_{cfg.train.monitor}": result.best_value,
            "best_epoch": result.best_epoch,
            "train_seconds": result.seconds,
            "train_images_per_second": result.images_per_second,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        })
        save_model_atomically(result.model, Path(cfg.train.model_dir) / MODEL_FILE)
        run_id = active.info.run_id
    shutil.rmtree(work, ignore_errors=True)
    summary = {
        "best_epoch": result.best_epoch,
        f"best_{cfg.train.monitor}": round(result.best_value, 4),
        "epochs_run": len(result.history),
        "train_seconds": round(result.seconds, 1),
        "train_images_per_second": round(result.images_per_second, 1),
        "parameters": int(result.model.count_params()),
    }
    (reports / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    (reports / "train_run.json").write_text(json.dumps(
        {"mlflow_run_id": run_id, "tuned": tuned}, indent=2, default=str) + "\n")
    print(f"train: best epoch {result.best_epoch} {cfg.train.monitor}={result.best_value:.4f} "
          f"in {result.seconds:.0f}s ({result.images_per_second:.0f} img/s); run {run_id}")
    return result
