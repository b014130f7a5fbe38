"""model: the VAE, its training, checkpoints, data readers and users' own models.

Torch-heavy modules load lazily (PEP 562) so the numpy search path can import the posterior type
without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from model.posterior import LOG_2PI, DiagonalGaussian, log_prob_matrix

# Public name -> defining submodule; loaded on first attribute access.
_LAZY = {
    # configs (no torch)
    "Normalization": "model.config",
    "TrainConfig": "model.config",
    "VAEConfig": "model.config",
    # readers (numpy + Pillow, no torch)
    "ArrayDataset": "model.readers",
    "Dataset": "model.readers",
    "ImageFolderDataset": "model.readers",
    "open_dataset": "model.readers",
    "read_idx": "model.readers",
    # generated garments (numpy + Pillow)
    "GARMENT_CLASSES": "model.synthetic",
    "garment_dataset": "model.synthetic",
    "garment_images": "model.synthetic",
    # torch
    "VAE": "model.vae",
    "build_vae": "model.vae",
    "ElboTerms": "model.vae",
    "TrainResult": "model.train",
    "train": "model.train",
    "Checkpoint": "model.checkpoint",
    "load_checkpoint": "model.checkpoint",
    "read_model_hash": "model.checkpoint",
    "save_checkpoint": "model.checkpoint",
    "LoadedModel": "model.loader",
    "encode_batch": "model.loader",
    "load_model": "model.loader",
    "resolve_device": "model.device",
}

__all__ = ["LOG_2PI", "DiagonalGaussian", "log_prob_matrix", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
