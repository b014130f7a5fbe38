"""Exact mode's choice between branch and bound over the partitions and the flat certified screen.

Every path, forced or chosen by the cost model, must return the float64 brute force's top-k
(tests/reference.py, ties by row), including the sigma regimes that break float32. The decision is
tested with injected costs, never with timings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from reference import SIGMA_REGIMES, expected_log_q, log_q, make_bank, top_k

from latentsearch.engine import EngineConfig, SearchEngine, strategy
from latentsearch.engine.strategy import PROBE_BATCH_SIZES, StrategyCosts, probe_queries
from latentsearch.errors import CorruptIndexError, InvalidArgumentError

# Partitions cheaper for single queries, the flat screen for batches (the 1M-item shape): the
# per-call seconds at B = 1, 16, 64 cross between 1 and 16 queries.
CROSSING = StrategyCosts(
    batch_sizes=(1, 16, 64), seconds={"partitions": (1e-3, 20e-3, 80e-3), "flat": (4e-3, 8e-3, 20e-3)}
)
FLAT_EVERYWHERE = StrategyCosts(
    batch_sizes=(1, 16, 64), seconds={"partitions": (2e-3, 30e-3, 90e-3), "flat": (1e-3, 5e-3, 15e-3)}
)
PARTITIONS_EVERYWHERE = StrategyCosts(
    batch_sizes=(1, 16, 64), seconds={"partitions": (1e-3, 4e-3, 10e-3), "flat": (9e-3, 40e-3, 100e-3)}
)


def _engine(mu: np.ndarray, log_sigma: np.ndarray, **config: Any) -> SearchEngine:
    cfg = EngineConfig(**{"approx_nlist": 24, "typicality_samples": 0, **config})
    return SearchEngine.build(mu, log_sigma=log_sigma, config=cfg, build_approx=True)


def _with(engine: SearchEngine, costs: StrategyCosts | None, **config: Any) -> SearchEngine:
    """The same indexes under another config and cost model (nothing rebuilt, nothing measured)."""
    return engine.reconfigured(costs, **config)


def _spy_paths(engine: SearchEngine, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path of every exact call: "partitions" when the approximate index's search
    runs, "flat" when only the exact index's does."""
    assert engine.approx is not None
    taken: list[str] = []
    approx_search, exact_search = engine.approx.search, engine.exact.search
    depth = [0]

    def on_approx(*args: Any, **kwargs: Any) -> Any:
        taken.append("partitions")
        depth[0] += 1
        try:
            return approx_search(*args, **kwargs)
        finally:
            depth[0] -= 1

    def on_exact(*args: Any, **kwargs: Any) -> Any:
        if depth[0] == 0:
            taken.append("flat")
        return exact_search(*args, **kwargs)

    monkeypatch.setattr(engine.approx, "search", on_approx)
    monkeypatch.setattr(engine.exact, "search", on_exact)
    return taken


# -- the cost model ---------------------------------------------------------------------------
def test_costs_predict_by_interpolation_and_per_query_beyond_the_probes() -> None:
    c = CROSSING
    assert c.predict("partitions", 1) == pytest.approx(1e-3)
    # Between B = 1 and 16: linear in B, hand-computed.
    assert c.predict("partitions", 6) == pytest.approx(1e-3 + 5 / 15 * 19e-3)
    assert c.predict("flat", 40) == pytest.approx(8e-3 + 24 / 48 * 12e-3)
    # Beyond the largest probe: the same cost per query as there.
    assert c.predict("flat", 640) == pytest.approx(10 * 20e-3)


def test_choice_follows_the_costs() -> None:
    # Crossing: partitions = 1 + 19 (B - 1) / 15 ms, flat = 4 + 4 (B - 1) / 15 ms; equal at B = 4.
    assert [CROSSING.choose(b) for b in (1, 2, 3)] == ["partitions"] * 3
    assert CROSSING.choose(4) == "partitions"  # a tie goes to the partitions
    assert [CROSSING.choose(b) for b in (5, 16, 64, 1500)] == ["flat"] * 4
    assert {FLAT_EVERYWHERE.choose(b) for b in (1, 7, 16, 33, 64, 5000)} == {"flat"}
    assert {PARTITIONS_EVERYWHERE.choose(b) for b in (1, 7, 16, 33, 64, 5000)} == {"partitions"}


