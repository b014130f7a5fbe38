"""``latentsearch quickstart``: train, index, serve and query end to end, offline, in under a minute.

1. data: the Fashion-MNIST sample shipped with the package (3,443 real garment images) unless
   ``--data`` names another dataset (``shapes``: generated garment shapes; or a path); a few items
   are held out and the rest written to ``OUT/data/items.npz`` (the indexed items);
2. model: train a small VAE into ``OUT/model`` for a fixed number of epochs (no time limit unless
   ``--time-limit`` is given; when it cuts training short, a WARNING and the summary say so), or
   reuse the one there when it was trained with the same settings on the same items (a run a time
   limit cut short is resumed);
3. index: run the indexer (:func:`indexer.run_index_job`), which publishes a new version into
   the versioned index root ``OUT/index``;
4. serve: start the gRPC server in-process on 127.0.0.1 (``--port 0``: any free port), with the
   explorer page and HTTP/JSON API beside it (``--http-port``; its URL is printed);
5. query through the Python client (:class:`latentsearch.client.LatentSearchClient`): Info, Nearest
   for a slider point z (checked against the float64 brute force over the indexed posteriors
   and contrasted with nearest-mu search), Encode + Nearest + NearestToDistribution for the
   held-out items, and Decode of the slider point; print the neighbours as tables (label names, and
   each neighbour's match probability p(i|z) with the query's log q(z) and typicality);
6. write ``OUT/neighbours.png`` (row 1: decoded z, then its nearest items; one row per held-out
   item: the item, then its nearest items by posterior) and ``OUT/decoded.png`` (the server's PNG);
7. while the server still runs: save a screenshot of the page as ``OUT/explorer.png`` (when a Chromium is
   found, :mod:`latentsearch.browser`) and, with ``--keep-serving``, serve until Ctrl-C or SIGTERM;
8. stop the server (the port is closed afterwards) and say where the outputs are.

``latentsearch demo`` is an alias of this command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from latentsearch.browser import screenshot
from latentsearch.client import DecodedImage, Hit, LatentSearchClient, SearchAnswer
from latentsearch.data.builtin import NOTICE, load_data
from latentsearch.data.fashion_mnist import FASHION_MNIST_CLASSES
from latentsearch.data.readers import open_dataset
from latentsearch.engine.engine import SearchEngine
from latentsearch.errors import InvalidArgumentError, LatentSearchError
from latentsearch.indexer import IndexJobConfig, IndexRoot, JobResult, run_index_job
from latentsearch.model.checkpoint import CONFIG_FILE, is_checkpoint_dir
from latentsearch.model.config import TrainConfig
from latentsearch.model.loader import load_model
from latentsearch.model.train import TRAIN_STATE, TrainResult, train, training_done
from latentsearch.server.app import LatentSearchServer, ServerConfig

__all__ = [
    "FASHION_MNIST_CLASSES",
    "QuickstartConfig",
    "QuickstartResult",
    "run_quickstart",
]

log = logging.getLogger(__name__)

# Items of --data shapes when --items is not given.
DEFAULT_GENERATED_ITEMS = 3000
ITEMS_FILE = "items.npz"
EXPLORER_PNG = "explorer.png"  # the explorer page's screenshot, in OUT


@dataclass(frozen=True, kw_only=True)
class QuickstartConfig:
    """Every knob of :func:`run_quickstart`, with its default."""

    # Output directory: data/, model/, index/ (versioned root), neighbours.png, decoded.png, explorer.png.
    out: Path = Path("quickstart-out")
    # A built-in dataset name (data.builtin: "fashion-mnist-sample", "shapes") or a path open_dataset
    # reads; None: the packaged Fashion-MNIST sample (3,443 real images).
    data: str | None = None
    # Items used (None: every item of the data; 3000 for the generated "shapes").
    items: int | None = None
    # Items held out of training and of the index, queried by their posterior.
    held_out: int = 3
    # Training: epochs (early stopping may end sooner); about 35 s on 2 idle cores for the default items.
    epochs: int = 30
    # Wall-clock cap on training, checked between epochs (None: none). A run it cuts short is reported.
    time_limit_s: float | None = None
    latent_dim: int = 10
    # gRPC port on 127.0.0.1 (0: any free port).
    port: int = 0
    # The explorer page and HTTP/JSON API on 127.0.0.1 (0: any free port; None: not served).
    http_port: int | None = 0
    # After the queries, keep serving (gRPC and the page) until Ctrl-C or SIGTERM.
    keep_serving: bool = False
    # Save a screenshot of the page as OUT/explorer.png when a headless Chromium is found
    # (latentsearch.browser); without one the run says why and goes on.
    screenshot: bool = True
    # Neighbours per query.
    k: int = 5
    seed: int = 0
    # Progress on stderr: a bar on a terminal, else a log line every few seconds (latentsearch.progress).
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.items is not None and self.items < self.held_out + 20:
            raise InvalidArgumentError(f"items must be >= {self.held_out + 20}", field="items")
        if self.held_out < 1 or self.k < 1 or self.epochs < 1 or self.latent_dim < 1:
            raise InvalidArgumentError("held_out, k, epochs and latent_dim must be >= 1", field="k")
        if not 0 <= self.port < 65536:
            raise InvalidArgumentError(f"port must be in [0, 65535], got {self.port}", field="port")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise InvalidArgumentError(
                f"http_port must be in [0, 65535], got {self.http_port}", field="http_port"
            )
        if self.time_limit_s is not None and not self.time_limit_s >= 0:
            raise InvalidArgumentError(
                f"time_limit_s must be >= 0 seconds, got {self.time_limit_s}", field="time_limit"
            )


@dataclass(frozen=True)
class QuickstartResult:
    """What a run produced (paths, the served port, the slider query and its answer)."""

    out: Path
    items_file: Path
    model_dir: Path
    model_reused: bool
    index_root: Path
    index_version: str
    grid_png: Path
    decoded_png: Path
    port: int
    slider_z: np.ndarray
    slider_hits: list[Hit]
    matches_brute_force: bool
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    # The training run (None when the model was reused as it was).
    training: TrainResult | None = None
    # The explorer page's screenshot (None: none taken, see QuickstartConfig.screenshot).
    explorer_png: Path | None = None

    @property
    def training_cut(self) -> str | None:
        """Why the model may be undertrained: the time limit stopped training early (None: it did not)."""
        t = self.training
        if t is None or not t.time_limited:
            return None
        return f"training stopped by --time-limit after {t.epochs_run} of {t.epochs_planned} epochs"


# -- the job ------------------------------------------------------------------------------------
def run_quickstart(config: QuickstartConfig) -> QuickstartResult:
    """Run the whole pipeline (see the module docstring) and print what it does."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    with _timed(timings, "data"):
        data = _prepare_data(config)
    model_dir = out / "model"
    with _timed(timings, "train"):
        training = _train_or_reuse(config, data.items_file, model_dir)
    index_root = out / "index"
    with _timed(timings, "index"):
        job = _publish_index(config, data.items_file, model_dir, index_root)
    _print_index(job, index_root)
    # The published engine, for the brute-force check and the nearest-mu contrast.
    engine = IndexRoot(index_root).load(job.version)
    with _timed(timings, "serve+query"):
        answers = _serve_and_query(config, data, engine, index_root, model_dir)
    closed = _port_closed(answers.port)
    print(f"\nserver: stopped (port {answers.port} {'closed' if closed else 'STILL OPEN'})")
    grid, decoded_png, size = _write_pictures(out, data, answers)
    seconds = time.perf_counter() - started
    result = QuickstartResult(
        out=out,
        items_file=data.items_file,
        model_dir=model_dir,
        model_reused=training is None,
        index_root=index_root,
        index_version=job.version,
        grid_png=grid,
        decoded_png=decoded_png,
        port=answers.port,
        slider_z=answers.z,
        slider_hits=list(answers.slider.hits),
        matches_brute_force=answers.matches_brute_force,
        seconds=seconds,
        timings=timings,
        training=training,
        explorer_png=answers.explorer_png,
    )
    _print_report(result, size, config.k)
    return result


