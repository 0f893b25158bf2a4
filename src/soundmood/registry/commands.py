"""The registry's commands: the `register` stage, `soundmood promote`, `rollback` and `models`.

register reads what evaluate wrote (reports/evaluation.json, metrics.json, robustness.json and
train's temperature), registers the model as a version tagged with it, and with
registry.auto_promote runs the gate at once; reports/registry.json records the outcome.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from soundmood import model_card, tracking, version_diff
from soundmood.data.layout import data_version
from soundmood.errors import UserError
from soundmood.fileio import write_json
from soundmood.model_card import ROBUST_PREFIX, Tag
from soundmood.registry import store
from soundmood.registry.gate import KEY_METRIC, Decision
from soundmood.registry.store import CHALLENGER, CHAMPION
from soundmood.robustness import REPORT_FILE, mlflow_metrics

REGISTRY_REPORT = "registry.json"


def tested_data_version(cfg: DictConfig) -> str:
    """The data md5 the test split was prepared from (prepared/index.json), else data.dvc's."""
    index = Path(cfg.data.prepared_dir) / "index.json"
    if index.exists():
        return str(json.loads(index.read_text()).get("data_version") or data_version())
    return data_version()


def _read_json(path: Path, produced_by: str) -> dict:
    if not path.exists():
        raise UserError(f"{path} is missing: run `soundmood {produced_by}` (or `dvc repro`) first")
    return json.loads(path.read_text())


def robust_tags(reports: Path) -> dict[str, float]:
    """robust_<condition>_<stat> from reports/robustness.json, if any (accuracy, macro_f1,
    min_recall, and ece, confident_coverage, confident_accuracy where evaluate scored them)."""
    path = reports / REPORT_FILE
    if not path.exists():
        return {}
    return mlflow_metrics(json.loads(path.read_text()), ROBUST_PREFIX)


def external_tags(reports: Path) -> dict[str, float]:
    """external_<set>_<stat> from reports/external.json, if any (soundmood.external)."""
    path = reports / model_card.EXTERNAL_FILE
    return model_card.external_figures(json.loads(path.read_text())) if path.exists() else {}


def trained_temperature(reports: Path) -> float | None:
    """The softmax temperature train folded into the model (train_run.json, else train.json)."""
    for name in ("train_run.json", "train.json"):
        path = reports / name
        if path.exists():
            value = json.loads(path.read_text()).get("temperature")
            if value is not None:
                return float(value)
    return None


def register_cli(cfg: DictConfig) -> int:
    """The `register` stage: register the evaluated model, then (registry.auto_promote) gate it.
    A refusal is an outcome, not a failure: the stage exits 0 and says why. reports/registry.json
    records decision: promoted | refused | pending (auto_promote off) | champion (already).
    The version's model card is (re)written last, so it shows the gate's decision."""
    reports = Path(cfg.evaluate.reports_dir)
    evaluation = _read_json(reports / "evaluation.json", "evaluate")
    metrics = _read_json(reports / "metrics.json", "evaluate")
    tracking.setup(cfg)
    run_id = evaluation["mlflow_run_id"]
    tags = store.version_tags(
        cfg,
        run_id,
        metrics,
        tested_data_version(cfg),
        evaluation.get("test_images"),
        {**robust_tags(reports), **external_tags(reports)},  # flat tags, each prefixed
        trained_temperature(reports),
    )
    mv = store.register(cfg, evaluation["model_uri"], run_id, tags)
    current = store.alias_version(cfg.registry.model_name, CHAMPION)
    gate_tags = mv.tags or {}
    if current is not None and str(current.version) == str(mv.version):  # a re-run
        if gate_tags.get(Tag.GATE) == "promoted" and gate_tags.get(Tag.GATE_REASON):
            # the gate made it champion (this stage, perhaps a run killed before its report):
            # report that decision, re-derived from the registry, as the first run would have
            decision, outcome = Decision(True, gate_tags[Tag.GATE_REASON]), "promoted"
        else:
            decision = Decision(False, f"version {mv.version} is the champion")
            outcome = "champion"
    elif cfg.registry.auto_promote:
        decision = store.promote(cfg, mv.version)
        outcome = "promoted" if decision.promote else "refused"
    else:
        decision = Decision(False, "registry.auto_promote is false: run `soundmood promote`")
        outcome = "pending"
    store.refresh_card(cfg, mv.version)  # a run killed between the gate and the card left it stale
    champion = store.alias_version(cfg.registry.model_name, CHAMPION)
    report = {
        "name": cfg.registry.model_name,
        "version": int(mv.version),
        "decision": outcome,
        "reason": decision.reason,
        "champion": int(champion.version) if champion else None,
        "model_uri": f"models:/{cfg.registry.model_name}/{mv.version}",
    }
    write_json(reports / REGISTRY_REPORT, report)
    print(f"register: {cfg.registry.model_name} v{mv.version} {outcome}: {decision.reason}")
    return 0


