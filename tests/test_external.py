"""External evaluation sets: the class-labelled folder reader (soundmood.data.labelled), the
scorer (soundmood.external), its MLflow records and the registry gate's floor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from soundmood import model_card
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


# --- the scorer ---------------------------------------------------------------------------------


def _by_shade(batch: np.ndarray) -> np.ndarray:
    """A deterministic forward: class = mean intensity // 51 (one-hot), the mirror agreeing."""
    picked = np.clip(batch.reshape(len(batch), -1).mean(axis=1) // 51, 0, 4).astype(int)
    return np.eye(len(CLASSES), dtype=np.float32)[picked]


def _flat(path: Path, shade: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), (shade, shade, shade)).save(path)
    return path


def _scored_set(root: Path) -> tuple[list[int], list[int]]:
    """angry: 3 faces read as angry, angry, happy; happy: 2 read as happy, sad; sad: 1 as sad;
    neutral and surprised have no folder. Returns (true, predicted) labels."""
    for name, shades in {"anger": [10, 20, 60], "happy": [70, 160], "sad": [170]}.items():
        for k, shade in enumerate(shades):
            _flat(root / name / f"{k}.png", shade)
    return [0, 0, 0, 1, 1, 3], [0, 0, 1, 1, 3, 3]


def test_scores_match_sklearn_with_missing_class_and_unreadable_files(tmp_path: Path) -> None:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    from soundmood import external

    root = tmp_path / "set"
    y_true, y_pred = _scored_set(root)
    (root / "happy" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "sad" / "notes.txt").write_text("not an image")
    folder = _folder(root, label_map={"anger": "angry"})
    with pytest.warns(UserWarning, match="skipped") as caught:
        report = external.Scorer(_by_shade, CLASSES, 16, 4, True).score(folder)
    assert report["images"] == 6
    assert report["accuracy"] == round(accuracy_score(y_true, y_pred), 4)
    present = [0, 1, 3]
    expected_f1 = f1_score(y_true, y_pred, labels=present, average="macro")
    assert report["macro_f1"] == round(expected_f1, 4)
    assert report["recall"] == {
        "angry": round(2 / 3, 4),
        "happy": 0.5,
        "neutral": None,
        "sad": 1.0,
        "surprised": None,
    }
    assert report["confusion"]["labels"] == list(CLASSES)
    assert (
        report["confusion"]["matrix"] == confusion_matrix(y_true, y_pred, labels=range(5)).tolist()
    )
    assert report["missing_classes"] == ["neutral", "surprised"]
    assert "detected" not in report and report["digest"] and report["path"] == str(root)
    unreadable = report["unreadable"]
    assert len(unreadable) == 2
    assert any("broken.png" in u for u in unreadable) and any("notes.txt" in u for u in unreadable)
    assert sum("broken.png" in str(w.message) for w in caught) == 1


def test_detect_faces_counts_an_image_without_a_face_as_a_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from soundmood import external

    class Found:
        def __init__(self, shade: int, confidence: float) -> None:
            self.shade, self.confidence = shade, confidence

        def crop(self, size: int) -> np.ndarray:
            return np.full((size, size, 3), self.shade, dtype=np.uint8)

    def detect(photo: Image.Image, settings: object) -> list[Found]:
        shade = int(np.asarray(photo).mean())
        if shade > 200:
            return []  # no face in the brightest photos
        return [Found(255, 0.91), Found(shade, 0.99)]  # the most confident face is the one read

    monkeypatch.setattr(external, "detect_faces", detect)
    root = tmp_path / "set"
    _flat(root / "angry" / "0.png", 10)
    _flat(root / "angry" / "1.png", 250)
    _flat(root / "happy" / "0.png", 60)
    _flat(root / "happy" / "1.png", 240)
    report = external.Scorer(_by_shade, CLASSES, 16, 2, False).score(
        _folder(root, detect_faces=True)
    )
    assert report["detected"] == 0.5 and report["accuracy"] == 0.5
    assert report["confusion"]["labels"] == [*CLASSES, "no_face"]
    assert report["confusion"]["matrix"][:2] == [[1, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 1]]
    assert report["recall"]["angry"] == 0.5


