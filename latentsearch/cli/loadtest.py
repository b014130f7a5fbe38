"""``latentsearch loadtest``: drive a running server's Nearest and print a ghz-style report."""

from __future__ import annotations

import argparse
import json

from latentsearch.cli.credentials import add_token_arguments, resolve_token
from latentsearch.cli.values import label_list
from latentsearch.loadgen import DEFAULT_TOTAL, LoadConfig, load_queries, run_load_sync

__all__ = ["register_cli"]


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``loadtest`` sub-command."""
    p = subparsers.add_parser(
        "loadtest",
        help="load-test a running server's Nearest (ghz-style report)",
        description="Drive Nearest with concurrent workers and print a ghz-style report.",
    )
    p.add_argument("--target", required=True, help="server host:port (loopback unless --allow-remote)")
    p.add_argument("-c", "--concurrency", type=int, default=50, help="concurrent workers (default 50)")
    bound = p.add_mutually_exclusive_group()
    bound.add_argument("-z", "--duration", type=float, default=None, help="seconds to run")
    bound.add_argument(
        "-n", "--total", type=int, default=None, help=f"calls to send (default {DEFAULT_TOTAL})"
    )
    p.add_argument("--rps", type=float, default=None, help="overall calls per second (default: unpaced)")
    p.add_argument(
        "--data-file",
        "--queries",
        dest="data_file",
        default=None,
        metavar="FILE",
        help="query points, mixed in: .npy (n, d), or .json: points, ghz request data ({\"z\": [...]} or a "
        "list of them) or a whole ghz config such as deploy/ghz.json (its \"data\")",
    )
    p.add_argument(
        "--families",
        default="box,prior",
        help="comma-separated query families: box, prior, data (default box,prior; --data-file adds data)",
    )
    p.add_argument("-k", type=int, default=10, help="number of results per call (default 10)")
    p.add_argument("--mode", choices=["auto", "exact", "approx"], default=None, help="search mode")
    p.add_argument("--labels", type=label_list, default=None, help="integer label filter, e.g. 3,4")
    add_token_arguments(p, serving=False)
    p.add_argument("--tls-ca", default=None, help="PEM CA certificate (enables TLS)")
    p.add_argument("--timeout", type=float, default=20.0, help="per-call deadline in seconds (default 20)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    p.add_argument("-O", "--output-format", choices=["text", "json"], default="text", help="report format")
    p.set_defaults(func=_cmd_loadtest)


def _cmd_loadtest(args: argparse.Namespace) -> int:
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    data = None
    if args.data_file:
        data = load_queries(args.data_file)
        families = families if "data" in families else (*families, "data")
    config = LoadConfig(
        target=args.target,
        allow_remote=args.allow_remote,
        concurrency=args.concurrency,
        duration=args.duration,
        total=args.total,
        rps=args.rps,
        k=args.k,
        mode=args.mode,
        labels=tuple(args.labels or ()),
        families=families,
        data=data,
        token=resolve_token(args.token_file, args.token),
        tls_ca=args.tls_ca,
        timeout=args.timeout,
    )
    report = run_load_sync(config)
    if args.output_format == "json":
        print(json.dumps(report.to_ghz_json(), indent=2))
    else:
        print(report.summary(), end="")
    return 0 if report.count and not report.errors else 1
