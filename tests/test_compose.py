"""The container deployment: docker-compose files, Dockerfile, ghz config and the healthcheck script.

No Docker daemon is needed: the compose files are parsed and checked for the wiring the deployment
relies on (one-shot indexer -> healthy server -> load test), and the healthcheck script is run
against an in-process server.
"""

from __future__ import annotations

import json
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto" / "latentsearch" / "v1" / "latentsearch.proto"
VOLUME_MOUNT = "/srv/latentsearch"


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load("docker-compose.yml")


def _volume(service: dict[str, Any], target: str) -> dict[str, Any]:
    for vol in service.get("volumes", []):
        if isinstance(vol, str):  # short syntax source:target[:ro]
            parts = vol.split(":")
            vol = {"source": parts[0], "target": parts[1], "read_only": parts[2:] == ["ro"]}
        if vol["target"] == target:
            return vol
    raise AssertionError(f"no volume mounted at {target}")


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_services_and_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"indexer", "server", "ghz"}
    assert services["server"]["depends_on"] == {"indexer": {"condition": "service_completed_successfully"}}
    assert services["ghz"]["depends_on"] == {"server": {"condition": "service_healthy"}}
    assert services["ghz"]["profiles"] == ["loadtest"]
    assert "profiles" not in services["indexer"] and "profiles" not in services["server"]
    assert services["indexer"].get("restart", "no") == "no"  # one-shot


def test_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    indexer = _volume(services["indexer"], VOLUME_MOUNT)
    server = _volume(services["server"], VOLUME_MOUNT)
    assert indexer["source"] == server["source"]
    assert indexer["source"] in compose["volumes"]  # a named volume
    assert indexer.get("type", "volume") == "volume"
    assert not indexer.get("read_only", False)
    assert server["read_only"] is True


def test_commands_agree_on_paths_and_ports(compose: dict[str, Any]) -> None:
    from latentsearch import cli

    services = compose["services"]
    indexer_cmd, server_cmd = services["indexer"]["command"], services["server"]["command"]
    parser = cli.build_parser()
    # Both commands parse with the real CLI.
    indexer_args = parser.parse_args(indexer_cmd[1:])
    server_args = parser.parse_args(server_cmd[1:])
    assert indexer_cmd[0] == server_cmd[0] == "latentsearch"
    assert indexer_cmd[1] == "quickstart" and server_cmd[1] == "serve"
    # The server reads what the indexer writes (quickstart: OUT/index and OUT/model).
    assert indexer_args.out == VOLUME_MOUNT
    assert server_args.index == f"{VOLUME_MOUNT}/index"
    assert server_args.model == f"{VOLUME_MOUNT}/model"
    assert server_args.host == "0.0.0.0"  # inside the container; the host publishes loopback only
    ports = {p.split(":")[-1]: p.split(":")[1] for p in services["server"]["ports"]}
    assert ports == {
        str(server_args.port): "50051",
        str(server_args.metrics_port): "20051",
        str(server_args.http_port): "20080",
    }
    assert (server_args.port, server_args.metrics_port, server_args.http_port) == (50051, 20051, 20080)


def _published(port: Any) -> tuple[str, str, str]:
    """(host ip, host port, container port) of a compose ``ports`` entry (short or long syntax)."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "")), str(port.get("published", "")), str(port["target"])
    host_ip, published, target = ["", "", *str(port).split(":")][-3:]  # [[HOST_IP:]PUBLISHED:]TARGET
    return host_ip, published, target


def test_published_ports_are_loopback_only(compose: dict[str, Any]) -> None:
    # No TLS and no token in the compose file: the host must not publish them on every interface.
    gpu = _load("docker-compose.gpu.yml")
    for file in (compose, gpu):
        for name, service in file["services"].items():
            for port in service.get("ports", []):
                host_ip, published, target = _published(port)
                assert host_ip == "127.0.0.1", f"{name} publishes {port!r} beyond loopback"
                assert published == target, port
    assert len(compose["services"]["server"]["ports"]) == 3  # gRPC, metrics, HTTP API and page


class _ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus Compose's ``!override`` tag on a list (the list is kept as it is)."""


_ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_sequence(node))


def test_readme_exposure_example_adds_tls_and_a_token_file(compose: dict[str, Any]) -> None:
    from latentsearch import cli

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Exposing the server", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, flags=re.S)
    assert block is not None, "README's 'Exposing the server' has no yaml example"
    example = yaml.load(block.group(1), Loader=_ComposeLoader)
    server = example["services"]["server"]
    base = compose["services"]["server"]["command"]
    # The compose file's serve command, plus TLS and the token, each from a secret file.
    extra = server["command"][len(base):]
    assert server["command"][: len(base)] == base, "the example drifted from docker-compose.yml"
    args = cli.build_parser().parse_args(server["command"][1:])
    assert args.token is None and extra[::2] == ["--tls-cert", "--tls-key", "--token-file"]
    tls_ca = _option(server["healthcheck"]["test"], "--tls-ca")
    secrets = {args.tls_cert, args.tls_key, args.token_file, tls_ca}
    assert all(path.startswith("/run/secrets/") for path in secrets)
    names = {path.removeprefix("/run/secrets/") for path in secrets}
    assert names == set(server["secrets"]) == set(example["secrets"])
    published = {_published(p)[2]: _published(p)[0] for p in server["ports"]}
    # metrics stay private; the HTTP API and page have the same TLS and token as gRPC
    assert published == {str(args.port): "", str(args.metrics_port): "127.0.0.1", str(args.http_port): ""}


