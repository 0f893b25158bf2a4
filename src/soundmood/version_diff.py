"""Registered versions as tables: every version (`soundmood models`) and two versions side by side
with deltas (`soundmood models --diff A B`, and `soundmood promote` before it moves the alias).

The figures are the versions' tags, parsed by soundmood.model_card (the card shows the same
numbers); the gate's verdict is computed by soundmood.registry.gate and passed in, so this
module only arranges numbers. A delta is A minus B; `better` says which direction is an improvement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from soundmood.model_card import MISSING, Figures, fmt, signed

HIGHER, LOWER = "higher", "lower"
DELTA_DIGITS = 6  # metrics carry 4 decimals: no float-noise deltas


@dataclass(frozen=True)
class Row:
    section: str  # overall | class | condition | calibration | cost
    name: str
    a: float | None
    b: float | None
    better: str  # HIGHER or LOWER: which direction of the delta is an improvement

    @property
    def delta(self) -> float | None:
        if self.a is None or self.b is None:
            return None
        return round(self.a - self.b, DELTA_DIGITS)


@dataclass(frozen=True)
class Side:
    """One compared version: its number, aliases and figures."""

    version: str
    aliases: list[str]
    figures: Figures

    @property
    def label(self) -> str:
        named = f" ({', '.join(self.aliases)})" if self.aliases else ""
        return f"v{self.version}{named}"


CALIBRATION = ("temperature", "ece", "ece_before_temperature", "nll", "brier")
CONFIDENCE = ("min_confidence", "confident_coverage", "confident_accuracy")
COST = ("model_mb", "latency_ms")
LOWER_IS_BETTER = {"ece", "ece_before_temperature", "nll", "brier", "model_mb", "latency_ms"}


def rows(a: Figures, b: Figures | None) -> list[Row]:
    """Every figure of A beside B's: overall, per class P/R/F1, per condition accuracy,
    calibration and confidence, size and latency. A figure neither version has is left out."""
    empty = Figures({}, {}, [])
    b = b or empty
    out: list[Row] = []

    def add(section: str, name: str, x: float | None, y: float | None, key: str = "") -> None:
        if x is None and y is None:
            return
        better = LOWER if (key or name) in LOWER_IS_BETTER else HIGHER
        if key in ("temperature", "min_confidence"):
            better = ""  # a setting, not a score
        out.append(Row(section, name, x, y, better))

    for key in ("accuracy", "macro_f1", "weighted_f1"):
        add("overall", key, a.get(key), b.get(key), key)
    classes = a.classes + [c for c in b.classes if c not in a.classes]
    for c in classes:
        for stat in ("precision", "recall", "f1"):
            key = f"{c}_{stat}"
            add("class", key, a.get(key), b.get(key), key)
    conditions = list(a.conditions) + [n for n in b.conditions if n not in a.conditions]
    for n in conditions:
        mine, theirs = a.conditions.get(n, {}), b.conditions.get(n, {})
        add("condition", f"{n}_accuracy", mine.get("accuracy"), theirs.get("accuracy"))
    for key in (*CALIBRATION, *CONFIDENCE):
        add("calibration", key, a.get(key), b.get(key), key)
    for key in COST:
        add("cost", key, a.get(key), b.get(key), key)
    return out


def as_json(a: Side, b: Side | None, compared: list[Row], promote: bool, reason: str) -> dict:
    """What `--json` prints: both versions, every row with its delta, and the gate's verdict."""
    return {
        "a": {"version": a.version, "aliases": a.aliases},
        "b": {"version": b.version, "aliases": b.aliases} if b else None,
        "rows": [{**asdict(row), "delta": row.delta} for row in compared],
        "gate": {"promote": promote, "reason": reason},
    }


def _delta_text(row: Row, digits: int) -> str:
    delta = row.delta
    if delta is None:
        return MISSING
    text = signed(delta, digits)
    if delta == 0 or not row.better:
        return text
    improved = (delta > 0) == (row.better == HIGHER)
    return f"[green]{text}[/green]" if improved else f"[red]{text}[/red]"


def diff_table(
    title: str, a: Side, b: Side | None, compared: list[Row], promote: bool, reason: str
) -> Table:
    """A and B side by side with A - B (green: better, red: worse), the gate's verdict below."""
    verdict = "would promote" if promote else "would refuse"
    caption = f"gate of {a.label} against {_label(b)}: {verdict}: {reason}"
    table = Table(title=escape(title), caption=escape(caption))  # a forced reason is anyone's text
    table.add_column("section")
    table.add_column("figure")
    table.add_column(a.label, justify="right")
    table.add_column(_label(b), justify="right")
    table.add_column("Δ (A - B)", justify="right")
    previous = ""
    for row in compared:
        digits = 2 if row.section == "cost" else 4
        table.add_row(
            row.section if row.section != previous else "",
            row.name,
            fmt(row.a, digits),
            fmt(row.b, digits),
            _delta_text(row, digits),
            end_section=False,
        )
        previous = row.section
    return table


def _label(side: Side | None) -> str:
    return side.label if side else "no champion"


# --- every version -------------------------------------------------------------------------------


VERSION_COLUMNS = (
    "version",
    "aliases",
    "created",
    "macro-F1",
    "accuracy",
    "min recall",
    "ECE",
    "model",
    "data md5",
    "commit",
    "gate",
)


def versions_table(title: str, entries: Sequence[dict[str, Any]]) -> Table:
    """One row per version; `entries` as soundmood.registry.commands.version_entry makes them."""
    table = Table(title=title)
    for column in VERSION_COLUMNS:
        table.add_column(column, justify="right" if column == "version" else "left")
    for e in entries:
        table.add_row(
            str(e["version"]),
            ", ".join(e["aliases"]),
            e["created"],
            fmt(e["macro_f1"]),
            fmt(e["accuracy"]),
            fmt(e["min_recall"]),
            fmt(e["ece"]),
            e["model"],
            e["data_md5"][:8],
            e["git_commit"][:8],
            e["gate"],
        )
    return table


def print_table(table: Table) -> None:
    console = Console()
    if not console.is_terminal:  # piped or logged: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)
