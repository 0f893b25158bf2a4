"""The `inference` config group (conf/inference/default.yaml) as checked, typed settings.

The defaults below mirror conf/inference/default.yaml so that a caller without params.yaml (the
served pyfunc calling detect_faces) detects and crops exactly as `soundmood predict` does;
tests/test_inference.py fails if the two drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from soundmood.errors import ConfigError
from soundmood.inference.mood import MOOD_WEIGHTINGS

CROP_METHODS = ("align", "box")
DETECTORS = ("mtcnn",)


@dataclass(frozen=True)
class DetectorSettings:
    name: str = "mtcnn"
    max_side: int = 1280
    min_face_size: int = 20
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8)
    min_confidence: float = 0.9
    max_faces: int = 20


@dataclass(frozen=True)
class CropSettings:
    method: str = "align"
    margin: float = 0.0
    size: int = 100
    template: tuple[tuple[float, float], ...] = (
        (25.83, 33.53),
        (71.73, 33.27),
        (48.21, 55.48),
        (27.82, 75.07),
        (69.6, 75.08),
    )
    fill: tuple[int, int, int] = (0, 0, 0)


@dataclass(frozen=True)
class MoodSettings:
    weighting: str = "area"


@dataclass(frozen=True)
class LimitSettings:
    max_files: int = 10000


@dataclass(frozen=True)
class Settings:
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    crop: CropSettings = field(default_factory=CropSettings)
    # The model's top probability an answer needs to count as confident (not the detector's face
    # score, detector.min_confidence). None: the threshold train chose on validation.
    min_confidence: float | None = None
    # Accuracy train asks of the confident answers when it chooses min_confidence.
    confident_precision: float = 0.95
    mood: MoodSettings = field(default_factory=MoodSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able form (what `from_config` reads back)."""
        return {f.name: _as_plain(getattr(self, f.name)) for f in fields(self)}


def _as_plain(section: object) -> object:
    def plain(value: object) -> object:
        return [plain(v) for v in value] if isinstance(value, tuple) else value

    if not is_dataclass(section):
        return section  # a top-level scalar (min_confidence, confident_precision)
    return {f.name: plain(getattr(section, f.name)) for f in fields(section)}


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"inference.{key}: {message}")


def _section(cls: type, values: Mapping[str, Any], name: str) -> object:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    _require(not unknown, name, f"unknown keys {unknown}; known: {sorted(known)}")
    return cls(**{k: _as_tuple(v) for k, v in values.items()})


def _as_tuple(value: object) -> object:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def validate(settings: Settings) -> Settings:
    """Reject values detection could not use, naming the key."""
    det, crop = settings.detector, settings.crop
    _require(det.name in DETECTORS, "detector.name", f"{det.name!r} is not one of {DETECTORS}")
    _require(
        isinstance(det.max_side, int) and det.max_side >= 64,
        "detector.max_side",
        "must be an int >= 64",
    )
    _require(
        isinstance(det.min_face_size, int) and det.min_face_size >= 12,
        "detector.min_face_size",
        "must be an int >= 12 (MTCNN's smallest window)",
    )
    _require(
        len(det.thresholds) == 3 and all(0 <= t < 1 for t in det.thresholds),
        "detector.thresholds",
        "must be three scores in [0, 1)",
    )
    _require(0 <= det.min_confidence < 1, "detector.min_confidence", "must be in [0, 1)")
    _require(
        isinstance(det.max_faces, int) and det.max_faces >= 1,
        "detector.max_faces",
        "must be an int >= 1",
    )
    _require(
        crop.method in CROP_METHODS, "crop.method", f"{crop.method!r} is not one of {CROP_METHODS}"
    )
    _require(-0.3 <= crop.margin <= 1.0, "crop.margin", "must be in [-0.3, 1.0]")
    _require(isinstance(crop.size, int) and crop.size >= 16, "crop.size", "must be an int >= 16")
    _require(
        len(crop.template) == 5 and all(len(p) == 2 for p in crop.template),
        "crop.template",
        "must be five [x, y] points (eyes, nose, mouth corners)",
    )
    _require(
        len(crop.fill) == 3 and all(0 <= c <= 255 for c in crop.fill),
        "crop.fill",
        "must be an RGB triple of 0-255 ints",
    )
    _require(
        settings.min_confidence is None
        or (_is_number(settings.min_confidence) and 0 <= settings.min_confidence <= 1),
        "min_confidence",
        f"{settings.min_confidence!r} must be null (the threshold train chose) or a number in"
        " [0, 1] (the model's top probability; the detector's score is detector.min_confidence)",
    )
    _require(
        _is_number(settings.confident_precision) and 0 < settings.confident_precision <= 1,
        "confident_precision",
        f"{settings.confident_precision!r} must be a number in (0, 1]",
    )
    _require(
        settings.mood.weighting in MOOD_WEIGHTINGS,
        "mood.weighting",
        f"{settings.mood.weighting!r} is not one of {MOOD_WEIGHTINGS}",
    )
    _require(
        isinstance(settings.limits.max_files, int) and settings.limits.max_files >= 1,
        "limits.max_files",
        "must be an int >= 1",
    )
    return settings


def from_config(section: DictConfig | Mapping[str, Any] | Settings | None) -> Settings:
    """Settings from cfg.inference (or the plain dict `Settings.to_dict` gives); None: defaults."""
    if isinstance(section, Settings):
        return section
    if section is None:
        return validate(Settings())
    values = (
        OmegaConf.to_container(section, resolve=True)
        if isinstance(section, DictConfig)
        else dict(section)
    )
    parts = {
        "detector": DetectorSettings,
        "crop": CropSettings,
        "mood": MoodSettings,
        "limits": LimitSettings,
    }
    scalars = ("min_confidence", "confident_precision")
    unknown = sorted(set(values) - set(parts) - set(scalars))
    if unknown:
        known = sorted([*parts, *scalars])
        raise ConfigError(f"inference: unknown keys {unknown}; known: {known}")
    return validate(
        Settings(
            **{name: _section(cls, values.get(name, {}), name) for name, cls in parts.items()},
            **{name: values[name] for name in scalars if name in values},
        )
    )