def promote_cli(cfg: DictConfig, args: Any) -> int:
    """`soundmood promote [--version N] [--force --reason ...]`: prints the version against the
    champion (the diff table), then runs the gate; exits 1 when the gate refuses."""
    if args.force and not (args.reason or "").strip():
        raise UserError('--force needs --reason "...": a manual override is recorded with why')
    if args.reason and not args.force:
        raise UserError("--reason goes with --force; without it the gate records its own reason")
    tracking.setup(cfg)
    name = cfg.registry.model_name
    version = args.version
    if version is None:
        versions = store.all_versions(name)
        if not versions:
            raise UserError(f"model {name} has no registered versions: run `soundmood register`")
        version = versions[0].version
    candidate = store.get_version(name, version)
    version_diff.print_table(
        store.compare(cfg, candidate, store.alias_version(name, CHAMPION), as_table=True)
    )
    decision = store.promote(cfg, version, args.reason.strip() if args.force else None)
    verdict = "promoted to champion" if decision.promote else "refused (aliases unchanged)"
    print(f"{name} v{version} {verdict}: {decision.reason}")
    return 0 if decision.promote else 1


def rollback_cli(cfg: DictConfig, args: Any) -> int:
    tracking.setup(cfg)
    old, new = store.rollback(cfg)
    print(f"{cfg.registry.model_name}: champion moved back from v{old} to v{new}")
    return 0


# --- what `soundmood models` shows ----------------------------------------


def version_entry(mv: Any, aliases: list[str], classes: list[str]) -> dict[str, Any]:
    """One row of `soundmood models` (also its --json)."""
    tags = mv.tags or {}
    figures = model_card.figures(tags, classes)
    created = datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC)
    return {
        "version": int(mv.version),
        "aliases": sorted(aliases),
        "created": created.strftime("%Y-%m-%d %H:%M"),
        "macro_f1": figures.get(KEY_METRIC),
        "accuracy": figures.get("accuracy"),
        "min_recall": figures.clean_min_recall(),
        "ece": figures.get("ece"),
        "model": f"{tags.get(Tag.MODEL_NAME, '')}/{tags.get(Tag.PROFILE, '')}",
        "data_md5": tags.get(Tag.DATA_MD5, ""),
        "git_commit": tags.get(Tag.GIT_COMMIT, ""),
        "gate": tags.get(Tag.GATE, ""),
    }


def models_cli(cfg: DictConfig, args: Any) -> int:
    """`soundmood models`: every version (aliases, test metrics, data md5, commit, gate);
    `--diff [A] [B]`: A against B side by side (default: challenger against champion);
    `--json`: the same as JSON."""
    tracking.setup(cfg)
    name = cfg.registry.model_name
    versions = store.all_versions(name)
    if not versions:
        raise UserError(f"model {name} has no registered versions: run `soundmood register`")
    as_json = bool(getattr(args, "json", False))
    refs = getattr(args, "diff", None)
    if refs is not None:
        if len(refs) > 2:
            raise UserError(f"--diff takes at most two versions (A B), not {len(refs)}")
        a = store.resolve(name, refs[0] if refs else CHALLENGER)
        b = store.resolve(name, refs[1] if len(refs) > 1 else CHAMPION)
        if as_json:
            print(json.dumps(store.compare(cfg, a, b), indent=2))
        else:
            version_diff.print_table(store.compare(cfg, a, b, as_table=True))
        return 0
    aliases = store.aliases_by_version(name)
    entries = [
        version_entry(mv, aliases.get(str(mv.version), []), list(cfg.data.classes))
        for mv in versions
    ]
    if as_json:
        print(json.dumps(entries, indent=2))
    else:
        title = f"{name} (registry {tracking.tracking_uri(cfg)})"
        version_diff.print_table(version_diff.versions_table(title, entries))
    return 0
