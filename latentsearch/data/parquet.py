"""Parquet input: which column holds the items, how its values become ``(k, *item_shape)`` arrays.

A Parquet dataset is one ``*.parquet`` file or a folder of them (read in sorted path order). The
*item column* holds either

* **encoded images**: ``binary`` / ``large_binary`` values, each a PNG or JPEG file, decoded with
  Pillow to ``(H, W, C)`` uint8 (``C = 1`` when the first image is grayscale, else 3; every image
  must have the first one's size); or
* **arrays**: a list column of numbers (``fixed_size_list``, ``list``, ``large_list``, or Arrow's
  ``fixed_shape_tensor``), every value of the same length: feature vectors ``(D,)`` or flattened
  pixels with an item shape given by the caller (``shape=``), a tensor type's own shape, or the
  file's key-value metadata ``latentsearch.item_shape`` (a JSON list such as ``[28, 28, 1]``).

Optional columns: labels (integers, or strings whose sorted distinct values become the label
names) and ids (any type, as strings). This module holds the pyarrow-level parts shared by the
local reader (:class:`latentsearch.data.readers.ParquetDataset`) and the Ray path
(``indexer.ray_encode``, which decodes Ray Data's blocks with :func:`decode_items`). pyarrow is the
``parquet`` extra (``pip install 'latentsearch[parquet]'``; the ``ray`` extra brings it too).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from latentsearch.errors import FailedPreconditionError, InvalidArgumentError

try:  # the optional ``parquet`` extra
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
except ImportError:  # pragma: no cover - pyarrow is in the dev install
    pa = pc = pq = None

__all__ = [
    "ITEM_SHAPE_KEY",
    "PARQUET_SUFFIXES",
    "ItemColumn",
    "check_same_column",
    "decode_items",
    "parquet_files",
    "read_ids",
    "read_labels",
    "require_pyarrow",
    "resolve_item_column",
]

PARQUET_SUFFIXES = (".parquet", ".pq")
# File key-value metadata naming the item shape of a flat array column (a JSON list).
ITEM_SHAPE_KEY = b"latentsearch.item_shape"
# Item-column names tried, in order, when the caller names none and several columns could be items.
_ITEM_NAMES = ("image", "images", "pixels", "x", "data", "features", "items")
# Label / id columns used when present and the caller names none.
_LABEL_NAMES = ("label", "labels", "y")
_ID_NAMES = ("id", "ids")


def require_pyarrow() -> None:
    """Raise FailedPreconditionError naming the extra when pyarrow is not installed."""
    if pq is None:
        raise FailedPreconditionError(
            "reading Parquet needs pyarrow: pip install 'latentsearch[parquet]'", field="data"
        )


def parquet_files(path: Path) -> list[Path]:
    """The Parquet files of ``path`` (the file itself, or every ``*.parquet`` / ``*.pq`` file under
    the folder, sorted by relative path); empty when the folder holds none."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in PARQUET_SUFFIXES)


@dataclass(frozen=True, kw_only=True)
class ItemColumn:
    """How one Parquet column becomes items.

    ``kind``: ``"image"`` (encoded PNG/JPEG bytes) or ``"array"`` (a list of numbers per row);
    ``item_shape``: ``(H, W, C)`` or ``(D,)``; ``dtype``: numpy dtype string of the decoded items
    (``"|u1"`` for images); ``mode``: the Pillow mode images are converted to (``"L"`` or ``"RGB"``).
    """

    name: str
    kind: str
    item_shape: tuple[int, ...]
    dtype: str
    mode: str | None = None


def _where(file: Path | str, column: str) -> str:
    return f"{file}: column {column!r}"


def _is_list(t: Any) -> bool:
    return bool(pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t))


def _storage(t: Any) -> Any:
    return t.storage_type if isinstance(t, pa.BaseExtensionType) else t


def _candidate(t: Any) -> bool:
    s = _storage(t)
    if pa.types.is_binary(s) or pa.types.is_large_binary(s):
        return True
    return _is_list(s) and (pa.types.is_integer(s.value_type) or pa.types.is_floating(s.value_type))


