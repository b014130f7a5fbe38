"""Bring your own model: TorchScript files and Python factories.

A user model is any module with

* ``encode(x) -> (mu, logvar)``: ``x`` is a float32 ``(N, *input_shape)`` batch, ``mu`` and
  ``logvar`` are ``(N, d)``;
* ``decode(z) -> x``: ``z`` is ``(N, d)``, ``x`` is ``(N, *input_shape)`` (optional: without it the
  model can index and search but not decode).

Both are checked on a dummy batch at load time (:func:`validate_module`) and any mismatch is
reported with what was expected and what came back.

Loading runs the model's code: a TorchScript file's programs, a factory's Python module (imported
and called). Load trusted models only; an index root that stores such a model (indexer.models)
is as trusted as the model.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentsearch.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

__all__ = ["load_factory", "load_torchscript", "state_dict_hash", "validate_module"]

log = logging.getLogger(__name__)


def load_torchscript(path: str | os.PathLike[str], *, device: torch.device) -> tuple[nn.Module, str]:
    """Load a TorchScript file; returns ``(module, sha256 of the file)``."""
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"{p}: no such TorchScript file")
    data = p.read_bytes()
    try:
        with warnings.catch_warnings():
            # TorchScript is the user's chosen format; torch >= 2.9 flags jit.load as deprecated.
            warnings.filterwarnings(
                "ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning
            )
            module = torch.jit.load(str(p), map_location=device)
    except (RuntimeError, ValueError) as exc:
        raise InvalidArgumentError(f"{p}: not a loadable TorchScript module ({exc})", field="model") from exc
    module.eval()
    return module, hashlib.sha256(data).hexdigest()


def load_factory(spec: str, *, device: torch.device) -> tuple[nn.Module, str]:
    """Call ``package.module:function`` (no arguments) for an ``nn.Module``; returns it and its hash."""
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise InvalidArgumentError(
            f"model factory must look like 'package.module:function', got {spec!r}", field="model"
        )
    try:
        mod = importlib.import_module(module_name)
    except ImportError as exc:
        raise NotFoundError(f"model factory {spec!r}: cannot import {module_name!r} ({exc})") from exc
    factory = getattr(mod, func_name, None)
    if not callable(factory):
        raise NotFoundError(f"model factory {spec!r}: {module_name!r} has no callable {func_name!r}")
    module = factory()
    if not isinstance(module, nn.Module):
        raise InvalidArgumentError(
            f"model factory {spec!r} must return a torch.nn.Module, returned {type(module).__name__}",
            field="model",
        )
    module = module.to(device).eval()
    return module, state_dict_hash(module, extra=spec)


def state_dict_hash(module: nn.Module, *, extra: str = "") -> str:
    """sha256 over the names, dtypes, shapes and bytes of a module's state dict (plus ``extra``)."""
    h = hashlib.sha256(extra.encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} ({', '.join(_describe(o) for o in out)})"
    return f"a {type(out).__name__}"


def validate_module(
    module: Any,
    *,
    name: str,
    input_shape: tuple[int, ...],
    latent_dim: int | None,
    device: torch.device,
) -> tuple[int, bool]:
    """Run ``encode``/``decode`` on a dummy batch of 2; returns ``(latent_dim, has_decoder)``.

    Raises:
        InvalidArgumentError: a missing ``encode``, or outputs of the wrong type or shape; the
            message says what was expected and what came back.
    """
    if not hasattr(module, "encode"):
        raise InvalidArgumentError(
            f"{name}: the model has no encode(x) -> (mu, logvar) method", field="model"
        )
    x = torch.zeros((2, *input_shape), dtype=torch.float32, device=device)
    shape_txt = f"(2, {', '.join(map(str, input_shape))})"
    try:
        with torch.inference_mode():
            out = module.encode(x)
    except Exception as exc:  # user code: any failure is a shape/contract problem to report
        raise InvalidArgumentError(
            f"{name}: encode(x) failed on a dummy float32 batch of shape {shape_txt} "
            f"(input_shape={input_shape}): {exc}",
            field="model",
        ) from exc
    d_txt = "d" if latent_dim is None else str(latent_dim)
    expected = f"expected encode(x) with x {shape_txt} to return (mu, logvar), each (2, {d_txt})"
    if not (
        isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(o, torch.Tensor) for o in out)
    ):
        raise InvalidArgumentError(f"{name}: {expected}; got {_describe(out)}", field="model")
    mu, logvar = out
    if mu.ndim != 2 or mu.shape[0] != 2 or tuple(logvar.shape) != tuple(mu.shape):
        raise InvalidArgumentError(
            f"{name}: {expected}; got mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)}", field="model"
        )
    d = int(mu.shape[1])
    if latent_dim is not None and d != latent_dim:
        raise InvalidArgumentError(
            f"{name}: {expected}; got latent dimension {d} (mu {tuple(mu.shape)})", field="model"
        )
    has_decoder = hasattr(module, "decode")
    if not has_decoder:
        log.warning("%s: the model has no decode(z); decoding will be unavailable", name)
        return d, False
    z = torch.zeros((2, d), dtype=torch.float32, device=device)
    try:
        with torch.inference_mode():
            rec = module.decode(z)
    except Exception as exc:  # user code
        raise InvalidArgumentError(
            f"{name}: decode(z) failed on a dummy batch of shape (2, {d}): {exc}", field="model"
        ) from exc
    if not isinstance(rec, torch.Tensor) or tuple(rec.shape) != (2, *input_shape):
        raise InvalidArgumentError(
            f"{name}: expected decode(z) with z (2, {d}) to return a tensor of shape {shape_txt}; "
            f"got {_describe(rec)}",
            field="model",
        )
    return d, True


def require_decoder(has_decoder: bool, name: str) -> None:
    if not has_decoder:
        raise FailedPreconditionError(f"{name}: the model has no decode(z) method")
