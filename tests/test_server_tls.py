"""TLS: a self-signed certificate (made with the openssl command line); plaintext clients fail."""

from __future__ import annotations

import runpy
import subprocess
from pathlib import Path

import grpc
import pytest

from latentsearch.client import LatentSearchClient
from latentsearch.errors import UnavailableError
from latentsearch.loadgen import LoadConfig, run_load_sync

DIM = 4  # latent dimension of the banks conftest's make_engine fixture builds (its default)

pytestmark = pytest.mark.timeout(120)


def _assert_unavailable(exc: UnavailableError) -> None:
    """The client's UnavailableError came from a call grpc failed with UNAVAILABLE (its cause)."""
    cause = exc.__cause__
    assert isinstance(cause, grpc.RpcError) and cause.code() == grpc.StatusCode.UNAVAILABLE
    assert exc.grpc_code == "UNAVAILABLE"


def test_tls_server_with_self_signed_cert(
    tmp_path: Path, start_server, self_signed, make_engine, publish
) -> None:
    cert, key = self_signed
    version = publish(tmp_path / "idx", make_engine(100, seed=5))
    srv = start_server(index=tmp_path / "idx", tls_cert=cert, tls_key=key)
    for host in ("localhost", "127.0.0.1"):
        with LatentSearchClient(f"{host}:{srv.port}", tls_ca=cert) as client:
            assert client.info()["index_version"] == version
            assert len(client.nearest([0.0] * DIM, 4).hits) == 4
    report = run_load_sync(LoadConfig(target=f"localhost:{srv.port}", tls_ca=cert, concurrency=4, total=20))
    assert report.status_codes == {"OK": 20}
    with LatentSearchClient(srv.target, timeout=3) as plain, pytest.raises(UnavailableError) as err:
        plain.info()
    _assert_unavailable(err.value)


def test_tls_client_with_wrong_ca_fails(
    tmp_path: Path, start_server, self_signed, make_engine, publish
) -> None:
    cert, key = self_signed
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(other / "k.pem"), "-out", str(other / "c.pem"), "-subj", "/CN=localhost"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    publish(tmp_path / "idx", make_engine(50, seed=5))
    srv = start_server(index=tmp_path / "idx", tls_cert=cert, tls_key=key)
    client = LatentSearchClient(f"localhost:{srv.port}", tls_ca=other / "c.pem", timeout=3)
    with client, pytest.raises(UnavailableError) as err:
        client.info()
    _assert_unavailable(err.value)


def test_container_healthcheck_speaks_tls(
    tmp_path: Path, start_server, self_signed, make_engine, publish
) -> None:
    # README's exposed compose setup serves TLS; its healthcheck must reach the health service too.
    cert, key = self_signed
    health = runpy.run_path(str(Path(__file__).resolve().parents[1] / "deploy" / "healthcheck.py"))
    publish(tmp_path / "idx", make_engine(50, seed=5))
    srv = start_server(index=tmp_path / "idx", tls_cert=cert, tls_key=key)
    assert health["check"](srv.target, timeout=3).startswith("UNREACHABLE")  # plaintext
    assert health["check"](srv.target, tls_ca=str(cert)) == "SERVING"
    assert health["check"](srv.target, tls_ca=str(cert), server_name="localhost") == "SERVING"
    # The certificate names localhost and 127.0.0.1 only: another name fails the handshake.
    assert health["check"](srv.target, timeout=3, tls_ca=str(cert), server_name="example.com").startswith(
        "UNREACHABLE"
    )
    assert health["main"](["--target", srv.target, "--tls-ca", str(cert)]) == 0
