"""bench/bench_model.py: the neighbour, agreement, fold and paired-statistics helpers its quality
figures rest on (hand-checked)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from bench.bench_model import (
    cv_folds,
    decode_outcome,
    encode_outcome,
    l2_neighbours,
    label_agreement,
    mean_se,
    outcome_matrix,
    paired,
    per_query_agreement,
)


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
