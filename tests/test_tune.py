"""The tune stage with real Optuna studies on the smoke data, a real SQLite MLflow store and real
Keras training (no mocks): pruning, resume after SIGKILL, the search-space declaration, nested
MLflow runs, the hand-over to train and DVC's view of the stage.

Trials are kept cheap: the smoke profile with most of MobileNetV2's backbone frozen
(`model.frozen_layers=140`), half of train per trial and one or two epochs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

import soundmood.tune.study as tune_study
from soundmood import train, tune
from soundmood.conditions import REDETECTED
from soundmood.config import validate, with_values
from soundmood.errors import ConfigError
from soundmood.tune.report import handed_over
from soundmood.tune.space import SearchParam, parse_space
from soundmood.tune.study import budget_used, study_name
from tests.conftest import ROOT, compose_config, smoke_config

FAST = ["model.frozen_layers=140", "tune.subset_fraction=0.5"]


def counts(study: optuna.Study) -> dict[str, int]:
    states = [t.state.name for t in study.trials]
    return {s: states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}


_storages: dict[str, optuna.storages.BaseStorage] = {}


def load_study(cfg: DictConfig) -> optuna.Study:
    """The study `cfg` tunes, through one storage per URL (polling opens no new connections)."""
    if cfg.tune.storage not in _storages:
        _storages[cfg.tune.storage] = optuna.storages.RDBStorage(cfg.tune.storage)
    return optuna.load_study(
        study_name=study_name(cfg, parse_space(cfg)), storage=_storages[cfg.tune.storage]
    )


# --- one real study, shared by the pruning, MLflow and hand-over tests -------------------------


@pytest.fixture(scope="module")
def pruned_study(tmp_path_factory: pytest.TempPathFactory, prepared_smoke: DictConfig) -> dict:
    """A median-pruned study of 4 trials. The space is made so that pruning is near certain:
    trial 0 is the baseline (train.lr=1e-3, at the low end of the range) and every other trial
    draws a learning rate log-uniform in [1e-3, 10], mostly far too high for the head's first
    epoch; with one startup trial and no warm-up, a trial whose first-epoch val_macro_f1 is
    below the baseline's is pruned right there."""
    work = tmp_path_factory.mktemp("tune-pruning")
    cfg = smoke_config(
        work,
        Path(prepared_smoke.data.root),
        [
            *FAST,
            "train.lr=1e-3",
            "tune.n_trials=4",
            "tune.epochs=2",
            "tune.pruner=median",
            "tune.pruner_startup_trials=1",
            "tune.pruner_warmup_steps=0",
            "tune.sampler_startup_trials=10",
        ],
    )
    cfg.data.prepared_dir = prepared_smoke.data.prepared_dir
    cfg.tune.space = {"train.lr": {"type": "float", "low": 1.0e-3, "high": 10.0, "log": True}}
    with pytest.MonkeyPatch.context() as mp:
        uri = f"sqlite:///{work / 'mlflow.db'}"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(tune_study, "WORK_DIR", work / ".work")
        mp.chdir(ROOT)  # data_version() reads data.dvc
        start = time.perf_counter()
        report = tune.run(cfg)
        seconds = time.perf_counter() - start
        yield {
            "cfg": cfg,
            "report": report,
            "study": load_study(cfg),
            "uri": uri,
            "work": work,
            "seconds": seconds,
        }
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_pruning_happens_and_is_recorded(pruned_study: dict) -> None:
    study, report = pruned_study["study"], pruned_study["report"]
    states = counts(study)
    print(f"pruning study: {states} in {pruned_study['seconds']:.0f}s")
    assert states["PRUNED"] >= 1 and states["COMPLETE"] >= 1, states
    assert states["RUNNING"] == states["WAITING"] == 0
    assert report["trials_counted"] == len(study.trials) == 4
    assert {k: report["trials"][k] for k in ("COMPLETE", "PRUNED", "FAIL")} == {
        k: states[k] for k in ("COMPLETE", "PRUNED", "FAIL")
    }
    assert study.trials[0].user_attrs.get("baseline") is True  # the untuned config, measured
    client = MlflowClient(pruned_study["uri"])
    for trial in study.trials:
        if trial.state != TrialState.PRUNED:
            continue
        step, reason = trial.user_attrs["pruned_step"], trial.user_attrs["prune_reason"]
        assert reason in ("pruner", "nan_loss")
        assert max(trial.intermediate_values) == step  # training stopped at the pruned epoch
        tags = client.get_run(trial.user_attrs["mlflow_run_id"]).data.tags
        assert tags["optuna.state"] == "PRUNED"
        assert (tags["optuna.reason"], tags["optuna.pruned_step"]) == (reason, str(step))
    assert any(t.user_attrs.get("prune_reason") == "pruner" for t in study.trials), (
        "no trial was stopped by the median pruner itself"
    )


