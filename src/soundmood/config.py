"""Compose the Hydra config, keep params.yaml in sync with it, and check values before work starts.

conf/ is the source of truth; params.yaml is its composed default, committed, and what DVC tracks.
Every stage reads params.yaml (DVC rewrites it for `dvc exp run -S ...`), optionally overridden
with `key=value` pairs on the command line.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from soundmood import conditions, fileio, schema
from soundmood.errors import ConfigError
from soundmood.schema import ABSENT

PARAMS_FILE = "params.yaml"
CONFIG_DIR = "conf"
CONFIG_NAME = "config"


def project_root() -> Path:
    """The directory holding dvc.yaml: the current directory or one of its parents."""
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").exists() and (candidate / CONFIG_DIR).is_dir():
            return candidate
    return here


def compose_to_file(output: Path, overrides: Sequence[str] = (), root: Path | None = None) -> None:
    """Compose conf/ with `overrides` and write it as DVC's Hydra integration does. A group
    option, key or override Hydra cannot use is a ConfigError naming it (one line, no
    traceback)."""
    from dvc.utils.hydra import compose_and_dump  # dvc is slow to import; only params needs it

    root = root or project_root()
    try:
        compose_and_dump(
            output, str(root / CONFIG_DIR), None, CONFIG_NAME, str(root), list(overrides)
        )
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_composition_error(exc, list(overrides))) from exc


def _composition_error(exc: Exception, overrides: list[str]) -> str:
    """Hydra's reason for refusing `overrides`, in one line that names the group, key or
    override and what would have been accepted."""
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, option = exc.missing_cfg_file.rpartition("/")
        if group and exc.options:
            return (
                f"{group}={option}: config group {group!r} has no option {option!r}; "
                f"available: {', '.join(exc.options)}"
            )
        return f"{exc.missing_cfg_file}: no such config in {CONFIG_DIR}/"
    cause = exc.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        key = str(cause.full_key)
        given = next((o for o in overrides if o.split("=", 1)[0] == key), key)
        return (
            f"unknown config key {key!r} in override {given!r} (keys are listed in "
            "docs/config.md and declared in src/soundmood/schema.py)"
        )
    if isinstance(exc, OverrideParseException):
        parser = OverridesParser.create()
        for item in overrides:
            try:
                parser.parse_override(item)
            except HydraException as one:
                return f"override {item!r} is not valid override syntax: {_lines(one)}"
    return f"cannot compose {CONFIG_DIR}/ with {' '.join(overrides) or 'no overrides'}: " + _lines(
        exc
    )


def _lines(exc: Exception) -> str:
    """An exception's message as one line, without Hydra's link to its grammar page."""
    lines = [line.strip() for line in str(exc).splitlines()]
    return "; ".join(
        line for line in lines if line and not line.startswith(("See https", "Error parsing"))
    )


def write_params(overrides: Sequence[str] = (), root: Path | None = None) -> Path:
    """Regenerate params.yaml from conf/ (plus overrides). The composition is written to a
    temporary file and validated as every stage validates it; only a valid one replaces
    params.yaml (atomically), so a refused call leaves params.yaml as it was."""
    root = root or project_root()
    target = root / PARAMS_FILE
    with fileio.atomic_path(target) as partial:
        compose_to_file(partial, overrides, root)
        try:
            validate(read_params(partial))
        except ConfigError as exc:
            raise ConfigError(f"{exc}; {target} left unchanged") from exc
    return target


def read_params(path: Path) -> DictConfig:
    """params.yaml as a config; broken YAML is a ConfigError naming the file and line."""
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and start and mark and start.line != mark.line:
            problem += f", {context} from line {start.line + 1}"
        raise ConfigError(
            f"{path}: broken YAML{where} ({problem}); regenerate it from conf/ with "
            "`soundmood params`"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text; regenerate it from conf/ with `soundmood params`"
        ) from exc
    if not isinstance(cfg, DictConfig):
        raise ConfigError(
            f"{path}: is not a mapping of config keys; regenerate it from conf/ "
            "with `soundmood params`"
        )
    return cfg


def params_diff(root: Path | None = None) -> str:
    """Unified diff between the committed params.yaml and a fresh composition of conf/."""
    root = root or project_root()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / PARAMS_FILE
        compose_to_file(fresh, (), root)
        expected = fresh.read_text().splitlines(keepends=True)
    current_path = root / PARAMS_FILE
    current = []
    if current_path.exists():
        read_params(current_path)  # a broken file is named with its line, not diffed
        current = current_path.read_text().splitlines(keepends=True)
    return "".join(difflib.unified_diff(current, expected, "params.yaml", "conf/ (composed)"))


def load(overrides: Sequence[str] = (), root: Path | None = None) -> DictConfig:
    """Read params.yaml and apply `key=value` overrides; validate the result."""
    root = root or project_root()
    path = root / PARAMS_FILE
    if not path.exists():
        raise ConfigError(f"{path} is missing: run `soundmood params` to compose it from conf/")
    cfg = read_params(path)
    # MLproject passes all overrides as one space-separated argument
    overrides = [part for item in overrides for part in item.split()]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, _ = item.split("=", 1)
        if (root / CONFIG_DIR / key).is_dir():
            # profile=... or model=... would only overwrite a value here, not compose the group
            raise ConfigError(
                f"override {item!r}: {key} is a config group, which a stage command cannot "
                f"switch; compose it into params.yaml with `soundmood params {item}` (or "
                f"`dvc exp run -S {item}`), then run the stage"
            )
        if OmegaConf.select(cfg, key, default=ABSENT) is ABSENT:
            raise ConfigError(f"unknown config key {key!r} in override {item!r}")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"overrides {' '.join(overrides)}: a value is not valid YAML "
            f"({getattr(exc, 'problem', None) or exc})"
        ) from exc
    validate(cfg)
    return cfg


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, object]:
    """Dotted keys to leaf values (lists and empty mappings kept whole), as MLflow params and
    `dvc exp show` show them."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, object] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


