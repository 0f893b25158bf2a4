"""prepare stage: decode every image once into compact uint8 arrays and carve the validation split.

Output (prepared/): <split>_x.npy (N x S x S x 3 uint8), <split>_y.npy (N int64) for train, val and
test, and index.json (the source file and its md5 for every row, classes, sizes, data version, and
the shape, dtype and md5 of every array). The same seed and config give byte-identical files.
The extra training sources of data.extra_train (class-labelled folders, read by
soundmood.data.labelled) are appended to train after the validation split is carved, never to val
or test; index.json counts each source's images.

All or nothing: the new folder is built beside prepared/ and swapped in by renames
(fileio.atomic_folder), so a failure (exit 2), Ctrl-C or kill leaves the previous prepared/ as it
was, and the next run clears what a killed one left. Every stage reads the arrays through
`load_split`, which refuses any array that is not the one index.json describes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from soundmood.data.images import load_face
from soundmood.data.labelled import list_images, parse_sets
from soundmood.data.layout import Sample, data_version, list_split
from soundmood.errors import ConfigError, UserError
from soundmood.fileio import atomic_folder, file_md5

SPLIT_NAMES = ("train", "val", "test")
EXTRA_KEY = "data.extra_train"
INDEX_FILE = "index.json"
RERUN = "rerun `soundmood prepare` (or `dvc repro prepare`)"


class PreparedDataError(UserError):
    """prepared/ is missing, incomplete, or holds arrays index.json does not describe."""


def limit_per_class(samples: list[Sample], limit: int | None) -> list[Sample]:
    """The first `limit` samples of each class (sorted order), or all of them."""
    if limit is None:
        return samples
    kept: dict[int, int] = {}
    out = []
    for sample in samples:
        if kept.get(sample.label, 0) < limit:
            kept[sample.label] = kept.get(sample.label, 0) + 1
            out.append(sample)
    return out


def extra_train(data: DictConfig) -> tuple[list[Sample], list[str], dict[str, dict]]:
    """data.extra_train's images as train samples (each source's data.limit_per_class first),
    their names in index.json (`<source>:<path in its folder>`) and each source's summary. A
    missing folder, an unknown class folder or an entry that is not a regular file is an error
    naming it: a training source must not vanish, in whole or in part, unnoticed."""
    classes = list(data.classes)
    samples: list[Sample] = []
    names: list[str] = []
    summary: dict[str, dict] = {}
    for folder in parse_sets(data.get("extra_train"), EXTRA_KEY, classes):
        if folder.detect_faces:
            raise ConfigError(f"{folder.key}.detect_faces: training sources are face crops")
        images = list_images(folder, classes)  # a missing folder: a ConfigError naming it
        if images.refused:
            path, why = images.refused[0]
            raise ConfigError(f"{folder.key}: {path} {why} ({len(images.refused)} refused)")
        listed = [Sample(p, "train", y) for p, y in zip(images.paths, images.labels, strict=True)]
        kept = limit_per_class(listed, data.limit_per_class)
        samples += kept
        names += [f"{folder.name}:{s.path.relative_to(folder.path)}" for s in kept]
        summary[folder.name] = {
            "path": str(folder.path),
            "images": len(kept),
            "counts": {c: sum(s.label == k for s in kept) for k, c in enumerate(classes)},
            "digest": images.digest,
        }
    return samples, names, summary


def split_train_val(
    samples: list[Sample], hashes: list[str], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Stratified, seeded split of train indices; byte-identical copies stay on the train side."""
    labels = [s.label for s in samples]
    train_idx, val_idx = train_test_split(
        np.arange(len(samples)), test_size=val_fraction, stratify=labels, random_state=seed
    )
    train_hashes = {hashes[i] for i in train_idx}
    moved = [i for i in val_idx if hashes[i] in train_hashes]
    val_idx = [int(i) for i in val_idx if hashes[i] not in train_hashes]
    return sorted([int(i) for i in train_idx] + moved), sorted(val_idx)


def decode_all(samples: list[Sample], size: int, desc: str) -> np.ndarray:
    out = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    for i, sample in enumerate(tqdm(samples, desc=desc, unit="img", mininterval=2)):
        out[i] = load_face(sample.path, size)
    return out


