"""Data readers shared by training and the indexer.

Every reader returns a :class:`Dataset`: N items of one shape in *reader layout*

* images: ``(H, W, C)`` (grayscale IDX/npy images get ``C = 1``), usually ``uint8``;
* feature vectors: ``(D,)``, any real dtype;

with optional integer labels ``(N,)`` and stable string ids ``(N,)``. Items stream in batches
(:meth:`Dataset.iter_batches`) so the indexer never has to hold a whole dataset: ``.npy`` files and
uncompressed IDX files are memory-mapped, image folders decode only the batch asked for. ``.gz``
IDX files and ``.npz`` members are decompressed into memory once (numpy cannot map them).

:func:`open_dataset` dispatches on the path: ``*.npy``, ``*.npz``, IDX files (``*-ubyte``,
``*.idx``, optionally ``.gz``), a folder of IDX files, Parquet (``*.parquet`` or a folder of
them; :mod:`latentsearch.data.parquet`), or a folder of PNG/JPEG images (label = first-level
sub-folder name).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from latentsearch.data import parquet
from latentsearch.errors import InvalidArgumentError, NotFoundError

__all__ = [
    "ArrayDataset",
    "Dataset",
    "ImageFolderDataset",
    "ParquetDataset",
    "open_dataset",
    "read_idx",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FINGERPRINT_BATCH = 8192


class Dataset:
    """N items of one shape, optional labels, stable ids; streamed in row order.

    Subclasses implement :meth:`read`. Attributes:

    * ``path``: where it came from (a file, or a description such as ``generated:...``; ``None`` for
      bare arrays);
    * ``shape``: ``(N, *item_shape)``; ``item_shape`` is ``(H, W, C)`` or ``(D,)``;
    * ``dtype``: numpy dtype of the batches (native byte order);
    * ``labels``: ``(N,)`` int64 or ``None``; ``label_names``: class names by label, or ``None``.
    """

    path: str | None
    shape: tuple[int, ...]
    dtype: np.dtype
    labels: np.ndarray | None
    label_names: list[str] | None

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | None,
        shape: Sequence[int],
        dtype: Any,
        labels: np.ndarray | None = None,
        label_names: list[str] | None = None,
        ids: np.ndarray | None = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype).newbyteorder("=")
        if len(self.shape) not in (2, 4):
            raise InvalidArgumentError(
                f"{self.path or 'dataset'}: items must be (H, W, C) images or (D,) vectors, "
                f"got item shape {self.shape[1:]}",
                field="data",
            )
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (self.shape[0],):
                raise InvalidArgumentError(
                    f"{self.path or 'dataset'}: {labels.shape[0] if labels.ndim else 0} labels for "
                    f"{self.shape[0]} items",
                    field="labels",
                )
            labels = labels.astype(np.int64, copy=False)
        self.labels = labels
        self.label_names = label_names
        if ids is not None:
            ids = np.asarray(ids).astype(str)
            if ids.shape != (self.shape[0],):
                raise InvalidArgumentError(f"{self.path or 'dataset'}: ids must be one per item", field="ids")
            if len(np.unique(ids)) != len(ids):
                raise InvalidArgumentError(f"{self.path or 'dataset'}: ids are not unique", field="ids")
        self._ids = ids

    # -- shape ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.shape[0]

    @property
    def item_shape(self) -> tuple[int, ...]:
        """``(H, W, C)`` for images, ``(D,)`` for feature vectors."""
        return self.shape[1:]

    @property
    def kind(self) -> Literal["image", "features"]:
        return "image" if len(self.item_shape) == 3 else "features"

    # -- ids ------------------------------------------------------------------------------
    def batch_ids(self, start: int, stop: int) -> np.ndarray:
        """``(stop - start,)`` str ids of rows ``[start, stop)``; row numbers unless the data names them."""
        if self._ids is not None:
            return self._ids[start:stop]
        return np.arange(start, min(stop, len(self))).astype(str)

    @property
    def ids(self) -> np.ndarray:
        """``(N,)`` stable str ids (row numbers ``"0"..."N-1"`` unless the data names its items)."""
        return self.batch_ids(0, len(self))

    def item_metadata(self, start: int, stop: int) -> list[dict[str, Any]] | None:
        """One small JSON-ready record per row of ``[start, stop)`` (e.g. the item's source file),
        or ``None`` when the data keeps none (the default). The indexer stores them per item."""
        return None

    # -- data -----------------------------------------------------------------------------
    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a ``(stop - start, *item_shape)`` array of ``self.dtype``."""
        raise NotImplementedError

    def iter_batches(
        self, batch_size: int, *, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start_row, batch)`` with ``batch`` ``(<= batch_size, *item_shape)`` in row order."""
        if batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
        stop = len(self) if stop is None else min(stop, len(self))
        for row in range(max(start, 0), stop, batch_size):
            yield row, self.read(row, min(row + batch_size, stop))

    def to_array(self) -> np.ndarray:
        """All items in memory, ``(N, *item_shape)``."""
        return self.read(0, len(self))

    def fingerprint(self) -> str:
        """sha256 (hex) over shape, dtype, item bytes and labels: identifies the data, not the file."""
        h = hashlib.sha256()
        h.update(repr((self.shape, self.dtype.str)).encode())
        for _, batch in self.iter_batches(_FINGERPRINT_BATCH):
            h.update(np.ascontiguousarray(batch).tobytes())
        if self.labels is not None:
            h.update(b"labels")
            h.update(self.labels.astype("<i8").tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={self.path!r}, shape={self.shape}, dtype={self.dtype}, "
            f"labels={'yes' if self.labels is not None else 'no'})"
        )


class ArrayDataset(Dataset):
    """A dataset over an array (in memory or ``np.memmap``): ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, D)``."""

    def __init__(
        self,
        array: np.ndarray,
        *,
        labels: np.ndarray | None = None,
        ids: np.ndarray | None = None,
        label_names: list[str] | None = None,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        if array.ndim == 3:  # grayscale images -> (N, H, W, 1); a free view, also for memmaps
            array = array[..., None]
        if array.ndim not in (2, 4) or array.shape[0] == 0:
            raise InvalidArgumentError(
                f"{path or 'array'}: expected (N, H, W), (N, H, W, C) or (N, D) items with N >= 1, "
                f"got shape {array.shape}",
                field="data",
            )
        if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
            raise InvalidArgumentError(f"{path or 'array'}: unsupported dtype {array.dtype}", field="data")
        super().__init__(
            path=path, shape=array.shape, dtype=array.dtype, labels=labels, label_names=label_names, ids=ids
        )
        self._array = array

    def read(self, start: int, stop: int) -> np.ndarray:
        out = self._array[start:stop]
        if out.dtype != self.dtype:  # big-endian IDX data -> native
            out = out.astype(self.dtype)
        return np.asarray(out)


class ImageFolderDataset(Dataset):
    """PNG/JPEG files under a folder, decoded with Pillow one batch at a time.

    Files are sorted by relative path, which is also each item's id. When every image lies in a
    first-level sub-folder, the sub-folder names (sorted) are the classes: ``labels[i]`` indexes
    ``label_names``. All images must have the size of the first one (or pass ``size=(H, W)`` to
    resize). ``mode`` is ``"L"`` (C = 1) or ``"RGB"`` (C = 3); default: ``"L"`` when the first
    image is grayscale, else ``"RGB"``.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, size: tuple[int, int] | None = None, mode: str | None = None
    ) -> None:
        root_path = Path(root)
        files = sorted(
            p.relative_to(root_path).as_posix()
            for p in root_path.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise InvalidArgumentError(f"{root}: no PNG/JPEG images found", field="data")
        first = self._open(root_path / files[0])
        if mode is None:
            mode = "L" if first.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
        if mode not in ("L", "RGB"):
            raise InvalidArgumentError(f"mode must be 'L' or 'RGB', got {mode!r}", field="mode")
        width, height = (size[1], size[0]) if size is not None else first.size
        labels = label_names = None
        if all("/" in f for f in files):
            classes = [f.split("/", 1)[0] for f in files]
            label_names = sorted(set(classes))
            lookup = {name: i for i, name in enumerate(label_names)}
            labels = np.array([lookup[c] for c in classes], dtype=np.int64)
        channels = 1 if mode == "L" else 3
        super().__init__(
            path=root,
            shape=(len(files), height, width, channels),
            dtype=np.uint8,
            labels=labels,
            label_names=label_names,
            ids=np.array(files),
        )
        self._root = root_path
        self._source = root_path.resolve()
        self._files = files
        self._mode = mode
        self._resize = size is not None

    @staticmethod
    def _open(path: Path) -> Any:
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(path)
            img.load()
        except (OSError, UnidentifiedImageError, SyntaxError) as exc:
            raise InvalidArgumentError(f"{path}: cannot decode image ({exc})", field="data") from exc
        return img

    def item_metadata(self, start: int, stop: int) -> list[dict[str, Any]] | None:
        """``{"source": absolute path of the image file}`` per row."""
        return [{"source": str(self._source / rel)} for rel in self._files[start:stop]]

    def read(self, start: int, stop: int) -> np.ndarray:
        h, w, c = self.item_shape
        stop = min(stop, len(self))
        out = np.empty((max(stop - start, 0), h, w, c), dtype=np.uint8)
        for i, rel in enumerate(self._files[start:stop]):
            img = self._open(self._root / rel).convert(self._mode)
            if img.size != (w, h):
                if not self._resize:
                    raise InvalidArgumentError(
                        f"{self._root / rel}: image is {img.size[0]}x{img.size[1]} (WxH), the folder's "
                        f"first image is {w}x{h}; pass size=(H, W) to resize",
                        field="data",
                    )
                img = img.resize((w, h))
            out[i] = np.asarray(img, dtype=np.uint8).reshape(h, w, c)
        return out


class ParquetDataset(Dataset):
    """Items from one column of a Parquet file or a folder of them (:mod:`latentsearch.data.parquet`).

    ``column``: the item column (None: the only binary / numeric list column, else one named
    ``image``, ``pixels``, ``x``, ``features``, ...); ``label_column`` (None: ``label`` / ``labels``
    / ``y`` when present; integers, or strings whose sorted distinct values are the label names);
    ``id_column`` (None: ``id`` when present, else row numbers); ``shape``: the item shape of a flat
    array column (None: a tensor type's shape, the file's ``latentsearch.item_shape`` metadata, else
    ``(D,)``); ``mode``: ``"L"`` or ``"RGB"`` for image columns (default: from the first image).
    Rows are read by row group (the last one read is kept), decoded only for the rows asked for.

    Raises:
        FailedPreconditionError: pyarrow is not installed (the ``parquet`` extra).
        InvalidArgumentError: unreadable files, a missing or unusable column (naming file and column).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        column: str | None = None,
        label_column: str | None = None,
        id_column: str | None = None,
        shape: Sequence[int] | None = None,
        mode: str | None = None,
        labels: Any = None,
    ) -> None:
        parquet.require_pyarrow()
        root = Path(path)
        self.files = parquet.parquet_files(root)
        if not self.files:
            raise InvalidArgumentError(f"{root}: no Parquet files found", field="data")
        self._readers = [self._reader(f) for f in self.files]
        schema = self._readers[0].schema_arrow
        label_name, file_labels, label_names = parquet.read_labels(self.files, schema, label_column)
        id_name, ids = parquet.read_ids(self.files, schema, id_column)
        counts = [r.metadata.num_rows for r in self._readers]
        first = next((i for i, c in enumerate(counts) if c), None)
        if first is None:
            raise InvalidArgumentError(f"{root}: the Parquet data has no rows", field="data")
        reader = self._readers[first]
        group = next(g for g in range(reader.num_row_groups) if reader.metadata.row_group(g).num_rows)
        spec = parquet.resolve_item_column(
            self.files[first],
            reader.schema_arrow,
            column=column,
            shape=shape,
            mode=mode,
            first=lambda name: reader.read_row_group(group, columns=[name]).column(name),
            exclude=[n for n in (label_name, id_name) if n is not None],
        )
        item_type = self._readers[first].schema_arrow.field(spec.name).type
        for f, r in zip(self.files, self._readers, strict=True):
            parquet.check_same_column(f, r.schema_arrow, spec, item_type)
        self.item_column = spec
        # (files + 1,) first global row of each file; per file, (groups + 1,) first row of each group
        self._file_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._group_starts = [
            np.cumsum([0] + [r.metadata.row_group(g).num_rows for g in range(r.num_row_groups)])
            for r in self._readers
        ]
        self._cached: tuple[int, int, Any] | None = None  # (file, group, values) last read
        if labels is not None:
            file_labels = _load_labels(labels)
        super().__init__(
            path=root,
            shape=(int(self._file_starts[-1]), *spec.item_shape),
            dtype=spec.dtype,
            labels=file_labels,
            label_names=label_names,
            ids=ids,
        )

    @staticmethod
    def _reader(file: Path) -> Any:
        try:
            return parquet.pq.ParquetFile(file)
        except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
            raise InvalidArgumentError(f"{file}: not a readable Parquet file ({exc})", field="data") from exc

    def _group(self, file: int, group: int) -> Any:
        """The item column of row group ``group`` of file ``file`` (cached: rows are read in order)."""
        if self._cached is None or self._cached[:2] != (file, group):
            name = self.item_column.name
            try:
                values = self._readers[file].read_row_group(group, columns=[name]).column(name)
            except (OSError, ValueError) as exc:
                raise InvalidArgumentError(
                    f"{self.files[file]}: cannot read row group {group} ({exc})", field="data"
                ) from exc
            self._cached = (file, group, values)
        return self._cached[2]

    def item_metadata(self, start: int, stop: int) -> list[dict[str, Any]] | None:
        """``{"source": the Parquet file, "row": the row in that file}`` per row."""
        rows = np.arange(start, min(stop, len(self)))
        files = np.searchsorted(self._file_starts, rows, side="right") - 1
        return [
            {"source": str(self.files[f].resolve()), "row": int(r - self._file_starts[f])}
            for r, f in zip(rows.tolist(), files.tolist(), strict=True)
        ]

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, len(self))
        parts = []
        row = start
        while row < stop:
            f = int(np.searchsorted(self._file_starts, row, side="right") - 1)
            local = row - int(self._file_starts[f])
            starts = self._group_starts[f]
            g = int(np.searchsorted(starts, local, side="right") - 1)
            take = min(stop - row, int(starts[g + 1]) - local)
            values = self._group(f, g).slice(local - int(starts[g]), take)
            parts.append(parquet.decode_items(values, self.item_column, file=self.files[f], first_row=local))
            row += take
        if not parts:
            return np.empty((0, *self.item_shape), dtype=self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


# -- IDX ----------------------------------------------------------------------------------------
def _idx_header(raw: bytes, name: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """Parse an IDX header: returns (big-endian dtype, dims, header bytes)."""
    if len(raw) < 4:
        raise InvalidArgumentError(f"{name}: not an IDX file (only {len(raw)} bytes)", field="data")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise InvalidArgumentError(
            f"{name}: not an IDX file (bad magic {raw[:4].hex()}; expected 00 00 <type> <ndim>)", field="data"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InvalidArgumentError(f"{name}: truncated IDX header", field="data")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    return np.dtype(_IDX_DTYPES[code]), tuple(int(d) for d in dims), header


def read_idx(path: str | os.PathLike[str], *, mmap: bool = True) -> np.ndarray:
    """Read an IDX file (plain or ``.gz``) as an array of its dims, in its stored (big-endian) dtype.

    Plain files are memory-mapped when ``mmap`` is true; ``.gz`` files are decompressed in memory.

    Raises:
        NotFoundError: no such file.
        InvalidArgumentError: bad magic, truncated or over-long data, corrupt gzip stream.
    """
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise NotFoundError(f"{name}: no such file")
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                raw = f.read()
        except (OSError, EOFError, zlib.error) as exc:
            raise InvalidArgumentError(
                f"{name}: corrupt or truncated gzip stream ({exc})", field="data"
            ) from exc
        dtype, dims, header = _idx_header(raw, name)
        _check_idx_size(name, len(raw), dtype, dims, header)
        return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    with path.open("rb") as f:
        head = f.read(4 + 4 * 255)
    dtype, dims, header = _idx_header(head, name)
    _check_idx_size(name, path.stat().st_size, dtype, dims, header)
    if mmap and int(np.prod(dims)) > 0:
        return np.memmap(path, dtype=dtype, mode="r", offset=header, shape=dims)
    return np.fromfile(path, dtype=dtype, offset=header).reshape(dims)


def _check_idx_size(name: str, size: int, dtype: np.dtype, dims: tuple[int, ...], header: int) -> None:
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise InvalidArgumentError(
            f"{name}: IDX file {what}: header says {'x'.join(map(str, dims))} {dtype.name} "
            f"({expected} bytes), file has {size} bytes",
            field="data",
        )


def _is_idx(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith(("-ubyte", ".idx")) or re.search(r"idx\d", name) is not None


def _idx_labels_path(images: Path) -> Path | None:
    name = images.name
    for src, dst in (("images-idx3", "labels-idx1"), ("images.idx3", "labels.idx1"), ("images", "labels")):
        if src in name:
            base = name.replace(src, dst, 1).removesuffix(".gz")
            for cand in (images.with_name(base), images.with_name(base + ".gz")):
                if cand.is_file():
                    return cand
    return None


def _open_idx(path: Path, labels: Any) -> ArrayDataset:
    array = read_idx(path)
    if array.ndim == 1:
        raise InvalidArgumentError(f"{path}: a 1-D IDX file holds labels, not items", field="data")
    if labels is None:
        lpath = _idx_labels_path(path)
        if lpath is not None:
            log.info("labels for %s from %s", path.name, lpath.name)
            labels = lpath
    if isinstance(labels, (str, os.PathLike)):
        lab = read_idx(labels)
        if lab.ndim != 1:
            raise InvalidArgumentError(
                f"{labels}: labels IDX file must be 1-D, got {lab.shape}", field="labels"
            )
        if len(lab) != len(array):
            raise InvalidArgumentError(
                f"{labels}: {len(lab)} labels for {len(array)} items in {path}", field="labels"
            )
        labels = np.asarray(lab)
    return ArrayDataset(array, labels=labels, path=path)


# -- npy / npz ----------------------------------------------------------------------------------
_NPZ_ITEM_KEYS = ("x", "X", "images", "data", "features", "items", "arr_0")
_NPZ_LABEL_KEYS = ("y", "labels", "label", "targets")


def _load_labels(labels: Any) -> np.ndarray | None:
    if labels is None or isinstance(labels, np.ndarray):
        return labels
    path = Path(labels)
    if path.suffix == ".npy":
        return np.load(path)
    return np.asarray(read_idx(path))


def _open_npy(path: Path, labels: Any) -> ArrayDataset:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidArgumentError(f"{path}: not a readable .npy array ({exc})", field="data") from exc
    if labels is None:
        for cand in (path.with_name(path.stem + ".labels.npy"), path.with_name(path.stem + "_labels.npy")):
            if cand.is_file():
                labels = cand
                break
    return ArrayDataset(array, labels=_load_labels(labels), path=path)


def _open_npz(path: Path, labels: Any) -> ArrayDataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            item_key = next((k for k in _NPZ_ITEM_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
            if item_key is None:
                raise InvalidArgumentError(
                    f"{path}: cannot tell which array holds the items; name it one of "
                    f"{', '.join(_NPZ_ITEM_KEYS)} (found {', '.join(keys)})",
                    field="data",
                )
            array = z[item_key]
            label_key = next((k for k in _NPZ_LABEL_KEYS if k in keys), None)
            if labels is None and label_key is not None:
                labels = z[label_key]
            ids = z["ids"] if "ids" in keys else None
            names = z["label_names"] if "label_names" in keys else None
    except (ValueError, OSError, EOFError, zlib.error) as exc:
        raise InvalidArgumentError(f"{path}: not a readable .npz archive ({exc})", field="data") from exc
    if names is not None and (names.ndim != 1 or names.dtype.kind != "U"):
        raise InvalidArgumentError(
            f"{path}: 'label_names' must be a 1-D array of strings, got {names.dtype} {names.shape}",
            field="label_names",
        )
    label_names = None if names is None else [str(v) for v in names.tolist()]
    return ArrayDataset(array, labels=_load_labels(labels), ids=ids, label_names=label_names, path=path)


# -- dispatcher ---------------------------------------------------------------------------------
# ParquetDataset's options, by the command-line flag that sets them (``latentsearch index``).
_PARQUET_OPTIONS = {
    "column": "--parquet-column",
    "label_column": "--label-column",
    "id_column": "--id-column",
    "shape": "--parquet-shape",
}
def open_dataset(
    path: str | os.PathLike[str], *, labels: str | os.PathLike[str] | np.ndarray | None = None, **kwargs: Any
) -> Dataset:
    """Open ``path`` as a :class:`Dataset`, by suffix or folder content.

    * ``*.npy``: memory-mapped; labels from ``labels=`` or a ``<stem>.labels.npy`` sidecar;
    * ``*.npz``: items under ``x``/``images``/``data``/``features`` (or the only array), labels
      under ``y``/``labels``, optional ``ids`` and ``label_names`` (strings, one per label);
    * IDX (``*-ubyte``, ``*.idx``, plain or ``.gz``): labels from the matching ``*-labels-idx1-*``
      file next to it; plain files are memory-mapped;
    * a folder holding IDX image files: the ``train-*`` one if several, else the only one;
    * ``*.parquet`` / ``*.pq``, or a folder holding Parquet files (``kwargs``: ``column``,
      ``label_column``, ``id_column``, ``shape``, ``mode``; see :class:`ParquetDataset`);
    * any other folder: PNG/JPEG images (``kwargs``: ``size``, ``mode``; see
      :class:`ImageFolderDataset`).

    ``kwargs`` that are ``None`` are ignored; a Parquet option for other data is refused.

    Raises:
        NotFoundError: the path does not exist.
        InvalidArgumentError: unknown format or unreadable/corrupt content (message names the file).
    """
    p = Path(path)
    if not p.exists():
        raise NotFoundError(f"{p}: no such file or directory")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if p.suffix.lower() in parquet.PARQUET_SUFFIXES or (p.is_dir() and parquet.parquet_files(p)):
        return ParquetDataset(p, labels=labels, **kwargs)
    for key in _PARQUET_OPTIONS:
        if key in kwargs:
            raise InvalidArgumentError(
                f"{p}: {_PARQUET_OPTIONS[key]} applies to Parquet data only (a *.parquet file or a folder "
                "of them)",
                field=_PARQUET_OPTIONS[key].removeprefix("--").replace("-", "_"),
            )
    if p.is_dir():
        idx_files = sorted(
            q
            for q in p.iterdir()
            if q.is_file() and _is_idx(q) and ("images" in q.name or "idx3" in q.name or "idx4" in q.name)
        )
        if idx_files:
            train = [q for q in idx_files if q.name.startswith("train")]
            plain = {q.name.removesuffix(".gz") for q in idx_files}
            chosen = (train or idx_files)[0]
            if len(plain) > 1:
                log.info("%s holds several IDX image files; using %s", p, chosen.name)
            return _open_idx(chosen, labels)
        return ImageFolderDataset(p, **kwargs)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        return _open_npy(p, labels)
    if suffix == ".npz":
        return _open_npz(p, labels)
    if _is_idx(p):
        return _open_idx(p, labels)
    raise InvalidArgumentError(
        f"{p}: unknown data format (expected .npy, .npz, an IDX file (*-ubyte[.gz]) or a folder of images)",
        field="data",
    )
