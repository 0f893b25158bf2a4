"""The search space: `tune.space` parsed into `SearchParam`s against the composed config before any
work (every message names the offending key). The search's own settings (tune.*) are
soundmood.schema's, checked with the rest of the config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna
from omegaconf import DictConfig, ListConfig, OmegaConf

from soundmood.config import validate, with_values
from soundmood.errors import ConfigError
from soundmood.schema import ABSENT

FIELDS = {
    "float": {"low", "high", "log", "step"},
    "int": {"low", "high", "log", "step"},
    "categorical": {"choices"},
}
SCALARS = (bool, int, float, str, type(None))
UNTUNABLE_GROUPS = ("data", "tune")  # data.* is fixed by prepare; tune.* configures the search


@dataclass(frozen=True)
class SearchParam:
    """One declared dimension of the search: a composed config key and its distribution."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(
                self.key, self.low, self.high, step=self.step or 1, log=self.log
            )
        return trial.suggest_categorical(self.key, list(self.choices))

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if not self.low <= value <= self.high:
            return False
        if self.step:
            steps = (value - self.low) / self.step
            return math.isclose(steps, round(steps), abs_tol=1e-9)
        return True

    def extremes(self) -> list[Any]:
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.key} in {list(self.choices)}"
        scale = " log" if self.log else ""
        step = f" step {self.step}" if self.step else ""
        return f"{self.key} {self.kind}{scale} [{self.low}, {self.high}]{step}"


def parse_space(cfg: DictConfig) -> list[SearchParam]:
    """Check `tune.space` against the composed config; every error names the offending key."""
    space = cfg.tune.get("space")
    if not space:
        raise ConfigError(
            "tune.space: no parameter declared (set tune.enabled=false to skip tuning)"
        )
    if not isinstance(space, DictConfig):
        raise ConfigError(
            f"tune.space: expected a mapping of config key -> distribution, got {space!r}"
        )
    params = [
        parse_param(cfg, str(key), spec)
        for key, spec in OmegaConf.to_container(space, resolve=True).items()
    ]
    for param in params:
        check_values_accepted(cfg, param)
    return params


def parse_param(cfg: DictConfig, key: str, spec: Any) -> SearchParam:
    where = f"tune.space.{key}"
    if key.split(".")[0] in UNTUNABLE_GROUPS:
        raise ConfigError(
            f"{where}: {key!r} cannot be tuned (data.* is fixed by the prepare "
            f"stage, tune.* configures the search)"
        )
    current = OmegaConf.select(cfg, key, default=ABSENT)
    if current is ABSENT:
        raise ConfigError(f"{where}: {key!r} is not a key of the composed config")
    if isinstance(current, DictConfig | ListConfig):
        raise ConfigError(f"{where}: {key!r} is a group or list, not a single value")
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{where}: expected a mapping such as {{type: float, low: ..., "
            f"high: ...}}, got {spec!r}"
        )
    kind = spec.get("type")
    if kind not in FIELDS:
        raise ConfigError(f"{where}.type: {kind!r} is not float, int or categorical")
    unknown = sorted(set(spec) - FIELDS[kind] - {"type"})
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)} for type {kind} "
            f"(allowed: {', '.join(sorted(FIELDS[kind]))})"
        )
    if kind == "categorical":
        return _parse_categorical(where, key, spec)
    return _parse_numeric(where, key, kind, spec)


def _parse_categorical(where: str, key: str, spec: dict) -> SearchParam:
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}.choices: must be a non-empty list")
    for choice in choices:
        if not isinstance(choice, SCALARS):
            raise ConfigError(
                f"{where}.choices: {choice!r} is not a bool, int, float, string or null"
            )
    if len({(type(c), c) for c in choices}) != len(choices):
        raise ConfigError(f"{where}.choices: {choices} lists a value twice")
    return SearchParam(key, "categorical", choices=tuple(choices))


def _parse_numeric(where: str, key: str, kind: str, spec: dict) -> SearchParam:
    number: tuple[type, ...] = (int,) if kind == "int" else (int, float)
    noun = "int" if kind == "int" else "number"
    what = f"an {noun}" if kind == "int" else f"a {noun}"

    def is_number(value: Any) -> bool:
        return isinstance(value, number) and not isinstance(value, bool)

    low, high, step = spec.get("low"), spec.get("high"), spec.get("step")
    log = spec.get("log", False)
    for name, value in (("low", low), ("high", high)):
        if not is_number(value):
            raise ConfigError(f"{where}.{name}: {value!r} is not {what}")
    if low >= high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log: {log!r} is not true or false")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {low}")
    if step is not None:
        if not is_number(step) or step <= 0:
            raise ConfigError(f"{where}.step: {step!r} is not a positive {noun}")
        if log and (kind == "float" or step != 1):
            raise ConfigError(f"{where}: log and step cannot be combined")
    if kind == "float":
        return SearchParam(
            key, kind, float(low), float(high), log, float(step) if step is not None else None
        )
    return SearchParam(key, kind, low, high, log, step)


def check_values_accepted(cfg: DictConfig, param: SearchParam) -> None:
    """The range's ends (or every choice) must pass the pipeline's own config validation."""
    for value in param.extremes():
        try:
            validate(with_values(cfg, {param.key: value}))
        except ConfigError as exc:
            raise ConfigError(
                f"tune.space.{param.key}: {value!r} is a value the pipeline rejects ({exc})"
            ) from exc


def configured_values(cfg: DictConfig, params: list[SearchParam]) -> dict[str, Any]:
    """The composed config's own value of every tuned key: what the baseline trial measures."""
    return {p.key: OmegaConf.select(cfg, p.key) for p in params}
