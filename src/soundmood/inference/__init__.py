"""Mood from real photos: find the faces, frame each like RAF-DB's aligned crops, classify them
and combine them into one mood per photo. `soundmood predict` and the served model share this.

Stable API (docs/inference.md):
    detect_faces(image, settings=None) -> list[Face]
        image: PIL image (any mode) or HxWx3 uint8 RGB array, upright. Face: box (x, y, w, h),
        confidence, landmarks, area, crop(size) -> uint8 (size, size, 3) model input;
        np.asarray(face) is the crop at RAF-DB's 100 px.
    load_photo(path) -> the upright RGB photo, decoded as `soundmood predict` decodes it
    predict_photo(model, image, cfg, min_confidence=0.0) -> PhotoResult (faces with
        probabilities, label and confident; the mood of the confident faces, or None with
        mood_reason)
    combine_mood(probs, areas, weighting) -> one probability vector for the photo
    load_model(uri_or_path, cfg=None) -> the classifier: a Keras model (.keras file, keras
        flavor) or, for the served pyfunc, its ONNX graph (soundmood.forward.OnnxForward)
    load_predictor(uri_or_path, cfg) -> (the classifier, Threshold: the min_confidence in force
        and where it came from; resolve_min_confidence says the order)

The command line (`soundmood predict`: collect_photos, predict_file, predict_cli) lives in
soundmood.inference.command, which this package does not import: the served model imports
soundmood.inference.detect and .mood, and must not load the CLI's rich and tqdm.
"""

from soundmood.inference.detect import LANDMARKS, Face, crop_face, detect_faces, load_photo
from soundmood.inference.mood import combine_mood
from soundmood.inference.predict import (
    FaceResult,
    ModelLoadError,
    PhotoResult,
    classify,
    input_size,
    load_model,
    load_predictor,
    predict_photo,
    resolve_min_confidence,
)
from soundmood.inference.settings import Settings, from_config

__all__ = [
    "LANDMARKS",
    "Face",
    "FaceResult",
    "ModelLoadError",
    "PhotoResult",
    "Settings",
    "classify",
    "combine_mood",
    "crop_face",
    "detect_faces",
    "from_config",
    "input_size",
    "load_model",
    "load_photo",
    "load_predictor",
    "predict_photo",
    "resolve_min_confidence",
]
