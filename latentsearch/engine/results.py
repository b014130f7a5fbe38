"""Named search results."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["BatchResult", "Neighbor", "SearchResult"]


@dataclass(frozen=True)
class Neighbor:
    """One ranked item: ``rank`` 0 is the best."""

    rank: int
    id: str
    row: int
    score: float
    label: int | None
    probability: float | None = None  # p(i | z), when the search was asked for probabilities


@dataclass(frozen=True)
class SearchResult:
    """The top-k of one query, best first (score descending, ties by ascending row).

    Attributes:
        ids: ``k`` external ids.
        rows: ``(k,)`` int64 bank rows.
        scores: ``(k,)`` float64 exact ``log q(z|x)``; for distribution queries the expected
            log-likelihood ``E_{z ~ N(m, s^2)} log q(z|x)``.
        labels: ``(k,)`` int64 labels, or ``None`` when the bank has none.
        mode: ``"exact"`` or ``"approx"``: how the candidates were found (scores are always exact).
        certified: True when the top-k is proven identical to the float64 brute force.
        kl: ``(k,)`` float64 ``KL(N(m, s^2) || q(z|x))`` for distribution queries with s > 0.

    With ``with_probability=True`` (else ``None``; see :mod:`latentsearch.engine.probability`):

    Attributes:
        probability: ``(k,)`` float64 match probability p(i | z) of each item among the items
            passing the label filter, normalised by the exactly scanned part of the sum.
        log_qz: aggregate-posterior log density ``log (1/N) sum_j q(z|x_j)`` from the exactly
            scanned items (inside the certified interval).
        log_qz_lower, log_qz_upper: certified bounds on ``log_qz``; each true probability lies in
            ``probability * exp(log_qz - log_qz_upper) .. probability * exp(log_qz - log_qz_lower)``.
        typicality: fraction of the index's reference log densities ``<= log_qz`` (NaN when the
            index has no reference sample, or under a label filter).
    """

    ids: list[str]
    rows: np.ndarray
    scores: np.ndarray
    labels: np.ndarray | None
    mode: str
    certified: bool
    kl: np.ndarray | None = None
    probability: np.ndarray | None = None
    log_qz: float | None = None
    log_qz_lower: float | None = None
    log_qz_upper: float | None = None
    typicality: float | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[Neighbor]:
        for i, item_id in enumerate(self.ids):
            yield Neighbor(
                rank=i,
                id=item_id,
                row=int(self.rows[i]),
                score=float(self.scores[i]),
                label=None if self.labels is None else int(self.labels[i]),
                probability=None if self.probability is None else float(self.probability[i]),
            )


@dataclass(frozen=True)
class BatchResult:
    """The top-k of B queries as arrays, best first per row (what the server builds replies from).

    Rows past the number of selected items are padded (row -1, score -inf), so the valid entries of
    each row are a prefix.

    Attributes:
        rows: ``(B, k)`` int64 bank rows.
        scores: ``(B, k)`` float64 exact ``log q(z|x)`` (expected log-likelihood for distributions).
        certified: ``(B,)`` bool, True where the top-k is proven identical to the brute force.
        mode: ``"exact"`` or ``"approx"``.
        kl: ``(B, k)`` float64 KL divergences for distribution queries with every std > 0.
        probability: ``(B, k)`` float64 p(i | z), 0 for padding; ``log_qz``, ``log_qz_lower``,
            ``log_qz_upper`` and ``typicality``: ``(B,)`` float64 (see :class:`SearchResult`).
            All ``None`` unless the search was asked ``with_probability=True``.
    """

    rows: np.ndarray
    scores: np.ndarray
    certified: np.ndarray
    mode: str
    kl: np.ndarray | None = None
    probability: np.ndarray | None = None
    log_qz: np.ndarray | None = None
    log_qz_lower: np.ndarray | None = None
    log_qz_upper: np.ndarray | None = None
    typicality: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @property
    def counts(self) -> np.ndarray:
        """``(B,)`` int64 number of valid results of each query."""
        return (self.rows >= 0).sum(axis=1)
