"""Model registry: each evaluated model becomes a version of registry.model_name; the `champion`
alias (what `models:/soundmood-fer@champion` serves) moves only through the promotion gate.

- register (stage): a new version linked to its MLflow run, tagged with what produced it (git
  commit, data md5, config hash, profile, model, temperature), its test metrics and capture
  conditions, aliased `challenger`; with registry.auto_promote the gate runs at once. Its
  description is its model card (soundmood.model_card, also model_card.md in its run), rewritten
  whenever the gate decides. Writes reports/registry.json.
- promote: shows the version against the champion (soundmood.version_diff), then the gate
  (`gate()`, a pure function) decides; a refusal changes no alias and says which rule failed
  with the numbers. `--force --reason` records a manual override.
- rollback: champion goes back to the version named by its `previous_champion` tag.
- models: a table of versions, aliases, metrics, data and commit; `--diff [A] [B]` two versions
  side by side with deltas and the gate's verdict; `--json` for machines.

MLflow's stages are deprecated: only aliases and tags are used. Everything the gate reads is a
version tag, so a decision can be re-derived from the registry alone.
"""

from __future__ import annotations

import getpass
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig

from soundmood import model_card, version_diff
from soundmood.errors import UserError
from soundmood.fileio import write_json
from soundmood.model_card import METRIC_PREFIX, RECALL_SUFFIX, ROBUST_PREFIX, Tag

CHAMPION = "champion"
CHALLENGER = "challenger"
KEY_METRIC = "macro_f1"
REGISTRY_REPORT = "registry.json"


# --- the promotion gate: pure functions over what the registry knows -----------------------------


@dataclass(frozen=True)
class Facts:
    """What the gate knows about a version: its number, test metrics and tags."""

    version: str
    metrics: dict[str, float]
    tags: dict[str, str]

    @classmethod
    def from_tags(cls, version: str | int, tags: dict[str, str]) -> Facts:
        return cls(str(version), model_card.metric_tags(tags), dict(tags))


class Decision(NamedTuple):
    promote: bool
    reason: str


class Check(NamedTuple):
    passed: bool
    message: str


# A rule looks at the candidate, the champion (None when there is none) and the registry config;
# it returns a Check, or None where it does not apply.
Rule = Callable[[Facts, Facts | None, DictConfig], Check | None]


def class_recall_floor(candidate: Facts, champion: Facts | None, rules: DictConfig) -> Check:
    """Every class's test recall >= registry.min_class_recall (a model may not give up a class)."""
    floor = float(rules.min_class_recall)
    recalls = {
        k.removesuffix(RECALL_SUFFIX): v
        for k, v in candidate.metrics.items()
        if k.endswith(RECALL_SUFFIX)
    }
    if not recalls:
        return Check(False, "no per-class test recall recorded (test_<class>_recall tags)")
    low = {name: value for name, value in recalls.items() if value < floor}
    if low:
        listed = ", ".join(f"{name} {value:.4f}" for name, value in sorted(low.items()))
        return Check(False, f"class recall below registry.min_class_recall={floor}: {listed}")
    worst = min(recalls, key=recalls.get)
    return Check(True, f"every class recall >= {floor} (lowest: {worst} {recalls[worst]:.4f})")


def comparable(candidate: Facts, champion: Facts) -> bool:
    return not _test_data_difference(candidate, champion)


def _test_data_difference(candidate: Facts, champion: Facts) -> str:
    mine, theirs = candidate.tags.get(Tag.DATA_MD5), champion.tags.get(Tag.DATA_MD5)
    if not mine or mine != theirs:
        return f"data {mine or 'unknown'} vs {theirs or 'unknown'}"
    # Same data tree, different subset (data.limit_per_class, e.g. the smoke profile's)
    mine, theirs = candidate.tags.get(Tag.TEST_IMAGES), champion.tags.get(Tag.TEST_IMAGES)
    if mine and theirs and mine != theirs:
        return f"{mine} vs {theirs} test images of data {candidate.tags[Tag.DATA_MD5][:8]}"
    return ""


