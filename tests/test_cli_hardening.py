"""The command line as operators type it (issue 11, items 11, 13, 15 and 16).

* the bearer token from a file, the environment or (with a warning) the command line, in a
  documented order, for ``serve``, ``query`` and ``loadtest``;
* the metrics port binds loopback by default;
* ``query --z`` takes negative values, commas or spaces; ``--labels`` integers; bad values give one
  line and exit status 2, never a traceback;
* ``loadtest --queries`` reads ghz's data (and the compose stack's ghz config).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
from reference import log_q, top_k

from latentsearch.cli import build_parser, main
from latentsearch.cli.credentials import TOKEN_ENV, resolve_token
from latentsearch.cli.serve import serve_config
from latentsearch.cli.values import float_list, join_negative_values, label_list
from latentsearch.errors import InvalidArgumentError
from latentsearch.loadgen import load_queries
from latentsearch.server import ServerConfig

ROOT = Path(__file__).resolve().parents[1]
DIM = 4  # latent dimension of the banks conftest's make_engine fixture builds (its default)
SECRET = "s3cret-Token_1"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _no_token_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    return path


# -- item 11: where the token comes from ----------------------------------------------------------
@pytest.mark.parametrize("text", [SECRET, SECRET + "\n", SECRET + "\r\n"])
def test_token_file_strips_one_trailing_newline(tmp_path: Path, text: str) -> None:
    assert resolve_token(_write(tmp_path / "token", text), environ={}) == SECRET


def test_precedence_token_file_then_token_then_environment(tmp_path: Path) -> None:
    file = _write(tmp_path / "token", "from-file\n")
    env = {TOKEN_ENV: "from-env"}
    assert resolve_token(file, environ=env) == "from-file"
    assert resolve_token(None, "from-flag", environ=env) == "from-flag"
    assert resolve_token(environ=env) == "from-env"
    assert resolve_token(environ={}) is None
    assert resolve_token(environ={"OTHER": "x"}) is None


def test_a_token_on_the_command_line_warns(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="latentsearch.cli.credentials"):
        resolve_token(_write(tmp_path / "token", SECRET), environ={})
        resolve_token(environ={TOKEN_ENV: SECRET})
    assert not caplog.records  # file and environment: silent
    with caplog.at_level(logging.WARNING, logger="latentsearch.cli.credentials"):
        assert resolve_token(None, SECRET, environ={}) == SECRET
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    text = record.getMessage()
    assert "/proc/PID/cmdline" in text and "--token-file" in text and TOKEN_ENV in text
    assert SECRET not in text


@pytest.mark.parametrize("text", ["", "\n", "\r\n", SECRET + "\n\n", "two words", "caf\u00e9"])
def test_an_empty_or_unsendable_token_file_is_refused_by_name(tmp_path: Path, text: str) -> None:
    file = _write(tmp_path / "token", text)
    with pytest.raises(InvalidArgumentError) as err:
        resolve_token(file, environ={})
    assert err.value.field == "token_file" and str(file) in err.value.message
    assert SECRET not in err.value.message  # a token is never echoed


def test_a_missing_or_unreadable_token_file_is_refused_by_name(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(InvalidArgumentError) as err:
        resolve_token(missing, environ={})
    assert err.value.field == "token_file" and str(missing) in err.value.message
    with pytest.raises(InvalidArgumentError) as err2:  # a directory
        resolve_token(tmp_path, environ={})
    assert err2.value.field == "token_file" and str(tmp_path) in err2.value.message
    binary = _write(tmp_path / "binary", "")
    binary.write_bytes(b"\xff\xfe token")
    with pytest.raises(InvalidArgumentError, match="cannot read token file"):
        resolve_token(binary, environ={})
    if os.geteuid() != 0:  # root reads any file
        locked = _write(tmp_path / "locked", SECRET)
        locked.chmod(0)
        denied = re.escape(f"cannot read token file {locked}: Permission denied")
        with pytest.raises(InvalidArgumentError, match=denied):
            resolve_token(locked, environ={})


def test_an_empty_environment_variable_is_refused() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        resolve_token(environ={TOKEN_ENV: ""})
    assert err.value.field == TOKEN_ENV and TOKEN_ENV in err.value.message


@pytest.mark.parametrize("command", [["serve", "--index", "IDX"], ["query", "--z", "0"], ["loadtest"]])
def test_every_token_command_takes_file_or_flag_not_both(command: list[str], tmp_path: Path, capsys) -> None:
    parser = build_parser()
    target = [] if command[0] != "loadtest" else ["--target", "127.0.0.1:1"]
    args = parser.parse_args([*command, *target, "--token-file", str(tmp_path / "t")])
    assert (args.token_file, args.token) == (str(tmp_path / "t"), None)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args([*command, *target, "--token-file", "f", "--token", "x"])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_serve_reads_the_token_from_file_and_environment(tmp_path: Path, monkeypatch) -> None:
    parser = build_parser()
    file = _write(tmp_path / "token", SECRET + "\n")
    args = parser.parse_args(["serve", "--index", "IDX", "--token-file", str(file)])
    assert serve_config(args).token == SECRET
    assert serve_config(parser.parse_args(["serve", "--index", "IDX"])).token is None
    monkeypatch.setenv(TOKEN_ENV, "env-token")
    assert serve_config(parser.parse_args(["serve", "--index", "IDX"])).token == "env-token"
    # A serve with an empty token file stops before binding anything, with one line.
    empty = _write(tmp_path / "empty", "")
    assert main(["serve", "--index", str(tmp_path / "idx"), "--token-file", str(empty)]) == 2


def test_query_and_loadtest_send_the_token_from_file_or_environment(
    tmp_path: Path, start_server, make_engine, publish, monkeypatch, capsys
) -> None:
    publish(tmp_path / "idx", make_engine(60, seed=2))
    srv = start_server(index=tmp_path / "idx", token=SECRET)
    file = _write(tmp_path / "token", SECRET + "\n")
    query = ["query", "--target", srv.target, "--z", "0,0,0,0", "-k", "3"]
    loadtest = ["loadtest", "--target", srv.target, "--total", "5", "-c", "2"]
    assert main(query) == 2  # no token: UNAUTHENTICATED, one line
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main([*query, "--token-file", str(file)]) == 0
    assert main([*loadtest, "--token-file", str(file)]) == 0
    monkeypatch.setenv(TOKEN_ENV, SECRET)
    assert main(query) == 0
    assert main(loadtest) == 0
    assert main([*query, "--token", "wrong"]) == 2  # the flag beats the environment
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    missing = tmp_path / "missing"
    assert main([*query, "--token-file", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"error: no token file {missing}"


# -- item 13: metrics stay on loopback by default ---------------------------------------------------
def test_the_default_metrics_host_is_loopback() -> None:
    args = build_parser().parse_args(["serve", "--index", "IDX"])
    config = serve_config(args)
    assert ipaddress.ip_address(args.metrics_host).is_loopback
    assert ipaddress.ip_address(config.metrics_host).is_loopback
    assert ipaddress.ip_address(ServerConfig(index="IDX").metrics_host).is_loopback
    assert ipaddress.ip_address(config.host).is_loopback  # and so is the gRPC port


# -- item 15: latent points and labels on the command line -----------------------------------------
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--z", "-1.5,0,0"], [-1.5, 0.0, 0.0]),
        (["--z", "-1 2 3"], [-1.0, 2.0, 3.0]),
        (["--z=-1,2,3"], [-1.0, 2.0, 3.0]),
        (["--z", " 0 0 0 "], [0.0, 0.0, 0.0]),
        (["--z", "-.5, 2,\t-3e-1"], [-0.5, 2.0, -0.3]),
        (["--z", "-2"], [-2.0]),
        (["--labels", "-1,3", "--z", "1"], [1.0]),
    ],
)
def test_z_values_parse(argv: list[str], expected: list[float]) -> None:
    args = build_parser().parse_args(join_negative_values(["query", *argv]))
    assert args.z == expected


def test_negative_values_are_joined_to_their_option_only() -> None:
    assert join_negative_values(["query", "--z", "-1,2", "-k", "-3", "--mode", "exact"]) == [
        "query", "--z=-1,2", "-k", "-3", "--mode", "exact"
    ]
    assert join_negative_values(["--z=-1,2", "--z", "--labels"]) == ["--z=-1,2", "--z", "--labels"]
    assert join_negative_values(["--z", "-1", "--", "--x", "-2"]) == ["--z=-1", "--", "--x", "-2"]


def test_labels_parse_and_names_are_refused_with_a_reason() -> None:
    assert label_list("3,4 7") == [3, 4, 7]
    assert label_list(" -1 ") == [-1]
    with pytest.raises(argparse.ArgumentTypeError, match=r"'Bag' is not an integer label.*with names"):
        label_list("3,Bag")
    with pytest.raises(argparse.ArgumentTypeError, match="not an integer label"):
        label_list("1.5")
    assert float_list("1e3,-0") == [1000.0, 0.0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--z", "1,a"], "argument --z: 'a' is not a number"),
        (["--z", "-1,a"], "argument --z: 'a' is not a number"),
        (["--z", "1,nan"], "argument --z: 'nan' is not a finite number"),
        (["--z", "inf"], "argument --z: 'inf' is not a finite number"),
        (["--z", " , "], "argument --z: expected numbers separated by commas or spaces"),
        (["--z", "0", "--labels", "Bag"], "argument --labels: 'Bag' is not an integer label"),
    ],
)
def test_bad_values_give_one_line_and_exit_2(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["query", "--target", "127.0.0.1:1", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (last,) = [line for line in err.splitlines() if "error:" in line]
    assert last.startswith("latentsearch query: error: ") and message in last


def test_query_ranks_a_negative_point_like_the_brute_force(
    tmp_path: Path, start_server, make_engine, publish, capsys
) -> None:
    engine = make_engine(200, seed=7)
    publish(tmp_path / "idx", engine)
    srv = start_server(index=tmp_path / "idx")
    mu, log_sigma, labels = engine.bank.mu, engine.bank.log_sigma, np.asarray(engine.bank.labels)
    z = np.array([-1.5, 0.25, -0.75, 1.0])
    for argv, allowed in (
        (["--z", "-1.5,0.25,-0.75,1"], None),
        (["--z", "-1.5 0.25 -0.75 1"], None),
        (["--z=-1.5,0.25,-0.75,1", "--labels", "1 3"], np.isin(labels, [1, 3])),
    ):
        capsys.readouterr()
        assert main(["query", "--target", srv.target, "-k", "5", *argv]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
        expected = top_k(log_q(z, mu, log_sigma)[0], 5, allowed)
        assert [r[1] for r in rows] == [f"item{i}" for i in expected]
        scores = [float(r[2]) for r in rows]
        np.testing.assert_allclose(scores, log_q(z, mu, log_sigma)[0][expected], rtol=1e-6)


# -- item 16: ghz's data files ----------------------------------------------------------------------
def test_the_compose_ghz_config_is_a_query_file() -> None:
    ghz = json.loads((ROOT / "deploy" / "ghz.json").read_text())
    queries = load_queries(ROOT / "deploy" / "ghz.json")
    np.testing.assert_array_equal(queries, np.array([ghz["data"]["z"]], dtype=np.float64))


def test_ghz_data_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    points = rng.normal(size=(3, DIM))
    one = _write(tmp_path / "one.json", json.dumps({"z": list(points[0]), "k": 10, "mode": "MODE_EXACT"}))
    many = _write(tmp_path / "many.json", json.dumps([{"z": list(p), "k": 5} for p in points]))
    requests = [{"z": list(p)} for p in points]
    config = _write(tmp_path / "ghz.json", json.dumps({"call": "x", "data": requests}))
    np.testing.assert_array_equal(load_queries(one), points[:1])
    np.testing.assert_array_equal(load_queries(many), points)
    np.testing.assert_array_equal(load_queries(config), points)
    typo = _write(tmp_path / "typo.json", json.dumps([{"z": [1.0] * DIM}, {"zz": [1.0] * DIM}]))
    with pytest.raises(InvalidArgumentError, match=re.escape(f"query file {typo}: request 1 is no ")) as err:
        load_queries(typo)
    assert err.value.field == "data_file"
    no_z = _write(tmp_path / "no_z.json", json.dumps({"k": 3}))
    with pytest.raises(InvalidArgumentError, match="request 0 has no z"):
        load_queries(no_z)
    ragged = _write(tmp_path / "ragged.json", json.dumps([{"z": [1.0, 2.0]}, {"z": [1.0]}]))
    with pytest.raises(InvalidArgumentError, match=re.escape(f"query file {ragged} holds no array")):
        load_queries(ragged)
    broken = _write(tmp_path / "broken.json", "{")
    with pytest.raises(InvalidArgumentError, match=re.escape(f"query file {broken} is not JSON")):
        load_queries(broken)


def test_loadtest_queries_takes_the_compose_ghz_config(
    tmp_path: Path, start_server, make_engine, publish, capsys
) -> None:
    ghz = ROOT / "deploy" / "ghz.json"
    dim = len(json.loads(ghz.read_text())["data"]["z"])
    publish(tmp_path / "idx", make_engine(100, dim=dim, seed=1))
    srv = start_server(index=tmp_path / "idx")
    argv = ["loadtest", "--target", srv.target, "--total", "12", "-c", "3", "-O", "json"]
    argv += ["--queries", str(ghz)]
    assert main([*argv, "--families", "data", "--labels", "0,2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["statusCodeDistribution"] == {"OK": 12}
    assert doc["options"]["families"] == ["data"] and doc["options"]["data_rows"] == 1
    assert doc["options"]["labels"] == [0, 2]
    # The data really is sent: against a server of another dimension it is refused by name.
    publish(tmp_path / "other", make_engine(50, dim=dim - 1, seed=1))
    other = start_server(index=tmp_path / "other")
    assert main(["loadtest", "--target", other.target, "--total", "3", "--queries", str(ghz)]) == 2
    assert f"query file points have d={dim}, the server's latent_dim is {dim - 1}" in capsys.readouterr().err
