"""prepare stage: decode every image once into compact uint8 arrays and carve the validation split.

Output (prepared/): <split>_x.npy (N x S x S x 3 uint8), <split>_y.npy (N int64) for train, val and
test, and index.json (the source file and its md5 for every row, classes, sizes, data version).
The same seed and config give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from soundmood.data.images import load_face
from soundmood.data.layout import Sample, data_version, list_split

SPLIT_NAMES = ("train", "val", "test")


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


def file_md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


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


def load_split(
    prepared_dir: str | Path, split: str, mmap: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 NxSxSx3, labels int64) of one prepared split."""
    base = Path(prepared_dir)
    mode = "r" if mmap else None
    return np.load(base / f"{split}_x.npy", mmap_mode=mode), np.load(base / f"{split}_y.npy")


def load_index(prepared_dir: str | Path) -> dict:
    return json.loads((Path(prepared_dir) / "index.json").read_text())


def run(cfg: DictConfig) -> dict:
    """The `prepare` stage."""
    data = cfg.data
    root, classes, out_dir = Path(data.root), list(data.classes), Path(data.prepared_dir)
    train_all = limit_per_class(list_split(root, "train", classes), data.limit_per_class)
    test = limit_per_class(list_split(root, "test", classes), data.limit_per_class)
    train_hashes = [file_md5(s.path) for s in train_all]
    train_idx, val_idx = split_train_val(train_all, train_hashes, data.val_fraction, cfg.seed)
    splits = {
        "train": [train_all[i] for i in train_idx],
        "val": [train_all[i] for i in val_idx],
        "test": test,
    }
    hashes = {
        "train": [train_hashes[i] for i in train_idx],
        "val": [train_hashes[i] for i in val_idx],
        "test": [file_md5(s.path) for s in test],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {
        "classes": classes,
        "image_size": data.image_size,
        "data_version": data_version(),
        "seed": cfg.seed,
        "counts": {},
        "files": {},
    }
    for name in SPLIT_NAMES:
        x = decode_all(splits[name], data.image_size, f"prepare {name}")
        y = np.array([s.label for s in splits[name]], dtype=np.int64)
        np.save(out_dir / f"{name}_x.npy", x)
        np.save(out_dir / f"{name}_y.npy", y)
        index["counts"][name] = {c: int((y == k).sum()) for k, c in enumerate(classes)}
        index["files"][name] = [
            [str(s.path.relative_to(root)), h]
            for s, h in zip(splits[name], hashes[name], strict=True)
        ]
    (out_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    sizes = ", ".join(f"{n} {len(splits[n])}" for n in SPLIT_NAMES)
    print(f"prepare: {sizes} images at {data.image_size}px -> {out_dir}/")
    return index
