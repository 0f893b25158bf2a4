"""tune stage (placeholder until the Optuna search lands): hands no tuned values to train."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig


def cli(cfg: DictConfig, args: object) -> dict:
    return run(cfg)


def run(cfg: DictConfig) -> dict:
    best = Path(cfg.tune.best_params_path)
    best.parent.mkdir(parents=True, exist_ok=True)
    best.write_text("{}\n")
    Path("optuna.db").touch()
    report = {"enabled": False}
    (Path(cfg.evaluate.reports_dir) / "tune.json").write_text(json.dumps(report) + "\n")
    return report