@pytest.mark.slow
def test_trials_are_nested_runs_under_the_parent(pruned_study: dict) -> None:
    study, report = pruned_study["study"], pruned_study["report"]
    client = MlflowClient(pruned_study["uri"])
    parent = client.get_run(report["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["optuna.study_name"] == study.study_name
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    assert parent.data.metrics["best_val_macro_f1"] == pytest.approx(study.best_value)
    assert parent.data.metrics["trials_pruned"] == counts(study)["PRUNED"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    for name in (
        "tune.json",
        "best_params.yaml",
        "trials.csv",
        "optimization_history.png",
        "intermediate_values.png",
    ):
        assert f"tune/{name}" in artifacts, artifacts
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    assert sorted(by_number) == [t.number for t in study.trials]
    for trial in study.trials:
        child = by_number[trial.number]
        assert child.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert child.data.tags["optuna.state"] == trial.state.name
        assert float(child.data.params["train.lr"]) == pytest.approx(trial.params["train.lr"])
        assert child.info.status == "FINISHED"


@pytest.mark.slow
def test_best_params_are_handed_to_train(pruned_study: dict, tmp_path: Path) -> None:
    cfg, study, report = pruned_study["cfg"], pruned_study["study"], pruned_study["report"]
    best = yaml.safe_load(Path(cfg.tune.best_params_path).read_text())
    assert best == study.best_trial.params and set(best) == {"train.lr"}
    written = json.loads((Path(cfg.evaluate.reports_dir) / "tune.json").read_text())
    assert written["best_params"] == best and written["best_trial"] == study.best_trial.number
    assert written["study_name"] == study.study_name and written["enabled"] is True

    applied, tuned = train.apply_tuned(cfg)
    assert tuned == best and applied.train.lr == best["train.lr"]
    assert train.apply_tuned(with_values(cfg, {"train.use_tuned": False}))[1] == {}

    # a real (one-epoch) train run records which values came from tuning
    run_cfg = with_values(cfg, {"train.epochs": 1, "train.model_dir": str(tmp_path)})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", pruned_study["uri"])
        mp.setattr(train, "WORK_DIR", tmp_path / ".work")
        mp.chdir(ROOT)
        train.run(run_cfg)
    run_json = json.loads((Path(cfg.evaluate.reports_dir) / "train_run.json").read_text())
    assert run_json["tuned"] == best
    run = MlflowClient(pruned_study["uri"]).get_run(run_json["mlflow_run_id"])
    # the capture conditions, scored on validation for choices that must not read test
    val_robust = json.loads((Path(cfg.evaluate.reports_dir) / "robustness_val.json").read_text())
    assert list(val_robust["conditions"]) == [*cfg.evaluate.conditions, REDETECTED]
    assert val_robust["images"] == len(np.load(Path(cfg.data.prepared_dir) / "val_y.npy"))
    assert run.data.metrics["val_robust_worst_accuracy"] == val_robust["worst_accuracy"]
    assert run.data.params["tuned.train.lr"] == str(best["train.lr"])
    assert float(run.data.params["train.lr"]) == pytest.approx(best["train.lr"])
    assert run.data.tags["soundmood.tune_run_id"] == report["mlflow_run_id"]


# --- resume after a kill -------------------------------------------------------------------------


def _cli_env(work: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "SOUNDMOOD_WORK_DIR": str(work / ".work"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
    }


def cli_setup(work: Path, prepared: DictConfig, extra: list[str]) -> tuple[DictConfig, list[str]]:
    """A smoke params.yaml in `work` (the CLI's project root there) and the trailing overrides
    that point every output of `soundmood tune` into `work`."""
    cfg = smoke_config(work, Path(prepared.data.root), [*FAST, *extra])
    cfg.data.prepared_dir = prepared.data.prepared_dir
    (work / "params.yaml").write_text(OmegaConf.to_yaml(cfg))
    shutil.copy(ROOT / "data.dvc", work / "data.dvc")  # the same data version as here
    overrides = [
        f"{key}={OmegaConf.select(cfg, key)}"
        for key in (
            "data.prepared_dir",
            "train.model_dir",
            "evaluate.reports_dir",
            "tune.best_params_path",
            "tune.storage",
        )
    ] + extra
    return cfg, overrides


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float, what: str):
    """Poll `predicate` until it returns something truthy; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"tune exited ({proc.returncode}) before {what}:\n{log.read_text()}")
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"no {what} within {timeout}s:\n{log.read_text()}")


def trials_of(cfg: DictConfig, log: Path) -> list:
    """The study's trials once the process has created it (it prints 'tune: study' after)."""
    if "tune: study" not in log.read_text():
        return []
    return load_study(cfg).get_trials(deepcopy=False)


@pytest.mark.slow
def test_resume_after_sigkill_loses_and_repeats_nothing(
    tmp_path: Path, prepared_smoke: DictConfig
) -> None:
    extra = ["tune.n_trials=3", "tune.epochs=1", "tune.pruner=none"]
    cfg, overrides = cli_setup(tmp_path, prepared_smoke, extra)
    command = [sys.executable, "-m", "soundmood.cli", "tune", *overrides]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, cwd=tmp_path, env=_cli_env(tmp_path), stdout=out, stderr=subprocess.STDOUT
        )

    def one_done_one_running() -> list[int]:
        trials = trials_of(cfg, log)
        done = [t for t in trials if t.state.is_finished()]
        running = [
            t.number
            for t in trials
            if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs
        ]
        return running if done and running else []

    killed = wait_for(one_done_one_running, proc, log, 300, "finished trial and a running one")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    study = load_study(cfg)
    assert [t.number for t in study.trials if t.state == TrialState.RUNNING] == killed
    first_parent = study.trials[killed[0]].user_attrs["mlflow_parent_run_id"]

    again = subprocess.run(
        command, cwd=tmp_path, env=_cli_env(tmp_path), capture_output=True, text=True, timeout=400
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"orphaned trials {killed} marked FAIL" in again.stdout

    study = load_study(cfg)
    trials = study.trials
    assert [t.number for t in trials] == list(range(len(trials)))  # none lost, none twice
    assert trials[killed[0]].state == TrialState.FAIL
    assert trials[killed[0]].user_attrs["fail_reason"] == "orphaned"
    assert budget_used(study) == 3 and len(trials) == 4
    assert all(t.state == TrialState.COMPLETE for t in trials if t.number not in killed)
    finished = [tuple(sorted(t.params.items())) for t in trials if t.number not in killed]
    assert len(set(finished)) == len(finished)  # the rerun did not replay the same draws
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1
    report = json.loads((Path(cfg.evaluate.reports_dir) / "tune.json").read_text())
    assert report["trials_counted"] == 3 and report["trials"]["FAIL"] == 1

    client = MlflowClient(_cli_env(tmp_path)["MLFLOW_TRACKING_URI"])
    orphan = client.get_run(trials[killed[0]].user_attrs["mlflow_run_id"])
    assert orphan.info.status == "KILLED" and orphan.data.tags["optuna.reason"] == "orphaned"
    assert client.get_run(first_parent).info.status == "KILLED"
    assert client.get_run(report["mlflow_run_id"]).info.status == "FINISHED"


# --- the search space -------------------------------------------------------------------------


def space_cfg(space: dict) -> DictConfig:
    cfg = compose_config()
    cfg.tune.space = space
    return cfg


def test_space_parses_float_log_int_step_and_categorical() -> None:
    params = parse_space(
        space_cfg(
            {
                "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                "model.frozen_layers": {"type": "int", "low": 0, "high": 100, "step": 20},
                "train.optimizer": {"type": "categorical", "choices": ["adamw", "sgd"]},
                "train.augment.translation": {"type": "float", "low": 0, "high": 0.3, "step": 0.1},
            }
        )
    )
    by_key = {p.key: p for p in params}
    assert by_key["train.lr"] == SearchParam("train.lr", "float", 1e-4, 1e-2, log=True)
    assert by_key["model.frozen_layers"] == SearchParam(
        "model.frozen_layers", "int", 0, 100, step=20
    )
    assert by_key["train.optimizer"].choices == ("adamw", "sgd")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):  # real Optuna draws stay inside each declaration
        trial = study.ask()
        values = {p.key: p.suggest(trial) for p in params}
        assert all(by_key[k].contains(v) for k, v in values.items()), values
        assert values["model.frozen_layers"] % 20 == 0
        study.tell(trial, 0.0)
    assert SearchParam("x", "int", 0, 100, step=20).contains(40)
    assert not SearchParam("x", "int", 0, 100, step=20).contains(30)


@pytest.mark.parametrize(
    ("key", "spec", "message"),
    [
        ("train.lrr", {"type": "float", "low": 1e-4, "high": 1e-2}, "not a key"),
        ("train.lr", {"type": "float", "low": 1e-2, "high": 1e-2}, "must be below"),
        ("train.lr", {"type": "float", "low": 0.0, "high": 1e-2, "log": True}, "log scale"),
        ("train.lr", {"type": "float", "low": 1e-4, "high": 1e-2, "lg": True}, "unknown field"),
        ("train.lr", {"type": "float", "low": 1e-4, "high": 1e-2, "choices": [1]}, "unknown field"),
        ("train.optimizer", {"type": "categorical", "choices": []}, "non-empty"),
        ("data.image_size", {"type": "int", "low": 32, "high": 96}, "cannot be tuned"),
        ("tune.epochs", {"type": "int", "low": 1, "high": 3}, "cannot be tuned"),
        ("train.augment", {"type": "float", "low": 0.0, "high": 1.0}, "group"),
        ("train.lr", {"type": "normal", "low": 0.0, "high": 1.0}, "not float, int or categorical"),
        ("train.batch_size", {"type": "int", "low": 16, "high": 64.5}, "is not an int"),
        ("train.lr", {"type": "float", "low": 1e-4, "high": 20.0}, "rejects"),
        ("train.optimizer", {"type": "categorical", "choices": ["adamw", "lion"]}, "rejects"),
        ("train.lr", [1e-4, 1e-2], "expected a mapping"),
    ],
)
def test_bad_space_declarations_name_the_key(key: str, spec: object, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"tune.space.{key}")) as err:
        parse_space(space_cfg({key: spec}))
    assert message in str(err.value)


def test_empty_space_fails_naming_tune_space() -> None:
    with pytest.raises(ConfigError, match=r"tune\.space"):
        parse_space(space_cfg({}))


def test_study_follows_only_what_a_trial_depends_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same study resumes when paths, train.epochs or threads change, a new one starts when
    the space, a value the trials train with or the baseline trial's values change."""
    monkeypatch.chdir(ROOT)

    def name(overrides: list[str] = (), space: dict | None = None) -> str:
        cfg = compose_config(list(overrides))
        if space is not None:
            cfg.tune.space = space
        return study_name(cfg, parse_space(cfg))

    base = name()
    for same in (
        ["train.epochs=30"],
        ["train.threads=1"],
        ["train.model_dir=elsewhere"],
        ["tune.n_trials=50"],
        ["tune.storage=sqlite:///other.db"],
    ):
        assert name(same) == base, same
    # a tuned key's configured value is the baseline trial's, and what train gets by default
    assert name(["tune.enqueue_baseline=false", "train.lr=0.002"]) == name(
        ["tune.enqueue_baseline=false"]
    )
    for other in (
        ["train.lr=0.002"],
        ["model.dropout=0.1"],
        ["tune.epochs=5"],
        ["tune.subset_fraction=0.3"],
        ["train.batch_size=16"],
        ["model.frozen_layers=10"],
        ["seed=1"],
    ):
        assert name(other) != base, other
    narrower = {"train.lr": {"type": "float", "low": 3.0e-4, "high": 1.0e-3, "log": True}}
    assert name(space=narrower) != base


# --- DVC's view of the stage ---------------------------------------------------------------------


def test_dvc_reruns_tune_only_when_its_inputs_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tune stage of the real dvc.yaml in a scratch DVC repository: `dvc commit` records its
    inputs without running it, then `dvc status` (what `dvc repro` acts on) is read after each
    edit."""
    from dvc.repo import Repo

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["tune"]
    repo = tmp_path / "repo"
    (repo / "prepared").mkdir(parents=True)
    (repo / "prepared" / "train_x.npy").write_bytes(b"images")
    for dep in stage["deps"]:
        if dep != "prepared":
            (repo / dep).parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / dep).is_dir():
                shutil.copytree(
                    ROOT / dep, repo / dep, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy(ROOT / dep, repo / dep)
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    (repo / "optuna.db").write_bytes(b"")
    (repo / "reports").mkdir()
    (repo / "reports" / "best_params.yaml").write_text("{}\n")
    (repo / "reports" / "tune.json").write_text("{}\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"tune": stage}}))
    monkeypatch.chdir(repo)  # DVC resolves targets from the working directory
    Repo.init(str(repo), no_scm=True)
    with Repo(str(repo)) as dvc:
        dvc.commit("tune", force=True)

    def status() -> str:
        with Repo(str(repo)) as dvc:
            return json.dumps(dvc.status(targets=["tune"]))

    def edit(path: str, old: str, new: str) -> None:
        text = (repo / path).read_text()
        assert old in text, (path, old)
        (repo / path).write_text(text.replace(old, new, 1))

    assert status() == "{}"
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["batch_size"] += 1  # not an input of tune
    params["registry"]["min_improvement"] = 0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert status() == "{}"
    (repo / "src" / "soundmood" / "evaluate.py").write_text("# not a dependency\n")
    assert status() == "{}"

    params["tune"]["n_trials"] += 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert '"params.yaml": {"tune": "modified"}' in status()
    params["tune"]["n_trials"] -= 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert status() == "{}"

    for module in ("src/soundmood/tune/objective.py", "src/soundmood/tune/report.py"):
        assert module in stage["deps"], module  # each module the stage runs (test_stage_deps)
        text = (repo / module).read_text()
        (repo / module).write_text(text + "# edited\n")
        assert module in status(), module
        (repo / module).write_text(text)
        assert status() == "{}", module
    (repo / "prepared" / "train_x.npy").write_bytes(b"other images")
    assert "prepared" in status()


def _finished(number: int, value: float, lr: float, baseline: bool = False) -> FrozenTrial:
    trial = optuna.trial.create_trial(
        params={"train.lr": lr},
        distributions={"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)},
        value=value,
        user_attrs={"baseline": True} if baseline else {},
    )
    trial.number = number
    return trial


def test_the_best_trial_is_handed_over_only_when_it_beats_the_baseline() -> None:
    baseline = _finished(0, 0.80, 1e-3, baseline=True)
    tie, worse, better = _finished(1, 0.80, 3e-3), _finished(2, 0.7, 3e-3), _finished(3, 0.83, 5e-4)
    values, why = handed_over(better, baseline)
    assert values == {"train.lr": 5e-4}
    assert why == "best trial 3 beats the baseline trial 0 by 0.0300"
    for best in (baseline, tie, worse):
        values, why = handed_over(best, baseline)
        assert values == {"train.lr": 1e-3} and "the configured values" in why
    assert handed_over(tie, None)[0] == {"train.lr": 3e-3}
    assert handed_over(None, None) == (
        {},
        "no trial completed; train keeps the configured values",
    )


def test_removed_budget_keys_are_not_in_the_config() -> None:
    """The budget is n_trials (the same study on every machine), the hand-over rule has no gain
    threshold: tune has no timeout_s and no min_gain."""
    tune_cfg = compose_config().tune
    assert "timeout_s" not in tune_cfg and "min_gain" not in tune_cfg
    validate(compose_config())
