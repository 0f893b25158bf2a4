"""The `tune` stage's entry: prepare the study and the MLflow parent run, run the trials in this
process or in N workers, then write best_params.yaml and tune.json."""

from __future__ import annotations

import time
from typing import Any

import mlflow
import optuna
from omegaconf import DictConfig

from soundmood import tracking
from soundmood.config import validate
from soundmood.errors import UserError
from soundmood.tune.report import log_summary, write_disabled, write_reports
from soundmood.tune.space import parse_space
from soundmood.tune.study import (
    budget_used,
    enqueue_baseline,
    fail_orphaned_trials,
    is_sqlite,
    make_storage,
    printable_url,
    study_name,
    worker_id,
)
from soundmood.tune.workers import describe_trial, optimize, optimize_in_workers


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
    validate(cfg)  # tune.* with the rest, for a caller that did not load it validated
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
                cfg, name, parent.info.run_id, workers
            )
            orphans = fail_orphaned_trials(study, storage)
            if orphans:
                print(f"tune: trials {orphans} of dead workers marked FAIL (orphaned)", flush=True)
        else:
            try:
                optimize(cfg, params, name, parent.info.run_id, parent=worker_id())
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
