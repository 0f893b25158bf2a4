"""Capture conditions: how the model holds up on faces as cameras deliver them, and training that
narrows the gap.

Two halves share one vocabulary of degradations (grey, low resolution, JPEG, dark, low contrast,
rotation, loose and tight crops, shift):

- evaluation: `evaluate.conditions` (name -> parameters) are deterministic, seeded transforms of a
  prepared split (uint8 RGB, N x S x S x 3, any S), predicted as evaluate predicts
  (forward.tta_probabilities) and scored for accuracy, calibration (ECE) and the confident
  answers' coverage and accuracy. The same condition gives the same images on every run, so
  validation and test variants are comparable across models. Results go to reports/robustness.json,
  reports/plots/robustness.{csv,png} and MLflow.
- training: `augmentation_layers(train.augment)` adds random versions of the same degradations as
  Keras layers for the batched float32 [0, 255] tf.data map of train.make_dataset.
"""

from __future__ import annotations

import functools
import io
import math
import re
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from scipy import ndimage
from sklearn.metrics import accuracy_score, f1_score, recall_score

from soundmood import fileio
from soundmood.calibration import expected_calibration_error, selective_curve
from soundmood.errors import ConfigError
from soundmood.forward import tta_probabilities

if TYPE_CHECKING:
    import keras

CONDITIONS_KEY = "evaluate.conditions"
AUGMENT_KEY = "train.augment"
CLEAN = "clean"
RESERVED_NAMES = (CLEAN, "worst", "mean")  # would collide with summary metric names
# nor may a name end so: robust_<name>_confident_accuracy is a trust figure, not an accuracy
_CONFIDENT = "_confident"
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
# ITU-R BT.601 luma, as PIL's convert("L") and tf.image.rgb_to_grayscale use.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# --- parameters: declared per transform, checked before any work ---------------------------------


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


@dataclass(frozen=True)
class PerImage:
    """What a transform may vary between images: its index and a seeded uniform draw in [0, 1)."""

    index: int
    draw: float


ImageTransform = Callable[[np.ndarray, Mapping[str, Any], PerImage], np.ndarray]


@dataclass(frozen=True)
class Transform:
    apply: ImageTransform
    params: dict[str, Param]


# --- the transforms: uint8 (S, S, 3) in, uint8 (S, S, 3) out -------------------------------------


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _resize(img: np.ndarray, size: int, method: Image.Resampling) -> np.ndarray:
    """PIL resize as soundmood.data.images.resize does it (area-aware when shrinking)."""
    return np.asarray(Image.fromarray(img).resize((size, size), method, reducing_gap=None))


def grey(img: np.ndarray, p: Mapping[str, Any], k: PerImage) -> np.ndarray:
    """A greyscale capture as load_face delivers it: luminance copied to the three channels."""
    luma = _to_uint8(img.astype(np.float32) @ LUMA)
    return np.repeat(luma[..., None], 3, axis=-1)


def lowres(img: np.ndarray, p: Mapping[str, Any], k: PerImage) -> np.ndarray:
    """A distant or low-resolution face: area-filtered down to size_fraction * S, bilinear back up
    (48 px of a 100 px source is 0.48)."""
    side = img.shape[0]
    low = max(1, round(p["size_fraction"] * side))
    return _resize(_resize(img, low, Image.Resampling.BOX), side, Image.Resampling.BILINEAR)


def jpeg(img: np.ndarray, p: Mapping[str, Any], k: PerImage) -> np.ndarray:
    """A heavily compressed upload: a JPEG round trip at `quality` (PIL/libjpeg, 4:2:0)."""
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="JPEG", quality=p["quality"])
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        return np.asarray(decoded.convert("RGB"))


def dark(img: np.ndarray, p: Mapping[str, Any], k: PerImage) -> np.ndarray:
    """An under-exposed capture: `gamma` on [0, 1] intensities, then scaled by `brightness`."""
    unit = img.astype(np.float32) / 255.0
    return _to_uint8(255.0 * p["brightness"] * unit ** p["gamma"])


