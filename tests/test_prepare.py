"""prepare: a stratified, seeded validation split carved from train; the test split untouched."""

from __future__ import annotations

import numpy as np

from soundmood.data.layout import Sample
from soundmood.data.prepare import limit_per_class, load_index, load_split, split_train_val


def _samples(counts: list[int]) -> list[Sample]:
    from pathlib import Path

    return [
        Sample(Path(f"{k}_{i}.jpg"), "train", k) for k, n in enumerate(counts) for i in range(n)
    ]


def test_split_is_stratified_and_seeded() -> None:
    samples = _samples([70, 477, 252, 198, 129])
    hashes = [f"h{i}" for i in range(len(samples))]
    train, val = split_train_val(samples, hashes, 0.15, seed=42)
    assert not set(train) & set(val) and len(train) + len(val) == len(samples)
    val_counts = np.bincount([samples[i].label for i in val])
    assert np.allclose(
        val_counts / len(val),
        [70 / 1126, 477 / 1126, 252 / 1126, 198 / 1126, 129 / 1126],
        atol=0.01,
    )
    assert split_train_val(samples, hashes, 0.15, seed=42) == (train, val)
    assert split_train_val(samples, hashes, 0.15, seed=7)[1] != val


def test_byte_identical_copies_stay_on_one_side() -> None:
    samples = _samples([50, 50])
    hashes = [f"h{i}" for i in range(len(samples))]
    hashes[1] = hashes[0]  # a duplicated image, as the real data has
    train, val = split_train_val(samples, hashes, 0.3, seed=1)
    sides = {0 in train, 1 in train}
    assert sides == {True} or (0 in val) == (1 in val)


def test_limit_per_class_keeps_the_first_n() -> None:
    kept = limit_per_class(_samples([10, 3]), 4)
    assert [s.label for s in kept] == [0, 0, 0, 0, 1, 1, 1]


def test_prepared_splits_are_real_decoded_faces(prepared_smoke) -> None:
    x, y = load_split(prepared_smoke.data.prepared_dir, "train")
    assert x.dtype == np.uint8 and x.shape[1:] == (64, 64, 3) and len(x) == len(y)
    index = load_index(prepared_smoke.data.prepared_dir)
    assert index["counts"]["test"] == {c: 40 for c in index["classes"]}
    assert 20 < x.mean() < 235  # not blank
