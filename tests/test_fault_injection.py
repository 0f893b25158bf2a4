"""Nothing a user has is ever lost: `soundmood prepare` and `soundmood register` killed with SIGKILL
before each of their durable steps (tests/killpoint.py) and at seeded random moments, then run
again. After every kill what the next stage would read is whole (the old prepared/ or the new one,
never a mix; the registry report absent or complete), and the rerun ends exactly where an
uninterrupted run ends. prepare's loader refuses a mixed or cut-off prepared/ by name, and a
prepare that fails (exit 2) leaves prepared/ as it was."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf

from soundmood.data import prepare

from .conftest import ROOT, compose_config

KILLPOINT = ROOT / "tests" / "killpoint.py"
SPLITS = ("train", "val", "test")
OLD_LIMIT, NEW_LIMIT = 30, 40  # per class: the old prepared/ holds other sizes than the new one
SEED = 34  # the random kill delays


def soundmood(
    args: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    kill_at: int | None = None,
    steps: Path | None = None,
    under: Path | None = None,
    kill_after: float | None = None,
) -> subprocess.CompletedProcess:
    """`soundmood ARGS`, run whole, killed before durable step `kill_at` (0: run whole, list the
    steps in `steps`), or sent SIGKILL `kill_after` seconds after it starts."""
    command = ["soundmood", *args]
    if kill_at is not None:
        command = [
            sys.executable,
            str(KILLPOINT),
            str(kill_at),
            str(steps),
            str(under),
            "--",
            *args,
        ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        if kill_after is not None:
            try:
                process.wait(kill_after)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
        process.wait()  # reaped: its pid is free, as a stale-partial check expects
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def files(folder: Path) -> dict[str, bytes] | None:
    """Every file under `folder` (hidden ones too) by relative path; None when it is missing."""
    if not folder.is_dir():
        return None
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".partial-*"))


def kill_points(
    steps: list[str], work: Path, run_seconds: float, random_kills: int
) -> list[tuple[str, dict]]:
    """Before every durable step of the stage, then `random_kills` seeded moments spread over the
    second half of an uninterrupted run (the first is mostly imports). Left out: a `mkdir` of a
    folder already there (it changes nothing) and the CLI's timing record after the stage."""
    kills = [
        (f"before step {k} ({label})", {"kill_at": k})
        for k, label in enumerate(steps, 1)
        if "reports/timings" not in label
        and not (label.startswith("mkdir ") and (work / label.removeprefix("mkdir ")).is_dir())
    ]
    rng = random.Random(SEED)
    delays = sorted(rng.uniform(0.5, 1.0) * run_seconds for _ in range(random_kills))
    return kills + [(f"after {delay:.2f}s", {"kill_after": delay}) for delay in delays]


# --- prepare ------------------------------------------------------------------------------------


def prepare_args(work: Path, data_root: Path, limit: int) -> list[str]:
    return [
        "prepare",
        f"data.root={data_root}",
        f"data.prepared_dir={work / 'prepared'}",
        "data.image_size=64",
        f"data.limit_per_class={limit}",
        f"evaluate.reports_dir={work / 'reports'}",
    ]


def loader_view(prepared: Path, references: dict[str, Path]) -> str:
    """What the stages after prepare get from `prepared`: the name of the reference set every
    split and index.json match, or 'refused' (a clean PreparedDataError, exit 2 in the CLI)."""
    try:
        index = prepare.load_index(prepared)
        arrays = {split: prepare.load_split(prepared, split) for split in SPLITS}
    except prepare.PreparedDataError as exc:
        assert "soundmood prepare" in str(exc)
        return "refused"
    for name, folder in references.items():
        if index == json.loads((folder / "index.json").read_text()):
            for split, (x, y) in arrays.items():
                assert np.array_equal(x, np.load(folder / f"{split}_x.npy")), (name, split)
                assert np.array_equal(y, np.load(folder / f"{split}_y.npy")), (name, split)
            return name
    raise AssertionError(f"{prepared}: the loader took arrays of neither reference set")


