"""Fitting a model: TensorFlow set-up, the tf.data pipeline, class weights, the optimizer, the
two-phase fit loop (head warm-up, then fine-tuning) and its resumable checkpoint.

Pretrained models first train their head with the backbone frozen (`train.warmup_epochs`), then
fine-tune. The epoch kept is the best on `train.monitor` over the validation split. With
`train.ema_fraction` the fine-tuning weights are averaged (Polyak), and validation scores, and
the model keeps, the average.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig, ListConfig, OmegaConf

from soundmood import robustness
from soundmood.fileio import write_bytes, write_text
from soundmood.models import backbone_of, build, set_backbone_trainable

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


def augmentation(aug: DictConfig, seed: int) -> keras.Sequential:
    """Random, label-preserving transforms as Keras preprocessing layers (train batches only)."""
    steps: list[keras.layers.Layer] = []
    if aug.flip:
        steps.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if aug.rotation:
        steps.append(keras.layers.RandomRotation(aug.rotation, fill_mode="reflect", seed=seed))
    if aug.zoom:
        # a [low, high] range zooms out (positive: the face smaller, as a looser crop frames it)
        # by a different amount than in; a number zooms both ways by up to it
        zoom = tuple(aug.zoom) if isinstance(aug.zoom, ListConfig | list) else aug.zoom
        steps.append(keras.layers.RandomZoom(zoom, fill_mode="reflect", seed=seed))
    if aug.translation:
        steps.append(
            keras.layers.RandomTranslation(
                aug.translation, aug.translation, fill_mode="reflect", seed=seed
            )
        )
    if aug.contrast:
        steps.append(keras.layers.RandomContrast(aug.contrast, value_range=(0, 255), seed=seed))
    if aug.brightness:
        steps.append(keras.layers.RandomBrightness(aug.brightness, value_range=(0, 255), seed=seed))
    steps += robustness.augmentation_layers(aug, seed)  # greyscale, low-res, JPEG, gamma
    return keras.Sequential(steps, name="augment")


def make_dataset(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    batch_size: int,
    augment: keras.Sequential | None = None,
    seed: int = 0,
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


def epoch_indices(y: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """Indices of the training images one epoch sees: all of them, or with `cap` a fresh seeded
    draw of `cap` images from each class that has more (the rest whole), so that across epochs
    every image stays in play."""
    if not cap:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    per_class = [np.flatnonzero(y == k) for k in np.unique(y)]
    kept = [rng.choice(idx, cap, replace=False) if len(idx) > cap else idx for idx in per_class]
    return np.sort(np.concatenate(kept))


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


def ema_momentum(ema_fraction: float | None, finetune_steps: int) -> float | None:
    """The optimizer's `ema_momentum` for a moving average whose time constant is
    `ema_fraction` of the fine-tuning steps (None or 0: no averaging). A share of the run, as
    the cosine schedule is, so that tune's short trials average as the full run does."""
    if not ema_fraction:
        return None
    return 1.0 - 1.0 / max(ema_fraction * finetune_steps, 1.0)


def make_optimizer(
    train: DictConfig, decay_steps: int, ema: float | None = None
) -> keras.optimizers.Optimizer:
    lr: float | keras.optimizers.schedules.LearningRateSchedule = train.lr
    if train.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(train.lr, max(decay_steps, 1), alpha=0.01)
    averaging = {"use_ema": True, "ema_momentum": ema} if ema is not None else {}
    if train.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=train.weight_decay, **averaging)
    if train.optimizer == "adam":
        return keras.optimizers.Adam(lr, **averaging)
    return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, **averaging)


def compile_model(
    model: keras.Model,
    train: DictConfig,
    n_classes: int,
    decay_steps: int,
    ema: float | None = None,
) -> None:
    model.compile(
        optimizer=make_optimizer(train, decay_steps, ema),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=train.label_smoothing),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.F1Score(average="macro", name="macro_f1"),
        ],
    )


def uses_ema(model: keras.Model) -> bool:
    return bool(getattr(model.optimizer, "use_ema", False))


