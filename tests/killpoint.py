"""Run a `soundmood` command and SIGKILL it just before its K-th durable step, for the
fault-injection tests:

    python tests/killpoint.py K STEPS_LOG UNDER -- <soundmood arguments>

A durable step is a change that outlives the process: a file opened for writing, a rename, a
removal or a new folder under the folder UNDER (Python's audit events, raised before the operation
happens), or a call of an MlflowClient method that changes the registry (a profile hook, for
`register` only). The process kills itself with a real SIGKILL before step K; nothing in the
command is replaced or stubbed, so steps 1..K-1 happened exactly as in a normal run. K = 0 kills
nothing and writes the labels of every step, in order, to STEPS_LOG as a JSON list.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path

# MlflowClient calls that change the registry (each is one transaction of the store)
MLFLOW_MUTATORS = (
    "create_registered_model",
    "create_model_version",
    "update_model_version",
    "set_model_version_tag",
    "delete_model_version_tag",
    "set_registered_model_alias",
    "delete_registered_model_alias",
)
FILE_EVENTS = ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree")
NO_DIR_FD = (None, -1)  # how the os functions and shutil.rmtree report "no dir_fd"
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def main(argv: list[str]) -> int:
    kill_at, log, under = int(argv[1]), Path(argv[2]), argv[3]
    args = argv[argv.index("--") + 1 :]
    roots = {os.path.abspath(under), os.path.realpath(under)}
    steps: list[str] = []

    def step(label: str) -> None:
        steps.append(re.sub(r"\.partial-\d+-", ".partial-PID-", label))
        if len(steps) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def inside(path: object) -> str | None:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str | os.PathLike):
            return None  # a file descriptor
        full = os.path.abspath(path)
        for root in roots:
            if full == root or full.startswith(root + os.sep):
                return os.path.relpath(full, root)
        return None

    def audit(event: str, payload: tuple) -> None:
        if event == "open":
            path, mode, flags = payload
            writing = (
                any(c in mode for c in "wax+")
                if isinstance(mode, str)
                else isinstance(flags, int) and bool(flags & WRITE_FLAGS)
            )
            if writing and (where := inside(path)):
                step(f"open {where}")
        elif event in FILE_EVENTS:
            if event == "os.rename":
                if payload[2] not in NO_DIR_FD or payload[3] not in NO_DIR_FD:
                    return  # relative to a folder descriptor: inside an rmtree already counted
                names = [inside(payload[0]), inside(payload[1])]
                if any(names):
                    step(f"rename {names[0]} -> {names[1]}")
            elif payload[-1] in NO_DIR_FD and (where := inside(payload[0])):
                step(f"{event.split('.')[-1]} {where}")

    sys.addaudithook(audit)
    if args and args[0] == "register":
        # imported before the hook so that only the stage's own calls pay for it
        import mlflow.tracking.client as mlflow_client

        import soundmood.registry
        import soundmood.registry.commands
        import soundmood.robustness
        import soundmood.tracking

        codes = {
            inspect.unwrap(getattr(mlflow_client.MlflowClient, name)).__code__: name
            for name in MLFLOW_MUTATORS
        }

        def profile(frame, event: str, arg: object) -> None:
            if event == "call" and frame.f_code in codes:
                detail = frame.f_locals.get("key") or frame.f_locals.get("alias") or ""
                step(f"mlflow {codes[frame.f_code]} {detail}".rstrip())

        threading.setprofile(profile)
        sys.setprofile(profile)

    from soundmood.cli import main as soundmood

    code = soundmood(args)
    sys.setprofile(None)
    if kill_at == 0:
        log.write_text(json.dumps(steps, indent=1) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
