"""docs/config.md and conf/ never drift apart: every key the composed config holds is named in
its group's section, and every key a section's table names exists."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from soundmood.config import flatten
from tests.conftest import ROOT, compose_config

DOC = ROOT / "docs" / "config.md"
SECTION = re.compile(r"^## (\w+)", re.M)
TOKEN = re.compile(r"`([a-z_][a-z0-9_.*]*)`")
TOP_LEVEL = "top"  # keys outside any group (seed, profile), documented before the first section


def sections() -> dict[str, str]:
    text = DOC.read_text()
    parts = SECTION.split(text)
    found = {TOP_LEVEL: parts[0]}
    found.update(zip(parts[1::2], parts[2::2], strict=True))
    return found


def keys_by_group() -> dict[str, set[str]]:
    """group -> its keys relative to the group, over the default config and every model."""
    grouped: dict[str, set[str]] = {}
    for overrides in ([], ["model=seed_cnn"]):
        cfg = compose_config(["profile=cpu", *overrides])
        for key in flatten(OmegaConf.to_container(cfg)):
            group, _, rest = key.partition(".")
            if rest:
                grouped.setdefault(group, set()).add(rest)
            else:
                grouped.setdefault(TOP_LEVEL, set()).add(group)
    return grouped


def covers(token: str, key: str) -> bool:
    """`a.b` names a.b and everything under it; `a.*` everything under a."""
    stem = token.removesuffix(".*")
    return key == stem or key.startswith(stem + ".")


def table_keys(section: str) -> set[str]:
    """The backticked names in the first column of a section's `| key | meaning |` table."""
    names, in_key_table = set(), False
    for line in section.splitlines():
        cells = line.split("|")
        if not line.startswith("|") or len(cells) < 3:
            in_key_table = False
        elif cells[1].strip() == "key":
            in_key_table = True
        elif in_key_table:
            names |= set(TOKEN.findall(cells[1]))
    return names


@pytest.mark.parametrize("group", sorted(keys_by_group()))
def test_every_key_is_documented(group: str) -> None:
    section = sections().get(group)
    assert section is not None, f"docs/config.md has no `## {group}` section"
    tokens = set(TOKEN.findall(section))
    missing = sorted(k for k in keys_by_group()[group] if not any(covers(t, k) for t in tokens))
    assert not missing, f"docs/config.md, section {group}, never names: {', '.join(missing)}"


@pytest.mark.parametrize("group", sorted(set(sections()) - {TOP_LEVEL}))
def test_every_documented_key_exists(group: str) -> None:
    keys = keys_by_group().get(group, set())
    stale = sorted(t for t in table_keys(sections()[group]) if not any(covers(t, k) for k in keys))
    assert not stale, f"docs/config.md, section {group}, documents unknown keys: {stale}"


def test_a_missing_key_is_caught() -> None:
    assert covers("augment.*", "augment.jpeg.probability")
    assert covers("limits", "limits.max_files") and not covers("limit", "limits.max_files")
    assert table_keys("| key | meaning |\n|---|---|\n| `a`, `b` | x `c` |\n") == {"a", "b"}
    assert table_keys("| condition | what |\n|---|---|\n| `grey` | x |\n") == set()
