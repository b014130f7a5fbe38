"""Approximate mode's choice of path: the approximate kernel, FAISS's scan, or an exact path.

An approximate path answers an "auto" approximate call only when its recall measured at build
reached ``EngineConfig.approx_min_recall``; the exact paths are always candidates. The decision is
tested with injected costs (never with timings), the measured recall against an independent float64
brute force (tests/reference.py) of the same probes, and every choice's answers against it too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from reference import log_q, make_bank, top_k

from latentsearch.engine import EngineConfig, SearchEngine, strategy
from latentsearch.engine.engine import SINGLE_RECALL_PROBES
from latentsearch.engine.strategy import (
    EXACT_HANDICAP,
    KERNEL_SCALES_LESS,
    KERNEL_SCALES_MORE,
    PROBE_BATCH_SIZES,
    SCALE_MARGIN,
    SCALE_UP_REACH,
    StrategyCosts,
    family_probes,
)
from latentsearch.errors import CorruptIndexError, InvalidArgumentError
from latentsearch.indexer import parse_index_spec

SIZES = (1, 16, 64)
FAMILIES = ("box", "prior", "posterior")


def _costs(
    exact: dict[str, tuple[float, ...]], approx: dict[str, tuple[float, ...]], recall: dict[str, float]
) -> StrategyCosts:
    """The same per-call seconds for every family (so ratios are per size), in milliseconds."""
    ms = {p: tuple(1e-3 * s for s in v) for p, v in exact.items()}
    ams = {p: tuple(1e-3 * s for s in v) for p, v in approx.items()}
    return dataclasses.replace(
        StrategyCosts.of_families(SIZES, {f: dict(ms) for f in FAMILIES}),
        approx={f: dict(ams) for f in FAMILIES},
        approx_recall=recall,
    )


# The 200k-item shape (ms per call at B = 1, 16, 64): the approximate kernel cheapest for single
# queries, the scan for batches but below the recall, the exact flat screen cheapest past that.
EXACT: dict[str, tuple[float, ...]] = {
    "partitions": (8.0, 130.0, 520.0),
    "flat": (5.0, 12.0, 31.0),
    "kernel": (2.0, 20.0, 70.0),
}
APPROX: dict[str, tuple[float, ...]] = {"kernel": (1.3, 15.0, 52.0), "scan": (1.0, 6.5, 21.0)}
SHAPE = _costs(EXACT, APPROX, {"kernel": 0.993, "scan": 0.915})


def test_an_approximate_path_below_the_recall_is_never_chosen() -> None:
    assert [SHAPE.choose_approx(b, 0.99) for b in (1, 2, 8)] == [("approx", "kernel")] * 3
    # from 16 queries the flat screen beats the kernel by more than the handicap; the scan, cheaper
    # still, does not reach 0.99
    assert [SHAPE.choose_approx(b, 0.99) for b in (16, 64, 1500)] == [("exact", "flat")] * 3
    # asked for less recall, the scan qualifies and wins the batches
    assert [SHAPE.choose_approx(b, 0.9) for b in (16, 64, 1500)] == [("approx", "scan")] * 3
    assert SHAPE.choose_approx(1, 0.9) == ("approx", "scan")
    # nothing reaches recall 1: exact paths only, as exact mode's minimax would choose them
    assert [SHAPE.choose_approx(b, 1.0) for b in (1, 64)] == [("exact", "kernel"), ("exact", "flat")]


def test_an_exact_path_must_win_by_the_handicap() -> None:
    # flat at B = 64 is cheaper than the approximate kernel by 10%: inside the handicap, the kernel stays
    close = _costs({**EXACT, "flat": (5.0, 12.0, 0.9 * 52.0)}, APPROX, {"kernel": 1.0, "scan": 0.5})
    assert EXACT_HANDICAP > 1 / 0.9
    assert close.choose_approx(64, 0.99) == ("approx", "kernel")
    # by 25%: beyond it, the exact path answers
    far = _costs({**EXACT, "flat": (5.0, 12.0, 0.75 * 52.0)}, APPROX, {"kernel": 1.0, "scan": 0.5})
    assert far.choose_approx(64, 0.99) == ("exact", "flat")


def test_the_worst_family_decides() -> None:
    # the approximate kernel is the cheapest on box and posterior queries (20 ms, the flat screen 31)
    # but 3x slower than the flat screen on prior ones: minimax takes the flat screen
    fam = {f: {p: tuple(1e-3 * s for s in v) for p, v in EXACT.items()} for f in FAMILIES}
    per_family: dict[str, dict[str, tuple[float, ...]]] = {
        f: {"kernel": (1.3, 15.0, 93.0 if f == "prior" else 20.0), "scan": (1.0, 6.5, 21.0)} for f in FAMILIES
    }
    approx = {f: {p: tuple(1e-3 * s for s in v) for p, v in t.items()} for f, t in per_family.items()}
    costs = dataclasses.replace(
        StrategyCosts.of_families(SIZES, fam), approx=approx, approx_recall={"kernel": 1.0, "scan": 0.0}
    )
    assert costs.choose_approx(64, 0.99) == ("exact", "flat")
    even = dataclasses.replace(costs, approx={f: approx["box"] for f in FAMILIES})  # 20 ms everywhere
    assert even.choose_approx(64, 0.99) == ("approx", "kernel")


def test_tables_without_the_approximate_paths_keep_the_old_rule() -> None:
    plain = StrategyCosts.of_families(SIZES, {f: dict(EXACT) for f in FAMILIES})
    assert plain.choose_approx(1, 0.99) is None
    old = StrategyCosts.from_dict({"batch_sizes": [1], "seconds": {"partitions": [1.0], "flat": [2.0]}})
    assert old.approx is None and old.choose_approx(64, 0.5) is None


def test_approximate_costs_round_trip_and_reject_bad_values() -> None:
    assert StrategyCosts.from_dict(json.loads(json.dumps(SHAPE.to_dict()))) == SHAPE
    good = SHAPE.to_dict()
    bad: list[dict[str, Any]] = [
        {**good, "approx_recall": {"kernel": 1.5, "scan": 0.9}},  # not a fraction
        {**good, "approx_recall": {"kernel": 0.9}},  # a path without recall
        {k: v for k, v in good.items() if k != "approx_recall"},  # costs without recall
        {**good, "approx": {f: good["approx"][f] for f in ("box", "prior")}},  # a family missing
        {**good, "approx": {f: {"kernel": [1.0], "scan": [1.0]} for f in FAMILIES}},  # lengths
        {**good, "approx": {f: {"heap": [1.0, 2.0, 3.0]} for f in FAMILIES}, "approx_recall": {"heap": 1.0}},
    ]
    for data in bad:
        with pytest.raises(CorruptIndexError):
            StrategyCosts.from_dict(data)
    with pytest.raises(InvalidArgumentError):  # approximate paths need the per-family exact table
        StrategyCosts(
            batch_sizes=(1,),
            seconds={"partitions": (1.0,), "flat": (1.0,)},
            approx={"box": {"kernel": (1.0,)}},
            approx_recall={"kernel": 1.0},
        )


def test_the_kernel_scale_round_trips_and_rejects_bad_values() -> None:
    half = dataclasses.replace(SHAPE, approx_kernel_scale=0.5)
    assert StrategyCosts.from_dict(json.loads(json.dumps(half.to_dict()))) == half
    assert SHAPE.approx_kernel_scale == 1.0  # the default work
    old = {k: v for k, v in half.to_dict().items() if k != "approx_kernel_scale"}  # saved before it
    assert StrategyCosts.from_dict(old).approx_kernel_scale == 1.0
    assert dataclasses.replace(SHAPE, approx_kernel_scale=3.0).approx_kernel_scale == 3.0  # more work
    for bad in (0.0, -0.5, float("inf")):
        with pytest.raises(CorruptIndexError):
            StrategyCosts.from_dict({**half.to_dict(), "approx_kernel_scale": bad})
    with pytest.raises(InvalidArgumentError):
        dataclasses.replace(SHAPE, approx_kernel_scale=True)


def test_config_checks_the_kernel_scale() -> None:
    assert EngineConfig().approx_kernel_scale is None  # measured at build
    assert EngineConfig(approx_kernel_scale=0.25).approx_kernel_scale == 0.25
    assert EngineConfig(approx_kernel_scale=2).approx_kernel_scale == 2
    for bad in (0.0, -0.1, float("inf"), True, "half"):
        with pytest.raises(InvalidArgumentError) as err:
            EngineConfig(approx_kernel_scale=bad)  # type: ignore[arg-type]
        assert err.value.field == "approx_kernel_scale"
    assert parse_index_spec("approx_kernel_scale=0.5").approx_kernel_scale == 0.5
    assert parse_index_spec("approx_kernel_scale=none").approx_kernel_scale is None


def test_probe_recall_counts_the_true_rows_found() -> None:
    truth = np.array([[1, 2, 3], [4, 5, -1]])
    found = np.array([[3, 9, 1], [5, -1, -1]])
    assert strategy.probe_recall(found, truth) == pytest.approx(3 / 5)  # hand-counted: 2 + 1 of 3 + 2
    assert strategy.probe_recall(truth, truth) == 1.0


def test_config_checks_the_recall() -> None:
    assert EngineConfig().approx_min_recall == 0.99
    for bad in (1.5, -0.1, True, "high"):
        with pytest.raises(InvalidArgumentError) as err:
            EngineConfig(approx_min_recall=bad)  # type: ignore[arg-type]
        assert err.value.field == "approx_min_recall"


# -- the engine ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built() -> tuple[SearchEngine, np.ndarray, np.ndarray]:
    mu, log_sigma = make_bank(4000, 6, "moderate", np.random.default_rng(31))
    # approximate mode is the default from 1,000 items: the build measures the approximate paths
    config = EngineConfig(approx_nlist=40, approx_min_items=1000, typicality_samples=0)
    return SearchEngine.build(mu, log_sigma=log_sigma, config=config, build_approx=True), mu, log_sigma


Built = tuple[SearchEngine, np.ndarray, np.ndarray]


def _recall(found: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(w)) / len(w) for f, w in zip(found, want, strict=True)]))


def test_build_measures_the_approximate_paths_and_their_recall(built: Built) -> None:
    engine, mu, log_sigma = built
    costs = engine.costs
    assert costs is not None and costs.approx is not None and costs.approx_recall is not None
    assert set(costs.approx) == set(FAMILIES)
    assert all(s > 0 for t in costs.approx.values() for v in t.values() for s in v)
    # the recall the build measured is the one an independent brute force gives on the same probes
    # (the engine's probes: 2 * max(PROBE_BATCH_SIZES) per family, seed 0)
    probes = family_probes(mu, log_sigma, 2 * max(PROBE_BATCH_SIZES), seed=0)
    want = {f: top_k(log_q(z, mu, log_sigma), 10) for f, z in probes.items()}
    for path in ("kernel", "scan"):
        forced = engine.reconfigured(costs, approx_strategy=path)
        calls = [forced.search_batch_arrays(z, 10, mode="approx").rows for z in probes.values()]
        if path == "kernel":  # and the same in calls of one query
            calls += [
                np.stack([forced.search_batch_arrays(q[None], 10, mode="approx").rows[0] for q in z])
                for z in probes.values()
            ]
        wants = list(want.values()) * (2 if path == "kernel" else 1)
        assert costs.approx_recall[path] == pytest.approx(min(map(_recall, calls, wants)))
    assert engine.info()["exact_costs"]["approx_recall"] == costs.approx_recall


def test_a_choice_of_an_exact_path_answers_exactly(built: Built) -> None:
    engine, mu, log_sigma = built
    # both approximate paths below the recall asked for: every approximate call is answered exactly
    low = _costs(EXACT, APPROX, {"kernel": 0.5, "scan": 0.5})
    exact = engine.reconfigured(low)
    assert exact.approx_choice(1) == ("exact", "kernel") and exact.approx_choice(64) == ("exact", "flat")
    z = family_probes(mu, log_sigma, 40, seed=5)["prior"]
    want = top_k(log_q(z, mu, log_sigma), 10)
    for calls in ([exact.search(q, 10, mode="approx") for q in z], exact.search_batch(z, 10, mode="approx")):
        for b, res in enumerate(calls):
            assert res.certified and res.mode == "approx"
            np.testing.assert_array_equal(res.rows, want[b])


def test_a_choice_of_an_approximate_path_is_that_path(built: Built) -> None:
    engine, mu, log_sigma = built
    z = family_probes(mu, log_sigma, 40, seed=6)["box"]
    auto = engine.reconfigured(_costs(EXACT, APPROX, {"kernel": 1.0, "scan": 1.0}))
    assert auto.approx_choice(40) == ("approx", "scan") and auto.approx_choice(1) == ("approx", "scan")
    scan = engine.reconfigured(None, approx_strategy="scan")
    got, ref = auto.search_batch_arrays(z, 10, mode="approx"), scan.search_batch_arrays(z, 10, mode="approx")
    np.testing.assert_array_equal(got.rows, ref.rows)
    assert not got.certified.any()  # approximate answers claim nothing (approx_certify is off)
    # an explicit strategy, or a call's own nprobe, bypasses the choice
    none_qualify = _costs(EXACT, APPROX, {"kernel": 0.0, "scan": 0.0})
    forced = engine.reconfigured(none_qualify, approx_strategy="kernel")
    assert forced.approx_choice(64) == ("approx", "kernel")
    low = engine.reconfigured(none_qualify)
    own = low.search_batch_arrays(z, 10, mode="approx", nprobe=2)
    np.testing.assert_array_equal(own.rows, scan.search_batch_arrays(z, 10, mode="approx", nprobe=2).rows)


def test_choice_survives_save_and_load(built: Built, tmp_path: Path) -> None:
    engine = built[0].reconfigured(SHAPE)
    loaded = SearchEngine.load(engine.save(tmp_path / "e"))
    assert loaded.costs == SHAPE
    assert [loaded.approx_choice(b) for b in (1, 64)] == [("approx", "kernel"), ("exact", "flat")]


def test_banks_searched_exactly_by_default_answer_approximate_batches_exactly(built: Built) -> None:
    """Below approx_min_items the build measures the exact paths only: an approximate call of 8
    queries or more takes the exact path the costs pick (certified, equal to the brute force), a
    smaller one the approximate kernel; engines saved without costs keep the rule by size."""
    _, mu, log_sigma = built
    config = EngineConfig(approx_nlist=40, typicality_samples=0)  # approx by default from 100k items
    engine = SearchEngine.build(mu, log_sigma=log_sigma, config=config, build_approx=True)
    assert engine.costs is not None and engine.costs.approx is None
    exact = [("exact", engine.exact_path(b)) for b in (8, 64)]
    assert [engine.approx_choice(b) for b in (1, 7, 8, 64)] == [("approx", "kernel")] * 2 + exact
    z = family_probes(mu, log_sigma, 24, seed=5)["prior"]
    got = engine.search_batch_arrays(z, 10, mode="approx")
    assert got.certified.all()  # an exact path's answer (the call's mode stays the one asked)
    want = top_k(log_q(z, mu, log_sigma), 10)
    np.testing.assert_array_equal(got.rows, want)
    np.testing.assert_allclose(got.scores, np.take_along_axis(log_q(z, mu, log_sigma), want, 1), rtol=1e-12)
    saved_without = engine.reconfigured(None)
    assert [saved_without.approx_choice(b) for b in (1, 8)] == [("approx", "kernel"), ("approx", "scan")]
    past = engine.reconfigured(engine.costs, approx_min_items=1000)  # approx by default: size rule
    assert past.approx_choice(64) == ("approx", "scan")
    asked = SearchEngine.build(
        mu, log_sigma=log_sigma, config=dataclasses.replace(config, mode="approx"), build_approx=True
    )
    assert asked.costs is not None and asked.costs.approx is not None  # the configured mode: measured


def _kernel_recall(engine: SearchEngine, probes: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """The approximate kernel's recall@10 as the build measures it (the least over families, over
    calls of every probe and calls of one query on the first SINGLE_RECALL_PROBES), here against
    the independent brute force."""
    forced = engine.reconfigured(engine.costs, approx_strategy="kernel")
    worst = 1.0
    for f, z in probes.items():
        worst = min(worst, _recall(forced.search_batch_arrays(z, 10, mode="approx").rows, want[f]))
        n = SINGLE_RECALL_PROBES
        alone = np.stack([forced.search_batch_arrays(q[None], 10, mode="approx").rows[0] for q in z[:n]])
        worst = min(worst, _recall(alone, want[f][:n]))
    return worst


def test_the_kernel_does_its_share_of_the_work(built: Built) -> None:
    engine, mu, log_sigma = built
    assert engine.approx is not None and engine.approx.nprobe == 8 and engine.approx.nlist == 40
    z = family_probes(mu, log_sigma, 40, seed=8)["prior"]
    want = log_q(z, mu, log_sigma)  # (B, N) float64 brute force
    kernel = engine.reconfigured(None, approx_strategy="kernel")
    # a share s scans ceil(8 s) partitions by centroid, then by bound up to ceil(s * 0.08 * 40): at
    # s = 1/2 four and at most 2 by bound, i.e. exactly a call's own nprobe of 4 (centroids only)
    for scale, nprobe in ((0.5, 4), (1e-9, 1), (1 / 8, 1)):
        scaled = engine.reconfigured(None, approx_strategy="kernel", approx_kernel_scale=scale)
        assert scaled.kernel_scale == scale
        got = scaled.search_batch_arrays(z, 10, mode="approx")
        np.testing.assert_array_equal(
            got.rows, kernel.search_batch_arrays(z, 10, mode="approx", nprobe=nprobe).rows
        )
        valid = got.rows >= 0
        rows = np.where(valid, got.rows, 0)
        np.testing.assert_allclose(
            got.scores[valid], np.take_along_axis(want, rows, axis=1)[valid], rtol=1e-12, atol=1e-12
        )
    # the whole default work finds at least what a quarter of it finds, on the same queries
    truth = top_k(want, 10)
    full = _recall(kernel.search_batch_arrays(z, 10, mode="approx").rows, truth)
    quarter = engine.reconfigured(None, approx_strategy="kernel", approx_kernel_scale=0.25)
    assert full >= _recall(quarter.search_batch_arrays(z, 10, mode="approx").rows, truth)


@pytest.mark.parametrize(
    ("changes", "scale"),
    [
        ({"approx_min_recall": 0.0}, min(KERNEL_SCALES_LESS)),  # every share passes: the smallest
        ({"approx_min_recall": 1.0}, 1.0),  # no share can clear 1 + the margin: the default work
        ({"approx_min_recall": 0.0, "approx_kernel_scale": 2.0}, 2.0),  # more work, configured
        ({"approx_min_recall": 0.0, "approx_kernel_scale": 0.5}, 0.5),  # configured: not measured
    ],
)
def test_build_keeps_the_smallest_kernel_scale_that_reaches_the_recall(
    built: Built, changes: dict[str, Any], scale: float
) -> None:
    _, mu, log_sigma = built
    config = EngineConfig(approx_nlist=40, approx_min_items=1000, typicality_samples=0, **changes)
    engine = SearchEngine.build(mu, log_sigma=log_sigma, config=config, build_approx=True)
    assert engine.costs is not None and engine.costs.approx_recall is not None
    assert engine.costs.approx_kernel_scale == pytest.approx(scale)
    assert engine.reconfigured(engine.costs).kernel_scale == pytest.approx(scale)
    # the kernel's recall in the table is the chosen share's, as an independent brute force finds it
    probes = family_probes(mu, log_sigma, 2 * max(PROBE_BATCH_SIZES), seed=0)
    want = {f: top_k(log_q(z, mu, log_sigma), 10) for f, z in probes.items()}
    assert engine.costs.approx_recall["kernel"] == pytest.approx(_kernel_recall(engine, probes, want))


def test_build_gives_the_kernel_more_work_where_the_default_falls_short(built: Built) -> None:
    _, mu, log_sigma = built
    base = EngineConfig(approx_nlist=40, approx_min_items=1000, typicality_samples=0)

    def recorded(**changes: Any) -> StrategyCosts:
        engine = SearchEngine.build(
            mu, log_sigma=log_sigma, config=dataclasses.replace(base, **changes), build_approx=True
        )
        assert engine.costs is not None and engine.costs.approx_recall is not None
        return engine.costs

    # the kernel's recall on the build's probes at the default work and at each larger share
    recall = {s: recorded(approx_kernel_scale=s).approx_recall["kernel"] for s in (1.0, *KERNEL_SCALES_MORE)}  # type: ignore[index]
    assert recall[1.0] < 0.99  # this bank's default work falls short of the usual bar
    bar = recall[1.0] + 0.001  # the default work fails it
    want = next((s for s in sorted(KERNEL_SCALES_MORE) if recall[s] >= bar + SCALE_MARGIN), 1.0)
    assert want != 1.0  # some larger share clears it on this bank: the case under test
    got = recorded(approx_min_recall=bar)
    assert got.approx_kernel_scale == want and got.approx_recall is not None
    assert got.approx_recall["kernel"] == recall[want]
    # further below the bar than SCALE_UP_REACH no larger share is tried, although one would clear
    # it here: the default work
    far_bar = recall[1.0] + SCALE_UP_REACH + 0.01
    assert any(recall[s] >= far_bar + SCALE_MARGIN for s in KERNEL_SCALES_MORE)
    assert recorded(approx_min_recall=far_bar).approx_kernel_scale == 1.0
