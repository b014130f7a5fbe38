"""latentsearch.indexer: encode a dataset (or read posteriors), build the index, publish a version.

Public API (the server uses :class:`IndexRoot`: ``load_current()`` at start, then polls
``current()`` and reloads when it changes)::

    from latentsearch.indexer import IndexJobConfig, IndexRoot, parse_index_spec, run_index_job

    result = run_index_job(IndexJobConfig(out="idx", posteriors="post.npz"))
    version, engine = IndexRoot("idx").load_current()
    model = IndexRoot("idx").load_model(version)  # the version's stored model (None: from posteriors)
"""

from latentsearch.indexer.config import IndexJobConfig, parse_index_spec
from latentsearch.indexer.job import EncodeStep, JobResult, local_encode, run_index_job
from latentsearch.indexer.models import ModelRef
from latentsearch.indexer.posteriors import read_posteriors_npz
from latentsearch.indexer.root import IndexRoot, Staging, VersionInfo

__all__ = [
    "EncodeStep",
    "IndexJobConfig",
    "IndexRoot",
    "JobResult",
    "ModelRef",
    "Staging",
    "VersionInfo",
    "local_encode",
    "parse_index_spec",
    "read_posteriors_npz",
    "run_index_job",
]
