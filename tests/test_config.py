"""conf/ and params.yaml never disagree; overrides and validation name the key."""

from __future__ import annotations

import re
import subprocess

import pytest

from soundmood.config import flatten, load, params_diff, validate
from soundmood.errors import ConfigError
from tests.conftest import ROOT, compose_config


def test_committed_params_match_conf() -> None:
    result = subprocess.run(
        ["soundmood", "params", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_reports_a_diff_when_they_disagree(tmp_path, monkeypatch) -> None:
    import shutil

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    assert params_diff(tmp_path) == ""
    train = tmp_path / "conf" / "train" / "default.yaml"
    epochs = int(re.search(r"^epochs: (\d+)", train.read_text(), re.MULTILINE).group(1))
    train.write_text(train.read_text().replace(f"epochs: {epochs}", f"epochs: {epochs + 1}", 1))
    diff = params_diff(tmp_path)
    assert f"-  epochs: {epochs}" in diff and f"+  epochs: {epochs + 1}" in diff


def test_profiles_compose_and_validate() -> None:
    for profile in ("cpu", "smoke", "gpu"):
        cfg = compose_config([f"profile={profile}"])
        validate(cfg)
        assert cfg.profile == profile
    assert compose_config(["model=seed_cnn"]).model.name == "seed_cnn"


def test_flatten_gives_dotted_keys() -> None:
    cfg = compose_config()
    flat = flatten(cfg)
    assert flat["train.lr"] == cfg.train.lr and flat["model.dropout"] == cfg.model.dropout
    assert flat["data.classes"] == ["angry", "happy", "neutral", "sad", "surprised"]


@pytest.mark.parametrize("override", ["profile=smoke", "model=seed_cnn"])
def test_stage_overrides_refuse_config_groups(override: str) -> None:
    # a stage reads params.yaml: switching a group there would set one string, not the group
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]} is a config group.*params"):
        load([override], ROOT)


def test_load_applies_overrides_and_rejects_unknown_keys() -> None:
    assert load(["train.epochs=3"], ROOT).train.epochs == 3
    assert list(load(["train.augment.zoom=[-0.2,0.3]"], ROOT).train.augment.zoom) == [-0.2, 0.3]
    with pytest.raises(ConfigError, match=r"train\.epochz"):
        load(["train.epochz=3"], ROOT)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lr=-0.1", "train.lr"),
        ("model.name=resnet9000", "model.name"),
        ("data.image_size=8", "data.image_size"),
        ("train.augment.zoom=[0.4,-0.1]", "train.augment.zoom"),  # low above high
        ("train.augment.zoom=[-1.0,0.2]", "train.augment.zoom"),  # zooms everything away
        ("train.augment.zoom=1.5", "train.augment.zoom"),
        ("train.logit_adjustment.taus=[]", "train.logit_adjustment.taus"),
        ("train.logit_adjustment.taus=[0,5]", "train.logit_adjustment.taus"),
        ("train.logit_adjustment.objective=loss", "train.logit_adjustment.objective"),
    ],
)
def test_bad_values_fail_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load([override], ROOT)
