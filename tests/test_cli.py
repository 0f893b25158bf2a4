"""`soundmood params` and the stage commands on a copy of the project: a bad override or a broken
params.yaml is one line naming the key or file (exit 2), and a refused call changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from soundmood.cli import _record_timing
from tests.conftest import ROOT


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """conf/, dvc.yaml and the committed params.yaml, copied: `soundmood params` may write."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    return tmp_path


def soundmood(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        ["soundmood", *args], cwd=project, env=env, capture_output=True, text=True, timeout=120
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The refusal: exit 2, nothing on stdout, exactly one `error: ...` line, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model=nonexistent",
            "error: model=nonexistent: config group 'model' has no option 'nonexistent'; "
            "available: mobilenet_v2, seed_cnn",
        ),
        (
            "profile=nonexistent",
            "error: profile=nonexistent: config group 'profile' has no option 'nonexistent'; "
            "available: cpu, gpu, smoke",
        ),
        (
            "train.lrr=1",
            "error: unknown config key 'train.lrr' in override 'train.lrr=1' (keys are listed "
            "in docs/config.md and declared in src/soundmood/schema.py)",
        ),
        (
            "train.lr=[1",
            "error: override 'train.lr=[1' is not valid override syntax: no viable alternative "
            "at input '[1'",
        ),
    ],
)
def test_params_refuses_an_unknown_option_or_key_in_one_line(
    project: Path, override: str, message: str
) -> None:
    before = (project / "params.yaml").read_bytes()
    assert one_error_line(soundmood(project, "params", override)) == message
    assert (project / "params.yaml").read_bytes() == before
    assert sorted(p.name for p in project.iterdir()) == ["conf", "dvc.yaml", "params.yaml"]


def test_params_validates_before_replacing_params_yaml(project: Path) -> None:
    before = (project / "params.yaml").read_bytes()
    line = one_error_line(soundmood(project, "params", "train.lr=-1"))
    # the message a stage gives for the same value, and the file named as left alone
    assert (
        line
        == f"error: train.lr: -1 is not in (0.0, 10.0]; {project / 'params.yaml'} left unchanged"
    )
    assert (project / "params.yaml").read_bytes() == before
    assert sorted(p.name for p in project.iterdir()) == ["conf", "dvc.yaml", "params.yaml"]
    # a valid override still writes, and the result is what `load` accepts
    ok = soundmood(project, "params", "train.lr=0.002")
    assert ok.returncode == 0 and ok.stdout == f"wrote {project / 'params.yaml'}\n", ok.stderr
    assert OmegaConf.load(project / "params.yaml").train.lr == 0.002


@pytest.mark.parametrize("command", [["train"], ["validate"], ["params", "--check"]])
def test_broken_params_yaml_names_the_file_and_line(project: Path, command: list[str]) -> None:
    params = project / "params.yaml"
    text = params.read_text().replace("  lr: ", "  lr: [", 1)  # an unclosed flow list
    params.write_text(text)
    line_no = text.splitlines().index(next(x for x in text.splitlines() if "  lr: [" in x)) + 1
    line = one_error_line(soundmood(project, *command))
    assert line.startswith(f"error: {params}: broken YAML at line {line_no + 1}, column ")
    assert f"from line {line_no}" in line
    assert line.endswith("; regenerate it from conf/ with `soundmood params`")
    assert params.read_text() == text
    # and the advice works
    assert soundmood(project, "params").returncode == 0
    assert soundmood(project, "params", "--check").returncode == 0


def test_stage_timing_is_written_atomically(tmp_path: Path) -> None:
    """reports/timings/<stage>.json is replaced by rename: a hard link into another file (as DVC's
    cache links outputs) is not written through."""
    folder = tmp_path / "reports" / "timings"
    folder.mkdir(parents=True)
    other = tmp_path / "cached.json"
    other.write_text("cache\n")
    os.link(other, folder / "train.json")
    cfg = OmegaConf.create({"evaluate": {"reports_dir": str(tmp_path / "reports")}})
    _record_timing(cfg, "train", 12.34)
    assert other.read_text() == "cache\n"
    written = json.loads((folder / "train.json").read_text())
    assert written["stage"] == "train" and written["seconds"] == 12.3
    assert sorted(p.name for p in folder.iterdir()) == ["train.json"]