@contextlib.contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    """Record the seconds the block takes as ``timings[step]``."""
    t0 = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - t0


@dataclass(frozen=True)
class _Data:
    """The indexed items (written to ``items_file``) and the held-out ones, queried by posterior."""

    items_file: Path
    names: list[str] | None  # class names by label
    held_items: np.ndarray  # (held_out, *item_shape), in the dataset's dtype
    held_labels: list[int | None]
    held_ids: list[str]


def _prepare_data(config: QuickstartConfig) -> _Data:
    """Pick the items, hold a few out, write the rest to ``OUT/data/items.npz`` (when changed)."""
    if config.data is None:
        print(NOTICE)
    items = config.items or (DEFAULT_GENERATED_ITEMS if config.data == "shapes" else None)
    dataset = load_data(config.data, items=items, seed=config.seed)
    n = len(dataset)
    # Class names: the dataset's; IDX files given by path are taken to be Fashion-MNIST's.
    names = dataset.label_names or FASHION_MNIST_CLASSES
    print(f"data: {n} items of shape {dataset.item_shape} from {dataset.path}")
    if n < config.held_out + 20:
        raise InvalidArgumentError(f"{n} items are too few for the quickstart", field="items")
    x = dataset.read(0, n)
    labels = None if dataset.labels is None else np.asarray(dataset.labels[:n], dtype=np.int64)
    ids = np.asarray(dataset.batch_ids(0, n)).astype(str)
    rng = np.random.default_rng(config.seed)
    held = np.sort(rng.choice(n, size=config.held_out, replace=False))
    keep = np.setdiff1d(np.arange(n), held)
    arrays: dict[str, np.ndarray] = {"x": x[keep], "ids": ids[keep]}
    if labels is not None:
        arrays["y"] = labels[keep]
        if dataset.label_names:  # the index version keeps the class names (open_dataset reads them back)
            arrays["label_names"] = np.array(dataset.label_names)
    items_file = config.out / "data" / ITEMS_FILE
    _write_npz_if_changed(items_file, arrays)
    return _Data(
        items_file=items_file,
        names=names,
        held_items=np.asarray(x[held]),
        held_labels=[None if labels is None else int(labels[r]) for r in held],
        held_ids=[str(ids[r]) for r in held],
    )


