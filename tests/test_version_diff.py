"""`soundmood models --diff`: two versions registered by the real `register` stage from reports
of different figures, compared from what the registry holds: every delta is A's report figure
minus B's, the verdict is the gate's, `--json` parses, and a missing version or alias is a
UserError."""

from __future__ import annotations

import argparse
import json

import pytest

from soundmood import registry
from soundmood.errors import UserError
from soundmood.registry import commands
from soundmood.version_diff import HIGHER, LOWER
from tests import test_model_card
from tests.test_model_card import CLASSES, CONDITIONS, register_from_reports, reports_of

# the model card tests' store and model, shared as fixtures
cfg = test_model_card.cfg
keras_model = test_model_card.keras_model


def diff_json(cfg, capsys, *refs: str) -> dict:
    assert commands.models_cli(cfg, argparse.Namespace(diff=list(refs), json=True)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow  # over 5 s: left out of make test-fast
def test_the_diff_of_two_registered_versions_has_the_reports_deltas(cfg, keras_model, capsys):
    cfg.registry.auto_promote = False
    first = register_from_reports(cfg, keras_model, 0.62)
    assert registry.promote(cfg, first).promote  # champion
    second = register_from_reports(cfg, keras_model, 0.71)  # challenger
    capsys.readouterr()

    shown = diff_json(cfg, capsys)  # default: challenger against champion
    assert shown["a"] == {"version": second, "aliases": ["challenger"]}
    assert shown["b"] == {"version": first, "aliases": ["champion"]}
    rows = {(r["section"], r["name"]): r for r in shown["rows"]}
    (mine, mine_robust, mine_train), (theirs, theirs_robust, theirs_train) = (
        reports_of(0.71),
        reports_of(0.62),
    )

    def expect(section: str, name: str, a: float, b: float, better: str) -> None:
        found = rows.pop((section, name))
        assert (found["a"], found["b"], found["better"]) == (a, b, better), name
        assert found["delta"] == pytest.approx(a - b, abs=1e-9), name

    for key in ("accuracy", "macro_f1", "weighted_f1"):
        expect("overall", key, mine[key], theirs[key], HIGHER)
    for c in CLASSES:
        for stat in ("precision", "recall", "f1"):
            key = f"{c}_{stat}"
            expect("class", key, mine[key], theirs[key], HIGHER)
    for name in CONDITIONS:
        a = mine_robust["conditions"][name]["accuracy"]
        expect(
            "condition",
            f"{name}_accuracy",
            a,
            theirs_robust["conditions"][name]["accuracy"],
            HIGHER,
        )
    expect("calibration", "temperature", mine_train["temperature"], theirs_train["temperature"], "")
    for key in ("ece", "ece_before_temperature", "nll", "brier"):
        expect("calibration", key, mine[key], theirs[key], LOWER)
    expect("calibration", "min_confidence", mine["min_confidence"], theirs["min_confidence"], "")
    for key in ("confident_coverage", "confident_accuracy"):
        expect("calibration", key, mine[key], theirs[key], HIGHER)
    for key in ("model_mb", "latency_ms"):
        expect("cost", key, mine[key], theirs[key], LOWER)
    assert rows == {}  # nothing else
    verdict = registry.gate(
        registry.version_facts(registry.get_version(cfg.registry.model_name, second)),
        registry.version_facts(registry.get_version(cfg.registry.model_name, first)),
        cfg.registry,
    )
    assert shown["gate"] == {"promote": True, "reason": verdict.reason}
    assert "0.7100 vs champion v1 0.6200 (+0.0900" in verdict.reason

    reverse = diff_json(cfg, capsys, "champion", f"v{second}")  # by alias and by number
    assert reverse["a"]["version"] == first and reverse["b"]["version"] == second
    back = {(r["section"], r["name"]): r["delta"] for r in reverse["rows"]}
    assert back[("overall", "macro_f1")] == pytest.approx(0.62 - 0.71)
    assert reverse["gate"]["promote"] is False

    assert commands.models_cli(cfg, argparse.Namespace(diff=[], json=False)) == 0
    table = capsys.readouterr().out
    assert f"v{second} (challenger)" in table and f"v{first} (champion)" in table
    assert "+0.0900" in table and "would promote" in table


def test_a_missing_version_or_alias_is_a_user_error(cfg, keras_model, capsys):
    only = register_from_reports(cfg, keras_model, 0.7)  # promoted: no challenger left
    capsys.readouterr()
    with pytest.raises(UserError, match=r"no version or alias 'challenger' \(aliases: champion"):
        commands.models_cli(cfg, argparse.Namespace(diff=[], json=True))
    with pytest.raises(UserError, match="no version 9"):
        commands.models_cli(cfg, argparse.Namespace(diff=["9", only], json=True))
    with pytest.raises(UserError, match="at most two"):
        commands.models_cli(cfg, argparse.Namespace(diff=["1", "1", "1"], json=True))
    same = diff_json(cfg, capsys, only, "champion")
    assert all(row["delta"] == 0 for row in same["rows"])
    assert same["gate"] == {"promote": False, "reason": "version 1 is already the champion"}
