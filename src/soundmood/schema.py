"""The config schema: every fixed key of conf/ with its type, range and meaning, declared once in
KEYS (and MODELS, per architecture), and the one check that names every bad value as
`<key>: <value> <what is wrong>`.

The lowest config layer: it imports errors, omegaconf and the standard library only (no Hydra),
because the served model, which builds inference settings from these defaults, must not load
Hydra. Open mappings (data.rafdb_labels, tune.space, evaluate.conditions) are parsed by the
modules that own them; rules across keys live with config.validate.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from soundmood.errors import ConfigError

ABSENT = object()  # a key the checked mapping does not hold
NO_DEFAULT = object()
SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return _is_int(value) or (isinstance(value, float) and not math.isnan(value))


def _is_list(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def _folder_name(value: object) -> bool:
    return isinstance(value, str) and value.strip() not in ("", ".", "..") and "/" not in value


@dataclass(frozen=True)
class Spec:
    """One key: its kind, its bounds (ends closed unless open_*), whether null is allowed, its
    choices, and what it means. kind: int, number, bool, text, url, sha256, choice, numbers (a
    list; `length` items, else at least one), ints, points ([x, y] pairs), names (distinct folder
    names, at least two), range ([low, high] inside the bounds), section (a mapping of declared
    keys) or mapping (open: its entries are parsed elsewhere). `alternative`: another Spec a value
    may satisfy instead. `default`: what a caller without a config gets (inference.* only)."""

    kind: str
    meaning: str = ""
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    nullable: bool = False
    optional: bool = False  # may be absent (train.augment's capture keys: absent is off)
    choices: tuple[Any, ...] = ()
    length: int | None = None
    alternative: Spec | None = None
    default: Any = NO_DEFAULT

    def bounds(self) -> str:
        low = "-inf" if self.low is None else self.low
        high = "inf" if self.high is None else self.high
        return f"{'(' if self.open_low else '['}{low}, {high}{')' if self.open_high else ']'}"

    def _inside(self, value: float) -> bool:
        low_ok = self.low is None or (value > self.low if self.open_low else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return low_ok and high_ok

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` (`<value> <what is wrong>`), or None."""
        if value is None and self.nullable:
            return None
        wrong = self._wrong(value)
        if wrong and self.alternative is not None and self.alternative._wrong(value) is None:
            return None
        if wrong is None:
            return None
        if self.alternative is not None:
            wrong += f", nor {self.alternative.describe()}"
        return f"{_shown(value)} {wrong}{' or null' if self.nullable else ''}"

    def describe(self) -> str:
        if self.kind == "range":
            return f"a [low, high] range with low <= high, both in {self.bounds()}"
        return f"a {self.kind} in {self.bounds()}"

    def _wrong(self, value: Any) -> str | None:
        kind = self.kind
        if kind in ("int", "number"):
            if not _is_number(value):
                return "is not a number"
            if kind == "int" and not _is_int(value):
                return "is not an integer"
            return None if self._inside(value) else f"is not in {self.bounds()}"
        if kind == "bool":
            return None if isinstance(value, bool) else "is not true or false"
        if kind in ("text", "url", "sha256"):
            if not isinstance(value, str) or not value.strip():
                return "is not a non-empty string"
            if kind == "url" and "://" not in value:
                return "is not a URL such as sqlite:///file.db"
            if kind == "sha256" and not SHA256.fullmatch(value):
                return "is not a 64-character hex sha256"
            return None
        if kind == "choice":
            if any(type(value) is type(c) and value == c for c in self.choices):
                return None
            if any(_is_number(value) and _is_number(c) and value == c for c in self.choices):
                return None
            return f"is not one of {', '.join(map(str, self.choices))}"
        if kind in ("section", "mapping"):
            return None if isinstance(value, Mapping) else "is not a mapping"
        if not _is_list(value):
            return "is not a list"
        items = list(value)
        if (self.length and len(items) != self.length) or not items:
            return f"is not a list of {self.length or 'one or more'} items"
        if kind == "names":
            if len(items) < 2 or len(set(map(str, items))) != len(items):
                return "needs at least two distinct folder names"
            return None if all(map(_folder_name, items)) else "holds a name that is not a folder"
        if kind == "range":
            ok = len(items) == 2 and all(_is_number(v) and self._inside(v) for v in items)
            return None if ok and items[0] <= items[1] else f"is not {self.describe()}"
        if kind == "points":
            ok = all(_is_list(p) and len(p) == 2 and all(map(_is_number, p)) for p in items)
            return None if ok else "holds an item that is not an [x, y] pair of numbers"
        check, noun = (_is_int, "an integer") if kind == "ints" else (_is_number, "a number")
        ok = all(check(v) and self._inside(v) for v in items)
        return None if ok else f"holds an item that is not {noun} in {self.bounds()}"

    def check(self, key: str, value: Any) -> Any:
        """`value` if valid (a number kind as int or float), else a ConfigError naming `key`."""
        problem = self.problem(value)
        if problem:
            raise ConfigError(f"{key}: {problem}")
        if self.kind == "number" and value is not None:
            return float(value)
        return value


