"""A versioned index root: immutable versions, an atomically swapped ``CURRENT`` pointer.

Layout::

    INDEX_ROOT/
      CURRENT                      the current version id + newline (replaced atomically)
      .lock                        flock held by writers (publish, rollback, prune, cleanup)
      versions/<version>/          one immutable directory per published version
        engine/                    SearchEngine.save() output (its own manifest and checksums)
        catalogue/                 item payloads and latent diagnostics (indexer.catalogue; absent
                                   in versions published before it existed)
        content/hashes.npy         (N, 16) uint8 content hash of every item (versions encoded from
                                   a model; indexer.incremental reuses posteriors by it)
        manifest.json              version manifest: counts, model hash, dataset fingerprint,
                                   engine/FAISS parameters, size + sha256 of every file, and
                                   ``model``: {"entry", "model_hash"} (the stored model; absent
                                   for versions published from posteriors or before the store)
        manifest.sha256            sha256 of manifest.json
      models/<entry>/              the model store: one immutable entry per model a version was
                                   published from (model.json + files, see indexer.models),
                                   named by the sha256 of its model.json and shared by versions
      .tmp-<random>/               a job's staging directory (same filesystem), renamed into
                                   versions/ when complete; ``.owner.lock`` is flocked by its job;
                                   its model/ (a staged store entry) is renamed into models/
      .trash-<version>-<random>/   a version (or model-<entry>) being deleted by retention
      .pending-<version>           exists while a publish moves <version> into versions/ and
                                   swaps CURRENT (under the lock)

Version ids are ``YYYYmmddTHHMMSS.ffffffZ-<6 hex>`` (UTC), assigned at publish time under the
lock, so sorting by name is publish order.

Crash safety: a version is complete before it is renamed into ``versions/`` (every file and the
directories fsynced), its model's store entry is complete and renamed into ``models/`` before
that (an entry with the same name that verifies is reused instead), both under the lock, and
``CURRENT`` is only replaced after those renames (write temp, fsync,
``os.replace``, fsync the root). A job killed at any moment leaves the previous ``CURRENT`` and its
version intact; its staging directory is removed by the next writer (its ``.owner.lock`` is no
longer held: flock locks die with their process). Readers take no lock. flock needs a local
filesystem (or one with working flock, e.g. NFSv4).

A publish that fails (a full disk, say) leaves no version behind: a version moved into
``versions/`` whose ``CURRENT`` swap then failed is removed again, and a full disk (ENOSPC,
EDQUOT) is reported as :class:`ResourceExhaustedError` "no space left on ROOT (needed about X MiB,
Y MiB free)". A job killed between the two steps leaves ``.pending-<version>``: the next writer
(every ``latentsearch index`` run cleans first) removes that never-current version.

Retention (``prune``, ``keep``) and cleanup delete every model entry no remaining version
references, and keep every one a kept version does (all of them while any version's manifest is
unreadable); rollback deletes nothing. ``check``/``verify`` verify the referenced entry's files too.
A crash between storing a model and publishing its version leaves an unreferenced entry: the next
writer's cleanup deletes it.

Versions and model entries are immutable: once published, their files are mode 0444 and their
directories 0555, so
a stray write fails with "permission denied" instead of changing (or, by truncation, crashing) a
server that memory-maps them. Retention and cleanup make a directory writable again just before
deleting it. (root ignores permission bits: the modes protect against other users and mistakes,
not against root.)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from latentsearch.engine.engine import SearchEngine
from latentsearch.engine.storage import (
    check_listed_files,
    file_digest,
    fsync_dir,
    read_json_manifest,
    read_manifest,
    saved_bytes,
)
from latentsearch.errors import (
    CorruptIndexError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from latentsearch.indexer.catalogue import CATALOGUE_DIR
from latentsearch.indexer.models import ModelRef, check_entry, load_entry
from latentsearch.model.loader import LoadedModel

__all__ = [
    "CONTENT_DIR",
    "ENGINE_DIR",
    "MANIFEST",
    "MANIFEST_SHA",
    "VERSION_FORMAT",
    "IndexRoot",
    "Staging",
    "VersionInfo",
    "engine_bytes",
    "remove_tree",
]

log = logging.getLogger(__name__)

VERSION_FORMAT = "latentsearch.index-version"
VERSION_FORMAT_VERSION = 1
CURRENT_FILE = "CURRENT"
LOCK_FILE = ".lock"
VERSIONS_DIR = "versions"
MODELS_DIR = "models"
ENGINE_DIR = "engine"
MODEL_STAGE = "model"  # a staging directory's store entry, renamed into models/ by publish
# Directories of a staging area that become part of the version (everything else is scratch).
CONTENT_DIR = "content"  # per-item content hashes (indexer.incremental)
VERSION_PARTS = (ENGINE_DIR, CATALOGUE_DIR, CONTENT_DIR)
MANIFEST = "manifest.json"
MANIFEST_SHA = "manifest.sha256"
OWNER_LOCK = ".owner.lock"
PENDING_PREFIX = ".pending-"
FILE_MODE, DIR_MODE = 0o444, 0o555  # of a published version's files and directories
_VERSION_RE = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}$")


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _new_version_id(after: str | None) -> str:
    now = dt.datetime.now(dt.timezone.utc)
    if after is not None:
        last = dt.datetime.strptime(after[:22], "%Y%m%dT%H%M%S.%f").replace(tzinfo=dt.timezone.utc)
        now = max(now, last + dt.timedelta(microseconds=1))
    return f"{now:%Y%m%dT%H%M%S.%f}Z-{secrets.token_hex(3)}"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _make_read_only(path: Path) -> None:
    """Files under ``path`` to :data:`FILE_MODE`, directories below it to :data:`DIR_MODE`
    (``path`` itself stays writable: a directory renamed to another parent must be)."""
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), FILE_MODE)
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), DIR_MODE)


def remove_tree(path: Path) -> None:
    """Delete directory ``path`` like ``shutil.rmtree``, read-only (published) directories too:
    each directory is made writable before its entries go. Missing: nothing to do."""
    if not path.is_dir() or path.is_symlink():
        return
    for dirpath, _dirnames, _filenames in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o755)
    shutil.rmtree(path, ignore_errors=True)


def engine_bytes(engine: SearchEngine) -> int:
    """About how many bytes a version of ``engine`` takes on disk (see :func:`storage.saved_bytes`)."""
    bank = engine.bank
    return saved_bytes(
        len(bank),
        bank.dim,
        id_bytes=0 if bank.ids is None else int(bank.ids.nbytes),
        labels=bank.labels is not None,
        nlist=None if engine.approx is None else engine.approx.nlist,
    )


@dataclass(frozen=True)
class VersionInfo:
    """One row of :meth:`IndexRoot.list`."""

    version: str
    current: bool
    created: str | None
    items: int | None
    latent_dim: int | None
    bytes: int
    model_hash: str | None
    # posteriors reused from the previous version / encoded by the job (None: not a model job, or
    # published before incremental reindexing; see indexer.incremental)
    reused: int | None = None
    encoded: int | None = None


class Staging:
    """A job's private staging directory under the root (see :meth:`IndexRoot.staging`).

    Write the engine to :attr:`engine_dir` (``engine.save(staging.engine_dir)``) and the optional
    catalogue to :attr:`catalogue_dir`; put scratch files anywhere else under :attr:`path` (they
    are removed before publishing).
    """

    def __init__(self, path: Path, lock: IO[bytes]) -> None:
        self.path = path
        self._lock = lock
        self.published: str | None = None

    @property
    def engine_dir(self) -> Path:
        return self.path / ENGINE_DIR

    @property
    def model_dir(self) -> Path:
        """Where a job stages its model's store entry (:func:`indexer.models.stage_entry`)."""
        return self.path / MODEL_STAGE

    @property
    def catalogue_dir(self) -> Path:
        return self.path / CATALOGUE_DIR

    @property
    def content_dir(self) -> Path:
        """Where a model job writes its items' content hashes (:mod:`indexer.incremental`)."""
        return self.path / CONTENT_DIR

    def close(self) -> None:
        if self.published is None:
            remove_tree(self.path)
        if not self._lock.closed:
            self._lock.close()


