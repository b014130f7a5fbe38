"""A version's catalogue: item payloads (label names, thumbnails, metadata) and latent diagnostics.

Layout (``versions/<v>/catalogue/``, :data:`FORMAT_VERSION` 1; every file is listed with its size
and sha256 in the version manifest, so ``IndexRoot.verify`` checks it like the engine's files)::

    catalogue.json        format, items, latent_dim, label_names (list or null), thumbnails
                          ({"shape": [h, w, C], "source_shape": [H, W, C], "downscaled": bool} or
                          null), metadata (bool), diagnostics (diagnostics.LatentDiagnostics.to_dict)
    thumbnails.npy        (N, h, w, C) uint8: each item's own pixels, only for uint8 images with
                          C in 1, 3, 4; items over MAX_THUMBNAIL_VALUES values (h * w * C) are
                          downscaled with a box filter to the largest size that fits
    metadata.jsonl        one JSON object per item, UTF-8, newline-terminated (e.g. the source path)
    metadata_offsets.npy  (N + 1,) int64 byte offsets of the records in metadata.jsonl

The label-name table maps integer labels (the engine's ``labels.npy``) to names: ``names[label]``;
it must name every label present (:func:`check_label_names`). Thumbnails and metadata are
memory-mapped, so one item is read without loading the others. Versions published before the
catalogue existed have no ``catalogue/`` directory: :func:`load_catalogue` returns ``None``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentsearch.bank import PosteriorBank
from latentsearch.data.images import PNG_CHANNELS, fit_shape, png_bytes, resize_pixels
from latentsearch.data.readers import Dataset
from latentsearch.diagnostics import LatentDiagnostics, latent_diagnostics
from latentsearch.engine.storage import fsync_dir, read_json_manifest
from latentsearch.errors import CorruptIndexError, InvalidArgumentError, quoted

__all__ = [
    "CATALOGUE_DIR",
    "MAX_LABEL_NAME_LENGTH",
    "MAX_THUMBNAIL_VALUES",
    "Catalogue",
    "CatalogueInfo",
    "ItemPayloads",
    "PayloadPlan",
    "PayloadWriter",
    "StagedPayloads",
    "catalogue_bytes",
    "check_label_names",
    "item_payloads",
    "load_catalogue",
    "payload_plan",
    "read_catalogue_info",
    "read_catalogue_json",
    "write_catalogue",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "latentsearch.catalogue"
FORMAT_VERSION = 1
CATALOGUE_DIR = "catalogue"  # under the version directory
CATALOGUE_JSON = "catalogue.json"
THUMBNAILS = "thumbnails.npy"
METADATA = "metadata.jsonl"
METADATA_OFFSETS = "metadata_offsets.npy"
# Most uint8 values per thumbnail (h * w * C): 64x64 grayscale, about 36x36 RGB.
MAX_THUMBNAIL_VALUES = 4096
# Longest label name, in characters (names are shown beside results, not documents).
MAX_LABEL_NAME_LENGTH = 256
# Longest metadata record, in UTF-8 bytes.
MAX_METADATA_BYTES = 16384
_BATCH = 1024


# -- label names ----------------------------------------------------------------------------------
def check_label_names(
    names: Sequence[str] | None, labels: np.ndarray | None, *, field: str = "label_names"
) -> list[str] | None:
    """``names`` as a list when it is a valid name table for ``labels`` (``(N,)`` int or ``None``).

    Valid: at least one name; each a non-empty string of at most :data:`MAX_LABEL_NAME_LENGTH`
    characters without line breaks; no name twice; and the labels present all in
    ``0 .. len(names) - 1`` (``names[label]`` names a label).

    Raises:
        InvalidArgumentError: ``field`` names the source of the names; the message says which rule.
    """
    if names is None:
        return None
    names = list(names)
    if not names:
        raise InvalidArgumentError("label names are empty: give one name per label", field=field)
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise InvalidArgumentError(
                f"label name {i} is empty or not a string: {quoted(str(name))}", field=field
            )
        if len(name) > MAX_LABEL_NAME_LENGTH or "\n" in name or "\r" in name:
            raise InvalidArgumentError(
                f"label name {i} ({quoted(name)}) is over {MAX_LABEL_NAME_LENGTH} characters or holds "
                "a line break",
                field=field,
            )
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise InvalidArgumentError(
                f"label names {seen[name]} and {i} are both {quoted(name)}: each label needs its own name",
                field=field,
            )
        seen[name] = i
    if labels is None:
        raise InvalidArgumentError(
            f"{len(names)} label names given, but the items have no labels to name", field=field
        )
    if labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0:
            raise InvalidArgumentError(
                f"the items have label {lo}; names name labels 0, 1, ... only", field=field
            )
        if hi >= len(names):
            raise InvalidArgumentError(
                f"{len(names)} label names cover labels 0..{len(names) - 1}, but the items have label "
                f"{hi}: give at least {hi + 1} names",
                field=field,
            )
    return names


# -- writing --------------------------------------------------------------------------------------
def _thumbnail_plan(dataset: Dataset | None) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """``(source_shape, stored_shape)`` of the thumbnails of ``dataset``, or ``None`` when it gets none."""
    if dataset is None or dataset.kind != "image":
        return None
    h, w, c = dataset.item_shape
    if dataset.dtype != np.uint8 or c not in PNG_CHANNELS:
        log.info(
            "no thumbnails: items are %s with %d channels (thumbnails need uint8 and C in 1, 3, 4)",
            dataset.dtype,
            c,
        )
        return None
    stored = fit_shape((h, w, c), MAX_THUMBNAIL_VALUES)
    if stored != (h, w, c):
        log.info(
            "thumbnails downscaled from %dx%d to %dx%d (at most %d values each)",
            h,
            w,
            stored[0],
            stored[1],
            MAX_THUMBNAIL_VALUES,
        )
    return (h, w, c), stored


@dataclass(frozen=True)
class PayloadPlan:
    """Which per-item payload files a dataset's catalogue gets (:func:`payload_plan`)."""

    # (h, w, C) of the stored thumbnails and (H, W, C) of the items; both None: no thumbnails
    thumbnail_shape: tuple[int, int, int] | None
    source_shape: tuple[int, int, int] | None
    metadata: bool  # whether the dataset keeps a metadata record per item

    @property
    def files(self) -> tuple[str, ...]:
        """The catalogue files the plan writes (names under the catalogue directory)."""
        return ((THUMBNAILS,) if self.thumbnail_shape is not None else ()) + (
            (METADATA, METADATA_OFFSETS) if self.metadata else ()
        )


