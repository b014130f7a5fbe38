"""Container healthcheck: one call to the gRPC health service; exit 0 when SERVING, else 1.

    python deploy/healthcheck.py [--target 127.0.0.1:50051] [--service latentsearch.v1.LatentSearch]

Uses only grpcio and grpcio-health-checking (installed with the project), so the image needs no
extra binary such as grpc_health_probe. The server reports NOT_SERVING until an index version is
loaded and from the start of a graceful shutdown.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "latentsearch.v1.LatentSearch"


def check(target: str, service: str = SERVICE, timeout: float = 3.0) -> str:
    """The health status name of ``service`` at ``target`` (``UNREACHABLE`` on any RPC error)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return f"UNREACHABLE ({exc.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    parser.add_argument("--service", default=SERVICE, help="service name ('' for the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="RPC deadline in seconds")
    args = parser.parse_args(argv)
    status = check(args.target, args.service, args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
