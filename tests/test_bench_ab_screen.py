"""bench/ab_screen.py: the batch-screen A/B runs and reports what it measured."""

from __future__ import annotations

import json

from bench import ab_screen


def test_quick_ab_reports_every_case_with_the_same_exact_answers(tmp_path) -> None:
    assert ab_screen.main(["--quick", "--batches", "8,16", "--out", str(tmp_path)]) == 0
    (report_path,) = tmp_path.glob("ab-screen-*.json")
    report = json.loads(report_path.read_text())
    assert report["bank"]["items"] == 20_000
    assert {(c["family"], c["B"]) for c in report["cases"]} == {
        (f, b) for f in ("box", "prior", "posterior") for b in (8, 16)
    }
    for case in report["cases"]:
        assert case["same"] and case["brute_force_rows"]
        assert all(v > 0 for v in case["ms_per_query"].values())
    assert "| box | 8 |" in report_path.with_suffix(".md").read_text()
