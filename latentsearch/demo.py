"""``latentsearch demo``: the whole pipeline on a built-in default, offline, in about a minute.

1. data: the Fashion-MNIST IDX files given with ``--data``, else a generated garment-shapes set;
2. train a small VAE (time-limited) on all but a few held-out items;
3. encode the training items to posteriors and build the search engine;
4. answer searches and print them as tables: held-out images by their posterior (mean point and
   whole distribution), and a slider point z, checked against the float64 brute force and
   contrasted with nearest-mu (Euclidean) search;
5. save the engine, reload it, and write a PNG: the decoded slider point beside its neighbours.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from latentsearch.engine import EngineConfig, SearchEngine, SearchResult

__all__ = ["register_cli", "run_demo"]

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def register_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "demo",
        help="train, index and search end to end on a built-in default (offline)",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("--data", help="Fashion-MNIST IDX file or folder (default: generated garment shapes)")
    p.add_argument("--out", default="demo-out", help="output directory (default ./demo-out)")
    p.add_argument("--items", type=int, default=3000, help="generated items when no --data (default 3000)")
    p.add_argument("--epochs", type=int, default=30, help="maximum training epochs (default 30)")
    p.add_argument("--time-limit", type=float, default=60.0, help="training seconds at most (default 60)")
    p.add_argument("-k", type=int, default=5, help="neighbours shown per query (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=lambda args: run_demo(args))


def _table(
    title: str, result: SearchResult, names: list[str] | None, extra: dict[str, Any] | None = None
) -> str:
    lines = [title]
    lines.append(
        f"  {'rank':>4}  {'id':>8}  {'label':<12}  {'log q(z|x)':>12}"
        + ("  KL" if result.kl is not None else "")
    )
    for n in result:
        label = (
            "-"
            if n.label is None
            else (names[n.label] if names and 0 <= n.label < len(names) else str(n.label))
        )
        row = f"  {n.rank:>4}  {n.id:>8}  {label:<12}  {n.score:>12.3f}"
        if result.kl is not None:
            row += f"  {result.kl[n.rank]:.3f}"
        lines.append(row)
    for key, value in (extra or {}).items():
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    from model.config import TrainConfig
    from model.loader import encode_batch, load_model
    from model.readers import ArrayDataset, open_dataset
    from model.synthetic import GARMENT_CLASSES, NOTICE, garment_dataset
    from model.train import train

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data:
        data = open_dataset(args.data)
        names = data.label_names or FASHION_MNIST_CLASSES
        print(f"data: {len(data)} items of shape {data.item_shape} from {args.data}")
    else:
        print(NOTICE)
        data = garment_dataset(n=args.items, seed=args.seed)
        names = GARMENT_CLASSES
    items = data.read(0, len(data))
    labels = data.labels
    ids = data.batch_ids(0, len(data))
    rng = np.random.default_rng(args.seed)
    held = np.sort(rng.choice(len(data), size=min(5, len(data) // 10 or 1), replace=False))
    keep = np.setdiff1d(np.arange(len(data)), held)

    # -- train ----------------------------------------------------------------------------------
    train_set = ArrayDataset(items[keep], labels=None if labels is None else labels[keep], path=data.path)
    model_dir = out / "model"
    result = train(
        train_set,
        model_dir,
        config=TrainConfig(
            epochs=args.epochs, time_limit_s=args.time_limit, seed=args.seed, progress=not args.no_progress
        ),
        overwrite=True,
    )
    print(
        f"model: {model_dir} (validation -ELBO {result.best_val_neg_elbo:.1f} nats, "
        f"{result.epochs_run} epochs, hash {result.model_hash[:12]})"
    )

    # -- encode and index -------------------------------------------------------------------------
    model = load_model(model_dir, device="cpu")
    mus, logvars = [], []
    for start in range(0, len(keep), 512):
        m, lv = encode_batch(model, items[keep[start : start + 512]])
        mus.append(m)
        logvars.append(lv)
    mu, logvar = np.concatenate(mus), np.concatenate(logvars)
    engine = SearchEngine.build(
        mu,
        logvar=logvar,
        ids=ids[keep],
        labels=None if labels is None else labels[keep],
        config=EngineConfig(),
    )
    print(f"index: {len(engine)} posteriors, d = {engine.dim}")

    # -- search ---------------------------------------------------------------------------------
    k = args.k
    q_mu, q_logvar = encode_batch(model, items[held])
    q_std = np.exp(0.5 * q_logvar.astype(np.float64))
    for i, row in enumerate(held):
        true_label = "-" if labels is None else names[int(labels[row])]
        by_point = engine.search(q_mu[i], k)
        by_dist = engine.search_distribution(q_mu[i], q_std[i], k)
        print()
        print(
            _table(f"held-out item {ids[row]} ({true_label}): query z = its posterior mean", by_point, names)
        )
        print(
            _table("  same item, query = its whole posterior (expected log-likelihood, KL)", by_dist, names)
        )

    z = rng.uniform(-2.0, 2.0, size=engine.dim)
    found = engine.search(z, k)
    reference = engine.brute_force(z[None, :], k)[0]
    same = found.ids == reference.ids and np.allclose(found.scores, reference.scores, rtol=1e-12)
    nearest_mu = np.argsort(((mu.astype(np.float64) - z) ** 2).sum(1), kind="stable")[:k]
    overlap = len(set(nearest_mu.tolist()) & set(found.rows.tolist()))
    print()
    print(
        _table(
            "slider point z = " + np.array2string(z, precision=2, separator=","),
            found,
            names,
            {
                "identical to the float64 brute force": same,
                "nearest-mu (Euclidean) search agrees on": f"{overlap} of {k}",
            },
        )
    )

    # -- save, reload, picture -------------------------------------------------------------------
    index_dir = engine.save(out / "index", overwrite=True)
    reloaded = SearchEngine.load(index_dir, verify=True)
    assert reloaded.search(z, k).ids == found.ids
    grid = out / "slider-neighbours.png"
    _write_grid(grid, model.decode(z[None, :].astype(np.float32)).numpy()[0], items[keep[found.rows]])
    print(f"\nsaved index: {index_dir} (reloaded and verified)")
    print(f"picture: {grid} (decoded z, then its {k} nearest items by log q(z|x))")
    print(f"done in {time.perf_counter() - started:.0f} s; outputs in {out.resolve()}")
    return 0 if same else 1


def _write_grid(path: Path, decoded: np.ndarray, neighbours: np.ndarray, scale: int = 4) -> None:
    """One row: the decoded image, a gap, then the neighbours; grayscale or RGB, upscaled."""
    from PIL import Image

    def to_uint8(img: np.ndarray) -> np.ndarray:
        img = np.asarray(img)
        if img.dtype != np.uint8:
            img = np.clip(np.asarray(img, dtype=np.float64) * (255.0 if img.max() <= 1.0 else 1.0), 0, 255)
            img = img.astype(np.uint8)
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        return img

    tiles = [to_uint8(decoded)] + [to_uint8(n) for n in neighbours]
    h = tiles[0].shape[0]
    gap = np.zeros((h, 4, *tiles[0].shape[2:]), dtype=np.uint8)
    row = np.concatenate([tiles[0], gap, *[np.concatenate([t, gap], axis=1) for t in tiles[1:]]], axis=1)
    Image.fromarray(row).resize((row.shape[1] * scale, h * scale), Image.NEAREST).save(path)
