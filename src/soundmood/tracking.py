"""MLflow conventions shared by every stage: where runs go, what tags they carry, how they link.

train opens the pipeline's run and evaluate resumes it (its id travels in reports/train_run.json),
so one MLflow run holds a pipeline execution's params, curves, test metrics and model; the tune
stage's parent run is linked to it by the `soundmood.tune_run_id` tag.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import warnings
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from soundmood.config import flatten
from soundmood.data.layout import data_version
from soundmood.mlflow_store import tracking_uri


def setup(cfg: DictConfig) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id."""
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    name = cfg.tracking.experiment
    if mlflow.get_experiment_by_name(name) is None:
        with contextlib.suppress(MlflowException):  # another process created it first
            mlflow.create_experiment(name, artifact_location=sqlite_artifact_root(uri))
    return mlflow.set_experiment(name).experiment_id


def sqlite_artifact_root(uri: str) -> str | None:
    """`mlruns/` beside an SQLite store's file, so a store outside the project (a test's temp
    directory, a queued experiment's workspace) keeps its artifacts with it instead of in the
    current directory; None (MLflow's default) for other stores."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri == f"{prefix}:memory:":
        return None
    return (Path(uri[len(prefix) :]).resolve().parent / "mlruns").as_uri()


# Files DVC rewrites itself while `dvc repro` runs (the lock before train and evaluate, the
# .gitignore entries of new outputs): a change to them is not a change to code or config.
WRITTEN_BY_DVC = (":(exclude,top)dvc.lock", ":(exclude,glob)**/.gitignore")


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def git_state() -> dict[str, str]:
    """The commit, and whether tracked code or config differs from it (`git_dirty`)."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", ":/", *WRITTEN_BY_DVC)
    return {"git_commit": commit, "git_dirty": str(bool(changed)).lower()}


def run_tags(cfg: DictConfig, stage: str) -> dict[str, str]:
    return {
        **git_state(),
        "profile": str(cfg.get("profile", "")),
        "model_name": cfg.model.name,
        "data_version": data_version(),
        "stage": stage,
    }


def log_config(cfg: DictConfig) -> None:
    """The composed config as flat dotted params (train.lr, model.name, ...)."""
    params = {k: str(v) for k, v in flatten(cfg).items()}
    items = list(params.items())
    for start in range(0, len(items), 100):  # MLflow caps one batch at 100 params
        mlflow.log_params(dict(items[start : start + 100]))


def log_dataset(cfg: DictConfig, split: str, context: str) -> None:
    """Record the data version (data.dvc md5) as the run's dataset input."""
    folder = Path(cfg.data.root).resolve() / split
    log_folder(folder, f"raf-db-5class-{split}", data_version(), context)


def log_folder(folder: str | Path, name: str, digest: str, context: str) -> None:
    """A local folder as one of the active run's dataset inputs, named and digested."""
    with warnings.catch_warnings():  # a local folder matches two equivalent source classes
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(Path(folder).resolve()))
    dataset = MetaDataset(source=source, name=name, digest=digest)
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as exc:
            # Parallel runs (dvc exp run --jobs 2) insert the same dataset row at once: the
            # store looks for the row, then inserts it, so the loser of the race hits the
            # unique key. A retry finds the winner's row and links it to this run.
            duplicate = "UNIQUE constraint" in str(exc) or "duplicate key" in str(exc)
            if not duplicate or attempt == 2:
                raise
            time.sleep(0.5)
