"""An untrusted RAF-DB download as a Source: the regular files of a folder or a .zip, read with
bounds.

Zip entries with absolute paths or `..` make the whole archive refused (zip-slip), symlinks are
listed apart and never followed, each file and the whole archive are bounded in uncompressed size
(data.limits), and in a folder only regular files are read (fileio.read_bounded): a pipe or
device is named and never opened. macOS Finder litter is left out.
"""

from __future__ import annotations

import os
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from soundmood.errors import UnsafeFileError, UserError
from soundmood.fileio import file_kind, read_bounded

MAX_LISTED = 200  # problems listed one by one; beyond that a count
ZIP_MAGIC = b"PK\x03\x04"  # a zip's first local file header


class ArchiveError(UserError):
    """The source cannot be imported safely or completely; the message names each offender."""


@dataclass(frozen=True)
class Limits:
    max_image_pixels: int
    max_file_bytes: int
    max_archive_bytes: int
    max_archive_files: int


class Source:
    """Regular files of a folder or zip. Symlinks are listed apart and never read. macOS Finder
    litter (`__MACOSX/`, `._*` resource forks, `.DS_Store`) is left out of both: a zip made on a
    Mac would otherwise look like a second, broken copy of the release."""

    def __init__(self, where: str, files: dict[str, int], links: set[str]) -> None:
        self.where = where
        self.files = {e: n for e, n in files.items() if not is_finder_litter(e)}
        self.links = {e for e in links if not is_finder_litter(e)}

    def read(self, entry: str, limit: int) -> bytes:
        """At most limit + 1 bytes of the entry (one more than allowed tells it is too big)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class FolderSource(Source):
    """A folder's files. Pipes, devices and sockets are listed like files (so that the layout
    names them where an image or label file is expected) but are refused, never opened."""

    def __init__(self, root: Path, limits: Limits) -> None:
        files, links = {}, set()
        self.special: dict[str, str] = {}  # entry -> what it is ("a named pipe", ...)
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            base = Path(dirpath)
            for name in [*dirnames, *filenames]:
                path = base / name
                entry = path.relative_to(root).as_posix()
                info = path.lstat()
                if stat.S_ISLNK(info.st_mode):
                    links.add(entry)
                elif name in filenames:
                    files[entry] = info.st_size
                    if not stat.S_ISREG(info.st_mode):
                        self.special[entry] = file_kind(info.st_mode)
            if len(files) > limits.max_archive_files:
                raise ArchiveError(
                    f"{root}: more than data.limits.max_archive_files "
                    f"({limits.max_archive_files}) files; is it the RAF-DB folder?"
                )
        super().__init__(str(root), files, links)
        self.root = root

    def read(self, entry: str, limit: int) -> bytes:
        """The entry's bytes; UnsafeFileError for a pipe, device, link or file over `limit`
        (read_bounded also catches a file swapped for one of them after the listing)."""
        if entry in self.special:
            raise UnsafeFileError(
                f"{self.root / entry}: is {self.special[entry]}, not a regular file; refused unread"
            )
        return read_bounded(self.root / entry, limit)


class ZipSource(Source):
    def __init__(self, path: Path, limits: Limits) -> None:
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise ArchiveError(f"{path}: not a readable zip archive ({exc})") from exc
        try:
            files, links = self._entries(path, limits)
        except ArchiveError:
            self.zip.close()
            raise
        super().__init__(str(path), files, links)

    def _entries(self, path: Path, limits: Limits) -> tuple[dict[str, int], set[str]]:
        infos = self.zip.infolist()
        if len(infos) > limits.max_archive_files:
            raise ArchiveError(
                f"{path}: {len(infos)} entries, over data.limits.max_archive_files "
                f"({limits.max_archive_files})"
            )
        unsafe = [i.filename for i in infos if not is_safe_entry(i.filename)]
        if unsafe:
            raise ArchiveError(
                listing(
                    f"{path}: refused: entries with an absolute path or '..' would land outside "
                    "the target folder (zip-slip); nothing was extracted",
                    unsafe,
                )
            )
        total = sum(i.file_size for i in infos)
        if total > limits.max_archive_bytes:
            raise ArchiveError(
                f"{path}: refused as a possible zip bomb: its entries declare "
                f"{total} bytes uncompressed, over data.limits.max_archive_bytes "
                f"({limits.max_archive_bytes})"
            )
        files, links = {}, set()
        for info in infos:
            if stat.S_ISLNK(info.external_attr >> 16):
                links.add(info.filename)
            elif not info.is_dir():
                files[info.filename] = info.file_size
        self.infos = {i.filename: i for i in infos}
        return files, links

    def read(self, entry: str, limit: int) -> bytes:
        try:
            with self.zip.open(self.infos[entry]) as handle:
                return handle.read(limit + 1)  # the declared size may lie: never inflate more
        except (zipfile.BadZipFile, RuntimeError, OSError, EOFError) as exc:
            raise ArchiveError(f"{self.where}: entry {entry} cannot be read ({exc})") from exc

    def close(self) -> None:
        self.zip.close()


def is_finder_litter(entry: str) -> bool:
    parts = PurePosixPath(entry).parts
    return "__MACOSX" in parts or (
        bool(parts) and (parts[-1].startswith("._") or parts[-1] == ".DS_Store")
    )


def is_safe_entry(name: str) -> bool:
    """False for zip entries that would escape the extraction folder."""
    posix = name.replace("\\", "/")
    return not (
        posix.startswith("/")
        or re.match(r"^[A-Za-z]:", posix)
        or "\0" in name
        or ".." in PurePosixPath(posix).parts
    )


def open_source(path: Path, limits: Limits) -> Source:
    if not path.exists():
        raise ArchiveError(f"{path}: no such file or folder")
    if path.is_dir():
        return FolderSource(path, limits)
    # the path the user typed may be a link; what it names must be a file
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):  # zipfile would block on a pipe or read a device forever
        raise ArchiveError(f"{path}: is {file_kind(mode)}; expected a folder or a .zip archive")
    if zipfile.is_zipfile(path):
        return ZipSource(path, limits)
    if path.suffix.lower() == ".zip" or read_bounded(path.resolve(), 4, head=True) == ZIP_MAGIC:
        raise ArchiveError(
            f"{path}: a damaged or incomplete .zip archive (it has no readable central "
            "directory, the index at its end; was the download cut short?); download it again"
        )
    raise ArchiveError(f"{path}: neither a folder nor a .zip archive")


def read_text(source: Source, entry: str, limits: Limits) -> str:
    data = source.read(entry, limits.max_file_bytes)
    if len(data) > limits.max_file_bytes:
        raise ArchiveError(
            f"{source.where}: {entry} is over data.limits.max_file_bytes "
            f"({limits.max_file_bytes}) uncompressed; refused"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ArchiveError(f"{source.where}: {entry} is not a UTF-8 text file ({exc})") from exc


def listing(head: str, lines: list[str]) -> str:
    shown = [f"  {line}" for line in lines[:MAX_LISTED]]
    if len(lines) > MAX_LISTED:
        shown.append(f"  ... and {len(lines) - MAX_LISTED} more")
    return "\n".join([head, *shown])
