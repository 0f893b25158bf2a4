"""The resumable state of a fit: after every epoch, the model's and optimizer's variables and the
progress (history, best epoch, early-stopping count) in one consistent checkpoint, so a killed run
resumes after its last finished epoch.

keras.callbacks.BackupAndRestore could not do this: its weights file leaves out the dropout RNG
state (so no bit-identical resume), and it keeps neither the history, best epoch and patience
count nor which phase's optimizer it saved, nor writes them atomically with the weights.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import keras
import mlflow
import numpy as np
from omegaconf import DictConfig

from soundmood.config import digest, result_inputs
from soundmood.fileio import write_bytes, write_text


def config_digest(cfg: DictConfig) -> str:
    """A digest of the values a trained model depends on (with the tuned values applied), so that
    an evaluate, registry or tracking change does not discard a resumable training checkpoint."""
    return digest(result_inputs(cfg))


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
class FitState:
    """Everything besides the variables that a resumed run needs; saved after every epoch. The
    best epoch and the early-stopping count are those Keras' ModelCheckpoint and EarlyStopping
    kept, so that a resumed run can hand them back."""

    fingerprint: str
    next_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_value: float | None = None
    patience_best: float | None = None  # early stopping watches the fine-tune epochs only
    patience_wait: int = 0
    stopped: bool = False
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps({"format": CHECKPOINT_FORMAT, **self.__dict__}, indent=1)


CHECKPOINT_FORMAT = 2


class TrainingCheckpoint:
    """<work_dir>/progress.json names the state of the last finished epoch (epoch-N.npz) and the
    best one (best-N.weights.h5, written by keras.callbacks.ModelCheckpoint, 1-based); it is
    replaced last and atomically, so a kill at any moment leaves a consistent checkpoint. Files it
    does not name are leftovers, removed on the next save."""

    BEST = "best-{epoch:03d}.weights.h5"  # ModelCheckpoint's filepath pattern

    def __init__(self, work_dir: Path) -> None:
        self.dir = work_dir
        self.index = work_dir / "progress.json"
        self.optimizer_state: tuple[str, list[np.ndarray]] | None = None

    def best_path(self, epoch: int) -> Path:
        """The best-weights file of 0-based `epoch` (ModelCheckpoint numbers epochs from 1)."""
        return self.dir / self.BEST.format(epoch=epoch + 1)

    def resume(self, fingerprint: str, model: keras.Model, epochs: int, warmup: int) -> FitState:
        """The saved progress with the model's variables restored, or a fresh start (and why)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.index.exists():
            return FitState(fingerprint)
        try:
            saved = json.loads(self.index.read_text())
            if saved.pop("format", None) != CHECKPOINT_FORMAT:
                raise ValueError("it was written by another version of soundmood")
            progress = FitState(**saved)
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
            return FitState(fingerprint)
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

    def save(self, progress: FitState, model: keras.Model, phase: str) -> None:
        epoch = progress.next_epoch - 1
        _save_arrays(
            self.dir / f"epoch-{epoch}.npz",
            [v.numpy() for v in model.variables],  # with the dropout RNG state
            [v.numpy() for v in model.optimizer.variables],
            phase,
        )
        write_text(self.index, progress.to_json())
        keep = {f"epoch-{epoch}.npz", self.best_path(progress.best_epoch).name}
        for leftover in [*self.dir.glob("*.npz"), *self.dir.glob("best-*.weights.h5")]:
            if leftover.name not in keep:
                leftover.unlink(missing_ok=True)

    def load_best(self, model: keras.Model, progress: FitState) -> None:
        """The best epoch's weights into `model`. Its file also holds the optimizer of the phase
        that saved it, which the model's current one may not match: only the weights matter."""
        best = self.best_path(progress.best_epoch)
        if progress.best_epoch >= 0 and best.exists():
            model.load_weights(best, objects_to_skip=[model.optimizer])


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
