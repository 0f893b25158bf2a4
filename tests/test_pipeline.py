"""End to end: a real `dvc repro` of the smoke profile in a temporary copy of the repository,
with RAF-DB pulled from the team's DVC remote and a real SQLite MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT
from tests.test_stage_deps import listed_code

pytestmark = pytest.mark.slow
SHARED = ROOT.parent / "shared"


COMMAND_LIMIT_S = 1800  # a hung command fails its test instead of stalling the whole suite


def _sh(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = COMMAND_LIMIT_S
) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(
            args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{' '.join(args)} still running after {timeout:.0f}s:\n{exc.stdout}\n{exc.stderr}"
        )
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _copy_checkout(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files only, as a fresh clone plus local edits."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def smoke_repo(base: Path, **env: str) -> tuple[Path, dict[str, str]]:
    """A committed copy of this checkout in base/repo on the smoke profile, ../shared beside it,
    RAF-DB pulled, and an environment whose MLflow store is base/mlflow.db (plus `env`)."""
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: the DVC remote and weights live there")
    repo = base / "repo"
    repo.mkdir()
    (base / "shared").symlink_to(SHARED)  # ../shared, as beside a real clone
    _copy_checkout(repo)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}", **env}
    for args in (
        ["git", "init", "-q"],
        ["soundmood", "params", "profile=smoke"],
        ["git", "add", "-A"],  # committed with the smoke params: a clean clone, as a user's
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"],
        ["dvc", "pull", "-q", "data.dvc"],
    ):
        _sh(args, repo, env)
    return repo, env


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs the smoke pipeline once; the tests below inspect what it left."""
    repo, env = smoke_repo(tmp_path_factory.mktemp("e2e"))
    start = time.perf_counter()
    first = _sh(["dvc", "repro"], repo, env)
    first_seconds = time.perf_counter() - start
    start = time.perf_counter()
    second = _sh(["dvc", "repro"], repo, env)
    return {
        "repo": repo,
        "env": env,
        "first": first,
        "first_seconds": first_seconds,
        "second": second,
        "second_seconds": time.perf_counter() - start,
    }


