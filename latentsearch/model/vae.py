"""The VAE: a convolutional one for images and an MLP one for feature vectors.

Shapes (reader layout, see :mod:`latentsearch.data.readers`): a batch ``x`` is ``(N, H, W, C)`` for images or
``(N, D)`` for feature vectors, in raw data units (uint8 pixels, float features); the network
normalises it itself (:class:`model.config.Normalization`). Latents are ``(N, d)``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latentsearch.errors import InvalidArgumentError
from latentsearch.model.config import VAEConfig
from latentsearch.posterior import DiagonalGaussian

__all__ = ["VAE", "ElboTerms", "build_vae"]


@dataclass(frozen=True)
class ElboTerms:
    """Per-item terms of the negative ELBO, float32, in nats.

    ``recon`` ``(N,)`` is ``-log p(x|z)`` for one posterior sample; ``kl_dims`` ``(N, d)`` is each
    latent dimension's ``KL(q(z_j|x) || N(0, 1))``, and :attr:`kl` ``(N,)`` their sum,
    ``KL(q(z|x) || N(0, I))``. ``mu`` and ``logvar`` ``(N, d)`` are the posterior's parameters (with
    gradient), for loss terms beyond the ELBO.
    """

    recon: torch.Tensor
    kl_dims: torch.Tensor
    mu: torch.Tensor | None = None
    logvar: torch.Tensor | None = None

    @property
    def kl(self) -> torch.Tensor:
        """``(N,)`` ``KL(q(z|x) || N(0, I))``: the sum of :attr:`kl_dims` over the latent axis."""
        return self.kl_dims.sum(-1)

    def neg_elbo(self, beta: float = 1.0) -> torch.Tensor:
        return self.recon + beta * self.kl


def _conv_sizes(h: int, w: int, stages: int) -> list[tuple[int, int]]:
    """Spatial size before each stride-2 (k=3, p=1) conv and after the last: ``ceil(s / 2)`` steps."""
    sizes = [(h, w)]
    for _ in range(stages):
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes


class VAE(nn.Module):
    """Gaussian-posterior VAE with a standard-normal prior.

    Args:
        config: architecture; ``config.input_shape`` is one item in reader layout.

    Methods take raw batches ``(N, *input_shape)`` of any real dtype and latents ``(N, d)``.
    """

    norm_shift: torch.Tensor
    norm_scale: torch.Tensor

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        d = config.latent_dim
        norm = config.normalization
        self.register_buffer("norm_shift", torch.as_tensor(norm.shift, dtype=torch.float32), persistent=False)
        self.register_buffer("norm_scale", torch.as_tensor(norm.scale, dtype=torch.float32), persistent=False)
        if config.arch == "conv":
            h, w, c = config.input_shape
            sizes = _conv_sizes(h, w, len(config.channels))
            chans = (c, *config.channels)
            enc: list[nn.Module] = []
            for cin, cout in itertools.pairwise(chans):
                enc += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            self.enc_conv = nn.Sequential(*enc)
            hb, wb = sizes[-1]
            self._bottleneck = (chans[-1], hb, wb)
            flat = chans[-1] * hb * wb
            self.enc_fc = nn.Sequential(nn.Flatten(), nn.Linear(flat, config.hidden), nn.ReLU(inplace=True))
            self.dec_fc = nn.Sequential(
                nn.Linear(d, config.hidden),
                nn.ReLU(inplace=True),
                nn.Linear(config.hidden, flat),
                nn.ReLU(inplace=True),
            )
            dec: list[nn.Module] = []
            rev = list(reversed(chans))
            for i, (cin, cout) in enumerate(itertools.pairwise(rev)):
                target_h, target_w = sizes[len(sizes) - 2 - i]
                in_h, in_w = sizes[len(sizes) - 1 - i]
                # ConvTranspose (k=3, s=2, p=1) gives 2*in - 1 + output_padding.
                pad = (target_h - (2 * in_h - 1), target_w - (2 * in_w - 1))
                dec.append(nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=pad))
                if i < len(rev) - 2:
                    dec.append(nn.ReLU(inplace=True))
            self.dec_conv = nn.Sequential(*dec)
            head_in = config.hidden
        else:
            layers: list[nn.Module] = [nn.Flatten()]
            width = config.input_size
            for _ in range(config.mlp_layers):
                layers += [nn.Linear(width, config.hidden), nn.ReLU(inplace=True)]
                width = config.hidden
            self.enc_fc = nn.Sequential(*layers)
            dec_layers: list[nn.Module] = []
            width = d
            for _ in range(config.mlp_layers):
                dec_layers += [nn.Linear(width, config.hidden), nn.ReLU(inplace=True)]
                width = config.hidden
            dec_layers.append(nn.Linear(width, config.input_size))
            self.dec_fc = nn.Sequential(*dec_layers)
            head_in = config.hidden
        self.enc_head = nn.Linear(head_in, 2 * d)
        if config.likelihood == "gaussian":
            # Learned per-scalar log standard deviation of p(x|z) in normalised units.
            self.obs_log_sigma = nn.Parameter(torch.zeros(config.input_shape))
        else:
            self.register_parameter("obs_log_sigma", None)

    # -- properties ---------------------------------------------------------------------------
    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.config.input_shape

    # -- encoder ------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, *input_shape)`` raw units -> float32 network units ``(x - shift) * scale``."""
        if tuple(x.shape[1:]) != self.config.input_shape:
            raise InvalidArgumentError(
                f"expected a batch of shape (N, {', '.join(map(str, self.config.input_shape))}), "
                f"got {tuple(x.shape)}",
                field="x",
            )
        return (x.to(torch.float32) - self.norm_shift) * self.norm_scale

    def encode_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, *input_shape)`` raw batch -> ``(mu, logvar)``, each ``(N, d)``."""
        h = self.normalize(x)
        if self.config.arch == "conv":
            # NHWC storage viewed as NCHW is exactly channels_last: no copy.
            h = self.enc_conv(h.permute(0, 3, 1, 2))
        h = self.enc_head(self.enc_fc(h))
        mu, logvar = h.chunk(2, dim=-1)
        return mu, logvar.clamp(self.config.logvar_min, self.config.logvar_max)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """``(N, *input_shape)`` raw batch -> posterior ``q(z|x)`` with ``(N, d)`` torch tensors."""
        return DiagonalGaussian.from_logvar(*self.encode_params(x))

    forward = encode_params

    # -- decoder ------------------------------------------------------------------------------
    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """``(N, d)`` -> ``(N, *input_shape)`` decoder output in network units.

        Bernoulli: logits of each pixel; Gaussian: the mean of p(x|z) in normalised units.
        """
        h = self.dec_fc(z)
        if self.config.arch == "conv":
            h = self.dec_conv(h.view(-1, *self._bottleneck))
            return h.permute(0, 2, 3, 1)
        return h.view(-1, *self.config.input_shape)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(N, d)`` -> ``(N, *input_shape)`` float32 reconstructions.

        Bernoulli (images): pixel intensities in [0, 1]. Gaussian (features): the mean of p(x|z)
        in the data's own units (normalisation undone).
        """
        out = self.decode_logits(z).float()
        if self.config.likelihood == "bernoulli":
            return torch.sigmoid(out)
        return out / self.norm_scale + self.norm_shift

    # -- objective ----------------------------------------------------------------------------
    def elbo_terms(
        self, x: torch.Tensor, generator: torch.Generator | None = None, *, sample: bool = True
    ) -> ElboTerms:
        """Per-item ``-log p(x|z)`` ``(N,)`` (one reparameterised sample, or the mean if
        ``sample=False``) and per-dimension ``KL(q || p)`` ``(N, d)`` for a raw batch
        ``x (N, *input_shape)``; float32."""
        target = self.normalize(x)
        mu, logvar = self.encode_params(x)
        q = DiagonalGaussian.from_logvar(mu.float(), logvar.float())
        z = q.sample(generator) if sample else q.mode()
        out = self.decode_logits(z).float()
        if self.config.likelihood == "bernoulli":
            bce = F.binary_cross_entropy_with_logits(out, target.clamp(0.0, 1.0), reduction="none")
            recon = bce.flatten(1).sum(-1)
        else:
            assert self.obs_log_sigma is not None
            # p(x|z) = N(out, diag(sigma_obs^2)) over the item's flattened scalars (N, D).
            obs_ls = self.obs_log_sigma.float().expand_as(out)
            recon = -DiagonalGaussian(out.flatten(1), log_sigma=obs_ls.flatten(1)).log_prob(target.flatten(1))
        # KL(q || N(0, I)) of a diagonal Gaussian separates over dimensions: (N, d).
        kl_dims = 0.5 * (q.mean * q.mean + q.var - 1.0 - q.logvar)
        return ElboTerms(recon=recon, kl_dims=kl_dims, mu=q.mean, logvar=q.logvar)


def build_vae(config: VAEConfig | None = None, **overrides: object) -> VAE:
    """A freshly initialised :class:`VAE` from ``config`` (default: 28x28x1 conv, d=10)."""
    config = config or VAEConfig()
    if overrides:
        config = config.replace(**overrides)
    return VAE(config)
