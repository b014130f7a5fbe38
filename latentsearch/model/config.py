"""Typed configuration of the VAE and of its training, with every default in one place.

Both configs are frozen keyword-only dataclasses that round-trip through plain JSON
(:meth:`to_dict` / :meth:`from_dict`), so a checkpoint's ``config.json`` is the config itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from latentsearch.errors import InvalidArgumentError

__all__ = [
    "Architecture",
    "Likelihood",
    "Normalization",
    "TrainConfig",
    "VAEConfig",
]

Architecture = Literal["conv", "mlp"]
Likelihood = Literal["bernoulli", "gaussian"]


@dataclass(frozen=True, kw_only=True)
class Normalization:
    """How raw data units become the network's input: ``x_norm = (x - shift) * scale``.

    ``shift`` and ``scale`` are scalars (images: ``shift=0, scale=1/255`` for uint8 pixels, ``1``
    for float pixels already in [0, 1]) or per-feature lists of length D (feature vectors:
    standardisation by the training mean and standard deviation).
    """

    # "scale": images, x / 255 (or x / 1); "standardize": per-feature (x - mean) / std.
    kind: Literal["scale", "standardize"] = "scale"
    # Subtracted first; a scalar or one value per feature.
    shift: float | list[float] = 0.0
    # Multiplied second; a scalar or one value per feature.
    scale: float | list[float] = 1.0 / 255.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalization:
        return _from_dict(cls, d)


@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """Architecture of a :class:`model.vae.VAE`. Defaults fit 28x28 grayscale images (Fashion-MNIST).

    ``input_shape`` is one item in reader layout: ``(H, W, C)`` for images, ``(D,)`` for feature
    vectors.
    """

    # "conv" for images (H, W, C), "mlp" for feature vectors (D,) (or flattened images).
    arch: Architecture = "conv"
    # One item's shape in reader layout: (H, W, C) images or (D,) features.
    input_shape: tuple[int, ...] = (28, 28, 1)
    # Latent dimension d.
    latent_dim: int = 10
    # Conv encoder channels per stride-2 stage (the decoder mirrors them).
    channels: tuple[int, ...] = (16, 32)
    # Width of the fully connected layers (conv: after the conv stack; mlp: every hidden layer).
    hidden: int = 256
    # Number of hidden layers of the MLP encoder/decoder (arch="mlp" only).
    mlp_layers: int = 2
    # "bernoulli" (BCE; data in [0, 1]) for images, "gaussian" (MSE-like, learned per-feature
    # scale) for real-valued features.
    likelihood: Likelihood = "bernoulli"
    # Raw data units -> network input.
    normalization: Normalization = field(default_factory=Normalization)
    # Log-variance outputs are clamped to this range for numerical safety.
    logvar_min: float = -12.0
    logvar_max: float = 8.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if isinstance(self.normalization, dict):
            object.__setattr__(self, "normalization", Normalization.from_dict(self.normalization))
        if self.arch not in ("conv", "mlp"):
            raise InvalidArgumentError(f"arch must be 'conv' or 'mlp', got {self.arch!r}", field="arch")
        if self.likelihood not in ("bernoulli", "gaussian"):
            raise InvalidArgumentError(
                f"likelihood must be 'bernoulli' or 'gaussian', got {self.likelihood!r}", field="likelihood"
            )
        if self.latent_dim < 1:
            raise InvalidArgumentError(f"latent_dim must be >= 1, got {self.latent_dim}", field="latent_dim")
        if not self.input_shape or any(s < 1 for s in self.input_shape):
            raise InvalidArgumentError(f"bad input_shape {self.input_shape}", field="input_shape")
        if self.arch == "conv":
            if len(self.input_shape) != 3:
                raise InvalidArgumentError(
                    f"arch='conv' needs input_shape (H, W, C), got {self.input_shape}", field="input_shape"
                )
            if not self.channels:
                raise InvalidArgumentError("arch='conv' needs at least one channel stage", field="channels")
        if self.hidden < 1 or self.mlp_layers < 1:
            raise InvalidArgumentError("hidden and mlp_layers must be >= 1", field="hidden")

    @property
    def input_size(self) -> int:
        """Number of scalars in one item."""
        n = 1
        for s in self.input_shape:
            n *= s
        return n

    def replace(self, **changes: Any) -> VAEConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        return _from_dict(cls, d)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every knob of :func:`model.train.train`, with its default."""

    # Passes over the training split (early stopping may end sooner). 50 rather than 40 on the
    # Fashion-MNIST sample (bench_model, seeds 0 and 1, 1 CPU thread, same load): the best epoch was
    # 39-40 of 40, still improving; with 50 (the cosine schedule stretched to match) top-1 label
    # agreement of log q neighbours 0.766/0.767 vs 0.754/0.766 and validation -ELBO 249.7/244.2 vs
    # 250.2/244.9 nats, for 1.18x the training time.
    epochs: int = 50
    # Items per optimisation step. 32 rather than 64 on the Fashion-MNIST sample (4 seeds): top-1
    # label agreement of log q neighbours +0.01, validation -ELBO -2 nats, for ~1.45x the CPU time.
    # 64 with 70 epochs (5-fold CV, bench/results/model-2026-12-01-cv2.md): 0.756 vs 0.765 (paired
    # -0.009 +- 0.006).
    batch_size: int = 32
    # Adam learning rate at the peak of the schedule. 1e-3 and 3e-3 (5-fold CV, cv2 file above): top-1
    # label agreement of log q neighbours 0.760 and 0.758 vs 0.765 (paired -0.005, -0.007 +- 0.006).
    lr: float = 2e-3
    # Decoupled weight decay (AdamW).
    weight_decay: float = 0.0
    # "cosine": warm start then cosine decay to lr * lr_min_ratio over `epochs`; "constant".
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    lr_min_ratio: float = 0.05
    # Fraction of items held out for validation (chosen by seed; at least one item).
    val_fraction: float = 0.15
    # Weight of the KL term in the training loss (beta-VAE; 1.0 is the standard ELBO). 0.5 sharpens
    # the posteriors for search: on the Fashion-MNIST sample (4 seeds, batches of 64) top-1
    # label agreement of log q neighbours 0.755 vs 0.730 at beta 1, validation -ELBO (always reported
    # at beta 1) 249.4 vs 248.7 nats; 0.35 and 0.7 were no better. Validation uses beta 1. 5-fold CV
    # (cv2 file above): 0.4 gave 0.769 vs 0.765 (paired +0.004 +- 0.005), below mu-L2 of the same model
    # (-0.003 +- 0.006).
    beta: float = 0.5
    # Epochs over which the KL weight ramps linearly from 0 to beta (0: no warm-up). Off: 5-fold CV
    # (bench/results/model-2026-12-01-cv2.md) with 10 epochs gave top-1 label agreement of log q
    # neighbours 0.769 vs 0.765 (paired +0.004 +- 0.006), and with augment_shift 1 as well 0.774
    # (+0.010 +- 0.006, within noise), but mu-L2 on the same models rose more (0.771, 0.780), so log q
    # ranked below it (-0.001 +- 0.006, -0.006 +- 0.005; 164/184 top-1 wins/losses), and the shift
    # made training 1.95x the pre-issue-18 defaults' time (the limit is 2x).
    kl_warmup_epochs: int = 0
    # Free bits (KL threshold) per latent dimension, in nats: the training loss counts each
    # dimension's batch-mean KL as at least this much, so no dimension is pushed onto the prior
    # (see model.objective; 0: the plain KL). Validation and the reported -ELBO use the true KL.
    # Without it 1-3 of 10 dimensions collapse (mean KL ~0.01 nats); 0.12 keeps every one above
    # 0.1 nats on held-out images; larger allowances (0.25-1.0) cost top-1 label agreement
    # (a barely used dimension adds noise to the log q ranking); 0.2 in 5-fold CV (cv2 file above):
    # 0.761 vs 0.765 (paired -0.004 +- 0.005).
    free_bits: float = 0.12
    # Augmentation of image batches (model.augment): each training item is translated by a random
    # whole-pixel (dy, dx) in [-augment_shift, augment_shift] every step (0: off; feature vectors: never).
    # Off: with 1 pixel, 5-fold cross-validation on the Fashion-MNIST sample (bench/results/
    # model-2026-12-01-cv.md) gave top-1 label agreement of log q neighbours 0.769 vs 0.765 (paired
    # +0.005 +- 0.006), still level with mu-L2 of the same model (+0.000 +- 0.005), and validation
    # -ELBO 249.5 vs 247.9 nats. With beta 0.4 as well (model-2026-12-01-cv2.md): 0.771 (paired +0.006
    # +- 0.006), mu-L2 0.770 (+0.001 +- 0.005), -ELBO 250.3, but 2.09x the pre-issue-18 defaults' time.
    augment_shift: int = 0
    # Posterior consistency (model.objective.consistency_nll; 0: off): the training loss adds this
    # weight times the mean -log q(mu(x') | x) in nats, x' being each training item shifted by a
    # random whole-pixel (dy, dx) in [-consistency_shift, consistency_shift] (a fresh shift per item and
    # step; mu(x') is held fixed), so that sigma covers where near-copies of an image land. Images only.
    # Off: on fold 0 of the 5-fold cross-validation (bench/results/model-2026-12-01-cv.md) weight 0.2
    # gave top-1 label agreement of log q neighbours 0.734 vs 0.762 (mu-L2 0.749 vs 0.740) for 1.2x the
    # time, and weight 1 drove the KL to ~50 nats (its -sum log sigma outweighs beta's pull to the prior).
    consistency_weight: float = 0.0
    consistency_shift: int = 1
    # Contrastive ranking term (model.objective.contrastive_nll; 0: off): the training loss adds this
    # weight times the batch mean of an InfoNCE cross-entropy in nats whose logits are the search's
    # score, L[n, m] = log q(mu(x'_n) | x_m) / contrastive_temperature over the batch's items m, x'_n
    # being item n shifted by a random whole-pixel (dy, dx) in [-contrastive_shift, contrastive_shift]
    # (a fresh shift per item and step): the shifted copy should rank its own image first. mu(x') is
    # held fixed unless contrastive_target_grad. One more encoder pass per step. Images only.
    # Off: in 5-fold CV on the Fashion-MNIST sample (bench/results/model-2026-12-02-contrastive.md;
    # the default there: top-1 label agreement of log q neighbours 0.768, mu-L2 0.765) weight 3 gave
    # 0.757 (paired vs default -0.010 +- 0.006), weight 3 / 10 / 20 with the target's gradient 0.763 /
    # 0.758 / 0.754 (-0.005, -0.010, -0.014 +- 0.006), weight 10 at temperature 0.5 0.752, each below
    # mu-L2 of the same model (-0.004 to -0.007 +- 0.006), for 1.2x (fixed target) to 1.35x (with its
    # gradient) the default's training time; weights 10 (fixed target) and 30 disturbed training
    # (fold 0: -ELBO 258.5 and 308.4 nats).
    contrastive_weight: float = 0.0
    contrastive_shift: int = 1
    contrastive_temperature: float = 1.0
    contrastive_target_grad: bool = False
    # Stop when validation -ELBO has not improved by `min_delta` nats for `patience` epochs.
    patience: int = 8
    min_delta: float = 0.05
    # "auto": cuda when available, else cpu.
    device: str = "auto"
    # Seed of the split, initialisation, shuffling and sampling (CPU training is bit-reproducible).
    seed: int = 0
    # bf16 autocast on CUDA (ignored on CPU).
    amp: bool = True
    # Clip the global gradient norm (0: off).
    grad_clip: float = 0.0
    # Progress on stderr: a bar on a terminal, else a log line every few seconds (latentsearch.progress).
    progress: bool = True
    # Cap on wall-clock training seconds (None: no cap); checked between epochs.
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise InvalidArgumentError("epochs and batch_size must be >= 1", field="epochs")
        if not 0.0 < self.val_fraction < 1.0:
            raise InvalidArgumentError(
                f"val_fraction must be in (0, 1), got {self.val_fraction}", field="val_fraction"
            )
        if not self.lr > 0:
            raise InvalidArgumentError(f"lr must be > 0, got {self.lr}", field="lr")
        if not self.beta >= 0:
            raise InvalidArgumentError(f"beta must be >= 0, got {self.beta}", field="beta")
        if self.kl_warmup_epochs < 0:
            raise InvalidArgumentError(
                f"kl_warmup_epochs must be >= 0, got {self.kl_warmup_epochs}", field="kl_warmup_epochs"
            )
        if self.augment_shift < 0:
            raise InvalidArgumentError(
                f"augment_shift must be >= 0 pixels, got {self.augment_shift}", field="augment_shift"
            )
        for name in ("consistency", "contrastive"):  # each training term: a weight and a shift
            _check_loss_weight(f"{name}_weight", getattr(self, f"{name}_weight"))
            _check_shift(f"{name}_shift", getattr(self, f"{name}_shift"))
        if not 0.0 < self.contrastive_temperature < math.inf:
            raise InvalidArgumentError(
                f"contrastive_temperature must be a finite number > 0, got {self.contrastive_temperature}",
                field="contrastive_temperature",
            )
        if not 0.0 <= self.free_bits < math.inf:
            raise InvalidArgumentError(
                f"free_bits must be a finite number of nats >= 0, got {self.free_bits}", field="free_bits"
            )

    def replace(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, d)


def _check_loss_weight(field: str, value: float) -> None:
    """Raise InvalidArgumentError naming ``field`` unless the loss weight ``value`` is finite and >= 0."""
    if not 0.0 <= value < math.inf:
        raise InvalidArgumentError(f"{field} must be a finite number >= 0, got {value}", field=field)


def _check_shift(field: str, value: int) -> None:
    """Raise InvalidArgumentError naming ``field`` unless the augmentation shift ``value`` is >= 1 pixel."""
    if value < 1:
        raise InvalidArgumentError(f"{field} must be >= 1 pixel, got {value}", field=field)


def _from_dict(cls: Any, d: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise InvalidArgumentError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    return cls(**d)
