"""Index files under attack (issue 11, items 6-10): same-size corruption refused by default, index
value ranges checked at load, fallback to the newest intact version, a full disk during publish,
read-only versions and the SIGBUS note."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss
import grpc
import numpy as np
import pytest
from reference import log_q, top_k

from latentsearch.cli import main
from latentsearch.client import LatentSearchClient
from latentsearch.engine import EngineConfig, SearchEngine
from latentsearch.errors import CorruptIndexError, ResourceExhaustedError
from latentsearch.indexer import IndexJobConfig, IndexRoot, run_index_job
from latentsearch.indexer.root import remove_tree
from latentsearch.server.app import SIGBUS_NOTE
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
DIM = 4
SERVING, NOT_SERVING = 1, 2
LEFTOVERS = (".tmp-", ".trash-", ".pending-", "CURRENT.tmp-")


def _engine(n: int = 3000, *, seed: int = 0, prefix: str = "item") -> SearchEngine:
    """A labelled engine with an approximate index and a tiny-sigma scale group on the exact path."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(n, DIM))
    log_sigma = rng.uniform(-1.5, 0.5, size=(n, DIM))
    log_sigma[:4] = np.log(1e-4)
    return SearchEngine.build(
        mu,
        log_sigma=log_sigma,
        ids=[f"{prefix}{i}" for i in range(n)],
        labels=rng.integers(0, 4, size=n),
        config=EngineConfig(approx_nlist=16, approx_nprobe=4),
        build_approx=True,
    )


@pytest.fixture(scope="module")
def engines() -> list[SearchEngine]:
    return [_engine(3000 + 100 * i, seed=i, prefix="abc"[i]) for i in range(3)]


def _writable(path: Path) -> None:
    """Let this test change a file of a (read-only) published version."""
    path.parent.chmod(0o755)
    path.chmod(0o644)


def _rewrite_npy(path: Path, change: Callable[[np.ndarray], None]) -> None:
    """Change values of a saved array in place: same dtype, shape and byte size."""
    arr = np.load(path)
    change(arr)
    size = path.stat().st_size
    _writable(path)
    np.save(path, arr)
    assert path.stat().st_size == size


def _flip_bytes(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 8] = bytes(b ^ 0x5A for b in raw[offset : offset + 8])
    _writable(path)
    path.write_bytes(bytes(raw))


def _flip_mu(p: Path) -> None:
    _rewrite_npy(p / "mu.npy", lambda a: a.__setitem__((7, 1), -a[7, 1] + 3.0))


def _nan_log_sigma(p: Path) -> None:
    _rewrite_npy(p / "log_sigma.npy", lambda a: a.__setitem__((11, 2), np.nan))


def _faiss_bytes(p: Path) -> None:
    _flip_bytes(p / "approx.faiss", (p / "approx.faiss").stat().st_size - 64)


CORRUPTIONS = {"mu.npy": _flip_mu, "log_sigma.npy": _nan_log_sigma, "approx.faiss": _faiss_bytes}


def _metric(srv: Any, name: str, **labels: str) -> float | None:
    return srv.server.metrics.registry.get_sample_value(name, labels or None)


# -- 6. checksums are verified before a version serves, by default -------------------------------
@pytest.mark.parametrize("damaged", sorted(CORRUPTIONS))
def test_reload_refuses_same_size_corruption_by_default(
    tmp_path: Path, start_server, publish, engines, caplog, damaged: str
) -> None:
    root = tmp_path / "idx"
    v1 = publish(root, engines[0])
    srv = start_server(index=root)
    assert srv.server.config.verify  # the default
    v2 = publish(root, engines[1])
    CORRUPTIONS[damaged](IndexRoot(root).version_dir(v2) / "engine")
    assert IndexRoot(root).check(v2)  # `index verify` flags it
    assert srv.run(srv.server.reload_now()) is False
    assert srv.server.version == v1
    assert re.search(
        rf"version {v2} fails verification: \S*/{re.escape(damaged)}: fails its sha256", caplog.text
    )
    assert _metric(srv, "latentsearch_index_reloads_total", result="failed") == 1
    assert _metric(srv, "latentsearch_index_fallback") == 1
    with LatentSearchClient(srv.target) as client:
        info = client.info()
        assert info["index_version"] == v1 and info["current_version"] == v2
        assert damaged in info["fallback_reason"]
        z = np.linspace(-1, 1, DIM)
        assert client.nearest(z, 5).ids == engines[0].search(z, 5).ids
    # The next good version is served, and the fallback is over.
    v3 = publish(root, engines[2])
    assert srv.run(srv.server.reload_now()) is True and srv.server.version == v3
    assert _metric(srv, "latentsearch_index_fallback") == 0
    with LatentSearchClient(srv.target) as client:
        info = client.info()
    assert info["current_version"] == v3 and info["fallback_reason"] == ""