def _shown(value: Any) -> str:
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value)
    return repr(value)


# --- short constructors, so the table reads as one line a key ---------------------------------


integer = partial(Spec, "int")  # integer(meaning, low, high, ...)
number = partial(Spec, "number")
flag = partial(Spec, "bool")
text = partial(Spec, "text")


def choice(meaning: str, *choices: Any, **kw: Any) -> Spec:
    return Spec("choice", meaning, choices=choices, **kw)


FRACTION = {"low": 0.0, "high": 1.0, "open_low": True}  # (0, 1]
PROBABILITY = number("chance each image is degraded", 0.0, 1.0)
KNOWN_MODELS = ("mobilenet_v2", "seed_cnn")
MOOD_WEIGHTINGS = ("area", "uniform", "largest")
SEED = integer("a seed", 0, 2**32 - 1)
# train.augment's sections, each one's keys declared in soundmood.conditions
AUGMENT_SECTIONS = {
    "downsample": "random low resolution", "jpeg": "random JPEG round trip",
    "gamma": "random exposure", "perspective": "random perspective", "blur": "random blur",
    "erasing": "random erasing", "mix": "mixup or cutmix",
}  # fmt: skip


# fmt: off
def _group(prefix: str, specs: dict[str, Spec]) -> dict[str, Spec]:
    return {f"{prefix}.{key}": spec for key, spec in specs.items()}


OPEN = {"open_low": True, "open_high": True}


