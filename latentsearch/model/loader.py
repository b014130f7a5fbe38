"""One entry point for every model: :func:`load_model` -> :class:`LoadedModel`, and :func:`encode_batch`.

``spec`` is one of

* a model directory written by ``latentsearch train`` (:mod:`model.checkpoint`);
* a TorchScript file (``.pt``, ``.pth``, ``.ts``, ``.jit``, ...) exposing ``encode``/``decode``;
* a Python factory ``package.module:function`` returning an ``nn.Module`` with those methods.

Loading a TorchScript file or calling a factory runs the model author's code: load trusted models only.

**The input rule** (:data:`InputRule`, one per model, stored with an index version's model): what
units a batch given to :meth:`LoadedModel.prepare` (the indexer's, an Encode request's) is in.

* ``"pixels"`` (models indexed from uint8 image data): uint8 arrays are pixels 0..255; float arrays
  are the same pixels scaled to [0, 1] (value = byte / 255) and must lie in [0, 1]. Both forms of
  one image reach the network identically.
* ``"float"`` (models indexed from float data): float arrays are in the data's own units and are
  taken as they are; uint8 arrays are refused (field ``raw``).

Non-finite floats are refused under either rule (field ``values``). :meth:`LoadedModel.prepare` is
the one place the rule is applied.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from latentsearch.errors import InvalidArgumentError, NotFoundError
from latentsearch.model.byo import load_factory, load_torchscript, require_decoder, validate_module
from latentsearch.model.checkpoint import is_checkpoint_dir, load_checkpoint
from latentsearch.model.device import resolve_device
from latentsearch.model.vae import VAE
from latentsearch.posterior import DiagonalGaussian

__all__ = ["INPUT_RULES", "InputRule", "LoadedModel", "default_input_rule", "encode_batch", "load_model"]

log = logging.getLogger(__name__)

InputRule = Literal["pixels", "float"]
INPUT_RULES: tuple[InputRule, ...] = ("pixels", "float")
PIXEL_MAX = 255.0  # a uint8 pixel's largest value: float pixel values are byte / PIXEL_MAX


def default_input_rule(dtype: Any) -> InputRule:
    """The input rule of a model indexed from data of numpy ``dtype``: uint8 -> ``"pixels"``,
    anything else -> ``"float"``."""
    return "pixels" if np.dtype(dtype) == np.uint8 else "float"


class LoadedModel:
    """A ready-to-use encoder/decoder, whatever its origin.

    Attributes:
        module: the underlying ``nn.Module`` (eval mode, on ``device``).
        input_shape: one item's shape as the model takes it (``(H, W, C)`` for our image VAEs).
        latent_dim: d.
        model_hash: sha256 hex identifying the weights (and, for checkpoints, the config).
        config: the checkpoint's config dict, or a description of the user model.
        source: ``"checkpoint"``, ``"torchscript"`` or ``"factory"``.
        has_decoder: whether :meth:`decode` is available.
        input_rule: the units of the batches :meth:`prepare` takes (module docstring).
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        input_shape: tuple[int, ...],
        latent_dim: int,
        model_hash: str,
        config: dict[str, Any],
        device: torch.device,
        source: Literal["checkpoint", "torchscript", "factory"],
        has_decoder: bool = True,
        name: str = "model",
        input_rule: InputRule = "pixels",
    ) -> None:
        if input_rule not in INPUT_RULES:
            raise InvalidArgumentError(
                f"input_rule must be one of {', '.join(INPUT_RULES)}, got {input_rule!r}", field="input_rule"
            )
        self.module: Any = module  # nn.Module; Any: user modules add encode/decode
        self.input_shape = tuple(input_shape)
        self.latent_dim = int(latent_dim)
        self.model_hash = model_hash
        self.config = config
        self.device = device
        self.source = source
        self.has_decoder = has_decoder
        self.name = name
        self.input_rule: InputRule = input_rule
        self._raw_input = isinstance(module, VAE)  # our VAE normalises raw units itself

    def __repr__(self) -> str:
        return (
            f"LoadedModel(source={self.source}, input_shape={self.input_shape}, "
            f"latent_dim={self.latent_dim}, input_rule={self.input_rule}, "
            f"model_hash={self.model_hash[:12]}, device={self.device})"
        )

    def prepare(self, x: Any) -> torch.Tensor:
        """A batch ``(N, *shape)`` (numpy or torch) -> the tensor the module takes, on ``device``.

        A batch in reader layout ``(N, H, W, C)`` is permuted when the model takes ``(C, H, W)``
        and reshaped when only the item size matches (e.g. flat vectors). Values follow
        :attr:`input_rule` (module docstring): under ``"pixels"`` user models get pixels in [0, 1]
        and our VAEs pixels 0..255 (they normalise raw units themselves), from uint8 and float
        batches alike; under ``"float"`` every model gets the values as they are.

        Raises:
            InvalidArgumentError: field ``raw`` for uint8 under ``"float"``; field ``values`` for
                non-finite floats, or floats outside [0, 1] under ``"pixels"``.
        """
        if isinstance(x, np.ndarray):
            if not x.flags.writeable or not x.flags.c_contiguous:
                x = np.ascontiguousarray(x).copy()
            t = torch.from_numpy(x)
        elif isinstance(x, torch.Tensor):
            t = x
        else:
            t = torch.as_tensor(np.asarray(x))
        shape = tuple(t.shape[1:])
        if shape != self.input_shape:
            n_item = int(np.prod(self.input_shape))
            if t.ndim < 2 or int(np.prod(shape)) != n_item:
                raise InvalidArgumentError(
                    f"{self.name}: expected a batch of shape (N, {', '.join(map(str, self.input_shape))}), "
                    f"got {tuple(t.shape)}",
                    field="x",
                )
            if (
                t.ndim == 4
                and len(self.input_shape) == 3
                and (shape[2], shape[0], shape[1]) == self.input_shape
            ):
                t = t.permute(0, 3, 1, 2)
            else:
                t = t.reshape(t.shape[0], *self.input_shape)
        if t.dtype == torch.uint8:
            if self.input_rule != "pixels":
                raise InvalidArgumentError(
                    "raw (uint8 bytes) is not taken by this model: it takes float data (input rule "
                    "'float'); send values in the data's own units",
                    field="raw",
                )
            t = t.to(self.device, non_blocking=True)
            return t if self._raw_input else t.to(torch.float32) / PIXEL_MAX
        t = t.to(self.device, torch.float32, non_blocking=True)
        if not bool(torch.isfinite(t).all()):
            raise InvalidArgumentError("values contains NaN or inf", field="values")
        if self.input_rule == "float":
            return t
        if not bool(((t >= 0) & (t <= 1)).all()):
            raise InvalidArgumentError(
                "values is out of range: the model takes uint8 pixels (input rule 'pixels'), so "
                f"float values are the pixels scaled to [0, 1] (byte / 255); got values in "
                f"[{float(t.min()):.4g}, {float(t.max()):.4g}]",
                field="values",
            )
        return t * PIXEL_MAX if self._raw_input else t

    def network_input(self, x: Any) -> torch.Tensor:
        """A batch ``(N, *shape)`` -> the float32 values the encoder's first layer sees, shaped as
        :meth:`prepare` returns them: our VAEs' normalisation ``(x - shift) * scale`` applied
        (:class:`~model.config.Normalization`), a user model's input as :meth:`prepare` gives it."""
        with torch.inference_mode():
            t = self.prepare(x)
            return self.module.normalize(t) if self._raw_input else t

    def encode_params(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, *input_shape)`` -> ``(mu, logvar)``, each ``(N, d)`` float32 on ``device`` (no autograd)."""
        with torch.inference_mode():
            mu, logvar = (
                self.module.encode_params(self.prepare(x))
                if self._raw_input
                else self.module.encode(self.prepare(x))
            )
        return mu.float(), logvar.float()

    def encode(self, x: Any) -> DiagonalGaussian:
        """``(N, *input_shape)`` -> posterior ``q(z|x)`` with ``(N, d)`` torch tensors."""
        return DiagonalGaussian.from_logvar(*self.encode_params(x))

    def decode(self, z: Any) -> torch.Tensor:
        """``(N, d)`` latents -> ``(N, *input_shape)`` float32 reconstructions (images in [0, 1]).

        Raises:
            FailedPreconditionError: the model has no decoder.
        """
        require_decoder(self.has_decoder, self.name)
        zt = torch.as_tensor(np.asarray(z) if not isinstance(z, torch.Tensor) else z)
        if zt.ndim != 2 or zt.shape[1] != self.latent_dim:
            raise InvalidArgumentError(
                f"{self.name}: expected latents of shape (N, {self.latent_dim}), got {tuple(zt.shape)}",
                field="z",
            )
        with torch.inference_mode():
            out = self.module.decode(zt.to(self.device, torch.float32))
        return out.float()


def encode_batch(model: LoadedModel | VAE, batch: Any) -> tuple[np.ndarray, np.ndarray]:
    """Encode one batch: ``(N, *input_shape)`` -> ``(mu, logvar)``, each ``(N, d)`` float32 numpy.

    Pure (no state beyond the model's weights, no autograd), so the indexer can call it per batch
    on any worker. Accepts a :class:`LoadedModel` or a bare :class:`~model.vae.VAE`.
    """
    if isinstance(model, VAE):
        dev = next(model.parameters()).device
        t = torch.as_tensor(np.ascontiguousarray(batch).copy() if isinstance(batch, np.ndarray) else batch)
        with torch.inference_mode():
            mu, logvar = model.encode_params(t.to(dev))
    else:
        mu, logvar = model.encode_params(batch)
    return (
        mu.detach().to("cpu", torch.float32).numpy(),
        logvar.detach().to("cpu", torch.float32).numpy(),
    )


def load_model(
    spec: str | os.PathLike[str],
    *,
    input_shape: tuple[int, ...] | None = None,
    latent_dim: int | None = None,
    device: str | torch.device = "cpu",
    input_rule: InputRule | None = None,
) -> LoadedModel:
    """Load a model directory, a TorchScript file or a ``package.module:function`` factory.

    Loading a TorchScript file or a factory runs its code: trusted models only.

    Args:
        spec: see the module docstring.
        input_shape: one item's shape as the model takes it; required for user models, checked
            against the config for model directories.
        latent_dim: expected d (checked; inferred when ``None``).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        input_rule: the units of its input (module docstring). ``None``: a model directory's from
            its training data (uint8: ``"pixels"``, else ``"float"``; by its normalisation when not
            recorded), ``"pixels"`` for a user model. An index version stores the rule of the data
            it was built from.

    Raises:
        NotFoundError: no such file, directory or factory.
        CorruptIndexError: a model directory fails its checksums (message names the file).
        InvalidArgumentError: the model's encode/decode do not produce the expected shapes.
    """
    dev = resolve_device(device)
    text = os.fspath(spec)
    path = Path(text)
    if is_checkpoint_dir(path):
        ckpt = load_checkpoint(path)
        vae = ckpt.model.to(dev)
        if input_shape is not None and tuple(input_shape) != vae.input_shape:
            raise InvalidArgumentError(
                f"{path}: model takes items of shape {vae.input_shape}, "
                f"input_shape={tuple(input_shape)} given",
                field="input_shape",
            )
        if latent_dim is not None and latent_dim != vae.latent_dim:
            raise InvalidArgumentError(
                f"{path}: model has latent_dim {vae.latent_dim}, {latent_dim} expected", field="latent_dim"
            )
        return LoadedModel(
            vae,
            input_shape=vae.input_shape,
            latent_dim=vae.latent_dim,
            model_hash=ckpt.model_hash,
            config=ckpt.config,
            device=dev,
            source="checkpoint",
            name=str(path),
            input_rule=input_rule or _checkpoint_input_rule(ckpt.config),
        )
    if path.is_dir():
        raise NotFoundError(f"{path}: not a model directory (no config.json)")
    if not path.is_file() and ":" not in text:
        raise NotFoundError(f"{text}: no such model directory, TorchScript file or 'package.module:function'")
    if input_shape is None:
        raise InvalidArgumentError(
            f"{text}: input_shape is required to load a user model (e.g. (28, 28, 1))", field="input_shape"
        )
    shape = tuple(int(s) for s in input_shape)
    if path.is_file():
        module, model_hash = load_torchscript(path, device=dev)
        source: Literal["torchscript", "factory"] = "torchscript"
    elif ":" in text:
        module, model_hash = load_factory(text, device=dev)
        source = "factory"
    else:
        raise NotFoundError(f"{text}: no such model directory, TorchScript file or 'package.module:function'")
    d, has_decoder = validate_module(module, name=text, input_shape=shape, latent_dim=latent_dim, device=dev)
    config = {"source": source, "spec": text, "input_shape": list(shape), "latent_dim": d}
    log.info("loaded %s model %s (d=%d, input %s)", source, text, d, shape)
    return LoadedModel(
        module,
        input_shape=shape,
        latent_dim=d,
        model_hash=model_hash,
        config=config,
        device=dev,
        source=source,
        has_decoder=has_decoder,
        name=text,
        input_rule=input_rule or "pixels",
    )


def _checkpoint_input_rule(config: dict[str, Any]) -> InputRule:
    """A model directory's input rule: its training data's dtype, else its normalisation (pixels
    when it scales by 1/255 with no shift, the rule `latentsearch train` sets for uint8 data)."""
    dtype = (config.get("data") or {}).get("dtype")
    if isinstance(dtype, str):
        try:
            return default_input_rule(dtype)
        except TypeError:
            pass
    norm = (config.get("vae") or {}).get("normalization") or {}
    scale, shift = norm.get("scale", 1.0 / PIXEL_MAX), norm.get("shift", 0.0)
    pixels = norm.get("kind", "scale") == "scale" and shift == 0 and scale == 1.0 / PIXEL_MAX
    return "pixels" if pixels else "float"
