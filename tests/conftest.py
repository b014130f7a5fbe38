"""Fixtures shared by the tests: small engines and index roots, servers on port 0, model test data.

Tests never import this module (or each other): they ask for these fixtures by name. The one
module tests import is ``reference`` (tests/reference.py), the float64 ground truth.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from latentsearch.engine.engine import SearchEngine
from latentsearch.indexer import IndexJobConfig, IndexRoot, run_index_job
from latentsearch.model.checkpoint import save_checkpoint
from latentsearch.model.loader import LoadedModel, load_model
from latentsearch.model.vae import build_vae
from latentsearch.server import LatentSearchServer, ServerConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


# -- engines and index roots ----------------------------------------------------------------------
def _make_engine(
    n: int = 300, *, dim: int = 4, seed: int = 0, prefix: str = "item", labels: int = 4
) -> SearchEngine:
    """A small bank of ``dim``-d posteriors with string ids ``<prefix><i>`` and ``labels`` label values."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(n, dim))
    log_sigma = rng.uniform(-1.5, 0.5, size=(n, dim))
    return SearchEngine.build(
        mu,
        log_sigma=log_sigma,
        ids=[f"{prefix}{i}" for i in range(n)],
        labels=rng.integers(0, labels, size=n),
    )


def _publish(root: Path, engine: SearchEngine, **metadata: Any) -> str:
    return IndexRoot(root, create=True).publish_engine(engine, metadata or None, keep=None)


@pytest.fixture(scope="session")
def make_engine() -> Callable[..., SearchEngine]:
    """``make_engine(n=300, *, dim=4, seed=0, prefix="item", labels=4)`` -> a small labelled engine."""
    return _make_engine


@pytest.fixture(scope="session")
def publish() -> Callable[..., str]:
    """``publish(root, engine, **metadata)`` -> the version published as current (nothing pruned)."""
    return _publish


# -- servers --------------------------------------------------------------------------------------
def _wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or fail after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def _health_rpc(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


class RunningServer:
    """A :class:`LatentSearchServer` on its own event loop in a background thread."""

    def __init__(self, config: ServerConfig, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()
        self.server = LatentSearchServer(config, **kwargs)
        self.port = self.run(self.server.start())
        self.target = f"127.0.0.1:{self.port}"
        self._closed = False

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def health_status(self, service: str = "") -> int:
        """The health servicer's status, read in-process (works while the server refuses RPCs)."""
        req = health_pb2.HealthCheckRequest(service=service)
        return self.run(self.server.health.Check(req, None)).status

    def close(self, grace: float = 1.0) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.run(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture(scope="session")
def wait_until() -> Callable[..., Any]:
    """``wait_until(predicate, timeout=20.0, interval=0.01)`` -> the first truthy value, or fail."""
    return _wait_until


@pytest.fixture(scope="session")
def health_rpc() -> Callable[..., int]:
    """``health_rpc(target, service="")`` -> the status a plain gRPC health check gets."""
    return _health_rpc


@pytest.fixture
def start_server() -> Iterator[Callable[..., RunningServer]]:
    """``start_server(index=..., **config)`` -> a running server on 127.0.0.1:0, closed at teardown."""
    servers: list[RunningServer] = []

    def factory(*, model: Any = None, **config: Any) -> RunningServer:
        config.setdefault("port", 0)
        config.setdefault("reload_interval", 0)
        # gc.freeze is process-wide: keep the test process's heap as it is (tested on its own).
        config.setdefault("gc_freeze", False)
        srv = RunningServer(ServerConfig(**config), model=model)
        servers.append(srv)
        return srv

    yield factory
    for srv in servers:
        srv.close()


# -- model test data ------------------------------------------------------------------------------
_IDX_CODES = {
    np.dtype("uint8"): 0x08,
    np.dtype("int8"): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}


def _write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write ``array`` as an IDX file (big-endian), gzip-compressed when ``gz``."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = struct.pack(">HBB", 0, _IDX_CODES[np.dtype(dtype)], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(dtype).tobytes()
    if gz:
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def _tiny_images(n: int = 64, shape: tuple[int, ...] = (12, 10, 1), seed: int = 0) -> np.ndarray:
    """``(n, *shape)`` uint8 images with some structure (bright blobs) so a VAE can learn."""
    rng = np.random.default_rng(seed)
    h, w = shape[0], shape[1]
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((n, *shape), dtype=np.float64)
    for i in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6.0)
        out[i] = blob.reshape(h, w, *([1] * (len(shape) - 2)))
    return (out * 255).astype(np.uint8)


@pytest.fixture(scope="session")
def write_idx() -> Callable[..., Path]:
    """``write_idx(path, array, *, gz=False)`` -> ``path``, written as an IDX file."""
    return _write_idx


@pytest.fixture(scope="session")
def tiny_images() -> Callable[..., np.ndarray]:
    """``tiny_images(n=64, shape=(12, 10, 1), seed=0)`` -> ``(n, *shape)`` uint8 blob images."""
    return _tiny_images


@pytest.fixture
def fashion_mnist_dir() -> Path:
    """The shared Fashion-MNIST sample's folder; the test is skipped cleanly when it is absent."""
    candidates = []
    if os.environ.get("LATENTSEARCH_FASHION_MNIST"):
        candidates.append(Path(os.environ["LATENTSEARCH_FASHION_MNIST"]))
    candidates += [
        REPO_ROOT.parent / "shared" / "data" / "fashion-mnist",
        Path("/work/shared/data/fashion-mnist"),
    ]
    for c in candidates:
        if (c / "sample-images-idx3-ubyte.gz").is_file():
            return c
    pytest.skip("Fashion-MNIST sample not present (set LATENTSEARCH_FASHION_MNIST)")


# -- a tiny model and TLS files -------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained VAE checkpoint for (8, 8, 1) items and latent dimension 4 (seeded)."""
    torch.manual_seed(0)
    vae = build_vae(input_shape=(8, 8, 1), latent_dim=4, channels=(4,), hidden=16)
    path = tmp_path_factory.mktemp("tiny-model") / "model"
    save_checkpoint(vae, path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> LoadedModel:
    """:func:`tiny_model_dir` loaded (a LoadedModel)."""
    return load_model(tiny_model_dir)


@pytest.fixture(scope="session")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and key for localhost and 127.0.0.1 (the openssl command line)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command line is not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture(scope="session")
def catalogue_index(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """An index root whose version was indexed from :func:`tiny_model_dir` and 120 (8, 8, 1) blob
    images labelled 0, 1, 2 (named "disc", "ring", "bar"): model, label names, thumbnails, latent
    diagnostics and the typicality reference are stored with it."""
    d = tmp_path_factory.mktemp("catalogue")
    x = _tiny_images(n=120, shape=(8, 8, 1), seed=3)
    ids = np.array([f"img{i:03d}" for i in range(120)])
    np.savez(d / "items.npz", x=x, y=np.arange(120) % 3, ids=ids)
    config = IndexJobConfig(
        out=d / "idx",
        model=str(tiny_model_dir),
        data=str(d / "items.npz"),
        label_names=("disc", "ring", "bar"),
        device="cpu",
        progress=False,
    )
    run_index_job(config)
    return d / "idx"
