"""Save and load a search engine as one directory: numpy arrays, a FAISS index, a JSON manifest.

Layout (``FORMAT_VERSION`` 1)::

    manifest.json        format, counts, engine config, FAISS parameters, size + sha256 of every file,
                         the measured exact-path costs ("exact_costs", see strategy.py; absent or
                         null in engines saved before them, which then use the fixed rule)
    mu.npy               (N, d) float64
    log_sigma.npy        (N, d) float64
    exact_groups.npy     (N,) int16 scale group of every row (group bounds are in the manifest)
    ids.npy              (N,) unicode, only when ids are not the row numbers
    labels.npy           (N,) int64, only when the bank has labels
    approx.faiss         IVF inner-product index, only when an approximate index was built
    approx_boxes.npy     (4, L, d) float64: mu lo/hi and sigma lo/hi of every partition
    approx_lists.npy     (N,) int32 partition of every row (-1: on the exact path)
    approx_features.npy  (2, 2d) float64 centre and scale of the partitioning features
    approx_lifted_boxes.npy (2, L, 2d + 1) float64 min and max lifted vector of every partition
    approx_centred.npy   (3, L, d) float64 mean mu and box of (mu - mean) / sigma^2 per partition
    approx_centred_c.npy (L,) float64 max centred constant per partition (see approx.py)
    typicality.npy       (S,) float64 ascending log q(z) of the typicality reference sample (see
                         typicality.py); versions written without it load with no reference
    kernel_rows.npy      (N,) int64 bank rows by partition, the compiled kernel's order (kernels.py),
                         only with an approximate index whose engine may use the kernel
    kernel_mu.npy        (N, d) float64 mu, in that order (engines saved with the older
                         (N d,) per-partition (d, n_p) blocks rebuild them at load, as below)
    kernel_inv_sigma.npy (N, d) float64 1/sigma, in that order
    kernel_log_norm.npy  (N,) float64 sum(log sigma) + d/2 log 2 pi, in that order; engines saved
                         before these files build them at load, in a background thread

Arrays, and the IVF index's codes, are memory-mapped on load, so a 10M-item bank opens in seconds
and pages in on demand. The
exact index is rebuilt from ``mu`` and ``log_sigma`` (a linear pass), so it can never disagree with
them. The directory is written under a temporary name beside the target and renamed into place.

Every write error surfaces as the ``OSError`` the kernel gave (``ENOSPC`` on a full disk): the FAISS
index is written through Python file calls, not FAISS's own ``fwrite``/``fclose`` (whose errors
arrive as a RuntimeError or, at close, not at all). Loading checks sizes, dtypes and shapes, and the
value ranges of the index arrays (scale group and partition of every row, partition sizes against
the FAISS index, finite partition boxes) with vectorised min/max passes, so a damaged file is a
:class:`CorruptIndexError` naming it rather than a search that allocates by a corrupt value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from latentsearch.bank import PosteriorBank
from latentsearch.engine.approx import ApproxIndex
from latentsearch.engine.config import EngineConfig
from latentsearch.engine.exact import ExactIndex
from latentsearch.engine.gpu import Device, resolve_device
from latentsearch.engine.kernels import KernelArrays, KernelIndex, partition_key
from latentsearch.engine.strategy import StrategyCosts
from latentsearch.engine.typicality import TypicalityReference
from latentsearch.errors import CorruptIndexError, InvalidArgumentError, NotFoundError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "EngineParts",
    "check_listed_files",
    "file_digest",
    "fsync_dir",
    "load_engine",
    "read_json_manifest",
    "read_manifest",
    "save_engine",
    "saved_bytes",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "latentsearch.engine"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TYPICALITY = "typicality.npy"
# The compiled kernel's arrays: file name, KernelArrays field.
_KERNEL_FILES = (
    ("kernel_rows.npy", "rows"),
    ("kernel_mu.npy", "mu_b"),
    ("kernel_inv_sigma.npy", "inv_b"),
    ("kernel_log_norm.npy", "log_norm"),
)


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames and new entries in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_npy(directory: Path, name: str, array: np.ndarray) -> None:
    with open(directory / name, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())


def _save_faiss(directory: Path, name: str, index: faiss.Index) -> None:
    """``faiss.write_index`` through this file's ``write``: a failed write raises its OSError."""
    with open(directory / name, "wb") as fh:
        # PyCallbackIOWriter is a SWIG class faiss's own __init__.pyi leaves out.
        faiss.write_index(index, faiss.PyCallbackIOWriter(fh.write))  # type: ignore[attr-defined]
        fh.flush()
        os.fsync(fh.fileno())


