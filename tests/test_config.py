"""conf/ and params.yaml never disagree; overrides and validation name the key."""

from __future__ import annotations

import re
import subprocess

import pytest

from soundmood import schema
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


def test_the_schema_declares_every_composed_key_and_nothing_else() -> None:
    """One table: each key conf/ composes (every profile, every model) has its type, range and
    meaning in soundmood.schema; open mappings' entries are their owners' to parse."""
    for overrides in (["profile=cpu"], ["profile=smoke"], ["profile=gpu"], ["model=seed_cnn"]):
        cfg = compose_config(overrides)
        table = schema.config_table(cfg.model.name)
        open_ = [k for k, spec in table.items() if spec.kind == "mapping"]
        composed = {next((o for o in open_ if k.startswith(o + ".")), k) for k in flatten(cfg)}
        leaves = {k for k, spec in table.items() if spec.kind != "section"} - {"model"}
        assert composed == leaves, (sorted(composed - leaves), sorted(leaves - composed))
    assert all(spec.meaning for spec in schema.KEYS.values())


def test_every_bad_value_is_named_at_once() -> None:
    cfg = compose_config()
    cfg.train.lr, cfg.tune.pruner, cfg.inference.crop.size = 0, "never", 8
    cfg.train.augment.jpeg = {"probability": 0.5, "min_quality": 90, "max_quality": 30}
    cfg.data.rafdb_labels["1"] = "fearful"
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid configuration:"
    for key in (
        "train.lr: 0 is not in (0.0, 10.0]",
        "tune.pruner: 'never' is not one of",
        "inference.crop.size: 8 is not in [16",
        "train.augment.jpeg.min_quality: 90",
        "data.rafdb_labels.1: 'fearful' is not one of data.classes",
    ):
        assert any(line.strip().startswith(key) for line in lines), (key, lines)


def test_unknown_keys_and_model_sizes_are_named() -> None:
    with pytest.raises(ConfigError, match=r"^train\.epochz: unknown key; known: .*epochs"):
        validate(compose_config(["+train.epochz=3"]))  # or a typo in a profile
    small = compose_config(["data.image_size=24"])
    with pytest.raises(ConfigError, match=r"data\.image_size: 24 is under 32 px.*mobilenet_v2"):
        validate(small)
    validate(compose_config(["model=seed_cnn", "data.image_size=24"]))
    with pytest.raises(ConfigError, match=r"^model\.name: 'resnet' is not one of"):
        validate(compose_config(["model.name=resnet"]))
