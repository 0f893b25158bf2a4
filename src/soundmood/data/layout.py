"""The on-disk layout of the data tree: <root>/<split>/<class>/<image>."""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from soundmood.errors import UnsafeFileError
from soundmood.fileio import file_kind

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Sample:
    path: Path
    split: str
    label: int


def list_split(root: Path, split: str, classes: list[str]) -> list[Sample]:
    """Every file under <root>/<split>/<class>/, sorted so that order never depends on the disk.
    Only regular files are taken, judged by lstat (a link is never followed); anything else there
    (a link, a folder, a pipe, a symlinked class folder) raises UnsafeFileError naming it rather
    than being skipped silently. `validate` runs first in the pipeline and lists them all."""
    samples, refused = [], []
    for label, name in enumerate(classes):
        folder = root / split / name
        if folder.is_symlink():
            refused.append(f"{folder}: is a symbolic link to a folder; links are never followed")
            continue
        if not folder.is_dir():
            continue
        files = []
        for path in sorted(folder.iterdir()):
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode):
                files.append(path)
            else:
                refused.append(f"{path}: is {file_kind(mode)}, not a regular file")
        samples.extend(Sample(path, split, label) for path in files)
    if refused:
        lines = "\n".join(f"  {line}" for line in refused[:20])
        more = f"\n  ... and {len(refused) - 20} more" if len(refused) > 20 else ""
        raise UnsafeFileError(
            f"{root / split}: only regular files are read; run `soundmood validate` for every "
            f"problem:\n{lines}{more}"
        )
    return samples


def data_version(dvc_file: Path = Path("data.dvc")) -> str:
    """The md5 DVC records for the data tree: the data version every run is tied to."""
    import yaml

    if not dvc_file.exists():
        return "unversioned"
    outs = yaml.safe_load(dvc_file.read_text()).get("outs", [])
    return str(outs[0]["md5"]).removesuffix(".dir") if outs else "unversioned"


# RAF-DB basic's seven labels (EmoLabel/list_patition_label.txt); conf data.rafdb_labels maps the
# ones we keep to our classes.
RAFDB_LABEL_NAMES = {
    1: "surprise",
    2: "fear",
    3: "disgust",
    4: "happiness",
    5: "sadness",
    6: "anger",
    7: "neutral",
}
