"""The served model: an MLflow pyfunc that turns encoded photos of faces into expression
probabilities, so a client never needs this repository, Keras or our preprocessing.

Input: a DataFrame with a column `image` of encoded JPEG/PNG/WebP bytes. In a JSON request to
`mlflow models serve` they are base64 strings, e.g.
    {"dataframe_records": [{"image": "<base64>"}], "params": {"detect_faces": false}}
(the signature declares `image` as binary, so the scoring server base64-decodes the column).
Output: one row per image: a probability column per class (summing to 1), `label`, the most
probable class, and `confident`, whether the top probability reaches model_config
["min_confidence"] (the threshold evaluate logged: the one train chose on validation so that
confident answers reach inference.confident_precision accuracy, or inference.min_confidence when
set); with face detection on, also `faces`, how many faces the probabilities average. A client
should treat a row with confident false as "no answer" rather than act on its label.

A model logged before calibration (issue 37) has no min_confidence in its model_config: it still
loads and serves, and its `confident` column is true on every row, since no threshold was ever
chosen for it (the same as min_confidence 0). Its probabilities are uncalibrated too.

Decoding, RGB conversion and resizing happen here with soundmood.data.images, the code training
used. The soundmood package is logged with the model (code_paths), so the model loads and serves
without this repository on the path. The classifier runs as its ONNX export under ONNX Runtime
(onnx_model, OnnxForward), the graph evaluate scored; the .keras file rides along for
retraining and `soundmood predict`. Bad input (a missing column, bytes that are not an image)
raises MlflowException(INVALID_PARAMETER_VALUE), which the scoring server answers with a 400.

Face detection (`detect_faces`, default off; the model_config default, overridable per request
with the `detect_faces` param): RAF-DB faces are aligned crops, so by default the whole image is
the face. For full photos it runs the code `soundmood predict` runs, with the cfg.inference
logged in model_config["inference"]:
    soundmood.inference.detect.detect_faces(image, settings) -> faces (Face.crop(size), .area)
    soundmood.inference.mood.combine_mood(probs, areas, weighting) -> one vector per photo
A row combines the photo's confident faces when it has any (as `soundmood predict` does;
confident: true), else all its faces (confident: false, where predict reports no mood). A photo
with no face found is classified whole and is confident by its own top probability; the `faces`
column says how many faces the photo has (0: the whole photo was classified).

Its own environment: what this module imports (soundmood.forward, .data.images,
.inference.detect and .mood, never the CLI's soundmood.inference.command with rich and tqdm)
and what MTCNN needs are pinned in the logged requirements.txt (SERVING_PACKAGES). A missing
one fails the load, naming it: the imports are at the top of this module, and load_context
checks MTCNN's (which import TensorFlow, so detection imports them on first use).
"""

from __future__ import annotations

import base64
import binascii
import io
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

import soundmood
from soundmood.data.images import ImageError, load_face, open_image, resize, to_rgb
from soundmood.forward import OnnxForward, tta_probabilities
from soundmood.inference.detect import Face, detect_faces, require_detector
from soundmood.inference.mood import NO_THRESHOLD, combine_mood, confident

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
FACES_COLUMN = "faces"
CONFIDENT_COLUMN = "confident"
MIN_CONFIDENCE = "min_confidence"  # model_config key: the model's top-probability threshold
KERAS_ARTIFACT = "keras_model"  # for retraining and `soundmood predict`; not loaded here
ONNX_ARTIFACT = "onnx_model"  # what the served model runs
DETECT_FACES = "detect_faces"
INFERENCE_SETTINGS = "inference"
# Every distribution the served model imports or runs with, pinned to the version it was logged
# with; each entry lists interchangeable distributions (the first installed one is pinned).
# Logging fails if none of an entry's is installed. The test tests/test_served_env.py checks that
# what a detect_faces request imports is these or their own requirements, and serves the model
# from a fresh environment built from the logged requirements.txt alone.
SERVING_PACKAGES = (
    ("mlflow",),  # the pyfunc itself
    ("onnxruntime",),  # soundmood.forward: the classifier
    ("numpy",),
    ("pandas",),
    ("pillow",),  # soundmood.data.images: decoding and resizing
    ("omegaconf",),  # soundmood.inference.settings
    ("pyyaml",),  # omegaconf's
    ("antlr4-python3-runtime",),  # omegaconf's interpolation grammar
    ("mtcnn",),  # soundmood.inference.detect
    ("tensorflow-cpu", "tensorflow"),  # mtcnn's network
    ("keras",),  # tensorflow's tf.keras, which mtcnn's layers are
    ("joblib",),  # mtcnn's weight loader
    ("lz4",),  # joblib's reader for mtcnn's .lz4 weights
)


