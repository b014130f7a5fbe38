"""bench/run_all.py: argument parsing, the plan, skipped modules and the summary files (no real benchmark);
where a quick run writes, and the server benchmark's scenario names at the sizes a run uses."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from bench import bench_server, run_all


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


def test_a_benchmark_whose_extra_is_missing_is_skipped_with_a_note(monkeypatch) -> None:
    """bench_ray needs the ray extra: without it (or any required package) it is skipped, saying so."""
    ray_bench = next(b for b in run_all.BENCHMARKS if b.name == "ray")
    assert ray_bench.module == "bench.bench_ray" and "ray" in ray_bench.requires
    lacking = run_all.Benchmark(name="ray", module="bench.bench_ray", requires=("no_such_package_xyz",))
    monkeypatch.setattr(run_all, "BENCHMARKS", (lacking,))
    report = run_all.run_all(run_all.RunAllConfig(quick=True, dry_run=True))
    assert report["benchmarks"] == [
        {"name": "ray", "module": "bench.bench_ray", "status": "skipped",
         "note": "needs no_such_package_xyz (not installed)"}
    ]


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    report = run_all.run_all(run_all.RunAllConfig(out=tmp_path / "r", quick=True, dry_run=True))
    assert not (tmp_path / "r").exists()
    assert {b["status"] for b in report["benchmarks"]} <= {"planned", "skipped"}


def test_a_quick_run_writes_into_results_quick_which_the_readme_links() -> None:
    quick = run_all.config_from_args(["--quick"])
    assert quick.out_dir == run_all.RESULTS / "quick"
    commands = [cmd for _, cmd in run_all.plan(quick) if cmd is not None]
    assert commands and all(cmd[-2:] == ["--out", str(run_all.RESULTS / "quick")] for cmd in commands)
    assert run_all.config_from_args([]).out_dir == run_all.RESULTS
    # The README's "latest summary (quick sizes)" links a file in the directory a quick run writes.
    readme = (run_all.REPO / "README.md").read_text()
    quick_dir = (run_all.RESULTS / "quick").relative_to(run_all.REPO).as_posix()
    links = re.findall(r"\]\((bench/results/[^)]*)\)", readme)
    summaries = [link for link in links if re.fullmatch(r"bench/results/(quick/)?\d{4}-\d\d-\d\d\.md", link)]
    assert summaries and all(link.startswith(quick_dir + "/") for link in summaries), summaries
    assert all((run_all.REPO / link).is_file() for link in summaries)


def test_server_scenarios_are_named_by_the_sizes_run() -> None:
    server = next(b for b in run_all.BENCHMARKS if b.name == "server")
    quick = bench_server.build_parser().parse_args(list(server.quick_args))
    assert (quick.n_tiny, quick.n_small, quick.n_large) == (2000, 5000, 50000)
    assert list(bench_server.scenarios(vars(quick))) == [
        "exact_2k", "exact_5k", "approx_5k", "approx_50k_batched", "approx_50k_unbatched", "exact_50k",
    ]  # fmt: skip
    full = bench_server.build_parser().parse_args([])
    assert list(bench_server.scenarios(vars(full))) == [
        "exact_2k", "exact_70k", "approx_70k", "approx_1m_batched", "approx_1m_unbatched", "exact_1m",
    ]  # fmt: skip
    sizes = {"n_tiny": 300, "n_small": 2500, "n_large": 1_234_567}
    assert list(bench_server.scenarios(sizes)) == [
        "exact_300", "exact_2.5k", "approx_2.5k", "approx_1.23m_batched", "approx_1.23m_unbatched",
        "exact_1.23m",
    ]  # fmt: skip


def test_server_sizes_that_would_share_a_scenario_name_are_refused(capsys) -> None:
    with pytest.raises(ValueError, match="same name"):
        bench_server.scenarios({"n_tiny": 5000, "n_small": 5000, "n_large": 50000})
    with pytest.raises(SystemExit):
        bench_server.main(["--n-tiny", "5000", "--n-small", "5001", "--out", "unused"])
    assert "same name" in capsys.readouterr().err
