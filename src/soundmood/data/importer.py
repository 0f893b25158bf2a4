"""`soundmood import-rafdb SOURCE [--out DIR]`: build the 5-class tree from a RAF-DB download.

SOURCE is a folder or a .zip (soundmood.data.archive reads it, untrusted, with bounds) holding the
official basic release or the Kaggle copy (soundmood.data.rafdb_release finds which, and its
images). RAF-DB labels map to classes through data.rafdb_labels (2 fear and 3 disgust are dropped).
Every image must decode, its header declaring no more than data.limits.max_image_pixels; images
are copied byte for byte to <out>/{train,test}/<class>/<name>, so a genuine download reproduces
the tree that data.dvc records. The tree is written to a temporary folder beside --out and renamed
into place only when everything passed, so a refused import leaves --out as it was.

--out is replaced only when it holds nothing but what an import writes (check_out): an empty
folder or a train|test/<class>/<image> tree. Anything else there is the user's and is never
deleted; the refusal comes before the (slow) source is read. No marker file marks our trees:
`dvc add` would hash it, and a genuine download must reproduce the md5 that data.dvc records.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from omegaconf import DictConfig

from soundmood.data.archive import (
    ArchiveError,
    Limits,
    Source,
    is_finder_litter,
    listing,
    open_source,
)
from soundmood.data.images import IMAGE_SUFFIXES, ImageError, open_bounded
from soundmood.data.layout import RAFDB_LABEL_NAMES, SPLITS
from soundmood.data.rafdb_release import ImportSettings, Item, detect, select
from soundmood.errors import UnsafeFileError
from soundmood.fileio import atomic_folder, file_kind


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


@dataclass
class Summary:
    layout: str
    counts: dict[str, Counter]
    dropped: dict[str, Counter]
    out: Path
    replaced: bool


def import_rafdb(source_path: Path, out: Path, settings: ImportSettings) -> Summary:
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
    source: Source, items: list[Item], tree: Path, settings: ImportSettings
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
    settings = ImportSettings.from_config(cfg)
    summary = import_rafdb(Path(args.source), Path(args.out), settings)
    for line in format_summary(summary, settings.classes):
        print(line)
    print("next: `soundmood validate`, then version the tree: dvc add data && dvc push")
    return 0
