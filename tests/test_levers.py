"""Training's optional levers (train.augment's Keras layers and mixing): each runs in the batched
tf.data map of fitting.make_dataset only when configured, mixing gives soft labels the loss and
the class weights take, and a bad value is a ConfigError naming its key."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf

from soundmood import augmentation, config, fitting
from soundmood.data.prepare import load_split
from soundmood.errors import ConfigError
from tests.conftest import compose_config

ALWAYS = {
    "perspective": {"probability": 1.0, "scale": 0.3},
    "saturation": 0.4,
    "hue": 0.5,
    "blur": {"probability": 1.0, "max_sigma": 1.0},
    "erasing": {"probability": 1.0, "max_area": 0.3},
}


def _augment(overrides: dict) -> DictConfig:
    return OmegaConf.merge(compose_config().train.augment, overrides)


def _smoke_batch(cfg: DictConfig, n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """n training faces of every class (the split is in class order)."""
    x, y = load_split(cfg.data.prepared_dir, "train")
    pick = np.random.default_rng(0).permutation(len(y))[:n]
    return x[pick], y[pick]


def test_levers_are_off_by_default() -> None:
    aug = compose_config().train.augment
    assert augmentation.keras_layers(aug, seed=0) == []
    assert augmentation.mixing(aug, seed=0) is None
    off = {"saturation": 0.0, "blur": {"probability": 0.0, "max_sigma": 1.0}, "mix": None}
    assert augmentation.keras_layers(_augment(off), 0) == []


@pytest.mark.slow
def test_each_keras_layer_changes_the_batch_not_its_labels(prepared_smoke) -> None:
    import tensorflow as tf

    x, y = _smoke_batch(prepared_smoke)
    layers = augmentation.keras_layers(_augment(ALWAYS), seed=5)
    assert [type(layer).__name__ for layer in layers] == [
        "RandomPerspective",
        "RandomSaturation",
        "RandomHue",
        "RandomGaussianBlur",
        "RandomErasing",
    ]
    floats = tf.cast(x, tf.float32)
    for layer in layers:
        out = layer(floats, training=True).numpy()
        assert out.shape == x.shape and out.dtype == np.float32, layer.name
        assert not np.allclose(out, x), layer.name
    pipeline = augmentation.augmentation(_augment(ALWAYS), 5)
    batches = list(fitting.make_dataset(x, y, 5, 16, pipeline, seed=5))
    images = np.concatenate([b[0].numpy() for b in batches])
    labels = np.concatenate([b[1].numpy() for b in batches])
    assert images.shape == x.shape and images.dtype == np.uint8
    assert len(batches[0]) == 2  # no sample weights without mixing
    # labels untouched: still one-hot, the same images per class (only their order shuffled)
    assert set(np.unique(labels)) == {0.0, 1.0} and np.array_equal(labels.sum(axis=1), [1] * len(y))
    assert np.array_equal(labels.sum(axis=0), np.bincount(y, minlength=5))


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mix_gives_soft_labels_that_fit_with_class_weights(prepared_smoke, kind: str) -> None:
    import keras

    x, y = _smoke_batch(prepared_smoke)
    aug = _augment({"mix": {"kind": kind, "alpha": 0.4, "probability": 1.0}})
    mix = augmentation.mixing(aug, seed=3)
    weights = fitting.class_weights(y, 5, "balanced")
    ds = fitting.make_dataset(x, y, 5, 16, None, 3, mix, weights)
    images, labels, sample_weight = (t.numpy() for t in next(iter(ds)))
    assert images.shape == (16, *x.shape[1:]) and images.dtype == np.uint8
    assert np.allclose(labels.sum(axis=1), 1.0, atol=1e-5)
    assert ((labels > 0) & (labels < 1)).any()  # soft
    expected = labels @ np.array([weights[k] for k in range(5)], dtype=np.float32)
    assert np.allclose(sample_weight, expected, rtol=1e-5)

    model = keras.Sequential(
        [
            keras.Input(x.shape[1:]),
            keras.layers.Rescaling(1 / 255),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(5, activation="softmax"),
        ]
    )
    fitting.compile_model(model, prepared_smoke.train, 5, 1)  # label smoothing, macro-F1
    history = model.fit(ds.take(1), verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_mix_probability_leaves_the_others_one_hot(prepared_smoke) -> None:
    x, y = _smoke_batch(prepared_smoke)
    none = augmentation.mixing(
        _augment({"mix": {"kind": "mixup", "alpha": 0.4, "probability": 0.0}}), 0
    )
    assert none is None
    some = augmentation.mixing(
        _augment({"mix": {"kind": "mixup", "alpha": 0.4, "probability": 0.5}}), 1
    )
    _, labels = (b for b in next(iter(fitting.make_dataset(x, y, 5, 32, None, 1, some))))
    one_hot = (labels.numpy().max(axis=1) == 1.0).sum()
    assert 0 < one_hot < 32


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"saturation": 0.7}, "train.augment.saturation"),
        ({"hue": -0.1}, "train.augment.hue"),
        ({"erasing": 0.3}, "train.augment.erasing"),
        ({"erasing": {"probability": 0.5, "max_area": 0.01}}, "train.augment.erasing.max_area"),
        ({"blur": {"probability": 1.5, "max_sigma": 1.0}}, "train.augment.blur.probability"),
        ({"blur": {"probability": 0.5, "max_sigma": 2.0}}, "train.augment.blur.max_sigma"),
        ({"perspective": {"probability": 0.5, "scale": 0.2, "shear": 1}}, "perspective.shear"),
        ({"mix": {"kind": "mixer", "alpha": 0.2, "probability": 0.5}}, "train.augment.mix.kind"),
        ({"mix": {"kind": "mixup", "alpha": 0.2}}, "train.augment.mix.probability"),
        ({"mix": {"kind": "cutmix", "alpha": 0, "probability": 0.5}}, "train.augment.mix.alpha"),
    ],
)
def test_bad_lever_value_is_named(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        augmentation.augmentation(_augment(overrides), seed=0)


def test_bad_lever_value_fails_the_config_check() -> None:
    cfg = compose_config(["train.augment.erasing={probability: 2, max_area: 0.2}"])
    with pytest.raises(ConfigError, match=r"train\.augment\.erasing\.probability"):
        config.validate(cfg)


@pytest.mark.slow
def test_fit_trains_an_epoch_with_mixing_on(prepared_smoke, tmp_path) -> None:
    """The train stage's own fit loop: mixed labels with sample weights in place of class_weight."""
    levers = {"mix": {"kind": "cutmix", "alpha": 1.0, "probability": 0.5}}
    cfg = OmegaConf.merge(prepared_smoke, {"train": {"augment": levers}})
    cfg.model = compose_config(["model=seed_cnn"]).model  # small: the levers are what is tested
    vx, vy = load_split(cfg.data.prepared_dir, "val")
    result = fitting.fit(
        cfg, _smoke_batch(cfg, 64), (vx[:32], vy[:32]), tmp_path / "work", epochs=1, verbose=0
    )
    assert len(result.history) == 1 and np.isfinite(result.history[0]["loss"])
