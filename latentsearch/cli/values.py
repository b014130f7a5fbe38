"""Command-line values: latent points and label filters, and negative numbers after an option.

``float_list`` and ``label_list`` are argparse ``type=`` functions: a bad value becomes argparse's
one-line ``argument --z: ...`` error (exit status 2), never a traceback. Values are separated by
commas and/or whitespace: ``--z 0.1,0.2,-0.3``, ``--z "0 0 0"``, ``--z "1, 2, 3"``.

argparse takes an argument that starts with ``-`` for an option unless it parses as one negative
number, so ``--z -1.5,0,0`` fails with "expected one argument". :func:`join_negative_values` turns
``--opt -1.5,0,0`` into ``--opt=-1.5,0,0`` before parsing (``--opt "-1 2 3"`` and
``--opt=-1,2,3`` already parse).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence

__all__ = ["float_list", "join_negative_values", "label_list", "shape_tuple"]

_SEPARATORS = re.compile(r"[,\s]+")
# A value that starts like a negative number: "-1", "-1.5,0", "-.5 2", "-1e3".
_NEGATIVE_START = re.compile(r"-\.?\d")


def _items(text: str) -> list[str]:
    items = [v for v in _SEPARATORS.split(text.strip()) if v]
    if not items:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas or spaces, got {text!r}")
    return items


def float_list(text: str) -> list[float]:
    """``"0.1,-0.2 3"`` -> ``[0.1, -0.2, 3.0]``: finite numbers separated by commas and/or whitespace."""
    values = []
    for item in _items(text):
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{item!r} is not a finite number")
        values.append(value)
    return values


def label_list(text: str) -> list[int]:
    """``"3,4 7"`` -> ``[3, 4, 7]``: integer labels separated by commas and/or whitespace.

    Label filters take the labels' numbers; a name such as ``Bag`` is refused with a message saying
    so (a version with label names lists them in Info, and ``query`` prints them beside the numbers).
    """
    values = []
    for item in _items(text):
        try:
            values.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not an integer label (filters take the label's number; versions with names "
                "print them beside the numbers in query's output)"
            ) from None
    return values


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """``argv`` with each ``--option VALUE`` whose VALUE starts like a negative number joined into
    ``--option=VALUE``, so argparse does not read VALUE as an option. Stops at ``--``."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return [*out, *argv[i:]]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith("--") and "=" not in arg and nxt is not None and _NEGATIVE_START.match(nxt):
            out.append(f"{arg}={nxt}")
            i += 2
        else:
            out.append(arg)
            i += 1
    return out


def shape_tuple(text: str) -> tuple[int, ...]:
    """``"28,28,1"`` or ``"28x28x1"`` -> ``(28, 28, 1)``: one item's shape, positive integers."""
    try:
        shape = tuple(int(v) for v in re.split(r"[,x\s]+", text.strip()) if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape such as 28,28,1") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape such as 28,28,1") from None
    return shape