def test_costs_round_trip_and_reject_bad_values() -> None:
    assert StrategyCosts.from_dict(json.loads(json.dumps(CROSSING.to_dict()))) == CROSSING
    bad: list[Any] = [
        {"batch_sizes": [1, 64], "seconds": {"partitions": [1.0, 2.0]}},  # a path missing
        {"batch_sizes": [64, 1], "seconds": {"partitions": [1.0, 2.0], "flat": [1.0, 2.0]}},  # order
        {"batch_sizes": [1, 64], "seconds": {"partitions": [1.0], "flat": [1.0, 2.0]}},  # lengths
        {"batch_sizes": [1], "seconds": {"partitions": [float("nan")], "flat": [1.0]}},
        {"batch_sizes": [0], "seconds": {"partitions": [1.0], "flat": [1.0]}},
        [1, 2],
    ]
    for data in bad:
        with pytest.raises(CorruptIndexError):
            StrategyCosts.from_dict(data)
    with pytest.raises(InvalidArgumentError) as err:
        StrategyCosts(batch_sizes=(1,), seconds={"partitions": (-1.0,), "flat": (1.0,)})
    assert err.value.field == "costs"


def test_calibrate_keeps_the_cheapest_round_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake clock: a call of B queries on a path "takes" 1 ms + B x (per-query ms of the path),
    # the first round of every size 5x longer (a burst of load), and nothing else takes time.
    now = [0.0]
    per_query = {"partitions": 2e-3, "flat": 0.5e-3}
    seen: dict[tuple[str, int], int] = {}

    def run(path: str, points: np.ndarray) -> None:
        b = len(points)
        key = (path, b)
        seen[key] = seen.get(key, 0) + 1
        burst = 5.0 if seen[key] <= max(1, strategy.PROBE_MIN_QUERIES // b) + (b == 1) else 1.0
        now[0] += burst * (1e-3 + b * per_query[path])

    monkeypatch.setattr(strategy.time, "perf_counter", lambda: now[0])
    probes = np.zeros((128, 3))
    costs = strategy.calibrate(run, probes, batch_sizes=(1, 16, 64), rounds=3, budget_s=float("inf"))
    for path, q in per_query.items():
        np.testing.assert_allclose(costs.seconds[path], [1e-3 + b * q for b in (1, 16, 64)], rtol=1e-9)
    # 1 warm-up call each, then 3 rounds of 8 single queries, 1 call of 16, 1 call of 64.
    assert seen == {(p, b): n for p in per_query for b, n in ((1, 1 + 3 * 8), (16, 3), (64, 3))}
    assert costs.choose(1) == "flat"


def test_calibrate_stops_after_the_round_that_spends_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    calls: list[int] = []

    def run(path: str, points: np.ndarray) -> None:
        calls.append(len(points))
        now[0] += 0.1  # every call "takes" 0.1 s: one round (2 x (8 + 1 + 1) calls) takes 2 s

    monkeypatch.setattr(strategy.time, "perf_counter", lambda: now[0])
    costs = strategy.calibrate(run, np.zeros((128, 3)), batch_sizes=(1, 16, 64), rounds=3, budget_s=1.0)
    assert len(calls) == 2 + 2 * (8 + 1 + 1)  # the warm-ups and one round
    for secs in costs.seconds.values():
        np.testing.assert_allclose(secs, [0.1, 0.1, 0.1], rtol=1e-9)


# Per family (ms per call at B = 1, 16, 64), the shape measured at 1M items: the kernel fastest on
# average and on box and posterior queries, but 3x slower than the flat screen on prior ones at B = 64.
MS = {
    "box": {"partitions": (30, 450, 1300), "flat": (110, 300, 640), "kernel": (14, 200, 530)},
    "prior": {"partitions": (50, 700, 2500), "flat": (80, 260, 550), "kernel": (30, 500, 1800)},
    "posterior": {"partitions": (29, 400, 1580), "flat": (70, 260, 750), "kernel": (10, 150, 470)},
}
BY_FAMILY = StrategyCosts.of_families(
    (1, 16, 64), {f: {p: tuple(x * 1e-3 for x in v) for p, v in t.items()} for f, t in MS.items()}
)


def test_choice_is_minimax_over_the_families() -> None:
    c = BY_FAMILY
    # seconds holds the families' mean (hand-computed for the kernel at B = 64).
    assert c.seconds["kernel"][2] == pytest.approx((530 + 1800 + 470) / 3 * 1e-3)
    assert c.predict("flat", 64, "prior") == pytest.approx(0.55)
    # B = 1: the kernel is the best for every family (worst ratio 1).
    assert c.worst_ratio("kernel", 1) == pytest.approx(1.0) and c.choose(1) == "kernel"
    # B = 64: kernel worst 1800/550 = 3.27 (prior), flat worst 750/470 = 1.60 (posterior),
    # partitions worst 1580/470: hand-computed ratios.
    assert c.worst_ratio("kernel", 64) == pytest.approx(1800 / 550)
    assert c.worst_ratio("flat", 64) == pytest.approx(750 / 470)
    assert c.choose(64) == "flat"
    # B = 16: kernel worst 500/260 = 1.92 (prior), flat worst 300/200 = 1.5 (box) -> flat.
    assert c.choose(16) == "flat"
    assert c.choose(640) == "flat"  # per query beyond the probes: the B = 64 ratios


def test_minimax_differs_from_the_cheapest_on_average() -> None:
    # ms per call at B = 1: path "kernel" is cheapest on average (12.0 vs 13.3) but 4x the best on
    # prior queries; "flat" is never more than 1.25x the best: minimax takes it.
    ms: dict[str, dict[str, tuple[float, ...]]] = {
        "box": {"partitions": (30.0,), "flat": (10.0,), "kernel": (8.0,)},
        "prior": {"partitions": (30.0,), "flat": (20.0,), "kernel": (80.0,)},
        "posterior": {"partitions": (30.0,), "flat": (10.0,), "kernel": (8.0,)},
    }
    mean_kernel = StrategyCosts(
        batch_sizes=(1,), seconds={"partitions": (30.0,), "flat": (13.3,), "kernel": (12.0,)}
    )
    assert mean_kernel.choose(1) == "kernel"  # no families: the cheapest on average
    c = StrategyCosts.of_families((1,), ms)
    assert c.worst_ratio("flat", 1) == pytest.approx(1.25)
    assert c.worst_ratio("kernel", 1) == pytest.approx(4.0)
    assert c.choose(1) == "flat"
    # A tie on the worst ratio goes to the cheaper on average, then to the kernel.
    tie = StrategyCosts.of_families(
        (1,),
        {
            "a": {"partitions": (2.0,), "flat": (1.0,), "kernel": (1.0,)},
            "b": {"partitions": (4.0,), "flat": (2.0,), "kernel": (2.0,)},
        },
    )
    assert tie.choose(1) == "kernel"


def test_family_tables_round_trip_and_old_tables_load() -> None:
    assert StrategyCosts.from_dict(json.loads(json.dumps(BY_FAMILY.to_dict()))) == BY_FAMILY
    # A table saved before families (and before the kernel) loads, with the old choice.
    old = {
        "batch_sizes": [1, 16, 64],
        "seconds": {"partitions": [1e-3, 20e-3, 80e-3], "flat": [4e-3, 8e-3, 20e-3]},
    }
    loaded = StrategyCosts.from_dict(old)
    assert loaded.families is None and loaded == CROSSING and loaded.to_dict() == old
    assert [loaded.choose(b) for b in (1, 4, 5, 64)] == ["partitions", "partitions", "flat", "flat"]
    bad: list[Any] = [
        {**BY_FAMILY.to_dict(), "families": {"box": {"partitions": [1.0, 2.0, 3.0], "flat": [1, 2, 3]}}},
        {**BY_FAMILY.to_dict(), "families": {}},
        {**BY_FAMILY.to_dict(), "families": {"box": {**MS["box"], "flat": [1.0]}}},
    ]
    for data in bad:
        with pytest.raises(CorruptIndexError):
            StrategyCosts.from_dict(data)
    with pytest.raises(InvalidArgumentError):
        BY_FAMILY.predict("flat", 1, "uniform")


def test_calibrate_by_family_times_each_family_and_bounds_the_work(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake clock: a call of B queries of a family takes B x (that family's per-query ms of the
    # path); the flat screen costs 0.3 s a call whatever B (a large bank, one pass for a batch).
    now = [0.0]
    per_query = {"box": {"partitions": 8e-3, "kernel": 2e-3}, "prior": {"partitions": 20e-3, "kernel": 12e-3}}
    seen: dict[tuple[str, str, int], int] = {}

    def run(path: str, points: np.ndarray) -> None:
        fam = "box" if points[0, 0] == 0 else "prior"
        key = (fam, path, len(points))
        seen[key] = seen.get(key, 0) + 1
        now[0] += 0.3 if path == "flat" else len(points) * per_query[fam][path]

    monkeypatch.setattr(strategy.time, "perf_counter", lambda: now[0])
    probes = {"box": np.zeros((128, 3)), "prior": np.ones((128, 3))}
    costs = strategy.calibrate(
        run, probes, batch_sizes=(1, 16, 64), rounds=3, budget_s=float("inf"), paths=strategy.PATHS
    )
    assert costs.families is not None and set(costs.families) == {"box", "prior"}
    # Flat: each family's 4 single-query calls stop after the first (over PROBE_CELL_BUDGET_S).
    assert seen[("box", "flat", 1)] == 1 + 3  # the warm-up, then one call a round
    # ... on every family (its calls under LONG_CALL_S), the least holding for all.
    assert seen[("prior", "flat", 1)] == 3
    assert seen[("prior", "kernel", 1)] == 3 * 4
    # Partitions >= 1.5x the kernel on both families at B = 1: not timed at 16 or 64, costed per
    # query from B = 1 (a 16-query call: 16 x 8 ms on box).
    assert ("box", "partitions", 16) not in seen and ("prior", "partitions", 64) not in seen
    np.testing.assert_allclose(costs.families["box"]["partitions"], [8e-3, 16 * 8e-3, 64 * 8e-3])
    np.testing.assert_allclose(costs.families["prior"]["kernel"], [12e-3, 16 * 12e-3, 64 * 12e-3])
    np.testing.assert_allclose(costs.families["prior"]["flat"], [0.3, 0.3, 0.3])
    np.testing.assert_allclose(costs.seconds["kernel"], [7e-3, 16 * 7e-3, 64 * 7e-3])
    # B = 16: the kernel is the best on both families. B = 64: kernel 768 / 300 ms on prior (2.56x),
    # flat 300 / 128 ms on box (2.34x): minimax takes the flat screen.
    assert [costs.choose(b) for b in (1, 16, 64)] == ["kernel", "kernel", "flat"]
    # A per-query path whose call took over LONG_CALL_S (the kernel on 16 prior queries: 192 ms)
    # is not timed at larger sizes, and costed per query from there.
    monkeypatch.setattr(strategy, "LONG_CALL_S", 0.1)
    seen.clear()
    again = strategy.calibrate(run, probes, batch_sizes=(1, 16, 64), rounds=1, paths=strategy.PATHS)
    assert ("box", "kernel", 16) in seen and ("box", "kernel", 64) not in seen
    assert again.families is not None
    np.testing.assert_allclose(again.families["box"]["kernel"], [2e-3, 16 * 2e-3, 64 * 2e-3])
    # The flat screen's 0.3 s calls, over a LONG_CALL_S of 0.2: timed on the first family only.
    monkeypatch.setattr(strategy, "LONG_CALL_S", 0.2)
    seen.clear()
    strategy.calibrate(run, probes, batch_sizes=(1, 16, 64), rounds=3, budget_s=float("inf"))
    assert not any(f == "prior" and p == "flat" for f, p, _ in seen) and seen[("box", "flat", 64)] == 3


def test_family_probes_are_the_interleaved_probes() -> None:
    mu, log_sigma = make_bank(300, 3, "moderate", np.random.default_rng(4))
    fam = strategy.family_probes(mu, log_sigma, 9, seed=2)
    assert list(fam) == list(strategy.FAMILIES)
    p = probe_queries(mu, log_sigma, 9, seed=2)
    np.testing.assert_array_equal(p[0::3], fam["box"][:3])
    np.testing.assert_array_equal(p[1::3], fam["prior"][:3])
    np.testing.assert_array_equal(p[2::3], fam["posterior"][:3])
    np.testing.assert_array_equal(fam["prior"], strategy.family_probes(mu, log_sigma, 9, seed=2)["prior"])


def test_config_accepts_auto_and_rejects_other_strategies() -> None:
    assert EngineConfig().exact_strategy == "auto"
    with pytest.raises(InvalidArgumentError) as err:
        EngineConfig(exact_strategy="cheapest")  # type: ignore[arg-type]
    assert err.value.field == "exact_strategy"


def test_probe_queries_interleave_the_three_families() -> None:
    rng = np.random.default_rng(3)
    mu, log_sigma = make_bank(500, 4, "tiny", rng)
    p = probe_queries(mu, log_sigma, 30, seed=1)
    assert p.shape == (30, 4) and np.isfinite(p).all()
    # Rows 2, 5, ... are posterior samples of tiny-sigma items: each within 1e-2 of some mu.
    dist = np.abs(p[2::3, None, :] - mu[None]).max(-1).min(-1)
    assert (dist < 1e-2).all()
    assert (np.abs(p[0::3]) <= 5).all() and np.abs(p[0::3]).max() > 2  # the box
    np.testing.assert_array_equal(p, probe_queries(mu, log_sigma, 30, seed=1))  # deterministic


# -- the engine's decision --------------------------------------------------------------------
@pytest.fixture(scope="module")
def built() -> tuple[SearchEngine, np.ndarray, np.ndarray]:
    mu, log_sigma = make_bank(4000, 6, "moderate", np.random.default_rng(21))
    return _engine(mu, log_sigma), mu, log_sigma


def test_build_measures_both_paths(built: tuple[SearchEngine, np.ndarray, np.ndarray]) -> None:
    engine, mu, log_sigma = built
    costs = engine.costs
    assert costs is not None and costs.batch_sizes == PROBE_BATCH_SIZES
    assert all(s > 0 for v in costs.seconds.values() for s in v)
    assert engine.info()["exact_costs"] == costs.to_dict()
    # Without an approximate index there is nothing to choose and nothing is measured.
    plain = SearchEngine.build(mu, log_sigma=log_sigma, config=EngineConfig(typicality_samples=0))
    assert plain.approx is None and plain.costs is None and plain.calibrate_exact() is None


def test_auto_takes_the_cheaper_path_for_the_batch_size(
    built: tuple[SearchEngine, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _with(built[0], CROSSING)
    taken = _spy_paths(engine, monkeypatch)
    z = probe_queries(built[1], built[2], 64, seed=4)
    engine.search(z[0], 5)
    engine.search_batch(z[:3], 5)
    engine.search_batch(z[:16], 5)
    engine.search_batch_arrays(z, 5)
    engine.search_distribution_batch(z[:16], np.full((16, 6), 0.1), 5)
    assert taken == ["partitions", "partitions", "flat", "flat", "flat"]
    assert [engine.exact_path(b) for b in (1, 3, 16, 64)] == ["partitions", "partitions", "flat", "flat"]


def test_small_calls_with_probabilities_keep_the_partitions_under_auto(
    built: tuple[SearchEngine, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, mu, log_sigma = built
    z = probe_queries(mu, log_sigma, 16, seed=10)
    auto = _with(engine, FLAT_EVERYWHERE)
    taken = _spy_paths(auto, monkeypatch)
    auto.search(z[0], 5, with_probability=True)
    auto.search_batch(z[:16], 5, with_probability=True)  # above PARTITION_MAX_QUERIES: the model
    auto.search(z[0], 5)
    assert taken == ["partitions", "flat", "flat"]
    monkeypatch.undo()
    flat = _with(engine, PARTITIONS_EVERYWHERE, exact_strategy="flat")
    taken = _spy_paths(flat, monkeypatch)
    res = flat.search(z[0], 5, with_probability=True)  # an explicit strategy still wins
    assert taken == ["flat"]
    assert res.probability is not None and res.probability.sum() <= 1.0 + 1e-9


def test_explicit_strategy_wins_over_the_costs(
    built: tuple[SearchEngine, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    z = probe_queries(built[1], built[2], 64, seed=5)
    flat = _with(built[0], PARTITIONS_EVERYWHERE, exact_strategy="flat")
    taken = _spy_paths(flat, monkeypatch)
    flat.search(z[0], 5)
    flat.search_batch(z, 5)
    monkeypatch.undo()  # the engines share their indexes: one spy at a time
    parts = _with(built[0], FLAT_EVERYWHERE, exact_strategy="partitions")
    taken_parts = _spy_paths(parts, monkeypatch)
    parts.search(z[0], 5)
    parts.search_batch(z, 5)
    assert taken == ["flat", "flat"] and taken_parts == ["partitions", "partitions"]


def test_no_costs_keeps_the_old_rule(
    built: tuple[SearchEngine, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _with(built[0], None)
    taken = _spy_paths(engine, monkeypatch)
    engine.search_batch(probe_queries(built[1], built[2], 64, seed=6), 5)
    assert taken == ["partitions"] and engine.exact_path(1) == engine.exact_path(1000) == "partitions"


def test_approx_batches_on_a_bank_searched_exactly_take_the_exact_path(
    built: tuple[SearchEngine, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below approx_min_items (no approximate costs measured) an approximate batch takes the exact
    path the costs pick; where approximate mode is the default, the costs' exact strategy does not
    steer it (the scan, by the call's size)."""
    queries = probe_queries(built[1], built[2], 20, seed=7)
    engine = _with(built[0], FLAT_EVERYWHERE)
    taken = _spy_paths(engine, monkeypatch)
    engine.search_batch(queries, 5, mode="approx")
    assert taken == ["flat"]
    taken.clear()
    approx_default = _with(built[0], FLAT_EVERYWHERE, approx_min_items=10)
    approx_default.search_batch(queries, 5, mode="approx")
    assert taken == ["partitions"]


# -- every path gives the brute force's answer ------------------------------------------------
VARIANTS: dict[str, dict[str, Any]] = {
    "forced partitions": {"config": {"exact_strategy": "partitions"}, "costs": FLAT_EVERYWHERE},
    "forced flat": {"config": {"exact_strategy": "flat"}, "costs": PARTITIONS_EVERYWHERE},
    "auto, crossing costs": {"config": {}, "costs": CROSSING},
    "auto, measured": {"config": {}, "costs": "measured"},
}


@pytest.mark.parametrize("regime", SIGMA_REGIMES)
def test_every_path_equals_the_brute_force(regime: str) -> None:
    rng = np.random.default_rng(100 + SIGMA_REGIMES.index(regime))
    mu, log_sigma = make_bank(3000, 5, regime, rng)
    base = _engine(mu, log_sigma)
    rows = rng.integers(0, len(mu), size=8)
    families = {
        "probes": probe_queries(mu, log_sigma, 20, seed=8),
        "near items": mu[rows] + np.exp(log_sigma[rows]) * rng.standard_normal((8, 5)) * 0.5,
    }
    for name, variant in VARIANTS.items():
        costs = base.costs if variant["costs"] == "measured" else variant["costs"]
        engine = _with(base, costs, **variant["config"])
        for fam, z in families.items():
            want = top_k(log_q(z, mu, log_sigma), 10)
            singles = [engine.search(q, 10, mode="exact") for q in z]
            for results in (engine.search_batch(z, 10, mode="exact"), singles):
                for b, res in enumerate(results):
                    assert res.certified
                    np.testing.assert_array_equal(res.rows, want[b], err_msg=f"{regime} {name} {fam} {b}")
            m, s = z[:6], np.exp(log_sigma[rows[:6]])
            want_d = top_k(expected_log_q(m, s, mu, log_sigma), 7)
            for b, res in enumerate(engine.search_distribution_batch(m, s, 7, mode="exact")):
                np.testing.assert_array_equal(res.rows, want_d[b], err_msg=f"{regime} {name} dist {b}")


# -- persistence ------------------------------------------------------------------------------
Built = tuple[SearchEngine, np.ndarray, np.ndarray]


def test_costs_are_saved_and_loaded(built: Built, tmp_path: Path) -> None:
    engine = _with(built[0], CROSSING)
    path = engine.save(tmp_path / "e")
    loaded = SearchEngine.load(path)
    assert loaded.costs == CROSSING
    assert [loaded.exact_path(b) for b in (1, 64)] == ["partitions", "flat"]


def test_engine_saved_without_costs_loads_with_the_old_rule(
    built: tuple[SearchEngine, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    engine, mu, log_sigma = built
    path = engine.save(tmp_path / "old")
    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["exact_costs"]  # as written before the cost model
    manifest_path.write_text(json.dumps(manifest))
    loaded = SearchEngine.load(path, verify=True)
    assert loaded.costs is None and loaded.exact_path(64) == "partitions"
    z = probe_queries(mu, log_sigma, 12, seed=9)
    want = top_k(log_q(z, mu, log_sigma), 10)
    for b, res in enumerate(loaded.search_batch(z, 10, mode="exact")):
        np.testing.assert_array_equal(res.rows, want[b])


def test_corrupt_costs_fail_the_load(built: Built, tmp_path: Path) -> None:
    path = built[0].save(tmp_path / "bad")
    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["exact_costs"] = {"batch_sizes": [1], "seconds": {"flat": ["fast"]}}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptIndexError, match=r"manifest\.json"):
        SearchEngine.load(path)
