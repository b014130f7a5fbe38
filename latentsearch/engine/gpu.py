"""Where FAISS runs: device selection and moving exact flat indexes to a GPU.

With ``faiss-gpu`` installed and a CUDA device visible, the exact path's flat scale-group indexes
are cloned to the GPU (``GpuIndexFlatIP``) and answer unfiltered top-k screens there. Label-
filtered searches and range searches (the certification fallback) stay on the CPU copy: FAISS's
GPU flat index supports neither ID selectors nor range search. The IVF partitions of the
approximate path stay on the CPU: they are probed with ``search_preassigned`` and selectors.
"""

from __future__ import annotations

import logging
import threading
from typing import Literal

import faiss

from latentsearch.errors import FailedPreconditionError, InvalidArgumentError

__all__ = ["Device", "gpu_count", "resolve_device", "to_gpu"]

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]

_resources = None
_resources_lock = threading.Lock()


def gpu_count() -> int:
    """CUDA devices FAISS can use (0 with faiss-cpu)."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


def resolve_device(device: str) -> Literal["cpu", "cuda"]:
    """``auto`` -> ``cuda`` when FAISS sees a GPU, else ``cpu``; ``cuda`` without one is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise InvalidArgumentError(f"device must be auto, cpu or cuda, got {device!r}", field="device")
    if device == "cpu":
        return "cpu"
    if gpu_count() > 0:
        return "cuda"
    if device == "cuda":
        raise FailedPreconditionError(
            "device='cuda' but FAISS sees no GPU (install faiss-gpu on a CUDA host, or use device='auto')",
            field="device",
        )
    return "cpu"


def to_gpu(index: faiss.Index, device_id: int = 0) -> faiss.Index:
    """A GPU clone of a CPU index, sharing one set of GPU resources per process."""
    global _resources
    with _resources_lock:
        if _resources is None:
            _resources = faiss.StandardGpuResources()
    log.debug("cloning a %s index of %d vectors to GPU %d", type(index).__name__, index.ntotal, device_id)
    return faiss.index_cpu_to_gpu(_resources, device_id, index)
