"""A real, throwaway PostgreSQL server for tests (pytest fixtures).

Use it from a test module with::

    pytest_plugins = ["tests.postgres"]  # fixtures postgres_server, postgres_url

`postgres_server` (session scope) runs `initdb` into a fresh temporary directory (trust
authentication, superuser `soundmood`), starts it with `pg_ctl` listening on 127.0.0.1 only
(free port, unix socket inside the temporary directory) and stops it with `pg_ctl stop -m fast`
at the end of the session. `postgres_url` (function scope) creates a fresh database per test and
returns its SQLAlchemy URL, `postgresql+psycopg://soundmood@127.0.0.1:PORT/DB` -- the form that
`tune.storage`, Optuna and `mlflow server --backend-store-uri` take.

The server binaries are looked up on PATH, then in /usr/lib/postgresql/<version>/bin (Debian's
`postgresql` package, which `.ci/run` installs). Without them the tests are skipped, or fail when
the environment says CI=true. PostgreSQL refuses to run as root: under euid 0 every server
command runs as an unprivileged user (`postgres`, created by the Debian package, else `nobody`;
override with SOUNDMOOD_PG_OS_USER) and the temporary directory is chowned to it.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SUPERUSER = "soundmood"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _missing(reason: str) -> None:
    """Skip locally; in CI a missing PostgreSQL is a broken environment, not a reason to skip."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: PostgreSQL is required; .ci/run installs it)")
    pytest.skip(f"{reason}; install PostgreSQL (`apt-get install postgresql`) to run this test")


def find_pg_bin() -> Path | None:
    """The directory holding initdb and pg_ctl: PATH first, then Debian's newest version."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent

    def version(d: str) -> tuple[int, ...]:
        m = re.search(r"/postgresql/([\d.]+)/bin$", d)
        return tuple(int(p) for p in m.group(1).split(".")) if m else (0,)

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if all(os.access(os.path.join(d, exe), os.X_OK) for exe in ("initdb", "pg_ctl")):
            return Path(d)
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _os_user() -> str | None:
    """The unprivileged account the server runs as when we are root; None when not root."""
    if os.geteuid() != 0:
        return None
    for name in filter(None, [os.environ.get("SOUNDMOOD_PG_OS_USER"), "postgres", "nobody"]):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    pytest.fail("running as root and no unprivileged user (postgres/nobody) to run PostgreSQL as")


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    socket_dir: Path
    data_dir: Path
    bin_dir: Path

    def url(self, dbname: str = "postgres", driver: str = "postgresql+psycopg") -> str:
        """SQLAlchemy URL (Optuna storage, MLflow backend store); driver="postgresql": libpq URI."""
        return f"{driver}://{self.user}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres"):
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            dbname=dbname,
            autocommit=True,
            connect_timeout=10,
        )

    def create_database(self, dbname: str) -> str:
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
        return self.url(dbname)

    def drop_database(self, dbname: str) -> None:
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def _run(
    cmd: list[str], os_user: str | None, cwd: Path, timeout: float
) -> subprocess.CompletedProcess:
    if os_user:
        cmd = ["runuser", "-u", os_user, "--", *cmd]
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    env.pop("PGDATA", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    bin_dir = find_pg_bin()
    if bin_dir is None:
        _missing(
            "PostgreSQL binaries (initdb, pg_ctl) not on PATH nor in /usr/lib/postgresql/*/bin"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _missing("psycopg (PostgreSQL driver) is not installed")

    os_user = _os_user()
    # Not under pytest's tmp_path: /tmp/pytest-of-root is 0700, the server's user cannot enter it.
    base = Path(tempfile.mkdtemp(prefix="soundmood-pg-"))
    if os_user:
        pw = pwd.getpwnam(os_user)
        os.chown(base, pw.pw_uid, pw.pw_gid)
    data_dir, socket_dir, log = base / "data", base / "sock", base / "server.log"
    if os_user:
        _run(["mkdir", "-p", str(socket_dir)], os_user, base, 10)
    else:
        socket_dir.mkdir()

    initdb = _run(
        [
            str(bin_dir / "initdb"),
            "-D",
            str(data_dir),
            "-A",
            "trust",
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ],
        os_user,
        base,
        120,
    )
    if initdb.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"initdb failed ({initdb.returncode}):\n{initdb.stdout}\n{initdb.stderr}")

    pg_ctl = str(bin_dir / "pg_ctl")
    server = None
    for _attempt in range(3):  # a free port can be taken between probing and binding
        port = free_port()
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {socket_dir} -c max_connections=100 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        start = _run(
            [
                pg_ctl,
                "start",
                "-D",
                str(data_dir),
                "-l",
                str(log),
                "-w",
                "-t",
                str(START_TIMEOUT_S),
                "-o",
                opts,
            ],
            os_user,
            base,
            START_TIMEOUT_S + 15,
        )
        if start.returncode == 0:
            server = PostgresServer("127.0.0.1", port, SUPERUSER, socket_dir, data_dir, bin_dir)
            break
        _run(
            [pg_ctl, "stop", "-D", str(data_dir), "-m", "immediate", "-w"],
            os_user,
            base,
            STOP_TIMEOUT_S,
        )
    if server is None:
        log_text = log.read_text(errors="replace")[-4000:] if log.exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"pg_ctl start failed:\n{start.stdout}\n{start.stderr}\n{log_text}")

    try:
        yield server
    finally:
        stop = _run(
            [pg_ctl, "stop", "-D", str(data_dir), "-m", "fast", "-w", "-t", str(STOP_TIMEOUT_S)],
            os_user,
            base,
            STOP_TIMEOUT_S + 15,
        )
        if stop.returncode != 0:
            _run(
                [pg_ctl, "stop", "-D", str(data_dir), "-m", "immediate", "-w"],
                os_user,
                base,
                STOP_TIMEOUT_S,
            )
        shutil.rmtree(base, ignore_errors=True)


_counter = iter(range(1, 1_000_000))


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> str:
    """A fresh, empty database on the session's server, dropped after the test."""
    stem = re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower()).strip("_")[:40]
    dbname = f"t{next(_counter)}_{stem}_{os.getpid()}"[:63]
    url = postgres_server.create_database(dbname)
    yield url
    deadline = time.monotonic() + 30
    while True:  # a server under test may still hold connections for a moment
        try:
            postgres_server.drop_database(dbname)
            break
        except Exception:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
