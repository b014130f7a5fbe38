"""Checkpoint save/load round trip, content hash, corruption detection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from latentsearch.errors import CorruptIndexError, InvalidArgumentError, NotFoundError
from latentsearch.model.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    read_model_hash,
    save_checkpoint,
)
from latentsearch.model.config import TrainConfig, VAEConfig
from latentsearch.model.loader import encode_batch, load_model
from latentsearch.model.vae import build_vae


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_vae(VAEConfig(input_shape=(9, 7, 2), latent_dim=3, channels=(4, 8), hidden=16)).eval()
    h = save_checkpoint(model, tmp_path / "m", train_config=TrainConfig(), data={"fingerprint": "abc"})
    return model, tmp_path / "m", h


def test_round_trip_identical_outputs_and_hash(saved) -> None:
    model, path, h = saved
    assert len(h) == 64 and read_model_hash(path) == h
    loaded = load_model(path)
    assert loaded.model_hash == h and loaded.latent_dim == 3 and loaded.input_shape == (9, 7, 2)
    assert loaded.config["data"]["fingerprint"] == "abc"
    assert loaded.config["versions"]["torch"] == torch.__version__
    x = np.random.default_rng(0).integers(0, 256, (5, 9, 7, 2), dtype=np.uint8)
    mu0, lv0 = encode_batch(model, x)
    mu1, lv1 = encode_batch(loaded, x)
    np.testing.assert_array_equal(mu0, mu1)
    np.testing.assert_array_equal(lv0, lv1)
    q = loaded.encode(x)
    z = q.mean
    with torch.inference_mode():
        torch.testing.assert_close(loaded.decode(z), model.decode(z), rtol=0, atol=0)
    # saving the same model again gives the same hash (deterministic bytes)
    assert (
        save_checkpoint(model, path.parent / "again", train_config=TrainConfig(), data={"fingerprint": "abc"})
        == h
    )


def test_flipped_byte_in_weights_is_reported(saved) -> None:
    _, path, _ = saved
    raw = bytearray((path / WEIGHTS_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (path / WEIGHTS_FILE).write_bytes(bytes(raw))
    with pytest.raises(CorruptIndexError, match=r"model\.safetensors: sha256 mismatch"):
        load_model(path)


def test_truncated_and_missing_files(saved) -> None:
    _, path, _ = saved
    cfg = (path / CONFIG_FILE).read_bytes()
    (path / CONFIG_FILE).write_bytes(cfg[:-10])
    with pytest.raises(CorruptIndexError, match=r"config\.json: sha256 mismatch.*corrupt or truncated"):
        load_checkpoint(path)
    (path / CONFIG_FILE).unlink()
    with pytest.raises(NotFoundError):
        load_model(path)  # no config.json: not a model directory
    with pytest.raises(NotFoundError):
        load_model(path.parent / "nope")


def test_missing_weights_named(saved) -> None:
    _, path, _ = saved
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(CorruptIndexError, match=r"model\.safetensors: missing"):
        load_checkpoint(path)


def test_mismatched_expectations(saved) -> None:
    _, path, _ = saved
    with pytest.raises(InvalidArgumentError, match="latent_dim 3, 4 expected"):
        load_model(path, latent_dim=4)
    with pytest.raises(InvalidArgumentError, match="model takes items of shape"):
        load_model(path, input_shape=(28, 28, 1))


def test_config_json_is_plain(saved) -> None:
    _, path, _ = saved
    cfg = json.loads((path / CONFIG_FILE).read_text())
    assert cfg["vae"]["arch"] == "conv" and cfg["vae"]["latent_dim"] == 3
    assert cfg["vae"]["normalization"]["kind"] == "scale"
    assert VAEConfig.from_dict(cfg["vae"]).input_shape == (9, 7, 2)