FACE_TEMPLATE = [[25.83, 33.53], [71.73, 33.27], [48.21, 55.48], [27.82, 75.07], [69.6, 75.08]]
# Every fixed key but model.* (MODELS), dotted from the config's root.
KEYS: dict[str, Spec] = {
    "seed": SEED,
    "profile": text("the profile group that was applied"),
    **_group("data", {
        "root": text("the DVC-tracked image tree"),
        "classes": Spec("names", "class folder names, in label order"),
        "source_size": integer("side every source image has", 16, 4096),
        "image_size": integer("side prepare resizes to, the model's input", 16, 512),
        "val_fraction": number("share of train held out", 0.0, 0.5, **OPEN),
        "limit_per_class": integer("first N images per class and split", 4, nullable=True),
        "prepared_dir": text("where prepare writes its arrays"),
        "on_bad_format": choice("what a wrong size or mode is", "error", "convert"),
        "convert_min_side": integer("narrowest image convert accepts", 1, 4096),
        "near_duplicate_bits": integer("hash bits a near-duplicate may differ in", 0, 256),
        "rafdb_labels": Spec("mapping", "RAF-DB basic label ('1' to '7') -> class"),
        "extra_train": Spec("mapping", "name -> {path, label_map}, train only", nullable=True),
        "limits.max_image_pixels": integer("pixels an image header may declare", 1),
        "limits.max_file_bytes": integer("bytes of one imported file", 1),
        "limits.max_archive_bytes": integer("bytes of an imported archive", 1),
        "limits.max_archive_files": integer("files in an imported archive", 1),
    }),
    **_group("train", {
        "epochs": integer("epochs in all, warm-up included", 1, 10_000),
        "batch_size": integer("images a step", 1, 65_536),
        "optimizer": choice("optimizer", "adamw", "adam", "sgd"),
        "lr": number("learning rate after warm-up", 0.0, 10.0, open_low=True),
        "weight_decay": number("decoupled weight decay", 0.0, 1.0, open_high=True),
        "schedule": choice("learning-rate schedule", "cosine", "constant"),
        "warmup_epochs": integer("epochs training the head only", 0, 10_000),
        "label_smoothing": number("label smoothing", 0.0, 1.0, open_high=True),
        "class_weight": choice("class weighting", "balanced", "sqrt", "none"),
        "early_stopping_patience": integer("epochs without a new best", 0, 10_000),
        "monitor": choice("picks the kept epoch", "val_macro_f1", "val_accuracy", "val_loss"),
        "use_tuned": flag("apply tune's best_params.yaml"),
        "logit_adjustment.taus": Spec("numbers", "logit-adjustment strengths to try", -2.0, 2.0),
        "logit_adjustment.objective": choice("what picks tau", "macro_f1", "accuracy"),
        "calibrate": flag("fit and fold a temperature"),
        "deterministic": flag("TensorFlow op determinism"),
        "threads": integer("TensorFlow threads (0: all cores)", 0, 1024),
        "model_dir": text("where model.keras is written"),
    }),
    **_group("train.augment", {
        "flip": flag("random horizontal flip"),
        "rotation": number("largest rotation, as a fraction of a turn", 0.0, 0.5),
        "zoom": number(
            "zoom strength, or a RandomZoom [low, high] range (negative zooms in)", 0.0, 1.0,
            open_high=True, alternative=Spec("range", low=-1.0, high=1.0, **OPEN),
        ),
        "translation": number("largest shift, a fraction of the side", 0.0, 1.0, open_high=True),
        "contrast": number("largest contrast change", 0.0, 1.0),
        "brightness": number("largest brightness change", 0.0, 1.0),
        "greyscale": number("chance a training face turns grey", 0.0, 1.0, optional=True),
        "saturation": number("RandomSaturation 0.5 +- this", 0, 0.5, nullable=True, optional=True),
        "hue": number("largest RandomHue factor", 0, 1, nullable=True, optional=True),
        # absent, null or probability 0: off
        **{k: Spec("mapping", m, nullable=True, optional=True)
           for k, m in AUGMENT_SECTIONS.items()},
    }),
    **_group("tune", {
        "enabled": flag("run the study (false: train keeps the configured values)"),
        "n_trials": integer("the budget, in trials", 1),
        "epochs": integer("epochs per trial", 1),
        "subset_fraction": number("share of train each trial trains on", **FRACTION),
        "objective": choice("what a trial maximises", "val_macro_f1", "val_accuracy"),
        "sampler_seed": SEED,
        "sampler_startup_trials": integer("random trials before TPE", 0),
        "enqueue_baseline": flag("trial 0 measures the configured values"),
        "pruner": choice("pruner", "median", "hyperband", "none"),
        "pruner_startup_trials": integer("complete trials before pruning", 0),
        "pruner_warmup_steps": integer("epochs before a trial can be pruned", 0),
        "hyperband_reduction_factor": integer("hyperband keeps 1/this a rung", 2),
        "storage": Spec("url", "SQLAlchemy URL of the study"),
        "best_params_path": text("the hand-over to train"),
        "space": Spec("mapping", "config key -> distribution (soundmood.tune.space)"),
    }),
    **_group("evaluate", {
        "tta_flip": flag("average each image's and its mirror's prediction"),
        "batch_size": integer("images a prediction batch", 1),
        "reports_dir": text("where reports are written"),
        "condition_seed": integer("seed of the conditions' random variants", 0),
        "conditions": Spec("mapping", "name -> parameters (soundmood.conditions)", nullable=True),
        "external": Spec("mapping", "set -> {path, detect_faces, label_map}", nullable=True),
        "redetect.faces": integer("faces re-detected per split (0: off)", 0),
        "redetect.contexts": Spec("mapping", "context -> parameters (soundmood.conditions)"),
    }),
    **_group("registry", {
        "model_name": text("registered model name"),
        "auto_promote": flag("the register stage runs the promotion gate"),
        "min_improvement": number("test macro-F1 margin over the champion", -1.0, 1.0),
        "min_class_recall": number("test recall every class needs", 0.0, 1.0),
        "min_condition_accuracy": number(
            "test accuracy every capture condition needs (0 or null: off)", 0.0, 1.0, nullable=True
        ),
        "min_external_accuracy": Spec("mapping", "external set -> accuracy floor", nullable=True),
        "detect_faces": flag("the served model's detect_faces default"),
    }),
    # inference: `default` is what a caller without a config gets (a test holds conf/ to them)
    **_group("inference.detector", {
        "name": choice("face detector", "mtcnn", default="mtcnn"),
        "max_side": integer("longest side detection sees", 64, default=1280),
        "min_face_size": integer("smallest face, px (MTCNN's window: 12)", 12, default=20),
        "thresholds": Spec(
            "numbers", "P-Net, R-Net, O-Net score thresholds", 0.0, 1.0, open_high=True,
            length=3, default=[0.6, 0.7, 0.8],
        ),
        "min_confidence": number("score a face needs", 0.0, 1.0, open_high=True, default=0.8),
        "max_faces": integer("faces kept a photo", 1, default=20),
    }),
    **_group("inference.crop", {
        "method": choice("crop", "align", "box", default="align"),
        "margin": number("extra border a side, a fraction", -0.3, 1.0, default=0.0),
        "size": integer("side of the crop and its template's frame", 16, default=100),
        "template": Spec("points", "eyes, nose, mouth corners", length=5, default=FACE_TEMPLATE),
        "fill": Spec("ints", "RGB outside the photo", 0, 255, length=3, default=[0, 0, 0]),
    }),
    **_group("inference", {
        "min_confidence": number(
            "the model's top probability a confident answer needs; null: the threshold train "
            "chose", 0.0, 1.0, nullable=True, default=None,
        ),
        "confident_precision": number(
            "accuracy train asks of confident answers", 0.0, 1.0, open_low=True, default=0.95
        ),
        "mood.weighting": choice("how faces make a mood", *MOOD_WEIGHTINGS, default="area"),
        "limits.max_files": integer("photos a run may take", 1, default=10000),
    }),
    "tracking.uri": text("MLflow store (MLFLOW_TRACKING_URI wins)"),
    "tracking.experiment": text("MLflow experiment"),
}
# fmt: on