def payload_plan(dataset: Dataset | None, *, thumbnails: bool = True) -> PayloadPlan:
    """The payload files :func:`write_catalogue` writes for ``dataset`` (``thumbnails=False``: none
    of thumbnails); reads no item, only the first row's metadata record."""
    plan = _thumbnail_plan(dataset) if thumbnails else None
    metadata = dataset is not None and dataset.item_metadata(0, 1) is not None
    return PayloadPlan(
        thumbnail_shape=None if plan is None else plan[1],
        source_shape=None if plan is None else plan[0],
        metadata=metadata,
    )


@dataclass(frozen=True)
class ItemPayloads:
    """The catalogue payloads of ``k`` consecutive rows (:func:`item_payloads`).

    Attributes:
        thumbnails: ``(k, h, w, C)`` uint8, or ``None`` (the plan has no thumbnails).
        records: the rows' metadata lines, each newline-terminated UTF-8 JSON, concatenated
            (``b""`` without metadata); ``lengths``: ``(k,)`` int64 bytes of each line (all 0 without).
    """

    thumbnails: np.ndarray | None
    records: bytes
    lengths: np.ndarray


def item_payloads(
    dataset: Dataset | None, start: int, stop: int, plan: PayloadPlan, items: np.ndarray | None = None
) -> ItemPayloads:
    """The payloads of rows ``[start, stop)`` of ``dataset`` under ``plan``: thumbnails from
    ``items`` (those rows, ``(k, *item_shape)``; ``None``: read here when the plan has thumbnails),
    metadata records from :meth:`Dataset.item_metadata`. The one formula of the local job's catalogue
    and of a Ray actor's shard (``dataset`` may be ``None`` for a plan without metadata when
    ``items`` are given).

    Raises:
        InvalidArgumentError: the dataset gave another number of records, or a record is over
            MAX_METADATA_BYTES bytes (``field="metadata"``).
    """
    thumbs = None
    if plan.thumbnail_shape is not None:
        if items is None:
            assert dataset is not None
            items = dataset.read(start, stop)  # (k, H, W, C) uint8
        thumbs = _thumbnails(items, plan.thumbnail_shape)
    lengths = np.zeros(stop - start, dtype=np.int64)
    if not plan.metadata:
        return ItemPayloads(thumbs, b"", lengths)
    assert dataset is not None
    records = dataset.item_metadata(start, stop) or []
    if len(records) != stop - start:
        raise InvalidArgumentError(
            f"the dataset gave {len(records)} metadata records for rows {start}..{stop - 1}",
            field="metadata",
        )
    lines = []
    for i, record in enumerate(records):
        line = json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")
        if len(line) > MAX_METADATA_BYTES:
            raise InvalidArgumentError(
                f"item {start + i}'s metadata record has {len(line)} bytes; at most {MAX_METADATA_BYTES}",
                field="metadata",
            )
        lines.append(line + b"\n")
        lengths[i] = len(line) + 1
    return ItemPayloads(thumbs, b"".join(lines), lengths)


