"""The client raises the project's exception tree for failed calls, against real servers on port 0;
the status-code mapping both ways; and the client (and ``latentsearch query``) load neither torch
nor faiss."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest

import latentsearch
from latentsearch.cli import main
from latentsearch.client import LatentSearchClient
from latentsearch.errors import (
    FIELD_METADATA_KEY,
    LatentSearchError,
    RemoteError,
    error_for_status,
    status_details,
)

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]


def _raised(call, *args, **kwargs) -> LatentSearchError:
    """The project error ``call(*args, **kwargs)`` raises (fails the test if it raises none)."""
    with pytest.raises(LatentSearchError) as err:
        call(*args, **kwargs)
    return err.value


def _from_the_wire(exc: LatentSearchError, code: grpc.StatusCode) -> grpc.RpcError:
    """``exc`` came from a failed call with status ``code``: the RpcError is its cause (returned), and
    the field the call's trailing metadata named is the error's."""
    assert exc.grpc_code == code.name
    cause = exc.__cause__
    assert isinstance(cause, grpc.RpcError) and cause.code() == code
    fields = [m.value for m in cause.trailing_metadata() or () if m.key == FIELD_METADATA_KEY]
    assert fields == ([] if exc.field is None else [exc.field])
    if exc.field is not None:  # the server's "<field>: <message>" came back split
        assert cause.details() == f"{exc.field}: {exc.message}"
    return cause


def test_failed_calls_raise_the_error_tree(tmp_path: Path, start_server, make_engine, publish) -> None:
    publish(tmp_path / "idx", make_engine(50, seed=2))
    srv = start_server(index=tmp_path / "idx", max_k=20)
    with LatentSearchClient(srv.target, timeout=10) as client:
        exc = _raised(client.nearest, [0.0, float("nan"), 0.0, 0.0], 3)
        assert isinstance(exc, latentsearch.InvalidArgumentError) and isinstance(exc, ValueError)
        assert (exc.field, exc.message) == ("z", "z contains NaN or inf")
        _from_the_wire(exc, grpc.StatusCode.INVALID_ARGUMENT)

        exc = _raised(client.nearest, [0.0] * 3)
        assert isinstance(exc, latentsearch.InvalidArgumentError)
        assert (exc.field, exc.message) == ("z", "z must have shape (4,), got (3,)")

        # The server's max_k caps the engine's (1000): the engine's own k rule enforces it.
        assert len(client.nearest([0.0] * 4, 20).hits) == 20
        exc = _raised(client.nearest, [0.0] * 4, 21)
        assert isinstance(exc, latentsearch.InvalidArgumentError)
        assert (exc.field, exc.message) == ("k", "k must be in [1, 20], got 21")

        exc = _raised(client.nearest_batch, np.array([[0.0] * 4, [0.0, 0.0, 2e6, 0.0]]), 3)
        assert isinstance(exc, latentsearch.InvalidArgumentError) and exc.field == "queries[1].z"
        _from_the_wire(exc, grpc.StatusCode.INVALID_ARGUMENT)

        exc = _raised(client.nearest_to_distribution, [0.0] * 4, [1.0, 0.0, 1.0, 1.0])
        assert isinstance(exc, latentsearch.InvalidArgumentError) and exc.field == "sigma"
        exc = _raised(client.nearest_to_distribution, [0.0] * 4, [1.0] * 3)
        assert isinstance(exc, latentsearch.InvalidArgumentError) and exc.field == "sigma"  # the engine's std

        exc = _raised(client.get_item, "nope")
        assert isinstance(exc, latentsearch.NotFoundError) and isinstance(exc, KeyError)
        assert exc.field == "id" and "nope" in exc.message
        _from_the_wire(exc, grpc.StatusCode.NOT_FOUND)

        exc = _raised(client.decode, [0.0] * 4)  # served without a model
        assert isinstance(exc, latentsearch.FailedPreconditionError) and exc.field == "model"
        _from_the_wire(exc, grpc.StatusCode.FAILED_PRECONDITION)

        # A mode the API does not know fails in the client, before any call.
        exc = _raised(client.nearest, [0.0] * 4, mode="fast")
        assert isinstance(exc, latentsearch.InvalidArgumentError) and exc.field == "mode"
        assert exc.__cause__ is None

        assert len(client.nearest([0.0] * 4, 3).hits) == 3  # the server still answers


def test_query_command_prints_the_error_and_its_code(
    tmp_path: Path, start_server, make_engine, publish, capsys
) -> None:
    publish(tmp_path / "idx", make_engine(50, seed=2))
    srv = start_server(index=tmp_path / "idx")
    assert main(["query", "--target", srv.target, "--z", "0,0,0"]) == 2
    assert capsys.readouterr().err == "error: INVALID_ARGUMENT: z: z must have shape (4,), got (3,)\n"
    assert main(["query", "--target", srv.target, "--z", "0,0,0,0", "--labels", "99"]) == 2
    assert capsys.readouterr().err == "error: INVALID_ARGUMENT: labels: unknown label(s) [99]\n"
    assert main(["query", "--target", srv.target, "--z", "0,0,0,0", "-k", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["0", "1"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_closed_port_is_unavailable() -> None:
    with LatentSearchClient(f"127.0.0.1:{_closed_port()}", timeout=10) as client:
        exc = _raised(client.info)
    assert isinstance(exc, latentsearch.UnavailableError)
    cause = _from_the_wire(exc, grpc.StatusCode.UNAVAILABLE)
    assert exc.field is None and exc.message == cause.details()  # grpc's own words, kept whole


# Each status code and the class a failed call with it comes back as (the reference, by hand).
BY_CODE: dict[str, type[LatentSearchError]] = {
    "INVALID_ARGUMENT": latentsearch.InvalidArgumentError,
    "NOT_FOUND": latentsearch.NotFoundError,
    "FAILED_PRECONDITION": latentsearch.FailedPreconditionError,
    "UNAVAILABLE": latentsearch.UnavailableError,
    "RESOURCE_EXHAUSTED": latentsearch.ResourceExhaustedError,
    "DEADLINE_EXCEEDED": latentsearch.DeadlineExceededError,
    "UNAUTHENTICATED": latentsearch.UnauthenticatedError,
    "PERMISSION_DENIED": latentsearch.PermissionDeniedError,
}


@pytest.mark.parametrize(("code", "cls"), BY_CODE.items())
@pytest.mark.parametrize("field", [None, "z", "queries[3].z"])
def test_error_for_status_inverts_the_servers_translation(code: str, cls, field) -> None:
    sent = cls("model: not a model directory (see: docs)", field=field)  # colons in the message
    assert sent.grpc_code == code
    got = error_for_status(code, status_details(sent), field=sent.field)
    assert type(got) is cls
    assert (got.grpc_code, got.field, got.message) == (code, field, sent.message)
    assert status_details(got) == status_details(sent)


def test_error_for_status_without_a_class_of_its_own() -> None:
    corrupt = latentsearch.CorruptIndexError("index files are damaged", field="index")
    got = error_for_status(corrupt.grpc_code, status_details(corrupt), field=corrupt.field)
    assert type(got) is latentsearch.FailedPreconditionError  # the class its code names
    for code in ("INTERNAL", "UNIMPLEMENTED", "CANCELLED", "UNKNOWN"):
        got = error_for_status(code, "internal error in Nearest")
        assert type(got) is RemoteError and got.grpc_code == code
        assert (got.field, got.message) == (None, "internal error in Nearest")
    # Details that do not start with the named field are kept whole.
    got = error_for_status("NOT_FOUND", "no such item", field="id")
    assert (type(got), got.field, got.message) == (latentsearch.NotFoundError, "id", "no such item")


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter from the repository root; its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


HEAVY = "sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'faiss'})"


def test_client_loads_neither_torch_nor_faiss() -> None:
    out = _python(
        f"""
        import sys
        from latentsearch.client import LatentSearchClient
        from latentsearch.errors import UnavailableError
        with LatentSearchClient("127.0.0.1:{_closed_port()}", timeout=10) as client:
            try:
                client.nearest([0.0] * 4, 3)  # the failed call and its error, too
            except UnavailableError:
                print("unavailable")
        print({HEAVY})
        """
    )
    assert out.split() == ["unavailable", "[]"]


def test_query_help_loads_neither_torch_nor_faiss() -> None:
    out = _python(
        f"""
        import sys
        from latentsearch.cli import main
        try:
            main(["query", "--help"])
        except SystemExit:
            pass
        print({HEAVY})
        """
    )
    assert "--target" in out and out.splitlines()[-1] == "[]"
