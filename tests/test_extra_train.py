"""data.extra_train: a class-labelled folder of the team's own photos is appended to the train
split only, decoded as RAF-DB's images, counted per source in index.json; a missing folder is an
error naming it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from soundmood.data import prepare
from soundmood.errors import ConfigError
from tests.conftest import run_prepare, smoke_config


def _photos(data_root: Path, folder: Path) -> int:
    """Three real RAF-DB test faces of two classes, saved larger and as JPEG as a phone would,
    under folders named otherwise (`joy` mapped to happy) and an ignored one."""
    for source, target in (("happy", "joy"), ("sad", "sad"), ("angry", "skip")):
        (folder / target).mkdir(parents=True)
        for path in sorted((data_root / "test" / source).iterdir())[:3]:
            Image.open(path).resize((160, 160)).save(folder / target / f"{path.stem}.jpg")
    return 6


def _run(cfg) -> dict:
    run_prepare(cfg)
    return json.loads((Path(cfg.data.prepared_dir) / prepare.INDEX_FILE).read_text())


@pytest.mark.slow
def test_extra_source_joins_train_only(tmp_path: Path, data_root: Path, prepared_smoke) -> None:
    n = _photos(data_root, tmp_path / "own")
    cfg = smoke_config(tmp_path, data_root)
    cfg.data.extra_train = {
        "own": {"path": str(tmp_path / "own"), "label_map": {"joy": "happy", "skip": None}}
    }
    index = _run(cfg)
    base = json.loads((Path(prepared_smoke.data.prepared_dir) / prepare.INDEX_FILE).read_text())
    assert index["files"]["val"] == base["files"]["val"]
    assert index["files"]["test"] == base["files"]["test"]
    assert index["files"]["train"][:-n] == base["files"]["train"]
    assert index["files"]["train"][-n][0].startswith("own:joy/")
    assert index["train_sources"] == {"rafdb": len(base["files"]["train"]), "own": n}
    assert index["extra_train"]["own"]["counts"] == {
        "angry": 0,
        "happy": 3,
        "neutral": 0,
        "sad": 3,
        "surprised": 0,
    }
    x, y = prepare.load_split(cfg.data.prepared_dir, "train")
    bx, by = prepare.load_split(prepared_smoke.data.prepared_dir, "train")
    assert np.array_equal(x[:-n], bx) and np.array_equal(y[:-n], by)
    assert x.shape[1:] == bx.shape[1:] and list(y[-n:]) == [1, 1, 1, 3, 3, 3]


def test_missing_or_bad_extra_source_is_named(tmp_path: Path, data_root: Path) -> None:
    cfg = smoke_config(tmp_path, data_root)
    cfg.data.extra_train = {"own": {"path": str(tmp_path / "nowhere")}}
    with pytest.raises(ConfigError, match=r"data\.extra_train\.own: .*nowhere"):
        prepare.extra_train(cfg.data)
    _photos(data_root, tmp_path / "own")
    cfg.data.extra_train = {"own": {"path": str(tmp_path / "own")}}  # joy, skip: not classes
    with pytest.raises(ConfigError, match=r"data\.extra_train\.own: folder\(s\) joy, skip"):
        prepare.extra_train(cfg.data)
    cfg.data.extra_train = OmegaConf.create({"own": {"path": 3}})
    with pytest.raises(ConfigError, match=r"data\.extra_train\.own\.path"):
        prepare.extra_train(cfg.data)
