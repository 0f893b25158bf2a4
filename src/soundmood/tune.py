"""tune stage: Optuna search over composed config keys, judged on the validation split only.

`tune.space` maps composed keys (train.lr, model.dropout, train.augment.zoom, ...) to
distributions. Each trial trains the configured model with its values for `tune.epochs` epochs on
a stratified `tune.subset_fraction` of train; a pruner reads the objective after every epoch.

The study lives in `tune.storage` (any SQLAlchemy URL) under a name derived from the data version
and a digest of the space plus every config value a trial's result depends on, so a rerun with the
same inputs resumes it and a changed space or config starts a new one. `tune.n_trials` counts the
trials the study already holds. Hand-over to train: `tune.best_params_path` (dotted key -> value)
and reports/tune.json; MLflow gets one parent run per execution with a nested run per trial.

`run` prepares the study and the parent run, then calls `optimize` in-process (one worker) or
in N spawned worker processes (`--workers N`), each with its worker index and train.threads // N
TensorFlow threads; their trials are nested under the one parent run. With a PostgreSQL storage the
same command on another machine joins the study. A worker starts a trial only while the trials
counted plus those running in live workers stay under n_trials, so N workers never overshoot the
budget; a trial whose worker process died is marked FAIL 'orphaned' and does not count.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import socket
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import optuna
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from soundmood import tracking, train
from soundmood.config import flatten, validate
from soundmood.data.layout import data_version
from soundmood.data.prepare import load_split
from soundmood.errors import ConfigError, UserError
from soundmood.fileio import write_json, write_text
from soundmood.processes import is_alive

OBJECTIVES = ("val_macro_f1", "val_accuracy")
PRUNERS = ("median", "hyperband", "none")
FIELDS = {
    "float": {"low", "high", "log", "step"},
    "int": {"low", "high", "log", "step"},
    "categorical": {"choices"},
}
SCALARS = (bool, int, float, str, type(None))
UNTUNABLE_GROUPS = ("data", "tune")  # data.* is fixed by prepare; tune.* configures the search
# Config values no trial's result depends on (paths, the full run's epochs, hand-over switches):
# changing them keeps the study.
NOT_AFFECTING_TRIALS = frozenset(
    {
        "data.root",
        "data.prepared_dir",
        "model.weights",
        "train.model_dir",
        "train.use_tuned",
        "train.epochs",
        "train.threads",
    }
)
TUNE_KEYS_AFFECTING_TRIALS = ("tune.epochs", "tune.subset_fraction", "tune.objective")
# Trials that failed because their process stopped, not because of their values (or, "surplus",
# that a concurrent worker took the last place in the budget first): they do not use up the
# n_trials budget (a resumed study still gets n_trials real outcomes).
NOT_COUNTED_REASONS = frozenset({"interrupted", "orphaned", "surplus"})
# A RUNNING trial that has not recorded its worker yet is someone's trial between ask() and its
# first line for this long; older than that, its process died in between.
UNCLAIMED_GRACE = timedelta(seconds=60)
_MISSING = object()


# --- the search space ------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One declared dimension of the search: a composed config key and its distribution."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(
                self.key, self.low, self.high, step=self.step or 1, log=self.log
            )
        return trial.suggest_categorical(self.key, list(self.choices))

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if not self.low <= value <= self.high:
            return False
        if self.step:
            steps = (value - self.low) / self.step
            return math.isclose(steps, round(steps), abs_tol=1e-9)
        return True

    def extremes(self) -> list[Any]:
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.key} in {list(self.choices)}"
        scale = " log" if self.log else ""
        step = f" step {self.step}" if self.step else ""
        return f"{self.key} {self.kind}{scale} [{self.low}, {self.high}]{step}"


def parse_space(cfg: DictConfig) -> list[Param]:
    """Check `tune.space` against the composed config; every error names the offending key."""
    space = cfg.tune.get("space")
    if not space:
        raise ConfigError(
            "tune.space: no parameter declared (set tune.enabled=false to skip tuning)"
        )
    if not isinstance(space, DictConfig):
        raise ConfigError(
            f"tune.space: expected a mapping of config key -> distribution, got {space!r}"
        )
    params = [
        parse_param(cfg, str(key), spec)
        for key, spec in OmegaConf.to_container(space, resolve=True).items()
    ]
    for param in params:
        check_values_accepted(cfg, param)
    return params


def parse_param(cfg: DictConfig, key: str, spec: Any) -> Param:
    where = f"tune.space.{key}"
    if key.split(".")[0] in UNTUNABLE_GROUPS:
        raise ConfigError(
            f"{where}: {key!r} cannot be tuned (data.* is fixed by the prepare "
            f"stage, tune.* configures the search)"
        )
    current = OmegaConf.select(cfg, key, default=_MISSING)
    if current is _MISSING:
        raise ConfigError(f"{where}: {key!r} is not a key of the composed config")
    if isinstance(current, DictConfig | ListConfig):
        raise ConfigError(f"{where}: {key!r} is a group or list, not a single value")
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{where}: expected a mapping such as {{type: float, low: ..., "
            f"high: ...}}, got {spec!r}"
        )
    kind = spec.get("type")
    if kind not in FIELDS:
        raise ConfigError(f"{where}.type: {kind!r} is not float, int or categorical")
    unknown = sorted(set(spec) - FIELDS[kind] - {"type"})
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)} for type {kind} "
            f"(allowed: {', '.join(sorted(FIELDS[kind]))})"
        )
    if kind == "categorical":
        return _parse_categorical(where, key, spec)
    return _parse_numeric(where, key, kind, spec)


def _parse_categorical(where: str, key: str, spec: dict) -> Param:
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}.choices: must be a non-empty list")
    for choice in choices:
        if not isinstance(choice, SCALARS):
            raise ConfigError(
                f"{where}.choices: {choice!r} is not a bool, int, float, string or null"
            )
    if len({(type(c), c) for c in choices}) != len(choices):
        raise ConfigError(f"{where}.choices: {choices} lists a value twice")
    return Param(key, "categorical", choices=tuple(choices))


def _parse_numeric(where: str, key: str, kind: str, spec: dict) -> Param:
    number: tuple[type, ...] = (int,) if kind == "int" else (int, float)
    noun = "int" if kind == "int" else "number"
    what = f"an {noun}" if kind == "int" else f"a {noun}"

    def is_number(value: Any) -> bool:
        return isinstance(value, number) and not isinstance(value, bool)

    low, high, step = spec.get("low"), spec.get("high"), spec.get("step")
    log = spec.get("log", False)
    for name, value in (("low", low), ("high", high)):
        if not is_number(value):
            raise ConfigError(f"{where}.{name}: {value!r} is not {what}")
    if low >= high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log: {log!r} is not true or false")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {low}")
    if step is not None:
        if not is_number(step) or step <= 0:
            raise ConfigError(f"{where}.step: {step!r} is not a positive {noun}")
        if log and (kind == "float" or step != 1):
            raise ConfigError(f"{where}: log and step cannot be combined")
    if kind == "float":
        return Param(
            key, kind, float(low), float(high), log, float(step) if step is not None else None
        )
    return Param(key, kind, low, high, log, step)


def with_values(cfg: DictConfig, values: dict[str, Any]) -> DictConfig:
    """A copy of `cfg` with the dotted keys set to `values`."""
    out = cfg.copy()
    for key, value in values.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


def check_values_accepted(cfg: DictConfig, param: Param) -> None:
    """The range's ends (or every choice) must pass the pipeline's own config validation."""
    for value in param.extremes():
        try:
            validate(with_values(cfg, {param.key: value}))
        except ConfigError as exc:
            raise ConfigError(
                f"tune.space.{param.key}: {value!r} is a value the pipeline rejects ({exc})"
            ) from exc


def validate_tune(tune: DictConfig) -> None:
    """The search's own settings, checked before any work (message names the key)."""

    def require(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"tune.{key}: {message}")

    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    require(
        tune.objective in OBJECTIVES,
        "objective",
        f"{tune.objective!r} is not one of {', '.join(OBJECTIVES)}",
    )
    require(tune.pruner in PRUNERS, "pruner", f"{tune.pruner!r} is not one of {', '.join(PRUNERS)}")
    require(positive_int(tune.n_trials), "n_trials", "must be an int >= 1")
    require(positive_int(tune.epochs), "epochs", "must be an int >= 1")
    require(0 < tune.subset_fraction <= 1, "subset_fraction", "must be in (0, 1]")
    require(tune.timeout_s is None or tune.timeout_s > 0, "timeout_s", "must be null or > 0")
    require(
        isinstance(tune.min_gain, int | float)
        and not isinstance(tune.min_gain, bool)
        and tune.min_gain >= 0,
        "min_gain",
        f"{tune.min_gain!r} is not a number >= 0",
    )
    require(
        isinstance(tune.storage, str) and "://" in tune.storage,
        "storage",
        f"{tune.storage!r} is not an SQLAlchemy URL such as sqlite:///optuna.db",
    )
    for key in ("sampler_startup_trials", "pruner_startup_trials", "pruner_warmup_steps"):
        require(isinstance(tune[key], int) and tune[key] >= 0, key, "must be an int >= 0")
    require(
        isinstance(tune.hyperband_reduction_factor, int) and tune.hyperband_reduction_factor >= 2,
        "hyperband_reduction_factor",
        "must be an int >= 2",
    )