def saved_bytes(
    items: int, dim: int, *, id_bytes: int = 0, labels: bool = False, nlist: int | None = None
) -> int:
    """About how many bytes :func:`save_engine` writes for ``items`` posteriors of dimension ``dim``.

    Args:
        id_bytes: bytes of the ids array (0: no ids file).
        labels: whether a labels file is written.
        nlist: partitions of the approximate index (``None``: none is built); every row is
            counted as partitioned, so this is an upper bound.
    """
    n, d = items, dim
    total = 2 * n * d * 8 + n * 2 + id_bytes + (n * 8 if labels else 0)  # mu, log_sigma, groups, ...
    if nlist is not None:
        lifted = 2 * d + 1
        total += n * (lifted * 4 + 8)  # IVF codes and ids
        total += nlist * (lifted * 4 + 16)  # quantizer and per-list headers
        total += n * 4 + nlist * 8 * (4 * d + 2 * lifted + 3 * d + 1) + 4 * d * 8  # lists, boxes, ...
        total += n * (2 * d * 8 + 16)  # the compiled kernel's copy (kernel_*.npy)
    return total + (1 << 16)  # npy headers and manifests


@dataclass(frozen=True)
class EngineParts:
    """What a saved engine consists of: :class:`~latentsearch.engine.SearchEngine` is assembled
    from these by ``SearchEngine.load`` and hands them to :func:`save_engine` (so this module
    never imports the engine class)."""

    bank: PosteriorBank
    config: EngineConfig
    exact: ExactIndex
    approx: ApproxIndex | None
    typicality: TypicalityReference | None = None
    # Measured cost of each exact path (strategy.py); None: not measured (the fixed rule applies).
    costs: StrategyCosts | None = None
    # The bank in the compiled kernel's order (None: not saved, or made later from the bank).
    kernel: KernelIndex | None = None


