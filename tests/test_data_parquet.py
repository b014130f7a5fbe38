"""Parquet input: encoded-image and array columns, labels and ids, read locally and on Ray Data, give
the same items, posteriors and search results as the same data in an npz; bad input names the file
and the column."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from reference import log_q, top_k

pa = pytest.importorskip("pyarrow")  # the parquet extra (part of dev)
pq = pytest.importorskip("pyarrow.parquet")

from latentsearch.cli import main  # noqa: E402
from latentsearch.data import parquet  # noqa: E402
from latentsearch.data.builtin import load_data  # noqa: E402
from latentsearch.data.readers import ParquetDataset, open_dataset  # noqa: E402
from latentsearch.errors import FailedPreconditionError, InvalidArgumentError  # noqa: E402
from latentsearch.indexer import IndexJobConfig, IndexRoot, run_index_job  # noqa: E402
from latentsearch.model.loader import LoadedModel  # noqa: E402

N = 150


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(tiny_images: Callable[..., np.ndarray]) -> np.ndarray:
    """``(N, 8, 8, 1)`` uint8 blob images (the tiny model's item shape)."""
    return tiny_images(N, (8, 8, 1), seed=11)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.random.default_rng(11).integers(0, 5, N).astype(np.int64)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, images: np.ndarray, labels: np.ndarray) -> dict[str, Path]:
    """The same items four ways: an npz, a Parquet file of PNGs (row groups of 40), a folder of two
    Parquet files of flat uint8 lists (shape in the file metadata), and a tensor column."""
    tmp = tmp_path_factory.mktemp("parquet")
    ids = np.array([f"item-{i:03d}" for i in range(N)])
    np.savez(tmp / "items.npz", x=images, y=labels, ids=ids)
    png = pa.table({"id": ids, "label": labels, "image": pa.array([_png(x) for x in images], pa.binary())})
    pq.write_table(png, tmp / "png.parquet", row_group_size=40)
    folder = tmp / "flat"
    folder.mkdir()
    meta = {parquet.ITEM_SHAPE_KEY: json.dumps([8, 8, 1]).encode()}
    for part, rows in enumerate((slice(0, 70), slice(70, N))):
        flat = pa.array(list(images[rows].reshape(-1, 64)), pa.list_(pa.uint8(), 64))
        table = pa.table({"pixels": flat, "label": labels[rows], "id": ids[rows]})
        table = table.replace_schema_metadata(meta)
        pq.write_table(table, folder / f"part-{part}.parquet", row_group_size=25)
    tensor_type = pa.fixed_shape_tensor(pa.uint8(), (8, 8, 1))
    storage = pa.array(list(images.reshape(N, -1)), pa.list_(pa.uint8(), 64))
    tensor = pa.ExtensionArray.from_storage(tensor_type, storage)
    pq.write_table(pa.table({"x": tensor, "y": labels}), tmp / "tensor.parquet", row_group_size=64)
    return {
        "npz": tmp / "items.npz", "png": tmp / "png.parquet", "flat": folder, "tensor": tmp / "tensor.parquet"
    }


def _write(path: Path, **columns: Any) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


# -- the local reader -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["png", "flat", "tensor"])
def test_parquet_items_labels_and_ids_equal_the_source(
    kind: str, data: dict[str, Path], images: np.ndarray, labels: np.ndarray
) -> None:
    ds = open_dataset(data[kind])
    assert isinstance(ds, ParquetDataset)
    assert ds.shape == (N, 8, 8, 1) and ds.dtype == np.uint8
    np.testing.assert_array_equal(ds.to_array(), images)
    # reads across row-group and file boundaries, in odd sizes
    got = np.concatenate([b for _, b in ds.iter_batches(33)])
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(ds.read(38, 72), images[38:72])
    np.testing.assert_array_equal(ds.labels, labels)
    want_ids = np.arange(N).astype(str) if kind == "tensor" else np.array([f"item-{i:03d}" for i in range(N)])
    np.testing.assert_array_equal(ds.ids, want_ids)
    assert ds.fingerprint() == open_dataset(data["npz"]).fingerprint()


def test_metadata_names_the_file_and_row(data: dict[str, Path]) -> None:
    ds = open_dataset(data["flat"])
    meta = ds.item_metadata(68, 72)
    assert meta is not None
    assert [m["row"] for m in meta] == [68, 69, 0, 1]
    assert [Path(m["source"]).name for m in meta] == ["part-0.parquet"] * 2 + ["part-1.parquet"] * 2