def same_test_data(candidate: Facts, champion: Facts | None, rules: DictConfig) -> Check | None:
    """Test metrics compare only on the same test data: same data md5 (and test image count)."""
    if champion is None:
        return None
    difference = _test_data_difference(candidate, champion)
    if difference:
        return Check(
            False,
            f"candidate and champion v{champion.version} were tested on different "
            f"test data ({difference}): their metrics are not comparable (use "
            "--force --reason to promote anyway)",
        )
    return Check(True, f"same test data ({candidate.tags[Tag.DATA_MD5][:8]})")


def beats_champion(candidate: Facts, champion: Facts | None, rules: DictConfig) -> Check | None:
    """Test macro-F1 above the champion's, by at least registry.min_improvement. A tie never
    displaces the champion."""
    if champion is None:
        return None
    if not comparable(candidate, champion):
        return None  # same_test_data has said why
    mine, theirs = candidate.metrics.get(KEY_METRIC), champion.metrics.get(KEY_METRIC)
    if mine is None:
        return Check(False, f"candidate has no test {KEY_METRIC}")
    if theirs is None:
        return Check(True, f"champion v{champion.version} has no test {KEY_METRIC} to beat")
    needed = float(rules.min_improvement)
    delta = round(mine - theirs, 6)  # metrics carry 4 decimals: no float-noise verdicts
    summary = (
        f"test {KEY_METRIC} {mine:.4f} vs champion v{champion.version} {theirs:.4f} "
        f"({delta:+.4f}; registry.min_improvement={needed})"
    )
    return Check(delta > 0 and delta >= needed, summary)


def condition_floor(candidate: Facts, champion: Facts | None, rules: DictConfig) -> Check | None:
    """Every capture condition's test accuracy >= registry.min_condition_accuracy (0: off)."""
    from soundmood.robustness import condition_accuracies, condition_floor_failure

    floor = float(rules.get("min_condition_accuracy") or 0.0)
    if floor <= 0:
        return None
    robust = {k: v for k, v in candidate.tags.items() if k.startswith(ROBUST_PREFIX)}
    failure = condition_floor_failure(robust, floor)
    if failure:
        return Check(False, failure)
    accuracies = condition_accuracies(robust)
    worst = min(accuracies, key=accuracies.get)
    return Check(
        True,
        f"every capture condition >= registry.min_condition_accuracy={floor} "
        f"(worst: {worst} {accuracies[worst]:.4f})",
    )


# Evaluated in order, all of them, so a refusal lists every failed rule. A new rule is one more
# function of this shape here.
RULES: tuple[Rule, ...] = (class_recall_floor, condition_floor, same_test_data, beats_champion)


def gate(
    candidate: Facts, champion: Facts | None, rules: DictConfig, checks: tuple[Rule, ...] = RULES
) -> Decision:
    """May `candidate` become champion? With no champion, the floors alone decide."""
    if champion is not None and champion.version == candidate.version:
        return Decision(False, f"version {candidate.version} is already the champion")
    results = [check for rule in checks if (check := rule(candidate, champion, rules))]
    failed = [check.message for check in results if not check.passed]
    if failed:
        return Decision(False, "; ".join(failed))
    first = [] if champion else ["no champion yet"]
    return Decision(True, "; ".join(first + [check.message for check in results]))


# --- registry operations --------------------------------------------------------------------------


def client() -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def version_facts(mv: Any) -> Facts:
    return Facts.from_tags(mv.version, mv.tags or {})


def alias_version(name: str, alias: str) -> Any | None:
    """The version an alias points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def get_version(name: str, version: int | str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version(name, str(version))
    except MlflowException as exc:
        raise UserError(f"model {name} has no version {version}") from exc


def all_versions(name: str) -> list[Any]:
    versions = client().search_model_versions(f"name='{name}'")
    return sorted(versions, key=lambda mv: int(mv.version), reverse=True)


def aliases_by_version(name: str) -> dict[str, list[str]]:
    """version -> its aliases (search results do not carry aliases; the registered model does)."""
    found: dict[str, list[str]] = {}
    for alias, version in client().get_registered_model(name).aliases.items():
        found.setdefault(str(version), []).append(alias)
    return found


def model_description(cfg: DictConfig) -> str:
    return (
        f"Facial expression of a face image: {', '.join(cfg.data.classes)}. Input: a "
        "column `image` of encoded JPEG/PNG bytes (base64 in JSON); output: a probability "
        "per class and `label`. Aliases: champion (served; moved only by the promotion "
        "gate, `soundmood promote`), challenger (the latest registered candidate)."
    )


def model_id_of(model_uri: str) -> str | None:
    """`models:/m-<id>` (a logged model in MLflow 3) -> `m-<id>`."""
    rest = model_uri.removeprefix("models:/")
    return rest if rest != model_uri and "/" not in rest and "@" not in rest else None


def existing_version(name: str, run_id: str, model_uri: str) -> Any | None:
    """The version already registered from this run's model (a re-run adds no duplicate)."""
    model_id = model_id_of(model_uri)
    for mv in client().search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if mv.source == model_uri or (model_id and getattr(mv, "model_id", None) == model_id):
            return mv
    return None


