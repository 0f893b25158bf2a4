"""evaluate's trust report: calibration before and after the temperature, the confident answers at
the threshold in force, size and latency, the reliability and selective plots, on a real (tiny,
untrained) model scored through its ONNX graph on the smoke profile's prepared test split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf

from soundmood import calibration, evaluate
from soundmood.conditions import CLEAN, REDETECTED
from soundmood.data.prepare import load_split
from tests.conftest import compose_config

CONTRACT_KEYS = (
    "ece",
    "nll",
    "brier",
    "ece_before_temperature",
    "nll_before_temperature",
    "brier_before_temperature",
    "min_confidence",
    "confident_coverage",
    "confident_accuracy",
    "model_mb",
    "latency_ms",
)


def tiny_model(cfg: DictConfig, sharpen: float = 1.0):
    """A real, seeded, untrained seed_cnn (what the report says about it is the point), its head
    logits times `sharpen`: an untrained head's answers are all within 1e-3 of uniform."""
    import keras

    from soundmood.logit_adjustment import HEAD_LAYER
    from soundmood.models import build

    keras.utils.set_random_seed(cfg.seed)
    model = build(compose_config(["model=seed_cnn"]).model, cfg.data.image_size, 5)
    head = model.get_layer(HEAD_LAYER)
    head.kernel.assign(head.kernel.numpy() * sharpen)
    head.bias.assign(head.bias.numpy() * sharpen)
    return model


