"""The ``latentsearch`` command line: one entry point, one sub-command per job.

Each module of this package registers its sub-commands (``register_cli(subparsers)``) and keeps
the heavy imports (torch, faiss) inside its handlers, so ``latentsearch query --help`` or
``latentsearch --help`` loads neither. Logging is configured here (the entry point) and nowhere
else.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from latentsearch.cli import index, loadtest, quickstart, serve, train
from latentsearch.cli.values import join_negative_values
from latentsearch.errors import LatentSearchError

__all__ = ["build_parser", "log_level", "main"]

log = logging.getLogger(__name__)

# Libraries whose INFO lines are noise to an operator (faiss logs which SIMD build it loads, and
# every build it could not): shown from -v on.
QUIET_LIBRARIES = ("faiss",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentsearch", description="latentsearch: search VAE latent posteriors by exact log q(z|x)."
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging: -v for debug (default: info)"
    )
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less logging: warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (quickstart, train, index, serve, loadtest):
        module.register_cli(sub)
    return parser


def log_level(verbose: int, quiet: int) -> int:
    """INFO by default, DEBUG with ``-v``, WARNING with ``-q``, ERROR with ``-qq``."""
    return min(max(logging.INFO - 10 * verbose + 10 * quiet, logging.DEBUG), logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # "--z -1.5,0" -> "--z=-1.5,0": argparse would take the value for an option.
    args = parser.parse_args(join_negative_values(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=log_level(args.verbose, args.quiet),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except LatentSearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

