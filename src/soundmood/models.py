"""Model builders named by conf/model/<name>.yaml. Every model takes uint8 RGB (N, S, S, 3) and
returns class probabilities: scaling and normalisation live inside the model, so a saved model
needs no preprocessing code next to it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import keras
from keras import layers
from omegaconf import DictConfig

MODEL_FILE = "model.keras"  # the trained classifier in train.model_dir

# What torchvision's ImageNet weights expect (../shared/weights/README.md), not Keras's x/127.5-1.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONE_LAYER = "backbone"


def _uint8_input(size: int) -> keras.KerasTensor:
    return keras.Input(shape=(size, size, 3), dtype="uint8", name="image")


def build_seed_cnn(model_cfg: DictConfig, size: int, n_classes: int) -> keras.Model:
    """The reference CNN: five conv blocks and four dense blocks (~8.3 M parameters at 100 px)."""
    drop, l2 = model_cfg.dropout, keras.regularizers.L2(model_cfg.l2)
    inputs = _uint8_input(size)
    x = layers.Rescaling(1.0 / 255)(inputs)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    blocks = [(64, 3, None), (128, 5, None), (512, 3, l2), (512, 3, l2)]
    for filters, kernel, reg in blocks:
        x = layers.Conv2D(
            filters, kernel, padding="same", activation="relu", kernel_regularizer=reg
        )(x)
        x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D()(x)
        x = layers.Dropout(drop)(x)
    x = layers.Flatten()(x)
    for units in (256, 512, 256, 512):
        x = layers.Dense(units)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
        x = layers.Dropout(drop)(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="seed_cnn")


def verify_sha256(path: Path, expected: str) -> None:
    if not path.exists():
        raise FileNotFoundError(
            f"model.weights: {path} not found (see ../shared/weights/README.md)"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if expected and digest != expected:
        raise ValueError(f"model.weights: {path} has sha256 {digest}, expected {expected}")


def build_mobilenet_v2(model_cfg: DictConfig, size: int, n_classes: int) -> keras.Model:
    """ImageNet-pretrained MobileNetV2 backbone, average pooling, dropout and a softmax head."""
    backbone = keras.applications.MobileNetV2(
        input_shape=(size, size, 3),
        alpha=model_cfg.alpha,
        include_top=False,
        weights=None,
        pooling="avg",
    )
    if model_cfg.weights:
        weights = Path(model_cfg.weights)
        verify_sha256(weights, model_cfg.get("weights_sha256", ""))
        backbone.load_weights(weights)
    for layer in backbone.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = model_cfg.bn_momentum
    backbone.name = BACKBONE_LAYER
    inputs = _uint8_input(size)
    x = layers.Rescaling(1.0 / 255)(inputs)
    x = layers.Normalization(mean=IMAGENET_MEAN, variance=[s * s for s in IMAGENET_STD])(x)
    x = backbone(x)
    x = layers.Dropout(model_cfg.dropout)(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="mobilenet_v2")


BUILDERS: dict[str, Callable[[DictConfig, int, int], keras.Model]] = {
    "seed_cnn": build_seed_cnn,
    "mobilenet_v2": build_mobilenet_v2,
}


def build(model_cfg: DictConfig, size: int, n_classes: int) -> keras.Model:
    return BUILDERS[model_cfg.name](model_cfg, size, n_classes)


def backbone_of(model: keras.Model) -> keras.Model | None:
    """The pretrained backbone, for models that have one (frozen during warm-up)."""
    try:
        return model.get_layer(BACKBONE_LAYER)
    except ValueError:
        return None


def set_backbone_trainable(model: keras.Model, trainable: bool, frozen_layers: int = 0) -> None:
    backbone = backbone_of(model)
    if backbone is None:
        return
    backbone.trainable = trainable
    if trainable:
        for layer in backbone.layers[:frozen_layers]:
            layer.trainable = False
