"""One import namespace: the wheel holds only ``latentsearch``, and a working folder full of
generic module names (``model.py``, ``server.py``, ...) shadows nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from reference import log_q

ROOT = Path(__file__).resolve().parents[1]
SHADOWS = ("model", "server", "indexer", "api", "engine", "client", "data", "cli")


@pytest.mark.timeout(300)
def test_the_wheel_installs_one_top_level_package(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT / "latentsearch", src / "latentsearch", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
         str(src)],
        capture_output=True, text=True, timeout=280,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Deprecat" not in result.stdout + result.stderr  # e.g. setuptools' licence-table warning
    (wheel,) = out.glob("latentsearch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"latentsearch"}
    for needed in ("latentsearch/py.typed", "latentsearch/v1/latentsearch_pb2.pyi",
                   "latentsearch/v1/latentsearch_pb2_grpc.pyi", "latentsearch/model/vae.py",
                   "latentsearch/server/app.py", "latentsearch/indexer/root.py", "latentsearch/client.py",
                   # the explorer page, served from the package (server/httpapi.py)
                   "latentsearch/server/static/index.html", "latentsearch/server/static/explorer.js",
                   "latentsearch/server/static/explorer.css"):
        assert needed in names, needed
    # The packaged Fashion-MNIST sample (the default data) with its licence notice, byte for byte.
    sample = "latentsearch/data/fashion_mnist_sample/"
    with zipfile.ZipFile(wheel) as zf:
        for name in ("sample-images-idx3-ubyte.gz", "sample-labels-idx1-ubyte.gz", "LICENSE", "README.md"):
            assert zf.read(sample + name) == (ROOT / sample / name).read_bytes(), name
        assert "MIT License" in zf.read(sample + "LICENSE").decode()


def _shadowed_folder(tmp_path: Path) -> Path:
    """A folder of generic modules that fail loudly when imported."""
    work = tmp_path / "notebooks"
    work.mkdir()
    for name in SHADOWS:
        message = f"the working folder's {name}.py was imported"
        (work / f"{name}.py").write_text(f"raise RuntimeError({message!r})\n")
    return work


def _run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.timeout(300)
def test_generic_module_names_in_the_working_folder_shadow_nothing(tmp_path: Path) -> None:
    work = _shadowed_folder(tmp_path)
    py = sys.executable
    console = str(Path(py).with_name("latentsearch"))
    # `python -c` and `python -m` put the working folder first on sys.path: the shadowing case.
    for args in ([py, "-c", "from latentsearch import SearchEngine, LatentSearchClient; print('ok')"],
                 [py, "-m", "latentsearch", "--help"], [console, "--help"]):
        result = _run(args, work)
        assert result.returncode == 0, result.stderr
        assert "was imported" not in result.stderr

    rng = np.random.default_rng(3)
    mu, log_sigma = rng.normal(size=(300, 4)), rng.uniform(-1.5, 0.2, size=(300, 4))
    np.savez(work / "post.npz", mu=mu, log_sigma=log_sigma)
    result = _run([py, "-m", "latentsearch", "index", "--posteriors", "post.npz", "--out", "idx",
                   "--no-progress"], work)
    assert result.returncode == 0, result.stderr

    server = subprocess.Popen(
        [py, "-m", "latentsearch", "serve", "--index", "idx", "--port", "0", "--metrics-port", "0"],
        cwd=work, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert server.stderr is not None
        port = None
        for line in server.stderr:
            match = re.search(r"serving \S+ on 127\.0\.0\.1:(\d+)", line)
            if match:
                port = int(match.group(1))
                break
        assert port, "the server did not report its port"
        z = np.array([-1.5, 0.25, 0.0, 2.0])
        result = _run([py, "-m", "latentsearch", "query", "--target", f"127.0.0.1:{port}",
                       f"--z={','.join(map(str, z))}", "-k", "3"], work)
        assert result.returncode == 0, result.stderr
        assert "was imported" not in result.stderr
        rows = [line.split() for line in result.stdout.splitlines() if re.match(r"\s*\d+\s+\d+\s", line)]
        expected = np.argsort(-log_q(z[None], mu, log_sigma)[0], kind="stable")[:3]
        assert [int(r[1]) for r in rows] == expected.tolist()
    finally:
        server.terminate()
        server.wait(timeout=30)
        if server.stderr is not None:
            server.stderr.close()
