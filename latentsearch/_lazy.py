"""Lazy re-exports for package ``__init__`` modules (PEP 562).

A package whose public names live in heavy submodules (torch, faiss) lists them here so that
importing the package, or a light submodule of it, does not load those libraries until a name is
used. This is about import cost only: the layers still import one way (``tests/test_layers.py``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, namespace: dict[str, Any], names: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, resolving ``names`` (public name -> module).

    Each name is imported from its module on first access and cached in ``namespace`` (the
    package's ``globals()``), so later lookups are plain attribute reads.
    """

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
