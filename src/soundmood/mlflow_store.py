"""Where MLflow's store is: MLFLOW_TRACKING_URI when set, else the config's tracking.uri.

Apart from soundmood.tracking (which needs the config's Hydra and git) so that loading a
models:/ URI (soundmood.inference.predict, which the served model imports) needs neither.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig


def tracking_uri(cfg: DictConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