def low_contrast(img: np.ndarray, p: Mapping[str, Any], k: PerImage) -> np.ndarray:
    """Haze or a washed-out screen: deviations from each channel's mean scaled by `factor`."""
    values = img.astype(np.float32)
    mean = values.mean(axis=(0, 1), keepdims=True)
    return _to_uint8(mean + p["factor"] * (values - mean))


def rotate(img: np.ndarray, p: Mapping[str, Any], k: PerImage) -> np.ndarray:
    """A tilted head or camera: `degrees` about the centre, anticlockwise on even indices and
    clockwise on odd ones, borders reflected (as keras RandomRotation's fill_mode="reflect")."""
    angle = p["degrees"] if k.index % 2 == 0 else -p["degrees"]
    out = ndimage.rotate(
        img.astype(np.float32), angle, axes=(1, 0), reshape=False, order=1, mode="reflect"
    )
    return _to_uint8(out)


def loose_crop(img: np.ndarray, p: Mapping[str, Any], k: PerImage) -> np.ndarray:
    """A detector box 1/face_fraction times wider than the aligned crop: reflect-pad, resize back,
    so the face fills `face_fraction` of the frame (0.75: a 33% wider box)."""
    side = img.shape[0]
    pad = round(side * (1.0 / p["face_fraction"] - 1.0) / 2.0)
    wide = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")
    return _resize(wide, side, Image.Resampling.BILINEAR)


def tight_crop(img: np.ndarray, p: Mapping[str, Any], k: PerImage) -> np.ndarray:
    """A box that cuts into the face: the central `keep` of the frame resized up."""
    side = img.shape[0]
    crop = max(1, round(side * p["keep"]))
    start = (side - crop) // 2
    centre = np.ascontiguousarray(img[start : start + crop, start : start + crop])
    return _resize(centre, side, Image.Resampling.BILINEAR)


def shift(img: np.ndarray, p: Mapping[str, Any], k: PerImage) -> np.ndarray:
    """An off-centre box: translated by `fraction` of the side in a seeded direction per image,
    borders reflected."""
    distance = p["fraction"] * img.shape[0]
    angle = 2.0 * math.pi * k.draw
    offset = (distance * math.sin(angle), distance * math.cos(angle), 0.0)
    return _to_uint8(ndimage.shift(img.astype(np.float32), offset, order=1, mode="reflect"))


_FRACTION = dict(kind=float, low=0.0, high=1.0, open_low=True)
TRANSFORMS: dict[str, Transform] = {
    "grey": Transform(grey, {}),
    "lowres": Transform(
        lowres,
        {"size_fraction": Param(**_FRACTION, meaning="low side as a fraction of the image side")},
    ),
    "jpeg": Transform(jpeg, {"quality": Param(int, 1, 100, meaning="JPEG quality 1-100")}),
    "dark": Transform(
        dark,
        {
            "gamma": Param(
                float, 0.0, 10.0, open_low=True, meaning="exponent on [0, 1] intensities"
            ),
            "brightness": Param(**_FRACTION, meaning="multiplier after the gamma"),
        },
    ),
    "low_contrast": Transform(
        low_contrast, {"factor": Param(**_FRACTION, meaning="scale of deviations from the mean")}
    ),
    "rotate": Transform(
        rotate,
        {
            "degrees": Param(
                float,
                0.0,
                180.0,
                open_low=True,
                meaning="rotation angle, sign alternating per image",
            )
        },
    ),
    "loose_crop": Transform(
        loose_crop,
        {"face_fraction": Param(float, 0.25, 1.0, meaning="share of the frame the face keeps")},
    ),
    "tight_crop": Transform(
        tight_crop, {"keep": Param(**_FRACTION, meaning="central share of the frame kept")}
    ),
    "shift": Transform(
        shift,
        {
            "fraction": Param(
                float, 0.0, 0.5, open_low=True, meaning="translation as a fraction of the side"
            )
        },
    ),
}


# --- conditions: named, parameterised transforms from conf/ --------------------------------------