def invalid_input(message: str) -> MlflowException:
    """The error the scoring server turns into a 400 with `message`."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def encoded_bytes(value: object, row: int) -> bytes:
    """One cell of the `image` column as encoded image bytes (base64 strings are accepted too)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise invalid_input(
                f"image[{row}]: a string that is not base64 ({exc}); send the encoded "
                "JPEG/PNG file base64-encoded"
            ) from exc
    raise invalid_input(
        f"image[{row}]: expected encoded JPEG/PNG bytes, got {type(value).__name__}"
    )


class FaceExpressionModel(mlflow.pyfunc.PythonModel):
    """The classifier's ONNX export behind an image-bytes interface (see the module docstring)."""

    def __init__(self, classes: list[str], tta_flip: bool, batch_size: int = 64) -> None:
        self.classes = list(classes)
        self.tta_flip = tta_flip  # as evaluate scored it, so served = evaluated predictions
        self.batch_size = batch_size

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        # ONNX Runtime, not Keras: 4x faster for one face; TensorFlow loads only to detect faces
        require_detector()  # any request may ask for detect_faces: fail here if it cannot run
        self.forward = OnnxForward(context.artifacts[ONNX_ARTIFACT])
        self.image_size = self.forward.image_size
        config = context.model_config or {}
        self.detect_faces_default = bool(config.get(DETECT_FACES, False))
        # cfg.inference as logged (None: soundmood.inference's defaults, which equal conf/)
        self.inference_settings = config.get(INFERENCE_SETTINGS)
        # None: logged before calibration, no threshold known, every answer confident
        logged = config.get(MIN_CONFIDENCE)
        self.min_confidence = NO_THRESHOLD if logged is None else float(logged)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input:
            got = (
                list(model_input.columns)
                if isinstance(model_input, pd.DataFrame)
                else type(model_input).__name__
            )
            raise invalid_input(
                f"input needs a column {IMAGE_COLUMN!r} of encoded JPEG/PNG "
                f"bytes (base64 in JSON); got {got}"
            )
        requested = (params or {}).get(DETECT_FACES)
        detect = self.detect_faces_default if requested is None else bool(requested)
        cells = list(model_input[IMAGE_COLUMN])
        if not detect:
            faces = [self.face(encoded_bytes(v, i), i) for i, v in enumerate(cells)]
            return self.frame(self.probabilities(np.stack(faces) if faces else None))
        return self.predict_photos(cells)

    def face(self, data: bytes, row: int) -> np.ndarray:
        """Encoded bytes to model input exactly as training decoded its images."""
        try:
            return load_face(data, self.image_size, name=f"image[{row}]")
        except ImageError as exc:
            raise invalid_input(f"{exc}; send an encoded JPEG, PNG or WebP file") from exc

    def probabilities(self, faces: np.ndarray | None) -> np.ndarray:
        if faces is None:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return tta_probabilities(self.forward, faces, self.batch_size, self.tta_flip)

    def frame(
        self,
        probs: np.ndarray,
        faces: list[int] | None = None,
        sure: np.ndarray | None = None,
    ) -> pd.DataFrame:
        """The output rows; `sure`: each row's `confident` (default: its top probability
        against the threshold)."""
        out = pd.DataFrame(probs.astype(np.float64), columns=self.classes)
        out[LABEL_COLUMN] = [self.classes[i] for i in probs.argmax(axis=1)] if len(probs) else []
        sure = confident(probs, self.min_confidence) if sure is None else sure
        out[CONFIDENT_COLUMN] = np.asarray(sure, dtype=bool)
        if faces is not None:
            out[FACES_COLUMN] = np.asarray(faces, dtype=np.int64)
        return out

    def predict_photos(self, cells: list[object]) -> pd.DataFrame:
        """Full photos: classify every detected face and combine them into one row per photo
        (its confident faces when it has any, as `soundmood predict` does); a photo without a
        detected face is classified whole."""
        crops, owner, areas, counts = [], [], [], []
        for row, value in enumerate(cells):
            try:
                photo = to_rgb(open_image(encoded_bytes(value, row), name=f"image[{row}]"))
            except ImageError as exc:
                raise invalid_input(f"{exc}; send an encoded JPEG, PNG or WebP file") from exc
            faces = detect_faces(photo, self.inference_settings)
            counts.append(len(faces))
            for face in faces or [photo]:
                crops.append(self.face_input(face))
                areas.append(float(face.area) if isinstance(face, Face) else 1.0)
                owner.append(row)
        probs = self.probabilities(np.stack(crops) if crops else None)
        owner_arr, areas_arr = np.asarray(owner), np.asarray(areas)
        weighting = (self.inference_settings or {}).get("mood", {}).get("weighting", "area")
        rows, sure = [], []
        for row in range(len(cells)):
            mine = owner_arr == row
            keep = confident(probs[mine], self.min_confidence)
            chosen = keep if keep.any() else np.ones_like(keep)
            rows.append(combine_mood(probs[mine][chosen], areas_arr[mine][chosen], weighting))
            sure.append(bool(keep.any()))
        return self.frame(np.stack(rows) if rows else probs, counts, np.asarray(sure, dtype=bool))

    def face_input(self, face: Face | Image.Image) -> np.ndarray:
        """A detected face, or a whole photo that has none, as model input (resized as training
        resized its crops)."""
        if isinstance(face, Face):
            return face.crop(self.image_size)
        return resize(face, self.image_size)


