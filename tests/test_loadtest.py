"""The load generator against a real server: counts, ghz-shaped JSON, bounds, loopback-only targets."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from latentsearch.cli import main
from latentsearch.errors import InvalidArgumentError, UnauthenticatedError, UnavailableError
from latentsearch.loadgen import LoadConfig, check_target, load_queries, run_load_sync

DIM = 4  # latent dimension of the banks conftest's make_engine fixture builds (its default)

pytestmark = pytest.mark.timeout(120)

GHZ_KEYS = {
    "date",
    "count",
    "total",
    "average",
    "fastest",
    "slowest",
    "rps",
    "latencyDistribution",
    "statusCodeDistribution",
    "errorDistribution",
    "histogram",
    "options",
}


@pytest.fixture
def served(tmp_path: Path, start_server, make_engine, publish):
    publish(tmp_path / "idx", make_engine(2000, seed=3))
    return start_server(index=tmp_path / "idx", max_wait_ms=1.0)


def test_duration_run_counts_add_up_and_json_is_ghz_shaped(served) -> None:
    start = time.monotonic()
    report = run_load_sync(LoadConfig(target=served.target, concurrency=8, duration=2.0))
    elapsed = time.monotonic() - start
    assert 1.9 < elapsed < 15
    assert report.count > 50
    assert report.count == sum(report.status_codes.values())
    assert report.status_codes == {"OK": report.count}
    assert report.errors == {}
    doc = json.loads(json.dumps(report.to_ghz_json()))
    assert set(doc) >= GHZ_KEYS
    assert doc["count"] == report.count
    assert doc["fastest"] <= doc["average"] <= doc["slowest"]
    assert doc["total"] >= 1.9e9
    assert doc["rps"] == pytest.approx(doc["count"] / (doc["total"] / 1e9))
    pcts = [d["percentage"] for d in doc["latencyDistribution"]]
    assert pcts == [10, 25, 50, 75, 90, 95, 99]
    lats = [d["latency"] for d in doc["latencyDistribution"]]
    assert lats == sorted(lats) and doc["fastest"] <= lats[0] and lats[-1] <= doc["slowest"]
    assert sum(b["count"] for b in doc["histogram"]) == report.count
    assert sum(b["frequency"] for b in doc["histogram"]) == pytest.approx(1.0)
    assert doc["options"]["dim"] == DIM and doc["options"]["concurrency"] == 8
    text = report.summary()
    for heading in ("Summary:", "Requests/sec:", "Latency distribution:", "Status code distribution:"):
        assert heading in text
    assert f"[OK]   {report.count} responses" in text


def test_total_bound_is_exact(served) -> None:
    for total, concurrency in ((137, 10), (5, 16)):
        report = run_load_sync(LoadConfig(target=served.target, concurrency=concurrency, total=total))
        assert report.count == total
        assert report.status_codes == {"OK": total}


def test_rps_paces_the_run(served) -> None:
    start = time.monotonic()
    report = run_load_sync(LoadConfig(target=served.target, concurrency=4, total=21, rps=100))
    assert time.monotonic() - start >= 0.19
    assert report.count == 21 and report.rps <= 110


def test_errors_are_counted_by_code(served) -> None:
    report = run_load_sync(LoadConfig(target=served.target, concurrency=2, total=10, k=0, dim=DIM + 1))
    assert report.count == 10
    assert report.status_codes == {"InvalidArgument": 10}
    assert sum(report.errors.values()) == 10
    assert all(msg.startswith("rpc error: code = InvalidArgument desc = ") for msg in report.errors)


def test_a_failed_info_raises_the_error_of_its_code(
    tmp_path: Path, start_server, make_engine, publish
) -> None:
    publish(tmp_path / "idx", make_engine(40, seed=3))
    srv = start_server(index=tmp_path / "idx", token="s3cret")
    with pytest.raises(UnauthenticatedError) as err:  # the dim is asked of Info, which needs the token
        run_load_sync(LoadConfig(target=srv.target, total=1, timeout=10))
    assert err.value.field == "target" and err.value.message.startswith(f"cannot ask {srv.target} ")
    assert run_load_sync(LoadConfig(target=srv.target, total=3, token="s3cret")).status_codes == {"OK": 3}
    with pytest.raises(UnavailableError) as unavailable:
        run_load_sync(LoadConfig(target="127.0.0.1:1", total=1, timeout=10))
    assert unavailable.value.grpc_code == "UNAVAILABLE" and unavailable.value.field == "target"
    with pytest.raises(InvalidArgumentError) as invalid:
        LoadConfig(target=srv.target, total=1, mode="fast")
    assert invalid.value.field == "mode"


@pytest.mark.parametrize("target", ["10.0.0.1:50051", "example.com:443", "0.0.0.0:1", "[2001:db8::1]:80"])
def test_non_loopback_target_is_refused(target: str) -> None:
    with pytest.raises(InvalidArgumentError, match="non-loopback"):
        LoadConfig(target=target, total=1)
    assert check_target(target, allow_remote=True)
    assert main(["loadtest", "--target", target, "--total", "1"]) == 2


@pytest.mark.parametrize("target", ["127.0.0.1:1", "localhost:2", "[::1]:3", "127.8.9.10:4"])
def test_loopback_targets_are_accepted(target: str) -> None:
    assert LoadConfig(target=target, total=1).target == target


def test_cli_json_with_data_file(served, tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    npy = tmp_path / "q.npy"
    np.save(npy, rng.normal(size=(7, DIM)))
    as_json = tmp_path / "q.json"
    as_json.write_text(json.dumps([{"z": list(r)} for r in rng.normal(size=(3, DIM))]))
    assert load_queries(as_json).shape == (3, DIM)
    for path in (npy, as_json):
        capsys.readouterr()
        argv = ["loadtest", "--target", served.target, "-c", "4", "--total", "30", "-O", "json"]
        assert main([*argv, "--data-file", str(path)]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert set(doc) >= GHZ_KEYS
        assert doc["count"] == 30 and doc["statusCodeDistribution"] == {"OK": 30}
        assert doc["options"]["families"] == ["box", "prior", "data"]
    assert main(["loadtest", "--target", served.target, "--total", "3"]) == 0
    assert "Summary:" in capsys.readouterr().out
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, DIM + 3)))
    assert main(["loadtest", "--target", served.target, "--total", "3", "--data-file", str(bad)]) == 2
