"""The encode step: batches in, ``(mu, logvar)`` out, streamed into memory-mapped float32 files.

:func:`encode_posteriors` is a pure function of (model weights, batch), so the same code can run
per batch on any worker of a cluster engine. :func:`encode_dataset` drives it over a dataset and
writes ``mu.npy`` and ``logvar.npy`` (each ``(N, d)`` float32, ``.npy`` format, memory-mapped) as it
goes, so the dataset never has to fit in memory.

On CUDA the batch is copied from pinned host memory with a non-blocking copy, the encoder runs in
inference mode, optionally under bf16 autocast, and ``mu``/``logvar`` come back as float32. On CPU
torch uses every core (or ``num_threads``).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentsearch.data.readers import Dataset
from latentsearch.errors import InvalidArgumentError
from latentsearch.indexer.catalogue import StagedPayloads
from latentsearch.model.device import configure_cpu_threads
from latentsearch.model.loader import LoadedModel, encode_batch
from latentsearch.progress import Progress

__all__ = ["EncodedPosteriors", "check_encodable", "encode_dataset", "encode_posteriors"]

log = logging.getLogger(__name__)

MU_FILE = "mu.npy"
LOGVAR_FILE = "logvar.npy"


def encode_posteriors(
    model: LoadedModel, batch: np.ndarray, *, bf16: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Encode one batch: ``(B, *item_shape)`` -> ``(mu, logvar)``, each ``(B, d)`` float32 numpy.

    Pure: depends only on the model's weights and the batch. CPU models go through
    :func:`model.loader.encode_batch` unchanged. CUDA models get the batch through pinned memory
    and a non-blocking copy, inference mode and (``bf16``) bfloat16 autocast; the outputs are cast
    back to float32.
    """
    device = model.device
    if device.type != "cuda":
        return encode_batch(model, batch)
    t = torch.from_numpy(np.ascontiguousarray(batch)).pin_memory()  # pragma: no cover - needs CUDA
    with (
        torch.inference_mode(),
        torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16),
    ):  # pragma: no cover
        mu, logvar = model.encode_params(t)  # .to(device, non_blocking=True) inside prepare()
    return (  # pragma: no cover
        mu.float().to("cpu").numpy(),
        logvar.float().to("cpu").numpy(),
    )


@dataclass(frozen=True)
class EncodedPosteriors:
    """Posteriors written by :func:`encode_dataset`.

    Attributes:
        mu, logvar: ``(N, d)`` float32, memory-mapped read-only from ``directory``.
        seconds: wall time of the encoding loop.
        payloads: the items' catalogue payloads and content hashes when the encode step computed them
            where it read the items (``index --ray``); ``None`` (a local encode): the job reads them.
    """

    directory: Path
    mu: np.ndarray
    logvar: np.ndarray
    seconds: float
    payloads: StagedPayloads | None = None

    def __len__(self) -> int:
        return int(self.mu.shape[0])


def _prefetch(batches: Iterator[tuple[int, np.ndarray]], depth: int = 2) -> Iterator[tuple[int, np.ndarray]]:
    """Read the next batches on a background thread (decoding overlaps the forward pass)."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker() -> None:
        try:
            for item in batches:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # re-raised in the consumer
            put(exc)

    thread = threading.Thread(target=worker, name="indexer-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()
        thread.join(timeout=5)


def check_encodable(model: LoadedModel, dataset: Dataset) -> None:
    """Raise InvalidArgumentError (``field="data"``) unless ``model`` can encode ``dataset``'s items:
    a non-empty dataset whose items hold as many values as the model's input (possibly permuted or
    flattened; see :meth:`model.loader.LoadedModel.prepare`)."""
    if len(dataset) == 0:
        raise InvalidArgumentError("the dataset is empty", field="data")
    if int(np.prod(dataset.item_shape)) != int(np.prod(model.input_shape)):
        raise InvalidArgumentError(
            f"dataset items have shape {dataset.item_shape}, the model takes {model.input_shape}",
            field="data",
        )


def encode_dataset(
    model: LoadedModel,
    dataset: Dataset,
    directory: str | Path,
    *,
    batch_size: int = 1024,
    bf16: bool = False,
    num_threads: int | None = None,
    progress: bool = True,
) -> EncodedPosteriors:
    """Encode every item of ``dataset`` into ``directory/mu.npy`` and ``directory/logvar.npy``.

    Args:
        model: the encoder (its ``input_shape`` must match the dataset's items, possibly permuted or
            flattened; see :meth:`model.loader.LoadedModel.prepare`).
        dataset: ``N`` items streamed with ``iter_batches(batch_size)``.
        directory: where the two ``(N, d)`` float32 ``.npy`` files go (created).

    Returns:
        The files memory-mapped read-only.
    """
    check_encodable(model, dataset)
    n, d = len(dataset), model.latent_dim
    if model.device.type == "cpu":
        configure_cpu_threads(num_threads)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    mu = np.lib.format.open_memmap(out / MU_FILE, mode="w+", dtype=np.float32, shape=(n, d))
    logvar = np.lib.format.open_memmap(out / LOGVAR_FILE, mode="w+", dtype=np.float32, shape=(n, d))
    start = time.perf_counter()
    bar = Progress(n, desc="encode", unit="item", enabled=progress, logger=log, unit_scale=True)
    try:
        for row, batch in _prefetch(dataset.iter_batches(batch_size)):
            m, lv = encode_posteriors(model, batch, bf16=bf16)
            if m.shape != (batch.shape[0], d) or lv.shape != m.shape:
                raise InvalidArgumentError(
                    f"encoder returned mu {m.shape} / logvar {lv.shape} for a batch of {batch.shape[0]} "
                    f"items; expected ({batch.shape[0]}, {d})",
                    field="model",
                )
            mu[row : row + len(m)] = m
            logvar[row : row + len(m)] = lv
            bar.update(len(m))
    finally:
        bar.close()
    mu.flush()
    logvar.flush()
    seconds = time.perf_counter() - start
    del mu, logvar
    log.info("encoded %d items in %.2f s (%.0f items/s)", n, seconds, n / max(seconds, 1e-9))
    return EncodedPosteriors(
        directory=out,
        mu=np.load(out / MU_FILE, mmap_mode="r"),
        logvar=np.load(out / LOGVAR_FILE, mmap_mode="r"),
        seconds=seconds,
    )
