"""EngineConfig rejects a bad FAISS factory string when it is constructed, naming the field.

Before this check a bad ``exact_factory`` surfaced only at the first exact search (the scale groups
build their FAISS index lazily), or not at all: an index that builds without training but is not
exact (HNSW, fp16 scalar quantizer) would have returned uncertified answers as exact.
"""

from __future__ import annotations

import dataclasses
import math

import faiss
import numpy as np
import pytest

from latentsearch.engine import EngineConfig, ExactIndex
from latentsearch.engine.config import exact_group_index
from latentsearch.errors import InvalidArgumentError

BAD_FACTORIES = [
    # (factory, words the message must contain)
    ("IVF", "cannot build"),  # does not parse
    ("nonsense", "cannot build"),
    ("", "cannot build"),
    ("flat", "cannot build"),  # FAISS factory strings are case-sensitive
    ("IVF4,Flat", "needs training"),
    ("PQ1", "needs training"),
    ("SQ8", "needs training"),
    ("HNSW32", "IndexHNSWFlat"),  # trained, but a graph search: candidates may be missed
    ("SQfp16", "IndexScalarQuantizer"),  # trained, but fp16 vectors: scores off the bound
    ("IDMap,Flat", "IndexIDMap"),  # its add() refuses vectors without ids
    ("L2norm,Flat", "IndexPreTransform"),  # normalises the lifted vectors: other scores
]


@pytest.mark.parametrize(("factory", "why"), BAD_FACTORIES)
def test_bad_exact_factory_rejected_at_construction(factory: str, why: str) -> None:
    with pytest.raises(InvalidArgumentError) as exc:
        EngineConfig(exact_factory=factory)
    assert exc.value.field == "exact_factory"
    assert why in str(exc.value) and repr(factory) in str(exc.value)


@pytest.mark.parametrize("factory", [None, 5, b"Flat", ["Flat"]])
def test_non_string_exact_factory_rejected(factory: object) -> None:
    with pytest.raises(InvalidArgumentError) as exc:
        EngineConfig(exact_factory=factory)  # type: ignore[arg-type]
    assert exc.value.field == "exact_factory"
    assert type(factory).__name__ in str(exc.value)


@pytest.mark.parametrize(("factory", "why"), BAD_FACTORIES[:1] + BAD_FACTORIES[4:5] + BAD_FACTORIES[7:8])
def test_bad_exact_factory_rejected_from_a_manifest_and_by_replace(factory: str, why: str) -> None:
    """``from_dict`` (what loading a saved engine runs) and ``dataclasses.replace`` check it too."""
    data = EngineConfig().to_dict()
    data["exact_factory"] = factory
    with pytest.raises(InvalidArgumentError, match=why) as exc:
        EngineConfig.from_dict(data)
    assert exc.value.field == "exact_factory"
    with pytest.raises(InvalidArgumentError, match=why) as exc:
        dataclasses.replace(EngineConfig(), exact_factory=factory)
    assert exc.value.field == "exact_factory"


def test_bad_metric_rejected() -> None:
    with pytest.raises(InvalidArgumentError) as exc:
        EngineConfig(metric="l2")  # type: ignore[arg-type]
    assert exc.value.field == "metric"


def test_flat_accepted_and_round_trips() -> None:
    config = EngineConfig(exact_factory="Flat")
    assert config.exact_factory == "Flat"
    assert EngineConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("n", [3, 7, 21])
def test_exact_group_index_is_an_empty_flat_inner_product_index(n: int) -> None:
    index = exact_group_index("Flat", n)
    assert type(index) is faiss.IndexFlat
    assert (index.d, index.ntotal, index.metric_type) == (n, 0, faiss.METRIC_INNER_PRODUCT)
    x = np.arange(2 * n, dtype=np.float32).reshape(2, n)
    index.add(x)
    scores, ids = index.search(x[:1], 2)
    np.testing.assert_allclose(scores[0], [x[1] @ x[0], x[0] @ x[0]], rtol=1e-6)  # inner products
    np.testing.assert_array_equal(ids[0], [1, 0])


def test_exact_index_built_around_the_config_still_checks_its_factory() -> None:
    """A factory reaching the scale groups without a config (a hand-edited manifest) fails on use."""
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(50, 2))
    log_sigma = np.full((50, 2), math.log(0.5))
    exact = ExactIndex.build(mu, log_sigma, factory="HNSW32")
    with pytest.raises(InvalidArgumentError) as exc:
        _ = exact.groups[0].index
    assert exc.value.field == "exact_factory"
