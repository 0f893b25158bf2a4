"""`soundmood predict PATH... [--model URI] [--annotate OUT_DIR] [--json]`.

Each face is judged confident or not at the min_confidence in force (predict.
resolve_min_confidence: inference.min_confidence, else the served model's, else a .keras file's
reports/train.json, else none: every answer confident); a photo's mood combines its confident
faces, and is null with `mood_reason` when none is.

Exit codes: 0 when at least one photo was read (a photo without (confident) faces counts: mood
null), 2 when every file failed to read, no photo was found, the model/config is unusable, or
--annotate would replace or mix with existing files (refused before the model loads).
Unreadable files are named on stderr (and in their JSON line / table row); the batch goes on.
Every case and its message: docs/inference.md, "Errors and what you see".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from soundmood.data.images import IMAGE_SUFFIXES, ImageError
from soundmood.errors import UserError
from soundmood.inference import annotate
from soundmood.inference.detect import load_photo
from soundmood.inference.mood import NO_THRESHOLD
from soundmood.inference.predict import (
    PhotoResult,
    Threshold,
    load_predictor,
    output_count,
    predict_photo,
)
from soundmood.inference.settings import Settings, from_config


def collect_photos(paths: list[str]) -> list[Path]:
    """Files as given (in order) and, for folders, their JPEG/PNG/WebP files recursively, sorted.
    Hidden files (macOS ._ copies and the like) in folders are skipped."""
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found.extend(
                sorted(
                    p
                    for p in item.rglob("*")
                    if p.is_file()
                    and p.suffix.lower() in IMAGE_SUFFIXES
                    and not any(part.startswith(".") for part in p.relative_to(item).parts)
                )
            )
        else:
            found.append(item)  # a missing or undecodable file is reported, not skipped
    return found


def predict_file(
    model: Any,
    path: Path,
    cfg: DictConfig,
    settings: Settings,
    target: Path | None = None,
    min_confidence: float = NO_THRESHOLD,
) -> PhotoResult:
    """One photo's result, its faces judged at `min_confidence`, its annotated copy written to
    `target` (which must not exist; see annotate.plan); an unreadable file gives a result with
    `error` set."""
    try:
        photo = load_photo(path)
    except ImageError as exc:  # missing, a folder, no permission, corrupt: named as such
        return PhotoResult(str(path), error=str(exc))
    result = predict_photo(
        model, photo, cfg, path=str(path), settings=settings, min_confidence=min_confidence
    )
    if target is not None:
        annotate.save(annotate.draw(photo, result, list(cfg.data.classes)), target)
        result.annotated = str(target)
    return result


def predict_cli(cfg: DictConfig, args: argparse.Namespace) -> int:
    settings = from_config(cfg.get("inference"))
    photos = collect_photos(args.paths)
    if not photos:
        raise UserError(f"no photos (JPEG/PNG/WebP) found in {', '.join(args.paths)}")
    if len(photos) > settings.limits.max_files:
        raise UserError(
            f"{len(photos)} photos exceed inference.limits.max_files="
            f"{settings.limits.max_files}; split the batch or raise the limit"
        )
    # refused before the model loads: a copy never replaces a file or lands among the inputs
    targets = (
        annotate.plan(photos, Path(args.annotate), args.paths)
        if args.annotate
        else [None] * len(photos)
    )
    model, threshold = load_predictor(args.model, cfg)
    _check_classes(model, list(cfg.data.classes), args.model)
    results = []
    bar = tqdm(
        photos,
        desc="photos",
        unit="photo",
        disable=None if len(photos) > 1 else True,
        file=sys.stderr,
    )
    for path, target in zip(bar, targets, strict=True):
        result = predict_file(model, path, cfg, settings, target, threshold.value)
        if result.error:
            bar.write(f"error: {result.error}", file=sys.stderr)
        if args.json:
            bar.write(json.dumps(result.to_json()), file=sys.stdout)
        results.append(result)
    if not args.json:
        Console().print(results_table(results, threshold))
    return 0 if any(r.error is None for r in results) else 2


def _check_classes(model: Any, classes: list[str], uri: str) -> None:
    outputs = output_count(model)
    if outputs != len(classes):
        raise UserError(
            f"--model {uri} has {outputs} outputs but data.classes names "
            f"{len(classes)} classes ({', '.join(classes)})"
        )


def results_table(results: list[PhotoResult], threshold: Threshold | None = None) -> Table:
    """The photos as rows; faces under the threshold are marked "(not confident)", and a photo
    without a mood says why."""
    title = "Mood per photo"
    if threshold is not None:
        title += f"\nmin_confidence {threshold.value:.2f} ({threshold.source})"
    table = Table(title=title)
    for name, justify in (
        ("photo", "left"),
        ("faces", "right"),
        ("mood", "left"),
        ("each face: label p (x, y, w, h)", "left"),
        ("ms", "right"),
    ):
        table.add_column(name, justify=justify)
    for r in results:
        if r.error:
            table.add_row(r.path, "", "[red]unreadable[/red]", f"[red]{r.error}[/red]", "")
            continue
        mood = (
            f"{r.mood} {r.mood_probabilities[r.mood]:.2f}"
            if r.mood
            else f"- [yellow]({r.mood_reason})[/yellow]"
        )
        faces = (
            "\n".join(
                f"{f.label} {f.probabilities[f.label]:.2f} {tuple(f.box)}"
                + ("" if f.confident else " (not confident)")
                for f in r.faces
            )
            or "no face found"
        )
        table.add_row(
            r.path, str(len(r.faces)), mood, faces, f"{1000 * sum(r.seconds.values()):.0f}"
        )
    return table
