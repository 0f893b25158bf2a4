"""`soundmood <stage>`: one subcommand per pipeline stage (dvc.yaml calls these) plus tools.

Stages read params.yaml (what DVC tracks); trailing `key=value` arguments override it for one run.
Exit codes: 0 success, 1 unexpected failure, 2 bad input (config, data or image), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

STAGE_HELP = {
    "validate": "check the data tree (class folders, decodable 100x100 RGB images, leakage) "
                "and write reports/data_validation.json",
    "prepare": "decode every image once into prepared/*.npy at data.image_size and carve the "
               "stratified validation split from train",
    "tune": "search hyper-parameters with Optuna on the validation split "
            "(writes reports/best_params.yaml)",
    "train": "train the configured model, keep the best validation epoch, save models/model.keras",
    "evaluate": "score models/model.keras on the test split once; write reports/metrics.json and "
                "log everything to MLflow",
}
# stage name -> "module:function" taking the composed config
STAGE_TARGETS = {
    "validate": "soundmood.data.validate:run",
    "prepare": "soundmood.data.prepare:run",
    "tune": "soundmood.tune:run",
    "train": "soundmood.train:run",
    "evaluate": "soundmood.evaluate:run",
}


def _target(spec: str) -> Callable:
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override params.yaml for this run, e.g. train.epochs=3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soundmood",
        description="SoundMood facial-expression pipeline. Stages read params.yaml; "
                    "`dvc repro` runs them in order.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    params = sub.add_parser(
        "params", help="compose conf/ into params.yaml (or --check that they agree)",
        description="Compose the Hydra config in conf/ (with optional overrides such as "
                    "profile=smoke or model=seed_cnn) and write params.yaml.")
    params.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 with a diff if params.yaml != conf/ composed")
    params.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="Hydra overrides, e.g. profile=smoke train.epochs=3")
    for name, text in STAGE_HELP.items():
        _add_overrides(sub.add_parser(name, help=text, description=text))
    return parser


def _run_params(args: argparse.Namespace) -> int:
    from soundmood.config import params_diff, write_params

    if args.check:
        if args.overrides:
            print("error: --check compares the defaults; give no overrides", file=sys.stderr)
            return 2
        diff = params_diff()
        if diff:
            print(diff, end="")
            print("params.yaml disagrees with conf/: run `soundmood params`", file=sys.stderr)
            return 1
        print("params.yaml agrees with conf/")
        return 0
    print(f"wrote {write_params(args.overrides)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    from soundmood.config import ConfigError, load
    from soundmood.data.images import ImageError
    from soundmood.data.validate import DataValidationError

    try:
        if args.command == "params":
            return _run_params(args)
        cfg = load(args.overrides)
        _target(STAGE_TARGETS[args.command])(cfg)
        return 0
    except (ConfigError, DataValidationError, ImageError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