def save_engine(
    engine: EngineParts, path: Path, *, overwrite: bool = False, extra: dict[str, Any] | None = None
) -> Path:
    """Write an engine's parts to directory ``path``; see the module docstring for the layout.

    Args:
        overwrite: replace an existing directory (the old one is removed only after the new one
            is in place).
        extra: JSON-serialisable metadata stored under ``manifest["extra"]``.

    Returns:
        ``path``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InvalidArgumentError(f"{path} already exists (pass overwrite=True to replace it)", field="path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        bank = engine.bank
        _save_npy(tmp, "mu.npy", np.asarray(bank.mu, dtype=np.float64))
        _save_npy(tmp, "log_sigma.npy", np.asarray(bank.log_sigma, dtype=np.float64))
        _save_npy(tmp, "exact_groups.npy", engine.exact.group_of_row)
        if bank.ids is not None:
            _save_npy(tmp, "ids.npy", bank.ids)
        if bank.labels is not None:
            _save_npy(tmp, "labels.npy", np.asarray(bank.labels, dtype=np.int64))
        approx = engine.approx
        if approx is not None:
            _save_faiss(tmp, "approx.faiss", approx.ivf)
            _save_npy(tmp, "approx_boxes.npy", np.stack([approx.lo, approx.hi, approx.slo, approx.shi]))
            _save_npy(tmp, "approx_lists.npy", approx.list_of_row)
            _save_npy(tmp, "approx_features.npy", approx.features)
            _save_npy(tmp, "approx_lifted_boxes.npy", approx.lifted_box)
            _save_npy(tmp, "approx_centred.npy", approx.centred)
            _save_npy(tmp, "approx_centred_c.npy", approx.centred_c)
        if engine.typicality is not None:
            _save_npy(tmp, TYPICALITY, engine.typicality.log_qz)
        if engine.kernel is not None:
            arrays = engine.kernel.arrays
            for name, field in _KERNEL_FILES:
                _save_npy(tmp, name, getattr(arrays, field))
        files = {p.name: {"bytes": p.stat().st_size, "sha256": file_digest(p)} for p in sorted(tmp.iterdir())}
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "items": len(bank),
            "latent_dim": bank.dim,
            "has_ids": bank.ids is not None,
            "has_labels": bank.labels is not None,
            "config": engine.config.to_dict(),
            "exact": {
                "factory": engine.config.exact_factory,
                "metric": "inner_product",
                "scale_groups": [len(g) for g in engine.exact.groups],
                "group_absmax": [g.absmax.tolist() for g in engine.exact.groups],
                "group_direct": [g.direct for g in engine.exact.groups],
            },
            "approx": None if approx is None else {**approx.info(), "exact_groups": approx.exact_groups},
            "exact_costs": None if engine.costs is None else engine.costs.to_dict(),
            "versions": {"faiss": faiss.__version__, "numpy": np.__version__},
            "files": files,
            "extra": extra or {},
        }
        with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved engine (%d items, d=%d) to %s", len(engine.bank), engine.bank.dim, path)
    return path


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and sanity-check ``path/manifest.json``."""
    path = Path(path)
    if not path.is_dir():
        raise NotFoundError(f"no engine directory at {path}", field="path")
    return read_json_manifest(
        path / MANIFEST, FORMAT_NAME, FORMAT_VERSION, missing="half-written or not an engine directory"
    )


