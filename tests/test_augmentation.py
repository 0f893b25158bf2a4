"""Training's capture augmentation: the layers run the degradations evaluation's conditions
run, inside the batched tf.data map of fitting.make_dataset, only when configured, and a bad
train.augment value is named before any work."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf

from soundmood import augmentation
from soundmood.data.prepare import load_split
from soundmood.errors import ConfigError
from tests.conftest import compose_config

CAPTURE_AUGMENT = {
    "greyscale": 0.1,
    "downsample": {"probability": 0.25, "min_fraction": 0.4},
    "jpeg": {"probability": 0.25, "min_quality": 25, "max_quality": 95},
    "gamma": {"probability": 0.25, "max_gamma": 2.2, "min_gain": 0.5},
}


def _augment(overrides: dict) -> DictConfig:
    base = OmegaConf.to_container(compose_config().train.augment)  # open to the capture keys
    return OmegaConf.merge(base, CAPTURE_AUGMENT, overrides)


def test_capture_augmentation_runs_in_the_batched_training_map(prepared_smoke) -> None:
    import tensorflow as tf

    from soundmood import fitting

    x, y = load_split(prepared_smoke.data.prepared_dir, "train")
    x, y = x[:48], y[:48]
    always = {
        "greyscale": 1.0,
        "downsample": {"probability": 1.0},
        "jpeg": {"probability": 1.0},
        "gamma": {"probability": 1.0},
    }
    aug = _augment(always)
    layers = augmentation.augmentation_layers(aug, seed=7)
    assert [layer.name for layer in layers] == [
        "random_gamma",
        "random_greyscale",
        "random_downsample",
        "random_jpeg",
    ]
    pipeline = augmentation.augmentation(aug, 7)  # train's own pipeline ends with the same layers
    assert [layer.name for layer in pipeline.layers[-4:]] == [layer.name for layer in layers]
    batches = list(fitting.make_dataset(x, y, 5, 16, pipeline, seed=7))
    images = np.concatenate([b[0].numpy() for b in batches])
    assert images.shape == x.shape and images.dtype == np.uint8
    # Greyscale came through the map (JPEG's chroma rounding may leave a level of difference).
    assert np.abs(images[..., 0].astype(int) - images[..., 1]).max() <= 1

    floats = tf.cast(x, tf.float32)
    for layer in layers:
        out = layer(floats, training=True).numpy()
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 255
        assert np.abs(out - x).mean() > 1.0, layer.name
        assert np.array_equal(layer(floats, training=False).numpy(), x.astype(np.float32))
    gamma, grey, down, jpeg = (layer(floats, training=True).numpy() for layer in layers)
    assert gamma.mean() < x.mean()  # gains <= 1 darken on average
    assert np.array_equal(grey[..., 0], grey[..., 2])
    assert _detail(down) < 0.8 * _detail(x)  # fine detail removed
    assert 0 < np.abs(jpeg - x).mean() < 10


def _detail(images: np.ndarray) -> float:
    """Mean absolute difference between horizontal neighbours: high-frequency content."""
    return float(np.abs(np.diff(images.astype(float), axis=2)).mean())


def test_capture_augmentation_off_when_absent_or_zero() -> None:
    base = {k: v for k, v in compose_config().train.augment.items() if k not in CAPTURE_AUGMENT}
    assert augmentation.augmentation_layers(base, seed=0) == []
    off = {
        "greyscale": 0.0,
        "downsample": None,
        "jpeg": {"probability": 0.0},
        "gamma": {"probability": 0},
    }
    assert augmentation.augmentation_layers(_augment(off), seed=0) == []


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"greyscale": 1.5}, "train.augment.greyscale"),
        ({"jpeg": {"min_quality": 0}}, "train.augment.jpeg.min_quality"),
        ({"jpeg": {"min_quality": 90, "max_quality": 30}}, "train.augment.jpeg.min_quality"),
        ({"downsample": {"min_fraction": 0}}, "train.augment.downsample.min_fraction"),
        ({"gamma": {"max_gamma": 0.5}}, "train.augment.gamma.max_gamma"),
        ({"gamma": {"strength": 1}}, "train.augment.gamma.strength"),
    ],
)
def test_bad_augment_value_is_named(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        augmentation.augmentation_layers(_augment(overrides), seed=0)
