"""Device selection for FAISS, and the GPU exact path (skipped without a CUDA device)."""

from __future__ import annotations

import numpy as np
import pytest
from reference import log_q, top_k

from latentsearch.engine import EngineConfig, SearchEngine
from latentsearch.engine.gpu import gpu_count, resolve_device
from latentsearch.errors import FailedPreconditionError, InvalidArgumentError

HAS_GPU = gpu_count() > 0


def test_cpu_is_always_cpu() -> None:
    assert resolve_device("cpu") == "cpu"


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present")
def test_auto_falls_back_to_cpu_and_cuda_is_refused_without_a_gpu(tmp_path) -> None:
    assert resolve_device("auto") == "cpu"
    with pytest.raises(FailedPreconditionError, match="no GPU") as info:
        resolve_device("cuda")
    assert info.value.field == "device"
    with pytest.raises(FailedPreconditionError):
        SearchEngine.build(np.zeros((3, 2)), log_sigma=np.zeros((3, 2)), config=EngineConfig(device="cuda"))
    # An index saved anywhere loads on this host with device="auto".
    engine = SearchEngine.build(np.zeros((3, 2)), log_sigma=np.zeros((3, 2)))
    path = engine.save(tmp_path / "e")
    assert SearchEngine.load(path).info()["device"] == "cpu"
    with pytest.raises(FailedPreconditionError):
        SearchEngine.load(path, device="cuda")


def test_unknown_device_is_invalid() -> None:
    with pytest.raises(InvalidArgumentError):
        resolve_device("tpu")
    with pytest.raises(InvalidArgumentError):
        EngineConfig(device="tpu")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs faiss-gpu and a CUDA device")
def test_gpu_exact_screen_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(20_000, 8))
    log_sigma = rng.normal(np.log(0.3), 0.4, size=mu.shape)
    engine = SearchEngine.build(mu, log_sigma=log_sigma, config=EngineConfig(device="cuda"))
    assert engine.info()["device"] == "cuda"
    z = rng.uniform(-5, 5, size=(32, 8))
    ref = log_q(z, mu, log_sigma)
    want = top_k(ref, 10)
    for b, res in enumerate(engine.search_batch(z, 10, mode="exact")):
        np.testing.assert_array_equal(res.rows, want[b])
        np.testing.assert_allclose(res.scores, ref[b, want[b]], rtol=1e-12, atol=1e-9)
