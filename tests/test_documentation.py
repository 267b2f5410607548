"""The docs stay true: links resolve; the tests, config keys, `hpc-seg` sub-commands, configs and
repository files a page names exist (README.md, docs/*.md, bench/README.md, CHANGELOG.md)."""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from hpc_seg.config import Config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md", ROOT / "CHANGELOG.md"]


def PAGE_ID(page: Path) -> str:  # README.md and bench/README.md need distinct ids
    return page.relative_to(ROOT).as_posix()


def _keys(cls, prefix="") -> set[str]:
    out = set()
    out |= {prefix + old for old in getattr(cls, "RENAMED", {})}  # former names, read with a warning
    for f in fields(cls):
        out.add(prefix + f.name)
        t = f.default_factory() if callable(getattr(f, "default_factory", None)) else None
        if is_dataclass(t):
            out |= _keys(type(t), f"{prefix}{f.name}.")
    return out


CONFIG_KEYS = _keys(Config)
CODE_NAMES = {"deepspeed.initialize", "deepspeed.comm", "deepspeed.checkpoint"}  # the library, not our keys
TEST_NAMES = {m for p in (ROOT / "tests").rglob("test_*.py") for m in re.findall(r"def (test_\w+)", p.read_text())}


@pytest.mark.parametrize("page", PAGES, ids=PAGE_ID)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name}: link to {target} does not resolve"


@pytest.mark.parametrize("page", PAGES, ids=PAGE_ID)
def test_named_tests_exist(page):
    for name in re.findall(r"`(?:[\w/]+\.py::)?(test_\w+?)(?:…|\.\.\.)?`", page.read_text()):
        if not name.endswith("_"):  # "test_bf16_run_…" abbreviates a name: checked by prefix
            assert name in TEST_NAMES, f"{page.name} names {name}, which no test defines"
        else:
            assert any(t.startswith(name) for t in TEST_NAMES), f"{page.name}: no test starts with {name}"


@pytest.mark.parametrize("page", PAGES, ids=PAGE_ID)
def test_named_config_keys_exist(page):
    for key in re.findall(r"`((?:train|deepspeed|data|model|loss|checkpoint|slurm|inference|tracking)\.\w+)(?::[^`]*)?`",
                          page.read_text()):
        assert key in CONFIG_KEYS or key in CODE_NAMES, f"{page.name} names config key {key}, which the schema lacks"


# ---- what the pages name exists: sub-commands, configs, repository files -------------------------

CONFIGS = ROOT / "configs"
PLACEHOLDER = re.compile(r"[A-Z]")  # placeholders are written in capitals: MY.yaml, RUN_DIR/plan.json, rankN.json
REAL_CAPITALS = ("README", "CHANGELOG", "NOTICE", "LICENSE")  # capitalised names of real files
FILE_PATH = re.compile(r"^[\w.*-][\w./*-]*/[\w.*-]+\.(?:py|yaml|sh|json|md)$")


def _subcommands() -> set[str]:
    from hpc_seg.cli import command_names

    return set(command_names())


def _fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)


def _code_spans(text: str) -> list[str]:
    """Inline code spans outside fenced blocks."""
    return re.findall(r"`([^`\n]+)`", re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M))


def _is_placeholder(name: str) -> bool:
    for real in REAL_CAPITALS:
        name = name.replace(real, "")
    return bool(PLACEHOLDER.search(name)) or any(c in name for c in "<>…$~")


def named_subcommands(text: str) -> list[str]:
    """`hpc-seg SUB` in a fenced code block (a command line, or a comment naming one)."""
    command = re.compile(r"(?<![\w.-])hpc-seg[ \t]+([a-z][\w-]*)")
    return [m for block in _fenced_blocks(text) for m in command.findall(block)]


def named_configs(text: str) -> list[str]:
    """`configs/NAME.yaml` anywhere, and the NAME of `--config NAME[.yaml]`, as paths under configs/."""
    names = re.findall(r"(?<![\w/.])configs/([\w/-]+\.yaml)", text)
    for arg in re.findall(r"--config[ =]+([^\s`|)\]]+)", text):
        arg = arg.removeprefix("configs/")
        if arg.startswith("../") or _is_placeholder(arg) or arg.startswith("/"):
            continue
        names.append(arg if arg.endswith(".yaml") else f"{arg}.yaml")
    return [n for n in names if not _is_placeholder(n)]


