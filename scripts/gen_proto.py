"""Generate the Python gRPC stubs of ``proto/latentsearch/v1/*.proto`` into ``latentsearch/v1/``.

Usage: ``python scripts/gen_proto.py [--out DIR]`` (default: the repository root). The proto
package is ``latentsearch.v1``, so protoc's output lands at ``latentsearch/v1/`` and imports as
``latentsearch.v1`` with no rewriting. grpcio-tools writes the modules (``*_pb2.py``,
``*_pb2_grpc.py``); mypy-protobuf's protoc plugins write a typed ``.pyi`` beside each. Both tools
are pinned in pyproject.toml's ``dev`` extra, so the output is reproducible;
``tests/test_stubs.py`` regenerates into a temporary directory and compares bytes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PACKAGE = ("latentsearch", "v1")
INIT_DOC = "latentsearch.v1: gRPC stubs generated from proto/ by scripts/gen_proto.py; do not edit."


def _plugin(name: str) -> str:
    """The path of the protoc plugin executable ``name`` (installed beside this Python)."""
    found = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(found).exists():
        raise SystemExit(f"{name} not found: pip install -e '.[dev]' (mypy-protobuf)")
    return found


def generate(out_root: Path) -> list[Path]:
    """Write the stubs under ``out_root/latentsearch/v1``; returns the generated files."""
    protos = sorted(PROTO_ROOT.joinpath(*PACKAGE).glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT.joinpath(*PACKAGE)}")
    pkg_dir = out_root.joinpath(*PACKAGE)
    pkg_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *(p.relative_to(PROTO_ROOT).as_posix() for p in protos),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for src in sorted(Path(tmp).joinpath(*PACKAGE).iterdir()):
            if src.suffix not in (".py", ".pyi"):
                continue
            dst = pkg_dir / src.name
            dst.write_bytes(src.read_bytes())
            written.append(dst)
    init = pkg_dir / "__init__.py"
    init.write_text(f'"""{INIT_DOC}"""\n', encoding="utf-8")
    written.append(init)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
