"""The sub-commands' defaults, read from the components' typed configs (one home for each default).

``p.add_argument("--epochs", default=default_of(TrainConfig, "epochs"), ...)`` keeps the CLI and
the config from drifting apart. The config's module must be light to import (no torch or faiss),
since every sub-command module is imported to build the parser.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from latentsearch.errors import InvalidArgumentError, NotFoundError

__all__ = ["add_config_argument", "default_of"]


def default_of(config_class: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``config_class`` (a factory's fresh value).

    Raises:
        NotFoundError: ``config_class`` has no field ``name``.
        InvalidArgumentError: the field has no default.
    """
    for f in dataclasses.fields(config_class):
        if f.name != name:
            continue
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        raise InvalidArgumentError(f"{config_class.__name__}.{name} has no default", field=name)
    raise NotFoundError(f"{config_class.__name__} has no field {name!r}", field=name)


def add_config_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    config_class: type,
    name: str,
    help: str,
    **kwargs: Any,
) -> None:
    """``parser.add_argument(flag, default=<the field's default>, help="<help> (default <it>)")``.

    ``kwargs`` go to ``add_argument`` (``type``, ``choices``, ...); a ``None`` default is not
    mentioned in the help.
    """
    value = default_of(config_class, name)
    text = help if value is None else f"{help} (default {value})"
    parser.add_argument(flag, default=value, help=text, **kwargs)