def resolve_item_column(
    file: Path,
    schema: Any,
    *,
    column: str | None,
    shape: Sequence[int] | None,
    mode: str | None,
    first: Callable[[str], Any],
    exclude: Sequence[str] = (),
) -> ItemColumn:
    """The item column of a file with ``schema`` (``column``, else the only binary / numeric list
    column, else the first of :data:`_ITEM_NAMES`, never one of ``exclude``); ``first(name)``: that
    column's values in the first non-empty row group (a pyarrow Array), for the image size or the
    list length.

    Raises:
        InvalidArgumentError: no such column, a column of another type, a ``shape`` that does not
            match the values' length, ambiguous columns (the message lists them).
    """
    names = list(schema.names)
    if column is None:
        found = [n for n in names if n not in exclude and _candidate(schema.field(n).type)]
        named = [n for n in _ITEM_NAMES if n in found]
        if len(found) == 1 or named:
            column = found[0] if len(found) == 1 else named[0]
        else:
            could = ", ".join(found) or "none"
            raise InvalidArgumentError(
                f"{file}: cannot tell which column holds the items ({could} of {', '.join(names)} could); "
                "name it with --parquet-column",
                field="parquet_column",
            )
    if column not in names:
        raise InvalidArgumentError(
            f"{file}: no column {column!r} (columns: {', '.join(names)})", field="parquet_column"
        )
    t = schema.field(column).type
    s = _storage(t)
    if pa.types.is_binary(s) or pa.types.is_large_binary(s):
        if shape is not None:
            raise InvalidArgumentError(
                f"{_where(file, column)} holds encoded images: their size comes from the images, "
                "not --parquet-shape",
                field="parquet_shape",
            )
        img = _decode_image(first(column)[0].as_py(), file, column, "row 0")
        if mode is None:
            mode = "L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
        if mode not in ("L", "RGB"):
            raise InvalidArgumentError(f"mode must be 'L' or 'RGB', got {mode!r}", field="mode")
        w, h = img.size
        return ItemColumn(name=column, kind="image", item_shape=(h, w, 1 if mode == "L" else 3), dtype="|u1",
                          mode=mode)
    if not _candidate(t):
        raise InvalidArgumentError(
            f"{_where(file, column)} is {t}: expected encoded images (binary) or a list of numbers",
            field="parquet_column",
        )
    values = first(column)
    length = int(s.list_size) if pa.types.is_fixed_size_list(s) else _list_length(values, file, column)
    item_shape = _array_shape(file, column, schema, t, length, shape)
    return ItemColumn(
        name=column, kind="array", item_shape=item_shape, dtype=np.dtype(s.value_type.to_pandas_dtype()).str
    )


def _list_length(values: Any, file: Path | str, column: str) -> int:
    if len(values) == 0:
        raise InvalidArgumentError(f"{_where(file, column)} has no rows", field="data")
    return int(pc.list_value_length(values[:1])[0].as_py() or 0)


def _array_shape(
    file: Path, column: str, schema: Any, t: Any, length: int, shape: Sequence[int] | None
) -> tuple[int, ...]:
    """The item shape of a list column whose values have ``length`` numbers each."""
    source = "--parquet-shape"
    if shape is None and isinstance(t, pa.FixedShapeTensorType):
        shape, source = tuple(t.shape), "the tensor type's shape"
    if shape is None and schema.metadata and ITEM_SHAPE_KEY in schema.metadata:
        source = f"the file's {ITEM_SHAPE_KEY.decode()} metadata"
        try:
            shape = tuple(int(v) for v in json.loads(schema.metadata[ITEM_SHAPE_KEY]))
        except (ValueError, TypeError) as exc:
            raise InvalidArgumentError(f"{file}: unreadable {source} ({exc})", field="parquet_shape") from exc
    if shape is None:
        shape = (length,)
    shape = tuple(int(v) for v in shape)
    if len(shape) == 2:  # (H, W) grayscale
        shape = (*shape, 1)
    if len(shape) not in (1, 3) or min(shape) < 1 or math.prod(shape) != length:
        raise InvalidArgumentError(
            f"{_where(file, column)}: {source} {shape} does not fit values of {length} numbers "
            "(expected (D,), (H, W) or (H, W, C) with that many elements)",
            field="parquet_shape",
        )
    return shape


def _decode_image(raw: Any, file: Path | str, column: str, row: str) -> Image.Image:
    if raw is None:
        raise InvalidArgumentError(f"{_where(file, column)}: {row} is null", field="data")
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise InvalidArgumentError(
            f"{_where(file, column)}: {row} is not a decodable PNG/JPEG ({exc})", field="data"
        ) from exc
    return img


