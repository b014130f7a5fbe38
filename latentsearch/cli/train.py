"""``latentsearch train``: train a VAE into a model directory."""

from __future__ import annotations

import argparse
import logging

from latentsearch.cli.defaults import add_config_argument
from latentsearch.model.config import TrainConfig, VAEConfig

__all__ = ["register_cli"]

log = logging.getLogger(__name__)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command to the ``latentsearch`` parser (defaults: :class:`TrainConfig`)."""
    p = subparsers.add_parser(
        "train",
        help="train a VAE on a dataset (or the built-in generated garments) into a model directory",
        description="Train a VAE. Without --data, trains on the built-in generated garment-shapes dataset.",
    )
    p.add_argument("--data", help="IDX file/folder, .npy, .npz or a folder of images (default: generated)")
    p.add_argument("--labels", help="labels file for --data (default: found next to the data)")
    p.add_argument("--max-items", type=int, default=None, help="use only the first N items (quick runs)")
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
    from latentsearch.data.garments import NOTICE, garment_dataset
    from latentsearch.data.readers import ArrayDataset, Dataset, open_dataset
    from latentsearch.model.train import train

    if args.data is None:
        print(NOTICE, flush=True)
        data: Dataset = (
            garment_dataset(seed=args.seed)
            if args.max_items is None
            else garment_dataset(n=args.max_items, seed=args.seed)
        )
    else:
        data = open_dataset(args.data, labels=args.labels)
        if args.max_items is not None:
            data = ArrayDataset(
                data.read(0, args.max_items),
                labels=None if data.labels is None else data.labels[: args.max_items],
                path=data.path,
            )
        log.info("training data: %s", data)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        beta=args.beta,
        kl_warmup_epochs=args.kl_warmup,
        free_bits=args.free_bits,
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
    return 0