MODEL_NAME = choice("architecture", *KNOWN_MODELS)
DROPOUT = number("dropout before the head", 0.0, 1.0, open_high=True)
# model.* for each model.name, relative to `model.`
MODELS: dict[str, dict[str, Spec]] = {
    "mobilenet_v2": {
        "name": MODEL_NAME,
        "weights": text("ImageNet weights file (null: download)", nullable=True),
        "weights_sha256": Spec("sha256", "the weights file's sha256", nullable=True),
        "alpha": choice("width multiplier", 0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
        "bn_momentum": number("batch-norm momentum", 0.0, 1.0, open_low=True, open_high=True),
        "frozen_layers": integer("backbone layers kept frozen while fine-tuning", 0),
        "dropout": DROPOUT,
    },
    "seed_cnn": {"name": MODEL_NAME, "dropout": DROPOUT, "l2": number("L2 weight", 0.0, 1.0)},
}


def subtable(prefix: str, table: Mapping[str, Spec] = KEYS) -> dict[str, Spec]:
    """The keys under `prefix` (a dotted section), relative to it."""
    start = prefix + "."
    return {k.removeprefix(start): s for k, s in table.items() if k.startswith(start)}


def config_table(model_name: object) -> dict[str, Spec]:
    """Every fixed key of a composed config whose model.name is `model_name` (an unknown name:
    model.name alone, which then fails)."""
    models = MODELS.get(model_name) if isinstance(model_name, str) else None
    model = models or {"name": MODEL_NAME}
    return {**KEYS, "model": Spec("mapping" if models is None else "section")} | {
        f"model.{k}": s for k, s in model.items()
    }


def defaults(prefix: str) -> dict[str, Any]:
    """The declared defaults under `prefix`, as the nested mapping conf/ writes them."""
    out: dict[str, Any] = {}
    for key, spec in subtable(prefix).items():
        if spec.default is not NO_DEFAULT:
            *parents, leaf = key.split(".")
            node = out
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = copy.deepcopy(spec.default)  # a caller may change its copy
    return out


def problems(
    values: Mapping[str, Any] | DictConfig,
    table: Mapping[str, Spec],
    prefix: str = "",
    noun: str = "key",
) -> list[str]:
    """Every problem of `values` against `table` (keys relative to `prefix`): a missing key, a
    bad value, a key the table does not declare (`unknown <noun>`); entries of a `mapping` are
    left to their owner, and a null nullable section's keys are not looked at."""
    tree = (
        OmegaConf.to_container(values, resolve=True) if isinstance(values, DictConfig) else values
    )
    found: list[str] = []
    for key, spec in table.items():
        if _blocked(tree, key, table):
            continue
        value = _lookup(tree, key)
        if value is ABSENT and not spec.optional:
            found.append(
                f"{prefix}{key}: is missing" + (f" ({spec.meaning})" if spec.meaning else "")
            )
        elif value is not ABSENT and (problem := spec.problem(value)):
            found.append(f"{prefix}{key}: {problem}")
    found += _unknown(tree, table, "", prefix, noun)
    return found


def _lookup(tree: Any, key: str) -> Any:
    node = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return ABSENT
        node = node[part]
    return node


def _blocked(tree: Any, key: str, table: Mapping[str, Spec]) -> bool:
    """An enclosing section is null or not a mapping, or a declared one is absent: said once,
    for the section, not for each of its keys."""
    node, path = tree, ""
    for part in key.split(".")[:-1]:
        path += part
        node = node.get(part, ABSENT) if isinstance(node, Mapping) else None
        if (node is ABSENT and path in table) or (
            node is not ABSENT and not isinstance(node, Mapping)
        ):
            return True
        path += "."
    return False


def _unknown(tree: Any, table: Mapping[str, Spec], path: str, prefix: str, noun: str) -> list[str]:
    if not isinstance(tree, Mapping):
        return []
    declared = {k.removeprefix(path).split(".")[0] for k in table if k.startswith(path)}
    found = []
    for name, value in tree.items():
        key = f"{path}{name}"
        if str(name) not in declared:
            known = ", ".join(sorted(declared)) or "none"
            found.append(f"{prefix}{key}: unknown {noun}; known: {known}")
        elif key not in table or table[key].kind == "section":
            if isinstance(value, Mapping):
                found += _unknown(value, table, key + ".", prefix, noun)
            elif key not in table:
                found.append(f"{prefix}{key}: {_shown(value)} is not a mapping")
    return found


def raise_problems(found: Sequence[str]) -> None:
    """One ConfigError listing every problem (a single one as its own line); none: nothing."""
    if len(found) == 1:
        raise ConfigError(found[0])
    if found:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(found))