def register(cfg: DictConfig, model_uri: str, run_id: str, tags: dict[str, str]) -> Any:
    """A new version of registry.model_name (or the one this model already is), aliased
    challenger unless it is the champion."""
    from mlflow.exceptions import MlflowException

    name, mlflow_client = cfg.registry.model_name, client()
    try:
        mlflow_client.create_registered_model(name, description=model_description(cfg))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = existing_version(name, run_id, model_uri)
    if mv is None:
        mv = mlflow_client.create_model_version(
            name, source=model_uri, run_id=run_id, tags=tags, model_id=model_id_of(model_uri)
        )
    else:
        complete_version(name, mv, tags)
    champion = alias_version(name, CHAMPION)
    if champion is None or str(champion.version) != str(mv.version):
        mlflow_client.set_registered_model_alias(name, CHALLENGER, mv.version)
    else:  # a promotion killed before it took challenger off the new champion
        drop_challenger(name, mv.version)
    return refresh_card(cfg, mv.version)


def complete_version(name: str, mv: Any, tags: dict[str, str]) -> None:
    """Give a version found again the tags a killed register may not have set (a store that
    creates a version and tags it in separate calls). What it already holds is kept: a re-run
    never rewrites how a version was recorded."""
    mlflow_client, present = client(), mv.tags or {}
    for key, value in tags.items():
        if key not in present:
            mlflow_client.set_model_version_tag(name, mv.version, key, value)


def refresh_card(cfg: DictConfig, version: str | int) -> Any:
    """Make the version's model card (its description, and model_card.md among its run's
    artifacts) say what its tags say now; returns the version. The card is a function of the
    tags alone, so this is idempotent: a re-run after a kill, or after a promotion, converges.
    The artifact is written first: a description already current means the artifact is too."""
    name = cfg.registry.model_name
    mv = get_version(name, version)
    tags, classes = mv.tags or {}, list(cfg.data.classes)
    wanted = model_card.description(name, mv.version, tags, classes)
    if mv.description == wanted:
        return mv
    if mv.run_id:
        card = model_card.render(name, mv.version, tags, classes)
        client().log_text(mv.run_id, card, model_card.CARD_FILE)
    client().update_model_version(name, mv.version, description=wanted)
    return get_version(name, mv.version)


def drop_challenger(name: str, version: str) -> None:
    """Remove the challenger alias if it points at `version` (which is now the champion)."""
    challenger = alias_version(name, CHALLENGER)
    if challenger is not None and str(challenger.version) == str(version):
        client().delete_registered_model_alias(name, CHALLENGER)


def promote(cfg: DictConfig, version: int | str, force_reason: str | None = None) -> Decision:
    """Run the gate on `version` (or force it with a reason); move champion if it passes."""
    name, mlflow_client = cfg.registry.model_name, client()
    candidate = version_facts(get_version(name, version))
    current = alias_version(name, CHAMPION)
    champion = version_facts(current) if current else None
    decision = gate(candidate, champion, cfg.registry)
    if champion is not None and champion.version == candidate.version:
        return decision  # nothing to do; its own promotion tags stay as they are
    forced = force_reason is not None
    if forced:
        verdict = "would pass" if decision.promote else "refused"
        decision = Decision(True, f"forced: {force_reason} (the gate {verdict}: {decision.reason})")
    label = "forced" if forced else "promoted" if decision.promote else "refused"
    mlflow_client.set_model_version_tag(name, candidate.version, Tag.GATE, label)
    mlflow_client.set_model_version_tag(name, candidate.version, Tag.GATE_REASON, decision.reason)
    if decision.promote:
        move_champion(
            name, candidate.version, champion.version if champion else "", decision.reason, forced
        )
    refresh_card(cfg, candidate.version)  # the card shows the gate's decision and numbers
    return decision


