"""``latentsearch quickstart`` (alias ``demo``): train, index, serve and query end to end."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register_cli"]


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``quickstart`` sub-command (alias ``demo``)."""
    p = subparsers.add_parser(
        "quickstart",
        aliases=["demo"],
        help="train, index, serve and query end to end on real garment images (offline, ~1 min on 2 cores)",
        description="Train, index, serve and query end to end, offline, in about a minute on 2 idle cores, "
        "on the Fashion-MNIST sample shipped with the package (3,443 real garment images).",
    )
    p.add_argument(
        "--data",
        help="fashion-mnist-sample (the default: 3,443 real images shipped with the package), shapes "
        "(generated garment shapes), or a Fashion-MNIST IDX file or folder",
    )
    p.add_argument("--out", default="quickstart-out", help="output directory (default ./quickstart-out)")
    p.add_argument(
        "--items", type=int, default=None, help="items used (default: all of --data; 3000 for shapes)"
    )
    p.add_argument(
        "--epochs", type=int, default=30, help="training epochs (default 30: about 35 s on 2 idle cores)"
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="S",
        help="stop training after S seconds, with a warning when that cuts it short (default: no limit)",
    )
    p.add_argument("--port", type=int, default=0, help="gRPC port on 127.0.0.1 (default 0: any free port)")
    p.add_argument(
        "--http-port",
        type=int,
        default=0,
        help="port of the explorer page and HTTP/JSON API on 127.0.0.1 (default 0: any free port)",
    )
    p.add_argument(
        "--keep-serving",
        action="store_true",
        help="after the queries, keep serving the page (its URL is printed) and gRPC until Ctrl-C",
    )
    p.add_argument(
        "--no-screenshot",
        action="store_true",
        help="do not save OUT/explorer.png (taken with a headless Chromium when one is installed)",
    )
    p.add_argument("-k", type=int, default=5, help="neighbours shown per query (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress display (bar or log lines)")
    p.set_defaults(func=_cmd_quickstart)


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from latentsearch.quickstart import QuickstartConfig, run_quickstart

    config = QuickstartConfig(
        out=Path(args.out),
        data=args.data,
        items=args.items,
        epochs=args.epochs,
        time_limit_s=args.time_limit,
        port=args.port,
        http_port=args.http_port,
        keep_serving=args.keep_serving,
        screenshot=not args.no_screenshot,
        k=args.k,
        seed=args.seed,
        progress=not args.no_progress,
    )
    return 0 if run_quickstart(config).matches_brute_force else 1


