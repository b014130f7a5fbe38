"""``latentsearch serve`` (run the gRPC server) and ``latentsearch query`` (one Nearest call)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import TYPE_CHECKING

from latentsearch.cli.credentials import add_token_arguments, resolve_token
from latentsearch.cli.values import float_list, label_list, shape_tuple
from latentsearch.errors import LatentSearchError, status_details

if TYPE_CHECKING:
    from latentsearch.server.app import ServerConfig

__all__ = ["DEFAULT_METRICS_PORT", "register_cli", "serve_config"]

log = logging.getLogger(__name__)

# The /metrics port `serve` uses unless told otherwise. Prometheus keeps 9090-9094 for its own
# components and allocates 9100-9999 to exporters (9100 is node_exporter's, which many hosts
# run; 9464 the OpenTelemetry Prometheus exporter's), and 8000-8999 is where development web
# servers live; 20051 lies outside all of them, below Linux's ephemeral range (32768-60999) so no
# outgoing connection takes it, and echoes the gRPC port 50051.
DEFAULT_METRICS_PORT = 20051


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` and ``query`` sub-commands."""
    p = subparsers.add_parser(
        "serve",
        help="serve an index root over gRPC (hot reload, micro-batching, health, metrics)",
        description="Serve INDEX_ROOT's current version over gRPC until SIGTERM/SIGINT. Encode and Decode "
        "use the model stored with the served version (a hot reload or rollback switches index and "
        "model together); --model is for versions published from posteriors.",
    )
    p.add_argument("--index", required=True, help="index root (polled for new versions)")
    p.add_argument(
        "--model",
        default=None,
        help="model for Encode/Decode of index versions published without one (from posteriors): a "
        "model directory, TorchScript file or package.module:function. Versions indexed from a model "
        "store it and are served with it, no --model needed; a --model whose hash differs from a "
        "version's model is refused. TorchScript files and factories run their code: trusted models only",
    )
    p.add_argument(
        "--input-shape",
        type=shape_tuple,
        default=None,
        help="item shape of a TorchScript/factory --model, e.g. 28,28,1 (stored models know theirs)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0: any free port)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"Prometheus /metrics port (default {DEFAULT_METRICS_PORT}; 0: off)",
    )
    p.add_argument(
        "--metrics-host", default="127.0.0.1", help="address the metrics port binds (default 127.0.0.1)"
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="also serve the HTTP/JSON API (/api/v1, schema at /openapi.json) and the explorer page (/) "
        "on this port of --host, with the same TLS and token (default: off; 0: any free port)",
    )
    p.add_argument("--max-batch", type=int, default=64, help="most Nearest calls per search (default 64)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="batch collection wait (default 2 ms)")
    p.add_argument("--no-batching", action="store_true", help="search each Nearest call alone")
    p.add_argument("--queue-size", type=int, default=1024, help="most waiting Nearest calls (default 1024)")
    p.add_argument("--threads", type=int, default=2, help="search threads (default 2)")
    p.add_argument(
        "--batch-concurrency",
        type=int,
        default=1,
        help="batched Nearest rounds computing at once (default 1, at most --threads)",
    )
    p.add_argument("--faiss-threads", type=int, default=None, help="FAISS threads per search (default 1)")
    p.add_argument(
        "--reload-interval", type=float, default=2.0, help="seconds between index polls (default 2; 0: off)"
    )
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check every file of a version against its sha256 checksums before serving it, at start "
        "and on each reload (default; --no-verify: sizes, shapes and value ranges only)",
    )
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key (with --tls-cert)")
    add_token_arguments(p, serving=True)
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight calls get at shutdown")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="server processes sharing the port (SO_REUSEPORT), each with its own event loop, batcher "
        "and search threads, restarted when one dies (default: the CPUs this process may use; 1: "
        "this process alone, the port bound exclusively)",
    )
    p.set_defaults(func=_cmd_serve)

    q = subparsers.add_parser("query", help="send one Nearest query to a running server")
    q.add_argument("--target", default="127.0.0.1:50051", help="server host:port (default 127.0.0.1:50051)")
    q.add_argument(
        "--z",
        required=True,
        type=float_list,
        help="latent point, numbers separated by commas or spaces: -0.1,0.2,0.3 or \"-0.1 0.2 0.3\"",
    )
    q.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    q.add_argument("--labels", type=label_list, default=None, help="integer label filter, e.g. 3,4")
    q.add_argument("--mode", choices=["auto", "exact", "approx"], default=None, help="search mode")
    q.add_argument(
        "--probability",
        action="store_true",
        help="also print each item's match probability p(i|z), log q(z) with its certified bounds and "
        "the typicality of z",
    )
    add_token_arguments(q, serving=False)
    q.add_argument("--tls-ca", default=None, help="PEM CA certificate (enables TLS)")
    q.set_defaults(func=_cmd_query)


def serve_config(args: argparse.Namespace) -> ServerConfig:
    """The :class:`~server.app.ServerConfig` of parsed ``latentsearch serve`` arguments."""
    from latentsearch.server.app import ServerConfig

    return ServerConfig(
        index=args.index,
        model=args.model,
        input_shape=args.input_shape,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port or None,
        metrics_host=args.metrics_host,
        http_port=args.http_port,
        batching=not args.no_batching,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        queue_size=args.queue_size,
        search_threads=args.threads,
        batch_concurrency=args.batch_concurrency,
        faiss_threads=args.faiss_threads,
        reload_interval=args.reload_interval,
        verify=args.verify,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token=resolve_token(args.token_file, args.token),
        grace=args.grace,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from latentsearch.server.app import check_model_fits
    from latentsearch.server.supervisor import default_workers, serve_workers

    config = serve_config(args)
    check_model_fits(config)  # a wrong --model: one error line naming both hashes, nothing started
    workers = default_workers() if args.workers is None else args.workers
    asyncio.run(serve_workers(config, workers, log_level=logging.getLogger().level))
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    from latentsearch.client import LatentSearchClient

    token = resolve_token(args.token_file, args.token)
    with LatentSearchClient(args.target, token=token, tls_ca=args.tls_ca) as client:
        try:
            answer = client.nearest(
                args.z,
                args.k,
                labels=args.labels,
                mode=args.mode,
                with_probability=args.probability,
                with_label_names=True,  # printed when the version names its labels
            )
        except LatentSearchError as exc:  # the failed call's error, with its status code
            print(f"error: {exc.grpc_code}: {status_details(exc)}", file=sys.stderr)
            return 2
    print(f"index version {answer.index_version}  mode {answer.mode}  certified {answer.certified}")
    named = any(h.label_name is not None for h in answer.hits)
    extra = (f"  {'name':<16}" if named else "") + (f"  {'p(i|z)':>12}" if args.probability else "")
    print(f"{'rank':>4}  {'id':<24} {'log q(z|x)':>14}  {'label':>6}{extra}")
    for h in answer.hits:
        label = "" if h.label is None else str(h.label)
        extra = f"  {h.label_name or '':<16}" if named else ""
        extra += f"  {h.probability:>12.6g}" if h.probability is not None else ""
        print(f"{h.rank:>4}  {h.id:<24} {h.score:>14.6f}  {label:>6}{extra}")
    if answer.log_qz is not None and answer.log_qz_interval is not None:
        lo, hi = answer.log_qz_interval
        typicality = "n/a" if answer.typicality is None else f"{100.0 * answer.typicality:.1f}%"
        bounds = f"certified within [{lo:.6f}, {hi:.6f}]"
        print(f"log q(z) = {answer.log_qz:.6f} ({bounds}); typicality {typicality}")
    return 0
