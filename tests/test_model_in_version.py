"""The model travels with its index version: stored at index time, served with the version, swapped
with it on reload; TorchScript and factory models served; one input rule for Encode; old roots."""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from latentsearch.cli import main
from latentsearch.client import error_from_rpc
from latentsearch.engine.storage import file_digest
from latentsearch.errors import CorruptIndexError, FailedPreconditionError
from latentsearch.indexer import IndexJobConfig, IndexRoot, run_index_job
from latentsearch.model.checkpoint import save_checkpoint
from latentsearch.model.loader import LoadedModel, load_model
from latentsearch.model.vae import build_vae
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(180)

SHAPE = (8, 8, 1)  # one tiny image, reader layout (H, W, C)
DIM = 4


def _close32(actual: Any, desired: Any) -> None:
    """Server and reference run the same float32 module on the same input, and the wire carries its
    float32 outputs as doubles: they agree to float32 rounding (identical in practice)."""
    np.testing.assert_allclose(np.asarray(actual), np.asarray(desired), rtol=1e-6, atol=1e-7)


def _close64(actual: Any, desired: Any) -> None:
    """Against a float64 numpy reference of a float32 network: float32 rounding of a few dozen
    products and sums."""
    np.testing.assert_allclose(np.asarray(actual), np.asarray(desired), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def vaes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two model directories: same architecture, different weights (so different hashes)."""
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        vae = build_vae(input_shape=SHAPE, latent_dim=DIM, channels=(4,), hidden=16)
        path = tmp_path_factory.mktemp(f"vae{seed}") / "model"
        save_checkpoint(vae, path)
        out.append(path)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, tiny_images) -> Path:
    path = tmp_path_factory.mktemp("data") / "images.npy"
    np.save(path, tiny_images(40, SHAPE, seed=3))
    return path


def _index(out: Path, model: str | Path, data: Path, **kwargs) -> str:
    config = IndexJobConfig(out=out, model=str(model), data=str(data), device="cpu", progress=False, **kwargs)
    return run_index_job(config).version


def _stub(target: str) -> tuple[grpc.Channel, pb_grpc.LatentSearchStub]:
    ch = grpc.insecure_channel(target)
    return ch, pb_grpc.LatentSearchStub(ch)


def _rpc_error(call: Any, request: Any) -> Any:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10)
    return err.value


def _field(error: Any) -> str | None:
    """The request field a failed call names (the client's reading of its trailing metadata)."""
    return error_from_rpc(error).field


def _entries(root: Path) -> set[str]:
    models = root / "models"
    return {p.name for p in models.iterdir()} if models.is_dir() else set()


# -- 1: index from a model, serve with no --model; one input rule ------------------------------------
def test_served_with_its_stored_model_one_input_rule(
    tmp_path: Path, vaes: list[Path], images: Path, start_server
) -> None:
    root_dir = tmp_path / "idx"
    version = _index(root_dir, vaes[0], images)
    root = IndexRoot(root_dir)
    model = load_model(vaes[0])
    ref = root.model_ref(version)
    assert ref is not None and ref.model_hash == model.model_hash == root.manifest(version)["model_hash"]
    entry_dir = root_dir / "models" / ref.entry
    entry = json.loads((entry_dir / "model.json").read_text())
    assert entry["kind"] == "checkpoint" and entry["input_rule"] == "pixels"
    assert entry["input_shape"] == list(SHAPE) and entry["latent_dim"] == DIM and entry["has_decoder"]
    assert set(entry["files"]) == {"files/model.safetensors", "files/config.json", "files/checksums.json"}
    for p in entry_dir.rglob("*"):  # read-only like the versions
        assert stat.S_IMODE(p.stat().st_mode) == (0o555 if p.is_dir() else 0o444), p
    assert root.verify(version) == version

    srv = start_server(index=root_dir)  # no model given
    image = np.load(images)[5]  # (8, 8, 1) uint8
    mu, logvar = model.encode_params(image[None])
    want_mean, want_std = mu[0].double().numpy(), np.exp(0.5 * logvar[0].double().numpy())
    ch, stub = _stub(srv.target)
    with ch:
        info = stub.Info(pb.InfoRequest(), timeout=10)
        assert info.model_hash == info.served_model_hash == model.model_hash
        forms = {
            "raw": pb.EncodeRequest(shape=list(SHAPE), raw=image.tobytes()),
            # the same pixels as floats: byte / 255
            "values": pb.EncodeRequest(shape=list(SHAPE), values=(image.ravel() / 255.0).tolist()),
        }
        for form, request in forms.items():
            enc = stub.Encode(request, timeout=10)
            assert enc.model_hash == model.model_hash and enc.index_version == version, form
            np.testing.assert_allclose(enc.mean, want_mean, rtol=1e-5, atol=1e-6, err_msg=form)
            np.testing.assert_allclose(enc.sigma, want_std, rtol=1e-5, err_msg=form)
        # the server's encoding of item 5 is the posterior the indexer stored for it
        z = np.asarray(stub.Encode(forms["raw"], timeout=10).mean)
        _close32(z, root.load(version).bank.mu[5])
        # floats outside [0, 1] (0..255 units, which silently gave a wrong posterior before) and
        # non-finite ones are refused, naming values
        for bad in ([float(v) for v in image.ravel()], [1.5] * 64, [-0.01] * 64, [float("nan")] * 64):
            error = _rpc_error(stub.Encode, pb.EncodeRequest(shape=list(SHAPE), values=bad))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and _field(error) == "values"
        zq = np.array([0.5, -0.2, 0.1, 1.0])
        dec = stub.Decode(pb.DecodeRequest(z=zq.tolist()), timeout=10)
        assert dec.model_hash == model.model_hash and dec.index_version == version
        _close32(np.asarray(dec.values).reshape(SHAPE), model.decode(zq[None])[0].numpy())

    # a reload to a version of the same model reuses the loaded model (cached by store entry)
    served = srv.server.service.snapshot().model
    v2 = _index(root_dir, vaes[0], images)
    assert srv.run(srv.server.reload_now()) and srv.server.version == v2
    assert srv.server.service.snapshot().model is served and _entries(root_dir) == {ref.entry}

    # --model with the version's own hash is accepted; a different one refuses to start, both named
    assert start_server(index=root_dir, model=load_model(vaes[0])).server.version == v2
    other = load_model(vaes[1])
    with pytest.raises(FailedPreconditionError) as err:
        start_server(index=root_dir, model=other)
    assert other.model_hash in err.value.message and model.model_hash in err.value.message


# -- 2: reindex with a second model under load ---------------------------------------------------------
def test_reindex_switches_model_and_index_together_under_load(
    tmp_path: Path, vaes: list[Path], images: Path, start_server, wait_until
) -> None:
    root_dir = tmp_path / "idx"
    v1 = _index(root_dir, vaes[0], images)
    srv = start_server(index=root_dir, reload_interval=0.05)
    image = np.load(images)[7]
    refs = {}  # model hash -> the model's own posterior mean of the image
    for path in vaes:
        m = load_model(path)
        refs[m.model_hash] = m.encode_params(image[None])[0][0].double().numpy()
    stop = threading.Event()
    replies: list[tuple[str, str, str, np.ndarray | None]] = []  # (rpc, model_hash, version, mean)
    failures: list[BaseException] = []

    def client(kind: str) -> None:
        ch, stub = _stub(srv.target)
        with ch:
            while not stop.is_set():
                try:
                    if kind == "Encode":
                        e = stub.Encode(pb.EncodeRequest(shape=list(SHAPE), raw=image.tobytes()), timeout=10)
                        replies.append((kind, e.model_hash, e.index_version, np.asarray(e.mean)))
                    elif kind == "Decode":
                        d = stub.Decode(pb.DecodeRequest(z=[0.1] * DIM), timeout=10)
                        replies.append((kind, d.model_hash, d.index_version, None))
                    else:
                        n = stub.Nearest(pb.NearestRequest(z=[0.0] * DIM, k=3), timeout=10)
                        replies.append((kind, "", n.index_version, None))
                except BaseException as exc:  # counted: the test wants none
                    failures.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in ("Encode", "Decode", "Nearest", "Encode")]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(replies) > 20)
        v2 = _index(root_dir, vaes[1], images)
        wait_until(lambda: srv.server.version == v2)
        n = len(replies)
        wait_until(lambda: len(replies) > n + 20)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    root = IndexRoot(root_dir)
    published = {v: root.manifest(v)["model_hash"] for v in (v1, v2)}
    assert published[v1] != published[v2]
    seen = set()
    for rpc, model_hash, version, mean in replies:
        assert version in published, version
        seen.add(version)
        if rpc != "Nearest":  # the pair belongs to one published version
            assert model_hash == published[version], (rpc, version)
        if mean is not None:  # and the posterior really is that version's model's
            _close32(mean, refs[model_hash])
    assert seen == {v1, v2}
    # a rollback swaps the model back with the index
    root.rollback(v1)
    wait_until(lambda: srv.server.version == v1)
    ch, stub = _stub(srv.target)
    with ch:
        enc = stub.Encode(pb.EncodeRequest(shape=list(SHAPE), raw=image.tobytes()), timeout=10)
    assert enc.index_version == v1 and enc.model_hash == published[v1]
    _close32(enc.mean, refs[published[v1]])


