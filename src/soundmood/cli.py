"""`soundmood <command>`: one subcommand per pipeline stage (dvc.yaml calls these) plus tools.

Every command reads params.yaml (what DVC tracks; composed from conf/). Stage commands accept
trailing `key=value` arguments that override it for one run.
Exit codes: 0 success, 1 unexpected failure or a failed check, 2 bad input (config, data, image,
archive), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from soundmood import fileio


@dataclass(frozen=True)
class Command:
    target: str  # "module:function"; stages take (cfg), tools take (cfg, args)
    help: str
    stage: bool = False
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    overrides: bool = False  # tools that take key=value overrides like the stages


def _tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes on one study (default 1); with a PostgreSQL "
        "tune.storage the same command on other machines joins the study",
    )


def _promote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", type=int, help="model version to promote (default: the latest)")
    p.add_argument("--force", action="store_true", help="skip the gate (needs --reason)")
    p.add_argument("--reason", help="why a forced promotion is made (recorded as a tag)")


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--diff",
        nargs="*",
        metavar="VERSION",
        help="compare version A with B side by side (per-class P/R/F1, capture conditions, "
        "calibration, size, latency, deltas and the gate's verdict of A against B); a version "
        "is a number or an alias (default: A challenger, B champion)",
    )
    p.add_argument("--json", action="store_true", help="JSON instead of a table")


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="photos (JPEG/PNG/WebP) or folders")
    p.add_argument(
        "--model",
        default="models:/soundmood-fer@champion",
        help="model URI (a registered model runs its ONNX graph, as served) or local .keras "
        "path (default: %(default)s)",
    )
    p.add_argument(
        "--annotate",
        metavar="OUT_DIR",
        help="write boxed and labelled copies here, named like the photos; never replaces a "
        "file: refused (exit 2, before any work) if OUT_DIR is an input folder or inside one, "
        "or if a copy's name already exists there",
    )
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def _import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="RAF-DB folder or .zip (official basic release or Kaggle copy)")
    p.add_argument(
        "--out",
        default="data/raf-db-5class",
        help="where to write the 5-class tree (default: %(default)s); an existing folder is "
        "replaced only when empty or holding an earlier import's tree, anything else is refused "
        "(exit 2) and left as it was",
    )


COMMANDS: dict[str, Command] = {
    "validate": Command(
        "soundmood.data.validate:run",
        "check the data tree (class folders, decodable 100x100 "
        "RGB images, leakage) and write reports/data_validation.json",
        stage=True,
    ),
    "prepare": Command(
        "soundmood.data.prepare:run",
        "decode every image once into prepared/*.npy at "
        "data.image_size and carve the stratified validation split from train",
        stage=True,
    ),
    "tune": Command(
        "soundmood.tune:cli",
        "search hyper-parameters with Optuna on the validation split "
        "(writes reports/best_params.yaml)",
        stage=True,
        arguments=_tune_args,
    ),
    "train": Command(
        "soundmood.train:run",
        "train the configured model, keep the best validation epoch, pick its logit "
        "adjustment on validation, save models/model.keras and score it on the validation "
        "split's capture conditions and detection path",
        stage=True,
    ),
    "evaluate": Command(
        "soundmood.evaluate:run",
        "export models/model.keras to ONNX (the graph the served model runs) and score it "
        "on the test split once, clean, under each capture condition and through the "
        "detection path (redetected), and on any evaluate.external sets; write "
        "reports/metrics.json, robustness.json and external.json and log everything to MLflow",
        stage=True,
    ),
    "register": Command(
        "soundmood.registry.commands:register_cli",
        "register the evaluated model as a new version "
        "(alias challenger) and, if registry.auto_promote, run the promotion gate",
        stage=True,
    ),
    "promote": Command(
        "soundmood.registry.commands:promote_cli",
        "show a version against the champion (as `models --diff`), then move the champion "
        "alias to it if it passes the gate (or --force with --reason)",
        arguments=_promote_args,
    ),
    "rollback": Command(
        "soundmood.registry.commands:rollback_cli", "move champion back to the previous champion"
    ),
    "models": Command(
        "soundmood.registry.commands:models_cli",
        "table of registered versions (aliases, metrics, data, commit), or --diff of two",
        arguments=_models_args,
    ),
    "predict": Command(
        "soundmood.inference.command:predict_cli",
        "detect faces in photos, classify each, and give one mood per photo from its confident "
        "faces (null, with the reason, when none is confident: inference.min_confidence)",
        arguments=_predict_args,
    ),
    "import-rafdb": Command(
        "soundmood.data.importer:import_cli",
        "build the 5-class tree from an official RAF-DB or Kaggle-copy download (folder or .zip)",
        arguments=_import_args,
        overrides=True,
    ),
}


def _target(spec: str) -> Callable:
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soundmood",
        description="SoundMood facial-expression pipeline. Commands read params.yaml; "
        "`dvc repro` runs the stages in order.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    params = sub.add_parser(
        "params",
        help="compose conf/ into params.yaml (or --check that they agree)",
        description="Compose the Hydra config in conf/ (with optional overrides such as "
        "profile=smoke or model=seed_cnn), check it as the stages do and write params.yaml; "
        "an unknown option or key, or an invalid value, exits 2 and leaves params.yaml as it "
        "was.",
    )
    params.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 with a diff if params.yaml != conf/ composed",
    )
    params.add_argument(
        "overrides",
        nargs="*",
        metavar="OVERRIDE",
        help="Hydra overrides, e.g. profile=smoke train.epochs=3",
    )
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if command.arguments:
            command.arguments(p)
        if command.stage or command.overrides:
            p.add_argument(
                "overrides",
                nargs="*",
                metavar="KEY=VALUE",
                help="override params.yaml values for this run, e.g. train.epochs=3 or "
                "data.limits.max_archive_bytes=1000000000 (config groups such as profile= "
                "switch through `soundmood params`)",
            )
    return parser


def _run_params(args: argparse.Namespace) -> int:
    # deferred, as in main(): Hydra's import is not paid by `soundmood --help`
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


def _record_timing(cfg: object, stage: str, seconds: float) -> None:
    """Wall time of the last run of each stage, for benchmarks/ (not a DVC output)."""
    fileio.write_json(
        Path(cfg.evaluate.reports_dir) / "timings" / f"{stage}.json",
        {"stage": stage, "seconds": round(seconds, 1), "finished_at": time.time()},
    )


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    # deferred until the arguments parse: `soundmood --help` and usage errors skip Hydra's and
    # the data modules' imports
    from soundmood.config import load
    from soundmood.data.images import ImageError
    from soundmood.data.validate import DataValidationError
    from soundmood.errors import ConfigError, UserError

    try:
        if args.command == "params":
            return _run_params(args)
        command = COMMANDS[args.command]
        cfg = load(getattr(args, "overrides", []))
        target = _target(command.target)
        start = time.perf_counter()
        result = target(cfg) if command.stage and not command.arguments else target(cfg, args)
        if command.stage:
            _record_timing(cfg, args.command, time.perf_counter() - start)
        return result if isinstance(result, int) else 0
    except (ConfigError, DataValidationError, ImageError, FileNotFoundError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
