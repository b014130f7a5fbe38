"""Bring-your-own models: TorchScript files and Python factories, with shape validation."""

from __future__ import annotations

import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from latentsearch.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from latentsearch.model.loader import encode_batch, load_model


class GoodModel(nn.Module):
    """(N, 1, 6, 6) images <-> (N, 3) latents."""

    def __init__(self, d: int = 3, out_numel: int = 36) -> None:
        super().__init__()
        self.enc = nn.Linear(36, 2 * d)
        self.dec = nn.Linear(d, out_numel)
        self.out_numel = out_numel

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.enc(x.reshape(x.shape[0], -1))
        mu, logvar = h.chunk(2, dim=-1)
        return mu, logvar

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out = torch.sigmoid(self.dec(z))
        if self.out_numel == 36:
            return out.reshape(z.shape[0], 1, 6, 6)
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(x)


def _script(module: nn.Module, path) -> str:
    """Stand-in for the user's own export step (torch deprecates jit.script; loading is not deprecated)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch.jit.script` is deprecated", category=DeprecationWarning
        )
        scripted = torch.jit.script(module)
    scripted.save(str(path))
    return str(path)


def test_torchscript_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    ref = GoodModel().eval()
    path = _script(ref, tmp_path / "m.pt")
    m = load_model(path, input_shape=(1, 6, 6))
    assert m.source == "torchscript" and m.latent_dim == 3 and len(m.model_hash) == 64
    # reader layout (N, H, W, C) is permuted to the model's (C, H, W); uint8 scaled to [0, 1]
    x = np.random.default_rng(0).integers(0, 256, (4, 6, 6, 1), dtype=np.uint8)
    mu, logvar = encode_batch(m, x)
    with torch.no_grad():
        want_mu, want_lv = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0)
    np.testing.assert_allclose(mu, want_mu.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logvar, want_lv.numpy(), rtol=1e-6, atol=1e-6)
    assert m.decode(np.zeros((2, 3), np.float32)).shape == (2, 1, 6, 6)
    with pytest.raises(InvalidArgumentError, match=r"expected latents of shape \(N, 3\)"):
        m.decode(np.zeros((2, 4), np.float32))


def test_torchscript_wrong_latent_and_decode_shape(tmp_path) -> None:
    path = _script(GoodModel(out_numel=36).eval(), tmp_path / "a.pt")
    with pytest.raises(InvalidArgumentError, match=r"each \(2, 5\).*got latent dimension 3"):
        load_model(path, input_shape=(1, 6, 6), latent_dim=5)
    bad = _script(GoodModel(out_numel=10).eval(), tmp_path / "b.pt")
    with pytest.raises(
        InvalidArgumentError, match=r"decode\(z\).*shape \(2, 1, 6, 6\); got a tensor of shape \(2, 10\)"
    ):
        load_model(bad, input_shape=(1, 6, 6))
    with pytest.raises(
        InvalidArgumentError, match=r"encode\(x\) failed on a dummy float32 batch of shape \(2, 5\)"
    ):
        load_model(path, input_shape=(5,))
    with pytest.raises(InvalidArgumentError, match="input_shape is required"):
        load_model(path)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(InvalidArgumentError, match="not a loadable TorchScript"):
        load_model(tmp_path / "junk.pt", input_shape=(1, 6, 6))


_FACTORY_SRC = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Enc(nn.Module):
        def __init__(self, wrong=False):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.wrong = wrong
        def encode(self, x):
            h = self.lin(x)
            if self.wrong:
                return h
            return h[:, :2], h[:, 2:]
        def decode(self, z):
            return z.repeat(1, 2)

    class NoDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
        def encode(self, x):
            h = self.lin(x)
            return h[:, :2], h[:, 2:]

    def good():
        torch.manual_seed(0)
        return Enc()

    def wrong():
        return Enc(wrong=True)

    def no_decoder():
        return NoDecoder()

    def not_a_module():
        return 42
    """
)


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    pkg = tmp_path / "byo_pkg_for_tests"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(_FACTORY_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "byo_pkg_for_tests.models"
    for name in [n for n in sys.modules if n.startswith("byo_pkg_for_tests")]:
        del sys.modules[name]


def test_factory_loading_and_errors(factory_module, caplog) -> None:
    m = load_model(f"{factory_module}:good", input_shape=(4,))
    assert m.source == "factory" and m.latent_dim == 2 and m.has_decoder
    q = m.encode(np.ones((3, 4), np.float32))
    assert q.mean.shape == (3, 2)
    assert m.model_hash == load_model(f"{factory_module}:good", input_shape=(4,)).model_hash
    with pytest.raises(
        InvalidArgumentError, match=r"to return \(mu, logvar\).*got a tensor of shape \(2, 4\)"
    ):
        load_model(f"{factory_module}:wrong", input_shape=(4,))
    with pytest.raises(InvalidArgumentError, match=r"must return a torch\.nn\.Module, returned int"):
        load_model(f"{factory_module}:not_a_module", input_shape=(4,))
    with pytest.raises(NotFoundError, match="has no callable 'missing'"):
        load_model(f"{factory_module}:missing", input_shape=(4,))
    with pytest.raises(NotFoundError, match="cannot import"):
        load_model("no_such_pkg_xyz.mod:fn", input_shape=(4,))
    nodec = load_model(f"{factory_module}:no_decoder", input_shape=(4,))
    assert not nodec.has_decoder
    with pytest.raises(FailedPreconditionError, match="no decode"):
        nodec.decode(np.zeros((1, 2), np.float32))