def decode_items(
    values: Any, spec: ItemColumn, *, file: Path | str, first_row: int | None = 0
) -> np.ndarray:
    """A pyarrow Array (or ChunkedArray) of ``spec``'s column -> ``(k, *item_shape)`` of ``spec.dtype``.

    ``file`` and ``first_row`` (the row of ``values[0]`` in that file; ``None``: unknown, as in a
    Ray Data block) name a bad value in errors.

    Raises:
        InvalidArgumentError: a null, an undecodable or differently sized image, a list of another
            length, naming file, column and row.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    k = len(values)
    if spec.kind == "image":
        h, w, c = spec.item_shape
        out = np.empty((k, h, w, c), dtype=np.uint8)
        for i, raw in enumerate(values.to_pylist()):
            img = _decode_image(raw, file, spec.name, _row(first_row, i)).convert(spec.mode)
            if img.size != (w, h):
                raise InvalidArgumentError(
                    f"{_where(file, spec.name)}: {_row(first_row, i)} is a {img.size[0]}x{img.size[1]} (WxH) "
                    f"image, the first one is {w}x{h}",
                    field="data",
                )
            out[i] = np.asarray(img, dtype=np.uint8).reshape(h, w, c)
        return out
    if isinstance(values.type, pa.BaseExtensionType):
        values = values.storage
    size = math.prod(spec.item_shape)
    if values.null_count:
        row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise InvalidArgumentError(f"{_where(file, spec.name)}: {_row(first_row, row)} is null", field="data")
    if not pa.types.is_fixed_size_list(values.type):
        lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != size)
        if bad.size:
            raise InvalidArgumentError(
                f"{_where(file, spec.name)}: {_row(first_row, int(bad[0]))} has {int(lengths[bad[0]])} "
                f"values, the items have {size}",
                field="data",
            )
    flat = values.flatten()
    if flat.null_count:
        row = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0]) // size
        raise InvalidArgumentError(
            f"{_where(file, spec.name)}: {_row(first_row, row)} holds a null value", field="data"
        )
    array = flat.to_numpy(zero_copy_only=False).astype(np.dtype(spec.dtype), copy=False)
    return array.reshape(k, *spec.item_shape)


def _row(first_row: int | None, i: int) -> str:
    """How errors name row ``i`` of a batch whose first row is ``first_row`` of its file."""
    return f"row {first_row + i}" if first_row is not None else f"row {i} of a Ray block"


def _find(schema: Any, given: str | None, defaults: Sequence[str], file: Path, field: str) -> str | None:
    if given is None:
        return next((n for n in defaults if n in schema.names), None)
    if given not in schema.names:
        raise InvalidArgumentError(
            f"{file}: no column {given!r} (columns: {', '.join(schema.names)})", field=field
        )
    return given


def read_labels(
    files: Sequence[Path], schema: Any, column: str | None
) -> tuple[str | None, np.ndarray | None, list[str] | None]:
    """``(column, (N,) int64 labels, label names)`` over ``files`` (``column`` None: ``label`` /
    ``labels`` / ``y`` when present). Integer columns are the labels; strings become indexes into
    their sorted distinct values, which are the names.

    Raises:
        InvalidArgumentError: no such column, nulls, another type (naming file and column).
    """
    name = _find(schema, column, _LABEL_NAMES, files[0], "label_column")
    if name is None:
        return None, None, None
    parts = []
    for f in files:
        values = pq.read_table(f, columns=[name]).column(name).combine_chunks()
        if isinstance(values.type, pa.DictionaryType):
            values = values.dictionary_decode()
        if values.null_count:
            raise InvalidArgumentError(f"{_where(f, name)} has {values.null_count} null labels",
                                       field="label_column")
        if not (pa.types.is_integer(values.type) or pa.types.is_string(values.type)
                or pa.types.is_large_string(values.type)):
            raise InvalidArgumentError(
                f"{_where(f, name)} is {values.type}: labels must be integers or strings",
                field="label_column",
            )
        parts.append(values.to_numpy(zero_copy_only=False))
    labels = np.concatenate(parts)
    if labels.dtype.kind in "iu":
        return name, labels.astype(np.int64), None
    names, index = np.unique(labels.astype(str), return_inverse=True)
    return name, index.astype(np.int64), [str(v) for v in names]


def read_ids(files: Sequence[Path], schema: Any, column: str | None) -> tuple[str | None, np.ndarray | None]:
    """``(column, (N,) str ids)`` over ``files`` (``column`` None: ``id`` / ``ids`` when present).

    Raises:
        InvalidArgumentError: no such column, null ids (naming file and column).
    """
    name = _find(schema, column, _ID_NAMES, files[0], "id_column")
    if name is None:
        return None, None
    parts = []
    for f in files:
        values = pq.read_table(f, columns=[name]).column(name)
        if values.null_count:
            raise InvalidArgumentError(
                f"{_where(f, name)} has {values.null_count} null ids", field="id_column"
            )
        parts.append(np.array([str(v) for v in values.to_pylist()], dtype=str))
    return name, np.concatenate(parts)


def check_same_column(file: Path, schema: Any, spec: ItemColumn, first_type: Any) -> None:
    """Every file of a folder must hold the item column with the first file's type (list field
    names aside: writers call the element ``item`` or ``element``)."""
    got = schema.field(spec.name).type if spec.name in schema.names else None
    if got is None or _signature(got) != _signature(first_type):
        raise InvalidArgumentError(
            f"{_where(file, spec.name)} is {got or 'missing'}, the first file's is {first_type}", field="data"
        )


def _signature(t: Any) -> tuple[Any, ...]:
    s = _storage(t)
    if _is_list(s):
        return ("list", str(s.value_type), s.list_size if pa.types.is_fixed_size_list(s) else None)
    return (str(s),)
