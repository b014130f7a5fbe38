"""Progress of long loops: a tqdm bar on a terminal, a plain periodic log line anywhere else.

A bar redraws itself with carriage returns, which a redirected log (``> job.log 2>&1``, a container's
stdout, CI) keeps as hundreds of kilobytes of ``\\r`` lines. So :class:`Progress` draws the bar only
when its stream (default ``sys.stderr``) is a terminal; otherwise it logs one line every
``interval_s`` seconds through ``logging`` (INFO), such as::

    encode: 120000/1000000 items (12%), 54.3k items/s

and, when it logged any, a last one at :meth:`Progress.close`. Every progress display of the package
(training, encoding, the indexing stages) goes through this one class.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["Progress", "format_count", "is_terminal"]

log = logging.getLogger(__name__)

# Seconds between two log lines when the stream is not a terminal.
DEFAULT_INTERVAL_S = 10.0


def format_count(n: float) -> str:
    """A count in at most 3 significant digits with a k / M / G / T suffix.

    ``5000 -> "5k"``, ``70000 -> "70k"``, ``1_000_000 -> "1M"``, ``54321 -> "54.3k"``, ``999 -> "999"``.
    """
    value = float(n)
    for suffix in ("", "k", "M", "G"):
        if abs(value) < 999.5:
            return f"{value:.3g}{suffix}"
        value /= 1000.0
    return f"{value:.3g}T"


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an open terminal (False for files, pipes, closed or odd streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Progress:
    """Progress over ``total`` units: a tqdm bar on a terminal, else a periodic log line.

    Args:
        total: units of work expected.
        desc: what is running (the bar's label, the log line's prefix), e.g. ``"encode"``.
        unit: singular unit name (``"item"``, ``"step"``); the log line adds an ``s``.
        enabled: False shows nothing at all (``--no-progress``).
        stream: where the bar goes and whose ``isatty()`` picks the mode (default ``sys.stderr``,
            looked up at construction).
        interval_s: seconds between log lines when ``stream`` is not a terminal (default
            ``DEFAULT_INTERVAL_S``).
        logger: logger of the log lines (default this module's); pass the caller's module logger.
        leave: keep the finished bar on screen (terminal mode only).
        unit_scale: the bar shows counts as 1.2k, 3.4M (terminal mode only).
        clock: monotonic seconds (tests pass a fake one).

    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        unit: str = "item",
        enabled: bool = True,
        stream: TextIO | None = None,
        interval_s: float | None = None,
        logger: logging.Logger | None = None,
        leave: bool = True,
        unit_scale: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.count = 0
        self.enabled = enabled
        self._stream = sys.stderr if stream is None else stream
        self._interval = DEFAULT_INTERVAL_S if interval_s is None else float(interval_s)
        self._log = logger or log
        self._clock = clock
        self._start = clock()
        self._next = self._start + self._interval
        self._postfix = ""
        self._logged = False
        self._closed = False
        self._bar: Any = None
        if enabled and is_terminal(self._stream):
            self._bar = tqdm(
                total=self.total,
                desc=desc,
                unit=unit,
                unit_scale=unit_scale,
                leave=leave,
                file=self._stream,
                dynamic_ncols=True,
                smoothing=0.1,
            )

    @property
    def mode(self) -> str:
        """``"bar"`` (tqdm on a terminal), ``"log"`` (periodic log lines) or ``"off"``."""
        if not self.enabled:
            return "off"
        return "bar" if self._bar is not None else "log"

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled:
            now = self._clock()
            if now >= self._next:
                self._emit(now)
                self._next = now + self._interval

    def set_postfix(self, **values: Any) -> None:
        """Extra values shown after the count (``loss=...``); the bar redraws on its next update."""
        if self._bar is not None:
            self._bar.set_postfix(refresh=False, **values)
        elif self.enabled:
            self._postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def set_postfix_str(self, text: str) -> None:
        """Extra text shown after the count (the current stage's name)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)
        elif self.enabled:
            self._postfix = text

    def close(self) -> None:
        """Finish: close the bar, or log the last line when any line was logged."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self._logged:
            self._emit(self._clock(), final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _emit(self, now: float, *, final: bool = False) -> None:
        elapsed = max(now - self._start, 1e-9)
        pct = 100.0 * self.count / self.total if self.total > 0 else 100.0
        extra = f" ({self._postfix})" if self._postfix else ""
        when = f" in {elapsed:.1f} s" if final else ""
        self._log.info(
            "%s: %d/%d %ss (%.0f%%)%s, %s %ss/s%s",
            self.desc,
            self.count,
            self.total,
            self.unit,
            pct,
            when,
            format_count(self.count / elapsed),
            self.unit,
            extra,
        )
        self._logged = True
