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
        help="train, index, serve and query end to end on a built-in default (offline, ~30 s on 2 cores)",
        description="Train, index, serve and query end to end, offline, in under a minute on 2 idle cores.",
    )
    p.add_argument("--data", help="Fashion-MNIST IDX file or folder (default: generated garment shapes)")
    p.add_argument("--out", default="quickstart-out", help="output directory (default ./quickstart-out)")
    p.add_argument(
        "--items", type=int, default=None, help="items used (default 3000 generated, or all of --data)"
    )
    p.add_argument(
        "--epochs", type=int, default=30, help="training epochs (default 30: about 30 s on 2 idle cores)"
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="S",
        help="stop training after S seconds, with a warning when that cuts it short (default: no limit)",
    )
    p.add_argument("--port", type=int, default=0, help="gRPC port on 127.0.0.1 (default 0: any free port)")
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
        k=args.k,
        seed=args.seed,
        progress=not args.no_progress,
    )
    return 0 if run_quickstart(config).matches_brute_force else 1