def gap_threshold(top: np.ndarray) -> float:
    """A threshold in the widest gap between two middle top probabilities: far from every face,
    so the 1e-6 the ONNX graph differs from Keras by cannot move a face across it."""
    tops = np.sort(top)
    middle = tops[len(tops) // 4 : 3 * len(tops) // 4]
    i = int(np.argmax(np.diff(middle)))
    assert middle[i + 1] - middle[i] > 1e-4
    return float((middle[i] + middle[i + 1]) / 2)


@pytest.fixture(scope="module")
def evaluated(prepared_smoke: DictConfig, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real evaluate run: train_run.json as a model trained before calibration leaves it
    (no temperature) plus the threshold train would have chosen."""
    from soundmood import tracking

    base = tmp_path_factory.mktemp("evaluated")
    cfg = prepared_smoke.copy()
    cfg.model = compose_config(["model=seed_cnn"]).model
    cfg.train.model_dir = str(base / "models")
    cfg.evaluate.reports_dir = str(base / "reports")
    reports = base / "reports"
    model = tiny_model(cfg, sharpen=500.0)
    (base / "models").mkdir()
    model.save(base / "models" / "model.keras")
    x, y = load_split(cfg.data.prepared_dir, "test")
    probs = evaluate.predict_proba(model, x, cfg.evaluate.batch_size, cfg.evaluate.tta_flip)
    threshold = gap_threshold(probs.max(axis=1))
    uri = f"sqlite:///{base / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(base)
        tracking.setup(cfg)
        with mlflow.start_run() as run:  # what train leaves for evaluate
            mlflow.log_param("model.name", cfg.model.name)
        reports.mkdir()
        train_run = {"mlflow_run_id": run.info.run_id, "min_confidence": threshold}
        (reports / "train_run.json").write_text(json.dumps(train_run))
        metrics = evaluate.run(cfg)
        client = mlflow.MlflowClient(uri)
        logged = client.get_run(run.info.run_id).data.metrics
        artifacts = {
            Path(a.path).name for a in client.list_artifacts(run.info.run_id, "evaluation")
        }
        model_uri = json.loads((reports / "evaluation.json").read_text())["model_uri"]
        model_config = mlflow.pyfunc.load_model(model_uri).model_config
    mlflow.set_tracking_uri(None)
    return {
        "cfg": cfg,
        "reports": reports,
        "metrics": metrics,
        "probs": probs,
        "y": y,
        "threshold": threshold,
        "logged": logged,
        "artifacts": artifacts,
        "model_config": model_config,
    }


@pytest.mark.slow
def test_metrics_carry_the_trust_keys_and_mlflow_has_them(evaluated: dict) -> None:
    written = json.loads((evaluated["reports"] / "metrics.json").read_text())
    assert written == evaluated["metrics"]
    for key in CONTRACT_KEYS:
        assert written[key] is not None, key
        assert evaluated["logged"][f"test_{key}"] == pytest.approx(written[key]), key
    assert 0 <= written["ece"] <= 1 and 0 <= written["brier"] <= 2 and written["nll"] > 0
    assert written["model_mb"] > 0 and written["latency_ms"] > 0
    assert written["min_confidence"] == evaluated["threshold"]  # train_run.json's
    assert evaluated["model_config"]["min_confidence"] == pytest.approx(evaluated["threshold"])
    assert {"reliability.csv", "reliability.png", "selective.csv", "selective.png"} <= evaluated[
        "artifacts"
    ]
    for name in ("reliability.png", "selective.png"):
        assert (evaluated["reports"] / "plots" / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_before_equals_after_when_train_folded_no_temperature(evaluated: dict) -> None:
    metrics = evaluated["metrics"]  # train_run.json has no temperature: T = 1
    for key in ("ece", "nll", "brier"):
        assert metrics[f"{key}_before_temperature"] == pytest.approx(metrics[key], abs=1e-4)


@pytest.mark.slow
def test_confident_coverage_and_accuracy_are_a_direct_count(evaluated: dict) -> None:
    probs, y, threshold = evaluated["probs"], evaluated["y"], evaluated["threshold"]
    kept = probs.max(axis=1) >= threshold
    assert 0 < kept.sum() < len(y)  # the threshold splits the faces: the count means something
    assert evaluated["metrics"]["confident_coverage"] == pytest.approx(kept.mean(), abs=1e-4)
    right = probs[kept].argmax(axis=1) == y[kept]
    assert evaluated["metrics"]["confident_accuracy"] == pytest.approx(right.mean(), abs=1e-4)


@pytest.mark.slow
def test_reliability_csv_counts_every_test_face(evaluated: dict) -> None:
    with open(evaluated["reports"] / "plots" / "reliability.csv") as f:
        rows = list(csv.DictReader(f))
    assert sum(int(r["count"]) for r in rows) == len(evaluated["y"])
    assert all(r["calibrated"] == r["confidence"] for r in rows)  # the diagonal DVC draws
    ece = sum(int(r["count"]) * abs(float(r["accuracy"]) - float(r["confidence"])) for r in rows)
    assert ece / len(evaluated["y"]) == pytest.approx(evaluated["metrics"]["ece"], abs=1e-3)


@pytest.mark.slow
def test_selective_csv_has_a_thinned_curve_per_condition(evaluated: dict) -> None:
    with open(evaluated["reports"] / "plots" / "selective.csv") as f:
        rows = list(csv.DictReader(f))
    names = [CLEAN, *evaluated["cfg"].evaluate.conditions]
    assert list(dict.fromkeys(r["condition"] for r in rows)) == names
    robust = json.loads((evaluated["reports"] / "robustness.json").read_text())
    for name in names:
        curve = [r for r in rows if r["condition"] == name]
        assert 1 < len(curve) <= evaluate.SELECTIVE_POINTS + 1
        coverage = [float(r["coverage"]) for r in curve]
        assert coverage == sorted(coverage) and coverage[-1] == 1.0
        scores = robust["clean"] if name == CLEAN else robust["conditions"][name]
        assert float(curve[-1]["accuracy"]) == pytest.approx(scores["accuracy"], abs=1e-4)


@pytest.mark.slow
def test_robustness_json_carries_ece_and_confident_answers(evaluated: dict) -> None:
    robust = json.loads((evaluated["reports"] / "robustness.json").read_text())
    metrics = evaluated["metrics"]
    assert robust["clean"]["ece"] == metrics["ece"]
    assert robust["clean"]["confident_coverage"] == metrics["confident_coverage"]
    assert robust["clean"]["confident_accuracy"] == metrics["confident_accuracy"]
    # the nine conditions, then the detection path (a sample of faces, scored the same way)
    assert list(robust["conditions"]) == [*evaluated["cfg"].evaluate.conditions, REDETECTED]
    for name, scores in robust["conditions"].items():
        assert 0 <= scores["ece"] <= 1, name
        assert 0 <= scores["confident_coverage"] <= 1, name
        assert evaluated["logged"][f"robust_{name}_ece"] == pytest.approx(scores["ece"])


# --- the pieces, on a real model's forward pass --------------------------------------------------


def test_one_pass_gives_the_served_probabilities_and_the_temperature_undone(
    prepared_smoke: DictConfig,
) -> None:
    """Fold T into a real model's head as train does: the report on the folded model's single
    pass gives its own probabilities exactly and, undone, those of the model before the fold."""
    from soundmood.logit_adjustment import HEAD_LAYER

    cfg = prepared_smoke.copy()
    model = tiny_model(cfg, sharpen=100.0)
    x, y = load_split(cfg.data.prepared_dir, "val")
    batch, flip = 8, True  # several chunks: the views are put back together in order
    original = evaluate.predict_proba(model, x, batch, flip)
    head = model.get_layer(HEAD_LAYER)
    temperature = 1.7
    head.kernel.assign(head.kernel.numpy() / temperature)
    head.bias.assign(head.bias.numpy() / temperature)

    probs, views = evaluate.served_views(model.predict_on_batch, x, batch, flip)
    np.testing.assert_array_equal(probs, evaluate.predict_proba(model, x, batch, flip))
    assert len(views) == 2
    np.testing.assert_allclose(np.mean(views, axis=0), probs, atol=1e-6)
    np.testing.assert_allclose(evaluate.untempered(views, temperature), original, atol=1e-5)
    np.testing.assert_allclose(evaluate.untempered(views, 1.0), probs, atol=1e-6)

    found = evaluate.trust(probs, views, y, 5, temperature, 0.5)
    before = calibration.calibration_scores(original, y, 5)
    after = calibration.calibration_scores(probs, y, 5)
    for key in ("ece", "nll", "brier"):
        assert found.metrics[f"{key}_before_temperature"] == pytest.approx(before[key], abs=1e-4)
        assert found.metrics[key] == pytest.approx(after[key], abs=1e-4)
    assert found.metrics["nll"] != found.metrics["nll_before_temperature"]
    assert found.before.counts.sum() == found.after.counts.sum() == len(y)

    _, single = evaluate.served_views(model.predict_on_batch, x, batch, False)
    assert len(single) == 1
    np.testing.assert_allclose(single[0], views[0], atol=1e-6)


def test_threshold_in_force_prefers_the_config_then_train_then_zero() -> None:
    def cfg(value: float | None) -> DictConfig:
        return OmegaConf.create({"inference": {"min_confidence": value}})

    assert evaluate.threshold_in_force(cfg(0.9), {"min_confidence": 0.7})[0] == 0.9
    assert evaluate.threshold_in_force(cfg(0.0), {"min_confidence": 0.7})[0] == 0.0
    assert evaluate.threshold_in_force(cfg(None), {"min_confidence": 0.7})[0] == 0.7
    value, source = evaluate.threshold_in_force(cfg(None), {"mlflow_run_id": "x"})
    assert value == 0.0 and "none in train_run.json" in source
    assert evaluate.threshold_in_force(OmegaConf.create({}), {})[0] == 0.0


def test_thinned_curve_keeps_about_the_asked_points_and_every_face_kept() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=2000)
    labels = rng.integers(0, 5, size=2000)
    curve = calibration.selective_curve(probs, labels)
    picked = evaluate.thinned(curve, 40)
    assert 30 <= len(picked) <= 41 and picked[-1] == len(curve.coverage) - 1
    assert np.all(np.diff(picked) > 0)
    gaps = np.diff(np.r_[0.0, curve.coverage[picked]])
    assert gaps.max() <= 1 / 40 + 1e-9  # no stretch of the curve left out
