"""latentsearch.server: the gRPC service over an index root (micro-batching, hot reload, health,
metrics, auth). The client is :mod:`latentsearch.client` (grpc and numpy only).

Public API::

    from latentsearch.server import LatentSearchServer, ServerConfig

    server = LatentSearchServer(ServerConfig(index="idx", port=0))
    port = await server.start()
    ...
    await server.stop()
"""

from latentsearch.server.app import LatentSearchServer, ServerConfig, serve
from latentsearch.server.batcher import MicroBatcher
from latentsearch.server.engine_service import EngineService, Snapshot, load_snapshot
from latentsearch.server.scheduler import SearchThreads
from latentsearch.server.supervisor import Supervisor, serve_workers

__all__ = [
    "EngineService",
    "LatentSearchServer",
    "MicroBatcher",
    "SearchThreads",
    "ServerConfig",
    "Snapshot",
    "Supervisor",
    "load_snapshot",
    "serve",
    "serve_workers",
]
