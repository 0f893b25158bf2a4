"""The package's shape, checked: import-linter's contracts in pyproject.toml (layers from errors
and io up to the CLI, no cycles between sibling modules) hold and catch a breach; no `soundmood`
import hides inside a function (the CLI's start-up deferrals aside, each with its reason); no
module is over 450 lines."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

SRC = ROOT / "src"
PACKAGE = SRC / "soundmood"
MAX_LINES = 450
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
DEFERRING_MODULE = PACKAGE / "cli.py"  # soundmood --help must not wait for TensorFlow


def _lint_imports(cwd: Path, src: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(
        [str(LINT_IMPORTS), str(cwd / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_import_contracts_hold() -> None:
    result = _lint_imports(ROOT, SRC)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


def test_a_lower_layer_importing_a_higher_one_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(PACKAGE, tmp_path / "src" / "soundmood")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    errors = tmp_path / "src" / "soundmood" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom soundmood import registry  # noqa\n")
    result = _lint_imports(tmp_path, tmp_path / "src")
    assert result.returncode != 0, result.stdout
    assert "soundmood.errors -> soundmood.registry" in result.stdout, result.stdout


def _layered_names() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    return {n.strip() for layer in layers for n in layer.replace("|", ":").split(":")}


def test_every_module_has_a_layer() -> None:
    """A new module must be placed: the contract only checks the modules it names."""
    named = _layered_names()
    unplaced = []
    for path in _modules():
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            continue  # a package's re-exports: its modules are placed one by one
        module = ".".join(parts)
        if not any(module == n or module.startswith(n + ".") for n in named):
            unplaced.append(module)
    assert not unplaced, f"not in any layer of pyproject.toml: {unplaced}"


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every soundmood import inside a function body of `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom):
                names = [inner.module or ""] if inner.level == 0 else ["<relative>"]
            elif isinstance(inner, ast.Import):
                names = [alias.name for alias in inner.names]
            else:
                continue
            found += [
                (inner.lineno, n) for n in names if n.split(".")[0] in {"soundmood", "<relative>"}
            ]
    return found


def _has_reason(lines: list[str], lineno: int) -> bool:
    """A comment on the line above the import, or above the run of imports it belongs to."""
    index = lineno - 2
    while index >= 0 and lines[index].strip().startswith(("from ", "import ")):
        index -= 1
    return index >= 0 and lines[index].strip().startswith("#")


def test_no_soundmood_import_hides_in_a_function() -> None:
    hidden = []
    for path in _modules():
        lines = path.read_text().splitlines()
        for lineno, module in _function_level_imports(path):
            if path == DEFERRING_MODULE and _has_reason(lines, lineno):
                continue
            hidden.append(f"{path.relative_to(ROOT)}:{lineno} imports {module} in a function")
    assert not hidden, "\n".join(hidden)


def test_the_check_finds_a_function_level_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from soundmood import config\n    import json\n")
    assert _function_level_imports(sample) == [(2, "soundmood")]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_the_size_limit(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (limit {MAX_LINES})"
