"""A publish killed with SIGKILL at any moment leaves the previous version current; a rerun succeeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from latentsearch.data.banks import vae_like_posteriors
from latentsearch.indexer import IndexJobConfig, IndexRoot, parse_index_spec, run_index_job

ROOT = Path(__file__).resolve().parents[1]
SPEC = "kmeans_iters=3,kmeans_sample=20000"


def _start(npz: Path, out: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "latentsearch.cli",
        "index",
        "--posteriors",
        str(npz),
        "--out",
        str(out),
        "--no-progress",
        "--index-spec",
        SPEC,
        "--keep",
        "100",
    ]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_staging(out: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name.startswith(".tmp-") for p in out.iterdir()):
            return
        time.sleep(0.01)


def test_sigkill_during_publish_keeps_previous_version(tmp_path: Path) -> None:
    small = tmp_path / "small.npz"
    b = vae_like_posteriors(500, 10, seed=1)
    np.savez(small, mu=b.mu, logvar=2 * b.log_sigma)
    big = tmp_path / "big.npz"
    b = vae_like_posteriors(300_000, 10, seed=2)
    assert b.labels is not None
    np.savez(big, mu=b.mu, logvar=2 * b.log_sigma, labels=b.labels)
    del b
    out = tmp_path / "root"
    first = run_index_job(IndexJobConfig(out=out, posteriors=str(small), progress=False)).version
    root = IndexRoot(out)
    # kill points: fixed delays after start, and fixed delays after its staging directory appears
    plans = [("start", 0.3), ("start", 1.5), ("staging", 0.0), ("staging", 0.8), ("staging", 2.5)]
    killed_mid_job = 0
    for when, delay in plans:
        proc = _start(big, out)
        if when == "staging":
            _wait_for_staging(out, proc)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed_mid_job += 1
        proc.wait()
        current = root.current()
        if current == first:
            version, engine = root.load_current(verify=True)
            assert version == first and len(engine) == 500
        else:  # the job got all the way through before the kill: a complete new version
            assert proc.returncode == 0
            assert len(root.load_current(verify=True)[1]) == 300_000
        for v in root.versions():  # every version in versions/ is complete
            assert root.check(v) == [], v
    assert killed_mid_job >= 3
    # A rerun succeeds, and cleans the dead jobs' staging directories.
    result = run_index_job(
        IndexJobConfig(out=out, posteriors=str(big), engine=parse_index_spec(SPEC), progress=False)
    )
    assert root.current() == result.version
    version, engine = root.load_current(verify=True)
    assert version == result.version and len(engine) == 300_000 and engine.approx is not None
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp-", ".trash-", "CURRENT.tmp"))]


def test_live_staging_directory_is_not_cleaned(tmp_path: Path) -> None:
    root = IndexRoot(tmp_path / "r", create=True)
    with root.staging() as staging:
        assert root.clean_stale() == []
        assert staging.path.is_dir()
    assert not staging.path.exists()
    dead = tmp_path / "r" / ".tmp-deadbeef0000"
    (dead / "engine").mkdir(parents=True)
    (dead / ".owner.lock").write_bytes(b"")
    assert root.clean_stale() == [dead] and not dead.exists()


@pytest.mark.parametrize("junk", [".trash-x", "CURRENT.tmp-abc"])
def test_other_leftovers_are_cleaned(tmp_path: Path, junk: str) -> None:
    root = IndexRoot(tmp_path / "r", create=True)
    p = tmp_path / "r" / junk
    if junk.startswith(".trash"):
        p.mkdir()
    else:
        p.write_text("x")
    assert root.clean_stale() == [p]
