"""Container healthcheck: one call to the gRPC health service; exit 0 when SERVING, else 1.

    python deploy/healthcheck.py [--target 127.0.0.1:50051] [--service latentsearch.v1.LatentSearch]
                                 [--tls-ca CA.pem [--server-name NAME]]

Uses only grpcio and grpcio-health-checking (installed with the project), so the image needs no
extra binary such as grpc_health_probe. The server reports NOT_SERVING until an index version is
loaded and from the start of a graceful shutdown. A server with TLS (``serve --tls-cert``) needs
``--tls-ca``, and ``--server-name`` when its certificate does not name the target's host (the health
service needs no token).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "latentsearch.v1.LatentSearch"


def check(
    target: str,
    service: str = SERVICE,
    timeout: float = 3.0,
    *,
    tls_ca: str | None = None,
    server_name: str | None = None,
) -> str:
    """The health status name of ``service`` at ``target`` (``UNREACHABLE`` on any RPC error).

    ``tls_ca``: PEM file of the CA that signed the server's certificate (enables TLS; a missing or
    unreadable one raises ValueError naming ``--tls-ca`` and the file);
    ``server_name``: the name to check that certificate against (default: the target's host).
    """
    if tls_ca is None:
        channel = grpc.insecure_channel(target)
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=_read_ca(tls_ca))
        options = [] if server_name is None else [("grpc.ssl_target_name_override", server_name)]
        channel = grpc.secure_channel(target, creds, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return f"UNREACHABLE ({exc.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def _read_ca(path: str) -> bytes:
    """The bytes of the ``--tls-ca`` file; ValueError (one line: the option, the file, why) when it
    cannot be read. The script imports no latentsearch module, so this mirrors latentsearch.tls."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"--tls-ca {path}: {exc.strerror or exc}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    parser.add_argument("--service", default=SERVICE, help="service name ('' for the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="RPC deadline in seconds")
    parser.add_argument("--tls-ca", default=None, help="PEM CA certificate of a TLS server (enables TLS)")
    parser.add_argument("--server-name", default=None, help="name the server's certificate holds (TLS)")
    args = parser.parse_args(argv)
    try:
        status = check(
            args.target, args.service, args.timeout, tls_ca=args.tls_ca, server_name=args.server_name
        )
    except ValueError as exc:  # a bad --tls-ca: one line, and unhealthy (exit 2 is reserved by docker)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