def test_metrics_json_has_flat_test_metrics(pipeline: dict) -> None:
    metrics = json.loads((pipeline["repo"] / "reports" / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "weighted_f1"):
        assert 0.0 <= metrics[key] <= 1.0
    for name in ("angry", "happy", "neutral", "sad", "surprised"):
        for stat in ("precision", "recall", "f1"):
            assert 0.0 <= metrics[f"{name}_{stat}"] <= 1.0
    confusion = (pipeline["repo"] / "reports" / "plots" / "confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 1 + 5 * 40


def test_trust_figures_flow_from_train_to_evaluate(pipeline: dict) -> None:
    """The temperature and threshold train chose on validation are the ones evaluate reports
    on test and the registered model's card states."""
    reports = pipeline["repo"] / "reports"
    trained = json.loads((reports / "train_run.json").read_text())
    metrics = json.loads((reports / "metrics.json").read_text())
    assert trained["temperature"] > 0 and 0.0 <= trained["min_confidence"] <= 1.0
    assert metrics["min_confidence"] == pytest.approx(trained["min_confidence"], abs=1e-4)
    for key in ("ece", "nll", "brier", "ece_before_temperature", "confident_coverage"):
        assert metrics[key] >= 0.0, key
    robust = json.loads((reports / "robustness.json").read_text())
    assert all("ece" in scores for scores in robust["conditions"].values())
    rows = (reports / "plots" / "reliability.csv").read_text().splitlines()
    assert rows[0].startswith("bin_low") and len(rows) > 1
    mlflow.set_tracking_uri(pipeline["env"]["MLFLOW_TRACKING_URI"])
    registered = json.loads((reports / "registry.json").read_text())
    card = MlflowClient().get_model_version(registered["name"], str(registered["version"]))
    assert f"{metrics['macro_f1']:.4f}" in card.description


def test_mlflow_run_has_params_metrics_artifacts_and_model(pipeline: dict) -> None:
    mlflow.set_tracking_uri(pipeline["env"]["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    run_id = json.loads((pipeline["repo"] / "reports" / "train_run.json").read_text())[
        "mlflow_run_id"
    ]
    run = client.get_run(run_id)
    assert run.data.params["model.name"] == "mobilenet_v2"
    assert run.data.params["profile"] == "smoke"
    assert run.data.tags["profile"] == "smoke" and len(run.data.tags["git_commit"]) == 40
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
        assert len(client.get_metric_history(run_id, key)) >= 2, key
    train_summary = json.loads((pipeline["repo"] / "reports" / "train.json").read_text())
    assert run.data.metrics["logit_adjustment_tau"] == train_summary["logit_adjustment_tau"]
    metrics = json.loads((pipeline["repo"] / "reports" / "metrics.json").read_text())
    assert run.data.metrics["test_macro_f1"] == pytest.approx(metrics["macro_f1"])
    assert run.data.metrics["test_angry_recall"] == pytest.approx(metrics["angry_recall"])
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {
        "evaluation/confusion.png",
        "evaluation/confusion.csv",
        "evaluation/classification_report.json",
        "evaluation/reliability.csv",
        "evaluation/reliability.png",
        "evaluation/selective.csv",
    } <= artifacts
    assert run.data.metrics["test_ece"] == pytest.approx(metrics["ece"])
    digests = {d.dataset.digest for d in run.inputs.dataset_inputs}
    assert "e3aa2ebbb86bae659df00b55916f5159" in digests
    model_uri = json.loads((pipeline["repo"] / "reports" / "evaluation.json").read_text())[
        "model_uri"
    ]
    assert mlflow.models.get_model_info(model_uri).signature is not None


def test_second_repro_does_nothing(pipeline: dict) -> None:
    out = pipeline["second"].stdout
    assert "Running stage" not in out, out
    print(
        f"first repro {pipeline['first_seconds']:.0f}s, no-op repro "
        f"{pipeline['second_seconds']:.1f}s"
    )


def test_editing_a_stage_s_code_reruns_that_stage_and_no_other(pipeline: dict) -> None:
    """In the scratch clone, after its repro: an edit to each source file in dvc.yaml makes
    `dvc status` report exactly the stages that list it (tests/test_stage_deps.py checks those
    lists are what each stage runs); an edit to cli.py, which only dispatches, reports none."""
    repo, env = pipeline["repo"], pipeline["env"]
    stages_of: dict[str, set[str]] = {"src/soundmood/cli.py": set()}
    for stage, files in listed_code().items():
        for rel in files:
            stages_of.setdefault(rel, set()).add(stage)
    wrong = []
    for rel, stages in sorted(stages_of.items()):
        path = repo / rel
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        try:
            changed = set(json.loads(_sh(["dvc", "status", "--json"], repo, env).stdout))
        finally:
            path.write_bytes(original)
        if changed != stages:
            wrong.append(f"{rel}: dvc status reports {sorted(changed)}, expected {sorted(stages)}")
    assert not wrong, "\n".join(wrong)
    assert _sh(["dvc", "status", "--json"], repo, env).stdout.strip() in {"{}", ""}


def test_clean_clone_registers_a_clean_commit(pipeline: dict) -> None:
    """`dvc repro` rewrites dvc.lock before train and evaluate run; that is not a change to code
    or config, so the run and the registered version must both say the commit is clean."""
    repo, env = pipeline["repo"], pipeline["env"]
    assert "dvc.lock" in _sh(["git", "status", "--porcelain"], repo, env).stdout
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    run_id = json.loads((repo / "reports" / "train_run.json").read_text())["mlflow_run_id"]
    head = _sh(["git", "rev-parse", "HEAD"], repo, env).stdout.strip()
    assert client.get_run(run_id).data.tags["git_dirty"] == "false"
    registered = json.loads((repo / "reports" / "registry.json").read_text())
    version = client.get_model_version(registered["name"], str(registered["version"]))
    assert version.tags["git_dirty"] == "false" and version.tags["git_commit"] == head
    assert "uncommitted" not in (version.description or "")


def test_no_test_image_in_train_or_val(pipeline: dict) -> None:
    index = json.loads((pipeline["repo"] / "prepared" / "index.json").read_text())
    seen = {h for split in ("train", "val") for _, h in index["files"][split]}
    assert seen and not seen & {h for _, h in index["files"]["test"]}


def test_exp_run_override_reaches_the_stages(pipeline: dict) -> None:
    """DVC's Hydra integration: `-S` composes conf/ with the override into params.yaml."""
    repo, env = pipeline["repo"], pipeline["env"]
    _sh(
        [
            "dvc",
            "exp",
            "run",
            "-S",
            "profile=smoke",
            "-S",
            "train.epochs=1",
            "-S",
            "tune.enabled=false",
        ],
        repo,
        env,
    )
    shown = _sh(["dvc", "exp", "show", "--json"], repo, env).stdout
    assert '"epochs": 1' in shown.replace("'", '"')
    train = json.loads((repo / "reports" / "train.json").read_text())
    assert train["epochs_run"] == 1
    _diff_of_the_two_registered_smoke_models(repo, env)


def _diff_of_the_two_registered_smoke_models(repo: Path, env: dict[str, str]) -> None:
    """The repro and the experiment registered v1 and v2: `models --diff 2 1` shows each
    figure's delta as the two versions' runs logged them."""
    shown = json.loads(_sh(["soundmood", "models", "--diff", "2", "1", "--json"], repo, env).stdout)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    name = json.loads((repo / "reports" / "registry.json").read_text())["name"]
    logged = {
        v: client.get_run(client.get_model_version(name, v).run_id).data.metrics for v in "12"
    }
    rows = {row["name"]: row for row in shown["rows"]}
    for key in ("macro_f1", "angry_recall", "sad_f1", "ece", "confident_coverage"):
        a, b = logged["2"][f"test_{key}"], logged["1"][f"test_{key}"]
        assert (rows[key]["a"], rows[key]["b"]) == (pytest.approx(a), pytest.approx(b)), key
        assert rows[key]["delta"] == pytest.approx(a - b, abs=1e-9), key
