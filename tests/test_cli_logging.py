"""The command line's logging: -v / -q levels, no library noise, one line for an operator's mistake."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from latentsearch.cli import log_level


def test_verbosity_flags_map_to_levels() -> None:
    assert log_level(0, 0) == logging.INFO
    assert log_level(1, 0) == logging.DEBUG
    assert log_level(3, 0) == logging.DEBUG
    assert log_level(0, 1) == logging.WARNING
    assert log_level(0, 2) == logging.ERROR
    assert log_level(0, 9) == logging.ERROR


def test_a_missing_index_root_is_one_line_without_library_noise(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = subprocess.run([sys.executable, "-m", "latentsearch", "index", "ls", str(missing)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {missing}: no such index root"]
    verbose = subprocess.run([sys.executable, "-m", "latentsearch", "-v", "index", "ls", str(missing)],
                             capture_output=True, text=True, timeout=120)
    assert "faiss.loader" in verbose.stderr  # -v shows what the default hides
