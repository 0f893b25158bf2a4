"""Which RAF-DB release a source holds, and the images it lists: the official basic release
(`EmoLabel/list_patition_label.txt` with `Image/aligned/<stem>_aligned.jpg`) or the Kaggle copy
(`DATASET/{train,test}/{1..7}/<name>.jpg` with `train_labels.csv` and `test_labels.csv`, whose
labels must agree with the folders). select keeps the labels data.rafdb_labels maps to classes.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from omegaconf import DictConfig

from soundmood.data.archive import ArchiveError, Limits, Source, listing, read_text
from soundmood.data.images import IMAGE_SUFFIXES
from soundmood.data.layout import RAFDB_LABEL_NAMES, SPLITS

OFFICIAL_LABEL_FILE = "list_patition_label.txt"  # sic: the official release's spelling
OFFICIAL_LABEL_DIRS = ("EmoLabel", "EmotionLabel")
KAGGLE_IMAGE = re.compile(
    r"^(?P<prefix>(?:.*/)?)(?:DATASET/)?(?P<split>train|test)/(?P<label>\d+)/(?P<name>[^/]+)$"
)
# A Kaggle-layout folder (DATASET, a split, a label): a symlink there is named, not skipped.
KAGGLE_FOLDER = re.compile(r"^(?:.*/)?(?:DATASET|(?:DATASET/)?(?:train|test)(?:/\d+)?)$")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")


@dataclass(frozen=True)
class ImportSettings:
    """What an import follows: data.classes, data.rafdb_labels and data.limits."""

    classes: tuple[str, ...]
    labels: dict[int, str]  # RAF-DB label -> class
    limits: Limits

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ImportSettings:
        data = cfg.data
        return cls(
            tuple(data.classes),
            {int(k): str(v) for k, v in data.rafdb_labels.items()},
            Limits(**{k: int(v) for k, v in data.limits.items()}),
        )


@dataclass(frozen=True)
class Item:
    """One image to import: where it is in the source and where it goes."""

    entry: str  # path inside the source (posix)
    split: str
    raf_label: int
    name: str  # file name in the output tree


def _only(candidates: list[str], what: str, where: str) -> str | None:
    if len(candidates) > 1:
        raise ArchiveError(
            listing(f"{where}: several {what}; import one release at a time", candidates)
        )
    return candidates[0] if candidates else None


def find_official(source: Source) -> str | None:
    """The label list's entry if the source is the official basic release."""
    return _only(
        sorted(
            e
            for e in source.files
            if PurePosixPath(e).name == OFFICIAL_LABEL_FILE
            and PurePosixPath(e).parent.name in OFFICIAL_LABEL_DIRS
        ),
        OFFICIAL_LABEL_FILE,
        source.where,
    )


