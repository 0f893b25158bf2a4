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
every image must decode. In a source folder only regular files are read (fileio.read_bounded):
a pipe or device is named and never opened. The tree is written to a temporary folder beside --out
and renamed into place only when everything passed, so a refused import leaves --out as it was.

--out is replaced only when it holds nothing but what an import writes (check_out): an empty
folder or a train|test/<class>/<image> tree. Anything else there is the user's and is never
deleted; the refusal comes before the (slow) source is read. No marker file marks our trees:
`dvc add` would hash it, and a genuine download must reproduce the md5 that data.dvc records.
"""

from __future__ import annotations

import csv
import io
import os
import re
import stat
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from omegaconf import DictConfig

from soundmood.data.images import IMAGE_SUFFIXES, ImageError, open_bounded
from soundmood.data.layout import RAFDB_LABEL_NAMES, SPLITS
from soundmood.errors import UnsafeFileError, UserError
from soundmood.fileio import atomic_folder, file_kind, read_bounded

OFFICIAL_LABEL_FILE = "list_patition_label.txt"  # sic: the official release's spelling
OFFICIAL_LABEL_DIRS = ("EmoLabel", "EmotionLabel")
KAGGLE_IMAGE = re.compile(
    r"^(?P<prefix>(?:.*/)?)(?:DATASET/)?(?P<split>train|test)/(?P<label>\d+)/(?P<name>[^/]+)$"
)
# A Kaggle-layout folder (DATASET, a split, a label): a symlink there is named, not skipped.
KAGGLE_FOLDER = re.compile(r"^(?:.*/)?(?:DATASET|(?:DATASET/)?(?:train|test)(?:/\d+)?)$")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")
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
    linked = [
        f"{source.where}: {link}: is a symlink to a folder; symlinks are never followed"
        for link in sorted(source.links)
        if KAGGLE_FOLDER.match(link)
    ]
    if len(prefixes) > 1:
        raise ArchiveError(
            listing(
                f"{source.where}: several Kaggle-layout folders; import one release at a time",
                sorted(p or "." for p in prefixes),
            )
        )
    items, problems = [], linked
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
    if any(KAGGLE_IMAGE.match(e) for e in (*source.files, *source.links)) or any(
        KAGGLE_FOLDER.match(e) for e in source.links
    ):
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
        linked = [str(p) for p in PurePosixPath(item.entry).parents if str(p) in source.links]
        if linked:  # one problem for the folder, however many images it holds (see stop_if)
            return None, (
                f"{source.where}: {linked[-1]}: is a symlink to a folder; symlinks are never "
                "followed"
            )
        return None, f"{label}: missing"
    bomb = (
        f"uncompressed, over data.limits.max_file_bytes ({limits.max_file_bytes}); "
        "refused as a possible decompression bomb"
    )
    if source.files[item.entry] > limits.max_file_bytes:  # declared: refused before inflating
        return None, f"{label}: {source.files[item.entry]} bytes {bomb}"
    try:
        data = source.read(item.entry, limits.max_file_bytes)
    except UnsafeFileError as exc:  # a pipe or device in a folder: one listed problem, unread
        return None, str(exc)
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
    check_out(out, source_path, settings.classes)  # before the slow read of the source
    source = open_source(source_path, settings.limits)
    try:
        layout, items, problems = detect(source, settings.limits)
        kept, more = select(items, settings, source.where)
        problems += more
        if not problems and not kept:
            problems.append(f"{source.where}: no image of classes {', '.join(settings.classes)}")
        stop_if(problems, source.where)
        replaced = out.exists()
        with atomic_folder(out) as tree:  # a refused or killed import leaves --out as it was
            counts = _write_tree(source, kept, tree, settings)
            check_out(out, source_path, settings.classes)  # again: the import took a while
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


def check_out(out: Path, source: Path, classes: tuple[str, ...]) -> None:
    """Refuse an --out whose replacement would delete anything an import did not write: the
    current folder (the project) or one holding it, the source, a file, a link, or a folder with
    anything but an import's tree in it. Nothing is changed when it refuses."""
    if out.is_symlink():
        raise ArchiveError(
            f"--out {out}: is a symbolic link (to {os.readlink(out)}); give the folder itself"
        )
    if out.exists() and not out.is_dir():
        raise ArchiveError(f"{out}: exists and is not a folder")
    blocker = next((p for p in out.absolute().parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ArchiveError(f"--out {out}: {blocker} is not a folder")
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise ArchiveError(
            f"--out {out} is or holds the folder you run in ({here}); the import replaces "
            "--out whole, so give it a folder of its own, such as data/raf-db-5class"
        )
    if source.exists() and _overlaps(source, out):
        raise ArchiveError(f"--out {out} would replace the source {source}; choose another")
    if out.is_dir():
        foreign = foreign_entries(out, classes)
        if foreign:
            raise ArchiveError(
                listing(
                    f"--out {out} holds {len(foreign)} thing(s) that import-rafdb did not write; "
                    "refused, nothing changed. An existing --out is replaced only when it is "
                    "empty or holds only a previous import (train|test/<class>/<image>): move "
                    "these away or choose another --out",
                    foreign,
                )
            )


def foreign_entries(out: Path, classes: tuple[str, ...]) -> list[str]:
    """What in `out` an import would not have written, one line each (empty: ours to replace).
    Ours: `train`/`test` folders holding folders named in data.classes holding regular files with
    an image suffix. Finder litter (.DS_Store, ._*) is tolerated, as it is in sources; any other
    hidden entry (.git, .dvc, ...) is the user's. Nothing is followed or read."""
    expected = (
        ("train/ or test/ (a previous import holds nothing else)", set(SPLITS)),
        (f"a folder named after a class in data.classes ({', '.join(classes)})", set(classes)),
    )
    foreign: list[str] = []

    def visit(folder: Path, depth: int) -> None:
        for path in sorted(folder.iterdir()):
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode) and is_finder_litter(path.name):
                continue
            if depth < len(expected):
                what, names = expected[depth]
                if stat.S_ISDIR(mode) and path.name in names:
                    visit(path, depth + 1)
                else:
                    foreign.append(f"{path}: {file_kind(mode)}, not {what}")
            elif not stat.S_ISREG(mode):
                foreign.append(
                    f"{path}: {file_kind(mode)} inside a class folder, not an image file"
                )
            elif path.suffix.lower() not in IMAGE_SUFFIXES:
                foreign.append(f"{path}: not an image file ({', '.join(IMAGE_SUFFIXES)})")

    visit(out, 0)
    return foreign


def _overlaps(source: Path, out: Path) -> bool:
    src, dst = source.resolve(), out.resolve()
    return src == dst or dst in src.parents


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


def stop_if(problems: list[str], where: str) -> None:
    problems = list(dict.fromkeys(problems))  # a symlinked folder is named once, not per image
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
