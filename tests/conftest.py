"""Shared fixtures: configs composed from the real conf/ (smoke profile), real images from the
DVC-pulled data, and a real MLflow store in a temporary directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = ROOT / "data" / "raf-db-5class"


def _ensure_data() -> None:
    """Pull RAF-DB from the team's DVC remote once, if this checkout has not yet."""
    if not (DATA_ROOT / "test").is_dir():
        subprocess.run(["dvc", "pull", "-q", "data.dvc"], cwd=ROOT, check=True)


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The real conf/ composed with the smoke profile plus `overrides`."""
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=["profile=smoke", *overrides])
    OmegaConf.resolve(cfg)
    return cfg


@pytest.fixture(scope="session")
def data_root() -> Path:
    _ensure_data()
    return DATA_ROOT


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real, empty SQLite MLflow store; MLFLOW_TRACKING_URI points at it for the test."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def smoke_config(
    workdir: Path, data_root: Path, overrides: list[str] | tuple[str, ...] = ()
) -> DictConfig:
    """Smoke config whose every output path lies under `workdir` (inputs stay absolute)."""
    cfg = compose_config(overrides)
    cfg.data.root = str(data_root)
    cfg.data.prepared_dir = str(workdir / "prepared")
    cfg.train.model_dir = str(workdir / "models")
    cfg.evaluate.reports_dir = str(workdir / "reports")
    cfg.tune.best_params_path = str(workdir / "reports" / "best_params.yaml")
    cfg.tune.storage = f"sqlite:///{workdir / 'optuna.db'}"
    if cfg.model.get("weights"):
        cfg.model.weights = str((ROOT / cfg.model.weights).resolve())
    return cfg


@pytest.fixture
def smoke_cfg(tmp_path: Path, data_root: Path) -> DictConfig:
    return smoke_config(tmp_path, data_root)


@pytest.fixture(scope="session")
def prepared_smoke(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> DictConfig:
    """The smoke profile's prepared splits, built once per session by the real prepare stage."""
    workdir = tmp_path_factory.mktemp("prepared-smoke")
    cfg = smoke_config(workdir, data_root)
    run_prepare(cfg)
    return cfg


def run_prepare(cfg: DictConfig) -> dict:
    """The real prepare stage run from the project root; its index.json."""
    from soundmood.data import prepare

    cwd = os.getcwd()
    os.chdir(ROOT)  # data_version() reads data.dvc at the project root
    try:
        return prepare.run(cfg)
    finally:
        os.chdir(cwd)
