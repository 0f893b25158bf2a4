"""Parallel experiments (issue 8): a 2x2 grid over conf/ groups and values queued with
`dvc exp run --queue -S ...` in a temporary copy of the repository and run by two DVC queue
workers at once (`dvc queue start -j 2`); every experiment's params and test metrics come back in
`dvc exp show` (the reports are DVC-cached outputs, so an experiment carries them without git
tracking them), and every one logged its run and test metrics to the MLflow store named by
MLFLOW_TRACKING_URI, which the workers inherit.

Queued experiments run in temporary workspaces under .dvc/tmp/exps/, not in the repository root,
so paths relative to the working directory (`../shared/...`) do not resolve there: the test hands
mobilenet_v2 its ImageNet weights by absolute path (docs/scaling.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from itertools import product
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, compose_config
from tests.test_pipeline import _sh, smoke_repo

pytestmark = pytest.mark.slow

MODELS = ("mobilenet_v2", "seed_cnn")
SIZES = (64, 48)  # both >= MIN_IMAGE_SIZE of both models (32 and 16)
QUEUE_LIMIT_S = 1800  # the whole grid, two at a time
WORKER_START_S = 60
STATUS_LIMIT_S = 300  # one `dvc queue` command
FAST = ["profile=smoke", "tune.enabled=false", "train.epochs=1"]


def _queue_status(repo: Path, env: dict[str, str]) -> list[tuple[str, str]]:
    """(name, status) of every task `dvc queue status` lists."""
    out = _sh(["dvc", "queue", "status"], repo, env, timeout=STATUS_LIMIT_S).stdout
    rows = []
    for line in out.splitlines():
        cells = line.split()
        if (
            len(cells) >= 4
            and cells[0] != "Task"
            and cells[-1] in {"Queued", "Running", "Success", "Failed", "Failure", "Stopped"}
        ):
            rows.append((cells[1], cells[-1]))
    return rows


def _queue_done(repo: Path, env: dict[str, str]) -> bool:
    """No task queued or running; False while `dvc queue status` fails (a result mid-write)."""
    result = subprocess.run(
        ["dvc", "queue", "status"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=STATUS_LIMIT_S,
    )
    states = {line.split()[-1] for line in result.stdout.splitlines() if line.split()}
    return result.returncode == 0 and not states & {"Queued", "Running"}


def _start_workers(repo: Path, env: dict[str, str], log: Path) -> None:
    """`dvc queue start -j 2`, its output to a file: the workers it daemonises inherit its
    stdout, so a captured pipe stays open (and `subprocess.run` waits) until the last worker
    exits, which a stuck worker never does; the wait on the workers below is bounded."""
    with log.open("w") as out:
        started = subprocess.run(
            ["dvc", "queue", "start", "-j", "2"],
            cwd=repo,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=STATUS_LIMIT_S,
        )
    assert started.returncode == 0, log.read_text()


def _workers(repo: Path) -> list[int]:
    """Process ids of the DVC queue workers serving `repo` (they run in it)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and b"queue-worker" in (proc / "cmdline").read_bytes()
                and os.readlink(proc / "cwd") == os.path.realpath(repo)
            ):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _kill_strays(workspaces: Path) -> None:
    """`dvc queue stop --kill` interrupts the experiment, not always the stage command it runs:
    end what is still running in one of this test's workspaces, by process id."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "cwd").startswith(str(workspaces)):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            continue


def _experiments(shown: list[dict]) -> dict[str, dict]:
    """name -> the `data` of every experiment `dvc exp show --json` lists under any baseline."""
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name"):
                    found[rev["name"]] = rev.get("data") or {}
    return found


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("exp-queue")
    repo, env = smoke_repo(base, TF_CPP_MIN_LOG_LEVEL="3")

    weights = (ROOT / compose_config(["model=mobilenet_v2"]).model.weights).resolve()
    names = {}
    for model, size in product(MODELS, SIZES):
        name = f"{model.replace('_', '-')}-{size}"
        overrides = [*FAST, f"model={model}", f"data.image_size={size}"]
        if model == "mobilenet_v2":  # ../shared is not beside .dvc/tmp/exps/<workspace>
            overrides.append(f"model.weights={weights}")
        args = ["dvc", "exp", "run", "--queue", "-n", name]
        for override in overrides:
            args += ["-S", override]
        _sh(args, repo, env)
        names[name] = (model, size)
    # A fresh SQLite store is created (its schema migrated) by the first process that opens it:
    # two experiments starting at once race on that, so create it and the experiment up front.
    MlflowClient(env["MLFLOW_TRACKING_URI"]).create_experiment(compose_config().tracking.experiment)
    queued = _queue_status(repo, env)
    assert sorted(n for n, s in queued if s == "Queued") == sorted(names), queued

    start = time.monotonic()
    _start_workers(repo, env, base / "queue-start.log")
    statuses = queued
    try:
        # The workers exit once the queue is empty. Waiting on their processes, not on
        # `dvc queue status`, which can fail (exit 255) reading a result file mid-write.
        while not _workers(repo) and time.monotonic() - start < WORKER_START_S:
            time.sleep(1)  # `dvc queue start` returns as its daemons exec
        while _workers(repo) and time.monotonic() - start < QUEUE_LIMIT_S:
            time.sleep(15)
            if _queue_done(repo, env):  # a worker can miss celery's shutdown and never exit
                break
        statuses = _queue_status(repo, env)
        if any(s in {"Queued", "Running"} for _, s in statuses):
            pytest.fail(f"queue not done in {time.monotonic() - start:.0f}s: {statuses}")
    finally:
        subprocess.run(
            ["dvc", "queue", "stop", "--kill"], cwd=repo, env=env, capture_output=True, timeout=120
        )
        _kill_strays(repo / ".dvc" / "tmp" / "exps")
    seconds = time.monotonic() - start
    failed = [n for n, s in statuses if s != "Success"]
    logs = {
        n: subprocess.run(
            ["dvc", "queue", "logs", n],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout[-3000:]
        for n in failed
    }
    assert not failed, f"experiments did not succeed: {statuses}\n{logs}"
    shown = json.loads(_sh(["dvc", "exp", "show", "--json"], repo, env).stdout)
    return {
        "repo": repo,
        "env": env,
        "names": names,
        "shown": shown,
        "seconds": seconds,
    }


def test_the_grid_runs_two_at_a_time_and_every_experiment_is_shown(grid: dict) -> None:
    experiments = _experiments(grid["shown"])
    assert set(grid["names"]) <= set(experiments), sorted(experiments)
    for name, (model, size) in grid["names"].items():
        params = experiments[name]["params"]["params.yaml"]["data"]
        assert params["model"]["name"] == model and params["data"]["image_size"] == size, name
        assert params["tune"]["enabled"] is False and params["train"]["epochs"] == 1
    # -j 2: the experiments' MLflow runs (train + evaluate) overlap two at a time, never three.
    # (Polling `dvc queue status` for "Running" misses short tasks on a loaded machine.)
    peak = _peak_overlap(_finished_train_runs(grid["env"]))
    assert peak == 2, f"at most {peak} experiments ran at once"
    print(f"2x2 grid with dvc queue -j 2: {grid['seconds']:.0f}s, {peak} running at once")


def _finished_train_runs(env: dict[str, str]) -> list:
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(compose_config().tracking.experiment)
    assert experiment is not None, "no MLflow experiment: the workers ignored the env"
    return client.search_runs(
        [experiment.experiment_id], "tags.stage = 'train' and attributes.status = 'FINISHED'"
    )


def _peak_overlap(runs: list) -> int:
    """Most runs open at the same moment, from their start and end times."""
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    open_runs = peak = 0
    for _, step in events:
        open_runs += step
        peak = max(peak, open_runs)
    return peak


def test_exp_show_has_every_experiments_test_metrics(grid: dict) -> None:
    experiments = _experiments(grid["shown"])
    for name in grid["names"]:
        metrics = experiments[name]["metrics"]["reports/metrics.json"]
        assert "error" not in metrics, f"{name}: {metrics}"
        assert 0.0 <= metrics["data"]["accuracy"] <= 1.0, name


def test_every_experiment_logged_its_run_to_mlflow(grid: dict) -> None:
    mlflow.set_tracking_uri(grid["env"]["MLFLOW_TRACKING_URI"])
    try:
        runs = _finished_train_runs(grid["env"])
        combos = {
            (r.data.params.get("model.name"), r.data.params.get("data.image_size"))
            for r in runs
            if 0.0 <= r.data.metrics.get("test_accuracy", -1.0) <= 1.0
        }
        expected = {(model, str(size)) for model, size in grid["names"].values()}
        assert expected <= combos, combos
    finally:
        mlflow.set_tracking_uri(None)