# -- 3: TorchScript and factory models ---------------------------------------------------------------
class _ScriptedModel(nn.Module):
    """(N, 1, 8, 8) images in [0, 1] <-> (N, 3) latents: linear, so numpy can check it in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(64, 6)
        self.dec = nn.Linear(3, 64)

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.enc(x.reshape(x.shape[0], -1))
        return h[:, :3], 0.1 * h[:, 3:]

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.dec(z)).reshape(z.shape[0], 1, 8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(x)


def _linear64(layer: nn.Linear, x: np.ndarray) -> np.ndarray:
    w, b = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
    return x @ w.T + b


def test_torchscript_model_indexes_serves_encodes_decodes(
    tmp_path: Path, images: Path, start_server
) -> None:
    torch.manual_seed(4)
    module = _ScriptedModel().eval()
    with warnings.catch_warnings():  # the user's own export step; torch deprecates jit.script
        warnings.filterwarnings(
            "ignore", message=r"`torch.jit.script` is deprecated", category=DeprecationWarning
        )
        torch.jit.script(module).save(str(tmp_path / "m.pt"))
    root_dir = tmp_path / "idx"
    version = _index(root_dir, tmp_path / "m.pt", images, input_shape=(1, 8, 8))
    ref = IndexRoot(root_dir).model_ref(version)
    assert ref is not None
    entry = json.loads((root_dir / "models" / ref.entry / "model.json").read_text())
    assert entry["kind"] == "torchscript" and entry["input_layout"] == "hwc-to-chw"
    assert entry["input_shape"] == [1, 8, 8] and entry["data_shape"] == list(SHAPE)
    (tmp_path / "m.pt").unlink()  # served from the store, not from the original file

    srv = start_server(index=root_dir)  # no --model, no --input-shape
    image = np.load(images)[2]
    x64 = image.reshape(1, -1).astype(np.float64) / 255.0  # C = 1: CHW bytes are the HWC bytes
    h = _linear64(module.enc, x64)[0]
    ch, stub = _stub(srv.target)
    with ch:
        for request in (
            pb.EncodeRequest(shape=[1, 8, 8], raw=image.tobytes()),
            pb.EncodeRequest(shape=[1, 8, 8], values=(image.ravel() / 255.0).tolist()),
        ):
            enc = stub.Encode(request, timeout=10)
            assert enc.index_version == version and enc.model_hash == ref.model_hash
            _close64(enc.mean, h[:3])
            _close64(enc.sigma, np.exp(0.5 * 0.1 * h[3:]))
        z = np.array([0.3, -1.0, 0.5])
        dec = stub.Decode(pb.DecodeRequest(z=z.tolist()), timeout=10)
        assert list(dec.shape) == [1, 8, 8] and dec.index_version == version
        want = 1.0 / (1.0 + np.exp(-_linear64(module.dec, z[None])[0]))
        _close64(dec.values, want)


_FACTORY_SRC = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Features(nn.Module):
        # (N, 6) float features <-> (N, 2) latents
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(6, 4)
            self.dec = nn.Linear(2, 6)
        def encode(self, x):
            h = self.enc(x)
            return h[:, :2], 0.1 * h[:, 2:]
        def decode(self, z):
            return self.dec(z)

    def build():
        torch.manual_seed(7)
        return Features()
    """
)


