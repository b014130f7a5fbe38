"""``latentsearch quickstart`` end to end at reduced size: train, index, serve, query, picture, stop."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reference import log_q, top_k

from latentsearch import cli
from latentsearch.data.fashion_mnist import FASHION_MNIST_CLASSES
from latentsearch.errors import InvalidArgumentError
from latentsearch.indexer import IndexRoot
from latentsearch.quickstart import QuickstartConfig, run_quickstart, write_grid

ITEMS, K, HELD = 240, 4, 2


def _slider_table(text: str) -> list[tuple[str, float]]:
    """The (id, score) rows printed under the slider query's title."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Nearest: slider point z ="))
    rows = []
    for line in lines[start + 2 :]:
        m = re.match(r"^\s+(\d+)\s+(\S+)\s+(-?\d+\.\d+)\s", line)
        if m is None:
            break
        rows.append((m.group(2), float(m.group(3))))
    return rows


def _brute_force(root: Path, version: str, z: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
    """Ids and scores of the top ``k`` for ``z (d,)``: the float64 reference over the whole index."""
    bank = IndexRoot(root).load(version).bank
    scores = log_q(z, bank.mu, bank.log_sigma)[0]  # (N,)
    order = top_k(scores, k)
    return bank.id_of(order), scores[order]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    out = tmp_path_factory.mktemp("quickstart")
    config = QuickstartConfig(
        out=out, items=ITEMS, held_out=HELD, epochs=1, time_limit_s=30.0, k=K, progress=False
    )
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = run_quickstart(config)
    return config, result, buf.getvalue()


def test_outputs_and_brute_force(quickstart_run: tuple) -> None:
    _, result, text = quickstart_run
    assert result.matches_brute_force
    assert "identical to the float64 brute force over the index: True" in text
    # Printed neighbours of the slider query = brute force over the indexed posteriors.
    printed = _slider_table(text)
    ids, scores = _brute_force(result.index_root, result.index_version, result.slider_z, K)
    assert [i for i, _ in printed] == ids
    np.testing.assert_allclose([s for _, s in printed], scores, atol=1e-6, rtol=0)
    assert [h.id for h in result.slider_hits] == ids
    # The index: ITEMS - HELD items, published as the current version of a versioned root.
    root = IndexRoot(result.index_root)
    assert root.current() == result.index_version
    assert root.manifest(result.index_version)["items"] == ITEMS - HELD
    # The other calls were made and printed.
    assert text.count("NearestToDistribution:") == HELD
    assert text.count("z = its posterior mean (Encode)") == HELD


def test_tables_show_class_names_and_match_probabilities(quickstart_run: tuple) -> None:
    """The default data is the packaged Fashion-MNIST sample: neighbours carry its class names, and
    each slider neighbour's printed p(i|z) and the printed log q(z) equal the float64 reference
    (softmax and logsumexp of log q(z|x_i) over every indexed item)."""
    _, result, text = quickstart_run
    assert "no --data given: using the built-in fashion-mnist-sample" in text
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Nearest: slider point z ="))
    assert "p(i|z)" in lines[start + 1]
    bank = IndexRoot(result.index_root).load(result.index_version).bank
    scores = log_q(result.slider_z, bank.mu, bank.log_sigma)[0]  # (N,) float64
    log_norm = np.logaddexp.reduce(scores)
    assert bank.labels is not None  # the sample is labelled
    rows = [line.split() for line in lines[start + 2 : start + 2 + K]]
    order = top_k(scores, K)
    for row, i in zip(rows, order, strict=True):
        expected = np.exp(scores[i] - log_norm)
        assert (expected < 5e-5) if row[3] == "<1e-4" else float(row[3]) == pytest.approx(expected, abs=6e-5)
        assert " ".join(row[4:]) == FASHION_MNIST_CLASSES[int(bank.labels[i])]
    density = lines[start + 2 + K]
    match = re.match(r"\s+log q\(z\) = (-?\d+\.\d+) .*typicality (\d\.\d\d)$", density)
    assert match, density
    assert float(match.group(1)) == pytest.approx(log_norm - np.log(len(scores)), abs=1.5e-3)
    assert 0.0 <= float(match.group(2)) <= 1.0
    # Held-out items are named too, and every held-out table shows probabilities.
    titles = [line for line in lines if line.startswith("Nearest: held-out item")]
    assert len(titles) == HELD and all(any(n in t for n in FASHION_MNIST_CLASSES) for t in titles)
    assert text.count("typicality") >= 1 + 2 * HELD


def test_picture(quickstart_run: tuple) -> None:
    _, result, text = quickstart_run
    # (1 + HELD) rows x (1 + K) tiles of 28 px, 4 px gaps, 4x upscaled.
    with Image.open(result.grid_png) as img:
        assert img.size == (((1 + K) * 32 + 4) * 4, ((1 + HELD) * 32 - 4) * 4)
        assert np.asarray(img).max() > 0
    with Image.open(result.decoded_png) as img:
        assert img.size[:2] == (28, 28)
    assert str(result.grid_png) in text


def test_server_stopped(quickstart_run: tuple) -> None:
    _, result, text = quickstart_run
    assert result.port > 0
    with socket.socket() as sock:
        sock.settimeout(1.0)
        assert sock.connect_ex(("127.0.0.1", result.port)) != 0
    assert f"port {result.port} closed" in text


def test_rerun_reuses_model_and_publishes_a_new_version(quickstart_run: tuple, capsys) -> None:
    config, first, _ = quickstart_run
    second = run_quickstart(config)
    text = capsys.readouterr().out
    assert second.model_reused and "model: reusing" in text
    assert second.index_version != first.index_version
    assert IndexRoot(second.index_root).current() == second.index_version
    assert second.matches_brute_force


def test_cli_alias_and_arguments() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["quickstart", "--items", "500", "--epochs", "2", "--port", "0", "-k", "3"])
    assert (args.items, args.epochs, args.port, args.k, args.out) == (500, 2, 0, 3, "quickstart-out")
    # The default run is sized by its epochs, not cut by the clock.
    assert args.time_limit is None and QuickstartConfig().time_limit_s is None
    assert parser.parse_args(["quickstart", "--time-limit", "90"]).time_limit == 90.0
    assert parser.parse_args(["demo"]).func is args.func


