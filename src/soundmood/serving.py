"""The served model: an MLflow pyfunc that turns encoded photos of faces into expression
probabilities, so a client never needs this repository, Keras or our preprocessing.

Input: a DataFrame with a column `image` of encoded JPEG/PNG/WebP bytes. In a JSON request to
`mlflow models serve` they are base64 strings, e.g.
    {"dataframe_records": [{"image": "<base64>"}], "params": {"detect_faces": false}}
(the signature declares `image` as binary, so the scoring server base64-decodes the column).
Output: one row per image: a probability column per class (summing to 1) and `label`, the most
probable class; with face detection on, also `faces`, how many faces the probabilities average.

Decoding, RGB conversion and resizing happen here with soundmood.data.images, the code training
used. The soundmood package is logged with the model (code_paths), so the model loads and serves
without this repository on the path. The classifier runs as its ONNX export under ONNX Runtime
(onnx_model, OnnxForward), the graph evaluate scored; the .keras file rides along for
retraining and `soundmood predict`. Bad input (a missing column, bytes that are not an image)
raises MlflowException(INVALID_PARAMETER_VALUE), which the scoring server answers with a 400.

Face detection (`detect_faces`, default off; the model_config default, overridable per request
with the `detect_faces` param): RAF-DB faces are aligned crops, so by default the whole image is
the face. For full photos it calls soundmood.inference (the code `soundmood predict` runs):
    detect_faces(image, settings) -> faces (Face.crop(size) -> model input, Face.area)
    combine_mood(probs, areas, weighting) -> one probability vector per photo
with the cfg.inference logged in model_config["inference"]. A detector returning plain crops
(arrays or PIL images) works too. A photo with no face found is classified whole; the `faces`
column says how many faces each row combines (0: the whole photo).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
FACES_COLUMN = "faces"
KERAS_ARTIFACT = "keras_model"  # for retraining and `soundmood predict`; not loaded here
ONNX_ARTIFACT = "onnx_model"  # what the served model runs
DETECT_FACES = "detect_faces"
INFERENCE_SETTINGS = "inference"
# What the served model imports, pinned to the versions it was logged with; each entry lists
# interchangeable distributions (the first installed one is pinned; none installed: left out,
# as mtcnn and omegaconf are needed only with face detection).
SERVING_PACKAGES = (
    ("mlflow",),
    ("onnxruntime",),
    ("keras",),
    ("tensorflow-cpu", "tensorflow"),
    ("numpy",),
    ("pandas",),
    ("pillow",),
    ("omegaconf",),
    ("mtcnn",),
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


def face_detector() -> tuple[Callable, Callable] | None:
    """soundmood.inference's (detect_faces, combine_mood), when that module provides them."""
    try:
        from soundmood.inference import combine_mood, detect_faces
    except ImportError:
        return None
    return detect_faces, combine_mood


Forward = Callable[[np.ndarray], np.ndarray]  # uint8 faces (N, S, S, 3) -> probabilities (N, C)


def onnx_model(model: Any, opset: int = 17) -> bytes:
    """The Keras classifier as an ONNX graph, what the served model and evaluate run. ONNX
    Runtime on 2 cores, MobileNetV2 at 160 px: a face and its mirror in 3.7 against 16.8 ms
    p50 for TensorFlow's traced call; 580 against 330 faces/s at batch 16 (2026-12-02), with
    probabilities within 1e-6. The variables are frozen first: converting the traced function
    as it is (tf2onnx, or keras' export(format="onnx")) leaves the Normalization layer's
    constants as graph inputs."""
    import logging

    import tensorflow as tf
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    tf2onnx.logging.set_level(logging.ERROR)
    spec = tf.TensorSpec((None, *model.input_shape[1:]), model.inputs[0].dtype, name="image")
    traced = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    frozen = convert_variables_to_constants_v2(traced.get_concrete_function())
    proto, _ = tf2onnx.convert.from_graph_def(
        frozen.graph.as_graph_def(),
        input_names=[t.name for t in frozen.inputs],
        output_names=[t.name for t in frozen.outputs],
        opset=opset,
    )
    return proto.SerializeToString()