def test_vectors_shapes_and_string_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 6)).astype(np.float32)
    names = np.array(["shirt", "boot", "bag", "boot"] * 5)
    path = _write(tmp_path / "v.parquet", features=pa.array(list(x), pa.list_(pa.float32())), kind=names)
    ds = open_dataset(path, label_column="kind")
    assert ds.shape == (20, 6) and ds.dtype == np.float32
    np.testing.assert_array_equal(ds.to_array(), x)
    assert ds.label_names == ["bag", "boot", "shirt"]  # sorted distinct values
    np.testing.assert_array_equal(np.array(ds.label_names)[ds.labels], names)
    # a flat vector reshaped by the caller: 6 = 2 x 3 x 1
    ds = open_dataset(path, shape=(2, 3))
    assert ds.shape == (20, 2, 3, 1)
    np.testing.assert_array_equal(ds.to_array().reshape(20, 6), x)


def _error(path: Path, **kw: Any) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as info:
        open_dataset(path, **kw).to_array()
    return info.value


def test_bad_parquet_input_names_the_file_and_column(tmp_path: Path, images: np.ndarray) -> None:
    flat = pa.array(list(images[:4].reshape(4, -1)), pa.list_(pa.uint8()))
    good = _write(tmp_path / "good.parquet", a=flat, b=flat)
    e = _error(good)  # two candidate columns, neither a known name
    assert e.field == "parquet_column" and "good.parquet" in e.message and "(a, b of a, b could)" in e.message
    e = _error(good, column="nope")
    assert e.field == "parquet_column" and "'nope'" in e.message and "good.parquet" in e.message
    e = _error(good, column="a", shape=(5, 5))
    assert e.field == "parquet_shape" and "'a'" in e.message and "64" in e.message
    np.testing.assert_array_equal(open_dataset(good, column="b").to_array(), images[:4].reshape(4, -1))
    e = _error(good, column="a", label_column="missing")
    assert e.field == "label_column" and "'missing'" in e.message
    ragged = _write(tmp_path / "ragged.parquet", x=pa.array([[1, 2, 3], [1, 2]], pa.list_(pa.int64())))
    e = _error(ragged)
    assert "ragged.parquet: column 'x': row 1 has 2 values" in e.message
    nulls = _write(tmp_path / "nulls.parquet", x=pa.array([[1.0, 2.0], None], pa.list_(pa.float64())))
    assert "nulls.parquet: column 'x': row 1 is null" in _error(nulls).message
    junk = _write(tmp_path / "junk.parquet", image=pa.array([_png(images[0]), b"not an image"]))
    e = _error(junk)
    assert "junk.parquet: column 'image': row 1 is not a decodable PNG/JPEG" in e.message
    nine = _png(np.zeros((9, 9), np.uint8))
    sizes = _write(tmp_path / "sizes.parquet", image=pa.array([_png(images[0]), nine]))
    e = _error(sizes)
    assert "sizes.parquet: column 'image': row 1 is a 9x9 (WxH) image, the first one is 8x8" in e.message
    text = _write(tmp_path / "text.parquet", image=pa.array(["a", "b"]))
    e = _error(text, column="image")
    assert e.field == "parquet_column" and "text.parquet: column 'image' is string" in e.message
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 truncated")
    assert "broken.parquet: not a readable Parquet file" in _error(tmp_path / "broken.parquet").message
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write(mixed / "a.parquet", x=pa.array([[1, 2]], pa.list_(pa.int64())))
    _write(mixed / "b.parquet", x=pa.array([[1.0, 2.0]], pa.list_(pa.float64())))
    e = _error(mixed)
    assert "b.parquet: column 'x' is list<element: double>, the first file's is list<element: int64>" in (
        e.message
    )


def test_parquet_options_for_other_data_are_refused(data: dict[str, Path]) -> None:
    e = _error(data["npz"], column="x")
    assert e.field == "parquet_column" and "--parquet-column applies to Parquet data only" in e.message
    with pytest.raises(InvalidArgumentError) as info:
        load_data("shapes", label_column="y")
    assert info.value.field == "label_column"


def test_without_pyarrow_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, data: dict[str, Path]
) -> None:
    monkeypatch.setattr(parquet, "pq", None)
    with pytest.raises(FailedPreconditionError, match=r"pip install 'latentsearch\[parquet\]'"):
        open_dataset(data["png"])


# -- the indexer, local and on Ray ------------------------------------------------------------------
def _config(out: Path, model: Path, data: Path, **kw: Any) -> IndexJobConfig:
    return IndexJobConfig(
        out=out, model=str(model), data=str(data), device="cpu", batch_size=64, progress=False, **kw
    )