@pytest.mark.slow
def test_prepare_killed_at_every_step_keeps_old_or_new_and_reruns_to_the_same_bytes(
    tmp_path: Path, data_root: Path
) -> None:
    references = {}
    for name, limit in (("old", OLD_LIMIT), ("new", NEW_LIMIT)):
        start = time.perf_counter()
        done = soundmood(prepare_args(tmp_path / name, data_root, limit), ROOT)
        assert done.returncode == 0, done.stderr
        references[name] = tmp_path / name / "prepared"
    run_seconds = time.perf_counter() - start  # an uninterrupted run of the new config
    old, new = files(references["old"]), files(references["new"])
    assert old.keys() == new.keys() and all(old[k] != new[k] for k in old)

    work = tmp_path / "work"
    args = prepare_args(work, data_root, NEW_LIMIT)

    def reset() -> None:  # the old, complete prepared/ a user has before the run
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(references["old"], work / "prepared")

    reset()
    log = tmp_path / "steps.json"
    counted = soundmood(args, ROOT, kill_at=0, steps=log, under=work)
    assert counted.returncode == 0, counted.stderr
    assert files(work / "prepared") == new  # the hook changes nothing it does not kill
    steps = json.loads(log.read_text())
    assert "rename prepared -> .partial-PID-replaced-prepared" in steps
    assert "rename .partial-PID-prepared -> prepared" in steps

    kills = kill_points(steps, work, run_seconds, 4)
    seen = {}
    for what, kill in kills:
        reset()
        killed = soundmood(args, ROOT, steps=log, under=work, **kill)
        if "kill_at" in kill:
            assert killed.returncode == -signal.SIGKILL, (what, killed.stderr)
        state = files(work / "prepared")
        found = (
            "none"
            if state is None
            else "old"
            if state == old
            else "new"
            if state == new
            else "a mix"
        )
        assert found in ("old", "new", "none"), f"killed {what}: prepared/ holds {found}"
        if found == "none":  # between the two renames: the old folder lies whole beside it
            (aside,) = work.glob(".partial-*-replaced-prepared")
            assert files(aside) == old, what
        view = loader_view(work / "prepared", references)
        assert view == {"none": "refused"}.get(found, found), what
        seen[what] = found

        rerun = soundmood(args, ROOT)
        assert rerun.returncode == 0, (what, rerun.stderr)
        assert files(work / "prepared") == new, f"rerun after a kill {what}"
        assert leftovers(work) == [], what
        assert loader_view(work / "prepared", references) == "new"
    # the kills covered every state a kill can leave
    assert set(seen.values()) == {"old", "none", "new"}, seen


def small_tree(root: Path, data_root: Path) -> Path:
    """root/data: 4 train and 2 test real images per class."""
    for split, n in (("train", 4), ("test", 2)):
        for klass in compose_config().data.classes:
            folder = root / "data" / split / klass
            folder.mkdir(parents=True)
            for path in sorted((data_root / split / klass).iterdir())[:n]:
                shutil.copy(path, folder / path.name)
    return root / "data"


def test_a_failed_prepare_changes_nothing(tmp_path: Path, data_root: Path) -> None:
    """An undecodable image: exit 2 naming it, and prepared/ exactly as the last run left it."""
    tree = small_tree(tmp_path, data_root)
    args = [
        "prepare",
        f"data.root={tree}",
        f"data.prepared_dir={tmp_path / 'out' / 'prepared'}",
        "data.image_size=32",
        "data.limit_per_class=null",
        "data.val_fraction=0.25",
        f"evaluate.reports_dir={tmp_path / 'reports'}",
    ]
    assert soundmood(args, ROOT).returncode == 0
    before = files(tmp_path / "out")
    bad = tree / "train" / "sad" / "zz-cut-off.jpg"
    bad.write_bytes((tree / "train" / "happy").iterdir().__next__().read_bytes()[:300])
    failed = soundmood(args, ROOT)
    assert failed.returncode == 2
    assert failed.stderr.splitlines()[-1] == (
        f"error: {bad}: corrupt or truncated image (Truncated File Read)"
    )
    assert files(tmp_path / "out") == before  # not one byte changed
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["prepared"]  # nothing left