# --- the study -------------------------------------------------------------------------------


def configured_values(cfg: DictConfig, params: list[Param]) -> dict[str, Any]:
    """The composed config's own value of every tuned key: what the baseline trial measures."""
    return {p.key: OmegaConf.select(cfg, p.key) for p in params}


def study_name(cfg: DictConfig, params: list[Param]) -> str:
    """Data version + digest of the space and of every value a trial's result depends on."""
    tuned = {p.key for p in params}
    fixed = {
        k: v
        for k, v in flatten(cfg).items()
        if (
            k.split(".")[0] in ("seed", "data", "model", "train") or k in TUNE_KEYS_AFFECTING_TRIALS
        )
        and k not in NOT_AFFECTING_TRIALS
        and k not in tuned
    }
    space = {p.key: [p.kind, p.low, p.high, p.log, p.step, list(p.choices)] for p in params}
    # the baseline trial measures the configured values and, when no trial clearly beats it,
    # they are what train gets: a study measured with other defaults must not stand in for them
    baseline = configured_values(cfg, params) if cfg.tune.enqueue_baseline else {}
    blob = json.dumps(
        {"space": space, "fixed": fixed, "baseline": baseline}, sort_keys=True, default=str
    )
    digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return f"soundmood-{data_version()[:8]}-{digest}"


