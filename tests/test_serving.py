"""The served pyfunc (soundmood.serving): a real Keras model logged by evaluate.log_model into a
real SQLite MLflow store, loaded in-process, in a process without this repository on its path,
and served by a real `mlflow models serve` answering HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from soundmood import registry
from soundmood.data.images import load_face
from soundmood.inference.predict import load_predictor
from tests.conftest import DATA_ROOT, ROOT, compose_config

SIZE = 32  # the smallest input that keeps the test fast; load_face resizes RAF-DB's 100 px
SERVER_START_S = 180
MODEL_URI = "models:/soundmood-fer@champion"


def tiny_config() -> DictConfig:
    return compose_config(["model=seed_cnn", f"data.image_size={SIZE}", "evaluate.batch_size=8"])


def build_tiny_model():
    """A real (untrained, seeded) seed_cnn at 32 px: what the pyfunc wraps is the point here,
    not its accuracy."""
    from soundmood.fitting import compile_model, configure_tensorflow
    from soundmood.models import build

    cfg = tiny_config()
    configure_tensorflow(2, cfg.seed)  # seeds the initial weights too
    model = build(cfg.model, SIZE, len(cfg.data.classes))
    compile_model(model, cfg.train, len(cfg.data.classes), 1)  # as trained models are saved
    return model


@pytest.fixture(scope="module")
def keras_model():
    return build_tiny_model()


def face_examples(n: int = 2) -> np.ndarray:
    paths = sorted((DATA_ROOT / "test" / "happy").glob("*.jpg"))[:n]
    return np.stack([load_face(p, SIZE) for p in paths])


def raf_jpeg(label: str = "happy", index: int = 0) -> bytes:
    return sorted((DATA_ROOT / "test" / label).glob("*.jpg"))[index].read_bytes()


def log_in_run(model, cfg: DictConfig) -> tuple[str, str]:
    """A real run holding the served model as evaluate logs it: (run id, model URI)."""
    from soundmood import evaluate, tracking

    tracking.setup(cfg)
    with mlflow.start_run() as run:
        uri = evaluate.log_model(model, cfg, face_examples())
    return run.info.run_id, uri


def champion_store(model, cfg: DictConfig) -> str:
    """Log, register and promote one version; returns its models:/ URI."""
    run_id, uri = log_in_run(model, cfg)
    metrics = {"accuracy": 0.6, "macro_f1": 0.6, **{f"{c}_recall": 0.6 for c in cfg.data.classes}}
    robust = {f"robust_{name}_accuracy": 0.6 for name in cfg.evaluate.conditions}
    tags = registry.version_tags(cfg, run_id, metrics, "md5-serving-test", 10, robust)
    mv = registry.register(cfg, uri, run_id, tags)
    assert registry.promote(cfg, mv.version).promote
    return uri


@pytest.fixture
def store(
    mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_root: Path
) -> Path:
    monkeypatch.chdir(tmp_path)  # the store's artifacts (./mlruns) go under tmp_path
    return tmp_path


# --- in-process ---------------------------------------------------------------------------------


def test_pyfunc_decodes_images_like_training_and_matches_the_keras_model(store, keras_model):
    from soundmood.evaluate import predict_proba
    from soundmood.serving import encode_png

    cfg = tiny_config()
    _, uri = log_in_run(keras_model, cfg)
    model = mlflow.pyfunc.load_model(uri)
    jpeg = raf_jpeg()
    png = encode_png(load_face(raf_jpeg("sad"), 100))  # a PNG (lossless copy of a RAF-DB face)
    out = model.predict(pd.DataFrame({"image": [jpeg, png]}))

    assert list(out.columns) == [*cfg.data.classes, "label", "confident"]
    probs = out[list(cfg.data.classes)].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert set(out["label"]) <= set(cfg.data.classes)
    faces = np.stack([load_face(jpeg, SIZE), load_face(png, SIZE)])
    expected = predict_proba(keras_model, faces, batch_size=8, tta_flip=cfg.evaluate.tta_flip)
    np.testing.assert_allclose(probs, expected, atol=1e-5)

    inputs = model.metadata.get_input_schema()
    assert inputs.input_names() == ["image"] and inputs.input_types()[0].name == "binary"
    assert model.metadata.flavors["python_function"]["config"]["detect_faces"] is False


def test_evaluate_scores_an_onnx_export_only_if_it_predicts_what_the_keras_model_does(
    keras_model, tmp_path
):
    import keras

    from soundmood.export import check_export, export_served
    from soundmood.forward import OnnxForward

    keras_path, onnx_path = export_served(keras_model, tmp_path)
    forward = OnnxForward(onnx_path)
    faces = face_examples(4)
    assert forward.image_size == SIZE
    check_export(keras.models.load_model(keras_path), forward, faces)  # its own graph passes

    other = keras.models.clone_model(keras_model)
    weights = keras_model.get_weights()
    weights[-1] = weights[-1] + np.arange(len(weights[-1]), dtype=np.float32)  # probs bias
    other.set_weights(weights)
    with pytest.raises(RuntimeError, match=r"ONNX export differs from the trained model\.keras"):
        check_export(other, forward, faces)


def test_predict_loads_the_served_models_onnx_graph_and_gives_its_probabilities(store, keras_model):
    """`soundmood predict --model models:/...` runs the graph the service runs, not the .keras."""
    from soundmood.evaluate import predict_proba
    from soundmood.forward import OnnxForward
    from soundmood.inference import classify, input_size, load_model

    cfg = tiny_config()
    uri = champion_store(keras_model, cfg)
    loaded = load_model(MODEL_URI, cfg)
    assert isinstance(loaded, OnnxForward) and input_size(loaded) == SIZE
    faces = face_examples(3)
    out = mlflow.pyfunc.load_model(uri).predict(
        pd.DataFrame({"image": [raf_jpeg(index=i) for i in range(3)]})
    )
    served = out[list(cfg.data.classes)].to_numpy()
    probs = classify(loaded, faces, cfg.evaluate.tta_flip)
    np.testing.assert_allclose(probs, served, atol=1e-6)
    keras_probs = predict_proba(keras_model, faces, batch_size=8, tta_flip=cfg.evaluate.tta_flip)
    np.testing.assert_allclose(probs, keras_probs, atol=1e-5)
    assert classify(loaded, faces[:0], True).shape == (0, len(cfg.data.classes))


def test_pyfunc_rejects_bad_input_with_a_message_naming_the_problem(store, keras_model):
    model = mlflow.pyfunc.load_model(log_in_run(keras_model, tiny_config())[1])
    with pytest.raises(MlflowException) as not_image:
        model.predict(pd.DataFrame({"image": [raf_jpeg(), b"plain text, not a picture"]}))
    assert not_image.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "image[1]: " in not_image.value.message
    assert "send an encoded JPEG, PNG or WebP" in not_image.value.message
    with pytest.raises(MlflowException) as no_column:
        model.predict(pd.DataFrame({"photo": [raf_jpeg()]}))
    assert no_column.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "missing inputs ['image']" in no_column.value.message


def test_detect_faces_option_classifies_detected_faces(store, keras_model):
    """The full-photo hook: soundmood.inference's detector on a real face and on a blank photo
    (no face: classified whole, faces = 0). Never skipped: the served model imports the detector
    at load time, so a missing one fails here."""
    from PIL import Image

    from soundmood.serving import encode_png

    cfg = tiny_config()
    model = mlflow.pyfunc.load_model(log_in_run(keras_model, cfg)[1])
    photo = Image.new("RGB", (300, 240), (40, 90, 160))
    face = Image.open(DATA_ROOT / "test" / "sad" / "test_0001_aligned.jpg").convert("RGB")
    photo.paste(face.resize((160, 160)), (70, 40))  # MTCNN finds it with confidence 1.0
    blank = encode_png(np.full((120, 120, 3), 128, np.uint8))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=95)
    out = model.predict(
        pd.DataFrame({"image": [buffer.getvalue(), blank]}), params={"detect_faces": True}
    )
    assert list(out["faces"]) == [1, 0]
    np.testing.assert_allclose(out[list(cfg.data.classes)].sum(axis=1), 1.0, atol=1e-5)
    plain = model.predict(pd.DataFrame({"image": [blank]}))
    assert "faces" not in plain.columns  # off by default


@pytest.mark.slow  # over 5 s: left out of make test-fast
def test_served_model_loads_without_this_repository_on_the_path(store, keras_model, tmp_path):
    """The logged model carries the soundmood package: a fresh interpreter whose path holds no
    /work/main/src (the editable install's entry removed) loads and runs it."""
    uri = log_in_run(keras_model, tiny_config())[1]
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "copy")))
    jpeg_path = tmp_path / "face.jpg"
    jpeg_path.write_bytes(raf_jpeg())
    src = str(ROOT / "src")
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        sys.path = [p for p in sys.path if not p.startswith({src!r})]
        assert importlib.util.find_spec("soundmood") is None, "soundmood still importable"
        import mlflow, pandas as pd
        model = mlflow.pyfunc.load_model({str(local)!r})
        out = model.predict(pd.DataFrame({{"image": [open({str(jpeg_path)!r}, "rb").read()]}}))
        import soundmood
        print(json.dumps({{"module": soundmood.__file__, "row": out.iloc[0].to_dict()}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    result = subprocess.run(
        [sys.executable, "-I", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["module"].startswith(str(local)), answer["module"]
    assert answer["row"]["label"] in tiny_config().data.classes


def log_with_threshold(model, cfg: DictConfig, min_confidence: float | None) -> str:
    """The served model logged with `min_confidence` as evaluate logs it (None: no threshold, as a
    model logged before calibration); its runs:/ URI."""
    from soundmood import serving, tracking
    from soundmood.export import export_served

    tracking.setup(cfg)
    with mlflow.start_run(), tempfile.TemporaryDirectory() as tmp:
        keras_path, onnx_path = export_served(model, Path(tmp))
        info = serving.log_pyfunc(
            keras_path,
            onnx_path,
            list(cfg.data.classes),
            cfg.evaluate.tta_flip,
            cfg.evaluate.batch_size,
            face_examples(),
            min_confidence=min_confidence,
        )
    return info.model_uri


@pytest.mark.slow  # over 5 s: left out of make test-fast
def test_confident_column_follows_the_logged_threshold(store, keras_model):
    """The same model logged at two thresholds: `confident` is top probability >= each, and a
    model without one (logged before calibration) calls every row confident."""
    cfg = tiny_config()
    classes = list(cfg.data.classes)
    images = pd.DataFrame({"image": [raf_jpeg(label, i) for label in classes for i in range(2)]})
    untrusting = log_with_threshold(keras_model, cfg, None)
    legacy = mlflow.pyfunc.load_model(untrusting)
    assert legacy.metadata.flavors["python_function"]["config"]["min_confidence"] is None
    out = legacy.predict(images)
    tops = out[classes].to_numpy().max(axis=1)
    assert out["confident"].dtype == bool and out["confident"].all()
    assert len(set(np.round(tops, 6))) > 2, tops  # distinct tops: a threshold can split them

    threshold = float(np.median(tops))
    served_uri = log_with_threshold(keras_model, cfg, threshold)
    served = mlflow.pyfunc.load_model(served_uri)
    assert served.metadata.flavors["python_function"]["config"]["min_confidence"] == threshold
    split = served.predict(images)
    np.testing.assert_allclose(split[classes].to_numpy(), out[classes].to_numpy(), atol=1e-6)
    assert list(split["confident"]) == list(tops >= threshold)
    assert split["confident"].any() and not split["confident"].all()
    outputs = served.metadata.get_output_schema()
    assert (
        dict(zip(outputs.input_names(), outputs.input_types(), strict=True))["confident"].name
        == "boolean"
    )

    # `soundmood predict --model` on the served model judges at the threshold logged with it
    assert load_predictor(served_uri, cfg)[1].value == threshold
    assert load_predictor(untrusting, cfg)[1].value == 0.0  # none logged: every answer confident

    with pytest.raises(ValueError, match=r"min_confidence 1\.5"):
        log_with_threshold(keras_model, cfg, 1.5)


@pytest.mark.slow  # over 5 s: left out of make test-fast
def test_detect_faces_rows_are_confident_only_through_a_confident_face(store, keras_model):
    """A photo whose one face is under the threshold keeps that face's probabilities with
    confident false (predict reports no mood there); at threshold 0 it is confident."""
    from PIL import Image

    cfg = tiny_config()
    photo = Image.new("RGB", (300, 240), (40, 90, 160))
    face = Image.open(DATA_ROOT / "test" / "sad" / "test_0001_aligned.jpg").convert("RGB")
    photo.paste(face.resize((160, 160)), (70, 40))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=95)
    request = pd.DataFrame({"image": [buffer.getvalue()]})
    rows = {}
    for threshold in (0.0, 1.0):
        model = mlflow.pyfunc.load_model(log_with_threshold(keras_model, cfg, threshold))
        rows[threshold] = model.predict(request, params={"detect_faces": True}).iloc[0]
    assert rows[0.0]["faces"] == rows[1.0]["faces"] == 1
    assert bool(rows[0.0]["confident"]) is True and bool(rows[1.0]["confident"]) is False
    probs = [rows[t][list(cfg.data.classes)].to_numpy(dtype=float) for t in (0.0, 1.0)]
    assert probs[0].max() < 1.0  # the untrained model is unsure: threshold 1 is above it
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-6)


# --- a real scoring server ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url: str, payload: dict | None = None, timeout: float = 30) -> tuple[int, str]:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Server:
    """`mlflow models serve` in its own process group, stopped by that group's id."""

    def __init__(self, model_uri: str, cwd: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = cwd / "server.log"
        env = {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "models",
                    "serve",
                    "-m",
                    model_uri,
                    "--env-manager",
                    "local",
                    "-p",
                    str(self.port),
                    "-h",
                    "127.0.0.1",
                ],
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if http(f"{self.url}/ping", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        pytest.fail(f"server not ready in {limit_s}s:\n{self.log.read_text()[-3000:]}")

    def invoke(self, payload: dict) -> tuple[int, str]:
        return http(f"{self.url}/invocations", payload)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.slow  # over 5 s: left out of make test-fast
def test_champion_is_served_over_http_and_bad_input_gets_a_400(store, keras_model, mlflow_uri):
    cfg = tiny_config()
    champion_store(keras_model, cfg)
    server = Server(MODEL_URI, store)
    try:
        server.wait_ready(SERVER_START_S)
        status, body = server.invoke({"dataframe_records": [{"image": b64(raf_jpeg())}]})
        assert status == 200, body
        row = json.loads(body)["predictions"][0]
        assert sum(row[c] for c in cfg.data.classes) == pytest.approx(1.0, abs=1e-5)
        assert row["label"] in cfg.data.classes
        assert isinstance(row["confident"], bool)  # a JSON true/false, not a string or number

        split = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[b64(raf_jpeg())], [b64(raf_jpeg("angry"))]],
            }
        }
        status, body = server.invoke(split)
        assert status == 200 and len(json.loads(body)["predictions"]) == 2, body

        status, body = server.invoke({"dataframe_records": [{"image": b64(b"%PDF-1.4 no")}]})
        assert status == 400, body
        message = json.loads(body)["message"]  # names the row, says what to send
        assert "image[0]: " in message and "send an encoded JPEG, PNG or WebP" in message

        status, body = server.invoke({"dataframe_records": [{"photo": b64(raf_jpeg())}]})
        assert status == 400, body
        assert "missing inputs ['image']" in json.loads(body)["message"]

        status, body = server.invoke({"dataframe_records": [{"image": "not base64!"}]})
        assert status == 400, body
        assert "column image" in json.loads(body)["message"]

        assert http(f"{server.url}/ping")[0] == 200  # still alive after the bad requests
        latencies = []
        payload = {"dataframe_records": [{"image": b64(raf_jpeg())}]}
        for _ in range(20):
            start = time.perf_counter()
            assert server.invoke(payload)[0] == 200
            latencies.append(time.perf_counter() - start)
        print(f"served p50 latency at batch 1: {1000 * float(np.median(latencies)):.1f} ms")
    finally:
        server.stop()
