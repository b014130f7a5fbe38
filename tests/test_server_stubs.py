"""The committed gRPC stubs are what scripts/gen_proto.py generates from proto/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(60)
def test_stubs_are_up_to_date(tmp_path: Path) -> None:
    written = _load_generator().generate(tmp_path)
    assert written
    for path in written:
        rel = path.relative_to(tmp_path)
        committed = ROOT / rel
        assert committed.is_file(), f"{rel} is not committed; run python scripts/gen_proto.py"
        assert committed.read_bytes() == path.read_bytes(), f"{rel} is stale; run python scripts/gen_proto.py"
    generated = {p.relative_to(tmp_path) for p in written}
    committed_py = {p.relative_to(ROOT) for p in (ROOT / "api").rglob("*.py")}
    assert committed_py == generated, "api/ holds files the generator does not write"


def test_generated_package_imports_as_api() -> None:
    from api.latentsearch.v1 import latentsearch_pb2, latentsearch_pb2_grpc

    assert latentsearch_pb2.DESCRIPTOR.package == "latentsearch.v1"
    assert hasattr(latentsearch_pb2_grpc, "LatentSearchStub")
    text = (ROOT / "api/latentsearch/v1/latentsearch_pb2_grpc.py").read_text()
    assert "from api.latentsearch.v1 import latentsearch_pb2" in text
