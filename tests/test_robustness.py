"""Capture conditions on real RAF-DB faces: each degradation is deterministic and does what it
claims, evaluation scores and logs every configured condition to a real MLflow store, bad
configuration fails before any work and the promotion floor refuses (the training side of the
same degradations: test_augmentation.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from soundmood import calibration, conditions, robustness
from soundmood.data.images import load_face
from soundmood.data.prepare import load_split
from soundmood.errors import ConfigError
from soundmood.registry.gate import condition_floor_failure
from tests.conftest import compose_config

CLASSES = ("angry", "happy", "neutral", "sad", "surprised")


def configured() -> dict[str, conditions.Condition]:
    return {c.name: c for c in conditions.check_config(compose_config())}


def faces(data_root: Path, size: int, per_class: int = 2) -> np.ndarray:
    """Real test faces, decoded exactly as training decodes them."""
    paths = [
        p for name in CLASSES for p in sorted((data_root / "test" / name).glob("*.jpg"))[:per_class]
    ]
    return np.stack([load_face(p, size) for p in paths])


class Configured:
    """A configured condition, applied as evaluation applies it."""

    def __init__(self, cond: conditions.Condition) -> None:
        self.cond, self.params = cond, cond.params

    def apply(self, images: np.ndarray, seed: int) -> np.ndarray:
        return robustness.condition_images(self.cond, images, seed)


def condition(name: str) -> Configured:
    return Configured(configured()[name])


# --- every configured transform ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(compose_config().evaluate.conditions))
@pytest.mark.parametrize("size", [64, 100])
def test_condition_is_deterministic_keeps_size_and_changes_the_face(
    name: str, size: int, data_root: Path
) -> None:
    x = faces(data_root, size)
    first, again = condition(name).apply(x, seed=0), condition(name).apply(x.copy(), seed=0)
    assert first.dtype == np.uint8 and first.shape == x.shape
    assert np.array_equal(first, again)
    assert np.abs(first.astype(int) - x).mean() > 1.0  # it does something to every split


def test_grey_has_equal_channels_with_the_face_luminance(data_root: Path) -> None:
    x = faces(data_root, 64)
    out = condition("grey").apply(x, 0)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    pil_luma = np.stack([np.asarray(Image.fromarray(img).convert("L")) for img in x])
    assert np.abs(out[..., 0].astype(int) - pil_luma).max() <= 1  # as a grey photo would load


def _bilinear_upsampler(low: int, side: int) -> np.ndarray:
    """The side x low matrix of PIL's bilinear upsampling along one axis."""
    up = np.zeros((side, low))
    for i in range(low):
        row = np.zeros((low, low), np.float32)
        row[i] = 1.0
        up[:, i] = np.asarray(
            Image.fromarray(row, "F").resize((side, side), Image.Resampling.BILINEAR)
        )[:, 0]
    return up


def _residual_outside_low_size(img: np.ndarray, up: np.ndarray) -> np.ndarray:
    """What of `img` no low-size image upsampled bilinearly can reproduce (least squares)."""
    project = up @ np.linalg.pinv(up)
    return np.stack(
        [img[..., c] - project @ img[..., c].astype(float) @ project.T for c in range(3)], axis=-1
    )


@pytest.mark.parametrize("size", [64, 96, 100])
def test_lowres_keeps_no_detail_above_the_low_size(size: int, data_root: Path) -> None:
    x = faces(data_root, size, per_class=1)
    cond = condition("lowres")
    low = round(cond.params["size_fraction"] * size)  # 48 of 100 px
    up = _bilinear_upsampler(low, size)
    out = cond.apply(x, 0)
    for before, after in zip(x, out, strict=True):
        # The output is a low x low image upsampled, up to uint8 rounding; the original is not.
        assert np.abs(_residual_outside_low_size(after, up)).max() < 1.5
        assert np.abs(_residual_outside_low_size(before, up)).max() > 20