def test_healthcheck_uses_grpc_health_without_extra_binary(compose: dict[str, Any]) -> None:
    check = compose["services"]["server"]["healthcheck"]
    test = check["test"]
    assert test[0] == "CMD" and test[1] == "python"
    script = test[2]
    assert script.startswith("/app/")
    local = ROOT / script.removeprefix("/app/")
    assert local.is_file()
    assert "grpc_health" in local.read_text()
    assert _option(test, "--target") == "127.0.0.1:50051"
    for key in ("interval", "timeout", "retries", "start_period"):
        assert key in check


def test_referenced_files_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).is_file(), name
        for vol in service.get("volumes", []):
            if vol.get("type") == "bind":
                assert (ROOT / vol["source"]).exists(), f"{name}: {vol['source']}"
    ghz = compose["services"]["ghz"]
    assert ghz["image"].startswith("ghcr.io/bojand/ghz")
    assert ghz["command"] == ["--config", "/deploy/ghz.json"]
    targets = {v["target"]: v["source"] for v in ghz["volumes"]}
    assert targets["/deploy/ghz.json"] == "./deploy/ghz.json"
    assert targets["/proto"] == "./proto"


def test_dockerfile_copies_what_the_services_use() -> None:
    text = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) ", text, flags=re.M))
    for path in ("latentsearch", "proto", "deploy"):
        assert path in copied, path
        assert (ROOT / path).is_dir()
    assert "download.pytorch.org/whl/cpu" in text
    assert re.search(r"^ARG VARIANT=cpu$", text, flags=re.M)
    assert "faiss-gpu" in text
    assert "/srv/latentsearch" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
    assert not {"api", "latentsearch", "model", "indexer", "server", "proto", "deploy"} & set(ignored)


def test_gpu_override() -> None:
    gpu = _load("docker-compose.gpu.yml")["services"]
    for name in ("indexer", "server"):
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia"
        assert "gpu" in devices[0]["capabilities"]
    assert gpu["indexer"]["build"]["args"]["VARIANT"] == "cuda"
    assert gpu["indexer"]["image"] == gpu["server"]["image"]


def _proto_methods() -> set[str]:
    text = PROTO.read_text()
    declared = re.search(r"^package\s+([\w.]+);", text, flags=re.M)
    assert declared is not None, f"{PROTO} declares no package"
    package = declared.group(1)
    methods = set()
    for service, body in re.findall(r"service\s+(\w+)\s*\{(.*?)\n\}", text, flags=re.S):
        for method in re.findall(r"rpc\s+(\w+)\s*\(", body):
            methods.add(f"{package}.{service}.{method}")
    return methods


def test_ghz_config() -> None:
    config = json.loads((ROOT / "deploy" / "ghz.json").read_text())
    assert config["call"] in _proto_methods()
    assert config["call"] == "latentsearch.v1.LatentSearch.Nearest"
    assert config["insecure"] is True
    assert config["host"] == "server:50051"
    assert config["concurrency"] >= 1 and re.fullmatch(r"\d+[smh]", config["duration"])
    # The proto path is where compose mounts ./proto.
    assert config["proto"] == "/proto/latentsearch/v1/latentsearch.proto"
    assert (ROOT / config["proto"].removeprefix("/")).is_file()
    # The request data is a valid NearestRequest (protobuf JSON mapping).
    from google.protobuf import json_format

    from latentsearch.v1 import latentsearch_pb2 as pb

    request = json_format.ParseDict(config["data"], pb.NearestRequest())
    assert len(request.z) == 10 and request.k == 10


def test_healthcheck_script_against_a_server(tmp_path: Path, start_server, make_engine, publish) -> None:
    script = ROOT / "deploy" / "healthcheck.py"
    health = runpy.run_path(str(script))
    srv = start_server(index=tmp_path / "idx")  # empty root: NOT_SERVING until a version exists
    assert health["check"](srv.target) == "NOT_SERVING"
    publish(tmp_path / "idx", make_engine(50))
    srv.run(srv.server.reload_now())
    assert health["check"](srv.target) == "SERVING"
    done = subprocess.run(
        [sys.executable, str(script), "--target", srv.target], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "SERVING"
    srv.close()
    assert health["check"](srv.target).startswith("UNREACHABLE")
    assert health["main"](shlex.split(f"--target {srv.target} --timeout 1")) == 1
