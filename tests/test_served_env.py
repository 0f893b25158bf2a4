"""The served model in its own environment: what it imports is what its requirements.txt pins.

The fast test runs the served path (import soundmood.serving, detect a real face) in a fresh
interpreter and checks that it leaves out the command line (soundmood.inference.command with
rich and tqdm) and that every distribution soundmood's code and MTCNN import on the way is pinned.
The slow one builds a new virtual environment from a logged model's requirements.txt alone and
answers a detect_faces request there, outside this repository.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time
from importlib.metadata import packages_distributions
from pathlib import Path

import mlflow
import pytest
from packaging.utils import canonicalize_name
from PIL import Image

from soundmood.serving import SERVING_PACKAGES, pip_requirements
from tests.conftest import DATA_ROOT
from tests.test_serving import build_tiny_model, log_in_run, tiny_config

# whose imports must be pinned: our code and the face detector's library (the libraries they
# import bring their own requirements, which pip resolves from the pins)
PINNED_IMPORTERS = ("soundmood", "mtcnn")


def face_photo(path: Path) -> Path:
    """A RAF-DB test face pasted onto a larger plain canvas, as JPEG: MTCNN finds it (1.0)."""
    photo = Image.new("RGB", (300, 240), (40, 90, 160))
    face = Image.open(DATA_ROOT / "test" / "sad" / "test_0001_aligned.jpg").convert("RGB")
    photo.paste(face.resize((160, 160)), (70, 40))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=95)
    path.write_bytes(buffer.getvalue())
    return path


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def isolated(
    python: str | Path, script: str, cwd: Path, *args: str, timeout: int = 120
) -> subprocess.CompletedProcess:
    """`script` in an interpreter that ignores the user site, PYTHONPATH and this checkout."""
    return subprocess.run(
        [str(python), "-I", "-c", script, *args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


SERVED_PATH = textwrap.dedent("""
    import builtins, json, sys

    imports = set()  # (importing module, top-level name imported)
    real_import = builtins.__import__

    def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and globals:
            imports.add((globals.get("__name__") or "", name.partition(".")[0]))
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = recording_import
    import numpy as np
    from PIL import Image

    import soundmood.serving
    from soundmood.inference.detect import detect_faces
    from soundmood.inference.mood import combine_mood

    loaded = sorted(sys.modules)
    faces = detect_faces(Image.open(sys.argv[1]))
    probs = np.full((len(faces), 5), 0.2)
    combine_mood(probs, np.array([f.area for f in faces]), "area")
    print(json.dumps({
        "after_import": loaded,
        "after_detection": sorted(sys.modules),
        "faces": len(faces),
        "imports": sorted(imports),
    }))
