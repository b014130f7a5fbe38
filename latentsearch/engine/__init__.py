"""The posterior search engine: exact and approximate top-k by log q(z|x)."""

from latentsearch.bank import PosteriorBank
from latentsearch.engine.approx import ApproxIndex
from latentsearch.engine.config import EngineConfig, SearchMode
from latentsearch.engine.engine import MAX_ABS_COORDINATE, SearchEngine, check_points
from latentsearch.engine.exact import ExactIndex
from latentsearch.engine.lifting import lift_distributions, lift_items, lift_points
from latentsearch.engine.results import BatchResult, Neighbor, SearchResult

__all__ = [
    "MAX_ABS_COORDINATE",
    "ApproxIndex",
    "BatchResult",
    "EngineConfig",
    "ExactIndex",
    "Neighbor",
    "PosteriorBank",
    "SearchEngine",
    "SearchMode",
    "SearchResult",
    "check_points",
    "lift_distributions",
    "lift_items",
    "lift_points",
]
