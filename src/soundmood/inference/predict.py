"""Classify the faces of a photo and combine them into one mood; load the model to do it with."""

from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from soundmood.data.images import to_rgb
from soundmood.errors import UserError
from soundmood.forward import OnnxForward, tta_probabilities
from soundmood.inference.detect import Box, Face, detect_faces
from soundmood.inference.mood import combine_mood
from soundmood.inference.settings import Settings, from_config


class ModelLoadError(UserError):
    """The model named by --model could not be found or is not a SoundMood classifier."""


@dataclass(frozen=True)
class FaceResult:
    box: Box  # x, y, width, height in the upright photo
    confidence: float  # detector score
    probabilities: dict[str, float]  # class -> probability (sums to 1)
    label: str  # the most probable class


@dataclass
class PhotoResult:
    """What `soundmood predict` reports for one photo. `mood` is None when no face was found,
    `error` says why a file could not be read (then there are no faces either)."""

    path: str
    width: int = 0
    height: int = 0
    faces: list[FaceResult] = field(default_factory=list)
    mood: str | None = None
    mood_probabilities: dict[str, float] | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # detect, classify
    error: str | None = None
    annotated: str | None = None

    def to_json(self) -> dict[str, Any]:
        def rounded(probs: dict[str, float] | None) -> dict[str, float] | None:
            return None if probs is None else {k: round(v, 4) for k, v in probs.items()}

        return {
            "path": self.path,
            "width": self.width,
            "height": self.height,
            "faces": [
                {
                    "box": list(f.box),
                    "confidence": round(f.confidence, 4),
                    "label": f.label,
                    "probabilities": rounded(f.probabilities),
                }
                for f in self.faces
            ],
            "mood": self.mood,
            "mood_probabilities": rounded(self.mood_probabilities),
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "annotated": self.annotated,
            "error": self.error,
        }


def input_size(model: Any) -> int:
    if isinstance(model, OnnxForward):
        return model.image_size
    return int(model.input_shape[1])


def output_count(model: Any) -> int:
    if isinstance(model, OnnxForward):
        return int(model.session.get_outputs()[0].shape[-1])
    return int(model.output_shape[-1])


def classify(model: Any, crops: np.ndarray, tta_flip: bool) -> np.ndarray:
    """Class probabilities of uint8 face crops (N, S, S, 3) from a Keras model or the served
    ONNX graph; with `tta_flip` averaged with the mirrored crops', through the same function
    evaluate and the served model predict with."""
    if len(crops) == 0:
        return np.zeros((0, output_count(model)), dtype=np.float32)
    forward = model if isinstance(model, OnnxForward) else model.predict_on_batch
    return tta_probabilities(forward, crops, len(crops), tta_flip)


def predict_photo(
    model: Any,
    image: Image.Image,
    cfg: DictConfig,
    path: str = "",
    settings: Settings | None = None,
) -> PhotoResult:
    """Detect the faces of `image`, classify each (cfg.data.classes, cfg.evaluate.tta_flip) and
    combine them by cfg.inference.mood.weighting into the photo's mood."""
    settings = settings or from_config(cfg.get("inference"))
    classes = list(cfg.data.classes)
    image = to_rgb(image)
    start = time.perf_counter()
    faces = detect_faces(image, settings)
    detected = time.perf_counter()
    probs = classify(model, _crops(faces, input_size(model)), bool(cfg.evaluate.tta_flip))
    classified = time.perf_counter()
    mood = combine_mood(probs, np.array([f.area for f in faces]), settings.mood.weighting)
    return PhotoResult(
        path=path,
        width=image.width,
        height=image.height,
        faces=[_face_result(face, p, classes) for face, p in zip(faces, probs, strict=True)],
        mood=None if mood is None else classes[int(np.argmax(mood))],
        mood_probabilities=None if mood is None else _named(mood, classes),
        seconds={"detect": detected - start, "classify": classified - detected},
    )


def _crops(faces: list[Face], size: int) -> np.ndarray:
    if not faces:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.stack([face.crop(size) for face in faces])


def _named(probs: np.ndarray, classes: list[str]) -> dict[str, float]:
    return {name: float(p) for name, p in zip(classes, probs, strict=True)}


def _face_result(face: Face, probs: np.ndarray, classes: list[str]) -> FaceResult:
    return FaceResult(
        face.box, face.confidence, _named(probs, classes), classes[int(np.argmax(probs))]
    )


# --- model loading --------------------------------------------------------------------------


def load_model(uri: str, cfg: DictConfig | None = None) -> Any:
    """The classifier behind `uri`: a local .keras file, a local MLflow model folder, or an
    MLflow URI (models:/name@alias, models:/name/3, runs:/id/model, ...). For MLflow models
    logged with the keras flavor that flavor loads it; for the served pyfunc
    (soundmood.serving) its ONNX graph, the one evaluate scored and the service runs, is loaded
    as an OnnxForward (older pyfuncs without one: their .keras artifact). `cfg` points MLflow
    at the configured tracking store (MLFLOW_TRACKING_URI wins)."""
    path = Path(uri).expanduser()
    if path.suffix == ".keras" or path.is_file():
        if not path.is_file():
            raise ModelLoadError(f"--model {uri}: no such file")
        return _checked(_load_keras(path, uri), uri)
    if path.is_dir():
        return _from_mlflow_folder(path, uri)
    if "://" not in uri and ":/" not in uri:
        raise ModelLoadError(f"--model {uri}: not a .keras file, a model folder or a model URI")
    return _from_mlflow_folder(_download(uri, cfg), uri)


def _download(uri: str, cfg: DictConfig | None) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    if cfg is not None:
        from soundmood.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri(cfg))
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except (MlflowException, OSError) as exc:
        raise ModelLoadError(f"--model {uri}: {exc}") from exc


def _from_mlflow_folder(folder: Path, uri: str) -> Any:
    import yaml

    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        raise ModelLoadError(f"--model {uri}: {folder} has no MLmodel file")
    flavors = yaml.safe_load(mlmodel.read_text()).get("flavors", {})
    if "keras" in flavors:
        import mlflow

        return _checked(mlflow.keras.load_model(str(folder)), uri)
    graphs = sorted(folder.rglob("*.onnx"))  # the served pyfunc's artifacts
    if graphs:
        return _checked_graph(graphs[0], uri)
    saved = sorted(folder.rglob("*.keras"))
    if saved:
        return _checked(_load_keras(saved[0], uri), uri)
    raise ModelLoadError(
        f"--model {uri}: an MLflow model with flavors {sorted(flavors)} and no "
        ".keras file; expected a SoundMood Keras or pyfunc model"
    )


def _load_keras(path: Path, uri: str) -> Any:
    """A .keras file as a Keras model. Keras says "File not found" for any file that is not a
    zip archive, so a truncated or corrupt file is named as what it is."""
    import keras

    unreadable = f"--model {uri}: {path} is not a readable Keras model (truncated or corrupt"
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{unreadable}: not a zip archive, as a .keras file is)")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises assorted types for a damaged archive
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelLoadError(f"{unreadable}: {type(exc).__name__}: {reason})") from exc


def _checked(model: Any, uri: str) -> Any:
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
        raise ModelLoadError(f"--model {uri}: input shape {shape} is not (N, S, S, 3)")
    return model


def _checked_graph(path: Path, uri: str) -> OnnxForward:
    try:
        return OnnxForward(path)
    except Exception as exc:  # onnxruntime raises its own exception types for a bad graph
        raise ModelLoadError(
            f"--model {uri}: {path.name} is not a loadable ONNX graph: {exc}"
        ) from exc