def test_jpeg_round_trip_decodes_to_a_degraded_copy(data_root: Path) -> None:
    x = faces(data_root, 100)
    out = condition("jpeg").apply(x, 0)
    mse = ((out.astype(float) - x) ** 2).mean(axis=(1, 2, 3))
    assert (mse > 0).all()
    assert (10 * np.log10(255**2 / mse) > 25).all()  # the same face, with compression artefacts
    # A stronger compression of the same faces loses more: the quality parameter is used.
    worse = Configured(conditions.parse_conditions({"jpeg": {"quality": 5}})[0]).apply(x, 0)
    assert ((worse.astype(float) - x) ** 2).mean() > mse.mean()


def test_dark_and_low_contrast_do_what_they_say(data_root: Path) -> None:
    x = faces(data_root, 64)
    dark = condition("dark").apply(x, 0)
    assert (dark.mean(axis=(1, 2, 3)) < 0.5 * x.mean(axis=(1, 2, 3))).all()
    flat = condition("low_contrast").apply(x, 0)
    ratio = flat.std(axis=(1, 2)) / x.std(axis=(1, 2))
    assert np.allclose(ratio, condition("low_contrast").params["factor"], atol=0.02)
    assert np.allclose(flat.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1.0)


def test_rotate_alternates_the_sign_per_image(data_root: Path) -> None:
    face = faces(data_root, 64, per_class=1)[0]
    pair = np.stack([face, face[:, ::-1]])  # the mirror image, at an odd index
    out = condition("rotate").apply(pair, 0)
    assert out.shape == pair.shape
    # Rotating the mirror image the other way is the mirror of the rotated image (up to a level
    # where float32 sampling points round differently on the two sides).
    assert np.abs(out[1].astype(int) - out[0][:, ::-1]).max() <= 1
    assert np.abs(out[0].astype(int) - face).mean() > 10


def _best_integer_shift(moved: np.ndarray, original: np.ndarray, reach: int) -> tuple[int, int]:
    side = original.shape[0]
    inner = (slice(reach, side - reach), slice(reach, side - reach))
    candidates = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)]
    errors = [
        np.abs(moved[inner].astype(int) - np.roll(original, (dy, dx), (0, 1))[inner]).mean()
        for dy, dx in candidates
    ]
    return candidates[int(np.argmin(errors))]


def test_shift_moves_by_the_fraction_in_seeded_directions(data_root: Path) -> None:
    x = faces(data_root, 100, per_class=1)
    cond = condition("shift")
    out = cond.apply(x, 0)
    assert out.shape == x.shape
    moves = [_best_integer_shift(o, i, reach=15) for o, i in zip(out, x, strict=True)]
    distances = [np.hypot(*m) for m in moves]
    assert np.allclose(distances, cond.params["fraction"] * 100, atol=1.5)
    assert len(set(moves)) > 1  # not one direction for every face
    assert not np.array_equal(cond.apply(x, seed=1), out)  # condition_seed picks the directions


def test_loose_crop_shrinks_the_face_into_the_centre(data_root: Path) -> None:
    x = faces(data_root, 96)
    cond = condition("loose_crop")
    out = cond.apply(x, 0)
    # At 96 px the 75% face is 72 px, 12 px in: exactly the original downscaled to 72 px.
    side, inner = 96, round(96 * cond.params["face_fraction"])
    start = (side - inner) // 2
    centre = out[:, start : start + inner, start : start + inner].astype(int)
    downscaled = np.stack(
        [
            np.asarray(
                Image.fromarray(img).resize(
                    (inner, inner), Image.Resampling.BILINEAR, reducing_gap=None
                )
            )
            for img in x
        ]
    )
    assert np.abs(centre - downscaled).mean() < 1.0
    assert np.abs(centre - x[:, start : start + inner, start : start + inner]).mean() > 20


