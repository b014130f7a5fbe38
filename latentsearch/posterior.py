"""Diagonal Gaussian posteriors q(z|x) = N(mu, diag(sigma^2)): the project's one distribution type.

One class serves two worlds:

* numpy arrays (the search engine, the indexer, the client, tests): every result is float64,
  whatever the input float dtype, so rankings are computed exactly as the float64 brute force
  defines them;
* torch tensors (the VAE, training): results stay torch tensors of the input dtype and keep
  autograd. A tensor implies torch is already imported; this module never imports it.

The native parameters are ``mean`` and ``log_sigma`` (what the engine stores, memory-mapped);
``logvar``, ``std`` and ``var`` are derived. Shapes: ``mean`` and ``log_sigma`` are ``(..., d)``;
a single posterior is ``(d,)``, a bank of N posteriors is ``(N, d)``. Per-posterior results drop
the last axis. numpy parameters are treated as immutable (the normaliser is cached).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from latentsearch.errors import InvalidArgumentError

__all__ = ["LOG_2PI", "DiagonalGaussian"]

LOG_2PI = math.log(2.0 * math.pi)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _float64(x: Any) -> np.ndarray:
    """``x`` as a float64 array; float64 arrays (and memory maps) are kept as they are, uncopied."""
    if isinstance(x, np.ndarray) and x.dtype == np.float64:
        return x
    return np.asarray(x, dtype=np.float64)


def _plain(x: np.ndarray) -> np.ndarray:
    """A memory map as a plain ndarray view, so arithmetic on what is gathered from it stays plain."""
    return x if type(x) is np.ndarray else x.view(np.ndarray)


class DiagonalGaussian:
    """A batch of diagonal Gaussians parameterised by mean and log standard deviation.

    Args:
        mean: ``(..., d)`` means.
        log_sigma: ``(..., d)`` log standard deviations ``log sigma``; same shape as ``mean``.

    numpy inputs become float64 (exact for float32 inputs; float64 arrays are not copied). Use
    :meth:`from_logvar` (what VAE encoders emit) or :meth:`from_std` for the other scales.
    """

    __slots__ = ("_log_normalizer", "_torch", "log_sigma", "mean")

    def __init__(self, mean: Any, *, log_sigma: Any) -> None:
        tensors = _is_torch(mean)
        if tensors != _is_torch(log_sigma):
            raise InvalidArgumentError(
                "mean and log_sigma must both be numpy arrays or both torch tensors", field="log_sigma"
            )
        if not tensors:
            mean, log_sigma = _float64(mean), _float64(log_sigma)
        if tuple(mean.shape) != tuple(log_sigma.shape):
            raise InvalidArgumentError(
                f"mean and log_sigma shapes differ: {tuple(mean.shape)} vs {tuple(log_sigma.shape)}",
                field="log_sigma",
            )
        if len(mean.shape) == 0:
            raise InvalidArgumentError(
                "mean must have at least one axis (the latent dimension)", field="mean"
            )
        self.mean = mean
        self.log_sigma = log_sigma
        self._torch = tensors
        self._log_normalizer: Any = None  # (...) float64, once computed (numpy only)

    def _like(self, mean: Any, log_sigma: Any, log_normalizer: Any) -> DiagonalGaussian:
        """A Gaussian of this backend from parameters known to be consistent (the indexing fast path)."""
        g = object.__new__(DiagonalGaussian)
        g.mean, g.log_sigma, g._torch, g._log_normalizer = mean, log_sigma, self._torch, log_normalizer
        return g

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_logvar(cls, mean: Any, logvar: Any) -> DiagonalGaussian:
        """Build from log-variances ``log sigma^2`` (``log sigma = logvar / 2``, exact in floating point)."""
        return cls(mean, log_sigma=0.5 * (logvar if _is_torch(logvar) else _float64(logvar)))

    @classmethod
    def from_std(cls, mean: Any, std: Any) -> DiagonalGaussian:
        """Build from standard deviations ``sigma > 0``.

        Raises:
            InvalidArgumentError: ``field="std"`` (numpy) when a sigma is not finite and > 0.
        """
        if _is_torch(std):
            return cls(mean, log_sigma=sys.modules["torch"].log(std))
        std = _float64(std)
        if not np.all(np.isfinite(std) & (std > 0)):
            raise InvalidArgumentError("std must be finite and > 0", field="std")
        return cls(mean, log_sigma=np.log(std))

    # -- properties ---------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Latent dimension d."""
        return int(self.mean.shape[-1])

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape[:-1])

    @property
    def is_torch(self) -> bool:
        """Whether the parameters are torch tensors (else float64 numpy arrays)."""
        return self._torch

    @property
    def logvar(self) -> Any:
        """``(..., d)`` log-variances ``2 log sigma``."""
        return 2.0 * self.log_sigma

    @property
    def std(self) -> Any:
        """``(..., d)`` standard deviations sigma."""
        return self._xp().exp(self.log_sigma)

    @property
    def var(self) -> Any:
        """``(..., d)`` variances sigma^2."""
        return self._xp().exp(2.0 * self.log_sigma)

    @property
    def log_normalizer(self) -> Any:
        """``(...)`` ``sum(log sigma) + d/2 log(2 pi)``: the per-posterior constant of ``-log q``.

        Cached for numpy parameters, and carried over by indexing (``g[rows]``), so a bank pays for
        it once.
        """
        if self._log_normalizer is not None:
            return self._log_normalizer
        value = self.log_sigma.sum(-1) + 0.5 * self.dim * LOG_2PI
        if not self._torch:  # a cached tensor would tie every later result to one autograd graph
            self._log_normalizer = value
        return value

    def mode(self) -> Any:
        """The most likely point, the mean."""
        return self.mean

    def _xp(self) -> Any:
        return sys.modules["torch"] if self._torch else np

    # -- container ----------------------------------------------------------------------------
    def __len__(self) -> int:
        if not self.batch_shape:
            raise TypeError("a single posterior has no len()")
        return self.batch_shape[0]

    def __getitem__(self, index: Any) -> DiagonalGaussian:
        """The posteriors at ``index`` over the batch axes (the latent axis is always kept whole).

        ``g[rows]`` with an ``(B, C)`` integer array gives a ``(B, C)`` batch: with
        ``z[:, None, :]`` (``(B, 1, d)``), ``g[rows].log_prob(z[:, None, :])`` is ``(B, C)``.
        """
        if not self.batch_shape:
            raise IndexError("a single posterior has no batch axes to index")
        norm = self._log_normalizer
        if not self._torch and isinstance(index, np.ndarray) and index.dtype.kind in "iu":
            # take() gathers whole rows 1.5-4x faster than fancy indexing: the serving hot path.
            return self._like(
                _plain(self.mean).take(index, axis=0),
                _plain(self.log_sigma).take(index, axis=0),
                None if norm is None else norm[index],
            )
        key = (*index, slice(None)) if isinstance(index, tuple) else (index, slice(None))
        return self._like(self.mean[key], self.log_sigma[key], None if norm is None else norm[index])

    def __repr__(self) -> str:
        kind = "torch" if self._torch else "numpy"
        return f"DiagonalGaussian(batch_shape={self.batch_shape}, dim={self.dim}, backend={kind})"

    # -- densities ----------------------------------------------------------------------------
    def log_prob(self, z: Any) -> Any:
        """``log q(z|x)``, broadcasting ``z (..., d)`` against the batch.

        ``-1/2 sum(((z - mu) / sigma)^2) - sum(log sigma) - d/2 log(2 pi)``. All pairs of B points
        and C posteriors: ``g[rows].log_prob(z[:, None, :])`` with ``rows (B, C)``, or
        ``g.log_prob(z[:, None, :])`` for the whole ``(N,)`` batch, ``(B, N)``.
        """
        if self._torch:
            u = (z - self.mean) * sys.modules["torch"].exp(-self.log_sigma)
            return -0.5 * (u * u).sum(-1) - self.log_normalizer
        # The same expression with the (..., d) temporaries reused in place: identical results.
        u = np.subtract(_float64(z), self.mean)
        u *= np.exp(-self.log_sigma)
        u *= u
        return -0.5 * u.sum(-1) - self.log_normalizer

    def expected_log_prob(self, mean: Any, std: Any) -> Any:
        """``E_{z ~ N(mean, std^2)} log q(z|x)``; ``mean``, ``std (..., d)`` broadcast as in :meth:`log_prob`.

        ``-1/2 sum(((mean - mu)^2 + std^2) / sigma^2) - sum(log sigma) - d/2 log(2 pi)``; ``std = 0``
        gives :meth:`log_prob` at ``mean``.
        """
        if self._torch:
            diff = mean - self.mean
            inv_var = sys.modules["torch"].exp(-2.0 * self.log_sigma)
            return -0.5 * ((diff * diff + std * std) * inv_var).sum(-1) - self.log_normalizer
        quad = np.subtract(_float64(mean), self.mean)
        quad *= quad
        var = np.square(_float64(std))
        try:
            quad += var
        except ValueError:  # std broadcasts beyond the shape of mean - mu
            quad = quad + var
        quad *= np.exp(-2.0 * self.log_sigma)
        return -0.5 * quad.sum(-1) - self.log_normalizer

    def entropy(self) -> Any:
        """Differential entropy ``sum(log sigma) + d/2 (1 + log 2 pi)``."""
        return self.log_normalizer + 0.5 * self.dim

    def kl(self, other: DiagonalGaussian | None = None) -> Any:
        """``KL(self || other)``; ``other`` defaults to the standard normal prior N(0, I).

        Against the prior: ``1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2)``.
        """
        if other is None:
            return 0.5 * (self.mean * self.mean + self.var - 1.0 - self.logvar).sum(-1)
        xp = self._xp()
        diff = self.mean - other.mean
        ratio = xp.exp(2.0 * (self.log_sigma - other.log_sigma))
        return 0.5 * (ratio + diff * diff * xp.exp(-2.0 * other.log_sigma) - 1.0).sum(-1) + (
            other.log_sigma - self.log_sigma
        ).sum(-1)

    def sample(self, generator: Any = None) -> Any:
        """One reparameterised sample ``mean + std * eps`` of the batch's shape.

        ``generator`` is a ``torch.Generator`` for tensors, a ``numpy.random.Generator`` (or seed)
        for arrays.
        """
        if self._torch:
            m = self.mean
            eps = sys.modules["torch"].randn(m.shape, generator=generator, device=m.device, dtype=m.dtype)
            return m + self.std * eps
        rng = np.random.default_rng(generator)
        return self.mean + self.std * rng.standard_normal(self.mean.shape)

    def numpy(self) -> DiagonalGaussian:
        """A float64 numpy version (detached from autograd, moved to the CPU); numpy: ``self``."""
        if self._torch:
            return DiagonalGaussian(
                self.mean.detach().cpu().double().numpy(),
                log_sigma=self.log_sigma.detach().cpu().double().numpy(),
            )
        return self
