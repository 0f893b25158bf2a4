"""External evaluation sets: the class-labelled folder reader (soundmood.data.labelled), the
scorer (soundmood.external), its MLflow records and the registry gate's floor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from soundmood.data import labelled
from soundmood.errors import ConfigError

CLASSES = ("angry", "happy", "neutral", "sad", "surprised")
KEY = "evaluate.external"


def _image(path: Path, shade: int, size: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(shade)
    pixels = np.clip(rng.normal(shade, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _tree(root: Path, counts: dict[str, int]) -> Path:
    for i, (folder, n) in enumerate(counts.items()):
        for k in range(n):
            _image(root / folder / f"{k}.png", 30 * i + k)
    return root


def _folder(root: Path, **entry: object) -> labelled.LabelledFolder:
    return labelled.parse_sets({"mine": {"path": str(root), **entry}}, KEY, CLASSES)[0]


def test_parse_sets_defaults_and_label_map(tmp_path: Path) -> None:
    sets = labelled.parse_sets(
        {
            "a": {"path": "x"},
            "b": {"path": "y", "detect_faces": True, "label_map": {"anger": "angry", "x": None}},
        },
        KEY,
        CLASSES,
    )
    assert [(s.name, s.path, s.detect_faces, s.key) for s in sets] == [
        ("a", Path("x"), False, "evaluate.external.a"),
        ("b", Path("y"), True, "evaluate.external.b"),
    ]
    assert sets[1].label_map == {"anger": "angry", "x": None}
    assert labelled.parse_sets(None, KEY) == [] and labelled.parse_sets({}, KEY) == []


@pytest.mark.parametrize(
    ("mapping", "named"),
    [
        ({"Bad-Name": {"path": "x"}}, "evaluate.external.Bad-Name: set name"),
        ({"a": {"detect_faces": True}}, "evaluate.external.a.path: is missing"),
        ({"a": {"path": "x", "detect_faces": "yes"}}, "evaluate.external.a.detect_faces:"),
        ({"a": {"path": "x", "label_map": [1]}}, "evaluate.external.a.label_map:"),
        ({"a": {"path": "x", "label_map": {"f": "joy"}}}, "evaluate.external.a.label_map.f:"),
        ({"a": {"path": "x", "colour": 1}}, "evaluate.external.a.colour: unknown key"),
        ({"a": "x"}, "evaluate.external.a: 'x' is not a mapping"),
        (["x"], "evaluate.external: ['x'] is not a mapping"),
    ],
)
def test_parse_sets_names_the_bad_key(mapping: object, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        labelled.parse_sets(mapping, KEY, CLASSES)
    assert named in str(info.value)


def test_list_images_with_a_missing_class_and_label_map(tmp_path: Path) -> None:
    root = _tree(tmp_path / "set", {"anger": 2, "happy": 3, "sad": 1, "fear": 2})
    (root / "happy" / ".DS_Store").write_bytes(b"x")
    (root / "README.txt").write_text("beside the class folders: ignored")
    folder = _folder(root, label_map={"anger": "angry", "fear": None})
    images = labelled.list_images(folder, CLASSES)
    assert images.labels == [0, 0, 1, 1, 1, 3]
    assert [p.parent.name for p in images.paths] == ["anger"] * 2 + ["happy"] * 3 + ["sad"]
    assert images.missing == ["neutral", "surprised"]
    assert images.refused == []
    # the digest follows the files' bytes and classes, not where the set lies
    again = labelled.list_images(_folder(root, label_map={"anger": "angry", "fear": None}), CLASSES)
    assert again.digest == images.digest
    _image(root / "sad" / "0.png", 200)
    assert labelled.list_images(folder, CLASSES).digest != images.digest


def test_list_images_names_a_wrong_class_folder(tmp_path: Path) -> None:
    root = _tree(tmp_path / "set", {"happy": 1, "joy": 1, "Sad": 1})
    with pytest.raises(ConfigError) as info:
        labelled.list_images(_folder(root), CLASSES)
    message = str(info.value)
    assert "evaluate.external.mine" in message and "Sad, joy" in message
    assert "angry, happy, neutral, sad, surprised" in message


def test_list_images_refuses_links(tmp_path: Path) -> None:
    root = _tree(tmp_path / "set", {"happy": 1})
    (root / "happy" / "link.png").symlink_to(root / "happy" / "0.png")
    images = labelled.list_images(_folder(root), CLASSES)
    assert [p.name for p in images.paths] == ["0.png"]
    assert [(p.name, why) for p, why in images.refused] == [
        ("link.png", "is a symbolic link, not a regular file")
    ]
