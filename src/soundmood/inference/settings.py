"""The `inference` config group (conf/inference/default.yaml) as checked, typed settings.

Keys, ranges and defaults are soundmood.schema's; the dataclasses here only give them types.
A caller without a config (the served pyfunc calling detect_faces, `from_config(None)`) gets the
schema's declared defaults, which tests/test_inference.py holds conf/inference/default.yaml to.
The schema, not conf/, is the one source: the served model ships src/soundmood without conf/ and
must not load Hydra, while DVC needs conf/inference/default.yaml as a plain group file.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from soundmood import schema
from soundmood.errors import ConfigError

KEY = "inference"


@dataclass(frozen=True)
class DetectorSettings:
    name: str
    max_side: int
    min_face_size: int
    thresholds: tuple[float, float, float]
    min_confidence: float
    max_faces: int


@dataclass(frozen=True)
class CropSettings:
    method: str
    margin: float
    size: int
    template: tuple[tuple[float, float], ...]
    fill: tuple[int, int, int]


@dataclass(frozen=True)
class MoodSettings:
    weighting: str


@dataclass(frozen=True)
class LimitSettings:
    max_files: int


SECTIONS = {
    "detector": DetectorSettings,
    "crop": CropSettings,
    "mood": MoodSettings,
    "limits": LimitSettings,
}


@dataclass(frozen=True)
class Settings:
    detector: DetectorSettings
    crop: CropSettings
    # The model's top probability an answer needs to count as confident (not the detector's face
    # score, detector.min_confidence). None: the threshold train chose on validation.
    min_confidence: float | None
    # Accuracy train asks of the confident answers when it chooses min_confidence.
    confident_precision: float
    mood: MoodSettings
    limits: LimitSettings

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able form (what `from_config` reads back)."""
        return {f.name: _as_plain(getattr(self, f.name)) for f in fields(self)}


def _as_plain(section: object) -> object:
    def plain(value: object) -> object:
        return [plain(v) for v in value] if isinstance(value, tuple) else value

    if not is_dataclass(section):
        return section  # a top-level scalar (min_confidence, confident_precision)
    return {f.name: plain(getattr(section, f.name)) for f in fields(section)}


def _as_tuple(value: object) -> object:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def _over(defaults: dict[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """`given` laid over `defaults`, section by section (a partial mapping keeps the rest)."""
    out = dict(defaults)
    for key, value in given.items():
        both = isinstance(out.get(key), dict) and isinstance(value, Mapping)
        out[key] = _over(out[key], value) if both else value
    return out


@functools.cache
def _defaults() -> Settings:
    return _build(schema.defaults(KEY))


def _build(values: Mapping[str, Any]) -> Settings:
    """Settings from a complete `inference` mapping, checked against the schema."""
    schema.raise_problems(schema.problems(values, schema.subtable(KEY), f"{KEY}."))
    sections = {
        name: cls(**{k: _as_tuple(v) for k, v in values[name].items()})
        for name, cls in SECTIONS.items()
    }
    scalars = {k: v for k, v in values.items() if k not in SECTIONS}
    return Settings(**sections, **scalars)


def from_config(section: DictConfig | Mapping[str, Any] | Settings | None) -> Settings:
    """Settings from cfg.inference (or the plain dict `Settings.to_dict` gives, or a part of
    one); None: the schema's defaults. A bad or unknown key is a ConfigError naming it."""
    if isinstance(section, Settings):
        return section
    if section is None:
        return _defaults()
    if isinstance(section, DictConfig):
        section = OmegaConf.to_container(section, resolve=True)
    if not isinstance(section, Mapping):
        raise ConfigError(f"{KEY}: {section!r} is not a mapping of inference settings")
    return _build(_over(schema.defaults(KEY), section))
