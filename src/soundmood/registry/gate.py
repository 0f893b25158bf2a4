"""The promotion gate: may a registered version become champion? Pure functions over what the
registry knows of a version (its tags), so a decision can be re-derived from the registry alone.

gate() runs every rule in RULES and refuses with each failed rule's numbers; a rule is a function
(candidate, champion or None, registry config) -> Check, or None where it does not apply.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from omegaconf import DictConfig

from soundmood import model_card, schema
from soundmood.model_card import RECALL_SUFFIX, ROBUST_PREFIX, Tag
from soundmood.robustness import condition_accuracies

KEY_METRIC = "macro_f1"
EXTERNAL_FLOOR = schema.number("the accuracy an external set needs", 0.0, 1.0)


@dataclass(frozen=True)
class Facts:
    """What the gate knows about a version: its number, test metrics and tags."""

    version: str
    metrics: dict[str, float]
    tags: dict[str, str]

    @classmethod
    def from_tags(cls, version: str | int, tags: dict[str, str]) -> Facts:
        return cls(str(version), model_card.metric_tags(tags), dict(tags))


class Decision(NamedTuple):
    promote: bool
    reason: str


class Check(NamedTuple):
    passed: bool
    message: str


# A rule looks at the candidate, the champion (None when there is none) and the registry config;
# it returns a Check, or None where it does not apply.
Rule = Callable[[Facts, Facts | None, DictConfig], Check | None]


def class_recall_floor(candidate: Facts, champion: Facts | None, rules: DictConfig) -> Check:
    """Every class's test recall >= registry.min_class_recall (a model may not give up a class)."""
    floor = float(rules.min_class_recall)
    recalls = {
        k.removesuffix(RECALL_SUFFIX): v
        for k, v in candidate.metrics.items()
        if k.endswith(RECALL_SUFFIX)
    }
    if not recalls:
        return Check(False, "no per-class test recall recorded (test_<class>_recall tags)")
    low = {name: value for name, value in recalls.items() if value < floor}
    if low:
        listed = ", ".join(f"{name} {value:.4f}" for name, value in sorted(low.items()))
        return Check(False, f"class recall below registry.min_class_recall={floor}: {listed}")
    worst = min(recalls, key=recalls.get)
    return Check(True, f"every class recall >= {floor} (lowest: {worst} {recalls[worst]:.4f})")


def comparable(candidate: Facts, champion: Facts) -> bool:
    return not _test_data_difference(candidate, champion)


def _test_data_difference(candidate: Facts, champion: Facts) -> str:
    mine, theirs = candidate.tags.get(Tag.DATA_MD5), champion.tags.get(Tag.DATA_MD5)
    if not mine or mine != theirs:
        return f"data {mine or 'unknown'} vs {theirs or 'unknown'}"
    # Same data tree, different subset (data.limit_per_class, e.g. the smoke profile's)
    mine, theirs = candidate.tags.get(Tag.TEST_IMAGES), champion.tags.get(Tag.TEST_IMAGES)
    if mine and theirs and mine != theirs:
        return f"{mine} vs {theirs} test images of data {candidate.tags[Tag.DATA_MD5][:8]}"
    return ""


def same_test_data(candidate: Facts, champion: Facts | None, rules: DictConfig) -> Check | None:
    """Test metrics compare only on the same test data: same data md5 (and test image count)."""
    if champion is None:
        return None
    difference = _test_data_difference(candidate, champion)
    if difference:
        return Check(
            False,
            f"candidate and champion v{champion.version} were tested on different "
            f"test data ({difference}): their metrics are not comparable (use "
            "--force --reason to promote anyway)",
        )
    return Check(True, f"same test data ({candidate.tags[Tag.DATA_MD5][:8]})")


def beats_champion(candidate: Facts, champion: Facts | None, rules: DictConfig) -> Check | None:
    """Test macro-F1 above the champion's, by at least registry.min_improvement. A tie never
    displaces the champion."""
    if champion is None:
        return None
    if not comparable(candidate, champion):
        return None  # same_test_data has said why
    mine, theirs = candidate.metrics.get(KEY_METRIC), champion.metrics.get(KEY_METRIC)
    if mine is None:
        return Check(False, f"candidate has no test {KEY_METRIC}")
    if theirs is None:
        return Check(True, f"champion v{champion.version} has no test {KEY_METRIC} to beat")
    needed = float(rules.min_improvement)
    delta = round(mine - theirs, 6)  # metrics carry 4 decimals: no float-noise verdicts
    summary = (
        f"test {KEY_METRIC} {mine:.4f} vs champion v{champion.version} {theirs:.4f} "
        f"({delta:+.4f}; registry.min_improvement={needed})"
    )
    return Check(delta > 0 and delta >= needed, summary)