def test_no_verify_serves_what_is_on_disk(tmp_path: Path, start_server, publish, engines) -> None:
    root = tmp_path / "idx"
    publish(root, engines[0])
    srv = start_server(index=root, verify=False)
    v2 = publish(root, engines[1])
    _flip_mu(IndexRoot(root).version_dir(v2) / "engine")
    assert srv.run(srv.server.reload_now()) is True and srv.server.version == v2


def test_cli_verifies_by_default() -> None:
    from latentsearch.cli import build_parser
    from latentsearch.cli.serve import serve_config

    parser = build_parser()
    assert serve_config(parser.parse_args(["serve", "--index", "x"])).verify is True
    assert serve_config(parser.parse_args(["serve", "--index", "x", "--no-verify"])).verify is False
    assert serve_config(parser.parse_args(["serve", "--index", "x", "--verify"])).verify is True


# -- 7. index value ranges are checked at load ---------------------------------------------------
@pytest.fixture(scope="module")
def saved_engine(engines: list[SearchEngine], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return engines[0].save(tmp_path_factory.mktemp("saved") / "engine")


@pytest.fixture()
def saved(saved_engine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved_engine, tmp_path / "engine"))


def _partitioned_row(path: Path) -> int:
    return int(np.flatnonzero(np.load(path / "approx_lists.npy") >= 0)[0])


def _move_row(path: Path) -> None:
    lists = np.load(path / "approx_lists.npy")
    row = _partitioned_row(path)
    _rewrite_npy(path / "approx_lists.npy", lambda a: a.__setitem__(row, (lists[row] + 1) % 16))


VALUE_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "list id 1e9": (
        lambda p: _rewrite_npy(p / "approx_lists.npy", lambda a: a.__setitem__(slice(5, 9), 10**9)),
        r"approx_lists\.npy holds partition ids in \[-1, 1000000000\]; valid ones are in \[-1, 15\]",
    ),
    "list id below -1": (
        lambda p: _rewrite_npy(p / "approx_lists.npy", lambda a: a.__setitem__(3, -7)),
        r"approx_lists\.npy holds partition ids in \[-7, ",
    ),
    "partitioned row put on the exact path": (
        lambda p: _rewrite_npy(p / "approx_lists.npy", lambda a: a.__setitem__(_partitioned_row(p), -1)),
        r"approx_lists\.npy does not match exact_groups\.npy",
    ),
    "row moved to another partition": (
        _move_row,
        r"approx_lists\.npy does not match .*approx\.faiss: partition sizes differ in 2 of 16",
    ),
    "scale group out of range": (
        lambda p: _rewrite_npy(p / "exact_groups.npy", lambda a: a.__setitem__(42, 99)),
        r"exact_groups\.npy holds scale groups in \[0, 99\]",
    ),
    "NaN partition box": (
        lambda p: _rewrite_npy(p / "approx_boxes.npy", lambda a: a.__setitem__((1, 3, 0), np.nan)),
        r"approx_boxes\.npy holds bounds that are not finite",
    ),
    "zero sigma bound": (
        lambda p: _rewrite_npy(p / "approx_boxes.npy", lambda a: a.__setitem__((2, 0, 0), 0.0)),
        r"approx_boxes\.npy holds bounds that are not finite and positive",
    ),
    "inf centred constant": (
        lambda p: _rewrite_npy(p / "approx_centred_c.npy", lambda a: a.__setitem__(2, np.inf)),
        r"approx_centred_c\.npy holds NaN or inf",
    ),
}


@pytest.mark.parametrize("damage", sorted(VALUE_DAMAGE))
def test_index_value_ranges_are_checked_at_load(saved: Path, damage: str) -> None:
    SearchEngine.load(saved)  # intact
    change, message = VALUE_DAMAGE[damage]
    change(saved)
    with pytest.raises(CorruptIndexError, match=message):
        SearchEngine.load(saved)  # sizes and shapes are intact: only the value checks can tell


