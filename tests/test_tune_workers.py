"""`soundmood tune --workers N`: N spawned worker processes on one Optuna study in a real
PostgreSQL server on loopback (tests/postgres.py), trials nested under one MLflow parent run.
Trials are the cheap ones of test_tune.py (smoke profile, frozen backbone, one epoch)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from optuna.trial import TrialState

import soundmood.tune.study as tune_study
from soundmood import tune
from soundmood.errors import UserError
from soundmood.tune.study import budget_used
from soundmood.tune.workers import worker_threads
from tests.conftest import ROOT, compose_config, smoke_config
from tests.test_tune import FAST, _cli_env, cli_setup, load_study, trials_of, wait_for

pytest_plugins = ["tests.postgres"]

CHEAP = [*FAST, "tune.epochs=1", "tune.pruner=none"]


def pid_of(trial) -> int:
    return int(str(trial.user_attrs["worker"]).rpartition(":")[2])


@pytest.mark.slow
def test_two_workers_share_one_study(
    tmp_path: Path,
    prepared_smoke: DictConfig,
    postgres_url: str,
    mlflow_uri: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = smoke_config(tmp_path, Path(prepared_smoke.data.root), [*CHEAP, "tune.n_trials=4"])
    cfg.data.prepared_dir = prepared_smoke.data.prepared_dir
    cfg.tune.storage = postgres_url
    monkeypatch.setenv("SOUNDMOOD_WORK_DIR", str(tmp_path / ".work"))  # read by the workers
    monkeypatch.setattr(tune_study, "WORK_DIR", tmp_path / ".work")
    monkeypatch.chdir(ROOT)
    start = time.perf_counter()
    report = tune.run(cfg, workers=2)
    print(f"2 workers, 4 trials: {time.perf_counter() - start:.0f}s")

    study = load_study(cfg)
    trials = study.trials
    assert [t.number for t in trials] == list(range(len(trials)))
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
    assert len(trials) == budget_used(study) == 4  # the budget exactly, not overshot
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == len(params)
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2, workers  # both workers took trials
    assert {t.user_attrs["worker_index"] for t in trials} == {0, 1}
    assert all(pid_of(t) != os.getpid() for t in trials)  # run in the spawned processes
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1
    assert report["trials_counted"] == 4 and sorted(report["workers"]) == sorted(workers)

    client = MlflowClient(mlflow_uri)
    parent = client.get_run(report["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["tune.workers"] == "2"
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [
        t.number for t in trials
    ]
    assert all(r.info.status == "FINISHED" for r in children)
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_killed_workers_trials_are_failed_on_the_next_start(
    tmp_path: Path, prepared_smoke: DictConfig, postgres_url: str
) -> None:
    """One worker is killed mid-trial, then the whole command (parent and the other worker):
    the next start marks both RUNNING trials FAIL (orphaned) and completes the study."""
    cfg, overrides = cli_setup(tmp_path, prepared_smoke, [*CHEAP, "tune.n_trials=5"])
    overrides = [o for o in overrides if not o.startswith("tune.storage=")]
    overrides.append(f"tune.storage={postgres_url}")
    cfg.tune.storage = postgres_url
    command = [sys.executable, "-m", "soundmood.cli", "tune", "--workers", "2", *overrides]
    env = _cli_env(tmp_path)
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def running(exclude: int | None = None) -> list:
            trials = trials_of(cfg, log)
            if exclude is None and not any(t.state.is_finished() for t in trials):
                return []
            return [
                t
                for t in trials
                if t.state == TrialState.RUNNING
                and "mlflow_run_id" in t.user_attrs
                and pid_of(t) != exclude
            ]

        first = wait_for(running, proc, log, 300, "a running trial after a finished one")[0]
        os.kill(pid_of(first), signal.SIGKILL)  # one worker dies; the command goes on
        second = wait_for(
            lambda: running(exclude=pid_of(first)), proc, log, 300, "a trial of the other worker"
        )[0]
        os.killpg(proc.pid, signal.SIGKILL)  # then the whole command
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed = sorted({first.number, second.number})
    study = load_study(cfg)
    assert {t.number for t in study.trials if t.state == TrialState.RUNNING} >= set(killed)
    assert pid_of(first) != pid_of(second)

    again = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "orphaned trials" in again.stdout and "marked FAIL" in again.stdout

    study = load_study(cfg)
    trials = study.trials
    assert [t.number for t in trials] == list(range(len(trials)))
    orphaned = [t.number for t in trials if t.user_attrs.get("fail_reason") == "orphaned"]
    assert set(killed) <= set(orphaned)
    assert all(t.state == TrialState.FAIL for t in trials if t.number in orphaned)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert budget_used(study) == 5
    assert len(trials) == 5 + len(orphaned)
    report = json.loads((Path(cfg.evaluate.reports_dir) / "tune.json").read_text())
    assert report["trials_counted"] == 5
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for number in orphaned:
        run = client.get_run(trials[number].user_attrs["mlflow_run_id"])
        # FINISHED only when the kill fell between the run's end and Optuna's record of it.
        assert run.info.status in ("KILLED", "FINISHED"), run.info.status
        assert run.data.tags["optuna.state"] == "FAIL"
        assert run.data.tags["optuna.reason"] == "orphaned"


def test_worker_threads_share_the_cores_and_bad_counts_fail() -> None:
    cfg = compose_config(["train.threads=8"])
    assert [worker_threads(cfg, n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
    cfg = compose_config(["train.threads=0"])  # 0: TensorFlow's default, every core
    assert worker_threads(cfg, 2) == max(1, (os.cpu_count() or 1) // 2)
    for workers in (0, -1):
        with pytest.raises(UserError, match="--workers"):
            tune.cli(cfg, argparse.Namespace(workers=workers))
