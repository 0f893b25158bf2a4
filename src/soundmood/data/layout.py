"""The on-disk layout of the data tree: <root>/<split>/<class>/<image>."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Sample:
    path: Path
    split: str
    label: int


def list_split(root: Path, split: str, classes: list[str]) -> list[Sample]:
    """Every file under <root>/<split>/<class>/, sorted so that order never depends on the disk."""
    samples = []
    for label, name in enumerate(classes):
        folder = root / split / name
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        samples.extend(Sample(path, split, label) for path in files)
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
