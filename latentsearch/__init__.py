"""latentsearch: vector search over VAE latent posteriors, ranked by exact log q(z|x)."""

from latentsearch.engine import EngineConfig, PosteriorBank, SearchEngine, SearchResult
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
