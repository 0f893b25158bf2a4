"""Fitting a model: TensorFlow set-up, the tf.data pipeline, class weights, the optimizer and the
two-phase fit loop: pretrained models first train their head with the backbone frozen
(`train.warmup_epochs`), then fine-tune. The epoch kept is the best on `train.monitor` over the
validation split; a killed fit resumes from its checkpoint (soundmood.training_checkpoint).

Keras' ModelCheckpoint keeps the best epoch's weights and EarlyStopping counts patience, but
model.fit runs one epoch per call here: each epoch's data order and augmentation are seeded by
(seed, epoch), so that a resumed epoch sees the batches it would have seen, and one model.fit over
every epoch cannot reseed its dataset between epochs. EpochRelay keeps those callbacks alive
across the calls.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from soundmood.augmentation import Mix, augmentation, mixing
from soundmood.fileio import write_text
from soundmood.models import backbone_of, build, set_backbone_trainable
from soundmood.training_checkpoint import TrainingCheckpoint, training_fingerprint

# Training checkpoints, one folder per config and data version (tests point it elsewhere).
WORK_DIR = Path(os.environ.get("SOUNDMOOD_WORK_DIR", ".work"))


def configure_tensorflow(threads: int, seed: int) -> None:
    """Pin thread pools (2-core machines thrash with TF's defaults) and seed every RNG."""
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # already initialised in this process (tests, tuning)
            pass
    keras.utils.set_random_seed(seed)


def distribution_strategy() -> tf.distribute.Strategy | None:
    """MirroredStrategy over every visible GPU when there are several (the gpu profile on a
    multi-GPU machine: each batch is split across them and the gradients summed); None with one
    GPU or none, where TensorFlow's default strategy is used as before."""
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) < 2:
        return None
    strategy = tf.distribute.MirroredStrategy()
    print(f"train: MirroredStrategy over {strategy.num_replicas_in_sync} GPUs", flush=True)
    return strategy


