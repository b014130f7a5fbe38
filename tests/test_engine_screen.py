"""The fused batch screen (latentsearch.engine.screen) and the exact search that takes it.

Block maxima are checked against a float64 product, the screen's promise (every item left out has
an exact score below t + E) against the float64 scores of every item, and the engine's answers on
the batch screen against the independent float64 brute force (tests/reference.py) in the sigma
regimes that break float32.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import SIGMA_REGIMES, assert_batch_is_brute_force, log_q, make_bank, top_k

from latentsearch.engine import EngineConfig, SearchEngine, screen
from latentsearch.engine import exact as exact_mod
from latentsearch.engine.lifting import error_coefficient


def _items(m: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xb = (rng.standard_normal((m, width)) * rng.uniform(0.1, 10.0, size=width)).astype(np.float32)
    return xb, rng.standard_normal((9, width)).astype(np.float32)


def _bound(q32: np.ndarray, xb: np.ndarray) -> np.ndarray:
    """``(B,)`` the float32 error bound of every product (lifting.error_coefficient)."""
    width = q32.shape[1]
    return error_coefficient(width) * (np.abs(q32.astype(np.float64)) @ np.abs(xb.astype(np.float64)).max(0))


@pytest.mark.parametrize("width", [3, 21, 33])
@pytest.mark.parametrize("m", [1, screen.BLOCK * 3, screen.BLOCK * 5 + 7])
def test_block_maxima_are_each_blocks_best_score(width: int, m: int) -> None:
    xb, q32 = _items(m, width, seed=width * 1000 + m)
    tiles = screen.BlockTiles(xb)
    assert tiles.blocks == -(-m // screen.BLOCK)
    got = screen.block_maxima(q32, tiles)  # 9 queries: not a multiple of ROWS
    exact = q32.astype(np.float64) @ xb.astype(np.float64).T  # (B, m)
    padded = np.full((q32.shape[0], tiles.blocks * screen.BLOCK), -np.inf)
    padded[:, :m] = exact
    want = padded.reshape(q32.shape[0], tiles.blocks, screen.BLOCK).max(axis=2)
    assert got.shape == want.shape and got.dtype == np.float32
    assert (np.abs(got - want) <= _bound(q32, xb)[:, None]).all()
    np.testing.assert_array_equal(screen.block_maxima(q32, tiles, threads=2), got)


@pytest.mark.parametrize("kg", [1, 5, 26])
def test_block_screen_leaves_out_only_items_below_t(kg: int) -> None:
    m = screen.BLOCK * 40 + 3
    xb, q32 = _items(m, 21, seed=kg)
    exact = q32.astype(np.float64) @ xb.astype(np.float64).T
    bound = _bound(q32, xb)
    got = screen.block_screen(q32, screen.BlockTiles(xb), kg, 2 * bound, 4 * kg)
    assert got is not None
    local, t = got
    for b in range(q32.shape[0]):
        cand = local[b][local[b] >= 0]
        assert cand.size >= kg and np.unique(cand).size == cand.size and cand.max() < m
        left_out = np.ones(m, dtype=bool)
        left_out[cand] = False
        assert (exact[b][left_out] < t[b] + bound[b]).all()
        # t is at most the kg-th best score (up to float32 error): the best kg are candidates
        assert np.sort(exact[b])[-kg] >= t[b] - bound[b]
    threaded = screen.block_screen(q32, screen.BlockTiles(xb), kg, 2 * bound, 4 * kg, threads=3)
    assert threaded is not None
    np.testing.assert_array_equal(threaded[0], local)
    np.testing.assert_array_equal(threaded[1], t)


def test_block_screen_refuses_flat_scores() -> None:
    """Identical items all reach t: more than ``cap`` candidates, so the caller is told (None)."""
    xb = np.ones((screen.BLOCK * 4, 5), dtype=np.float32)
    q32 = np.ones((2, 5), dtype=np.float32)
    assert screen.block_screen(q32, screen.BlockTiles(xb), 2, np.zeros(2), 8) is None


def test_kernel_compiles_in_memory_without_a_cache_directory(monkeypatch, tmp_path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv(screen.CACHE_ENV, str(blocker / "kernels"))
    monkeypatch.setattr(screen, "_kernels", {})
    xb, q32 = _items(screen.BLOCK * 2, 3, seed=5)
    got = screen.block_maxima(q32, screen.BlockTiles(xb))
    want = (q32.astype(np.float64) @ xb.astype(np.float64).T).reshape(9, 2, screen.BLOCK).max(axis=2)
    assert (np.abs(got - want) <= _bound(q32, xb)[:, None]).all()
    assert not (blocker / "kernels").exists()


def test_kernel_refuses_widths_it_does_not_serve() -> None:
    with pytest.raises(ValueError, match="width"):
        screen.kernel(screen.MAX_WIDTH + 2)


# -- the engine on the batch screen --------------------------------------------------------------


def _count_batch(monkeypatch) -> list[int]:
    """Record the candidates each batch screen returned (-1: it handed over to FAISS)."""
    calls: list[int] = []
    original = exact_mod.ScaleGroup.batch_screen

    def spy(self, q32, kg, bounds, threads):
        out = original(self, q32, kg, bounds, threads)
        calls.append(-1 if out is None else int((out[0] >= 0).sum()))
        return out

    monkeypatch.setattr(exact_mod.ScaleGroup, "batch_screen", spy)
    return calls


@pytest.mark.parametrize("regime", SIGMA_REGIMES)
@pytest.mark.parametrize("d", [1, 5, 16])
def test_exact_batches_on_the_batch_screen_match_brute_force(monkeypatch, regime: str, d: int) -> None:
    monkeypatch.setattr(exact_mod, "DENSE_BLOCK", 4)  # engage it on a small bank (blocks of 64)
    calls = _count_batch(monkeypatch)
    rng = np.random.default_rng(SIGMA_REGIMES.index(regime) * 10 + d)
    n = 8000
    mu, log_sigma = make_bank(n, d, regime, rng)
    config = EngineConfig(num_threads=2, exact_strategy="flat", approx_min_items=10**9)
    engine = SearchEngine.build(mu, log_sigma=log_sigma, config=config, build_approx=False)
    tiniest = int(np.argmin(log_sigma.sum(1)))
    z = np.concatenate([rng.uniform(-5, 5, size=(20, d)), mu[rng.integers(0, n, 10)], mu[[tiniest]]])
    ref = log_q(z, mu, log_sigma)
    for k in (1, 10):
        batch = engine.search_batch_arrays(z, k, mode="exact")
        assert batch.certified.all()
        assert_batch_is_brute_force(batch.rows, batch.scores, ref, k)
    assert any(c > 0 for c in calls), "the batch screen was not used"


def test_batch_screen_and_faiss_give_identical_answers(monkeypatch) -> None:
    """The same engine with the batch screen switched off (FAISS's flat search) answers the same."""
    rng = np.random.default_rng(2)
    mu, log_sigma = make_bank(20000, 10, "moderate", rng)
    config = EngineConfig(num_threads=1, exact_strategy="flat")
    engine = SearchEngine.build(mu, log_sigma=log_sigma, config=config, build_approx=False)
    z = rng.uniform(-4, 4, size=(24, 10))
    calls = _count_batch(monkeypatch)
    on = engine.search_batch_arrays(z, 10, mode="exact")
    assert calls and all(c >= 26 * 24 for c in calls)  # at the default block: k + 16 candidates each
    monkeypatch.setattr(exact_mod, "BATCH_SCREEN", False)
    off = engine.search_batch_arrays(z, 10, mode="exact")
    assert len(calls) == 1
    np.testing.assert_array_equal(on.rows, off.rows)
    np.testing.assert_array_equal(on.scores, off.scores)


def test_wide_latents_keep_faiss(monkeypatch) -> None:
    """d = 32 (lifted width 65 > MAX_WIDTH): no batch screen, answers still the brute force's."""
    calls = _count_batch(monkeypatch)
    rng = np.random.default_rng(4)
    mu, log_sigma = make_bank(7000, 32, "moderate", rng)
    engine = SearchEngine.build(
        mu, log_sigma=log_sigma, config=EngineConfig(num_threads=1), build_approx=False
    )
    assert not any(g.batch_width_ok() for g in engine.exact.groups)
    z = rng.uniform(-4, 4, size=(4, 32))
    batch = engine.search_batch_arrays(z, 10, mode="exact")
    assert not calls
    ref = log_q(z, mu, log_sigma)
    for b in range(4):
        np.testing.assert_array_equal(batch.rows[b], top_k(ref[b], 10))