def is_sqlite(url: str) -> bool:
    from sqlalchemy.engine import make_url

    return make_url(url).drivername.startswith("sqlite")


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for other databases and in-memory SQLite."""
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    return Path(database) if is_sqlite(url) and database not in (None, "", ":memory:") else None


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """The study's database; a SQLite file's folder is created first."""
    if path := sqlite_file(url):
        path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url)


def printable_url(url: str) -> str:
    from sqlalchemy.engine import make_url

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


def enqueue_baseline(study: optuna.Study, cfg: DictConfig, params: list[Param]) -> dict[str, Any]:
    """Trial 0 evaluates the composed config's own values (those inside the space), so the study
    always measures the untuned configuration under the same budget."""
    current = configured_values(cfg, params)
    baseline = {p.key: current[p.key] for p in params if p.contains(current[p.key])}
    if baseline:
        study.enqueue_trial(baseline, user_attrs={"baseline": True}, skip_if_exists=True)
    return baseline


# --- one trial -------------------------------------------------------------------------------


def trial_work_dir(name: str, number: int) -> Path:
    return train.WORK_DIR / f"tune-{name}-{number}"


def stratified_subset(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The same seeded, stratified fraction of train for every trial (comparable trials)."""
    if fraction >= 1.0:
        return x, y
    from sklearn.model_selection import train_test_split

    try:
        keep, _ = train_test_split(
            np.arange(len(y)), train_size=fraction, stratify=y, random_state=seed
        )
    except ValueError as exc:
        raise ConfigError(
            f"tune.subset_fraction: {fraction} of {len(y)} images cannot keep every class ({exc})"
        ) from exc
    keep = np.sort(keep)
    return x[keep], y[keep]