def signature(classes: list[str]) -> mlflow.models.ModelSignature:
    inputs = Schema([ColSpec("binary", IMAGE_COLUMN)])
    outputs = Schema(
        [
            *(ColSpec("double", name) for name in classes),
            ColSpec("string", LABEL_COLUMN),
            ColSpec("boolean", CONFIDENT_COLUMN),
            ColSpec("long", FACES_COLUMN, required=False),
        ]
    )
    # None: use the model_config default (false unless the model was logged otherwise)
    params = ParamSchema([ParamSpec(DETECT_FACES, "boolean", None)])
    return mlflow.models.ModelSignature(inputs=inputs, outputs=outputs, params=params)


def pip_requirements() -> list[str]:
    """SERVING_PACKAGES pinned to the installed versions (what requirements.txt holds)."""
    pins = []
    for alternatives in SERVING_PACKAGES:
        for package in alternatives:
            try:
                pins.append(f"{package}=={version(package)}")
                break
            except PackageNotFoundError:
                continue
        else:
            raise RuntimeError(
                f"the served model needs {' or '.join(alternatives)}, which is not installed "
                "here; install the project (pip install -e .) before logging the model"
            )
    return pins


def encode_png(image: np.ndarray) -> bytes:
    """A uint8 RGB array as PNG bytes (lossless, so load_face returns the same pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def log_pyfunc(
    keras_path: Path,
    onnx_path: Path,
    classes: list[str],
    tta_flip: bool,
    batch_size: int,
    examples: np.ndarray,
    detect_faces: bool = False,
    inference: dict | None = None,
    name: str = "model",
    min_confidence: float | None = None,
) -> mlflow.models.model.ModelInfo:
    """Log the served model to the active run: the .keras and .onnx files, this package, a
    signature and an input example (PNG-encoded `examples`, uint8 RGB faces). `inference`:
    cfg.inference as a plain dict, for the detect_faces option (None: soundmood.inference's
    defaults). `min_confidence`: the top probability a row needs for `confident` (evaluate
    passes the threshold in force); None records no threshold: every row confident, as for a
    model logged before calibration."""
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise ValueError(f"min_confidence {min_confidence!r} is not a probability in [0, 1]")
    example = pd.DataFrame({IMAGE_COLUMN: [encode_png(x) for x in examples]})
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=FaceExpressionModel(classes, tta_flip, batch_size),
        artifacts={KERAS_ARTIFACT: str(keras_path), ONNX_ARTIFACT: str(onnx_path)},
        code_paths=[str(Path(soundmood.__file__).parent)],
        signature=signature(classes),
        input_example=example,
        model_config={
            DETECT_FACES: detect_faces,
            INFERENCE_SETTINGS: inference,
            MIN_CONFIDENCE: None if min_confidence is None else float(min_confidence),
        },
        pip_requirements=pip_requirements(),
    )
