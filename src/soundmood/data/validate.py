"""validate stage: check the data tree before anything trains on it.

Errors fail the stage (exit 2) with one line per offending file or folder, all of them at once:
a missing split or class folder, an unknown class folder, an empty class, a stray file or folder,
a file that is not an image or does not decode (truncated, corrupt, declaring more pixels than
data.limits.max_image_pixels, larger than data.limits.max_file_bytes), a symbolic link (dangling
or not), a pipe, device or socket where an image should be, an image that is not
source_size x source_size RGB (unless data.on_bad_format is `convert`), and the same bytes in train
and test (leakage). docs/data.md lists every check and its message.
Reported in reports/data_validation.json without failing: byte-identical files inside one split,
train/test pairs whose 256-bit difference hashes differ in at most data.near_duplicate_bits bits,
and (with `convert`) the images prepare will convert. A failed validation writes no report, so the
previous one stays as it was.

Only regular files are read, each through fileio.read_bounded (no link followed, no pipe or device
opened, at most data.limits.max_file_bytes): a link to /dev/zero or a pipe named x.jpg is one
listed problem, not a read that never ends. A symlinked split or class folder is named and not
walked. The data root itself may be a link (data kept on another disk).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from soundmood.data.images import IMAGE_SUFFIXES, ImageError, open_bounded, to_rgb
from soundmood.data.layout import SPLITS
from soundmood.errors import UnsafeFileError
from soundmood.fileio import file_kind, read_bounded, write_json

HASH_SIDE = 16  # difference hash over a 17x16 thumbnail: 256 bits
NEAR_DUPLICATE_CHUNK = 256  # test hashes compared with all train hashes at once (~25 MB)
# DVC with `cache.type symlink` checks data out as links into .dvc/cache, which validate refuses.
RELINK_HINT = "dvc config cache.type copy && dvc checkout --relink"


class DataValidationError(RuntimeError):
    """The data tree has errors; the message lists each with the file it concerns."""


@dataclass(frozen=True)
class Rules:
    """What a valid tree is, from conf/data (defaults are the RAF-DB subset's)."""

    classes: tuple[str, ...]
    size: int
    on_bad_format: str = "error"
    convert_min_side: int = 24
    near_duplicate_bits: int = 24
    max_image_pixels: int = 4_000_000
    max_file_bytes: int = 16 << 20

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Rules:
        data = cfg.data
        return cls(
            tuple(data.classes),
            int(data.source_size),
            str(data.on_bad_format),
            int(data.convert_min_side),
            int(data.near_duplicate_bits),
            int(data.limits.max_image_pixels),
            int(data.limits.max_file_bytes),
        )


@dataclass
class Findings:
    """Everything the walk over the tree found, errors and reportable facts alike."""

    problems: list[str] = field(default_factory=list)
    format_problems: int = 0
    links: int = 0  # symlinked files (DVC's cache.type symlink makes every file one)
    converted: list[dict[str, str]] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    by_md5: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    dhashes: dict[str, list[tuple[str, np.ndarray]]] = field(
        default_factory=lambda: {s: [] for s in SPLITS}
    )


def dhash(img: Image.Image) -> np.ndarray:
    """256-bit difference hash (4 x uint64): where brightness rises between horizontal neighbours
    of a 17x16 greyscale thumbnail. Aligned faces all share one layout, so the 64-bit variant
    calls different people near-duplicates; at 256 bits the close pairs are the same photo."""
    small = img.resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.BOX).convert("L")
    grey = np.frombuffer(small.tobytes(), np.uint8).reshape(HASH_SIDE, HASH_SIDE + 1)
    return np.packbits(grey[:, 1:] > grey[:, :-1]).view(">u8").astype(np.uint64)


def _link_problem(path: Path, what: str = "") -> str:
    """A symlink inside the tree, named with its target; never followed."""
    target = os.readlink(path)
    if not path.exists():  # exists() follows the link: False when its target is gone
        return f"{path}: is a dangling symbolic link to {target} (the target does not exist)"
    subject = f"{what} is" if what else "is"
    return f"{path}: {subject} a symbolic link to {target}; links are never followed"