def read_json_manifest(mpath: Path, fmt: str, version: int, *, missing: str = "") -> dict[str, Any]:
    """Parse a JSON manifest and check its ``format`` and ``format_version`` fields.

    Raises:
        CorruptIndexError: missing, unreadable, another format, or another format version.
    """
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CorruptIndexError(f"{mpath} is missing" + (f" ({missing})" if missing else "")) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptIndexError(f"{mpath} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise CorruptIndexError(f"{mpath} is not a {fmt} manifest")
    if manifest.get("format_version") != version:
        raise CorruptIndexError(
            f"{mpath} has format_version {manifest.get('format_version')!r}; this build reads {version}"
        )
    return manifest


def check_listed_files(
    directory: Path, files: dict[str, dict[str, Any]], *, own: tuple[str, ...], listed_in: str
) -> list[str]:
    """Every problem of the files a manifest lists under ``directory`` (``files``: relative name ->
    ``{"bytes", "sha256"}``): missing, another size, a failed sha256; and every file there it does
    not list (``own``: the manifest's own files). One line per bad file, naming it; ``listed_in``
    names the manifest in the lines ("the manifest", "model.json")."""
    problems = []
    for name, meta in sorted(files.items()):
        fpath = directory / name
        try:
            size = fpath.stat().st_size
        except FileNotFoundError:
            problems.append(f"{fpath}: missing")
            continue
        if size != meta.get("bytes"):
            problems.append(f"{fpath}: {size} bytes, {listed_in} says {meta.get('bytes')} (truncated?)")
        elif file_digest(fpath) != meta.get("sha256"):
            problems.append(f"{fpath}: fails its sha256 checksum")
    listed = set(files) | set(own)
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.relative_to(directory).as_posix() not in listed:
            problems.append(f"{p}: not listed in {listed_in}")
    return problems


def _check_files(path: Path, manifest: dict[str, Any], verify: bool) -> None:
    for name, meta in manifest.get("files", {}).items():
        fpath = path / name
        try:
            size = fpath.stat().st_size
        except FileNotFoundError as exc:
            raise CorruptIndexError(f"{fpath} is missing") from exc
        if size != meta["bytes"]:
            raise CorruptIndexError(f"{fpath} has {size} bytes, manifest says {meta['bytes']} (truncated?)")
        if verify and file_digest(fpath) != meta["sha256"]:
            raise CorruptIndexError(f"{fpath} fails its sha256 checksum")


def _load_npy(path: Path, name: str, mmap: bool, dtype: Any, shape: tuple[int, ...] | None) -> np.ndarray:
    fpath = path / name
    try:
        arr = np.load(fpath, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CorruptIndexError(f"{fpath} is unreadable: {exc}") from exc
    if dtype is not None and arr.dtype != np.dtype(dtype):
        raise CorruptIndexError(f"{fpath} has dtype {arr.dtype}, expected {np.dtype(dtype)}")
    if shape is not None and arr.shape != shape:
        raise CorruptIndexError(f"{fpath} has shape {arr.shape}, expected {shape}")
    return arr


def _check_range(fpath: Path, values: np.ndarray, lo: int, hi: int, what: str) -> None:
    """Raise CorruptIndexError naming ``fpath`` unless every value lies in ``[lo, hi)``."""
    if values.size == 0:
        return
    vmin, vmax = int(values.min()), int(values.max())
    if vmin < lo or vmax >= hi:
        raise CorruptIndexError(
            f"{fpath} holds {what} in [{vmin}, {vmax}]; valid ones are in [{lo}, {hi - 1}]"
        )


def _check_boxes(fpath: Path, lo: np.ndarray, hi: np.ndarray, *, positive: bool = False) -> None:
    """Raise CorruptIndexError naming ``fpath`` unless ``lo <= hi`` are finite bounds (``lo > 0``)."""
    ok = bool(np.isfinite(lo).all() and np.isfinite(hi).all() and (lo <= hi).all())
    if not ok or (positive and not (lo > 0).all()):
        raise CorruptIndexError(
            f"{fpath} holds bounds that are not finite{' and positive' if positive else ''} with lo <= hi"
        )


def load_engine(
    path: Path, *, mmap: bool = True, verify: bool = False, device: Device = "auto"
) -> EngineParts:
    """Load the parts of an engine saved by :func:`save_engine`.

    ``device`` is where this process runs the exact flat screens (``auto``: a GPU when faiss-gpu
    sees one); it replaces the device recorded at build time, which describes another host.

    Raises:
        NotFoundError: no directory at ``path``.
        CorruptIndexError: missing, truncated, mistyped or (with ``verify``) altered files.
    """
    path = Path(path)
    manifest = read_manifest(path)
    _check_files(path, manifest, verify)
    try:
        n, d = int(manifest["items"]), int(manifest["latent_dim"])
        config = EngineConfig.from_dict(manifest["config"])
    except (KeyError, TypeError, ValueError, InvalidArgumentError) as exc:
        raise CorruptIndexError(f"{path / MANIFEST} has bad fields: {exc}") from exc
    config = dataclasses.replace(config, device=device)  # this host's device, not the builder's
    mu = _load_npy(path, "mu.npy", mmap, np.float64, (n, d))
    log_sigma = _load_npy(path, "log_sigma.npy", mmap, np.float64, (n, d))
    ids = _load_npy(path, "ids.npy", mmap, None, (n,)) if manifest.get("has_ids") else None
    if ids is not None and ids.dtype.kind != "U":
        raise CorruptIndexError(f"{path / 'ids.npy'} must hold unicode strings, has {ids.dtype}")
    labels = _load_npy(path, "labels.npy", mmap, np.int64, (n,)) if manifest.get("has_labels") else None
    try:
        bank = PosteriorBank(mu, log_sigma, ids=ids, labels=labels, validate=verify)
    except InvalidArgumentError as exc:
        raise CorruptIndexError(f"{path} holds invalid posteriors: {exc}") from exc
    groups = _load_npy(path, "exact_groups.npy", mmap, np.int16, (n,))
    try:
        meta = manifest["exact"]
        n_groups = len(meta["group_absmax"])
        _check_range(path / "exact_groups.npy", groups, 0, n_groups, "scale groups")
        exact = ExactIndex.from_groups(
            mu,
            log_sigma,
            np.asarray(groups),
            [np.asarray(a, dtype=np.float64) for a in meta["group_absmax"]],
            [bool(v) for v in meta["group_direct"]],
            factory=str(meta["factory"]),
            device=resolve_device(config.device),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptIndexError(f"{path / MANIFEST} has a bad 'exact' section: {exc}") from exc
    if [len(g) for g in exact.groups] != meta["scale_groups"]:
        raise CorruptIndexError(f"{path / 'exact_groups.npy'} does not match the manifest's scale groups")
    approx_meta = manifest.get("approx")
    approx = None if approx_meta is None else _load_approx(path, n, d, approx_meta, groups, n_groups, mmap)
    typicality = None
    if TYPICALITY in manifest.get("files", {}):
        reference = _load_npy(path, TYPICALITY, False, np.float64, None)
        try:
            typicality = TypicalityReference(log_qz=reference)
        except CorruptIndexError as exc:
            raise CorruptIndexError(f"{path / TYPICALITY}: {exc}") from exc
    kernel = None
    if approx is not None and _KERNEL_FILES[0][0] in manifest.get("files", {}):
        kernel = _load_kernel(path, mu, log_sigma, approx, mmap)
    costs = None
    if manifest.get("exact_costs") is not None:  # engines saved before the cost model have none
        try:
            costs = StrategyCosts.from_dict(manifest["exact_costs"])
        except CorruptIndexError as exc:
            raise CorruptIndexError(f"{path / MANIFEST}: {exc}") from exc
    log.info("loaded engine (%d items, d=%d) from %s", n, d, path)
    return EngineParts(
        bank=bank,
        config=config,
        exact=exact,
        approx=approx,
        typicality=typicality,
        costs=costs,
        kernel=kernel,
    )


def _load_kernel(
    path: Path, mu: np.ndarray, log_sigma: np.ndarray, approx: ApproxIndex, mmap: bool
) -> KernelIndex | None:
    """The compiled kernel's index from its saved arrays (memory-mapped unless ``mmap`` is False),
    checked in O(N): the rows are a permutation of the bank's, in partition order. None for arrays
    in the layout engines saved before the item-major rows (the engine rebuilds them)."""
    n, d = mu.shape
    if _load_npy(path, _KERNEL_FILES[1][0], True, np.float64, None).ndim == 1:
        log.info("%s holds the older per-partition block layout: the kernel's arrays are rebuilt", path)
        return None
    shapes = {"rows": ((n,), np.int64), "mu_b": ((n, d), np.float64), "inv_b": ((n, d), np.float64)}
    shapes["log_norm"] = ((n,), np.float64)
    loaded = {field: _load_npy(path, name, mmap, *shapes[field][::-1]) for name, field in _KERNEL_FILES}
    rows = loaded["rows"]
    rpath = path / _KERNEL_FILES[0][0]
    _check_range(rpath, rows, 0, n, "bank rows")
    key = partition_key(approx.list_of_row, approx.nlist)[rows]  # (N,) partition of each position
    if n and (np.bincount(rows, minlength=n).max() != 1 or (np.diff(key) < 0).any()):
        raise CorruptIndexError(f"{rpath} is not the bank's rows in the order of approx_lists.npy")
    return KernelIndex.of_approx(mu, log_sigma, approx, arrays=KernelArrays(**loaded))


def _load_approx(
    path: Path, n: int, d: int, meta: dict[str, Any], group_of_row: np.ndarray, n_groups: int, mmap: bool
) -> ApproxIndex:
    """The approximate index, checked against the bank: ``group_of_row`` is the ``(N,)`` scale group
    of every row (already range-checked), ``n_groups`` the number of scale groups. With ``mmap``
    the IVF's codes stay in the file (``IO_FLAG_MMAP_IFC``: at 10M items 880 MiB not read at load,
    0.02 s instead of seconds; pages come in as lists are scanned)."""
    fpath = path / "approx.faiss"
    try:
        nlist, nprobe, factory = int(meta["nlist"]), int(meta["nprobe"]), str(meta["factory"])
        exact_groups = [int(g) for g in meta["exact_groups"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptIndexError(f"{path / MANIFEST} has a bad 'approx' section: {exc}") from exc
    _check_range(path / MANIFEST, np.array(exact_groups, dtype=np.int64), 0, n_groups, "exact_groups")
    try:
        ivf = faiss.read_index(str(fpath), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
    except RuntimeError as exc:
        raise CorruptIndexError(f"{fpath} is unreadable: {exc}") from exc
    if not isinstance(ivf, faiss.IndexIVFFlat):
        raise CorruptIndexError(f"{fpath} holds {type(ivf).__name__}, not an IVF flat index")
    if ivf.d != 2 * d + 1 or ivf.nlist != nlist:
        raise CorruptIndexError(f"{fpath} does not match the bank (d={ivf.d}, nlist={ivf.nlist})")
    boxes = _load_npy(path, "approx_boxes.npy", False, np.float64, (4, nlist, d))
    lists = _load_npy(path, "approx_lists.npy", False, np.int32, (n,))
    features = _load_npy(path, "approx_features.npy", False, np.float64, (2, 2 * d))
    lifted_box = _load_npy(path, "approx_lifted_boxes.npy", False, np.float64, (2, nlist, 2 * d + 1))
    centred = _load_npy(path, "approx_centred.npy", False, np.float64, (3, nlist, d))
    centred_c = _load_npy(path, "approx_centred_c.npy", False, np.float64, (nlist,))
    # Every row is in one partition, or on the exact path (-1) exactly when its scale group is.
    lpath = path / "approx_lists.npy"
    _check_range(lpath, lists, -1, nlist, "partition ids")
    if not np.array_equal(lists < 0, np.isin(group_of_row, exact_groups)):
        raise CorruptIndexError(
            f"{lpath} does not match exact_groups.npy: rows on the exact path are those of scale "
            f"groups {exact_groups}"
        )
    sizes = np.bincount(lists[lists >= 0], minlength=nlist)  # (L,)
    invlists = ivf.invlists
    if invlists is None:  # faiss reads an index stored without its lists ("il00") as lists = NULL
        raise CorruptIndexError(f"{fpath} holds no inverted lists")
    stored = np.fromiter((invlists.list_size(i) for i in range(nlist)), dtype=np.int64, count=nlist)
    if not np.array_equal(sizes, stored):
        raise CorruptIndexError(
            f"{lpath} does not match {fpath}: partition sizes differ in {int((sizes != stored).sum())} "
            f"of {nlist} partitions ({int(sizes.sum())} vs {int(ivf.ntotal)} rows)"
        )
    _check_boxes(path / "approx_boxes.npy", boxes[0], boxes[1])
    _check_boxes(path / "approx_boxes.npy", boxes[2], boxes[3], positive=True)
    _check_boxes(path / "approx_lifted_boxes.npy", lifted_box[0], lifted_box[1])
    _check_boxes(path / "approx_centred.npy", centred[1], centred[2])
    _check_boxes(path / "approx_features.npy", features[1], features[1], positive=True)
    for name, arr in (
        ("approx_features.npy", features[0]),
        ("approx_centred.npy", centred[0]),
        ("approx_centred_c.npy", centred_c),
    ):
        if not np.isfinite(arr).all():
            raise CorruptIndexError(f"{path / name} holds NaN or inf")
    return ApproxIndex(
        ivf=ivf,
        lo=boxes[0],
        hi=boxes[1],
        slo=boxes[2],
        shi=boxes[3],
        list_of_row=lists,
        exact_groups=exact_groups,
        factory=factory,
        nprobe=nprobe,
        features=features,
        lifted_box=lifted_box,
        centred=centred,
        centred_c=centred_c,
    )