def test_tight_crop_enlarges_the_centre(data_root: Path) -> None:
    x = faces(data_root, 100)
    cond = condition("tight_crop")
    out = cond.apply(x, 0)
    keep = round(100 * cond.params["keep"])
    start = (100 - keep) // 2
    back = np.stack([np.asarray(Image.fromarray(img).resize((keep, keep))) for img in out])
    centre = x[:, start : start + keep, start : start + keep]
    assert np.abs(back.astype(int) - centre).mean() < 4  # the centre, up to two resamplings
    assert np.abs(out.astype(int) - x).mean() > 20


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "key"),
    [
        ({"blur": {"sigma": 2}}, "evaluate.conditions.blur: unknown condition 'blur'"),
        ({"jpeg": {"quality": 0}}, r"evaluate.conditions.jpeg.quality: 0 is not in"),
        ({"jpeg": {"quality": "low"}}, "evaluate.conditions.jpeg.quality: 'low' is not a number"),
        ({"jpeg": {"quality": 30.5}}, "evaluate.conditions.jpeg.quality: 30.5 is not an integer"),
        ({"jpeg": {}}, "evaluate.conditions.jpeg.quality: is missing"),
        (
            {"rotate": {"degrees": 15, "axis": 1}},
            "evaluate.conditions.rotate.axis: unknown parameter",
        ),
        ({"dark": {"gamma": 2.2, "brightness": 1.5}}, "evaluate.conditions.dark.brightness"),
        (
            {"jpeg_q5": {"transform": "jepg", "quality": 5}},
            "evaluate.conditions.jpeg_q5: unknown condition 'jepg'",
        ),
        ({"clean": {}}, "evaluate.conditions.clean: condition name"),
        (
            {"dark_confident": {"transform": "dark", "gamma": 2.2, "brightness": 0.5}},
            "evaluate.conditions.dark_confident: condition name",
        ),
    ],
)
def test_bad_condition_or_parameter_is_named(given: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        conditions.parse_conditions(given)


def test_a_second_level_of_a_transform_under_its_own_name() -> None:
    (cond,) = conditions.parse_conditions({"jpeg_q10": {"transform": "jpeg", "quality": 10}})
    assert (cond.name, cond.degradation, cond.params) == ("jpeg_q10", "jpeg", {"quality": 10})


def test_bad_condition_fails_before_any_work(prepared_smoke) -> None:
    cfg = prepared_smoke.copy()
    cfg.evaluate.conditions = {"jpeg": {"quality": 101}}
    x, y = load_split(cfg.data.prepared_dir, "val")
    # No model at all: only a check made before predicting anything can answer.
    with pytest.raises(ConfigError, match=r"evaluate\.conditions\.jpeg\.quality"):
        robustness.evaluate_conditions(None, x, y, cfg)
    cfg.evaluate.conditions = {"grey": {}}
    cfg.evaluate.condition_seed = -1
    with pytest.raises(ConfigError, match=r"evaluate\.condition_seed"):
        robustness.evaluate_conditions(None, x, y, cfg)


# --- evaluation of a real model, reports and MLflow ----------------------------------------------


@pytest.mark.slow  # over 5 s: left out of make test-fast
def test_evaluation_writes_and_logs_every_condition(
    prepared_smoke, mlflow_uri: str, tmp_path: Path
) -> None:
    import mlflow
    from sklearn.metrics import recall_score

    from soundmood.evaluate import predict_proba
    from soundmood.fitting import configure_tensorflow
    from soundmood.models import build

    cfg = prepared_smoke.copy()
    configure_tensorflow(cfg.train.threads, cfg.seed)
    model = build(
        compose_config(["model=seed_cnn"]).model, cfg.data.image_size, len(cfg.data.classes)
    )
    x, y = load_split(cfg.data.prepared_dir, "val")  # 30 faces: 10 passes of them stay quick
    probs = predict_proba(model, x, cfg.evaluate.batch_size, cfg.evaluate.tta_flip)
    threshold = float(np.median(probs.max(axis=1)))
    seen: dict[str, np.ndarray] = {}
    result = robustness.evaluate_conditions(
        model, x, y, cfg, min_confidence=threshold, on_predicted=seen.__setitem__
    )

    names = list(cfg.evaluate.conditions)
    # the detection path's condition comes last; its faces are a sample, so no probabilities
    every = [*names, conditions.REDETECTED]
    assert list(result["conditions"]) == every and result["images"] == len(y)
    assert result["conditions"][conditions.REDETECTED]["faces"] == cfg.evaluate.redetect.faces
    assert list(seen) == ["clean", *names]
    np.testing.assert_allclose(seen["clean"], probs, atol=1e-6)
    clean = probs.argmax(1)
    assert result["clean"]["accuracy"] == pytest.approx((clean == y).mean(), abs=1e-4)
    reused = robustness.evaluate_conditions(
        model, x, y, cfg, clean_probs=probs, min_confidence=threshold
    )
    assert {k: v for k, v in reused.items() if k != "seconds"} == {
        k: v for k, v in result.items() if k != "seconds"
    }  # deterministic end to end
    # calibration and the confident answers, per split, at the threshold
    for name in seen:
        scores = result["clean"] if name == "clean" else result["conditions"][name]
        kept = seen[name].max(axis=1) >= threshold
        assert scores["confident_coverage"] == pytest.approx(kept.mean(), abs=1e-4), name
        right = seen[name][kept].argmax(1) == y[kept]
        expected = round(float(right.mean()), 4) if kept.any() else None
        assert scores["confident_accuracy"] == expected, name
        assert scores["ece"] == pytest.approx(
            calibration.expected_calibration_error(seen[name], y), abs=1e-4
        )
    # only argmax labels for the clean pass (what train passes): its scores, no trust figures
    labels_only = robustness.evaluate_conditions(model, x, y, cfg, clean_pred=clean)
    assert labels_only["clean"] == {
        k: v for k, v in result["clean"].items() if k not in robustness.TRUST_STATS
    }
    assert "confident_coverage" not in labels_only["conditions"]["grey"]  # no threshold given
    assert labels_only["conditions"]["grey"]["ece"] == result["conditions"]["grey"]["ece"]
    recalls = recall_score(
        y, clean, labels=range(len(cfg.data.classes)), average=None, zero_division=0
    )
    assert result["clean"]["min_recall"] == pytest.approx(recalls.min(), abs=1e-4)
    assert result["clean"]["min_recall_class"] == cfg.data.classes[int(recalls.argmin())]
    for scores in result["conditions"].values():
        assert 0 <= scores["min_recall"] <= 1
        assert scores["min_recall_class"] in cfg.data.classes
    drops = [result["clean"]["accuracy"] - s["accuracy"] for s in result["conditions"].values()]
    assert result["mean_drop"] == pytest.approx(np.mean(drops), abs=1e-4)
    assert result["worst_accuracy"] == min(s["accuracy"] for s in result["conditions"].values())

    reports = tmp_path / "reports"
    paths = robustness.write_reports(result, reports)
    written = json.loads((reports / "robustness.json").read_text())
    assert list(written["conditions"]) == every and "seconds" not in written
    rows = (reports / "plots" / "robustness.csv").read_text().splitlines()
    assert rows[0] == "condition,accuracy"
    assert [r.split(",")[0] for r in rows[1:]] == ["clean", *every]

    mlflow.set_experiment("robustness-test")
    with mlflow.start_run() as run:
        robustness.log_to_mlflow(result, paths)
    logged = mlflow.get_run(run.info.run_id).data.metrics
    for name in every:
        for stat in (*robustness.STATS, *robustness.TRUST_STATS, *robustness.DETECTION_STATS):
            if result["conditions"][name].get(stat) is None:  # no face reached the threshold
                assert f"robust_{name}_{stat}" not in logged
                continue
            assert logged[f"robust_{name}_{stat}"] == pytest.approx(
                result["conditions"][name][stat]
            )
    assert logged["robust_worst_accuracy"] == pytest.approx(result["worst_accuracy"])
    assert logged["robust_mean_drop"] == pytest.approx(result["mean_drop"])
    artifacts = {
        Path(a.path).name
        for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "robustness")
    }
    assert artifacts == {"robustness.json", "robustness.csv"}
    # The gate reads the same figures back from the run, the detection path's included
    # (confident_accuracy is not a condition).
    assert robustness.condition_accuracies(logged) == {
        n: result["conditions"][n]["accuracy"] for n in every
    }


