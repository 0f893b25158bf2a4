"""Classify the faces of a photo and combine its confident ones into one mood; load the model to
do it with, and find the threshold (min_confidence) its answers are trusted at."""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig
from PIL import Image

from soundmood.data.images import to_rgb
from soundmood.errors import UserError
from soundmood.forward import OnnxForward, tta_probabilities
from soundmood.inference.detect import Box, Face, detect_faces
from soundmood.inference.mood import NO_THRESHOLD, confident, confident_mood
from soundmood.inference.settings import Settings, from_config
from soundmood.mlflow_store import tracking_uri


class ModelLoadError(UserError):
    """The model named by --model could not be found or is not a SoundMood classifier."""


@dataclass(frozen=True)
class FaceResult:
    box: Box  # x, y, width, height in the upright photo
    confidence: float  # detector score
    probabilities: dict[str, float]  # class -> probability (sums to 1)
    label: str  # the most probable class
    confident: bool = True  # top probability >= the min_confidence in force


@dataclass
class PhotoResult:
    """What `soundmood predict` reports for one photo. `mood` is None when no face was found or
    none was confident (`mood_reason` says which), `error` says why a file could not be read
    (then there are no faces and no mood_reason either)."""

    path: str
    width: int = 0
    height: int = 0
    faces: list[FaceResult] = field(default_factory=list)
    mood: str | None = None
    mood_probabilities: dict[str, float] | None = None
    mood_reason: str | None = None  # why mood is None: "no face found", "no confident face: ..."
    min_confidence: float | None = None  # the threshold the faces were judged at
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
                    "confident": f.confident,
                }
                for f in self.faces
            ],
            "mood": self.mood,
            "mood_probabilities": rounded(self.mood_probabilities),
            "mood_reason": self.mood_reason,
            "min_confidence": self.min_confidence,
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
    min_confidence: float = NO_THRESHOLD,
) -> PhotoResult:
    """Detect the faces of `image`, classify each (cfg.data.classes, cfg.evaluate.tta_flip) and
    combine those whose top probability reaches `min_confidence` by
    cfg.inference.mood.weighting into the photo's mood (None, with the reason, when none does).
    `min_confidence`: see resolve_min_confidence; the default, no threshold known, trusts every
    answer."""
    settings = settings or from_config(cfg.get("inference"))
    classes = list(cfg.data.classes)
    image = to_rgb(image)
    start = time.perf_counter()
    faces = detect_faces(image, settings)
    detected = time.perf_counter()
    probs = classify(model, _crops(faces, input_size(model)), bool(cfg.evaluate.tta_flip))
    classified = time.perf_counter()
    areas = np.array([f.area for f in faces], dtype=np.float64)
    mood, reason = confident_mood(probs, areas, settings.mood.weighting, min_confidence)
    sure = confident(probs, min_confidence)
    return PhotoResult(
        path=path,
        width=image.width,
        height=image.height,
        faces=[
            _face_result(face, p, classes, bool(ok))
            for face, p, ok in zip(faces, probs, sure, strict=True)
        ],
        mood=None if mood is None else classes[int(np.argmax(mood))],
        mood_probabilities=None if mood is None else _named(mood, classes),
        mood_reason=reason,
        min_confidence=float(min_confidence),
        seconds={"detect": detected - start, "classify": classified - detected},
    )


def _crops(faces: list[Face], size: int) -> np.ndarray:
    if not faces:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.stack([face.crop(size) for face in faces])


def _named(probs: np.ndarray, classes: list[str]) -> dict[str, float]:
    return {name: float(p) for name, p in zip(classes, probs, strict=True)}


def _face_result(face: Face, probs: np.ndarray, classes: list[str], sure: bool) -> FaceResult:
    return FaceResult(
        face.box, face.confidence, _named(probs, classes), classes[int(np.argmax(probs))], sure
    )


# --- the threshold ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Threshold:
    """The min_confidence predict judges answers at, and where it came from (shown with them)."""

    value: float
    source: str


NO_THRESHOLD_KNOWN = "no threshold known: every answer confident"


