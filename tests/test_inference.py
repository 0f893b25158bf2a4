"""soundmood.inference and `soundmood predict` on real photos: scikit-image's bundled photos (one
face in astronaut and camera, none in coffee, rocket, chelsea), RAF-DB test crops pasted into a
larger photo at known places, an EXIF-rotated JPEG and a corrupt file. The detector is the real
MTCNN and the models are real Keras models saved to .keras files."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from PIL import Image
from skimage import data as skdata
from skimage.transform import SimilarityTransform

from soundmood import schema
from soundmood.data.images import load_face
from soundmood.errors import ConfigError, UserError
from soundmood.inference import (
    ModelLoadError,
    classify,
    combine_mood,
    detect_faces,
    from_config,
    load_model,
    load_photo,
    predict_photo,
)
from soundmood.inference.detect import fit_similarity
from soundmood.inference.predict import NO_THRESHOLD_KNOWN, resolve_min_confidence
from soundmood.models import build
from tests.conftest import ROOT, compose_config

CLASSES = ["angry", "happy", "neutral", "sad", "surprised"]
SIZE = 64
# The astronaut's face (Eileen Collins) in skimage.data.astronaut(): x, y, w, h.
ASTRONAUT_FACE = (182, 64, 83, 107)


def iou(a: tuple, b: tuple) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / (aw * ah + bw * bh - w * h)


def coarse_model(seed: int = 3) -> keras.Model:
    """Deterministic and almost blind to a few pixels of framing: 4x4 block means of the face
    through a fixed linear map (blind to overall brightness, so that every class is predicted
    for some faces). Its labels survive re-detection, so they can be compared."""
    inputs = keras.Input((SIZE, SIZE, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.AveragePooling2D(SIZE // 4)(x)
    x = keras.layers.Flatten()(x)
    dense = keras.layers.Dense(len(CLASSES), activation="softmax")
    outputs = dense(x)
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 10.0, (48, len(CLASSES)))
    dense.set_weights([weights - weights.mean(axis=0), np.zeros(len(CLASSES))])
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(0)
    seed_cfg = compose_config(["model=seed_cnn"]).model
    build(seed_cfg, SIZE, len(CLASSES)).save(folder / "seed_cnn.keras")
    coarse_model().save(folder / "coarse.keras")
    return folder


@pytest.fixture(scope="module")
def cfg():
    """The real conf/ (smoke profile) with the inference group composed in."""
    defaults = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())["defaults"]
    listed = any(isinstance(item, dict) and "inference" in item for item in defaults)
    return compose_config([] if listed else ["+inference=default"])


@pytest.fixture(scope="module")
def coarse(models_dir: Path) -> keras.Model:
    return load_model(str(models_dir / "coarse.keras"))


def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut())


# --- settings -------------------------------------------------------------------------------


def test_the_schema_defaults_equal_the_config_file() -> None:
    """A caller without a config (the served model) detects as `soundmood predict` does."""
    conf = yaml.safe_load((ROOT / "conf" / "inference" / "default.yaml").read_text())
    assert schema.defaults("inference") == conf
    assert from_config(None).to_dict() == conf
    assert from_config(compose_config().inference) == from_config(None)


def test_min_confidence_and_confident_precision_are_checked_by_name() -> None:
    with pytest.raises(
        ConfigError, match=r"^inference\.min_confidence: 1\.5 is not in \[0\.0, 1\.0\] or n"
    ):
        from_config({"min_confidence": 1.5})
    with pytest.raises(ConfigError, match=r"^inference\.confident_precision: 0 is not in \(0"):
        from_config({"confident_precision": 0})
    assert from_config({"min_confidence": None}).min_confidence is None
    both = from_config({"min_confidence": 0.7, "confident_precision": 1})
    assert both.min_confidence == 0.7 and both.detector.min_confidence == 0.8  # not the detector's


def test_the_threshold_in_force(tmp_path: Path) -> None:
    """inference.min_confidence overrides; else the served model's; else train.json's for a
    .keras file; else none known (every answer confident)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {"inference": {"min_confidence": None}, "evaluate": {"reports_dir": str(tmp_path)}}
    )
    assert resolve_min_confidence(cfg, "m.keras", None).source == NO_THRESHOLD_KNOWN
    (tmp_path / "train.json").write_text(json.dumps({"min_confidence": 0.7}))
    assert resolve_min_confidence(cfg, "m.keras", None).value == 0.7
    assert resolve_min_confidence(cfg, "models:/m@c", None).value == 0.0  # not this model's file
    assert resolve_min_confidence(cfg, "models:/m@c", {"min_confidence": 0.4}).value == 0.4
    assert resolve_min_confidence(cfg, "models:/m@c", {}).value == 0.0  # logged before calibration
    cfg.inference.min_confidence = 0.2
    for uri, served in (("m.keras", None), ("models:/m@c", {"min_confidence": 0.4})):
        assert resolve_min_confidence(cfg, uri, served).value == 0.2
    cfg.inference.min_confidence = None
    (tmp_path / "train.json").write_text(json.dumps({"min_confidence": 7}))
    with pytest.raises(UserError, match=r"train\.json: min_confidence 7 is not a probability"):
        resolve_min_confidence(cfg, "m.keras", None)


