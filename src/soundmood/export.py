"""The served model's files, as train (to score validation as served) and evaluate (to score
test and log the model) both write them: the trained .keras without optimizer state and its ONNX
graph, refused unless the graph predicts what the .keras does."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from soundmood.fileio import atomic_path, write_bytes
from soundmood.forward import Forward, OnnxForward, onnx_model
from soundmood.models import MODEL_FILE

ONNX_FILE = "model.onnx"
EXPORT_TOLERANCE = 1e-4  # float32 kernels differ by ~1e-6; a broken conversion by far more


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
