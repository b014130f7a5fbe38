"""The test suite's own shape: no test module imports another test module or conftest.

Shared fixtures live in tests/conftest.py (asked for by name, never imported); the one module
tests import is ``reference`` (tests/reference.py), the float64 ground truth, which itself imports
nothing from ``latentsearch``. Checked with ``ast`` over every import, at any depth.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
IMPORTABLE = {"reference"}  # the only module of tests/ a test may import


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every import; relative imports keep their leading dots."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, "." * node.level + (node.module or "")))
    return out


def _violations(source: str, local: set[str], filename: str = "<test>") -> list[str]:
    """Imports in ``source`` of a module of tests/ (by name in ``local``) other than ``reference``."""
    bad = []
    for line, name in _imports(ast.parse(source, filename)):
        top = name.split(".")[0]
        if name.startswith(".") or top == "tests" or (top in local and top not in IMPORTABLE):
            bad.append(f"{filename}:{line}: imports {name}")
    return bad


def _local_modules() -> set[str]:
    return {p.stem for p in TESTS.glob("*.py")}


def test_no_test_module_imports_another_or_conftest() -> None:
    local = _local_modules()
    bad = []
    for path in sorted(TESTS.glob("*.py")):
        bad += _violations(path.read_text(), local, path.name)
    assert not bad, "\n".join(bad)


def test_reference_is_independent_of_the_package() -> None:
    tree = ast.parse((TESTS / "reference.py").read_text())
    tops = {name.split(".")[0] for _, name in _imports(tree)}
    assert tops <= {"__future__", "math", "collections", "numpy"}, tops


def test_only_conftest_and_reference_besides_tests() -> None:
    others = {p.name for p in TESTS.glob("*.py") if not p.name.startswith("test_")}
    assert others == {"conftest.py", "reference.py"}, others
    assert not (TESTS / "__init__.py").exists()  # tests/ is no package: `tests.x` imports nothing


@pytest.mark.parametrize(
    "source",
    [
        "from test_engine_exact import make_bank",
        "import conftest",
        "from tests.reference import log_q",
        "from . import reference",
        "import tests.conftest as c",
        "def f():\n    from test_posterior import MEAN\n",
    ],
)
def test_checker_flags_test_imports(source: str) -> None:
    assert _violations(source, {"test_engine_exact", "test_posterior", "conftest", "reference"})


def test_checker_allows_reference_and_libraries() -> None:
    source = "import numpy as np\nfrom reference import log_q\nfrom latentsearch.engine import SearchEngine\n"
    assert _violations(source, {"conftest", "reference"}) == []
