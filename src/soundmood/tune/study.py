"""The study: its storage and name, sampler and pruner, and the accounting of its trial budget and
of trials orphaned by a dead worker.

Kept instead of Optuna's plumbing: `optuna.study.MaxTrialsCallback` counts trials by state only, so
it can neither leave out trials that failed because their process stopped (FAIL like a trial failed
by its values) nor count the trials other live workers are running (N workers would overshoot
n_trials); the RDBStorage heartbeat fails a dead worker's trial only after its grace period and
from inside a later `optimize`, so a restart could not fail and close it before counting the
budget, and `RetryHeartbeatStaleTrialCallback` copies the dead trial's user attributes (its worker,
its MLflow run) into the retry.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from soundmood.config import digest, result_inputs
from soundmood.data.layout import data_version
from soundmood.fitting import WORK_DIR
from soundmood.processes import is_alive
from soundmood.tune.space import SearchParam, configured_values

# Config values no trial's result depends on (paths, the full run's epochs, hand-over switches):
# changing them keeps the study.
# What a trial's result depends on: the model's result inputs (config.result_inputs), less the
# full run's length, plus these keys of the search itself.
NOT_AFFECTING_TRIALS = frozenset({"train.epochs"})  # a trial trains tune.epochs
TUNE_KEYS_AFFECTING_TRIALS = ("tune.epochs", "tune.subset_fraction", "tune.objective")
# Trials that failed because their process stopped, not because of their values (or, "surplus",
# that a concurrent worker took the last place in the budget first): they do not use up the
# n_trials budget (a resumed study still gets n_trials real outcomes).
NOT_COUNTED_REASONS = frozenset({"interrupted", "orphaned", "surplus"})
# A RUNNING trial that has not recorded its worker yet is someone's trial between ask() and its
# first line for this long; older than that, its process died in between.
UNCLAIMED_GRACE = timedelta(seconds=60)


def study_name(cfg: DictConfig, params: list[SearchParam]) -> str:
    """Data version + digest of the space and of every value a trial's result depends on."""
    tuned = {p.key for p in params}
    fixed = {
        k: v
        for k, v in result_inputs(cfg).items()
        if k not in NOT_AFFECTING_TRIALS and k not in tuned
    }
    fixed.update({k: OmegaConf.select(cfg, k) for k in TUNE_KEYS_AFFECTING_TRIALS})
    space = {p.key: [p.kind, p.low, p.high, p.log, p.step, list(p.choices)] for p in params}
    # the baseline trial measures the configured values and, when no trial clearly beats it,
    # they are what train gets: a study measured with other defaults must not stand in for them
    baseline = configured_values(cfg, params) if cfg.tune.enqueue_baseline else {}
    inputs = {"space": space, "fixed": fixed, "baseline": baseline}
    return f"soundmood-{data_version()[:8]}-{digest(inputs, length=10)}"


def is_sqlite(url: str) -> bool:
    return make_url(url).drivername.startswith("sqlite")


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for other databases and in-memory SQLite."""
    database = make_url(url).database
    return Path(database) if is_sqlite(url) and database not in (None, "", ":memory:") else None


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """The study's database; a SQLite file's folder is created first."""
    if path := sqlite_file(url):
        path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url)


def printable_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def make_sampler(tune: DictConfig, n_existing: int, worker: int) -> optuna.samplers.TPESampler:
    """TPE seeded from tune.sampler_seed; the seed also mixes in how many trials the study holds
    and the worker's index, so a resumed run or a second worker does not replay the same draws."""
    seed = int(np.random.SeedSequence([tune.sampler_seed, n_existing, worker]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune.sampler_startup_trials)


def make_pruner(tune: DictConfig) -> optuna.pruners.BasePruner:
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=tune.pruner_startup_trials, n_warmup_steps=tune.pruner_warmup_steps
        )
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1,
            max_resource=tune.epochs,
            reduction_factor=tune.hyperband_reduction_factor,
        )
    return optuna.pruners.NopPruner()


