"""The package's layer order, written down in docs/layout.md and held here: a module imports only its
own package or packages in lower layers, at module level, inside functions and under
``if TYPE_CHECKING:`` alike; no import circle; no module over 450 lines, no function over 50."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "hpc_seg"

# Highest first. Packages in one layer do not import each other.
LAYERS = [
    ("__main__",),
    ("cli",),
    ("train", "demo"),
    ("jobs", "memory_plan"),
    ("training", "evaluation"),
    ("models", "losses", "metrics"),
    ("distributed",),
    ("ingest",),
    ("preprocessing",),
    ("storage",),
    ("config",),
    ("errors", "__init__"),
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}
MAX_LINES = 450
MAX_FUNCTION_LINES = 50


def part_of(module: str) -> str:
    """'hpc_seg.training.trainer' -> 'training'; 'hpc_seg' -> '__init__'."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """Every hpc_seg module a file imports, wherever the import statement sits."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; the package imports absolutely")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hpc_seg"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((node.lineno, sub if _is_module(sub) else node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("hpc_seg")]
    return found


def _is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def package_files() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def test_every_package_has_a_layer():
    parts = {part_of(module_name(p)) for p in package_files()}
    assert parts <= set(RANK), f"packages without a layer in tests/test_layout.py: {sorted(parts - set(RANK))}"


def test_imports_point_down():
    offences = []
    for path in package_files():
        me = part_of(module_name(path))
        for line, target in imports(path):
            other = part_of(target)
            if other != me and RANK[other] <= RANK[me]:
                offences.append(f"{path.relative_to(ROOT)}:{line} ({me}) imports {target} ({other})")
    assert not offences, "imports against the layer order:\n" + "\n".join(offences)


def test_no_import_circle_between_modules():
    graph = {module_name(p): {t for _, t in imports(p)} for p in package_files()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])


def test_modules_are_small():
    big = [f"{p.relative_to(ROOT)}: {n}" for p in package_files()
           if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_functions_are_small():
    long = [f"{p.relative_to(ROOT)}:{n.lineno} {n.name}: {n.end_lineno - n.lineno + 1}" for p in package_files()
            for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_checks_catch_an_upward_import(tmp_path):
    """The rule itself can fail: storage importing training is an offence."""
    assert RANK["storage"] > RANK["training"]
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from hpc_seg.training import trainer\n")
    assert [t for _, t in imports(fake)] == ["hpc_seg.training.trainer"]