def condition_floor_failure(robust_metrics: Mapping[str, Any], floor: float) -> str | None:
    """Why a candidate fails registry.min_condition_accuracy, or None when it passes.

    Accepts robustness.json's content or a run's metrics (robust_<condition>_accuracy). A floor
    of 0 (or less) disables the check; with a floor, a model without condition metrics fails.
    """
    if floor is None or floor <= 0:
        return None
    accuracies = condition_accuracies(robust_metrics)
    if not accuracies:
        return (
            f"no per-condition accuracy (robust_<condition>_accuracy) to check against "
            f"registry.min_condition_accuracy {floor:.4f}; evaluate the model again"
        )
    below = sorted((acc, name) for name, acc in accuracies.items() if acc < floor)
    if not below:
        return None
    listing = ", ".join(f"{name} {acc:.4f}" for acc, name in below)
    return (
        f"{len(below)} capture condition(s) below registry.min_condition_accuracy "
        f"{floor:.4f}: {listing} (worst: {below[0][1]})"
    )


def condition_floor(candidate: Facts, champion: Facts | None, rules: DictConfig) -> Check | None:
    """Every capture condition's test accuracy >= registry.min_condition_accuracy (0: off)."""
    floor = float(rules.get("min_condition_accuracy") or 0.0)
    if floor <= 0:
        return None
    robust = {k: v for k, v in candidate.tags.items() if k.startswith(ROBUST_PREFIX)}
    failure = condition_floor_failure(robust, floor)
    if failure:
        return Check(False, failure)
    accuracies = condition_accuracies(robust)
    worst = min(accuracies, key=accuracies.get)
    return Check(
        True,
        f"every capture condition >= registry.min_condition_accuracy={floor} "
        f"(worst: {worst} {accuracies[worst]:.4f})",
    )


def external_floor(candidate: Facts, champion: Facts | None, rules: DictConfig) -> Check | None:
    """Each external set with a floor in registry.min_external_accuracy (set -> accuracy; {}:
    off) scored at least that: a set whose figure is absent (skipped, never scored) fails."""
    floors = rules.get("min_external_accuracy") or {}
    if not floors:
        return None
    for name, floor in floors.items():  # a bad floor is a ConfigError naming it
        EXTERNAL_FLOOR.check(f"registry.min_external_accuracy.{name}", floor)
    scored = model_card.external_accuracies(candidate.tags)
    failed, passed = [], []
    for name, floor in floors.items():
        figure = scored.get(str(name))
        if figure is None:
            failed.append(f"{name}: no external_{name}_accuracy (set skipped or not configured)")
        elif figure < float(floor):
            failed.append(f"{name} {figure:.4f} < {float(floor)}")
        else:
            passed.append(f"{name} {figure:.4f} >= {float(floor)}")
    if failed:
        return Check(
            False, f"external sets under registry.min_external_accuracy: {'; '.join(failed)}"
        )
    return Check(True, f"external sets at their floors ({', '.join(passed)})")


# Evaluated in order, all of them, so a refusal lists every failed rule. A new rule is one more
# function of this shape here.
RULES: tuple[Rule, ...] = (
    class_recall_floor,
    condition_floor,
    external_floor,
    same_test_data,
    beats_champion,
)


def gate(
    candidate: Facts, champion: Facts | None, rules: DictConfig, checks: tuple[Rule, ...] = RULES
) -> Decision:
    """May `candidate` become champion? With no champion, the floors alone decide."""
    if champion is not None and champion.version == candidate.version:
        return Decision(False, f"version {candidate.version} is already the champion")
    results = [check for rule in checks if (check := rule(candidate, champion, rules))]
    failed = [check.message for check in results if not check.passed]
    if failed:
        return Decision(False, "; ".join(failed))
    first = [] if champion else ["no champion yet"]
    return Decision(True, "; ".join(first + [check.message for check in results]))