def test_bad_list_ids_are_refused_while_info_answers(tmp_path: Path, start_server, publish, engines) -> None:
    root = tmp_path / "idx"
    v1 = publish(root, engines[0])
    srv = start_server(index=root, verify=False)
    v2 = publish(root, engines[1])
    VALUE_DAMAGE["list id 1e9"][0](IndexRoot(root).version_dir(v2) / "engine")
    assert srv.run(srv.server.reload_now(), timeout=10) is False
    with LatentSearchClient(srv.target, timeout=5) as client:
        info = client.info()
    assert info["index_version"] == v1 and "approx_lists.npy" in info["fallback_reason"]


# -- 8. a damaged CURRENT version at start: the newest intact older version serves -------------
def test_restart_on_damaged_current_falls_back_loudly(
    tmp_path: Path, start_server, publish, engines, health_rpc, caplog
) -> None:
    root = tmp_path / "idx"
    v1 = publish(root, engines[0])
    v2 = publish(root, engines[1])
    v3 = publish(root, engines[2])
    _nan_log_sigma(IndexRoot(root).version_dir(v3) / "engine")
    missing = IndexRoot(root).version_dir(v2) / "engine" / "approx_boxes.npy"
    _writable(missing)
    missing.unlink()
    srv = start_server(index=root)
    assert srv.server.version == v1  # v3 fails its checksums, v2 misses a file
    assert health_rpc(srv.target) == SERVING
    assert f"version {v3} (CURRENT) failed to load" in caplog.text
    assert f"serving the newest intact older version {v1} instead (fallback)" in caplog.text
    assert any(r.levelname == "ERROR" and "fallback" in r.getMessage() for r in caplog.records)
    assert _metric(srv, "latentsearch_index_fallback") == 1
    with LatentSearchClient(srv.target) as client:
        info = client.info()
        z = np.array([0.3, -0.2, 0.1, 0.0])
        want = top_k(log_q(z[None], engines[0].bank.mu, engines[0].bank.log_sigma), 4)[0]
        assert client.nearest(z, 4, mode="exact").ids == [f"a{r}" for r in want]
    assert info["index_version"] == v1 and info["current_version"] == v3
    assert "log_sigma.npy: fails its sha256" in info["fallback_reason"]
    # Polling does not retry the damaged version; rolling back to the served one ends the fallback.
    assert srv.run(srv.server.reload_now()) is False
    assert main(["index", "rollback", str(root), v1]) == 0
    assert srv.run(srv.server.reload_now()) is False and srv.server.version == v1
    assert _metric(srv, "latentsearch_index_fallback") == 0
    with LatentSearchClient(srv.target) as client:
        info = client.info()
    assert info["current_version"] == v1 and info["fallback_reason"] == ""
    assert "fallback over" in caplog.text


def test_start_with_nothing_intact_is_not_serving(
    tmp_path: Path, start_server, publish, engines, health_rpc, caplog
) -> None:
    root = tmp_path / "idx"
    v1 = publish(root, engines[0])
    _flip_mu(IndexRoot(root).version_dir(v1) / "engine")
    srv = start_server(index=root)
    assert srv.server.version is None and health_rpc(srv.target) == NOT_SERVING
    assert "no older version is intact either" in caplog.text
    assert _metric(srv, "latentsearch_index_fallback") == 0
    v2 = publish(root, engines[1])
    assert srv.run(srv.server.reload_now()) is True and srv.server.version == v2
    assert health_rpc(srv.target) == SERVING


# -- 9. a full disk during publish ---------------------------------------------------------------
def _fail_call(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, k: int) -> list[int]:
    """Make the ``k``-th call of ``owner.name`` raise ENOSPC; returns the call counter."""
    real = getattr(owner, name)
    calls = [0]

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == k:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls


def _assert_nothing_left(root: IndexRoot, current: str, versions: list[str]) -> None:
    assert root.current() == current and root.versions() == versions
    assert not [p.name for p in root.path.iterdir() if p.name.startswith(LEFTOVERS)]
    assert root.check(current) == []


def _assert_no_space(exc: ResourceExhaustedError, root: IndexRoot) -> None:
    assert re.fullmatch(
        rf"no space left on {re.escape(str(root.path))} \(needed about \d+\.\d MiB, \d+\.\d MiB free\)",
        str(exc),
    ), str(exc)