@pytest.fixture
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pkg = tmp_path / "h12_factory_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(_FACTORY_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "h12_factory_pkg.models:build"
    for name in [n for n in sys.modules if n.startswith("h12_factory_pkg")]:
        del sys.modules[name]


def test_factory_model_on_float_data_indexes_serves_encodes_decodes(
    tmp_path: Path, factory: str, start_server
) -> None:
    features = np.random.default_rng(2).normal(0, 3, size=(30, 6)).astype(np.float32)
    np.save(tmp_path / "features.npy", features)
    root_dir = tmp_path / "idx"
    version = _index(root_dir, factory, tmp_path / "features.npy", input_shape=(6,))
    ref = IndexRoot(root_dir).model_ref(version)
    assert ref is not None
    entry_dir = root_dir / "models" / ref.entry
    entry = json.loads((entry_dir / "model.json").read_text())
    assert entry["kind"] == "factory" and entry["factory"] == factory and entry["files"] == {}
    assert entry["input_rule"] == "float" and entry["input_shape"] == [6]

    srv = start_server(index=root_dir)
    module = load_model(factory, input_shape=(6,)).module
    x = features[4].astype(np.float64)
    h = _linear64(module.enc, x[None])[0]
    ch, stub = _stub(srv.target)
    with ch:
        enc = stub.Encode(pb.EncodeRequest(shape=[6], values=features[4].tolist()), timeout=10)
        assert enc.index_version == version and enc.model_hash == ref.model_hash
        _close64(enc.mean, h[:2])  # values in the data's units, as they are
        _close64(enc.sigma, np.exp(0.05 * h[2:]))
        _close32(enc.mean, IndexRoot(root_dir).load(version).bank.mu[4])
        error = _rpc_error(stub.Encode, pb.EncodeRequest(shape=[6], raw=bytes(6)))  # float data: no raw
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and _field(error) == "raw"
        error = _rpc_error(stub.Encode, pb.EncodeRequest(shape=[6], values=[float("inf")] * 6))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and _field(error) == "values"
        z = np.array([0.4, -0.7])
        dec = stub.Decode(pb.DecodeRequest(z=z.tolist()), timeout=10)
        _close64(dec.values, _linear64(module.dec, z[None])[0])
        assert dec.png == b""  # not an image