def test_an_absent_folder_is_skipped_with_a_warning(tmp_path: Path) -> None:
    from soundmood import external

    root = tmp_path / "set"
    _scored_set(root)
    sets = labelled.parse_sets(
        {
            "gone": {"path": str(tmp_path / "nowhere")},
            "here": {"path": str(root), "label_map": {"anger": "angry"}},
        },
        KEY,
        CLASSES,
    )
    with pytest.warns(UserWarning, match=r"evaluate\.external\.gone: .*nowhere does not exist"):
        result = external.Scorer(_by_shade, CLASSES, 16, 4, False).score_all(sets)
    assert result["sets"]["gone"] == {
        "skipped": "folder does not exist",
        "path": str(tmp_path / "nowhere"),
    }
    assert result["sets"]["here"]["images"] == 6
    metrics = model_card.external_figures(result)
    assert not any(k.startswith("external_gone_") for k in metrics)
    assert metrics["external_here_accuracy"] == result["sets"]["here"]["accuracy"]
    assert metrics["external_here_sad_recall"] == 1.0
    assert "external_here_neutral_recall" not in metrics  # a missing class has no recall
    path = external.write_report(result, tmp_path / "reports")
    assert path.name == "external.json"
    assert "skipped" in external.summary(result["sets"]["gone"])


def test_the_report_is_written_when_no_set_is_configured(smoke_cfg) -> None:
    import json

    from soundmood import external

    assert smoke_cfg.evaluate.external == {}
    result, path = external.run(smoke_cfg, _by_shade)
    assert result == {"sets": {}} and json.loads(path.read_text()) == {"sets": {}}


def test_the_stage_check_names_a_bad_set(smoke_cfg) -> None:
    from soundmood import external

    smoke_cfg.evaluate.external = {"mine": {"path": "x", "label_map": {"joy": "glad"}}}
    with pytest.raises(ConfigError, match=r"evaluate\.external\.mine\.label_map\.joy"):
        external.configured(smoke_cfg)


@pytest.mark.slow
def test_mlflow_gets_each_set_as_a_dataset_input_with_its_metrics(
    tmp_path: Path, mlflow_uri: str
) -> None:
    import mlflow

    from soundmood import external

    root = tmp_path / "set"
    _scored_set(root)
    folder = _folder(root, label_map={"anger": "angry"})
    result = external.Scorer(_by_shade, CLASSES, 16, 4, False).score_all([folder])
    path = external.write_report(result, tmp_path / "reports")
    mlflow.set_experiment("external-sets")  # this test's store, not an id an earlier test left
    with mlflow.start_run() as run:
        external.log_to_mlflow(result, path)
    logged = mlflow.get_run(run.info.run_id)
    inputs = logged.inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [
        ("external-mine", result["sets"]["mine"]["digest"])
    ]
    assert [t.value for t in inputs[0].tags if t.key == "mlflow.data.context"] == ["external"]
    assert logged.data.metrics["external_mine_accuracy"] == result["sets"]["mine"]["accuracy"]
    assert logged.data.metrics["external_mine_macro_f1"] == result["sets"]["mine"]["macro_f1"]
    artifacts = mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")
    assert [a.path for a in artifacts] == ["evaluation/external.json"]


# --- the registry -------------------------------------------------------------------------------


def test_register_copies_external_figures_into_version_tags(tmp_path: Path) -> None:
    from soundmood import external
    from soundmood.registry.commands import external_tags

    assert external_tags(tmp_path) == {}
    result = {"sets": {"mine": {"accuracy": 0.75, "macro_f1": 0.5, "recall": {"happy": 1.0}}}}
    external.write_report(result, tmp_path)
    assert external_tags(tmp_path) == {
        "external_mine_accuracy": 0.75,
        "external_mine_macro_f1": 0.5,
        "external_mine_happy_recall": 1.0,
    }


@pytest.mark.parametrize(
    ("floors", "passed", "said"),
    [
        ({}, None, None),
        ({"mine": 0.7}, True, "mine 0.7500 >= 0.7"),
        ({"mine": 0.8}, False, "mine 0.7500 < 0.8"),
        ({"mine": 0.7, "theirs": 0.5}, False, "theirs: no external_theirs_accuracy"),
    ],
)
def test_gate_external_floor(floors: dict, passed: bool | None, said: str | None) -> None:
    from omegaconf import OmegaConf

    from soundmood.registry.gate import RULES, Facts, external_floor

    assert external_floor in RULES
    tags = {"external_mine_accuracy": "0.75", "external_mine_happy_recall": "1.0"}
    rules = OmegaConf.create({"min_external_accuracy": floors})
    check = external_floor(Facts.from_tags("3", tags), None, rules)
    if passed is None:
        assert check is None
        return
    assert check.passed is passed and said in check.message
    if not passed:
        assert "registry.min_external_accuracy" in check.message


def test_gate_external_floor_names_a_bad_floor() -> None:
    from omegaconf import OmegaConf

    from soundmood.registry.gate import Facts, external_floor

    rules = OmegaConf.create({"min_external_accuracy": {"mine": "high"}})
    with pytest.raises(ConfigError, match=r"registry\.min_external_accuracy\.mine"):
        external_floor(Facts.from_tags("3", {}), None, rules)