@pytest.mark.parametrize("name", ["replace", "fsync"])
def test_enospc_at_every_write_point_leaves_the_previous_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engines, name: str
) -> None:
    """os.replace / os.fsync fail with ENOSPC at their 1st, 2nd, ... call of a publish."""
    failures = successes_after_fault = 0
    for k in range(1, 200):
        root = IndexRoot(tmp_path / f"r{k}", create=True)
        v1 = root.publish_engine(engines[0])
        with monkeypatch.context() as m:
            calls = _fail_call(m, os, name, k)
            try:
                v2 = root.publish_engine(engines[1], keep=1)
            except ResourceExhaustedError as exc:
                failures += 1
                _assert_no_space(exc, root)
                _assert_nothing_left(root, v1, [v1])
                continue
        if calls[0] < k:  # no call left to fail: every write point was tried
            break
        # Failing after CURRENT named the new version (syncing the root, retention) is logged only.
        successes_after_fault += 1
        assert root.current() == v2 and root.versions()[-1] == v2 and root.check(v2) == []
    else:
        pytest.fail("publish never ran out of calls to fail")
    assert failures >= (3 if name == "replace" else 10), (failures, successes_after_fault)
    assert root.current() == v2 and root.versions() == [v2]


@pytest.mark.parametrize("where", ["np.save mu", "np.save labels", "faiss.write_index", "run_index_job"])
def test_enospc_while_saving_is_one_project_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engines, where: str
) -> None:
    root = IndexRoot(tmp_path / "r", create=True)
    v1 = root.publish_engine(engines[0])
    npz = tmp_path / "p.npz"
    np.savez(npz, mu=engines[1].bank.mu, log_sigma=engines[1].bank.log_sigma)
    if where == "faiss.write_index":
        _fail_call(monkeypatch, faiss, "write_index", 1)
    else:  # np.save writes mu.npy, log_sigma.npy, exact_groups.npy, ids.npy, labels.npy, ...
        _fail_call(monkeypatch, np, "save", {"np.save mu": 1, "np.save labels": 5}.get(where, 2))
    with pytest.raises(ResourceExhaustedError) as err:
        if where == "run_index_job":
            run_index_job(IndexJobConfig(out=root.path, posteriors=str(npz), progress=False))
        else:
            root.publish_engine(engines[1])
    _assert_no_space(err.value, root)
    _assert_nothing_left(root, v1, [v1])


