"""Device selection and CPU thread setup."""

from __future__ import annotations

import logging
import os

import torch

from latentsearch.errors import FailedPreconditionError, InvalidArgumentError

__all__ = ["configure_cpu_threads", "resolve_device"]

log = logging.getLogger(__name__)


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda when available else cpu; ``"cpu"``, ``"cuda"``, ``"cuda:1"`` as given.

    Raises:
        InvalidArgumentError: an unknown device string.
        FailedPreconditionError: cuda requested but not available.
    """
    if isinstance(spec, torch.device):
        dev = spec
    elif spec == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(spec)
        except (RuntimeError, TypeError) as exc:
            raise InvalidArgumentError(
                f"unknown device {spec!r} (use auto, cpu or cuda)", field="device"
            ) from exc
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"unsupported device {dev} (use auto, cpu or cuda)", field="device")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FailedPreconditionError("device 'cuda' requested but torch.cuda.is_available() is False")
    return dev


def configure_cpu_threads(n: int | None = None) -> int:
    """Let torch use all cores (``os.cpu_count()``) unless ``n`` or the environment variable
    ``LATENTSEARCH_CPU_THREADS`` (e.g. a container's CPU quota, or 1 on a crowded machine) gives the
    count; returns it."""
    env = os.environ.get("LATENTSEARCH_CPU_THREADS", "").strip()
    if not n and env:
        if not env.isdigit() or int(env) < 1:
            raise InvalidArgumentError(
                f"LATENTSEARCH_CPU_THREADS must be a whole number >= 1, got {env!r}", field="threads"
            )
        n = int(env)
    n = n or os.cpu_count() or 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
        log.debug("torch CPU threads set to %d", n)
    return n
