"""Whether a process on this machine still runs: how a resumed command tells work left behind by
a killed process (an Optuna trial, an import's staging folder) from work still in progress."""

from __future__ import annotations

import os


def is_alive(pid: int) -> bool:
    """True while `pid` exists (even when owned by another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
