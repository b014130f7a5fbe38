"""The package's layers import one way only, with no cycles (checked with ``ast`` over the source).

Layers, lowest first (README, Layout): base (errors, the posterior type, the generated stubs) ->
data and model -> engine -> indexer -> server and client -> application (CLI, quickstart, load
generator). Every ``import`` counts, at module level or inside a function, so a function-level
import cannot hide a cycle; only the application layer defers imports (the CLI keeps torch and
faiss out of ``--help``), and only downward.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "latentsearch"

# Rank of each part of the package: a module may import parts of lower or equal rank, never a
# higher one. Parts of equal rank that must stay apart are listed in SEPARATE.
RANKS: dict[str, int] = {
    "": 0,  # latentsearch/__init__.py (base names; engine and client only lazily, by name)
    "_lazy": 0,
    "errors": 0,
    "posterior": 0,
    "diagnostics": 0,
    "bank": 0,
    "wire": 0,
    "progress": 0,
    "tls": 0,
    "v1": 0,
    "data": 1,
    "model": 2,
    "engine": 3,
    "indexer": 4,
    "server": 5,
    "client": 5,
    "cli": 6,
    "quickstart": 6,
    "loadgen": 6,
    "browser": 6,
    "__main__": 6,
}
# Equal-rank parts that may not import each other in either direction.
SEPARATE = [{"server", "client"}]
# Parts allowed to import inside functions (deferred loading of heavy libraries).
DEFERRING = {"cli"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The project module that ``import name`` loads last (the longest known prefix)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(path: Path, module: str, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for each project import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                # `from pkg import submodule` imports the submodule; `from mod import name` the module.
                names = [f"{base}.{alias.name}" for alias in child.names]
            for name in names:
                target = _resolve(name, known)
                if target is not None and target.split(".")[0] == "latentsearch" and target != module:
                    assert isinstance(child, (ast.Import, ast.ImportFrom))  # only imports give names
                    found.append((target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def _graph() -> dict[str, list[tuple[str, int, bool]]]:
    known = _modules()
    return {name: _imports(path, name, known) for name, path in known.items()}


def test_every_part_has_a_layer() -> None:
    parts = {_part(m) for m in _modules()}
    assert parts <= set(RANKS), f"give these parts a layer in RANKS: {sorted(parts - set(RANKS))}"


def test_imports_point_down_the_layers() -> None:
    bad = []
    for module, imports in _graph().items():
        src = _part(module)
        for target, line, _ in imports:
            dst = _part(target)
            if dst == src:
                continue
            if RANKS[dst] > RANKS[src] or any({src, dst} <= pair for pair in SEPARATE):
                bad.append(f"{module}:{line} imports {target} ({src or 'latentsearch'} -> {dst})")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_function_level_imports_outside_the_application_layer() -> None:
    bad = [
        f"{module}:{line} imports {target} inside a function"
        for module, imports in _graph().items()
        if _part(module) not in DEFERRING
        for target, line, in_function in imports
        if in_function
    ]
    assert not bad, "\n".join(bad)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def strong(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


@pytest.mark.parametrize("level", ["module", "package"])
def test_no_import_cycles(level: str) -> None:
    edges: dict[str, set[str]] = {}
    for module, imports in _graph().items():
        src = module if level == "module" else _part(module)
        for target, _, _ in imports:
            dst = target if level == "module" else _part(target)
            if dst != src and not (level == "package" and "" in (src, dst)):
                edges.setdefault(src, set()).add(dst)
    assert _cycles(edges) == []


def test_the_checker_sees_a_cycle_and_a_function_level_import(tmp_path: Path) -> None:
    """The checks above can fail: a planted cycle and a deferred import are found."""
    a = tmp_path / "a.py"
    a.write_text("import latentsearch.engine\n\ndef f():\n    import latentsearch.server\n")
    known = {"latentsearch.engine": a, "latentsearch.server": a, "a": a}
    found = _imports(a, "a", known)
    assert ("latentsearch.engine", 1, False) in found and ("latentsearch.server", 4, True) in found
    assert _cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]
