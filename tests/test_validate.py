"""validate on small copies of the real data tree with one bad input each: the stage exits 2 naming
the offending file and changes nothing that was stored before (data tree, previous report, MLflow
store, Optuna db); duplicates inside a split and near-duplicates across splits are reported, not
errors; with data.on_bad_format=convert the wrong formats are listed and prepare converts them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from soundmood import cli
from soundmood.data import prepare
from soundmood.data.images import load_face
from soundmood.data.layout import list_split
from soundmood.errors import UnsafeFileError

from .conftest import ROOT, smoke_config

CLASSES = ("angry", "happy", "neutral", "sad", "surprised")
PER_SPLIT = {"train": 4, "test": 2}


@pytest.fixture
def work(tmp_path: Path, data_root: Path) -> Path:
    """tmp/data: 4 train and 2 test real images per class; tmp/reports/data_validation.json,
    tmp/mlflow.db and tmp/optuna.db: earlier results that a failed validation must not touch."""
    for split, n in PER_SPLIT.items():
        for klass in CLASSES:
            target = tmp_path / "data" / split / klass
            target.mkdir(parents=True)
            for path in sorted((data_root / split / klass).iterdir())[:n]:
                shutil.copy(path, target / path.name)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "data_validation.json").write_text('{"earlier": "report"}\n')
    for name in ("mlflow.db", "optuna.db"):
        with sqlite3.connect(tmp_path / name) as db:
            db.execute("create table runs (id text, value real)")
            db.execute("insert into runs values ('earlier', 0.5)")
    return tmp_path


def digest(folder: Path) -> dict[str, str]:
    """Every entry under folder: a file's sha256, a link's target (never followed), a pipe or
    device by its kind, so that the digest itself never blocks on a pipe or reads /dev/zero."""
    out = {}
    for p in sorted(folder.rglob("*")):
        mode = p.lstat().st_mode
        rel = p.relative_to(folder).as_posix()
        if stat.S_ISLNK(mode):
            out[rel] = f"link:{os.readlink(p)}"
        elif stat.S_ISREG(mode):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir" if stat.S_ISDIR(mode) else f"special:{stat.S_IFMT(mode)}"
    return out


def validate(
    work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *overrides: str
) -> tuple[int, str]:
    monkeypatch.chdir(ROOT)
    code = cli.main(
        [
            "validate",
            f"data.root={work / 'data'}",
            f"evaluate.reports_dir={work / 'reports'}",
            *overrides,
        ]
    )
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def refused(work: Path, monkeypatch, capsys, *overrides: str, problems: int = 1) -> str:
    """Run validate expecting exit 2 within 2 s; assert nothing stored changed; return what it
    printed."""
    before = digest(work)
    start = time.monotonic()
    code, printed = validate(work, monkeypatch, capsys, *overrides)
    assert time.monotonic() - start < 2, "validate took over 2 s on 30 images"
    assert code == 2, printed
    assert digest(work) == before
    assert f"error: {work / 'data'}: data validation failed, {problems} problem(s):\n" in printed
    return printed


def report(work: Path) -> dict:
    return json.loads((work / "reports" / "data_validation.json").read_text())


def a_real(work: Path, split: str = "train", klass: str = "happy", index: int = 0) -> Path:
    return sorted((work / "data" / split / klass).iterdir())[index]


def test_the_clean_copy_passes(work: Path, monkeypatch, capsys) -> None:
    data_before = digest(work / "data")
    code, printed = validate(work, monkeypatch, capsys)
    assert code == 0, printed
    assert "validate: train 20, test 10 images OK" in printed
    got = report(work)
    assert got["counts"]["train"] == {c: 4 for c in CLASSES}
    assert got["summary"] == {
        "duplicate_groups_within_split": 0,
        "near_duplicate_pairs_across_splits": 0,
        "converted": 0,
    }
    assert digest(work / "data") == data_before


def test_truncated_jpeg(work: Path, monkeypatch, capsys) -> None:
    bad = work / "data" / "train" / "sad" / "truncated.jpg"
    bad.write_bytes(a_real(work, klass="sad").read_bytes()[:700])
    printed = refused(work, monkeypatch, capsys)
    assert f"{bad}: corrupt or truncated image" in printed


def test_text_file_named_jpg(work: Path, monkeypatch, capsys) -> None:
    bad = work / "data" / "test" / "neutral" / "notes.jpg"
    bad.write_text("not a photo\n")
    printed = refused(work, monkeypatch, capsys)
    assert f"{bad}: not a decodable image (no known image format)" in printed


def test_one_pixel_image(work: Path, monkeypatch, capsys) -> None:
    bad = work / "data" / "train" / "angry" / "dot.jpg"
    Image.new("RGB", (1, 1), (200, 150, 120)).save(bad, "JPEG")
    printed = refused(work, monkeypatch, capsys)
    assert f"{bad}: is 1x1 RGB, expected 100x100 RGB" in printed
    assert "data.on_bad_format=convert" in printed  # the hint


def test_one_pixel_image_is_an_error_even_with_convert(work: Path, monkeypatch, capsys) -> None:
    bad = work / "data" / "train" / "angry" / "dot.jpg"
    Image.new("RGB", (1, 1), (200, 150, 120)).save(bad, "JPEG")
    printed = refused(work, monkeypatch, capsys, "data.on_bad_format=convert")
    assert (
        f"{bad}: is 1x1 RGB, expected 100x100 RGB, and a side under "
        "data.convert_min_side (24) leaves no face to convert" in printed
    )


def _cmyk(work: Path, name: str) -> Path:
    path = work / "data" / "train" / "surprised" / name
    with Image.open(a_real(work, klass="surprised")) as img:
        img.convert("CMYK").save(path, "JPEG", quality=95)
    return path


def _png16(work: Path, name: str) -> Path:
    path = work / "data" / "test" / "sad" / name
    with Image.open(a_real(work, "test", "sad")) as img:
        grey = np.asarray(img.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    Image.fromarray(grey).save(path, "PNG")
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    return path


def test_cmyk_jpeg(work: Path, monkeypatch, capsys) -> None:
    bad = _cmyk(work, "cmyk.jpg")
    printed = refused(work, monkeypatch, capsys)
    assert f"{bad}: is 100x100 CMYK, expected 100x100 RGB" in printed


def test_16_bit_png(work: Path, monkeypatch, capsys) -> None:
    bad = _png16(work, "deep.png")
    printed = refused(work, monkeypatch, capsys)
    assert f"{bad}: is 100x100 I;16, expected 100x100 RGB" in printed


def test_unknown_class_folder(work: Path, monkeypatch, capsys) -> None:
    folder = work / "data" / "train" / "fear"
    folder.mkdir()
    shutil.copy(a_real(work), folder / "scared.jpg")
    printed = refused(work, monkeypatch, capsys)
    assert (
        f"{folder}: unknown class folder holding 1 file(s) (expected only angry, happy, "
        "neutral, sad, surprised)" in printed
    )


def test_empty_class(work: Path, monkeypatch, capsys) -> None:
    folder = work / "data" / "test" / "angry"
    for path in folder.iterdir():
        path.unlink()
    printed = refused(work, monkeypatch, capsys)
    assert f"{folder}: class folder is empty" in printed


def test_file_over_the_size_bound(work: Path, monkeypatch, capsys) -> None:
    big = work / "data" / "train" / "happy" / "big.jpg"
    big.write_bytes(a_real(work).read_bytes() + b"\0" * 20_000)  # valid JPEG, padded
    printed = refused(work, monkeypatch, capsys, "data.limits.max_file_bytes=15000")
    assert f"{big}: {big.stat().st_size} bytes, over data.limits.max_file_bytes (15000)" in printed


def test_image_declaring_a_huge_size(work: Path, monkeypatch, capsys) -> None:
    from .test_importer import _png_header

    bomb = work / "data" / "test" / "happy" / "bomb.png"
    bomb.write_bytes(_png_header(3000, 3000))  # 9 Mpx, over data.limits.max_image_pixels (4 M)
    printed = refused(work, monkeypatch, capsys)
    assert (
        f"{bomb}: declares 3000x3000 pixels, over the limit of 4000000 (refused without "
        "decoding)" in printed
    )


def test_byte_identical_across_splits_is_leakage(work: Path, monkeypatch, capsys) -> None:
    original = a_real(work)
    copy = work / "data" / "test" / "happy" / "leaked.jpg"
    shutil.copy(original, copy)
    printed = refused(work, monkeypatch, capsys)
    assert f"same bytes in train and test (leakage): {copy}, {original}" in printed


def test_duplicate_within_a_split_is_reported(work: Path, monkeypatch, capsys) -> None:
    original = a_real(work)
    shutil.copy(original, original.with_name("again.jpg"))
    data_before = digest(work / "data")
    code, printed = validate(work, monkeypatch, capsys)
    assert code == 0, printed
    assert "1 duplicate group(s) within a split" in printed
    assert report(work)["duplicates_within_split"] == [
        ["train/happy/again.jpg", f"train/happy/{original.name}"]
    ]
    assert report(work)["near_duplicates_across_splits"] == []  # identical pairs are not "near"
    assert digest(work / "data") == data_before


def test_near_duplicate_across_splits_is_reported(work: Path, monkeypatch, capsys) -> None:
    original = a_real(work, klass="sad", index=1)
    near = work / "data" / "test" / "sad" / "reencoded.jpg"
    with Image.open(original) as img:
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=60)  # other bytes, same photo
    near.write_bytes(buffer.getvalue())
    code, printed = validate(work, monkeypatch, capsys)
    assert code == 0, printed
    assert "1 near-duplicate train/test pair(s)" in printed
    [pair] = report(work)["near_duplicates_across_splits"]
    assert pair["train"] == f"train/sad/{original.name}"
    assert pair["test"] == "test/sad/reencoded.jpg"
    assert pair["bits"] <= 24


def test_convert_lists_the_wrong_formats_and_prepare_converts_them(
    work: Path, monkeypatch, capsys
) -> None:
    cmyk, deep = _cmyk(work, "cmyk.jpg"), _png16(work, "deep.png")
    grey = work / "data" / "train" / "neutral" / "grey-big.jpg"
    with Image.open(a_real(work, klass="neutral")) as img:
        img.convert("L").resize((128, 128)).save(grey, "JPEG")
    code, printed = validate(work, monkeypatch, capsys, "data.on_bad_format=convert")
    assert code == 0, printed
    assert "3 image(s) to convert" in printed
    assert report(work)["converted"] == [
        {"file": "test/sad/deep.png", "found": "100x100 I;16"},
        {"file": "train/neutral/grey-big.jpg", "found": "128x128 L"},
        {"file": "train/surprised/cmyk.jpg", "found": "100x100 CMYK"},
    ]

    cfg = smoke_config(
        work,
        work / "data",
        ["data.on_bad_format=convert", "data.limit_per_class=null", "data.val_fraction=0.25"],
    )
    monkeypatch.chdir(ROOT)
    index = prepare.run(cfg)
    rows = {}
    for split in ("train", "val", "test"):
        x, _ = prepare.load_split(cfg.data.prepared_dir, split)
        for i, (rel, _) in enumerate(index["files"][split]):
            rows[rel] = x[i]
    for path in (cmyk, deep, grey):
        arr = rows[path.relative_to(work / "data").as_posix()]
        assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8 and 10 < arr.mean() < 245
        assert np.array_equal(arr, load_face(path, 64))
    assert np.array_equal(
        rows[deep.relative_to(work / "data").as_posix()][..., 0],
        rows[deep.relative_to(work / "data").as_posix()][..., 2],
    )  # grey


# --- only regular files are read: links, pipes and devices are named, never followed or opened ---

RELINK = "dvc config cache.type copy && dvc checkout --relink"


def test_link_to_dev_zero_is_refused_unread(work: Path, monkeypatch, capsys) -> None:
    link = work / "data" / "train" / "happy" / "zero.jpg"
    link.symlink_to("/dev/zero")  # followed, it would be read until memory ran out
    printed = refused(work, monkeypatch, capsys)
    assert f"  {link}: is a symbolic link to /dev/zero; links are never followed\n" in printed
    assert (
        "hint: 1 file(s) are symbolic links; validate reads regular files only. If DVC made "
        f"them (cache.type symlink), turn them into copies: {RELINK}" in printed
    )


def test_named_pipe_named_jpg_is_refused_without_blocking(work: Path, monkeypatch, capsys) -> None:
    pipe = work / "data" / "train" / "happy" / "x.jpg"
    os.mkfifo(pipe)  # opened, it would block forever waiting for a writer
    start = time.monotonic()
    result = subprocess.run(  # a subprocess: a hang is a TimeoutExpired, not a stuck test run
        [
            "soundmood",
            "validate",
            f"data.root={work / 'data'}",
            f"evaluate.reports_dir={work / 'reports'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - start < 20  # process start-up included; the refusal is instant
    assert f"  {pipe}: is a named pipe, not a regular file; refused unread\n" in result.stderr
    # in-process too, where the 2 s bound holds without interpreter start-up
    printed = refused(work, monkeypatch, capsys)
    assert f"  {pipe}: is a named pipe, not a regular file; refused unread\n" in printed


def test_device_file_is_refused_unopened(work: Path, monkeypatch, capsys) -> None:
    device = work / "data" / "test" / "sad" / "dev.jpg"
    try:
        os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # a second /dev/zero
    except PermissionError:
        pytest.skip("creating a device node needs root (CAP_MKNOD)")
    printed = refused(work, monkeypatch, capsys)
    assert f"  {device}: is a character device, not a regular file; refused unread\n" in printed


def test_symlinked_class_folder_is_named_and_not_walked(
    work: Path, monkeypatch, capsys, tmp_path_factory
) -> None:
    folder = work / "data" / "train" / "sad"
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "sad"
    shutil.move(folder, elsewhere)  # real images, so followed it would have passed silently
    folder.symlink_to(elsewhere, target_is_directory=True)
    printed = refused(work, monkeypatch, capsys)
    assert (
        f"  {folder}: class folder is a symbolic link to {elsewhere}; links are never followed, "
        "so it was not walked\n" in printed
    )
    assert f"{folder}: class folder is missing" not in printed


def test_symlinked_split_folder_is_named_and_not_walked(
    work: Path, monkeypatch, capsys, tmp_path_factory
) -> None:
    split = work / "data" / "test"
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "test"
    shutil.move(split, elsewhere)
    split.symlink_to(elsewhere, target_is_directory=True)
    printed = refused(work, monkeypatch, capsys)
    assert (
        f"  {split}: split folder is a symbolic link to {elsewhere}; links are never followed, "
        "so it was not walked\n" in printed
    )


def test_dangling_link_is_listed_with_the_other_problems(work: Path, monkeypatch, capsys) -> None:
    dangling = work / "data" / "train" / "happy" / "gone.jpg"
    dangling.symlink_to(work / "nowhere.jpg")
    text = work / "data" / "test" / "angry" / "notes.jpg"
    text.write_text("not a photo\n")
    printed = refused(work, monkeypatch, capsys, problems=2)
    assert (
        f"  {dangling}: is a dangling symbolic link to {work / 'nowhere.jpg'} (the target does "
        "not exist)\n" in printed
    )
    assert f"  {text}: not a decodable image (no known image format)\n" in printed


def test_prepare_listing_names_a_link_instead_of_skipping_it(work: Path) -> None:
    """prepare's list_split takes regular files as before and refuses, naming it, a link it used
    to follow (validate, which runs first, lists every such entry)."""
    root = work / "data"
    assert [s.path.name for s in list_split(root, "test", list(CLASSES))] == [
        p.name for c in CLASSES for p in sorted((root / "test" / c).iterdir())
    ]
    link = root / "test" / "happy" / "linked.jpg"
    link.symlink_to(a_real(work))
    with pytest.raises(UnsafeFileError) as caught:
        list_split(root, "test", list(CLASSES))
    assert f"  {link}: is a symbolic link, not a regular file" in str(caught.value)
