"""latentsearch: vector search over VAE latent posteriors, ranked by exact log q(z|x).

Layers, each importing only those before it (``tests/test_layers.py`` checks this):

1. base: :mod:`latentsearch.errors`, :mod:`latentsearch.posterior` (the Gaussian type),
   :mod:`latentsearch.bank` (the catalogue type), :mod:`latentsearch.progress` (progress display),
   :mod:`latentsearch.tls` (TLS files), the generated gRPC stubs :mod:`latentsearch.v1`;
2. :mod:`latentsearch.data` (dataset readers, generated garments and banks) and
   :mod:`latentsearch.model` (the VAE, training, checkpoints, users' own models);
3. :mod:`latentsearch.engine` (exact and approximate search);
4. :mod:`latentsearch.indexer` (encode, build, publish versioned index roots);
5. :mod:`latentsearch.server` (the gRPC service) and :mod:`latentsearch.client`;
6. the application: :mod:`latentsearch.cli`, :mod:`latentsearch.quickstart`,
   :mod:`latentsearch.loadgen`.

The base names load eagerly; the engine and the client load on first use (PEP 562), so
``import latentsearch`` pulls in neither faiss nor torch nor grpc.
"""

from __future__ import annotations

from latentsearch._lazy import lazy_exports
from latentsearch.bank import PosteriorBank
from latentsearch.errors import (
    CorruptIndexError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    LatentSearchError,
    NotFoundError,
    PermissionDeniedError,
    RemoteError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from latentsearch.posterior import LOG_2PI, DiagonalGaussian

__version__ = "0.1.0"

_LAZY = {
    "EngineConfig": "latentsearch.engine",
    "SearchEngine": "latentsearch.engine",
    "SearchResult": "latentsearch.engine",
    "LatentSearchClient": "latentsearch.client",
}

__all__ = [
    "LOG_2PI",
    "CorruptIndexError",
    "DeadlineExceededError",
    "DiagonalGaussian",
    "EngineConfig",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "LatentSearchClient",
    "LatentSearchError",
    "NotFoundError",
    "PermissionDeniedError",
    "PosteriorBank",
    "RemoteError",
    "ResourceExhaustedError",
    "SearchEngine",
    "SearchResult",
    "UnauthenticatedError",
    "UnavailableError",
    "__version__",
]

__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)
