"""Incremental reindexing: a model job reuses the current version's posteriors for the items whose
content did not change, and encodes only the new or changed ones.

Every version encoded from a model stores one content hash per item, ``content/hashes.npy``
(``(N, 16)`` uint8, BLAKE2b-128 of the item's shape, dtype and raw bytes, :func:`content_hashes`;
listed with its size and sha256 in the version manifest like every other file, so ``verify``
covers it). A model job with ``IndexJobConfig.reuse`` on (the default; ``index --full`` turns it
off):

1. hashes every item of the new dataset (one read of the data; under ``--ray`` the actors hash their
   rows with :func:`item_hashes`, in a model-free payload pass before the encode pass when a version
   may be reused, else in the encode pass itself);
2. opens the current version (:func:`open_previous`) when it was encoded with the same model hash,
   input rule and bf16 setting, from items of the same shape and dtype, and has content hashes;
   otherwise every item is encoded and the log says why (INFO; WARNING when the current version
   fails a check). This runs under the root's writer lock, so no publish, prune or cleanup runs
   meanwhile: the manifest is checked against ``manifest.sha256``, the three files read (hashes,
   ``engine/mu.npy``, ``engine/log_sigma.npy``) against the manifest's size and sha256, and the
   posteriors memory-mapped; the mappings stay readable if the version is deleted once the lock
   is released;
3. matches by content hash (:func:`plan_reuse`): a new row whose hash the current version holds
   reuses the posterior of that hash's first row there (duplicates map to one stored posterior;
   moved or reordered items are reused); every other row is encoded;
4. :func:`encode_with_reuse` writes the ``(N, d)`` float32 ``mu.npy`` / ``logvar.npy`` a full encode
   writes, in the new dataset's row order: reused rows are the stored posteriors cast back to the
   float32 the encoder returned, bit for bit (the engine stores ``float64(mu)`` and
   ``0.5 * float64(logvar)``, both exact; checked), and the unmatched items are copied into
   ``changed/items.npy`` in the staging area and encoded by the job's encode step (the local
   encoder, or Ray, whose actors open that file: the staging area is on storage every node sees).

The rest of the job is the full job's: ids, labels and catalogue payloads from the new data, the
engine build, the atomic publish. The version's metadata records ``reuse``: ``{"previous_version",
"reused", "encoded", "reason"}``. When no item changed, the job still publishes a new version
(0 encoded): its labels, ids, payloads or engine options may have changed, and a batch job's run
always ends with a current version made from its inputs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentsearch.data.readers import Dataset, open_dataset
from latentsearch.engine.storage import file_digest
from latentsearch.errors import CorruptIndexError, InvalidArgumentError, NotFoundError
from latentsearch.indexer.encode import LOGVAR_FILE, MU_FILE, EncodedPosteriors
from latentsearch.indexer.root import CONTENT_DIR, ENGINE_DIR, MANIFEST, MANIFEST_SHA, IndexRoot
from latentsearch.progress import Progress

__all__ = [
    "HASHES_FILE",
    "HASH_ALGORITHM",
    "HASH_BYTES",
    "Previous",
    "Reuse",
    "ReusePlan",
    "content_fingerprint",
    "content_hashes",
    "content_metadata",
    "encode_with_reuse",
    "full_plan",
    "item_hashes",
    "open_previous",
    "plan_reuse",
    "write_hashes",
]

log = logging.getLogger(__name__)

HASH_BYTES = 16
# Recorded in each version's metadata; a version hashed another way is not reused.
HASH_ALGORITHM = "blake2b-128(repr((item_shape, dtype.str)) + item bytes)"
HASHES_FILE = "hashes.npy"  # under CONTENT_DIR
CHANGED_DIR = "changed"  # scratch: the unmatched items (CHANGED_FILE) and their posteriors (ENCODED_DIR)
CHANGED_FILE = "items.npy"
ENCODED_DIR = "encoded"
_HASH_BATCH = 4096  # items read per step of the hash pass
_COPY_ROWS = 65536  # posterior rows gathered / scattered per step


# -- content hashes -------------------------------------------------------------------------------
def content_hashes(dataset: Dataset, *, progress: bool = False) -> np.ndarray:
    """``(N, 16)`` uint8: each item's BLAKE2b-128 over ``repr((item_shape, dtype.str))`` then its raw
    bytes in C order, so the same values of another shape or dtype hash differently
    (:func:`item_hashes` over the dataset's batches)."""
    n = len(dataset)
    out = np.empty((n, HASH_BYTES), dtype=np.uint8)
    bar = Progress(n, desc="hash", unit="item", enabled=progress, logger=log, unit_scale=True)
    try:
        for row, batch in dataset.iter_batches(_HASH_BATCH):
            out[row : row + len(batch)] = item_hashes(batch, dataset.item_shape, dataset.dtype)
            bar.update(len(batch))
    finally:
        bar.close()
    return out


def item_hashes(items: np.ndarray, item_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``(k, 16)`` uint8 content hashes of ``items`` (``(k, *item_shape)`` of the dataset's ``dtype``):
    the one formula of :func:`content_hashes`, also run by the actors of ``index --ray`` on their rows."""
    base = hashlib.blake2b(repr((tuple(item_shape), dtype.str)).encode(), digest_size=HASH_BYTES)
    if not len(items):
        return np.empty((0, HASH_BYTES), dtype=np.uint8)
    raw = np.ascontiguousarray(items).reshape(-1).view(np.uint8).data  # (k * item bytes,)
    step = raw.nbytes // len(items)  # bytes per item
    digests = b"".join(_digest(base, raw[i * step : (i + 1) * step]) for i in range(len(items)))
    return np.frombuffer(digests, dtype=np.uint8).reshape(-1, HASH_BYTES).copy()


def _digest(base: Any, data: memoryview) -> bytes:
    h = base.copy()
    h.update(data)
    return bytes(h.digest())


def content_fingerprint(hashes: np.ndarray, labels: np.ndarray | None, dataset: Dataset) -> str:
    """``content-sha256:HEX``: sha256 over the data's shape and dtype, the items' content ``hashes``
    (``(N, 16)`` uint8) and the labels: the dataset fingerprint of a job that never reads the items
    itself (``index --ray``; the local job's :meth:`Dataset.fingerprint` hashes the items' bytes in
    one sequential pass)."""
    h = hashlib.sha256()
    h.update(repr((dataset.shape, dataset.dtype.str, HASH_ALGORITHM)).encode())
    h.update(np.ascontiguousarray(hashes, dtype=np.uint8).tobytes())
    if labels is not None:
        h.update(b"labels")
        h.update(np.asarray(labels).astype("<i8").tobytes())
    return f"content-sha256:{h.hexdigest()}"


def content_metadata(dataset: Dataset) -> dict[str, Any]:
    """The version metadata that says how its content hashes were made (``content_hashes``)."""
    return {
        "algorithm": HASH_ALGORITHM,
        "file": f"{CONTENT_DIR}/{HASHES_FILE}",
        "item_shape": list(dataset.item_shape),
        "dtype": dataset.dtype.str,
    }


def write_hashes(directory: Path, hashes: np.ndarray) -> Path:
    """Write ``hashes`` (``(N, 16)`` uint8) to ``directory/hashes.npy``, fsynced; its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / HASHES_FILE
    with open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(hashes, dtype=np.uint8), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    return path


# -- the previous version -------------------------------------------------------------------------
@dataclass(frozen=True)
class Previous:
    """The current version's posteriors, open for reuse (:func:`open_previous`).

    Attributes:
        hashes: ``(P, 16)`` uint8 content hashes, in memory.
        mu, log_sigma: ``(P, d)`` float64, memory-mapped read-only (valid after the version is deleted).
    """

    version: str
    hashes: np.ndarray
    mu: np.ndarray
    log_sigma: np.ndarray


def open_previous(
    root: IndexRoot,
    *,
    model_hash: str,
    input_rule: str,
    bf16: bool,
    item_shape: tuple[int, ...],
    dtype: np.dtype,
) -> tuple[Previous | None, str | None]:
    """The current version of ``root`` open for reuse by a job encoding items of ``item_shape`` /
    ``dtype`` with the model ``model_hash`` under ``input_rule`` (``bf16``: the job's effective bf16
    autocast), or ``(None, why not)`` (see the module docstring). Holds the root's writer lock."""
    with root.writer_lock():
        try:
            version = root.current()
        except CorruptIndexError as exc:  # the publish rewrites CURRENT
            log.warning("no version can be reused: %s", exc)
            return None, f"no version can be reused ({exc})"
        if version is None:
            return None, "no version is current yet"
        try:
            manifest = root.manifest(version)
        except (CorruptIndexError, NotFoundError) as exc:
            return None, _damaged(version, str(exc))
        why = _mismatch(version, manifest, model_hash, input_rule, bf16, item_shape, dtype)
        if why is not None:
            return None, why
        vdir = root.version_dir(version)
        names = (f"{CONTENT_DIR}/{HASHES_FILE}", f"{ENGINE_DIR}/mu.npy", f"{ENGINE_DIR}/log_sigma.npy")
        problems = _check_files(vdir, manifest, names)
        if problems:
            return None, _damaged(version, "; ".join(problems))
        try:
            hashes = np.load(vdir / names[0], allow_pickle=False)
            mu = np.load(vdir / names[1], mmap_mode="r", allow_pickle=False)
            log_sigma = np.load(vdir / names[2], mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            return None, _damaged(version, f"unreadable ({exc})")
    items = manifest.get("items")
    if not (
        hashes.shape == (items, HASH_BYTES)
        and hashes.dtype == np.uint8
        and mu.shape == log_sigma.shape == (items, manifest.get("latent_dim"))
        and mu.dtype == log_sigma.dtype == np.float64
    ):
        shapes = f"hashes {hashes.shape} {hashes.dtype}, posteriors {mu.shape} {mu.dtype}"
        return None, _damaged(version, f"{shapes} for {items} items")
    return Previous(version, hashes, mu, log_sigma), None


def _damaged(version: str, detail: str) -> str:
    log.warning("the current version %s cannot be reused: %s", version, detail)
    return f"the current version {version} fails a check ({detail})"


def _mismatch(
    version: str,
    manifest: dict[str, Any],
    model_hash: str,
    input_rule: str,
    bf16: bool,
    item_shape: tuple[int, ...],
    dtype: np.dtype,
) -> str | None:
    """Why ``version``'s posteriors are not what this job would encode (``None``: they are)."""
    meta = manifest.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    old_hash = manifest.get("model_hash")
    it = f"the current version {version}"
    if meta.get("source") != "model" or not isinstance(old_hash, str):
        return f"{it} was published from posteriors, not encoded from a model"
    if old_hash != model_hash:
        return f"{it} was encoded with model {old_hash[:12]}, this job's model is {model_hash[:12]}"
    if meta.get("input_rule") != input_rule:
        return f"{it} fed the model {meta.get('input_rule')!r} input, this job {input_rule!r}"
    if bool(meta.get("bf16")) != bf16:
        was, now = ("with" if meta.get("bf16") else "without"), ("with" if bf16 else "without")
        return f"{it} was encoded {was} bf16 autocast, this job runs {now}"
    content = meta.get("content_hashes")
    if not isinstance(content, dict):
        return f"{it} has no content hashes (published before incremental reindexing)"
    if content.get("algorithm") != HASH_ALGORITHM:
        return f"{it} hashed its items with {content.get('algorithm')!r}"
    old_shape, old_dtype = tuple(content.get("item_shape") or ()), content.get("dtype")
    if old_shape != tuple(item_shape) or old_dtype != dtype.str:
        return f"{it} holds items of shape {old_shape} {old_dtype}, this data {tuple(item_shape)} {dtype.str}"
    return None


def _check_files(vdir: Path, manifest: dict[str, Any], names: tuple[str, ...]) -> list[str]:
    """Problems of the version's manifest (against ``manifest.sha256``) and of the files ``names``
    (against the manifest's size and sha256); one line each."""
    try:
        expected = (vdir / MANIFEST_SHA).read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError) as exc:
        return [f"{vdir / MANIFEST_SHA}: unreadable ({exc})"]
    if file_digest(vdir / MANIFEST) != expected:
        return [f"{vdir / MANIFEST}: fails its sha256 checksum"]
    files = manifest.get("files")
    files = files if isinstance(files, dict) else {}
    problems = []
    for name in names:
        meta, path = files.get(name), vdir / name
        if not isinstance(meta, dict):
            problems.append(f"{path}: not listed in the manifest")
        elif not path.is_file() or path.stat().st_size != meta.get("bytes"):
            problems.append(f"{path}: missing or of another size than the manifest says")
        elif file_digest(path) != meta.get("sha256"):
            problems.append(f"{path}: fails its sha256 checksum")
    return problems


# -- the plan -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reuse:
    """What a model job reused (the version's ``reuse`` metadata and the line the CLI prints)."""

    # the version whose posteriors were reused (None: none was)
    previous_version: str | None
    reused: int
    encoded: int
    # why nothing was reused (None when previous_version is set)
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "previous_version": self.previous_version,
            "reused": self.reused,
            "encoded": self.encoded,
            "reason": self.reason,
        }

    def summary(self) -> str:
        """``reuse: 27,000 posteriors reused from version V, 3,000 items encoded``, or ``reuse: none,
        all 30,000 items encoded: WHY``."""
        if self.previous_version is None:
            return f"reuse: none, all {self.encoded:,} items encoded: {self.reason}"
        return (
            f"reuse: {self.reused:,} posteriors reused from version {self.previous_version}, "
            f"{self.encoded:,} items encoded"
        )


@dataclass(frozen=True)
class ReusePlan:
    """Which rows of the new dataset reuse a stored posterior.

    Attributes:
        source: ``(N,)`` int64, the previous version's row whose posterior new row i reuses; -1:
            encode row i.
        previous: the version reused from (``None``: every row is encoded, ``reason`` says why).
    """

    source: np.ndarray
    previous: Previous | None
    reason: str | None = None

    @property
    def encode_rows(self) -> np.ndarray:
        """``(M,)`` int64 ascending rows of the new dataset to encode."""
        return np.flatnonzero(self.source < 0)

    @property
    def reused(self) -> int:
        return int(np.count_nonzero(self.source >= 0))

    def report(self) -> Reuse:
        n = int(self.source.shape[0])
        if self.previous is None:
            return Reuse(None, 0, n, self.reason)
        return Reuse(self.previous.version, self.reused, n - self.reused)


def full_plan(n: int, reason: str) -> ReusePlan:
    """Encode all ``n`` rows (``reason``: why nothing is reused)."""
    return ReusePlan(np.full(n, -1, dtype=np.int64), None, reason)


def plan_reuse(hashes: np.ndarray, previous: Previous | None, reason: str | None = None) -> ReusePlan:
    """Match the new items' ``hashes`` (``(N, 16)`` uint8) against ``previous``'s (``None``: encode
    every row, ``reason`` says why). A hash stored on several rows maps to the first of them."""
    n = int(hashes.shape[0])
    if previous is None:
        return full_plan(n, reason or "nothing to reuse")
    key = np.dtype((np.void, HASH_BYTES))  # a hash as one sortable 16-byte value
    old = np.ascontiguousarray(previous.hashes).view(key).reshape(-1)
    new = np.ascontiguousarray(hashes).view(key).reshape(-1)
    table, first = np.unique(old, return_index=True)  # (U,) sorted distinct hashes, their first rows
    source = np.full(n, -1, dtype=np.int64)
    if len(table):
        at = np.minimum(np.searchsorted(table, new), len(table) - 1)
        hit = table[at] == new
        source[hit] = first[at[hit]]
    if not (source >= 0).any():
        return full_plan(n, f"no item of the current version {previous.version} is unchanged")
    return ReusePlan(source, previous)


# -- encoding what changed ------------------------------------------------------------------------
def encode_with_reuse(
    plan: ReusePlan,
    dataset: Dataset,
    directory: Path,
    latent_dim: int,
    encode: Callable[[Dataset, Path], EncodedPosteriors],
    *,
    batch_size: int = 1024,
) -> EncodedPosteriors:
    """The dataset's ``(N, d)`` float32 posteriors in ``directory/mu.npy`` and ``logvar.npy``: the
    reused rows from ``plan.previous``, the others encoded by ``encode(items, scratch_dir)`` over
    the unmatched items (copied into ``directory/changed/items.npy``, ``(M, *item_shape)``). The
    result's ``seconds`` are the encode step's.

    Raises:
        CorruptIndexError: a stored posterior is not the float64 of a float32 (not written by this
            project's model jobs; reindex with ``--full``).
        InvalidArgumentError: the encode step returned another shape than ``(M, d)``.
    """
    previous = plan.previous
    assert previous is not None
    n, d = len(dataset), latent_dim
    directory.mkdir(parents=True, exist_ok=True)
    mu = np.lib.format.open_memmap(directory / MU_FILE, mode="w+", dtype=np.float32, shape=(n, d))
    logvar = np.lib.format.open_memmap(directory / LOGVAR_FILE, mode="w+", dtype=np.float32, shape=(n, d))
    reused = np.flatnonzero(plan.source >= 0)
    for lo in range(0, len(reused), _COPY_ROWS):
        rows = reused[lo : lo + _COPY_ROWS]
        src = plan.source[rows]
        m64, ls64 = np.asarray(previous.mu[src]), np.asarray(previous.log_sigma[src])
        m32, lv32 = m64.astype(np.float32), (2.0 * ls64).astype(np.float32)
        if not (np.array_equal(m32, m64) and np.array_equal(0.5 * lv32.astype(np.float64), ls64)):
            raise CorruptIndexError(
                f"version {previous.version}: its posteriors are not float32 values, so they were not "
                "encoded by a model job; reindex with --full"
            )
        mu[rows], logvar[rows] = m32, lv32
    seconds = 0.0
    todo = plan.encode_rows
    if len(todo):
        scratch = directory / CHANGED_DIR
        items = _write_items(dataset, todo, scratch / CHANGED_FILE, batch_size)
        encoded = encode(items, scratch / ENCODED_DIR)
        if encoded.mu.shape != (len(todo), d) or encoded.logvar.shape != (len(todo), d):
            raise InvalidArgumentError(
                f"the encode step returned mu {encoded.mu.shape} / logvar {encoded.logvar.shape} for "
                f"{len(todo)} items; expected ({len(todo)}, {d})",
                field="model",
            )
        for lo in range(0, len(todo), _COPY_ROWS):
            rows = todo[lo : lo + _COPY_ROWS]
            mu[rows] = encoded.mu[lo : lo + len(rows)]
            logvar[rows] = encoded.logvar[lo : lo + len(rows)]
        seconds = encoded.seconds
        del encoded, items
        shutil.rmtree(scratch, ignore_errors=True)
    mu.flush()
    logvar.flush()
    del mu, logvar
    return EncodedPosteriors(
        directory=directory,
        mu=np.load(directory / MU_FILE, mmap_mode="r"),
        logvar=np.load(directory / LOGVAR_FILE, mmap_mode="r"),
        seconds=seconds,
    )


def _write_items(dataset: Dataset, rows: np.ndarray, path: Path, batch_size: int) -> Dataset:
    """Copy ``dataset``'s ``rows`` (ascending) into the ``.npy`` file ``path``; that file opened as a
    dataset (what a Ray actor opens too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (len(rows), *dataset.item_shape)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dataset.dtype, shape=shape)
    # runs of consecutive rows: [starts[k], ends[k]) of the dataset -> out[at[k]:...]
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = rows[np.r_[0, breaks]]
    ends = rows[np.r_[breaks - 1, len(rows) - 1]] + 1
    at = 0
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        for lo in range(start, end, batch_size):
            hi = min(lo + batch_size, end)
            out[at : at + hi - lo] = dataset.read(lo, hi)
            at += hi - lo
    out.flush()
    del out
    return open_dataset(path)
