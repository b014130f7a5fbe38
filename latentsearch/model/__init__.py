"""latentsearch.model: the VAE, its training, checkpoints and users' own models.

Torch-heavy modules load lazily (PEP 562), so importing ``latentsearch.model.config`` (the CLI's
defaults) does not import torch. The training function is ``latentsearch.model.train.train``: it is
not re-exported here, because the name ``train`` is also the submodule's.
"""

from __future__ import annotations

from latentsearch._lazy import lazy_exports

# Public name -> defining submodule; loaded on first attribute access.
_LAZY = {
    # configs (no torch)
    "Normalization": "latentsearch.model.config",
    "TrainConfig": "latentsearch.model.config",
    "VAEConfig": "latentsearch.model.config",
    # torch
    "VAE": "latentsearch.model.vae",
    "build_vae": "latentsearch.model.vae",
    "ElboTerms": "latentsearch.model.vae",
    "TrainResult": "latentsearch.model.train",
    "training_done": "latentsearch.model.train",
    "Checkpoint": "latentsearch.model.checkpoint",
    "load_checkpoint": "latentsearch.model.checkpoint",
    "read_model_hash": "latentsearch.model.checkpoint",
    "save_checkpoint": "latentsearch.model.checkpoint",
    "LoadedModel": "latentsearch.model.loader",
    "encode_batch": "latentsearch.model.loader",
    "load_model": "latentsearch.model.loader",
    "resolve_device": "latentsearch.model.device",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)
