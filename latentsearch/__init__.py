"""latentsearch: vector search over VAE latent posteriors, ranked by exact log q(z|x).

The exception tree loads eagerly; the engine loads on first use (PEP 562), so that importing
``latentsearch.errors`` (as ``model`` does) never pulls the engine in mid-import.
"""

from __future__ import annotations

import importlib
from typing import Any

from latentsearch.errors import (
    CorruptIndexError,
    FailedPreconditionError,
    InvalidArgumentError,
    LatentSearchError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)

__version__ = "0.1.0"

_LAZY = {
    "EngineConfig": "latentsearch.engine",
    "PosteriorBank": "latentsearch.engine",
    "SearchEngine": "latentsearch.engine",
    "SearchResult": "latentsearch.engine",
}

__all__ = [
    "CorruptIndexError",
    "EngineConfig",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "LatentSearchError",
    "NotFoundError",
    "PosteriorBank",
    "ResourceExhaustedError",
    "SearchEngine",
    "SearchResult",
    "UnavailableError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'latentsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
