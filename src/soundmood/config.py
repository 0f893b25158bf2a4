"""Compose the Hydra config, keep params.yaml in sync with it, and check values before work starts.

conf/ is the source of truth; params.yaml is its composed default, committed, and what DVC tracks.
Every stage reads params.yaml (DVC rewrites it for `dvc exp run -S ...`), optionally overridden
with `key=value` pairs on the command line.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from soundmood import conditions, fileio
from soundmood.errors import ConfigError

MISSING = object()  # OmegaConf.select's default: tells an absent key from a null one
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
            f"docs/config.md; +{key}=... would add a new one)"
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
        if OmegaConf.select(cfg, key, default=MISSING) is MISSING:
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
    """Dotted keys to leaf values (lists kept whole), as MLflow params and `dvc exp show` show
    them."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, object] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
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
        if OmegaConf.select(out, key, default=MISSING) is MISSING:
            raise ConfigError(f"{where or 'override'}: {key!r} is not a key of the config")
        OmegaConf.update(out, key, value, merge=False)
    return out


# --- validation: fail before any work, naming the key --------------------------------------------
# Every key of the data, model and train groups is checked for type and range, all at once, so one
# run lists every bad value. Keys outside these groups are checked by the stage that owns them.

KNOWN_MODELS = ("mobilenet_v2", "seed_cnn")
# Smallest input each architecture takes: Keras's MobileNetV2 needs 32 px; seed_cnn halves the
# input four times.
MIN_IMAGE_SIZE = {"mobilenet_v2": 32, "seed_cnn": 16}
MOBILENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
RAFDB_LABELS = tuple(str(k) for k in range(1, 8))  # quoted in conf/ (dotted overrides)