def test_cli_reports_a_full_disk_in_one_line_and_ls_shows_no_orphan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], engines
) -> None:
    out = tmp_path / "root"
    npz = tmp_path / "p.npz"
    b = engines[1].bank
    np.savez(npz, mu=b.mu, log_sigma=b.log_sigma)
    v1 = IndexRoot(out, create=True).publish_engine(engines[0])
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:  # the CURRENT swap hits the full disk
        if Path(dst).name == "CURRENT":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    capsys.readouterr()
    assert main(["index", "--posteriors", str(npz), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: no space left on {out} (needed about ")
    assert "Traceback" not in err
    monkeypatch.undo()
    assert main(["index", "ls", str(out)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 1 and listing[0].startswith(f"* {v1}")


def test_too_little_free_space_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engines
) -> None:
    # The estimate is about what a version takes: compare with a published one.
    ref = IndexRoot(tmp_path / "ref", create=True)
    actual = ref.disk_bytes(ref.publish_engine(engines[1]))
    root = IndexRoot(tmp_path / "r", create=True)
    v1 = root.publish_engine(engines[0])
    usage = shutil.disk_usage(root.path)
    free = 1 << 14  # 16 KiB
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage._replace(free=free))
    with pytest.raises(ResourceExhaustedError) as err:
        root.publish_engine(engines[1])
    found = re.search(r"needed about (\d+\.\d) MiB, 0\.0 MiB free", str(err.value))
    assert found is not None, str(err.value)
    needed = float(found.group(1))
    assert 0.9 * actual / 2**20 <= needed <= 1.3 * actual / 2**20 + 0.1, (needed, actual / 2**20)
    _assert_nothing_left(root, v1, [v1])
    free = 1 << 40
    assert root.publish_engine(engines[1]) == root.current()


def test_publish_killed_before_current_swap_is_removed_by_the_next_run(
    tmp_path: Path, engines, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "root"
    root = IndexRoot(out, create=True)
    v1 = root.publish_engine(engines[0])
    script = (
        "import os, sys\n"
        "import numpy as np\n"
        "from latentsearch.engine import SearchEngine\n"
        "from latentsearch.indexer import IndexRoot\n"
        "IndexRoot._swap_current = lambda self, version: os._exit(3)\n"
        "engine = SearchEngine.build(np.zeros((20, 2)), log_sigma=np.zeros((20, 2)))\n"
        "IndexRoot(sys.argv[1]).publish_engine(engine)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(out)], cwd=REPO, timeout=120)
    assert proc.returncode == 3
    orphan = root.versions()[-1]
    assert orphan > v1 and root.current() == v1 and (out / f".pending-{orphan}").is_file()
    v3 = root.publish_engine(engines[1])  # the next run cleans first
    assert root.versions() == [v1, v3] and root.current() == v3
    assert not (out / f".pending-{orphan}").exists()
    capsys.readouterr()
    assert main(["index", "ls", str(out)]) == 0
    assert orphan not in capsys.readouterr().out


# -- 10. published versions are read-only; a SIGBUS is explained ---------------------------------
def _modes(path: Path) -> dict[str, int]:
    return {p.relative_to(path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [path, *path.rglob("*")]}


def test_published_versions_are_read_only_and_retention_still_works(tmp_path: Path, engines) -> None:
    root = IndexRoot(tmp_path / "r", create=True)
    versions = [root.publish_engine(engines[i % 3], keep=None) for i in range(3)]
    for v in versions:
        modes = _modes(root.version_dir(v))
        assert modes["."] == 0o555 and modes["engine"] == 0o555
        files = {name: mode for name, mode in modes.items() if name not in (".", "engine")}
        assert {"manifest.json", "manifest.sha256", "engine/mu.npy", "engine/approx.faiss"} <= set(files)
        assert set(files.values()) == {0o444}, files
    assert root.rollback() == versions[1]
    assert root.verify(versions[1]) == versions[1]
    assert root.prune(1) == [versions[0]]  # the newest and the current survive
    assert root.versions() == versions[1:]
    v4 = root.publish_engine(engines[0], keep=1)
    assert root.versions() == [v4]
    assert not [p for p in root.path.iterdir() if p.name.startswith(LEFTOVERS)]
    # A retention interrupted after its rename leaves a read-only .trash-* that the next writer removes.
    trash = root.path / ".trash-x"
    shutil.copytree(root.version_dir(v4), trash)
    for p in sorted(trash.rglob("*"), reverse=True):
        p.chmod(0o555 if p.is_dir() else 0o444)
    trash.chmod(0o555)
    assert root.clean_stale() == [trash] and not trash.exists()


def test_remove_tree_deletes_read_only_directories(tmp_path: Path) -> None:
    top = tmp_path / "v"
    (top / "engine").mkdir(parents=True)
    (top / "engine" / "a.npy").write_bytes(b"x")
    (top / "engine" / "a.npy").chmod(0o444)
    (top / "engine").chmod(0o555)
    top.chmod(0o555)
    remove_tree(top)
    assert not top.exists()
    remove_tree(top)  # missing: nothing to do


@pytest.fixture()
def serve_process(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[str], int, list[str]]]]:
    procs: list[tuple[subprocess.Popen[str], threading.Thread]] = []

    def start(root: Path) -> tuple[subprocess.Popen[str], int, list[str]]:
        cmd = [sys.executable, "-m", "latentsearch.cli", "serve", "--index", str(root), "--port", "0"]
        cmd += ["--metrics-port", "0", "--reload-interval", "0", "--workers", "1"]  # the server itself
        proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        port: list[int] = []

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                m = re.search(r"serving \S+ on 127\.0\.0\.1:(\d+)", line)
                if m:
                    port.append(int(m.group(1)))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        procs.append((proc, reader))
        deadline = time.monotonic() + 60
        while not port and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert port, "".join(lines)
        return proc, port[0], lines

    yield start
    for proc, reader in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        reader.join(10)
        assert proc.stderr is not None
        proc.stderr.close()


def test_truncating_a_served_file_kills_with_an_explained_sigbus(
    tmp_path: Path, publish, engines, serve_process
) -> None:
    root = tmp_path / "idx"
    version = publish(root, engines[0])
    proc, port, lines = serve_process(root)
    assert any(SIGBUS_NOTE in line for line in lines)
    target = f"127.0.0.1:{port}"
    with LatentSearchClient(target) as client:
        assert client.info()["index_version"] == version
    mu = IndexRoot(root).version_dir(version) / "engine" / "mu.npy"
    _writable(mu)
    os.truncate(mu, 0)  # what the read-only modes guard against (root ignores them)
    with grpc.insecure_channel(target) as ch, pytest.raises(grpc.RpcError):
        request = pb.NearestRequest(z=[0.1] * DIM, k=3, mode=pb.MODE_EXACT)
        pb_grpc.LatentSearchStub(ch).Nearest(request, timeout=30)
    assert proc.wait(30) == -signal.SIGBUS
    deadline = time.monotonic() + 10  # the reader thread drains stderr
    while "Bus error" not in "".join(lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    text = "".join(lines)
    assert "Fatal Python error: Bus error" in text, text[-2000:]
