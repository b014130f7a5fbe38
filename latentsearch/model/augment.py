"""Training-time augmentation of image batches: random translations by whole pixels.

A shift by a pixel or two changes a garment's raw pixels a lot and its class not at all; training
the VAE on randomly shifted copies (a fresh shift per item and step, the target being the shifted
image) teaches the encoder to map such copies close together, so neighbours in latent space
depend less on exact placement than raw-pixel neighbours do. Uncovered pixels are filled with 0
(Fashion-MNIST's black background). Only the training batches are augmented: validation, the
reported -ELBO and encoding use the images as they are.
"""

from __future__ import annotations

import torch

__all__ = ["random_shift"]


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` ``(N, H, W, C)`` translated by its own ``(dy, dx)``, each drawn uniformly
    from ``[-max_shift, max_shift]`` with ``gen`` (a CPU generator), zero-filled; same shape/dtype.

    ``max_shift = 0`` returns ``x`` itself. Row ``r`` of item ``n`` of the result is row
    ``r - dy[n]`` of the input (0 outside it); columns likewise with ``dx[n]``.
    """
    if max_shift <= 0:
        return x
    n, h, w = x.shape[0], x.shape[1], x.shape[2]
    s = min(max_shift, h - 1, w - 1)
    offsets = torch.randint(-s, s + 1, (n, 2), generator=gen).to(x.device)  # (N, 2): dy, dx
    padded = torch.nn.functional.pad(x, (0, 0, s, s, s, s))  # (N, H + 2s, W + 2s, C), zeros around
    rows = torch.arange(h, device=x.device)[None, :] + s - offsets[:, :1]  # (N, H) padded row of out row r
    cols = torch.arange(w, device=x.device)[None, :] + s - offsets[:, 1:]  # (N, W)
    items = torch.arange(n, device=x.device)[:, None, None]
    return padded[items, rows[:, :, None], cols[:, None, :]]  # one gather: (N, H, W, C)