def averaged_variables(model: keras.Model) -> list[np.ndarray]:
    """model.variables with the optimizer's moving averages in place of the trainable ones,
    swapped in and back as keras.callbacks.SwapEMAWeights does around validation."""
    swap = keras.callbacks.SwapEMAWeights()
    swap.set_model(model)
    swap.on_test_begin()
    try:
        return [v.numpy() for v in model.variables]
    finally:
        swap.on_test_end()


class EmaValidation(keras.callbacks.SwapEMAWeights):
    """Validation scores the optimizer's moving average, as SwapEMAWeights arranges. model.fit
    then ends by writing the average over the trained weights (finalize_variable_values), but
    training goes on in the next epoch's fit call: on_train_end puts the trained weights back."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        super().on_epoch_end(epoch, logs)
        self.trained = [v.numpy() for v in self.model.trainable_variables]

    def on_train_end(self, logs: dict | None = None) -> None:
        for variable, value in zip(self.model.trainable_variables, self.trained, strict=True):
            variable.assign(value)


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
    """Build and train the configured model; returns it with the best validation epoch's weights.

    Epochs run one model.fit call at a time. Each epoch's data order and augmentation are seeded
    by (seed, epoch), and after each epoch the whole training state (weights, optimizer slots,
    dropout RNG, history, best epoch, early-stopping count) is checkpointed in `work_dir`, so a
    killed run called again with the same config and data resumes after its last finished epoch
    (a finished warm-up is not redone). With train.deterministic the resumed run is bit-identical
    to an uninterrupted one; without it, as close as two uninterrupted runs are to each other.
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
    cap = t.get("epoch_cap_per_class")
    epoch_y = train[1][epoch_indices(train[1], cap, cfg.seed)]  # every epoch's class counts
    steps = int(np.ceil(len(epoch_y) / t.batch_size))
    mode = monitor_mode(t.monitor)
    store = TrainingCheckpoint(work_dir)
    progress = store.resume(training_fingerprint(cfg, train, val, epochs), model, epochs, warmup)
    val_ds = make_dataset(*val, n_classes, cfg.evaluate.batch_size)  # predict-only: small is fast
    weights = class_weights(epoch_y, n_classes, t.class_weight)
    relay = EpochRelay(
        [
            LearningRateLogger(),
            keras.callbacks.TerminateOnNaN(),
            MlflowEpochLogger(),
            *(extra_callbacks or []),
        ]
    )
    relay.set_model(model)
    relay.inner.on_train_begin()
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
        # without a cap, the arrays as they are: indexing would copy every image each epoch
        seen = epoch_indices(train[1], cap, epoch_seed) if cap else slice(None)
        train_ds = make_dataset(
            train[0][seen],
            train[1][seen],
            n_classes,
            t.batch_size,
            augmentation(t.augment, epoch_seed),
            epoch_seed,
        )
        model.fit(
            train_ds,
            validation_data=val_ds,
            initial_epoch=epoch,
            epochs=epoch + 1,
            class_weight=weights,
            # validation scores the moving average, the weights that would be kept
            callbacks=[relay, *([EmaValidation()] if uses_ema(model) else [])],
            shuffle=False,  # shuffled above
            verbose=1 if verbose == 1 else 0,
        )
        progress.record(
            epoch,
            relay.logs,
            t.monitor,
            mode,
            time.perf_counter() - start,
            patience=t.early_stopping_patience if epoch >= warmup else None,
        )
        progress.stopped = progress.stopped or bool(getattr(model, "stop_training", False))
        store.save(progress, model, phase)
        if csv_log:
            write_curves(csv_log, progress.history)
        if verbose:
            print(
                f"epoch {epoch + 1}/{epochs} ({phase}) {time.perf_counter() - start:.0f}s "
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
        len(epoch_y) * len(history),
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
        ema = ema_momentum(t.get("ema_fraction"), steps * finetune_epochs)
        compile_model(model, t, n_classes, steps * finetune_epochs, ema)


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
        logs = logs if logs is not None else {}
        self.inner.on_epoch_end(epoch, logs)
        self.logs = {k: float(v) for k, v in logs.items()}

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.inner.on_train_batch_begin(batch, logs)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.inner.on_train_batch_end(batch, logs)


def write_curves(path: Path, history: list[dict[str, float]]) -> None:
    """The per-epoch CSV (as keras.callbacks.CSVLogger writes it), rewritten whole each epoch so a
    resumed run keeps the rows of the epochs it did not redo."""
    keys = sorted({k for row in history for k in row})
    lines = [",".join(["epoch", *keys])]
    lines += [
        ",".join([str(i), *(repr(row.get(k, float("nan"))) for k in keys)])
        for i, row in enumerate(history)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "\n".join(lines) + "\n")


def training_fingerprint(
    cfg: DictConfig,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    epochs: int,
) -> str:
    """What a checkpoint must have been made with to be resumed: the config sections training
    reads, the epoch budget and the exact training and validation arrays."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{config_digest(cfg)} {epochs}".encode())
    for array in (*train, *val):
        digest.update(f"{array.shape} {array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


@dataclass
class Progress:
    """Everything besides the variables that a resumed run needs; saved after every epoch."""

    fingerprint: str
    next_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_value: float | None = None
    patience_best: float | None = None  # early stopping watches the fine-tune epochs only
    patience_wait: int = 0
    stopped: bool = False
    seconds: float = 0.0
    improved: bool = False  # whether the epoch just recorded is the new best (not saved)

    def record(
        self,
        epoch: int,
        logs: dict[str, float],
        monitor: str,
        mode: str,
        seconds: float,
        patience: int | None,
    ) -> None:
        """Add an epoch; keep the best one and the early-stopping count as Keras's
        ModelCheckpoint(save_best_only) and EarlyStopping would."""
        value = logs.get(monitor, float("nan"))
        self.history.append(dict(logs))
        self.next_epoch, self.seconds = epoch + 1, self.seconds + seconds
        self.improved = _better(value, self.best_value, mode)
        if self.improved:
            self.best_epoch, self.best_value = epoch, value
        if patience is None:
            return
        if _better(value, self.patience_best, mode):
            self.patience_best, self.patience_wait = value, 0
        else:
            self.patience_wait += 1
            self.stopped = self.patience_wait >= patience and epoch > 0

    def to_json(self) -> str:
        state = {k: v for k, v in self.__dict__.items() if k != "improved"}
        return json.dumps({"format": CHECKPOINT_FORMAT, **state}, indent=1)


def _better(value: float, reference: float | None, mode: str) -> bool:
    if value != value:  # NaN never improves
        return False
    return reference is None or (value > reference if mode == "max" else value < reference)


CHECKPOINT_FORMAT = 1


class TrainingCheckpoint:
    """<work_dir>/progress.json names the state of the last finished epoch (epoch-N.npz) and the
    best one (best-N.npz); it is replaced last and atomically, so a kill at any moment leaves a
    consistent checkpoint. Files it does not name are leftovers, removed on the next save."""

    def __init__(self, work_dir: Path) -> None:
        self.dir = work_dir
        self.index = work_dir / "progress.json"
        self.optimizer_state: tuple[str, list[np.ndarray]] | None = None

    def resume(self, fingerprint: str, model: keras.Model, epochs: int, warmup: int) -> Progress:
        """The saved progress with the model's variables restored, or a fresh start (and why)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.index.exists():
            return Progress(fingerprint)
        try:
            saved = json.loads(self.index.read_text())
            if saved.pop("format", None) != CHECKPOINT_FORMAT:
                raise ValueError("it was written by another version of train.py")
            progress = Progress(**saved)
            if progress.fingerprint != fingerprint:
                raise ValueError("it was made with another config, epoch budget or data")
            arrays = _load_arrays(self.dir / f"epoch-{progress.next_epoch - 1}.npz")
            _assign(model.variables, arrays["model"], "model")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(
                f"train: not resuming from the checkpoint in {self.dir} ({exc}); "
                "starting again from epoch 1",
                flush=True,
            )
            return Progress(fingerprint)
        self.optimizer_state = (arrays["phase"], arrays["optimizer"])
        if progress.stopped or progress.next_epoch >= epochs:
            print(
                f"train: the checkpoint in {self.dir} holds a finished run "
                f"({progress.next_epoch} epochs); reusing it",
                flush=True,
            )
        else:
            skipped = " (warm-up already done)" if 0 < warmup <= progress.next_epoch else ""
            print(
                f"train: resuming from epoch {progress.next_epoch + 1}/{epochs}{skipped} with "
                f"the checkpoint in {self.dir}",
                flush=True,
            )
        _log_restored(progress.history)
        return progress

    def restore_optimizer(self, model: keras.Model, phase: str) -> None:
        """Restore the optimizer's slots when resuming inside the phase that saved them (a phase
        that starts at the resumed epoch begins with a fresh optimizer, as it would have)."""
        if self.optimizer_state is None:
            return
        saved_phase, arrays = self.optimizer_state
        self.optimizer_state = None
        if saved_phase == phase:
            model.optimizer.build(model.trainable_variables)
            _assign(model.optimizer.variables, arrays, "optimizer")

    def save(self, progress: Progress, model: keras.Model, phase: str) -> None:
        epoch = progress.next_epoch - 1
        state = [v.numpy() for v in model.variables]
        _save_arrays(
            self.dir / f"epoch-{epoch}.npz",
            state,
            [v.numpy() for v in model.optimizer.variables],
            phase,
        )
        if progress.improved:  # the weights validation scored: the moving average, with EMA
            kept = averaged_variables(model) if uses_ema(model) else state
            _save_arrays(self.dir / f"best-{epoch}.npz", kept, [], phase)
        write_text(self.index, progress.to_json())
        keep = {f"epoch-{epoch}.npz", f"best-{progress.best_epoch}.npz"}
        for leftover in self.dir.glob("*.npz"):
            if leftover.name not in keep:
                leftover.unlink(missing_ok=True)

    def load_best(self, model: keras.Model, progress: Progress) -> None:
        best = self.dir / f"best-{progress.best_epoch}.npz"
        if progress.best_epoch >= 0 and best.exists():
            _assign(model.variables, _load_arrays(best)["model"], "model")


def _save_arrays(
    path: Path, model_arrays: list[np.ndarray], optimizer: list[np.ndarray], phase: str
) -> None:
    named = {f"model_{i:04d}": a for i, a in enumerate(model_arrays)}
    named.update({f"optimizer_{i:04d}": a for i, a in enumerate(optimizer)})
    buffer = io.BytesIO()
    np.savez(buffer, phase=np.array(phase), **named)
    write_bytes(path, buffer.getvalue())


def _load_arrays(path: Path) -> dict:
    with np.load(path) as npz:
        names = sorted(npz.files)
        return {
            "phase": str(npz["phase"]),
            "model": [npz[n] for n in names if n.startswith("model_")],
            "optimizer": [npz[n] for n in names if n.startswith("optimizer_")],
        }


def _assign(variables: list, arrays: list[np.ndarray], what: str) -> None:
    if len(variables) != len(arrays) or any(
        tuple(v.shape) != a.shape for v, a in zip(variables, arrays, strict=True)
    ):
        raise ValueError(f"its {what} variables do not match this model's")
    for variable, array in zip(variables, arrays, strict=True):
        variable.assign(array)


def _log_restored(history: list[dict[str, float]]) -> None:
    """A resumed train stage opens a new MLflow run: give it the epochs it does not redo."""
    if mlflow.active_run():
        for epoch, row in enumerate(history):
            mlflow.log_metrics(row, step=epoch)


TRAINING_SECTIONS = ("seed", "data", "model", "train")


def config_digest(cfg: DictConfig) -> str:
    """A digest of the sections training reads (with the tuned values applied), so that an
    evaluate, registry or tracking change does not discard a resumable training checkpoint."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    blob = json.dumps({key: resolved.get(key) for key in TRAINING_SECTIONS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
