"""Diagonal Gaussian posteriors q(z|x) = N(mu, diag(sigma^2)).

One class serves two worlds:

* numpy arrays (the search engine, the indexer, tests): every result is float64, whatever the
  input float dtype, so rankings are computed exactly as the float64 brute force defines them;
* torch tensors (training): results stay torch tensors of the input dtype and keep autograd.

Shapes: ``mean`` and ``logvar`` are ``(..., d)``; a single posterior is ``(d,)``, a bank of N
posteriors is ``(N, d)``. Per-posterior results drop the last axis.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from latentsearch.errors import InvalidArgumentError

__all__ = ["LOG_2PI", "DiagonalGaussian", "log_prob_matrix"]

LOG_2PI = math.log(2.0 * math.pi)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _xp(x: Any) -> Any:
    if _is_torch(x):
        import torch

        return torch
    return np


class DiagonalGaussian:
    """A batch of diagonal Gaussians parameterised by mean and log-variance.

    Args:
        mean: ``(..., d)`` means.
        logvar: ``(..., d)`` log-variances, ``log sigma^2``; same shape as ``mean``.

    numpy inputs are converted to float64 (exact for float32 inputs). Use :meth:`from_log_sigma`
    or :meth:`from_std` for the other parameterisations.
    """

    __slots__ = ("logvar", "mean")

    def __init__(self, mean: Any, logvar: Any) -> None:
        if _is_torch(mean) != _is_torch(logvar):
            raise InvalidArgumentError("mean and logvar must both be numpy arrays or both torch tensors")
        if not _is_torch(mean):
            mean = np.asarray(mean, dtype=np.float64)
            logvar = np.asarray(logvar, dtype=np.float64)
        if tuple(mean.shape) != tuple(logvar.shape):
            raise InvalidArgumentError(
                f"mean and logvar shapes differ: {tuple(mean.shape)} vs {tuple(logvar.shape)}", field="logvar"
            )
        if len(mean.shape) == 0:
            raise InvalidArgumentError(
                "mean must have at least one axis (the latent dimension)", field="mean"
            )
        self.mean = mean
        self.logvar = logvar

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_log_sigma(cls, mean: Any, log_sigma: Any) -> DiagonalGaussian:
        """Build from ``log sigma`` (``logvar = 2 log sigma``, exact in floating point)."""
        return cls(mean, 2.0 * (log_sigma if _is_torch(log_sigma) else np.asarray(log_sigma, np.float64)))

    @classmethod
    def from_std(cls, mean: Any, std: Any) -> DiagonalGaussian:
        """Build from standard deviations ``sigma > 0``."""
        xp = _xp(std)
        if not _is_torch(std):
            std = np.asarray(std, dtype=np.float64)
            if not np.all(np.isfinite(std) & (std > 0)):
                raise InvalidArgumentError("std must be finite and > 0", field="std")
        return cls(mean, 2.0 * xp.log(std))

    # -- properties ---------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Latent dimension d."""
        return int(self.mean.shape[-1])

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape[:-1])

    @property
    def log_sigma(self) -> Any:
        """``(..., d)`` log standard deviations."""
        return 0.5 * self.logvar

    @property
    def std(self) -> Any:
        """``(..., d)`` standard deviations sigma."""
        return _xp(self.logvar).exp(0.5 * self.logvar)

    @property
    def var(self) -> Any:
        """``(..., d)`` variances sigma^2."""
        return _xp(self.logvar).exp(self.logvar)

    def mode(self) -> Any:
        """The most likely point, the mean."""
        return self.mean

    def __len__(self) -> int:
        if not self.batch_shape:
            raise TypeError("a single posterior has no len()")
        return self.batch_shape[0]

    def __getitem__(self, index: Any) -> DiagonalGaussian:
        return DiagonalGaussian(self.mean[index], self.logvar[index])

    def __repr__(self) -> str:
        kind = "torch" if _is_torch(self.mean) else "numpy"
        return f"DiagonalGaussian(batch_shape={self.batch_shape}, dim={self.dim}, backend={kind})"

    # -- densities ----------------------------------------------------------------------------
    def log_prob(self, z: Any) -> Any:
        """``log q(z|x)``, broadcasting ``z (..., d)`` against the batch.

        ``-1/2 sum(((z - mu) / sigma)^2) - sum(log sigma) - d/2 log(2 pi)``. For all pairs of B
        query points and N posteriors use :func:`log_prob_matrix`.
        """
        xp = _xp(self.mean)
        if not _is_torch(self.mean):
            z = np.asarray(z, dtype=np.float64)
        inv_sigma = xp.exp(-0.5 * self.logvar)
        u = (z - self.mean) * inv_sigma
        return -0.5 * (u * u).sum(-1) - 0.5 * self.logvar.sum(-1) - 0.5 * self.dim * LOG_2PI

    def expected_log_prob(self, mean: Any, std: Any) -> Any:
        """``E_{z ~ N(mean, std^2)} log q(z|x)``, broadcasting like :meth:`log_prob`.

        ``-1/2 sum(((mean - mu)^2 + std^2) / sigma^2) - sum(log sigma) - d/2 log(2 pi)``.
        """
        xp = _xp(self.mean)
        if not _is_torch(self.mean):
            mean = np.asarray(mean, dtype=np.float64)
            std = np.asarray(std, dtype=np.float64)
        inv_var = xp.exp(-self.logvar)
        diff = mean - self.mean
        quad = ((diff * diff + std * std) * inv_var).sum(-1)
        return -0.5 * quad - 0.5 * self.logvar.sum(-1) - 0.5 * self.dim * LOG_2PI

    def entropy(self) -> Any:
        """Differential entropy ``sum(log sigma) + d/2 (1 + log 2 pi)``."""
        return 0.5 * self.logvar.sum(-1) + 0.5 * self.dim * (1.0 + LOG_2PI)

    def kl(self, other: DiagonalGaussian | None = None) -> Any:
        """``KL(self || other)``; ``other`` defaults to the standard normal prior N(0, I)."""
        if other is None:
            return 0.5 * (self.mean * self.mean + self.var - 1.0 - self.logvar).sum(-1)
        xp = _xp(self.mean)
        diff = self.mean - other.mean
        ratio = xp.exp(self.logvar - other.logvar)
        return 0.5 * (ratio + diff * diff * xp.exp(-other.logvar) - 1.0 - self.logvar + other.logvar).sum(-1)

    def sample(self, generator: Any = None) -> Any:
        """One reparameterised sample ``mean + std * eps`` of the batch's shape.

        ``generator`` is a ``torch.Generator`` for tensors, a ``numpy.random.Generator`` (or seed)
        for arrays.
        """
        if _is_torch(self.mean):
            import torch

            eps = torch.randn(
                self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
            )
            return self.mean + self.std * eps
        rng = np.random.default_rng(generator)
        return self.mean + self.std * rng.standard_normal(self.mean.shape)

    def numpy(self) -> DiagonalGaussian:
        """A float64 numpy copy (detached from autograd, moved to the CPU)."""
        if _is_torch(self.mean):
            return DiagonalGaussian(
                self.mean.detach().cpu().double().numpy(), self.logvar.detach().cpu().double().numpy()
            )
        return self


def log_prob_matrix(z: np.ndarray, mu: np.ndarray, log_sigma: np.ndarray) -> np.ndarray:
    """All-pairs float64 ``log q(z_b | x_n)``: the brute-force reference ranking.

    Args:
        z: ``(B, d)`` query points.
        mu, log_sigma: ``(N, d)`` posterior means and log standard deviations.

    Returns:
        ``(B, N)`` float64 log-likelihoods.
    """
    z = np.asarray(z, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    log_sigma = np.asarray(log_sigma, dtype=np.float64)
    inv_sigma = np.exp(-log_sigma)
    penalty = log_sigma.sum(-1) + 0.5 * mu.shape[-1] * LOG_2PI  # (N,)
    u = (z[:, None, :] - mu[None, :, :]) * inv_sigma[None, :, :]  # (B, N, d)
    return -0.5 * (u * u).sum(-1) - penalty[None, :]
