"""Logit adjustment on a real model and real faces: the numpy path that picks tau predicts what
the Keras model predicts once tau is folded into its head, the fold survives saving, a larger tau
only moves decisions toward the commoner classes, tau 0 in the grid means validation never
gets worse, and the ONNX graph train predicts with picks what Keras would."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from omegaconf import DictConfig
from scipy.special import softmax

from soundmood import logit_adjustment
from soundmood.data.prepare import load_split
from soundmood.evaluate import predict_proba
from soundmood.models import build


@pytest.fixture(scope="module")
def faces(prepared_smoke: DictConfig) -> dict:
    cfg = prepared_smoke
    return {
        "cfg": cfg,
        "train": load_split(cfg.data.prepared_dir, "train"),
        "val": load_split(cfg.data.prepared_dir, "val"),
    }


def _model(cfg: DictConfig) -> keras.Model:
    keras.utils.set_random_seed(0)
    return build(cfg.model, cfg.data.image_size, len(cfg.data.classes))


def test_folded_bias_gives_the_adjusted_posterior_and_survives_saving(
    faces: dict, tmp_path: Path
) -> None:
    cfg, (x, _) = faces["cfg"], faces["val"]
    model = _model(cfg)
    (logits,) = logit_adjustment.view_logits(model.predict_on_batch, x, 32, tta_flip=False)
    np.testing.assert_allclose(softmax(logits, axis=1), model.predict(x, verbose=0), atol=1e-4)
    shift = np.log([0.1, 0.4, 0.2, 0.2, 0.1])
    logit_adjustment.fold_into_head(model, shift)
    expected = softmax(logits + shift, axis=1)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-4)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), expected, atol=1e-4)


def test_larger_tau_only_moves_decisions_toward_the_commonest_class(faces: dict) -> None:
    cfg, (x, _) = faces["cfg"], faces["val"]
    model = _model(cfg)
    logits = logit_adjustment.view_logits(model.predict_on_batch, x, 32, tta_flip=False)
    prior = np.log([0.06, 0.42, 0.22, 0.18, 0.12])  # happy commonest, as in RAF-DB's train split
    happy = [
        int((logit_adjustment.adjusted_prediction(logits, t * prior) == 1).sum())
        for t in (0.0, 0.5, 1.0, 2.0)
    ]
    assert happy == sorted(happy)
    assert happy[-1] > happy[0]  # the shift is large enough to change some decisions


def test_chosen_tau_is_the_best_on_validation_and_never_worse_than_none(faces: dict) -> None:
    cfg, (x, y) = faces["cfg"], faces["val"]
    train_labels = faces["train"][1]
    model = _model(cfg)
    prior = logit_adjustment.log_prior(train_labels, len(cfg.data.classes))
    np.testing.assert_allclose(np.exp(prior).sum(), 1.0)
    logits = logit_adjustment.view_logits(model.predict_on_batch, x, 32, tta_flip=True)
    taus = [0.0, 0.5, 1.0, 1.5]
    chosen = logit_adjustment.choose_tau(logits, y, prior, taus, "macro_f1")
    assert list(chosen.scores) == taus
    assert chosen.scores[chosen.tau] == max(chosen.scores.values())
    assert chosen.gain >= 0.0


def test_adjust_folds_the_chosen_tau_and_is_off_with_only_tau_zero(faces: dict) -> None:
    cfg, train_labels, val = faces["cfg"].copy(), faces["train"][1], faces["val"]
    model = _model(cfg)
    before = model.get_layer("probs").get_weights()[1].copy()
    cfg.train.logit_adjustment.taus = [0.0]
    assert logit_adjustment.adjust(model, model.predict_on_batch, train_labels, val, cfg) is None
    cfg.train.logit_adjustment.taus = [2.0]  # forced: the only choice
    chosen = logit_adjustment.adjust(model, model.predict_on_batch, train_labels, val, cfg)
    assert chosen is not None and chosen.tau == 2.0
    prior = logit_adjustment.log_prior(train_labels, len(cfg.data.classes))
    after = model.get_layer("probs").get_weights()[1]
    np.testing.assert_allclose(after - before, 2.0 * prior, atol=1e-5)
    # its validation labels are what the folded model predicts (train scores clean val with them)
    served = predict_proba(model, val[0], 32, cfg.evaluate.tta_flip).argmax(axis=1)
    np.testing.assert_array_equal(chosen.predictions, served)


@pytest.mark.slow  # over 5 s: left out of make test-fast
def test_the_onnx_graph_picks_the_tau_and_labels_keras_would(faces: dict, tmp_path: Path) -> None:
    from soundmood.export import served_forward

    cfg, (x, y), train_labels = faces["cfg"], faces["val"], faces["train"][1]
    model = _model(cfg)
    prior = logit_adjustment.log_prior(train_labels, len(cfg.data.classes))
    taus = [0.0, 0.5, 1.0, 2.0]
    graph = served_forward(model, tmp_path, 2, x[:8])
    by_keras, by_onnx = (
        logit_adjustment.choose_tau(
            logit_adjustment.view_logits(forward, x, 16, tta_flip=True), y, prior, taus, "macro_f1"
        )
        for forward in (model.predict_on_batch, graph)
    )
    assert by_onnx.tau == by_keras.tau
    np.testing.assert_allclose(list(by_onnx.scores.values()), list(by_keras.scores.values()))
    np.testing.assert_array_equal(by_onnx.predictions, by_keras.predictions)
