"""The model card of a registered version: Markdown that MLflow shows on the version's page (its
description) and that the version's run keeps as the artifact model_card.md.

Everything on the card comes from the version's tags (which `register` copies from the reports:
metrics.json as test_<key>, robustness.json as robust_<condition>_<stat>, the temperature from
train) and the gate's decision recorded as tags, so the card is a pure function of what the
registry holds: re-rendering it after a promotion, or after a killed `register`, gives the same
text. Known limits are derived from the figures (the weakest classes and capture conditions),
never written by hand. No MLflow here: soundmood.registry.store reads and writes; this renders.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from soundmood.conditions import DETECTION_STATS, REDETECTED
from soundmood.conditions import SUMMARY_NAMES as NO_CONDITION

METRIC_PREFIX = "test_"  # version tags test_<metric> hold reports/metrics.json
ROBUST_PREFIX = "robust_"  # version tags robust_<condition>_<stat> hold reports/robustness.json
# version tags external_<set>_<stat> hold reports/external.json (soundmood.external)
EXTERNAL_PREFIX = "external_"
EXTERNAL_FILE = "external.json"
EXTERNAL_STATS = ("accuracy", "macro_f1", "detected")  # per set, besides <class>_recall
RECALL_SUFFIX = "_recall"
# Per-condition figures kept as tags (robustness.mlflow_metrics); a suffix that ends another comes
# after it, so robust_x_confident_accuracy is not condition x_confident's accuracy.
CONFIDENT_STATS = ("confident_coverage", "confident_accuracy")
CONDITION_STATS = (*CONFIDENT_STATS, *DETECTION_STATS, "min_recall", "macro_f1", "accuracy", "ece")
SUMMARY_NAMES = (*NO_CONDITION, "seconds")  # robust_worst_accuracy, robust_seconds: no condition
CARD_FILE = "model_card.md"
# MLflow's SQL stores keep a version description in VARCHAR(5000) (PostgreSQL enforces it): a
# longer card is cut at a section boundary there; the artifact always holds all of it.
DESCRIPTION_LIMIT = 5000
MISSING = "—"
LICENCE = (
    "Trained and tested on RAF-DB (Real-world Affective Faces Database), which its authors "
    "license for non-commercial research only. This model is derived from it: use it for "
    "non-commercial research only, and do not redistribute the images."
)


class Tag:
    """Version tag names (one place, so the gate, the tables, the card and the docs agree)."""

    GIT_COMMIT = "git_commit"
    GIT_DIRTY = "git_dirty"
    DATA_MD5 = "data_md5"
    TEST_IMAGES = "n_test_images"
    CONFIG_HASH = "config_hash"
    PROFILE = "profile"
    MODEL_NAME = "model_name"
    RUN_ID = "mlflow_run_id"
    TEMPERATURE = "temperature"  # the softmax temperature train folded into the model
    GATE = "gate_decision"  # promoted | refused | forced
    GATE_REASON = "gate_reason"
    PROMOTED_AT = "promoted_at"
    PROMOTED_BY = "promoted_by"
    PREVIOUS_CHAMPION = "previous_champion"
    PROMOTION_REASON = "promotion_reason"
    FORCED = "promotion_forced"
    ROLLED_BACK_AT = "rolled_back_at"
    ROLLED_BACK_TO = "rolled_back_to"
    RESTORED_AT = "restored_at"


@dataclass(frozen=True)
class Figures:
    """A version's numbers, parsed from its tags: test metrics (metrics.json's keys), capture
    conditions (condition -> stat -> value) and the classes, in the configured order."""

    metrics: dict[str, float]
    conditions: dict[str, dict[str, float]]
    classes: list[str]

    def get(self, key: str) -> float | None:
        return self.metrics.get(key)

    def clean_min_recall(self) -> float | None:
        recalls = [self.metrics[f"{c}{RECALL_SUFFIX}"] for c in self.classes]
        return min(recalls) if recalls else None


def _number(value: str) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def metric_tags(tags: Mapping[str, str]) -> dict[str, float]:
    """test_<key> tags -> {key: value} (non-numeric values are not metrics)."""
    found = {}
    for key, value in tags.items():
        if key.startswith(METRIC_PREFIX) and (number := _number(value)) is not None:
            found[key.removeprefix(METRIC_PREFIX)] = number
    return found


def condition_figures(tags: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """robust_<condition>_<stat> tags -> {condition: {stat: value}}, in tag order."""
    found: dict[str, dict[str, float]] = {}
    for key, value in tags.items():
        if not key.startswith(ROBUST_PREFIX) or (number := _number(value)) is None:
            continue
        rest = key.removeprefix(ROBUST_PREFIX)
        for stat in CONDITION_STATS:
            name = rest.removesuffix(f"_{stat}")
            if name != rest and name and name not in SUMMARY_NAMES:
                found.setdefault(name, {})[stat] = number
                break
    return found


def external_figures(report: Mapping[str, Any]) -> dict[str, float]:
    """external.json's content as flat external_<set>_<stat> figures (the run's metrics, the
    version's tags): accuracy, macro_f1, detected (detect_faces) and <class>_recall of every
    scored set; a skipped set, and a missing class, have none."""
    found: dict[str, float] = {}
    for name, scored in report.get("sets", {}).items():
        if "skipped" in scored:
            continue
        for stat in EXTERNAL_STATS:
            if (number := _number(scored.get(stat))) is not None:
                found[f"{EXTERNAL_PREFIX}{name}_{stat}"] = number
        for cls, value in (scored.get("recall") or {}).items():
            if (number := _number(value)) is not None:
                found[f"{EXTERNAL_PREFIX}{name}_{cls}{RECALL_SUFFIX}"] = number
    return found


def external_accuracies(tags: Mapping[str, Any]) -> dict[str, float]:
    """external_<set>_accuracy tags (or a run's metrics) -> {set: accuracy}."""
    pattern, found = re.compile(rf"^{EXTERNAL_PREFIX}(.+)_accuracy$"), {}
    for key, value in tags.items():
        if (match := pattern.match(key)) and (number := _number(value)) is not None:
            found[match[1]] = number
    return found


def figures(tags: Mapping[str, str], classes: Sequence[str] = ()) -> Figures:
    """The numbers a version's tags hold. `classes`: the configured order; classes the tags name
    that it lacks follow, sorted; configured classes with no recall tag are left out."""
    metrics = metric_tags(tags)
    if Tag.TEMPERATURE in tags and (number := _number(tags[Tag.TEMPERATURE])) is not None:
        metrics.setdefault("temperature", number)
    tagged = {k.removesuffix(RECALL_SUFFIX) for k in metrics if k.endswith(RECALL_SUFFIX)}
    ordered = [c for c in classes if c in tagged] + sorted(tagged - set(classes))
    return Figures(metrics, condition_figures(tags), ordered)


# --- rendering -----------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 4) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def percent(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.1f}%"


def signed(value: float | None, digits: int = 4) -> str:
    return MISSING if value is None else f"{value:+.{digits}f}"


# MLflow's UI draws Markdown tables without cell padding, so 0.7050 0.7050 would read 0.70500.7050:
# every cell but the first starts with two no-break spaces (which Markdown keeps), right-aligned.
GAP = "\u00a0\u00a0"


def table_row(cells: Sequence[str]) -> str:
    """One Markdown table row as the card writes it."""
    return "| " + " | ".join([cells[0], *(f"{GAP}{cell}" for cell in cells[1:])]) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    align = "|---|" + "".join("---:|" for _ in header[1:])
    return "\n".join([table_row(header), align, *(table_row(row) for row in rows)])


def gate_label(tags: Mapping[str, str]) -> str:
    return tags.get(Tag.GATE) or "not yet gated"


def _summary(name: str, version: str, tags: Mapping[str, str], fig: Figures) -> str:
    commit = tags.get(Tag.GIT_COMMIT, "")
    dirty = " **with uncommitted changes**" if tags.get(Tag.GIT_DIRTY) == "true" else ""
    size, latency = fig.get("model_mb"), fig.get("latency_ms")
    profile, config = tags.get(Tag.PROFILE) or MISSING, tags.get(Tag.CONFIG_HASH, MISSING)
    cost = (
        f"ONNX {fmt(size, 1)} MB, {fmt(latency, 1)} ms per face (p50, served forward pass)"
        if size is not None or latency is not None
        else MISSING
    )
    rows = [
        ("Model", f"{tags.get(Tag.MODEL_NAME, MISSING)} (profile {profile})"),
        ("Classes", ", ".join(fig.classes) or MISSING),
        (
            "Test",
            f"accuracy {fmt(fig.get('accuracy'))}, macro-F1 {fmt(fig.get('macro_f1'))} on "
            f"{tags.get(Tag.TEST_IMAGES, MISSING)} images",
        ),
        ("Size, latency", cost),
        ("Data version", f"RAF-DB, data md5 `{tags.get(Tag.DATA_MD5, MISSING)}`"),
        ("Code", f"git `{commit or MISSING}`{dirty}, config hash `{config}`"),
        ("MLflow run", f"`{tags.get(Tag.RUN_ID, MISSING)}`"),
        ("Promotion gate", f"**{gate_label(tags)}**"),
    ]
    return f"# {name} v{version}\n\n" + _table(("", ""), rows)


def _intended_use(fig: Figures) -> str:
    threshold = fig.get("min_confidence")
    confident = (
        f" An answer whose top probability is below min_confidence {fmt(threshold)} is marked "
        "not confident, and a photo's mood uses confident faces only."
        if threshold is not None
        else ""
    )
    return (
        "## Intended use\n\n"
        f"The facial expression of one face ({', '.join(fig.classes) or MISSING}) for SoundMood's "
        "mood-to-music suggestions, in non-commercial research. Input: an encoded face image "
        "(JPEG/PNG/WebP; whole photos with detect_faces); output: a probability per class."
        f"{confident} Not for decisions about people: an expression is not an emotion, and "
        "any other expression is still forced into one of these classes."
    )


def known_limits(fig: Figures, worst: int = 3) -> list[str]:
    """Limits read off the figures: the weakest classes, the capture conditions that cost the
    most accuracy, calibration and coverage. `worst`: how many classes/conditions to name."""
    limits = []
    recalls = {c: fig.metrics[f"{c}{RECALL_SUFFIX}"] for c in fig.classes}
    if recalls:
        weakest = sorted(recalls, key=recalls.get)[: min(worst, len(recalls))]
        listed = ", ".join(f"{c} {recalls[c]:.4f}" for c in weakest)
        limits.append(f"Weakest classes by test recall: {listed}.")
    clean = fig.get("accuracy")
    accuracies = {n: s["accuracy"] for n, s in fig.conditions.items() if "accuracy" in s}
    if accuracies and clean is not None:
        hardest = sorted(accuracies, key=accuracies.get)[: min(worst, len(accuracies))]
        listed = ", ".join(
            f"{n} {accuracies[n]:.4f} ({accuracies[n] - clean:+.4f})" for n in hardest
        )
        limits.append(
            f"Capture conditions that cost the most accuracy (clean {clean:.4f}): {listed}."
        )
    elif not accuracies:
        limits.append("No capture condition was measured: robustness is unknown.")
    path = fig.conditions.get(REDETECTED, {})
    if "detected" in path:
        limits.append(
            f"Through the face detector (test faces re-embedded in pictures and found again), "
            f"{percent(path['detected'])} were found; accuracy {fmt(path.get('accuracy'))} "
            f"counting a face not found as wrong, {fmt(path.get('accuracy_on_detected'))} on "
            "the faces found."
        )
    ece, before = fig.get("ece"), fig.get("ece_before_temperature")
    if ece is not None:
        was = f" (before the temperature: {fmt(before)})" if before is not None else ""
        limits.append(f"Probabilities are off by {fmt(ece)} on average (test ECE){was}.")
    coverage, accuracy = fig.get("confident_coverage"), fig.get("confident_accuracy")
    if coverage is not None:
        limits.append(
            f"Only {percent(coverage)} of test faces get a confident answer (accuracy "
            f"{fmt(accuracy)}); the rest are reported as not confident."
        )
    return limits


def _limits(fig: Figures) -> str:
    return "## Known limits (measured on the test split)\n\n" + "\n".join(
        f"- {line}" for line in known_limits(fig)
    )


def _per_class(fig: Figures) -> str:
    rows = [
        [c, *(fmt(fig.get(f"{c}_{stat}")) for stat in ("precision", "recall", "f1"))]
        for c in fig.classes
    ]
    rows.append(["**macro-F1**", "", "", fmt(fig.get("macro_f1"))])
    rows.append(["**accuracy**", "", "", fmt(fig.get("accuracy"))])
    return "## Test results per class\n\n" + _table(("class", "precision", "recall", "F1"), rows)


def _confident(coverage: float | None, accuracy: float | None) -> str:
    """Coverage and accuracy of the confident answers, e.g. `64.0% at 0.9500`."""
    return MISSING if coverage is None else f"{percent(coverage)} at {fmt(accuracy)}"


def _per_condition(fig: Figures) -> str:
    clean = fig.get("accuracy")
    rows = [
        [
            "clean",
            fmt(clean),
            "",
            fmt(fig.get("macro_f1")),
            fmt(fig.clean_min_recall()),
            fmt(fig.get("ece")),
            _confident(fig.get("confident_coverage"), fig.get("confident_accuracy")),
        ]
    ]
    for name, stats in fig.conditions.items():
        accuracy = stats.get("accuracy")
        drop = None if accuracy is None or clean is None else accuracy - clean
        rows.append(
            [
                name,
                fmt(accuracy),
                signed(drop),
                fmt(stats.get("macro_f1")),
                fmt(stats.get("min_recall")),
                fmt(stats.get("ece")),
                _confident(stats.get("confident_coverage"), stats.get("confident_accuracy")),
            ]
        )
    header = ("condition", "accuracy", "Δ clean", "macro-F1", "min recall", "ECE", "confident")
    return "## Capture conditions (test split)\n\n" + _table(header, rows)


CALIBRATION_ROWS = (
    ("temperature", "temperature (folded into the softmax)"),
    ("ece", "ECE"),
    ("ece_before_temperature", "ECE before the temperature"),
    ("nll", "NLL"),
    ("nll_before_temperature", "NLL before the temperature"),
    ("brier", "Brier score"),
    ("min_confidence", "min_confidence (threshold in force)"),
    ("confident_coverage", "confident coverage (share of test faces)"),
    ("confident_accuracy", "confident accuracy"),
)


def _calibration(fig: Figures) -> str:
    rows = [[label, fmt(fig.get(key))] for key, label in CALIBRATION_ROWS]
    return "## Calibration (test split)\n\n" + _table(("", "value"), rows)


def reason_parts(reason: str) -> list[str]:
    """The gate's reason split into its checks: at "; " outside parentheses (a check's own
    numbers may hold "; ")."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(reason):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and reason.startswith("; ", i):
            parts.append(reason[start:i])
            start = i + 2
    return [*parts, reason[start:]]


def _gate(tags: Mapping[str, str]) -> str:
    reason = tags.get(Tag.GATE_REASON, "")
    if not reason:
        return (
            "## Promotion gate\n\nNot yet gated: `soundmood promote --version N` runs the gate "
            "(its decision and numbers then appear here)."
        )
    checks = "\n".join(f"- {part}" for part in reason_parts(reason))
    previous = tags.get(Tag.PREVIOUS_CHAMPION)
    after = f"\n\nPrevious champion: v{previous}." if previous else ""
    return f"## Promotion gate: {gate_label(tags)}\n\n{checks}{after}"


UNKNOWN_COMMIT = "unknown"  # tracking.git_state's commit outside a git checkout


def reproduce_command(tags: Mapping[str, str]) -> str | None:
    """The command that rebuilds this version: its commit's params.yaml and data.dvc pin the
    config and data, `make repro` pulls the data and runs the pipeline. None: no commit known."""
    commit = tags.get(Tag.GIT_COMMIT, "")
    if not commit or commit == UNKNOWN_COMMIT:
        return None
    return f"git checkout {commit} && make repro"


def _reproduce(tags: Mapping[str, str]) -> str:
    command = reproduce_command(tags)
    if command is None:
        return (
            "## Reproduce\n\nNo git commit is recorded (registered outside a git checkout): "
            "this version cannot be rebuilt from the repository."
        )
    note = (
        "\n\nThe commit had **uncommitted changes** when this version was trained: the command "
        "rebuilds the committed code, which may differ."
        if tags.get(Tag.GIT_DIRTY) == "true"
        else ""
    )
    return (
        "## Reproduce\n\n"
        f"```\n{command}\n```\n\n"
        f"The new version's `config_hash` tag should read `{tags.get(Tag.CONFIG_HASH, MISSING)}` "
        f"and its `data_md5` `{tags.get(Tag.DATA_MD5, MISSING)}`.{note}"
    )


def sections(
    name: str, version: str | int, tags: Mapping[str, str], classes: Sequence[str] = ()
) -> list[str]:
    """The card's sections, in order (render joins them; describe may cut after any)."""
    fig = figures(tags, classes)
    return [
        _summary(name, str(version), tags, fig),
        "## Licence\n\n" + LICENCE,
        _intended_use(fig),
        _limits(fig),
        _per_class(fig),
        _per_condition(fig),
        _calibration(fig),
        _gate(tags),
        _reproduce(tags),
    ]


def render(
    name: str, version: str | int, tags: Mapping[str, str], classes: Sequence[str] = ()
) -> str:
    """The whole card (the artifact model_card.md)."""
    return "\n\n".join(sections(name, version, tags, classes)) + "\n"


def description(
    name: str,
    version: str | int,
    tags: Mapping[str, str],
    classes: Sequence[str] = (),
    limit: int = DESCRIPTION_LIMIT,
) -> str:
    """The card as a version description: whole when it fits `limit`, else the sections that
    fit and a pointer to the artifact."""
    parts = sections(name, version, tags, classes)
    whole = "\n\n".join(parts) + "\n"
    if len(whole) <= limit:
        return whole
    note = f"\n\n_The card is cut here; the whole card is the run's artifact {CARD_FILE}._\n"
    kept: list[str] = []
    for part in parts:
        if len("\n\n".join([*kept, part])) + len(note) > limit:
            break
        kept.append(part)
    return "\n\n".join(kept) + note
