"""Follow-ups of the hardening issue (11): each an operator's mistake answered in one line.

* a missing, unreadable or non-PEM ``--tls-cert`` / ``--tls-key`` / ``--tls-ca`` file is refused
  naming the option and the file, by the server before it binds or loads anything, by the client,
  ``query``, ``loadtest`` and the container healthcheck;
* ids longer than ``MAX_ID_LENGTH`` cannot be indexed (so every indexed id can be fetched);
* ``latentsearch train`` says in its summary when ``--time-limit`` cut training short;
* the committed quick server results say which sizes their old scenario names stood for;
* every test that starts ``latentsearch serve`` in a subprocess passes ``--metrics-port``.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import json
import runpy
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import latentsearch.model
from latentsearch.bank import MAX_ID_LENGTH, PosteriorBank, normalise_ids
from latentsearch.cli import main
from latentsearch.client import LatentSearchClient
from latentsearch.errors import InvalidArgumentError
from latentsearch.server import engine_service
from latentsearch.server.app import LatentSearchServer, ServerConfig
from latentsearch.tls import read_pem

ROOT = Path(__file__).resolve().parents[1]
# Not real key material: read_pem checks only that a file holds a PEM block.
PEM = b"-----BEGIN CERTIFICATE-----\nTUlJ\n-----END CERTIFICATE-----\n"

pytestmark = pytest.mark.timeout(120)


@contextmanager
def _listening() -> Iterator[int]:
    """A 127.0.0.1 port held by a listening socket: any server binding it fails."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def pem_files(tmp_path: Path) -> dict[str, Path]:
    """A PEM file, a missing one, a directory and a file that is not PEM."""
    good, not_pem = tmp_path / "good.pem", tmp_path / "notes.txt"
    good.write_bytes(PEM)
    not_pem.write_text("this is not a certificate\n")
    return {"good": good, "missing": tmp_path / "missing.pem", "directory": tmp_path, "not_pem": not_pem}


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# -- TLS files ----------------------------------------------------------------------------------
def test_read_pem_names_the_option_and_the_file(pem_files: dict[str, Path]) -> None:
    assert read_pem(pem_files["good"], field="tls_ca") == PEM
    for case, reason in [
        ("missing", "No such file or directory"),
        ("directory", "Is a directory"),
        ("not_pem", "not a PEM file"),
    ]:
        with pytest.raises(InvalidArgumentError) as err:
            read_pem(pem_files[case], field="tls_key")
        assert err.value.field == "tls_key"
        assert str(err.value).startswith(f"--tls-key {pem_files[case]}: {reason}"), str(err.value)


@pytest.mark.parametrize(
    ("field", "cert", "key"),
    [("tls_cert", "missing", "good"), ("tls_key", "good", "directory"), ("tls_cert", "not_pem", "good")],
)
def test_server_refuses_a_bad_tls_file_before_binding_or_loading(
    tmp_path: Path, pem_files: dict[str, Path], field: str, cert: str, key: str
) -> None:
    # Both ports are taken and the model does not exist: a TLS check made after the port checks or
    # the model load would fail with their errors instead.
    with _listening() as taken:
        config = ServerConfig(
            index=tmp_path / "idx",
            model=tmp_path / "no-such-model",
            port=taken,
            metrics_port=taken,
            reload_interval=0,
            gc_freeze=False,
            tls_cert=pem_files[cert],
            tls_key=pem_files[key],
        )
        server = LatentSearchServer(config)
        with pytest.raises(InvalidArgumentError) as err:
            asyncio.run(server.start())
    assert err.value.field == field
    assert str(err.value).startswith(f"--{field.replace('_', '-')} {getattr(config, field)}: ")
    assert server.port is None and server.metrics_port is None and server.service is None


