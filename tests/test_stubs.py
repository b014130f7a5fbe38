"""The committed gRPC stubs are what scripts/gen_proto.py generates from proto/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUBS = ROOT / "latentsearch" / "v1"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(60)
def test_regenerating_the_stubs_changes_nothing(tmp_path: Path) -> None:
    written = _load_generator().generate(tmp_path)
    names = {p.name for p in written}
    assert {"latentsearch_pb2.py", "latentsearch_pb2.pyi", "latentsearch_pb2_grpc.py",
            "latentsearch_pb2_grpc.pyi", "__init__.py"} <= names
    for path in written:
        rel = path.relative_to(tmp_path)
        committed = ROOT / rel
        assert committed.is_file(), f"{rel} is not committed; run python scripts/gen_proto.py"
        assert committed.read_bytes() == path.read_bytes(), f"{rel} is stale; run python scripts/gen_proto.py"
    committed_files = {p.name for p in STUBS.iterdir() if p.is_file()}
    assert committed_files == names, "latentsearch/v1/ holds files the generator does not write"


def test_stubs_import_as_the_proto_package() -> None:
    from latentsearch.v1 import latentsearch_pb2, latentsearch_pb2_grpc

    assert latentsearch_pb2.DESCRIPTOR.package == "latentsearch.v1"
    assert latentsearch_pb2.__name__ == "latentsearch.v1.latentsearch_pb2"
    assert hasattr(latentsearch_pb2_grpc, "LatentSearchStub")
    assert (ROOT / "latentsearch" / "py.typed").is_file()