class IndexRoot:
    """A directory of immutable index versions and a pointer to the current one.

    The server calls :meth:`load_current` at start and polls :meth:`current` (one small file read)
    to hot-reload when it changes.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = Path(path)
        if create:
            (self.path / VERSIONS_DIR).mkdir(parents=True, exist_ok=True)
        elif not self.path.is_dir():
            raise NotFoundError(f"{self.path}: no such index root", field="out")

    def __repr__(self) -> str:
        return f"IndexRoot({str(self.path)!r})"

    # -- reading ------------------------------------------------------------------------------
    @property
    def versions_dir(self) -> Path:
        return self.path / VERSIONS_DIR

    def current(self) -> str | None:
        """The current version id, or ``None`` when nothing has been published."""
        try:
            text = (self.path / CURRENT_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise CorruptIndexError(f"{self.path / CURRENT_FILE} is unreadable: {exc}") from exc
        if not _VERSION_RE.match(text):
            raise CorruptIndexError(f"{self.path / CURRENT_FILE} holds {text[:80]!r}, not a version id")
        return text

    def versions(self) -> list[str]:
        """Published version ids, oldest first."""
        try:
            names = [p.name for p in self.versions_dir.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)]
        except FileNotFoundError:
            return []
        return sorted(names)

    @property
    def models_dir(self) -> Path:
        return self.path / MODELS_DIR

    def model_ref(self, version: str) -> ModelRef | None:
        """The stored model ``version`` references (``None``: published without one)."""
        return ModelRef.from_manifest(self.manifest(version))

    def load_model(self, version: str, *, device: str = "cpu") -> LoadedModel | None:
        """The stored model of ``version`` (``None``: it has none), loaded under its stored input rule.

        Loading a TorchScript or factory entry runs its code: serve trusted roots only.

        Raises:
            CorruptIndexError: the entry is missing or damaged (naming the file).
            FailedPreconditionError: a factory now builds another model than the indexed one.
        """
        ref = self.model_ref(version)
        if ref is None:
            return None
        return load_entry(self.models_dir / ref.entry, expected_hash=ref.model_hash, device=device)

    def older(self, version: str | None) -> list[str]:
        """Published versions older than ``version`` (all of them for ``None``), oldest first."""
        return [v for v in self.versions() if version is None or v < version]

    def version_dir(self, version: str) -> Path:
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            raise InvalidArgumentError(f"{version!r} is not a version id", field="version")
        path = self.versions_dir / version
        if not path.is_dir():
            raise NotFoundError(f"{self.path}: no version {version}", field="version")
        return path

    def manifest(self, version: str) -> dict[str, Any]:
        """The version's manifest.json (raises CorruptIndexError when unreadable)."""
        return read_json_manifest(
            self.version_dir(version) / MANIFEST, VERSION_FORMAT, VERSION_FORMAT_VERSION
        )

    def version_infos(self) -> list[VersionInfo]:
        """Every version, oldest first, with its manifest summary (``None`` fields when unreadable)."""
        cur = self.current()
        rows = []
        for v in self.versions():
            try:
                m = self.manifest(v)
            except (CorruptIndexError, NotFoundError):
                m = {}
            meta = m.get("metadata")
            reuse = meta.get("reuse") if isinstance(meta, dict) else None
            reuse = reuse if isinstance(reuse, dict) else {}
            rows.append(
                VersionInfo(
                    version=v,
                    current=v == cur,
                    created=m.get("created"),
                    items=m.get("items"),
                    latent_dim=m.get("latent_dim"),
                    bytes=_dir_bytes(self.versions_dir / v),
                    model_hash=m.get("model_hash"),
                    reused=reuse.get("reused"),
                    encoded=reuse.get("encoded"),
                )
            )
        return rows

    def check(self, version: str) -> list[str]:
        """Every integrity problem of ``version`` (empty when it verifies): one line per bad file."""
        vdir = self.version_dir(version)
        problems: list[str] = []
        mpath = vdir / MANIFEST
        try:
            expected = (vdir / MANIFEST_SHA).read_text(encoding="utf-8").split()[0]
            if file_digest(mpath) != expected:
                problems.append(f"{mpath}: fails its sha256 checksum ({MANIFEST_SHA})")
                return problems
        except (OSError, IndexError) as exc:
            problems.append(f"{vdir / MANIFEST_SHA}: unreadable or missing ({exc})")
            return problems
        try:
            manifest = self.manifest(version)
        except CorruptIndexError as exc:
            return [str(exc)]
        files: dict[str, dict[str, Any]] = manifest.get("files", {})
        problems += check_listed_files(vdir, files, own=(MANIFEST, MANIFEST_SHA), listed_in="the manifest")
        try:
            ref = ModelRef.from_manifest(manifest)
        except CorruptIndexError as exc:
            return [*problems, str(exc)]
        if ref is not None:
            problems += check_entry(self.models_dir / ref.entry)
        return problems

    def verify(self, version: str | None = None) -> str:
        """Check every checksum of ``version`` (default: the current one); returns the version.

        Raises:
            CorruptIndexError: naming each bad file.
            UnavailableError: no version given and nothing published.
        """
        version = version or self._require_current()
        problems = self.check(version)
        if problems:
            raise CorruptIndexError(f"version {version} fails verification: " + "; ".join(problems))
        return version

    def load(self, version: str, *, verify: bool = False, mmap: bool = True) -> SearchEngine:
        """Load ``version``'s engine (memory-mapped unless ``mmap=False``).

        ``verify`` re-hashes every file of the version first.
        """
        vdir = self.version_dir(version)
        if verify:
            self.verify(version)
        return SearchEngine.load(vdir / ENGINE_DIR, mmap=mmap, verify=False)

    def load_current(self, *, verify: bool = False, mmap: bool = True) -> tuple[str, SearchEngine]:
        """``(version, engine)`` of the current version.

        Safe against a concurrent publish: when the version read from ``CURRENT`` disappears
        (retention) while loading, the new current one is loaded instead.

        Raises:
            UnavailableError: nothing published yet.
            CorruptIndexError: the current version's files are damaged.
        """
        for _ in range(5):
            version = self._require_current()
            try:
                return version, self.load(version, verify=verify, mmap=mmap)
            except (NotFoundError, CorruptIndexError):
                if self.current() == version:
                    raise
                log.info("current version changed while loading %s; retrying", version)
        version = self._require_current()
        return version, self.load(version, verify=verify, mmap=mmap)

    def _require_current(self) -> str:
        version = self.current()
        if version is None:
            raise UnavailableError(f"{self.path}: no index version published yet")
        return version

    # -- writing ------------------------------------------------------------------------------
    def free_bytes(self) -> int | None:
        """Bytes free for this process on the root's filesystem (``None``: unknown)."""
        try:
            return shutil.disk_usage(self.path if self.path.exists() else self.path.parent).free
        except OSError:
            return None

    def _no_space(self, needed: int, what: str = "no space left") -> ResourceExhaustedError:
        free = self.free_bytes()
        have = "" if free is None else f", {free / 2**20:.1f} MiB free"
        return ResourceExhaustedError(
            f"{what} on {self.path} (needed about {needed / 2**20:.1f} MiB{have})", field="out"
        )

    def require_space(self, needed: int) -> None:
        """Raise ResourceExhaustedError when under ``needed`` bytes are free on the root's filesystem."""
        free = self.free_bytes()
        if free is not None and free < needed:
            raise self._no_space(needed)

    @contextlib.contextmanager
    def disk_errors(self, needed: int) -> Iterator[None]:
        """Turn a full disk or quota (``ENOSPC``, ``EDQUOT``) met inside the block into
        ResourceExhaustedError "no space left on ROOT (needed about X MiB, ...)"; ``needed``: the
        bytes the whole write needs (e.g. :func:`engine_bytes`)."""
        try:
            yield
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise self._no_space(needed) from exc
            if exc.errno == errno.EDQUOT:
                raise self._no_space(needed, "disk quota exceeded") from exc
            raise

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Hold the root's writer lock: no publish, rollback, prune or cleanup runs meanwhile, so the
        current version stays current and on disk (e.g. while a job opens its posteriors for reuse).
        Not re-entrant: call no writing method of this root inside the block."""
        with self._locked():
            yield

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK_FILE, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Staging]:
        """A private staging directory ``.tmp-<random>`` on the root's filesystem.

        Removed on exit unless it was published. Stale staging directories of dead jobs are
        removed first.
        """
        self.clean_stale()
        with self._locked():
            path = self.path / f".tmp-{secrets.token_hex(6)}"
            path.mkdir()
            lock = open(path / OWNER_LOCK, "wb")  # noqa: SIM115 - held for the staging's lifetime
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        staging = Staging(path, lock)
        try:
            yield staging
        finally:
            staging.close()

    def clean_stale(self) -> list[Path]:
        """Remove staging/trash directories and temp files left by dead jobs; returns what was removed."""
        removed: list[Path] = []
        if not self.path.is_dir():
            return removed
        with self._locked():
            for p in sorted(self.path.iterdir()):
                if p.name.startswith(".tmp-") and p.is_dir():
                    if self._owner_alive(p):
                        continue
                elif p.name.startswith(".trash-") and p.is_dir():
                    pass
                elif p.name.startswith(PENDING_PREFIX) and p.is_file():
                    removed += self._finish_pending(p)
                    continue
                elif p.name.startswith(f"{CURRENT_FILE}.tmp-") and p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
                    continue
                else:
                    continue
                remove_tree(p)
                removed.append(p)
            removed += [self.models_dir / e for e in self._prune_models_locked()]
        if removed:
            log.info("removed %d stale temporary entries from %s", len(removed), self.path)
        return removed

    def _finish_pending(self, marker: Path) -> list[Path]:
        """A dead publish's marker (caller holds the lock): remove its version unless ``CURRENT``
        names it, then the marker; returns what was removed. Kept as is while CURRENT is unreadable."""
        version = marker.name[len(PENDING_PREFIX) :]
        try:
            current = self.current()
        except CorruptIndexError:
            return []
        removed = []
        vdir = self.versions_dir / version
        if current != version and _VERSION_RE.match(version) and vdir.is_dir():
            remove_tree(vdir)
            removed.append(vdir)
            log.warning(
                "removed version %s of %s: its publish died before CURRENT named it", version, self.path
            )
        marker.unlink(missing_ok=True)
        return [*removed, marker]

    def _current_or_none(self) -> str | None:
        try:
            return self.current()
        except CorruptIndexError:
            return None

    @staticmethod
    def _owner_alive(path: Path) -> bool:
        try:
            fh = open(path / OWNER_LOCK, "rb")  # noqa: SIM115
        except FileNotFoundError:
            return False
        with fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            return False

    def _swap_current(self, version: str) -> None:
        """Point ``CURRENT`` at ``version`` atomically (caller holds the lock)."""
        tmp = self.path / f"{CURRENT_FILE}.tmp-{secrets.token_hex(6)}"
        try:
            _write_durable(tmp, (version + "\n").encode())
            os.replace(tmp, self.path / CURRENT_FILE)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:
            fsync_dir(self.path)
        except OSError as exc:  # CURRENT names version already: only its durability is in doubt
            log.warning("%s now names %s, but syncing %s failed: %s", CURRENT_FILE, version, self.path, exc)

    def publish_staged(
        self,
        staging: Staging,
        metadata: dict[str, Any] | None = None,
        *,
        keep: int | None = 3,
        model: ModelRef | None = None,
    ) -> str:
        """Publish the engine saved in ``staging.engine_dir`` (and the other :data:`VERSION_PARTS`
        present, e.g. ``staging.catalogue_dir``) as a new version and make it current.

        Scratch files under ``staging.path`` are removed, every file is hashed into the version
        manifest, the directory is fsynced and renamed into ``versions/``, then ``CURRENT`` is
        swapped. ``metadata`` (JSON) is stored in the manifest; its ``model_hash`` and
        ``dataset_fingerprint`` keys are also promoted to the top level. ``model``: the store entry
        staged in ``staging.model_dir`` (:func:`indexer.models.stage_entry`), moved into
        ``models/`` (or an intact one of that name reused) before the version, under the lock,
        and referenced by the manifest. ``keep``: retention
        (``None``: keep everything; a failed deletion is logged, not raised). The published files
        and directories are made read-only.

        Returns:
            The new version id.

        Raises:
            ResourceExhaustedError: the disk (or quota) filled up; nothing was published and the
                staged version is removed.
        """
        if keep is not None and keep < 1:
            raise InvalidArgumentError(f"keep must be >= 1, got {keep}", field="keep")
        metadata = dict(metadata or {})
        engine_manifest = read_manifest(staging.engine_dir)
        kept = (*VERSION_PARTS, OWNER_LOCK, *((MODEL_STAGE,) if model is not None else ()))
        for p in list(staging.path.iterdir()):
            if p.name not in kept:
                if p.is_dir():
                    remove_tree(p)
                else:
                    p.unlink()
        files: dict[str, dict[str, Any]] = {}
        needed = 0  # bytes of the version, for a full disk's message
        parts = [staging.path / name for name in VERSION_PARTS if (staging.path / name).is_dir()]
        for p in sorted(q for part in parts for q in part.rglob("*")):
            if p.is_file():
                size = p.stat().st_size
                files[p.relative_to(staging.path).as_posix()] = {"bytes": size, "sha256": file_digest(p)}
                needed += size
        for part in parts:
            fsync_dir(part)
        with self.disk_errors(needed), self._locked():
            version = _new_version_id(self.versions()[-1] if self.versions() else None)
            now = time.time()
            approx = engine_manifest.get("approx")
            manifest = {
                "format": VERSION_FORMAT,
                "format_version": VERSION_FORMAT_VERSION,
                "version": version,
                "created": dt.datetime.fromtimestamp(now, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "created_unix": now,
                "items": engine_manifest["items"],
                "latent_dim": engine_manifest["latent_dim"],
                "has_ids": engine_manifest.get("has_ids"),
                "has_labels": engine_manifest.get("has_labels"),
                "model_hash": metadata.get("model_hash") if model is None else model.model_hash,
                "model": None if model is None else model.to_dict(),
                "dataset_fingerprint": metadata.get("dataset_fingerprint"),
                "engine": {
                    "config": engine_manifest.get("config"),
                    "exact": engine_manifest.get("exact"),
                    "approx": approx,
                },
                "faiss": {
                    "version": engine_manifest.get("versions", {}).get("faiss"),
                    "metric": "inner_product",
                    "exact_factory": engine_manifest.get("exact", {}).get("factory"),
                    "approx_factory": None if approx is None else approx.get("factory"),
                    "nlist": None if approx is None else approx.get("nlist"),
                    "nprobe": None if approx is None else approx.get("nprobe"),
                },
                "metadata": metadata,
                "files": files,
            }
            if model is not None:
                self._commit_model(staging.model_dir, model)
            data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
            (staging.path / OWNER_LOCK).unlink(missing_ok=True)
            _write_durable(staging.path / MANIFEST, data)
            digest = file_digest(staging.path / MANIFEST)
            _write_durable(staging.path / MANIFEST_SHA, f"{digest}  {MANIFEST}\n".encode())
            _make_read_only(staging.path)
            fsync_dir(staging.path)
            self.versions_dir.mkdir(parents=True, exist_ok=True)
            self._move_in_and_swap(staging, version)
            log.info("published version %s (%d items) in %s", version, manifest["items"], self.path)
            if keep is not None:
                try:
                    self._prune_locked(keep)
                except OSError as exc:
                    log.warning("retention after publishing %s failed (run 'index' again): %s", version, exc)
        return version

    def _commit_model(self, staged: Path, ref: ModelRef) -> None:
        """Move the staged entry to ``models/<entry>`` (caller holds the lock): reuse an existing
        entry of that name when it verifies, replace it when it does not."""
        target = self.models_dir / ref.entry
        if target.is_dir():
            problems = check_entry(target)
            if not problems:
                remove_tree(staged)
                log.info("model %s: reusing stored entry %s", ref.model_hash[:12], ref.entry[:12])
                return
            log.warning("replacing damaged model store entry %s: %s", target, "; ".join(problems))
            self._trash(target, f"model-{ref.entry[:12]}")
        self.models_dir.mkdir(exist_ok=True)
        _make_read_only(staged)
        os.replace(staged, target)
        os.chmod(target, DIR_MODE)
        fsync_dir(self.models_dir)
        log.info("stored model %s as entry %s", ref.model_hash[:12], ref.entry[:12])

    def _trash(self, path: Path, name: str) -> None:
        """Delete the published (read-only) directory ``path``: renamed aside first, so a crash
        midway leaves a ``.trash-`` directory for cleanup instead of a half-deleted one."""
        trash = self.path / f".trash-{name}-{secrets.token_hex(4)}"
        os.chmod(path, 0o755)  # a directory moved to another parent must be writable ('..')
        try:
            os.replace(path, trash)
        except BaseException:
            os.chmod(path, DIR_MODE)
            raise
        fsync_dir(path.parent)
        remove_tree(trash)

    def _prune_models_locked(self) -> list[str]:
        """Delete the model entries no version references (caller holds the lock); the deleted
        entries. None while any version's manifest is unreadable (it may reference any of them)."""
        if not self.models_dir.is_dir():
            return []
        referenced = set()
        for v in self.versions():
            try:
                ref = self.model_ref(v)
            except (CorruptIndexError, NotFoundError) as exc:
                log.warning("keeping every stored model: version %s is unreadable (%s)", v, exc)
                return []
            if ref is not None:
                referenced.add(ref.entry)
        doomed = sorted(p.name for p in self.models_dir.iterdir() if p.name not in referenced)
        for name in doomed:
            path = self.models_dir / name
            if path.is_dir() and not path.is_symlink():
                self._trash(path, f"model-{name[:12]}")
            else:
                path.unlink(missing_ok=True)
            log.info("retention: deleted model store entry %s (no version references it)", name)
        return doomed

    def _move_in_and_swap(self, staging: Staging, version: str) -> None:
        """Rename the staging directory to ``versions/<version>`` and point ``CURRENT`` at it
        (caller holds the lock). On any failure before ``CURRENT`` names it, the version is removed
        again; a ``.pending-<version>`` marker covers a process killed in between."""
        vdir = self.versions_dir / version
        marker = self.path / f"{PENDING_PREFIX}{version}"
        try:
            _write_durable(marker, b"")
            fsync_dir(self.path)
            os.replace(staging.path, vdir)
            staging.published = version
            os.chmod(vdir, DIR_MODE)
            fsync_dir(self.versions_dir)
            self._swap_current(version)
        except BaseException:
            if staging.published is not None and self._current_or_none() != version:
                remove_tree(vdir)  # never current: no reader serves it
                staging.published = None
                log.warning("publishing %s failed; removed it again", version)
            marker.unlink(missing_ok=True)
            raise
        marker.unlink(missing_ok=True)

    def publish_engine(
        self, engine: SearchEngine, metadata: dict[str, Any] | None = None, *, keep: int | None = 3
    ) -> str:
        """Save ``engine`` and publish it as the new current version; returns the version id.

        Raises:
            ResourceExhaustedError: too little free space (checked first, against
                :func:`engine_bytes`) or the disk filled up while writing; nothing was published.
        """
        needed = engine_bytes(engine)
        self.require_space(needed)
        with self.disk_errors(needed), self.staging() as staging:
            engine.save(staging.engine_dir, extra=metadata)
            return self.publish_staged(staging, metadata, keep=keep)

    def rollback(self, version: str | None = None, *, verify: bool = True) -> str:
        """Point ``CURRENT`` at ``version`` (default: the newest version older than the current one).

        The target is verified first (``verify=False``: only its manifest is read).

        Raises:
            NotFoundError: no such version / no older version.
            CorruptIndexError: the target fails verification.
        """
        with self._locked():
            cur = self.current()
            if version is None:
                older = self.older(cur)
                if not older:
                    raise NotFoundError(f"{self.path}: no version older than {cur} to roll back to")
                version = older[-1]
            if verify:
                self.verify(version)
            else:
                self.manifest(version)
            if version != cur:
                self._swap_current(version)
            log.info("current version of %s is now %s (was %s)", self.path, version, cur)
        return version

    def prune(self, keep: int = 3) -> list[str]:
        """Delete all but the ``keep`` newest versions (never the current one), then every model
        entry no remaining version references; returns the deleted version ids."""
        with self._locked():
            return self._prune_locked(keep)

    def _prune_locked(self, keep: int) -> list[str]:
        if keep < 1:
            raise InvalidArgumentError(f"keep must be >= 1, got {keep}", field="keep")
        versions = self.versions()
        cur = self.current()
        doomed = [v for v in versions[:-keep] if v != cur]
        for v in doomed:
            self._trash(self.versions_dir / v, v)
            log.info("retention: deleted version %s", v)
        self._prune_models_locked()
        return doomed

    def disk_bytes(self, version: str) -> int:
        """Bytes on disk of ``version``'s directory."""
        return _dir_bytes(self.version_dir(version))