def test_cli_parser_loads_neither_torch_nor_faiss() -> None:
    """Building every sub-command's parser (``latentsearch --help``) leaves torch and faiss unloaded."""
    code = (
        "import sys; from latentsearch.cli import build_parser; build_parser(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'faiss'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]"]


def test_config_validation() -> None:
    with pytest.raises(InvalidArgumentError):
        QuickstartConfig(items=5)
    with pytest.raises(InvalidArgumentError):
        QuickstartConfig(port=70000)


def test_write_grid_pads_short_rows(tmp_path: Path) -> None:
    a = np.full((3, 2), 255, dtype=np.uint8)
    size = write_grid(tmp_path / "g.png", [[a, a, a], [np.ones((3, 2, 1))]], scale=1, gap=1)
    assert size == (3 * 3 + 1, 2 * 3 + 1)


def test_a_time_limit_that_cuts_training_short_is_reported_and_resumed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    config = QuickstartConfig(
        out=tmp_path, items=ITEMS, held_out=HELD, epochs=2, time_limit_s=0.0, k=K, progress=False
    )
    with caplog.at_level(logging.WARNING):
        result = run_quickstart(config)
    text = capsys.readouterr().out
    assert result.training is not None and result.training.time_limited
    assert (result.training.epochs_run, result.training.epochs_planned) == (1, 2)
    assert result.training_cut == "training stopped by --time-limit after 1 of 2 epochs"
    # A WARNING log line, the model line and the closing summary all say it.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    cut = [message for message in warnings if "time limit" in message]
    assert len(cut) == 1 and "after 1 of 2 epochs" in cut[0]
    assert "1 of 2 epochs, hash" in text
    assert "WARNING: training stopped at --time-limit 0 s after 1 of 2 epochs" in text
    assert text.rstrip().splitlines()[-1].startswith("WARNING: training stopped by --time-limit after 1 of 2")
    # The same command without the limit resumes the cut run and finishes its planned epochs.
    again = run_quickstart(dataclasses.replace(config, time_limit_s=None))
    text = capsys.readouterr().out
    assert "model: resuming the training" in text and "WARNING" not in text
    assert again.training is not None and not again.training.time_limited
    assert [h["epoch"] for h in again.training.history] == [1, 2]
    assert again.training_cut is None and again.matches_brute_force
    # Now complete: a third run reuses it.
    assert run_quickstart(config).model_reused


def test_negative_time_limit_is_refused() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        QuickstartConfig(time_limit_s=-1.0)
    assert info.value.field == "time_limit"
