"""Terms of the training loss: per-dimension free bits (KL thresholds), posterior consistency and a
contrastive ranking term.

With a 10-dimensional latent and the standard ELBO, some dimensions collapse to the prior
(``q(z_j|x) = N(0, 1)`` for every ``x``): the optimiser finds that the KL they cost early in
training outweighs what they would buy in reconstruction, and they never recover. Free bits
(Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive Flow", section on
free bits) give each dimension an allowance of ``lambda`` nats: the loss counts each dimension's
batch-mean KL as ``max(lambda, KL_j)``, so a dimension below its allowance is not pushed further
towards the prior (its KL term has zero gradient) while the reconstruction term may still use it.

Only the training loss changes: validation, checkpoint selection and every reported -ELBO use
the true KL.

Posterior consistency (:func:`consistency_nll`, off by default) is a training option aimed at the
search: a query is ranked against item ``x`` by ``log q(z|x)``, so it adds to the loss the negative
log density that ``q(z|x)`` gives to the posterior mean of a slightly shifted copy of ``x``, which
asks each posterior's sigma to cover where near-copies of its image land.

The contrastive term (:func:`contrastive_nll`, off by default) asks for the search's ranking itself:
among the items of a batch, the posterior mean of a shifted copy of ``x_n`` should rank ``x_n``
first by ``log q(z|x_m)``, the exact score the engine ranks by. It is the cross-entropy of a softmax
over the batch (InfoNCE, van den Oord et al. 2018, "Representation Learning with Contrastive
Predictive Coding"), whose logits are those log densities. Unlike the one-sided consistency term,
which rewards any density at the target, it compares the candidates at one point: a change of every
sigma by one factor adds the same ``-d log(factor)`` to every logit, which cancels, and acts on the
rest as a temperature would.
"""

from __future__ import annotations

import math

import torch

__all__ = ["consistency_nll", "contrastive_nll", "kl_penalty"]


def kl_penalty(kl_dims: torch.Tensor, free_bits: float = 0.0) -> torch.Tensor:
    """The KL term of a batch's training loss, in nats per item (a scalar tensor).

    Args:
        kl_dims: ``(N, d)`` per-item, per-dimension ``KL(q(z_j|x) || N(0, 1))``
            (:attr:`model.vae.ElboTerms.kl_dims`).
        free_bits: per-dimension allowance ``lambda`` in nats; ``0`` gives the plain mean KL.

    Returns ``sum_j max(lambda, mean_n kl_dims[n, j])``: with ``lambda = 0`` the batch mean of
    ``KL(q(z|x) || N(0, I))``. A dimension whose batch-mean KL is below ``lambda`` adds the constant
    ``lambda`` (zero gradient); one above it adds its KL, as without free bits.
    """
    per_dim = kl_dims.mean(0)  # (d,)
    if free_bits <= 0.0:
        return per_dim.sum()
    return torch.clamp(per_dim, min=free_bits).sum()


def consistency_nll(mu: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-item ``-log q(target_n | x_n)`` in nats, ``(N,)``, for ``q(z|x_n) = N(mu_n, diag(exp(logvar_n)))``.

    ``mu``, ``logvar`` and ``target`` are ``(N, d)``; per item
    ``0.5 * sum_j ((target_j - mu_j)^2 / exp(logvar_j) + logvar_j + log(2 pi))``. The caller passes
    ``target`` without gradient (the posterior means of augmented copies), so only ``q(z|x)`` moves.
    """
    sq = (target - mu).square() * torch.exp(-logvar)
    return 0.5 * (sq + logvar + math.log(2.0 * math.pi)).sum(-1)


def contrastive_nll(
    mu: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-query InfoNCE loss in nats, ``(N,)``: how far ``target_n`` is from ranking item ``n`` first.

    Args:
        mu, logvar: ``(N, d)`` posteriors ``q(z|x_m) = N(mu_m, diag(exp(logvar_m)))`` of the batch
            (the candidates, with gradient).
        target: ``(N, d)`` query points, ``target_n`` belonging to item ``n`` (the posterior means of
            shifted copies; the caller decides whether they carry gradient).
        temperature: ``T > 0``; the logits are divided by it.

    With the logits ``L[n, m] = log q(target_n | x_m)
    = -0.5 * sum_j ((target_nj - mu_mj)^2 / exp(logvar_mj) + logvar_mj + log(2 pi))``, ``(N, N)``,
    returns ``-L[n, n] / T + logsumexp_m (L[n, m] / T)``: the cross-entropy of a softmax over the
    batch with label ``n``. It is ``>= 0``, and ``log N`` when every candidate scores alike.
    """
    diff = target[:, None, :] - mu[None, :, :]  # (N, N, d): query n, candidate m
    inv_var = torch.exp(-logvar)[None, :, :]  # (1, N, d)
    logits = -0.5 * (diff.square() * inv_var + logvar[None, :, :] + math.log(2.0 * math.pi)).sum(-1)
    logits = logits / temperature  # (N, N)
    return torch.logsumexp(logits, dim=1) - logits.diagonal()