@dataclass(frozen=True)
class Condition:
    name: str
    transform: str
    params: dict[str, Any]

    def apply(self, images: np.ndarray, seed: int) -> np.ndarray:
        """The condition's variant of a split: the same images for the same seed, always."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"condition {self.name}: expected uint8 (N, S, S, 3), "
                f"got {images.dtype} {images.shape}"
            )
        rng = np.random.default_rng([seed, zlib.crc32(self.name.encode())])
        draws = rng.random(len(images))
        fn = TRANSFORMS[self.transform].apply
        out = np.empty_like(images)
        for i, img in enumerate(images):
            out[i] = fn(img, self.params, PerImage(i, float(draws[i])))
        return out


def parse_conditions(
    conditions: Mapping[str, Any] | DictConfig | None, key: str = CONDITIONS_KEY
) -> list[Condition]:
    """Check every condition and parameter, naming the offending key; nothing is computed here.

    A condition's name is its transform unless it sets `transform:` (so `jpeg_q10: {transform:
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
    if not NAME_PATTERN.match(name) or name in RESERVED_NAMES or name.endswith(_CONFIDENT):
        raise ConfigError(
            f"{key}: condition name {name!r} must match [a-z][a-z0-9_]*, not be one of "
            f"{', '.join(RESERVED_NAMES)} and not end in {_CONFIDENT} (its metrics would read "
            "as another condition's)"
        )
    params = dict(params or {})
    transform = str(params.pop("transform", name))
    if transform not in TRANSFORMS:
        raise ConfigError(
            f"{key}: unknown condition {transform!r}; known: "
            f"{', '.join(TRANSFORMS)} (or set transform: to one of them)"
        )
    spec = TRANSFORMS[transform].params
    unknown = sorted(set(params) - set(spec))
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]}: unknown parameter for {transform}; expected "
            f"{', '.join(spec) or 'none'}"
        )
    missing = [p for p in spec if p not in params]
    if missing:
        raise ConfigError(f"{key}.{missing[0]}: missing ({spec[missing[0]].meaning})")
    checked = {p: spec[p].check(f"{key}.{p}", params[p]) for p in spec}
    return Condition(name, transform, checked)


