"""Writing outputs so that nothing a user has is ever half-replaced, and reading untrusted files
so that no read is unbounded. Every stage output and every data read goes through here.

Atomic writes: the new content goes to a temporary file beside the target, is flushed to disk and
renamed over the target, so a killed process leaves the old file or the new one, never a mix.
The rename also replaces a link into DVC's cache instead of writing through it. (The standard
library has no atomic write; numpy, Keras and Pillow write to whatever path they are given, so
`atomic_path` hands them the temporary one.)

Bounded reads: a file is opened without following a final symlink and without blocking on a
pipe, checked to be a regular file with fstat on the open descriptor (no race between check and
read), and read up to a limit.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from soundmood.errors import UnsafeFileError
from soundmood.processes import is_alive

PARTIAL_PREFIX = ".partial-"
REPLACED = "replaced-"  # atomic_folder's name for the old folder while it swaps the new one in


def partial_name(target: Path) -> Path:
    """The temporary name a write to `target` uses: hidden, beside it, unique to this process."""
    return target.with_name(f"{PARTIAL_PREFIX}{os.getpid()}-{target.name}")


def _fsync(path: Path) -> None:
    """Flush a finished file (or every file of a finished folder) to disk before the rename."""
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for item in paths:
        _fsync_entry(item)


def _fsync_entry(path: Path) -> None:
    """Flush one file's data, or one folder's entries (a rename in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `target`; when the block ends without an exception, the file
    written there replaces `target` in one rename. On any exception (or a kill) `target` is left
    as it was and the temporary file is removed (or, after a kill, left hidden and ignored).
    With `replace=False` an existing `target` is never replaced: FileExistsError instead."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target.parent, target.name)  # a killed earlier write of this target
    partial = partial_name(target)
    try:
        yield partial
        _fsync(partial)
        if replace:
            os.replace(partial, target)
        else:
            _link_new(partial, target)
    finally:
        _remove(partial)


def _link_new(partial: Path, target: Path) -> None:
    """Put `partial` at `target` only if nothing is there: a hard link refuses an existing name
    (FileExistsError) where a rename would replace it."""
    try:
        os.link(partial, target)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # a filesystem without hard links: still exclusive, though no longer atomic
        with open(partial, "rb") as source, open(target, "xb") as copy:
            shutil.copyfileobj(source, copy)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; when the block ends without an exception,
    it replaces the folder `target` whole: the old folder is renamed aside, the new one renamed
    in, then the old one removed. POSIX cannot rename a folder over a non-empty one, so a kill
    leaves the old folder, the new one or, between the two renames, neither (the old one then
    lies hidden beside it until remove_stale_partials); never a mix of the two. On an exception
    `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target.parent, target.name)  # what a killed earlier swap left
    partial = partial_name(target)
    replaced = partial.with_name(f"{PARTIAL_PREFIX}{os.getpid()}-{REPLACED}{target.name}")
    _remove(partial)
    partial.mkdir()
    try:
        yield partial
        _fsync(partial)
        _fsync_entry(partial)
        swapped = target.exists() or target.is_symlink()
        if swapped:
            os.rename(target, replaced)
        try:
            os.rename(partial, target)
        except BaseException:
            if swapped:  # put the old folder back rather than leave none
                os.rename(replaced, target)
            raise
        _fsync_entry(target.parent)
    finally:
        _remove(partial)
        _remove(replaced)


def write_bytes(target: str | Path, data: bytes, *, replace: bool = True) -> Path:
    """Replace `target` with `data` atomically (or, with `replace=False`, create it only if it
    does not exist: FileExistsError otherwise)."""
    with atomic_path(target, replace=replace) as partial:
        partial.write_bytes(data)
    return Path(target)


def write_text(target: str | Path, text: str) -> Path:
    """Replace `target` with `text` (UTF-8) atomically."""
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | Path, value: Any, **dumps: Any) -> Path:
    """Replace `target` with `value` as indented JSON and a final newline, atomically."""
    return write_text(target, json.dumps(value, indent=2, **dumps) + "\n")


def remove_stale_partials(folder: str | Path, target: str | None = None) -> None:
    """Remove the temporary files (and folders) killed writers left in `folder`, never a live
    writer's; with `target`, only those of writes to that name."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.glob(f"{PARTIAL_PREFIX}*"):
        pid, _, name = path.name.removeprefix(PARTIAL_PREFIX).partition("-")
        if target is not None and name not in (target, f"{REPLACED}{target}"):
            continue
        if pid.isdigit() and not is_alive(int(pid)):
            _remove(path)


def file_md5(path: Path) -> str:
    """md5 of a file, read in chunks (a prepared array can be most of a gigabyte)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def file_kind(mode: int) -> str:
    """What a file is, in words, for an error message ("a file" for a regular one)."""
    for test, name in (
        (stat.S_ISREG, "a file"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_bounded(
    path: str | Path, limit: int, what: str = "data.limits.max_file_bytes", *, head: bool = False
) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. A final symlink is not followed, a
    pipe or device is refused without blocking, and a larger file is refused after reading at
    most `limit` + 1 bytes; each is an UnsafeFileError naming the path. With `head`, a larger
    file is not refused: its first `limit` bytes are returned (to sniff a format's magic bytes).
    A missing file raises FileNotFoundError as usual."""
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise UnsafeFileError(f"{path}: is a symbolic link; links are never followed") from exc
        if exc.errno == errno.ENXIO:  # a socket, or a pipe with no writer under O_NONBLOCK
            raise UnsafeFileError(f"{path}: is {file_kind(os.lstat(path).st_mode)}") from exc
        raise
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafeFileError(f"{path}: is {file_kind(mode)}, not a regular file; refused")
        data = handle.read(limit if head else limit + 1)
    if len(data) > limit:
        raise UnsafeFileError(f"{path}: over {what} ({limit} bytes); refused unread")
    return data