# -- 4: retention, rollback, cleanup, verification of the store -----------------------------------
def test_retention_and_rollback_keep_what_kept_versions_need(
    tmp_path: Path, vaes: list[Path], images: Path
) -> None:
    root_dir = tmp_path / "idx"
    root = IndexRoot(root_dir, create=True)
    v1 = _index(root_dir, vaes[0], images, keep=100)
    v2 = _index(root_dir, vaes[1], images, keep=100)
    v3 = _index(root_dir, vaes[0], images, keep=100)
    refs = {v: root.model_ref(v) for v in (v1, v2, v3)}
    a, b = refs[v1], refs[v2]
    assert a is not None and b is not None and refs[v3] == a  # the same model is stored once
    assert _entries(root_dir) == {a.entry, b.entry}
    # rollback deletes nothing; retention keeps what kept versions reference
    assert root.rollback(v2) == v2
    assert _entries(root_dir) == {a.entry, b.entry}
    assert root.prune(keep=1) == [v1]  # v2 is current, v3 the newest
    assert _entries(root_dir) == {a.entry, b.entry}
    root.rollback(v3)
    assert root.prune(keep=1) == [v2]
    assert _entries(root_dir) == {a.entry}  # b: no version references it any more
    # cleanup drops an unreferenced entry left by a publish that died before its version
    (root_dir / "models" / ("0" * 64)).mkdir()
    root.clean_stale()
    assert _entries(root_dir) == {a.entry}

    # a damaged model file fails verification, named; the next publish of that model replaces it
    weights = root_dir / "models" / a.entry / "files" / "model.safetensors"
    os.chmod(weights.parent, 0o755)
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptIndexError, match=r"models/.*/files/model\.safetensors: fails its sha256"):
        root.verify(v3)
    with pytest.raises(CorruptIndexError, match=r"model\.safetensors"):
        root.load_model(v3)
    v4 = _index(root_dir, vaes[0], images, keep=100)
    assert root.model_ref(v4) == a and root.verify(v3) == v3 and root.verify(v4) == v4


