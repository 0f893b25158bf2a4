"""`soundmood import-rafdb SOURCE [--out DIR]`: build the 5-class tree from a RAF-DB download.

SOURCE is a folder or a .zip holding either
- the official RAF-DB basic release: `EmoLabel/list_patition_label.txt` (lines `train_00001.jpg 5`;
  some copies call the folder `EmotionLabel`) and the crops `Image/aligned/<stem>_aligned.jpg`;
- the Kaggle copy: `DATASET/{train,test}/{1..7}/<name>.jpg` with `train_labels.csv` and
  `test_labels.csv` (`image,label` rows), whose labels must agree with the folders.

RAF-DB labels map to classes through data.rafdb_labels (2 fear and 3 disgust are dropped). Images
are copied byte for byte to <out>/{train,test}/<class>/<name>, so a genuine download reproduces the
tree that data.dvc records.

The source is untrusted: zip entries with absolute paths or `..` make the whole archive refused
(zip-slip), symlinks are never followed, each file and the whole archive are bounded in
uncompressed size, an image header may not declare more than data.limits.max_image_pixels, and
every image must decode. The tree is written to a temporary folder beside --out and renamed into
place only when everything passed, so a refused import leaves --out as it was.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import stat
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from omegaconf import DictConfig

from soundmood.data.images import IMAGE_SUFFIXES, ImageError, open_bounded
from soundmood.data.layout import RAFDB_LABEL_NAMES, SPLITS
from soundmood.errors import UserError
from soundmood.processes import is_alive

OFFICIAL_LABEL_FILE = "list_patition_label.txt"  # sic: the official release's spelling
OFFICIAL_LABEL_DIRS = ("EmoLabel", "EmotionLabel")
KAGGLE_IMAGE = re.compile(
    r"^(?P<prefix>(?:.*/)?)(?:DATASET/)?(?P<split>train|test)/(?P<label>\d+)/(?P<name>[^/]+)$"
)
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")
MAX_LISTED = 200  # problems listed one by one; beyond that a count


class ArchiveError(UserError):
    """The source cannot be imported safely or completely; the message names each offender."""


@dataclass(frozen=True)
class Limits:
    max_image_pixels: int
    max_file_bytes: int
    max_archive_bytes: int
    max_archive_files: int


@dataclass(frozen=True)
class Settings:
    classes: tuple[str, ...]
    labels: dict[int, str]  # RAF-DB label -> class
    limits: Limits

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Settings:
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


# --- sources: a folder or a zip, as {posix path: size}, symlinks apart, bounded reads -------------


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
    def __init__(self, root: Path, limits: Limits) -> None:
        files, links = {}, set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            base = Path(dirpath)
            for name in [*dirnames, *filenames]:
                path = base / name
                if path.is_symlink():
                    links.add(path.relative_to(root).as_posix())
                elif name in filenames:
                    files[path.relative_to(root).as_posix()] = path.lstat().st_size
            if len(files) > limits.max_archive_files:
                raise ArchiveError(
                    f"{root}: more than data.limits.max_archive_files "
                    f"({limits.max_archive_files}) files; is it the RAF-DB folder?"
                )
        super().__init__(str(root), files, links)
        self.root = root

    def read(self, entry: str, limit: int) -> bytes:
        # O_NOFOLLOW: a file swapped for a symlink after listing is refused, not followed.
        fd = os.open(self.root / entry, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as handle:
            return handle.read(limit + 1)


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
    if zipfile.is_zipfile(path):
        return ZipSource(path, limits)
    raise ArchiveError(f"{path}: neither a folder nor a .zip archive")


# --- layouts: which images, with which label, from which entry -----------------------------------


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
    if len(prefixes) > 1:
        raise ArchiveError(
            listing(
                f"{source.where}: several Kaggle-layout folders; import one release at a time",
                sorted(p or "." for p in prefixes),
            )
        )
    items, problems = [], []
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
    if any(KAGGLE_IMAGE.match(e) for e in (*source.files, *source.links)):
        return ("Kaggle copy", *kaggle_items(source, limits))
    raise ArchiveError(
        f"{source.where}: no RAF-DB layout found: expected EmoLabel/{OFFICIAL_LABEL_FILE} with "
        "Image/aligned/ (official basic release) or DATASET/{train,test}/1..7/ with "
        "train_labels.csv and test_labels.csv (Kaggle copy)"
    )


def select(items: list[Item], settings: Settings, where: str) -> tuple[list[Item], list[str]]:
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


def check_image(source: Source, item: Item, limits: Limits) -> tuple[bytes | None, str | None]:
    """The image's bytes, or why it is refused."""
    label = f"{source.where}: {item.entry}"
    if item.entry in source.links:
        return None, f"{label}: is a symlink; symlinks are never followed"
    if item.entry not in source.files:
        return None, f"{label}: missing"
    bomb = (
        f"uncompressed, over data.limits.max_file_bytes ({limits.max_file_bytes}); "
        "refused as a possible decompression bomb"
    )
    if source.files[item.entry] > limits.max_file_bytes:  # declared: refused before inflating
        return None, f"{label}: {source.files[item.entry]} bytes {bomb}"
    data = source.read(item.entry, limits.max_file_bytes)
    if len(data) > limits.max_file_bytes:  # the declared size lied; reading stopped at the limit
        return None, f"{label}: more bytes than its header declares, {bomb}"
    try:
        open_bounded(data, limits.max_image_pixels, label)
    except ImageError as exc:
        return None, str(exc)
    return data, None


