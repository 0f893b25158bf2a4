"""Model builders: the reference CNN's size, uint8 inputs, pretrained weights loaded offline."""

from __future__ import annotations

import numpy as np
import pytest

from soundmood.models import backbone_of, build, set_backbone_trainable
from tests.conftest import ROOT, compose_config


def test_seed_cnn_has_the_reference_size() -> None:
    model = build(compose_config(["model=seed_cnn"]).model, 100, 5)
    assert model.count_params() == pytest.approx(8.3e6, rel=0.01)
    assert model.input.dtype == "uint8"


def test_mobilenet_loads_pretrained_weights_and_takes_uint8() -> None:
    cfg = compose_config()
    cfg.model.weights = str(ROOT / cfg.model.weights)
    model = build(cfg.model, 96, 5)
    probs = model.predict(np.zeros((2, 96, 96, 3), np.uint8), verbose=0)
    assert probs.shape == (2, 5) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    first_conv = backbone_of(model).get_layer("Conv1").get_weights()[0]
    assert np.abs(first_conv).mean() > 0.01  # pretrained, not a fresh initialisation
    set_backbone_trainable(model, False)
    assert not backbone_of(model).trainable


def test_wrong_weights_checksum_is_refused() -> None:
    cfg = compose_config()
    cfg.model.weights = str(ROOT / cfg.model.weights)
    cfg.model.weights_sha256 = "0" * 64
    with pytest.raises(ValueError, match="sha256"):
        build(cfg.model, 96, 5)