""")


@pytest.mark.slow  # over 5 s: left out of make test-fast
def test_served_path_leaves_out_the_cli_and_imports_only_pinned_distributions(tmp_path):
    """What serving a detect_faces request imports, in a fresh interpreter (about 10 s: MTCNN
    imports TensorFlow)."""
    photo = face_photo(tmp_path / "photo.jpg")
    result = isolated(sys.executable, SERVED_PATH, tmp_path, str(photo))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["faces"] == 1

    # The command line never loads. tqdm may still come in through mlflow's own optional import
    # (mlflow.genai, when tqdm is installed): what matters is that no soundmood module asks for it.
    assert "soundmood.inference.command" not in report["after_detection"]
    assert "rich" not in report["after_import"]  # keras brings it with TensorFlow, not us
    soundmood_imports = {name for who, name in report["imports"] if who.startswith("soundmood")}
    assert not soundmood_imports & {"rich", "tqdm"}, soundmood_imports

    # Every distribution our code and MTCNN import is pinned in requirements.txt.
    pinned = {canonicalize_name(pin.partition("==")[0]) for pin in pip_requirements()}
    providers = packages_distributions()
    unpinned = {}
    for who, name in report["imports"]:
        if who.partition(".")[0] not in PINNED_IMPORTERS or name in sys.stdlib_module_names:
            continue
        if name in PINNED_IMPORTERS or name == "__future__":
            continue
        dists = {canonicalize_name(d) for d in providers.get(name, [])}
        assert dists, f"{who} imports {name}, which no installed distribution provides"
        if not dists & pinned:
            unpinned[name] = f"{sorted(dists)} (imported by {who})"
    assert not unpinned, f"imported but not in SERVING_PACKAGES: {unpinned}"


def test_every_serving_package_is_pinned_and_a_missing_one_fails_logging(monkeypatch):
    from soundmood import serving

    pins = pip_requirements()
    assert len(pins) == len(SERVING_PACKAGES)
    assert all("==" in pin for pin in pins)
    monkeypatch.setattr(serving, "SERVING_PACKAGES", (*SERVING_PACKAGES, ("no-such-dist-x",)))
    with pytest.raises(RuntimeError, match="needs no-such-dist-x, which is not installed"):
        serving.pip_requirements()


def test_load_fails_naming_a_missing_detector_package(tmp_path):
    """A Python whose mtcnn cannot be found: require_detector (which load_context calls) names
    it instead of the model answering detect_faces requests with an error later."""
    script = textwrap.dedent("""
        import importlib.util, sys
        real_find_spec = importlib.util.find_spec
        hidden = lambda name, *a: None if name == "mtcnn" else real_find_spec(name, *a)
        importlib.util.find_spec = hidden  # as if mtcnn were not installed
        from soundmood.inference.detect import require_detector
        try:
            require_detector()
        except ModuleNotFoundError as exc:
            print(exc.name, "|", exc)
    """)
    result = isolated(sys.executable, script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    name, _, message = result.stdout.strip().partition(" | ")
    assert name == "mtcnn"
    assert "needs mtcnn" in message and "requirements.txt" in message


@pytest.fixture
def store(mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_root: Path):
    monkeypatch.chdir(tmp_path)  # the store's artifacts (./mlruns) go under tmp_path
    return tmp_path


@pytest.mark.slow
def test_served_model_detects_faces_in_a_fresh_environment_from_its_requirements(store):
    """pip install -r requirements.txt into a new venv (no system site-packages, nothing from
    this repository), then load the model there and answer a detect_faces request."""
    uri = log_in_run(build_tiny_model(), tiny_config())[1]
    model_dir = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(store / "model")))
    requirements = model_dir / "requirements.txt"
    pins = [line for line in requirements.read_text().splitlines() if line.strip()]
    assert sorted(pins) == sorted(pip_requirements()), pins

    venv = store / "venv"
    timings = {}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=clean_env())
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-r", str(requirements)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    timings["venv_and_pip_install_s"] = time.perf_counter() - start

    elsewhere = store / "elsewhere"  # not the repository, not the model's folder
    elsewhere.mkdir()
    photo = face_photo(elsewhere / "photo.jpg")
    script = textwrap.dedent(f"""
        import importlib.util, json, sys, time
        assert importlib.util.find_spec("soundmood") is None, "soundmood importable before load"
        import mlflow, pandas as pd
        start = time.perf_counter()
        model = mlflow.pyfunc.load_model({str(model_dir)!r})
        loaded = time.perf_counter()
        frame = pd.DataFrame({{"image": [open({str(photo)!r}, "rb").read()]}})
        out = model.predict(frame, params={{"detect_faces": True}})
        answered = time.perf_counter()
        import soundmood
        row = out.iloc[0].to_dict()
        print(json.dumps({{
            "module": soundmood.__file__, "row": row,
            "load_s": loaded - start, "predict_s": answered - loaded,
            "cli_loaded": [m for m in ("soundmood.inference.command", "rich", "tqdm")
                           if m in sys.modules],
        }}))
    """)
    start = time.perf_counter()
    served = isolated(python, script, elsewhere, timeout=300)
    timings["load_and_predict_process_s"] = time.perf_counter() - start
    assert served.returncode == 0, served.stderr[-3000:]
    answer = json.loads(served.stdout.strip().splitlines()[-1])
    assert answer["module"].startswith(str(model_dir)), answer["module"]
    row = answer["row"]
    classes = list(tiny_config().data.classes)
    assert row["faces"] == 1
    assert sum(row[c] for c in classes) == pytest.approx(1.0, abs=1e-5)
    assert row["label"] in classes
    assert "soundmood.inference.command" not in answer["cli_loaded"]
    timings |= {"load_s": answer["load_s"], "predict_s": answer["predict_s"]}

    # A pinned package gone from the environment: the load fails, naming it.
    subprocess.run(
        [str(python), "-m", "pip", "uninstall", "-q", "-y", "lz4"], check=True, env=clean_env()
    )
    load = f"import mlflow; mlflow.pyfunc.load_model({str(model_dir)!r})"
    broken = isolated(python, load, elsewhere, timeout=300)
    assert broken.returncode != 0
    assert "face detection (MTCNN) needs lz4" in broken.stderr, broken.stderr[-3000:]
    print("fresh environment:", {k: round(v, 1) for k, v in timings.items()})
