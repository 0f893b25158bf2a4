"""The loop any worker runs (`optimize`: trials on the shared study until the budget is taken) and
`optimize_in_workers`: N spawned processes running it, each with train.threads // N TensorFlow
threads, their trials nested under the one parent run."""

from __future__ import annotations

import multiprocessing
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from soundmood import tracking
from soundmood.config import with_values
from soundmood.data.prepare import load_split
from soundmood.tune.objective import Objective, stratified_subset
from soundmood.tune.space import SearchParam, parse_space
from soundmood.tune.study import (
    budget_taken,
    make_pruner,
    make_sampler,
    make_storage,
    stop_at_budget,
    worker_id,
)


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


def optimize(
    cfg: DictConfig,
    params: list[SearchParam],
    name: str,
    parent_run_id: str,
    worker: int = 0,
    parent: str = "",
) -> None:
    """Run trials on the study until n_trials count or Ctrl-C (re-raised after the current trial
    is recorded as FAIL 'interrupted')."""
    tune = cfg.tune
    storage = make_storage(tune.storage)
    held = optuna.load_study(study_name=name, storage=storage)
    remaining = tune.n_trials - budget_taken(held)
    if remaining <= 0:
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
    ]
    with warnings.catch_warnings():
        # a surplus trial is recorded FAIL on purpose; Optuna would warn about it
        warnings.simplefilter("ignore")
        study.optimize(
            objective,
            n_trials=remaining,
            catch=(Exception,),
            callbacks=callbacks,
            gc_after_trial=True,
        )


def worker_threads(cfg: DictConfig, workers: int) -> int:
    """TensorFlow threads per worker so that N workers share the cores: train.threads // N (all
    cores when train.threads is 0), at least 1."""
    total = cfg.train.threads or os.cpu_count() or 1
    return max(1, total // workers)


def _worker_main(config: dict, name: str, parent_run_id: str, worker: int, parent: str) -> None:
    """Entry point of a spawned worker process: one `optimize` on the shared study."""
    cfg = OmegaConf.create(config)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tracking.setup(cfg)
    try:
        optimize(cfg, parse_space(cfg), name, parent_run_id, worker, parent)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def optimize_in_workers(
    cfg: DictConfig, name: str, parent_run_id: str, workers: int
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
            args=(worker_cfg, name, parent_run_id, i, parent),
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