def check_config(cfg: DictConfig) -> list[Condition]:
    """The configured conditions, validated; call first, before loading a model or data."""
    seed = cfg.evaluate.get("condition_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"evaluate.condition_seed: {seed!r} is not an int >= 0")
    return parse_conditions(cfg.evaluate.get("conditions"))


# --- evaluation ----------------------------------------------------------------------------------


def condition_scores(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and the lowest per-class recall (with its class), to 4 decimals as
    evaluate.score gives them."""
    labels = list(range(len(classes)))
    recalls = np.round(
        recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0), 4
    )
    weakest = int(np.argmin(recalls))  # the first of equals
    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
        "macro_f1": round(float(f1_score(y_true, y_pred, average="macro", zero_division=0)), 4),
        "min_recall": float(recalls[weakest]),
        "min_recall_class": classes[weakest],
    }


def trust_scores(
    probs: np.ndarray, y_true: np.ndarray, min_confidence: float | None
) -> dict[str, float | None]:
    """How far the probabilities can be trusted: the expected calibration error and, with a
    threshold, the share of faces whose top probability reaches it (confident_coverage) and the
    accuracy of those (confident_accuracy; None when no face reaches it)."""
    scores: dict[str, float | None] = {"ece": round(expected_calibration_error(probs, y_true), 4)}
    if min_confidence is not None:
        coverage, accuracy = selective_curve(probs, y_true).at(min_confidence)
        scores["confident_coverage"] = round(coverage, 4)
        scores["confident_accuracy"] = None if math.isnan(accuracy) else round(accuracy, 4)
    return scores


def split_scores(
    probs: np.ndarray, y_true: np.ndarray, classes: list[str], min_confidence: float | None
) -> dict[str, Any]:
    """condition_scores of the argmax labels, then trust_scores."""
    scores = condition_scores(y_true, probs.argmax(axis=1), classes)
    return {**scores, **trust_scores(probs, y_true, min_confidence)}


def evaluate_conditions(
    model: keras.Model | Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    cfg: DictConfig,
    clean_pred: np.ndarray | None = None,
    *,
    clean_probs: np.ndarray | None = None,
    min_confidence: float | None = None,
    on_predicted: Callable[[str, np.ndarray], None] | None = None,
) -> dict[str, Any]:
    """Score the clean split and every configured condition of it.

    `model`: a Keras model or a forward.Forward (evaluate passes the served ONNX graph).
    Predictions go through forward.tta_probabilities with evaluate.batch_size and
    evaluate.tta_flip, as the clean test score does. The clean pass can be reused: pass
    `clean_probs` (its probabilities) or `clean_pred` (only its argmax labels: the clean scores
    then have no ece nor confident_*). `min_confidence`: the top-probability threshold of
    confident_coverage / confident_accuracy (None: no threshold, those keys are left out).
    `on_predicted(name, probabilities)` sees every split's probabilities (clean when known, then
    each condition), e.g. for a plot, without this result holding them.
    Returns {images, seconds, clean: scores, conditions: {name: scores}, worst_condition,
    worst_accuracy, mean_drop}; mean_drop is the mean of clean minus condition accuracy.
    """
    conditions = check_config(cfg)  # before any work
    classes, ev = list(cfg.data.classes), cfg.evaluate
    seed = int(ev.get("condition_seed", 0))
    forward = getattr(model, "predict_on_batch", model)  # a Keras model, or a Forward itself
    start = time.perf_counter()

    def scored(name: str, probs: np.ndarray) -> dict[str, Any]:
        if on_predicted is not None:
            on_predicted(name, probs)
        return split_scores(probs, y, classes, min_confidence)

    def predicted(images: np.ndarray) -> np.ndarray:
        return tta_probabilities(forward, images, ev.batch_size, ev.tta_flip)

    if clean_probs is None and clean_pred is not None:
        clean = condition_scores(y, clean_pred, classes)
    else:
        clean = scored(CLEAN, predicted(x) if clean_probs is None else clean_probs)
    scores = {c.name: scored(c.name, predicted(c.apply(x, seed))) for c in conditions}
    result: dict[str, Any] = {"images": len(y), "clean": clean, "conditions": scores}
    result.update(summarise(clean, scores))
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def summarise(clean: Mapping[str, Any], scores: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    if not scores:
        return {"worst_condition": None, "worst_accuracy": clean["accuracy"], "mean_drop": 0.0}
    worst = min(scores, key=lambda name: scores[name]["accuracy"])
    drops = [clean["accuracy"] - s["accuracy"] for s in scores.values()]
    return {
        "worst_condition": worst,
        "worst_accuracy": scores[worst]["accuracy"],
        "mean_drop": round(float(np.mean(drops)), 4),
    }


STATS = ("accuracy", "macro_f1", "min_recall")
TRUST_STATS = ("ece", "confident_coverage", "confident_accuracy")  # absent from older reports


def mlflow_metrics(result: Mapping[str, Any], prefix: str = "robust_") -> dict[str, float]:
    """robust_<condition>_{accuracy,macro_f1,min_recall} and, where scored,
    robust_<condition>_{ece,confident_coverage,confident_accuracy}; robust_worst_accuracy,
    robust_mean_drop (use prefix="val_robust_" for the validation variants)."""
    metrics = {}
    for name, scores in result["conditions"].items():
        for stat in STATS:
            metrics[f"{prefix}{name}_{stat}"] = float(scores[stat])
        for stat in TRUST_STATS:
            if scores.get(stat) is not None:
                metrics[f"{prefix}{name}_{stat}"] = float(scores[stat])
    metrics[f"{prefix}worst_accuracy"] = float(result["worst_accuracy"])
    metrics[f"{prefix}mean_drop"] = float(result["mean_drop"])
    if "seconds" in result:  # robustness.json leaves timings out
        metrics[f"{prefix}seconds"] = float(result["seconds"])
    return metrics


REPORT_FILE = "robustness.json"
PLOT_CSV = "plots/robustness.csv"
PLOT_PNG = "plots/robustness.png"


def write_reports(result: Mapping[str, Any], reports_dir: str | Path) -> list[Path]:
    """reports/robustness.json (DVC metrics: no timings, so `dvc metrics diff` shows only model
    changes), reports/plots/robustness.csv (one bar per condition, clean first) and a PNG chart."""
    reports = Path(reports_dir)
    paths = [reports / REPORT_FILE, reports / PLOT_CSV, reports / PLOT_PNG]
    write_json(result, paths[0])
    rows = _bars(result)
    fileio.write_text(
        paths[1], "condition,accuracy\n" + "".join(f"{name},{acc:.4f}\n" for name, acc in rows)
    )
    _bar_chart(rows, paths[2])
    return paths


def write_json(result: Mapping[str, Any], path: Path) -> None:
    """The scores without their timing, so `dvc metrics diff` shows only model changes."""
    fileio.write_json(path, {k: v for k, v in result.items() if k != "seconds"})


def _bars(result: Mapping[str, Any]) -> list[tuple[str, float]]:
    return [
        (CLEAN, result["clean"]["accuracy"]),
        *((name, s["accuracy"]) for name, s in result["conditions"].items()),
    ]


def _bar_chart(rows: list[tuple[str, float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names, values = [r[0] for r in rows], [r[1] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(rows) + 1.2))
    colors = ["tab:green" if n == CLEAN else "tab:blue" for n in names]
    bars = ax.barh(names[::-1], values[::-1], color=colors[::-1])
    ax.bar_label(bars, fmt="%.3f", padding=2, fontsize=8)
    ax.axvline(values[0], color="tab:green", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("accuracy")
    ax.set_title("Accuracy per capture condition")
    fig.tight_layout()
    with fileio.atomic_path(out) as partial:
        fig.savefig(partial, dpi=120, format="png")
    plt.close(fig)


def log_to_mlflow(result: Mapping[str, Any], paths: list[Path], prefix: str = "robust_") -> None:
    """Metrics and report files to the active MLflow run (artifact folder `robustness/`)."""
    import mlflow

    mlflow.log_metrics(mlflow_metrics(result, prefix))
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path="robustness")


# --- promotion gate ------------------------------------------------------------------------------

_RUN_METRIC = re.compile(r"^robust_(?P<name>[a-z][a-z0-9_]*)_accuracy$")


def condition_accuracies(robust_metrics: Mapping[str, Any]) -> dict[str, float]:
    """Per-condition accuracy from robustness.json's content or from a run's flat MLflow metrics."""
    if "conditions" in robust_metrics:
        return {n: float(s["accuracy"]) for n, s in robust_metrics["conditions"].items()}
    found = {}
    for key, value in robust_metrics.items():
        match = _RUN_METRIC.match(key)
        if match and match["name"] not in RESERVED_NAMES and not match["name"].endswith(_CONFIDENT):
            found[match["name"]] = float(value)
    return found


def condition_floor_failure(robust_metrics: Mapping[str, Any], floor: float) -> str | None:
    """Why a candidate fails registry.min_condition_accuracy, or None when it passes.

    Accepts robustness.json's content or a run's metrics (robust_<condition>_accuracy). A floor
    of 0 (or less) disables the check; with a floor, a model without condition metrics fails.
    """
    if floor is None or floor <= 0:
        return None
    accuracies = condition_accuracies(robust_metrics)
    if not accuracies:
        return (
            f"no per-condition accuracy (robust_<condition>_accuracy) to check against "
            f"registry.min_condition_accuracy {floor:.4f}; evaluate the model again"
        )
    below = sorted((acc, name) for name, acc in accuracies.items() if acc < floor)
    if not below:
        return None
    listing = ", ".join(f"{name} {acc:.4f}" for acc, name in below)
    return (
        f"{len(below)} capture condition(s) below registry.min_condition_accuracy "
        f"{floor:.4f}: {listing} (worst: {below[0][1]})"
    )


# --- training: random capture degradations as Keras layers ---------------------------------------


@functools.cache
def _layers_module() -> Any:
    """Keras and TF are imported on first use (config checks need neither), the classes once."""
    import keras
    import tensorflow as tf

    class RandomGamma(keras.layers.Layer):
        """With `probability`, gamma log-uniform in [1/max_gamma, max_gamma] on [0, 1] intensities,
        then a gain uniform in [min_gain, 1] (the `dark` condition is gamma 2.2, gain 0.5)."""

        def __init__(
            self,
            probability: float,
            max_gamma: float,
            min_gain: float,
            seed: int | None = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(**kwargs)
            self.probability, self.max_gamma, self.min_gain = probability, max_gamma, min_gain
            self.generator = keras.random.SeedGenerator(seed)

        def call(self, images: tf.Tensor, training: bool = True) -> tf.Tensor:
            if not training:
                return images
            u = keras.random.uniform((tf.shape(images)[0], 3), seed=self.generator)
            # The power is the costly part: take it on the chosen images only.
            chosen = tf.where(u[:, 0] < self.probability)
            u = tf.gather_nd(u, chosen)
            gamma = tf.exp((2.0 * u[:, 1] - 1.0) * math.log(self.max_gamma))
            gain = self.min_gain + (1.0 - self.min_gain) * u[:, 2]
            unit = tf.clip_by_value(tf.gather_nd(images, chosen), 0.0, 255.0) / 255.0
            out = 255.0 * gain[:, None, None, None] * unit ** gamma[:, None, None, None]
            return tf.tensor_scatter_nd_update(images, chosen, out)

        def compute_output_shape(self, input_shape: tuple) -> tuple:
            return input_shape

    class RandomDownsample(keras.layers.Layer):
        """With `probability`, area-filtered down to a side uniform in [min_fraction, 1] of the
        image's, bilinear back up (the `lowres` condition). Per image, via tf.map_fn."""

        def __init__(
            self, probability: float, min_fraction: float, seed: int | None = None, **kwargs: Any
        ) -> None:
            super().__init__(**kwargs)
            self.probability, self.min_fraction = probability, min_fraction
            self.generator = keras.random.SeedGenerator(seed)

        def call(self, images: tf.Tensor, training: bool = True) -> tf.Tensor:
            if not training:
                return images
            u = keras.random.uniform((tf.shape(images)[0], 2), seed=self.generator)
            side = tf.shape(images)[1:3]
            fraction = self.min_fraction + (1.0 - self.min_fraction) * u[:, 1]
            low = tf.maximum(
                1, tf.cast(tf.round(fraction * tf.cast(side[0], tf.float32)), tf.int32)
            )

            def one(args: tuple) -> tf.Tensor:
                img, apply, n = args

                def down_up() -> tf.Tensor:
                    low = tf.image.resize(img, tf.stack([n, n]), "area")
                    # Float error leaves values a hair outside [0, 255].
                    return tf.clip_by_value(tf.image.resize(low, side, "bilinear"), 0.0, 255.0)

                return tf.cond(apply, down_up, lambda: img)

            out = tf.map_fn(
                one, (images, u[:, 0] < self.probability, low), fn_output_signature=tf.float32
            )
            return tf.ensure_shape(out, images.shape)

        def compute_output_shape(self, input_shape: tuple) -> tuple:
            return input_shape

    class RandomJpeg(keras.layers.Layer):
        """With `probability`, a JPEG round trip at a quality uniform in [min_quality,
        max_quality]. tf.image.adjust_jpeg_quality takes one 3-D image, hence tf.map_fn."""

        def __init__(
            self,
            probability: float,
            min_quality: int,
            max_quality: int,
            seed: int | None = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(**kwargs)
            self.probability = probability
            self.min_quality, self.max_quality = min_quality, max_quality
            self.generator = keras.random.SeedGenerator(seed)

        def call(self, images: tf.Tensor, training: bool = True) -> tf.Tensor:
            if not training:
                return images
            u = keras.random.uniform((tf.shape(images)[0], 2), seed=self.generator)
            span = self.max_quality - self.min_quality + 1
            quality = tf.minimum(
                self.min_quality + tf.cast(tf.floor(u[:, 1] * span), tf.int32), self.max_quality
            )

            def one(args: tuple) -> tf.Tensor:
                img, apply, q = args
                pixels = tf.cast(tf.round(tf.clip_by_value(img, 0.0, 255.0)), tf.uint8)
                return tf.cond(
                    apply,
                    lambda: tf.cast(tf.image.adjust_jpeg_quality(pixels, q), tf.float32),
                    lambda: img,
                )

            out = tf.map_fn(
                one, (images, u[:, 0] < self.probability, quality), fn_output_signature=tf.float32
            )
            return tf.ensure_shape(out, images.shape)

        def compute_output_shape(self, input_shape: tuple) -> tuple:
            return input_shape

    return keras, RandomGamma, RandomDownsample, RandomJpeg


def _section(aug: Mapping[str, Any], name: str, spec: dict[str, Param]) -> dict[str, Any] | None:
    """A checked augment sub-section, or None when absent, null or with probability 0."""
    section = aug.get(name)
    if section is None:
        return None
    key = f"{AUGMENT_KEY}.{name}"
    if not isinstance(section, Mapping):
        raise ConfigError(f"{key}: expected a mapping with {', '.join(spec)}")
    unknown = sorted(set(section) - set(spec))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown; expected {', '.join(spec)}")
    missing = [p for p in spec if p not in section]
    if missing:
        raise ConfigError(f"{key}.{missing[0]}: missing ({spec[missing[0]].meaning})")
    checked = {p: spec[p].check(f"{key}.{p}", section[p]) for p in spec}
    return checked if checked["probability"] > 0 else None


_PROBABILITY = Param(float, 0.0, 1.0, meaning="chance each image is degraded")
AUGMENT_SPECS: dict[str, dict[str, Param]] = {
    "downsample": {
        "probability": _PROBABILITY,
        "min_fraction": Param(
            float, 0.0, 1.0, open_low=True, meaning="smallest low side as a fraction of the side"
        ),
    },
    "jpeg": {
        "probability": _PROBABILITY,
        "min_quality": Param(int, 1, 100, meaning="lowest JPEG quality"),
        "max_quality": Param(int, 1, 100, meaning="highest JPEG quality"),
    },
    "gamma": {
        "probability": _PROBABILITY,
        "max_gamma": Param(float, 1.0, 10.0, meaning="gamma drawn in [1/max, max]"),
        "min_gain": Param(float, 0.0, 1.0, open_low=True, meaning="darkest gain"),
    },
}


def check_augment(aug: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """The capture-degradation keys of train.augment, checked; disabled ones map to None."""
    if isinstance(aug, DictConfig):
        aug = OmegaConf.to_container(aug, resolve=True)
    greyscale = aug.get("greyscale") or 0.0
    checked: dict[str, Any] = {
        "greyscale": _PROBABILITY.check(f"{AUGMENT_KEY}.greyscale", greyscale)
    }
    for name, spec in AUGMENT_SPECS.items():
        checked[name] = _section(aug, name, spec)
    jp = checked["jpeg"]
    if jp and jp["min_quality"] > jp["max_quality"]:
        raise ConfigError(
            f"{AUGMENT_KEY}.jpeg.min_quality: {jp['min_quality']} exceeds "
            f"max_quality {jp['max_quality']}"
        )
    return checked


def augmentation_layers(aug: Mapping[str, Any] | DictConfig, seed: int) -> list[keras.layers.Layer]:
    """Random capture degradations to append to train.augmentation(): gamma/gain, greyscale,
    down-up sampling, JPEG, in the order a camera pipeline would apply them. For batched float32
    images in [0, 255] (train.make_dataset's map); each layer gets its own seed so that their
    random draws are independent."""
    checked = check_augment(aug)
    keras, random_gamma, random_downsample, random_jpeg = _layers_module()
    layers: list[keras.layers.Layer] = []
    if checked["gamma"]:
        g = checked["gamma"]
        layers.append(
            random_gamma(
                g["probability"],
                g["max_gamma"],
                g["min_gain"],
                seed=seed + 101,
                name="random_gamma",
            )
        )
    if checked["greyscale"] > 0:
        layers.append(
            keras.layers.RandomGrayscale(
                checked["greyscale"], seed=seed + 102, name="random_greyscale"
            )
        )
    if checked["downsample"]:
        d = checked["downsample"]
        layers.append(
            random_downsample(
                d["probability"], d["min_fraction"], seed=seed + 103, name="random_downsample"
            )
        )
    if checked["jpeg"]:
        j = checked["jpeg"]
        layers.append(
            random_jpeg(
                j["probability"],
                j["min_quality"],
                j["max_quality"],
                seed=seed + 104,
                name="random_jpeg",
            )
        )
    return layers
