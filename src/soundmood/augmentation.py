"""Training's augmentation (train.augment) as Keras layers for the batched float32 [0, 255]
tf.data map of fitting.make_dataset: keras' own random flip, rotation, zoom, translation, contrast,
brightness, perspective, saturation, hue, blur and erasing layers, then the capture degradations
(greyscale, gamma, downsample, jpeg), and last the optional mixing of two faces and their labels
(keras' MixUp or CutMix). Each capture degradation runs the function of soundmood.degradations
that evaluation's conditions run, with parameters drawn per image; keras has no layer for gamma,
down-up sampling or JPEG, and one layer class draws all four the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import keras
import tensorflow as tf
from omegaconf import DictConfig, ListConfig

from soundmood.conditions import MIN_ERASED, check_augment
from soundmood.degradations import apply_batch, dark, grey, jpeg, lowres

# From a (N, k) batch of uniform draws in [0, 1) to the degradation's per-image arguments.
Draw = Callable[[tf.Tensor], dict[str, tf.Tensor]]


class RandomDegradation(keras.layers.Layer):
    """With `probability` per image, `degradation` with the arguments `draw` makes of `draws`
    uniform numbers; images not chosen pass through untouched, and at inference all do."""

    def __init__(
        self,
        degradation: Callable[..., tf.Tensor],
        probability: float,
        draw: Draw,
        draws: int,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.degradation, self.probability = degradation, probability
        self.draw, self.draws = draw, draws
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images: tf.Tensor, training: bool = True) -> tf.Tensor:
        if not training:
            return images
        u = keras.random.uniform((tf.shape(images)[0], 1 + self.draws), seed=self.generator)
        # Degrade the chosen images only: the tf.image ops are the costly part.
        chosen = tf.where(u[:, 0] < self.probability)
        arguments = self.draw(tf.gather(u[:, 1:], chosen[:, 0]))
        out = apply_batch(self.degradation, tf.gather(images, chosen[:, 0]), arguments)
        return tf.tensor_scatter_nd_update(images, chosen, out)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape


def _between(low: float, high: float, u: tf.Tensor) -> tf.Tensor:
    return low + (high - low) * u


def augmentation_layers(aug: Mapping[str, Any] | DictConfig, seed: int) -> list[keras.Layer]:
    """Random capture degradations to append to fitting's augmentation: gamma/gain, greyscale,
    down-up sampling, JPEG, in the order a camera pipeline would apply them; each layer gets its
    own seed so that their random draws are independent."""
    checked = check_augment(aug)
    layers: list[keras.Layer] = []
    if g := checked["gamma"]:
        log_max = math.log(g["max_gamma"])

        def gamma(u: tf.Tensor) -> dict[str, tf.Tensor]:  # log-uniform in [1/max, max]
            gain = _between(g["min_gain"], 1.0, u[:, 1])
            return {"gamma": tf.exp(_between(-log_max, log_max, u[:, 0])), "brightness": gain}

        layers.append(
            RandomDegradation(dark, g["probability"], gamma, 2, seed + 101, name="random_gamma")
        )
    if checked["greyscale"] > 0:
        layers.append(
            RandomDegradation(
                grey, checked["greyscale"], lambda u: {}, 0, seed + 102, name="random_greyscale"
            )
        )
    if d := checked["downsample"]:

        def fraction(u: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"size_fraction": _between(d["min_fraction"], 1.0, u[:, 0])}

        layers.append(
            RandomDegradation(
                lowres, d["probability"], fraction, 1, seed + 103, name="random_downsample"
            )
        )
    if j := checked["jpeg"]:

        def quality(u: tf.Tensor) -> dict[str, tf.Tensor]:  # an integer in [min, max]
            span = j["max_quality"] - j["min_quality"] + 1
            q = j["min_quality"] + tf.floor(u[:, 0] * span)
            return {"quality": tf.minimum(q, float(j["max_quality"]))}

        layers.append(
            RandomDegradation(jpeg, j["probability"], quality, 1, seed + 104, name="random_jpeg")
        )
    return layers


def keras_layers(aug: Mapping[str, Any] | DictConfig, seed: int) -> list[keras.Layer]:
    """Keras' perspective, saturation, hue, blur and erasing layers, those configured. Their
    `factor` (p, p) applies each to an image with probability p exactly (a lone p would draw the
    probability in [0, p])."""
    checked, layers = check_augment(aug), []
    if p := checked["perspective"]:  # corners outside the frame are filled black
        chance = (p["probability"], p["probability"])
        layers.append(
            keras.layers.RandomPerspective(chance, p["scale"], seed=seed + 105, name="perspective")
        )
    if s := checked["saturation"]:  # 0.5 keeps the colours, 0 greys, 1 saturates fully
        layers.append(keras.layers.RandomSaturation((0.5 - s, 0.5 + s), seed=seed + 106))
    if h := checked["hue"]:
        layers.append(keras.layers.RandomHue(h, seed=seed + 107))
    if b := checked["blur"]:  # a 5-px kernel holds sigma 1 (Keras' largest) to 2 sigma
        chance = (b["probability"], b["probability"])
        sigma = (0.0, b["max_sigma"])
        layers.append(keras.layers.RandomGaussianBlur(chance, 5, sigma, seed=seed + 108))
    if e := checked["erasing"]:  # a patch of clipped Gaussian noise: an occluding hand or object
        chance, area = (e["probability"], e["probability"]), (MIN_ERASED, e["max_area"])
        layers.append(keras.layers.RandomErasing(chance, area, seed=seed + 109))
    return layers


Mix = Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


def mixing(aug: Mapping[str, Any] | DictConfig, seed: int) -> Mix | None:
    """train.augment.mix as a function of a float batch and its one-hot labels: with
    `probability` per image, keras' MixUp (pixels blended) or CutMix (a patch pasted) with
    another image of the batch, the labels mixed in the same proportion; None when off."""
    m = check_augment(aug)["mix"]
    if m is None:
        return None
    if m["kind"] == "mixup":
        layer = keras.layers.MixUp(alpha=m["alpha"], seed=seed + 110)
    else:  # CutMix draws its Beta parameter in `factor`: (alpha, alpha) fixes it
        layer = keras.layers.CutMix((m["alpha"], m["alpha"]), seed=seed + 110)
    generator = keras.random.SeedGenerator(seed + 111)

    def mix(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        labels = tf.cast(labels, tf.float32)
        out = layer({"images": images, "labels": labels}, training=True)
        chosen = keras.random.uniform((tf.shape(images)[0],), seed=generator) < m["probability"]
        return (
            tf.where(chosen[:, None, None, None], out["images"], images),
            tf.where(chosen[:, None], out["labels"], labels),
        )

    return mix


def augmentation(aug: DictConfig, seed: int) -> keras.Sequential:
    """Random, label-preserving transforms as Keras preprocessing layers (train batches only)."""
    steps: list[keras.layers.Layer] = []
    if aug.flip:
        steps.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if aug.rotation:
        steps.append(keras.layers.RandomRotation(aug.rotation, fill_mode="reflect", seed=seed))
    if aug.zoom:
        # a [low, high] range zooms out (positive: the face smaller, as a looser crop frames it)
        # by a different amount than in; a number zooms both ways by up to it
        zoom = tuple(aug.zoom) if isinstance(aug.zoom, ListConfig | list) else aug.zoom
        steps.append(keras.layers.RandomZoom(zoom, fill_mode="reflect", seed=seed))
    if aug.translation:
        steps.append(
            keras.layers.RandomTranslation(
                aug.translation, aug.translation, fill_mode="reflect", seed=seed
            )
        )
    if aug.contrast:
        steps.append(keras.layers.RandomContrast(aug.contrast, value_range=(0, 255), seed=seed))
    if aug.brightness:
        steps.append(keras.layers.RandomBrightness(aug.brightness, value_range=(0, 255), seed=seed))
    steps += keras_layers(aug, seed)  # perspective, saturation, hue, blur, erasing
    steps += augmentation_layers(aug, seed)  # greyscale, low-res, JPEG, gamma
    return keras.Sequential(steps, name="augment")