def load_index(prepared_dir: str | Path) -> dict:
    """prepared/index.json, refused (PreparedDataError) when missing, unreadable or written by a
    prepare that did not describe its arrays."""
    path = Path(prepared_dir) / INDEX_FILE
    if not path.is_file():
        raise PreparedDataError(f"{path} is missing: {RERUN}")
    try:
        index = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise PreparedDataError(f"{path} is not readable JSON ({exc}): {RERUN}") from exc
    if not isinstance(index, dict) or not isinstance(index.get("arrays"), dict):
        raise PreparedDataError(
            f"{path} describes no arrays (written by an older prepare): {RERUN}"
        )
    return index


def load_split(
    prepared_dir: str | Path, split: str, mmap: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 NxSxSx3, labels int64) of one prepared split, each array checked against
    index.json (md5, shape, dtype): a cut-off file, or one left by another prepare run, is
    refused with a PreparedDataError naming it, never trained or scored on."""
    base = Path(prepared_dir)
    index = load_index(base)
    return (
        _load_array(base, f"{split}_x.npy", index, mmap),
        _load_array(base, f"{split}_y.npy", index, False),
    )


def _load_array(base: Path, name: str, index: dict, mmap: bool) -> np.ndarray:
    path, described = base / name, index["arrays"].get(name)
    if described is None:
        raise PreparedDataError(f"{path}: not described by {base / INDEX_FILE}: {RERUN}")
    if not path.is_file():
        raise PreparedDataError(f"{path} is missing: {RERUN}")
    digest = file_md5(path)
    if digest != described["md5"]:
        raise PreparedDataError(
            f"{path} is not the array {base / INDEX_FILE} describes (md5 {digest}, expected "
            f"{described['md5']}: cut off, or left by another prepare run): {RERUN}"
        )
    array = np.load(path, mmap_mode="r" if mmap else None)
    if list(array.shape) != described["shape"] or str(array.dtype) != described["dtype"]:
        raise PreparedDataError(
            f"{path} holds {array.dtype} {list(array.shape)}, {base / INDEX_FILE} says "
            f"{described['dtype']} {described['shape']}: {RERUN}"
        )
    return array


def run(cfg: DictConfig) -> dict:
    """The `prepare` stage."""
    data = cfg.data
    root, classes, out_dir = Path(data.root), list(data.classes), Path(data.prepared_dir)
    train_all = limit_per_class(list_split(root, "train", classes), data.limit_per_class)
    test = limit_per_class(list_split(root, "test", classes), data.limit_per_class)
    extra, extra_names, sources = extra_train(data)  # checked before any decoding
    train_hashes = [file_md5(s.path) for s in train_all]
    train_idx, val_idx = split_train_val(train_all, train_hashes, data.val_fraction, cfg.seed)
    splits = {
        "train": [train_all[i] for i in train_idx] + extra,
        "val": [train_all[i] for i in val_idx],
        "test": test,
    }
    hashes = {
        "train": [train_hashes[i] for i in train_idx] + [file_md5(s.path) for s in extra],
        "val": [train_hashes[i] for i in val_idx],
        "test": [file_md5(s.path) for s in test],
    }
    names = {n: [str(s.path.relative_to(root)) for s in splits[n]] for n in ("val", "test")}
    names["train"] = [str(train_all[i].path.relative_to(root)) for i in train_idx] + extra_names
    index = {
        "classes": classes,
        "image_size": data.image_size,
        "data_version": data_version(),
        "seed": cfg.seed,
        "counts": {},
        # images per train source: RAF-DB's, then each data.extra_train folder's
        "train_sources": {"rafdb": len(train_idx)} | {k: v["images"] for k, v in sources.items()},
        "extra_train": sources,
        "files": {},
        "arrays": {},
    }
    # built beside prepared/ and swapped in whole: any failure leaves the old folder untouched
    # (and what a killed run left beside it is removed first)
    with atomic_folder(out_dir) as building:
        for name in SPLIT_NAMES:
            x = decode_all(splits[name], data.image_size, f"prepare {name}")
            y = np.array([s.label for s in splits[name]], dtype=np.int64)
            for suffix, array in (("x", x), ("y", y)):
                path = building / f"{name}_{suffix}.npy"
                np.save(path, array)
                index["arrays"][path.name] = {
                    "shape": list(array.shape),
                    "dtype": str(array.dtype),
                    "md5": file_md5(path),
                }
            index["counts"][name] = {c: int((y == k).sum()) for k, c in enumerate(classes)}
            index["files"][name] = [[n, h] for n, h in zip(names[name], hashes[name], strict=True)]
        (building / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    sizes = ", ".join(f"{n} {len(splits[n])}" for n in SPLIT_NAMES)
    print(f"prepare: {sizes} images at {data.image_size}px -> {out_dir}/")
    return index
