"""What the API's enums mean: the proto's ``SearchMode`` <-> the engine's search-mode names.

Shared by the server (requests in, results out), the client and the load generator, so each name
has one spelling on each side. Imports only the generated stubs and the exception tree.
"""

from __future__ import annotations

from typing import Literal

from latentsearch.errors import InvalidArgumentError
from latentsearch.v1 import latentsearch_pb2 as pb

__all__ = ["MODE_NAMES", "ModeName", "engine_mode", "mode_enum", "mode_name"]

ModeName = Literal["auto", "exact", "approx"]  # the engine's search modes (engine.config.SearchMode)
# SearchMode value -> mode name. MODE_UNSPECIFIED is "auto": the serving engine's configured default.
MODE_NAMES: dict[pb.SearchMode.ValueType, ModeName] = {
    pb.MODE_UNSPECIFIED: "auto",
    pb.MODE_EXACT: "exact",
    pb.MODE_APPROX: "approx",
}
_MODE_ENUMS: dict[str | None, pb.SearchMode.ValueType] = {None: pb.MODE_UNSPECIFIED} | {
    name: value for value, name in MODE_NAMES.items()
}
# SearchMode value -> the engine's mode argument (None: the engine's configured default).
_ENGINE_MODES: dict[int, ModeName | None] = {
    value: None if value == pb.MODE_UNSPECIFIED else name for value, name in MODE_NAMES.items()
}


def mode_enum(name: str | None) -> pb.SearchMode.ValueType:
    """The ``SearchMode`` of a mode name: ``"exact"``, ``"approx"``, ``"auto"`` or ``None`` (both
    MODE_UNSPECIFIED). Raises InvalidArgumentError(field="mode") for any other name."""
    try:
        return _MODE_ENUMS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name
        message = f"mode must be exact, approx or auto, got {name!r}"
        raise InvalidArgumentError(message, field="mode") from None


def mode_name(value: int) -> ModeName:
    """The mode name of a ``SearchMode`` value (MODE_UNSPECIFIED: ``"auto"``).

    Raises InvalidArgumentError(field="mode") for a value the enum does not define.
    """
    try:
        return MODE_NAMES[value]  # type: ignore[index]
    except KeyError:
        raise _unknown(value) from None


def engine_mode(value: int) -> ModeName | None:
    """A request's ``SearchMode`` as the engine's ``mode`` argument: ``None`` (the engine's configured
    default) for MODE_UNSPECIFIED, else the mode's name. Raises like :func:`mode_name`."""
    try:
        return _ENGINE_MODES[value]
    except KeyError:
        raise _unknown(value) from None


def _unknown(value: int) -> InvalidArgumentError:
    return InvalidArgumentError(f"unknown search mode {value}", field="mode")
