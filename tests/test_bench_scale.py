"""bench/bench_scale.py: its float64 reference top-k against the independent brute force, and its
per-step recorder."""

from __future__ import annotations

import numpy as np
from reference import log_q, top_k

from bench import bench_scale
from latentsearch.data.banks import query_families, vae_like_posteriors


def test_reference_topk_matches_brute_force(monkeypatch):
    bank = vae_like_posteriors(5_000, 4, seed=2)
    monkeypatch.setattr(bench_scale, "_CHUNK", 1_500)  # several chunks, the last one short
    z = np.concatenate(list(query_families(bank, 8, seed=3).values()))
    got = bench_scale.reference_topk(bank.mu, bank.log_sigma, z)
    np.testing.assert_array_equal(got, top_k(log_q(z, bank.mu, bank.log_sigma), bench_scale.K))


def test_step_records_time_and_memory_and_nested_peaks() -> None:
    steps: dict[str, dict[str, float]] = {}
    with bench_scale.step(steps, "outer"), bench_scale.step(steps, "inner"):
        block = np.ones(64 * 2**20 // 8)  # 64 MiB touched
        del block
    assert list(steps) == ["inner", "outer"]
    assert steps["inner"]["peak_mib"] >= steps["inner"]["rss_before_mib"] + 60
    assert steps["outer"]["peak_mib"] >= steps["inner"]["peak_mib"]
    assert steps["outer"]["s"] >= steps["inner"]["s"] >= 0
