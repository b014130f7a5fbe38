"""Model store entries: the model an index version was published from, with all it takes to load it.

An entry is one directory (:class:`~indexer.root.IndexRoot` keeps them under ``INDEX_ROOT/models/``
and decides when they are written and deleted; this module says what is in one)::

    <entry>/                  <entry> is the sha256 (hex) of its model.json: content-addressed
      model.json              {"format", "format_version", "kind", "model_hash", "input_shape",
                              "data_shape", "input_layout", "input_rule", "latent_dim",
                              "has_decoder", "factory", "files": {name: {"bytes", "sha256"}}}
      files/                  the model's files, by kind:
        checkpoint            model.safetensors, config.json, checksums.json (the model directory
                              ``latentsearch train`` wrote, without its training/ state)
        torchscript           model.pt (the TorchScript file, byte for byte)
        factory               nothing: the entry stores the ``package.module:function`` reference

``kind`` is ``checkpoint``, ``torchscript`` or ``factory``; ``input_shape`` one item as the model
takes it (what Encode's ``shape`` must be); ``data_shape`` one item as the indexed data held it and
``input_layout`` how those became the model's (``as-is``, ``hwc-to-chw`` or ``reshape``);
``input_rule`` the units of its input (:mod:`model.loader`: ``pixels`` or ``float``, from the
indexed data's dtype). model.json holds no timestamps, so the same model indexed under the same
rule is the same entry, stored once however many versions reference it.

Loading an entry of kind ``torchscript`` or ``factory`` runs the model author's code (TorchScript
programs; the factory's Python module, imported from ``sys.path``): serve index roots of trusted
models only. A factory's module is not copied into the entry: it must stay importable, and loading
refuses it when it no longer builds the model whose hash the entry records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentsearch.engine.storage import check_listed_files, file_digest, fsync_dir, read_json_manifest
from latentsearch.errors import CorruptIndexError, FailedPreconditionError
from latentsearch.model.checkpoint import CHECKSUMS_FILE, CONFIG_FILE, WEIGHTS_FILE, read_model_hash
from latentsearch.model.loader import INPUT_RULES, LoadedModel, load_model

__all__ = ["ENTRY_FILE", "MODEL_FORMAT", "ModelRef", "check_entry", "load_entry", "stage_entry"]

log = logging.getLogger(__name__)

MODEL_FORMAT = "latentsearch.model-entry"
MODEL_FORMAT_VERSION = 1
ENTRY_FILE = "model.json"
FILES_DIR = "files"
TORCHSCRIPT_FILE = "model.pt"
CHECKPOINT_FILES = (WEIGHTS_FILE, CONFIG_FILE, CHECKSUMS_FILE)


@dataclass(frozen=True)
class ModelRef:
    """What a version manifest records of its model (key ``"model"``): the entry and the model's hash."""

    entry: str
    model_hash: str

    def to_dict(self) -> dict[str, str]:
        return {"entry": self.entry, "model_hash": self.model_hash}

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> ModelRef | None:
        """The manifest's model reference; ``None`` for a version published without a stored model
        (from posteriors, or by a release before the model store)."""
        ref = manifest.get("model")
        if ref is None:
            return None
        if not (isinstance(ref, dict) and isinstance(ref.get("entry"), str) and ref.get("model_hash")):
            raise CorruptIndexError(f"version {manifest.get('version')}: malformed model reference {ref!r}")
        return cls(entry=ref["entry"], model_hash=str(ref["model_hash"]))


def _layout(data_shape: tuple[int, ...], input_shape: tuple[int, ...]) -> str:
    """How :meth:`LoadedModel.prepare` turns a data item into the model's input."""
    if data_shape == input_shape:
        return "as-is"
    if len(data_shape) == 3 and (data_shape[2], data_shape[0], data_shape[1]) == input_shape:
        return "hwc-to-chw"
    return "reshape"


def _copy_durable(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)
        fout.flush()
        os.fsync(fout.fileno())