def test_bad_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"inference\.crop\.method"):
        from_config({"crop": {"method": "stretch"}})
    with pytest.raises(ConfigError, match=r"^inference\.detector\.min_size: unknown key"):
        from_config({"detector": {"min_size": 3}})


# --- detection on real photos --------------------------------------------------------------


def test_one_face_in_astronaut_and_none_in_photos_without_people() -> None:
    faces = detect_faces(astronaut())
    assert len(faces) == 1
    assert iou(faces[0].box, ASTRONAUT_FACE) > 0.8 and faces[0].confidence > 0.99
    crop = faces[0].crop(SIZE)
    assert crop.shape == (SIZE, SIZE, 3) and crop.dtype == np.uint8
    # what the served model's detector hook receives: the RAF-DB-sized crop
    assert np.asarray(faces[0], dtype=np.uint8).shape == (100, 100, 3)
    for name in ("coffee", "rocket", "chelsea"):
        assert detect_faces(getattr(skdata, name)()) == [], name


def test_greyscale_alpha_and_arrays_find_the_same_face() -> None:
    rgb = astronaut()
    rgba = rgb.convert("RGBA")
    rgba.putalpha(200)
    for variant in (rgb.convert("L"), rgba, np.asarray(rgb)):
        faces = detect_faces(variant)
        assert len(faces) == 1 and iou(faces[0].box, ASTRONAUT_FACE) > 0.8


def test_large_photo_is_downscaled_for_detection_only() -> None:
    big = astronaut().resize((3000, 3000), Image.Resampling.BICUBIC)  # > detector.max_side
    # The 1280 px detection copy of this upscaled photo also gives a 0.91 "face" on the suit,
    # which the 0.9 default keeps (0.95 would lose 2-5% of real faces: docs/inference.md).
    strict = from_config({"detector": {"min_confidence": 0.95}})
    faces = detect_faces(big, strict)
    assert len(faces) == 1
    scaled = tuple(round(v * 3000 / 512) for v in ASTRONAUT_FACE)
    assert iou(faces[0].box, scaled) > 0.8
    small_crop = detect_faces(astronaut())[0].crop().astype(np.float32)
    assert np.abs(faces[0].crop().astype(np.float32) - small_crop).mean() < 12


def test_a_larger_min_face_size_still_finds_the_face_and_drops_smaller_ones() -> None:
    # mtcnn 1.0 itself finds nothing for min_face_size > 20 (its pyramid runs below P-Net's
    # window); detect_faces downscales the photo instead, so the key means what it says.
    photo = astronaut()
    for size in (40, 80):
        faces = detect_faces(photo, from_config({"detector": {"min_face_size": size}}))
        assert len(faces) == 1 and iou(faces[0].box, ASTRONAUT_FACE) > 0.8, size
        assert np.allclose(faces[0].landmarks, detect_faces(photo)[0].landmarks, atol=4), size
    small = photo.resize((128, 128), Image.Resampling.BILINEAR)  # the face is ~30 px wide
    assert len(detect_faces(small)) == 1
    assert detect_faces(small, from_config({"detector": {"min_face_size": 60}})) == []


