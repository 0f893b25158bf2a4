"""Class-labelled image folders named in conf/: `<path>/<class>/<images>`, with an optional
label map for sets whose folders are named otherwise ({anger: angry, happiness: happy}; a folder
mapped to null is ignored). The one reader of such folders: evaluate's external sets
(evaluate.external) and any extra training source use it.

It checks the conf entries (naming the offending key) and the folder names (a folder that is
neither a class nor mapped is an error naming it and the classes), lists the images per class and
digests the set; decoding is left to the caller, which decides what an unreadable file means.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from soundmood import schema
from soundmood.config import digest
from soundmood.errors import ConfigError
from soundmood.fileio import file_kind, file_md5
from soundmood.schema import Spec

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")  # it becomes part of metric names
ENTRY: dict[str, Spec] = {
    "path": schema.text("the folder holding one sub-folder per class"),
    "detect_faces": schema.flag("detect and align the face first", optional=True),
    "label_map": Spec(
        "mapping", "folder name -> class (null: ignored)", nullable=True, optional=True
    ),
}


@dataclass(frozen=True)
class LabelledFolder:
    """One configured set: `key` is where conf/ names it, for messages."""

    name: str
    path: Path
    detect_faces: bool = False
    label_map: Mapping[str, str | None] = field(default_factory=dict)
    key: str = ""


@dataclass(frozen=True)
class LabelledImages:
    """A set's images in sorted order, with `labels` indexing `classes`. `missing`: classes
    without an image; `refused`: entries that are not regular files (never followed), with why;
    `digest`: of every file's relative path, class and md5."""

    folder: LabelledFolder
    classes: tuple[str, ...]
    paths: list[Path]
    labels: list[int]
    missing: list[str]
    refused: list[tuple[Path, str]]
    digest: str


def _plain(values: Any) -> Any:
    if isinstance(values, DictConfig):
        return OmegaConf.to_container(values, resolve=True)
    return values


def set_problems(mapping: Any, key: str, classes: Sequence[str] | None = None) -> list[str]:
    """Every problem of a mapping of set name -> {path, detect_faces, label_map}, each naming
    `<key>.<name>[.<field>]`; label_map's classes are checked when `classes` is given."""
    mapping = _plain(mapping)
    if mapping is None:
        return []
    if not isinstance(mapping, Mapping):
        return [
            f"{key}: {mapping!r} is not a mapping of set name -> {{path, detect_faces, label_map}}"
        ]
    found: list[str] = []
    for name, entry in mapping.items():
        where = f"{key}.{name}"
        if not NAME_PATTERN.match(str(name)):
            found.append(
                f"{where}: set name {name!r} must match [a-z][a-z0-9_]* (it names metrics)"
            )
            continue
        if not isinstance(entry, Mapping):
            found.append(
                f"{where}: {entry!r} is not a mapping with path (and detect_faces, label_map)"
            )
            continue
        found += schema.problems(entry, ENTRY, f"{where}.")
        label_map = entry.get("label_map")
        for folder, target in (label_map or {}).items() if isinstance(label_map, Mapping) else ():
            if target is None:
                continue
            if not isinstance(target, str) or (classes is not None and target not in classes):
                known = ", ".join(classes) if classes is not None else "a class name"
                found.append(
                    f"{where}.label_map.{folder}: {target!r} is not a class (known: {known}; "
                    "null ignores the folder)"
                )
    return found


def parse_sets(
    mapping: Any, key: str, classes: Sequence[str] | None = None
) -> list[LabelledFolder]:
    """The configured sets, checked first (one ConfigError naming every bad key); null or {}:
    none."""
    schema.raise_problems(set_problems(mapping, key, classes))
    sets = []
    for name, entry in (_plain(mapping) or {}).items():
        sets.append(
            LabelledFolder(
                name=str(name),
                path=Path(entry["path"]),
                detect_faces=bool(entry.get("detect_faces", False)),
                label_map={str(k): v for k, v in (entry.get("label_map") or {}).items()},
                key=f"{key}.{name}",
            )
        )
    return sets


def class_of(folder: LabelledFolder, name: str, classes: Sequence[str]) -> str | None:
    """The class a sub-folder holds: its label_map entry (null: ignored), else its own name."""
    if name in folder.label_map:
        return folder.label_map[name]
    return name if name in classes else ""


def list_images(folder: LabelledFolder, classes: Sequence[str]) -> LabelledImages:
    """Every regular file under `<path>/<class folder>/`, sorted; hidden entries (.DS_Store) and
    files beside the class folders are ignored. A sub-folder that is neither a class nor in
    label_map is a ConfigError naming it and the classes. The folder must exist (the caller
    decides what an absent one means)."""
    classes = tuple(classes)
    if not folder.path.is_dir():
        raise ConfigError(f"{folder.key or folder.name}: {folder.path} is not a folder")
    subfolders = sorted(
        p for p in folder.path.iterdir() if not p.name.startswith(".") and p.is_dir()
    )
    unknown = [p.name for p in subfolders if class_of(folder, p.name, classes) == ""]
    if unknown:
        raise ConfigError(
            f"{folder.key or folder.name}: folder(s) {', '.join(unknown)} under {folder.path} are "
            f"neither a class ({', '.join(classes)}) nor in label_map; rename them or map them "
            "(label_map: {<folder>: <class>}, or null to ignore one)"
        )
    paths: list[Path] = []
    labels: list[int] = []
    refused: list[tuple[Path, str]] = []
    for sub in subfolders:
        target = class_of(folder, sub.name, classes)
        if target is None:
            continue
        for path in sorted(sub.iterdir()):
            if path.name.startswith("."):
                continue
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode):
                paths.append(path)
                labels.append(classes.index(target))
            else:
                refused.append((path, f"is {file_kind(mode)}, not a regular file"))
    present = set(labels)
    missing = [c for i, c in enumerate(classes) if i not in present]
    content = {
        str(p.relative_to(folder.path)): [classes[y], file_md5(p)]
        for p, y in zip(paths, labels, strict=True)
    }
    return LabelledImages(
        folder, classes, paths, labels, missing, refused, digest(content, length=32)
    )
