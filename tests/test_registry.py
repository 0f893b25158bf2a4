"""The model registry: the promotion gate as a pure function, then the real thing: versions of real
logged models in a real SQLite MLflow store, aliases moved (or not) by the gate, rollback, and
the register stage run after a real evaluate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlflow
import pytest
from omegaconf import DictConfig, OmegaConf

from soundmood import model_card, registry
from soundmood.errors import UserError
from soundmood.registry import CHALLENGER, CHAMPION, Facts, Tag, commands, gate
from tests.conftest import compose_config
from tests.test_serving import build_tiny_model, log_in_run, tiny_config

CLASSES = ("angry", "happy", "neutral", "sad", "surprised")
RULES = OmegaConf.create(
    {"min_improvement": 0.01, "min_class_recall": 0.5, "min_condition_accuracy": 0.6}
)
CONDITIONS = ("grey", "dark", "loose_crop")


def robust_tags(accuracy: float | dict) -> dict[str, str]:
    """Version tags as register writes them from reports/robustness.json."""
    accuracies = accuracy if isinstance(accuracy, dict) else dict.fromkeys(CONDITIONS, accuracy)
    return {f"robust_{name}_accuracy": str(value) for name, value in accuracies.items()}


def facts(
    version: int,
    macro_f1: float,
    recall: float | dict = 0.6,
    data: str = "md5-a",
    test_images: int | None = 500,
    robust: float | dict = 0.7,
) -> Facts:
    recalls = recall if isinstance(recall, dict) else dict.fromkeys(CLASSES, recall)
    tags = {
        Tag.DATA_MD5: data,
        "test_macro_f1": str(macro_f1),
        "test_accuracy": "0.7",
        **{f"test_{c}_recall": str(v) for c, v in recalls.items()},
        **robust_tags(robust),
    }
    if test_images is not None:
        tags[Tag.TEST_IMAGES] = str(test_images)
    return Facts.from_tags(version, tags)


# --- the gate, a pure function ------------------------------------------------------------------


def test_with_no_champion_the_floors_alone_decide():
    decision = gate(facts(1, 0.30, recall=0.55), None, RULES)
    assert decision.promote and "no champion yet" in decision.reason
    refused = gate(facts(1, 0.90, recall={**dict.fromkeys(CLASSES, 0.9), "sad": 0.31}), None, RULES)
    assert not refused.promote
    assert "sad 0.3100" in refused.reason and "min_class_recall=0.5" in refused.reason


def test_a_candidate_must_beat_the_champion_by_the_margin():
    champion = facts(1, 0.70)
    assert gate(facts(2, 0.72), champion, RULES).promote
    for worse in (0.69, 0.70, 0.705):  # worse, a tie, better by less than min_improvement
        decision = gate(facts(2, worse), champion, RULES)
        assert not decision.promote
        assert f"{worse:.4f} vs champion v1 0.7000" in decision.reason
    tie_rules = OmegaConf.merge(RULES, {"min_improvement": 0.0})
    assert not gate(facts(2, 0.70), champion, tie_rules).promote  # a tie never displaces it
    assert gate(facts(2, 0.7001), champion, tie_rules).promote


def test_different_test_data_is_not_compared():
    decision = gate(facts(2, 0.99, data="md5-b"), facts(1, 0.50, data="md5-a"), RULES)
    assert not decision.promote
    assert "different test data (data md5-b vs md5-a)" in decision.reason
    assert "--force" in decision.reason
    subset = gate(facts(2, 0.99, test_images=200), facts(1, 0.5, test_images=3000), RULES)
    assert not subset.promote and "200 vs 3000 test images" in subset.reason


def test_every_failed_rule_is_reported_and_rules_are_extensible():
    decision = gate(facts(2, 0.60, recall=0.2), facts(1, 0.70), RULES)
    assert not decision.promote
    assert "class recall below" in decision.reason and "0.6000 vs champion" in decision.reason

    def small_enough(candidate: Facts, champion: Facts | None, rules: DictConfig):
        limit = rules.get("max_model_mb")
        if limit is None:
            return None
        size = float(candidate.tags.get("model_mb", "inf"))
        return registry.Check(size <= limit, f"model {size} MB vs registry.max_model_mb {limit}")

    rules = OmegaConf.merge(RULES, {"max_model_mb": 10})
    checks = (*registry.RULES, small_enough)
    assert not gate(facts(2, 0.9), facts(1, 0.7), rules, checks).promote
    assert gate(facts(2, 0.9), facts(1, 0.7), RULES, checks).promote  # rule not configured


def test_a_capture_condition_below_the_floor_refuses_and_is_named():
    decision = gate(
        facts(1, 0.9, robust={"grey": 0.8, "dark": 0.41, "loose_crop": 0.75}), None, RULES
    )
    assert not decision.promote
    assert "dark 0.4100" in decision.reason and "min_condition_accuracy" in decision.reason
    assert "grey" not in decision.reason
    passed = gate(facts(1, 0.9, robust=0.65), None, RULES)
    assert passed.promote and "worst: " in passed.reason
    unmeasured = Facts.from_tags(
        1, {k: v for k, v in facts(1, 0.9).tags.items() if not k.startswith("robust_")}
    )
    assert not gate(unmeasured, None, RULES).promote  # a floor needs figures to check
    off = OmegaConf.merge(RULES, {"min_condition_accuracy": 0.0})
    assert gate(unmeasured, None, off).promote


def test_the_champion_is_never_its_own_candidate():
    decision = gate(facts(3, 0.8), facts(3, 0.8), RULES)
    assert not decision.promote and "already the champion" in decision.reason


# --- a real registry ----------------------------------------------------------------------------


@pytest.fixture
def cfg(
    mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_root: Path
) -> DictConfig:
    monkeypatch.chdir(tmp_path)  # the store's artifacts (./mlruns) go under tmp_path
    config = tiny_config()
    config.registry.min_improvement = 0.01
    return config


@pytest.fixture(scope="module")
def keras_model():
    return build_tiny_model()


def add_version(
    cfg: DictConfig,
    model,
    macro_f1: float,
    recall: float = 0.6,
    data: str = "md5-a",
    robust: float = 0.7,
) -> str:
    """A real run with the served model logged as evaluate logs it, registered with these test
    metrics (the model is the same tiny network; the gate reads only the tags)."""
    run_id, uri = log_in_run(model, cfg)
    metrics = {
        "accuracy": macro_f1 + 0.05,
        "macro_f1": macro_f1,
        **{f"{c}_recall": recall for c in cfg.data.classes},
    }
    robust_metrics = {f"robust_{name}_accuracy": robust for name in CONDITIONS}
    tags = registry.version_tags(cfg, run_id, metrics, data, 250, robust_metrics)
    return str(registry.register(cfg, uri, run_id, tags).version)


def aliases(cfg: DictConfig) -> dict[str, str]:
    return {
        alias: str(version)
        for alias, version in mlflow.MlflowClient()
        .get_registered_model(cfg.registry.model_name)
        .aliases.items()
    }


def tags_of(cfg: DictConfig, version: str) -> dict[str, str]:
    return mlflow.MlflowClient().get_model_version(cfg.registry.model_name, version).tags


@pytest.mark.slow  # over 5 s: left out of make test-fast
def test_versions_are_promoted_refused_and_rolled_back(cfg, keras_model):
    v1 = add_version(cfg, keras_model, 0.50)
    mv = mlflow.MlflowClient().get_model_version(cfg.registry.model_name, v1)
    assert mv.run_id and mv.tags[Tag.RUN_ID] == mv.run_id  # linked to its run
    assert {
        Tag.GIT_COMMIT,
        Tag.DATA_MD5,
        Tag.CONFIG_HASH,
        Tag.PROFILE,
        Tag.MODEL_NAME,
        "test_macro_f1",
        "test_sad_recall",
    } <= set(mv.tags)
    assert "macro-F1 0.5000 on 250 images" in mv.description  # the model card
    assert aliases(cfg) == {CHALLENGER: v1}
    assert registry.promote(cfg, v1).promote
    assert aliases(cfg) == {CHAMPION: v1}  # the challenger it was is now the champion
    assert tags_of(cfg, v1)[Tag.PREVIOUS_CHAMPION] == ""

    v2 = add_version(cfg, keras_model, 0.505)  # better by less than min_improvement 0.01
    decision = registry.promote(cfg, v2)
    assert not decision.promote and "0.5050 vs champion v1 0.5000" in decision.reason
    assert aliases(cfg) == {CHAMPION: v1, CHALLENGER: v2}  # untouched
    assert tags_of(cfg, v2)[Tag.GATE] == "refused"
    assert Tag.PROMOTED_AT not in tags_of(cfg, v2)

    v3 = add_version(cfg, keras_model, 0.60)
    assert registry.promote(cfg, v3).promote
    assert aliases(cfg) == {CHAMPION: v3}
    history = tags_of(cfg, v3)
    assert history[Tag.PREVIOUS_CHAMPION] == v1 and history[Tag.PROMOTED_AT]
    assert "0.6000 vs champion v1 0.5000" in history[Tag.PROMOTION_REASON]
    assert history[Tag.FORCED] == "false"

    assert registry.rollback(cfg) == (v3, v1)
    assert aliases(cfg) == {CHAMPION: v1}
    assert tags_of(cfg, v3)[Tag.ROLLED_BACK_TO] == v1
    with pytest.raises(UserError, match="first champion"):
        registry.rollback(cfg)


def test_other_test_data_is_refused_until_forced_with_a_reason(cfg, keras_model, capsys):
    v1 = add_version(cfg, keras_model, 0.50)
    registry.promote(cfg, v1)
    v2 = add_version(cfg, keras_model, 0.90, data="md5-b")
    args = argparse.Namespace(version=int(v2), force=False, reason=None)
    assert commands.promote_cli(cfg, args) == 1
    assert "different test data (data md5-b vs md5-a)" in capsys.readouterr().out
    assert aliases(cfg) == {CHAMPION: v1, CHALLENGER: v2}

    with pytest.raises(UserError, match="--force needs --reason"):
        commands.promote_cli(cfg, argparse.Namespace(version=int(v2), force=True, reason=None))
    with pytest.raises(UserError, match="no version 99"):
        commands.promote_cli(cfg, argparse.Namespace(version=99, force=False, reason=None))
    forced = argparse.Namespace(version=None, force=True, reason="test set relabelled")
    assert commands.promote_cli(cfg, forced) == 0  # --version defaults to the latest
    shown = capsys.readouterr().out  # the diff against the champion, before the alias moves
    assert shown.index(f"v{v2} (challenger)") < shown.index(f"v{v2} promoted to champion")
    assert "would refuse: " in shown and "forced: test set relabelled" in shown
    assert aliases(cfg) == {CHAMPION: v2}
    tags = tags_of(cfg, v2)
    assert tags[Tag.FORCED] == "true" and tags[Tag.GATE] == "forced"
    assert tags[Tag.PROMOTION_REASON].startswith("forced: test set relabelled")

    assert commands.models_cli(cfg, argparse.Namespace()) == 0
    table = capsys.readouterr().out
    assert "champion" in table and "challenger" not in table and "md5-b" in table


@pytest.mark.slow
def test_register_stage_after_a_real_evaluate(
    prepared_smoke: DictConfig, mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """evaluate scores a real (untrained) model on the prepared test split and logs the served
    model; register makes it version 1 / challenger and runs the gate, whose refusal (an
    untrained model misses the recall floor) is reported, not raised."""
    import keras

    from soundmood import evaluate, tracking
    from soundmood.models import build

    monkeypatch.chdir(tmp_path)
    cfg = prepared_smoke.copy()
    cfg.model = compose_config(["model=seed_cnn"]).model
    cfg.train.model_dir = str(tmp_path / "models")
    cfg.evaluate.reports_dir = str(tmp_path / "reports")
    reports = Path(cfg.evaluate.reports_dir)
    reports.mkdir()
    keras.utils.set_random_seed(cfg.seed)
    model = build(cfg.model, cfg.data.image_size, len(cfg.data.classes))
    Path(cfg.train.model_dir).mkdir()
    model.save(Path(cfg.train.model_dir) / "model.keras")
    tracking.setup(cfg)
    with mlflow.start_run() as run:  # what train leaves for evaluate
        mlflow.log_params({"model.name": cfg.model.name, "data.image_size": cfg.data.image_size})
    (reports / "train_run.json").write_text(json.dumps({"mlflow_run_id": run.info.run_id}))

    evaluate.run(cfg)
    assert commands.register_cli(cfg) == 0
    report = json.loads((reports / "registry.json").read_text())
    assert report["name"] == "soundmood-fer" and report["version"] == 1
    assert report["decision"] == "refused" and "min_class_recall" in report["reason"]
    assert report["champion"] is None
    assert aliases(cfg) == {CHALLENGER: "1"}
    tags = tags_of(cfg, "1")
    index = json.loads((Path(cfg.data.prepared_dir) / "index.json").read_text())
    assert tags[Tag.DATA_MD5] == index["data_version"] != "unversioned"
    assert tags[Tag.TEST_IMAGES] == str(
        json.loads((reports / "evaluation.json").read_text())["test_images"]
    )
    metrics = json.loads((reports / "metrics.json").read_text())
    assert float(tags["test_macro_f1"]) == metrics["macro_f1"]
    card = mlflow.MlflowClient().get_model_version(cfg.registry.model_name, "1").description
    for c in cfg.data.classes:  # the model card holds this real evaluate's figures
        figures = [f"{metrics[f'{c}_{s}']:.4f}" for s in ("precision", "recall", "f1")]
        assert model_card.table_row([c, *figures]) in card
    robust = json.loads((reports / "robustness.json").read_text())["conditions"]
    for name, scores in robust.items():
        assert model_card.table_row([name, f"{scores['accuracy']:.4f}"])[:-2] in card
    assert "## Promotion gate: refused" in card and "min_class_recall" in card

    assert commands.register_cli(cfg) == 0  # a re-run registers no duplicate
    assert [str(mv.version) for mv in registry.all_versions(cfg.registry.model_name)] == ["1"]
    served = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@{CHALLENGER}")
    assert served.metadata.get_input_schema().input_names() == ["image"]

    override = argparse.Namespace(version=1, force=True, reason="smoke model, for the demo")
    assert commands.promote_cli(cfg, override) == 0
    assert commands.register_cli(cfg) == 0
    report = json.loads((reports / "registry.json").read_text())
    assert (report["decision"], report["champion"]) == ("champion", 1)
    assert aliases(cfg) == {CHAMPION: "1"}


def test_register_completes_a_version_a_killed_register_left_bare(cfg, keras_model):
    """A version created without its tags, description or alias (what a register killed right
    after creating it leaves, with a store that tags in separate calls): registering the same
    model again completes that version instead of adding a second one, and keeps what it holds."""
    run_id, uri = log_in_run(keras_model, cfg)
    name, mlflow_client = cfg.registry.model_name, mlflow.MlflowClient()
    mlflow_client.create_registered_model(name)
    bare = mlflow_client.create_model_version(
        name, uri, run_id, tags={Tag.GIT_COMMIT: "abc"}, model_id=registry.model_id_of(uri)
    )
    metrics = {"accuracy": 0.55, "macro_f1": 0.5, **{f"{c}_recall": 0.6 for c in CLASSES}}
    tags = registry.version_tags(cfg, run_id, metrics, "md5-a", 250)
    mv = registry.register(cfg, uri, run_id, tags)
    assert str(mv.version) == str(bare.version)
    assert [str(v.version) for v in registry.all_versions(name)] == [str(bare.version)]
    assert mv.tags == {**tags, Tag.GIT_COMMIT: "abc"}  # completed; what it held is kept
    assert mv.description == model_card.description(name, mv.version, mv.tags, CLASSES)
    assert aliases(cfg) == {CHALLENGER: str(mv.version)}