def test_exif_rotated_jpeg_gives_boxes_in_the_upright_frame(tmp_path: Path) -> None:
    stored = astronaut().transpose(Image.Transpose.ROTATE_90)  # pixels lie on their side
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "sideways.jpg"
    stored.save(path, quality=95, exif=exif)
    upright = load_photo(path)
    assert upright.size == (512, 512)
    faces = detect_faces(upright)
    assert len(faces) == 1 and iou(faces[0].box, ASTRONAUT_FACE) > 0.8
    sideways = detect_faces(Image.open(path))  # pixels as stored: the face is elsewhere
    assert all(iou(f.box, ASTRONAUT_FACE) < 0.3 for f in sideways)


# --- several faces: detection, labels, mood -----------------------------------------------


# Frontal RAF-DB test faces that coarse_model() labels differently, each with a margin > 0.8.
GROUP = [
    "neutral/test_2512_aligned.jpg",
    "surprised/test_0994_aligned.jpg",
    "happy/test_2072_aligned.jpg",
    "neutral/test_2778_aligned.jpg",
    "happy/test_2185_aligned.jpg",
]


def group_photo(crops: list[Path]) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """The crops, enlarged to different sizes, pasted left to right onto a real photo wider than
    detector.max_side (so detection runs downscaled)."""
    photo = Image.fromarray(skdata.rocket()).resize((1320, 480))
    boxes = []
    x = 40
    for i, path in enumerate(crops):
        side = 140 + 30 * i
        face = Image.open(path).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
        y = 60 + 40 * (i % 2)
        photo.paste(face, (x, y))
        boxes.append((x, y, side, side))
        x += side + 50
    return photo, boxes


def framing_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of the two faces' 25x25 greyscale thumbnails (1: same framing)."""

    def thumb(x: np.ndarray) -> np.ndarray:
        grey = Image.fromarray(x).convert("L").resize((25, 25), Image.Resampling.BOX)
        flat = np.asarray(grey, dtype=np.float64).ravel()
        return flat - flat.mean()

    ta, tb = thumb(a), thumb(b)
    return float(ta @ tb / np.sqrt((ta @ ta) * (tb @ tb)))


def test_group_photo_finds_every_face_with_the_crop_level_labels(
    coarse: keras.Model, data_root: Path, cfg
) -> None:
    paths = [data_root / "test" / name for name in GROUP]
    crop_labels = classify(coarse, np.stack([load_face(p, SIZE) for p in paths]), True).argmax(1)
    assert len(set(crop_labels)) == len(paths)  # a face given another's label would show
    photo, boxes = group_photo(paths)
    result = predict_photo(coarse, photo, cfg)
    assert len(result.faces) == len(paths)
    for face, box, path, label in zip(result.faces, boxes, paths, crop_labels, strict=True):
        assert iou(face.box, box) > 0.6, (path.name, face.box, box)
        assert face.label == CLASSES[label], path.name
        assert abs(sum(face.probabilities.values()) - 1) < 1e-4
    # the crops reproduce the framing of the RAF-DB crops they came from (a crop only 15% looser
    # scores about 0.2 here)
    faces = detect_faces(photo, cfg.inference)
    similarity = [
        framing_similarity(f.crop(), np.asarray(Image.open(p).convert("RGB")))
        for f, p in zip(faces, paths, strict=True)
    ]
    assert np.mean(similarity) > 0.6, similarity
    areas = np.array([f.box[2] * f.box[3] for f in result.faces])
    probs = np.array([[f.probabilities[c] for c in CLASSES] for f in result.faces])
    expected = (areas[:, None] * probs).sum(axis=0) / areas.sum()
    assert result.mood == CLASSES[int(expected.argmax())]
    assert np.allclose([result.mood_probabilities[c] for c in CLASSES], expected, atol=1e-6)