class PruneOnObjective(keras.callbacks.Callback):
    """Reports the objective to Optuna after every epoch and stops training when the pruner says
    so or the loss is no longer finite. It stops rather than raising TrialPruned from inside
    model.fit (as optuna_integration's KerasPruningCallback does), so train.fit ends normally and
    the objective tells a pruned trial from a diverged one."""

    def __init__(self, trial: optuna.Trial, key: str) -> None:
        super().__init__()
        self.trial, self.key = trial, key
        self.stopped_at: int | None = None
        self.reason = ""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        if not math.isfinite(float(logs.get("loss", 0.0))):
            return self._stop(epoch, "nan_loss")
        if self.key not in logs:
            raise KeyError(f"{self.key} is not in the epoch logs ({', '.join(sorted(logs))})")
        self.trial.report(float(logs[self.key]), step=epoch)
        if self.trial.should_prune():
            self._stop(epoch, "pruner")

    def _stop(self, epoch: int, reason: str) -> None:
        self.stopped_at, self.reason = epoch, reason
        self.model.stop_training = True


class SurplusTrial(Exception):
    """A trial started after concurrent workers had already taken the whole budget."""


@dataclass
class Objective:
    """Trains one trial's configuration inside a nested MLflow run and returns its value."""

    cfg: DictConfig
    params: list[Param]
    study_name: str
    parent_run_id: str
    train_data: tuple[np.ndarray, np.ndarray]
    val_data: tuple[np.ndarray, np.ndarray]
    worker: int = 0
    parent: str = ""  # worker_id() of the process that opened the parent run

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker_id())
        trial.set_user_attr("worker_index", self.worker)
        trial.set_user_attr("parent", self.parent or worker_id())
        if budget_taken(trial.study, before=trial.number) >= self.cfg.tune.n_trials:
            # another worker took the last place between our budget check and ask()
            trial.set_user_attr("fail_reason", "surplus")
            trial.study.stop()
            raise SurplusTrial(
                f"trial {trial.number}: the budget of {self.cfg.tune.n_trials} "
                f"trials is already taken"
            )
        values = {p.key: p.suggest(trial) for p in self.params}
        tags = {
            "optuna.study_name": self.study_name,
            "optuna.trial_number": str(trial.number),
            "stage": "tune-trial",
        }
        start = time.perf_counter()
        run = mlflow.start_run(
            run_name=f"trial-{trial.number}",
            parent_run_id=self.parent_run_id,
            nested=True,
            tags=tags,
        )
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        trial.set_user_attr("mlflow_parent_run_id", self.parent_run_id)
        mlflow.log_params(values)
        outcome, status = {"optuna.state": "FAIL"}, "FAILED"
        try:
            value = self._fit(trial, values)
            outcome, status = {"optuna.state": "COMPLETE"}, "FINISHED"
            mlflow.log_metric(self.cfg.tune.objective, value)
            return value
        except optuna.TrialPruned:
            outcome = {
                "optuna.state": "PRUNED",
                "optuna.pruned_step": str(trial.user_attrs.get("pruned_step")),
                "optuna.reason": str(trial.user_attrs.get("prune_reason")),
            }
            status = "FINISHED"
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            outcome["optuna.reason"], status = "interrupted", "KILLED"
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[:500]
            trial.set_user_attr("fail_reason", reason)
            outcome["optuna.reason"] = reason
            mlflow.log_text(traceback.format_exc(), "error.txt")
            raise
        finally:
            seconds = time.perf_counter() - start
            trial.set_user_attr("seconds", round(seconds, 2))
            mlflow.set_tags(outcome)
            mlflow.log_metric("trial_seconds", seconds)
            mlflow.end_run(status)
            shutil.rmtree(trial_work_dir(self.study_name, trial.number), ignore_errors=True)
            keras.backend.clear_session()

    def _fit(self, trial: optuna.Trial, values: dict[str, Any]) -> float:
        trial_cfg = with_values(self.cfg, values)
        validate(trial_cfg)
        tune = self.cfg.tune
        pruning = PruneOnObjective(trial, tune.objective)
        result = train.fit(
            trial_cfg,
            self.train_data,
            self.val_data,
            trial_work_dir(self.study_name, trial.number),
            extra_callbacks=[pruning],
            epochs=tune.epochs,
            verbose=0,
        )
        if pruning.stopped_at is not None:
            trial.set_user_attr("pruned_step", pruning.stopped_at)
            trial.set_user_attr("prune_reason", pruning.reason)
            raise optuna.TrialPruned(f"{pruning.reason} at epoch {pruning.stopped_at}")
        # The value at the epoch train would keep (best on train.monitor), not a lucky later one.
        value = result.history[result.best_epoch].get(tune.objective, float("nan"))
        if not math.isfinite(value):
            raise ValueError(f"{tune.objective} is {value} at the kept epoch {result.best_epoch}")
        return float(value)


