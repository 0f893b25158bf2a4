"""Find faces in a photo and frame each one as RAF-DB's aligned crops are framed.

The detector is MTCNN (the `mtcnn` package; its weights ship inside the wheel, so nothing is
downloaded); the packaged alternatives measured against it, none both as accurate and ten times
faster, are in docs/inference.md ("Which detector"). Each face is cropped by a similarity
transform: with `crop.method: align` the one that maps MTCNN's five landmarks onto
`crop.template` (where MTCNN finds them on RAF-DB's own aligned crops), with `box` an upright
square around the detector's box. The crop is made at `crop.size` (RAF-DB's 100 px) and then
resized to the model's input by soundmood.data.images.resize, exactly as training resized
RAF-DB's crops.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import threading
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from soundmood.data.images import open_image, resize, to_rgb
from soundmood.inference.settings import CropSettings, Settings, from_config

# MTCNN's landmark names, in the order of crop.template (image-left eye first).
LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
# MTCNN's P-Net window: a photo smaller than this on either side cannot hold a face.
MIN_DETECTABLE_SIDE = 12
# The largest min_face_size mtcnn 1.0 is called with: its pyramid has as many levels as for
# this size whatever the size asked, so above it the last levels fall under P-Net's window and
# TensorFlow's error reads as "no face". A larger detector.min_face_size downscales the photo.
MTCNN_FACE_SIZE = 20
# What MTCNN imports or runs with besides numpy and Pillow (import name -> distribution): it
# imports tensorflow and joblib, and joblib reads its .lz4 weights with lz4.
DETECTOR_MODULES = {
    "mtcnn": "mtcnn",
    "tensorflow": "tensorflow-cpu or tensorflow",
    "joblib": "joblib",
    "lz4": "lz4",
}

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Face:
    """One detected face, in the photo's upright pixel frame (EXIF orientation applied).

    `np.asarray(face)` is the RAF-DB-style crop at `crop.size` (uint8 RGB), so callers that take
    "an image of the face" can use a Face directly.
    """

    box: Box  # x, y, width, height (the detector's box, clipped to the photo)
    confidence: float  # the detector's final (O-Net) score
    landmarks: tuple[tuple[float, float], ...]  # x, y for each of LANDMARKS
    photo: Image.Image = field(repr=False, compare=False)
    settings: CropSettings = field(repr=False, compare=False)

    @property
    def area(self) -> int:
        return self.box[2] * self.box[3]

    def crop(self, size: int | None = None) -> np.ndarray:
        """The face as model input: uint8 RGB (size, size, 3); None: at `crop.size`."""
        crop = crop_face(self.photo, self.box, self.landmarks, self.settings)
        return np.asarray(crop, dtype=np.uint8) if size is None else resize(crop, size)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        crop = self.crop()
        return crop if dtype is None else crop.astype(dtype)


def load_photo(path: str | Path) -> Image.Image:
    """An upright RGB photo, decoded as `soundmood predict` and the served model decode it."""
    return to_rgb(open_image(path))


def require_detector() -> None:
    """Raise ModuleNotFoundError naming every distribution detection needs that is not
    installed. It only looks the modules up (no import: MTCNN's TensorFlow takes seconds), so
    the served model calls it at load time and fails there, not on the first photo."""
    missing = {m: d for m, d in DETECTOR_MODULES.items() if importlib.util.find_spec(m) is None}
    if missing:
        raise ModuleNotFoundError(
            f"face detection (MTCNN) needs {', '.join(missing.values())}, which "
            "this environment lacks; install the model's requirements.txt",
            name=next(iter(missing)),
        )


def detect_faces(image: Image.Image | np.ndarray, settings: Any = None) -> list[Face]:
    """Every face in `image` (PIL image of any mode, or HxWx3 uint8 RGB array), left to right.

    `settings`: cfg.inference, its plain-dict form, a Settings, or None for the defaults (which
    equal conf/inference/default.yaml). Photos longer than `detector.max_side` are downscaled
    for detection only; boxes and crops are in, and from, the full-resolution photo. No face:
    an empty list. Thread-safe (detection itself is serialised).
    """
    config = from_config(settings)
    photo = (
        to_rgb(image)
        if isinstance(image, Image.Image)
        else Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).convert("RGB")
    )
    found = _run_detector(photo, config)
    det = config.detector
    faces = [f for f in found if f.confidence >= det.min_confidence]
    faces = sorted(faces, key=lambda f: -f.confidence)[: det.max_faces]
    return sorted(faces, key=lambda f: (f.box[0], f.box[1]))


def _run_detector(photo: Image.Image, config: Settings) -> list[Face]:
    if min(photo.size) < MIN_DETECTABLE_SIDE:
        return []
    det = config.detector
    # faces of min_face_size px on the max_side copy are MTCNN_FACE_SIZE px on this one
    shrink = MTCNN_FACE_SIZE / max(det.min_face_size, MTCNN_FACE_SIZE)
    scale = min(1.0, det.max_side / max(photo.size)) * shrink
    small = (
        photo
        if scale == 1.0
        else photo.resize(
            (max(1, round(photo.width * scale)), max(1, round(photo.height * scale))),
            Image.Resampling.BILINEAR,
            reducing_gap=None,
        )
    )
    if min(small.size) < MIN_DETECTABLE_SIDE:
        return []
    with _DETECTOR_LOCK:
        raw = _mtcnn().detect_faces(
            np.asarray(small),
            min_face_size=min(det.min_face_size, MTCNN_FACE_SIZE),
            threshold_pnet=det.thresholds[0],
            threshold_rnet=det.thresholds[1],
            threshold_onet=det.thresholds[2],
        )
    sx, sy = photo.width / small.width, photo.height / small.height
    return [_face(r, sx, sy, photo, config.crop) for r in raw]


def _face(raw: dict, sx: float, sy: float, photo: Image.Image, crop: CropSettings) -> Face:
    x, y, w, h = (float(v) for v in raw["box"])
    x0, y0 = max(0, round(x * sx)), max(0, round(y * sy))
    x1, y1 = min(photo.width, round((x + w) * sx)), min(photo.height, round((y + h) * sy))
    points = tuple(
        (float(raw["keypoints"][n][0]) * sx, float(raw["keypoints"][n][1]) * sy) for n in LANDMARKS
    )
    return Face(
        (x0, y0, max(1, x1 - x0), max(1, y1 - y0)), float(raw["confidence"]), points, photo, crop
    )


_DETECTOR_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _mtcnn() -> Any:
    """MTCNN with the weights inside the package named by absolute path (mtcnn would otherwise
    first look for pnet.lz4 etc. in the working directory)."""
    # deferred: mtcnn imports TensorFlow (seconds); require_detector checks it is installed
    from mtcnn import MTCNN
    from mtcnn.stages import StageONet, StagePNet, StageRNet

    weights = files("mtcnn.assets.weights")
    return MTCNN(
        stages=[
            StagePNet(weights=str(weights / "pnet.lz4")),
            StageRNet(weights=str(weights / "rnet.lz4")),
            StageONet(weights=str(weights / "onet.lz4")),
        ]
    )


# --- cropping -------------------------------------------------------------------------------


def crop_face(
    photo: Image.Image, box: Box, landmarks: tuple[tuple[float, float], ...], crop: CropSettings
) -> Image.Image:
    """The face framed like RAF-DB's aligned crops: a crop.size x crop.size RGB image."""
    if crop.method == "align":
        forward = align_transform(np.asarray(landmarks), crop)
    else:
        forward = box_transform(box, crop)
    return warp(photo, forward, crop.size, tuple(crop.fill))


def align_transform(landmarks: np.ndarray, crop: CropSettings) -> np.ndarray:
    """2x3 similarity (photo -> crop) taking the landmarks onto the margin-widened template."""
    centre = crop.size / 2
    template = np.asarray(crop.template, dtype=np.float64) * (crop.size / 100.0)
    template = centre + (template - centre) / (1 + 2 * crop.margin)
    return fit_similarity(landmarks, template)


def box_transform(box: Box, crop: CropSettings) -> np.ndarray:
    """2x3 scale+shift (photo -> crop) of a square of side max(w, h) * (1 + 2 margin)."""
    x, y, w, h = box
    side = max(w, h) * (1 + 2 * crop.margin)
    k = crop.size / side
    cx, cy = x + w / 2, y + h / 2
    return np.array([[k, 0.0, crop.size / 2 - k * cx], [0.0, k, crop.size / 2 - k * cy]])


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation+scale+shift taking points `src` onto `dst` (2x3 matrix).

    As complex numbers the model is dst = c * src + t, whose least-squares c has a closed form.
    skimage's SimilarityTransform fits the same (tests/test_inference.py compares them), but
    scikit-image and SciPy would join the served model's environment for these six lines.
    """
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    zs = (src - mu_s) @ np.array([1, 1j])
    zd = (dst - mu_d) @ np.array([1, 1j])
    c = np.vdot(zs, zd) / max(float(np.vdot(zs, zs).real), 1e-9)
    linear = np.array([[c.real, -c.imag], [c.imag, c.real]])
    return np.hstack([linear, (mu_d - linear @ mu_s)[:, None]])


def warp(photo: Image.Image, forward: np.ndarray, size: int, fill: tuple[int, ...]) -> Image.Image:
    """Apply the 2x3 photo->crop map, area-averaging first when the face is much larger than
    the crop (a bilinear warp alone would skip pixels and alias)."""
    scale = math.sqrt(abs(np.linalg.det(forward[:, :2])))
    factor = int(1 / scale) if scale > 0 else 1
    if factor > 1:
        photo, forward = _reduced_region(photo, forward, size, factor)
    inverse = np.linalg.inv(np.vstack([forward, [0.0, 0.0, 1.0]]))[:2]
    return photo.transform(
        (size, size),
        Image.Transform.AFFINE,
        tuple(inverse.ravel()),
        Image.Resampling.BILINEAR,
        fillcolor=fill,
    )


def _reduced_region(
    photo: Image.Image, forward: np.ndarray, size: int, factor: int
) -> tuple[Image.Image, np.ndarray]:
    """The part of the photo the crop needs, box-filtered down by `factor`, and the map from it."""
    inverse = np.linalg.inv(np.vstack([forward, [0.0, 0.0, 1.0]]))[:2]
    corners = inverse @ np.array([[0, size, 0, size], [0, 0, size, size], [1, 1, 1, 1]])
    x0 = max(0, math.floor(corners[0].min()) - factor)
    y0 = max(0, math.floor(corners[1].min()) - factor)
    x1 = min(photo.width, math.ceil(corners[0].max()) + factor)
    y1 = min(photo.height, math.ceil(corners[1].max()) + factor)
    if x1 - x0 < factor or y1 - y0 < factor:
        return photo, forward
    region = photo.crop((x0, y0, x1, y1)).reduce(factor)
    # a photo point p is region point q with p = factor * q + (x0, y0)
    linear = forward[:, :2]
    return region, np.hstack([linear * factor, (forward[:, 2] + linear @ [x0, y0])[:, None]])