def official_items(source: Source, label_file: str, limits: Limits) -> tuple[list[Item], list[str]]:
    base = PurePosixPath(label_file).parent.parent
    prefix = "" if str(base) == "." else f"{base}/"
    items, problems = [], []
    for number, line in enumerate(read_text(source, label_file, limits).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        where = f"{source.where}: {label_file} line {number}"
        if len(fields) != 2 or not fields[1].isdigit():
            problems.append(f"{where}: expected '<name>.jpg <label>', got {line.strip()!r}")
            continue
        stem = PurePosixPath(fields[0]).stem
        split = next((s for s in SPLITS if stem.startswith(f"{s}_")), None)
        if split is None or not SAFE_NAME.match(stem):
            problems.append(f"{where}: {fields[0]!r} is not a train_/test_ image name")
            continue
        name = f"{stem}_aligned.jpg"
        items.append(Item(f"{prefix}Image/aligned/{name}", split, int(fields[1]), name))
    return items, problems


def kaggle_items(source: Source, limits: Limits) -> tuple[list[Item], list[str]]:
    found: dict[str, dict[str, tuple[int, str]]] = {s: {} for s in SPLITS}
    prefixes = set()
    for entry in sorted({*source.files, *source.links}):  # a symlink is named, not skipped
        match = KAGGLE_IMAGE.match(entry)
        if match:
            prefixes.add(match["prefix"])
            found[match["split"]][match["name"]] = (int(match["label"]), entry)
    linked = [
        f"{source.where}: {link}: is a symlink to a folder; symlinks are never followed"
        for link in sorted(source.links)
        if KAGGLE_FOLDER.match(link)
    ]
    if len(prefixes) > 1:
        raise ArchiveError(
            listing(
                f"{source.where}: several Kaggle-layout folders; import one release at a time",
                sorted(p or "." for p in prefixes),
            )
        )
    items, problems = [], linked
    for split in SPLITS:
        csv_name = _only(
            sorted(e for e in source.files if PurePosixPath(e).name == f"{split}_labels.csv"),
            f"{split}_labels.csv",
            source.where,
        )
        labels = read_csv_labels(source, csv_name, limits, problems) if csv_name else None
        for name, (folder_label, entry) in sorted(found[split].items()):
            if labels is not None:
                listed = labels.pop(_key(name), None)
                if listed is None:
                    problems.append(f"{source.where}: {entry}: not listed in {csv_name}")
                    continue
                if listed != folder_label:
                    problems.append(
                        f"{source.where}: {entry}: in folder {folder_label} but "
                        f"{csv_name} says {listed}"
                    )
                    continue
            items.append(Item(entry, split, folder_label, name))
        problems += [
            f"{source.where}: {csv_name} lists {key} but {split}/<label>/ has no such image"
            for key in sorted(labels or {})
        ]
    return items, problems


def _key(name: str) -> str:
    """The Kaggle CSVs name an image with or without the `_aligned` of its file name."""
    return PurePosixPath(name).stem.removesuffix("_aligned")


def read_csv_labels(
    source: Source, entry: str, limits: Limits, problems: list[str]
) -> dict[str, int]:
    labels: dict[str, int] = {}
    for number, row in enumerate(csv.reader(io.StringIO(read_text(source, entry, limits))), 1):
        if not row or (number == 1 and not row[-1].strip().isdigit()):
            continue  # a blank line or the header
        if len(row) < 2 or not row[1].strip().isdigit():
            problems.append(
                f"{source.where}: {entry} line {number}: expected 'image,label', got "
                f"{','.join(row)!r}"
            )
            continue
        labels[_key(row[0].strip())] = int(row[1])
    return labels


def detect(source: Source, limits: Limits) -> tuple[str, list[Item], list[str]]:
    """(layout name, items, problems) for whichever layout the source holds."""
    label_file = find_official(source)
    if label_file:
        return ("official RAF-DB basic", *official_items(source, label_file, limits))
    if any(KAGGLE_IMAGE.match(e) for e in (*source.files, *source.links)) or any(
        KAGGLE_FOLDER.match(e) for e in source.links
    ):
        return ("Kaggle copy", *kaggle_items(source, limits))
    raise ArchiveError(
        f"{source.where}: no RAF-DB layout found: expected EmoLabel/{OFFICIAL_LABEL_FILE} with "
        "Image/aligned/ (official basic release) or DATASET/{train,test}/1..7/ with "
        "train_labels.csv and test_labels.csv (Kaggle copy)"
    )


def select(items: list[Item], settings: ImportSettings, where: str) -> tuple[list[Item], list[str]]:
    """Keep the mapped labels; other RAF-DB labels are dropped, labels outside 1..7 are problems."""
    kept, problems, seen = [], [], set()
    for item in items:
        if item.raf_label not in RAFDB_LABEL_NAMES:
            problems.append(
                f"{where}: {item.entry}: label {item.raf_label} is not a RAF-DB basic label (1..7)"
            )
        elif item.raf_label not in settings.labels:
            continue
        elif (
            not SAFE_NAME.match(item.name)
            or PurePosixPath(item.name).suffix.lower() not in IMAGE_SUFFIXES
        ):
            problems.append(f"{where}: {item.entry}: unusable image file name {item.name!r}")
        elif (item.split, item.name) in seen:
            problems.append(f"{where}: {item.entry}: a second {item.split} image named {item.name}")
        else:
            seen.add((item.split, item.name))
            kept.append(item)
    return kept, problems