def test_serve_cli_reports_a_missing_tls_cert_in_one_line(tmp_path: Path, pem_files: dict[str, Path]) -> None:
    missing, key = pem_files["missing"], pem_files["good"]
    done = subprocess.run(
        [
            *(sys.executable, "-m", "latentsearch", "-q", "serve", "--index", str(tmp_path / "idx")),
            *("--port", "0", "--metrics-port", "0", "--tls-cert", str(missing), "--tls-key", str(key)),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 2, done.stderr
    assert _one_line(done.stderr) == f"error: --tls-cert {missing}: No such file or directory"


def test_client_query_and_loadtest_refuse_a_missing_tls_ca(
    pem_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    missing = pem_files["missing"]
    with pytest.raises(InvalidArgumentError) as err:
        LatentSearchClient("127.0.0.1:1", tls_ca=missing)
    assert err.value.field == "tls_ca" and str(missing) in str(err.value)
    expected = f"error: --tls-ca {missing}: No such file or directory"
    capsys.readouterr()
    assert main(["query", "--target", "127.0.0.1:1", "--z", "0,0", "--tls-ca", str(missing)]) == 2
    assert _one_line(capsys.readouterr().err) == expected
    assert main(["loadtest", "--target", "127.0.0.1:1", "--total", "1", "--tls-ca", str(missing)]) == 2
    assert _one_line(capsys.readouterr().err) == expected


def test_healthcheck_reports_a_missing_tls_ca_as_unhealthy_in_one_line(
    pem_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    health = runpy.run_path(str(ROOT / "deploy" / "healthcheck.py"))
    missing = pem_files["missing"]
    assert health["main"](["--target", "127.0.0.1:1", "--tls-ca", str(missing)]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert _one_line(out.err) == f"error: --tls-ca {missing}: No such file or directory"


# -- id length ----------------------------------------------------------------------------------
def test_ids_longer_than_the_getitem_limit_cannot_be_indexed() -> None:
    assert engine_service.MAX_ID_LENGTH is MAX_ID_LENGTH  # one limit for indexing and GetItem
    longest = "x" * MAX_ID_LENGTH
    assert normalise_ids(["a", longest, "b"]).tolist() == ["a", longest, "b"]
    mu, log_sigma = np.zeros((4, 2)), np.zeros((4, 2))
    with pytest.raises(InvalidArgumentError) as err:
        PosteriorBank(mu, log_sigma=log_sigma, ids=["a", "b", "y" * (MAX_ID_LENGTH + 1), "z" * 5000])
    assert err.value.field == "ids"
    assert str(err.value) == (
        f"ids must be at most {MAX_ID_LENGTH} characters, got {MAX_ID_LENGTH + 1}; first bad row 2"
    )
    # Integers count in decimal digits, up to those too long for str() (over 4,300 digits).
    with pytest.raises(InvalidArgumentError, match=r"first bad row 1$"):
        normalise_ids(np.array([7, 10**MAX_ID_LENGTH], dtype=object))
    with pytest.raises(InvalidArgumentError, match=r"first bad row 0$") as err:
        normalise_ids(np.array([10**5000, 1], dtype=object))
    assert err.value.field == "ids"


# -- train's summary ----------------------------------------------------------------------------
def test_train_cli_summary_says_the_time_limit_cut_training_short(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["train", "--max-items", "48", "--latent-dim", "2", "--batch-size", "16", "--no-progress"]
    assert main([*common, "--epochs", "3", "--time-limit", "0", "--out", str(tmp_path / "cut")]) == 0
    lines = capsys.readouterr().out.splitlines()
    warning = "WARNING: training stopped at --time-limit 0 s after 1 of 3 epochs"
    assert sum(line.startswith(warning) for line in lines) == 1, lines
    assert latentsearch.model.training_done(tmp_path / "cut") is False
    assert main([*common, "--epochs", "1", "--out", str(tmp_path / "full")]) == 0
    assert "WARNING: training stopped" not in capsys.readouterr().out  # (collapsed dimensions may warn)
    assert latentsearch.model.training_done(tmp_path / "full") is True


def test_model_package_exports_training_done() -> None:
    module = importlib.import_module("latentsearch.model.train")
    for name in ("TrainResult", "training_done"):
        assert name in module.__all__ and name in latentsearch.model.__all__
        assert getattr(latentsearch.model, name) is getattr(module, name), name


# -- committed quick server results -------------------------------------------------------------
def test_quick_server_results_say_what_their_old_scenario_names_ran() -> None:
    folder = ROOT / "bench" / "results" / "quick"
    doc = json.loads((folder / "server-2026-11-22.json").read_text())
    names = [s if isinstance(s, str) else s["name"] for s in doc["scenarios"]]
    assert "exact_70k_batched" in names  # the names the note explains
    note = next(
        line
        for line in (folder / "server-2026-11-22.md").read_text().splitlines()[:4]
        if line.strip() and not line.startswith("#")
    )
    assert "predate" in note
    for size in ("small_index", "large_index"):
        assert f"{doc[size]['items']:,} items" in note, (size, note)


# -- serve subprocesses in tests ----------------------------------------------------------------
def _strings(node: ast.AST) -> set[str]:
    return {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}


def _serve_without_metrics_port(source: str) -> list[int]:
    """Lines of ``serve`` subprocess commands (a list holding ``"-m"`` and ``"serve"``) in ``source``
    whose function neither passes ``--metrics-port`` itself nor is always called with it."""
    tree = ast.parse(source)
    bad = set()
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if not (isinstance(node, ast.List) and {"-m", "serve"} <= _strings(node)):
                continue
            if "--metrics-port" in _strings(func):
                continue
            calls = [
                c
                for c in ast.walk(tree)
                if isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id == func.name
            ]
            if not calls or not all("--metrics-port" in _strings(c) for c in calls):
                bad.add(node.lineno)
    return sorted(bad)


def test_every_serve_subprocess_in_the_tests_passes_a_metrics_port() -> None:
    """Two ``serve`` processes on the default metrics port (20051) would collide: ``--metrics-port 0``."""
    bad = {
        path.name: lines
        for path in sorted((ROOT / "tests").glob("test_*.py"))
        if (lines := _serve_without_metrics_port(path.read_text(encoding="utf-8")))
    }
    assert not bad, bad


def test_the_serve_checker_sees_a_missing_metrics_port() -> None:
    run = 'def t():\n    subprocess.run([sys.executable, "-m", "latentsearch", "serve", "--port", "0"])\n'
    assert _serve_without_metrics_port(run) == [2]
    assert _serve_without_metrics_port(run.replace('"0"]', '"0", "--metrics-port", "0"]')) == []
    helper = 'def h(*a):\n    return [sys.executable, "-m", "latentsearch", "serve", *a]\n'
    assert _serve_without_metrics_port(helper + 'def t():\n    h("--metrics-port", "0")\n') == []
    assert _serve_without_metrics_port(helper + 'def t():\n    h("--port", "0")\n') == [2]