def stage_entry(model: LoadedModel, spec: str, data_shape: tuple[int, ...], dest: Path) -> ModelRef:
    """Write the store entry of ``model`` (loaded from ``spec``) into the new directory ``dest``.

    Files are copied, then checked against the model's hash (a model directory or TorchScript file
    that changed since it was loaded is refused), model.json written last; everything is fsynced.

    Raises:
        CorruptIndexError: a copied file does not match the hash of the model that was loaded.
    """
    files_dir = dest / FILES_DIR
    files_dir.mkdir(parents=True)
    factory: str | None = None
    if model.source == "checkpoint":
        for name in CHECKPOINT_FILES:
            _copy_durable(Path(spec) / name, files_dir / name)
        copied = read_model_hash(files_dir, verify=True)
    elif model.source == "torchscript":
        _copy_durable(Path(spec), files_dir / TORCHSCRIPT_FILE)
        copied = file_digest(files_dir / TORCHSCRIPT_FILE)
    else:
        factory, copied = spec, model.model_hash
    if copied != model.model_hash:
        raise CorruptIndexError(
            f"{spec}: changed while indexing (model hash {copied} now, {model.model_hash} when loaded)"
        )
    fsync_dir(files_dir)
    files = {
        f"{FILES_DIR}/{p.name}": {"bytes": p.stat().st_size, "sha256": file_digest(p)}
        for p in sorted(files_dir.iterdir())
    }
    entry = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "kind": model.source,
        "model_hash": model.model_hash,
        "input_shape": list(model.input_shape),
        "data_shape": list(data_shape),
        "input_layout": _layout(tuple(data_shape), model.input_shape),
        "input_rule": model.input_rule,
        "latent_dim": model.latent_dim,
        "has_decoder": model.has_decoder,
        "factory": factory,
        "files": files,
    }
    data = (json.dumps(entry, indent=2, sort_keys=True) + "\n").encode()
    with open(dest / ENTRY_FILE, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(dest)
    return ModelRef(entry=hashlib.sha256(data).hexdigest(), model_hash=model.model_hash)


def _read_entry(path: Path) -> dict[str, Any]:
    """``path/model.json``, checked against the entry's name (its sha256) and parsed."""
    mpath = path / ENTRY_FILE
    try:
        digest = file_digest(mpath)
    except FileNotFoundError as exc:
        raise CorruptIndexError(f"{mpath}: missing (model store entry {path.name})") from exc
    except OSError as exc:
        raise CorruptIndexError(f"{mpath}: unreadable ({exc})") from exc
    if digest != path.name:
        raise CorruptIndexError(f"{mpath}: fails its sha256 checksum (the entry's name)")
    return read_json_manifest(mpath, MODEL_FORMAT, MODEL_FORMAT_VERSION)


def check_entry(path: Path) -> list[str]:
    """Every integrity problem of the entry at ``path`` (empty when it verifies): one line per bad file."""
    if not path.is_dir():
        return [f"{path}: missing (the model store entry a version references)"]
    try:
        entry = _read_entry(path)
    except CorruptIndexError as exc:
        return [str(exc)]
    return check_listed_files(path, entry.get("files") or {}, own=(ENTRY_FILE,), listed_in=ENTRY_FILE)


def load_entry(path: Path, *, expected_hash: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Load the model of the entry at ``path`` under its stored input rule (blocking).

    A model directory's own checksums are verified as it loads; a TorchScript file is hashed
    (its hash is the model's); a factory is imported and called, and must still build the model
    of ``expected_hash``. Runs TorchScript and factory code: trusted roots only.

    Raises:
        CorruptIndexError: model.json or a model file is damaged (named), or the entry is not the
            model ``expected_hash`` names.
        FailedPreconditionError: a factory now builds another model than the one indexed.
    """
    entry = _read_entry(path)
    if entry.get("model_hash") != expected_hash:
        raise CorruptIndexError(
            f"{path / ENTRY_FILE}: holds model {entry.get('model_hash')}, "
            f"the version references {expected_hash}"
        )
    kind, rule = entry.get("kind"), entry.get("input_rule")
    if rule not in INPUT_RULES:
        raise CorruptIndexError(f"{path / ENTRY_FILE}: unknown input_rule {rule!r}")
    shape = tuple(int(s) for s in entry.get("input_shape") or ())
    latent_dim = int(entry["latent_dim"])
    if kind == "checkpoint":  # the model directory's own checksums are verified as it loads
        model = load_model(path / FILES_DIR, latent_dim=latent_dim, device=device, input_rule=rule)
        if model.model_hash != expected_hash:
            raise CorruptIndexError(
                f"{path / FILES_DIR / CHECKSUMS_FILE}: model {model.model_hash}, the version references "
                f"{expected_hash}"
            )
    elif kind == "torchscript":
        ts = path / FILES_DIR / TORCHSCRIPT_FILE
        digest = file_digest(ts) if ts.is_file() else "missing"
        if digest != expected_hash:
            raise CorruptIndexError(f"{ts}: fails its sha256 checksum (the model hash)")
        model = load_model(ts, input_shape=shape, latent_dim=latent_dim, device=device, input_rule=rule)
    elif kind == "factory":
        spec = str(entry.get("factory"))
        model = load_model(spec, input_shape=shape, latent_dim=latent_dim, device=device, input_rule=rule)
        if model.model_hash != expected_hash:
            raise FailedPreconditionError(
                f"model factory {spec!r} now builds model {model.model_hash}; the index version was "
                f"built with model {expected_hash} (restore that code, or reindex)",
                field="model",
            )
    else:
        raise CorruptIndexError(f"{path / ENTRY_FILE}: unknown model kind {kind!r}")
    log.info("loaded stored %s model %s (entry %s)", kind, expected_hash[:12], path.name[:12])
    return model