# --- the loop any worker runs ----------------------------------------------------------------


@dataclass
class Progress:
    """One console line per finished trial; keeps the parent run's best-so-far up to date."""

    objective: str
    parent_run_id: str
    prefix: str = "tune"
    started: float = field(default_factory=time.monotonic)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.user_attrs.get("fail_reason") == "surplus":
            return
        print(
            f"{self.prefix}: {describe_trial(trial, self.objective)} "
            f"(total {time.monotonic() - self.started:.0f}s)",
            flush=True,
        )
        if trial.state == TrialState.COMPLETE and study.best_trial.number == trial.number:
            client = MlflowClient()
            client.log_metric(
                self.parent_run_id, f"best_{self.objective}", trial.value, step=trial.number
            )
            client.set_tag(self.parent_run_id, "best_trial", str(trial.number))


def describe_trial(trial: FrozenTrial, objective: str) -> str:
    attrs = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        outcome = f"{objective}={trial.value:.4f}"
    elif trial.state == TrialState.PRUNED:
        outcome = f"PRUNED at epoch {attrs.get('pruned_step')} ({attrs.get('prune_reason')})"
    else:
        outcome = f"{trial.state.name} ({attrs.get('fail_reason', 'unknown')})"
    values = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    seconds = attrs.get("seconds")
    took = f" | {seconds:.1f}s" if isinstance(seconds, int | float) else ""
    return f"trial {trial.number} {outcome} | {values}{took}"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def stop_at_budget(n_trials: int) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Stop this worker once the trials counted plus those other live workers are running fill
    the budget (they finish it; a worker that starts one more would overshoot n_trials)."""

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        if budget_taken(study) >= n_trials:
            study.stop()

    return callback


def stop_before_deadline(deadline: float | None) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Stop this worker when one more trial, as long as the mean of those it finished, would end
    past the deadline. Optuna's timeout only keeps trials from starting, so on a slow machine the
    last one started just in time and ran most of a trial (200 s of a 420 s budget) beyond it."""
    durations: list[float] = []

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.duration is not None and trial.user_attrs.get("fail_reason") != "surplus":
            durations.append(trial.duration.total_seconds())
        mean = sum(durations) / len(durations) if durations else 0.0
        if deadline is not None and time.monotonic() + mean > deadline:
            study.stop()

    return callback


def optimize(
    cfg: DictConfig,
    params: list[Param],
    name: str,
    parent_run_id: str,
    deadline: float | None,
    worker: int = 0,
    parent: str = "",
) -> None:
    """Run trials on the study until n_trials count, the next trial would not end before the
    deadline (time.monotonic), or Ctrl-C (re-raised after the current trial is recorded as FAIL
    'interrupted')."""
    tune = cfg.tune
    storage = make_storage(tune.storage)
    held = optuna.load_study(study_name=name, storage=storage)
    remaining = tune.n_trials - budget_taken(held)
    timeout = None if deadline is None else deadline - time.monotonic()
    if remaining <= 0 or (timeout is not None and timeout <= 0):
        return
    study = optuna.load_study(
        study_name=name,
        storage=storage,
        pruner=make_pruner(tune),
        sampler=make_sampler(tune, len(held.trials), worker),
    )
    x, y = load_split(cfg.data.prepared_dir, "train")
    objective = Objective(
        cfg,
        params,
        name,
        parent_run_id,
        stratified_subset(x, y, tune.subset_fraction, cfg.seed),
        load_split(cfg.data.prepared_dir, "val"),
        worker,
        parent,
    )
    prefix = f"tune[worker {worker}]" if parent and parent != worker_id() else "tune"
    callbacks = [
        Progress(tune.objective, parent_run_id, prefix),
        stop_at_budget(tune.n_trials),
        stop_before_deadline(deadline),
    ]
    with warnings.catch_warnings():
        # a surplus trial is recorded FAIL on purpose; Optuna would warn about it
        warnings.simplefilter("ignore")
        study.optimize(
            objective,
            n_trials=remaining,
            timeout=timeout,
            catch=(Exception,),
            callbacks=callbacks,
            gc_after_trial=True,
        )


