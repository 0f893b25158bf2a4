"""A shared MLflow tracking server (issue 8): a real `mlflow server` whose backend store is a real
PostgreSQL database and whose artifacts it proxies into a directory, as a team would run it. The
project's own code registers, promotes and rolls back versions through it over HTTP, and the
champion is loaded back through the server and predicts on a real RAF-DB photo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from soundmood import registry
from soundmood.registry import CHALLENGER, CHAMPION, Tag
from tests.postgres import PostgresServer
from tests.test_registry import add_version, aliases, tags_of
from tests.test_serving import SIZE, build_tiny_model, free_port, raf_jpeg, tiny_config

pytest_plugins = ["tests.postgres"]  # fixtures postgres_server, postgres_url

SERVER_START_S = 120  # includes MLflow's migrations of the empty database
SERVER_STOP_S = 10


class TrackingServer:
    """`mlflow server` in its own process group, stopped by that group's id."""

    def __init__(self, backend_uri: str, artifacts: Path, cwd: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = cwd / "tracking-server.log"
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        command = [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", backend_uri,
            "--artifacts-destination", artifacts.as_uri(),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "2",
        ]  # fmt: skip
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def wait_healthy(self, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(1)
        pytest.fail(f"mlflow server not healthy in {limit_s}s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=SERVER_STOP_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


@pytest.fixture
def tracking_server(postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A running server; MLFLOW_TRACKING_URI points at it for the test. The client's working
    directory is an empty folder, so nothing can land in a local ./mlruns unnoticed."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    server = TrackingServer(postgres_url, artifacts, tmp_path)
    try:
        server.wait_healthy(SERVER_START_S)
        monkeypatch.chdir(client_dir)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        mlflow.set_tracking_uri(server.url)
        yield server, artifacts, client_dir
    finally:
        mlflow.set_tracking_uri(None)
        server.stop()


@pytest.mark.slow
def test_register_promote_and_serve_through_a_postgres_backed_server(
    tracking_server, postgres_server: PostgresServer, postgres_url: str
):
    from soundmood.data.images import load_face
    from soundmood.evaluate import predict_proba

    server, artifacts, client_dir = tracking_server
    cfg = tiny_config()
    cfg.registry.min_improvement = 0.01
    cfg.registry.min_condition_accuracy = 0  # off: these versions carry no robustness tags
    model = build_tiny_model()

    v1 = add_version(cfg, model, 0.50)  # logs a run + the served model, registers, challenger
    assert aliases(cfg) == {CHALLENGER: v1}
    assert registry.promote(cfg, v1).promote
    assert aliases(cfg) == {CHAMPION: v1}

    v2 = add_version(cfg, model, 0.505)  # better by less than min_improvement: refused
    assert not registry.promote(cfg, v2).promote
    assert aliases(cfg) == {CHAMPION: v1, CHALLENGER: v2}
    assert tags_of(cfg, v2)[Tag.GATE] == "refused"

    v3 = add_version(cfg, model, 0.60)
    assert registry.promote(cfg, v3).promote
    assert aliases(cfg) == {CHAMPION: v3}
    assert tags_of(cfg, v3)[Tag.PREVIOUS_CHAMPION] == v1
    assert registry.rollback(cfg) == (v3, v1)
    assert aliases(cfg) == {CHAMPION: v1}

    # The champion, loaded through the server (artifacts proxied), predicts on a real photo.
    served = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@{CHAMPION}")
    jpeg = raf_jpeg("happy", 1)
    out = served.predict(pd.DataFrame({"image": [jpeg]}))
    assert list(out.columns) == [*cfg.data.classes, "label", "confident"]
    probs = out[list(cfg.data.classes)].to_numpy()
    expected = predict_proba(model, load_face(jpeg, SIZE)[None], batch_size=8,
                             tta_flip=cfg.evaluate.tta_flip)  # fmt: skip
    np.testing.assert_allclose(probs, expected, atol=1e-5)

    # Everything went to the server: runs and registry rows in PostgreSQL, the model files in
    # the artifacts destination, nothing in the client's working directory.
    dbname = postgres_url.rsplit("/", 1)[1]
    with postgres_server.connect(dbname) as conn:
        (runs,) = conn.execute("SELECT count(*) FROM runs").fetchone()
        versions = conn.execute(
            "SELECT version FROM model_versions WHERE name = %s ORDER BY version",
            (cfg.registry.model_name,),
        ).fetchall()
        (champion,) = conn.execute(
            "SELECT version FROM registered_model_aliases WHERE name = %s AND alias = %s",
            (cfg.registry.model_name, CHAMPION),
        ).fetchone()
    assert runs == 3
    assert [str(v) for (v,) in versions] == [v1, v2, v3]
    assert str(champion) == v1
    assert any(p.name == "MLmodel" for p in artifacts.rglob("MLmodel"))
    assert list(client_dir.iterdir()) == [], list(client_dir.iterdir())
    mv = mlflow.MlflowClient().get_model_version(cfg.registry.model_name, v1)
    print(json.dumps({"server": server.url, "source": mv.source, "runs": runs}))