def resolve_min_confidence(cfg: DictConfig, uri: str, served: dict | None) -> Threshold:
    """The top probability an answer needs to be confident, first found of:
    cfg.inference.min_confidence when set (an explicit override);
    the served pyfunc's model_config["min_confidence"] (`served`: that model_config, None for a
    Keras model), so predict judges as the service does;
    for a local .keras file, the min_confidence train chose, in <evaluate.reports_dir>/train.json
    (the pipeline's last training: meant for its models/model.keras);
    else NO_THRESHOLD (0): every answer confident."""
    settings = from_config(cfg.get("inference"))
    if settings.min_confidence is not None:
        return Threshold(float(settings.min_confidence), "inference.min_confidence")
    if served is not None:
        logged = served.get("min_confidence")
        if logged is None:  # a pyfunc logged before calibration: the service trusts every row
            return Threshold(NO_THRESHOLD, f"{NO_THRESHOLD_KNOWN} (none logged with {uri})")
        return Threshold(float(logged), f"logged with {uri}")
    if Path(uri).suffix == ".keras":
        report = Path(cfg.evaluate.reports_dir) / "train.json"
        chosen = _train_threshold(report)
        if chosen is not None:
            return Threshold(chosen, str(report))
    return Threshold(NO_THRESHOLD, NO_THRESHOLD_KNOWN)


def _train_threshold(report: Path) -> float | None:
    """train.json's min_confidence; None when the file or the key is missing (an older run)."""
    try:
        value = json.loads(report.read_text()).get("min_confidence")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{report}: cannot read its min_confidence ({exc})") from exc
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise UserError(f"{report}: min_confidence {value!r} is not a probability in [0, 1]")
    return float(value)


# --- model loading --------------------------------------------------------------------------


def load_model(uri: str, cfg: DictConfig | None = None) -> Any:
    """The classifier behind `uri`: a local .keras file, a local MLflow model folder, or an
    MLflow URI (models:/name@alias, models:/name/3, runs:/id/model, ...). For MLflow models
    logged with the keras flavor that flavor loads it; for the served pyfunc
    (soundmood.serving) its ONNX graph, the one evaluate scored and the service runs, is loaded
    as an OnnxForward (older pyfuncs without one: their .keras artifact). `cfg` points MLflow
    at the configured tracking store (MLFLOW_TRACKING_URI wins)."""
    return _load(uri, cfg)[0]


def load_predictor(uri: str, cfg: DictConfig) -> tuple[Any, Threshold]:
    """The classifier behind `uri` (as load_model) and the threshold its answers are trusted at
    (resolve_min_confidence)."""
    model, served = _load(uri, cfg)
    return model, resolve_min_confidence(cfg, uri, served)


def _load(uri: str, cfg: DictConfig | None) -> tuple[Any, dict | None]:
    """(model, the served pyfunc's model_config or None for a Keras model)."""
    path = Path(uri).expanduser()
    if path.suffix == ".keras" or path.is_file():
        if not path.is_file():
            raise ModelLoadError(f"--model {uri}: no such file")
        return _checked(_load_keras(path, uri), uri), None
    if path.is_dir():
        return _from_mlflow_folder(path, uri)
    if "://" not in uri and ":/" not in uri:
        raise ModelLoadError(f"--model {uri}: not a .keras file, a model folder or a model URI")
    return _from_mlflow_folder(_download(uri, cfg), uri)


def _download(uri: str, cfg: DictConfig | None) -> Path:
    import mlflow  # deferred: seconds of start-up that a .keras file does not need
    from mlflow.exceptions import MlflowException

    if cfg is not None:
        mlflow.set_tracking_uri(tracking_uri(cfg))
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except (MlflowException, OSError) as exc:
        raise ModelLoadError(f"--model {uri}: {exc}") from exc


def _from_mlflow_folder(folder: Path, uri: str) -> tuple[Any, dict | None]:
    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        raise ModelLoadError(f"--model {uri}: {folder} has no MLmodel file")
    flavors = yaml.safe_load(mlmodel.read_text()).get("flavors", {})
    if "keras" in flavors:
        import mlflow  # deferred, as in _download

        return _checked(mlflow.keras.load_model(str(folder)), uri), None
    # the served pyfunc's model_config (detect_faces, inference, min_confidence)
    served = (flavors.get("python_function") or {}).get("config") or {}
    graphs = sorted(folder.rglob("*.onnx"))  # the served pyfunc's artifacts
    if graphs:
        return _checked_graph(graphs[0], uri), served
    saved = sorted(folder.rglob("*.keras"))
    if saved:
        return _checked(_load_keras(saved[0], uri), uri), served
    raise ModelLoadError(
        f"--model {uri}: an MLflow model with flavors {sorted(flavors)} and no "
        ".keras file; expected a SoundMood Keras or pyfunc model"
    )


def _load_keras(path: Path, uri: str) -> Any:
    """A .keras file as a Keras model. Keras says "File not found" for any file that is not a
    zip archive, so a truncated or corrupt file is named as what it is."""
    import keras  # deferred: TensorFlow's start-up, which an ONNX model does not need

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
