"""The docs stay true: links resolve, the tests a page names exist, the config keys it names exist."""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from hpc_seg.config import Config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _keys(cls, prefix="") -> set[str]:
    out = set()
    for f in fields(cls):
        out.add(prefix + f.name)
        t = f.default_factory() if callable(getattr(f, "default_factory", None)) else None
        if is_dataclass(t):
            out |= _keys(type(t), f"{prefix}{f.name}.")
    return out


CONFIG_KEYS = _keys(Config)
CODE_NAMES = {"deepspeed.initialize", "deepspeed.comm", "deepspeed.checkpoint"}  # the library, not our keys
TEST_NAMES = {m for p in (ROOT / "tests").rglob("test_*.py") for m in re.findall(r"def (test_\w+)", p.read_text())}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name}: link to {target} does not resolve"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_tests_exist(page):
    for name in re.findall(r"`(?:[\w/]+\.py::)?(test_\w+?)(?:…|\.\.\.)?`", page.read_text()):
        if not name.endswith("_"):  # "test_bf16_run_…" abbreviates a name: checked by prefix
            assert name in TEST_NAMES, f"{page.name} names {name}, which no test defines"
        else:
            assert any(t.startswith(name) for t in TEST_NAMES), f"{page.name}: no test starts with {name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_config_keys_exist(page):
    for key in re.findall(r"`((?:train|deepspeed|data|model|loss|checkpoint|slurm|inference)\.\w+)(?::[^`]*)?`",
                          page.read_text()):
        assert key in CONFIG_KEYS or key in CODE_NAMES, f"{page.name} names config key {key}, which the schema lacks"
