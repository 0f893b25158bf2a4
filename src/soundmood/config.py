"""Compose the Hydra config, keep params.yaml in sync with it, and check values before work starts.

conf/ is the source of truth; params.yaml is its composed default, committed, and what DVC tracks.
Every stage reads params.yaml (DVC rewrites it for `dvc exp run -S ...`), optionally overridden
with `key=value` pairs on the command line.
"""

from __future__ import annotations

import difflib
import tempfile
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PARAMS_FILE = "params.yaml"
CONFIG_DIR = "conf"
CONFIG_NAME = "config"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def project_root() -> Path:
    """The directory holding dvc.yaml: the current directory or one of its parents."""
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").exists() and (candidate / CONFIG_DIR).is_dir():
            return candidate
    return here


def compose_to_file(output: Path, overrides: Sequence[str] = (), root: Path | None = None) -> None:
    """Compose conf/ with `overrides` and write it as DVC's Hydra integration does."""
    from dvc.utils.hydra import compose_and_dump

    root = root or project_root()
    compose_and_dump(
        output, str(root / CONFIG_DIR), None, CONFIG_NAME, str(root), list(overrides)
    )


def write_params(overrides: Sequence[str] = (), root: Path | None = None) -> Path:
    """Regenerate params.yaml from conf/ (plus overrides)."""
    root = root or project_root()
    target = root / PARAMS_FILE
    compose_to_file(target, overrides, root)
    return target


def params_diff(root: Path | None = None) -> str:
    """Unified diff between the committed params.yaml and a fresh composition of conf/."""
    root = root or project_root()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / PARAMS_FILE
        compose_to_file(fresh, (), root)
        expected = fresh.read_text().splitlines(keepends=True)
    current_path = root / PARAMS_FILE
    current = current_path.read_text().splitlines(keepends=True) if current_path.exists() else []
    return "".join(
        difflib.unified_diff(current, expected, "params.yaml", "conf/ (composed)")
    )


def load(overrides: Sequence[str] = (), root: Path | None = None) -> DictConfig:
    """Read params.yaml and apply `key=value` overrides; validate the result."""
    root = root or project_root()
    path = root / PARAMS_FILE
    if not path.exists():
        raise ConfigError(f"{path} is missing: run `soundmood params` to compose it from conf/")
    cfg = OmegaConf.load(path)
    # MLproject passes all overrides as one space-separated argument
    overrides = [part for item in overrides for part in item.split()]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, _ = item.split("=", 1)
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise ConfigError(f"unknown config key {key!r} in override {item!r}")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    validate(cfg)
    return cfg


_MISSING = object()


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, object]:
    """Dotted keys to leaf values (lists kept whole), as MLflow params and `dvc exp show` see them."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, object] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


# --- validation: fail before any work, naming the key --------------------------------------------

KNOWN_MODELS = ("mobilenet_v2", "seed_cnn")


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: DictConfig) -> None:
    """Reject values no stage could use, naming the offending key."""
    data, model, train = cfg.data, cfg.model, cfg.train
    _require(model.name in KNOWN_MODELS, "model.name",
             f"unknown model {model.name!r}; known: {', '.join(KNOWN_MODELS)}")
    _require(len(data.classes) >= 2 and len(set(data.classes)) == len(data.classes),
             "data.classes", "needs at least two distinct class names")
    _require(0.0 < data.val_fraction < 0.5, "data.val_fraction", "must be in (0, 0.5)")
    minimum = 32 if model.name == "mobilenet_v2" else 16
    _require(isinstance(data.image_size, int) and minimum <= data.image_size <= 512,
             "data.image_size", f"{data.image_size!r} is not an int in [{minimum}, 512] "
             f"that model {model.name} can take")
    limit = data.limit_per_class
    _require(limit is None or (isinstance(limit, int) and limit >= 4),
             "data.limit_per_class", "must be null or an int >= 4")
    _require(isinstance(train.epochs, int) and train.epochs >= 1, "train.epochs", "must be >= 1")
    _require(isinstance(train.batch_size, int) and train.batch_size >= 1,
             "train.batch_size", "must be >= 1")
    _require(train.lr > 0, "train.lr", f"{train.lr!r} must be > 0")
    _require(train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _require(0 <= train.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
    _require(0 <= model.dropout < 1, "model.dropout", "must be in [0, 1)")
    _require(train.schedule in ("cosine", "constant"), "train.schedule",
             f"{train.schedule!r} is not cosine or constant")
    _require(train.class_weight in ("balanced", "none"), "train.class_weight",
             f"{train.class_weight!r} is not balanced or none")
    _require(train.monitor in ("val_macro_f1", "val_accuracy", "val_loss"), "train.monitor",
             f"{train.monitor!r} is not val_macro_f1, val_accuracy or val_loss")
    _require(train.optimizer in ("adamw", "adam", "sgd"), "train.optimizer",
             f"{train.optimizer!r} is not adamw, adam or sgd")
