"""Model checkpoints: one directory, weights + config + content hash.

Layout of a model directory::

    model.safetensors   the VAE's state dict (no pickle)
    config.json         {"format", "vae": VAEConfig, "training": TrainConfig | null,
                         "data": {"fingerprint", "source", "n_items", ...}, "versions", "metrics"}
    checksums.json      {"model_hash", "files": {"model.safetensors": sha256, "config.json": sha256}}
    training/last.pt    optimiser state to resume training (optional; see model.train)

``model_hash`` is ``sha256(bytes(model.safetensors) + bytes(config.json))`` (hex): the indexer
records it so an index always knows which model produced it. Loading verifies every checksum
first, so a flipped byte or a truncated file is reported by name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentsearch.errors import CorruptIndexError, NotFoundError
from latentsearch.model.config import TrainConfig, VAEConfig
from latentsearch.model.vae import VAE

__all__ = [
    "CHECKSUMS_FILE",
    "CONFIG_FILE",
    "FORMAT",
    "WEIGHTS_FILE",
    "Checkpoint",
    "is_checkpoint_dir",
    "library_versions",
    "load_checkpoint",
    "read_model_hash",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

FORMAT = "latentsearch-vae/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKSUMS_FILE = "checksums.json"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the VAE (eval mode, on CPU), its full config dict and its hash."""

    model: VAE
    config: dict[str, Any]
    model_hash: str
    path: Path


def library_versions() -> dict[str, str]:
    import numpy
    import safetensors

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
    }


def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    model: VAE,
    out_dir: str | os.PathLike[str],
    *,
    train_config: TrainConfig | None = None,
    data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> str:
    """Write ``model`` to ``out_dir`` (created if needed); returns the model hash.

    Files are written to temporaries and renamed, checksums last, so a crash never leaves a
    directory that verifies but mixes two models.
    """
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = save(state, metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        "vae": model.config.to_dict(),
        "training": None if train_config is None else train_config.to_dict(),
        "data": data or {},
        "versions": library_versions(),
        "metrics": metrics or {},
    }
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    model_hash = _sha256(weights + config_bytes)
    checksums = {
        "model_hash": model_hash,
        "files": {WEIGHTS_FILE: _sha256(weights), CONFIG_FILE: _sha256(config_bytes)},
    }
    (out / CHECKSUMS_FILE).unlink(missing_ok=True)
    _atomic_write(out / WEIGHTS_FILE, weights)
    _atomic_write(out / CONFIG_FILE, config_bytes)
    _atomic_write(out / CHECKSUMS_FILE, (json.dumps(checksums, indent=2) + "\n").encode())
    log.debug("saved checkpoint %s (model_hash %s)", out, model_hash[:12])
    return model_hash


def _read_verified(path: Path) -> tuple[bytes, bytes, str]:
    """Read and verify weights and config bytes; returns (weights, config_bytes, model_hash)."""
    if not path.is_dir():
        raise NotFoundError(f"{path}: no such model directory")
    files = {}
    for name in (WEIGHTS_FILE, CONFIG_FILE, CHECKSUMS_FILE):
        f = path / name
        if not f.is_file():
            raise CorruptIndexError(f"{f}: missing from the model directory (incomplete checkpoint)")
        files[name] = f.read_bytes()
    try:
        checksums = json.loads(files[CHECKSUMS_FILE])
        expected = checksums["files"]
        model_hash = checksums["model_hash"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptIndexError(f"{path / CHECKSUMS_FILE}: unreadable checksums ({exc})") from exc
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        got = _sha256(files[name])
        if got != expected.get(name):
            raise CorruptIndexError(
                f"{path / name}: sha256 mismatch (expected {expected.get(name)}, got {got}); "
                f"the file is corrupt or truncated ({len(files[name])} bytes)"
            )
    if _sha256(files[WEIGHTS_FILE] + files[CONFIG_FILE]) != model_hash:
        raise CorruptIndexError(f"{path / CHECKSUMS_FILE}: model_hash does not match the files")
    return files[WEIGHTS_FILE], files[CONFIG_FILE], model_hash


def read_model_hash(path: str | os.PathLike[str], *, verify: bool = True) -> str:
    """The ``model_hash`` of a model directory (verifying the files unless ``verify=False``)."""
    p = Path(path)
    if verify:
        return _read_verified(p)[2]
    try:
        return str(json.loads((p / CHECKSUMS_FILE).read_text())["model_hash"])
    except (OSError, ValueError, KeyError) as exc:
        raise CorruptIndexError(f"{p / CHECKSUMS_FILE}: unreadable checksums ({exc})") from exc


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load and verify a model directory written by :func:`save_checkpoint`.

    Raises:
        NotFoundError: no such directory.
        CorruptIndexError: a file is missing, truncated, fails its checksum or does not parse
            (the message names the file).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    p = Path(path)
    weights, config_bytes, model_hash = _read_verified(p)
    try:
        config = json.loads(config_bytes)
        if config.get("format") != FORMAT:
            raise CorruptIndexError(
                f"{p / CONFIG_FILE}: format {config.get('format')!r}, expected {FORMAT!r}"
            )
        vae_config = VAEConfig.from_dict(config["vae"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptIndexError(f"{p / CONFIG_FILE}: invalid model config ({exc})") from exc
    try:
        state = load(weights)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CorruptIndexError(f"{p / WEIGHTS_FILE}: unreadable safetensors weights ({exc})") from exc
    model = VAE(vae_config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CorruptIndexError(f"{p / WEIGHTS_FILE}: weights do not fit the config ({exc})") from exc
    model.eval()
    return Checkpoint(model=model, config=config, model_hash=model_hash, path=p)
