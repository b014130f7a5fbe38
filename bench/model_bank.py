"""Realistic posterior banks from a trained VAE, of any size, without more data.

``z ~ N(0, I)`` is decoded to an image, which is binarised (Bernoulli sample, as the BCE VAE models
pixels) and encoded back: the posterior q(z|x') of a plausible new item. Repeating this gives a bank
with the sigma structure of real encoder outputs, e.g. 1M posteriors from a Fashion-MNIST model.

Usage::

    python -m bench.model_bank --model MODEL_DIR --n 1000000 --out bank.npz
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def model_bank(model_dir: str, n: int, *, seed: int = 0, batch: int = 4096) -> dict[str, np.ndarray]:
    """Return ``mu``, ``logvar`` (float32, (n, d)) of decode-binarise-encode samples.

    The outputs are allocated once and filled batch by batch (no list of batches concatenated at
    the end, which held two copies): 10M items at d = 10 peak at the 800 MB of the two arrays.
    """
    import torch

    from latentsearch.model import load_model

    model = load_model(model_dir, device="cpu")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    out_mu = np.empty((n, model.latent_dim), dtype=np.float32)
    out_logvar = np.empty((n, model.latent_dim), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, n, batch):
            m = min(batch, n - start)
            z = torch.randn(m, model.latent_dim, generator=gen)
            x = model.decode(z)
            x = torch.bernoulli(x.clamp(0, 1), generator=gen)
            mu, logvar = model.encode_params(x)
            out_mu[start : start + m] = mu.numpy()
            out_logvar[start : start + m] = logvar.numpy()
    return {"mu": out_mu, "logvar": out_logvar}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    t = time.perf_counter()
    bank = model_bank(args.model, args.n, seed=args.seed)
    np.savez(args.out, mu=bank["mu"], logvar=bank["logvar"])
    sigma = np.exp(0.5 * bank["logvar"])
    from latentsearch.model.checkpoint import read_model_hash

    provenance = {
        "method": "z ~ N(0, I) decoded, Bernoulli-binarised, encoded (bench/model_bank.py)",
        "model": str(Path(args.model).resolve()),
        "model_hash": read_model_hash(args.model),
        "items": args.n,
        "seed": args.seed,
        "sigma_median_per_dim": np.round(np.median(sigma, 0), 4).tolist(),
    }
    Path(args.out + ".json").write_text(json.dumps(provenance, indent=2))
    print(
        f"{args.n} posteriors in {time.perf_counter() - t:.1f}s -> {args.out}; "
        f"sigma median per dim {np.round(np.median(sigma, 0), 3).tolist()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
