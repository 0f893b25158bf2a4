"""What conf/ may say about the capture degradations (soundmood.degradations): each one's
parameters as schema Specs, evaluate's named conditions (evaluate.conditions) and training's random
versions (train.augment, whose keys soundmood.schema declares, its sections' keys here), all
checked before any work, naming the offending key.

It imports nothing of the package but the schema and errors, and no TensorFlow, so that
configuration checks can use it without loading a model library.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from soundmood import schema
from soundmood.errors import ConfigError
from soundmood.schema import Spec, integer, number

CONDITIONS_KEY = "evaluate.conditions"
AUGMENT_KEY = "train.augment"
CLEAN = "clean"
REDETECTED = "redetected"  # the detection path's condition (evaluate.redetect)
# its own figures; a suffix that ends another comes first (robust_redetected_accuracy_on_detected)
DETECTION_STATS = ("accuracy_on_detected", "detected")
SUMMARY_NAMES = (CLEAN, "worst", "mean")  # robust_worst_accuracy etc. name no condition
# would collide with summary metric names, or with the detection path's condition
RESERVED_NAMES = (*SUMMARY_NAMES, REDETECTED)
# nor may a name end so: robust_<name>_confident_accuracy is a trust figure, not an accuracy
CONFIDENT_SUFFIX = "_confident"
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
MIN_ERASED = 0.02  # the smallest erased share RandomErasing draws (its scale's low end)


# The parameters a condition gives each degradation, in the meaning of soundmood.degradations.
DEGRADATION_PARAMS: dict[str, dict[str, Spec]] = {
    "grey": {},
    "lowres": {"size_fraction": number("low side as a fraction of the side", **schema.FRACTION)},
    "jpeg": {"quality": integer("JPEG quality 1-100", 1, 100)},
    "dark": {
        "gamma": number("exponent on [0, 1] intensities", 0.0, 10.0, open_low=True),
        "brightness": number("multiplier after the gamma", **schema.FRACTION),
    },
    "low_contrast": {"factor": number("scale of deviations from the mean", **schema.FRACTION)},
    "rotate": {
        "degrees": number("rotation angle, sign alternating per image", 0.0, 180.0, open_low=True)
    },
    "loose_crop": {"face_fraction": number("share of the frame the face keeps", 0.25, 1.0)},
    "tight_crop": {"keep": number("central share of the frame kept", **schema.FRACTION)},
    "shift": {"fraction": number("translation as a fraction of the side", 0.0, 0.5, open_low=True)},
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
    if conditions is not None and not isinstance(conditions, Mapping | DictConfig):
        raise ConfigError(f"{key}: expected a mapping of condition name -> parameters")
    schema.raise_problems(condition_problems(conditions, key))
    return [_condition(str(name), params) for name, params in _plain(conditions).items()]


def condition_problems(conditions: Any, key: str = CONDITIONS_KEY) -> list[str]:
    """Every problem of evaluate.conditions' entries (the mapping itself: the schema's)."""
    if not isinstance(conditions, Mapping | DictConfig):
        return []
    found = []
    for name, params in _plain(conditions).items():
        where = f"{key}.{name}"
        if (
            not NAME_PATTERN.match(str(name))
            or name in RESERVED_NAMES
            or str(name).endswith(CONFIDENT_SUFFIX)
        ):
            found.append(
                f"{where}: condition name {name!r} must match [a-z][a-z0-9_]*, not be one of "
                f"{', '.join(RESERVED_NAMES)} and not end in {CONFIDENT_SUFFIX} (its metrics "
                "would read as another condition's)"
            )
            continue
        if params is not None and not isinstance(params, Mapping):
            found.append(f"{where}: {params!r} is not a mapping of parameters")
            continue
        params = dict(params or {})
        degradation = str(params.pop("transform", name))
        if degradation not in DEGRADATION_PARAMS:
            found.append(
                f"{where}: unknown condition {degradation!r}; known: "
                f"{', '.join(DEGRADATION_PARAMS)} (or set transform: to one of them)"
            )
            continue
        specs = DEGRADATION_PARAMS[degradation]
        found += schema.problems(params, specs, f"{where}.", noun="parameter")
    return found


def _plain(values: Any) -> dict[str, Any]:
    if isinstance(values, DictConfig):
        return OmegaConf.to_container(values, resolve=True)
    return dict(values or {})


def _condition(name: str, params: Any) -> Condition:
    """A condition already checked by condition_problems."""
    params = dict(params or {})
    degradation = str(params.pop("transform", name))
    specs = DEGRADATION_PARAMS[degradation]
    return Condition(name, degradation, {p: spec.check(p, params[p]) for p, spec in specs.items()})


def check_config(cfg: DictConfig) -> list[Condition]:
    """The configured conditions (and the detection path's contexts), validated; call first,
    before loading a model or data."""
    seed_key = "evaluate.condition_seed"
    schema.KEYS[seed_key].check(seed_key, cfg.evaluate.get("condition_seed", 0))
    schema.raise_problems(redetect_problems(OmegaConf.select(cfg, REDETECT_KEY)))
    return parse_conditions(cfg.evaluate.get("conditions"))


# --- evaluate.redetect.contexts: the detection path's pictures (soundmood.inference.redetect) ---

REDETECT_KEY = "evaluate.redetect.contexts"
FACE_SIDE = Spec("range", "[smallest, largest] face side in the picture, px", 16, 1024)
REDETECT_CONTEXTS: dict[str, dict[str, Spec]] = {
    "margin": {"face_side": FACE_SIDE},
    "background": {"face_side": FACE_SIDE, "canvas": number("picture / face side", 1.0, 8.0)},
    "rotation": {"face_side": FACE_SIDE, "degrees": number("largest roll either way", 0.0, 45.0)},
    "webcam": {"face_side": FACE_SIDE, "grey": schema.flag("greyscale picture")},
}


def redetect_problems(contexts: Any) -> list[str]:
    """Every problem of evaluate.redetect.contexts: an unknown context, a missing, unknown or bad
    parameter. A context set to null is off."""
    if not isinstance(contexts, Mapping | DictConfig):
        return []
    found = []
    for name, params in _plain(contexts).items():
        where = f"{REDETECT_KEY}.{name}"
        if name not in REDETECT_CONTEXTS:
            found.append(f"{where}: unknown context; known: {', '.join(REDETECT_CONTEXTS)}")
        elif params is not None and not isinstance(params, Mapping):
            found.append(f"{where}: {params!r} is not a mapping of parameters")
        elif params is not None:
            specs = REDETECT_CONTEXTS[name]
            found += schema.problems(params, specs, f"{where}.", noun="parameter")
    return found


# --- train.augment: each capture section draws one degradation's parameters per image ---------

# The keys of train.augment's sections (schema.AUGMENT_SECTIONS, open mappings there), every one
# required: the capture degradations, in the order a camera applies them, Keras layers, mixing.
AUGMENT_SECTION_KEYS: dict[str, dict[str, Spec]] = {
    "gamma": {
        "probability": schema.PROBABILITY,
        "max_gamma": number("gamma drawn in [1/max, max]", 1.0, 10.0),
        "min_gain": number("darkest gain", **schema.FRACTION),
    },
    "downsample": {
        "probability": schema.PROBABILITY,
        "min_fraction": number("smallest low side, a fraction of the side", **schema.FRACTION),
    },
    "jpeg": {
        "probability": schema.PROBABILITY,
        "min_quality": integer("lowest JPEG quality", 1, 100),
        "max_quality": integer("highest JPEG quality", 1, 100),
    },
    "perspective": {
        "probability": schema.PROBABILITY,
        "scale": number("largest corner shift, a fraction of the side", **schema.FRACTION),
    },
    "blur": {  # Keras draws one sigma a batch, at most 1
        "probability": schema.PROBABILITY,
        "max_sigma": number("largest Gaussian sigma, px", **schema.FRACTION),
    },
    "erasing": {
        "probability": schema.PROBABILITY,
        "max_area": number("largest erased share of the face", MIN_ERASED, 1.0),
    },
    "mix": {
        "kind": schema.choice("how two faces mix", "mixup", "cutmix"),
        "alpha": number("Beta(alpha, alpha) mixing weight", **schema.FRACTION),
        "probability": number("chance each image is mixed", 0.0, 1.0),
    },
}


def augment_rule_problems(aug: Mapping[str, Any] | DictConfig) -> list[str]:
    """What a per-key table cannot say: a JPEG quality range with its ends in order, and the
    keys of each section."""
    found = []
    for name, specs in AUGMENT_SECTION_KEYS.items():
        section = aug.get(name)
        if isinstance(section, Mapping | DictConfig):
            found += schema.problems(section, specs, f"{AUGMENT_KEY}.{name}.")
    jpeg = aug.get("jpeg")
    if not isinstance(jpeg, Mapping | DictConfig):
        return found
    low, high = jpeg.get("min_quality"), jpeg.get("max_quality")
    if isinstance(low, int) and isinstance(high, int) and low > high:
        found.append(f"{AUGMENT_KEY}.jpeg.min_quality: {low} exceeds max_quality {high}")
    return found


def check_augment(aug: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """train.augment checked against the schema; its optional keys as training uses them:
    `greyscale`, `saturation` and `hue` numbers (absent or null: 0), each section its parameters
    (None when absent, null or with probability 0)."""
    table = schema.subtable(AUGMENT_KEY)
    found = schema.problems(aug, table, f"{AUGMENT_KEY}.") + augment_rule_problems(aug)
    schema.raise_problems(found)
    aug = _plain(aug)
    checked: dict[str, Any] = {
        k: float(aug.get(k) or 0.0) for k in ("greyscale", "saturation", "hue")
    }
    for name, specs in AUGMENT_SECTION_KEYS.items():
        section = aug.get(name)
        values = section and {p: specs[p].check(p, v) for p, v in section.items()}
        checked[name] = values if values and values["probability"] > 0 else None
    return checked
