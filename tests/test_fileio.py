"""fileio on real files: what a failed, refused or exclusive write leaves, and reads that never
block or follow a link."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from soundmood import fileio
from soundmood.errors import UnsafeFileError


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path: Path) -> None:
    target = fileio.write_text(tmp_path / "report.json", "old\n")
    with pytest.raises(RuntimeError), fileio.atomic_path(target) as partial:
        partial.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_write_replaces_a_hard_link_instead_of_writing_through_it(tmp_path: Path) -> None:
    cached = fileio.write_text(tmp_path / "cache-copy", "cached\n")
    os.link(cached, tmp_path / "output")
    fileio.write_text(tmp_path / "output", "new\n")
    assert cached.read_text() == "cached\n" and (tmp_path / "output").read_text() == "new\n"


def test_an_exclusive_write_never_replaces(tmp_path: Path) -> None:
    target = fileio.write_text(tmp_path / "photo.jpg", "the user's photo")
    with pytest.raises(FileExistsError):
        fileio.write_bytes(target, b"annotated copy", replace=False)
    assert target.read_text() == "the user's photo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.jpg"]
    fileio.write_bytes(tmp_path / "new.jpg", b"copy", replace=False)
    assert (tmp_path / "new.jpg").read_bytes() == b"copy"


def test_a_folder_is_swapped_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "prepared"
    with fileio.atomic_folder(target) as folder:
        (folder / "a.npy").write_bytes(b"1")
    with pytest.raises(RuntimeError), fileio.atomic_folder(target) as folder:
        (folder / "a.npy").write_bytes(b"2")
        raise RuntimeError("failed halfway")
    assert [p.name for p in target.iterdir()] == ["a.npy"] and (
        target / "a.npy"
    ).read_bytes() == b"1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_a_dead_writers_partial_is_removed_a_live_ones_kept(tmp_path: Path) -> None:
    dead = tmp_path / f"{fileio.PARTIAL_PREFIX}999999999-out.json"
    live = tmp_path / f"{fileio.PARTIAL_PREFIX}{os.getpid()}-out.json"
    dead.write_text("x")
    live.write_text("y")
    fileio.remove_stale_partials(tmp_path)
    assert not dead.exists() and live.exists()


def test_reads_refuse_a_pipe_a_link_and_a_large_file_at_once(tmp_path: Path) -> None:
    pipe = tmp_path / "x.jpg"
    os.mkfifo(pipe)
    link = tmp_path / "zero.jpg"
    link.symlink_to("/dev/zero")
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\0" * 101)
    start = time.perf_counter()
    for path, message in ((pipe, "named pipe"), (link, "symbolic link"), (big, r"over .*\(100")):
        with pytest.raises(UnsafeFileError, match=message):
            fileio.read_bounded(path, 100)
    assert time.perf_counter() - start < 2.0
    assert fileio.read_bounded(big, 10, head=True) == b"\0" * 10
    with pytest.raises(FileNotFoundError):
        fileio.read_bounded(tmp_path / "missing.jpg", 100)
