"""import-rafdb on small real downloads (real RAF-DB JPEGs) in both layouts, folder and zip, and
the refusals that keep an untrusted archive from writing anywhere: zip-slip, symlinks, zip bombs
and image headers declaring huge sizes. A refusal exits 2, names the entry and leaves --out as it
was (byte for byte)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
import subprocess
import time
import zipfile
import zlib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from soundmood import cli

from .conftest import ROOT

# Our classes and the RAF-DB basic label each comes from (conf/data/rafdb.yaml).
LABEL_OF = {"surprised": 1, "happy": 4, "sad": 5, "angry": 6, "neutral": 7}
PER_CLASS = {"train": 2, "test": 1}


def _real_images(data_root: Path) -> dict[tuple[str, str], list[Path]]:
    """A few real JPEGs of every class and split."""
    return {
        (split, c): sorted((data_root / split / c).iterdir())[:n]
        for split, n in PER_CLASS.items()
        for c in LABEL_OF
    }


def _dropped_extras(data_root: Path) -> list[tuple[str, str, int, Path]]:
    """Fear (2) and disgust (3) images: real JPEG bytes under names of their own."""
    happy = sorted((data_root / "train" / "happy").iterdir())
    return [
        ("train", "train_90001", 2, happy[10]),
        ("train", "train_90002", 3, happy[11]),
        ("test", "test_9001", 3, happy[12]),
    ]


def official_tree(base: Path, data_root: Path) -> Path:
    """The official basic release: EmoLabel/list_patition_label.txt and Image/aligned/."""
    root = base / "basic"
    (root / "Image" / "aligned").mkdir(parents=True)
    (root / "EmoLabel").mkdir()
    lines = []
    for (_, klass), paths in _real_images(data_root).items():
        for path in paths:
            stem = path.name.removesuffix("_aligned.jpg")
            lines.append(f"{stem}.jpg {LABEL_OF[klass]}")
            shutil.copy(path, root / "Image" / "aligned" / path.name)
    for _, stem, label, path in _dropped_extras(data_root):
        lines.append(f"{stem}.jpg {label}")
        shutil.copy(path, root / "Image" / "aligned" / f"{stem}_aligned.jpg")
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(sorted(lines)) + "\n")
    return root


def kaggle_tree(base: Path, data_root: Path) -> Path:
    """The Kaggle copy: DATASET/{train,test}/{1..7}/ and {train,test}_labels.csv."""
    root = base / "kaggle"
    rows: dict[str, list[str]] = {"train": [], "test": []}
    entries = [
        (split, LABEL_OF[klass], path.name, path)
        for (split, klass), paths in _real_images(data_root).items()
        for path in paths
    ]
    entries += [
        (split, label, f"{stem}_aligned.jpg", path)
        for split, stem, label, path in _dropped_extras(data_root)
    ]
    for split, label, name, path in entries:
        folder = root / "DATASET" / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / name)
        rows[split].append(f"{name},{label}")
    for split, lines in rows.items():
        (root / f"{split}_labels.csv").write_text("image,label\n" + "\n".join(lines) + "\n")
    return root


def zip_folder(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, path.relative_to(folder.parent).as_posix())
    return target


def tree_digest(folder: Path) -> dict[str, str]:
    """Every entry under folder (relative path -> sha256), symlinks as their target, pipes and
    devices by their kind (never opened)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            out[rel] = "link:" + str(path.readlink())
        elif stat.S_ISREG(mode):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir" if stat.S_ISDIR(mode) else f"special:{stat.S_IFMT(mode)}"
    return out


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project root (dvc.yaml, conf/, params.yaml) whose data.limits are small enough to build
    bombs in a test: 1 MiB per file, 2 MiB per archive, 1000 files, 1 Mpx per image."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "conf").symlink_to(ROOT / "conf")
    params = OmegaConf.load(ROOT / "params.yaml")
    params.data.limits = {
        "max_image_pixels": 1_000_000,
        "max_file_bytes": 1 << 20,
        "max_archive_bytes": 2 << 20,
        "max_archive_files": 1000,
    }
    OmegaConf.save(params, root / "params.yaml")
    return root


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """A pre-existing 5-class tree that every refused import must leave byte-identical."""
    folder = tmp_path / "out"
    for split in ("train", "test"):
        for klass in LABEL_OF:
            (folder / split / klass).mkdir(parents=True)
            (folder / split / klass / "keep.jpg").write_bytes(f"{split}/{klass}".encode())
    return folder