def test_photo_without_faces_has_null_mood(coarse: keras.Model, cfg) -> None:
    result = predict_photo(coarse, Image.fromarray(skdata.coffee()), cfg)
    assert result.faces == [] and result.mood is None and result.mood_probabilities is None
    assert result.to_json()["mood"] is None
    assert result.to_json()["mood_reason"] == result.mood_reason == "no face found"


def test_only_confident_faces_make_the_mood(coarse: keras.Model, data_root: Path, cfg) -> None:
    """Faces under min_confidence are reported but left out of the mood; with none above it the
    mood is null and the reason names the best face's probability and the threshold."""
    photo, _ = group_photo([data_root / "test" / name for name in GROUP])
    result = predict_photo(coarse, photo, cfg, min_confidence=0.9)
    probs = np.array([[f.probabilities[c] for c in CLASSES] for f in result.faces])
    tops = probs.max(axis=1)
    sure = tops >= 0.9
    assert [f.confident for f in result.faces] == list(sure)
    assert 0 < sure.sum() < len(sure), tops  # GROUP's faces straddle 0.9 under coarse_model
    areas = np.array([f.box[2] * f.box[3] for f in result.faces])[sure]
    expected = (areas[:, None] * probs[sure]).sum(axis=0) / areas.sum()
    assert np.allclose([result.mood_probabilities[c] for c in CLASSES], expected, atol=1e-6)
    assert result.mood == CLASSES[int(expected.argmax())] and result.mood_reason is None

    above = float(tops.max() + (1 - tops.max()) / 2)
    none = predict_photo(coarse, photo, cfg, min_confidence=above)
    assert len(none.faces) == len(GROUP) and not any(f.confident for f in none.faces)
    assert none.mood is None and none.mood_probabilities is None
    match = re.fullmatch(
        r"no confident face: top probability (\S+) < min_confidence (\S+)", none.mood_reason
    )
    assert match, none.mood_reason
    assert float(match[1]) == pytest.approx(tops.max(), abs=0.01) and match[1] != match[2]
    line = none.to_json()
    assert line["mood"] is None and line["mood_reason"] == none.mood_reason
    assert line["min_confidence"] == above and [f["confident"] for f in line["faces"]] == [
        False
    ] * len(GROUP)


def test_mood_rules() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    areas = np.array([100, 300])
    assert np.allclose(combine_mood(probs, areas, "area"), [0.375, 0.625])
    assert np.allclose(combine_mood(probs, areas, "uniform"), [0.55, 0.45])
    assert np.allclose(combine_mood(probs, areas, "largest"), [0.2, 0.8])
    assert combine_mood(np.zeros((0, 2)), np.zeros(0), "area") is None


# --- the command -----------------------------------------------------------------------------


def photo_folder(folder: Path, corrupt: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    astronaut().save(folder / "astronaut.png")
    Image.fromarray(skdata.coffee()).save(folder / "coffee.jpg", quality=90)
    if corrupt:
        buffer = io.BytesIO()
        astronaut().save(buffer, format="JPEG")
        (folder / "broken.jpg").write_bytes(buffer.getvalue()[:300])  # truncated
    return folder


def run_predict(
    args: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    train_report: dict | None = None,
) -> tuple[int, list[dict], str]:
    """`soundmood predict ARGS` in a project holding the committed params.yaml and, when given,
    reports/train.json = `train_report` (never the checkout's own reports/)."""
    from soundmood.cli import main

    with tempfile.TemporaryDirectory() as project, monkeypatch.context() as patch:
        shutil.copy(ROOT / "params.yaml", project)
        if train_report is not None:
            (Path(project) / "reports").mkdir()
            (Path(project) / "reports" / "train.json").write_text(json.dumps(train_report))
        patch.chdir(project)
        code = main(["predict", *args])
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines() if line.strip().startswith("{")]
    return code, lines, out.err + ("" if "--json" in args else out.out)