def counts_toward_budget(trial: FrozenTrial) -> bool:
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return (
        trial.state == TrialState.FAIL
        and trial.user_attrs.get("fail_reason") not in NOT_COUNTED_REASONS
    )


def budget_used(study: optuna.Study) -> int:
    return sum(counts_toward_budget(t) for t in study.get_trials(deepcopy=False))


def is_live_running(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.RUNNING and not is_orphaned(trial)


def budget_taken(study: optuna.Study, before: int | None = None) -> int:
    """Trials counted plus those running in live workers (places in the budget already taken);
    with `before`, only trials numbered below it."""
    return sum(
        counts_toward_budget(t) or is_live_running(t)
        for t in study.get_trials(deepcopy=False)
        if before is None or t.number < before
    )


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def is_dead_here(owner: Any) -> bool:
    """Whether `owner` ("host:pid", as worker_id() gives) names a process of this machine that
    is gone. A process on another machine cannot be judged from here: it is not dead."""
    host, _, pid = str(owner or "").rpartition(":")
    return host == socket.gethostname() and not (pid.isdigit() and is_alive(int(pid)))


def is_orphaned(trial: FrozenTrial) -> bool:
    """A RUNNING trial whose worker process on this machine is gone. A trial of a worker on
    another machine cannot be judged from here and is left alone."""
    if "worker" not in trial.user_attrs:
        # between ask() and recording its worker: a live worker's for a moment, else killed there
        started = trial.datetime_start
        return started is None or datetime.now() - started > UNCLAIMED_GRACE
    return is_dead_here(trial.user_attrs["worker"])


def fail_orphaned_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[int]:
    """Mark trials left RUNNING by a killed process FAIL (reason 'orphaned'), close their MLflow
    runs and remove their work folders. Returns their numbers."""
    study_id = storage.get_study_id_from_name(study.study_name)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_orphaned(trial):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", "orphaned")
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except RuntimeError:
            continue  # another process finished or failed it first
        _close_orphaned_runs(trial)
        shutil.rmtree(trial_work_dir(study.study_name, trial.number), ignore_errors=True)
        failed.append(trial.number)
    return failed


def _close_orphaned_runs(trial: FrozenTrial) -> None:
    """The dead trial's MLflow run is tagged as Optuna now records it (FAIL, orphaned) and marked
    KILLED if still open (a worker killed between ending the run and telling Optuna leaves it
    FINISHED); its parent run is closed too when the process that opened it (the command that
    started the worker) is gone, not while it still runs."""
    client = MlflowClient()
    for key in ("mlflow_run_id", "mlflow_parent_run_id"):
        run_id = trial.user_attrs.get(key)
        if not run_id:
            continue
        if key == "mlflow_parent_run_id" and not is_dead_here(trial.user_attrs.get("parent")):
            continue
        try:
            if key == "mlflow_run_id":
                client.set_tag(run_id, "optuna.state", "FAIL")
                client.set_tag(run_id, "optuna.reason", "orphaned")
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "KILLED")
        except mlflow.exceptions.MlflowException:
            pass  # the run lives in another tracking store: nothing to close here


def enqueue_baseline(
    study: optuna.Study, cfg: DictConfig, params: list[SearchParam]
) -> dict[str, Any]:
    """Trial 0 evaluates the composed config's own values (those inside the space), so the study
    always measures the untuned configuration under the same budget."""
    current = configured_values(cfg, params)
    baseline = {p.key: current[p.key] for p in params if p.contains(current[p.key])}
    if baseline:
        study.enqueue_trial(baseline, user_attrs={"baseline": True}, skip_if_exists=True)
    return baseline


def trial_work_dir(name: str, number: int) -> Path:
    return WORK_DIR / f"tune-{name}-{number}"


def stop_at_budget(n_trials: int) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Stop this worker once the trials counted plus those other live workers are running fill
    the budget (they finish it; a worker that starts one more would overshoot n_trials)."""

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        if budget_taken(study) >= n_trials:
            study.stop()

    return callback
