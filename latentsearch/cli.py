"""The ``latentsearch`` command line: one entry point, one sub-command per job.

Each package contributes its sub-commands through a ``register_cli(subparsers)`` function, so this
module stays a thin dispatcher. Logging is configured here (entry point) and nowhere else.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from latentsearch.errors import LatentSearchError

__all__ = ["build_parser", "main"]

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentsearch", description="latentsearch: search VAE latent posteriors by exact log q(z|x)."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from indexer import cli as indexer_cli
    from latentsearch import loadgen, quickstart
    from model import cli as model_cli
    from server import cli as server_cli

    for module in (quickstart, model_cli, indexer_cli, server_cli, loadgen):
        module.register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except LatentSearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