def test_predict_withholds_the_mood_when_no_face_is_confident(
    tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A .keras model judged at the min_confidence train chose (reports/train.json): the
    astronaut's face (top probability 0.50 under coarse_model) is below 0.6, so no mood."""
    folder = photo_folder(tmp_path / "photos", corrupt=False)
    model = str(models_dir / "coarse.keras")
    for train_report, astronaut_mood in (({"min_confidence": 0.6}, False), ({}, True)):
        code, lines, _ = run_predict(
            [str(folder), "--json", "--model", model], monkeypatch, capsys, train_report
        )
        assert code == 0
        by_name = {Path(line["path"]).name: line for line in lines}
        face = by_name["astronaut.png"]["faces"][0]
        assert face["confident"] is astronaut_mood
        assert (by_name["astronaut.png"]["mood"] in CLASSES) is astronaut_mood
        assert by_name["coffee.jpg"]["mood_reason"] == "no face found"
    line = run_predict(
        [str(folder), "--json", "--model", model], monkeypatch, capsys, {"min_confidence": 0.6}
    )[1][0]
    top = max(face["probabilities"].values())
    assert line["min_confidence"] == 0.6 and line["mood"] is None
    assert (
        line["mood_reason"] == f"no confident face: top probability {top:.2f} < min_confidence 0.60"
    )
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps the table to the terminal otherwise
    code, _, table = run_predict(
        [str(folder), "--model", model], monkeypatch, capsys, {"min_confidence": 0.6}
    )
    assert code == 0 and "no confident face" in table and "(not confident)" in table
    assert "min_confidence 0.60 (reports/train.json)" in table  # where the threshold came from


def test_a_corrupt_file_is_named_and_the_batch_goes_on(
    tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    folder = photo_folder(tmp_path / "photos")
    code, lines, err = run_predict(
        [str(folder), "--json", "--model", str(models_dir / "coarse.keras")], monkeypatch, capsys
    )
    assert code == 0
    by_name = {Path(line["path"]).name: line for line in lines}
    assert sorted(by_name) == ["astronaut.png", "broken.jpg", "coffee.jpg"]
    assert "broken.jpg" in by_name["broken.jpg"]["error"] and "broken.jpg" in err
    assert len(by_name["astronaut.png"]["faces"]) == 1 and by_name["astronaut.png"]["mood"]
    assert by_name["coffee.jpg"]["faces"] == [] and by_name["coffee.jpg"]["mood"] is None

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"not an image")
    (bad / "b.png").write_bytes(b"")
    code, lines, _ = run_predict(
        [str(bad), "--json", "--model", str(models_dir / "coarse.keras")], monkeypatch, capsys
    )
    assert code == 2 and len(lines) == 2 and all(line["error"] for line in lines)


def test_missing_model_and_empty_folder_exit_2(
    tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    folder = photo_folder(tmp_path / "photos", corrupt=False)
    code, _, err = run_predict(
        [str(folder), "--model", str(tmp_path / "nope.keras")], monkeypatch, capsys
    )
    assert code == 2 and "nope.keras" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_predict(
        [str(tmp_path / "empty"), "--model", str(models_dir / "coarse.keras")], monkeypatch, capsys
    )
    assert code == 2 and "no photos" in err
    with pytest.raises(ModelLoadError):
        load_model("not-a-model-anywhere")


@pytest.mark.slow  # over 5 s: left out of make test-fast
def test_predict_command_end_to_end(tmp_path: Path, models_dir: Path) -> None:
    """The installed `soundmood predict` in a fresh process: JSON lines and annotated copies."""
    folder = photo_folder(tmp_path / "photos", corrupt=False)
    out_dir = tmp_path / "annotated"
    project = tmp_path / "project"  # params.yaml, and none of the checkout's reports/
    project.mkdir()
    shutil.copy(ROOT / "params.yaml", project)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "soundmood.cli",
            "predict",
            str(folder),
            "--json",
            "--model",
            str(models_dir / "seed_cnn.keras"),
            "--annotate",
            str(out_dir),
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [Path(line["path"]).name for line in lines] == ["astronaut.png", "coffee.jpg"]
    face = lines[0]["faces"][0]
    assert iou(face["box"], ASTRONAUT_FACE) > 0.8 and face["label"] in CLASSES
    assert set(face["probabilities"]) == set(CLASSES) and lines[0]["mood"] in CLASSES
    for line in lines:
        annotated = Image.open(line["annotated"])
        assert annotated.size == (line["width"], line["height"])
    assert sorted(p.name for p in out_dir.iterdir()) == ["astronaut.png", "coffee.jpg"]
    original = np.asarray(astronaut(), dtype=np.int16)
    drawn = np.asarray(Image.open(out_dir / "astronaut.png").convert("RGB"), dtype=np.int16)
    x, y, w, _ = face["box"]
    assert np.abs(drawn[y, x : x + w] - original[y, x : x + w]).sum() > 0  # the box's top edge


# --- models from MLflow ----------------------------------------------------------------------


@pytest.mark.slow
def test_model_loads_from_mlflow_uris(models_dir: Path, mlflow_uri: str) -> None:
    import mlflow

    path = models_dir / "coarse.keras"
    reference = load_model(str(path))
    x = np.asarray(astronaut().resize((SIZE, SIZE)))[None]
    expected = classify(reference, x, tta_flip=False)

    class Served(mlflow.pyfunc.PythonModel):
        """Stands for soundmood.serving's pyfunc: its .keras file is an artifact."""

        def predict(self, context, model_input, params=None):
            return model_input

    mlflow.set_experiment("inference-test")
    with mlflow.start_run() as run:
        mlflow.keras.log_model(reference, name="keras_flavor")
        mlflow.pyfunc.log_model(
            name="pyfunc", python_model=Served(), artifacts={"keras_model": str(path)}
        )
    version = mlflow.register_model(f"runs:/{run.info.run_id}/pyfunc", "soundmood-test")
    mlflow.MlflowClient().set_registered_model_alias("soundmood-test", "champion", version.version)
    for uri in (f"runs:/{run.info.run_id}/keras_flavor", "models:/soundmood-test@champion"):
        model = load_model(uri)
        assert np.allclose(classify(model, x, tta_flip=False), expected, atol=1e-6), uri
    with pytest.raises(ModelLoadError, match="soundmood-test@nope"):
        load_model("models:/soundmood-test@nope")


# --- what a user has is never lost; every refusal is one line (docs/inference.md) ------------


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def test_annotate_never_replaces_a_photo_or_mixes_copies_with_them(
    tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    folder = photo_folder(tmp_path / "photos", corrupt=False)
    before = snapshot(tmp_path)
    # refused before the model loads: this model does not exist, and the error is not about it
    missing_model = str(tmp_path / "not-loaded.keras")
    refusals = {
        folder: f"is the input folder {folder}: its copies would sit among its photos and",
        folder / "out": f"lies inside the input folder {folder}: its copies would",
    }
    for out_dir, reason in refusals.items():
        code, lines, err = run_predict(
            [str(folder), "--model", missing_model, "--annotate", str(out_dir)], monkeypatch, capsys
        )
        assert code == 2 and lines == []
        assert error_lines(err) == [
            f"error: --annotate {out_dir}: {reason} be read as photos on the next run; name a "
            "folder outside it"
        ]
        assert snapshot(tmp_path) == before
    # a photo named on its own, annotated into its own folder: the copy's name is the photo's
    photo = folder / "astronaut.png"
    code, _, err = run_predict(
        [str(photo), "--model", missing_model, "--annotate", str(folder)], monkeypatch, capsys
    )
    assert code == 2 and error_lines(err) == [
        f"error: --annotate {folder}: {photo} already exists; annotated copies never replace "
        "a file: remove them or name another folder"
    ]
    assert snapshot(tmp_path) == before

    # a hidden folder inside is not read as input, so it is allowed; a second run into the same
    # folder is refused, naming the first clash, and changes nothing
    model = str(models_dir / "coarse.keras")
    hidden = folder / ".annotated"
    code, lines, _ = run_predict(
        [str(folder), "--json", "--model", model, "--annotate", str(hidden)], monkeypatch, capsys
    )
    assert code == 0 and [line["annotated"] for line in lines] == [
        str(hidden / "astronaut.png"),
        str(hidden / "coffee.jpg"),
    ]
    assert sorted(p.name for p in hidden.iterdir()) == ["astronaut.png", "coffee.jpg"]
    after_first = snapshot(tmp_path)
    assert {k: v for k, v in after_first.items() if not k.startswith("photos/.")} == before
    code, lines, err = run_predict(
        [str(folder), "--model", model, "--annotate", str(hidden)], monkeypatch, capsys
    )
    assert code == 2 and error_lines(err) == [
        f"error: --annotate {hidden}: {hidden / 'astronaut.png'} (and 1 more) already exist; "
        "annotated copies never replace a file: remove them or name another folder"
    ]
    assert snapshot(tmp_path) == after_first


def test_annotate_pointing_at_a_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    folder = photo_folder(tmp_path / "photos", corrupt=False)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    for out_dir, where in (
        (notes, "is"),
        (notes / "sub", f"lies under {notes}, which is"),
    ):
        code, _, err = run_predict(
            [str(folder), "--model", str(tmp_path / "x.keras"), "--annotate", str(out_dir)],
            monkeypatch,
            capsys,
        )
        assert code == 2 and error_lines(err) == [
            f"error: --annotate {out_dir}: {where} a file, not a folder; name a new or empty folder"
        ]
        assert notes.read_text() == "mine\n"


def test_a_copy_is_created_exclusively(tmp_path: Path) -> None:
    """The race plan() cannot see: a file that appears after the check is never overwritten."""
    from soundmood.inference.annotate import AnnotateError, save

    target = tmp_path / "astronaut.png"
    target.write_bytes(b"appeared meanwhile")
    with pytest.raises(AnnotateError, match=rf"{target} appeared while predict ran"):
        save(astronaut(), target)
    assert target.read_bytes() == b"appeared meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["astronaut.png"]  # no partial left
    fresh = tmp_path / "new.png"
    save(astronaut(), fresh)
    assert Image.open(fresh).size == (512, 512)


def test_a_broken_keras_file_is_named_as_such(
    tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    folder = photo_folder(tmp_path / "photos", corrupt=False)
    whole = (models_dir / "coarse.keras").read_bytes()
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(whole[: len(whole) // 2])
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0xFF  # inside the weights: the zip's CRC check fails
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(bytes(flipped))
    for model, reason in (
        (truncated, "not a zip archive, as a .keras file is)"),
        (corrupt, "BadZipFile: Bad CRC-32 for file 'model.weights.h5')"),
    ):
        code, _, err = run_predict([str(folder), "--model", str(model)], monkeypatch, capsys)
        assert code == 2 and error_lines(err) == [
            f"error: --model {model}: {model} is not a readable Keras model (truncated or "
            f"corrupt: {reason}"
        ], err


def test_a_missing_photo_is_said_not_to_exist(
    tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "nope.jpg"
    code, lines, err = run_predict(
        [str(missing), "--json", "--model", str(models_dir / "coarse.keras")], monkeypatch, capsys
    )
    assert code == 2 and error_lines(err) == [f"error: {missing}: does not exist"]
    assert lines[0]["error"] == f"{missing}: does not exist"


def test_the_alignment_fit_is_skimage_s_similarity_transform() -> None:
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 300, size=(5, 2))
    dst = src @ np.array([[0.3, -0.1], [0.1, 0.3]]) + [12.0, -4.0] + rng.normal(0, 2, (5, 2))
    reference = SimilarityTransform.from_estimate(src, dst)
    assert np.allclose(fit_similarity(src, dst), reference.params[:2], atol=1e-6)