def _same_index(a_root: Path, b_root: Path, *, exact_posteriors: bool) -> None:
    """Two published roots hold the same posteriors (bit for bit, else within float32 rounding of
    different batch boundaries), labels and ids, and give the float64 brute force's top 10."""
    _, a = IndexRoot(a_root).load_current(verify=True)
    _, b = IndexRoot(b_root).load_current(verify=True)
    mu_a, mu_b = np.asarray(a.bank.mu), np.asarray(b.bank.mu)
    if exact_posteriors:
        np.testing.assert_array_equal(mu_b, mu_a)
        np.testing.assert_array_equal(np.asarray(b.bank.log_sigma), np.asarray(a.bank.log_sigma))
    else:
        np.testing.assert_allclose(mu_b, mu_a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            np.asarray(b.bank.log_sigma), np.asarray(a.bank.log_sigma), rtol=1e-5, atol=1e-6
        )
    np.testing.assert_array_equal(b.bank.labels, a.bank.labels)
    np.testing.assert_array_equal(b.bank.ids, a.bank.ids)
    z = np.random.default_rng(5).normal(size=(12, 4))
    want = top_k(log_q(z, mu_a, np.asarray(a.bank.log_sigma)), 10)
    for engine in (a, b):
        got = np.stack([r.rows for r in engine.search_batch(z, 10, mode="exact")])
        np.testing.assert_array_equal(got, want)


def test_local_index_of_parquet_equals_the_npz_index(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    run_index_job(_config(tmp_path / "npz", tiny_model_dir, data["npz"]))
    run_index_job(_config(tmp_path / "png", tiny_model_dir, data["png"], parquet_column="image"))
    _same_index(tmp_path / "npz", tmp_path / "png", exact_posteriors=True)


def test_cli_index_takes_the_parquet_options(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "root"
    args = ["index", "--model", str(tiny_model_dir), "--data", str(data["flat"]), "--out", str(out)]
    args += ["--device", "cpu", "--batch-size", "64", "--no-progress", "--parquet-column", "pixels"]
    args += ["--parquet-shape", "8,8,1", "--label-column", "label", "--id-column", "id"]
    assert main(args) == 0
    assert f"indexed {N} items" in capsys.readouterr().out
    run_index_job(_config(tmp_path / "npz", tiny_model_dir, data["npz"]))
    _same_index(tmp_path / "npz", out, exact_posteriors=True)
    current = IndexRoot(out).current()
    assert current is not None
    manifest = IndexRoot(out).manifest(current)
    assert manifest["metadata"]["job"]["parquet_shape"] == [8, 8, 1]


@pytest.fixture(scope="module")
def ray_session() -> Iterator[Any]:
    """A local 2-CPU Ray instance for this module (skipped cleanly without the ray extra), or the
    one another module's session fixture left running (tests/test_indexer_ray.py's)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_index_of_parquet_equals_the_npz_index(
    ray_session: Any, tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    from latentsearch.indexer.ray_encode import ray_encode

    run_index_job(_config(tmp_path / "npz", tiny_model_dir, data["npz"]))
    for kind in ("png", "flat"):
        result = run_index_job(
            _config(tmp_path / kind, tiny_model_dir, data[kind], ray=True, ray_actors=2), encode=ray_encode
        )
        assert result.items == N
        _same_index(tmp_path / "npz", tmp_path / kind, exact_posteriors=False)
    assert ray_session.is_initialized()  # the job used this module's instance


def test_ray_parquet_error_names_the_file_and_keeps_the_current_version(
    ray_session: Any, tiny_model_dir: Path, tiny_model: LoadedModel, images: np.ndarray, tmp_path: Path
) -> None:
    from latentsearch.indexer.ray_encode import ray_encode

    out = tmp_path / "root"
    rows = [_png(x) for x in images[:100]]
    good = _write(tmp_path / "good.parquet", image=pa.array(rows, pa.binary()))
    first = run_index_job(_config(out, tiny_model_dir, good, ray=True), encode=ray_encode).version
    rows[90] = _png(np.zeros((9, 9), np.uint8))
    bad = _write(tmp_path / "bad.parquet", image=pa.array(rows, pa.binary()))
    # the job may meet the bad row before the encode (hashing the items) or in an actor
    either = r"bad\.parquet: column 'image': row (90|\d+ of a Ray block) is"
    with pytest.raises(InvalidArgumentError, match=either):
        run_index_job(_config(out, tiny_model_dir, bad, ray=True, ray_actors=2), encode=ray_encode)
    root = IndexRoot(out)
    assert root.current() == first and root.versions() == [first]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    # the encode step alone: the driver reads only the first image's size, an actor decodes row 90
    config = _config(tmp_path / "unused", tiny_model_dir, bad, ray=True)
    in_actor = r"bad\.parquet: column 'image': row \d+ of a Ray block is a 9x9"
    with pytest.raises(InvalidArgumentError, match=in_actor):
        ray_encode(tiny_model, open_dataset(bad), tmp_path / "encode", config)
