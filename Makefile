# The two entry points of the project (see README.md): `make repro` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup repro test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

repro: setup  ## pull RAF-DB from the DVC remote and run the whole pipeline (default profile)
	$(BIN)/dvc pull data.dvc
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro

test: setup  ## the whole test suite, end-to-end smoke pipeline included
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/pytest

test-fast: setup  ## every test but those marked slow (end-to-end runs, kills, installs): a few minutes
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/pytest -m "not slow"

lint: setup  ## style (ruff) and the package's layers (import-linter, pyproject.toml)
	$(BIN)/ruff check src tests benchmarks && $(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports --no-cache

clean:  ## remove pipeline outputs (not the DVC cache, the MLflow store or the Optuna study)
	rm -rf prepared models reports
