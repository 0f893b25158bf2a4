"""Capture degradations: faces as cameras and detectors deliver them (grey, low resolution, JPEG,
dark, low contrast, rotation, loose and tight crops, shift), each written once in TensorFlow.

Evaluation applies them to a prepared split with fixed parameters (`degrade`: uint8 numpy in
and out, deterministic for given draws; robustness's conditions), training with random ones in its
tf.data map (soundmood.augmentation). Each function takes one float32 (S, S, 3) face in [0, 255]
and scalar parameters, in the meaning conditions.DEGRADATION_PARAMS gives them, and returns the
same shape; `apply_batch` maps one over a batch with per-image parameters. The geometric ones use
the op keras' RandomRotation, RandomTranslation and RandomZoom use (affine_transform, bilinear,
borders reflected).

TensorFlow is imported inside the functions: robustness imports this module and the registry
imports robustness, which should not wait seconds for TensorFlow to read a report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

CHUNK = 256  # faces degraded per call in `degrade`: bounds the float32 copy of a large split


def grey(image: tf.Tensor) -> tf.Tensor:
    """A greyscale capture as load_face delivers it: ITU-R BT.601 luma in the three channels."""
    import tensorflow as tf  # deferred: see the module docstring

    return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def lowres(image: tf.Tensor, size_fraction: tf.Tensor) -> tf.Tensor:
    """A distant or low-resolution face: area-filtered down to size_fraction * S, bilinear back up
    (48 px of a 100 px source is 0.48)."""
    import tensorflow as tf

    side = tf.shape(image)[:2]
    low = tf.maximum(1, tf.cast(tf.round(size_fraction * tf.cast(side[0], tf.float32)), tf.int32))
    small = tf.image.resize(image, tf.stack([low, low]), "area")
    return tf.image.resize(small, side, "bilinear")


def jpeg(image: tf.Tensor, quality: tf.Tensor) -> tf.Tensor:
    """A heavily compressed upload: a JPEG round trip at `quality` (libjpeg, 4:2:0)."""
    import tensorflow as tf

    pixels = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
    return tf.cast(tf.image.adjust_jpeg_quality(pixels, tf.cast(quality, tf.int32)), tf.float32)


def dark(image: tf.Tensor, gamma: tf.Tensor, brightness: tf.Tensor) -> tf.Tensor:
    """An under-exposed capture: `gamma` on [0, 1] intensities, then scaled by `brightness`."""
    import tensorflow as tf

    unit = tf.clip_by_value(image, 0.0, 255.0) / 255.0
    return 255.0 * tf.image.adjust_gamma(unit, gamma, brightness)


def low_contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Haze or a washed-out screen: deviations from each channel's mean scaled by `factor`."""
    import tensorflow as tf

    return tf.image.adjust_contrast(image, factor)


def rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
    """A tilted head or camera: `degrees` anticlockwise about the centre."""
    return _similarity(image, angle=degrees * (math.pi / 180.0))


def loose_crop(image: tf.Tensor, face_fraction: tf.Tensor) -> tf.Tensor:
    """A detector box 1/face_fraction times wider than the aligned crop: the face shrunk about the
    centre to `face_fraction` of the frame (0.75: a 33% wider box)."""
    return _similarity(image, zoom=face_fraction)


def tight_crop(image: tf.Tensor, keep: tf.Tensor) -> tf.Tensor:
    """A box that cuts into the face: the central `keep` of the frame enlarged to fill it."""
    return _similarity(image, zoom=1.0 / keep)


def shift(image: tf.Tensor, dy: tf.Tensor, dx: tf.Tensor) -> tf.Tensor:
    """An off-centre box: the face moved by (dy, dx) fractions of the side (down, right)."""
    return _similarity(image, dy=dy, dx=dx)