def make_dataset(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    batch_size: int,
    augment: keras.Sequential | None = None,
    seed: int = 0,
    mix: Mix | None = None,
    weights: dict[int, float] | None = None,
) -> tf.data.Dataset:
    """Batches of (uint8 images, one-hot labels); shuffled and augmented when `augment` is given.
    With `mix` the labels are soft, and `weights` (class weights) come as each image's sample
    weight, its label's expected class weight: Keras' class_weight would weigh a mixed image by
    its larger class alone."""
    ds = tf.data.Dataset.from_tensor_slices((x, keras.utils.to_categorical(y, n_classes)))
    if augment is not None:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment is not None or mix is not None:
        per_class = None if weights is None else tf.constant([weights[k] for k in range(n_classes)])

        def apply(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, ...]:
            out = tf.cast(images, tf.float32)
            if augment is not None:
                out = augment(out, training=True)
            if mix is not None:
                out, labels = mix(out, labels)
            out = tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
            if per_class is None:
                return out, labels
            return out, labels, tf.linalg.matvec(tf.cast(labels, tf.float32), per_class)

        ds = ds.map(apply, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def class_weights(y: np.ndarray, n_classes: int, mode: str) -> dict[int, float] | None:
    """Per-class loss weights, averaging 1 over the images. 'balanced' weighs each class by
    n / (k * count): in the train split angry (the rarest) counts ~6.8x happy. 'sqrt' weighs by
    1 / sqrt(count), half that correction in log space (~2.6x): enough to keep the rare classes'
    recall, while the commonest ones are discounted less."""
    if mode == "none":
        return None
    counts = np.maximum(np.bincount(y, minlength=n_classes).astype(float), 1.0)
    raw = 1.0 / np.sqrt(counts) if mode == "sqrt" else 1.0 / counts
    weights = raw * len(y) / float(np.sum(raw * counts))  # sum over images = n: mean weight 1
    return {k: float(w) for k, w in enumerate(weights)}


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
    """Adds the optimizer's current learning rate to the epoch logs as `lr` (Keras logs it only
    from ReduceLROnPlateau)."""

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
    """Build and train the configured model; returns it with the best validation epoch's weights.

    After each epoch the whole training state (weights, optimizer slots, dropout RNG, history,
    best epoch, early-stopping count) is checkpointed in `work_dir`, so a killed run called again
    with the same config and data resumes after its last finished epoch (a finished warm-up is not
    redone). With train.deterministic the resumed run is bit-identical to an uninterrupted one;
    without it, as close as two uninterrupted runs are to each other.
    """
    t, m = cfg.train, cfg.model
    n_classes, epochs = len(cfg.data.classes), epochs or t.epochs
    configure_tensorflow(t.threads, cfg.seed)
    if t.get("deterministic", False):
        tf.config.experimental.enable_op_determinism()
    strategy = distribution_strategy()
    # variables (model, optimizer slots) are created inside the strategy's scope when there is one
    scope = strategy.scope if strategy is not None else contextlib.nullcontext
    with scope():
        model = build(m, cfg.data.image_size, n_classes)
    warmup = min(t.warmup_epochs, epochs - 1) if backbone_of(model) is not None else 0
    steps = int(np.ceil(len(train[1]) / t.batch_size))
    mode = monitor_mode(t.monitor)
    store = TrainingCheckpoint(work_dir)
    progress = store.resume(training_fingerprint(cfg, train, val, epochs), model, epochs, warmup)
    val_ds = make_dataset(*val, n_classes, cfg.evaluate.batch_size)  # predict-only: small is fast
    weights = class_weights(train[1], n_classes, t.class_weight)
    best = keras.callbacks.ModelCheckpoint(
        str(work_dir / store.BEST),
        monitor=t.monitor,
        mode=mode,
        save_best_only=True,
        save_weights_only=True,
        initial_value_threshold=progress.best_value,  # a resumed run's best so far
    )
    patience = keras.callbacks.EarlyStopping(
        t.monitor, patience=t.early_stopping_patience, mode=mode, start_from_epoch=warmup
    )
    relay = EpochRelay(
        [
            LearningRateLogger(),
            keras.callbacks.TerminateOnNaN(),
            best,
            patience,
            MlflowEpochLogger(),
            *(extra_callbacks or []),
        ]
    )
    relay.set_model(model)
    relay.inner.on_train_begin()
    patience.best, patience.wait = progress.patience_best, progress.patience_wait  # after reset
    phase = ""
    for epoch in range(progress.next_epoch, epochs):
        if progress.stopped:
            break
        if _phase(epoch, warmup) != phase:
            phase = _phase(epoch, warmup)
            with scope():
                _enter_phase(model, cfg, phase, n_classes, steps, epochs - warmup)
                store.restore_optimizer(model, phase)
        start = time.perf_counter()
        epoch_seed = cfg.seed * 1000 + epoch
        augment, mix = augmentation(t.augment, epoch_seed), mixing(t.augment, epoch_seed)
        # mixed labels carry their class weights as sample weights (make_dataset)
        mixed_weights = weights if mix is not None else None
        train_ds = make_dataset(
            *train, n_classes, t.batch_size, augment, epoch_seed, mix, mixed_weights
        )
        best_before = best.best
        model.fit(
            train_ds,
            validation_data=val_ds,
            initial_epoch=epoch,
            epochs=epoch + 1,
            class_weight=None if mix is not None else weights,
            callbacks=[relay],
            shuffle=False,  # shuffled above
            verbose=1 if verbose == 1 else 0,
        )
        seconds = time.perf_counter() - start
        progress.history.append(relay.logs)
        progress.next_epoch, progress.seconds = epoch + 1, progress.seconds + seconds
        if best.best is not best_before:  # ModelCheckpoint saved this epoch as the best
            progress.best_epoch, progress.best_value = epoch, float(best.best)
        progress.patience_best = None if patience.best is None else float(patience.best)
        progress.patience_wait = int(patience.wait)
        progress.stopped = progress.stopped or bool(getattr(model, "stop_training", False))
        store.save(progress, model, phase)
        if csv_log:
            write_curves(csv_log, progress.history)
        if verbose:
            print(
                f"epoch {epoch + 1}/{epochs} ({phase}) {seconds:.0f}s "
                + " ".join(f"{k}={v:.4f}" for k, v in sorted(relay.logs.items())),
                flush=True,
            )
    relay.inner.on_train_end()
    store.load_best(model, progress)
    history = progress.history
    best_value = (
        history[progress.best_epoch].get(t.monitor, float("nan"))
        if progress.best_epoch >= 0
        else float("nan")
    )
    return FitResult(
        model,
        history,
        progress.best_epoch,
        best_value,
        progress.seconds,
        len(train[1]) * len(history),
    )


WARMUP, FINETUNE = "warm-up", "fine-tune"


def _phase(epoch: int, warmup: int) -> str:
    return WARMUP if epoch < warmup else FINETUNE


def _enter_phase(
    model: keras.Model,
    cfg: DictConfig,
    phase: str,
    n_classes: int,
    steps: int,
    finetune_epochs: int,
) -> None:
    """Freeze or unfreeze the backbone and compile a fresh optimizer for the phase."""
    t = cfg.train
    if phase == WARMUP:
        set_backbone_trainable(model, False)
        compile_model(model, OmegaConf.merge(t, {"schedule": "constant"}), n_classes, steps)
    else:
        set_backbone_trainable(model, True, cfg.model.get("frozen_layers", 0))
        compile_model(model, t, n_classes, steps * finetune_epochs)


class EpochRelay(keras.callbacks.Callback):
    """Passes each per-epoch model.fit call's events on to callbacks that live for the whole
    training: they see on_train_begin/end once, and their state survives between epochs."""

    def __init__(self, callbacks: list[keras.callbacks.Callback]) -> None:
        super().__init__()
        self.inner = keras.callbacks.CallbackList(callbacks)
        self.logs: dict[str, float] = {}

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        self.inner.set_model(model)

    def set_params(self, params: dict) -> None:
        super().set_params(params)
        self.inner.set_params(params)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.inner.on_epoch_begin(epoch, logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        # one dict through every callback (CallbackList would hand them a copy), so that what
        # one adds (LearningRateLogger's lr) reaches the others and the history
        self.logs = {k: float(v) for k, v in (logs or {}).items()}
        for callback in self.inner.callbacks:
            callback.on_epoch_end(epoch, self.logs)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.inner.on_train_batch_begin(batch, logs)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.inner.on_train_batch_end(batch, logs)


def write_curves(path: Path, history: list[dict[str, float]]) -> None:
    """The per-epoch CSV as keras.callbacks.CSVLogger writes it, but rewritten whole from the
    checkpointed history each epoch: CSVLogger appends its row before the checkpoint is saved
    (a kill in between repeats the row) and a resumed run would lack the rows of the epochs it
    does not redo once DVC has cleared the stage's outputs."""
    keys = sorted({k for row in history for k in row})
    lines = [",".join(["epoch", *keys])]
    lines += [
        ",".join([str(i), *(repr(row.get(k, float("nan"))) for k in keys)])
        for i, row in enumerate(history)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "\n".join(lines) + "\n")
