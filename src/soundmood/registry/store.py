"""The registry's MLflow side: versions of registry.model_name, their aliases and tags.

register adds a version linked to its run (or finds the one this model already is) and aliases
it challenger; promote runs the gate and moves champion; rollback moves champion back to the
version its previous_champion tag names; refresh_card rewrites a version's model card from its
tags; resolve and compare serve `soundmood models` and `soundmood promote`. MLflow's stages are
deprecated: only aliases and tags are used.
"""

from __future__ import annotations

import getpass
from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from soundmood import model_card, tracking, version_diff
from soundmood.config import digest, result_inputs
from soundmood.errors import UserError
from soundmood.model_card import METRIC_PREFIX, Tag
from soundmood.registry.gate import Decision, Facts, gate

CHAMPION = "champion"
CHALLENGER = "challenger"


def client() -> MlflowClient:
    """A client of the store MLflow points at now (tracking.setup chose it)."""
    return MlflowClient()


def version_facts(mv: Any) -> Facts:
    return Facts.from_tags(mv.version, mv.tags or {})


def alias_version(name: str, alias: str) -> Any | None:
    """The version an alias points at, or None."""
    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def get_version(name: str, version: int | str) -> Any:
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
    """Digest of what the model depends on among the training run's params (the composed config
    with tuned values applied, as that model was trained; later edits of params.yaml do not
    change it): the digest train's checkpoints and tune's studies are named by."""
    return digest(result_inputs(client().get_run(run_id).data.params))


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


# --- versions by name, side by side ------------------------------------------------------------


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
