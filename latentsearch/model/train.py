"""Training: ELBO with beta, KL warm-up, free bits and shift augmentation, held-out validation, early
stopping, resume.

CPU runs are bit-reproducible for a given seed and thread count: the split, the initialisation,
every epoch's shuffle and every posterior sample come from generators seeded by ``(seed, epoch)``,
so resuming from ``training/last.pt`` continues exactly as an uninterrupted run would. On CUDA
the forward/backward passes run under bf16 autocast (the loss is computed in float32).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentsearch.data.builtin import NOTICE, load_data
from latentsearch.data.readers import Dataset
from latentsearch.errors import FailedPreconditionError, InvalidArgumentError
from latentsearch.model.augment import random_shift
from latentsearch.model.checkpoint import CHECKSUMS_FILE, CONFIG_FILE, WEIGHTS_FILE, save_checkpoint
from latentsearch.model.config import Normalization, TrainConfig, VAEConfig
from latentsearch.model.device import configure_cpu_threads, resolve_device
from latentsearch.model.objective import consistency_nll, contrastive_nll, kl_penalty
from latentsearch.model.vae import VAE, ElboTerms
from latentsearch.progress import Progress

__all__ = ["TRAIN_STATE", "TrainResult", "default_vae_config", "split_indices", "train", "training_done"]

log = logging.getLogger(__name__)

TRAIN_STATE = "training/last.pt"
_EVAL_BATCH = 1024


@dataclass
class TrainResult:
    """What a training run produced. ``history`` holds one dict per epoch."""

    out_dir: Path
    model_hash: str
    best_val_neg_elbo: float
    best_epoch: int
    epochs_run: int
    # Stopped before `epochs_planned`: on a plateau (early stopping) or by the time limit.
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    # TrainConfig.epochs of the run.
    epochs_planned: int = 0
    # The time limit (TrainConfig.time_limit_s) ended the run before `epochs_planned`, not a plateau:
    # the model may be undertrained (a WARNING was logged; the run can be resumed).
    time_limited: bool = False


def default_vae_config(
    data: Dataset, *, latent_dim: int = VAEConfig.latent_dim, train_rows: np.ndarray | None = None
) -> VAEConfig:
    """A :class:`VAEConfig` fitted to ``data``: conv + Bernoulli for images, MLP + Gaussian for vectors.

    Images: uint8 pixels are scaled by 1/255, float pixels are taken as already in [0, 1].
    Vectors: standardised by the mean/std of ``train_rows`` (default: all rows).
    """
    if data.kind == "image":
        scale = 1.0 / 255.0 if data.dtype == np.uint8 else 1.0
        return VAEConfig(
            arch="conv",
            input_shape=data.item_shape,
            latent_dim=latent_dim,
            likelihood="bernoulli",
            normalization=Normalization(kind="scale", shift=0.0, scale=scale),
        )
    x = data.to_array().astype(np.float64)
    if train_rows is not None:
        x = x[train_rows]
    mean = x.mean(0)
    std = np.where(x.std(0) > 1e-12, x.std(0), 1.0)
    return VAEConfig(
        arch="mlp",
        input_shape=data.item_shape,
        latent_dim=latent_dim,
        likelihood="gaussian",
        normalization=Normalization(
            kind="standardize", shift=[float(v) for v in mean], scale=[float(1.0 / v) for v in std]
        ),
    )


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train_rows, val_rows), both sorted; at least one row in each."""
    if n < 2:
        raise InvalidArgumentError(
            f"need at least 2 items to train (1 for validation), got {n}", field="data"
        )
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.lr_schedule == "constant":
        return cfg.lr
    warm = max(1, min(100, total // 20))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _kl_weight(cfg: TrainConfig, epoch: int, step_in_epoch: int, steps: int) -> float:
    if cfg.kl_warmup_epochs <= 0:
        return cfg.beta
    progress = (epoch + step_in_epoch / steps) / cfg.kl_warmup_epochs
    return cfg.beta * min(1.0, progress)


def _autocast(dev: torch.device, enabled: bool) -> Any:
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=enabled and dev.type == "cuda")


@torch.no_grad()
def evaluate(
    model: VAE, x: torch.Tensor, *, seed: int, device: torch.device, amp: bool = False
) -> dict[str, float]:
    """Mean per-item ``-ELBO`` (one posterior sample, beta = 1), reconstruction and KL, in nats."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    tot_r = tot_k = 0.0
    for i in range(0, len(x), _EVAL_BATCH):
        xb = x[i : i + _EVAL_BATCH].to(device, non_blocking=True)
        with _autocast(device, amp):
            terms = model.elbo_terms(xb, gen)
        tot_r += float(terms.recon.double().sum())
        tot_k += float(terms.kl.double().sum())
    model.train(was_training)
    n = max(len(x), 1)
    return {"neg_elbo": (tot_r + tot_k) / n, "recon": tot_r / n, "kl": tot_k / n}


def _prepare_out(out: Path, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    state_path = out / TRAIN_STATE
    existing = [p for p in (out / WEIGHTS_FILE, out / CONFIG_FILE, state_path) if p.exists()]
    if resume:
        if not state_path.is_file():
            raise FailedPreconditionError(f"{state_path}: nothing to resume (no training state)")
        return dict(torch.load(state_path, map_location="cpu", weights_only=True))
    if existing:
        if not overwrite:
            raise FailedPreconditionError(
                f"{out}: already holds a model; pass --resume to continue it or --overwrite to replace it"
            )
        for name in (WEIGHTS_FILE, CONFIG_FILE, CHECKSUMS_FILE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "training", ignore_errors=True)
    return None


@dataclass
class _Split:
    """The data side of a run: the split tensors and what ``config.json`` records about them."""

    x_train: torch.Tensor  # (n_train, *item_shape), raw data units, on the device for CUDA runs
    x_val: torch.Tensor  # (n_val, *item_shape)
    fingerprint: str  # Dataset.fingerprint() of all items
    info: dict[str, Any]  # the checkpoint's "data" record


@dataclass
class _Progress:
    """Where a run stands between epochs; what ``training/last.pt`` records."""

    epoch: int = 0  # epochs completed
    best: float = math.inf  # lowest validation -ELBO so far, nats
    best_epoch: int = -1  # 1-based epoch of `best` (-1: none yet)
    bad: int = 0  # epochs since the last improvement
    history: list[dict[str, float]] = field(default_factory=list)
    model_hash: str = ""  # hash of the checkpoint written at `best_epoch`
    stopped: bool = False  # the last epoch stopped the run early (plateau or time limit)


@dataclass
class _Run:
    """What stays fixed over a run's epochs."""

    cfg: TrainConfig
    out: Path
    dev: torch.device
    vae_config: VAEConfig
    split: _Split
    model: VAE
    opt: torch.optim.Optimizer


def train(
    data: Dataset | None,
    out_dir: str | Path,
    *,
    config: TrainConfig | None = None,
    vae_config: VAEConfig | None = None,
    latent_dim: int = VAEConfig.latent_dim,
    resume: bool = False,
    overwrite: bool = False,
    val_rows: np.ndarray | None = None,
) -> TrainResult:
    """Train a VAE on ``data`` and write the best (lowest validation -ELBO) model to ``out_dir``.

    Args:
        data: items to train on; ``None`` uses the built-in Fashion-MNIST sample (and says so).
        out_dir: model directory (:mod:`model.checkpoint` layout, plus ``training/last.pt``).
        config: training knobs (:class:`TrainConfig`).
        vae_config: architecture; default fitted to ``data`` (:func:`default_vae_config`).
        latent_dim: d, when ``vae_config`` is not given.
        resume: continue from ``out_dir/training/last.pt``.
        overwrite: replace a model already in ``out_dir``.
        val_rows: the rows of ``data`` to hold out for validation (e.g. one fold of a
            cross-validation); the rest are trained on. Default: the seeded split by
            ``config.val_fraction`` (:func:`split_indices`).
    """
    cfg = config or TrainConfig()
    out = Path(out_dir)
    if data is None:
        log.warning("%s", NOTICE)
        data = load_data(None)
    dev = resolve_device(cfg.device)
    if dev.type == "cpu":
        configure_cpu_threads()
    state = _prepare_out(out, resume=resume, overwrite=overwrite)
    vae_config, split = _split_data(data, cfg, vae_config, latent_dim, dev, val_rows)
    torch.manual_seed(cfg.seed)
    model = VAE(vae_config).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = _Run(cfg, out, dev, vae_config, split, model, opt)
    if state is None:
        progress = _Progress()
    else:
        progress = _restore(run, state)
        # A run that plateaued or reached `epochs` is finished; a larger --epochs extends it.
        if progress.epoch >= cfg.epochs or progress.bad >= cfg.patience:
            log.info("%s: training had already finished (epoch %d of %d)", out, progress.epoch, cfg.epochs)
            return _result(out, progress, cfg)
    t0 = time.perf_counter()
    for epoch in range(progress.epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        means = _train_epoch(run, epoch)
        val = evaluate(model, split.x_val, seed=cfg.seed, device=dev, amp=cfg.amp)
        rate = len(split.x_train) / (time.perf_counter() - t_epoch)
        progress.history.append(_epoch_row(cfg, epoch, means, val, rate))
        why = _end_epoch(run, progress, val, t0)
        if why is not None:
            log.info(
                "early stop after epoch %d: %s (best val -ELBO %.2f at epoch %d)",
                progress.epoch,
                why,
                progress.best,
                progress.best_epoch,
            )
            break
    result = _result(out, progress, cfg)
    if result.time_limited:
        log.warning(
            "training was cut short by its time limit (%g s) after %d of %d epochs: the model may be "
            "undertrained; allow more time or resume it (%s)",
            cfg.time_limit_s,
            result.epochs_run,
            result.epochs_planned,
            out,
        )
    return result


def training_done(out_dir: str | Path) -> bool | None:
    """Whether the run recorded in ``out_dir/training/last.pt`` has finished (all its epochs, or a
    plateau): False when a time limit stopped it earlier (it can be resumed), None without a state."""
    path = Path(out_dir) / TRAIN_STATE
    if not path.is_file():
        return None
    return bool(torch.load(path, map_location="cpu", weights_only=True).get("done"))


def _split_data(
    data: Dataset,
    cfg: TrainConfig,
    vae_config: VAEConfig | None,
    latent_dim: int,
    dev: torch.device,
    val_rows: np.ndarray | None = None,
) -> tuple[VAEConfig, _Split]:
    """The train/validation split of ``data`` (``val_rows`` held out, else the seeded split) and the
    model config (fitted to the training rows when not given)."""
    explicit = val_rows is not None
    if val_rows is None:
        train_rows, val_rows = split_indices(len(data), cfg.val_fraction, cfg.seed)
    else:
        train_rows, val_rows = _explicit_split(len(data), val_rows)
    if vae_config is None:
        vae_config = default_vae_config(data, latent_dim=latent_dim, train_rows=train_rows)
    if tuple(vae_config.input_shape) != data.item_shape:
        raise InvalidArgumentError(
            f"model input_shape {vae_config.input_shape} does not match the data's items {data.item_shape}",
            field="input_shape",
        )
    fingerprint = data.fingerprint()
    all_x = torch.from_numpy(np.ascontiguousarray(data.to_array()).copy())
    x_train, x_val = all_x[torch.from_numpy(train_rows)], all_x[torch.from_numpy(val_rows)]
    del all_x
    if dev.type == "cuda":
        x_train, x_val = x_train.to(dev), x_val.to(dev)
    info = {
        "fingerprint": fingerprint,
        "source": data.path or "array",
        "n_items": len(data),
        "item_shape": list(data.item_shape),
        "dtype": data.dtype.name,
        "n_train": len(train_rows),
        "n_val": len(val_rows),
        "split_seed": cfg.seed,
    }
    if explicit:
        info["split"] = "explicit val_rows"
        del info["split_seed"]
    return vae_config, _Split(x_train, x_val, fingerprint, info)


def _explicit_split(n: int, val_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(train_rows, val_rows)``, both sorted, from the held-out rows of ``n`` items (distinct,
    in range, at least one held out and one left to train on)."""
    val = np.unique(np.asarray(val_rows, dtype=np.int64))
    if len(val) != len(np.asarray(val_rows)) or len(val) == 0 or val[0] < 0 or val[-1] >= n or len(val) >= n:
        raise InvalidArgumentError(
            f"val_rows must be distinct rows in [0, {n}), at least one and fewer than {n}", field="val_rows"
        )
    return np.setdiff1d(np.arange(n), val), val


def _restore(run: _Run, state: dict[str, Any]) -> _Progress:
    """Load ``state`` (a ``training/last.pt``) into the model and optimiser; its progress."""
    if (
        state.get("vae_config") != run.vae_config.to_dict()
        or state.get("data_fingerprint") != run.split.fingerprint
    ):
        raise FailedPreconditionError(
            f"{run.out / TRAIN_STATE}: was trained with another model config or other data; cannot resume"
        )
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    progress = _Progress(
        epoch=int(state["epoch"]),
        best=float(state["best"]),
        best_epoch=int(state["best_epoch"]),
        bad=int(state["bad_epochs"]),
        history=list(state["history"]),
        model_hash=str(state["model_hash"]),
        stopped=bool(state["stopped"]),
    )
    log.info("resuming %s at epoch %d (best val -ELBO %.2f)", run.out, progress.epoch + 1, progress.best)
    return progress


def _train_epoch(run: _Run, epoch: int) -> np.ndarray:
    """One seeded pass over the training split; the epoch's mean (loss, recon, kl), shape (3,)."""
    cfg, model, opt, dev, x_train = run.cfg, run.model, run.opt, run.dev, run.split.x_train
    n_train = len(x_train)
    steps = math.ceil(n_train / cfg.batch_size)
    total = steps * cfg.epochs
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    eps_gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1_000_033 + epoch)
    aug_gen = torch.Generator().manual_seed(cfg.seed * 1_000_037 + epoch)
    cons_gen = torch.Generator().manual_seed(cfg.seed * 1_000_039 + epoch)
    contr_gen = torch.Generator().manual_seed(cfg.seed * 1_000_081 + epoch)
    shift = cfg.augment_shift if x_train.ndim == 4 else 0  # images (N, H, W, C) only
    order = torch.randperm(n_train, generator=gen).to(x_train.device)
    sums = np.zeros(3)
    t_epoch = time.perf_counter()
    bar = _progress(cfg, steps, epoch)
    for s in range(steps):
        idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
        xb = random_shift(x_train[idx].to(dev, non_blocking=True), shift, aug_gen)
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, epoch * steps + s, total)
        with _autocast(dev, cfg.amp):
            terms = model.elbo_terms(xb, eps_gen)
        recon, kl = terms.recon.mean(), terms.kl.mean()
        # The KL term the optimiser sees (free bits per dimension); `kl` is the true mean KL.
        loss = recon + _kl_weight(cfg, epoch, s, steps) * kl_penalty(terms.kl_dims, cfg.free_bits)
        if cfg.consistency_weight > 0 and x_train.ndim == 4:
            loss = loss + cfg.consistency_weight * _consistency(run, xb, terms, cons_gen)
        if cfg.contrastive_weight > 0 and x_train.ndim == 4:
            loss = loss + cfg.contrastive_weight * _contrastive(run, xb, terms, contr_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sums += (float(loss.detach()), float(recon.detach()), float(kl.detach()))
        bar.update(1)
        if bar.enabled:
            seen = min((s + 1) * cfg.batch_size, n_train)
            bar.set_postfix(
                loss=f"{sums[0] / (s + 1):.1f}",
                recon=f"{sums[1] / (s + 1):.1f}",
                kl=f"{sums[2] / (s + 1):.2f}",
                items_s=f"{seen / (time.perf_counter() - t_epoch):.0f}",
            )
    bar.close()
    return sums / steps


def _consistency(run: _Run, xb: torch.Tensor, terms: ElboTerms, gen: torch.Generator) -> torch.Tensor:
    """The batch mean of ``-log q(mu(x') | x)`` (:func:`model.objective.consistency_nll`), ``x'`` each
    image of ``xb`` ``(N, H, W, C)`` shifted at random by up to ``consistency_shift`` pixels."""
    assert terms.mu is not None and terms.logvar is not None
    with torch.no_grad(), _autocast(run.dev, run.cfg.amp):
        target, _ = run.model.encode_params(random_shift(xb, run.cfg.consistency_shift, gen))
    return consistency_nll(terms.mu, terms.logvar, target.float()).mean()


def _contrastive(run: _Run, xb: torch.Tensor, terms: ElboTerms, gen: torch.Generator) -> torch.Tensor:
    """The batch mean of the InfoNCE term (:func:`model.objective.contrastive_nll`): each image of
    ``xb`` ``(N, H, W, C)`` shifted at random by up to ``contrastive_shift`` pixels, its posterior mean
    the query, the batch's posteriors ``terms.mu``, ``terms.logvar`` the candidates."""
    assert terms.mu is not None and terms.logvar is not None
    cfg = run.cfg
    with torch.set_grad_enabled(cfg.contrastive_target_grad), _autocast(run.dev, cfg.amp):
        target, _ = run.model.encode_params(random_shift(xb, cfg.contrastive_shift, gen))
    nll = contrastive_nll(terms.mu.float(), terms.logvar.float(), target.float(), cfg.contrastive_temperature)
    return nll.mean()


def _epoch_row(
    cfg: TrainConfig, epoch: int, means: np.ndarray, val: dict[str, float], rate: float
) -> dict[str, float]:
    """The history row of 0-based ``epoch`` (training means, validation terms, items/s), logged."""
    row = {
        "epoch": epoch + 1,
        "loss": float(means[0]),
        "recon": float(means[1]),
        "kl": float(means[2]),
        "val_neg_elbo": val["neg_elbo"],
        "val_recon": val["recon"],
        "val_kl": val["kl"],
        "items_per_s": rate,
    }
    log.info(
        "epoch %d/%d: loss %.2f (recon %.2f, kl %.2f) | val -ELBO %.2f (recon %.2f, kl %.2f) | %.0f it/s",
        epoch + 1,
        cfg.epochs,
        row["loss"],
        row["recon"],
        row["kl"],
        val["neg_elbo"],
        val["recon"],
        val["kl"],
        rate,
    )
    return row


def _end_epoch(run: _Run, progress: _Progress, val: dict[str, float], t0: float) -> str | None:
    """Checkpoint an improvement, apply early stopping, save the state; why the run stops, or None.

    ``t0`` is the ``time.perf_counter()`` at which the run's epochs began (for ``time_limit_s``).
    """
    cfg = run.cfg
    progress.epoch += 1
    if val["neg_elbo"] < progress.best - cfg.min_delta:
        progress.best, progress.best_epoch, progress.bad = val["neg_elbo"], progress.epoch, 0
        progress.model_hash = save_checkpoint(
            run.model,
            run.out,
            train_config=cfg,
            data=run.split.info,
            metrics={
                "val_neg_elbo": progress.best,
                "epoch": progress.best_epoch,
                "val_recon": val["recon"],
                "val_kl": val["kl"],
            },
        )
    else:
        progress.bad += 1
    over_time = cfg.time_limit_s is not None and time.perf_counter() - t0 > cfg.time_limit_s
    plateau = progress.bad >= cfg.patience
    progress.stopped = plateau or over_time
    # A time-limited stop stays resumable; a plateau or the last epoch ends the run.
    _save_state(run, progress, done=plateau or progress.epoch == cfg.epochs)
    if not progress.stopped:
        return None
    return "time limit reached" if over_time else f"no improvement for {progress.bad} epochs"


def _result(out: Path, progress: _Progress, cfg: TrainConfig) -> TrainResult:
    plateau = progress.bad >= cfg.patience
    return TrainResult(
        out,
        progress.model_hash,
        progress.best,
        progress.best_epoch,
        progress.epoch,
        progress.stopped,
        progress.history,
        epochs_planned=cfg.epochs,
        time_limited=progress.stopped and not plateau and progress.epoch < cfg.epochs,
    )


def _progress(cfg: TrainConfig, steps: int, epoch: int) -> Progress:
    """The step progress of 0-based ``epoch`` (a bar on a terminal, else a periodic log line)."""
    desc = f"epoch {epoch + 1}/{cfg.epochs}"
    return Progress(steps, desc=desc, unit="step", enabled=cfg.progress, leave=False, logger=log)


def _save_state(run: _Run, progress: _Progress, *, done: bool) -> None:
    """Write ``training/last.pt`` atomically: the progress, the model and the optimiser state."""
    path = run.out / TRAIN_STATE
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "epoch": progress.epoch,
        "best": progress.best,
        "best_epoch": progress.best_epoch,
        "bad_epochs": progress.bad,
        "history": progress.history,
        "model_hash": progress.model_hash,
        "vae_config": run.vae_config.to_dict(),
        "data_fingerprint": run.split.fingerprint,
        "done": done,
        "stopped": progress.stopped,
        "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
        "optimizer": run.opt.state_dict(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
