"""Model benchmark: train on the Fashion-MNIST sample, report quality and CPU encode throughput.

    python -m bench.bench_model [--data DIR] [--out bench/results] [--time-limit S]

Reports validation -ELBO (single sample, beta = 1), top-1 label agreement of log q(z|x)
neighbours (query = held-out image's posterior mean, bank = training posteriors; brute force
:meth:`latentsearch.posterior.DiagonalGaussian.log_prob`), the raw-pixel nearest-neighbour baseline
on the same split, and encode throughput (median of several runs) vs a bare forward pass of the same network.
Writes ``<out>/model-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentsearch.data.garments import NOTICE, garment_dataset
from latentsearch.data.readers import open_dataset
from latentsearch.model.config import TrainConfig
from latentsearch.model.device import configure_cpu_threads
from latentsearch.model.loader import encode_batch, load_model
from latentsearch.model.train import split_indices, train
from latentsearch.posterior import DiagonalGaussian

log = logging.getLogger("bench.bench_model")

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-mnist"
# Training settings used for the reported figures (beta < 1 sharpens posteriors for retrieval;
# the reported -ELBO is always the standard beta = 1 bound).
BENCH_TRAIN: dict[str, Any] = {
    "epochs": 40,
    "batch_size": 64,
    "lr": 2e-3,
    "beta": 0.5,
    "patience": 8,
    "seed": 0,
}


def _top1(query_mu: np.ndarray, bank_mu: np.ndarray, bank_logvar: np.ndarray, chunk: int = 256) -> np.ndarray:
    bank = DiagonalGaussian.from_logvar(bank_mu, bank_logvar)  # (N,)
    out = []
    for i in range(0, len(query_mu), chunk):
        out.append(bank.log_prob(query_mu[i : i + chunk, None, :]).argmax(1))  # (chunk, N) -> (chunk,)
    return np.concatenate(out)


def _raw_nn(query: np.ndarray, bank: np.ndarray, chunk: int = 256) -> np.ndarray:
    q = query.reshape(len(query), -1).astype(np.float32)
    b = bank.reshape(len(bank), -1).astype(np.float32)
    bn = (b * b).sum(1)
    return np.concatenate(
        [(bn[None, :] - 2 * q[i : i + chunk] @ b.T).argmin(1) for i in range(0, len(q), chunk)]
    )


def _throughput(fns: dict[str, Callable[[Any], Any]], xs: dict[str, Any], batch: int, repeats: int) -> dict:
    """Images/s of each fn over its input, runs interleaved so all see the same machine load.

    Returns ``{name: {"median": ..., "best": ..., "runs": [...]}}``.
    """
    for name, fn in fns.items():
        fn(xs[name][:batch])  # warm-up
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            x = xs[name]
            t = time.perf_counter()
            for i in range(0, len(x), batch):
                fn(x[i : i + batch])
            runs[name].append(len(x) / (time.perf_counter() - t))
    return {
        n: {"median": statistics.median(r), "best": max(r), "runs": [round(v) for v in r]}
        for n, r in runs.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("LATENTSEARCH_FASHION_MNIST", str(DEFAULT_DATA)))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--time-limit", type=float, default=240.0, help="training wall-clock cap (s)")
    parser.add_argument("--batch", type=int, default=1024, help="encode batch size")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = configure_cpu_threads()

    data_path = Path(args.data)
    if data_path.exists():
        data = open_dataset(data_path)
        data_desc = str(data.path)
    else:
        print(f"{data_path} not found; {NOTICE}")
        data = garment_dataset()
        data_desc = data.path or "generated"
    cfg = TrainConfig(**BENCH_TRAIN, time_limit_s=args.time_limit, device="cpu", progress=False)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = train(data, Path(tmp) / "model", config=cfg)
        train_s = time.perf_counter() - t0
        model = load_model(Path(tmp) / "model")

    x = data.to_array()
    labels = data.labels
    tr, va = split_indices(len(data), cfg.val_fraction, cfg.seed)
    mu, logvar = encode_batch(model, x)
    quality: dict[str, float | None] = {"top1_logq": None, "top1_raw_pixels": None}
    if labels is not None:
        pred = _top1(mu[va], mu[tr], logvar[tr])
        quality["top1_logq"] = float((labels[tr][pred] == labels[va]).mean())
        quality["top1_raw_pixels"] = float((labels[tr][_raw_nn(x[va], x[tr])] == labels[va]).mean())

    # Throughput on 28x28 images, tiled from the data to ~16k items.
    xt = np.ascontiguousarray(np.concatenate([x] * max(1, 16384 // len(x)))[:16384])
    vae: Any = model.module
    x_float = torch.from_numpy(xt.copy()).float() / 255.0

    def bare(b: torch.Tensor) -> None:  # the same network on ready float tensors: no convert/normalise/copy
        with torch.inference_mode():
            h = vae.enc_conv(b.permute(0, 3, 1, 2))
            vae.enc_head(vae.enc_fc(h))

    load_before = os.getloadavg()[0]
    tp = _throughput(
        {"encode_batch": lambda b: encode_batch(model, b), "bare_forward": bare},
        {"encode_batch": xt, "bare_forward": x_float},
        args.batch,
        args.repeats,
    )
    enc_rate, bare_rate = tp["encode_batch"]["median"], tp["bare_forward"]["median"]

    best = min(res.history, key=lambda h: h["val_neg_elbo"])
    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "data": data_desc,
        "n_items": len(data),
        "n_train": len(tr),
        "n_val": len(va),
        "train_config": cfg.to_dict(),
        "train_seconds": round(train_s, 1),
        "epochs_run": res.epochs_run,
        "best_epoch": res.best_epoch,
        "val_neg_elbo": round(res.best_val_neg_elbo, 2),
        "val_recon": round(best["val_recon"], 2),
        "val_kl": round(best["val_kl"], 2),
        "top1_logq": quality["top1_logq"],
        "top1_raw_pixels": quality["top1_raw_pixels"],
        "encode_batch": args.batch,
        "encode_images_per_s": round(enc_rate),
        "bare_forward_images_per_s": round(bare_rate),
        "throughput_runs": tp,
        "load_average_1min_before_throughput": round(load_before, 2),
        "model_hash": res.model_hash,
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "targets": {"val_neg_elbo_lt": 280, "top1_logq_ge": 0.72, "encode_images_per_s_ge": 10000},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"model-{dt.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    t1 = "n/a" if quality["top1_logq"] is None else f"{quality['top1_logq']:.3f}"
    raw = "n/a" if quality["top1_raw_pixels"] is None else f"{quality['top1_raw_pixels']:.3f}"
    md = [
        f"# Model benchmark ({report['date']})",
        "",
        f"Data: `{data_desc}` ({len(data)} items; {len(tr)} train / {len(va)} held out). "
        f"CPU threads: {threads}, torch {torch.__version__}.",
        f"Training: d=10 conv VAE, {res.epochs_run} epochs in {train_s:.0f} s "
        f"(batch {cfg.batch_size}, lr {cfg.lr}, beta {cfg.beta}, cosine schedule), "
        f"best epoch {res.best_epoch}.",
        "",
        "| metric | value | target |",
        "| --- | --- | --- |",
        f"| validation -ELBO (1 sample, beta=1), nats/image | {res.best_val_neg_elbo:.2f} "
        f"(recon {best['val_recon']:.2f} + KL {best['val_kl']:.2f}) | < 280 |",
        f"| top-1 label agreement, log q(z\\|x) brute force | {t1} | >= 0.72 |",
        f"| top-1 label agreement, raw-pixel NN (baseline) | {raw} | (~0.77) |",
        f"| encode throughput (encode_batch, batch {args.batch}), images/s | {enc_rate:,.0f} | >= 10,000 |",
        f"| bare forward pass of the encoder, images/s | {bare_rate:,.0f} | |",
        "",
        f"Throughput: median of {args.repeats} interleaved runs over {len(xt):,} images (best: encode_batch "
        f"{tp['encode_batch']['best']:,.0f}, bare {tp['bare_forward']['best']:,.0f}); 1-min load average "
        f"before measuring {load_before:.2f} on a machine shared with other jobs, so figures are noisy.",
        "",
        f"model_hash `{res.model_hash}`",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