def _similarity(
    image: tf.Tensor, angle: Any = 0.0, zoom: Any = 1.0, dy: Any = 0.0, dx: Any = 0.0
) -> tf.Tensor:
    """Rotated by `angle` radians and scaled by `zoom` about the centre, then moved by (dy, dx)
    fractions of the side. affine_transform maps each output pixel to the input point it samples:
    input = centre + rotation(output - centre) / zoom - move."""
    import keras
    import tensorflow as tf

    side = tf.cast(tf.shape(image)[0], tf.float32)
    centre = (side - 1.0) / 2.0
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    a2 = centre - centre * (cos - sin) - dx * side
    b2 = centre - centre * (sin + cos) - dy * side
    zero = tf.zeros_like(cos)
    transform = tf.stack([cos, -sin, a2, sin, cos, b2, zero, zero])
    return keras.ops.image.affine_transform(
        image, tf.cast(transform, tf.float32), interpolation="bilinear", fill_mode="reflect"
    )


Degradation = Callable[..., "tf.Tensor"]
DEGRADATIONS: dict[str, Degradation] = {
    "grey": grey,
    "lowres": lowres,
    "jpeg": jpeg,
    "dark": dark,
    "low_contrast": low_contrast,
    "rotate": rotate,
    "loose_crop": loose_crop,
    "tight_crop": tight_crop,
    "shift": shift,
}


def apply_batch(
    degradation: Degradation, images: tf.Tensor, arguments: Mapping[str, tf.Tensor]
) -> tf.Tensor:
    """`degradation` on each image of a float32 (N, S, S, 3) batch with its own parameters (each
    argument a length-N tensor), clipped to [0, 255]. The tf.image ops it calls take one image and
    scalar parameters, hence tf.map_fn."""
    import tensorflow as tf

    names = list(arguments)

    def one(args: tuple) -> tf.Tensor:
        image, *values = args
        return degradation(image, **dict(zip(names, values, strict=True)))

    out = tf.map_fn(one, (images, *(arguments[n] for n in names)), fn_output_signature=tf.float32)
    return tf.ensure_shape(tf.clip_by_value(out, 0.0, 255.0), images.shape)


def _alternating(params: Mapping[str, Any], draws: np.ndarray) -> dict[str, np.ndarray]:
    """Anticlockwise on even indices, clockwise on odd ones."""
    signs = np.where(np.arange(len(draws)) % 2 == 0, 1.0, -1.0)
    return {"degrees": params["degrees"] * signs}


def _any_direction(params: Mapping[str, Any], draws: np.ndarray) -> dict[str, np.ndarray]:
    """`fraction` of the side in the direction the image's draw picks."""
    angle = 2.0 * math.pi * draws
    return {"dy": params["fraction"] * np.sin(angle), "dx": params["fraction"] * np.cos(angle)}


_VARIES = {"rotate": _alternating, "shift": _any_direction}


def condition_arguments(
    name: str, params: Mapping[str, Any], draws: np.ndarray
) -> dict[str, np.ndarray]:
    """The per-image float32 arguments of degradation `name` for a condition's `params`."""
    if name in _VARIES:
        values = _VARIES[name](params, draws)
    else:
        values = {k: np.full(len(draws), v) for k, v in params.items()}
    return {k: np.asarray(v, np.float32) for k, v in values.items()}


def degrade(
    name: str, images: np.ndarray, params: Mapping[str, Any], draws: np.ndarray
) -> np.ndarray:
    """Degradation `name` with a condition's `params` on uint8 (N, S, S, 3) faces, uint8 out; the
    same images for the same draws (one per face, in [0, 1)), always."""
    import tensorflow as tf

    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 (N, S, S, 3), got {images.dtype} {images.shape}")
    arguments = condition_arguments(name, params, draws)
    batch = tf.function(
        lambda x, args: apply_batch(DEGRADATIONS[name], x, args), reduce_retracing=True
    )
    out = np.empty_like(images)
    for start in range(0, len(images), CHUNK):
        part = slice(start, start + CHUNK)
        degraded = batch(
            tf.constant(images[part], tf.float32),
            {k: tf.constant(v[part]) for k, v in arguments.items()},
        )
        out[part] = np.rint(degraded.numpy()).astype(np.uint8)
    return out