# -- 5: old roots, --model, a reload to a version of another model ------------------------------------
def test_old_layout_root_serves_with_model_and_a_mismatching_reload_is_not_served(
    tmp_path: Path,
    vaes: list[Path],
    images: Path,
    make_engine,
    publish,
    start_server,
    wait_until,
    caplog,
    capsys,
) -> None:
    a, b = load_model(vaes[0]), load_model(vaes[1])
    root_dir = tmp_path / "idx"
    # A root as published before the model store: a manifest naming the model hash, no "model"
    # entry, no models/ (rewritten here as that release wrote it, checksum included).
    old = publish(root_dir, make_engine(50, dim=DIM, seed=2), model_hash=a.model_hash)
    vdir = root_dir / "versions" / old
    manifest = json.loads((vdir / "manifest.json").read_text())
    del manifest["model"]
    os.chmod(vdir, 0o755)
    for name in ("manifest.json", "manifest.sha256"):
        (vdir / name).unlink()
    (vdir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (vdir / "manifest.sha256").write_text(f"{file_digest(vdir / 'manifest.json')}  manifest.json\n")
    os.chmod(vdir, 0o555)
    assert IndexRoot(root_dir).verify(old) == old and IndexRoot(root_dir).model_ref(old) is None
    assert not (root_dir / "models").exists()
    image = np.load(images)[0]
    request = pb.EncodeRequest(shape=list(SHAPE), raw=image.tobytes())

    bare = start_server(index=root_dir)  # Nearest works; Encode needs --model, as before
    ch, stub = _stub(bare.target)
    with ch:
        assert len(stub.Nearest(pb.NearestRequest(z=[0.0] * DIM, k=2), timeout=10).neighbors) == 2
        error = _rpc_error(stub.Encode, request)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "--model" in str(error.details())
    with pytest.raises(FailedPreconditionError, match=f"{b.model_hash}.*{a.model_hash}"):
        start_server(index=root_dir, model=b)
    # the CLI: refused before any worker starts, one error line naming both hashes, exit status 2
    argv = ["serve", "--index", str(root_dir), "--model", str(vaes[1]), "--port", "0", "--metrics-port", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model") and "\n" not in err
    assert f"is model {b.model_hash}, but index version {old} was built with model {a.model_hash}" in err

    srv = start_server(index=root_dir, model=a, reload_interval=0.05)
    ch, stub = _stub(srv.target)
    with ch:
        enc = stub.Encode(request, timeout=10)
        assert enc.index_version == old and enc.model_hash == a.model_hash
        _close32(enc.mean, a.encode_params(image[None])[0][0].double().numpy())
        # a reindex with model B: not served by a server whose --model is A (an error naming both)
        with caplog.at_level(logging.ERROR, logger="latentsearch.server.app"):
            new = _index(root_dir, vaes[1], images, keep=100)
            wait_until(lambda: any(new in r.getMessage() for r in caplog.records))
        message = next(r.getMessage() for r in caplog.records if new in r.getMessage())
        assert a.model_hash in message and b.model_hash in message
        time.sleep(0.2)
        assert srv.server.version == old
        info = stub.Info(pb.InfoRequest(), timeout=10)
        assert info.index_version == old and info.current_version == new and info.fallback_reason
        assert stub.Encode(request, timeout=10).index_version == old


def test_loaded_model_rule_is_applied_in_prepare(vaes: list[Path]) -> None:
    """The one place: uint8 and byte / 255 floats reach our VAE as the same raw units."""
    model: LoadedModel = load_model(vaes[0])
    assert model.input_rule == "pixels"  # trained-on-uint8 normalisation (scale 1/255)
    x = np.random.default_rng(0).integers(0, 256, size=(3, *SHAPE), dtype=np.uint8)
    np.testing.assert_allclose(model.prepare(x.astype(np.float32) / 255).numpy(), x, rtol=1e-6)
    floats = load_model(vaes[0], input_rule="float")  # as if indexed from float data: taken as they are
    np.testing.assert_array_equal(floats.prepare(x.astype(np.float32)).numpy(), x)