def move_champion(name: str, version: str, previous: str, reason: str, forced: bool) -> None:
    mlflow_client = client()
    tags = {
        Tag.PROMOTED_AT: now(),
        Tag.PROMOTED_BY: user(),
        Tag.PREVIOUS_CHAMPION: previous,
        Tag.PROMOTION_REASON: reason,
        Tag.FORCED: str(forced).lower(),
    }
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, version, key, value)
    mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    drop_challenger(name, version)  # not a challenger now


def rollback(cfg: DictConfig) -> tuple[str, str]:
    """Champion back to the version its previous_champion tag names; returns (from, to)."""
    name, mlflow_client = cfg.registry.model_name, client()
    current = alias_version(name, CHAMPION)
    if current is None:
        raise UserError(f"model {name} has no champion to roll back")
    previous = (current.tags or {}).get(Tag.PREVIOUS_CHAMPION, "")
    if not previous:
        raise UserError(
            f"champion v{current.version} was the first champion of {name}: there is "
            "no previous champion to roll back to"
        )
    target = get_version(name, previous)
    stamp = now()
    mlflow_client.set_model_version_tag(name, current.version, Tag.ROLLED_BACK_AT, stamp)
    mlflow_client.set_model_version_tag(
        name, current.version, Tag.ROLLED_BACK_TO, str(target.version)
    )
    mlflow_client.set_model_version_tag(name, target.version, Tag.RESTORED_AT, stamp)
    mlflow_client.set_registered_model_alias(name, CHAMPION, target.version)
    return str(current.version), str(target.version)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# --- what a registered version is tagged with -----------------------------------------------------