# --- what a result depends on, and dotted-key overlays ------------------------------------------

RESULT_SECTIONS = ("seed", "data", "model", "train")
# Keys of those sections that say where things are or how fast they run, not what is computed.
NOT_AFFECTING_RESULTS = frozenset(
    {
        "data.root",
        "data.prepared_dir",
        "model.weights",  # a path; its bytes are pinned by model.weights_sha256
        "train.model_dir",
        "train.use_tuned",
        "train.threads",
    }
)


def result_inputs(values: DictConfig | Mapping[str, object]) -> dict[str, object]:
    """The flattened values a trained model depends on: RESULT_SECTIONS less the paths and
    thread counts. `values`: a config, or params already flat (an MLflow run's)."""
    flat = flatten(values) if isinstance(values, DictConfig) else dict(values)
    return {
        k: v
        for k, v in flat.items()
        if k.split(".")[0] in RESULT_SECTIONS and k not in NOT_AFFECTING_RESULTS
    }


def digest(values: Mapping[str, object], length: int = 12) -> str:
    """The project's one digest of config values: sha256 of their canonical JSON."""
    blob = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def with_values(cfg: DictConfig, values: Mapping[str, object], where: str = "") -> DictConfig:
    """A copy of `cfg` with dotted keys set to `values`; a key the config does not have is
    refused (naming `where` the values came from), never silently added."""
    out = cfg.copy()
    for key, value in values.items():
        if OmegaConf.select(out, key, default=ABSENT) is ABSENT:
            raise ConfigError(f"{where or 'override'}: {key!r} is not a key of the config")
        OmegaConf.update(out, key, value, merge=False)
    return out


# --- validation: fail before any work, naming the key --------------------------------------------
# Each key's type and range: soundmood.schema. Here: the rules that relate keys to each other.

# Smallest input each architecture takes: Keras's MobileNetV2 needs 32 px; seed_cnn halves the
# input four times.
MIN_IMAGE_SIZE = {"mobilenet_v2": 32, "seed_cnn": 16}
RAFDB_LABELS = tuple(str(k) for k in range(1, 8))  # quoted in conf/ (dotted overrides)


def _cross_key_problems(cfg: DictConfig) -> list[str]:
    """The input size each model needs, the RAF-DB labels naming data.classes, evaluate's
    conditions and train.augment's order rules (each entry checked by soundmood.conditions)."""
    found: list[str] = []
    model, size = OmegaConf.select(cfg, "model.name"), OmegaConf.select(cfg, "data.image_size")
    least = MIN_IMAGE_SIZE.get(model) if isinstance(model, str) else None
    if least and isinstance(size, int) and size < least:
        found.append(
            f"data.image_size: {size!r} is under {least} px, the least model {model} takes"
        )
    classes = OmegaConf.select(cfg, "data.classes")
    labels = OmegaConf.select(cfg, "data.rafdb_labels")
    for label, name in labels.items() if OmegaConf.is_dict(labels) else ():
        if str(label) not in RAFDB_LABELS:
            found.append(f"data.rafdb_labels.{label}: RAF-DB basic labels are '1' to '7'")
        elif OmegaConf.is_list(classes) and name not in list(classes):
            found.append(f"data.rafdb_labels.{label}: {name!r} is not one of data.classes")
    found += conditions.condition_problems(OmegaConf.select(cfg, conditions.CONDITIONS_KEY))
    found += conditions.redetect_problems(OmegaConf.select(cfg, conditions.REDETECT_KEY))
    augment = OmegaConf.select(cfg, conditions.AUGMENT_KEY)
    if OmegaConf.is_dict(augment):
        found += conditions.augment_rule_problems(augment)
    return found


def validate(cfg: DictConfig) -> None:
    """Reject values no stage could use, naming every offending key: every key against
    soundmood.schema, then the rules across keys."""
    found = schema.problems(cfg, schema.config_table(OmegaConf.select(cfg, "model.name")))
    schema.raise_problems(found + _cross_key_problems(cfg))