@pytest.mark.slow  # over 5 s: left out of make test-fast
def test_loader_refuses_a_mixed_cut_off_or_undescribed_prepared_folder(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .conftest import smoke_config

    monkeypatch.chdir(ROOT)
    cfgs = [
        smoke_config(tmp_path / name, data_root, [f"data.limit_per_class={n}"])
        for name, n in (("old", 10), ("new", 12))
    ]
    for cfg in cfgs:
        prepare.run(cfg)
    old, new = (Path(cfg.data.prepared_dir) for cfg in cfgs)
    index = prepare.load_index(new)
    assert index["arrays"]["train_x.npy"]["shape"] == [len(index["files"]["train"]), 64, 64, 3]
    assert index["arrays"]["val_y.npy"]["dtype"] == "int64"
    assert index["arrays"]["test_x.npy"]["md5"] == prepare.file_md5(new / "test_x.npy")

    def refused(folder: Path, split: str, message: str) -> None:
        with pytest.raises(prepare.PreparedDataError) as raised:
            prepare.load_split(folder, split)
        assert message in str(raised.value) and "rerun `soundmood prepare`" in str(raised.value)

    mixed = tmp_path / "mixed"
    shutil.copytree(new, mixed)
    shutil.copy(old / "train_x.npy", mixed / "train_x.npy")  # train from one run, val from another
    refused(mixed, "train", f"{mixed / 'train_x.npy'} is not the array {mixed / 'index.json'}")
    assert prepare.load_split(mixed, "val")[0].shape[0] == len(index["files"]["val"])

    cut = tmp_path / "cut"
    shutil.copytree(new, cut)
    data = (cut / "val_x.npy").read_bytes()
    (cut / "val_x.npy").write_bytes(data[: len(data) // 2])
    refused(cut, "val", f"{cut / 'val_x.npy'} is not the array")

    (cut / "test_y.npy").unlink()
    refused(cut, "test", f"{cut / 'test_y.npy'} is missing")

    described = json.loads((new / "index.json").read_text())
    del described["arrays"]
    (cut / "index.json").write_text(json.dumps(described))
    refused(cut, "train", "describes no arrays (written by an older prepare)")
    (cut / "index.json").unlink()
    refused(cut, "train", f"{cut / 'index.json'} is missing")

    # the train stage is refused before any work, exit 2, naming the file
    trained = soundmood(
        [
            "train",
            f"data.prepared_dir={mixed}",
            f"train.model_dir={tmp_path / 'models'}",
            f"evaluate.reports_dir={tmp_path / 'reports'}",
            f"tune.best_params_path={tmp_path / 'best_params.yaml'}",
        ],
        ROOT,
        env={
            "SOUNDMOOD_WORK_DIR": str(tmp_path / "work"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        },
    )
    assert trained.returncode == 2, trained.stderr[-2000:]
    assert f"error: {mixed / 'train_x.npy'} is not the array" in trained.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "mlflow.db").exists()


# --- register -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(
    tmp_path_factory: pytest.TempPathFactory, prepared_smoke: DictConfig
) -> tuple[Path, Path]:
    """A folder holding what evaluate leaves for register (reports/, mlflow.db with the logged
    served model; made as tests/test_registry.py makes it: a real evaluate of an untrained
    seed_cnn) and a run folder whose params.yaml points register at it. The gate's floors are
    off so that register promotes: its longest path, every alias and tag it can set."""
    import keras
    import mlflow

    from soundmood import evaluate, tracking
    from soundmood.models import build

    base = tmp_path_factory.mktemp("evaluated")
    cfg = prepared_smoke.copy()
    cfg.model = compose_config(["model=seed_cnn"]).model
    cfg.train.model_dir = str(base / "models")
    cfg.evaluate.reports_dir = str(base / "reports")
    cfg.registry.min_class_recall = 0.0
    cfg.registry.min_condition_accuracy = 0.0
    uri = f"sqlite:///{base / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(base)
        keras.utils.set_random_seed(cfg.seed)
        model = build(cfg.model, cfg.data.image_size, len(cfg.data.classes))
        (base / "models").mkdir()
        model.save(base / "models" / "model.keras")
        tracking.setup(cfg)
        with mlflow.start_run() as run:  # what train leaves for evaluate
            mlflow.log_params({"model.name": cfg.model.name, "data.image_size": 64})
        (base / "reports").mkdir()
        (base / "reports" / "train_run.json").write_text(
            json.dumps({"mlflow_run_id": run.info.run_id})
        )
        evaluate.run(cfg)
        mlflow.set_tracking_uri(None)
    # register runs outside any git checkout, so its git tags cannot change between runs
    rundir = tmp_path_factory.mktemp("register-run")
    OmegaConf.save(cfg, rundir / "params.yaml")
    return base, rundir


def registry_state(work: Path) -> dict:
    """Every version of the model (tags, description, source, run) and the aliases, read from
    the store; the promotion time, a clock reading, is the one value that may differ."""
    from mlflow import MlflowClient

    mlflow_client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    models = mlflow_client.search_registered_models()
    if not models:
        return {}
    (model,) = models
    versions = mlflow_client.search_model_versions(f"name='{model.name}'")
    return {
        "description": model.description,
        "aliases": {alias: str(version) for alias, version in model.aliases.items()},
        "versions": {
            str(mv.version): {
                "run_id": mv.run_id,
                "source": mv.source,
                "description": mv.description,
                "tags": {k: "<time>" if k == "promoted_at" else v for k, v in mv.tags.items()},
            }
            for mv in versions
        },
    }


@pytest.mark.slow
def test_register_killed_at_every_step_is_completed_by_the_rerun(
    evaluated: tuple[Path, Path], tmp_path: Path
) -> None:
    base, rundir = evaluated
    work = Path(OmegaConf.load(rundir / "params.yaml").evaluate.reports_dir).parent
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    shutil.copy(base / "mlflow.db", pristine / "mlflow.db")
    shutil.copytree(base / "reports", pristine / "reports")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    report = work / "reports" / "registry.json"

    def reset() -> None:  # what evaluate left: no registered model, no registry report
        shutil.copy(pristine / "mlflow.db", work / "mlflow.db")
        shutil.rmtree(work / "reports")
        shutil.copytree(pristine / "reports", work / "reports")

    reset()
    start = time.perf_counter()
    done = soundmood(["register"], rundir, env)
    run_seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    expected, expected_report = registry_state(work), report.read_bytes()
    assert list(expected["versions"]) == ["1"]
    assert expected["aliases"] == {"champion": "1"}
    assert json.loads(expected_report)["decision"] == "promoted"

    reset()
    log = tmp_path / "steps.json"
    counted = soundmood(["register"], rundir, env, kill_at=0, steps=log, under=work)
    assert counted.returncode == 0, counted.stderr
    assert registry_state(work) == expected and report.read_bytes() == expected_report
    steps = json.loads(log.read_text())
    created = steps.index("mlflow create_model_version")
    assert steps[created + 1] == "mlflow set_registered_model_alias challenger"

    kills = kill_points(steps, work, run_seconds, 3)
    assert len(kills) >= 10
    for what, kill in kills:
        reset()
        killed = soundmood(["register"], rundir, env, steps=log, under=work, **kill)
        if "kill_at" in kill:
            assert killed.returncode == -signal.SIGKILL, (what, killed.stderr)
        state = registry_state(work)
        assert len(state.get("versions", {})) <= 1, what
        # the report is written last and whole: absent, or the finished run's
        assert not report.exists() or report.read_bytes() == expected_report, what
        if kill.get("kill_at") == created + 2:  # the version exists, no alias is set yet
            assert list(state["versions"]) == ["1"] and state["aliases"] == {}, state

        rerun = soundmood(["register"], rundir, env)
        assert rerun.returncode == 0, (what, rerun.stderr)
        assert registry_state(work) == expected, f"rerun after a kill {what}"
        assert report.read_bytes() == expected_report, f"rerun after a kill {what}"
        assert leftovers(work / "reports") == [], what