class OnnxForward:
    """An ONNX Runtime session over a file onnx_model wrote, called as a Forward; `threads` 0
    lets ONNX Runtime take one per physical core."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        image = self.session.get_inputs()[0]
        self.input_name, self.image_size = image.name, int(image.shape[1])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[0]


def tta_probabilities(
    forward: Forward, faces: np.ndarray, batch_size: int, tta_flip: bool
) -> np.ndarray:
    """Class probabilities of `faces` in chunks of `batch_size`; with `tta_flip` averaged with
    those of the mirrored faces. The served model and evaluate both predict through this, so
    the served predictions are the evaluated ones."""
    chunks = []
    for start in range(0, len(faces), batch_size):
        batch = faces[start : start + batch_size]
        if not tta_flip:
            chunks.append(forward(batch))
            continue
        # the faces and their mirrors in one call: one dispatch instead of two per request
        both = forward(np.concatenate([batch, batch[:, :, ::-1]]))
        chunks.append((both[: len(batch)] + both[len(batch) :]) / 2)
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)


class FaceExpressionModel(mlflow.pyfunc.PythonModel):
    """The classifier's ONNX export behind an image-bytes interface (see the module docstring)."""

    def __init__(self, classes: list[str], tta_flip: bool, batch_size: int = 64) -> None:
        self.classes = list(classes)
        self.tta_flip = tta_flip  # as evaluate scored it, so served = evaluated predictions
        self.batch_size = batch_size

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        # ONNX Runtime, not Keras: 4x faster for one face, and no TensorFlow import to serve
        self.forward = OnnxForward(context.artifacts[ONNX_ARTIFACT])
        self.image_size = self.forward.image_size
        config = context.model_config or {}
        self.detect_faces_default = bool(config.get(DETECT_FACES, False))
        # cfg.inference as logged (None: soundmood.inference's defaults, which equal conf/)
        self.inference_settings = config.get(INFERENCE_SETTINGS)

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
        from soundmood.data.images import ImageError, load_face

        try:
            return load_face(data, self.image_size, name=f"image[{row}]")
        except ImageError as exc:
            raise invalid_input(f"{exc}; send an encoded JPEG, PNG or WebP file") from exc

    def probabilities(self, faces: np.ndarray | None) -> np.ndarray:
        if faces is None:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return tta_probabilities(self.forward, faces, self.batch_size, self.tta_flip)

    def frame(self, probs: np.ndarray, faces: list[int] | None = None) -> pd.DataFrame:
        out = pd.DataFrame(probs.astype(np.float64), columns=self.classes)
        out[LABEL_COLUMN] = [self.classes[i] for i in probs.argmax(axis=1)] if len(probs) else []
        if faces is not None:
            out[FACES_COLUMN] = np.asarray(faces, dtype=np.int64)
        return out

    def predict_photos(self, cells: list[object]) -> pd.DataFrame:
        """Full photos: classify every detected face and combine them into one row per photo
        (as `soundmood predict` does); a photo without a detected face is classified whole."""
        from soundmood.data.images import ImageError, open_image, to_rgb

        detector = face_detector()
        if detector is None:
            raise invalid_input(
                f"{DETECT_FACES}=true, but this model was logged without a face "
                "detector (soundmood.inference.detect_faces); send face crops "
                f"with {DETECT_FACES}=false"
            )
        detect, combine = detector
        crops, owner, areas, counts = [], [], [], []
        for row, value in enumerate(cells):
            try:
                photo = to_rgb(open_image(encoded_bytes(value, row), name=f"image[{row}]"))
            except ImageError as exc:
                raise invalid_input(f"{exc}; send an encoded JPEG, PNG or WebP file") from exc
            faces = detect(photo, self.inference_settings)
            counts.append(len(faces))
            for face in faces or [photo]:
                crops.append(self.face_input(face))
                areas.append(float(getattr(face, "area", 1.0)))
                owner.append(row)
        probs = self.probabilities(np.stack(crops) if crops else None)
        owner_arr, areas_arr = np.asarray(owner), np.asarray(areas)
        weighting = (self.inference_settings or {}).get("mood", {}).get("weighting", "area")
        rows = [
            combine(probs[owner_arr == row], areas_arr[owner_arr == row], weighting)
            for row in range(len(cells))
        ]
        return self.frame(np.stack(rows) if rows else probs, counts)

    def face_input(self, face: Any) -> np.ndarray:
        """A detected face (soundmood.inference.Face, or any crop image/array) as model input."""
        from soundmood.data.images import resize

        if hasattr(face, "crop") and callable(face.crop) and not hasattr(face, "mode"):
            return face.crop(self.image_size)  # Face.crop resizes as training did
        return resize(_as_image(face), self.image_size)


def _as_image(crop: Any) -> Any:
    """A detector's crop (PIL image or uint8 array) as an RGB PIL image."""
    from PIL import Image

    from soundmood.data.images import to_rgb

    if not isinstance(crop, Image.Image):
        crop = Image.fromarray(np.asarray(crop, dtype=np.uint8))
    return to_rgb(crop)


def signature(classes: list[str]) -> mlflow.models.ModelSignature:
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("binary", IMAGE_COLUMN)])
    outputs = Schema(
        [
            *(ColSpec("double", name) for name in classes),
            ColSpec("string", LABEL_COLUMN),
            ColSpec("long", FACES_COLUMN, required=False),
        ]
    )
    # None: use the model_config default (false unless the model was logged otherwise)
    params = ParamSchema([ParamSpec(DETECT_FACES, "boolean", None)])
    return mlflow.models.ModelSignature(inputs=inputs, outputs=outputs, params=params)


def pip_requirements() -> list[str]:
    pins = []
    for alternatives in SERVING_PACKAGES:
        for package in alternatives:
            try:
                pins.append(f"{package}=={version(package)}")
                break
            except PackageNotFoundError:
                continue
    return pins


def encode_png(image: np.ndarray) -> bytes:
    """A uint8 RGB array as PNG bytes (lossless, so load_face returns the same pixels)."""
    import io

    from PIL import Image

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
) -> mlflow.models.model.ModelInfo:
    """Log the served model to the active run: the .keras and .onnx files, this package, a
    signature and an input example (PNG-encoded `examples`, uint8 RGB faces). `inference`:
    cfg.inference as a plain dict, for the detect_faces option (None: soundmood.inference's
    defaults)."""
    import soundmood

    example = pd.DataFrame({IMAGE_COLUMN: [encode_png(x) for x in examples]})
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=FaceExpressionModel(classes, tta_flip, batch_size),
        artifacts={KERAS_ARTIFACT: str(keras_path), ONNX_ARTIFACT: str(onnx_path)},
        code_paths=[str(Path(soundmood.__file__).parent)],
        signature=signature(classes),
        input_example=example,
        model_config={DETECT_FACES: detect_faces, INFERENCE_SETTINGS: inference},
        pip_requirements=pip_requirements(),
    )
