"""bench/bench_model.py: the neighbour, agreement, fold, paired-statistics and --diagnose helpers its
quality figures rest on (hand-checked)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.bench_model import (
    HUB_K,
    average_ranks,
    cv_folds,
    decode_outcome,
    diagnose,
    diagnosis_markdown,
    disagreement,
    encode_outcome,
    hubness,
    l2_neighbours,
    label_agreement,
    mean_se,
    outcome_matrix,
    paired,
    per_query_agreement,
    posterior_scores,
    quality,
    skewness,
    spearman,
    top_rows,
)
from latentsearch.data.readers import ArrayDataset
from latentsearch.model.config import TrainConfig, VAEConfig
from latentsearch.model.loader import load_model
from latentsearch.model.train import train
from latentsearch.posterior import DiagonalGaussian


def test_l2_neighbours_by_hand_and_ties_to_the_lower_row() -> None:
    bank = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # (4, 2)
    query = np.array([[0.9, 0.1], [0.5, 0.0]])  # (2, 2)
    rows = l2_neighbours(query, bank, k=3, chunk=1)
    # query 0: squared distances 0.82, 4.42, 1.62, 0.02 -> rows 3, 0, 2
    # query 1: 0.25, 6.25, 1.25, 0.25 -> the tie between rows 0 and 3 goes to row 0
    np.testing.assert_array_equal(rows, [[3, 0, 2], [0, 3, 2]])
    images = np.arange(2 * 2 * 2 * 1, dtype=np.uint8).reshape(2, 2, 2, 1)  # items are flattened
    np.testing.assert_array_equal(l2_neighbours(images[1:], images, k=2), [[1, 0]])


def test_label_agreement_by_hand() -> None:
    rows = np.array([[0, 1, 2], [2, 2, 0]])
    bank_labels = np.array([7, 7, 4])
    query_labels = np.array([7, 7])
    top1, topk = label_agreement(rows, bank_labels, query_labels)
    assert top1 == 0.5  # query 0's nearest is a 7, query 1's a 4
    assert topk == 3 / 6  # 7, 7, 4 and 4, 4, 7


def test_per_query_agreement_by_hand() -> None:
    rows = np.array([[0, 1, 2], [2, 2, 0]])
    hit1, share = per_query_agreement(rows, np.array([7, 7, 4]), np.array([7, 4]))
    np.testing.assert_array_equal(hit1, [1.0, 1.0])  # query 0's nearest is a 7, query 1's a 4
    np.testing.assert_allclose(share, [2 / 3, 2 / 3])


def test_cv_folds_hold_every_item_out_once() -> None:
    folds = cv_folds(11, 3, seed=5)
    held = np.concatenate([va for _, _, va in folds])
    np.testing.assert_array_equal(np.sort(held), np.arange(11))
    assert [len(va) for _, _, va in folds] == [4, 4, 3]
    for i, tr, va in folds:
        assert i in (0, 1, 2) and not set(tr) & set(va) and len(tr) + len(va) == 11
        assert list(va) == sorted(va) and list(tr) == sorted(tr)
    assert [list(va) for _, _, va in cv_folds(11, 3, seed=5)] == [list(va) for _, _, va in folds]


def test_paired_difference_standard_error_and_mcnemar_counts_by_hand() -> None:
    # One seed, 5 queries: a right on 0, 1, 2, 3; b right on 0, 4. Differences 0, 1, 1, 1, -1.
    a = np.array([[1.0, 1.0, 1.0, 1.0, 0.0]])
    b = np.array([[1.0, 0.0, 0.0, 0.0, 1.0]])
    p = paired(a, b)
    d = np.array([0.0, 1.0, 1.0, 1.0, -1.0])
    se = math.sqrt(((d - 0.4) ** 2).sum() / 4 / 5)  # sample sd / sqrt(n)
    assert p == {"diff": 0.4, "se": round(se, 5), "wins": 3, "losses": 1, "n_queries": 5}
    assert mean_se(d) == pytest.approx((0.4, se))
    # Two seeds; NaN: no query there. Per item the seeds are averaged first: items 0..2 -> 1, 0.5, -1.
    a2 = np.array([[1.0, 1.0, np.nan], [1.0, 0.0, 0.0]])
    b2 = np.array([[0.0, 0.0, np.nan], [0.0, 0.0, 1.0]])
    p2 = paired(a2, b2)
    assert p2["diff"] == pytest.approx(0.5 / 3, abs=1e-5) and p2["n_queries"] == 3
    assert (p2["wins"], p2["losses"]) == (3, 1)


def test_outcomes_round_trip_through_their_json_form() -> None:
    o: dict[str, Any] = {"config": "c", "seed": 1, "rows": np.array([4, 0, 2])}
    o |= {"top1_logq": np.array([1.0, 0.0, 1.0]), "top5_logq": np.array([0.6, 0.0, 1.0])}
    back = decode_outcome(encode_outcome(o))
    assert back["config"] == "c" and back["seed"] == 1
    for key in ("rows", "top1_logq", "top5_logq"):
        np.testing.assert_allclose(back[key], o[key])
    m = outcome_matrix([back], "top1_logq", [0, 1], 6)
    np.testing.assert_array_equal(np.isnan(m[0]), [True] * 6)
    np.testing.assert_array_equal(m[1], [0.0, np.nan, 1.0, np.nan, 1.0, np.nan])


def test_posterior_scores_against_the_float64_reference_and_by_hand() -> None:
    rng = np.random.default_rng(0)
    mu, lv, z = rng.normal(size=(7, 3)), rng.normal(size=(7, 3)), rng.normal(size=(5, 3))
    s = posterior_scores(z, mu, lv, chunk=2)
    assert sorted(s) == sorted(("logq", "mahalanobis", "mean_sigma", "mu_l2"))
    assert all(v.shape == (5, 7) for v in s.values())
    reference = DiagonalGaussian.from_logvar(mu, lv).log_prob(z[:, None, :])  # (5, 7)
    np.testing.assert_allclose(s["logq"], reference, rtol=1e-12)
    # The Mahalanobis part is log q plus sum(log sigma_i) and the constant d/2 log(2 pi).
    np.testing.assert_allclose(s["mahalanobis"], s["logq"] + 0.5 * lv.sum(1) + 1.5 * math.log(2 * math.pi))
    # One query at the origin, two items: mu (1, 0) sigma^2 (1, 4); mu (0, 2) sigma^2 (9, 1).
    bmu, blv = np.array([[1.0, 0.0], [0.0, 2.0]]), np.log(np.array([[1.0, 4.0], [9.0, 1.0]]))
    h = posterior_scores(np.zeros((1, 2)), bmu, blv)
    np.testing.assert_allclose(h["mu_l2"], [[-1.0, -4.0]])
    np.testing.assert_allclose(h["mahalanobis"], [[-0.5, -2.0]])
    # Root-mean-square sigma per dimension: sqrt(5) and sqrt(2.5).
    np.testing.assert_allclose(h["mean_sigma"], [[-0.5 / 5, -0.5 * 4 / 2.5]])
    np.testing.assert_allclose(h["logq"], [[-0.5 - math.log(2) - math.log(2 * math.pi),
                                            -2.0 - math.log(3) - math.log(2 * math.pi)]])  # fmt: skip


def test_top_rows_highest_first_ties_to_the_lower_row() -> None:
    scores = np.array([[1.0, 3.0, 3.0, 2.0], [0.0, -1.0, 5.0, 0.0]])
    np.testing.assert_array_equal(top_rows(scores, 3), [[1, 2, 3], [2, 0, 3]])


def test_skewness_ranks_and_spearman_by_hand() -> None:
    # [0, 0, 0, 4]: mean 1, variance 3, third central moment (-1 - 1 - 1 + 27) / 4 = 6.
    assert skewness(np.array([0, 0, 0, 4])) == pytest.approx(6 / 3**1.5)
    assert skewness(np.array([4, 4, 0, 0])) == pytest.approx(0.0) and skewness(np.ones(3)) == 0.0
    np.testing.assert_array_equal(average_ranks(np.array([10, 20, 10, 30])), [1.5, 3.0, 1.5, 4.0])
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a**3) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, np.ones(4)) == 0.0
    # Ranks (1, 2, 3, 4) against (2, 1, 4, 3): 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 4 / 60.
    assert spearman(a, np.array([2.0, 1.0, 4.0, 3.0])) == pytest.approx(0.6)


def test_hubness_by_hand() -> None:
    rows = np.array([[0, 1], [0, 2], [0, 1]])  # three queries' top-2 over a bank of 4
    h = hubness(rows, 4)
    np.testing.assert_array_equal(h["counts"], [3, 2, 1, 0])
    assert h["max"] == 3 and h["never"] == 0.25
    assert h["hub_slots"] == 0.5  # the one most frequent item (1% of 4, at least 1) takes 3 of 6 slots
    assert h["skew"] == pytest.approx(0.0)  # 3, 2, 1, 0 is symmetric


def test_disagreement_by_hand() -> None:
    bank_labels = np.array([0, 0, 1, 2])
    query_labels = np.array([0, 0, 1, 2, 2])
    a = np.array([0, 1, 2, 0, 3])
    b = np.array([0, 0, 3, 2, 0])  # same; both right; a only; neither; a only
    d = disagreement(a, b, bank_labels, query_labels)
    assert d == {"queries": 5, "differ": 4, "a_only": 2, "b_only": 0, "both": 1, "neither": 1}
    assert disagreement(b, a, bank_labels, query_labels)["b_only"] == 2


def test_diagnose_agrees_with_quality_and_renders(tiny_images: Any, tmp_path: Path) -> None:
    data = ArrayDataset(tiny_images(60, (12, 10, 1)), labels=np.arange(60) % 3)
    vae = VAEConfig(input_shape=(12, 10, 1), latent_dim=3, channels=(4, 8), hidden=16)
    tr, va = np.arange(15, 60), np.arange(15)
    cfg = TrainConfig(epochs=2, batch_size=16, progress=False, device="cpu")
    train(data, tmp_path / "m", config=cfg, vae_config=vae, val_rows=va)
    model = load_model(tmp_path / "m")
    g, q = diagnose(model, data, tr, va), quality(model, data, tr, va)
    assert g["n_bank"] == 45 and g["n_queries"] == 15 and g["engine_top1_match"] == 1.0
    assert g["rules"]["logq"]["top1"] == pytest.approx(q["top1_logq"], abs=1e-4)
    assert g["rules"]["mu_l2"]["top1"] == pytest.approx(q["top1_mu_l2"], abs=1e-4)
    assert g["rules"]["logq"]["same_top1_as_logq"] == 1.0
    for key, other in (("logq_vs_mu_l2", "mu_l2"), ("logq_vs_mahalanobis", "mahalanobis")):
        d = g[key]
        assert d["a_only"] + d["b_only"] + d["both"] + d["neither"] == d["differ"]
        assert d["differ"] == round(15 * (1 - g["rules"][other]["same_top1_as_logq"]))
        # Where the top-1 items differ the hit rates differ by (a_only - b_only) queries.
        assert (d["a_only"] - d["b_only"]) / 15 == pytest.approx(
            g["rules"]["logq"]["top1"] - g["rules"][other]["top1"], abs=1e-3
        )
    assert len(g["sd_mu"]) == 3 and all(r >= 1.0 for r in g["sigma_p90_over_p10"])
    assert 0 <= g["rules"]["logq"][f"never_top{HUB_K}"] <= 1
    run = {"config": "c", "seed": 0, "fold": 2, "kl_per_dim": q["kl_per_dim"], "diagnosis": g}
    lines = diagnosis_markdown([run])
    assert lines[1].startswith("### Diagnosis: c seed 0 fold 2 (15 queries, bank 45)")
    assert sum(line.startswith("| 2 |") for line in lines) == 1  # one row per latent dimension
    assert diagnosis_markdown([{"config": "c"}]) == []
