"""validate stage: check the data tree before anything trains on it.

Hard problems (a missing or unknown class folder, an empty class, a file that does not decode as
source_size x source_size RGB, the same bytes in train and test) fail the stage with a message
naming every offending file. Duplicates inside one split are only reported.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

from omegaconf import DictConfig
from tqdm import tqdm

from soundmood.data.images import ImageError, open_image
from soundmood.data.layout import SPLITS, list_split


class DataValidationError(RuntimeError):
    """The data tree has hard problems; the message lists each with the file it concerns."""


def _folder_problems(root: Path, classes: list[str]) -> list[str]:
    if not root.is_dir():
        return [f"{root}: data folder is missing (run `dvc pull`)"]
    problems = []
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            problems.append(f"{split_dir}: split folder is missing")
            continue
        present = {p.name for p in split_dir.iterdir() if p.is_dir()}
        problems += [f"{split_dir / c}: class folder is missing" for c in classes if c not in present]
        problems += [
            f"{split_dir / c}: unknown class folder (expected one of {', '.join(classes)})"
            for c in sorted(present - set(classes))
        ]
        problems += [
            f"{split_dir / f.name}: stray file outside the class folders"
            for f in sorted(split_dir.iterdir()) if f.is_file()
        ]
    return problems


def _image_problem(path: Path, size: int) -> str | None:
    try:
        img = open_image(path)
    except ImageError as exc:
        return str(exc)
    if img.mode != "RGB" or img.size != (size, size):
        return f"{path}: is {img.width}x{img.height} {img.mode}, expected {size}x{size} RGB"
    return None


def validate_tree(root: Path, classes: list[str], size: int) -> dict:
    """Inspect the whole tree; return the report, raising DataValidationError on hard problems."""
    problems = _folder_problems(root, classes)
    if problems:
        raise DataValidationError("\n".join(problems))
    counts: dict[str, dict[str, int]] = {}
    by_hash: dict[str, list[Path]] = defaultdict(list)
    for split in SPLITS:
        samples = list_split(root, split, classes)
        counts[split] = {c: 0 for c in classes}
        for sample in tqdm(samples, desc=f"validate {split}", unit="img", mininterval=2):
            counts[split][classes[sample.label]] += 1
            problem = _image_problem(sample.path, size)
            if problem:
                problems.append(problem)
            by_hash[hashlib.md5(sample.path.read_bytes()).hexdigest()].append(sample.path)
        problems += [
            f"{root / split / c}: class folder is empty" for c, n in counts[split].items() if n == 0
        ]
    cross_split, within_split = [], []
    for paths in by_hash.values():
        if len(paths) < 2:
            continue
        rel = sorted(str(p.relative_to(root)) for p in paths)
        splits = {Path(r).parts[0] for r in rel}
        (cross_split if len(splits) > 1 else within_split).append(rel)
    problems += [f"same bytes in train and test (leakage): {', '.join(g)}" for g in cross_split]
    if problems:
        raise DataValidationError("\n".join(problems))
    return {
        "root": str(root),
        "image_size": size,
        "counts": counts,
        "totals": {split: sum(counts[split].values()) for split in SPLITS},
        "duplicates_within_split": sorted(within_split),
    }


def run(cfg: DictConfig) -> dict:
    """The `validate` stage: write reports/data_validation.json or fail naming the files."""
    report = validate_tree(Path(cfg.data.root), list(cfg.data.classes), cfg.data.source_size)
    out = Path(cfg.evaluate.reports_dir) / "data_validation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    totals = ", ".join(f"{k} {v}" for k, v in report["totals"].items())
    print(f"validate: {totals} images OK; "
          f"{len(report['duplicates_within_split'])} duplicate group(s) within a split -> {out}")
    return report
