"""Where runs and their artifacts go: a real SQLite MLflow store in a temporary directory."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from soundmood import tracking
from tests.conftest import compose_config


def test_an_sqlite_store_keeps_its_artifacts_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, elsewhere = tmp_path / "store", tmp_path / "cwd"
    store.mkdir(), elsewhere.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.chdir(elsewhere)  # MLflow's default artifact root is ./mlruns of the cwd
    cfg = compose_config()
    try:
        experiment_id = tracking.setup(cfg)
        assert tracking.setup(cfg) == experiment_id  # the second call finds it
        with mlflow.start_run() as run:
            mlflow.log_text("hello", "note.txt")
        artifact = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id))
    finally:
        mlflow.set_tracking_uri(None)
    assert (artifact / "note.txt").read_text() == "hello"
    assert list((store / "mlruns").rglob("note.txt")), "artifact not stored beside mlflow.db"
    assert not (elsewhere / "mlruns").exists()


def test_other_stores_keep_mlflow_s_default_artifact_root() -> None:
    assert tracking.sqlite_artifact_root("http://127.0.0.1:5000") is None
    assert tracking.sqlite_artifact_root("postgresql+psycopg://u@h/db") is None
    root = tracking.sqlite_artifact_root("sqlite:///relative/mlflow.db")
    assert root == (Path.cwd() / "relative" / "mlruns").as_uri()