# --- promotion floor -----------------------------------------------------------------------------


def _result(accuracies: dict[str, float]) -> dict:
    scores = {
        n: {
            "accuracy": a,
            "macro_f1": a,
            "min_recall": a / 2,
            "min_recall_class": "sad",
            # below every floor: robust_<n>_confident_accuracy must not read as a condition
            "ece": 0.2,
            "confident_coverage": 0.05,
            "confident_accuracy": 0.1,
        }
        for n, a in accuracies.items()
    }
    clean = {"accuracy": 0.85, "macro_f1": 0.8, "min_recall": 0.6, "min_recall_class": "angry"}
    return {
        "images": 100,
        "seconds": 1.0,
        "clean": clean,
        "conditions": scores,
        **robustness.summarise(clean, scores),
    }


def test_train_writes_its_validation_report_with_the_conditions_off(
    prepared_smoke, mlflow_uri: str, tmp_path: Path
) -> None:
    """dvc.yaml declares reports/robustness_val.json as train's output, so `-S
    evaluate.conditions=null -S evaluate.redetect.faces=0` must still write it (the clean
    validation scores)."""
    import mlflow

    from soundmood.models import build
    from soundmood.train import VAL_ROBUSTNESS_FILE, score_validation_conditions

    cfg = prepared_smoke.copy()
    cfg.evaluate.conditions = None
    cfg.evaluate.redetect.faces = 0
    model = build(
        compose_config(["model=seed_cnn"]).model, cfg.data.image_size, len(cfg.data.classes)
    )
    val = load_split(cfg.data.prepared_dir, "val")
    mlflow.set_experiment("validation-report")  # this test's store, not an earlier test's id
    with mlflow.start_run():
        result = score_validation_conditions(model, val, cfg, tmp_path)
    written = json.loads((tmp_path / VAL_ROBUSTNESS_FILE).read_text())
    assert written["conditions"] == {} and written["worst_condition"] is None
    assert written["clean"] == result["clean"] and written["images"] == len(val[1])


def test_condition_floor_refuses_below_and_names_the_condition() -> None:
    result = _result({"grey": 0.81, "dark": 0.42, "jpeg": 0.58})
    message = condition_floor_failure(result, 0.6)
    assert message is not None
    assert "dark 0.4200" in message and "jpeg 0.5800" in message and "grey" not in message
    assert "worst: dark" in message and "0.6000" in message
    flat = robustness.mlflow_metrics(result)  # as the registry reads a run's metrics
    assert flat["robust_dark_confident_accuracy"] == 0.1
    assert robustness.condition_accuracies(flat) == {"grey": 0.81, "dark": 0.42, "jpeg": 0.58}
    assert condition_floor_failure(flat, 0.6) == message
    assert condition_floor_failure(flat, 0.4) is None
    assert condition_floor_failure(result, 0.0) is None  # floor disabled


def test_condition_floor_refuses_a_model_without_condition_metrics() -> None:
    message = condition_floor_failure({"test_accuracy": 0.9}, 0.5)
    assert message is not None and "robust_<condition>_accuracy" in message
    assert condition_floor_failure({"test_accuracy": 0.9}, 0.0) is None
