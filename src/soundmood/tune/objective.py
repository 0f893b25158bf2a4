"""One trial: the configured model trained on a stratified subset of train with the trial's values,
pruned after any epoch, inside a nested MLflow run under the stage's parent run.

The per-trial MLflow run is opened here rather than by optuna-integration's `MLflowCallback`
(deprecated there): it logs a trial only after the trial ends, so the epochs' metrics and a killed
trial's run (closed as orphaned on the next start) could not be in it.
"""

from __future__ import annotations

import math
import shutil
import time
import traceback
from dataclasses import dataclass
from typing import Any, NoReturn

import keras
import mlflow
import numpy as np
import optuna
from omegaconf import DictConfig
from optuna_integration import KerasPruningCallback

from soundmood.config import validate, with_values
from soundmood.errors import ConfigError
from soundmood.fitting import fit
from soundmood.tune.space import SearchParam
from soundmood.tune.study import budget_taken, trial_work_dir, worker_id


def stratified_subset(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The same seeded, stratified fraction of train for every trial (comparable trials)."""
    if fraction >= 1.0:
        return x, y
    from sklearn.model_selection import train_test_split  # deferred: only a fraction < 1 needs it

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


class SurplusTrial(Exception):
    """A trial started after concurrent workers had already taken the whole budget."""


@dataclass
class Objective:
    """Trains one trial's configuration inside a nested MLflow run and returns its value."""

    cfg: DictConfig
    params: list[SearchParam]
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
        # (epoch, loss) of each finished epoch, recorded before the pruner reads it, so that a
        # pruned trial records where it stopped and a diverged one (TerminateOnNaN in fit) is
        # told from one the pruner stopped
        epochs: list[tuple[int, float]] = []
        record = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: epochs.append(
                (epoch, float((logs or {}).get("loss", 0.0)))
            )
        )
        try:
            result = fit(
                trial_cfg,
                self.train_data,
                self.val_data,
                trial_work_dir(self.study_name, trial.number),
                extra_callbacks=[record, KerasPruningCallback(trial, tune.objective)],
                epochs=tune.epochs,
                verbose=0,
            )
        except optuna.TrialPruned:
            self._pruned(trial, epochs)
        if epochs and not math.isfinite(epochs[-1][1]):
            self._pruned(trial, epochs)
        # The value at the epoch train would keep (best on train.monitor), not a lucky later one.
        value = result.history[result.best_epoch].get(tune.objective, float("nan"))
        if not math.isfinite(value):
            raise ValueError(f"{tune.objective} is {value} at the kept epoch {result.best_epoch}")
        return float(value)

    @staticmethod
    def _pruned(trial: optuna.Trial, epochs: list[tuple[int, float]]) -> NoReturn:
        step, loss = epochs[-1]
        reason = "pruner" if math.isfinite(loss) else "nan_loss"
        trial.set_user_attr("pruned_step", step)
        trial.set_user_attr("prune_reason", reason)
        raise optuna.TrialPruned(f"{reason} at epoch {step}")