def _thumbnails(batch: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``(k, h, w, C)`` uint8 thumbnails of ``batch`` (``(k, H, W, C)`` uint8): the pixels
    themselves, or each downscaled (:func:`latentsearch.data.images.resize_pixels`)."""
    if batch.shape[1:] == shape:
        return np.asarray(batch, dtype=np.uint8)
    out = np.empty((len(batch), *shape), dtype=np.uint8)
    for i, pixels in enumerate(batch):
        out[i] = resize_pixels(pixels, shape)
    return out


class PayloadWriter:
    """Writes a catalogue's payload files (``plan.files``) into ``directory``, rows appended in
    order (:meth:`append`); a context manager whose clean exit fsyncs them and checks that all
    ``n`` rows came (an exit on an error only closes the files)."""

    def __init__(self, directory: Path, n: int, plan: PayloadPlan) -> None:
        self.directory, self.n, self.plan = Path(directory), n, plan
        self.directory.mkdir(parents=True, exist_ok=True)
        self.row = 0
        self._thumbs = None
        if plan.thumbnail_shape is not None:
            self._thumbs = np.lib.format.open_memmap(
                self.directory / THUMBNAILS, mode="w+", dtype=np.uint8, shape=(n, *plan.thumbnail_shape)
            )
        self._offsets = np.zeros(n + 1, dtype=np.int64)  # (N + 1,) byte offsets of the records
        self._blob = open(self.directory / METADATA, "wb") if plan.metadata else None  # noqa: SIM115

    def append(self, payloads: ItemPayloads) -> None:
        """The payloads of the next ``k`` rows."""
        k = len(payloads.lengths)
        if self.row + k > self.n:
            raise CorruptIndexError(f"{self.directory}: payloads for more than {self.n} rows")
        if self._thumbs is not None:
            if payloads.thumbnails is None or payloads.thumbnails.shape != (k, *self._thumbs.shape[1:]):
                got = None if payloads.thumbnails is None else payloads.thumbnails.shape
                raise CorruptIndexError(f"{self.directory}: thumbnails of {got} for {k} rows")
            self._thumbs[self.row : self.row + k] = payloads.thumbnails
        if self._blob is not None:
            if int(payloads.lengths.sum()) != len(payloads.records):
                raise CorruptIndexError(f"{self.directory}: metadata lengths do not add up to the records")
            self._blob.write(payloads.records)
            ends = self._offsets[self.row] + np.cumsum(payloads.lengths)
            self._offsets[self.row + 1 : self.row + k + 1] = ends
        self.row += k

    def __enter__(self) -> PayloadWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self._finish()
        elif self._blob is not None:
            self._blob.close()
            self._blob = None

    def _finish(self) -> None:
        """Flush and fsync the files (the metadata offsets written last)."""
        try:
            if self._blob is not None:
                self._blob.flush()
                os.fsync(self._blob.fileno())
        finally:
            if self._blob is not None:
                self._blob.close()
                self._blob = None
        if self.row != self.n:
            raise CorruptIndexError(f"{self.directory}: payloads for {self.row} of {self.n} rows")
        if self._thumbs is not None:
            self._thumbs.flush()
            self._thumbs = None
            _fsync_file(self.directory / THUMBNAILS)
        if self.plan.metadata:
            _durable_npy(self.directory / METADATA_OFFSETS, self._offsets)


@dataclass(frozen=True)
class StagedPayloads:
    """Every item's payloads, computed where the items were read (the actors of ``index --ray``)
    and merged in row order: the catalogue files of ``plan`` already written in ``directory`` (by a
    :class:`PayloadWriter`), the content hashes, labels and ids. ``write_catalogue(staged=...)``
    moves the files into the catalogue, so the job reads no item itself.

    Attributes:
        hashes: ``(N, 16)`` uint8 content hashes (``indexer.incremental.item_hashes``).
        labels: ``(N,)`` int64, or ``None``; ids: ``(N,)`` str.
    """

    directory: Path
    plan: PayloadPlan
    hashes: np.ndarray
    labels: np.ndarray | None
    ids: np.ndarray


def catalogue_bytes(items: int, dataset: Dataset | None, *, thumbnails: bool = True) -> int:
    """About how many bytes :func:`write_catalogue` writes (an upper bound for the thumbnails;
    metadata records counted at 256 bytes each when the dataset has them)."""
    plan = _thumbnail_plan(dataset) if thumbnails else None
    thumbs = 0 if plan is None else items * int(np.prod(plan[1]))
    meta = 0 if dataset is None or dataset.item_metadata(0, 1) is None else items * (256 + 8)
    return thumbs + meta + (1 << 16)


def _durable_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def write_catalogue(
    directory: str | os.PathLike[str],
    bank: PosteriorBank,
    *,
    label_names: Sequence[str] | None = None,
    dataset: Dataset | None = None,
    thumbnails: bool = True,
    field: str = "label_names",
    staged: StagedPayloads | None = None,
) -> LatentDiagnostics:
    """Write the catalogue of ``bank`` (a version's posteriors) to ``directory`` (created).

    Args:
        label_names: the label-name table (checked by :func:`check_label_names` against the bank's
            labels; ``field`` is what an error names).
        dataset: the items the bank was encoded from, row for row: thumbnails (uint8 images) and
            metadata records (:meth:`Dataset.item_metadata`) come from it; ``None`` (posteriors): none.
        thumbnails: ``False``: store no thumbnails even for image data.
        staged: the dataset's payload files, already computed where its items were read
            (``index --ray``): moved into the catalogue; the dataset is then not read (its ids and
            labels are still checked against the bank's).

    Returns:
        The latent diagnostics, computed from the bank's means and scales.
    """
    out = Path(directory)
    names = check_label_names(label_names, bank.labels, field=field)
    n = len(bank)
    if dataset is not None:
        # the items' ids and labels: as the actors read them when staged, else the dataset's
        item_ids, item_labels = (
            (dataset.ids, dataset.labels) if staged is None else (staged.ids, staged.labels)
        )
        same_ids = bank.ids is None or np.array_equal(np.asarray(bank.ids), item_ids)
        same_labels = bank.labels is None or (
            item_labels is not None and np.array_equal(np.asarray(bank.labels), item_labels)
        )
        if len(dataset) != n or len(item_ids) != n or not (same_ids and same_labels):
            raise InvalidArgumentError(
                f"the dataset ({len(dataset)} items) is not the one the index ({n} items) was encoded "
                "from: its ids or labels differ",
                field="data",
            )
    out.mkdir(parents=True, exist_ok=True)
    diagnostics = latent_diagnostics(bank.mu, bank.log_sigma)
    payloads = payload_plan(dataset, thumbnails=thumbnails) if staged is None else staged.plan
    thumb_shape, source_shape = payloads.thumbnail_shape, payloads.source_shape
    plan = None if thumb_shape is None or source_shape is None else (source_shape, thumb_shape)
    has_metadata = payloads.metadata
    if staged is not None:
        _move_staged(out, staged)
    elif dataset is not None and (plan is not None or has_metadata):
        _write_items(out, dataset, payloads)
    info = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "items": n,
        "latent_dim": bank.dim,
        "label_names": names,
        "thumbnails": None
        if plan is None
        else {"shape": list(plan[1]), "source_shape": list(plan[0]), "downscaled": plan[0] != plan[1]},
        "metadata": has_metadata,
        "diagnostics": diagnostics.to_dict(),
    }
    with open(out / CATALOGUE_JSON, "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2, sort_keys=True, ensure_ascii=False)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(out)
    log.info(
        "catalogue: %s label names, %s, %s; latent dimensions %s",
        "no" if names is None else len(names),
        "no thumbnails" if plan is None else f"{plan[1][0]}x{plan[1][1]}x{plan[1][2]} thumbnails",
        "metadata" if has_metadata else "no metadata",
        diagnostics.summary(),
    )
    return diagnostics


def _write_items(out: Path, dataset: Dataset, plan: PayloadPlan) -> None:
    """One pass over ``dataset``: thumbnails into a uint8 memory map, metadata records into the blob."""
    n = len(dataset)
    with PayloadWriter(out, n, plan) as writer:
        for start in range(0, n, _BATCH):
            writer.append(item_payloads(dataset, start, min(start + _BATCH, n), plan))


def _move_staged(out: Path, staged: StagedPayloads) -> None:
    """Rename the files of ``staged`` (written by a PayloadWriter) into the catalogue ``out``."""
    for name in staged.plan.files:
        os.replace(staged.directory / name, out / name)


# -- reading --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CatalogueInfo:
    """What ``catalogue.json`` says (read without the arrays; see :func:`read_catalogue_json`)."""

    items: int
    label_names: list[str] | None
    diagnostics: LatentDiagnostics
    thumbnail_shape: tuple[int, int, int] | None  # (h, w, C)
    downscaled: bool
    metadata: bool


def read_catalogue_json(jpath: Path) -> CatalogueInfo:
    """Parse and check a ``catalogue.json`` (the label names on their own: not against labels).

    Raises:
        CorruptIndexError: missing, unreadable, another format, or bad fields.
    """
    info = read_json_manifest(jpath, FORMAT_NAME, FORMAT_VERSION)
    try:
        items, dim = int(info["items"]), int(info["latent_dim"])
        names = info.get("label_names")
        if names is not None:
            check_label_names(names, np.zeros(0, dtype=np.int64))
        diagnostics = LatentDiagnostics.from_dict(info.get("diagnostics") or {}, dim)
        thumbs = info.get("thumbnails")
        shape = None
        if thumbs is not None:
            h, w, c = (int(v) for v in thumbs["shape"])
            shape = (h, w, c)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptIndexError(f"{jpath} has bad fields: {exc}") from exc
    except InvalidArgumentError as exc:
        raise CorruptIndexError(f"{jpath}: {exc.message}") from exc
    return CatalogueInfo(
        items=items,
        label_names=names,
        diagnostics=diagnostics,
        thumbnail_shape=shape,
        downscaled=bool(thumbs and thumbs.get("downscaled")),
        metadata=bool(info.get("metadata")),
    )


def read_catalogue_info(version_dir: str | os.PathLike[str]) -> CatalogueInfo | None:
    """The catalogue summary of the version in ``version_dir`` (``None``: it has no catalogue)."""
    jpath = Path(version_dir) / CATALOGUE_DIR / CATALOGUE_JSON
    return read_catalogue_json(jpath) if jpath.exists() else None


class Catalogue:
    """A version's catalogue, memory-mapped (see the module docstring); rows are the engine's rows.

    Attributes:
        label_names: names by integer label, or ``None``.
        diagnostics: the version's latent diagnostics.
        thumbnail_shape: ``(h, w, C)`` of every thumbnail, or ``None`` when there are none.
        downscaled: whether thumbnails are smaller than the items.
    """

    def __init__(
        self,
        *,
        items: int,
        label_names: list[str] | None,
        diagnostics: LatentDiagnostics,
        thumbnails: np.ndarray | None = None,
        downscaled: bool = False,
        metadata: np.ndarray | None = None,
        offsets: np.ndarray | None = None,
    ) -> None:
        self.items = items
        self.label_names: tuple[str, ...] | None = None if label_names is None else tuple(label_names)
        self.diagnostics = diagnostics
        self._thumbnails = thumbnails  # (N, h, w, C) uint8
        self.downscaled = downscaled
        self._metadata = metadata  # (bytes,) uint8
        self._offsets = offsets  # (N + 1,) int64

    def __repr__(self) -> str:
        names = "no" if self.label_names is None else len(self.label_names)
        return (
            f"Catalogue(items={self.items}, label_names={names}, "
            f"thumbnails={self.thumbnail_shape}, metadata={self.has_metadata})"
        )

    @property
    def thumbnail_shape(self) -> tuple[int, ...] | None:
        return None if self._thumbnails is None else tuple(self._thumbnails.shape[1:])

    @property
    def has_thumbnails(self) -> bool:
        return self._thumbnails is not None

    @property
    def has_metadata(self) -> bool:
        return self._metadata is not None

    def label_name(self, label: int | None) -> str | None:
        """The name of ``label`` (``None`` without a table or label)."""
        if self.label_names is None or label is None or not 0 <= label < len(self.label_names):
            return None
        return self.label_names[label]

    def thumbnail(self, row: int) -> np.ndarray | None:
        """``(h, w, C)`` uint8 pixels of ``row`` (a copy), or ``None``."""
        if self._thumbnails is None:
            return None
        return np.array(self._thumbnails[row])

    def thumbnail_png(self, row: int) -> bytes:
        """PNG of ``row``'s thumbnail; ``b""`` when there are none."""
        pixels = self.thumbnail(row)
        return b"" if pixels is None else png_bytes(pixels)

    def metadata_json(self, row: int) -> str:
        """``row``'s metadata record as JSON text; ``""`` when there are none."""
        if self._metadata is None or self._offsets is None:
            return ""
        lo, hi = int(self._offsets[row]), int(self._offsets[row + 1])
        return bytes(self._metadata[lo:hi]).decode("utf-8").rstrip("\n")

    def metadata(self, row: int) -> dict[str, Any] | None:
        """``row``'s metadata record, or ``None``."""
        text = self.metadata_json(row)
        return json.loads(text) if text else None

    @classmethod
    def load(cls, directory: str | os.PathLike[str], bank: PosteriorBank, *, mmap: bool = True) -> Catalogue:
        """Open the catalogue in ``directory`` for the version whose posteriors are ``bank``.

        Checks the manifest, the label-name table against the bank's labels, the shapes and
        dtypes of the arrays and the metadata offsets (vectorised passes).

        Raises:
            CorruptIndexError: naming the bad file.
        """
        path = Path(directory)
        info = read_catalogue_json(path / CATALOGUE_JSON)
        jpath = path / CATALOGUE_JSON
        n = len(bank)
        if info.items != n or info.diagnostics.dim != bank.dim:
            raise CorruptIndexError(
                f"{jpath} describes {info.items} items of dimension {info.diagnostics.dim}; the index has "
                f"{n} of dimension {bank.dim}"
            )
        try:
            check_label_names(info.label_names, bank.labels)
        except InvalidArgumentError as exc:
            raise CorruptIndexError(f"{jpath}: {exc.message}") from exc
        thumbnails = None
        if info.thumbnail_shape is not None:
            shape = (n, *info.thumbnail_shape)
            thumbnails = _load_array(path / THUMBNAILS, "r" if mmap else None, np.uint8, shape)
        metadata = offsets = None
        if info.metadata:
            offsets = _load_array(path / METADATA_OFFSETS, None, np.int64, (n + 1,))
            mpath = path / METADATA
            try:
                size = mpath.stat().st_size
                metadata = (
                    np.memmap(mpath, dtype=np.uint8, mode="r")
                    if mmap and size
                    else np.fromfile(mpath, np.uint8)
                )
            except OSError as exc:
                raise CorruptIndexError(f"{mpath} is unreadable: {exc}") from exc
            if offsets[0] != 0 or offsets[-1] != size or bool((np.diff(offsets) < 1).any()):
                raise CorruptIndexError(
                    f"{path / METADATA_OFFSETS} does not match {mpath} ({size} bytes): offsets must start at "
                    "0, grow, and end at its size"
                )
        return cls(
            items=n,
            label_names=info.label_names,
            diagnostics=info.diagnostics,
            thumbnails=thumbnails,
            downscaled=info.downscaled,
            metadata=metadata,
            offsets=offsets,
        )


def _load_array(fpath: Path, mode: Any, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.load(fpath, mmap_mode=mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CorruptIndexError(f"{fpath} is unreadable: {exc}") from exc
    if arr.dtype != np.dtype(dtype) or arr.shape != shape:
        raise CorruptIndexError(f"{fpath} holds {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {shape}")
    return arr


def load_catalogue(
    version_dir: str | os.PathLike[str], manifest: dict[str, Any], bank: PosteriorBank, *, mmap: bool = True
) -> Catalogue | None:
    """The catalogue of the version in ``version_dir`` (its manifest ``manifest``), or ``None`` when
    the version has none (published before catalogues existed).

    The catalogue files' sizes are checked against the version manifest (their checksums are
    ``IndexRoot.verify``'s job).

    Raises:
        CorruptIndexError: a listed file is missing, has another size, or fails :meth:`Catalogue.load`.
    """
    vdir = Path(version_dir)
    prefix = CATALOGUE_DIR + "/"
    listed = {k: v for k, v in manifest.get("files", {}).items() if k.startswith(prefix)}
    if not listed:
        return None
    for name, meta in sorted(listed.items()):
        fpath = vdir / name
        try:
            size = fpath.stat().st_size
        except FileNotFoundError as exc:
            raise CorruptIndexError(f"{fpath} is missing") from exc
        if size != meta.get("bytes"):
            raise CorruptIndexError(
                f"{fpath} has {size} bytes, the version manifest says {meta.get('bytes')}"
            )
    return Catalogue.load(vdir / CATALOGUE_DIR, bank, mmap=mmap)
