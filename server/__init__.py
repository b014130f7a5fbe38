"""server: the gRPC service over an index root (micro-batching, hot reload, health, metrics, auth).

Public API::

    from server import LatentSearchClient, LatentSearchServer, ServerConfig

    server = LatentSearchServer(ServerConfig(index="idx", port=0))
    port = await server.start()
    ...
    await server.stop()
"""

from server.app import LatentSearchServer, ServerConfig, serve
from server.batcher import DeadlineExceededError, MicroBatcher
from server.client import LatentSearchClient, SearchAnswer
from server.engine_service import EngineService, Snapshot, load_snapshot

__all__ = [
    "DeadlineExceededError",
    "EngineService",
    "LatentSearchClient",
    "LatentSearchServer",
    "MicroBatcher",
    "SearchAnswer",
    "ServerConfig",
    "Snapshot",
    "load_snapshot",
    "serve",
]
