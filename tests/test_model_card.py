"""The model card: rendered from a version's tags alone (pure), and for real: `register` run on
reports as evaluate writes them, the card read back from the registry (the version's
description and its run's model_card.md artifact) holds the reports' figures and the gate's
decision."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from omegaconf import DictConfig

from soundmood import model_card, registry
from soundmood.model_card import MISSING, Tag
from soundmood.registry import commands
from tests.test_serving import build_tiny_model, log_in_run, tiny_config

CLASSES = ("angry", "happy", "neutral", "sad", "surprised")
CONDITIONS = ("grey", "dark", "loose_crop")


def reports_of(quality: float) -> tuple[dict, dict, dict]:
    """metrics.json, robustness.json and train_run.json as evaluate and train write them, for a
    model whose figures all move with `quality` (distinct, 4-decimal values per key)."""
    metrics = {"accuracy": round(quality + 0.05, 4), "macro_f1": quality, "weighted_f1": quality}
    for i, c in enumerate(CLASSES):
        metrics[f"{c}_precision"] = round(quality + 0.01 * i, 4)
        metrics[f"{c}_recall"] = round(quality + 0.02 * i, 4)
        metrics[f"{c}_f1"] = round(quality + 0.015 * i, 4)
    metrics.update(
        ece=round(0.1 - quality / 10, 4),
        nll=round(1.5 - quality, 4),
        brier=round(0.8 - quality / 2, 4),
        ece_before_temperature=round(0.2 - quality / 10, 4),
        nll_before_temperature=round(1.7 - quality, 4),
        brier_before_temperature=round(0.9 - quality / 2, 4),
        min_confidence=0.8123,
        confident_coverage=round(quality - 0.1, 4),
        confident_accuracy=round(quality + 0.3, 4),
        model_mb=round(9 + quality, 4),
        latency_ms=round(20 - 10 * quality, 4),
    )
    conditions = {
        name: {
            "accuracy": round(quality + 0.01 * (i + 1), 4),
            "macro_f1": round(quality - 0.01 * (i + 1), 4),
            "min_recall": round(quality - 0.05, 4),
            "min_recall_class": "sad",
            "ece": round(0.05 + 0.01 * i, 4),
            "confident_coverage": round(quality - 0.2, 4),
            "confident_accuracy": round(quality + 0.2, 4),
        }
        for i, name in enumerate(CONDITIONS)
    }
    worst = min(conditions, key=lambda n: conditions[n]["accuracy"])
    robustness = {
        "images": 250,
        "clean": {"accuracy": metrics["accuracy"], "macro_f1": quality},
        "conditions": conditions,
        "worst_condition": worst,
        "worst_accuracy": conditions[worst]["accuracy"],
        "mean_drop": 0.01,
    }
    return metrics, robustness, {"temperature": 1.4321, "min_confidence": 0.8123}


def register_from_reports(cfg: DictConfig, model, quality: float) -> str:
    """A real run holding the served model, reports for it under evaluate.reports_dir, and the
    real `register` stage; returns the registered version."""
    run_id, uri = log_in_run(model, cfg)
    metrics, robustness, train_run = reports_of(quality)
    reports = Path(cfg.evaluate.reports_dir)
    reports.mkdir(exist_ok=True)
    (reports / "metrics.json").write_text(json.dumps(metrics))
    (reports / "robustness.json").write_text(json.dumps(robustness))
    (reports / "train_run.json").write_text(json.dumps({"mlflow_run_id": run_id, **train_run}))
    evaluation = {"mlflow_run_id": run_id, "model_uri": uri, "test_images": 250}
    (reports / "evaluation.json").write_text(json.dumps(evaluation))
    assert commands.register_cli(cfg) == 0
    return str(json.loads((reports / "registry.json").read_text())["version"])


def store_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DictConfig:
    """The tiny model's config with reports and prepared/index.json (the data version) under
    tmp_path, the gate's rules fixed here; run from tmp_path (the store's ./mlruns go there)."""
    monkeypatch.chdir(tmp_path)
    config = tiny_config()
    config.evaluate.reports_dir = str(tmp_path / "reports")
    config.data.prepared_dir = str(tmp_path / "prepared")
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "index.json").write_text(json.dumps({"data_version": "md5-card"}))
    config.registry.min_improvement = 0.01
    config.registry.min_class_recall = 0.5
    config.registry.min_condition_accuracy = 0.6
    return config


@pytest.fixture
def cfg(
    mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_root: Path
) -> DictConfig:
    return store_config(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def keras_model():
    return build_tiny_model()


def row(*cells: str) -> str:
    return model_card.table_row(cells)


def card_of(cfg: DictConfig, version: str) -> tuple[str, str]:
    """(description, model_card.md artifact) of a version, read back from the registry."""
    mv = mlflow.MlflowClient().get_model_version(cfg.registry.model_name, version)
    artifact = mlflow.artifacts.download_artifacts(
        run_id=mv.run_id, artifact_path=model_card.CARD_FILE
    )
    return mv.description, Path(artifact).read_text()


def test_the_card_holds_the_reports_figures_read_back_from_the_registry(cfg, keras_model):
    version = register_from_reports(cfg, keras_model, 0.7)
    description, artifact = card_of(cfg, version)
    assert description == artifact  # the whole card fits the description
    metrics, robustness, train_run = reports_of(0.7)
    for c in CLASSES:
        figures = (metrics[f"{c}_{s}"] for s in ("precision", "recall", "f1"))
        assert row(c, *(f"{v:.4f}" for v in figures)) in artifact
    clean = metrics["accuracy"]
    for name, s in robustness["conditions"].items():
        assert (
            row(
                name,
                f"{s['accuracy']:.4f}",
                f"{s['accuracy'] - clean:+.4f}",
                f"{s['macro_f1']:.4f}",
                f"{s['min_recall']:.4f}",
                f"{s['ece']:.4f}",
                f"{100 * s['confident_coverage']:.1f}% at {s['confident_accuracy']:.4f}",
            )
            in artifact
        )
    for key, label in model_card.CALIBRATION_ROWS:
        value = train_run["temperature"] if key == "temperature" else metrics[key]
        assert row(label, f"{value:.4f}") in artifact
    assert f"ONNX {metrics['model_mb']:.1f} MB, {metrics['latency_ms']:.1f} ms" in artifact
    # the data version, licence, limits derived from the figures, the gate, how to rebuild it
    assert "`md5-card`" in artifact and "non-commercial research only" in artifact
    assert "Weakest classes by test recall: angry 0.7000, happy 0.7200, neutral 0.7400" in artifact
    assert "cost the most accuracy (clean 0.7500): grey 0.7100 (-0.0400)" in artifact
    assert "## Promotion gate: promoted" in artifact and "no champion yet" in artifact
    tags = mlflow.MlflowClient().get_model_version(cfg.registry.model_name, version).tags
    # registered from tmp_path, outside git: no commit to check out (the command: below)
    assert (model_card.reproduce_command(tags) or "cannot be rebuilt from the") in artifact
    assert MISSING not in artifact.split("## Capture conditions")[1]  # every figure is there


def test_a_refusal_later_promoted_by_force_is_on_the_card(cfg, keras_model):
    """The card follows the gate: register refuses (below the champion by less than the
    margin), the card says so with the numbers; a forced promotion rewrites it."""
    register_from_reports(cfg, keras_model, 0.7)
    second = register_from_reports(cfg, keras_model, 0.705)
    description, artifact = card_of(cfg, second)
    assert "## Promotion gate: refused" in description
    assert "test macro_f1 0.7050 vs champion v1 0.7000 (+0.0050" in description
    assert registry.promote(cfg, second, "relabelled test set").promote
    description, artifact = card_of(cfg, second)
    assert description == artifact
    assert "## Promotion gate: forced" in artifact and "forced: relabelled test set" in artifact
    assert "Previous champion: v1." in artifact


def test_older_reports_render_missing_figures_as_a_dash():
    """A version registered before calibration was measured: no ece, size or latency tags."""
    tags = {
        Tag.GIT_COMMIT: "abc",
        "test_accuracy": "0.6",
        "test_macro_f1": "0.55",
        **{f"test_{c}_{s}": "0.5" for c in CLASSES for s in ("precision", "recall", "f1")},
        "robust_dark_accuracy": "0.4",
        "robust_worst_accuracy": "0.4",
        "robust_mean_drop": "0.2",
    }
    card = model_card.render("m", 3, tags, CLASSES)
    assert "## Reproduce\n\n```\ngit checkout abc && make repro\n```" in card
    assert row("ECE", MISSING) in card and row("temperature (folded into the softmax)", MISSING)
    assert row("dark", "0.4000", "-0.2000", MISSING, MISSING, MISSING, MISSING) in card
    assert "| worst |" not in card and "| mean |" not in card  # summaries, not conditions
    assert "Not yet gated" in card
    outside_git = model_card.render("m", 3, {**tags, Tag.GIT_COMMIT: "unknown"}, CLASSES)
    assert "make repro" not in outside_git and "cannot be rebuilt" in outside_git


def test_condition_tags_are_parsed_by_their_longest_suffix():
    tags = {
        "robust_jpeg_q10_accuracy": "0.5",
        "robust_jpeg_q10_confident_accuracy": "0.9",
        "robust_jpeg_q10_confident_coverage": "0.3",
        "robust_jpeg_q10_min_recall": "0.2",
        "robust_jpeg_q10_macro_f1": "0.45",
        "robust_worst_accuracy": "0.5",
        "robust_redetected_accuracy": "0.72",
        "robust_redetected_detected": "0.8",
        "robust_redetected_accuracy_on_detected": "0.9",
    }
    assert model_card.condition_figures(tags) == {
        "jpeg_q10": {
            "accuracy": 0.5,
            "confident_accuracy": 0.9,
            "confident_coverage": 0.3,
            "min_recall": 0.2,
            "macro_f1": 0.45,
        },
        "redetected": {"accuracy": 0.72, "detected": 0.8, "accuracy_on_detected": 0.9},
    }


def test_the_detection_path_s_figures_are_a_known_limit():
    tags = {
        "test_accuracy": "0.89",
        "robust_redetected_accuracy": "0.737",
        "robust_redetected_detected": "0.808",
        "robust_redetected_accuracy_on_detected": "0.912",
    }
    limits = model_card.known_limits(model_card.figures(tags, CLASSES))
    assert (
        "Through the face detector (test faces re-embedded in pictures and found again), 80.8% "
        "were found; accuracy 0.7370 counting a face not found as wrong, 0.9120 on the faces "
        "found." in limits
    )
    without = {k: v for k, v in tags.items() if not k.endswith("detected")}
    limits = model_card.known_limits(model_card.figures(without, CLASSES))
    assert not any("face detector" in line for line in limits)


def test_a_card_too_long_for_the_description_is_cut_at_a_section():
    tags = {f"robust_condition{i}_accuracy": "0.5" for i in range(200)}
    tags.update({f"test_{c}_recall": "0.5" for c in CLASSES})
    whole = model_card.render("m", 1, tags, CLASSES)
    cut = model_card.description("m", 1, tags, CLASSES)
    assert len(whole) > model_card.DESCRIPTION_LIMIT >= len(cut)
    assert "## Test results per class" in cut and "## Capture conditions" not in cut
    assert cut.rstrip().endswith(f"the whole card is the run's artifact {model_card.CARD_FILE}._")