# --- N worker processes ----------------------------------------------------------------------


def worker_threads(cfg: DictConfig, workers: int) -> int:
    """TensorFlow threads per worker so that N workers share the cores: train.threads // N (all
    cores when train.threads is 0), at least 1."""
    total = cfg.train.threads or os.cpu_count() or 1
    return max(1, total // workers)


def _worker_main(
    config: dict, name: str, parent_run_id: str, deadline: float | None, worker: int, parent: str
) -> None:
    """Entry point of a spawned worker process: one `optimize` on the shared study."""
    cfg = OmegaConf.create(config)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tracking.setup(cfg)
    try:
        optimize(cfg, parse_space(cfg), name, parent_run_id, deadline, worker, parent)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def optimize_in_workers(
    cfg: DictConfig, name: str, parent_run_id: str, deadline: float | None, workers: int
) -> tuple[bool, dict[int, int]]:
    """Run `optimize` in `workers` spawned processes on the study and wait for them. Returns
    whether Ctrl-C interrupted them and the exit code of each worker that failed. A worker
    that dies leaves its trial RUNNING: the others stop counting it (its process is gone) and
    fill the budget, and its trial is marked FAIL 'orphaned' here once all have stopped."""
    threads = worker_threads(cfg, workers)
    worker_cfg = OmegaConf.to_container(with_values(cfg, {"train.threads": threads}), resolve=True)
    context = multiprocessing.get_context("spawn")
    parent = worker_id()
    processes = [
        context.Process(
            target=_worker_main,
            name=f"soundmood-tune-worker-{i}",
            args=(worker_cfg, name, parent_run_id, deadline, i, parent),
        )
        for i in range(workers)
    ]
    print(f"tune: {workers} workers, {threads} TensorFlow thread(s) each", flush=True)
    for process in processes:
        process.start()
    interrupted = False
    while True:
        try:
            for process in processes:
                process.join()
            break
        except KeyboardInterrupt:  # the workers got Ctrl-C too: wait while they record it
            interrupted = True
    failed = {i: p.exitcode for i, p in enumerate(processes) if p.exitcode != 0}
    interrupted = interrupted or any(code == 130 for code in failed.values())
    return interrupted, failed


# --- the stage -------------------------------------------------------------------------------


def cli(cfg: DictConfig, args: Any) -> int:
    """`soundmood tune [--workers N] [key=value ...]`; exit 130 when interrupted."""
    workers = getattr(args, "workers", 1)
    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"--workers: {workers!r} is not a number of processes >= 1")
    report = run(cfg, workers=workers)
    return 130 if report.get("interrupted") else 0


