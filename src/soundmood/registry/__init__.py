"""Model registry: each evaluated model becomes a version of registry.model_name; the `champion`
alias (what `models:/soundmood-fer@champion` serves) moves only through the promotion gate.

- gate: the promotion gate, pure functions over a version's tags (Facts, RULES, gate()).
- store: the MLflow side (register, promote, rollback, refresh_card, resolve, compare); a new
  version is tagged with what produced it (git commit, data md5, config hash, profile, model,
  temperature), its test metrics and capture conditions, and its description is its model card
  (soundmood.model_card), rewritten whenever the gate decides.
- commands: `register` (the stage), `promote`, `rollback` and `models`; this package does not
  import them (the CLI's table names soundmood.registry.commands).

Everything the gate reads is a version tag, so a decision can be re-derived from the registry.
"""

from soundmood.model_card import Tag
from soundmood.registry.gate import (
    KEY_METRIC,
    RULES,
    Check,
    Decision,
    Facts,
    Rule,
    beats_champion,
    class_recall_floor,
    condition_floor,
    gate,
    same_test_data,
)
from soundmood.registry.store import (
    CHALLENGER,
    CHAMPION,
    alias_version,
    aliases_by_version,
    all_versions,
    compare,
    get_version,
    model_id_of,
    promote,
    refresh_card,
    register,
    resolve,
    rollback,
    version_facts,
    version_tags,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "KEY_METRIC",
    "RULES",
    "Check",
    "Decision",
    "Facts",
    "Rule",
    "Tag",
    "alias_version",
    "aliases_by_version",
    "all_versions",
    "beats_champion",
    "class_recall_floor",
    "compare",
    "condition_floor",
    "gate",
    "get_version",
    "model_id_of",
    "promote",
    "refresh_card",
    "register",
    "resolve",
    "rollback",
    "same_test_data",
    "version_facts",
    "version_tags",
]