def config_hash(run_id: str) -> str:
    """Digest of the training run's params: the composed config with tuned values applied, as
    that model was actually trained (later edits of params.yaml do not change it)."""
    params = client().get_run(run_id).data.params
    blob = json.dumps(params, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def version_tags(
    cfg: DictConfig,
    run_id: str,
    metrics: dict[str, float],
    data_md5: str,
    test_images: int | None = None,
    robust: dict[str, float] | None = None,
    temperature: float | None = None,
) -> dict[str, str]:
    """What a new version is tagged with: how it was made (git, data, config, profile, model),
    metrics.json as test_<key>, robustness.json as robust_<condition>_<stat>, and the softmax
    temperature train folded in. The gate, the model card and the diff read only these."""
    from soundmood import tracking

    git = tracking.git_state()
    tags = {
        Tag.GIT_COMMIT: git["git_commit"],
        Tag.GIT_DIRTY: git["git_dirty"],
        Tag.DATA_MD5: data_md5,
        Tag.CONFIG_HASH: config_hash(run_id),
        Tag.PROFILE: str(cfg.get("profile", "")),
        Tag.MODEL_NAME: cfg.model.name,
        Tag.RUN_ID: run_id,
    }
    if test_images is not None:
        tags[Tag.TEST_IMAGES] = str(test_images)
    if temperature is not None:
        tags[Tag.TEMPERATURE] = str(temperature)
    tags.update({f"{METRIC_PREFIX}{k}": str(v) for k, v in metrics.items()})
    tags.update({k: str(v) for k, v in (robust or {}).items()})
    return tags


# --- CLI ----------------------------------------------------------------------------------------


def tested_data_version(cfg: DictConfig) -> str:
    """The data md5 the test split was prepared from (prepared/index.json), else data.dvc's."""
    from soundmood.data.layout import data_version

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
    from soundmood.robustness import REPORT_FILE, mlflow_metrics

    path = reports / REPORT_FILE
    if not path.exists():
        return {}
    return mlflow_metrics(json.loads(path.read_text()), ROBUST_PREFIX)


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
    from soundmood import tracking

    reports = Path(cfg.evaluate.reports_dir)
    evaluation = _read_json(reports / "evaluation.json", "evaluate")
    metrics = _read_json(reports / "metrics.json", "evaluate")
    tracking.setup(cfg)
    run_id = evaluation["mlflow_run_id"]
    tags = version_tags(
        cfg,
        run_id,
        metrics,
        tested_data_version(cfg),
        evaluation.get("test_images"),
        robust_tags(reports),
        trained_temperature(reports),
    )
    mv = register(cfg, evaluation["model_uri"], run_id, tags)
    current = alias_version(cfg.registry.model_name, CHAMPION)
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
        decision = promote(cfg, mv.version)
        outcome = "promoted" if decision.promote else "refused"
    else:
        decision = Decision(False, "registry.auto_promote is false: run `soundmood promote`")
        outcome = "pending"
    refresh_card(cfg, mv.version)  # a run killed between the gate and the card left it stale
    champion = alias_version(cfg.registry.model_name, CHAMPION)
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
    from soundmood import tracking

    if args.force and not (args.reason or "").strip():
        raise UserError('--force needs --reason "...": a manual override is recorded with why')
    if args.reason and not args.force:
        raise UserError("--reason goes with --force; without it the gate records its own reason")
    tracking.setup(cfg)
    name = cfg.registry.model_name
    version = args.version
    if version is None:
        versions = all_versions(name)
        if not versions:
            raise UserError(f"model {name} has no registered versions: run `soundmood register`")
        version = versions[0].version
    candidate = get_version(name, version)
    version_diff.print_table(compare(cfg, candidate, alias_version(name, CHAMPION), as_table=True))
    decision = promote(cfg, version, args.reason.strip() if args.force else None)
    verdict = "promoted to champion" if decision.promote else "refused (aliases unchanged)"
    print(f"{name} v{version} {verdict}: {decision.reason}")
    return 0 if decision.promote else 1


def rollback_cli(cfg: DictConfig, args: Any) -> int:
    from soundmood import tracking

    tracking.setup(cfg)
    old, new = rollback(cfg)
    print(f"{cfg.registry.model_name}: champion moved back from v{old} to v{new}")
    return 0


# --- what `soundmood models` shows --------------------------------------------------------------


def resolve(name: str, ref: str) -> Any:
    """A version named by number (`3`, `v3`) or alias (`champion`)."""
    text = str(ref).strip()
    if text.removeprefix("v").isdigit():
        return get_version(name, text.removeprefix("v"))
    mv = alias_version(name, text)
    if mv is None:
        known = ", ".join(sorted(client().get_registered_model(name).aliases)) or "none"
        raise UserError(f"model {name} has no version or alias {text!r} (aliases: {known})")
    return mv


def compare(cfg: DictConfig, a: Any, b: Any | None, as_table: bool = False) -> Any:
    """A against B (None: no champion): the diff as a rich table, or as a JSON-able dict.
    The verdict is the gate's on A with B as the champion."""
    name, classes = cfg.registry.model_name, list(cfg.data.classes)
    aliases = aliases_by_version(name)

    def side(mv: Any) -> version_diff.Side:
        version = str(mv.version)
        figures = model_card.figures(mv.tags or {}, classes)
        return version_diff.Side(version, sorted(aliases.get(version, [])), figures)

    first, second = side(a), side(b) if b is not None else None
    decision = gate(version_facts(a), version_facts(b) if b is not None else None, cfg.registry)
    rows = version_diff.rows(first.figures, second.figures if second else None)
    if as_table:
        title = f"{name}: v{first.version} against {second.label if second else 'no champion'}"
        return version_diff.diff_table(title, first, second, rows, *decision)
    return version_diff.as_json(first, second, rows, *decision)


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
    from soundmood import tracking

    tracking.setup(cfg)
    name = cfg.registry.model_name
    versions = all_versions(name)
    if not versions:
        raise UserError(f"model {name} has no registered versions: run `soundmood register`")
    as_json = bool(getattr(args, "json", False))
    refs = getattr(args, "diff", None)
    if refs is not None:
        if len(refs) > 2:
            raise UserError(f"--diff takes at most two versions (A B), not {len(refs)}")
        a = resolve(name, refs[0] if refs else CHALLENGER)
        b = resolve(name, refs[1] if len(refs) > 1 else CHAMPION)
        if as_json:
            print(json.dumps(compare(cfg, a, b), indent=2))
        else:
            version_diff.print_table(compare(cfg, a, b, as_table=True))
        return 0
    aliases = aliases_by_version(name)
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