class _Checker:
    """Collects one message per bad key: `<key>: <value> <what is wrong>`."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg, self.problems = cfg, []

    def value(self, key: str) -> object:
        return OmegaConf.select(self.cfg, key, default=MISSING)

    def fail(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def present(self, key: str) -> object:
        value = self.value(key)
        if value is MISSING:
            self.fail(key, "is missing")
        return value

    def integer(
        self, key: str, low: int | None = None, high: int | None = None, nullable: bool = False
    ) -> None:
        value = self.present(key)
        if value is MISSING or (nullable and value is None):
            return
        if not _is_int(value):
            self.fail(key, f"{value!r} is not an integer{' or null' if nullable else ''}")
        elif (low is not None and value < low) or (high is not None and value > high):
            self.fail(key, f"{value!r} is not in [{low}, {'inf' if high is None else high}]")

    def number(
        self, key: str, low: float, high: float, low_open: bool = False, high_open: bool = False
    ) -> None:
        value = self.present(key)
        if value is MISSING:
            return
        if not (_is_int(value) or isinstance(value, float)) or value != value:
            self.fail(key, f"{value!r} is not a number")
            return
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            self.fail(
                key,
                f"{value!r} is not in {'(' if low_open else '['}{low}, {high}"
                f"{')' if high_open else ']'}",
            )

    def choice(self, key: str, options: tuple[object, ...]) -> None:
        value = self.present(key)
        if value is not MISSING and value not in options:
            self.fail(key, f"{value!r} is not one of {', '.join(map(str, options))}")

    def boolean(self, key: str) -> None:
        value = self.present(key)
        if value is not MISSING and not isinstance(value, bool):
            self.fail(key, f"{value!r} is not true or false")

    def text(self, key: str, nullable: bool = False) -> None:
        value = self.present(key)
        if value is MISSING or (nullable and value in (None, "")):
            return
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"{value!r} is not a non-empty string")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_data(c: _Checker, model_name: object) -> None:
    classes = c.present("data.classes")
    names_ok = (OmegaConf.is_list(classes) or isinstance(classes, list)) and all(
        isinstance(n, str) and n.strip() and "/" not in n and n not in (".", "..") for n in classes
    )
    if classes is not MISSING and not (
        names_ok and len(classes) >= 2 and len(set(classes)) == len(classes)
    ):
        c.fail("data.classes", f"{classes!r} needs at least two distinct folder names")
    c.text("data.root")
    c.text("data.prepared_dir")
    c.integer("data.source_size", 16, 4096)
    c.integer("data.image_size", MIN_IMAGE_SIZE.get(model_name, 16), 512)
    size = c.value("data.image_size")
    if _is_int(size) and model_name in MIN_IMAGE_SIZE and size < MIN_IMAGE_SIZE[model_name]:
        c.problems[-1] += (
            f" (model {model_name} cannot take inputs under {MIN_IMAGE_SIZE[model_name]} px)"
        )
    c.number("data.val_fraction", 0.0, 0.5, low_open=True, high_open=True)
    c.integer("data.limit_per_class", 4, nullable=True)
    c.choice("data.on_bad_format", ("error", "convert"))
    c.integer("data.convert_min_side", 1, 4096)
    c.integer("data.near_duplicate_bits", 0, 256)
    for key in ("max_image_pixels", "max_file_bytes", "max_archive_bytes", "max_archive_files"):
        c.integer(f"data.limits.{key}", 1)
    labels = c.present("data.rafdb_labels")
    if labels is MISSING:
        return
    if not OmegaConf.is_dict(labels):
        c.fail("data.rafdb_labels", f"{labels!r} is not a mapping of RAF-DB label to class")
        return
    for label, name in labels.items():
        if str(label) not in RAFDB_LABELS:
            c.fail(f"data.rafdb_labels.{label}", "RAF-DB basic labels are '1' to '7'")
        elif classes is not MISSING and name not in list(classes):
            c.fail(f"data.rafdb_labels.{label}", f"{name!r} is not one of data.classes")


def _check_model(c: _Checker) -> None:
    name = c.present("model.name")
    if name is not MISSING and name not in KNOWN_MODELS:
        c.fail("model.name", f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    c.number("model.dropout", 0.0, 1.0, high_open=True)
    if name == "mobilenet_v2":
        c.text("model.weights", nullable=True)
        sha = c.value("model.weights_sha256")
        if sha not in (MISSING, None, "") and not re.fullmatch(r"[0-9a-f]{64}", str(sha)):
            c.fail("model.weights_sha256", f"{sha!r} is not a 64-character hex sha256")
        c.choice("model.alpha", MOBILENET_ALPHAS)
        c.number("model.bn_momentum", 0.0, 1.0, low_open=True, high_open=True)
        c.integer("model.frozen_layers", 0)
    elif name == "seed_cnn":
        c.number("model.l2", 0.0, 1.0)


def _check_train(c: _Checker) -> None:
    c.integer("train.epochs", 1, 10_000)
    c.integer("train.batch_size", 1, 65_536)
    c.choice("train.optimizer", ("adamw", "adam", "sgd"))
    c.number("train.lr", 0.0, 10.0, low_open=True)
    c.number("train.weight_decay", 0.0, 1.0, high_open=True)
    c.choice("train.schedule", ("cosine", "constant"))
    c.integer("train.warmup_epochs", 0, 10_000)
    c.number("train.label_smoothing", 0.0, 1.0, high_open=True)
    c.choice("train.class_weight", ("balanced", "sqrt", "none"))
    c.integer("train.early_stopping_patience", 0, 10_000)
    c.choice("train.monitor", ("val_macro_f1", "val_accuracy", "val_loss"))
    c.boolean("train.use_tuned")
    _check_taus(c, "train.logit_adjustment.taus")
    c.choice("train.logit_adjustment.objective", ("macro_f1", "accuracy"))
    c.boolean("train.calibrate")
    c.boolean("train.deterministic")
    c.integer("train.threads", 0, 1024)
    c.boolean("train.augment.flip")
    c.number("train.augment.rotation", 0.0, 0.5)
    _check_zoom(c, "train.augment.zoom")
    c.number("train.augment.translation", 0.0, 1.0, high_open=True)
    for key in ("contrast", "brightness"):
        c.number(f"train.augment.{key}", 0.0, 1.0)
    c.text("train.model_dir")


def _check_taus(c: _Checker, key: str) -> None:
    """A non-empty list of logit-adjustment strengths, each in [-2, 2]."""
    value = c.present(key)
    if value is MISSING:
        return
    taus = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if not taus or not all((_is_int(t) or isinstance(t, float)) and -2.0 <= t <= 2.0 for t in taus):
        c.fail(key, f"{value!r} is not a non-empty list of numbers in [-2, 2]")


def _check_zoom(c: _Checker, key: str) -> None:
    """A zoom strength in [0, 1) (in and out by up to it), or a [low, high] range of
    keras.layers.RandomZoom factors in (-1, 1): negative zooms in, positive zooms out."""
    value = c.value(key)
    if not isinstance(value, Sequence) or isinstance(value, str):
        c.number(key, 0.0, 1.0, high_open=True)
        return
    pair = list(value)
    numbers = len(pair) == 2 and all(_is_int(v) or isinstance(v, float) for v in pair)
    if not (numbers and -1 < pair[0] <= pair[1] < 1):
        c.fail(key, f"{pair!r} is not a number or a [low, high] range with -1 < low <= high < 1")


def _check_robustness(c: _Checker) -> None:
    """Capture-degradation augmentation (train.augment) and evaluate's conditions."""
    checks = [lambda: conditions.check_augment(c.cfg.train.augment)]
    if "evaluate" in c.cfg:
        checks.append(lambda: conditions.check_config(c.cfg))
    for check in checks:
        try:
            check()
        except ConfigError as exc:
            c.problems.append(str(exc))
    if OmegaConf.select(c.cfg, "registry.min_condition_accuracy", default=None) is not None:
        c.number("registry.min_condition_accuracy", 0.0, 1.0)


def validate(cfg: DictConfig) -> None:
    """Reject values no stage could use, naming every offending key (types and ranges of the
    data, model and train groups, and the seed)."""
    c = _Checker(cfg)
    c.integer("seed", 0, 2**32 - 1)
    _check_model(c)
    _check_data(c, c.value("model.name"))
    _check_train(c)
    _check_robustness(c)
    if c.problems:
        raise ConfigError(
            "invalid configuration:\n  " + "\n  ".join(c.problems)
            if len(c.problems) > 1
            else c.problems[0]
        )