def _write_npz_if_changed(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` atomically, unless ``path`` already holds exactly them (keeps the reuse cheap)."""
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as old:
                if set(old.files) == set(arrays) and all(
                    old[key].dtype == value.dtype and np.array_equal(old[key], value)
                    for key, value in arrays.items()
                ):
                    return
        except (OSError, ValueError):
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def _load_items(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {"x": z["x"], "ids": z["ids"].astype(str)}


def _train_settings(config: QuickstartConfig) -> TrainConfig:
    return TrainConfig(
        epochs=config.epochs, time_limit_s=config.time_limit_s, seed=config.seed, progress=config.progress
    )


def _comparable(training: dict[str, Any]) -> dict[str, Any]:
    """Training settings that decide the model: not the display, nor the time limit (a run it cut short is
    resumed, see :func:`_train_or_reuse`)."""
    return {key: value for key, value in training.items() if key not in ("progress", "time_limit_s")}


def _train_or_reuse(config: QuickstartConfig, items_file: Path, model_dir: Path) -> TrainResult | None:
    """Train into ``model_dir``, unless the model there matches settings and data; None when reused.

    A matching model whose training a time limit cut short is resumed, not reused.
    """
    dataset = open_dataset(items_file)
    settings = _train_settings(config)
    resume = False
    if is_checkpoint_dir(model_dir):
        try:
            saved = json.loads((model_dir / CONFIG_FILE).read_text())
            same = (
                _comparable(saved.get("training") or {}) == _comparable(settings.to_dict())
                and (saved.get("data") or {}).get("fingerprint") == dataset.fingerprint()
                and (saved.get("vae") or {}).get("latent_dim") == config.latent_dim
            )
            done = training_done(model_dir) if same else None
            if done:
                model = load_model(model_dir, device="cpu")  # verifies the checksums
                print(f"model: reusing {model_dir} (same settings and items; hash {model.model_hash[:12]})")
                return None
            resume = done is False
        except (OSError, ValueError, RuntimeError, LatentSearchError) as exc:
            log.warning("not reusing %s: %s", model_dir, exc)
    if resume:
        print(f"model: resuming the training in {model_dir / TRAIN_STATE} (a time limit stopped it early)")
    result = train(
        dataset, model_dir, config=settings, latent_dim=config.latent_dim, resume=resume, overwrite=True
    )
    print(
        f"model: trained {model_dir} (validation -ELBO {result.best_val_neg_elbo:.1f} nats, "
        f"{result.epochs_run} of {result.epochs_planned} epochs, hash {result.model_hash[:12]})"
    )
    if result.time_limited:
        print(_cut_warning(result, config))
    return result


def _cut_warning(result: TrainResult, config: QuickstartConfig) -> str:
    return (
        f"WARNING: training stopped at --time-limit {config.time_limit_s:g} s after {result.epochs_run} of "
        f"{result.epochs_planned} epochs: the model is undertrained (decoded pictures may be grey blobs). "
        "Run the same command again to resume it, or give a larger --time-limit (or none)."
    )


def _publish_index(
    config: QuickstartConfig, items_file: Path, model_dir: Path, index_root: Path
) -> JobResult:
    """Encode the items with the model and publish a new version into ``index_root``."""
    return run_index_job(
        IndexJobConfig(
            out=index_root,
            model=str(model_dir),
            data=str(items_file),
            device="auto",
            keep=3,
            progress=config.progress,
        )
    )


def _print_index(job: JobResult, index_root: Path) -> None:
    print(f"index: {job.summary()}")
    print(f"       root {index_root} (versions: {', '.join(IndexRoot(index_root).versions())})")


@dataclass(frozen=True)
class _Answers:
    """What the queries through the client returned."""

    port: int
    z: np.ndarray  # (d,) the slider point
    slider: SearchAnswer  # Nearest for z
    matches_brute_force: bool  # slider == the engine's float64 brute force
    held_out: list[SearchAnswer]  # NearestToDistribution per held-out item
    decoded: DecodedImage  # Decode of z
    explorer_png: Path | None = None  # the page's screenshot, when taken


def _serve_and_query(
    config: QuickstartConfig, data: _Data, engine: SearchEngine, index_root: Path, model_dir: Path
) -> _Answers:
    """Start the server in-process, make every query through the client, print them, stop it."""
    server_config = ServerConfig(
        index=index_root,
        model=model_dir,
        host="127.0.0.1",
        port=config.port,
        reload_interval=0.0,
        http_port=config.http_port,
    )
    rng = np.random.default_rng(config.seed)
    z = rng.uniform(-2.0, 2.0, size=engine.dim)
    server = _InProcessServer(server_config)
    with server as port:
        print(f"\nserver: listening on 127.0.0.1:{port} (in-process)")
        with LatentSearchClient(f"127.0.0.1:{port}") as client:
            info = client.info()
            print(
                f"Info: version {info['index_version']}, {info['item_count']} items, "
                f"d = {info['latent_dim']}, model {info['model_hash'][:12]}"
            )
            print(_PROBABILITY_LEGEND)
            slider, same = _query_slider(client, engine, z, config.k, data.names)
            held_out = _query_held_out(client, data, config.k)
            decoded = client.decode(z)
        explorer_png = _explorer(config, server, port)
    return _Answers(port, z, slider, same, held_out, decoded, explorer_png)


def _query_slider(
    client: LatentSearchClient, engine: SearchEngine, z: np.ndarray, k: int, names: list[str] | None
) -> tuple[SearchAnswer, bool]:
    """Nearest for ``z (d,)``, checked against the brute force and contrasted with nearest-mu; printed.

    Returns the answer and whether it is identical to the engine's float64 brute force.
    """
    found = client.nearest(z, k, mode="exact", with_probability=True)
    reference = engine.brute_force(z[None, :], k)[0]
    same = found.ids == list(reference.ids) and np.allclose(
        found.scores, reference.scores, rtol=1e-12, atol=0.0
    )
    mu = np.asarray(engine.bank.mu, dtype=np.float64)  # (N, d)
    nearest_mu = np.argsort(((mu - z) ** 2).sum(1), kind="stable")[:k]
    overlap = len(set(nearest_mu.tolist()) & set(np.asarray(reference.rows).tolist()))
    print()
    print(
        _table(
            "Nearest: slider point z = " + np.array2string(z, precision=2, separator=","),
            found,
            names,
            {
                "identical to the float64 brute force over the index": same,
                "nearest-mu (Euclidean) search agrees on": f"{overlap} of {k}",
            },
        )
    )
    return found, bool(same)


def _query_held_out(client: LatentSearchClient, data: _Data, k: int) -> list[SearchAnswer]:
    """Encode each held-out item, then Nearest (its mean) and NearestToDistribution; printed.

    Returns the NearestToDistribution answers, one per held-out item.
    """
    answers: list[SearchAnswer] = []
    for i, item in enumerate(data.held_items):
        post = client.encode(item).posterior  # (d,) q(z|x) of the item
        by_point = client.nearest(post.mean, k, with_probability=True)
        by_dist = client.nearest_to_distribution(post.mean, post.std, k, with_probability=True)
        answers.append(by_dist)
        label = _label_name(data.held_labels[i], data.names)
        print()
        title = f"Nearest: held-out item {data.held_ids[i]} ({label}), z = its posterior mean"
        print(_table(title + " (Encode)", by_point, data.names))
        print(
            _table(
                "NearestToDistribution: same item, its whole posterior (expected log-likelihood, KL)",
                by_dist,
                data.names,
            )
        )
    return answers


def _write_pictures(out: Path, data: _Data, answers: _Answers) -> tuple[Path, Path, tuple[int, int]]:
    """``OUT/neighbours.png`` (the slider and each held-out item, then their neighbours) and
    ``OUT/decoded.png`` (the server's PNG); returns both paths and the grid's (width, height)."""
    grid = out / "neighbours.png"
    items = _load_items(data.items_file)
    row_of = {item_id: r for r, item_id in enumerate(items["ids"])}
    rows = [[answers.decoded.values, *[items["x"][row_of[h.id]] for h in answers.slider.hits]]]
    for item, answer in zip(data.held_items, answers.held_out, strict=True):
        rows.append([item, *[items["x"][row_of[h.id]] for h in answer.hits]])
    size = write_grid(grid, rows)
    decoded_png = out / "decoded.png"
    decoded_png.write_bytes(answers.decoded.png)
    return grid, decoded_png, size


def _print_report(result: QuickstartResult, size: tuple[int, int], k: int) -> None:
    """Say where the outputs are and how long each step took."""
    grid, decoded_png = result.grid_png, result.decoded_png
    print(f"picture: {grid} ({size[0]}x{size[1]}; row 1: decoded z, then its {k} nearest items;")
    print(f"         then each held-out item and its {k} nearest by posterior); server PNG {decoded_png}")
    print(
        f"outputs: model {result.model_dir}, index {result.index_root} (version {result.index_version}), "
        f"data {result.items_file}"
    )
    timings = ", ".join(f"{n} {s:.1f} s" for n, s in result.timings.items())
    print(f"done in {result.seconds:.0f} s ({timings})")
    if result.training_cut is not None:
        print(f"WARNING: {result.training_cut}: the model is undertrained (see above)")


# -- the in-process server ------------------------------------------------------------------------
class _InProcessServer:
    """A :class:`LatentSearchServer` on its own event loop in a background thread.

    ``with _InProcessServer(config) as port:`` starts it (index loaded and SERVING on return) and
    stops it gracefully on exit.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="quickstart-server", daemon=True)
        self.server: LatentSearchServer | None = None

    def __enter__(self) -> int:
        self.thread.start()
        self.server = LatentSearchServer(self.config)
        try:
            return asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=300)
        except BaseException:
            self._shutdown()
            raise

    def __exit__(self, *exc: object) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        try:
            if self.server is not None:
                asyncio.run_coroutine_threadsafe(self.server.stop(grace=1.0), self.loop).result(timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            if not self.thread.is_alive():
                self.loop.close()


def _explorer(config: QuickstartConfig, server: _InProcessServer, port: int) -> Path | None:
    """Print the explorer page's URL, save its screenshot (OUT/explorer.png) and, with
    ``keep_serving``, serve until Ctrl-C or SIGTERM. Returns the screenshot's path, if taken."""
    http_port = None if server.server is None else server.server.http_port
    if http_port is None:
        return None
    url = f"http://127.0.0.1:{http_port}/"
    print(f"\nexplorer: {url} (sliders for z; HTTP/JSON API under {url}api/v1, schema {url}openapi.json)")
    shot = None
    if config.screenshot:
        path = config.out / EXPLORER_PNG
        why = screenshot(url, path)
        shot = None if why else path
        print(f"explorer: screenshot {path}" if shot else f"explorer: no screenshot ({why})")
    if config.keep_serving:
        print(f"explorer: serving {url} (gRPC on 127.0.0.1:{port}) until Ctrl-C", flush=True)
        _wait_for_interrupt()
    else:
        print("explorer: the page stops with the server below; --keep-serving keeps it up")
    return shot


def _wait_for_interrupt() -> None:
    """Block until Ctrl-C (KeyboardInterrupt) or SIGTERM."""
    stop = threading.Event()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if main else None
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        print()
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _port_closed(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) != 0


# -- printing and pictures --------------------------------------------------------------------------
def _label_name(label: int | None, names: list[str] | None) -> str:
    if label is None:
        return "-"
    return names[label] if names and 0 <= label < len(names) else str(label)


def _table(
    title: str, answer: SearchAnswer, names: list[str] | None, extra: dict[str, Any] | None = None
) -> str:
    """A neighbour table: rank, id, score (and KL for distribution queries), match probability
    p(i|z) when the answer has one, label name; then log q(z) and its typicality when given."""
    has_kl = any(h.kl is not None for h in answer.hits)
    has_p = any(h.probability is not None for h in answer.hits)
    lines = [title]
    lines.append(
        f"  {'rank':>4}  {'id':>10}  {'log q(z|x)':>14}"
        + (f"  {'KL':>10}" if has_kl else "")
        + (f"  {'p(i|z)':>8}" if has_p else "")
        + "  label"
        + f"    [version {answer.index_version}, {answer.mode}, certified {answer.certified}]"
    )
    for h in answer.hits:
        row = f"  {h.rank:>4}  {h.id:>10}  {h.score:>14.6f}"
        if has_kl:
            row += f"  {h.kl:>10.4f}"
        if has_p:
            row += f"  {_probability(h.probability):>8}"
        lines.append(row + f"  {_label_name(h.label, names)}")
    if answer.log_qz is not None:
        lines.append(f"  {_density_line(answer)}")
    for key, value in (extra or {}).items():
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)


_PROBABILITY_LEGEND = (
    "p(i|z): each neighbour's match probability among the indexed items; log q(z): the index's\n"
    "aggregate posterior density at the query; typicality: the share of the index's reference points\n"
    "whose log q(z) is at most the query's (low: an unusual query)."
)


def _probability(p: float | None) -> str:
    """``p(i|z)`` as printed: 4 decimals, or ``<1e-4`` when it rounds to zero but is not."""
    if p is None:
        return "-"
    return "<1e-4" if 0.0 < p < 5e-5 else f"{p:.4f}"


def _density_line(answer: SearchAnswer) -> str:
    """``log q(z)`` of a query (its certified interval) and its typicality among the index's own items."""
    text = f"log q(z) = {answer.log_qz:.3f}"
    if answer.log_qz_interval is not None:
        lo, hi = answer.log_qz_interval
        text += f" (certified in [{lo:.3f}, {hi:.3f}])"
    if answer.typicality is not None:
        text += f", typicality {answer.typicality:.2f}"
    return text


def _to_uint8(img: Any) -> np.ndarray:
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        arr = np.asarray(arr, dtype=np.float64)
        arr = np.clip(arr * (255.0 if arr.max(initial=0.0) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr


def write_grid(path: Path, rows: list[list[Any]], *, scale: int = 4, gap: int = 4) -> tuple[int, int]:
    """Write image rows as one PNG (first tile of each row set apart by a gap); returns (width, height).

    Every tile has the same shape (grayscale ``(H, W)``/``(H, W, 1)`` or RGB); float tiles in
    [0, 1] are scaled to 0..255. Short rows are padded with black tiles.
    """
    tiles = [[_to_uint8(t) for t in row] for row in rows]
    h, w = tiles[0][0].shape[:2]
    extra = tiles[0][0].shape[2:]
    cols = max(len(row) for row in tiles)
    canvas = np.zeros((len(tiles) * (h + gap) - gap, cols * (w + gap) + gap, *extra), dtype=np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            x0 = c * (w + gap) + (gap if c > 0 else 0)
            canvas[r * (h + gap) : r * (h + gap) + h, x0 : x0 + w] = tile
    size = (canvas.shape[1] * scale, canvas.shape[0] * scale)
    image = Image.fromarray(canvas).resize(size, Image.Resampling.NEAREST)
    image.save(path)
    return image.size