def import_main(
    project: Path,
    source: Path,
    out: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> tuple[int, str, str]:
    monkeypatch.chdir(project)
    code = cli.main(["import-rafdb", str(source), "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_imported(out: Path, printed: str) -> None:
    for split, n in PER_CLASS.items():
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(LABEL_OF)
        for klass in LABEL_OF:
            files = sorted((out / split / klass).iterdir())
            assert len(files) == n, (split, klass)
            assert all(f.name.endswith("_aligned.jpg") for f in files)
    names = {p.name for p in out.rglob("*.jpg")}
    assert not names & {
        "train_90001_aligned.jpg",
        "train_90002_aligned.jpg",
        "test_9001_aligned.jpg",
    }  # fear and disgust dropped
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line}
    assert rows["train"] == ["2"] * 5 + ["10"] and rows["test"] == ["1"] * 5 + ["5"]
    assert "dropped from train (not among data.classes): disgust 1, fear 1" in printed
    assert "dropped from test (not among data.classes): disgust 1" in printed
    assert not list(out.parent.glob(".partial-*"))  # no staging left behind


def test_official_folder_via_the_console_script(tmp_path: Path, data_root: Path) -> None:
    source = official_tree(tmp_path / "download", data_root)
    target = tmp_path / "imported"
    result = subprocess.run(
        ["soundmood", "import-rafdb", str(source), "--out", str(target)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "official RAF-DB basic layout" in result.stdout
    assert_imported(target, result.stdout)
    # byte for byte: a genuine download reproduces the DVC-tracked tree
    for path in target.rglob("*.jpg"):
        assert path.read_bytes() == (data_root / path.relative_to(target)).read_bytes()


@pytest.mark.parametrize("layout", ["official", "kaggle"])
@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_import_layouts(
    layout: str,
    as_zip: bool,
    tmp_path: Path,
    data_root: Path,
    project: Path,
    out: Path,
    monkeypatch,
    capsys,
) -> None:
    build = official_tree if layout == "official" else kaggle_tree
    source = build(tmp_path / "download", data_root)
    if as_zip:
        source = zip_folder(source, tmp_path / f"{layout}.zip")
        with zipfile.ZipFile(source, "a") as archive:  # what a zip made by macOS Finder adds
            for name in sorted(archive.namelist())[:3]:
                archive.writestr(f"__MACOSX/{Path(name).parent}/._{Path(name).name}", b"\0\5\26")
            archive.writestr(".DS_Store", b"\0")
    code, printed, err = import_main(project, source, out, monkeypatch, capsys)
    assert code == 0, err
    assert ("Kaggle copy" if layout == "kaggle" else "official RAF-DB basic") in printed
    assert f"replaced {out}/ (15 images)" in printed  # the pre-existing tree was swapped out
    assert not list(out.rglob("keep.jpg"))
    assert_imported(out, printed)


def _refused(project: Path, source: Path, out: Path, monkeypatch, capsys) -> str:
    before = tree_digest(out)
    code, printed, err = import_main(project, source, out, monkeypatch, capsys)
    assert code == 2, (printed, err)
    assert tree_digest(out) == before
    assert not list(out.parent.glob(f".{out.name}.import-*"))
    return err


def _kaggle_zip_plus(tmp_path: Path, data_root: Path, extra) -> Path:
    """The Kaggle copy as a zip, plus whatever `extra(archive)` adds."""
    source = kaggle_tree(tmp_path / "download", data_root)
    target = zip_folder(source, tmp_path / "evil.zip")
    with zipfile.ZipFile(target, "a", zipfile.ZIP_DEFLATED) as archive:
        extra(archive)
    return target


@pytest.mark.parametrize(
    "entry", ["../escaped.jpg", "kaggle/DATASET/train/4/../../../../x.jpg", "/tmp/absolute.jpg"]
)
def test_zip_slip_is_refused(
    entry: str, tmp_path: Path, data_root: Path, project: Path, out: Path, monkeypatch, capsys
) -> None:
    jpeg = next((data_root / "train" / "happy").iterdir()).read_bytes()
    source = _kaggle_zip_plus(tmp_path, data_root, lambda z: z.writestr(entry, jpeg))
    err = _refused(project, source, out, monkeypatch, capsys)
    assert "zip-slip" in err and f"  {entry}\n" in err + "\n"
    assert not (tmp_path / "escaped.jpg").exists() and not Path("/tmp/absolute.jpg").exists()


def test_symlink_entry_is_refused(
    tmp_path: Path, data_root: Path, project: Path, out: Path, monkeypatch, capsys
) -> None:
    entry = "kaggle/DATASET/train/4/train_99999_aligned.jpg"
    source = kaggle_tree(tmp_path / "download", data_root)
    with open(source / "train_labels.csv", "a") as handle:  # listed like any other image
        handle.write("train_99999_aligned.jpg,4\n")
    archive = zip_folder(source, tmp_path / "links.zip")
    with zipfile.ZipFile(archive, "a") as z:
        info = zipfile.ZipInfo(entry)
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd")
    err = _refused(project, archive, out, monkeypatch, capsys)
    assert f"{entry}: is a symlink; symlinks are never followed" in err


def test_symlink_in_a_folder_is_refused(
    tmp_path: Path, data_root: Path, project: Path, out: Path, monkeypatch, capsys
) -> None:
    source = official_tree(tmp_path / "download", data_root)
    victim = next((source / "Image" / "aligned").glob("train_*_aligned.jpg"))
    secret = tmp_path / "secret.jpg"
    shutil.copy(victim, secret)
    victim.unlink()
    victim.symlink_to(secret)  # a valid JPEG behind it: refused anyway, never followed
    err = _refused(project, source, out, monkeypatch, capsys)
    assert f"Image/aligned/{victim.name}: is a symlink; symlinks are never followed" in err


def test_zip_bomb_over_the_archive_bound_is_refused(
    tmp_path: Path, data_root: Path, project: Path, out: Path, monkeypatch, capsys
) -> None:
    # 3 MiB of zeros deflate to ~3 KB; the entries declare more than max_archive_bytes (2 MiB)
    source = _kaggle_zip_plus(
        tmp_path, data_root, lambda z: z.writestr("kaggle/notes.txt", b"\0" * (3 << 20))
    )
    assert source.stat().st_size < 200_000
    err = _refused(project, source, out, monkeypatch, capsys)
    assert "possible zip bomb" in err and "data.limits.max_archive_bytes (2097152)" in err


def test_entry_over_the_file_bound_is_refused_unread(
    tmp_path: Path, data_root: Path, project: Path, out: Path, monkeypatch, capsys
) -> None:
    entry = "kaggle/DATASET/train/4/train_99998_aligned.jpg"
    jpeg = next((data_root / "train" / "happy").iterdir()).read_bytes()
    bomb = jpeg + b"\0" * ((1 << 20) + 10)  # 1 MiB of padding after a real JPEG: over 1 MiB
    source = kaggle_tree(tmp_path / "download", data_root)
    with open(source / "train_labels.csv", "a") as handle:
        handle.write("train_99998_aligned.jpg,4\n")
    archive = zip_folder(source, tmp_path / "bomb.zip")
    with zipfile.ZipFile(archive, "a", zipfile.ZIP_DEFLATED) as z:
        z.writestr(entry, bomb)
    err = _refused(project, archive, out, monkeypatch, capsys)
    assert f"{entry}: {len(bomb)} bytes uncompressed, over data.limits.max_file_bytes" in err


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height RGB and whose one IDAT is tiny."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _jpeg_header(width: int, height: int) -> bytes:
    """A JPEG (SOI, SOF0 declaring width x height, EOI): only the header is real."""
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"".join(
        struct.pack(">BBB", i, 0x11, 0) for i in (1, 2, 3)
    )
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


@pytest.mark.parametrize(
    "kind,width,height",
    [("png", 100_000, 100_000), ("jpeg", 60_000, 60_000), ("png", 2_000, 2_000)],
    ids=["png-1e10", "jpeg-3.6e9", "png-4e6-over-configured"],
)
def test_image_declaring_a_huge_size_is_refused(
    kind: str,
    width: int,
    height: int,
    tmp_path: Path,
    data_root: Path,
    project: Path,
    out: Path,
    monkeypatch,
    capsys,
) -> None:
    source = official_tree(tmp_path / "download", data_root)
    victim = sorted((source / "Image" / "aligned").glob("test_*_aligned.jpg"))[0]
    victim.write_bytes(_png_header(width, height) if kind == "png" else _jpeg_header(width, height))
    err = _refused(project, zip_folder(source, tmp_path / "huge.zip"), out, monkeypatch, capsys)
    assert f"basic/Image/aligned/{victim.name}: declare" in err
    assert "decompression bomb" in err or "refused without decoding" in err


def test_every_problem_is_named_at_once(
    tmp_path: Path, data_root: Path, project: Path, out: Path, monkeypatch, capsys
) -> None:
    source = kaggle_tree(tmp_path / "download", data_root)
    images = sorted((source / "DATASET" / "train" / "4").iterdir())
    images[0].write_bytes(b"this is not a JPEG")
    images[1].write_bytes(images[1].read_bytes()[:300])  # truncated
    with open(source / "test_labels.csv", "a") as handle:
        handle.write("test_7777_aligned.jpg,5\n")  # listed, not there
    err = _refused(project, source, out, monkeypatch, capsys)
    assert "lists test_7777 but test/<label>/ has no such image" in err
    # an image problem is found on the second pass, after the listing problems were fixed
    (source / "test_labels.csv").write_text(
        "\n".join((source / "test_labels.csv").read_text().splitlines()[:-1]) + "\n"
    )
    err = _refused(project, source, out, monkeypatch, capsys)
    assert f"DATASET/train/4/{images[0].name}: not a decodable image" in err
    assert f"DATASET/train/4/{images[1].name}: corrupt or truncated image" in err
    assert "2 problem(s)" in err


# --- --out: only what a previous import wrote is ever replaced -----------------------------------

OUT_REFUSED = (
    "--out {out} holds {n} thing(s) that import-rafdb did not write; refused, nothing changed. "
    "An existing --out is replaced only when it is empty or holds only a previous import "
    "(train|test/<class>/<image>): move these away or choose another --out\n"
)


def test_out_on_a_foreign_folder_is_refused(
    tmp_path: Path, data_root: Path, project: Path, monkeypatch, capsys
) -> None:
    source = official_tree(tmp_path / "download", data_root)
    foreign = tmp_path / "thesis"
    (foreign / "figures").mkdir(parents=True)
    (foreign / "thesis.tex").write_text("\\documentclass{book}\n")
    (foreign / "figures" / "plot.png").write_bytes(b"not ours")
    (foreign / "train" / "happy").mkdir(parents=True)  # looks like ours, holds something else
    (foreign / "train" / "happy" / "notes.txt").write_text("mine\n")
    err = _refused(project, source, foreign, monkeypatch, capsys)
    assert err.startswith("error: " + OUT_REFUSED.format(out=foreign, n=3)), err
    assert f"  {foreign / 'figures'}: a folder, not train/ or test/" in err
    assert f"  {foreign / 'thesis.tex'}: a file, not train/ or test/" in err
    assert f"  {foreign / 'train' / 'happy' / 'notes.txt'}: not an image file" in err


def test_out_on_the_folder_holding_the_data_tree_is_refused(
    tmp_path: Path, data_root: Path, project: Path, monkeypatch, capsys
) -> None:
    """`--out data` used to replace data/ whole, raf-db-5class and its images with it."""
    data = project / "data"
    for split in ("train", "test"):
        for klass in LABEL_OF:
            (data / "raf-db-5class" / split / klass).mkdir(parents=True)
            for path in sorted((data_root / split / klass).iterdir())[:2]:
                shutil.copy(path, data / "raf-db-5class" / split / klass / path.name)
    err = _refused(
        project, official_tree(tmp_path / "download", data_root), data, monkeypatch, capsys
    )
    assert err.startswith("error: " + OUT_REFUSED.format(out=data, n=1)), err
    assert f"  {data / 'raf-db-5class'}: a folder, not train/ or test/" in err


def test_out_is_checked_before_the_source_is_read(
    tmp_path: Path, project: Path, monkeypatch, capsys
) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine\n")
    # the source does not exist: only the --out check, which comes first, can name anything
    err = _refused(project, tmp_path / "no-such-download.zip", foreign, monkeypatch, capsys)
    assert err.startswith("error: " + OUT_REFUSED.format(out=foreign, n=1)), err
    assert "no-such-download" not in err


@pytest.mark.parametrize("target", [".", ".."], ids=["dot", "parent"])
def test_out_holding_the_current_folder_is_refused(
    target: str, tmp_path: Path, data_root: Path, project: Path
) -> None:
    """`--out .` ended in an OSError traceback (renaming the current folder)."""
    source = zip_folder(official_tree(tmp_path / "download", data_root), tmp_path / "basic.zip")
    before = tree_digest(tmp_path)
    result = subprocess.run(
        ["soundmood", "import-rafdb", str(source), "--out", target],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"error: --out {target} is or holds the folder you run in ({project.resolve()}); the "
        "import replaces --out whole, so give it a folder of its own, such as "
        "data/raf-db-5class\n"
    )
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("kind", ["file", "link"])
def test_out_that_is_not_a_folder_is_refused(
    kind: str, tmp_path: Path, data_root: Path, project: Path, out: Path, monkeypatch, capsys
) -> None:
    target = tmp_path / "target"
    if kind == "file":
        target.write_bytes(b"a file the user has")
        expected = f"error: {target}: exists and is not a folder\n"
    else:
        target.symlink_to(out, target_is_directory=True)
        expected = f"error: --out {target}: is a symbolic link (to {out}); give the folder itself\n"
    source = official_tree(tmp_path / "download", data_root)
    before = tree_digest(tmp_path)
    code, _, err = import_main(project, source, target, monkeypatch, capsys)
    assert code == 2 and err == expected, err
    assert tree_digest(tmp_path) == before


def test_out_replacing_a_previous_import_is_allowed(
    tmp_path: Path, data_root: Path, project: Path, monkeypatch, capsys
) -> None:
    target = tmp_path / "raf"
    source = official_tree(tmp_path / "download", data_root)
    code, printed, err = import_main(project, source, target, monkeypatch, capsys)
    assert code == 0 and f"wrote {target}/ (15 images)" in printed, err
    (target / ".DS_Store").write_bytes(b"\0")  # Finder litter is tolerated, as in sources
    (target / "test" / "happy" / "._x.jpg").write_bytes(b"\0")
    shutil.rmtree(target / "test" / "sad")  # a class folder gone, another left empty: still ours
    for path in (target / "test" / "angry").iterdir():
        path.unlink()
    code, printed, err = import_main(
        project, zip_folder(source, tmp_path / "basic.zip"), target, monkeypatch, capsys
    )
    assert code == 0, err
    assert f"replaced {target}/ (15 images)" in printed
    assert_imported(target, printed)
    assert not (target / ".DS_Store").exists()


# --- damaged archives and special files in a source folder ---------------------------------------


@pytest.mark.parametrize("name", ["basic.zip", "basic.download"], ids=["suffix", "magic"])
def test_truncated_zip_is_named_damaged(
    name: str, tmp_path: Path, data_root: Path, project: Path, out: Path, monkeypatch, capsys
) -> None:
    whole = zip_folder(official_tree(tmp_path / "download", data_root), tmp_path / "whole.zip")
    cut = tmp_path / name
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # an interrupted download
    assert cut.read_bytes()[:4] == b"PK\x03\x04" and not zipfile.is_zipfile(cut)
    err = _refused(project, cut, out, monkeypatch, capsys)
    assert err == (
        f"error: {cut}: a damaged or incomplete .zip archive (it has no readable central "
        "directory, the index at its end; was the download cut short?); download it again\n"
    )


def _run_import(
    source: Path, target: Path, project: Path
) -> tuple[subprocess.CompletedProcess, float]:
    """The real CLI in a subprocess: a read that blocks is a TimeoutExpired, not a stuck test."""
    start = time.monotonic()
    result = subprocess.run(
        ["soundmood", "import-rafdb", str(source), "--out", str(target)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, time.monotonic() - start


def test_named_pipe_in_a_source_folder_is_refused_without_blocking(
    tmp_path: Path, data_root: Path, project: Path, out: Path, monkeypatch, capsys
) -> None:
    source = official_tree(tmp_path / "download", data_root)
    pipe = sorted((source / "Image" / "aligned").glob("train_*_aligned.jpg"))[0]
    pipe.unlink()
    os.mkfifo(pipe)  # opened, it would block forever waiting for a writer
    before = tree_digest(out)
    result, seconds = _run_import(source, out, project)
    assert result.returncode == 2, result.stderr
    assert seconds < 20  # interpreter start-up included; the refusal itself is instant
    assert f"  {pipe}: is a named pipe, not a regular file; refused unread\n" in result.stderr
    assert tree_digest(out) == before
    start = time.monotonic()  # in-process, without start-up: well under 2 s
    err = _refused(project, source, out, monkeypatch, capsys)
    assert time.monotonic() - start < 2
    assert "import refused, nothing written: 1 problem(s)" in err
    assert f"  {pipe}: is a named pipe, not a regular file; refused unread\n" in err


def test_device_file_in_a_source_folder_is_refused_unopened(
    tmp_path: Path, data_root: Path, project: Path, out: Path, monkeypatch, capsys
) -> None:
    source = official_tree(tmp_path / "download", data_root)
    device = sorted((source / "Image" / "aligned").glob("test_*_aligned.jpg"))[0]
    device.unlink()
    try:
        os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # a second /dev/zero
    except PermissionError:
        pytest.skip("creating a device node needs root (CAP_MKNOD)")
    start = time.monotonic()
    err = _refused(project, source, out, monkeypatch, capsys)
    assert time.monotonic() - start < 2
    assert f"  {device}: is a character device, not a regular file; refused unread\n" in err


def test_link_to_dev_zero_in_a_source_folder_is_refused_unread(
    tmp_path: Path, data_root: Path, project: Path, out: Path, monkeypatch, capsys
) -> None:
    source = kaggle_tree(tmp_path / "download", data_root)
    link = sorted((source / "DATASET" / "train" / "4").iterdir())[0]
    link.unlink()
    link.symlink_to("/dev/zero")
    start = time.monotonic()
    err = _refused(project, source, out, monkeypatch, capsys)
    assert time.monotonic() - start < 2
    assert f"DATASET/train/4/{link.name}: is a symlink; symlinks are never followed" in err


def test_symlinked_class_folder_in_a_source_is_refused(
    tmp_path: Path, data_root: Path, project: Path, out: Path, monkeypatch, capsys
) -> None:
    source = kaggle_tree(tmp_path / "download", data_root)
    folder = source / "DATASET" / "train" / "4"
    shutil.move(folder, tmp_path / "elsewhere")
    folder.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    err = _refused(project, source, out, monkeypatch, capsys)
    assert (
        f"  {source}: DATASET/train/4: is a symlink to a folder; symlinks are never followed\n"
        in err
    )


def test_symlinked_image_folder_is_named_once(
    tmp_path: Path, data_root: Path, project: Path, out: Path, monkeypatch, capsys
) -> None:
    source = official_tree(tmp_path / "download", data_root)
    folder = source / "Image" / "aligned"
    shutil.move(folder, tmp_path / "elsewhere")
    folder.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    err = _refused(project, source, out, monkeypatch, capsys)
    assert err == (
        f"error: {source}: import refused, nothing written: 1 problem(s)\n"
        f"  {source}: Image/aligned: is a symlink to a folder; symlinks are never followed\n"
    )