def named_files(text: str) -> list[str]:
    """Repository file paths in inline code: contain '/', end in .py/.yaml/.sh/.json/.md, no capitals."""
    out = []
    for span in _code_spans(text):
        for token in span.split():
            token = token.strip(",;:()[]'\"")
            if not FILE_PATH.match(token) or token.startswith(("../", "./", "/")) or "://" in token:
                continue
            if not _is_placeholder(token):
                out.append(token)
    return out


def _bases(page: Path, path: str) -> list[Path]:
    """Where a path may start: the repository root, the page's folder, or the package
    (`training/runtime.py`). A path whose first part is none of these (`runs/a/...`) is an output."""
    first = path.split("/")[0]
    return [b for b in (ROOT, page.parent, ROOT / "hpc_seg") if first and (b / first).exists()]


def _exists(page: Path, path: str) -> bool:
    for base in _bases(page, path):
        if "*" in path:
            if any(base.glob(path)):
                return True
        elif (base / path).exists():
            return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=PAGE_ID)
def test_named_subcommands_exist(page):
    known = _subcommands()
    for sub in named_subcommands(page.read_text()):
        assert sub in known, f"{page.name} runs `hpc-seg {sub}`, which the CLI lacks (it has {sorted(known)})"


@pytest.mark.parametrize("page", PAGES, ids=PAGE_ID)
def test_named_configs_exist(page):
    for name in named_configs(page.read_text()):
        assert (CONFIGS / name).is_file(), f"{page.name} names config {name}, which configs/ lacks"


def current_text(page: Path) -> str:
    """What a page says about the tree as it is: the changelog's latest version only (older entries
    name files as they were then)."""
    text = page.read_text()
    if page.name != "CHANGELOG.md":
        return text
    versions = re.split(r"(?m)^## ", text)
    return versions[1] if len(versions) > 1 else text


@pytest.mark.parametrize("page", PAGES, ids=PAGE_ID)
def test_named_files_exist(page):
    for path in named_files(current_text(page)):
        if _bases(page, path):
            assert _exists(page, path), f"{page.name} names {path}, which the repository lacks"


def test_the_checks_can_fail():
    """Each extractor finds a wrong name in a snippet, so a wrong name in a page would fail."""
    assert "trian" in named_subcommands("```bash\nhpc-seg trian --config tiny_cpu.yaml\n```")
    assert named_subcommands("```\n.venv/bin/hpc-seg demoo\n```") == ["demoo"]
    assert named_subcommands("```\nformat: hpc-seg/zarr-v3, ~/.config/hpc-seg/site.yaml\n```") == []
    assert "nope.yaml" in named_configs("`hpc-seg submit --config nope.yaml`")
    assert "grids/nope.yaml" in named_configs("see `configs/grids/nope.yaml`")
    assert "tiny.yaml" in named_configs("`hpc-seg config --config tiny`")
    assert named_configs("`--config MY.yaml`, `--config ../x.yaml`") == []
    assert named_files("`python bench/nope.py --out x` and `RUN_DIR/plan.json`, `~/.config/x/site.yaml`") \
        == ["bench/nope.py"]
    assert _bases(ROOT / "README.md", "bench/nope.py") and not _exists(ROOT / "README.md", "bench/nope.py")
    assert _bases(ROOT / "README.md", "training/nope.py") and not _exists(ROOT / "README.md", "training/nope.py")
    assert not _bases(ROOT / "README.md", "runs/demo/plan.json")  # an output, not a repository file
    assert "nope" not in _subcommands() and (CONFIGS / "tiny_cpu.yaml").is_file()


def test_every_result_file_is_described():
    """bench/README.md lists every JSON in bench/results (a figure nobody can find is no figure)."""
    text = (ROOT / "bench" / "README.md").read_text()
    missing = [p.name for p in sorted((ROOT / "bench" / "results").glob("*.json")) if f"bench/results/{p.name}" not in text]
    assert not missing, f"bench/README.md does not describe {missing}"