# --- import --------------------------------------------------------------------------------------


@dataclass
class Summary:
    layout: str
    counts: dict[str, Counter]
    dropped: dict[str, Counter]
    out: Path
    replaced: bool


def import_rafdb(source_path: Path, out: Path, settings: Settings) -> Summary:
    """Import into `out` atomically; raise ArchiveError naming every problem, `out` unchanged."""
    if out.exists() and not out.is_dir():
        raise ArchiveError(f"{out}: exists and is not a folder")
    if source_path.exists() and _overlaps(source_path, out):
        raise ArchiveError(f"--out {out} would replace the source {source_path}; choose another")
    source = open_source(source_path, settings.limits)
    try:
        layout, items, problems = detect(source, settings.limits)
        kept, more = select(items, settings, source.where)
        problems += more
        if not problems and not kept:
            problems.append(f"{source.where}: no image of classes {', '.join(settings.classes)}")
        stop_if(problems, source.where)
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(out)
        staging = Path(
            tempfile.mkdtemp(prefix=f"{_staging_prefix(out)}{os.getpid()}-", dir=out.parent)
        )
        try:
            counts = _write_tree(source, kept, staging / "tree", settings)
            replaced = _move_into_place(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        source.close()
    dropped = {
        s: Counter(
            RAFDB_LABEL_NAMES[i.raf_label]
            for i in items
            if i.split == s and i.raf_label not in settings.labels
        )
        for s in SPLITS
    }
    return Summary(layout, counts, dropped, out, replaced)


def _overlaps(source: Path, out: Path) -> bool:
    src, dst = source.resolve(), out.resolve()
    return src == dst or dst in src.parents


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.import-"


def _remove_stale_staging(out: Path) -> None:
    """A killed import leaves its staging folder; left there, `dvc add data` would take it in."""
    for folder in out.parent.glob(f"{_staging_prefix(out)}*"):
        pid = folder.name.removeprefix(_staging_prefix(out)).split("-")[0]
        if pid.isdigit() and not is_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _write_tree(
    source: Source, items: list[Item], tree: Path, settings: Settings
) -> dict[str, Counter]:
    """Check every image; write the good ones only while no problem was found (to name them all)."""
    counts = {s: Counter() for s in SPLITS}
    for split in SPLITS:
        (tree / split).mkdir(parents=True)
    problems: list[str] = []
    for item in items:
        data, problem = check_image(source, item, settings.limits)
        if problem:
            problems.append(problem)
        elif not problems:
            klass = settings.labels[item.raf_label]
            target = tree / item.split / klass / item.name
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(data)
            counts[item.split][klass] += 1
    stop_if(problems, source.where)
    return counts


def _move_into_place(staging: Path, out: Path) -> bool:
    """Swap the finished tree in by renames; the previous tree is deleted only afterwards."""
    tree = staging / "tree"
    if not out.exists():
        tree.rename(out)
        return False
    previous = staging / "previous"
    out.rename(previous)
    try:
        tree.rename(out)
    except OSError:
        previous.rename(out)
        raise
    return True


def stop_if(problems: list[str], where: str) -> None:
    if problems:
        raise ArchiveError(
            listing(
                f"{where}: import refused, nothing written: {len(problems)} problem(s)", problems
            )
        )


def listing(head: str, lines: list[str]) -> str:
    shown = [f"  {line}" for line in lines[:MAX_LISTED]]
    if len(lines) > MAX_LISTED:
        shown.append(f"  ... and {len(lines) - MAX_LISTED} more")
    return "\n".join([head, *shown])


def format_summary(summary: Summary, classes: tuple[str, ...]) -> Iterator[str]:
    width = max(5, *(len(c) for c in classes))
    yield f"import-rafdb: {summary.layout} layout"
    yield "  ".join(["split", *(c.rjust(width) for c in classes), "total"])
    for split in SPLITS:
        row = [str(summary.counts[split][c]).rjust(width) for c in classes]
        yield "  ".join([split.ljust(5), *row, str(sum(summary.counts[split].values())).rjust(5)])
    for split in SPLITS:
        if summary.dropped[split]:
            parts = ", ".join(f"{k} {v}" for k, v in sorted(summary.dropped[split].items()))
            yield f"dropped from {split} (not among data.classes): {parts}"
    total = sum(sum(c.values()) for c in summary.counts.values())
    yield f"{'replaced' if summary.replaced else 'wrote'} {summary.out}/ ({total} images)"


def import_cli(cfg: DictConfig, args: object) -> int:
    """The `import-rafdb` command."""
    settings = Settings.from_config(cfg)
    summary = import_rafdb(Path(args.source), Path(args.out), settings)
    for line in format_summary(summary, settings.classes):
        print(line)
    print("next: `soundmood validate`, then version the tree: dvc add data && dvc push")
    return 0
