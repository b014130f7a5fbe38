"""``latentsearch train``: train a VAE into a model directory."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from latentsearch.cli.defaults import add_config_argument
from latentsearch.model.config import TrainConfig, VAEConfig

if TYPE_CHECKING:
    from latentsearch.data.readers import Dataset
    from latentsearch.diagnostics import LatentDiagnostics

__all__ = ["register_cli"]

log = logging.getLogger(__name__)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command to the ``latentsearch`` parser (defaults: :class:`TrainConfig`)."""
    p = subparsers.add_parser(
        "train",
        help="train a VAE on a dataset (default: the built-in Fashion-MNIST sample) into a model directory",
        description="Train a VAE. Without --data, trains on the Fashion-MNIST sample shipped with the "
        "package (3,443 real garment images).",
    )
    p.add_argument(
        "--data",
        help="a built-in dataset (fashion-mnist-sample: 3,443 real garment images, the default; shapes: "
        "generated garment shapes, --max-items of them) or an IDX file/folder, .npy, .npz or a folder "
        "of images",
    )
    p.add_argument("--labels", help="labels file for --data (default: found next to the data)")
    p.add_argument(
        "--max-items", type=int, default=None, help="use only the first N items (shapes: generate N)"
    )
    p.add_argument("--out", required=True, help="model directory to write")
    add_config_argument(p, "--latent-dim", VAEConfig, "latent_dim", "latent dimension d", type=int)
    add_config_argument(p, "--epochs", TrainConfig, "epochs", "maximum epochs", type=int)
    add_config_argument(p, "--batch-size", TrainConfig, "batch_size", "items per step", type=int)
    add_config_argument(p, "--lr", TrainConfig, "lr", "peak learning rate", type=float)
    add_config_argument(p, "--beta", TrainConfig, "beta", "KL weight", type=float)
    add_config_argument(
        p, "--kl-warmup", TrainConfig, "kl_warmup_epochs", "epochs of linear KL warm-up", type=int
    )
    add_config_argument(
        p,
        "--free-bits",
        TrainConfig,
        "free_bits",
        "KL allowance per latent dimension in nats (free bits; 0: off)",
        type=float,
    )
    add_config_argument(
        p,
        "--augment-shift",
        TrainConfig,
        "augment_shift",
        "shift training images by up to this many pixels at random (0: off)",
        type=int,
    )
    add_config_argument(
        p,
        "--consistency-weight",
        TrainConfig,
        "consistency_weight",
        "weight of the posterior-consistency term, -log q(mu(shifted x) | x) (0: off)",
        type=float,
    )
    add_config_argument(
        p,
        "--consistency-shift",
        TrainConfig,
        "consistency_shift",
        "largest shift in pixels of the posterior-consistency copies",
        type=int,
    )
    add_config_argument(p, "--patience", TrainConfig, "patience", "early-stop patience in epochs", type=int)
    add_config_argument(p, "--val-fraction", TrainConfig, "val_fraction", "held-out fraction", type=float)
    add_config_argument(p, "--device", TrainConfig, "device", "device", choices=["auto", "cpu", "cuda"])
    add_config_argument(p, "--seed", TrainConfig, "seed", "random seed", type=int)
    add_config_argument(
        p, "--time-limit", TrainConfig, "time_limit_s", "stop after this many seconds", type=float
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from OUT/training/last.pt")
    g.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from latentsearch.data.builtin import NOTICE, load_data
    from latentsearch.model.train import train

    if args.data is None:
        print(NOTICE, flush=True)
    data = load_data(args.data, labels=args.labels, items=args.max_items, seed=args.seed)
    log.info("training data: %s", data)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        beta=args.beta,
        kl_warmup_epochs=args.kl_warmup,
        free_bits=args.free_bits,
        augment_shift=args.augment_shift,
        consistency_weight=args.consistency_weight,
        consistency_shift=args.consistency_shift,
        patience=args.patience,
        val_fraction=args.val_fraction,
        device=args.device,
        seed=args.seed,
        time_limit_s=args.time_limit,
        progress=not args.no_progress,
    )
    result = train(
        data, args.out, config=cfg, latent_dim=args.latent_dim, resume=args.resume, overwrite=args.overwrite
    )
    print(
        f"model written to {result.out_dir} (model_hash {result.model_hash}); best validation -ELBO "
        f"{result.best_val_neg_elbo:.2f} nats/item at epoch {result.best_epoch} of {result.epochs_run}"
    )
    if result.time_limited:
        print(
            f"WARNING: training stopped at --time-limit {cfg.time_limit_s:g} s after {result.epochs_run} "
            f"of {result.epochs_planned} epochs: the model may be undertrained; run again with --resume "
            "to continue it, or give a larger --time-limit"
        )
    diagnostics = _validation_diagnostics(result.out_dir, data, cfg)
    if diagnostics.collapsed:
        kl = ", ".join(f"{j}: {diagnostics.kl[j]:.3f}" for j in diagnostics.collapsed)
        print(
            f"WARNING: latent dimensions {', '.join(map(str, diagnostics.collapsed))} of {diagnostics.dim} "
            f"collapsed to the prior (mean KL < {diagnostics.threshold:g} nats on the validation split; "
            f"{kl}): moving along them changes nothing. Try --free-bits or a smaller --beta or --latent-dim"
        )
    return 0


def _validation_diagnostics(out_dir: Path, data: Dataset, cfg: TrainConfig) -> LatentDiagnostics:
    """Latent diagnostics (latentsearch.diagnostics) of the trained model on its validation split."""
    import numpy as np

    from latentsearch.diagnostics import latent_diagnostics
    from latentsearch.model.loader import encode_batch, load_model
    from latentsearch.model.train import split_indices

    _, val_rows = split_indices(len(data), cfg.val_fraction, cfg.seed)
    model = load_model(out_dir, device="cpu")
    mus, log_sigmas = [], []
    for i in range(0, len(val_rows), 1024):
        rows = val_rows[i : i + 1024]
        x = np.stack([data.read(int(r), int(r) + 1)[0] for r in rows])
        mu, logvar = encode_batch(model, x)
        mus.append(mu)
        log_sigmas.append(0.5 * logvar.astype(np.float64))
    return latent_diagnostics(np.concatenate(mus), np.concatenate(log_sigmas))