def _folder_problems(root: Path, classes: tuple[str, ...]) -> list[str]:
    problems = []
    for split in SPLITS:
        split_dir = root / split
        if split_dir.is_symlink():
            problems.append(_link_problem(split_dir, "split folder") + ", so it was not walked")
            continue
        if not split_dir.is_dir():
            problems.append(f"{split_dir}: split folder is missing")
            continue
        entries = sorted(split_dir.iterdir())
        present = {p.name for p in entries if p.is_dir() or p.is_symlink()}
        problems += [
            f"{split_dir / c}: class folder is missing" for c in classes if c not in present
        ]
        for entry in entries:
            if entry.is_symlink():
                what = "class folder" if entry.name in classes else ""
                problems.append(_link_problem(entry, what) + ", so it was not walked")
            elif entry.is_dir() and entry.name not in classes:
                n = sum(1 for p in entry.rglob("*") if p.is_file())
                problems.append(
                    f"{entry}: unknown class folder holding {n} file(s) "
                    f"(expected only {', '.join(classes)})"
                )
            elif not entry.is_dir():
                problems.append(f"{entry}: stray file outside the class folders")
    return problems


def _check_image(
    path: Path, mode: int, split: str, root: Path, rules: Rules, found: Findings
) -> None:
    """`mode` is the entry's lstat mode: anything but a regular file is named, never opened."""
    if stat.S_ISLNK(mode):
        found.links += 1
        found.problems.append(_link_problem(path))
        return
    if not stat.S_ISREG(mode):
        found.problems.append(f"{path}: is {file_kind(mode)}, not a regular file; refused unread")
        return
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        found.problems.append(f"{path}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
        return
    size = path.lstat().st_size
    if size > rules.max_file_bytes:  # never read a huge file whole
        found.problems.append(
            f"{path}: {size} bytes, over data.limits.max_file_bytes ({rules.max_file_bytes})"
        )
        return
    try:  # read_bounded again refuses a file swapped for a link, pipe or larger file since lstat
        data = read_bounded(path, rules.max_file_bytes)
        img = open_bounded(data, rules.max_image_pixels, str(path))
    except (ImageError, UnsafeFileError) as exc:
        found.problems.append(str(exc))
        return
    except FileNotFoundError:
        found.problems.append(f"{path}: disappeared while validate was reading the tree")
        return
    rel = path.relative_to(root).as_posix()
    found.by_md5[hashlib.md5(data).hexdigest()].append(rel)
    if img.mode != "RGB" or img.size != (rules.size, rules.size):
        img = _bad_format(path, rel, img, rules, found)
        if img is None:
            return
    found.dhashes[split].append((rel, dhash(img)))


def _bad_format(
    path: Path, rel: str, img: Image.Image, rules: Rules, found: Findings
) -> Image.Image | None:
    """The converted image when data.on_bad_format allows it, else None (an error is recorded)."""
    what = f"is {img.width}x{img.height} {img.mode}, expected {rules.size}x{rules.size} RGB"
    if rules.on_bad_format != "convert":
        found.problems.append(f"{path}: {what}")
        found.format_problems += 1
        return None
    if min(img.size) < rules.convert_min_side:
        found.problems.append(
            f"{path}: {what}, and a side under data.convert_min_side "
            f"({rules.convert_min_side}) leaves no face to convert"
        )
        return None
    try:
        rgb = to_rgb(img)
    except (ValueError, OSError) as exc:
        found.problems.append(f"{path}: {what}, and it cannot be converted to RGB ({exc})")
        return None
    found.converted.append({"file": rel, "found": f"{img.width}x{img.height} {img.mode}"})
    return rgb


def _walk(root: Path, rules: Rules, found: Findings) -> None:
    for split in SPLITS:
        found.counts[split] = {}
        for name in rules.classes:
            folder = root / split / name
            # a symlinked split or class folder was named by _folder_problems; never walked
            if (root / split).is_symlink() or folder.is_symlink() or not folder.is_dir():
                continue
            # lstat: the entry itself, never what a link points to
            modes = {p: p.lstat().st_mode for p in sorted(folder.iterdir())}
            files = [p for p, mode in modes.items() if not stat.S_ISDIR(mode)]
            found.problems += [
                f"{p}: unexpected folder inside a class folder"
                for p, mode in modes.items()
                if stat.S_ISDIR(mode)
            ]
            for path in tqdm(
                files, desc=f"validate {split}/{name}", unit="img", mininterval=2, leave=False
            ):
                _check_image(path, modes[path], split, root, rules, found)
            found.counts[split][name] = len(files)
            if not files:
                found.problems.append(f"{folder}: class folder is empty")


def _duplicates(found: Findings) -> tuple[list[list[str]], list[list[str]]]:
    """(groups across splits, groups inside one split) of byte-identical files."""
    across, within = [], []
    for paths in found.by_md5.values():
        if len(paths) > 1:
            group = sorted(paths)
            (across if len({p.split("/")[0] for p in group}) > 1 else within).append(group)
    return sorted(across), sorted(within)


def near_duplicates(
    train: list[tuple[str, np.ndarray]],
    test: list[tuple[str, np.ndarray]],
    max_bits: int,
    identical: set[frozenset[str]],
) -> list[dict[str, object]]:
    """Train/test pairs whose hashes differ in at most max_bits bits; every pair is compared,
    vectorised (11k x 3k pairs in about a second)."""
    if not train or not test:
        return []
    train_hashes = np.stack([h for _, h in train])
    pairs = []
    for start in range(0, len(test), NEAR_DUPLICATE_CHUNK):
        chunk = test[start : start + NEAR_DUPLICATE_CHUNK]
        test_hashes = np.stack([h for _, h in chunk])
        distances = np.zeros((len(chunk), len(train)), dtype=np.uint16)
        for word in range(train_hashes.shape[1]):
            distances += np.bitwise_count(test_hashes[:, word, None] ^ train_hashes[None, :, word])
        for i, j in zip(*np.nonzero(distances <= max_bits), strict=True):
            pair = (train[j][0], chunk[i][0])
            if frozenset(pair) not in identical:
                pairs.append({"train": pair[0], "test": pair[1], "bits": int(distances[i, j])})
    return sorted(pairs, key=lambda p: (p["bits"], p["train"], p["test"]))


def validate_tree(root: Path, rules: Rules) -> dict:
    """Inspect the whole tree; return the report, raising DataValidationError on any error."""
    if not root.is_dir():
        raise DataValidationError(
            f"{root}: data folder is missing (run `dvc pull`, or "
            "`soundmood import-rafdb` on a RAF-DB download)"
        )
    found = Findings(problems=_folder_problems(root, rules.classes))
    _walk(root, rules, found)
    across, within = _duplicates(found)
    found.problems += [
        f"same bytes in train and test (leakage): {', '.join(str(root / p) for p in group)}"
        for group in across
    ]
    if found.problems:
        raise DataValidationError(_failure_message(root, found, rules))
    identical = {frozenset(pair) for g in within for pair in _pairs(g)}
    near = near_duplicates(
        found.dhashes["train"], found.dhashes["test"], rules.near_duplicate_bits, identical
    )
    return {
        "root": str(root),
        "image_size": rules.size,
        "on_bad_format": rules.on_bad_format,
        "counts": found.counts,
        "totals": {split: sum(found.counts[split].values()) for split in SPLITS},
        "duplicates_within_split": within,
        "near_duplicate_bits": rules.near_duplicate_bits,
        "near_duplicates_across_splits": near,
        "converted": sorted(found.converted, key=lambda c: c["file"]),
        "summary": {
            "duplicate_groups_within_split": len(within),
            "near_duplicate_pairs_across_splits": len(near),
            "converted": len(found.converted),
        },
    }


def _pairs(group: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for i, a in enumerate(group) for b in group[i + 1 :]]


def _failure_message(root: Path, found: Findings, rules: Rules) -> str:
    lines = [f"{root}: data validation failed, {len(found.problems)} problem(s):"]
    lines += [f"  {p}" for p in found.problems]
    if found.format_problems:
        lines.append(
            f"hint: fix the {found.format_problems} image(s) of the wrong size or colour "
            "mode, or set data.on_bad_format=convert to have prepare convert them"
        )
    if found.links:
        lines.append(
            f"hint: {found.links} file(s) are symbolic links; validate reads regular files only. "
            f"If DVC made them (cache.type symlink), turn them into copies: {RELINK_HINT}"
        )
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict:
    """The `validate` stage: write reports/data_validation.json or fail naming the files."""
    report = validate_tree(Path(cfg.data.root), Rules.from_config(cfg))
    out = write_json(Path(cfg.evaluate.reports_dir) / "data_validation.json", report)
    totals = ", ".join(f"{k} {v}" for k, v in report["totals"].items())
    summary = report["summary"]
    print(
        f"validate: {totals} images OK; {summary['duplicate_groups_within_split']} duplicate "
        f"group(s) within a split, {summary['near_duplicate_pairs_across_splits']} "
        f"near-duplicate train/test pair(s), {summary['converted']} image(s) to convert "
        f"-> {out}"
    )
    return report
