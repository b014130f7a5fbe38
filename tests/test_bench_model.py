"""bench/bench_model.py: the neighbour and agreement helpers its quality figures rest on (hand-checked)."""

from __future__ import annotations

import numpy as np

from bench.bench_model import l2_neighbours, label_agreement


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