def run(cfg: DictConfig, workers: int = 1) -> dict[str, Any]:
    """The `tune` stage: search, then write best_params.yaml and tune.json."""
    if not cfg.tune.enabled:
        return write_disabled(cfg)
    validate_tune(cfg.tune)
    params = parse_space(cfg)
    if workers > 1 and is_sqlite(cfg.tune.storage):
        print(
            f"tune: warning: {workers} workers on a SQLite study work on this machine only "
            f"(SQLite is for one machine; a PostgreSQL tune.storage lets other machines join)",
            flush=True,
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name, storage = study_name(cfg, params), make_storage(cfg.tune.storage)
    study = optuna.create_study(
        study_name=name, storage=storage, direction="maximize", load_if_exists=True
    )
    tracking.setup(cfg)
    orphans = fail_orphaned_trials(study, storage)
    if not study.trials and cfg.tune.enqueue_baseline:
        enqueue_baseline(study, cfg, params)
    started = time.monotonic()
    deadline = started + cfg.tune.timeout_s if cfg.tune.timeout_s else None
    interrupted, failed_workers = False, {}
    with mlflow.start_run(run_name=f"tune-{name}") as parent:
        mlflow.set_tags(
            {
                **tracking.run_tags(cfg, "tune"),
                "optuna.study_name": name,
                "optuna.storage": printable_url(cfg.tune.storage),
            }
        )
        tracking.log_config(cfg)
        print(
            f"tune: study {name} in {printable_url(cfg.tune.storage)}: "
            f"{budget_used(study)}/{cfg.tune.n_trials} trials done"
            + (f", orphaned trials {orphans} marked FAIL" if orphans else "")
            + "; space: "
            + "; ".join(p.describe() for p in params),
            flush=True,
        )
        mlflow.set_tag("tune.workers", str(workers))
        if workers > 1:
            interrupted, failed_workers = optimize_in_workers(
                cfg, name, parent.info.run_id, deadline, workers
            )
            orphans = fail_orphaned_trials(study, storage)
            if orphans:
                print(f"tune: trials {orphans} of dead workers marked FAIL (orphaned)", flush=True)
        else:
            try:
                optimize(cfg, params, name, parent.info.run_id, deadline, parent=worker_id())
            except KeyboardInterrupt:
                interrupted = True
                running = optuna.load_study(study_name=name, storage=storage).trials[-1]
                print(
                    f"tune: interrupted; {describe_trial(running, cfg.tune.objective)}", flush=True
                )
        study = optuna.load_study(study_name=name, storage=storage)
        report = write_reports(
            cfg, study, parent.info.run_id, time.monotonic() - started, interrupted
        )
        log_summary(cfg, study, report)
        if interrupted:
            mlflow.end_run("KILLED")
        elif failed_workers and budget_used(study) < cfg.tune.n_trials:
            mlflow.end_run("FAILED")
            raise RuntimeError(
                "tune: worker(s) "
                + ", ".join(f"{i} (exit code {c})" for i, c in failed_workers.items())
                + f" stopped early; {budget_used(study)}/{cfg.tune.n_trials} trials done. "
                "Run the same command again to resume the study."
            )
    if failed_workers and not interrupted:
        print(
            "tune: warning: worker(s) "
            + ", ".join(map(str, failed_workers))
            + " stopped early; the others finished the budget",
            flush=True,
        )
    best = (
        f"best trial {report['best_trial']} {cfg.tune.objective}={report['best_value']:.4f}"
        if report["best_trial"] is not None
        else "no trial completed"
    )
    print(
        f"tune: {best}; {report['handed_over']}; trials {report['trials']}; "
        f"{report['elapsed_seconds']:.0f}s; "
        f"run {report['mlflow_run_id']}",
        flush=True,
    )
    return report


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return study.best_trial if complete else None


def baseline_trial(study: optuna.Study) -> FrozenTrial | None:
    """The completed trial of the configured values (enqueued as trial 0), if there is one."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.user_attrs.get("baseline"):
            return trial
    return None


def handed_over(
    best: FrozenTrial | None, baseline: FrozenTrial | None, min_gain: float
) -> tuple[dict[str, Any], str]:
    """The values train should use, and why: the best trial's, unless it beats the baseline
    trial (the configured values) by less than `tune.min_gain`. Short trials on a subset rank
    values by early progress; a gain within their noise is not worth leaving the defaults for."""
    if best is None:
        return {}, "no trial completed; train keeps the configured values"
    if baseline is None:
        return dict(best.params), f"best trial {best.number} (no baseline trial to compare with)"
    if best.number == baseline.number:
        return dict(baseline.params), "the baseline trial (the configured values) is the best"
    gain = best.value - baseline.value
    if gain < min_gain:
        return dict(baseline.params), (
            f"best trial {best.number} beats the baseline trial {baseline.number} by "
            f"{gain:.4f} < tune.min_gain {min_gain}: the configured values are kept"
        )
    return dict(best.params), f"best trial {best.number} beats the baseline by {gain:.4f}"


def write_reports(
    cfg: DictConfig, study: optuna.Study, run_id: str, elapsed: float, interrupted: bool
) -> dict[str, Any]:
    best = best_trial(study)
    baseline = baseline_trial(study)
    values, reason = handed_over(best, baseline, cfg.tune.min_gain)
    _write_best_params(cfg, values)
    states = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    report = {
        "enabled": True,
        "study_name": study.study_name,
        "storage": printable_url(cfg.tune.storage),
        "objective": cfg.tune.objective,
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "baseline_value": baseline.value if baseline else None,
        "best_params": values,
        "handed_over": reason,
        "trials": {s.name: states.get(s.name, 0) for s in TrialState},
        "n_trials": cfg.tune.n_trials,
        "trials_counted": budget_used(study),
        "interrupted": interrupted,
        "workers": sorted(
            {
                str(t.user_attrs["worker"])
                for t in study.get_trials(deepcopy=False)
                if "worker" in t.user_attrs
            }
        ),
        "mlflow_run_id": run_id,
        "elapsed_seconds": round(elapsed, 1),
    }
    write_json(Path(cfg.evaluate.reports_dir) / "tune.json", report)
    return report


def _write_best_params(cfg: DictConfig, values: dict[str, Any]) -> None:
    text = yaml.safe_dump(values, sort_keys=True) if values else "{}\n"
    write_text(Path(cfg.tune.best_params_path), text)


def write_disabled(cfg: DictConfig) -> dict[str, Any]:
    """tune.enabled=false: hand train no values, and leave an (empty) SQLite study file for DVC."""
    _write_best_params(cfg, {})
    if path := sqlite_file(cfg.tune.storage):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    report = {"enabled": False, "best_params": {}, "mlflow_run_id": None}
    write_json(Path(cfg.evaluate.reports_dir) / "tune.json", report)
    print("tune: disabled (tune.enabled=false); train keeps the configured values")
    return report


def log_summary(cfg: DictConfig, study: optuna.Study, report: dict[str, Any]) -> None:
    """Best trial and counts as parent-run metrics; report, trials and Optuna's plots as files."""
    trials = report["trials"]
    mlflow.log_metrics(
        {
            "trials_complete": trials["COMPLETE"],
            "trials_pruned": trials["PRUNED"],
            "trials_failed": trials["FAIL"],
            "tune_seconds": report["elapsed_seconds"],
        }
    )
    if report["best_trial"] is not None:
        mlflow.log_metric(
            f"best_{cfg.tune.objective}", report["best_value"], step=report["best_trial"]
        )
        mlflow.set_tag("best_trial", str(report["best_trial"]))
        mlflow.set_tag("tune.handed_over", report["handed_over"])
    mlflow.log_dict(report, "tune/tune.json")
    mlflow.log_dict(report["best_params"], "tune/best_params.yaml")
    if study.trials:
        mlflow.log_text(study.trials_dataframe().to_csv(index=False), "tune/trials.csv")
    import matplotlib.pyplot as plt

    for name, figure in optuna_figures(study):
        mlflow.log_figure(figure, f"tune/{name}.png")
        plt.close(figure)


def optuna_figures(study: optuna.Study) -> list[tuple[str, Any]]:
    """Optuna's matplotlib plots (plotly is not installed). A plot that cannot be drawn yet, such
    as importances before two trials complete, is skipped with a note."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    plots: dict[str, Callable[[optuna.Study], Any]] = {
        "optimization_history": ovm.plot_optimization_history,
        "intermediate_values": ovm.plot_intermediate_values,
        "parallel_coordinate": ovm.plot_parallel_coordinate,
    }
    if complete >= 2:
        plots["param_importances"] = ovm.plot_param_importances
    figures = []
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning, empty-study warnings
                axes = plot(study)
        except (ValueError, RuntimeError) as exc:
            print(f"tune: no {name} plot ({exc})")
            continue
        figure = axes.flat[0].figure if isinstance(axes, np.ndarray) else axes.figure
        figure.set_size_inches(9, 5)
        figure.tight_layout()
        figures.append((name, figure))
    return figures
