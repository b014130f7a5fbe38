"""bench/run_all.py: argument parsing, the plan, skipped modules and the summary files (no real benchmark)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import run_all


def test_parse_quick_only_and_args(tmp_path: Path) -> None:
    config = run_all.config_from_args(
        ["--quick", "--only", "engine,server", "--out", str(tmp_path), "--args", 'engine=--n 100 --d "4"']
    )
    assert config.quick and config.only == ("engine", "server") and config.out == tmp_path
    steps = {bench.name: cmd for bench, cmd in run_all.plan(config)}
    assert set(steps) == {"engine", "server"}
    assert steps["engine"] == [sys.executable, "-m", "bench.bench_engine", "--n", "100", "--d", "4",
                               "--out", str(tmp_path)]  # fmt: skip
    server = steps["server"]
    if server is not None:  # bench_server may not exist yet
        assert server[3:-2] == list(run_all.BENCHMARKS[3].quick_args)


def test_full_run_uses_each_benchmarks_defaults(tmp_path: Path) -> None:
    config = run_all.config_from_args(["--out", str(tmp_path)])
    for bench, cmd in run_all.plan(config):
        if cmd is not None:
            assert cmd == [sys.executable, "-m", bench.module, "--out", str(tmp_path)]


@pytest.mark.parametrize("argv", [["--only", "nope"], ["--args", "engine"], ["--args", "nope=--x"]])
def test_bad_arguments_exit(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        run_all.config_from_args(argv)


def test_summary_with_a_missing_module_and_a_fake_benchmark(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "fake_bench.py"
    fake.write_text(
        "import sys, pathlib\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1])\n"
        "(out / 'fake-result.json').write_text('{}')\n"
        "(out / 'fake-result.md').write_text('# fake')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(
        run_all,
        "BENCHMARKS",
        (
            run_all.Benchmark(name="engine", module="fake_bench"),
            run_all.Benchmark(name="server", module="bench.no_such_benchmark"),
        ),
    )
    out = tmp_path / "results"
    report = run_all.run_all(run_all.RunAllConfig(out=out, quick=True))
    assert [b["status"] for b in report["benchmarks"]] == ["ok", "skipped"]
    assert report["benchmarks"][0]["files"] == ["fake-result.json", "fake-result.md"]
    date = report["date"]
    saved = json.loads((out / f"{date}.json").read_text())
    assert saved["mode"] == "quick" and saved["machine"]["logical_cores"] >= 1
    md = (out / f"{date}.md").read_text()
    assert "[fake-result.json](fake-result.json)" in md
    assert "bench.no_such_benchmark does not exist" in md
    assert "| benchmark | status | seconds | results |" in md


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    report = run_all.run_all(run_all.RunAllConfig(out=tmp_path / "r", quick=True, dry_run=True))
    assert not (tmp_path / "r").exists()
    assert {b["status"] for b in report["benchmarks"]} <= {"planned", "skipped"}
