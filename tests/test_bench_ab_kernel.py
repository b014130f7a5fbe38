"""bench/ab_kernel.py: the in-process A/B of two kernel versions runs and reports what it measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import ab_kernel

KERNELS = Path(ab_kernel.__file__).resolve().parents[1] / ab_kernel.KERNELS


@pytest.mark.timeout(600)
def test_ab_of_the_kernel_against_itself_reports_same_rows(tmp_path: Path) -> None:
    """A file copy of the working tree's kernel as the base: every case returns the base's rows, and
    every ratio is a positive, finite number for each case and family."""
    assert ab_kernel.main(["--quick", "--base-file", str(KERNELS), "--out", str(tmp_path)]) == 0
    [path] = (tmp_path / "quick").glob("ab-kernel-*.json")
    report = json.loads(path.read_text())
    assert report["bank"]["items"] == 5000
    assert len(report["rows"]) == 4 * 3  # exact / approx at B = 1 and B, three families
    for row in report["rows"]:
        for ratio in row["ratio_to_base"].values():
            assert 0 < ratio < float("inf")
    for name in ("base (copy)", "working tree"):
        assert all(report["same_rows_as_base"][name].values()), name
    assert "| same |" in path.with_suffix(".md").read_text()


def test_unknown_revision_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--base no-such-revision"):
        ab_kernel.main(["--quick", "--base", "no-such-revision", "--out", str(tmp_path)])
