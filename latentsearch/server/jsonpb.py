"""Proto messages <-> JSON for the HTTP API, with errors that name the request field.

The HTTP API speaks the gRPC messages themselves, as JSON objects keyed by the proto field names
(``{"z": [0.1, 2.0], "k": 5, "with_probability": true}``), so a new proto field reaches the HTTP
API (and its OpenAPI schema, :func:`json_schema`) without code here. The mapping is proto3's JSON
mapping (bytes as base64, enums by name or number, ``"NaN"``/``"Infinity"``/``"-Infinity"`` for
non-finite floats) except that 64-bit integers are JSON numbers, not strings. Replies hold every
implicit-presence field (defaults included) and an ``optional`` field only when it is set.

Everything a request holds that the message cannot is refused here with InvalidArgumentError naming
the field (``"k"``, ``"queries[2].z"``); what the message can hold is checked by the same
:class:`~latentsearch.server.engine_service.EngineService` code as a gRPC call, with the same messages.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any, TypeVar

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from latentsearch.errors import InvalidArgumentError, quoted

__all__ = ["json_schema", "message_from_json", "message_to_json"]

M = TypeVar("M", bound=Message)
# A field's descriptor: google.protobuf.descriptor.FieldDescriptor, or the upb backend's own class.
Field = Any

_FD = FieldDescriptor  # the type constants
_FLOATS = {_FD.TYPE_DOUBLE, _FD.TYPE_FLOAT}
# Integer types and their ranges.
_INTS = {
    _FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    _FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _FD.TYPE_UINT32: (0, 2**32 - 1),
    _FD.TYPE_FIXED32: (0, 2**32 - 1),
    _FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    _FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _FD.TYPE_UINT64: (0, 2**64 - 1),
    _FD.TYPE_FIXED64: (0, 2**64 - 1),
}
# proto3 JSON's spellings of non-finite floats, both ways.
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


# -- JSON -> message ----------------------------------------------------------------------------
def message_from_json(cls: type[M], obj: Any, *, path: str = "") -> M:
    """A ``cls`` message holding the JSON object ``obj`` (already parsed: a dict).

    Raises InvalidArgumentError naming the field (``path`` prefixes nested names) for an unknown
    field, a value of the wrong type, an integer out of its type's range or a bad base64 string.
    """
    msg = cls()
    _fill(msg, obj, path)
    return msg


def _fill(msg: Message, obj: Any, path: str) -> None:
    desc = msg.DESCRIPTOR
    if not isinstance(obj, dict):
        raise InvalidArgumentError(
            f"{path or 'the request body'} must be a JSON object ({desc.name})", field=path or "body"
        )
    for key, value in obj.items():
        name = f"{path}.{key}" if path else str(key)
        fd = desc.fields_by_name.get(key)
        if fd is None:
            known = ", ".join(desc.fields_by_name) or "none"
            raise InvalidArgumentError(
                f"unknown field {quoted(str(key))} ({desc.name} has: {known})", field=name
            )
        if value is None:
            continue  # JSON null: the field's default, as in proto3's JSON mapping
        if fd.is_repeated:
            if not isinstance(value, list):
                raise InvalidArgumentError(f"{name} must be a JSON array", field=name)
            target = getattr(msg, key)
            for i, item in enumerate(value):
                if fd.type == _FD.TYPE_MESSAGE:
                    _fill(target.add(), item, f"{name}[{i}]")
                else:
                    target.append(_scalar(fd, item, f"{name}[{i}]"))
        elif fd.type == _FD.TYPE_MESSAGE:
            _fill(getattr(msg, key), value, name)
        else:
            setattr(msg, key, _scalar(fd, value, name))


def _scalar(fd: Field, value: Any, name: str) -> Any:
    t = fd.type
    if t in _FLOATS:
        if isinstance(value, str) and value in _NON_FINITE:
            return _NON_FINITE[value]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgumentError(f"{name} must be a number, got {_show(value)}", field=name)
        return float(value)
    if t in _INTS:
        lo, hi = _INTS[t]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise InvalidArgumentError(
                f"{name} must be an integer in [{lo}, {hi}], got {_show(value)}", field=name
            )
        return value
    if t == _FD.TYPE_BOOL:
        if not isinstance(value, bool):
            raise InvalidArgumentError(f"{name} must be true or false, got {_show(value)}", field=name)
        return value
    if t == _FD.TYPE_STRING:
        if not isinstance(value, str):
            raise InvalidArgumentError(f"{name} must be a string, got {_show(value)}", field=name)
        return value
    if t == _FD.TYPE_BYTES:
        if not isinstance(value, str):
            raise InvalidArgumentError(f"{name} must be a base64 string, got {_show(value)}", field=name)
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidArgumentError(f"{name} is not valid base64: {exc}", field=name) from exc
    if t == _FD.TYPE_ENUM:
        return _enum_number(fd.enum_type, value, name)
    raise InvalidArgumentError(f"{name} has a type the HTTP API does not take", field=name)


def _enum_number(enum: EnumDescriptor | None, value: Any, name: str) -> int:
    """An enum given by name (``"MODE_EXACT"``) or number (unknown numbers pass: proto3 enums are
    open, and the service refuses them with its own message)."""
    assert enum is not None  # an enum field's
    if isinstance(value, str) and value in enum.values_by_name:
        return int(enum.values_by_name[value].number)
    if isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31:
        return value
    names = ", ".join(enum.values_by_name)
    raise InvalidArgumentError(
        f"{name} must be one of {names} (or its number), got {_show(value)}", field=name
    )


def _show(value: Any) -> str:
    """A JSON value as a message quotes it (bounded)."""
    if isinstance(value, str):
        return quoted(value)
    if isinstance(value, (list, dict)):
        return f"a JSON {'array' if isinstance(value, list) else 'object'}"
    return quoted(str(value)).strip("'")


# -- message -> JSON ----------------------------------------------------------------------------
def message_to_json(msg: Message) -> dict[str, Any]:
    """The JSON object of a reply (see the module docstring for the mapping)."""
    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        value = getattr(msg, fd.name)
        if fd.is_repeated:
            out[fd.name] = [_out(fd, v) for v in value]
        elif fd.has_presence:
            if msg.HasField(fd.name):
                out[fd.name] = _out(fd, value)
        else:
            out[fd.name] = _out(fd, value)
    return out


def _out(fd: Field, value: Any) -> Any:
    t = fd.type
    if t == _FD.TYPE_MESSAGE:
        return message_to_json(value)
    if t in _FLOATS:
        v = float(value)
        if math.isfinite(v):
            return v
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if t == _FD.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    if t == _FD.TYPE_ENUM:
        number = fd.enum_type.values_by_number.get(value)
        return value if number is None else number.name
    return value


# -- JSON schema (OpenAPI 3.1 components) ----------------------------------------------------------
def json_schema(desc: Descriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    """A ``$ref`` to the schema of message ``desc``, adding it (and what it nests) to ``schemas``."""
    name = desc.name
    if name not in schemas:
        schemas[name] = {}  # placeholder first: recursive messages terminate
        props = {fd.name: _field_schema(fd, schemas) for fd in desc.fields}
        schemas[name] = {"type": "object", "additionalProperties": False, "properties": props}
    return {"$ref": f"#/components/schemas/{name}"}


def _field_schema(fd: Field, schemas: dict[str, Any]) -> dict[str, Any]:
    t = fd.type
    item: dict[str, Any]
    if t == _FD.TYPE_MESSAGE:
        item = json_schema(fd.message_type, schemas)
    elif t in _FLOATS:
        item = {"oneOf": [{"type": "number"}, {"enum": list(_NON_FINITE)}]}
    elif t in _INTS:
        lo, hi = _INTS[t]
        item = {"type": "integer", "minimum": lo, "maximum": hi}
    elif t == _FD.TYPE_BOOL:
        item = {"type": "boolean"}
    elif t == _FD.TYPE_BYTES:
        item = {"type": "string", "contentEncoding": "base64"}
    elif t == _FD.TYPE_ENUM:
        item = {"oneOf": [{"enum": list(fd.enum_type.values_by_name)}, {"type": "integer"}]}
    else:
        item = {"type": "string"}
    if fd.is_repeated:
        return {"type": "array", "items": item}
    return item
