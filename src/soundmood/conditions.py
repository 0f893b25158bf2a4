"""What conf/ may say about the capture degradations (soundmood.degradations): each one's
parameters with their ranges and meanings, evaluate's named conditions (evaluate.conditions) and
training's random versions (train.augment), all checked before any work, naming the offending key.

It imports nothing of the package but errors, and no TensorFlow, so that configuration checks can
use it without loading a model library.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from soundmood.errors import ConfigError

CONDITIONS_KEY = "evaluate.conditions"
AUGMENT_KEY = "train.augment"
CLEAN = "clean"
RESERVED_NAMES = (CLEAN, "worst", "mean")  # would collide with summary metric names
# nor may a name end so: robust_<name>_confident_accuracy is a trust figure, not an accuracy
CONFIDENT_SUFFIX = "_confident"
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Param:
    """A numeric parameter in [low, high]; `open_low` excludes `low` itself."""

    kind: type
    low: float
    high: float
    open_low: bool = False
    meaning: str = ""

    def check(self, key: str, value: Any) -> float | int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: {value!r} is not a number ({self.meaning})")
        if self.kind is int and not float(value).is_integer():
            raise ConfigError(f"{key}: {value!r} is not an integer ({self.meaning})")
        low_ok = value > self.low if self.open_low else value >= self.low
        if not (low_ok and value <= self.high):
            bracket = "(" if self.open_low else "["
            raise ConfigError(
                f"{key}: {value!r} is outside {bracket}{self.low}, {self.high}] ({self.meaning})"
            )
        return self.kind(value)


def check_params(key: str, given: Mapping[str, Any], spec: Mapping[str, Param]) -> dict[str, Any]:
    """Every parameter of `spec` given, each in range, nothing else; the checked values."""
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]}: unknown parameter; expected {', '.join(spec) or 'none'}"
        )
    missing = [p for p in spec if p not in given]
    if missing:
        raise ConfigError(f"{key}.{missing[0]}: missing ({spec[missing[0]].meaning})")
    return {p: spec[p].check(f"{key}.{p}", given[p]) for p in spec}


_FRACTION = dict(kind=float, low=0.0, high=1.0, open_low=True)
# The parameters a condition gives each degradation, in the meaning of soundmood.degradations.
DEGRADATION_PARAMS: dict[str, dict[str, Param]] = {
    "grey": {},
    "lowres": {"size_fraction": Param(**_FRACTION, meaning="low side as a fraction of the side")},
    "jpeg": {"quality": Param(int, 1, 100, meaning="JPEG quality 1-100")},
    "dark": {
        "gamma": Param(float, 0.0, 10.0, open_low=True, meaning="exponent on [0, 1] intensities"),
        "brightness": Param(**_FRACTION, meaning="multiplier after the gamma"),
    },
    "low_contrast": {"factor": Param(**_FRACTION, meaning="scale of deviations from the mean")},
    "rotate": {
        "degrees": Param(
            float, 0.0, 180.0, open_low=True, meaning="rotation angle, sign alternating per image"
        )
    },
    "loose_crop": {
        "face_fraction": Param(float, 0.25, 1.0, meaning="share of the frame the face keeps")
    },
    "tight_crop": {"keep": Param(**_FRACTION, meaning="central share of the frame kept")},
    "shift": {
        "fraction": Param(
            float, 0.0, 0.5, open_low=True, meaning="translation as a fraction of the side"
        )
    },
}


@dataclass(frozen=True)
class Condition:
    """A named, parameterised degradation from evaluate.conditions."""

    name: str
    degradation: str
    params: dict[str, Any]


def parse_conditions(
    conditions: Mapping[str, Any] | DictConfig | None, key: str = CONDITIONS_KEY
) -> list[Condition]:
    """Check every condition and parameter, naming the offending key; nothing is computed here.

    A condition's name is its degradation unless it sets `transform:` (so `jpeg_q10: {transform:
    jpeg, quality: 10}` adds a second JPEG level). Every parameter must be given in conf/.
    """
    if conditions is None:
        return []
    if isinstance(conditions, DictConfig):
        conditions = OmegaConf.to_container(conditions, resolve=True)
    if not isinstance(conditions, Mapping):
        raise ConfigError(f"{key}: expected a mapping of condition name -> parameters")
    return [
        _parse_condition(str(name), params, f"{key}.{name}") for name, params in conditions.items()
    ]


def _parse_condition(name: str, params: Any, key: str) -> Condition:
    if not NAME_PATTERN.match(name) or name in RESERVED_NAMES or name.endswith(CONFIDENT_SUFFIX):
        raise ConfigError(
            f"{key}: condition name {name!r} must match [a-z][a-z0-9_]*, not be one of "
            f"{', '.join(RESERVED_NAMES)} and not end in {CONFIDENT_SUFFIX} (its metrics would "
            "read as another condition's)"
        )
    params = dict(params or {})
    degradation = str(params.pop("transform", name))
    if degradation not in DEGRADATION_PARAMS:
        raise ConfigError(
            f"{key}: unknown condition {degradation!r}; known: "
            f"{', '.join(DEGRADATION_PARAMS)} (or set transform: to one of them)"
        )
    return Condition(name, degradation, check_params(key, params, DEGRADATION_PARAMS[degradation]))


def check_config(cfg: DictConfig) -> list[Condition]:
    """The configured conditions, validated; call first, before loading a model or data."""
    seed = cfg.evaluate.get("condition_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"evaluate.condition_seed: {seed!r} is not an int >= 0")
    return parse_conditions(cfg.evaluate.get("conditions"))


# --- train.augment: each section draws one degradation's parameters per image -----------------

PROBABILITY = Param(float, 0.0, 1.0, meaning="chance each image is degraded")
AUGMENT_SPECS: dict[str, dict[str, Param]] = {
    "gamma": {
        "probability": PROBABILITY,
        "max_gamma": Param(float, 1.0, 10.0, meaning="gamma drawn in [1/max, max]"),
        "min_gain": Param(float, 0.0, 1.0, open_low=True, meaning="darkest gain"),
    },
    "downsample": {
        "probability": PROBABILITY,
        "min_fraction": Param(
            float, 0.0, 1.0, open_low=True, meaning="smallest low side as a fraction of the side"
        ),
    },
    "jpeg": {
        "probability": PROBABILITY,
        "min_quality": Param(int, 1, 100, meaning="lowest JPEG quality"),
        "max_quality": Param(int, 1, 100, meaning="highest JPEG quality"),
    },
}


def check_augment(aug: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """The capture-degradation keys of train.augment, checked: `greyscale` a probability, the
    AUGMENT_SPECS sections their parameters (None when absent, null or with probability 0)."""
    if isinstance(aug, DictConfig):
        aug = OmegaConf.to_container(aug, resolve=True)
    greyscale = aug.get("greyscale") or 0.0
    checked: dict[str, Any] = {
        "greyscale": PROBABILITY.check(f"{AUGMENT_KEY}.greyscale", greyscale)
    }
    for name, spec in AUGMENT_SPECS.items():
        section, key = aug.get(name), f"{AUGMENT_KEY}.{name}"
        if section is not None and not isinstance(section, Mapping):
            raise ConfigError(f"{key}: expected a mapping with {', '.join(spec)}")
        values = None if section is None else check_params(key, section, spec)
        checked[name] = values if values and values["probability"] > 0 else None
    jp = checked["jpeg"]
    if jp and jp["min_quality"] > jp["max_quality"]:
        raise ConfigError(
            f"{AUGMENT_KEY}.jpeg.min_quality: {jp['min_quality']} exceeds "
            f"max_quality {jp['max_quality']}"
        )
    return checked
