"""dvc.yaml's code dependencies are complete and exact: each stage lists every source file its
command runs (its entry module, everything that imports transitively, and the package
`__init__`s Python runs on the way), and no other. tests/test_pipeline.py checks the same in a
scratch clone by editing each file and asking `dvc status`."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import grimp
import yaml

from soundmood.cli import COMMANDS
from tests.conftest import ROOT

PACKAGE = "soundmood"
NOT_STAGE_CODE = {"soundmood.cli"}  # dispatches to the entry module; computes nothing


@cache
def _graph() -> grimp.ImportGraph:
    return grimp.build_graph(PACKAGE)


def _file(module: str) -> str:
    return str(Path(importlib.util.find_spec(module).origin).relative_to(ROOT))


def _runs_code(module: str) -> bool:
    """A package `__init__` that imports nothing is a docstring; any other module is code."""
    return bool(_graph().find_modules_directly_imported_by(module)) or not _file(module).endswith(
        "__init__.py"
    )


def modules_run_by(entry: str) -> set[str]:
    """`entry`, the soundmood modules it imports transitively, and their parent packages."""
    graph, found, todo = _graph(), set(), [entry]
    while todo:
        module = todo.pop()
        if module in found:
            continue
        found.add(module)
        todo += graph.find_upstream_modules(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
    return {m for m in found - NOT_STAGE_CODE if _runs_code(m)}


def stage_code() -> dict[str, set[str]]:
    """stage -> the source files its `soundmood <command>` runs."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    expected = {}
    for name, stage in stages.items():
        command = stage["cmd"].split()[1]
        entry = COMMANDS[command].target.split(":")[0] if command in COMMANDS else None
        assert entry, f"stage {name}: {stage['cmd']!r} is not a soundmood command"
        expected[name] = {_file(m) for m in modules_run_by(entry)}
    return expected


def listed_code() -> dict[str, set[str]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {
        name: {d for d in stage.get("deps", []) if d.startswith("src/")}
        for name, stage in stages.items()
    }


def test_every_stage_depends_on_exactly_the_code_it_runs() -> None:
    listed, expected = listed_code(), stage_code()
    wrong = []
    for stage, files in expected.items():
        if missing := sorted(files - listed[stage]):
            wrong.append(f"{stage}: add {', '.join(missing)}")
        if extra := sorted(listed[stage] - files):
            wrong.append(f"{stage}: remove {', '.join(extra)} (the stage does not run it)")
    assert not wrong, "dvc.yaml deps:\n" + "\n".join(wrong)


def test_the_closure_follows_imports_and_parent_packages() -> None:
    run = modules_run_by("soundmood.evaluate")
    assert {"soundmood.evaluate", "soundmood.forward", "soundmood.fileio"} <= run
    assert "soundmood.cli" not in run and "soundmood.tune" not in run
